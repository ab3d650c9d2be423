//! The Stable Diffusion VAE (diffusers' `AutoencoderKL`) on Burn, and image input/output.
//!
//! - [`AutoencoderKL::load`] reads `vae/config.json` and the weights; [`AutoencoderKL::encode`] gives a
//!   [`DiagonalGaussian`] (`mode()`, seeded `sample()`), [`AutoencoderKL::decode`] takes *unscaled*
//!   latents and [`AutoencoderKL::decode_scaled`] the diffusion model's scaled ones.
//! - [`VaeMemory`]: batch slicing and tiled encode/decode (diffusers' `enable_slicing`,
//!   `enable_tiling`).
//! - [`image_io`]: PNG/JPEG/WebP files, RGB, diffusers' and InstructPix2Pix's resize rules
//!   (PIL-exact Lanczos), and conversion to and from [-1, 1] tensors.
//!
//! Precision: load the VAE in f32 (`DType::F32`) even when the rest of the model runs in f16;
//! SD 1.5's VAE overflows f16. `encode`/`decode` cast their inputs to the VAE's dtype.

pub mod config;
pub mod error;
pub mod image_io;
pub mod model;
pub mod resample;
pub mod tiling;

pub use config::VaeConfig;
pub use error::VaeError;
pub use image_io::{ResizeRule, images_to_tensor, load_image, save_image, tensor_to_images};
pub use model::{AutoencoderKL, AutoencoderKLModule, DiagonalGaussian, weight_spec};
pub use tiling::{TileConfig, VaeMemory};
