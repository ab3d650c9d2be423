//! diffusers' `Downsample2D` and `Upsample2D` (the conv variants SD 1.5 uses).

use burn::config::Config;
use burn::module::Module;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::Tensor;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};

use crate::Backend;

/// Configuration of [`Downsample2D`].
#[derive(Config, Debug)]
pub struct Downsample2DConfig {
    pub channels: usize,
    #[config(default = "None")]
    pub out_channels: Option<usize>,
    /// 1 in the UNet; 0 in the VAE, which pads right and bottom by one instead.
    #[config(default = 1)]
    pub padding: usize,
}

/// A 3×3 conv with stride 2.
#[derive(Module, Debug)]
pub struct Downsample2D<B: Backend> {
    pub conv: Conv2d<B>,
    /// Pad right and bottom by one before the conv (diffusers' `padding=0` case).
    pub pad_after: bool,
}

impl Downsample2DConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> Downsample2D<B> {
        let p = self.padding;
        Downsample2D {
            conv: Conv2dConfig::new(
                [self.channels, self.out_channels.unwrap_or(self.channels)],
                [3, 3],
            )
            .with_stride([2, 2])
            .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
            .init(device),
            pad_after: p == 0,
        }
    }
}

impl<B: Backend> Downsample2D<B> {
    /// `[batch, c, h, w]` → `[batch, out, ⌈h/2⌉, ⌈w/2⌉]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = if self.pad_after {
            // Not `Tensor::pad`: in Burn 0.21 it fills in the default float dtype, which
            // fails on an f16 tensor. Zeros in x's own dtype, then x in the top-left corner.
            let [b, c, h, w] = x.dims();
            let padded = Tensor::<B, 4>::zeros([b, c, h + 1, w + 1], (&x.device(), x.dtype()));
            padded.slice_assign([0..b, 0..c, 0..h, 0..w], x)
        } else {
            x
        };
        B::fused_conv2d(&self.conv, x, None)
    }
}

/// Configuration of [`Upsample2D`].
#[derive(Config, Debug)]
pub struct Upsample2DConfig {
    pub channels: usize,
    #[config(default = "None")]
    pub out_channels: Option<usize>,
}

/// Nearest-neighbour ×2 (or to a given size), then a 3×3 conv.
#[derive(Module, Debug)]
pub struct Upsample2D<B: Backend> {
    pub conv: Conv2d<B>,
}

impl Upsample2DConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> Upsample2D<B> {
        Upsample2D {
            conv: Conv2dConfig::new(
                [self.channels, self.out_channels.unwrap_or(self.channels)],
                [3, 3],
            )
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(device),
        }
    }
}

impl<B: Backend> Upsample2D<B> {
    /// `[batch, c, h, w]` → `[batch, out, 2h, 2w]`, or `size` when given (the UNet passes the
    /// skip connection's size when a side was odd on the way down).
    pub fn forward(&self, x: Tensor<B, 4>, size: Option<[usize; 2]>) -> Tensor<B, 4> {
        let [_, _, h, w] = x.dims();
        let size = size.unwrap_or([h * 2, w * 2]);
        let x = interpolate(x, size, InterpolateOptions::new(InterpolateMode::Nearest));
        B::fused_conv2d(&self.conv, x, None)
    }
}
