//! An InstructPix2Pix model (a diffusers folder or an original single-file checkpoint),
//! loaded onto a device.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{DType, Tensor};
use ip2p_nn::Backend;
use ip2p_nn::{AttentionImpl, Precision, default_float_dtype};
use ip2p_sched::{Generator, Scheduler, SchedulerConfig, SchedulerKind};
use ip2p_text::{ClipTextModel, ClipTokenizer, PromptEncoder};
use ip2p_unet::{UNet2DConditionConfig, UNet2DConditionModel};
use ip2p_vae::{AutoencoderKL, VaeConfig};

use crate::batching::ActivationModel;
use crate::edit::{EditOutput, Prompts, RunSettings, run_diffusion_inference_batch};
use crate::error::PipelineError;
use crate::single_file::{SingleFile, UnetWeights};

/// Which parts to load, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOptions {
    /// Dtype of the UNet and text encoder (the VAE always runs in f32, as diffusers
    /// recommends: its decoder overflows f16). `None`: the backend's default float.
    pub dtype: Option<DType>,
    /// Weight file variant, e.g. `fp16` for `diffusion_pytorch_model.fp16.safetensors`.
    pub variant: Option<String>,
    /// Keep the f16 Conv2d/Linear weights of an fp16 file in f16 (half the memory), widened
    /// exactly inside the layers ([`ip2p_nn::Precision`]). `None`: when a variant is loaded
    /// into f32 on a backend that widens in its kernels (the CPU one).
    pub half_weights: Option<bool>,
    /// Load the VAE (not needed for latent-in, latent-out work).
    pub vae: bool,
    /// Load the tokenizer and text encoder (not needed when prompts come as embeddings).
    pub text_encoder: bool,
    pub attention: AttentionImpl,
    /// Single-file checkpoints: which UNet copy (EMA by default, when present).
    pub weights: UnetWeights,
    /// Single-file checkpoints: a diffusers folder whose configs, tokenizer and scheduler
    /// apply (diffusers' `from_single_file(config=…)`); built-in SD 1.5 InstructPix2Pix if none.
    pub config: Option<PathBuf>,
    /// Single-file checkpoints: a tokenizer folder instead of the built-in CLIP vocabulary
    /// (or `config`'s `tokenizer/`).
    pub tokenizer: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: None,
            variant: None,
            half_weights: None,
            vae: true,
            text_encoder: true,
            attention: AttentionImpl::default(),
            weights: UnetWeights::default(),
            config: None,
            tokenizer: None,
        }
    }
}

impl LoadOptions {
    /// How the UNet and text encoder are loaded on `B`: [`Self::dtype`] and [`Self::half_weights`]
    /// resolved.
    pub fn precision<B: Backend>(&self) -> Precision {
        self.precision_in::<B>(self.dtype.unwrap_or_else(default_float_dtype::<B>))
    }

    /// [`Self::precision`] for a part that computes in `dtype` (the VAE: f32).
    fn precision_in<B: Backend>(&self, dtype: DType) -> Precision {
        let auto = B::WIDENS_HALF_WEIGHTS && self.variant.is_some() && dtype == DType::F32;
        Precision::new(dtype).with_half_weights(self.half_weights.unwrap_or(auto))
    }
}

/// Seconds each part took to load (or to build, for random weights).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct LoadTimes {
    pub unet_s: f64,
    /// `None`: not loaded.
    pub vae_s: Option<f64>,
    /// Tokenizer and text encoder.
    pub text_s: Option<f64>,
    /// The whole call, configs included.
    pub total_s: f64,
}

/// Read a folder's `model_index.json` and UNet config, and refuse what is not an
/// InstructPix2Pix model (a 4-channel SD UNet, another pipeline class) before any weights are
/// read. Returns the UNet's resolved config.
pub fn check_folder(dir: &Path) -> Result<ip2p_unet::UnetPlan, PipelineError> {
    let index: ModelIndex = ip2p_nn::read_config(dir.join("model_index.json"))?;
    let not_ip2p = |reason: String| PipelineError::NotInstructPix2Pix {
        path: dir.to_path_buf(),
        reason,
    };
    let unet_config = UNet2DConditionConfig::from_file(dir.join("unet").join("config.json"))?;
    let plan = unet_config.resolve()?;
    if plan.in_channels != 2 * plan.out_channels {
        return Err(not_ip2p(format!(
            "its UNet takes {} input channels for {} latent channels (InstructPix2Pix: noise + image latents = 8)",
            plan.in_channels, plan.out_channels
        )));
    }
    if let Some(class) = &index.class_name
        && !class.contains("Pix2Pix")
        && !class.starts_with("StableDiffusion")
    {
        return Err(not_ip2p(format!(
            "model_index.json names the pipeline {class}"
        )));
    }

    Ok(plan)
}

