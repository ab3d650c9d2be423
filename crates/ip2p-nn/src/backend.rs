//! The kernel seam: an extension of Burn's `Backend` (the Burn book's custom-kernel pattern)
//! for the layers where the time goes. Each method's default body is plain Burn tensor code,
//! which WGPU, CUDA and `Autodiff<_>` (training) run; the CPU backend overrides them with
//! ip2p-kernels' fused, multi-threaded SIMD kernels. Model code calls these methods and is
//! otherwise unchanged.
//!
//! Implementations live behind features: `flex` (our kernels), `autodiff`, `cubecl`, `fusion`
//! (Burn's own code). A binary enables the ones for the backends it builds.

use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, LayerNorm, Linear};
use burn::tensor::Tensor;
use burn::tensor::activation::{gelu, silu};

use crate::attention::{AttentionImpl, scaled_dot_product};

#[cfg(feature = "flex")]
mod flex;

/// Burn's `Backend` plus the layer operations ip2p runs through its own kernels where it has
/// them. Use it as the bound of every model (`B: ip2p_nn::Backend`).
pub trait Backend: burn::tensor::backend::Backend {
    /// Whether this backend's layers widen f16 weights inside their kernels, so keeping an
    /// fp16 file's weights in f16 ([`crate::Precision::half_weights`]) costs no time to speak of.
    /// Elsewhere [`generic`] widens them with a cast on every call.
    const WIDENS_HALF_WEIGHTS: bool = false;

    /// `conv(x) + residual`: `x` `[batch, in, h, w]`, `residual` the output's shape.
    fn fused_conv2d(
        conv: &Conv2d<Self>,
        x: Tensor<Self, 4>,
        residual: Option<Tensor<Self, 4>>,
    ) -> Tensor<Self, 4> {
        generic::conv2d(conv, x, residual)
    }

    /// A 1×1 conv of `x` `[batch, in, h, w]`, returned token-major: `[batch, h·w, out]` (a
    /// transformer's `proj_in`).
    fn fused_conv1x1_to_tokens(conv: &Conv2d<Self>, x: Tensor<Self, 4>) -> Tensor<Self, 3> {
        generic::conv1x1_to_tokens(conv, x)
    }

    /// A 1×1 conv of token-major `tokens` `[batch, h·w, in]` as the map `[batch, in, h, w]`
    /// (`hw` = `[h, w]`), plus `residual` `[batch, out, h, w]` (a transformer's `proj_out`).
    fn fused_conv1x1_from_tokens(
        conv: &Conv2d<Self>,
        tokens: Tensor<Self, 3>,
        hw: [usize; 2],
        residual: Option<Tensor<Self, 4>>,
    ) -> Tensor<Self, 4> {
        generic::conv1x1_from_tokens(conv, tokens, hw, residual)
    }

    /// GroupNorm with f32 statistics over `[batch, channels, ...]`, then SiLU when `silu`.
    fn fused_group_norm<const D: usize>(
        norm: &GroupNorm<Self>,
        x: Tensor<Self, D>,
        silu: bool,
    ) -> Tensor<Self, D> {
        generic::group_norm(norm, x, silu)
    }

    /// LayerNorm with f32 statistics over the last dimension. `eps` must be the one the module
    /// was built with (Burn keeps `LayerNorm`'s own private).
    fn fused_layer_norm<const D: usize>(
        norm: &LayerNorm<Self>,
        x: Tensor<Self, D>,
        eps: f64,
    ) -> Tensor<Self, D> {
        generic::layer_norm(norm, x, eps)
    }

    /// `linear(x) + residual` over the last dimension, leading dimensions folded into rows.
    fn fused_linear<const D: usize>(
        linear: &Linear<Self>,
        x: Tensor<Self, D>,
        residual: Option<Tensor<Self, D>>,
    ) -> Tensor<Self, D> {
        generic::linear(linear, x, residual)
    }

    /// GEGLU: `proj(x)` split in halves, `hidden · gelu(gate)` (exact-erf GELU).
    fn fused_geglu(proj: &Linear<Self>, x: Tensor<Self, 3>) -> Tensor<Self, 3> {
        generic::geglu(proj, x)
    }

    /// Multi-head attention on token-major projections: `q` `[batch, q_len, heads·head_dim]`,
    /// `k` and `v` `[batch, kv_len, heads·head_dim]` → `[batch, q_len, heads·head_dim]`;
    /// `causal`: query `i` sees keys `0..=i` only (torch's `is_causal`).
    fn fused_attention(
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        heads: usize,
        causal: bool,
        imp: AttentionImpl,
    ) -> Tensor<Self, 3> {
        generic::attention(q, k, v, heads, causal, imp)
    }
}

/// Burn's `AutodiffBackend` whose inner backend is a [`Backend`] too: the training bound (the
/// forward pass runs on `Self`, EMA and validation on the inner backend).
#[cfg(feature = "autodiff")]
pub trait AutodiffBackend:
    burn::tensor::backend::AutodiffBackend<InnerBackend: Backend> + Backend
{
}

