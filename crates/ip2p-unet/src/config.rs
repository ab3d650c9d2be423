//! diffusers' `unet/config.json` for `UNet2DConditionModel`, checked and resolved per block.

use std::path::Path;

use ip2p_nn::PerBlock;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::UnetError;

/// Largest block, layer or head count a config may hold.
const MAX_COUNT: usize = 1024;
/// Largest channel width, head count or head size a config may hold.
const MAX_WIDTH: usize = 1 << 20;

/// The real InstructPix2Pix UNet config (timbrooks/instruct-pix2pix `unet/config.json`): SD 1.5's
/// v1 UNet with 8 input channels (the noisy latents and the encoded input image).
pub const SD15_IP2P_CONFIG: &str = include_str!("sd15_ip2p_unet_config.json");

/// `UNet2DConditionModel`'s config as diffusers writes it.
///
/// The fields that define the architecture are required; the rest take diffusers' defaults.
/// Unknown keys (`_class_name`, ...) are ignored. Features ip2p does not implement are read so
/// that [`UNet2DConditionConfig::resolve`] can reject them with a typed error instead of
/// silently building a different model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UNet2DConditionConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub layers_per_block: PerBlock<usize>,
    pub cross_attention_dim: PerBlock<usize>,
    /// With `num_attention_heads` null this is, despite its name, the number of heads (diffusers'
    /// legacy naming); otherwise unused by the blocks ip2p supports.
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default = "d_mid_type")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_one")]
    pub downsample_padding: usize,
    #[serde(default = "d_onef")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_kernel")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_kernel")]
    pub conv_out_kernel: usize,
    #[serde(default = "d_tlayers")]
    pub transformer_layers_per_block: PerBlock<usize>,
    /// Only changes f16 numerics (scores in f32); ip2p computes softmax in f32 always.
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub sample_size: Option<Value>,

    // Read only to be rejected when set.
    #[serde(default)]
    pub only_cross_attention: Option<Value>,
    #[serde(default)]
    pub dual_cross_attention: Option<Value>,
    #[serde(default)]
    pub class_embed_type: Option<Value>,
    #[serde(default)]
    pub num_class_embeds: Option<Value>,
    #[serde(default)]
    pub addition_embed_type: Option<Value>,
    #[serde(default)]
    pub encoder_hid_dim: Option<Value>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<Value>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<Value>,
    #[serde(default)]
    pub time_embedding_dim: Option<Value>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<Value>,
    #[serde(default)]
    pub timestep_post_act: Option<Value>,
    #[serde(default)]
    pub time_embedding_type: Option<Value>,
    #[serde(default)]
    pub resnet_time_scale_shift: Option<Value>,
    #[serde(default)]
    pub attention_type: Option<Value>,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<Value>,
    #[serde(default)]
    pub cross_attention_norm: Option<Value>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Value>,
    #[serde(default)]
    pub resnet_skip_time_act: Option<Value>,
    #[serde(default)]
    pub class_embeddings_concat: Option<Value>,
}

fn d_head_dim() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn d_mid_type() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_groups() -> Option<usize> {
    Some(32)
}
fn d_eps() -> f64 {
    1e-5
}
fn d_true() -> bool {
    true
}
fn d_silu() -> String {
    "silu".into()
}
fn d_one() -> usize {
    1
}
fn d_onef() -> f64 {
    1.0
}
fn d_kernel() -> usize {
    3
}
fn d_tlayers() -> PerBlock<usize> {
    PerBlock::One(1)
}

/// One level of the UNet, as the model is built.
#[derive(Debug, Clone, PartialEq)]
pub struct LevelPlan {
    /// A `CrossAttn*Block2D` (else a plain `DownBlock2D`/`UpBlock2D`).
    pub cross_attention: bool,
    /// ResNets in the block (`layers_per_block`, one more in up blocks).
    pub layers: usize,
    /// Attention heads in this block's transformers (head dim = channels / heads).
    pub heads: usize,
    /// `BasicTransformerBlock`s per `Transformer2DModel`.
    pub transformer_layers: usize,
}

/// The config checked and expanded per block.
#[derive(Debug, Clone, PartialEq)]
pub struct UnetPlan {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down: Vec<LevelPlan>,
    /// In the order the up blocks run (deepest first).
    pub up: Vec<LevelPlan>,
    pub mid_heads: usize,
    pub mid_transformer_layers: usize,
    pub cross_attention_dim: usize,
    pub groups: usize,
    pub eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub use_linear_projection: bool,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub center_input_sample: bool,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
}

impl UnetPlan {
    /// Width of the time embedding (and of every ResNet's `time_emb_proj` input).
    pub fn time_embed_dim(&self) -> usize {
        4 * self.block_out_channels[0]
    }
}

/// A field that must be null or pass the check: (name, value, accepted, what is supported).
type Check<'a> = (
    &'static str,
    &'a Option<Value>,
    &'a dyn Fn(&Value) -> bool,
    &'static str,
);

