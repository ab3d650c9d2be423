//! Typed errors for everything that reads a model from disk.

use std::path::PathBuf;

/// Why a model file, a weight file or a config could not be loaded.
///
/// Every variant names the file, and where it concerns one tensor, the tensor.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file ({reason})")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{path}: tensor `{tensor}` has dtype {dtype}, which ip2p cannot load (F16, BF16, F32, F64 are supported)"
    )]
    UnsupportedDType {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{path}: {} tensor(s) the model needs are missing: {}", keys.len(), list(keys))]
    MissingTensors { path: PathBuf, keys: Vec<String> },
    #[error("{path}: {} tensor(s) match nothing in the model: {}", keys.len(), list(keys))]
    UnexpectedTensors { path: PathBuf, keys: Vec<String> },
    #[error("{path}: tensor `{tensor}` has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{tensor}`: {reason}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    /// A PyTorch pickle holds an object of a class ip2p does not unpickle (doing so would run
    /// that class's code).
    #[error(
        "{path}: the checkpoint pickles a `{class}` object, which ip2p does not unpickle (it could run code); use the model's .safetensors file instead (or convert this one to .safetensors with a trusted tool)"
    )]
    PickledObject { path: PathBuf, class: String },
    #[error("{path}: invalid config: {reason}")]
    Config { path: PathBuf, reason: String },
}

/// The first keys of a list, enough to act on without flooding a terminal.
fn list(keys: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut s = keys
        .iter()
        .take(SHOWN)
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > SHOWN {
        s.push_str(&format!(" and {} more", keys.len() - SHOWN));
    }
    s
}
