//! One training step of diffusers' `train_instruct_pix2pix.py`: the loss, with every random
//! draw given ([`StepDraws`]) so that a step can be replayed against the reference.

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::tensor::{DType, Tensor, TensorData};
use ip2p_nn::{AutodiffBackend, Backend};
use ip2p_sched::{Ddpm, NoiseRng, PredictionType, Scheduler};
use ip2p_text::PromptEncoder;
use ip2p_unet::UNet2DConditionModel;
use ip2p_vae::AutoencoderKL;

use crate::TrainError;
use crate::rng::SplitMix;

/// The frozen parts: the VAE and the text encoder (with its cached empty-prompt embedding).
/// They run on the autodiff backend's inner backend, so no graph is recorded through them.
pub struct Frozen<B: Backend> {
    pub vae: AutoencoderKL<B>,
    pub text: PromptEncoder<B>,
}

/// A batch of pairs: pixels in [-1, 1] (already resized, cropped and flipped) and token ids.
#[derive(Debug, Clone)]
pub struct TrainBatch<B: Backend> {
    /// `[b, 3, h, w]`, the image to edit (the UNet's conditioning).
    pub original: Tensor<B, 4>,
    /// `[b, 3, h, w]`, the edited image (what the UNet learns to denoise).
    pub edited: Tensor<B, 4>,
    /// `b` rows of `max_length` CLIP ids.
    pub input_ids: Vec<Vec<i64>>,
}

/// The step's random draws: the script takes them from torch's RNG; here they are inputs.
#[derive(Debug, Clone)]
pub struct StepDraws<B: Backend> {
    /// Standard normal noise for the edited image's posterior `sample()`, latent-shaped.
    pub sample_noise: Tensor<B, 4>,
    /// The DDPM noise, latent-shaped.
    pub noise: Tensor<B, 4>,
    /// One training timestep per row, in `0..num_train_timesteps`.
    pub timesteps: Vec<usize>,
    /// One uniform draw in [0, 1) per row for conditioning dropout.
    pub random_p: Vec<f64>,
}

impl<B: Backend> StepDraws<B> {
    /// Draw everything from `seed` (reproducible; not torch's generator): normals from
    /// [`NoiseRng`], timesteps uniform in `0..num_train_timesteps`, dropout draws in [0, 1).
    pub fn draw(
        seed: u64,
        latent_shape: [usize; 4],
        num_train_timesteps: usize,
        device: &B::Device,
    ) -> Self {
        let b = latent_shape[0];
        let mut normal = NoiseRng::new(seed);
        let sample_noise = normal.normal::<B>(latent_shape, device);
        let noise = normal.normal::<B>(latent_shape, device);
        let mut uniform = SplitMix::new(seed ^ 0x5DEE_CE66_D1CE_5EED);
        let timesteps = (0..b)
            .map(|_| (uniform.next_u64() % num_train_timesteps.max(1) as u64) as usize)
            .collect();
        let random_p = (0..b).map(|_| uniform.uniform()).collect();
        Self {
            sample_noise,
            noise,
            timesteps,
            random_p,
        }
    }

    /// One item per seed, each drawn alone from its seed ([`Self::draw`] with a batch of
    /// one) and stacked: an item's draws do not depend on the batch it is in.
    pub fn draw_items(
        seeds: &[u64],
        item_latent_shape: [usize; 3],
        num_train_timesteps: usize,
        device: &B::Device,
    ) -> Self {
        let [c, h, w] = item_latent_shape;
        let items: Vec<Self> = seeds
            .iter()
            .map(|&s| Self::draw(s, [1, c, h, w], num_train_timesteps, device))
            .collect();
        Self {
            sample_noise: Tensor::cat(items.iter().map(|d| d.sample_noise.clone()).collect(), 0),
            noise: Tensor::cat(items.iter().map(|d| d.noise.clone()).collect(), 0),
            timesteps: items.iter().flat_map(|d| d.timesteps.clone()).collect(),
            random_p: items.iter().flat_map(|d| d.random_p.clone()).collect(),
        }
    }
}

/// Which rows drop their text / image conditioning, as the script's `random_p` masks:
/// text dropped when `u < 2p`, image zeroed when `p <= u < 3p`.
pub fn dropout_masks(random_p: &[f64], p: f64) -> (Vec<bool>, Vec<bool>) {
    let text = random_p.iter().map(|&u| u < 2.0 * p).collect();
    let image = random_p.iter().map(|&u| u >= p && u < 3.0 * p).collect();
    (text, image)
}

