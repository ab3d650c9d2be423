//! Multi-head attention as diffusers' `Attention` (with `AttnProcessor2_0`), and the
//! scaled-dot-product kernel choices it runs on.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{GroupNorm, GroupNormConfig, Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Int, Tensor};

use crate::Backend;

/// How scaled-dot-product attention is computed. All choices give the same numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum AttentionImpl {
    /// Burn's fused attention op: flash-style tiling where the backend has it, so the
    /// `[batch·heads, tokens, tokens]` score matrix is never held whole.
    #[default]
    Fused,
    /// Queries in chunks of this many tokens; holds `[batch·heads, chunk, tokens]` scores.
    Chunked(usize),
    /// The whole score matrix at once; the reference the others are tested against.
    Naive,
}

/// `softmax(q·kᵀ·scale)·v` on `[batch, heads, tokens, head_dim]`, with softmax in f32.
pub fn scaled_dot_product<B: burn::tensor::backend::Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    causal: bool,
    imp: AttentionImpl,
) -> Tensor<B, 4> {
    let [_, _, lq, d] = q.dims();
    let scale = (d as f64).powf(-0.5);
    match imp {
        AttentionImpl::Fused => attention(
            q,
            k,
            v,
            None,
            None,
            AttentionModuleOptions {
                // `None` is Burn's default 1/sqrt(head_dim), our scale too; cubecl backends take
                // their flash kernel only without an explicit scale.
                scale: None,
                softcap: None,
                is_causal: causal,
            },
        ),
        AttentionImpl::Naive => naive(q, k, v, scale, causal, 0),
        AttentionImpl::Chunked(chunk) => {
            let chunk = chunk.max(1);
            if chunk >= lq {
                return naive(q, k, v, scale, causal, 0);
            }
            let parts = (0..lq)
                .step_by(chunk)
                .map(|s| {
                    let e = (s + chunk).min(lq);
                    let qs = q.clone().narrow(2, s, e - s);
                    naive(qs, k.clone(), v.clone(), scale, causal, s)
                })
                .collect();
            Tensor::cat(parts, 2)
        }
    }
}

/// One block of queries starting at token `offset` (for the causal mask).
fn naive<B: burn::tensor::backend::Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: f64,
    causal: bool,
    offset: usize,
) -> Tensor<B, 4> {
    let dtype = q.dtype();
    let scores = q
        .matmul(k.swap_dims(2, 3))
        .mul_scalar(scale)
        .cast(DType::F32);
    let scores = if causal {
        let [b, h, lq, lk] = scores.dims();
        let device = scores.device();
        let rows = Tensor::<B, 1, Int>::arange(offset as i64..(offset + lq) as i64, &device)
            .reshape([1, 1, lq, 1]);
        let cols = Tensor::<B, 1, Int>::arange(0..lk as i64, &device).reshape([1, 1, 1, lk]);
        let mask: Tensor<B, 4, Bool> = cols.greater(rows).expand([b, h, lq, lk]);
        scores.mask_fill(mask, f32::NEG_INFINITY)
    } else {
        scores
    };
    softmax(scores, 3).cast(dtype).matmul(v)
}

/// Configuration of [`Attention`]; fields follow diffusers' constructor.
#[derive(Config, Debug)]
pub struct AttentionConfig {
    /// Channels of the query input.
    pub query_dim: usize,
    /// Channels of the context (cross-attention); `None` for self-attention.
    #[config(default = "None")]
    pub cross_attention_dim: Option<usize>,
    #[config(default = 8)]
    pub heads: usize,
    #[config(default = 64)]
    pub dim_head: usize,
    /// Bias on `to_q`, `to_k`, `to_v` (the UNet has none, the VAE has them).
    #[config(default = false)]
    pub bias: bool,
    #[config(default = true)]
    pub out_bias: bool,
    /// A GroupNorm over the input channels before the projections (the VAE's mid block).
    #[config(default = "None")]
    pub norm_num_groups: Option<usize>,
    #[config(default = 1e-5)]
    pub eps: f64,
    /// Add the input to the output.
    #[config(default = false)]
    pub residual_connection: bool,
    #[config(default = 1.0)]
    pub rescale_output_factor: f64,
    #[config(default = "AttentionImpl::Fused")]
    pub attention_impl: AttentionImpl,
}

