//! Built-in model presets with random weights, for benchmarks and smoke tests that must run on
//! a fresh machine with no model files.
//!
//! - [`Preset::Sd15`]: the real Stable Diffusion 1.5 InstructPix2Pix architecture (UNet
//!   859.5M parameters, VAE 83.7M, CLIP ViT-L/14 text encoder 123M), configs embedded.
//! - [`Preset::Tiny`]: the `fixtures/models/tiny` configs (diffusers' own InstructPix2Pix test
//!   components), embedded.
//!
//! Both use the real timbrooks `scheduler_config.json`. Weights are Burn's default random
//! initialisation: the numbers are meaningless, the shapes and the work are real.

use std::path::PathBuf;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use ip2p_nn::Backend;
use ip2p_nn::cast::CastParams;
use ip2p_nn::default_float_dtype;
use ip2p_sched::SchedulerConfig;
use ip2p_text::{ClipTextConfig, ClipTokenizer, PromptEncoder};
use ip2p_unet::{UNet2DConditionConfig, UNet2DConditionModel};
use ip2p_vae::{AutoencoderKL, AutoencoderKLModule, VaeConfig, VaeMemory};

use crate::model::LoadTimes;

use crate::batching::ActivationModel;
use crate::error::PipelineError;
use crate::model::{Ip2pModel, LoadOptions};

/// SD 1.5's `vae/config.json` (the fields that shape the model).
pub const SD15_VAE_CONFIG: &str = r#"{
  "_class_name": "AutoencoderKL",
  "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
  "in_channels": 3,
  "out_channels": 3,
  "latent_channels": 4,
  "layers_per_block": 2,
  "norm_num_groups": 32,
  "sample_size": 512,
  "scaling_factor": 0.18215
}"#;

/// SD 1.5's `text_encoder/config.json` (CLIP ViT-L/14's text tower).
pub const SD15_TEXT_CONFIG: &str = r#"{
  "vocab_size": 49408,
  "hidden_size": 768,
  "intermediate_size": 3072,
  "num_hidden_layers": 12,
  "num_attention_heads": 12,
  "max_position_embeddings": 77,
  "hidden_act": "quick_gelu",
  "layer_norm_eps": 1e-05
}"#;

/// The timbrooks/instruct-pix2pix `scheduler_config.json`, verbatim.
pub const IP2P_SCHEDULER_CONFIG: &str =
    include_str!("../../../fixtures/models/tiny/scheduler/scheduler_config.json");

/// The tiny test model's configs.
pub const TINY_UNET_CONFIG: &str = include_str!("../../../fixtures/models/tiny/unet/config.json");
pub const TINY_VAE_CONFIG: &str = include_str!("../../../fixtures/models/tiny/vae/config.json");
pub const TINY_TEXT_CONFIG: &str =
    include_str!("../../../fixtures/models/tiny/text_encoder/config.json");

/// A built-in architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Preset {
    /// Stable Diffusion 1.5 InstructPix2Pix.
    Sd15,
    /// diffusers' tiny InstructPix2Pix test model.
    Tiny,
}

