//! `attention` against a direct f64 evaluation of `softmax(q·kᵀ·scale)·v`.
//!
//! Tolerance: `|out − ref| ≤ (TOL + 4·u·max|score|) · max|v|`, `TOL = 1e-5`, `u = 2⁻²⁴`. Every
//! output is a convex combination of `v` rows, so `max|v|` is its natural scale. The kernel's
//! error comes from
//! - the f32 sums over `kv_len` keys (row sum of exponentials, `p·v` GEMM) and the vectorised
//!   `exp` (≤ 1 ULP): a few ULP each, well inside `TOL` (~1e-5 relative);
//! - rounding of each score to f32 (a sum of `head_dim` products): `exp` turns an absolute score
//!   error into the same *relative* error of its probability, so this term grows with the scores'
//!   magnitude, ~`|score|·u` per rounding (about 4e-6 at ±60, where it dominates).
//!
//! Observed: ~2e-7 for scores of order 1, ~6e-6 at ±60. A real bug (a wrong head, key or scale)
//! is off by ~1e-1.

use ip2p_kernels::attention::{AttentionLayout, AttentionShape, attention};
use ip2p_kernels::isa::{self, Isa};

const TOL: f64 = 1e-5;

/// xorshift64*: deterministic inputs without a dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Uniform in `[-1, 1)`.
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
        bits as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn vec(&mut self, n: usize, amplitude: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * amplitude).collect()
    }
}

/// Allowed `|out − ref| / max|v|` when the largest score is `max_score` (see the top comment).
fn tolerance(max_score: f64) -> f64 {
    TOL + 4.0 * (f32::EPSILON as f64 / 2.0) * max_score
}

/// Direct evaluation in f64 on the same strided layout: a dense `[batch·q_len, inner]` output,
/// and the tolerance for it (from the largest `|score|`).
fn reference(
    s: &AttentionShape,
    l: &AttentionLayout,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
) -> (Vec<f64>, f64) {
    let (hd, inner) = (s.head_dim, s.inner());
    let mut out = vec![0.0; s.batch * s.q_len * inner];
    let mut p = vec![0.0f64; s.kv_len];
    let mut max_score = 0.0f64;
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.q_len {
                let qi = (b * s.q_len + i) * l.q_row_stride + h * hd;
                for (j, pj) in p.iter_mut().enumerate() {
                    let kj = (b * s.kv_len + j) * l.kv_row_stride + h * hd;
                    let dot: f64 = (0..hd).map(|d| q[qi + d] as f64 * k[kj + d] as f64).sum();
                    *pj = dot * scale as f64;
                    max_score = max_score.max(pj.abs());
                }
                let max = p.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let mut sum = 0.0;
                for pj in p.iter_mut() {
                    *pj = (*pj - max).exp();
                    sum += *pj;
                }
                for d in 0..hd {
                    let acc: f64 = (0..s.kv_len)
                        .map(|j| p[j] * v[(b * s.kv_len + j) * l.kv_row_stride + h * hd + d] as f64)
                        .sum();
                    out[(b * s.q_len + i) * inner + h * hd + d] = acc / sum;
                }
            }
        }
    }
    (out, tolerance(max_score))
}

/// Largest `|out − ref| / max|v|` over the heads' columns of `out` (row stride `out_stride`).
fn rel_error(s: &AttentionShape, out: &[f32], out_stride: usize, want: &[f64], v: &[f32]) -> f64 {
    let inner = s.inner();
    let vmax = v
        .iter()
        .fold(0.0f64, |m, x| m.max(x.abs() as f64))
        .max(f64::MIN_POSITIVE);
    let mut worst = 0.0f64;
    for r in 0..s.batch * s.q_len {
        for c in 0..inner {
            let got = out[r * out_stride + c] as f64;
            let w = want[r * inner + c];
            assert!(
                got.is_finite(),
                "non-finite output {got} at row {r}, column {c} of {s:?}"
            );
            worst = worst.max((got - w).abs() / vmax);
        }
    }
    worst
}

/// Runs `shape` on dense random inputs of the given amplitude; returns the relative error.
fn check_dense(shape: AttentionShape, amplitude: f32, scale: f32, seed: u64) -> f64 {
    let mut rng = Rng::new(seed);
    let inner = shape.inner();
    let q = rng.vec(shape.batch * shape.q_len * inner, amplitude);
    let k = rng.vec(shape.batch * shape.kv_len * inner, amplitude);
    let v = rng.vec(shape.batch * shape.kv_len * inner, 1.0);
    let layout = AttentionLayout::contiguous(&shape);
    let mut out = vec![f32::NAN; shape.batch * shape.q_len * inner];
    attention(&shape, &layout, &q, &k, &v, scale, &mut out);
    let (want, tol) = reference(&shape, &layout, &q, &k, &v, scale);
    let err = rel_error(&shape, &out, inner, &want, &v);
    assert!(
        err <= tol,
        "{shape:?} amplitude {amplitude}: error {err:e} > {tol:e}"
    );
    err
}

