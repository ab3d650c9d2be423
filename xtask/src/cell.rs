//! One benchmark cell: a model on a backend, one path, one resolution and batch, timed over
//! warm-up and repeats.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::{Distribution, Tensor};
use ip2p_nn::Backend;
use ip2p_pipeline::preset::Preset;
use ip2p_pipeline::{
    EditOptions, Ip2pModel, LoadOptions, MemoryProbe, Prompts, RunReport, RunSettings, Stage,
};
use ip2p_text::ClipTokenizer;
use serde::Serialize;

/// What goes in and what comes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PathKind {
    /// image → VAE encode → denoise → VAE decode → image.
    FullCycle,
    /// latents → denoise → VAE decode → image.
    LatentIn,
    /// latents → denoise → latents.
    LatentOnly,
}

impl PathKind {
    pub const ALL: [PathKind; 3] = [
        PathKind::FullCycle,
        PathKind::LatentIn,
        PathKind::LatentOnly,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PathKind::FullCycle => "full-cycle",
            PathKind::LatentIn => "latent-in",
            PathKind::LatentOnly => "latent-only",
        }
    }
}

/// A model: a built-in preset with random weights, a diffusers folder or a single-file
/// checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// Random weights drawn by Burn.
    Preset(Preset),
    /// A preset whose random weights diffusers drew and saved to `dir` (for `--reference
    /// diffusers`: both sides run on the same numbers).
    Shared {
        preset: Preset,
        dir: PathBuf,
    },
    Dir(PathBuf),
}

impl ModelSource {
    pub fn name(&self) -> String {
        match self {
            ModelSource::Preset(p) | ModelSource::Shared { preset: p, .. } => p.name().to_string(),
            ModelSource::Dir(d) => d.display().to_string(),
        }
    }

    /// The built-in architecture, if this is one.
    pub fn preset(&self) -> Option<Preset> {
        match self {
            ModelSource::Preset(p) | ModelSource::Shared { preset: p, .. } => Some(*p),
            ModelSource::Dir(_) => None,
        }
    }

    pub fn is_tiny(&self) -> bool {
        self.preset() == Some(Preset::Tiny)
    }

    /// Build (random weights) or load the model, the UNet and text encoder in `dtype`.
    pub fn load<B: Backend>(
        &self,
        device: &B::Device,
        dtype: crate::parity::Precision,
    ) -> Result<Ip2pModel<B>> {
        let options = LoadOptions {
            dtype: Some(dtype.dtype()),
            ..LoadOptions::default()
        };
        match self {
            ModelSource::Preset(p) => {
                let tokenizer = ClipTokenizer::from_dir(tokenizer_dir(*p))
                    .with_context(|| format!("tokenizer of preset {}", p.name()))?;
                Ok(Ip2pModel::random(*p, Some(tokenizer), device, &options)?)
            }
            ModelSource::Shared { dir: d, .. } | ModelSource::Dir(d) => {
                Ok(Ip2pModel::load(d, device, &options)
                    .with_context(|| format!("loading {}", d.display()))?)
            }
        }
    }
}

/// The vocabulary a preset uses: the full CLIP BPE for SD 1.5, the tiny model's own otherwise.
pub fn tokenizer_dir(preset: Preset) -> PathBuf {
    let fixtures = crate::workspace_root().join("fixtures");
    match preset {
        Preset::Sd15 => fixtures.join("clip-bpe"),
        Preset::Tiny => fixtures.join("models").join("tiny").join("tokenizer"),
    }
}

/// Sizes and counts of a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CellShape {
    /// Compute dtype of the UNet and text encoder (the VAE runs in f32).
    pub dtype: crate::parity::Precision,
    pub height: usize,
    pub width: usize,
    pub batch: usize,
    pub steps: usize,
    pub warmup: usize,
    pub repeats: usize,
}

/// Medians over the measured runs, per stage.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timing {
    /// Wall time of the whole edit call.
    pub total_s: f64,
    /// Tokenize + text encode.
    pub text_s: Option<f64>,
    pub vae_encode_s: Option<f64>,
    /// All denoising steps.
    pub denoise_s: f64,
    /// Each denoising step.
    pub step_s: Vec<f64>,
    pub vae_decode_s: Option<f64>,
}

