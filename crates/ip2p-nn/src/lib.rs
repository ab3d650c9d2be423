//! Shared building blocks of ip2p: diffusers weight loading and configs, and the layers that
//! the UNet and the VAE both use (ResNet blocks, attention, up- and down-sampling).
//!
//! Every module is generic over `B: Backend`; this crate enables no backend.

pub mod attention;
pub mod backend;
pub mod cast;
pub mod config;
pub mod error;
pub mod loader;
pub mod norm;
pub mod resnet;
pub mod sampling;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod weight_file;
pub mod weights;

pub use attention::{Attention, AttentionConfig, AttentionImpl, scaled_dot_product};
#[cfg(feature = "autodiff")]
pub use backend::AutodiffBackend;
pub use backend::Backend;
pub use config::{PerBlock, read_config};
pub use error::LoadError;
pub use loader::{KeyMap, load_from as load_mapped};
pub use resnet::{ResnetBlock2D, ResnetBlock2DConfig};
pub use sampling::{Downsample2D, Downsample2DConfig, Upsample2D, Upsample2DConfig};
pub use weight_file::{TensorInfo, WeightFile};
pub use weights::{
    Precision, WeightSpec, default_float_dtype, load_safetensors, load_safetensors_burn_store,
    weights_file,
};
