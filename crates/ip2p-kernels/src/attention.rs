//! Multi-head scaled-dot-product attention, `softmax(q·kᵀ·scale)·v`, on token-major matrices as
//! the linear projections produce them, so no head is ever transposed or copied out.
//!
//! Work is split into tasks of one (batch, head, tile of up to 256 queries), run in parallel on
//! all cores, each GEMM on its task's thread. A task walks the keys in blocks of up to 1024 (one
//! block for every UNet shape): scores of its tile against the block by one GEMM, exponentiated
//! in place (vectorised, after subtracting the running row maximum, as torch subtracts the
//! maximum), then accumulated into the tile's output by a second GEMM with `v`; when a later
//! block raises a row's maximum, that row's output and sum so far are first scaled down by
//! `exp(old − new)` (online softmax, as in FlashAttention). The output is divided by each row's
//! sum at the end, a pass over `[tile, head_dim]` instead of over the `[tile, kv_len]`
//! probabilities. Only a `[tile, block]` piece of the score matrix exists at a time, ≤ 1 MiB.

use std::cell::RefCell;

use rayon::prelude::*;
use rten_simd::ops::{BitOps, NumOps};
use rten_simd::{Isa, Simd, SimdOp, SimdUnaryOp};
use rten_vecmath::Exp;

use crate::gemm::{MatMut, MatRef, Threads, matmul};

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub head_dim: usize,
    /// Query `i` sees keys `0..=i` only (a text encoder's causal mask, torch's `is_causal`:
    /// aligned at the top left when the lengths differ).
    pub causal: bool,
}

impl AttentionShape {
    /// Features of one token across all heads: `heads · head_dim`.
    pub fn inner(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Multiply-adds × 2 of both products: `4 · batch · heads · q_len · kv_len · head_dim`.
    pub fn flops(&self) -> f64 {
        4.0 * (self.batch * self.heads * self.q_len) as f64
            * self.kv_len as f64
            * self.head_dim as f64
    }
}

/// Distance in elements between consecutive token rows of each operand. Row `i` of batch `b`
/// starts at `(b · len + i) · row_stride`; head `h` occupies that row's columns
/// `h · head_dim..(h + 1) · head_dim`. Strides wider than `heads · head_dim` let `q`, `k`, `v`
/// be column ranges of one fused projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionLayout {
    pub q_row_stride: usize,
    /// Shared by `k` and `v`.
    pub kv_row_stride: usize,
    pub out_row_stride: usize,
}

impl AttentionLayout {
    /// Separate, densely packed `q`, `k`, `v` and output: every stride is `heads · head_dim`.
    pub fn contiguous(shape: &AttentionShape) -> Self {
        let inner = shape.inner();
        Self {
            q_row_stride: inner,
            kv_row_stride: inner,
            out_row_stride: inner,
        }
    }

    /// Self-attention on one fused projection `[batch, len, 3 · heads · head_dim]` holding `q`,
    /// `k`, `v` side by side: pass `&qkv[..]`, `&qkv[inner..]`, `&qkv[2 · inner..]`. The output
    /// is dense.
    pub fn fused_qkv(shape: &AttentionShape) -> Self {
        let inner = shape.inner();
        Self {
            q_row_stride: 3 * inner,
            kv_row_stride: 3 * inner,
            out_row_stride: inner,
        }
    }
}

/// Most queries per task. Every task packs its head's keys and values anew for its GEMMs, so
/// larger tiles amortise that better: on one Zen 4 core, 256 queries beat 128 by up to ~35 %
/// and 64 by up to ~70 % at head_dim 512, and by 0–10 % and 5–25 % at the UNet's head sizes.
const MAX_TILE: usize = 256;
/// Fewest queries per task when splitting further to occupy every thread.
const MIN_TILE: usize = 32;
/// Keys per online-softmax block: 256 queries × 1024 keys of scores is 1 MiB, about a core's L2.
/// Blocking bounds the per-thread scratch for long sequences (16 Ki keys for the VAE at 1024²);
/// at the shapes measured it costs nothing against a single block of all keys.
const KEY_BLOCK: usize = 1024;

/// `(queries per task, keys per block)`: at least two tasks per thread where [`MIN_TILE`]
/// allows (one head of the VAE has only `q_len / tile` tasks), otherwise tiles of up to
/// [`MAX_TILE`]; tiles and blocks of near-equal length, so none is a small remainder.
fn tiling(shape: &AttentionShape, threads: usize) -> (usize, usize) {
    let heads = shape.batch * shape.heads;
    let tiles = (2 * threads)
        .div_ceil(heads)
        .max(shape.q_len.div_ceil(MAX_TILE))
        .min(shape.q_len.div_ceil(MIN_TILE))
        .max(1);
    let blocks = shape.kv_len.div_ceil(KEY_BLOCK).max(1);
    (shape.q_len.div_ceil(tiles), shape.kv_len.div_ceil(blocks))
}