/// Peak bytes per stage (largest over the measured runs) as the probe saw them. On a cubecl
/// pool the baseline is bytes in use and the peaks are the pool's reservation (see
/// `ip2p_pipeline::SampledPeak`), so the activation peak includes the pool's slack.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Memory {
    pub source: String,
    /// In use before the run: weights and inputs.
    pub baseline_bytes: u64,
    /// Weights of the parts this path uses (UNet, text encoder, and the VAE unless latent-only).
    pub weights_bytes: u64,
    /// Most bytes in use during the run (all resident weights included).
    pub peak_bytes: u64,
    /// `peak_bytes - baseline_bytes`: what the run itself allocated at its peak.
    pub activation_peak_bytes: u64,
    /// `weights_bytes + activation_peak_bytes`: the peak of a process that loads only the parts
    /// this path needs. The latent paths' savings are computed on this.
    pub path_peak_bytes: u64,
    pub text_peak_bytes: Option<u64>,
    pub vae_encode_peak_bytes: Option<u64>,
    pub denoise_peak_bytes: u64,
    pub vae_decode_peak_bytes: Option<u64>,
    /// The process's peak resident set during the measured runs (Linux `VmHWM`, reset per cell
    /// through `/proc/self/clear_refs`); comparable with the diffusers reference.
    pub rss_peak_bytes: Option<u64>,
}

/// One cell's result.
#[derive(Debug, Clone, Serialize)]
pub struct CellResult {
    pub backend: String,
    pub device: String,
    pub model: String,
    pub path: PathKind,
    #[serde(flatten)]
    pub shape: CellShape,
    /// `ok`, `skipped` or `failed`.
    pub status: String,
    pub reason: Option<String>,
    /// Wall time of the first run (includes kernel compilation/autotuning on GPU backends).
    pub first_run_s: Option<f64>,
    pub timing: Option<Timing>,
    pub memory: Option<Memory>,
    /// Against the full-cycle cell of the same model, size and backend (latent paths only).
    pub saves: Option<Savings>,
    /// The diffusers run of the same cell, when `--reference diffusers` ran.
    pub reference: Option<crate::reference::RefCell>,
    /// How long the model this cell ran on took to load, per part.
    pub load: Option<ip2p_pipeline::LoadTimes>,
    /// The process's peak resident set while that model loaded (Linux `VmHWM`, reset just
    /// before): what loading costs a one-shot process.
    pub load_rss_peak_bytes: Option<u64>,
}

/// What a latent path saves against full-cycle.
#[derive(Debug, Clone, Serialize)]
pub struct Savings {
    pub time_s: f64,
    pub time_pct: f64,
    pub peak_bytes: i64,
    pub peak_pct: f64,
}

impl CellResult {
    pub fn skipped(
        backend: &str,
        model: &str,
        path: PathKind,
        shape: CellShape,
        reason: impl Into<String>,
        status: &str,
    ) -> Self {
        Self {
            backend: backend.to_string(),
            device: String::new(),
            model: model.to_string(),
            path,
            shape,
            status: status.to_string(),
            reason: Some(reason.into()),
            first_run_s: None,
            timing: None,
            memory: None,
            saves: None,
            reference: None,
            load: None,
            load_rss_peak_bytes: None,
        }
    }

    pub fn ok(&self) -> bool {
        self.status == "ok"
    }
}

/// Linux: reset the peak resident set (`VmHWM`) of this process. False where unsupported.
pub fn reset_rss_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Linux: the peak resident set since the last reset, in bytes.
pub fn rss_peak() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Sum of seconds and max of peaks over the stages `pick` selects, `None` if none ran.
fn stage_sum(report: &RunReport, pick: impl Fn(Stage) -> bool) -> Option<(f64, u64)> {
    let mut found = None;
    for s in report.stages.iter().filter(|s| pick(s.stage)) {
        let (t, p) = found.unwrap_or((0.0, 0));
        found = Some((t + s.seconds, p.max(s.peak_bytes)));
    }
    found
}

