//! Errors of training and data preparation.

use std::path::PathBuf;

/// Why training, validation or data preparation stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A model part or the pipeline failed (component errors arrive through `PipelineError`).
    #[error(transparent)]
    Pipeline(#[from] ip2p_pipeline::PipelineError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A dataset row that cannot be used (missing or unreadable image, mismatched sizes, bad JSON).
    #[error("{file}, row {row}: {reason}")]
    Row {
        file: PathBuf,
        /// 1-based line number in the file.
        row: usize,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    /// Inputs that do not fit together.
    #[error("{0}")]
    Input(String),
    /// A checkpoint could not be written or read.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    /// A data-parallel run's collective call failed or timed out (a peer is gone).
    #[error("rank {rank}: {what}: {reason}")]
    Collective {
        rank: usize,
        what: String,
        reason: String,
    },
    /// A replica stopped waiting in a collective call because another replica of the same
    /// process failed (that one's error says why; this one only says where it was).
    #[error(
        "rank {rank}: {what}: stopped because another replica in this process failed (see its error)"
    )]
    ReplicaStopped { rank: usize, what: String },
    /// The loss became NaN or infinite.
    #[error("step {step}: the loss is not finite ({loss})")]
    NonFinite { step: usize, loss: f64 },
}

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Component errors become `TrainError::Pipeline`, worded once, by `PipelineError`.
macro_rules! via_pipeline {
    ($($t:ty),*) => {$(
        impl From<$t> for TrainError {
            fn from(e: $t) -> Self {
                TrainError::Pipeline(e.into())
            }
        }
    )*};
}
via_pipeline!(
    ip2p_nn::LoadError,
    ip2p_text::TextError,
    ip2p_vae::VaeError,
    ip2p_unet::UnetError,
    ip2p_sched::SchedError
);