/// Elements a row-strided operand of `rows` rows must span.
fn span(rows: usize, row_stride: usize, width: usize) -> usize {
    if rows == 0 || width == 0 {
        0
    } else {
        (rows - 1) * row_stride + width
    }
}

/// `out = softmax(q · kᵀ · scale) · v` for every batch and head; see [`AttentionLayout`] for
/// where each operand's rows and heads lie. `out`'s columns beyond `heads · head_dim` (when its
/// stride is wider) are left untouched. With `kv_len == 0` the output is zero.
///
/// # Panics
/// When a slice is shorter than `shape` and `layout` require, or a stride is narrower than
/// `heads · head_dim`.
pub fn attention(
    shape: &AttentionShape,
    layout: &AttentionLayout,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    let inner = shape.inner();
    let AttentionLayout {
        q_row_stride: qs,
        kv_row_stride: kvs,
        out_row_stride: os,
    } = *layout;
    for (name, stride) in [("q", qs), ("kv", kvs), ("out", os)] {
        assert!(
            stride >= inner,
            "attention: {name} row stride {stride} is narrower than heads·head_dim = {inner}"
        );
    }
    let q_rows = shape.batch * shape.q_len;
    let kv_rows = shape.batch * shape.kv_len;
    for (name, len, need) in [
        ("q", q.len(), span(q_rows, qs, inner)),
        ("k", k.len(), span(kv_rows, kvs, inner)),
        ("v", v.len(), span(kv_rows, kvs, inner)),
        ("out", out.len(), span(q_rows, os, inner)),
    ] {
        assert!(
            len >= need,
            "attention: {name} has {len} elements, {shape:?} with {layout:?} needs {need}"
        );
    }
    if q_rows == 0 || shape.head_dim == 0 {
        return;
    }
    if shape.kv_len == 0 {
        for row in out.chunks_mut(os).take(q_rows) {
            row[..inner].fill(0.0);
        }
        return;
    }

    let (hd, kv_len) = (shape.head_dim, shape.kv_len);
    let (tile, block) = tiling(shape, rayon::current_num_threads());
    let tiles = shape.q_len.div_ceil(tile);
    let out_ptr = OutPtr(out.as_mut_ptr());

    // Task index = (batch · heads + head) · tiles + tile: rayon hands each thread a contiguous
    // range, so consecutive tasks reuse the same head's keys and values from cache.
    (0..shape.batch * shape.heads * tiles)
        .into_par_iter()
        .for_each(|task| {
            let (bh, t) = (task / tiles, task % tiles);
            let (b, h) = (bh / shape.heads, bh % shape.heads);
            let q0 = t * tile;
            let rows = tile.min(shape.q_len - q0);
            let q_tile =
                MatRef::strided(&q[(b * shape.q_len + q0) * qs + h * hd..], rows, hd, qs, 1);
            let kv_off = b * kv_len * kvs + h * hd;

            SCRATCH.with_borrow_mut(|scratch| {
                let Scratch {
                    scores,
                    o,
                    max,
                    sums,
                    rescale,
                } = scratch;
                scores.resize(rows * block, 0.0);
                o.resize(rows * hd, 0.0);
                for buf in [&mut *max, &mut *sums, &mut *rescale] {
                    buf.resize(rows, 0.0);
                }
                let o = &mut o[..rows * hd];
                let (max, sums, rescale) =
                    (&mut max[..rows], &mut sums[..rows], &mut rescale[..rows]);
                max.fill(f32::NEG_INFINITY);
                sums.fill(0.0);

                for j0 in (0..kv_len).step_by(block) {
                    let cols = block.min(kv_len - j0);
                    let scores = &mut scores[..rows * cols];
                    let kv_blk = kv_off + j0 * kvs;
                    let k_t = MatRef::strided(&k[kv_blk..], cols, hd, kvs, 1).t();
                    let v_blk = MatRef::strided(&v[kv_blk..], cols, hd, kvs, 1);
                    let s = MatMut::row_major(scores, rows, cols);
                    matmul(s, q_tile, k_t, scale, false, Threads::One);
                    if shape.causal {
                        // Key `j0 + c` is after query `q0 + r`: its weight is exp(−∞) = 0.
                        for (r, row) in scores.chunks_exact_mut(cols).enumerate() {
                            let first_hidden = (q0 + r + 1).saturating_sub(j0).min(cols);
                            row[first_hidden..].fill(f32::NEG_INFINITY);
                        }
                    }
                    crate::isa::dispatch(ExpRows {
                        scores,
                        cols,
                        max,
                        sums,
                        rescale,
                    });
                    let first = j0 == 0;
                    if !first {
                        for (o_row, &f) in o.chunks_exact_mut(hd).zip(rescale.iter()) {
                            if f != 1.0 {
                                o_row.iter_mut().for_each(|x| *x *= f);
                            }
                        }
                    }
                    let p = MatRef::row_major(scores, rows, cols);
                    matmul(
                        MatMut::row_major(o, rows, hd),
                        p,
                        v_blk,
                        1.0,
                        !first,
                        Threads::One,
                    );
                }

                for (r, (o_row, &sum)) in o.chunks_exact(hd).zip(sums.iter()).enumerate() {
                    let inv = 1.0 / sum;
                    let start = (b * shape.q_len + q0 + r) * os + h * hd;
                    // SAFETY: `start + hd <= out.len()` by the span check above. Tasks own
                    // disjoint (batch, query row, head) triples and `os >= heads · head_dim`, so
                    // no other task reads or writes these `hd` elements while this slice lives,
                    // and `out` itself is not touched elsewhere during the parallel loop.
                    let dst =
                        unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(start), hd) };
                    for (d, &x) in dst.iter_mut().zip(o_row) {
                        *d = x * inv;
                    }
                }
            });
        });
}

