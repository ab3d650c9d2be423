//! diffusers' `AutoencoderKL` (`Encoder`, `Decoder`, `DiagonalGaussianDistribution`).

use std::path::Path;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, PaddingConfig2d};
use burn::tensor::{DType, Distribution, Tensor};
use ip2p_nn::Backend;
use ip2p_nn::{
    Attention, AttentionConfig, Downsample2D, Downsample2DConfig, Precision, ResnetBlock2D,
    ResnetBlock2DConfig, Upsample2D, Upsample2DConfig, WeightSpec,
};

use crate::config::VaeConfig;
use crate::error::VaeError;
use crate::tiling::{self, VaeMemory};

const EPS: f64 = 1e-6;

fn conv3<B: Backend>(i: usize, o: usize, device: &B::Device) -> Conv2d<B> {
    Conv2dConfig::new([i, o], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(device)
}

fn resnet<B: Backend>(i: usize, o: usize, groups: usize, device: &B::Device) -> ResnetBlock2D<B> {
    ResnetBlock2DConfig::new(i)
        .with_out_channels(Some(o))
        .with_groups(groups)
        .with_eps(EPS)
        .init(device)
}

/// `DownEncoderBlock2D`: ResNet blocks, then a stride-2 conv except in the last block.
#[derive(Module, Debug)]
pub struct DownEncoderBlock2D<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// Empty in the last block.
    pub downsamplers: Vec<Downsample2D<B>>,
}

impl<B: Backend> DownEncoderBlock2D<B> {
    fn forward(&self, mut x: Tensor<B, 4>) -> Tensor<B, 4> {
        for r in &self.resnets {
            x = r.forward(x, None);
        }
        for d in &self.downsamplers {
            x = d.forward(x);
        }
        x
    }
}

/// `UpDecoderBlock2D`: ResNet blocks, then nearest ×2 and a conv except in the last block.
#[derive(Module, Debug)]
pub struct UpDecoderBlock2D<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub upsamplers: Vec<Upsample2D<B>>,
}

impl<B: Backend> UpDecoderBlock2D<B> {
    fn forward(&self, mut x: Tensor<B, 4>) -> Tensor<B, 4> {
        for r in &self.resnets {
            x = r.forward(x, None);
        }
        for u in &self.upsamplers {
            x = u.forward(x, None);
        }
        x
    }
}

/// `UNetMidBlock2D` as the VAE builds it: ResNet, one-head self-attention, ResNet.
#[derive(Module, Debug)]
pub struct MidBlock<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// Empty when the config sets `mid_block_add_attention: false`.
    pub attentions: Vec<Attention<B>>,
}

