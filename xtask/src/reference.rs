//! `--reference diffusers`: the same cells with diffusers (PyTorch, CPU) in a Python
//! subprocess, tools/bench/diffusers_bench.py, on the same weights: a preset's random weights are
//! drawn once by diffusers and saved as a diffusers folder that both sides load.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use ip2p_pipeline::preset::Preset;

use crate::cell::{CellResult, ModelSource};

/// The diffusers numbers of one cell, and ip2p / diffusers ratios.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RefCell {
    pub total_s: Option<f64>,
    pub first_run_s: Option<f64>,
    pub text_s: Option<f64>,
    pub vae_encode_s: Option<f64>,
    pub denoise_s: Option<f64>,
    #[serde(default)]
    pub step_s: Vec<f64>,
    pub vae_decode_s: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
    #[serde(default)]
    pub time_ratio: Option<f64>,
    #[serde(default)]
    pub rss_ratio: Option<f64>,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ScriptOut {
    cells: Vec<ScriptCell>,
}

#[derive(Debug, Deserialize)]
struct ScriptCell {
    path: String,
    #[serde(flatten)]
    numbers: RefCell,
}

/// The Python to use: `--python`, `$IP2P_PYTHON`, or the project venv.
pub fn find_python(flag: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    if let Ok(p) = std::env::var("IP2P_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    let venv = PathBuf::from("/root/.cache/ip2p/venv/bin/python");
    if venv.is_file() {
        return Ok(venv);
    }
    bail!(
        "no Python with torch and diffusers: pass --python PATH or set IP2P_PYTHON (see README: Benchmarks)"
    )
}

/// Where diffusers saves `preset`'s random weights for `--reference diffusers`: a folder under
/// the system's temporary directory, kept between runs (SD 1.5 takes 4 GB and a minute to write).
pub fn shared_weights_dir(preset: Preset) -> PathBuf {
    std::env::temp_dir()
        .join("ip2p-bench-weights")
        .join(format!("{}-seed0", preset.name()))
}

/// Have diffusers draw `preset`'s random weights (torch seed 0) and save them as a diffusers
/// InstructPix2Pix folder, once: a folder already complete (its `model_index.json` is written
/// last) is reused. Returns the folder, which both ip2p and diffusers then load.
pub fn share_weights(python: &Path, preset: Preset) -> Result<PathBuf> {
    let dir = shared_weights_dir(preset);
    if dir.join("model_index.json").is_file() {
        return Ok(dir);
    }
    eprintln!(
        "diffusers: drawing the {} weights and saving them to {}…",
        preset.name(),
        dir.display()
    );
    let script = crate::workspace_root().join("tools/bench/diffusers_bench.py");
    let out = Command::new(python)
        .arg(&script)
        .args(["--preset", preset.name(), "--save"])
        .arg(&dir)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() || !dir.join("model_index.json").is_file() {
        bail!(
            "saving the {} weights to {} failed: {}",
            preset.name(),
            dir.display(),
            last_error_line(&out)
        );
    }
    Ok(dir)
}

/// The last line of a Python process's stderr: the exception, for error messages.
pub fn last_error_line(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    err.lines().last().unwrap_or("").to_string()
}

/// Check that `python` imports torch and diffusers; their versions.
pub fn check_python(python: &Path) -> Result<String> {
    probe_python(
        python,
        "import torch, diffusers, transformers; print(f'torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads')",
        "torch/diffusers/transformers",
    )
}

/// Run `code` with `python` and return what it printed; an error naming `what` when it fails.
pub fn probe_python(python: &Path, code: &str, what: &str) -> Result<String> {
    let out = Command::new(python)
        .args(["-c", code])
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "{} cannot import {what}: {}",
            python.display(),
            last_error_line(&out)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Run the reference for every ok CPU cell, grouped by model and shape (one Python process per
/// group: the model is built once), and attach the results with ratios.
pub fn run(
    python: &Path,
    cells: &mut [CellResult],
    models: &[ModelSource],
    pb: &indicatif::ProgressBar,
) -> Result<()> {
    let script = crate::workspace_root().join("tools/bench/diffusers_bench.py");
    let mut groups: Vec<(String, crate::cell::CellShape)> = Vec::new();
    // diffusers runs f32 on the CPU: only those cells have a counterpart.
    let f32 = crate::parity::Precision::F32;
    for c in cells
        .iter()
        .filter(|c| c.ok() && c.backend == "cpu" && c.shape.dtype == f32)
    {
        let key = (c.model.clone(), c.shape);
        if !groups.contains(&key) {
            groups.push(key);
        }
    }
    for (model, shape) in groups {
        let Some(source) = models.iter().find(|m| m.name() == model) else {
            continue;
        };
        let paths: Vec<&str> = cells
            .iter()
            .filter(|c| c.ok() && c.backend == "cpu" && c.model == model && c.shape == shape)
            .map(|c| c.path.name())
            .collect();
        pb.set_message(format!(
            "diffusers {model} {}×{} b{}",
            shape.width, shape.height, shape.batch
        ));
        let mut cmd = Command::new(python);
        cmd.arg(&script);
        match source {
            ModelSource::Preset(p) => cmd.args(["--preset", p.name()]),
            ModelSource::Shared { dir: d, .. } | ModelSource::Dir(d) => cmd.arg("--model").arg(d),
        };
        cmd.args([
            "--height",
            &shape.height.to_string(),
            "--width",
            &shape.width.to_string(),
            "--batch",
            &shape.batch.to_string(),
            "--steps",
            &shape.steps.to_string(),
            "--warmup",
            &shape.warmup.to_string(),
            "--repeats",
            &shape.repeats.to_string(),
            "--paths",
            &paths.join(","),
        ]);
        let result = cmd
            .output()
            .with_context(|| format!("running {}", script.display()))
            .and_then(|out| {
                if !out.status.success() {
                    bail!("exit {}: {}", out.status, last_error_line(&out));
                }
                let text = String::from_utf8_lossy(&out.stdout);
                let json = text
                    .lines()
                    .rev()
                    .find(|l| l.starts_with('{'))
                    .unwrap_or("");
                serde_json::from_str::<ScriptOut>(json).context("reading the script's JSON")
            });
        match result {
            Ok(out) => {
                for rc in out.cells {
                    if let Some(c) = cells.iter_mut().find(|c| {
                        c.ok()
                            && c.backend == "cpu"
                            && c.model == model
                            && c.shape == shape
                            && c.path.name() == rc.path
                    }) {
                        let mut r = rc.numbers;
                        let ours_t = c.timing.as_ref().map(|t| t.total_s);
                        let ours_m = c.memory.as_ref().and_then(|m| m.rss_peak_bytes);
                        r.time_ratio = ours_t.zip(r.total_s).map(|(a, b)| a / b);
                        r.rss_ratio = ours_m
                            .zip(r.peak_rss_bytes)
                            .map(|(a, b)| a as f64 / b as f64);
                        c.reference = Some(r);
                    }
                }
            }
            Err(e) => {
                for c in cells.iter_mut().filter(|c| {
                    c.ok() && c.backend == "cpu" && c.model == model && c.shape == shape
                }) {
                    c.reference = Some(RefCell {
                        error: Some(format!("{e:#}")),
                        ..RefCell::default()
                    });
                }
            }
        }
    }
    Ok(())
}
