//! Errors of the edit pipeline.

use std::path::PathBuf;

use crate::report::Stage;

/// Why an edit could not run, with the part or stage it concerns.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Load(#[from] ip2p_nn::LoadError),
    #[error("text: {0}")]
    Text(#[from] ip2p_text::TextError),
    #[error("VAE: {0}")]
    Vae(#[from] ip2p_vae::VaeError),
    #[error("UNet: {0}")]
    Unet(#[from] ip2p_unet::UnetError),
    #[error(transparent)]
    Latents(#[from] crate::latents::LatentsError),
    #[error("scheduler: {0}")]
    Sched(#[from] ip2p_sched::SchedError),
    /// The folder is a diffusers pipeline, but not one InstructPix2Pix can run.
    #[error("{path}: not an InstructPix2Pix model: {reason}")]
    NotInstructPix2Pix { path: PathBuf, reason: String },
    /// A checkpoint of another architecture (SD 2.x, SDXL).
    #[error("{path}: not a model ip2p can run: {reason}")]
    UnsupportedModel { path: PathBuf, reason: String },
    /// A part the request needs was not loaded (latent-only work skips the VAE).
    #[error("this request needs the {0}, which was not loaded")]
    MissingPart(&'static str),
    /// Inputs that do not fit together.
    #[error("{0}")]
    Input(String),
    /// NaN or infinity came out of a stage.
    #[error("{stage} produced NaN or infinite values")]
    NonFinite { stage: Stage },
    /// The device failed (sync error).
    #[error("device: {0}")]
    Device(String),
    /// The per-step callback asked to stop.
    #[error("cancelled after step {step}")]
    Cancelled { step: usize },
}
