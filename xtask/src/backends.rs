//! The backends: which this build and this machine can run, and running a plan on one.

use std::panic::{AssertUnwindSafe, catch_unwind};

use burn::tensor::backend::Backend;
use indicatif::ProgressBar;
use ip2p_pipeline::MemoryProbe;
use ip2p_pipeline::preset::Preset;
use serde::Serialize;

use crate::cell::{CellResult, CellShape, ModelSource, PathKind, run_cell};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// burn-flex, the CPU backend.
    Cpu,
    /// burn-wgpu (Vulkan/Metal/DX12; Debian's lavapipe is a software Vulkan).
    Wgpu,
    /// burn-cuda.
    Cuda,
}

impl BackendKind {
    pub const ALL: [BackendKind; 3] = [BackendKind::Cpu, BackendKind::Wgpu, BackendKind::Cuda];

    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        }
    }
}

/// The matrix to run (a backend runs every combination of its models).
#[derive(Debug, Clone)]
pub struct Plan {
    pub models: Vec<ModelSource>,
    pub paths: Vec<PathKind>,
    /// `(height, width)`; empty: each model's default.
    pub resolutions: Vec<(usize, usize)>,
    pub batches: Vec<usize>,
    pub steps: Option<usize>,
    pub warmup: Option<usize>,
    pub repeats: Option<usize>,
    /// Run every model on a software WGPU adapter (otherwise: only the tiny preset).
    pub software_full: bool,
}

/// Defaults per model: sized so the default SD 1.5 run finishes in minutes on a 2-core CPU.
pub struct Defaults {
    pub resolution: (usize, usize),
    pub steps: usize,
    pub warmup: usize,
    pub repeats: usize,
}

pub fn defaults(model: &ModelSource) -> Defaults {
    match model {
        ModelSource::Preset(Preset::Tiny) => Defaults {
            resolution: (64, 64),
            steps: 4,
            warmup: 1,
            repeats: 3,
        },
        ModelSource::Preset(Preset::Sd15) => Defaults {
            resolution: (256, 256),
            steps: 1,
            warmup: 0,
            repeats: 1,
        },
        ModelSource::Dir(_) => Defaults {
            resolution: (512, 512),
            steps: 2,
            warmup: 0,
            repeats: 1,
        },
    }
}

impl Plan {
    /// The cells of one model: `(path, shape)`, paths innermost so full-cycle comes first.
    pub fn cells(&self, model: &ModelSource) -> Vec<(PathKind, CellShape)> {
        let d = defaults(model);
        let resolutions = if self.resolutions.is_empty() {
            vec![d.resolution]
        } else {
            self.resolutions.clone()
        };
        let mut out = Vec::new();
        for &(height, width) in &resolutions {
            for &batch in &self.batches {
                for &path in &self.paths {
                    out.push((
                        path,
                        CellShape {
                            height,
                            width,
                            batch,
                            steps: self.steps.unwrap_or(d.steps),
                            warmup: self.warmup.unwrap_or(d.warmup),
                            repeats: self.repeats.unwrap_or(d.repeats).max(1),
                        },
                    ));
                }
            }
        }
        out
    }

    /// Edits the plan runs for these models (for the progress bar).
    pub fn runs(&self, models: &[ModelSource]) -> u64 {
        models
            .iter()
            .flat_map(|m| self.cells(m))
            .map(|(_, s)| (s.warmup + s.repeats) as u64)
            .sum()
    }
}

