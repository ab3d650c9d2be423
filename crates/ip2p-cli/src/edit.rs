//! `ip2p edit`: edit images with instructions using a diffusers InstructPix2Pix folder or an
//! original single-file checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::{DType, Tensor, TensorData};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use ip2p_nn::Backend;
use ip2p_pipeline::{
    EditOptions, Flow, LoadOptions, MemoryProbe, Prompts, RngKind, RunSettings, StepInfo,
    edit_one_shot,
};
use ip2p_sched::SchedulerKind;
use ip2p_vae::image_io::{ResizeRule, load_image, resize_for_vae, target_size};
use ip2p_vae::{images_to_tensor, tensor_to_images};

use crate::backend::{BackendKind, DTypeArg};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Resize {
    /// diffusers: each side down to a multiple of 8 (Lanczos).
    Diffusers,
    /// The original InstructPix2Pix: long side 512, sides multiples of 64, centre crop.
    Original,
}

/// The generator `--seed` drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Rng {
    /// torch's CPU generator: the image diffusers gives for generator=torch.Generator().manual_seed(SEED).
    Torch,
    /// ip2p's earlier generator (xoshiro256++), to reproduce images made before torch's was added.
    Ip2p,
}

impl From<Rng> for RngKind {
    fn from(rng: Rng) -> Self {
        match rng {
            Rng::Torch => RngKind::Torch,
            Rng::Ip2p => RngKind::Ip2p,
        }
    }
}

#[derive(Debug, Args)]
pub struct EditArgs {
    /// A diffusers InstructPix2Pix folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    /// scheduler/), or an original single-file checkpoint (instruct-pix2pix-00-22000.ckpt or its
    /// .safetensors).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub single: crate::model_args::SingleFileArgs,
    /// Input image (PNG, JPEG, WebP). Repeat to edit a batch; paired in order with --prompt.
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// The edit instruction. Repeat, one per image.
    #[arg(long = "prompt", required = true)]
    pub prompts: Vec<String>,
    /// Output image. One per input, or one name that gets `-N` suffixes for a batch.
    #[arg(long = "output")]
    pub outputs: Vec<PathBuf>,
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Text guidance scale.
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// Image guidance scale (guidance needs ≥ 1, and --guidance > 1).
    #[arg(long, default_value_t = 1.5)]
    pub image_guidance: f64,
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// euler-ancestral (the model's own), euler, ddim, ddpm, dpm-solver++.
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Seeds the initial noise and every stochastic step's noise (see --rng).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Noise generator for --seed. torch: the same seed, model, scheduler and settings give
    /// diffusers' image (float32). ip2p: the generator of earlier ip2p versions.
    #[arg(long, value_enum, default_value_t = Rng::Torch)]
    pub rng: Rng,
    /// Initial noise: safetensors with tensor `latents` [batch, 4, h/8, w/8], unit Gaussian.
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// Write the final latents (tensor `latents`) here.
    #[arg(long)]
    pub output_latents: Option<PathBuf>,
    /// Skip the VAE decode (and do not load the VAE if --image-latents is given too).
    #[arg(long, requires = "output_latents")]
    pub no_decode: bool,
    /// Image latents (VAE mode(), unscaled; tensor `latents`): skips the VAE encode.
    #[arg(long, conflicts_with = "images")]
    pub image_latents: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,
    /// Weight variant, e.g. fp16 for *.fp16.safetensors.
    #[arg(long)]
    pub variant: Option<String>,
    /// f16 weights of a variant computed in f32: `keep` holds the Conv2d/Linear weights in f16
    /// (half the memory) and widens them inside each layer, exactly, so the results equal
    /// `widen`'s (all weights converted to f32 at load). `auto` (the default): keep on the CPU
    /// backend when --variant is given and --dtype is f32, widen otherwise.
    #[arg(long, value_enum, default_value_t = HalfWeights::Auto)]
    pub f16_weights: HalfWeights,
    #[arg(long, value_enum, default_value_t = Resize::Diffusers)]
    pub resize: Resize,
    /// Activation memory budget in MiB: a larger batch runs in chunks sized by resolution.
    #[arg(long)]
    pub memory_budget_mib: Option<u64>,
    /// Release cached device memory every N steps.
    #[arg(long)]
    pub cleanup_every: Option<usize>,
    /// Print a per-stage time and memory table.
    #[arg(long)]
    pub memory_report: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// What to do with the f16 weights of a variant when computing in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HalfWeights {
    Auto,
    Keep,
    Widen,
}