impl<B: Backend> MidBlock<B> {
    fn new(channels: usize, groups: usize, attention: bool, device: &B::Device) -> Self {
        // diffusers passes attention_head_dim = channels: one head over all channels.
        let attn = AttentionConfig::new(channels)
            .with_heads(1)
            .with_dim_head(channels)
            .with_bias(true)
            .with_norm_num_groups(Some(groups))
            .with_eps(EPS)
            .with_residual_connection(true);
        Self {
            resnets: (0..2)
                .map(|_| resnet(channels, channels, groups, device))
                .collect(),
            attentions: if attention {
                vec![attn.init(device)]
            } else {
                Vec::new()
            },
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = self.resnets[0].forward(x, None);
        for (i, r) in self.resnets.iter().enumerate().skip(1) {
            if let Some(a) = self.attentions.get(i - 1) {
                x = a.forward_spatial(x);
            }
            x = r.forward(x, None);
        }
        x
    }
}

/// The image → moments half: conv_in, down blocks, mid block, GroupNorm–SiLU–conv_out.
#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub down_blocks: Vec<DownEncoderBlock2D<B>>,
    pub mid_block: MidBlock<B>,
    pub conv_norm_out: GroupNorm<B>,
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> Encoder<B> {
    fn new(c: &VaeConfig, device: &B::Device) -> Self {
        let ch = &c.block_out_channels;
        let g = c.norm_num_groups;
        let last = ch.len() - 1;
        let down_blocks = ch
            .iter()
            .enumerate()
            .map(|(i, &out)| {
                let input = if i == 0 { ch[0] } else { ch[i - 1] };
                DownEncoderBlock2D {
                    resnets: (0..c.layers_per_block)
                        .map(|l| resnet(if l == 0 { input } else { out }, out, g, device))
                        .collect(),
                    downsamplers: if i == last {
                        Vec::new()
                    } else {
                        vec![Downsample2DConfig::new(out).with_padding(0).init(device)]
                    },
                }
            })
            .collect();
        Self {
            conv_in: conv3(c.in_channels, ch[0], device),
            down_blocks,
            mid_block: MidBlock::new(ch[last], g, c.mid_block_add_attention, device),
            conv_norm_out: GroupNormConfig::new(g, ch[last])
                .with_epsilon(EPS)
                .init(device),
            conv_out: conv3(ch[last], 2 * c.latent_channels, device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = B::fused_conv2d(&self.conv_in, x, None);
        for b in &self.down_blocks {
            x = b.forward(x);
        }
        let x = self.mid_block.forward(x);
        B::fused_conv2d(
            &self.conv_out,
            B::fused_group_norm(&self.conv_norm_out, x, true),
            None,
        )
    }
}

/// The latent → image half: conv_in, mid block, up blocks (channels reversed), norm, conv_out.
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub mid_block: MidBlock<B>,
    pub up_blocks: Vec<UpDecoderBlock2D<B>>,
    pub conv_norm_out: GroupNorm<B>,
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> Decoder<B> {
    fn new(c: &VaeConfig, device: &B::Device) -> Self {
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let g = c.norm_num_groups;
        let last = rev.len() - 1;
        let up_blocks = rev
            .iter()
            .enumerate()
            .map(|(i, &out)| {
                let prev = if i == 0 { rev[0] } else { rev[i - 1] };
                UpDecoderBlock2D {
                    resnets: (0..=c.layers_per_block)
                        .map(|l| resnet(if l == 0 { prev } else { out }, out, g, device))
                        .collect(),
                    upsamplers: if i == last {
                        Vec::new()
                    } else {
                        vec![Upsample2DConfig::new(out).init(device)]
                    },
                }
            })
            .collect();
        Self {
            conv_in: conv3(c.latent_channels, rev[0], device),
            mid_block: MidBlock::new(rev[0], g, c.mid_block_add_attention, device),
            up_blocks,
            conv_norm_out: GroupNormConfig::new(g, rev[last])
                .with_epsilon(EPS)
                .init(device),
            conv_out: conv3(rev[last], c.out_channels, device),
        }
    }

    pub fn forward(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = self
            .mid_block
            .forward(B::fused_conv2d(&self.conv_in, z, None));
        for b in &self.up_blocks {
            x = b.forward(x);
        }
        B::fused_conv2d(
            &self.conv_out,
            B::fused_group_norm(&self.conv_norm_out, x, true),
            None,
        )
    }
}

/// diffusers' `DiagonalGaussianDistribution`: the encoder's posterior over latents.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian<B: Backend> {
    /// `[batch, latent_channels, h/f, w/f]`.
    pub mean: Tensor<B, 4>,
    /// Clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor<B, 4>,
}

impl<B: Backend> DiagonalGaussian<B> {
    /// Split the encoder's `[b, 2·latent, h, w]` moments into mean and (clamped) log-variance.
    pub fn from_moments(moments: Tensor<B, 4>) -> Self {
        let [b, c, h, w] = moments.dims();
        let half = c / 2;
        let mean = moments.clone().slice([0..b, 0..half, 0..h, 0..w]);
        let logvar = moments
            .slice([0..b, half..c, 0..h, 0..w])
            .clamp(-30.0, 20.0);
        Self { mean, logvar }
    }

    /// The most likely latent: the mean (what InstructPix2Pix conditions on).
    pub fn mode(&self) -> Tensor<B, 4> {
        self.mean.clone()
    }

    /// `exp(0.5 · logvar)`.
    pub fn std(&self) -> Tensor<B, 4> {
        self.logvar.clone().mul_scalar(0.5).exp()
    }

    /// `mean + std · noise` with caller-provided standard normal noise of the mean's shape.
    pub fn sample_with_noise(&self, noise: Tensor<B, 4>) -> Result<Tensor<B, 4>, VaeError> {
        if noise.dims() != self.mean.dims() {
            return Err(VaeError::Input(format!(
                "sample noise has shape {:?}, the posterior {:?}",
                noise.dims(),
                self.mean.dims()
            )));
        }
        let noise = noise.cast(self.mean.dtype());
        Ok(self.mean.clone() + self.std() * noise)
    }

    /// A draw with noise from the backend's RNG seeded with `seed`. Reproducible on one
    /// backend; it does not reproduce torch's generator (pass torch's noise to
    /// [`Self::sample_with_noise`] for that). Seeds the backend's global RNG as a side effect.
    pub fn sample(&self, seed: u64) -> Tensor<B, 4> {
        let device = self.mean.device();
        B::seed(&device, seed);
        let noise =
            Tensor::<B, 4>::random(self.mean.dims(), Distribution::Normal(0.0, 1.0), &device)
                .cast(self.mean.dtype());
        self.mean.clone() + self.std() * noise
    }
}

/// The weights and layers of diffusers' `AutoencoderKL` (a Burn module; field names are the
/// weight keys). [`AutoencoderKL`] wraps it with its config and memory options.
#[derive(Module, Debug)]
pub struct AutoencoderKLModule<B: Backend> {
    pub encoder: Encoder<B>,
    pub decoder: Decoder<B>,
    pub quant_conv: Option<Conv2d<B>>,
    pub post_quant_conv: Option<Conv2d<B>>,
}

/// The weight-key renames every AutoencoderKL load applies: files written by diffusers before
/// 0.14 (the timbrooks/instruct-pix2pix VAE among them) name the mid-block attention
/// `query`/`key`/`value`/`proj_attn`; diffusers renames them on load, and so do we.
///
/// Only the 2-D (Linear-shaped) form is supported, as in diffusers' converted folders;
/// original LDM checkpoints store these as `[out, in, 1, 1]` convs, which load as a typed
/// shape-mismatch error (convert them with diffusers first).
pub fn weight_spec() -> WeightSpec {
    let attn = r"^((?:encoder|decoder)\.mid_block\.attentions\.0)";
    WeightSpec::new()
        .remap(&format!(r"{attn}\.query\.(weight|bias)$"), "$1.to_q.$2")
        .remap(&format!(r"{attn}\.key\.(weight|bias)$"), "$1.to_k.$2")
        .remap(&format!(r"{attn}\.value\.(weight|bias)$"), "$1.to_v.$2")
        .remap(
            &format!(r"{attn}\.proj_attn\.(weight|bias)$"),
            "$1.to_out.0.$2",
        )
}

impl<B: Backend> AutoencoderKLModule<B> {
    /// A randomly initialised model of this shape.
    pub fn new(config: &VaeConfig, device: &B::Device) -> Self {
        let lat = config.latent_channels;
        Self {
            encoder: Encoder::new(config, device),
            decoder: Decoder::new(config, device),
            quant_conv: config
                .use_quant_conv
                .then(|| Conv2dConfig::new([2 * lat, 2 * lat], [1, 1]).init(device)),
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| Conv2dConfig::new([lat, lat], [1, 1]).init(device)),
        }
    }

    /// The float dtype of the weights (what [`AutoencoderKL::encode`] and [`AutoencoderKL::decode`] compute in).
    pub fn dtype(&self) -> DType {
        // The bias: a weight may be f16 kept as stored ([`ip2p_nn::Precision`]).
        match &self.encoder.conv_in.bias {
            Some(b) => b.val().dtype(),
            None => self.encoder.conv_in.weight.val().dtype(),
        }
    }

    /// `[b, 3, h, w]` → the posterior's moments `[b, 2·latent, h/f, w/f]`.
    pub fn moments(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = self.encoder.forward(x);
        match &self.quant_conv {
            Some(c) => B::fused_conv2d(c, h, None),
            None => h,
        }
    }

    /// Unscaled latents `[b, latent, h, w]` → images `[b, 3, h·f, w·f]` (roughly [-1, 1]).
    pub fn decode_raw(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let z = match &self.post_quant_conv {
            Some(c) => B::fused_conv2d(c, z, None),
            None => z,
        };
        self.decoder.forward(z)
    }
}

/// diffusers' `AutoencoderKL`, loaded: the module, its config and the memory options.
#[derive(Debug, Clone)]
pub struct AutoencoderKL<B: Backend> {
    pub model: AutoencoderKLModule<B>,
    pub config: VaeConfig,
    pub memory: VaeMemory,
}

impl<B: Backend> AutoencoderKL<B> {
    /// Load `dir/config.json` and `dir/diffusion_pytorch_model[.variant].safetensors`.
    ///
    /// `dtype` is the dtype the weights are cast to and the VAE computes in. Pass `DType::F32`
    /// even when the UNet runs in f16: SD 1.5's VAE sets `force_upcast` because its decoder
    /// overflows f16 (NaN / black images); [`Self::encode`] and [`Self::decode`] cast their
    /// inputs to this dtype, so the pipeline can hand in f16 tensors. This crate does not
    /// decide for the pipeline; `config.force_upcast` says what diffusers would do.
    pub fn load(
        dir: impl AsRef<Path>,
        device: &B::Device,
        dtype: impl Into<Precision>,
        variant: Option<&str>,
    ) -> Result<Self, VaeError> {
        let dir = dir.as_ref();
        let config = VaeConfig::load(dir.join("config.json"))?;
        let file = ip2p_nn::weights_file(dir, "diffusion_pytorch_model", variant)?;
        Self::load_file(config, file, device, dtype)
    }