/// `Some(v)` where `v` is neither null nor `allowed`'s accepted value.
fn set(v: &Option<Value>, allowed: &dyn Fn(&Value) -> bool) -> Option<String> {
    match v {
        None | Some(Value::Null) => None,
        Some(v) if allowed(v) => None,
        Some(v) => Some(v.to_string()),
    }
}

impl UNet2DConditionConfig {
    /// Read `unet/config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, UnetError> {
        Ok(ip2p_nn::read_config(path)?)
    }

    /// Parse a config from JSON text.
    pub fn from_json(text: &str) -> Result<Self, UnetError> {
        serde_json::from_str(text).map_err(|e| UnetError::InvalidConfig(e.to_string()))
    }

    /// The real InstructPix2Pix (SD 1.5) UNet config, [`SD15_IP2P_CONFIG`].
    pub fn sd15_ip2p() -> Self {
        // The constant is part of this crate and covered by a test; it always parses.
        Self::from_json(SD15_IP2P_CONFIG).unwrap_or_else(|e| unreachable!("built-in config: {e}"))
    }

    /// Check the config and expand per-block values; unsupported features are typed errors.
    pub fn resolve(&self) -> Result<UnetPlan, UnetError> {
        self.reject_unsupported()?;
        let n = self.block_out_channels.len();
        let invalid = UnetError::InvalidConfig;
        if n == 0 {
            return Err(invalid("`block_out_channels` is empty".into()));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(invalid(format!(
                "`block_out_channels` has {n} entries but `down_block_types` has {} and `up_block_types` {}",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        let cross_dims = self
            .cross_attention_dim
            .expand(n, "cross_attention_dim")
            .map_err(invalid)?;
        let cross_attention_dim = cross_dims[0];
        if cross_dims.iter().any(|&d| d != cross_attention_dim) {
            return Err(UnetError::Unsupported {
                field: "cross_attention_dim",
                value: format!("{cross_dims:?}"),
                supported: "one width for all blocks",
            });
        }
        let layers = self
            .layers_per_block
            .expand(n, "layers_per_block")
            .map_err(invalid)?;
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`.
        let heads = match &self.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads"),
            None => self.attention_head_dim.expand(n, "attention_head_dim"),
        }
        .map_err(invalid)?;
        let tlayers = self
            .transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")
            .map_err(invalid)?;
        let groups = self.norm_num_groups.ok_or(UnetError::Unsupported {
            field: "norm_num_groups",
            value: "null".into(),
            supported: "a number of groups",
        })?;
        // Counts far beyond any real model are refused here, so no later arithmetic on them
        // can overflow and no layer list can grow without bound.
        for (field, values, max) in [
            ("layers_per_block", &layers, MAX_COUNT),
            ("num_attention_heads", &heads, MAX_WIDTH),
            ("transformer_layers_per_block", &tlayers, MAX_COUNT),
            ("block_out_channels", &self.block_out_channels, MAX_WIDTH),
            ("cross_attention_dim", &cross_dims, MAX_WIDTH),
        ] {
            if let Some(v) = values.iter().find(|&&v| v > max) {
                return Err(invalid(format!("`{field}` holds {v}, above {max}")));
            }
        }
        if n > MAX_COUNT || groups == 0 || groups > MAX_WIDTH {
            return Err(invalid(format!(
                "{n} blocks and {groups} norm groups: at most {MAX_COUNT} blocks, 1 to {MAX_WIDTH} groups"
            )));
        }

        let kind = |t: &str, plain: &str, cross: &str, field: &'static str| {
            if t == cross {
                Ok(true)
            } else if t == plain {
                Ok(false)
            } else {
                Err(UnetError::Unsupported {
                    field,
                    value: format!("\"{t}\""),
                    supported: "CrossAttnDownBlock2D, DownBlock2D, CrossAttnUpBlock2D, UpBlock2D",
                })
            }
        };
        let mut down = Vec::with_capacity(n);
        for (i, t) in self.down_block_types.iter().enumerate() {
            let t = t.strip_prefix("UNetRes").unwrap_or(t);
            down.push(LevelPlan {
                cross_attention: kind(
                    t,
                    "DownBlock2D",
                    "CrossAttnDownBlock2D",
                    "down_block_types",
                )?,
                layers: layers[i],
                heads: heads[i],
                transformer_layers: tlayers[i],
            });
        }
        let mut up = Vec::with_capacity(n);
        for (i, t) in self.up_block_types.iter().enumerate() {
            let t = t.strip_prefix("UNetRes").unwrap_or(t);
            let r = n - 1 - i;
            up.push(LevelPlan {
                cross_attention: kind(t, "UpBlock2D", "CrossAttnUpBlock2D", "up_block_types")?,
                layers: layers[r] + 1,
                heads: heads[r],
                transformer_layers: tlayers[r],
            });
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => {
                return Err(UnetError::Unsupported {
                    field: "mid_block_type",
                    value: format!("{other:?}"),
                    supported: "UNetMidBlock2DCrossAttn",
                });
            }
        }

        // Channel arithmetic that would otherwise fail deep inside a layer.
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c == 0 || c % groups != 0 {
                return Err(invalid(format!(
                    "block_out_channels[{i}] = {c} is not a positive multiple of norm_num_groups = {groups}"
                )));
            }
            let attends = down[i].cross_attention || up[n - 1 - i].cross_attention || i == n - 1;
            if attends && (heads[i] == 0 || c % heads[i] != 0) {
                return Err(invalid(format!(
                    "block {i}: {c} channels do not split into {} attention heads",
                    heads[i]
                )));
            }
        }
        let zero = |v: &[usize]| v.contains(&0);
        if zero(&layers)
            || zero(&tlayers)
            || self.in_channels == 0
            || self.out_channels == 0
            || cross_attention_dim == 0
        {
            return Err(invalid(
                "a layer count, channel count or cross_attention_dim is 0".into(),
            ));
        }
        for (name, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if k % 2 == 0 {
                return Err(UnetError::Unsupported {
                    field: if name == "conv_in_kernel" {
                        "conv_in_kernel"
                    } else {
                        "conv_out_kernel"
                    },
                    value: k.to_string(),
                    supported: "odd kernel sizes",
                });
            }
        }
        if self.norm_eps.is_nan() || self.norm_eps <= 0.0 {
            return Err(invalid(format!(
                "norm_eps = {} must be positive",
                self.norm_eps
            )));
        }

        Ok(UnetPlan {
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            block_out_channels: self.block_out_channels.clone(),
            down,
            up,
            mid_heads: heads[n - 1],
            mid_transformer_layers: tlayers[n - 1],
            cross_attention_dim,
            groups,
            eps: self.norm_eps,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            use_linear_projection: self.use_linear_projection,
            downsample_padding: self.downsample_padding,
            mid_block_scale_factor: self.mid_block_scale_factor,
            center_input_sample: self.center_input_sample,
            conv_in_kernel: self.conv_in_kernel,
            conv_out_kernel: self.conv_out_kernel,
        })
    }

    fn reject_unsupported(&self) -> Result<(), UnetError> {
        let is_false = |v: &Value| v == &Value::Bool(false);
        let all_false = |v: &Value| match v {
            Value::Bool(false) => true,
            Value::Array(a) => a.iter().all(|x| x == &Value::Bool(false)),
            _ => false,
        };
        let is_str = |s: &'static str| move |v: &Value| v.as_str() == Some(s);
        let none = |_: &Value| false;
        let checks: [Check; 19] = [
            (
                "only_cross_attention",
                &self.only_cross_attention,
                &all_false,
                "false",
            ),
            (
                "dual_cross_attention",
                &self.dual_cross_attention,
                &is_false,
                "false",
            ),
            ("class_embed_type", &self.class_embed_type, &none, "null"),
            ("num_class_embeds", &self.num_class_embeds, &none, "null"),
            (
                "addition_embed_type",
                &self.addition_embed_type,
                &none,
                "null",
            ),
            ("encoder_hid_dim", &self.encoder_hid_dim, &none, "null"),
            (
                "encoder_hid_dim_type",
                &self.encoder_hid_dim_type,
                &none,
                "null",
            ),
            (
                "time_cond_proj_dim",
                &self.time_cond_proj_dim,
                &none,
                "null",
            ),
            (
                "time_embedding_dim",
                &self.time_embedding_dim,
                &none,
                "null (4 × block_out_channels[0])",
            ),
            (
                "time_embedding_act_fn",
                &self.time_embedding_act_fn,
                &none,
                "null",
            ),
            ("timestep_post_act", &self.timestep_post_act, &none, "null"),
            (
                "time_embedding_type",
                &self.time_embedding_type,
                &is_str("positional"),
                "\"positional\"",
            ),
            (
                "resnet_time_scale_shift",
                &self.resnet_time_scale_shift,
                &is_str("default"),
                "\"default\"",
            ),
            (
                "attention_type",
                &self.attention_type,
                &is_str("default"),
                "\"default\"",
            ),
            (
                "mid_block_only_cross_attention",
                &self.mid_block_only_cross_attention,
                &is_false,
                "null or false",
            ),
            (
                "cross_attention_norm",
                &self.cross_attention_norm,
                &none,
                "null",
            ),
            (
                "reverse_transformer_layers_per_block",
                &self.reverse_transformer_layers_per_block,
                &none,
                "null",
            ),
            (
                "resnet_skip_time_act",
                &self.resnet_skip_time_act,
                &is_false,
                "false",
            ),
            (
                "class_embeddings_concat",
                &self.class_embeddings_concat,
                &is_false,
                "false",
            ),
        ];
        for (field, value, ok, supported) in checks {
            if let Some(value) = set(value, ok) {
                return Err(UnetError::Unsupported {
                    field,
                    value,
                    supported,
                });
            }
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            return Err(UnetError::Unsupported {
                field: "act_fn",
                value: format!("\"{}\"", self.act_fn),
                supported: "\"silu\"",
            });
        }
        Ok(())
    }
}