impl HalfWeights {
    fn keep(self) -> Option<bool> {
        match self {
            Self::Auto => None,
            Self::Keep => Some(true),
            Self::Widen => Some(false),
        }
    }
}

pub fn run(args: &EditArgs) -> Result<()> {
    crate::backend::dispatch!(args.backend, args.dtype, |device, probe| edit::<B>(
        args, device, probe
    ))
}

fn edit<B: Backend>(args: &EditArgs, device: B::Device, probe: &dyn MemoryProbe) -> Result<()> {
    let latents_in = args.image_latents.is_some();
    let decode = !args.no_decode;
    let n = if latents_in {
        args.prompts.len()
    } else {
        args.images.len()
    };
    if !latents_in && args.images.is_empty() {
        bail!("give --image (or --image-latents)");
    }
    if n != args.prompts.len() {
        bail!(
            "{} image(s) but {} prompt(s): each image needs its own --prompt",
            n,
            args.prompts.len()
        );
    }
    let outputs = output_paths(&args.outputs, n, decode)?;

    let options = args.single.apply(LoadOptions {
        dtype: Some(args.dtype.dtype()),
        variant: args.variant.clone(),
        half_weights: args.f16_weights.keep(),
        ..LoadOptions::default()
    });
    // One-shot: each part is loaded for its stage and dropped after it (ip2p_pipeline::one_shot),
    // so only the configs (and a single file's header) are read before the images.
    let vae_config = ip2p_pipeline::model::ModelSource::open(&args.model, &options)
        .and_then(|source| source.vae_config())
        .with_context(|| format!("loading {}", args.model.display()))?;
    let factor = vae_config.downscale_factor() as u32;

    let input = if let Some(path) = &args.image_latents {
        read_latents::<B>(path, &device)?
    } else {
        read_images::<B>(&args.images, args.resize, factor, &device)?
    };
    let init_latents = args
        .init_latents
        .as_ref()
        .map(|p| read_latents::<B>(p, &device))
        .transpose()?;
    let kind = args
        .scheduler
        .as_deref()
        .map(SchedulerKind::from_name)
        .transpose()?;

    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(args.steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps, {elapsed} (eta {eta})")?
            .progress_chars("=> "),
    );
    bar.set_message("denoising");
    let mut on_step = |info: &StepInfo<'_, B>| {
        bar.set_length(info.steps as u64);
        bar.set_position(info.step as u64 + 1);
        Flow::Continue
    };
    let settings = RunSettings {
        options: EditOptions {
            steps: args.steps,
            guidance_scale: args.guidance,
            image_guidance_scale: args.image_guidance,
            negative_prompt: args.negative_prompt.clone(),
            num_images_per_prompt: 1,
            seed: args.seed,
            rng: args.rng.into(),
            cleanup_every: args.cleanup_every,
            memory_budget: args.memory_budget_mib.map(|m| m << 20),
        },
        init_latents,
        probe,
        callback: Some(&mut on_step),
        activation_model: None,
    };
    let out = edit_one_shot(
        &args.model,
        &device,
        &options,
        kind,
        input,
        Prompts::Text(args.prompts.clone()),
        latents_in,
        !decode,
        settings,
    )
    .with_context(|| format!("editing with {}", args.model.display()))?;
    bar.finish_and_clear();

    // Everything is computed before anything is written: a failure leaves no half output.
    let images = if decode {
        Some(tensor_to_images(out.output.clone())?)
    } else {
        None
    };
    if let Some(path) = &args.output_latents {
        let latents = if decode {
            None
        } else {
            Some(out.output.clone())
        };
        match latents {
            Some(l) => write_latents(path, l)?,
            None => bail!(
                "--output-latents needs --no-decode (the decoded run does not keep its latents)"
            ),
        }
    }
    if let Some(images) = images {
        for (img, path) in images.iter().zip(&outputs) {
            ip2p_vae::save_image(img, path)
                .with_context(|| format!("writing {}", path.display()))?;
            if !args.quiet {
                eprintln!("wrote {}", path.display());
            }
        }
    }
    if args.memory_report {
        let t = &out.load_times;
        let part = |s: Option<f64>| s.map_or("not loaded".to_string(), |s| format!("{s:.2} s"));
        println!(
            "model load: {:.2} s (UNet {:.2} s, VAE {}, text encoder {}; each part loaded for its stage)\n\n{}",
            t.unet_s + t.vae_s.unwrap_or(0.0) + t.text_s.unwrap_or(0.0),
            t.unet_s,
            part(t.vae_s),
            part(t.text_s),
            out.report.table()
        );
    }
    Ok(())
}

