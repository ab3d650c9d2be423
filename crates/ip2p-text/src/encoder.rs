//! CLIP's text transformer (transformers' `CLIPTextModel`), output `last_hidden_state`.
//!
//! Module fields mirror the weight keys of a diffusers `text_encoder/model.safetensors`
//! (`text_model.embeddings.token_embedding.weight`, `text_model.encoder.layers.0.self_attn.q_proj.weight`,
//! …). Files written by transformers 5, which drops the `text_model.` prefix, load too; the
//! `position_ids` buffer some files carry is ignored.
//!
//! Attention is causal and, as in Stable Diffusion's use of CLIP (`use_attention_mask` unset),
//! no padding mask is applied: pad tokens after the prompt do not change the prompt's tokens'
//! states, and their own states are part of the conditioning.

use std::path::Path;

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::{gelu, gelu_approximate, relu, sigmoid};
use burn::tensor::{Int, Tensor, TensorData};
use ip2p_nn::Backend;
use ip2p_nn::norm::layer_norm;
use ip2p_nn::{
    AttentionImpl, LoadError, Precision, WeightSpec, default_float_dtype, load_safetensors,
    read_config, weights_file,
};
use serde::Deserialize;

use crate::{TextError, check_ids};

/// The activation between `fc1` and `fc2` (`hidden_act` in config.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// `x · sigmoid(1.702 x)`: OpenAI's CLIP (SD 1.x).
    QuickGelu,
    /// Exact (erf) GELU: OpenCLIP models (SD 2.x).
    Gelu,
    /// tanh-approximated GELU.
    #[serde(alias = "gelu_pytorch_tanh")]
    GeluNew,
    Relu,
}

impl HiddenAct {
    fn apply<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            HiddenAct::QuickGelu => x.clone() * sigmoid(x.mul_scalar(1.702)),
            HiddenAct::Gelu => gelu(x),
            HiddenAct::GeluNew => gelu_approximate(x),
            HiddenAct::Relu => relu(x),
        }
    }
}

fn quick_gelu() -> HiddenAct {
    HiddenAct::QuickGelu
}
fn default_eps() -> f64 {
    1e-5
}

/// The fields of transformers' `CLIPTextConfig` that shape the model.
///
/// The sizes are required (a diffusers folder always has them; a missing one is an error
/// naming the file and field, not a silently wrong model); `hidden_act` defaults to
/// `quick_gelu` and `layer_norm_eps` to 1e-5, as in transformers. Other keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: HiddenAct,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

impl ClipTextConfig {
    /// Read and check `text_encoder/config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TextError> {
        let path = path.as_ref();
        let config: Self = read_config(path)?;
        config.validate().map_err(|reason| LoadError::Config {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(config)
    }

    /// Sizes the model can be built from.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(format!("`{name}` must be positive"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "`hidden_size` {} is not a multiple of `num_attention_heads` {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return Err(format!(
                "`layer_norm_eps` must be positive, got {}",
                self.layer_norm_eps
            ));
        }
        Ok(())
    }

    /// A model with freshly initialised weights (load real ones with [`ClipTextModel::load`]).
    pub fn init<B: Backend>(&self, device: &B::Device) -> ClipTextModel<B> {
        let h = self.hidden_size;
        let ln = || {
            LayerNormConfig::new(h)
                .with_epsilon(self.layer_norm_eps)
                .init(device)
        };
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        let layers = (0..self.num_hidden_layers)
            .map(|_| ClipEncoderLayer {
                self_attn: ClipAttention {
                    q_proj: lin(h, h),
                    k_proj: lin(h, h),
                    v_proj: lin(h, h),
                    out_proj: lin(h, h),
                    heads: self.num_attention_heads,
                    attention_impl: AttentionImpl::default(),
                },
                layer_norm1: ln(),
                mlp: ClipMlp {
                    fc1: lin(h, self.intermediate_size),
                    fc2: lin(self.intermediate_size, h),
                    act: self.hidden_act,
                },
                layer_norm2: ln(),
            })
            .collect();
        ClipTextModel {
            text_model: ClipTextTransformer {
                embeddings: ClipTextEmbeddings {
                    token_embedding: EmbeddingConfig::new(self.vocab_size, h).init(device),
                    position_embedding: EmbeddingConfig::new(self.max_position_embeddings, h)
                        .init(device),
                },
                encoder: ClipEncoder { layers },
                final_layer_norm: ln(),
            },
            config: self.clone(),
        }
    }
}

/// transformers' `CLIPTextModel`: token ids `[batch, tokens]` → `last_hidden_state`
/// `[batch, tokens, hidden_size]`.
#[derive(Module, Debug)]
pub struct ClipTextModel<B: Backend> {
    pub text_model: ClipTextTransformer<B>,
    pub config: ClipTextConfig,
}

#[derive(Module, Debug)]
pub struct ClipTextTransformer<B: Backend> {
    pub embeddings: ClipTextEmbeddings<B>,
    pub encoder: ClipEncoder<B>,
    pub final_layer_norm: LayerNorm<B>,
}

#[derive(Module, Debug)]
pub struct ClipTextEmbeddings<B: Backend> {
    pub token_embedding: Embedding<B>,
    pub position_embedding: Embedding<B>,
}

