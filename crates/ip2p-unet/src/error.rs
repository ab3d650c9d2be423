//! Typed errors of the UNet: loading, unsupported configs, bad inputs.

use ip2p_nn::LoadError;

/// Why a UNet could not be built, loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum UnetError {
    /// The config or weights file could not be read (names the file and field/tensor).
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The config asks for a diffusers feature this crate does not implement.
    #[error("unet config: `{field}` = {value} is not supported (ip2p supports: {supported})")]
    Unsupported {
        field: &'static str,
        value: String,
        supported: &'static str,
    },
    /// The config is inconsistent (list lengths, channels not divisible by heads or groups).
    #[error("unet config: {0}")]
    InvalidConfig(String),
    /// `sample` has the wrong number of channels.
    #[error("sample has {found} channels, the UNet takes {expected} (in_channels)")]
    InputChannels { expected: usize, found: usize },
    /// The batch sizes of sample, timesteps and context disagree.
    #[error("batch mismatch: sample has batch {sample}, {what} has {found}")]
    BatchMismatch {
        what: &'static str,
        sample: usize,
        found: usize,
    },
    /// The context (text embeddings) has the wrong width.
    #[error(
        "encoder_hidden_states have width {found}, the UNet takes {expected} (cross_attention_dim)"
    )]
    ContextWidth { expected: usize, found: usize },
    /// A zero-sized input (no pixels, no tokens or an empty batch).
    #[error("{what} is empty (shape {shape:?})")]
    Empty {
        what: &'static str,
        shape: Vec<usize>,
    },
    /// An input holds NaN or infinity.
    #[error("{what} holds NaN or infinite values")]
    NonFinite { what: &'static str },
}
