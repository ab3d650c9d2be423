//! Typed errors of ip2p-text.

use std::path::PathBuf;

use ip2p_nn::LoadError;

/// Why a tokenizer or text encoder could not be loaded, or why an input was refused.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// The text encoder's weights or `config.json` (missing or ill-typed field, a value the
    /// model cannot be built from).
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The tokenizer folder or one of its files is missing, unreadable or inconsistent.
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    /// The tokenizer failed on an input (should not happen for CLIP's byte-level BPE).
    #[error("tokenizing failed: {0}")]
    Tokenize(String),
    /// A batch with no rows.
    #[error("empty batch: at least one prompt or row of token ids is needed")]
    EmptyBatch,
    /// A token id outside `0..vocab_size`.
    #[error(
        "token id {id} at batch row {row}, position {position} is outside the vocabulary (0..{vocab_size})"
    )]
    IdOutOfRange {
        row: usize,
        position: usize,
        id: i64,
        vocab_size: usize,
    },
    /// A row of token ids of the wrong length.
    #[error("batch row {row} has {len} token ids, expected {expected}")]
    WrongLength {
        row: usize,
        len: usize,
        expected: usize,
    },
    /// The tokenizer and the text encoder do not fit together.
    #[error("tokenizer and text encoder do not match: {0}")]
    Mismatch(String),
}