/// The step's settings.
#[derive(Debug, Clone, Copy)]
pub struct StepConfig {
    /// Conditioning dropout probability `p` (the script's `--conditioning_dropout_prob`); 0: off.
    pub conditioning_dropout: f64,
    pub prediction_type: PredictionType,
}

/// What the step computed besides the loss (on the inner backend, no graph).
pub struct StepAux<B: Backend> {
    pub latents: Tensor<B, 4>,
    pub noisy_latents: Tensor<B, 4>,
    pub image_embeds: Tensor<B, 4>,
    pub target: Tensor<B, 4>,
}

fn per_row<B: Backend>(values: &[f32], device: &B::Device) -> Tensor<B, 4> {
    Tensor::from_data(
        TensorData::new(values.to_vec(), [values.len(), 1, 1, 1]),
        device,
    )
}

/// What the UNet gets and what it should predict.
pub struct UnetInputs<B: Backend> {
    /// `[b, 8, h, w]`: noisy latents and image latents.
    pub sample: Tensor<B, 4>,
    pub timesteps: Tensor<B, 1>,
    /// `[b, tokens, hidden]`, text embeddings after dropout.
    pub context: Tensor<B, 3>,
    pub aux: StepAux<B>,
}

/// The conditioning the UNet sees and the target, computed on the frozen parts: no graph.
pub fn prepare_inputs<B: Backend>(
    frozen: &Frozen<B>,
    scheduler: &Ddpm,
    config: &StepConfig,
    batch: &TrainBatch<B>,
    draws: &StepDraws<B>,
) -> Result<UnetInputs<B>, TrainError> {
    let b = batch.input_ids.len();
    let [eb, ..] = batch.edited.dims();
    if batch.original.dims() != batch.edited.dims() || eb != b {
        return Err(TrainError::Input(format!(
            "batch: original {:?}, edited {:?}, {} prompt rows",
            batch.original.dims(),
            batch.edited.dims(),
            b
        )));
    }
    if draws.timesteps.len() != b || draws.random_p.len() != b {
        return Err(TrainError::Input(format!(
            "draws: {} timesteps and {} dropout draws for a batch of {b}",
            draws.timesteps.len(),
            draws.random_p.len()
        )));
    }
    let device = batch.edited.device();
    let vae = &frozen.vae;
    // Edited image → posterior sample × scaling factor.
    let latents = vae
        .encode(batch.edited.clone())?
        .sample_with_noise(draws.sample_noise.clone())?;
    let latents = vae.scale_latents(latents).cast(DType::F32);
    let t: Vec<f64> = draws.timesteps.iter().map(|&t| t as f64).collect();
    let noisy = Scheduler::<B>::add_noise(scheduler, latents.clone(), draws.noise.clone(), &t)?;
    // Original image → mode(), unscaled.
    let image_embeds = vae.encode(batch.original.clone())?.mode().cast(DType::F32);

    let p = config.conditioning_dropout;
    let mut context = frozen.text.encode_ids(&batch.input_ids)?.cast(DType::F32);
    let mut image_embeds = image_embeds;
    if p > 0.0 {
        let (drop_text, drop_image) = dropout_masks(&draws.random_p, p);
        let keep_text: Vec<f32> = drop_text
            .iter()
            .map(|&d| if d { 0.0 } else { 1.0 })
            .collect();
        let keep_image: Vec<f32> = drop_image
            .iter()
            .map(|&d| if d { 0.0 } else { 1.0 })
            .collect();
        let keep_text = per_row::<B>(&keep_text, &device).squeeze_dim::<3>(3);
        let uncond = frozen.text.uncond().cast(DType::F32);
        // torch.where(mask, null, cond) == cond·keep + null·(1 - keep), exactly, for 0/1 keep.
        context = context * keep_text.clone() + uncond * keep_text.neg().add_scalar(1.0);
        image_embeds = image_embeds * per_row::<B>(&keep_image, &device);
    }
    let target = match config.prediction_type {
        PredictionType::Epsilon => draws.noise.clone().cast(DType::F32),
        PredictionType::VPrediction => {
            let acp = Scheduler::<B>::alphas_cumprod(scheduler);
            let (mut a, mut s) = (Vec::with_capacity(b), Vec::with_capacity(b));
            for &ti in &draws.timesteps {
                let v = *acp.get(ti).ok_or_else(|| {
                    TrainError::Input(format!("timestep {ti} outside the training schedule"))
                })? as f32;
                a.push(v.sqrt());
                s.push((1.0 - v).sqrt());
            }
            draws.noise.clone().cast(DType::F32) * per_row::<B>(&a, &device)
                - latents.clone() * per_row::<B>(&s, &device)
        }
        PredictionType::Sample => latents.clone(),
    };
    let sample = Tensor::cat(vec![noisy.clone(), image_embeds.clone()], 1);
    let timesteps = Tensor::<B, 1>::from_data(
        TensorData::new(t.iter().map(|&v| v as f32).collect::<Vec<_>>(), [b]),
        &device,
    );
    Ok(UnetInputs {
        sample,
        timesteps,
        context,
        aux: StepAux {
            latents,
            noisy_latents: noisy,
            image_embeds,
            target,
        },
    })
}