    /// Build from a config and load one weights file.
    pub fn load_file(
        config: VaeConfig,
        file: impl AsRef<Path>,
        device: &B::Device,
        dtype: impl Into<Precision>,
    ) -> Result<Self, VaeError> {
        let model = AutoencoderKLModule::new(&config, device);
        let model = ip2p_nn::load_safetensors(model, file, &weight_spec(), dtype)?;
        Ok(Self {
            model,
            config,
            memory: VaeMemory::default(),
        })
    }

    /// The same VAE with other slicing/tiling options.
    pub fn with_memory(mut self, memory: VaeMemory) -> Self {
        self.memory = memory;
        self
    }

    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// Image side / latent side (8 for SD 1.5).
    pub fn downscale_factor(&self) -> usize {
        self.config.downscale_factor()
    }

    fn check(
        &self,
        x: &Tensor<B, 4>,
        what: &'static str,
        channels: usize,
        multiple: usize,
    ) -> Result<(), VaeError> {
        let shape = x.dims();
        let [b, c, h, w] = shape;
        if b == 0 {
            return Err(VaeError::Input(format!("{what}: empty batch")));
        }
        if c != channels {
            return Err(VaeError::Channels {
                what,
                expected: channels,
                found: c,
                shape,
            });
        }
        if h == 0 || w == 0 || h % multiple != 0 || w % multiple != 0 {
            return Err(VaeError::Size {
                what,
                multiple,
                height: h,
                width: w,
            });
        }
        Ok(())
    }

