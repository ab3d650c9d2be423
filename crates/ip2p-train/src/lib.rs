//! Fine-tuning InstructPix2Pix, as diffusers' `examples/instruct_pix2pix/train_instruct_pix2pix.py`.
//!
//! - [`data`]: the dataset folder format (`metadata.jsonl` + images; `tokens.jsonl` written
//!   once by [`prepare_data`]), preprocessing (square resize, the same crop and flip for both
//!   images, [-1, 1]), seeded data order, bad-row handling.
//! - [`step`]: the loss of one step (VAE `sample()` × scaling factor of the edited image, DDPM
//!   noise at random timesteps, VAE `mode()` of the original, unscaled, conditioning dropout,
//!   the 8-channel UNet, MSE against the noise or v), and [`widen_conv_in`] for starting from
//!   a 4-channel SD UNet.
//! - [`optim`]: global-norm clipping, AdamW, warm-up, EMA (torch / diffusers semantics).
//! - [`trainer`]: the loop with gradient accumulation, checkpoints and validation.
//! - [`checkpoint`]: save / resume, and the diffusers-format UNet export.
//! - [`validate`]: the pipeline on fixed pairs from stored token ids, images and loss logged.
//!
//! The VAE and text encoder are frozen and run on the autodiff backend's inner backend; only
//! the UNet records a graph. Gradient checkpointing is Burn's: train on
//! `Autodiff<B, BalancedCheckpointing>` instead of `Autodiff<B>`.

pub mod checkpoint;
pub mod collective;
pub mod data;
pub mod error;
pub mod optim;
pub mod orchestrator;
pub mod ranks;
pub mod rng;
pub mod step;
pub mod trainer;
pub mod validate;

pub use checkpoint::{export_unet_diffusers, latest_checkpoint, load_checkpoint, save_checkpoint};
pub use collective::{Collective, CollectiveSettings, LocalGroup, NodeSettings};
pub use data::{BadRows, Dataset, Shard, prepare_data};
pub use error::TrainError;
pub use orchestrator::{OrchestratorConfig, run_orchestrator};
pub use ranks::Ranks;
pub use step::{
    Frozen, StepAux, StepConfig, StepDraws, TrainBatch, UnetInputs, dropout_masks,
    load_unet_for_training, prepare_inputs, training_loss, widen_conv_in,
};
pub use trainer::{StepReport, TrainConfig, Trainer};
pub use validate::{Validation, ValidationResult, validate};

/// The autodiff backend wrapper and its checkpointing strategies, for callers that do not
/// depend on Burn's `autodiff` feature themselves.
pub use burn::backend::Autodiff;
pub use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
