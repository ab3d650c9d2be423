//! diffusers' `Transformer2DModel` (continuous input) and `BasicTransformerBlock`.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::Tensor;
use ip2p_nn::Backend;
use ip2p_nn::{Attention, AttentionConfig, AttentionImpl};

/// LayerNorm epsilon of diffusers' `BasicTransformerBlock`.
const LAYER_NORM_EPS: f64 = 1e-5;

/// GEGLU: `Linear(dim → 2·inner)`, split in half, `hidden · gelu(gate)` (exact erf GELU).
#[derive(Module, Debug)]
pub struct Geglu<B: Backend> {
    pub proj: Linear<B>,
}

impl<B: Backend> Geglu<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        B::fused_geglu(&self.proj, x)
    }
}

/// diffusers' `FeedForward` with GEGLU. The file's keys are `ff.net.0.proj.*` and `ff.net.2.*`
/// (index 1 is a dropout); [`crate::weight_spec`] maps them to `net_0` and `net_2`.
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    pub net_0: Geglu<B>,
    pub net_2: Linear<B>,
}

impl<B: Backend> FeedForward<B> {
    pub fn new(dim: usize, device: &B::Device) -> Self {
        let inner = 4 * dim;
        Self {
            net_0: Geglu {
                proj: LinearConfig::new(dim, 2 * inner).init(device),
            },
            net_2: LinearConfig::new(inner, dim).init(device),
        }
    }

    /// `net_2(net_0(x)) + residual`, the residual added in `net_2`'s epilogue.
    pub fn forward(&self, x: Tensor<B, 3>, residual: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
        B::fused_linear(&self.net_2, self.net_0.forward(x), residual)
    }
}

/// Self-attention, cross-attention and feed-forward, each after a LayerNorm (eps 1e-5) and
/// with a residual connection.
#[derive(Module, Debug)]
pub struct BasicTransformerBlock<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn1: Attention<B>,
    pub norm2: LayerNorm<B>,
    pub attn2: Attention<B>,
    pub norm3: LayerNorm<B>,
    pub ff: FeedForward<B>,
}

impl<B: Backend> BasicTransformerBlock<B> {
    pub fn new(dim: usize, heads: usize, cross_attention_dim: usize, device: &B::Device) -> Self {
        let norm = || {
            LayerNormConfig::new(dim)
                .with_epsilon(LAYER_NORM_EPS)
                .init(device)
        };
        let attn = |cross| {
            AttentionConfig::new(dim)
                .with_heads(heads)
                .with_dim_head(dim / heads)
                .with_cross_attention_dim(cross)
                .with_bias(false)
                .init(device)
        };
        Self {
            norm1: norm(),
            attn1: attn(None),
            norm2: norm(),
            attn2: attn(Some(cross_attention_dim)),
            norm3: norm(),
            ff: FeedForward::new(dim, device),
        }
    }

    /// `x`: `[batch, tokens, dim]`, `context`: `[batch, context_tokens, cross_attention_dim]`.
    pub fn forward(&self, x: Tensor<B, 3>, context: Tensor<B, 3>) -> Tensor<B, 3> {
        let ln = |norm, x| B::fused_layer_norm(norm, x, LAYER_NORM_EPS);
        let x = self
            .attn1
            .forward_with_residual(ln(&self.norm1, x.clone()), None, Some(x));
        let x =
            self.attn2
                .forward_with_residual(ln(&self.norm2, x.clone()), Some(context), Some(x));
        self.ff.forward(ln(&self.norm3, x.clone()), Some(x))
    }

    pub fn set_attention_impl(&mut self, imp: AttentionImpl) {
        self.attn1.attention_impl = imp;
        self.attn2.attention_impl = imp;
    }
}

/// `proj_in`/`proj_out`: a Linear (`use_linear_projection`, SD 2.x style) or a 1×1 conv
/// (SD 1.5). burn-store puts the variant in the path (`proj_in.Conv.weight`);
/// [`crate::weight_spec`] maps the file's keys accordingly.
#[derive(Module, Debug)]
pub enum Projection<B: Backend> {
    Linear(Linear<B>),
    Conv(Conv2d<B>),
}

impl<B: Backend> Projection<B> {
    fn new(linear: bool, i: usize, o: usize, device: &B::Device) -> Self {
        if linear {
            Projection::Linear(LinearConfig::new(i, o).init(device))
        } else {
            Projection::Conv(Conv2dConfig::new([i, o], [1, 1]).init(device))
        }
    }
}

/// diffusers' `Transformer2DModel` on continuous input: GroupNorm (eps 1e-6), `proj_in`,
/// transformer blocks over the `h·w` pixels as tokens, `proj_out`, plus the input.
#[derive(Module, Debug)]
pub struct Transformer2DModel<B: Backend> {
    pub norm: GroupNorm<B>,
    pub proj_in: Projection<B>,
    pub transformer_blocks: Vec<BasicTransformerBlock<B>>,
    pub proj_out: Projection<B>,
}

/// Constructor arguments of [`Transformer2DModel`].
#[derive(Debug, Clone, Copy)]
pub struct Transformer2DSpec {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub cross_attention_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
}

impl<B: Backend> Transformer2DModel<B> {
    pub fn new(s: Transformer2DSpec, device: &B::Device) -> Self {
        let c = s.channels;
        Self {
            norm: GroupNormConfig::new(s.groups, c)
                .with_epsilon(1e-6)
                .init(device),
            proj_in: Projection::new(s.use_linear_projection, c, c, device),
            transformer_blocks: (0..s.layers)
                .map(|_| BasicTransformerBlock::new(c, s.heads, s.cross_attention_dim, device))
                .collect(),
            proj_out: Projection::new(s.use_linear_projection, c, c, device),
        }
    }

    /// `x`: `[batch, c, h, w]`, `context`: `[batch, tokens, cross_attention_dim]` → `[batch, c, h, w]`.
    pub fn forward(&self, x: Tensor<B, 4>, context: Tensor<B, 3>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let residual = x.clone();
        let x = B::fused_group_norm(&self.norm, x, false);
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => B::fused_conv1x1_to_tokens(conv, x),
            Projection::Linear(lin) => {
                B::fused_linear(lin, x.reshape([b, c, h * w]).swap_dims(1, 2), None)
            }
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(tokens, context.clone());
        }
        match &self.proj_out {
            Projection::Conv(conv) => {
                B::fused_conv1x1_from_tokens(conv, tokens, [h, w], Some(residual))
            }
            Projection::Linear(lin) => {
                let residual = residual.reshape([b, c, h * w]).swap_dims(1, 2);
                B::fused_linear(lin, tokens, Some(residual))
                    .swap_dims(1, 2)
                    .reshape([b, c, h, w])
            }
        }
    }

    pub fn set_attention_impl(&mut self, imp: AttentionImpl) {
        for block in &mut self.transformer_blocks {
            block.set_attention_impl(imp);
        }
    }
}