/// Run every cell of `models` on backend `B`.
pub fn run_backend<B: Backend>(
    label: &str,
    device: &B::Device,
    plan: &Plan,
    models: &[ModelSource],
    probe: &dyn MemoryProbe,
    pb: &ProgressBar,
) -> Vec<CellResult> {
    let device_name = B::name(device);
    let mut results = Vec::new();
    for source in models {
        let cells = plan.cells(source);
        let name = source.name();
        pb.set_message(format!("{label}: building {name}"));
        let mut model = match source.load::<B>(device) {
            Ok(m) => m,
            Err(e) => {
                for (path, shape) in cells {
                    pb.inc((shape.warmup + shape.repeats) as u64);
                    results.push(CellResult::skipped(
                        label,
                        &name,
                        path,
                        shape,
                        format!("model did not load: {e:#}"),
                        "failed",
                    ));
                }
                continue;
            }
        };
        for (path, shape) in cells {
            pb.set_message(format!(
                "{label} {name} {} {}×{} b{} {} steps",
                path.name(),
                shape.height,
                shape.width,
                shape.batch,
                shape.steps
            ));
            let mut done = 0u64;
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                run_cell(&mut model, path, shape, probe, &mut || {
                    done += 1;
                    pb.inc(1);
                })
            }));
            let runs = (shape.warmup + shape.repeats) as u64;
            pb.inc(runs.saturating_sub(done));
            let mut result = CellResult::skipped(label, &name, path, shape, "", "ok");
            result.device = device_name.clone();
            match outcome {
                Ok(Ok((first, timing, memory))) => {
                    result.reason = None;
                    result.first_run_s = Some(first);
                    result.timing = Some(timing);
                    result.memory = Some(memory);
                }
                Ok(Err(e)) => {
                    result.status = "failed".into();
                    result.reason = Some(format!("{e:#}"));
                }
                Err(panic) => {
                    result.status = "failed".into();
                    result.reason = Some(format!("panicked: {}", panic_text(&panic)));
                }
            }
            results.push(result);
        }
    }
    results
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// Every cell of `models` marked skipped with `reason`.
pub fn skip_all(
    backend: BackendKind,
    plan: &Plan,
    models: &[ModelSource],
    reason: &str,
    pb: &ProgressBar,
) -> Vec<CellResult> {
    let mut out = Vec::new();
    for m in models {
        for (path, shape) in plan.cells(m) {
            pb.inc((shape.warmup + shape.repeats) as u64);
            out.push(CellResult::skipped(
                backend.name(),
                &m.name(),
                path,
                shape,
                reason,
                "skipped",
            ));
        }
    }
    out
}

/// What the WGPU adapter is, if it can be told without initialising wgpu: `vulkaninfo
/// --summary` when installed, else the installed Vulkan drivers (only lavapipe: software).
/// Returns `(description, is_software)`.
pub fn vulkan_adapter() -> Option<(String, bool)> {
    if let Ok(name) = std::env::var("IP2P_WGPU_ADAPTER") {
        let soft = is_software_name(&name);
        return Some((name, soft));
    }
    if let Ok(out) = std::process::Command::new("vulkaninfo")
        .arg("--summary")
        .output()
        && out.status.success()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("deviceName"))
            .map(|l| l.trim_start_matches([' ', '=']).trim())
            .collect();
        let types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("deviceType"))
            .map(|l| l.trim_start_matches([' ', '=']).trim())
            .collect();
        if !names.is_empty() {
            let soft = types.iter().all(|t| t.contains("CPU"))
                || names.iter().all(|n| is_software_name(n));
            return Some((names.join(", "), soft));
        }
    }
    let mut drivers = Vec::new();
    for dir in ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d"] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            drivers.extend(
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string()),
            );
        }
    }
    if drivers.is_empty() {
        return None;
    }
    let soft = drivers.iter().all(|d| d.starts_with("lvp"));
    Some((format!("Vulkan drivers: {}", drivers.join(", ")), soft))
}

fn is_software_name(name: &str) -> bool {
    let n = name.to_lowercase();
    n.contains("llvmpipe")
        || n.contains("lavapipe")
        || n.contains("swiftshader")
        || n.contains("cpu")
}

/// Whether the machine has an NVIDIA driver (checked before initialising CUDA).
pub fn cuda_present() -> bool {
    std::path::Path::new("/dev/nvidiactl").exists()
        || std::path::Path::new("/proc/driver/nvidia").exists()
}

