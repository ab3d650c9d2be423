//! The UNet's levels: `CrossAttnDownBlock2D`/`DownBlock2D`, `UNetMidBlock2DCrossAttn`,
//! `CrossAttnUpBlock2D`/`UpBlock2D`. A plain block is the cross-attention one without
//! attentions, so each pair is one type here.

use burn::module::Module;
use burn::tensor::Tensor;
use ip2p_nn::Backend;
use ip2p_nn::{
    AttentionImpl, Downsample2D, Downsample2DConfig, ResnetBlock2D, ResnetBlock2DConfig,
    Upsample2D, Upsample2DConfig,
};

use crate::transformer::{Transformer2DModel, Transformer2DSpec};

/// What every ResNet and transformer of a UNet shares.
#[derive(Debug, Clone, Copy)]
pub struct BlockCommon {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
}

impl BlockCommon {
    fn resnet<B: Backend>(
        &self,
        cin: usize,
        cout: usize,
        scale: f64,
        device: &B::Device,
    ) -> ResnetBlock2D<B> {
        ResnetBlock2DConfig::new(cin)
            .with_out_channels(Some(cout))
            .with_temb_channels(Some(self.temb_channels))
            .with_groups(self.groups)
            .with_eps(self.eps)
            .with_output_scale_factor(scale)
            .init(device)
    }

    fn transformer<B: Backend>(
        &self,
        channels: usize,
        heads: usize,
        layers: usize,
        device: &B::Device,
    ) -> Transformer2DModel<B> {
        Transformer2DModel::new(
            Transformer2DSpec {
                channels,
                heads,
                layers,
                cross_attention_dim: self.cross_attention_dim,
                groups: self.groups,
                use_linear_projection: self.use_linear_projection,
            },
            device,
        )
    }
}

/// `CrossAttnDownBlock2D` (with `attentions`) or `DownBlock2D` (without).
#[derive(Module, Debug)]
pub struct DownBlock<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// One per ResNet, or none.
    pub attentions: Vec<Transformer2DModel<B>>,
    /// One `Downsample2D` except in the last block.
    pub downsamplers: Vec<Downsample2D<B>>,
}

/// Constructor arguments of one down or up block.
#[derive(Debug, Clone, Copy)]
pub struct LevelSpec {
    pub layers: usize,
    pub cross_attention: bool,
    pub heads: usize,
    pub transformer_layers: usize,
}

impl<B: Backend> DownBlock<B> {
    pub fn new(
        common: &BlockCommon,
        level: LevelSpec,
        in_channels: usize,
        out_channels: usize,
        downsample: Option<usize>,
        device: &B::Device,
    ) -> Self {
        let resnets = (0..level.layers)
            .map(|i| {
                common.resnet(
                    if i == 0 { in_channels } else { out_channels },
                    out_channels,
                    1.0,
                    device,
                )
            })
            .collect();
        let attentions = if level.cross_attention {
            (0..level.layers)
                .map(|_| {
                    common.transformer(out_channels, level.heads, level.transformer_layers, device)
                })
                .collect()
        } else {
            Vec::new()
        };
        let downsamplers = downsample
            .map(|padding| {
                Downsample2DConfig::new(out_channels)
                    .with_out_channels(Some(out_channels))
                    .with_padding(padding)
                    .init(device)
            })
            .into_iter()
            .collect();
        Self {
            resnets,
            attentions,
            downsamplers,
        }
    }

    /// Returns the block's output and the states it leaves for the skip connections (one per
    /// ResNet, plus the downsampled output), in order.
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        context: &Tensor<B, 3>,
    ) -> (Tensor<B, 4>, Vec<Tensor<B, 4>>) {
        let mut x = x;
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(x, Some(temb.clone()));
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(x, context.clone());
            }
            states.push(x.clone());
        }
        for down in &self.downsamplers {
            x = down.forward(x);
            states.push(x.clone());
        }
        (x, states)
    }

    pub fn set_attention_impl(&mut self, imp: AttentionImpl) {
        self.attentions
            .iter_mut()
            .for_each(|a| a.set_attention_impl(imp));
    }
}

