//! diffusers' `UNet2DConditionModel`, built from its config, loaded from its weights.

use std::path::Path;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, PaddingConfig2d};
use burn::tensor::cast::ToElement;
use burn::tensor::{DType, Tensor, TensorData};
use ip2p_nn::Backend;
use ip2p_nn::{AttentionImpl, Precision, WeightSpec, load_safetensors, weights_file};

use crate::UnetError;
use crate::blocks::{BlockCommon, DownBlock, LevelSpec, MidBlock, UpBlock};
use crate::config::{LevelPlan, UNet2DConditionConfig, UnetPlan};
use crate::embeddings::{TimestepEmbedding, Timesteps, timestep_embedding};

/// How the weight file's keys map onto [`UNet2DConditionModel`]'s parameters: the module mirrors
/// diffusers' names except the feed-forward's `net.0`/`net.2` (`net_0`/`net_2` here) and the
/// transformers' projections, whose Linear/Conv variant burn-store puts in the path.
pub fn weight_spec(use_linear_projection: bool) -> WeightSpec {
    let variant = if use_linear_projection {
        "Linear"
    } else {
        "Conv"
    };
    WeightSpec::new()
        .remap(r"\.ff\.net\.([02])\.", ".ff.net_$1.")
        .remap(
            r"\.proj_(in|out)\.(weight|bias)$",
            &format!(".proj_$1.{variant}.$2"),
        )
}

/// The InstructPix2Pix (Stable Diffusion) denoiser: `sample [b, in_channels, h, w]`, timesteps
/// and text embeddings `[b, tokens, cross_attention_dim]` → noise prediction `[b, out, h, w]`.
#[derive(Module, Debug)]
pub struct UNet2DConditionModel<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub time_embedding: TimestepEmbedding<B>,
    pub down_blocks: Vec<DownBlock<B>>,
    pub mid_block: MidBlock<B>,
    pub up_blocks: Vec<UpBlock<B>>,
    pub conv_norm_out: GroupNorm<B>,
    pub conv_out: Conv2d<B>,
    pub in_channels: usize,
    pub cross_attention_dim: usize,
    /// Width of the sinusoidal embedding (`block_out_channels[0]`).
    pub time_proj_dim: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub center_input_sample: bool,
    pub use_linear_projection: bool,
}

fn conv<B: Backend>(i: usize, o: usize, k: usize, device: &B::Device) -> Conv2d<B> {
    let p = (k - 1) / 2;
    Conv2dConfig::new([i, o], [k, k])
        .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
        .init(device)
}

fn level(p: &LevelPlan) -> LevelSpec {
    LevelSpec {
        layers: p.layers,
        cross_attention: p.cross_attention,
        heads: p.heads,
        transformer_layers: p.transformer_layers,
    }
}

impl<B: Backend> UNet2DConditionModel<B> {
    /// Build the model with random weights (Burn's default init).
    pub fn from_config(
        config: &UNet2DConditionConfig,
        device: &B::Device,
    ) -> Result<Self, UnetError> {
        Ok(Self::from_plan(&config.resolve()?, device))
    }

    /// Build the model of a resolved config, with random weights.
    pub fn from_plan(plan: &UnetPlan, device: &B::Device) -> Self {
        let boc = &plan.block_out_channels;
        let n = boc.len();
        let c0 = boc[0];
        let common = BlockCommon {
            temb_channels: plan.time_embed_dim(),
            groups: plan.groups,
            eps: plan.eps,
            cross_attention_dim: plan.cross_attention_dim,
            use_linear_projection: plan.use_linear_projection,
        };
        let mut down_blocks = Vec::with_capacity(n);
        let mut out = c0;
        for (i, lp) in plan.down.iter().enumerate() {
            let input = out;
            out = boc[i];
            let downsample = (i + 1 < n).then_some(plan.downsample_padding);
            down_blocks.push(DownBlock::new(
                &common,
                level(lp),
                input,
                out,
                downsample,
                device,
            ));
        }
        let mid_block = MidBlock::new(
            &common,
            boc[n - 1],
            plan.mid_heads,
            plan.mid_transformer_layers,
            plan.mid_block_scale_factor,
            device,
        );
        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut out = rev[0];
        for (i, lp) in plan.up.iter().enumerate() {
            let prev = out;
            out = rev[i];
            let input = rev[(i + 1).min(n - 1)];
            up_blocks.push(UpBlock::new(
                &common,
                level(lp),
                input,
                prev,
                out,
                i + 1 < n,
                device,
            ));
        }
        Self {
            conv_in: conv(plan.in_channels, c0, plan.conv_in_kernel, device),
            time_embedding: TimestepEmbedding::new(c0, plan.time_embed_dim(), device),
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNormConfig::new(plan.groups, c0)
                .with_epsilon(plan.eps)
                .init(device),
            conv_out: conv(c0, plan.out_channels, plan.conv_out_kernel, device),
            in_channels: plan.in_channels,
            cross_attention_dim: plan.cross_attention_dim,
            time_proj_dim: c0,
            flip_sin_to_cos: plan.flip_sin_to_cos,
            freq_shift: plan.freq_shift,
            center_input_sample: plan.center_input_sample,
            use_linear_projection: plan.use_linear_projection,
        }
    }

