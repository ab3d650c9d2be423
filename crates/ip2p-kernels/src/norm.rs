//! GroupNorm (optionally followed by SiLU) and LayerNorm, each in two passes over data that
//! is still in cache: statistics, then normalise-and-scale (and SiLU) in place.
//!
//! Statistics as PyTorch defines them: mean and biased variance per group or row, `eps` added
//! to the variance. GroupNorm sums in f32 SIMD lanes over blocks and accumulates them in f64, so
//! a VAE group of a million elements keeps its mean exact to f32 precision; LayerNorm's rows
//! (a transformer's, at most a few thousand values) are summed in f32 lanes whole.

use rayon::prelude::*;
use std::mem::MaybeUninit;

use rten_simd::functional::simd_map;
use rten_simd::ops::{BitOps, NumOps};
use rten_simd::{Isa, SimdOp, SimdUnaryOp};
use rten_vecmath::{Silu, Sum, SumSquareSub};

use crate::isa;

/// Elements summed in f32 before the partial sum is added in f64.
const BLOCK: usize = 4096;

/// Mean and biased variance of `x`.
fn moments(x: &[f32]) -> (f64, f64) {
    struct Moments<'a>(&'a [f32]);
    impl SimdOp for Moments<'_> {
        type Output = (f64, f64);
        #[inline(always)]
        fn eval<I: Isa>(self, isa: I) -> (f64, f64) {
            let x = self.0;
            let n = x.len().max(1) as f64;
            // Loops, not closures: a closure would not inherit the target features.
            let mut sum = 0.0f64;
            for c in x.chunks(BLOCK) {
                sum += Sum::new(c).eval(isa) as f64;
            }
            let mean = sum / n;
            let mut sq = 0.0f64;
            for c in x.chunks(BLOCK) {
                sq += SumSquareSub::new(c, mean as f32).eval(isa) as f64;
            }
            (mean, sq / n)
        }
    }
    isa::dispatch(Moments(x))
}

/// `dst = (src − mean) · scale + bias`, then SiLU when `silu`: one read, one write.
struct ScaleShift<'a> {
    src: &'a [f32],
    dst: &'a mut [f32],
    mean: f32,
    scale: f32,
    bias: f32,
    silu: bool,
}

impl SimdOp for ScaleShift<'_> {
    type Output = ();
    #[inline(always)]
    fn eval<I: Isa>(self, isa: I) {
        let ops = isa.f32();
        let (m, s, b) = (
            ops.splat(self.mean),
            ops.splat(self.scale),
            ops.splat(self.bias),
        );
        // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, and `simd_map` only writes
        // initialised values, so `dst` holds valid f32s afterwards.
        let dst = unsafe { &mut *(self.dst as *mut [f32] as *mut [MaybeUninit<f32>]) };
        let silu = self.silu;
        simd_map(
            ops,
            (self.src, dst),
            #[inline(always)]
            |x| {
                let y = ops.mul_add(ops.sub(x, m), s, b);
                if silu { Silu {}.eval(isa, y) } else { y }
            },
        );
    }
}

/// GroupNorm over `x` `[batch, channels, spatial]` written to `out` (same shape), then SiLU
/// when `silu` is set. `gamma`/`beta` are per channel.
///
/// # Panics
/// When lengths disagree or `groups` does not divide `channels`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &[f32],
    batch: usize,
    channels: usize,
    spatial: usize,
    groups: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    silu: bool,
    out: &mut [f32],
) {
    assert!(
        groups > 0 && channels.is_multiple_of(groups),
        "group_norm: {groups} groups do not divide {channels} channels"
    );
    assert_eq!(
        x.len(),
        batch * channels * spatial,
        "group_norm: input length"
    );
    assert_eq!(out.len(), x.len(), "group_norm: output length");
    assert_eq!(gamma.len(), channels, "group_norm: gamma length");
    assert_eq!(beta.len(), channels, "group_norm: beta length");
    let per_group = channels / groups;
    let group_len = per_group * spatial;
    if group_len == 0 {
        return;
    }
    out.par_chunks_mut(group_len)
        .zip(x.par_chunks(group_len))
        .enumerate()
        .for_each(|(i, (out, x))| {
            let (mean, var) = moments(x);
            let inv_std = (1.0 / (var + eps as f64).sqrt()) as f32;
            let c0 = (i % groups) * per_group;
            for (j, (dst, src)) in out.chunks_mut(spatial).zip(x.chunks(spatial)).enumerate() {
                let c = c0 + j;
                isa::dispatch(ScaleShift {
                    src,
                    dst,
                    mean: mean as f32,
                    scale: inv_std * gamma[c],
                    bias: beta[c],
                    silu,
                });
            }
        });
}