/// `UNetMidBlock2DCrossAttn`: ResNet, then (transformer, ResNet).
#[derive(Module, Debug)]
pub struct MidBlock<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Transformer2DModel<B>>,
}

impl<B: Backend> MidBlock<B> {
    pub fn new(
        common: &BlockCommon,
        channels: usize,
        heads: usize,
        transformer_layers: usize,
        output_scale_factor: f64,
        device: &B::Device,
    ) -> Self {
        Self {
            resnets: (0..2)
                .map(|_| common.resnet(channels, channels, output_scale_factor, device))
                .collect(),
            attentions: vec![common.transformer(channels, heads, transformer_layers, device)],
        }
    }

    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        context: &Tensor<B, 3>,
    ) -> Tensor<B, 4> {
        let mut x = x;
        for (i, resnet) in self.resnets.iter().enumerate() {
            if let Some(attn) = i.checked_sub(1).and_then(|j| self.attentions.get(j)) {
                x = attn.forward(x, context.clone());
            }
            x = resnet.forward(x, Some(temb.clone()));
        }
        x
    }

    pub fn set_attention_impl(&mut self, imp: AttentionImpl) {
        self.attentions
            .iter_mut()
            .for_each(|a| a.set_attention_impl(imp));
    }
}

/// `CrossAttnUpBlock2D` (with `attentions`) or `UpBlock2D` (without).
#[derive(Module, Debug)]
pub struct UpBlock<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Transformer2DModel<B>>,
    /// One `Upsample2D` except in the last block.
    pub upsamplers: Vec<Upsample2D<B>>,
}

impl<B: Backend> UpBlock<B> {
    /// diffusers' channel bookkeeping: `prev_output_channels` come from below, the skip
    /// connections carry `out_channels`, except the last one, which carries `in_channels`.
    pub fn new(
        common: &BlockCommon,
        level: LevelSpec,
        in_channels: usize,
        prev_output_channels: usize,
        out_channels: usize,
        upsample: bool,
        device: &B::Device,
    ) -> Self {
        let n = level.layers;
        let resnets = (0..n)
            .map(|i| {
                let skip = if i == n - 1 {
                    in_channels
                } else {
                    out_channels
                };
                let cin = if i == 0 {
                    prev_output_channels
                } else {
                    out_channels
                };
                common.resnet(cin + skip, out_channels, 1.0, device)
            })
            .collect();
        let attentions = if level.cross_attention {
            (0..n)
                .map(|_| {
                    common.transformer(out_channels, level.heads, level.transformer_layers, device)
                })
                .collect()
        } else {
            Vec::new()
        };
        let upsamplers = if upsample {
            vec![
                Upsample2DConfig::new(out_channels)
                    .with_out_channels(Some(out_channels))
                    .init(device),
            ]
        } else {
            Vec::new()
        };
        Self {
            resnets,
            attentions,
            upsamplers,
        }
    }

    /// `skips`: this block's skip states in the order the down path made them; they are
    /// consumed from the end. `upsample_size`: the upsampler's output size when diffusers
    /// forwards one (a latent side not divisible by 2^upsamplers).
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        mut skips: Vec<Tensor<B, 4>>,
        temb: &Tensor<B, 2>,
        context: &Tensor<B, 3>,
        upsample_size: Option<[usize; 2]>,
    ) -> Tensor<B, 4> {
        let mut x = x;
        for (i, resnet) in self.resnets.iter().enumerate() {
            if let Some(skip) = skips.pop() {
                x = Tensor::cat(vec![x, skip], 1);
            }
            x = resnet.forward(x, Some(temb.clone()));
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(x, context.clone());
            }
        }
        for up in &self.upsamplers {
            x = up.forward(x, upsample_size);
        }
        x
    }

    pub fn set_attention_impl(&mut self, imp: AttentionImpl) {
        self.attentions
            .iter_mut()
            .for_each(|a| a.set_attention_impl(imp));
    }
}