fn is_text(s: Stage) -> bool {
    matches!(s, Stage::Tokenize | Stage::TextEncode)
}

/// Run one cell on a loaded model. `tick` is called after each run.
pub fn run_cell<B: Backend>(
    model: &mut Ip2pModel<B>,
    path: PathKind,
    shape: CellShape,
    probe: &dyn MemoryProbe,
    tick: &mut dyn FnMut(),
) -> Result<(f64, Timing, Memory)> {
    let device = model.device.clone();
    let f = model.activation_model.vae_factor.max(1);
    let (h, w, b) = (shape.height, shape.width, shape.batch);
    if h % f != 0 || w % f != 0 || h == 0 || w == 0 || b == 0 {
        bail!("{h}×{w} is not a positive multiple of the VAE factor {f}");
    }
    // Latent-only work needs no VAE: take it out so nothing can use it.
    let weights = weights_bytes(model, path);
    let vae = if path == PathKind::LatentOnly {
        model.vae.take()
    } else {
        None
    };
    let result = (|| {
        let input: Tensor<B, 4> = match path {
            PathKind::FullCycle => {
                Tensor::random([b, 3, h, w], Distribution::Uniform(-1.0, 1.0), &device)
            }
            _ => Tensor::random(
                [b, model.unet.in_channels / 2, h / f, w / f],
                Distribution::Normal(0.0, 1.0),
                &device,
            ),
        };
        let prompts: Vec<String> = (0..b)
            .map(|i| format!("turn the sky into a starry night, variant {i}"))
            .collect();
        let runs = shape.warmup + shape.repeats.max(1);
        let mut walls = Vec::new();
        let mut reports = Vec::new();
        let mut baseline = 0;
        let rss_reset = reset_rss_peak();
        let mut rss = None;
        for run in 0..runs {
            if run == shape.warmup.min(runs - 1) && rss_reset {
                reset_rss_peak();
            }
            let mut scheduler = model.scheduler(None)?;
            B::sync(&device).map_err(|e| anyhow::anyhow!("device: {e}"))?;
            baseline = probe.current();
            let start = Instant::now();
            let out = model.edit(
                &mut *scheduler,
                input.clone(),
                Prompts::Text(prompts.clone()),
                path != PathKind::FullCycle,
                path == PathKind::LatentOnly,
                RunSettings {
                    options: EditOptions {
                        steps: shape.steps,
                        seed: run as u64,
                        ..EditOptions::default()
                    },
                    probe,
                    ..RunSettings::default()
                },
            )?;
            B::sync(&device).map_err(|e| anyhow::anyhow!("device: {e}"))?;
            walls.push(start.elapsed().as_secs_f64());
            drop(out.output);
            reports.push(out.report);
            if rss_reset {
                rss = rss_peak();
            }
            tick();
        }
        let first = walls[0];
        // With no warm-up the first run is also measured.
        let measured = shape.warmup.min(runs - 1)..runs;
        let reps = &reports[measured.clone()];
        let med = |pick: &dyn Fn(Stage) -> bool| -> Option<f64> {
            let v: Vec<f64> = reps
                .iter()
                .filter_map(|r| stage_sum(r, pick).map(|x| x.0))
                .collect();
            (!v.is_empty()).then(|| median(v))
        };
        let peak = |pick: &dyn Fn(Stage) -> bool| -> Option<u64> {
            reps.iter()
                .filter_map(|r| stage_sum(r, pick).map(|x| x.1))
                .max()
        };
        let is_step = |s: Stage| matches!(s, Stage::Denoise(_));
        let steps = reps.iter().map(|r| r.denoise_steps()).max().unwrap_or(0);
        let timing = Timing {
            total_s: median(walls[measured].to_vec()),
            text_s: med(&is_text),
            vae_encode_s: med(&|s| s == Stage::VaeEncode),
            denoise_s: med(&is_step).unwrap_or(0.0),
            step_s: (0..steps)
                .map(|i| med(&|s| s == Stage::Denoise(i)).unwrap_or(0.0))
                .collect(),
            vae_decode_s: med(&|s| s == Stage::VaeDecode),
        };
        let peak_bytes = reps.iter().map(|r| r.peak_bytes()).max().unwrap_or(0);
        let activation = peak_bytes.saturating_sub(baseline);
        let memory = Memory {
            source: reps
                .first()
                .map(|r| r.memory_source.clone())
                .unwrap_or_default(),
            baseline_bytes: baseline,
            weights_bytes: weights,
            peak_bytes,
            activation_peak_bytes: activation,
            path_peak_bytes: weights + activation,
            text_peak_bytes: peak(&is_text),
            vae_encode_peak_bytes: peak(&|s| s == Stage::VaeEncode),
            denoise_peak_bytes: peak(&is_step).unwrap_or(0),
            vae_decode_peak_bytes: peak(&|s| s == Stage::VaeDecode),
            rss_peak_bytes: rss,
        };
        Ok((first, timing, memory))
    })();
    if let Some(vae) = vae {
        model.vae = Some(vae);
    }
    result
}