/// The step's loss: `mse(unet(concat(noisy, image_embeds), t, text), target)`, mean over all
/// elements, in f32, with a graph through the UNet only.
pub fn training_loss<B: AutodiffBackend>(
    unet: &UNet2DConditionModel<B>,
    frozen: &Frozen<B::InnerBackend>,
    scheduler: &Ddpm,
    config: &StepConfig,
    batch: &TrainBatch<B::InnerBackend>,
    draws: &StepDraws<B::InnerBackend>,
) -> Result<(Tensor<B, 1>, StepAux<B::InnerBackend>), TrainError> {
    let UnetInputs {
        sample,
        timesteps,
        context,
        aux,
    } = prepare_inputs(frozen, scheduler, config, batch, draws)?;
    let pred = unet.forward(
        Tensor::<B, 4>::from_inner(sample),
        Tensor::<B, 1>::from_inner(timesteps),
        Tensor::<B, 3>::from_inner(context),
    )?;
    let diff = pred.cast(DType::F32) - Tensor::<B, 4>::from_inner(aux.target.clone());
    Ok((diff.square().mean(), aux))
}

/// A 4-channel Stable Diffusion UNet made InstructPix2Pix's 8-channel one: `conv_in` takes
/// `2·in` channels, the new input channels' weights zero, the old weights *and bias* kept
/// (diffusers' script re-initialises the bias, diffusers#4960; the original repo keeps it).
pub fn widen_conv_in<B: Backend>(
    mut unet: UNet2DConditionModel<B>,
) -> Result<UNet2DConditionModel<B>, TrainError> {
    let weight = unet.conv_in.weight.val();
    let [o, i, kh, kw] = weight.dims();
    if i != unet.in_channels {
        return Err(TrainError::Input(format!(
            "conv_in has {i} input channels, the config {}",
            unet.in_channels
        )));
    }
    let zeros = Tensor::<B, 4>::zeros([o, i, kh, kw], &weight.device()).cast(weight.dtype());
    // Detached: a new leaf (on an autodiff backend the concatenation is not one, and a
    // parameter must be).
    let wide = Tensor::cat(vec![weight, zeros], 1).detach();
    let conv: Conv2d<B> = Conv2d {
        weight: Param::from_tensor(wide),
        ..unet.conv_in.clone()
    };
    unet.conv_in = conv;
    unet.in_channels = 2 * i;
    Ok(unet)
}

/// Load a diffusers `unet/` folder for training, in f32: an InstructPix2Pix UNet as it is, a
/// 4-channel Stable Diffusion UNet widened by [`widen_conv_in`]. Returns whether it widened.
pub fn load_unet_for_training<B: Backend>(
    dir: &std::path::Path,
    device: &B::Device,
) -> Result<(UNet2DConditionModel<B>, bool), TrainError> {
    let unet = UNet2DConditionModel::<B>::load(dir, None, DType::F32, device)?;
    let out = ip2p_unet::UNet2DConditionConfig::from_file(dir.join("config.json"))?
        .resolve()?
        .out_channels;
    if unet.in_channels == out {
        Ok((widen_conv_in(unet)?, true))
    } else {
        Ok((unet, false))
    }
}