fn output_paths(outputs: &[PathBuf], n: usize, decode: bool) -> Result<Vec<PathBuf>> {
    if !decode {
        return Ok(Vec::new());
    }
    match outputs.len() {
        0 => bail!("give --output for the edited image(s)"),
        k if k == n => Ok(outputs.to_vec()),
        1 => {
            let p = &outputs[0];
            if n == 1 {
                return Ok(vec![p.clone()]);
            }
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("edit");
            let ext = p.extension().and_then(|s| s.to_str()).unwrap_or("png");
            Ok((0..n)
                .map(|i| p.with_file_name(format!("{stem}-{i}.{ext}")))
                .collect())
        }
        k => bail!("{k} --output paths for {n} image(s): give one per image, or one to number"),
    }
}

fn read_images<B: Backend>(
    paths: &[PathBuf],
    resize: Resize,
    factor: u32,
    device: &B::Device,
) -> Result<Tensor<B, 4>> {
    let rule = match resize {
        Resize::Diffusers => ResizeRule::Diffusers,
        Resize::Original => ResizeRule::Ip2p { resolution: 512 },
    };
    let mut images = Vec::with_capacity(paths.len());
    for path in paths {
        let img = load_image(path)?;
        let (w, h) = img.dimensions();
        if rule == ResizeRule::Diffusers && (w % factor != 0 || h % factor != 0) {
            let (tw, th) = target_size(w, h, rule, factor);
            eprintln!(
                "warning: {} is {w}×{h}; resized to {tw}×{th} (sides must be multiples of {factor})",
                path.display()
            );
        }
        images.push(resize_for_vae(&img, rule, factor)?);
    }
    if let Some(first) = images.first() {
        let size = first.dimensions();
        if let Some((i, img)) = images
            .iter()
            .enumerate()
            .find(|(_, img)| img.dimensions() != size)
        {
            bail!(
                "images in one batch must have the same size: {} is {:?} after resizing, {} is {:?}",
                paths[0].display(),
                size,
                paths[i].display(),
                img.dimensions()
            );
        }
    }
    Ok(images_to_tensor(&images, device, DType::F32)?)
}

/// A `latents` tensor from a safetensors file (f32, f16 or bf16).
fn read_latents<B: Backend>(path: &Path, device: &B::Device) -> Result<Tensor<B, 4>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let view = st
        .tensor("latents")
        .with_context(|| format!("{}: no tensor named `latents`", path.display()))?;
    let shape = view.shape().to_vec();
    if shape.len() != 4 || shape[1] != 4 {
        bail!(
            "{}: `latents` has shape {shape:?}, expected [batch, 4, h/8, w/8]",
            path.display()
        );
    }
    let b = view.data();
    let values: Vec<f32> = match view.dtype() {
        safetensors::Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        safetensors::Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => bail!(
            "{}: `latents` has dtype {other:?}; use f32, f16 or bf16",
            path.display()
        ),
    };
    if values.iter().any(|v| !v.is_finite()) {
        bail!("{}: `latents` holds NaN or infinite values", path.display());
    }
    Ok(Tensor::from_data(TensorData::new(values, shape), device))
}

/// Write `latents` (f32) atomically: a temporary file renamed into place.
fn write_latents<B: Backend>(path: &Path, latents: Tensor<B, 4>) -> Result<()> {
    let shape = latents.dims().to_vec();
    let values = latents
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &bytes)?;
    let data = safetensors::serialize([("latents", view)], None)?;
    let tmp = path.with_extension("safetensors.part");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