/// Bytes of the weights `path` uses.
pub fn weights_bytes<B: Backend>(model: &Ip2pModel<B>, path: PathKind) -> u64 {
    use burn::module::Module;
    let unet = model.unet.num_params() * model.unet.dtype().size();
    // The text encoder is loaded in the UNet's dtype.
    let text = model
        .text
        .as_ref()
        .map_or(0, |t| t.encoder().num_params() * model.unet.dtype().size());
    let vae = match (&model.vae, path) {
        (Some(v), PathKind::FullCycle | PathKind::LatentIn) => {
            v.model.num_params() * v.model.dtype().size()
        }
        _ => 0,
    };
    (unet + text + vae) as u64
}

/// Steps in a report.
trait DenoiseSteps {
    fn denoise_steps(&self) -> usize;
}

impl DenoiseSteps for RunReport {
    fn denoise_steps(&self) -> usize {
        self.stages
            .iter()
            .filter(|s| matches!(s.stage, Stage::Denoise(_)))
            .count()
    }
}

/// Fill in what each latent path saves against the full-cycle cell of the same group.
pub fn compute_savings(cells: &mut [CellResult]) {
    let fulls: Vec<(String, String, CellShape, f64, u64)> = cells
        .iter()
        .filter(|c| c.ok() && c.path == PathKind::FullCycle)
        .filter_map(|c| {
            Some((
                c.backend.clone(),
                c.model.clone(),
                c.shape,
                c.timing.as_ref()?.total_s,
                c.memory.as_ref()?.path_peak_bytes,
            ))
        })
        .collect();
    for c in cells
        .iter_mut()
        .filter(|c| c.ok() && c.path != PathKind::FullCycle)
    {
        let Some((_, _, _, ft, fp)) = fulls
            .iter()
            .find(|f| f.0 == c.backend && f.1 == c.model && f.2 == c.shape)
        else {
            continue;
        };
        let (Some(t), Some(m)) = (&c.timing, &c.memory) else {
            continue;
        };
        let pct = |saved: f64, of: f64| if of > 0.0 { 100.0 * saved / of } else { 0.0 };
        c.saves = Some(Savings {
            time_s: ft - t.total_s,
            time_pct: pct(ft - t.total_s, *ft),
            peak_bytes: *fp as i64 - m.path_peak_bytes as i64,
            peak_pct: pct(*fp as f64 - m.path_peak_bytes as f64, *fp as f64),
        });
    }
}

/// Whether `dir` looks like a diffusers InstructPix2Pix folder.
pub fn check_model_dir(dir: &Path) -> Result<()> {
    // A single-file checkpoint (instruct-pix2pix-00-22000.ckpt / .safetensors) loads with the
    // built-in SD 1.5 InstructPix2Pix configs; Ip2pModel::load checks what it is.
    if dir.is_file() {
        return Ok(());
    }
    if !dir.join("model_index.json").is_file() {
        bail!(
            "{}: no model_index.json (expected a diffusers folder or a single-file checkpoint)",
            dir.display()
        );
    }
    Ok(())
}
