//! `ip2p convert`: an original single-file checkpoint (`.ckpt`, `.safetensors`) → a diffusers
//! folder that diffusers and ip2p load.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use ip2p_pipeline::{LoadOptions, SingleFile};

use crate::model_args::SingleFileArgs;

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The checkpoint: LDM layout (`model.diffusion_model.*`, `first_stage_model.*`,
    /// `cond_stage_model.transformer.*`), as `.safetensors` or a PyTorch `.ckpt`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The folder to write (must not exist or be empty).
    #[arg(long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub single: SingleFileArgs,
    /// Where each component is loaded to be checked before it is written.
    #[arg(long, value_enum, default_value_t = crate::backend::BackendKind::Cpu)]
    pub backend: crate::backend::BackendKind,
}

pub fn run(args: &ConvertArgs) -> Result<()> {
    if args.output.exists()
        && std::fs::read_dir(&args.output)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!("{} exists and is not empty", args.output.display());
    }
    let options = args.single.apply(LoadOptions::default());
    let file = SingleFile::open(&args.checkpoint, &options)
        .with_context(|| format!("reading {}", args.checkpoint.display()))?;
    // Each component is loaded (strictly) to check it before its tensors are copied.
    crate::backend::dispatch!(args.backend, (), |device, _probe| file
        .write_diffusers::<B>(&args.output, &device)
        .with_context(|| format!("writing {}", args.output.display())))?;
    eprintln!(
        "wrote {} ({} UNet weights)",
        args.output.display(),
        if file.ema { "EMA" } else { "raw" }
    );
    Ok(())
}