impl Preset {
    pub fn name(self) -> &'static str {
        match self {
            Preset::Sd15 => "sd15",
            Preset::Tiny => "tiny",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "sd15" | "sd1.5" | "sd-1.5" | "default" => Some(Preset::Sd15),
            "tiny" => Some(Preset::Tiny),
            _ => None,
        }
    }

    /// The UNet, VAE and text encoder configs, as JSON text.
    pub fn configs(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Preset::Sd15 => (
                ip2p_unet::SD15_IP2P_CONFIG,
                SD15_VAE_CONFIG,
                SD15_TEXT_CONFIG,
            ),
            Preset::Tiny => (TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TEXT_CONFIG),
        }
    }

    pub fn unet_config(self) -> Result<UNet2DConditionConfig, PipelineError> {
        Ok(UNet2DConditionConfig::from_json(self.configs().0)?)
    }

    pub fn vae_config(self) -> Result<VaeConfig, PipelineError> {
        let config: VaeConfig = serde_json::from_str(self.configs().1)
            .map_err(|e| PipelineError::Input(format!("built-in VAE config: {e}")))?;
        config
            .validate()
            .map_err(|e| PipelineError::Input(format!("built-in VAE config: {e}")))?;
        Ok(config)
    }

    pub fn text_config(self) -> Result<ClipTextConfig, PipelineError> {
        let config: ClipTextConfig = serde_json::from_str(self.configs().2)
            .map_err(|e| PipelineError::Input(format!("built-in text config: {e}")))?;
        config
            .validate()
            .map_err(|e| PipelineError::Input(format!("built-in text config: {e}")))?;
        Ok(config)
    }

    pub fn scheduler_config(self) -> Result<SchedulerConfig, PipelineError> {
        Ok(SchedulerConfig::from_json_str(IP2P_SCHEDULER_CONFIG)?)
    }

    /// Pixels per latent pixel along a side.
    pub fn vae_factor(self) -> usize {
        match self {
            Preset::Sd15 => 8,
            Preset::Tiny => 2,
        }
    }
}

/// Burn initialises parameters lazily, on first use; this draws them all now, so a benchmark's
/// first run does not pay for random initialisation.
struct Materialize;

impl<B: Backend> ModuleVisitor<B> for Materialize {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let _ = param.val();
    }
}

impl<B: Backend> Ip2pModel<B> {
    /// A model of a built-in architecture with random weights. `tokenizer` supplies the
    /// vocabulary (its size must not exceed the text encoder's: the full CLIP BPE in
    /// `fixtures/clip-bpe` for [`Preset::Sd15`], `fixtures/models/tiny/tokenizer` for
    /// [`Preset::Tiny`]); it is not needed when `options.text_encoder` is false.
    /// `options.variant` is ignored; `options.dtype` applies to the UNet and text encoder.
    /// Every weight is drawn before this returns (Burn would otherwise draw them on first use).
    pub fn random(
        preset: Preset,
        tokenizer: Option<ClipTokenizer>,
        device: &B::Device,
        options: &LoadOptions,
    ) -> Result<Self, PipelineError> {
        let started = std::time::Instant::now();
        let dtype = options.dtype.unwrap_or_else(default_float_dtype::<B>);
        let unet_config = preset.unet_config()?;
        let plan = unet_config.resolve()?;
        let t = std::time::Instant::now();
        let unet =
            UNet2DConditionModel::from_plan(&plan, device).with_attention_impl(options.attention);
        let unet = if dtype == default_float_dtype::<B>() {
            unet
        } else {
            unet.map(&mut CastParams(dtype))
        };
        unet.visit(&mut Materialize);
        let unet_s = t.elapsed().as_secs_f64();
        let vae_config = preset.vae_config()?;
        let t = std::time::Instant::now();
        let vae = options.vae.then(|| AutoencoderKL {
            model: AutoencoderKLModule::new(&vae_config, device),
            config: vae_config.clone(),
            memory: VaeMemory::default(),
        });
        if let Some(vae) = &vae {
            vae.model.visit(&mut Materialize);
        }
        let vae_s = vae.as_ref().map(|_| t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        let text = if options.text_encoder {
            let tokenizer = tokenizer.ok_or(PipelineError::MissingPart("tokenizer"))?;
            let encoder = preset
                .text_config()?
                .init::<B>(device)
                .with_attention_impl(options.attention);
            let encoder = if dtype == default_float_dtype::<B>() {
                encoder
            } else {
                encoder.map(&mut CastParams(dtype))
            };
            encoder.visit(&mut Materialize);
            Some(PromptEncoder::new(tokenizer, encoder, device)?)
        } else {
            None
        };
        let text_s = text.as_ref().map(|_| t.elapsed().as_secs_f64());
        let activation_model =
            ActivationModel::from_configs(&plan, &vae_config, options.vae, dtype);
        Ok(Self {
            dir: PathBuf::from(format!("<random {}>", preset.name())),
            unet,
            vae,
            text,
            scheduler_config: preset.scheduler_config()?,
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
}