#[cfg(feature = "autodiff")]
impl<T> AutodiffBackend for T where
    T: burn::tensor::backend::AutodiffBackend<InnerBackend: Backend> + Backend
{
}

/// The Burn tensor code every backend can run: the trait's default bodies, and the CPU
/// backend's fallback for inputs its kernels do not take (f16, grouped or dilated convs).
pub mod generic {
    use super::*;
    use burn::module::Param;
    use burn::tensor::backend::Backend;
    use std::borrow::Cow;

    /// A weight in `x`'s dtype: a half weight kept as stored ([`crate::Precision`]) is widened
    /// for this call (exact), anything else is used as it is.
    fn widened<B: Backend, const D: usize, const W: usize>(
        weight: &Param<Tensor<B, W>>,
        x: &Tensor<B, D>,
    ) -> Option<Param<Tensor<B, W>>> {
        let w = weight.val();
        (w.dtype() != x.dtype()).then(|| Param::from_tensor(w.cast(x.dtype())))
    }

    fn conv_for<'a, B: Backend>(conv: &'a Conv2d<B>, x: &Tensor<B, 4>) -> Cow<'a, Conv2d<B>> {
        match widened(&conv.weight, x) {
            Some(weight) => Cow::Owned(Conv2d {
                weight,
                ..conv.clone()
            }),
            None => Cow::Borrowed(conv),
        }
    }

    fn linear_for<'a, B: Backend, const D: usize>(
        linear: &'a Linear<B>,
        x: &Tensor<B, D>,
    ) -> Cow<'a, Linear<B>> {
        match widened(&linear.weight, x) {
            Some(weight) => Cow::Owned(Linear {
                weight,
                ..linear.clone()
            }),
            None => Cow::Borrowed(linear),
        }
    }

    pub fn conv2d<B: Backend>(
        conv: &Conv2d<B>,
        x: Tensor<B, 4>,
        residual: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        let y = conv_for(conv, &x).forward(x);
        match residual {
            Some(r) => r + y,
            None => y,
        }
    }

    /// The conv on the map, then its `[batch, out, h·w]` viewed token-major (no copy here).
    pub fn conv1x1_to_tokens<B: super::Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, _, h, w] = x.dims();
        let y = B::fused_conv2d(conv, x, None);
        let out = y.dims()[1];
        y.reshape([b, out, h * w]).swap_dims(1, 2)
    }

    /// The tokens viewed as a map, then the conv.
    pub fn conv1x1_from_tokens<B: super::Backend>(
        conv: &Conv2d<B>,
        tokens: Tensor<B, 3>,
        [h, w]: [usize; 2],
        residual: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        let [b, _, c] = tokens.dims();
        let map = tokens.swap_dims(1, 2).reshape([b, c, h, w]);
        B::fused_conv2d(conv, map, residual)
    }

    pub fn group_norm<B: Backend, const D: usize>(
        norm: &GroupNorm<B>,
        x: Tensor<B, D>,
        with_silu: bool,
    ) -> Tensor<B, D> {
        let y = crate::norm::group_norm(norm, x);
        if with_silu { silu(y) } else { y }
    }

    pub fn layer_norm<B: Backend, const D: usize>(
        norm: &LayerNorm<B>,
        x: Tensor<B, D>,
        _eps: f64,
    ) -> Tensor<B, D> {
        crate::norm::layer_norm(norm, x)
    }

    pub fn linear<B: Backend, const D: usize>(
        linear: &Linear<B>,
        x: Tensor<B, D>,
        residual: Option<Tensor<B, D>>,
    ) -> Tensor<B, D> {
        let y = linear_for(linear, &x).forward(x);
        match residual {
            Some(r) => y + r,
            None => y,
        }
    }

    pub fn geglu<B: Backend>(proj: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let y = linear_for(proj, &x).forward(x);
        let half = y.dims()[2] / 2;
        let hidden = y.clone().narrow(2, 0, half);
        hidden * gelu(y.narrow(2, half, half))
    }

    pub fn attention<B: Backend>(
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        heads: usize,
        causal: bool,
        imp: AttentionImpl,
    ) -> Tensor<B, 3> {
        let split = |x: Tensor<B, 3>| {
            let [b, l, inner] = x.dims();
            x.reshape([b, l, heads, inner / heads]).swap_dims(1, 2)
        };
        let out = scaled_dot_product(split(q), split(k), split(v), causal, imp);
        let [b, h, l, d] = out.dims();
        out.swap_dims(1, 2).reshape([b, l, h * d])
    }
}

#[cfg(feature = "autodiff")]
impl<B: Backend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy> Backend
    for burn::backend::Autodiff<B, C>
{
}

#[cfg(feature = "cubecl")]
impl<R, F, I, BT> Backend for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
}

#[cfg(feature = "fusion")]
impl<B: burn_fusion::FusionBackend> Backend for burn_fusion::Fusion<B> {}
