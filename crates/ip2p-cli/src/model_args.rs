//! The options the commands that load a model share: the backend, compute dtype and weight files
//! ([`RuntimeArgs`]), and where the configs, tokenizer and UNet copy come from when `--model` is
//! an original single-file checkpoint ([`SingleFileArgs`]).

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use ip2p_pipeline::{LoadOptions, UnetWeights};

use crate::backend::{BackendKind, DTypeArg};

/// Where a model runs and which of its weight files it reads (`edit`, `edit-dataset`, `serve`).
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
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
}

impl RuntimeArgs {
    /// `options` with this dtype, variant and f16-weight choice.
    pub fn apply(&self, options: LoadOptions) -> LoadOptions {
        LoadOptions {
            dtype: Some(self.dtype.dtype()),
            variant: self.variant.clone(),
            half_weights: self.f16_weights.keep(),
            ..options
        }
    }
}

/// What to do with the f16 weights of a variant when computing in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WeightsArg {
    /// The EMA UNet (`model_ema.*`) when the file has one, as the original's inference uses.
    Ema,
    /// The raw training weights (`model.diffusion_model.*`).
    Raw,
}

#[derive(Debug, Clone, Args)]
pub struct SingleFileArgs {
    /// Single-file checkpoints: which UNet copy to load.
    #[arg(long, value_enum, default_value_t = WeightsArg::Ema)]
    pub weights: WeightsArg,
    /// Single-file checkpoints: take the configs, tokenizer and scheduler from this diffusers
    /// folder instead of the built-in SD 1.5 InstructPix2Pix ones.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Single-file checkpoints: a tokenizer folder (vocab.json + merges.txt, or
    /// tokenizer.json) instead of the built-in CLIP vocabulary.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

impl SingleFileArgs {
    /// `options` with these settings.
    pub fn apply(&self, options: LoadOptions) -> LoadOptions {
        LoadOptions {
            weights: match self.weights {
                WeightsArg::Ema => UnetWeights::Ema,
                WeightsArg::Raw => UnetWeights::Raw,
            },
            config: self.config.clone(),
            tokenizer: self.tokenizer.clone(),
            ..options
        }
    }
}