/// Run `plan` on `backend`; cells the build or machine cannot run come back skipped.
/// `notes` collects what the report should say about the choice.
pub fn run(
    backend: BackendKind,
    plan: &Plan,
    heap_probe: &dyn MemoryProbe,
    pb: &ProgressBar,
    notes: &mut Vec<String>,
) -> Vec<CellResult> {
    let models = plan.models.clone();
    match backend {
        BackendKind::Cpu => {
            #[cfg(feature = "flex")]
            {
                let device = Default::default();
                run_backend::<burn::backend::Flex>("cpu", &device, plan, &models, heap_probe, pb)
            }
            #[cfg(not(feature = "flex"))]
            {
                let _ = heap_probe;
                let _ = notes;
                skip_all(
                    backend,
                    plan,
                    &models,
                    "built without feature flex: run `cargo xtask bench` (default features)",
                    pb,
                )
            }
        }
        BackendKind::Wgpu => {
            let adapter = vulkan_adapter();
            #[cfg(feature = "wgpu")]
            {
                let (models, skipped) = software_filter(plan, &models, adapter.as_ref(), notes);
                let mut out = skip_all(
                    backend,
                    plan,
                    &skipped,
                    "software WGPU adapter: only the tiny preset runs unless --wgpu-software-full",
                    pb,
                );
                let device = burn::backend::wgpu::WgpuDevice::default();
                let probe = ip2p_pipeline::NoProbe;
                match catch_unwind(AssertUnwindSafe(|| {
                    run_backend::<burn::backend::Wgpu>("wgpu", &device, plan, &models, &probe, pb)
                })) {
                    Ok(r) => out.extend(r),
                    Err(p) => out.extend(skip_all(
                        backend,
                        plan,
                        &models,
                        &format!("no usable WGPU adapter: {}", panic_text(&p)),
                        pb,
                    )),
                }
                notes.push("wgpu: device memory is not probed (heap probe sees host memory only); memory columns read 0.".into());
                out
            }
            #[cfg(not(feature = "wgpu"))]
            {
                if let Some((name, soft)) = adapter {
                    notes.push(format!(
                        "wgpu: adapter {name}{}",
                        if soft { " (software)" } else { "" }
                    ));
                }
                skip_all(
                    backend,
                    plan,
                    &models,
                    "built without feature wgpu: run `cargo xtask-wgpu bench` (= cargo run -p xtask --features wgpu -- bench)",
                    pb,
                )
            }
        }
        BackendKind::Cuda => {
            #[cfg(feature = "cuda")]
            {
                if !cuda_present() {
                    return skip_all(
                        backend,
                        plan,
                        &models,
                        "no CUDA device (no NVIDIA driver)",
                        pb,
                    );
                }
                let device = burn::backend::cuda::CudaDevice::default();
                let probe = ip2p_pipeline::NoProbe;
                notes.push("cuda: device memory is not probed; memory columns read 0.".into());
                match catch_unwind(AssertUnwindSafe(|| {
                    run_backend::<burn::backend::Cuda>("cuda", &device, plan, &models, &probe, pb)
                })) {
                    Ok(r) => r,
                    Err(p) => skip_all(
                        backend,
                        plan,
                        &models,
                        &format!("CUDA did not initialise: {}", panic_text(&p)),
                        pb,
                    ),
                }
            }
            #[cfg(not(feature = "cuda"))]
            {
                let reason = if cuda_present() {
                    "built without feature cuda: run `cargo xtask-cuda bench` (= cargo run -p xtask --features cuda -- bench)"
                } else {
                    "no CUDA device on this machine (and built without feature cuda)"
                };
                skip_all(backend, plan, &models, reason, pb)
            }
        }
    }
}

/// On a software adapter, keep only the tiny preset unless asked for more.
/// Returns `(run, skipped)`.
pub fn software_filter(
    plan: &Plan,
    models: &[ModelSource],
    adapter: Option<&(String, bool)>,
    notes: &mut Vec<String>,
) -> (Vec<ModelSource>, Vec<ModelSource>) {
    match adapter {
        Some((name, true)) if !plan.software_full => {
            let (run, skip): (Vec<_>, Vec<_>) = models.iter().cloned().partition(|m| m.is_tiny());
            let run = if run.is_empty() {
                vec![ModelSource::Preset(Preset::Tiny)]
            } else {
                run
            };
            notes.push(format!(
                "wgpu: the adapter ({name}) is a software renderer, about 100× slower than the CPU backend: only the tiny preset runs on it (--wgpu-software-full for everything)."
            ));
            (run, skip)
        }
        Some((name, soft)) => {
            notes.push(format!(
                "wgpu: adapter {name}{}",
                if *soft { " (software)" } else { "" }
            ));
            (models.to_vec(), Vec::new())
        }
        None => (models.to_vec(), Vec::new()),
    }
}
