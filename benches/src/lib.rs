//! Inputs and models for the criterion benches (`cargo bench -p ip2p-benches`).
//!
//! Two sizes: `tiny` (the built-in tiny preset, random weights, 32×32 images) and `small`
//! (the `fixtures/models/wide` folder: 3-level UNet, 4-level VAE, 3-layer CLIP; 128×96 images).
//! Both come from the repository: no downloads.

use std::path::PathBuf;

use burn::tensor::{Distribution, Tensor};
use ip2p_nn::Backend;
use ip2p_pipeline::preset::Preset;
use ip2p_pipeline::{Ip2pModel, LoadOptions, PipelineError};
use ip2p_text::ClipTokenizer;

/// A model and the image size its benches use.
pub struct Case<B: Backend> {
    pub name: &'static str,
    pub model: Ip2pModel<B>,
    /// `(height, width)` of the image; latents are this over the VAE factor.
    pub image: (usize, usize),
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("fixtures")
}

/// The tiny preset (random weights) at 32×32.
pub fn tiny<B: Backend>(device: &B::Device) -> Result<Case<B>, PipelineError> {
    let tokenizer = ClipTokenizer::from_dir(fixtures().join("models/tiny/tokenizer"))?;
    Ok(Case {
        name: "tiny",
        model: Ip2pModel::random(
            Preset::Tiny,
            Some(tokenizer),
            device,
            &LoadOptions::default(),
        )?,
        image: (32, 32),
    })
}

/// The `wide` fixture model at 128×96 (non-square).
pub fn small<B: Backend>(device: &B::Device) -> Result<Case<B>, PipelineError> {
    Ok(Case {
        name: "small",
        model: Ip2pModel::load(
            fixtures().join("models/wide"),
            device,
            &LoadOptions::default(),
        )?,
        image: (96, 128),
    })
}

impl<B: Backend> Case<B> {
    pub fn latent_size(&self) -> (usize, usize) {
        let f = self.model.activation_model.vae_factor.max(1);
        (self.image.0 / f, self.image.1 / f)
    }

    /// Images in [-1, 1], `[batch, 3, h, w]`.
    pub fn images(&self, batch: usize) -> Tensor<B, 4> {
        let (h, w) = self.image;
        Tensor::random(
            [batch, 3, h, w],
            Distribution::Uniform(-1.0, 1.0),
            &self.model.device,
        )
    }

    /// Latents `[batch, channels, h/f, w/f]`, unit Gaussian.
    pub fn latents(&self, batch: usize, channels: usize) -> Tensor<B, 4> {
        let (h, w) = self.latent_size();
        Tensor::random(
            [batch, channels, h, w],
            Distribution::Normal(0.0, 1.0),
            &self.model.device,
        )
    }
}