#[derive(Module, Debug)]
pub struct ClipEncoder<B: Backend> {
    pub layers: Vec<ClipEncoderLayer<B>>,
}

/// Pre-norm transformer layer: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Module, Debug)]
pub struct ClipEncoderLayer<B: Backend> {
    pub self_attn: ClipAttention<B>,
    pub layer_norm1: LayerNorm<B>,
    pub mlp: ClipMlp<B>,
    pub layer_norm2: LayerNorm<B>,
}

/// Causal multi-head self-attention with biased projections.
#[derive(Module, Debug)]
pub struct ClipAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub out_proj: Linear<B>,
    pub heads: usize,
    pub attention_impl: AttentionImpl,
}

#[derive(Module, Debug)]
pub struct ClipMlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    pub act: HiddenAct,
}

impl<B: Backend> ClipAttention<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let q = B::fused_linear(&self.q_proj, x.clone(), None);
        let k = B::fused_linear(&self.k_proj, x.clone(), None);
        let v = B::fused_linear(&self.v_proj, x, None);
        let out = B::fused_attention(q, k, v, self.heads, true, self.attention_impl);
        B::fused_linear(&self.out_proj, out, None)
    }
}

impl<B: Backend> ClipEncoderLayer<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = x.clone() + self.self_attn.forward(layer_norm(&self.layer_norm1, x));
        let h = B::fused_linear(
            &self.mlp.fc1,
            layer_norm(&self.layer_norm2, x.clone()),
            None,
        );
        x + B::fused_linear(&self.mlp.fc2, self.mlp.act.apply(h), None)
    }
}

/// How the weight files' keys map onto [`ClipTextModel`]: transformers 5 writes them without
/// the `text_model.` prefix; `position_ids` is a buffer, not a weight.
pub fn weight_spec() -> WeightSpec {
    WeightSpec::new()
        .remap(
            r"^(embeddings|encoder|final_layer_norm)\.",
            "text_model.$1.",
        )
        .ignore(r"(^|\.)position_ids$")
}

impl<B: Backend> ClipTextModel<B> {
    /// Load a diffusers `text_encoder/` folder (config.json and `model[.variant].safetensors`)
    /// in the backend's default float dtype.
    pub fn load(
        dir: impl AsRef<Path>,
        variant: Option<&str>,
        device: &B::Device,
    ) -> Result<Self, TextError> {
        Self::load_as(dir, variant, default_float_dtype::<B>(), device)
    }

    /// [`Self::load`] with the weights cast to `dtype` (F32, F16, BF16), or f16 weights kept
    /// as stored ([`Precision`]).
    pub fn load_as(
        dir: impl AsRef<Path>,
        variant: Option<&str>,
        dtype: impl Into<Precision>,
        device: &B::Device,
    ) -> Result<Self, TextError> {
        let dir = dir.as_ref();
        let config = ClipTextConfig::from_file(dir.join("config.json"))?;
        let file = weights_file(dir, "model", variant)?;
        let model = config.init::<B>(device);
        Ok(load_safetensors(model, file, &weight_spec(), dtype)?)
    }

    /// Use another attention kernel (all give the same numbers).
    pub fn with_attention_impl(mut self, imp: AttentionImpl) -> Self {
        for layer in &mut self.text_model.encoder.layers {
            layer.self_attn.attention_impl = imp;
        }
        self
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// `last_hidden_state` for ids `[batch, tokens]`, `tokens ≤ max_position_embeddings`.
    ///
    /// The ids are not checked: an id outside the vocabulary is backend-defined behaviour.
    /// Use [`Self::forward_ids`] for ids from outside the program.
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [_, l] = ids.dims();
        let device = ids.device();
        let emb = &self.text_model.embeddings;
        let positions = Tensor::<B, 1, Int>::arange(0..l as i64, &device).reshape([1, l]);
        let mut x = emb.token_embedding.forward(ids) + emb.position_embedding.forward(positions);
        for layer in &self.text_model.encoder.layers {
            x = layer.forward(x);
        }
        layer_norm(&self.text_model.final_layer_norm, x)
    }

    /// `last_hidden_state` for rows of ids a dataset holds: every row must be equally long,
    /// at most `max_position_embeddings`, with every id in the vocabulary.
    pub fn forward_ids(
        &self,
        rows: &[Vec<i64>],
        device: &B::Device,
    ) -> Result<Tensor<B, 3>, TextError> {
        let first = rows.first().ok_or(TextError::EmptyBatch)?.len();
        let max = self.config.max_position_embeddings;
        if first == 0 || first > max {
            return Err(TextError::WrongLength {
                row: 0,
                len: first,
                expected: first.clamp(1, max),
            });
        }
        let checked = check_ids(rows, self.config.vocab_size, first)?;
        Ok(self.forward(ids_tensor(&checked, device)))
    }
}

/// Rows of equally long ids as an `[rows, len]` int tensor.
pub(crate) fn ids_tensor<B: Backend>(rows: &[Vec<u32>], device: &B::Device) -> Tensor<B, 2, Int> {
    let len = rows.first().map_or(0, Vec::len);
    let flat: Vec<i64> = rows.iter().flatten().map(|&id| id as i64).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), len]), device)
}
