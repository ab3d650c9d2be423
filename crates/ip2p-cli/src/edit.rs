//! `ip2p edit`: edit images with instructions using a diffusers InstructPix2Pix folder or an
//! original single-file checkpoint.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::tensor::{DType, Tensor};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use ip2p_nn::Backend;
use ip2p_pipeline::{
    EditOptions, Flow, LoadOptions, MemoryProbe, Prompts, RngKind, RunSettings, StepInfo,
    edit_one_shot,
};
use ip2p_sched::SchedulerKind;
use ip2p_vae::image_io::{
    ResizeRule, default_max_pixels, load_image_limited, resize_for_vae, target_size,
};
use ip2p_vae::{images_to_tensor, tensor_to_images};

use crate::interrupt::Interrupt;

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
    /// Refuse input images with more pixels than this (read from the file's header, before
    /// decoding). Default: what the machine's memory holds for the VAE at that size, at most
    /// 64 Mpx.
    #[arg(long)]
    pub max_pixels: Option<u64>,
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
    /// Write the final latents (tensor `latents`) here (with --output too: both are written).
    #[arg(long)]
    pub output_latents: Option<PathBuf>,
    /// Skip the VAE decode (and do not load the VAE if --image-latents is given too).
    #[arg(long, requires = "output_latents")]
    pub no_decode: bool,
    /// Image latents (VAE mode(), unscaled; tensor `latents`): skips the VAE encode.
    #[arg(long, conflicts_with = "images")]
    pub image_latents: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: crate::model_args::RuntimeArgs,
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

pub fn run(args: &EditArgs) -> Result<()> {
    crate::backend::dispatch!(args.runtime.backend, args.runtime.dtype, |device, probe| {
        edit::<B>(args, device, probe)
    })
}

fn edit<B: Backend>(args: &EditArgs, device: B::Device, probe: &dyn MemoryProbe) -> Result<()> {
    let interrupt = Interrupt::install();
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

    let options = args
        .single
        .apply(args.runtime.apply(LoadOptions::default()));
    // One-shot: each part is loaded for its stage and dropped after it (ip2p_pipeline::one_shot),
    // so only the configs (and a single file's header) are read before the images.
    let source = ip2p_pipeline::model::ModelSource::open(&args.model, &options)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let vae_config = source
        .vae_config()
        .with_context(|| format!("loading {}", args.model.display()))?;
    let factor = vae_config.downscale_factor() as u32;
    // diffusers' warning: CLIP sees the first model_max_length tokens only.
    let tokenizer = source
        .tokenizer()
        .with_context(|| format!("loading {}", args.model.display()))?;
    for (i, prompt) in args.prompts.iter().enumerate() {
        if tokenizer.tokenize(prompt)?.truncated {
            eprintln!(
                "warning: prompt {} is longer than the text encoder's {} tokens (start and end included) and was truncated, as diffusers does",
                i + 1,
                tokenizer.max_length()
            );
        }
    }
    drop((source, tokenizer));

    let input = if let Some(path) = &args.image_latents {
        ip2p_pipeline::latents::read::<B>(path, &device)?
    } else {
        let max_pixels = args.max_pixels.unwrap_or_else(default_max_pixels);
        read_images::<B>(&args.images, args.resize, factor, max_pixels, &device)?
    };
    let init_latents = args
        .init_latents
        .as_ref()
        .map(|p| ip2p_pipeline::latents::read::<B>(p, &device))
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
    let stop = interrupt.clone();
    let mut on_step = |info: &StepInfo<'_, B>| {
        bar.set_length(info.steps as u64);
        bar.set_position(info.step as u64 + 1);
        if stop.requested() {
            Flow::Cancel
        } else {
            Flow::Continue
        }
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
    let result = edit_one_shot(
        &args.model,
        &device,
        &options,
        kind,
        input,
        Prompts::Text(args.prompts.clone()),
        latents_in,
        !decode,
        settings,
    );
    bar.finish_and_clear();
    interrupt.check()?;
    let out = result.with_context(|| format!("editing with {}", args.model.display()))?;

    // Everything is computed and encoded before anything is written: a failure, or a Ctrl-C
    // from here on, leaves no half output (and every file is replaced atomically).
    let images = if decode {
        let images = tensor_to_images(out.output.clone())?;
        let encoded = images
            .iter()
            .zip(&outputs)
            .map(|(img, path)| ip2p_vae::image_io::encode_image(img, path))
            .collect::<Result<Vec<_>, _>>()?;
        Some(encoded)
    } else {
        None
    };
    let latents = args
        .output_latents
        .as_ref()
        .map(|_| ip2p_pipeline::latents::encode(out.latents.clone()))
        .transpose()?;
    interrupt.check()?;
    if let (Some(path), Some(bytes)) = (&args.output_latents, &latents) {
        ip2p_io::remove_stale_partials(path)?;
        ip2p_io::write(path, bytes)?;
        if !args.quiet {
            eprintln!("wrote {}", path.display());
        }
    }
    for (bytes, path) in images.iter().flatten().zip(&outputs) {
        ip2p_io::remove_stale_partials(path)?;
        ip2p_io::write(path, bytes)?;
        if !args.quiet {
            eprintln!("wrote {}", path.display());
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
    max_pixels: u64,
    device: &B::Device,
) -> Result<Tensor<B, 4>> {
    let rule = match resize {
        Resize::Diffusers => ResizeRule::Diffusers,
        Resize::Original => ResizeRule::Ip2p { resolution: 512 },
    };
    let mut images = Vec::with_capacity(paths.len());
    for path in paths {
        let img = load_image_limited(path, max_pixels)?;
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
