//! Original single-file checkpoints: `instruct-pix2pix-00-22000.ckpt` and its `.safetensors`.
//!
//! The original release is one file in the LDM (CompVis) layout: the UNet under
//! `model.diffusion_model.*` (raw) and `model_ema.diffusion_model<name without dots>` (LitEma's
//! copy, with `model_ema.decay`/`num_updates`), the VAE under `first_stage_model.*`, CLIP under
//! `cond_stage_model.transformer.*`, and the DDPM schedule's buffers at the top level. This module
//! tells what the file is from its tensors before loading (8 input channels: InstructPix2Pix;
//! the cross-attention width: SD 1.x), chooses the UNet copy as the original's inference does
//! (EMA when present), and maps LDM names onto ours with one rule set per component, derived
//! from the block structure of the configured model: input/middle/output blocks → down/mid/up
//! blocks, the VAE's up blocks in reverse order, its 1×1-conv attention q/k/v/proj_out read as
//! Linear weights. The loader ([`ip2p_nn::load_mapped`]) then reads each component from the one
//! map of the file, as it reads a folder's files. Every tensor belongs to exactly one
//! component or to the known non-weights; anything else is an error.
//!
//! The file has no configs, tokenizer or scheduler: the built-in SD 1.5 InstructPix2Pix configs
//! ([`crate::preset::Preset::Sd15`]) and CLIP vocabulary apply, or a diffusers folder's
//! (`LoadOptions::config`, like diffusers' `from_single_file(config=…)`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::DType;
use ip2p_nn::{Backend, LoadError, TensorInfo, WeightFile, load_mapped};
use ip2p_sched::SchedulerConfig;
use ip2p_text::{ClipTextConfig, ClipTextModel, ClipTokenizer};
use ip2p_unet::{UNet2DConditionConfig, UNet2DConditionModel, UnetPlan};
use ip2p_vae::{AutoencoderKL, AutoencoderKLModule, VaeConfig, VaeMemory};

use crate::error::PipelineError;
use crate::model::LoadOptions;
use crate::preset::Preset;

/// Which UNet copy of a checkpoint with both to load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UnetWeights {
    /// The EMA copy (`model_ema.*`) when the file has one, as the original's inference
    /// (`ema_scope`) and diffusers' `extract_ema=True` use; the raw copy otherwise.
    #[default]
    Ema,
    /// The raw training weights (`model.diffusion_model.*`).
    Raw,
}

const UNET: &str = "model.diffusion_model.";
const EMA: &str = "model_ema.";
const VAE: &str = "first_stage_model.";
const TEXT: &str = "cond_stage_model.transformer.";
/// Buffers of LDM's `DDPM.register_schedule` and LitEma's counters: not weights.
const NON_WEIGHTS: [&str; 14] = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "model_ema.decay",
    "model_ema.num_updates",
];

/// One of the three models in a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Unet,
    Vae,
    TextEncoder,
}

/// An opened single-file checkpoint: the file, the configs that apply, and the key maps.
pub struct SingleFile {
    pub file: WeightFile,
    /// Whether the UNet comes from the EMA copy.
    pub ema: bool,
    pub unet_config: UNet2DConditionConfig,
    pub plan: UnetPlan,
    pub vae_config: VaeConfig,
    pub text_config: ClipTextConfig,
    pub scheduler_config: SchedulerConfig,
    /// Where the tokenizer comes from: a folder, or the built-in CLIP vocabulary.
    pub tokenizer_dir: Option<PathBuf>,
    /// The JSON of the configs, for writing a diffusers folder.
    pub config_dir: Option<PathBuf>,
    /// Flat EMA key → LDM UNet name (without prefix), when `ema`.
    ema_names: HashMap<String, String>,
}