/// diffusers' `Attention`: self- or cross-attention with `heads` heads of `dim_head` channels.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub group_norm: Option<GroupNorm<B>>,
    pub to_q: Linear<B>,
    pub to_k: Linear<B>,
    pub to_v: Linear<B>,
    /// diffusers keeps `[Linear, Dropout]` here; the dropout has no weights.
    pub to_out: Vec<Linear<B>>,
    pub heads: usize,
    pub residual_connection: bool,
    pub rescale_output_factor: f64,
    pub attention_impl: AttentionImpl,
}

impl AttentionConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> Attention<B> {
        let inner = self.heads * self.dim_head;
        let context = self.cross_attention_dim.unwrap_or(self.query_dim);
        let proj = |i, o, bias| LinearConfig::new(i, o).with_bias(bias).init(device);
        Attention {
            group_norm: self.norm_num_groups.map(|g| {
                GroupNormConfig::new(g, self.query_dim)
                    .with_epsilon(self.eps)
                    .init(device)
            }),
            to_q: proj(self.query_dim, inner, self.bias),
            to_k: proj(context, inner, self.bias),
            to_v: proj(context, inner, self.bias),
            to_out: vec![proj(inner, self.query_dim, self.out_bias)],
            heads: self.heads,
            residual_connection: self.residual_connection,
            rescale_output_factor: self.rescale_output_factor,
            attention_impl: self.attention_impl,
        }
    }
}

impl<B: Backend> Attention<B> {
    /// `x`: `[batch, tokens, query_dim]`; `context`: `[batch, context_tokens, cross_attention_dim]`
    /// (self-attention when `None`). Returns `[batch, tokens, query_dim]`.
    pub fn forward(&self, x: Tensor<B, 3>, context: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
        self.forward_with_residual(x, context, None)
    }

    /// [`Attention::forward`] plus `residual`, added in the output projection's epilogue (the
    /// transformer block's skip connection).
    pub fn forward_with_residual(
        &self,
        x: Tensor<B, 3>,
        context: Option<Tensor<B, 3>>,
        residual: Option<Tensor<B, 3>>,
    ) -> Tensor<B, 3> {
        let own_residual = self.residual_connection.then(|| x.clone());
        let h = match &self.group_norm {
            Some(norm) => B::fused_group_norm(norm, x.swap_dims(1, 2), false).swap_dims(1, 2),
            None => x,
        };
        let context = context.unwrap_or_else(|| h.clone());
        let q = B::fused_linear(&self.to_q, h, None);
        let k = B::fused_linear(&self.to_k, context.clone(), None);
        let v = B::fused_linear(&self.to_v, context, None);
        let out = B::fused_attention(q, k, v, self.heads, false, self.attention_impl);
        // The caller's residual comes after the rescale, so it joins the epilogue only
        // when there is none.
        let rescale = self.rescale_output_factor != 1.0;
        let (epilogue, after) = match (own_residual, residual) {
            (own, Some(r)) if rescale => (own, Some(r)),
            (Some(a), Some(b)) => (Some(a + b), None),
            (a, b) => (a.or(b), None),
        };
        let mut out = B::fused_linear(&self.to_out[0], out, epilogue);
        if rescale {
            out = out.div_scalar(self.rescale_output_factor);
        }
        match after {
            Some(r) => out + r,
            None => out,
        }
    }

    /// Self-attention over the pixels of `[batch, channels, height, width]` (the VAE's mid block).
    pub fn forward_spatial(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let tokens = x.reshape([b, c, h * w]).swap_dims(1, 2);
        self.forward(tokens, None)
            .swap_dims(1, 2)
            .reshape([b, c, h, w])
    }
}