/// LayerNorm over the last dimension of `x` `[rows, dim]`, written to `out`.
pub fn layer_norm(
    x: &[f32],
    rows: usize,
    dim: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    out: &mut [f32],
) {
    assert_eq!(x.len(), rows * dim, "layer_norm: input length");
    assert_eq!(out.len(), x.len(), "layer_norm: output length");
    assert_eq!(gamma.len(), dim, "layer_norm: gamma length");
    assert_eq!(beta.len(), dim, "layer_norm: beta length");
    if dim == 0 {
        return;
    }
    let rows_per_task = (16384 / dim).max(1);
    out.par_chunks_mut(rows_per_task * dim)
        .zip(x.par_chunks(rows_per_task * dim))
        .for_each(|(out, x)| {
            isa::dispatch(LayerNormRows {
                x,
                out,
                dim,
                gamma,
                beta,
                eps,
            })
        });
}

/// LayerNorm of whole rows under one dispatch (a transformer's rows are short, 320–1280 values,
/// so a dispatch and two reductions per row cost more than the arithmetic): mean and biased
/// variance in f32 lanes over a row that stays in L1, then `(x − mean) · inv_std · gamma +
/// beta`. Written with rten-simd's plain vector ops only: instantiating rten-vecmath's
/// reductions here as well once made LLVM stop inlining them into every other kernel
/// (GroupNorm ran 5× slower, 2026-11-30).
struct LayerNormRows<'a> {
    x: &'a [f32],
    out: &'a mut [f32],
    dim: usize,
    gamma: &'a [f32],
    beta: &'a [f32],
    eps: f32,
}

impl SimdOp for LayerNormRows<'_> {
    type Output = ();

    #[inline(always)]
    fn eval<I: Isa>(self, isa: I) {
        let o = isa.f32();
        let lanes = o.len();
        let dim = self.dim;
        let body = dim - dim % lanes;
        let n = dim as f64;
        for (x, out) in self.x.chunks_exact(dim).zip(self.out.chunks_exact_mut(dim)) {
            let mut acc = o.zero();
            for i in (0..body).step_by(lanes) {
                acc = o.add(acc, o.load(&x[i..i + lanes]));
            }
            let tail: f32 = x[body..].iter().sum();
            let mean = (o.sum(acc) + tail) as f64 / n;
            let m = o.splat(mean as f32);
            let mut acc = o.zero();
            for i in (0..body).step_by(lanes) {
                let d = o.sub(o.load(&x[i..i + lanes]), m);
                acc = o.mul_add(d, d, acc);
            }
            let tail: f32 = x[body..].iter().map(|&v| (v - mean as f32).powi(2)).sum();
            let var = (o.sum(acc) + tail) as f64 / n;
            let inv_std = (1.0 / (var + self.eps as f64).sqrt()) as f32;
            let s = o.splat(inv_std);
            for i in (0..body).step_by(lanes) {
                let d = o.mul(o.sub(o.load(&x[i..i + lanes]), m), s);
                let g = o.load(&self.gamma[i..i + lanes]);
                let b = o.load(&self.beta[i..i + lanes]);
                o.store(o.mul_add(d, g, b), &mut out[i..i + lanes]);
            }
            for i in body..dim {
                out[i] = (x[i] - mean as f32) * inv_std * self.gamma[i] + self.beta[i];
            }
        }
    }
}
