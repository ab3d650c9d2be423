//! Typed errors of the VAE and of image input/output.

use std::path::PathBuf;

use ip2p_nn::LoadError;

/// Why a VAE could not be loaded or run, or an image could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum VaeError {
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The input tensor has the wrong number of channels.
    #[error("{what}: expected {expected} channels, got {found} (shape {shape:?})")]
    Channels {
        what: &'static str,
        expected: usize,
        found: usize,
        shape: [usize; 4],
    },
    /// The input tensor's height or width does not fit the model.
    #[error(
        "{what}: height and width must be positive multiples of {multiple}, got {height}×{width}"
    )]
    Size {
        what: &'static str,
        multiple: usize,
        height: usize,
        width: usize,
    },
    /// A batch of zero images, or tensors that should match and do not.
    #[error("{0}")]
    Input(String),
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file (or buffer) is empty.
    #[error("{path}: the image file is empty")]
    EmptyImage { path: PathBuf },
    /// The bytes are not a PNG, JPEG or WebP image ip2p can decode.
    #[error("{path}: not a readable PNG, JPEG or WebP image ({reason})")]
    CorruptImage { path: PathBuf, reason: String },
    /// The image is too small to run through the VAE.
    #[error("{path}: the image is {width}×{height}; each side must be at least {min} pixels")]
    ImageTooSmall {
        path: PathBuf,
        width: u32,
        height: u32,
        min: u32,
    },
    /// The image has more pixels than the limit (checked from its header, before decoding).
    #[error(
        "{path}: the image is {width}×{height} ({} pixels), above the limit of {max_pixels} (--max-pixels; resize the image or raise the limit)",
        u64::from(*width) * u64::from(*height)
    )]
    ImageTooLarge {
        path: PathBuf,
        width: u32,
        height: u32,
        max_pixels: u64,
    },
    /// The output file name has no extension ip2p can write.
    #[error("{path}: cannot write this format (use .png, .jpg/.jpeg or .webp)")]
    UnsupportedFormat { path: PathBuf },
    /// Encoding the output image failed.
    #[error("{path}: could not encode the image ({reason})")]
    Encode { path: PathBuf, reason: String },
}