    /// Load a diffusers `unet/` folder: `config.json` and `diffusion_pytorch_model[.variant].safetensors`,
    /// with every float tensor cast to `dtype` (an fp16 file loads into an f32 model and back).
    pub fn load(
        dir: impl AsRef<Path>,
        variant: Option<&str>,
        dtype: impl Into<Precision>,
        device: &B::Device,
    ) -> Result<Self, UnetError> {
        let dir = dir.as_ref();
        let config = UNet2DConditionConfig::from_file(dir.join("config.json"))?;
        let model = Self::from_config(&config, device)?;
        let file = weights_file(dir, "diffusion_pytorch_model", variant)?;
        model.load_weights(file, dtype)
    }

    /// Load a safetensors file of diffusers' keys into this model (strict: every tensor must match).
    pub fn load_weights(
        self,
        path: impl AsRef<Path>,
        dtype: impl Into<Precision>,
    ) -> Result<Self, UnetError> {
        let spec = weight_spec(self.use_linear_projection);
        Ok(load_safetensors(self, path, &spec, dtype)?)
    }

    /// Choose how every attention layer computes softmax(q·kᵀ)·v; all choices agree to float
    /// rounding. `Fused` (the default) is Burn's attention op, which tiles over keys on the CPU
    /// backend (Flex) for long sequences; `Chunked(n)` bounds the score matrix to `n` queries.
    pub fn with_attention_impl(mut self, imp: AttentionImpl) -> Self {
        self.down_blocks
            .iter_mut()
            .for_each(|b| b.set_attention_impl(imp));
        self.mid_block.set_attention_impl(imp);
        self.up_blocks
            .iter_mut()
            .for_each(|b| b.set_attention_impl(imp));
        self
    }

    /// The model's float dtype (that of `conv_in`'s bias, or weight).
    pub fn dtype(&self) -> DType {
        // The bias: a weight may be f16 kept as stored ([`ip2p_nn::Precision`]).
        match &self.conv_in.bias {
            Some(b) => b.val().dtype(),
            None => self.conv_in.weight.val().dtype(),
        }
    }

    /// The sinusoidal timestep embedding (diffusers' `time_proj`), `[batch]` → `[batch, c0]`, f32.
    pub fn time_proj(&self, timesteps: Tensor<B, 1>) -> Tensor<B, 2> {
        timestep_embedding(
            timesteps,
            self.time_proj_dim,
            self.flip_sin_to_cos,
            self.freq_shift,
        )
    }

    /// `time_proj` then `time_embedding`, in the model's dtype: `[batch]` → `[batch, 4·c0]`.
    pub fn temb(&self, timesteps: Tensor<B, 1>) -> Tensor<B, 2> {
        self.time_embedding
            .forward(self.time_proj(timesteps).cast(self.dtype()))
    }

    /// Predict the noise. `sample`: `[batch, in_channels, h, w]` (any h, w ≥ 1; odd sizes are
    /// handled as diffusers does), `timesteps`: a number or `[batch]` (or `[1]`),
    /// `context`: `[batch, tokens, cross_attention_dim]`. Inputs are cast to the model's dtype.
    pub fn forward(
        &self,
        sample: Tensor<B, 4>,
        timesteps: impl Into<Timesteps<B>>,
        context: Tensor<B, 3>,
    ) -> Result<Tensor<B, 4>, UnetError> {
        let timesteps = self.check_inputs(&sample, timesteps.into(), &context)?;
        let dtype = self.dtype();
        Ok(self.forward_unchecked(sample.cast(dtype), timesteps, context.cast(dtype)))
    }

