//! The Stable Diffusion denoiser of InstructPix2Pix: diffusers' `UNet2DConditionModel` on Burn.
//!
//! - [`UNet2DConditionModel::load`] reads a diffusers `unet/` folder (`config.json` and the
//!   safetensors weights, fp16 variants included); [`UNet2DConditionModel::from_config`] builds
//!   one with random weights (the real SD 1.5 InstructPix2Pix config is
//!   [`UNet2DConditionConfig::sd15_ip2p`]).
//! - [`UNet2DConditionModel::forward`] takes `sample [b, in_channels, h, w]`, timesteps (a number,
//!   fractional allowed, or `[b]`) and text embeddings `[b, tokens, cross_attention_dim]`, and
//!   checks them (typed [`UnetError`]s).
//! - Supported: the four block types SD 1.x/2.x use (`CrossAttnDownBlock2D`, `DownBlock2D`,
//!   `CrossAttnUpBlock2D`, `UpBlock2D`) and `UNetMidBlock2DCrossAttn`; `attention_head_dim`
//!   and `num_attention_heads` as numbers or lists; linear or 1×1-conv projections; several
//!   transformer layers per block. Other diffusers features are rejected when the config is
//!   resolved, never silently ignored.
//! - Attention: [`UNet2DConditionModel::with_attention_impl`] picks Burn's fused op (default),
//!   query chunks or the naive score matrix; all give the same output.

pub mod blocks;
pub mod config;
pub mod embeddings;
pub mod error;
pub mod transformer;
pub mod unet;

pub use config::{SD15_IP2P_CONFIG, UNet2DConditionConfig, UnetPlan};
pub use embeddings::{Timesteps, timestep_embedding};
pub use error::UnetError;
pub use ip2p_nn::AttentionImpl;
pub use unet::{UNet2DConditionModel, weight_spec};
