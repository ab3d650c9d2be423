//! `vae/config.json` (diffusers' `AutoencoderKL` constructor arguments).

use std::path::Path;

use ip2p_nn::{LoadError, PerBlock};
use serde::Deserialize;

/// The AutoencoderKL configuration, as diffusers writes it. Unknown keys (`_class_name`,
/// `_diffusers_version`, ...) are ignored; absent keys take diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default = "default_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// One number, or `[height, width]` (diffusers then uses the first for tiling).
    #[serde(default = "default_sample_size")]
    pub sample_size: PerBlock<usize>,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    /// `null` for SD 1.5; when present the pipeline scales as `(z - shift) · scale`.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// diffusers runs such a VAE in f32 even when the pipeline is f16.
    #[serde(default = "yes")]
    pub force_upcast: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn one() -> usize {
    1
}
fn thirty_two() -> usize {
    32
}
fn yes() -> bool {
    true
}
fn silu() -> String {
    "silu".into()
}
fn default_down() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn default_up() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn default_channels() -> Vec<usize> {
    vec![64]
}
fn default_sample_size() -> PerBlock<usize> {
    PerBlock::One(32)
}
fn default_scaling() -> f64 {
    0.18215
}

impl VaeConfig {
    /// Read and check `path` (a `vae/config.json`).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        let path = path.as_ref();
        let config: Self = ip2p_nn::read_config(path)?;
        config.validate().map_err(|reason| LoadError::Config {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(config)
    }

    /// Check that this is a VAE ip2p can build: SD-style blocks, SiLU, consistent sizes.
    pub fn validate(&self) -> Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("`block_out_channels` is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "`down_block_types` ({}) and `up_block_types` ({}) must have one entry per `block_out_channels` ({n})",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return Err(format!(
                "down block type `{t}` is not supported (only DownEncoderBlock2D)"
            ));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return Err(format!(
                "up block type `{t}` is not supported (only UpDecoderBlock2D)"
            ));
        }
        if self.act_fn != "silu" {
            return Err(format!(
                "`act_fn` `{}` is not supported (only silu)",
                self.act_fn
            ));
        }
        for (name, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("layers_per_block", self.layers_per_block),
            ("norm_num_groups", self.norm_num_groups),
        ] {
            if v == 0 {
                return Err(format!("`{name}` must be positive"));
            }
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|c| **c == 0 || **c % self.norm_num_groups != 0)
        {
            return Err(format!(
                "`block_out_channels` entry {c} is not a positive multiple of `norm_num_groups` {}",
                self.norm_num_groups
            ));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return Err(format!(
                "`scaling_factor` {} must be positive",
                self.scaling_factor
            ));
        }
        if self.tile_sample_size() == 0 {
            return Err("`sample_size` must be positive".into());
        }
        Ok(())
    }

    /// Number of resolution levels; the latent is `2^(levels-1)` times smaller than the image.
    pub fn levels(&self) -> usize {
        self.block_out_channels.len()
    }

    /// Image side / latent side: 8 for SD 1.5.
    pub fn downscale_factor(&self) -> usize {
        1 << (self.levels() - 1)
    }

    /// diffusers' default `tile_sample_min_size` (the first entry when `sample_size` is a list).
    pub fn tile_sample_size(&self) -> usize {
        match &self.sample_size {
            PerBlock::One(s) => *s,
            PerBlock::Each(v) => v.first().copied().unwrap_or(0),
        }
    }
}
