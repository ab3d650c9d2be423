//! The options every command that loads a model shares: where its configs, tokenizer and UNet
//! copy come from when `--model` is an original single-file checkpoint.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use ip2p_pipeline::{LoadOptions, UnetWeights};

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