impl SingleFile {
    /// Open `path`, check what it is, and resolve the configs (built-in SD 1.5 InstructPix2Pix,
    /// or `options.config`'s folder). Nothing is loaded yet.
    pub fn open(path: &Path, options: &LoadOptions) -> Result<Self, PipelineError> {
        let file = WeightFile::open(path)?;
        let (unet_config, vae_config, text_config, scheduler_config) = match &options.config {
            Some(dir) => (
                UNet2DConditionConfig::from_file(dir.join("unet").join("config.json"))?,
                VaeConfig::load(dir.join("vae").join("config.json"))?,
                ClipTextConfig::from_file(dir.join("text_encoder").join("config.json"))?,
                SchedulerConfig::from_file(dir.join("scheduler").join("scheduler_config.json"))?,
            ),
            None => (
                Preset::Sd15.unet_config()?,
                Preset::Sd15.vae_config()?,
                Preset::Sd15.text_config()?,
                Preset::Sd15.scheduler_config()?,
            ),
        };
        let plan = unet_config.resolve()?;
        let tokenizer_dir = options
            .tokenizer
            .clone()
            .or_else(|| options.config.as_ref().map(|d| d.join("tokenizer")));
        let mut single = Self {
            file,
            ema: false,
            unet_config,
            plan,
            vae_config,
            text_config,
            scheduler_config,
            tokenizer_dir,
            config_dir: options.config.clone(),
            ema_names: HashMap::new(),
        };
        single.detect()?;
        single.choose_unet(options.weights)?;
        single.check_keys()?;
        Ok(single)
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    fn not_ip2p(&self, reason: String) -> PipelineError {
        PipelineError::NotInstructPix2Pix {
            path: self.path().to_path_buf(),
            reason,
        }
    }

    /// Tell the model from its tensors: an LDM UNet with noise + image latents in, and the
    /// cross-attention width of the configured text encoder (768: SD 1.x).
    fn detect(&self) -> Result<(), PipelineError> {
        let names = self.file.tensors();
        let has = |prefix: &str| names.iter().any(|t| t.name.starts_with(prefix));
        if has("conditioner.embedders.") {
            return Err(PipelineError::UnsupportedModel {
                path: self.path().to_path_buf(),
                reason: "it is a Stable Diffusion XL checkpoint (`conditioner.embedders.*`); ip2p runs SD 1.x InstructPix2Pix".into(),
            });
        }
        let conv_in = self
            .file
            .get(&format!("{UNET}input_blocks.0.0.weight"))
            .ok_or_else(|| {
                self.not_ip2p(format!(
                    "no `{UNET}input_blocks.0.0.weight`: not an original (LDM-layout) Stable Diffusion checkpoint"
                ))
            })?;
        let channels = conv_in.shape.get(1).copied().unwrap_or(0);
        let latent = self.plan.out_channels;
        if channels != 2 * latent {
            let what = match channels {
                4 => " (a text-to-image Stable Diffusion checkpoint)",
                9 => " (an inpainting checkpoint)",
                _ => "",
            };
            return Err(self.not_ip2p(format!(
                "its UNet takes {channels} input channels{what}; InstructPix2Pix takes noise + image latents = {}",
                2 * latent
            )));
        }
        if has("cond_stage_model.model.") {
            return Err(PipelineError::UnsupportedModel {
                path: self.path().to_path_buf(),
                reason: "its text encoder is OpenCLIP (`cond_stage_model.model.*`, Stable Diffusion 2.x); ip2p runs SD 1.x (CLIP ViT-L/14)".into(),
            });
        }
        if let Some(k) = names
            .iter()
            .find(|t| t.name.starts_with(UNET) && t.name.ends_with(".attn2.to_k.weight"))
        {
            let width = k.shape.get(1).copied().unwrap_or(0);
            let want = self.plan.cross_attention_dim;
            if width != want {
                let what = match width {
                    1024 => " (Stable Diffusion 2.x)",
                    2048 => " (Stable Diffusion XL)",
                    _ => "",
                };
                return Err(PipelineError::UnsupportedModel {
                    path: self.path().to_path_buf(),
                    reason: format!(
                        "its cross-attention width is {width}{what}; the configured model (SD 1.x InstructPix2Pix by default) expects {want}"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Pick the UNet copy: EMA when asked for and present.
    fn choose_unet(&mut self, weights: UnetWeights) -> Result<(), PipelineError> {
        let has_ema = self
            .file
            .tensors()
            .iter()
            .any(|t| t.name.starts_with(EMA) && !NON_WEIGHTS.contains(&t.name.as_str()));
        self.ema = has_ema && weights == UnetWeights::Ema;
        // LitEma names each parameter by its module path without dots.
        self.ema_names = self
            .file
            .tensors()
            .iter()
            .filter_map(|t| t.name.strip_prefix(UNET))
            .map(|rest| {
                (
                    format!("{EMA}diffusion_model{}", rest.replace('.', "")),
                    rest.to_string(),
                )
            })
            .collect();
        Ok(())
    }

    /// The component a tensor belongs to and its LDM name within it; `None` for non-weights
    /// and the UNet copy not chosen.
    fn claim<'a>(&'a self, name: &'a str) -> Result<Option<(Component, &'a str)>, ()> {
        if NON_WEIGHTS.contains(&name) {
            return Ok(None);
        }
        if let Some(rest) = name.strip_prefix(UNET) {
            return Ok((!self.ema).then_some((Component::Unet, rest)));
        }
        if name.starts_with(EMA) {
            if !self.ema {
                return Ok(None);
            }
            return match self.ema_names.get(name) {
                Some(rest) => Ok(Some((Component::Unet, rest.as_str()))),
                None => Err(()),
            };
        }
        if let Some(rest) = name.strip_prefix(VAE) {
            return Ok(Some((Component::Vae, rest)));
        }
        if let Some(rest) = name.strip_prefix(TEXT) {
            return Ok(Some((Component::TextEncoder, rest)));
        }
        Err(())
    }

    /// Every tensor is a weight of one component, a known non-weight, or the UNet copy not
    /// chosen; and every weight's LDM name fits the component's block structure.
    fn check_keys(&self) -> Result<(), PipelineError> {
        let mut unknown = Vec::new();
        for t in self.file.tensors() {
            let name = t.name.as_str();
            // Both UNet copies are checked, whichever is loaded.
            let known = if NON_WEIGHTS.contains(&name) {
                true
            } else if let Some(rest) = name.strip_prefix(UNET) {
                unet_name(rest, &self.plan).is_some()
            } else if name.starts_with(EMA) {
                self.ema_names
                    .get(name)
                    .is_some_and(|rest| unet_name(rest, &self.plan).is_some())
            } else {
                match self.claim(name) {
                    Ok(Some((c, rest))) => self.diffusers_name(c, rest, &t.shape).is_some(),
                    _ => false,
                }
            };
            if !known {
                unknown.push(t.name.clone());
            }
        }
        if unknown.is_empty() {
            return Ok(());
        }
        unknown.sort();
        Err(LoadError::UnexpectedTensors {
            path: self.path().to_path_buf(),
            keys: unknown,
        }
        .into())
    }

    /// Our (diffusers') name of a component's LDM tensor, and the shape to read it as.
    fn diffusers_name(
        &self,
        component: Component,
        rest: &str,
        shape: &[usize],
    ) -> Option<(String, Vec<usize>)> {
        match component {
            Component::Unet => unet_name(rest, &self.plan).map(|n| (n, shape.to_vec())),
            Component::Vae => vae_name(rest, self.vae_config.block_out_channels.len(), shape),
            Component::TextEncoder => Some((rest.to_string(), shape.to_vec())),
        }
    }

    /// The key map of one component for [`ip2p_nn::load_mapped`].
    pub fn key_map(
        &self,
        component: Component,
    ) -> impl Fn(&TensorInfo) -> Option<(String, Vec<usize>)> + '_ {
        move |t: &TensorInfo| match self.claim(&t.name) {
            Ok(Some((c, rest))) if c == component => self.diffusers_name(c, rest, &t.shape),
            _ => None,
        }
    }

    /// The UNet, in `dtype`.
    pub fn load_unet<B: Backend>(
        &self,
        device: &B::Device,
        dtype: DType,
    ) -> Result<UNet2DConditionModel<B>, PipelineError> {
        let model = UNet2DConditionModel::<B>::from_plan(&self.plan, device);
        let spec = ip2p_unet::weight_spec(self.plan.use_linear_projection);
        Ok(load_mapped(
            model,
            &self.file,
            &self.key_map(Component::Unet),
            &spec,
            dtype,
        )?)
    }

    /// The VAE, in `dtype`.
    pub fn load_vae<B: Backend>(
        &self,
        device: &B::Device,
        dtype: DType,
    ) -> Result<AutoencoderKL<B>, PipelineError> {
        let model = AutoencoderKLModule::<B>::new(&self.vae_config, device);
        let model = load_mapped(
            model,
            &self.file,
            &self.key_map(Component::Vae),
            &ip2p_vae::weight_spec(),
            dtype,
        )?;
        Ok(AutoencoderKL {
            model,
            config: self.vae_config.clone(),
            memory: VaeMemory::default(),
        })
    }

    /// The text encoder, in `dtype`.
    pub fn load_text_encoder<B: Backend>(
        &self,
        device: &B::Device,
        dtype: DType,
    ) -> Result<ClipTextModel<B>, PipelineError> {
        let model = self.text_config.init::<B>(device);
        Ok(load_mapped(
            model,
            &self.file,
            &self.key_map(Component::TextEncoder),
            &ip2p_text::weight_spec(),
            dtype,
        )?)
    }

    /// The tokenizer: the given folder's, or CLIP's built-in vocabulary.
    pub fn tokenizer(&self) -> Result<ClipTokenizer, PipelineError> {
        Ok(match &self.tokenizer_dir {
            Some(dir) => ClipTokenizer::from_dir(dir)?,
            None => ClipTokenizer::builtin()?,
        })
    }
}

/// What one LDM input or output block holds, by index.
enum Slot {
    /// A ResNet (`.0`) and, at attention levels, a transformer (`.1`).
    Layer { level: usize, layer: usize },
    /// The level's downsampler (`.0.op`).
    Down { level: usize },
}

/// The LDM UNet's input blocks in order: `conv_in`, then per level its layers and (but the
/// last) a downsampler.
fn input_blocks(plan: &UnetPlan) -> Vec<Option<Slot>> {
    let mut v = vec![None];
    for (level, l) in plan.down.iter().enumerate() {
        v.extend((0..l.layers).map(|layer| Some(Slot::Layer { level, layer })));
        if level + 1 < plan.down.len() {
            v.push(Some(Slot::Down { level }));
        }
    }
    v
}

/// The LDM output block `i`: its up level and layer (the level's last layer also holds the
/// upsampler, at `.1` or, after a transformer, `.2`).
fn output_block(plan: &UnetPlan, mut i: usize) -> Option<(usize, usize)> {
    for (level, l) in plan.up.iter().enumerate() {
        if i < l.layers {
            return Some((level, i));
        }
        i -= l.layers;
    }
    None
}

/// A ResNet's LDM sublayer names → diffusers'.
fn unet_resnet(tail: &str) -> Option<String> {
    const NAMES: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    NAMES
        .iter()
        .find_map(|(ldm, ours)| tail.strip_prefix(ldm).map(|p| format!("{ours}{p}")))
}

/// An LDM UNet name (after `model.diffusion_model.`) → diffusers', for the block structure in
/// `plan`. Transformer internals (`transformer_blocks.N.attn1.to_q`, `norm`, `proj_in`, ...)
/// are named alike in both.
pub fn unet_name(rest: &str, plan: &UnetPlan) -> Option<String> {
    let mut parts = rest.splitn(4, '.');
    let (group, a) = (parts.next()?, parts.next()?);
    let index = |s: &str| s.parse::<usize>().ok();
    match group {
        "time_embed" => {
            let tail = parts.collect::<Vec<_>>().join(".");
            match a {
                "0" => Some(format!("time_embedding.linear_1.{tail}")),
                "2" => Some(format!("time_embedding.linear_2.{tail}")),
                _ => None,
            }
        }
        "out" => {
            let tail = parts.collect::<Vec<_>>().join(".");
            match a {
                "0" => Some(format!("conv_norm_out.{tail}")),
                "2" => Some(format!("conv_out.{tail}")),
                _ => None,
            }
        }
        "input_blocks" => {
            let (b, tail) = (parts.next()?, parts.next()?);
            match (input_blocks(plan).get(index(a)?)?, b) {
                (None, "0") => Some(format!("conv_in.{tail}")),
                (Some(Slot::Down { level }), "0") => tail
                    .strip_prefix("op.")
                    .map(|p| format!("down_blocks.{level}.downsamplers.0.conv.{p}")),
                (Some(Slot::Layer { level, layer }), "0") => Some(format!(
                    "down_blocks.{level}.resnets.{layer}.{}",
                    unet_resnet(tail)?
                )),
                (Some(Slot::Layer { level, layer }), "1") if plan.down[*level].cross_attention => {
                    Some(format!("down_blocks.{level}.attentions.{layer}.{tail}"))
                }
                _ => None,
            }
        }
        "middle_block" => {
            let tail = parts.collect::<Vec<_>>().join(".");
            match a {
                "0" => Some(format!("mid_block.resnets.0.{}", unet_resnet(&tail)?)),
                "1" => Some(format!("mid_block.attentions.0.{tail}")),
                "2" => Some(format!("mid_block.resnets.1.{}", unet_resnet(&tail)?)),
                _ => None,
            }
        }
        "output_blocks" => {
            let (b, tail) = (parts.next()?, parts.next()?);
            let (level, layer) = output_block(plan, index(a)?)?;
            let up = &plan.up[level];
            let last = layer + 1 == up.layers && level + 1 < plan.up.len();
            let upsampler = if up.cross_attention { "2" } else { "1" };
            match b {
                "0" => Some(format!(
                    "up_blocks.{level}.resnets.{layer}.{}",
                    unet_resnet(tail)?
                )),
                _ if last && b == upsampler && tail.starts_with("conv.") => {
                    Some(format!("up_blocks.{level}.upsamplers.0.{tail}"))
                }
                "1" if up.cross_attention => {
                    Some(format!("up_blocks.{level}.attentions.{layer}.{tail}"))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// An LDM VAE name (after `first_stage_model.`) → diffusers', and the shape to read it as
/// (the mid-block attention's 1×1 conv weights as Linear `[out, in]`). `levels`: the number
/// of encoder/decoder levels (the decoder's `up.i` is diffusers' `up_blocks[levels-1-i]`).
pub fn vae_name(rest: &str, levels: usize, shape: &[usize]) -> Option<(String, Vec<usize>)> {
    let same = |n: String| Some((n, shape.to_vec()));
    if ["quant_conv.", "post_quant_conv."]
        .iter()
        .any(|p| rest.starts_with(p))
    {
        return same(rest.to_string());
    }
    let (side, rest) = rest.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let resnet = |tail: &str| -> Option<String> {
        let (layer, p) = tail.split_once('.')?;
        let layer = match layer {
            "norm1" | "conv1" | "norm2" | "conv2" => layer,
            "nin_shortcut" => "conv_shortcut",
            _ => return None,
        };
        Some(format!("{layer}.{p}"))
    };
    let parts: Vec<&str> = rest.splitn(4, '.').collect();
    match parts.as_slice() {
        ["conv_in" | "conv_out", ..] => same(format!("{side}.{rest}")),
        ["norm_out", tail @ ..] => same(format!("{side}.conv_norm_out.{}", tail.join("."))),
        ["mid", block, tail @ ..] => {
            let tail = tail.join(".");
            match *block {
                "block_1" => same(format!("{side}.mid_block.resnets.0.{}", resnet(&tail)?)),
                "block_2" => same(format!("{side}.mid_block.resnets.1.{}", resnet(&tail)?)),
                "attn_1" => {
                    let (layer, p) = tail.split_once('.')?;
                    let layer = match layer {
                        "norm" => "group_norm",
                        "q" => "to_q",
                        "k" => "to_k",
                        "v" => "to_v",
                        "proj_out" => "to_out.0",
                        _ => return None,
                    };
                    let shape = match (layer, p, shape) {
                        ("group_norm", _, s) | (_, "bias", s) => s.to_vec(),
                        (_, "weight", [o, i, rest @ ..]) if rest.iter().all(|&d| d == 1) => {
                            vec![*o, *i]
                        }
                        _ => return None,
                    };
                    Some((format!("{side}.mid_block.attentions.0.{layer}.{p}"), shape))
                }
                _ => None,
            }
        }
        [dir @ ("down" | "up"), i, kind, tail] => {
            let i: usize = i.parse().ok()?;
            if i >= levels {
                return None;
            }
            let (blocks, level) = match (side == "encoder", *dir) {
                (true, "down") => ("down_blocks", i),
                (false, "up") => ("up_blocks", levels - 1 - i),
                _ => return None,
            };
            match *kind {
                "block" => {
                    let (j, t) = tail.split_once('.')?;
                    let j: usize = j.parse().ok()?;
                    same(format!(
                        "{side}.{blocks}.{level}.resnets.{j}.{}",
                        resnet(t)?
                    ))
                }
                "downsample" | "upsample" if kind.starts_with(dir) => {
                    tail.strip_prefix("conv.").and_then(|p| {
                        same(format!("{side}.{blocks}.{level}.{dir}samplers.0.conv.{p}"))
                    })
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// The components' tensors as (index in the file, diffusers name), for writing a folder.
impl SingleFile {
    pub fn component_tensors(&self, component: Component) -> Vec<(usize, String, Vec<usize>)> {
        let map = self.key_map(component);
        self.file
            .tensors()
            .iter()
            .enumerate()
            .filter_map(|(i, t)| map(t).map(|(n, s)| (i, n, s)))
            .collect()
    }
}

/// `model_index.json` of a converted folder.
const MODEL_INDEX: &str = r#"{
  "_class_name": "StableDiffusionInstructPix2PixPipeline",
  "feature_extractor": [null, null],
  "image_encoder": [null, null],
  "requires_safety_checker": false,
  "safety_checker": [null, null],
  "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"],
  "tokenizer": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}
"#;

/// The built-in tokenizer's settings as transformers writes them (SD 1.5's `tokenizer/`).
const TOKENIZER_CONFIG: &str = r#"{
  "bos_token": "<|startoftext|>",
  "eos_token": "<|endoftext|>",
  "pad_token": "<|endoftext|>",
  "unk_token": "<|endoftext|>",
  "model_max_length": 77,
  "tokenizer_class": "CLIPTokenizer"
}
"#;

impl SingleFile {
    /// Write this checkpoint as a diffusers folder (`model_index.json`, `unet/`, `vae/`,
    /// `text_encoder/`, `tokenizer/`, `scheduler/`) that diffusers' `from_pretrained` and
    /// [`crate::Ip2pModel::load`] read. Each component is first loaded into its module on
    /// `device` (strict: every tensor placed, every shape checked), then its tensors are
    /// written under diffusers' names with the file's values and dtype, bit for bit (the
    /// VAE's 1×1-conv attention weights as Linear `[out, in]`).
    pub fn write_diffusers<B: Backend>(
        &self,
        out: &Path,
        device: &B::Device,
    ) -> Result<(), PipelineError> {
        drop(self.load_unet::<B>(device, DType::F32)?);
        drop(self.load_vae::<B>(device, DType::F32)?);
        drop(self.load_text_encoder::<B>(device, DType::F32)?);

        let io = |path: &Path, e: std::io::Error| {
            PipelineError::Load(LoadError::Io {
                path: path.to_path_buf(),
                source: e,
            })
        };
        let write = |rel: &str, text: &str| -> Result<(), PipelineError> {
            let path = out.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
            }
            std::fs::write(&path, text).map_err(|e| io(&path, e))
        };
        let from_config = |rel: &str, builtin: String| -> Result<String, PipelineError> {
            match &self.config_dir {
                Some(dir) => {
                    let path = dir.join(rel);
                    std::fs::read_to_string(&path).map_err(|e| io(&path, e))
                }
                None => Ok(builtin),
            }
        };
        let (unet, vae, _) = Preset::Sd15.configs();
        write(
            "model_index.json",
            &from_config("model_index.json", MODEL_INDEX.into())?,
        )?;
        write(
            "unet/config.json",
            &from_config("unet/config.json", unet.into())?,
        )?;
        write(
            "vae/config.json",
            &from_config("vae/config.json", vae.into())?,
        )?;
        let mut text = serde_json::to_value(&self.text_config)
            .map_err(|e| PipelineError::Input(e.to_string()))?;
        text["architectures"] = serde_json::json!(["CLIPTextModel"]);
        text["model_type"] = serde_json::json!("clip_text_model");
        let text =
            serde_json::to_string_pretty(&text).map_err(|e| PipelineError::Input(e.to_string()))?;
        write(
            "text_encoder/config.json",
            &from_config("text_encoder/config.json", text)?,
        )?;
        write(
            "scheduler/scheduler_config.json",
            &from_config(
                "scheduler/scheduler_config.json",
                crate::preset::IP2P_SCHEDULER_CONFIG.into(),
            )?,
        )?;
        match &self.tokenizer_dir {
            Some(dir) => {
                let entries = std::fs::read_dir(dir).map_err(|e| io(dir, e))?;
                for entry in entries {
                    let entry = entry.map_err(|e| io(dir, e))?;
                    if entry.path().is_file() {
                        let to = out.join("tokenizer").join(entry.file_name());
                        std::fs::create_dir_all(out.join("tokenizer")).map_err(|e| io(&to, e))?;
                        std::fs::copy(entry.path(), &to).map_err(|e| io(&to, e))?;
                    }
                }
            }
            None => {
                write("tokenizer/vocab.json", ip2p_text::tokenizer::BUILTIN_VOCAB)?;
                write("tokenizer/merges.txt", ip2p_text::tokenizer::BUILTIN_MERGES)?;
                write("tokenizer/tokenizer_config.json", TOKENIZER_CONFIG)?;
            }
        }

        for (component, rel) in [
            (Component::Unet, "unet/diffusion_pytorch_model.safetensors"),
            (Component::Vae, "vae/diffusion_pytorch_model.safetensors"),
            (Component::TextEncoder, "text_encoder/model.safetensors"),
        ] {
            let path = out.join(rel);
            let mut tensors = Vec::new();
            for (i, name, shape) in self.component_tensors(component) {
                if name.ends_with("position_ids") {
                    continue; // a buffer, not a weight
                }
                // transformers 5 writes the text encoder without `text_model.`.
                let name = match component {
                    Component::TextEncoder => name
                        .strip_prefix("text_model.")
                        .unwrap_or(&name)
                        .to_string(),
                    _ => name,
                };
                tensors.push((
                    name,
                    shape,
                    self.file.tensors()[i].dtype,
                    self.file.bytes(i)?,
                ));
            }
            let views = tensors
                .iter()
                .map(|(name, shape, dtype, bytes)| {
                    safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                        .map(|v| (name.clone(), v))
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| PipelineError::Input(format!("{}: {e}", path.display())))?;
            let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
            safetensors::serialize_to_file(views, metadata, &path)
                .map_err(|e| PipelineError::Input(format!("writing {}: {e}", path.display())))?;
        }
        Ok(())
    }
}
