//! The backends: which this build and this machine can run, and running a plan on one.

use std::panic::{AssertUnwindSafe, catch_unwind};

use indicatif::ProgressBar;
use ip2p_nn::Backend;
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
    /// Compute dtypes of the UNet and text encoder (each loads the model once).
    pub dtypes: Vec<crate::parity::Precision>,
    pub steps: Option<usize>,
    pub warmup: Option<usize>,
    pub repeats: Option<usize>,
    /// Run every model on a software WGPU adapter at its usual size (otherwise: only the tiny
    /// preset, at [`Plan::for_software_adapter`]'s size).
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
    match model.preset() {
        Some(Preset::Tiny) => Defaults {
            resolution: (64, 64),
            steps: 4,
            warmup: 1,
            repeats: 3,
        },
        Some(Preset::Sd15) => Defaults {
            resolution: (256, 256),
            steps: 1,
            warmup: 0,
            repeats: 1,
        },
        None => Defaults {
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
        let dtypes = if self.dtypes.is_empty() {
            vec![crate::parity::Precision::F32]
        } else {
            self.dtypes.clone()
        };
        let mut out = Vec::new();
        for &dtype in &dtypes {
            for &(height, width) in &resolutions {
                for &batch in &self.batches {
                    for &path in &self.paths {
                        out.push((
                            path,
                            CellShape {
                                dtype,
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
        }
        out
    }

    /// The plan for a software adapter: sizes and counts the user left open become one 32×32
    /// step after one warm-up run, which absorbs the shader compilation (minutes on lavapipe).
    pub fn for_software_adapter(&self) -> Plan {
        let mut plan = self.clone();
        if plan.resolutions.is_empty() {
            plan.resolutions = vec![(32, 32)];
        }
        plan.steps.get_or_insert(1);
        plan.warmup.get_or_insert(1);
        plan.repeats.get_or_insert(1);
        plan
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
        let name = source.name();
        let all = plan.cells(source);
        let mut dtypes: Vec<_> = all.iter().map(|(_, s)| s.dtype).collect();
        dtypes.dedup();
        for dtype in dtypes {
            let cells: Vec<_> = all
                .iter()
                .copied()
                .filter(|(_, s)| s.dtype == dtype)
                .collect();
            pb.set_message(format!("{label}: building {name} ({})", dtype.name()));
            crate::cell::reset_rss_peak();
            let mut model = match source.load::<B>(device, dtype) {
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
            let load = Some(model.load_times);
            let load_rss = crate::cell::rss_peak();
            for (path, shape) in cells {
                pb.set_message(format!(
                    "{label} {name} {} {} {}×{} b{} {} steps",
                    shape.dtype.name(),
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
                result.load = load;
                result.load_rss_peak_bytes = load_rss;
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
    }
    results
}

/// The message of a caught panic.
pub(crate) fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    let text = p
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into());
    one_line(&text)
}

/// Most characters of a skip reason: a reason is one readable line of the report.
const REASON_CHARS: usize = 160;

/// `text` as one line: a panic message's debug dump (wgpu prints its whole adapter request)
/// cut where the first struct dump (` {`) starts, whitespace collapsed, at most
/// [`REASON_CHARS`].
pub fn one_line(text: &str) -> String {
    let joined = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let cut = joined.find(" {").map_or(&joined[..], |i| &joined[..i]);
    let cut = cut.trim_end_matches([':', ' ', '(']);
    let mut line = cut.to_string();
    if line.chars().count() > REASON_CHARS {
        line = line.chars().take(REASON_CHARS - 1).collect::<String>() + "…";
    }
    if line.is_empty() {
        "unknown panic".into()
    } else {
        line
    }
}

/// `f()`, with a panic caught and returned as its one-line text; Rust's panic report (a
/// multi-line message and backtrace on stderr) is silenced while `f` runs.
pub fn quiet_catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = HOOK.lock().unwrap_or_else(|e| e.into_inner());
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(previous);
    result.map_err(|p| panic_text(&p))
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

/// The WGPU adapter Burn's default device runs on, as wgpu describes it.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub name: String,
    /// wgpu's device type: `DiscreteGpu`, `IntegratedGpu`, `VirtualGpu`, `Cpu` or `Other`.
    pub device_type: String,
    /// The graphics API: `Vulkan`, `Metal`, `Dx12`, ...
    pub api: String,
}

impl Adapter {
    /// A CPU rasteriser (lavapipe/llvmpipe, SwiftShader): about 100× slower than the CPU backend.
    pub fn is_software(&self) -> bool {
        let name = self.name.to_lowercase();
        self.device_type == "Cpu"
            || ["llvmpipe", "lavapipe", "swiftshader"]
                .iter()
                .any(|s| name.contains(s))
    }

    pub fn describe(&self) -> String {
        format!("{} ({}, {})", self.name, self.device_type, self.api)
    }
}

/// Initialise WGPU's default device once and say which adapter it got; `Err` with wgpu's
/// message when there is none. Later Burn calls on `WgpuDevice::default()` reuse this setup.
#[cfg(feature = "wgpu")]
pub fn wgpu_adapter() -> Result<Adapter, String> {
    use burn::backend::wgpu::{RuntimeOptions, WgpuDevice, graphics::AutoGraphicsApi, init_setup};
    static ADAPTER: std::sync::OnceLock<Result<Adapter, String>> = std::sync::OnceLock::new();
    ADAPTER
        .get_or_init(|| {
            let setup = quiet_catch(|| {
                init_setup::<AutoGraphicsApi>(&WgpuDevice::default(), RuntimeOptions::default())
            })?;
            let info = setup.adapter.get_info();
            let device_type = format!("{:?}", info.device_type);
            Ok(Adapter {
                name: info.name,
                device_type,
                api: format!("{:?}", info.backend),
            })
        })
        .clone()
}

/// Whether the machine has an NVIDIA driver (checked before initialising CUDA) and CUDA may use
/// a device: an empty `CUDA_VISIBLE_DEVICES` hides them all, as CUDA itself reads it.
pub fn cuda_present() -> bool {
    if std::env::var_os("CUDA_VISIBLE_DEVICES").is_some_and(|v| v.is_empty()) {
        return false;
    }
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
            #[cfg(feature = "wgpu")]
            {
                let adapter = match wgpu_adapter() {
                    Ok(a) => a,
                    Err(e) => {
                        let reason = format!("no WGPU adapter: {e}");
                        return skip_all(backend, plan, &models, &reason, pb);
                    }
                };
                let (small, models, skipped) = software_filter(plan, &models, &adapter, notes);
                let mut out = skip_all(
                    backend,
                    plan,
                    &skipped,
                    "software WGPU adapter: only the tiny preset runs unless --wgpu-software-full",
                    pb,
                );
                // The progress bar counted the full plan's runs.
                let (full, now) = (plan.runs(&models), small.runs(&models));
                pb.set_length(
                    pb.length()
                        .unwrap_or(0)
                        .saturating_sub(full.saturating_sub(now)),
                );
                let plan = &small;
                let device = burn::backend::wgpu::WgpuDevice::default();
                let probe = ip2p_pipeline::memory::cube_pool_probe::<burn::cubecl::wgpu::WgpuRuntime>(
                    "wgpu pool",
                    &device,
                );
                out.extend(run_backend::<burn::backend::Wgpu>(
                    "wgpu", &device, plan, &models, &probe, pb,
                ));
                out
            }
            #[cfg(not(feature = "wgpu"))]
            {
                let _ = notes;
                skip_all(
                    backend,
                    plan,
                    &models,
                    "built without feature wgpu: run `cargo xtask bench` (default features)",
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
                let probe = ip2p_pipeline::memory::cube_pool_probe::<burn::cubecl::cuda::CudaRuntime>(
                    "cuda pool",
                    &device,
                );
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

/// The plan for `adapter`: on a software one, only the tiny preset at
/// [`Plan::for_software_adapter`]'s size unless asked for more. Returns `(plan, run, skipped)`.
pub fn software_filter(
    plan: &Plan,
    models: &[ModelSource],
    adapter: &Adapter,
    notes: &mut Vec<String>,
) -> (Plan, Vec<ModelSource>, Vec<ModelSource>) {
    let software = adapter.is_software();
    if !software || plan.software_full {
        notes.push(format!(
            "wgpu: adapter {}{}",
            adapter.describe(),
            if software { ", software" } else { "" }
        ));
        return (plan.clone(), models.to_vec(), Vec::new());
    }
    let (run, skip): (Vec<_>, Vec<_>) = models.iter().cloned().partition(|m| m.is_tiny());
    let run = if run.is_empty() {
        vec![ModelSource::Preset(Preset::Tiny)]
    } else {
        run
    };
    notes.push(format!(
        "wgpu: the adapter, {}, is a software renderer, about 100× slower than the CPU backend: only the tiny preset runs on it, by default at 32×32, 1 step, 1 warm-up run (which compiles the shaders), 1 repeat (--wgpu-software-full runs everything at the usual sizes).",
        adapter.describe()
    ));
    (plan.for_software_adapter(), run, skip)
}

/// Run the parity `plan` on `backend`; cases the build or machine cannot run come back skipped.
pub fn parity(
    backend: BackendKind,
    plan: &crate::parity::ParityPlan,
) -> Vec<crate::parity::ParityResult> {
    use crate::parity::{self, AttentionArg, Outputs, Precision};
    let label = backend.name();
    let mut log = |r: &parity::ParityResult| {
        eprintln!(
            "{} {} {} {:?}: {} (latents {:?}, image {:?}, {:.1} s){}",
            r.backend,
            r.fixture,
            r.dtype.name(),
            r.attention,
            r.status,
            r.latents_rel_l2,
            r.image_rel_l2,
            r.seconds.unwrap_or(0.0),
            r.reason
                .as_deref()
                .map(|w| format!(": {w}"))
                .unwrap_or_default()
        )
    };
    // The CPU backend's f32 outputs per fixture, computed once.
    let mut cache: std::collections::HashMap<String, Option<Outputs>> = Default::default();
    let mut cpu_reference = |name: &str| -> Option<Outputs> {
        #[cfg(feature = "flex")]
        {
            cache
                .entry(name.to_string())
                .or_insert_with(|| {
                    catch_unwind(|| {
                        parity::run_fixture::<burn::backend::Flex>(
                            &Default::default(),
                            name,
                            Precision::F32,
                            AttentionArg::Fused,
                        )
                        .ok()
                    })
                    .ok()
                    .flatten()
                })
                .clone()
        }
        #[cfg(not(feature = "flex"))]
        {
            let _ = (name, &mut cache);
            None
        }
    };
    match backend {
        BackendKind::Cpu => {
            #[cfg(feature = "flex")]
            {
                let no_reference = &mut |_: &str| None;
                parity::run_backend::<burn::backend::Flex>(
                    label,
                    &Default::default(),
                    plan,
                    no_reference,
                    &mut log,
                )
            }
            #[cfg(not(feature = "flex"))]
            {
                parity::skip_all(label, plan, "built without feature flex")
            }
        }
        BackendKind::Wgpu => {
            #[cfg(feature = "wgpu")]
            {
                match wgpu_adapter() {
                    Ok(a) => {
                        eprintln!("WGPU adapter: {}", a.describe());
                        let device = burn::backend::wgpu::WgpuDevice::default();
                        parity::run_backend::<burn::backend::Wgpu>(
                            label,
                            &device,
                            plan,
                            &mut cpu_reference,
                            &mut log,
                        )
                    }
                    Err(e) => parity::skip_all(label, plan, &format!("no WGPU adapter: {e}")),
                }
            }
            #[cfg(not(feature = "wgpu"))]
            {
                parity::skip_all(label, plan, "built without feature wgpu")
            }
        }
        BackendKind::Cuda => {
            #[cfg(feature = "cuda")]
            {
                if !cuda_present() {
                    return parity::skip_all(label, plan, "no CUDA device (no NVIDIA driver)");
                }
                let device = burn::backend::cuda::CudaDevice::default();
                parity::run_backend::<burn::backend::Cuda>(
                    label,
                    &device,
                    plan,
                    &mut cpu_reference,
                    &mut log,
                )
            }
            #[cfg(not(feature = "cuda"))]
            {
                parity::skip_all(label, plan, "built without feature cuda")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn skip_reasons_are_one_short_line() {
        let dump = "called `Result::unwrap()` on an `Err` value: NotFound {\n    power_preference: HighPerformance,\n    supported_backends: Backends(VULKAN | GL),\n}";
        assert_eq!(
            one_line(dump),
            "called `Result::unwrap()` on an `Err` value: NotFound"
        );
        assert_eq!(one_line("no\n  adapter"), "no adapter");
        let long = "x".repeat(500);
        assert_eq!(one_line(&long).chars().count(), super::REASON_CHARS);
        assert_eq!(one_line(""), "unknown panic");
    }
}