    /// Images `[b, in_channels, h, w]` in [-1, 1] (h, w multiples of the downscale factor) →
    /// the posterior. Computes in the model's dtype (the input is cast).
    pub fn encode(&self, images: Tensor<B, 4>) -> Result<DiagonalGaussian<B>, VaeError> {
        self.check(
            &images,
            "VAE encode input",
            self.config.in_channels,
            self.downscale_factor(),
        )?;
        let images = images.cast(self.model.dtype());
        let moments = tiling::encode_moments(self, images);
        Ok(DiagonalGaussian::from_moments(moments))
    }

    /// Unscaled latents `[b, latent_channels, h, w]` → images `[b, out_channels, h·f, w·f]`,
    /// unclamped (roughly [-1, 1]). The diffusion pipeline's latents are scaled: use
    /// [`Self::decode_scaled`] for those.
    pub fn decode(&self, latents: Tensor<B, 4>) -> Result<Tensor<B, 4>, VaeError> {
        self.check(&latents, "VAE decode input", self.config.latent_channels, 1)?;
        let latents = latents.cast(self.model.dtype());
        Ok(tiling::decode(self, latents))
    }

    /// Latents in the diffusion model's space (`unscaled · scaling_factor`, plus `shift_factor`
    /// when the config has one) → images: `decode(z / scaling_factor + shift)`.
    pub fn decode_scaled(&self, latents: Tensor<B, 4>) -> Result<Tensor<B, 4>, VaeError> {
        let z = latents.div_scalar(self.config.scaling_factor);
        let z = match self.config.shift_factor {
            Some(s) => z.add_scalar(s),
            None => z,
        };
        self.decode(z)
    }

    /// Unscaled latents → the diffusion model's space: `(z - shift) · scaling_factor`.
    pub fn scale_latents(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let z = match self.config.shift_factor {
            Some(s) => z.sub_scalar(s),
            None => z,
        };
        z.mul_scalar(self.config.scaling_factor)
    }
}