/// Where a model's weights are: a diffusers folder, or an opened single-file checkpoint.
pub enum ModelSource {
    Folder(PathBuf),
    File(Box<SingleFile>),
}

impl ModelSource {
    /// A file is a single-file checkpoint (checked and mapped, nothing loaded yet); a folder
    /// is checked with [`check_folder`].
    pub fn open(path: &Path, options: &LoadOptions) -> Result<Self, PipelineError> {
        if path.is_file() {
            Ok(Self::File(Box::new(SingleFile::open(path, options)?)))
        } else {
            check_folder(path)?;
            Ok(Self::Folder(path.to_path_buf()))
        }
    }

    /// The UNet's resolved config.
    pub fn plan(&self) -> Result<ip2p_unet::UnetPlan, PipelineError> {
        match self {
            Self::Folder(dir) => Ok(UNet2DConditionConfig::from_file(
                dir.join("unet").join("config.json"),
            )?
            .resolve()?),
            Self::File(f) => Ok(f.plan.clone()),
        }
    }

    pub fn vae_config(&self) -> Result<VaeConfig, PipelineError> {
        match self {
            Self::Folder(dir) => Ok(VaeConfig::load(dir.join("vae").join("config.json"))?),
            Self::File(f) => Ok(f.vae_config.clone()),
        }
    }

    pub fn scheduler_config(&self) -> Result<SchedulerConfig, PipelineError> {
        match self {
            Self::Folder(dir) => Ok(SchedulerConfig::from_file(
                dir.join("scheduler").join("scheduler_config.json"),
            )?),
            Self::File(f) => Ok(f.scheduler_config.clone()),
        }
    }

    /// The UNet, in `options.dtype`.
    pub fn load_unet<B: Backend>(
        &self,
        device: &B::Device,
        options: &LoadOptions,
    ) -> Result<UNet2DConditionModel<B>, PipelineError> {
        let dtype = options.dtype.unwrap_or_else(default_float_dtype::<B>);
        let unet = match self {
            Self::Folder(dir) => UNet2DConditionModel::load(
                dir.join("unet"),
                options.variant.as_deref(),
                options.precision::<B>(),
                device,
            )?,
            Self::File(f) => f.load_unet(device, dtype)?,
        };
        Ok(unet.with_attention_impl(options.attention))
    }

    /// The VAE, in f32 (diffusers' advice: its decoder overflows f16).
    pub fn load_vae<B: Backend>(
        &self,
        device: &B::Device,
        options: &LoadOptions,
    ) -> Result<AutoencoderKL<B>, PipelineError> {
        match self {
            Self::Folder(dir) => Ok(AutoencoderKL::load(
                dir.join("vae"),
                device,
                options.precision_in::<B>(DType::F32),
                options.variant.as_deref(),
            )?),
            Self::File(f) => f.load_vae(device, DType::F32),
        }
    }

    /// The tokenizer alone (for checking prompts before anything is loaded).
    pub fn tokenizer(&self) -> Result<ClipTokenizer, PipelineError> {
        match self {
            Self::Folder(dir) => Ok(ClipTokenizer::from_dir(dir.join("tokenizer"))?),
            Self::File(f) => f.tokenizer(),
        }
    }

    /// The tokenizer and text encoder, in `options.dtype`.
    pub fn load_text<B: Backend>(
        &self,
        device: &B::Device,
        options: &LoadOptions,
    ) -> Result<PromptEncoder<B>, PipelineError> {
        let dtype = options.dtype.unwrap_or_else(default_float_dtype::<B>);
        let (tokenizer, encoder) = match self {
            Self::Folder(dir) => (
                ClipTokenizer::from_dir(dir.join("tokenizer"))?,
                ClipTextModel::load_as(
                    dir.join("text_encoder"),
                    options.variant.as_deref(),
                    options.precision::<B>(),
                    device,
                )?,
            ),
            Self::File(f) => (f.tokenizer()?, f.load_text_encoder(device, dtype)?),
        };
        let encoder = encoder.with_attention_impl(options.attention);
        Ok(PromptEncoder::new(tokenizer, encoder, device)?)
    }
}

/// The parts of an InstructPix2Pix model.
pub struct Ip2pModel<B: Backend> {
    /// The folder or file it was loaded from.
    pub dir: PathBuf,
    pub unet: UNet2DConditionModel<B>,
    pub vae: Option<AutoencoderKL<B>>,
    pub text: Option<PromptEncoder<B>>,
    pub scheduler_config: SchedulerConfig,
    /// For resolution-aware batch sizing.
    pub activation_model: ActivationModel,
    pub device: B::Device,
    pub load_times: LoadTimes,
}