    /// Validate the inputs; return the timesteps as `[batch]`.
    fn check_inputs(
        &self,
        sample: &Tensor<B, 4>,
        timesteps: Timesteps<B>,
        context: &Tensor<B, 3>,
    ) -> Result<Tensor<B, 1>, UnetError> {
        let [b, c, h, w] = sample.dims();
        if b == 0 || h == 0 || w == 0 {
            return Err(UnetError::Empty {
                what: "sample",
                shape: sample.dims().to_vec(),
            });
        }
        if c != self.in_channels {
            return Err(UnetError::InputChannels {
                expected: self.in_channels,
                found: c,
            });
        }
        let [cb, tokens, width] = context.dims();
        if cb != b {
            return Err(UnetError::BatchMismatch {
                what: "encoder_hidden_states",
                sample: b,
                found: cb,
            });
        }
        if tokens == 0 {
            return Err(UnetError::Empty {
                what: "encoder_hidden_states",
                shape: context.dims().to_vec(),
            });
        }
        if width != self.cross_attention_dim {
            return Err(UnetError::ContextWidth {
                expected: self.cross_attention_dim,
                found: width,
            });
        }
        let device = sample.device();
        let timesteps = match timesteps {
            Timesteps::Scalar(t) => {
                if !t.is_finite() {
                    return Err(UnetError::NonFinite { what: "timesteps" });
                }
                // diffusers turns a Python number into a tensor and then to f32.
                Tensor::from_data(TensorData::new(vec![t as f32; b], [b]), &device)
            }
            Timesteps::PerSample(t) => match t.dims() {
                [n] if n == b => t,
                [1] => t.expand([b]),
                [n] => {
                    return Err(UnetError::BatchMismatch {
                        what: "timesteps",
                        sample: b,
                        found: n,
                    });
                }
            },
        };
        // One reduction per input; negligible next to the UNet itself.
        let finite = |t: Tensor<B, 1>| t.is_finite().all().into_scalar().to_bool();
        if !finite(timesteps.clone()) {
            return Err(UnetError::NonFinite { what: "timesteps" });
        }
        if !finite(sample.clone().flatten(0, 3)) {
            return Err(UnetError::NonFinite { what: "sample" });
        }
        if !finite(context.clone().flatten(0, 2)) {
            return Err(UnetError::NonFinite {
                what: "encoder_hidden_states",
            });
        }
        Ok(timesteps)
    }

    /// The forward pass on inputs already checked and in the model's dtype.
    pub fn forward_unchecked(
        &self,
        sample: Tensor<B, 4>,
        timesteps: Tensor<B, 1>,
        context: Tensor<B, 3>,
    ) -> Tensor<B, 4> {
        let [_, _, h, w] = sample.dims();
        // diffusers forwards the skip connections' sizes to the upsamplers when a side is not a
        // multiple of 2^(number of upsamplers).
        let factor = 1usize
            << self
                .up_blocks
                .iter()
                .filter(|b| !b.upsamplers.is_empty())
                .count();
        let forward_upsample_size = h % factor != 0 || w % factor != 0;

        let sample = if self.center_input_sample {
            sample.mul_scalar(2.0).sub_scalar(1.0)
        } else {
            sample
        };
        let temb = self.temb(timesteps);
        let mut x = B::fused_conv2d(&self.conv_in, sample, None);

        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            let (y, states) = block.forward(x, &temb, &context);
            x = y;
            skips.extend(states);
        }
        x = self.mid_block.forward(x, &temb, &context);

        let mut upsample_size = None;
        let last = self.up_blocks.len().saturating_sub(1);
        for (i, block) in self.up_blocks.iter().enumerate() {
            let take = block.resnets.len().min(skips.len());
            let own = skips.split_off(skips.len() - take);
            if i < last && forward_upsample_size {
                upsample_size = skips.last().map(|s| {
                    let [_, _, sh, sw] = s.dims();
                    [sh, sw]
                });
            }
            x = block.forward(x, own, &temb, &context, upsample_size);
        }

        let x = B::fused_group_norm(&self.conv_norm_out, x, true);
        B::fused_conv2d(&self.conv_out, x, None)
    }
}
