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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values as values;

    /// An item's row comes out bit for bit the same alone or among others, in either layout
    /// (the file's `[out, in]` is what the loader leaves): the guidance batch, `--batch` and
    /// memory-budget chunks must not change an edit. [`crate::gemm::matmul`] keeps the gemm
    /// crate off its small-size paths (one row, a narrow transposed weight's dot products,
    /// deep inputs split by row count).
    #[test]
    fn a_row_is_the_same_alone_or_in_a_batch() {
        // SD 1.5's shapes, a tiny model's (the dot-product path), narrow and deep (k-blocks).
        for (fan_in, fan_out) in [(320, 1280), (32, 64), (64, 32), (640, 32)] {
            rows_agree(fan_in, fan_out);
        }
    }

    fn rows_agree(fan_in: usize, fan_out: usize) {
        let weight = values(fan_in * fan_out, 7);
        let bias = values(fan_out, 9);
        let first = values(fan_in, 1);
        for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
            let mut alone: Option<Vec<f32>> = None;
            for rows in [1, 2, 3, 6, 9, 77, 231] {
                let mut x = values(rows * fan_in, 3 + rows as u32);
                x[..fan_in].copy_from_slice(&first);
                let residual = values(rows * fan_out, 5);
                let mut out = vec![0.0; rows * fan_out];
                linear(
                    &x,
                    rows,
                    fan_in,
                    &weight,
                    layout,
                    fan_out,
                    Some(&bias),
                    Some(&residual),
                    &mut out,
                );
                let row = out[..fan_out].to_vec();
                match &alone {
                    None => alone = Some(row),
                    Some(a) => assert!(
                        a.iter().zip(&row).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{fan_in}→{fan_out} {layout:?}: row 0 of {rows} rows differs from the row alone"
                    ),
                }
            }
        }
    }
}