/// The output's base pointer, shared by the tasks; each writes only its own elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

// SAFETY: the pointer is only dereferenced for disjoint elements per task (see `attention`).
unsafe impl Send for OutPtr {}
// SAFETY: as for `Send`.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method, not a field access, so closures capture the whole `Send + Sync` wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Per-thread buffers of one task, kept between calls: re-allocating up to 1 MiB of scores per
/// task would cost page faults on every tile.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    o: Vec<f32>,
    max: Vec<f32>,
    sums: Vec<f32>,
    rescale: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// One key block of the online softmax, for each row of `scores` (`cols` wide): the running
/// maximum `max` grows to cover the block, `x ← exp(x − max)` in place, the running sum of
/// exponentials is rescaled to the new maximum and the block's added, and `rescale` receives
/// the factor `exp(old max − new max)` by which the row's accumulated output must be scaled.
/// Subtracting the maximum keeps every exponent ≤ 0: nothing overflows and the largest term is 1.
struct ExpRows<'a> {
    scores: &'a mut [f32],
    cols: usize,
    max: &'a mut [f32],
    sums: &'a mut [f32],
    rescale: &'a mut [f32],
}

impl SimdOp for ExpRows<'_> {
    type Output = ();

    #[inline(always)]
    fn eval<I: Isa>(self, isa: I) {
        let ops = isa.f32();
        let lanes = ops.len();
        let rows = self.scores.chunks_exact_mut(self.cols);
        let state = self
            .max
            .iter_mut()
            .zip(self.sums.iter_mut())
            .zip(self.rescale.iter_mut());
        for (row, ((max, sum), rescale)) in rows.zip(state) {
            let (body, tail) = row.split_at_mut(row.len() - row.len() % lanes);

            let mut vmax = ops.splat(f32::MIN);
            for c in body.chunks_exact(lanes) {
                vmax = ops.max(vmax, ops.load(c));
            }
            let mut new_max = vmax.to_array().into_iter().fold(*max, f32::max);
            new_max = tail.iter().copied().fold(new_max, f32::max);

            let m = ops.splat(new_max);
            // Two accumulators so consecutive vectors' additions do not wait on each other.
            let (mut acc0, mut acc1) = (ops.zero(), ops.zero());
            let mut pairs = body.chunks_exact_mut(2 * lanes);
            for c in &mut pairs {
                let (a, b) = c.split_at_mut(lanes);
                let ya = Exp::apply(isa, ops.sub(ops.load(a), m));
                let yb = Exp::apply(isa, ops.sub(ops.load(b), m));
                ops.store(ya, a);
                ops.store(yb, b);
                acc0 = ops.add(acc0, ya);
                acc1 = ops.add(acc1, yb);
            }
            for c in pairs.into_remainder().chunks_exact_mut(lanes) {
                let y = Exp::apply(isa, ops.sub(ops.load(c), m));
                ops.store(y, c);
                acc0 = ops.add(acc0, y);
            }
            if !tail.is_empty() {
                let (x, mask) = ops.load_pad(tail);
                let y = ops.select(Exp::apply(isa, ops.sub(x, m)), ops.zero(), mask);
                let n = tail.len();
                tail.copy_from_slice(&y.to_array().as_ref()[..n]);
                acc1 = ops.add(acc1, y);
            }
            // exp(−∞) = 0 on the first block, where `sum` is still 0.
            *rescale = (*max - new_max).exp();
            *max = new_max;
            *sum = *sum * *rescale + ops.sum(ops.add(acc0, acc1));
        }
    }
}
