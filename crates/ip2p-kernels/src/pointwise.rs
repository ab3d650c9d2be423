//! 1×1 convolutions that change layout on the way: a channel-major map `[batch, channels,
//! positions]` in and token-major rows `[batch, positions, channels]` out, and back. SD 1.5's
//! transformers open and close with such convs (`proj_in`, `proj_out`) around blocks that work
//! on tokens; the GEMM reads its input through strides here, where a conv followed by a
//! transpose would copy the activations once more each way (and every consumer of the
//! transposed view would copy them again).
//!
//! One GEMM per image, so an image's values never depend on the batch.

use rayon::prelude::*;

use crate::gemm::{MatMut, MatRef, Threads, matmul};

/// `out[n, p, co] = bias[co] + Σ_ci x[n, ci, p] · weight[co, ci]`: `x` `[batch, cin, positions]`,
/// `weight` `[cout, cin]` (a 1×1 conv's, as stored), `bias` `[cout]`, `out` `[batch, positions,
/// cout]`.
///
/// # Panics
/// When a slice's length disagrees with the dimensions.
#[allow(clippy::too_many_arguments)]
pub fn map_to_tokens(
    x: &[f32],
    batch: usize,
    cin: usize,
    positions: usize,
    weight: &[f32],
    cout: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert_eq!(
        x.len(),
        batch * cin * positions,
        "map_to_tokens: input length"
    );
    assert_eq!(weight.len(), cout * cin, "map_to_tokens: weight length");
    assert_eq!(
        out.len(),
        batch * positions * cout,
        "map_to_tokens: output length"
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), cout, "map_to_tokens: bias length");
    }
    if batch * positions * cout == 0 {
        return;
    }
    if positions < FOLD_BELOW {
        return map_to_tokens_folded(x, batch, cin, positions, weight, cout, bias, out);
    }
    if let Some(b) = bias {
        out.par_chunks_mut(cout)
            .for_each(|row| row.copy_from_slice(b));
    }
    let w = MatRef::row_major(weight, cout, cin).t();
    for (x, out) in x
        .chunks_exact(cin * positions)
        .zip(out.chunks_exact_mut(positions * cout))
    {
        // Row p of the image's tokens is column p of its map.
        let a = MatRef::strided(x, positions, cin, 1, positions);
        matmul(
            MatMut::row_major(out, positions, cout),
            a,
            w,
            1.0,
            bias.is_some(),
            Threads::All,
        );
    }
}

/// Positions per image below which [`map_to_tokens`] multiplies the whole batch at once: with
/// few rows per image, one GEMM per image ran at a third of the rate (1280 channels at 8×8:
/// 9.1 ms against 3.3 ms for the folded product and its transposed copy).
const FOLD_BELOW: usize = 256;

/// [`map_to_tokens`] for small maps: the batch's positions side by side as the columns of one
/// GEMM `[cout, batch·positions]` (bias first, the product added), then written token-major.
/// An image's values are the same as alone: the sums run over `cin` in the same order.
#[allow(clippy::too_many_arguments)]
fn map_to_tokens_folded(
    x: &[f32],
    batch: usize,
    cin: usize,
    positions: usize,
    weight: &[f32],
    cout: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let cols = batch * positions;
    let mut folded = vec![0.0; cin * cols];
    folded
        .par_chunks_mut(cols)
        .enumerate()
        .for_each(|(ci, row)| {
            for (n, part) in row.chunks_exact_mut(positions).enumerate() {
                part.copy_from_slice(&x[(n * cin + ci) * positions..][..positions]);
            }
        });
    let mut product = vec![0.0; cout * cols];
    if let Some(b) = bias {
        product
            .par_chunks_mut(cols)
            .zip(b)
            .for_each(|(row, &b)| row.fill(b));
    }
    matmul(
        MatMut::row_major(&mut product, cout, cols),
        MatRef::row_major(weight, cout, cin),
        MatRef::row_major(&folded, cin, cols),
        1.0,
        bias.is_some(),
        Threads::All,
    );
    out.par_chunks_mut(cout).enumerate().for_each(|(col, row)| {
        for (co, o) in row.iter_mut().enumerate() {
            *o = product[co * cols + col];
        }
    });
}

