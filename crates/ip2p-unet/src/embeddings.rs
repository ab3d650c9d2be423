//! The timestep input: sinusoidal embedding (diffusers' `Timesteps`) and its MLP
//! (`TimestepEmbedding`).

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::silu;
use burn::tensor::{DType, Tensor, TensorData};
use ip2p_nn::Backend;

/// Timesteps for one UNet call: one value for the whole batch, or one per sample. Euler
/// schedulers give fractional timesteps, so they are floats.
#[derive(Debug, Clone)]
pub enum Timesteps<B: Backend> {
    /// Broadcast to the batch (diffusers accepts a Python number the same way).
    Scalar(f64),
    /// `[batch]`, or `[1]` broadcast to the batch.
    PerSample(Tensor<B, 1>),
}

impl<B: Backend> From<f64> for Timesteps<B> {
    fn from(t: f64) -> Self {
        Timesteps::Scalar(t)
    }
}

impl<B: Backend> From<f32> for Timesteps<B> {
    fn from(t: f32) -> Self {
        Timesteps::Scalar(t as f64)
    }
}

impl<B: Backend> From<Tensor<B, 1>> for Timesteps<B> {
    fn from(t: Tensor<B, 1>) -> Self {
        Timesteps::PerSample(t)
    }
}

/// diffusers' `get_timestep_embedding(timesteps, dim, flip_sin_to_cos, downscale_freq_shift,
/// scale=1, max_period=10000)`: `[batch]` → `[batch, dim]`, in f32.
///
/// The frequencies follow PyTorch's f32 arithmetic step by step
/// (`exp(-ln(max_period) · i / (half − shift))`), so fractional timesteps near 1000 give the
/// same arguments to sin/cos as diffusers does.
pub fn timestep_embedding<B: Backend>(
    timesteps: Tensor<B, 1>,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Tensor<B, 2> {
    let half = dim / 2;
    let device = timesteps.device();
    let neg_log = -(10000f64.ln()) as f32;
    let denom = (half as f64 - freq_shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((neg_log * i as f32) / denom).exp())
        .collect();
    let freqs = Tensor::<B, 1>::from_data(TensorData::new(freqs, [half]), &device);
    let [batch] = timesteps.dims();
    let args = timesteps.cast(DType::F32).reshape([batch, 1]) * freqs.reshape([1, half]);
    let (sin, cos) = (args.clone().sin(), args.cos());
    let emb = if flip_sin_to_cos {
        Tensor::cat(vec![cos, sin], 1)
    } else {
        Tensor::cat(vec![sin, cos], 1)
    };
    if dim % 2 == 1 {
        Tensor::cat(vec![emb, Tensor::zeros([batch, 1], &device)], 1)
    } else {
        emb
    }
}

/// diffusers' `TimestepEmbedding`: Linear → SiLU → Linear.
#[derive(Module, Debug)]
pub struct TimestepEmbedding<B: Backend> {
    pub linear_1: Linear<B>,
    pub linear_2: Linear<B>,
}

impl<B: Backend> TimestepEmbedding<B> {
    pub fn new(in_channels: usize, time_embed_dim: usize, device: &B::Device) -> Self {
        Self {
            linear_1: LinearConfig::new(in_channels, time_embed_dim).init(device),
            linear_2: LinearConfig::new(time_embed_dim, time_embed_dim).init(device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let h = silu(B::fused_linear(&self.linear_1, x, None));
        B::fused_linear(&self.linear_2, h, None)
    }
}
