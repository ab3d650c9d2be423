//! diffusers' `ResnetBlock2D`, shared by the UNet and the VAE.

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::Tensor;
use burn::tensor::activation::silu;

use crate::Backend;

/// Configuration of [`ResnetBlock2D`] (time_embedding_norm "default", SiLU, as in SD 1.5).
#[derive(Config, Debug)]
pub struct ResnetBlock2DConfig {
    pub in_channels: usize,
    /// Defaults to `in_channels`.
    #[config(default = "None")]
    pub out_channels: Option<usize>,
    /// Width of the time embedding; `None` for the VAE, which has none.
    #[config(default = "None")]
    pub temb_channels: Option<usize>,
    #[config(default = 32)]
    pub groups: usize,
    #[config(default = "None")]
    pub groups_out: Option<usize>,
    #[config(default = 1e-6)]
    pub eps: f64,
    #[config(default = 1.0)]
    pub output_scale_factor: f64,
}

/// Two GroupNorm–SiLU–conv layers with the time embedding added between, plus a shortcut.
#[derive(Module, Debug)]
pub struct ResnetBlock2D<B: Backend> {
    pub norm1: GroupNorm<B>,
    pub conv1: Conv2d<B>,
    pub time_emb_proj: Option<Linear<B>>,
    pub norm2: GroupNorm<B>,
    pub conv2: Conv2d<B>,
    /// A 1×1 conv when the channel count changes.
    pub conv_shortcut: Option<Conv2d<B>>,
    pub output_scale_factor: f64,
}

impl ResnetBlock2DConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> ResnetBlock2D<B> {
        let cin = self.in_channels;
        let cout = self.out_channels.unwrap_or(cin);
        let conv3 = |i, o| {
            Conv2dConfig::new([i, o], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device)
        };
        ResnetBlock2D {
            norm1: GroupNormConfig::new(self.groups, cin)
                .with_epsilon(self.eps)
                .init(device),
            conv1: conv3(cin, cout),
            time_emb_proj: self
                .temb_channels
                .map(|t| LinearConfig::new(t, cout).init(device)),
            norm2: GroupNormConfig::new(self.groups_out.unwrap_or(self.groups), cout)
                .with_epsilon(self.eps)
                .init(device),
            conv2: conv3(cout, cout),
            conv_shortcut: (cin != cout)
                .then(|| Conv2dConfig::new([cin, cout], [1, 1]).init(device)),
            output_scale_factor: self.output_scale_factor,
        }
    }
}

impl<B: Backend> ResnetBlock2D<B> {
    /// `x`: `[batch, in, h, w]`, `temb`: `[batch, temb_channels]` → `[batch, out, h, w]`.
    pub fn forward(&self, x: Tensor<B, 4>, temb: Option<Tensor<B, 2>>) -> Tensor<B, 4> {
        let h = B::fused_conv2d(
            &self.conv1,
            B::fused_group_norm(&self.norm1, x.clone(), true),
            None,
        );
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                h + B::fused_linear(proj, silu(t), None).unsqueeze_dims(&[2, 3])
            }
            _ => h,
        };
        let shortcut = match &self.conv_shortcut {
            Some(conv) => B::fused_conv2d(conv, x, None),
            None => x,
        };
        // The shortcut is added in conv2's epilogue.
        let out = B::fused_conv2d(
            &self.conv2,
            B::fused_group_norm(&self.norm2, h, true),
            Some(shortcut),
        );
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out.div_scalar(self.output_scale_factor)
        }
    }
}
