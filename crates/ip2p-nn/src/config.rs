//! Reading diffusers' `config.json` files into our module configs.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::LoadError;

/// Read a diffusers/transformers `config.json` into `T`.
///
/// serde's message names the missing or ill-typed field and its line; we add the file.
pub fn read_config<T: DeserializeOwned>(path: impl AsRef<Path>) -> Result<T, LoadError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| LoadError::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// A config value that diffusers writes either as one number or as one number per block
/// (`attention_head_dim`, `num_attention_heads`, `transformer_layers_per_block`, ...).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value for block `i` of `n`; an error if a list has the wrong length.
    pub fn expand(&self, n: usize, field: &str) -> Result<Vec<T>, String> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(format!(
                "`{field}` has {} entries, but the model has {n} blocks",
                v.len()
            )),
        }
    }
}