#[derive(serde::Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
}

impl<B: Backend> Ip2pModel<B> {
    /// Load an InstructPix2Pix model: a diffusers folder (model_index.json, unet/, vae/,
    /// text_encoder/, tokenizer/, scheduler/) or an original single-file checkpoint
    /// (`.safetensors`, `.ckpt`; see [`crate::single_file`]). A model whose UNet does not take
    /// noise + image latents (a 4-channel SD UNet) is refused before any weights are read.
    pub fn load(
        path: impl AsRef<Path>,
        device: &B::Device,
        options: &LoadOptions,
    ) -> Result<Self, PipelineError> {
        let started = Instant::now();
        let source = ModelSource::open(path.as_ref(), options)?;
        let mut model = Self::load_from(&source, path.as_ref(), device, options)?;
        model.load_times.total_s = started.elapsed().as_secs_f64();
        Ok(model)
    }

    /// [`Self::load`] from an opened source (`path` names it in [`Self::dir`]).
    pub fn load_from(
        source: &ModelSource,
        path: &Path,
        device: &B::Device,
        options: &LoadOptions,
    ) -> Result<Self, PipelineError> {
        let started = Instant::now();
        let plan = source.plan()?;
        let dtype = options.dtype.unwrap_or_else(default_float_dtype::<B>);
        let t = Instant::now();
        let unet = source.load_unet(device, options)?;
        let unet_s = t.elapsed().as_secs_f64();
        let vae_config = source.vae_config()?;
        let t = Instant::now();
        let vae = if options.vae {
            Some(source.load_vae(device, options)?)
        } else {
            None
        };
        let vae_s = vae.as_ref().map(|_| t.elapsed().as_secs_f64());
        let t = Instant::now();
        let text = if options.text_encoder {
            Some(source.load_text(device, options)?)
        } else {
            None
        };
        let text_s = text.as_ref().map(|_| t.elapsed().as_secs_f64());
        let scheduler_config = source.scheduler_config()?;
        let activation_model =
            ActivationModel::from_configs(&plan, &vae_config, options.vae, dtype);
        Ok(Self {
            dir: path.to_path_buf(),
            unet,
            vae,
            text,
            scheduler_config,
            activation_model,
            device: device.clone(),
            load_times: LoadTimes {
                unet_s,
                vae_s,
                text_s,
                total_s: started.elapsed().as_secs_f64(),
            },
        })
    }

    /// The folder's scheduler, or another class built from its config.
    pub fn scheduler(
        &self,
        kind: Option<SchedulerKind>,
    ) -> Result<Box<dyn Scheduler<B>>, PipelineError> {
        Ok(ip2p_sched::build::<B>(&self.scheduler_config, kind)?)
    }

    /// Edit a batch with this model's parts (see [`run_diffusion_inference_batch`]), the noise
    /// drawn from `settings.options.rng` seeded with `settings.options.seed`.
    pub fn edit(
        &self,
        scheduler: &mut dyn Scheduler<B>,
        images_or_latents: Tensor<B, 4>,
        prompts: Prompts<B>,
        input_is_latents: bool,
        return_latents: bool,
        settings: RunSettings<'_, B>,
    ) -> Result<EditOutput<B>, PipelineError> {
        let mut generator = Generator::new(settings.options.rng, settings.options.seed);
        self.edit_with_generator(
            scheduler,
            &mut generator,
            images_or_latents,
            prompts,
            input_is_latents,
            return_latents,
            settings,
        )
    }

    /// [`Self::edit`] with the caller's generator, e.g. [`Generator::per_item`] for one
    /// generator per edit seeded from the item (diffusers' list of generators).
    #[allow(clippy::too_many_arguments)]
    pub fn edit_with_generator(
        &self,
        scheduler: &mut dyn Scheduler<B>,
        generator: &mut Generator,
        images_or_latents: Tensor<B, 4>,
        prompts: Prompts<B>,
        input_is_latents: bool,
        return_latents: bool,
        mut settings: RunSettings<'_, B>,
    ) -> Result<EditOutput<B>, PipelineError> {
        if settings.activation_model.is_none() {
            settings.activation_model = Some(self.activation_model.clone());
        }
        run_diffusion_inference_batch(
            &self.unet,
            self.vae.as_ref(),
            self.text.as_ref(),
            scheduler,
            images_or_latents,
            prompts,
            &self.device,
            generator,
            input_is_latents,
            return_latents,
            settings,
        )
    }
}