fn shape(
    batch: usize,
    heads: usize,
    q_len: usize,
    kv_len: usize,
    head_dim: usize,
) -> AttentionShape {
    AttentionShape {
        batch,
        heads,
        q_len,
        kv_len,
        head_dim,
        causal: false,
    }
}

#[test]
fn odd_sizes_match_the_f64_reference() {
    let mut worst = 0.0f64;
    let mut seed = 1;
    for head_dim in [1, 3, 17, 40] {
        for q_len in [1, 5, 77, 130, 300] {
            for kv_len in [1, 7, 77, 300] {
                // Batch and heads alternate so every size meets both values of each.
                let (batch, heads) = [(1, 1), (3, 8), (1, 8), (3, 1)][seed as usize % 4];
                let s = shape(batch, heads, q_len, kv_len, head_dim);
                worst = worst.max(check_dense(s, 1.0, 1.0 / (head_dim as f32).sqrt(), seed));
                seed += 1;
            }
        }
    }
    println!("largest relative error {worst:e}");
}

#[test]
fn unet_and_vae_head_sizes_match_the_reference() {
    // Head sizes of the SD 1.5 UNet (40, 80, 160) and the VAE's single 512-wide head, with the
    // cross-attention key count, at query counts that exercise tiling (> one tile, ragged end).
    for (s, seed) in [
        (shape(3, 8, 200, 77, 40), 101),
        (shape(3, 8, 150, 150, 80), 102),
        (shape(1, 8, 64, 77, 160), 103),
        (shape(1, 1, 260, 260, 512), 104),
    ] {
        check_dense(s, 1.0, 1.0 / (s.head_dim as f32).sqrt(), seed);
    }
}

#[test]
fn large_scores_stay_finite_and_accurate() {
    // Entries of ±4 over 17 dimensions at scale 1 give scores of up to about ±60: without the
    // max subtraction, exp would overflow f32 (beyond ~88) for the larger ones.
    let err = check_dense(shape(3, 8, 130, 77, 17), 4.0, 1.0, 7);
    println!("scores ≈ ±60: relative error {err:e}");
    // Scores of order 1e4: softmax degenerates to (almost) one-hot; still no inf or NaN.
    let err = check_dense(shape(1, 2, 33, 45, 3), 100.0, 1.0, 8);
    println!("scores ≈ ±1e4: relative error {err:e}");
}

#[test]
fn several_key_blocks_combine_like_one_softmax() {
    // More than 1024 keys take several online-softmax blocks. Keys grow in magnitude along the
    // sequence, so later blocks raise most rows' maximum and rescale what came before; the
    // reversed order keeps the maximum in the first block instead.
    for reverse in [false, true] {
        let s = shape(1, 2, 70, 2500, 17);
        let inner = s.inner();
        let mut rng = Rng::new(11 + reverse as u64);
        let q = rng.vec(s.q_len * inner, 1.0);
        let mut k = rng.vec(s.kv_len * inner, 1.0);
        for (j, row) in k.chunks_mut(inner).enumerate() {
            let pos = if reverse { s.kv_len - 1 - j } else { j };
            row.iter_mut().for_each(|x| *x *= 1.0 + pos as f32 / 400.0);
        }
        let v = rng.vec(s.kv_len * inner, 1.0);
        let layout = AttentionLayout::contiguous(&s);
        let mut out = vec![f32::NAN; s.q_len * inner];
        attention(&s, &layout, &q, &k, &v, 0.5, &mut out);
        let (want, tol) = reference(&s, &layout, &q, &k, &v, 0.5);
        let err = rel_error(&s, &out, inner, &want, &v);
        println!("2500 keys, reverse {reverse}: relative error {err:e}");
        assert!(err <= tol, "reverse {reverse}: error {err:e} > {tol:e}");
    }
}

