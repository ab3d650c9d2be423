//! Normalisation that keeps its statistics in f32 when the model runs in half precision.

use burn::module::Module;
use burn::nn::{GroupNorm, LayerNorm};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

/// Run `f` on `x` in f32 when `x` is f16/bf16, and cast the result back.
///
/// GroupNorm and LayerNorm sum thousands of squares; in f16 that overflows or loses the
/// mean, which is the classic source of black images. diffusers upcasts the same way.
pub fn in_f32<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    f: impl FnOnce(Tensor<B, D>) -> Tensor<B, D>,
) -> Tensor<B, D> {
    match x.dtype() {
        dtype @ (DType::F16 | DType::BF16) => f(x.cast(DType::F32)).cast(dtype),
        _ => f(x),
    }
}

/// GroupNorm with f32 statistics; the affine parameters are cast along with the input.
pub fn group_norm<B: Backend, const D: usize>(
    norm: &GroupNorm<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    match x.dtype() {
        DType::F16 | DType::BF16 => {
            let norm32 = norm.clone().map(&mut crate::cast::CastParams(DType::F32));
            in_f32(x, |x| norm32.forward(x))
        }
        _ => norm.forward(x),
    }
}

/// LayerNorm with f32 statistics.
pub fn layer_norm<B: Backend, const D: usize>(
    norm: &LayerNorm<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    match x.dtype() {
        DType::F16 | DType::BF16 => {
            let norm32 = norm.clone().map(&mut crate::cast::CastParams(DType::F32));
            in_f32(x, |x| norm32.forward(x))
        }
        _ => norm.forward(x),
    }
}
