//! Latents files: safetensors holding one tensor `latents` `[batch, 4, h, w]` (`--init-latents`,
//! `--image-latents`, `--output-latents`). Reading checks everything a hostile or truncated file
//! could get wrong (header, dtype, shape, byte length, NaN/infinity) and says which.

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use ip2p_nn::Backend;

/// Why a latents file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LatentsError {
    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("encoding latents: {0}")]
    Encode(String),
}

/// Largest latents file read whole (4 GiB: a batch of 64 edits at 2048² is 256 MiB).
const MAX_BYTES: u64 = 4 << 30;

/// The `latents` tensor of a safetensors file (f32, f16 or bf16), as f32.
pub fn read<B: Backend>(path: &Path, device: &B::Device) -> Result<Tensor<B, 4>, LatentsError> {
    let io = |source| LatentsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_BYTES {
        return Err(invalid(
            path,
            format!("{len} bytes, more than a latents file holds ({MAX_BYTES})"),
        ));
    }
    let bytes = std::fs::read(path).map_err(io)?;
    let (values, shape) = parse(&bytes).map_err(|reason| invalid(path, reason))?;
    Ok(Tensor::from_data(TensorData::new(values, shape), device))
}

fn invalid(path: &Path, reason: String) -> LatentsError {
    LatentsError::Invalid {
        path: path.to_path_buf(),
        reason,
    }
}

/// The values and shape of the `latents` tensor in safetensors `bytes`.
pub fn parse(bytes: &[u8]) -> Result<(Vec<f32>, Vec<usize>), String> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| format!("not a safetensors file: {e}"))?;
    let view = st
        .tensor("latents")
        .map_err(|_| "no tensor named `latents`".to_string())?;
    let shape = view.shape().to_vec();
    if shape.len() != 4 || shape[1] != 4 || shape.contains(&0) {
        return Err(format!(
            "`latents` has shape {shape:?}, expected [batch, 4, h/8, w/8]"
        ));
    }
    let b = view.data();
    let values: Vec<f32> = match view.dtype() {
        safetensors::Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        safetensors::Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(format!(
                "`latents` has dtype {other:?}; use f32, f16 or bf16"
            ));
        }
    };
    if values.len() != shape.iter().product::<usize>() {
        return Err(format!(
            "`latents` holds {} values for shape {shape:?}",
            values.len()
        ));
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err("`latents` holds NaN or infinite values".into());
    }
    Ok((values, shape))
}

/// `latents` as the bytes of a safetensors file (f32), for [`ip2p_io::write`].
pub fn encode<B: Backend>(latents: Tensor<B, 4>) -> Result<Vec<u8>, LatentsError> {
    let shape = latents.dims().to_vec();
    let values = latents
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| LatentsError::Encode(format!("{e:?}")))?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &bytes)
        .map_err(|e| LatentsError::Encode(e.to_string()))?;
    safetensors::serialize([("latents", view)], None)
        .map_err(|e| LatentsError::Encode(e.to_string()))
}

/// Write `latents` to `path` atomically (a temporary file in the same folder, then renamed).
pub fn write<B: Backend>(path: &Path, latents: Tensor<B, 4>) -> Result<(), LatentsError> {
    let bytes = encode(latents)?;
    ip2p_io::write(path, &bytes).map_err(|e| LatentsError::Io {
        path: e.path,
        source: e.source,
    })
}