#[test]
fn fused_qkv_columns_are_read_in_place() {
    // q, k, v as column ranges of one [batch, len, 3·inner] projection, output into a buffer
    // wider than `inner` whose extra columns must survive untouched.
    let s = shape(3, 8, 77, 77, 17);
    let inner = s.inner();
    let mut rng = Rng::new(42);
    let qkv = rng.vec(s.batch * s.q_len * 3 * inner, 1.0);
    let layout = AttentionLayout {
        out_row_stride: inner + 5,
        ..AttentionLayout::fused_qkv(&s)
    };
    let (q, k, v) = (&qkv[..], &qkv[inner..], &qkv[2 * inner..]);
    let mut out = vec![-7.0f32; s.batch * s.q_len * layout.out_row_stride];
    attention(&s, &layout, q, k, v, 0.25, &mut out);
    let (want, tol) = reference(&s, &layout, q, k, v, 0.25);
    let err = rel_error(&s, &out, layout.out_row_stride, &want, &qkv);
    assert!(err <= tol, "fused qkv: error {err:e}");
    for row in out.chunks(layout.out_row_stride) {
        assert!(
            row[inner..].iter().all(|&x| x == -7.0),
            "padding columns were written"
        );
    }

    // Cross-attention shape: q dense, k and v from a fused [batch, 77, 2·inner] projection.
    let s = shape(3, 8, 130, 77, 40);
    let inner = s.inner();
    let q = rng.vec(s.batch * s.q_len * inner, 1.0);
    let kv = rng.vec(s.batch * s.kv_len * 2 * inner, 1.0);
    let layout = AttentionLayout {
        kv_row_stride: 2 * inner,
        ..AttentionLayout::contiguous(&s)
    };
    let (k, v) = (&kv[..], &kv[inner..]);
    let mut out = vec![0.0; s.batch * s.q_len * inner];
    attention(&s, &layout, &q, k, v, 0.125, &mut out);
    let (want, tol) = reference(&s, &layout, &q, k, v, 0.125);
    let err = rel_error(&s, &out, inner, &want, &kv);
    assert!(err <= tol, "fused kv: error {err:e}");
}

#[test]
fn empty_keys_give_zeros_and_empty_queries_do_nothing() {
    let s = shape(2, 2, 3, 0, 4);
    let mut out = vec![f32::NAN; 2 * 3 * 8];
    attention(
        &s,
        &AttentionLayout::contiguous(&s),
        &[0.0; 48],
        &[],
        &[],
        1.0,
        &mut out,
    );
    assert!(out.iter().all(|&x| x == 0.0));
    let s = shape(2, 2, 0, 5, 4);
    attention(
        &s,
        &AttentionLayout::contiguous(&s),
        &[],
        &[0.0; 80],
        &[0.0; 80],
        1.0,
        &mut [],
    );
}

#[test]
#[should_panic(expected = "attention: v has 79 elements")]
fn a_short_slice_panics_with_its_name() {
    let s = shape(2, 2, 3, 5, 4);
    let mut out = vec![0.0; 48];
    attention(
        &s,
        &AttentionLayout::contiguous(&s),
        &[0.0; 48],
        &[0.0; 80],
        &[0.0; 79],
        1.0,
        &mut out,
    );
}

#[test]
#[should_panic(expected = "attention: out row stride 7 is narrower")]
fn an_overlapping_output_stride_panics() {
    let s = shape(1, 2, 3, 5, 4);
    let layout = AttentionLayout {
        out_row_stride: 7,
        ..AttentionLayout::contiguous(&s)
    };
    attention(
        &s,
        &layout,
        &[0.0; 24],
        &[0.0; 40],
        &[0.0; 40],
        1.0,
        &mut [0.0; 24],
    );
}

/// `isa::force` is process-global. This is the only test in this binary that calls it, and the
/// other tests are correct on every instruction set, so running them meanwhile is harmless.
/// Only the kernel's own exp/softmax follows the forced ISA; the gemm crate dispatches itself.
#[test]
fn avx2_and_avx512_agree() {
    let s = shape(3, 8, 130, 300, 40);
    let mut rng = Rng::new(9);
    let inner = s.inner();
    let q = rng.vec(s.batch * s.q_len * inner, 2.0);
    let k = rng.vec(s.batch * s.kv_len * inner, 2.0);
    let v = rng.vec(s.batch * s.kv_len * inner, 1.0);
    let layout = AttentionLayout::contiguous(&s);
    let (want, tol) = reference(&s, &layout, &q, &k, &v, 0.3);

    let mut results = Vec::new();
    for which in [Isa::Avx512, Isa::Avx2, Isa::Portable] {
        if !isa::force(Some(which)) {
            println!("skipping {which:?}: this CPU cannot run it");
            continue;
        }
        let mut out = vec![f32::NAN; s.batch * s.q_len * inner];
        attention(&s, &layout, &q, &k, &v, 0.3, &mut out);
        isa::force(None);
        let err = rel_error(&s, &out, inner, &want, &v);
        println!("{which:?}: relative error {err:e}");
        assert!(err <= tol, "{which:?}: error {err:e}");
        results.push((which, out));
    }
    let (first, base) = &results[0];
    for (which, out) in &results[1..] {
        let diff = base
            .iter()
            .zip(out)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        println!("{first:?} vs {which:?}: largest difference {diff:e}");
        assert!(
            diff as f64 <= 2.0 * tol,
            "{first:?} vs {which:?} differ by {diff:e}"
        );
    }
}