/// `out[n, co, p] = bias[co] + residual[n, co, p] + Σ_ci tokens[n, p, ci] · weight[co, ci]`:
/// `tokens` `[batch, positions, cin]`, `weight` `[cout, cin]`, `bias` `[cout]`, `residual` and
/// `out` `[batch, cout, positions]`.
///
/// # Panics
/// When a slice's length disagrees with the dimensions.
#[allow(clippy::too_many_arguments)]
pub fn tokens_to_map(
    tokens: &[f32],
    batch: usize,
    positions: usize,
    cin: usize,
    weight: &[f32],
    cout: usize,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    assert_eq!(
        tokens.len(),
        batch * positions * cin,
        "tokens_to_map: input length"
    );
    assert_eq!(weight.len(), cout * cin, "tokens_to_map: weight length");
    assert_eq!(
        out.len(),
        batch * cout * positions,
        "tokens_to_map: output length"
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), cout, "tokens_to_map: bias length");
    }
    if let Some(r) = residual {
        assert_eq!(r.len(), out.len(), "tokens_to_map: residual length");
    }
    if batch * positions * cout == 0 {
        return;
    }
    let accumulate = bias.is_some() || residual.is_some();
    if accumulate {
        out.par_chunks_mut(positions)
            .enumerate()
            .for_each(|(i, plane)| {
                let b = bias.map_or(0.0, |b| b[i % cout]);
                match residual {
                    Some(r) => {
                        let r = &r[i * positions..(i + 1) * positions];
                        for (o, r) in plane.iter_mut().zip(r) {
                            *o = r + b;
                        }
                    }
                    None => plane.fill(b),
                }
            });
    }
    let w = MatRef::row_major(weight, cout, cin);
    for (t, out) in tokens
        .chunks_exact(positions * cin)
        .zip(out.chunks_exact_mut(cout * positions))
    {
        // Column p of the image's map is row p of its tokens.
        let b = MatRef::strided(t, cin, positions, 1, cin);
        matmul(
            MatMut::row_major(out, cout, positions),
            w,
            b,
            1.0,
            accumulate,
            Threads::All,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values as values;

    /// `[batch, cout, positions]` by a plain loop in f64.
    fn conv1x1(
        x: &[f32],
        batch: usize,
        cin: usize,
        positions: usize,
        w: &[f32],
        bias: &[f32],
    ) -> Vec<f64> {
        let cout = bias.len();
        let mut out = vec![0.0; batch * cout * positions];
        for n in 0..batch {
            for co in 0..cout {
                for p in 0..positions {
                    let mut s = bias[co] as f64;
                    for ci in 0..cin {
                        s += x[(n * cin + ci) * positions + p] as f64 * w[co * cin + ci] as f64;
                    }
                    out[(n * cout + co) * positions + p] = s;
                }
            }
        }
        out
    }

    /// Both directions against a plain loop, at odd sizes (channels off the SIMD widths, one
    /// position, one channel), with and without bias and residual. Tolerance 1e-5: f32 sums of
    /// at most 37 products of values below 0.5 against f64.
    #[test]
    fn both_layouts_match_a_plain_conv() {
        for (batch, cin, cout, positions) in [
            (1, 1, 1, 1),
            (3, 17, 9, 35),
            (2, 37, 20, 16),
            (1, 8, 33, 64),
        ] {
            let x = values(batch * cin * positions, 1);
            let w = values(cout * cin, 2);
            let bias = values(cout, 3);
            let want = conv1x1(&x, batch, cin, positions, &w, &bias);
            let zero = vec![0.0; cout];
            let want_nobias = conv1x1(&x, batch, cin, positions, &w, &zero);

            for with_bias in [true, false] {
                let mut tokens = vec![f32::NAN; batch * positions * cout];
                map_to_tokens(
                    &x,
                    batch,
                    cin,
                    positions,
                    &w,
                    cout,
                    with_bias.then_some(&bias[..]),
                    &mut tokens,
                );
                let want = if with_bias { &want } else { &want_nobias };
                for n in 0..batch {
                    for p in 0..positions {
                        for co in 0..cout {
                            let got = tokens[(n * positions + p) * cout + co] as f64;
                            let w = want[(n * cout + co) * positions + p];
                            assert!(
                                (got - w).abs() < 1e-5,
                                "map_to_tokens {batch}×{cin}→{cout}@{positions}: {got} vs {w}"
                            );
                        }
                    }
                }
            }

            // Back: tokens of the input, with a residual.
            let mut t = vec![0.0; batch * positions * cin];
            for n in 0..batch {
                for ci in 0..cin {
                    for p in 0..positions {
                        t[(n * positions + p) * cin + ci] = x[(n * cin + ci) * positions + p];
                    }
                }
            }
            let residual = values(batch * cout * positions, 4);
            let mut out = vec![f32::NAN; batch * cout * positions];
            tokens_to_map(
                &t,
                batch,
                positions,
                cin,
                &w,
                cout,
                Some(&bias),
                Some(&residual),
                &mut out,
            );
            for (i, (got, w)) in out.iter().zip(&want).enumerate() {
                let w = w + residual[i] as f64;
                assert!(
                    (*got as f64 - w).abs() < 1e-5,
                    "tokens_to_map {batch}×{cin}→{cout}@{positions} at {i}: {got} vs {w}"
                );
            }
            let mut out = vec![f32::NAN; batch * cout * positions];
            tokens_to_map(&t, batch, positions, cin, &w, cout, None, None, &mut out);
            for (got, w) in out.iter().zip(&want_nobias) {
                assert!((*got as f64 - w).abs() < 1e-5);
            }
        }
    }

    /// An image's values are the same bits alone or in a batch (one GEMM per image).
    #[test]
    fn an_image_is_the_same_alone_or_in_a_batch() {
        // Below and at FOLD_BELOW positions: the folded and the per-image products.
        for positions in [64, FOLD_BELOW] {
            let (cin, cout) = (40, 24);
            let w = values(cout * cin, 5);
            let bias = values(cout, 6);
            let x = values(3 * cin * positions, 7);
            let mut all = vec![0.0; 3 * positions * cout];
            map_to_tokens(&x, 3, cin, positions, &w, cout, Some(&bias), &mut all);
            let mut one = vec![0.0; positions * cout];
            let second = &x[cin * positions..2 * cin * positions];
            map_to_tokens(second, 1, cin, positions, &w, cout, Some(&bias), &mut one);
            assert_eq!(&all[positions * cout..2 * positions * cout], &one[..]);
        }
    }
}
