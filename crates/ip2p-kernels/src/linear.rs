//! Linear layers with the batch folded into the GEMM's rows: `[batch, tokens, in]` is one
//! `[batch·tokens, in]` matrix, so a guidance batch of three is one GEMM, not three.

use rayon::prelude::*;

use crate::gemm::{MatMut, MatRef, Threads, matmul};

/// How a Linear weight's `in × out` values lie in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[in, out]` row-major: Burn's own layout.
    InOut,
    /// `[out, in]` row-major: PyTorch's, as a checkpoint stores it. The GEMM reads it through
    /// strides, so a weight loaded as a view of the file is used without a transposed copy.
    OutIn,
}

/// `out = x · weight + bias + residual`: `x` `[rows, in]`, `weight` `in × out` laid out as
/// `layout` says, `bias` `[out]`, `residual` and `out` `[rows, out]`.
///
/// # Panics
/// When a slice's length disagrees with the dimensions.
#[allow(clippy::too_many_arguments)]
pub fn linear(
    x: &[f32],
    rows: usize,
    in_features: usize,
    weight: &[f32],
    layout: WeightLayout,
    out_features: usize,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    assert_eq!(x.len(), rows * in_features, "linear: input length");
    assert_eq!(
        weight.len(),
        in_features * out_features,
        "linear: weight length"
    );
    assert_eq!(out.len(), rows * out_features, "linear: output length");
    if let Some(b) = bias {
        assert_eq!(b.len(), out_features, "linear: bias length");
    }
    if let Some(r) = residual {
        assert_eq!(r.len(), out.len(), "linear: residual length");
    }
    if out_features == 0 {
        return;
    }
    let accumulate = bias.is_some() || residual.is_some();
    if accumulate {
        out.par_chunks_mut(out_features)
            .enumerate()
            .for_each(|(r, o)| match (bias, residual) {
                (Some(b), Some(res)) => {
                    let res = &res[r * out_features..(r + 1) * out_features];
                    for ((o, b), x) in o.iter_mut().zip(b).zip(res) {
                        *o = b + x;
                    }
                }
                (Some(b), None) => o.copy_from_slice(b),
                (None, Some(res)) => {
                    o.copy_from_slice(&res[r * out_features..(r + 1) * out_features])
                }
                (None, None) => unreachable!(),
            });
    }
    matmul(
        MatMut::row_major(out, rows, out_features),
        MatRef::row_major(x, rows, in_features),
        match layout {
            WeightLayout::InOut => MatRef::row_major(weight, in_features, out_features),
            WeightLayout::OutIn => MatRef::row_major(weight, out_features, in_features).t(),
        },
        1.0,
        accumulate,
        Threads::All,
    );
}
