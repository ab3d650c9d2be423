//! The InstructPix2Pix edit pipeline.
//!
//! [`run_diffusion_inference_batch`] is the one denoising loop: images or image latents in,
//! images or latents out, prompts as text, token ids or embeddings, with per-stage time and
//! memory ([`RunReport`]). [`Ip2pModel`] loads a diffusers folder or an original single-file checkpoint
//! ([`single_file`]) and calls it; [`edit_one_shot`]
//! edits once from a folder, holding only the part each stage needs.

pub mod batching;
pub mod edit;
pub mod error;
pub mod latents;
pub mod memory;
pub mod model;
pub mod one_shot;
pub mod preset;
pub mod report;
pub mod single_file;

pub use batching::ActivationModel;
pub use edit::{
    EditOptions, EditOutput, Flow, Prompts, RunSettings, StepCallback, StepInfo,
    run_diffusion_inference_batch,
};
pub use error::PipelineError;
pub use ip2p_sched::{Generator, RngKind};
pub use latents::LatentsError;
pub use memory::{CountingAllocator, MemoryProbe, NoProbe, SampledPeak};
pub use model::{Ip2pModel, LoadOptions, LoadTimes};
pub use one_shot::{OneShotOutput, edit_one_shot};
pub use report::{RunReport, Stage, StageRecord};
pub use single_file::{SingleFile, UnetWeights};
