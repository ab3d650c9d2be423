//! Element-wise activations, vectorised (rten-vecmath's SiLU and erf-GELU on the run-time
//! instruction set) and split across the cores in chunks.

use rayon::prelude::*;
use rten_simd::functional::simd_map;
use rten_simd::ops::{BitOps, NumOps};
use rten_simd::{Isa, SimdOp, SimdUnaryOp};
use rten_vecmath::{Gelu, Silu};

use crate::isa;

/// Elements per parallel task: small enough to share work, large enough to amortise it.
const CHUNK: usize = 1 << 14;

/// Applies a unary op to a slice in place; the op [`isa::dispatch`] runs.
struct MapInPlace<'a, Op> {
    data: &'a mut [f32],
    op: &'a Op,
}

impl<Op: SimdUnaryOp<f32>> SimdOp for MapInPlace<'_, Op> {
    type Output = ();

    #[inline(always)]
    fn eval<I: Isa>(self, isa: I) {
        let op = self.op;
        // `inline(always)`: a closure does not inherit the caller's target features, so
        // without it the SIMD intrinsics become calls.
        simd_map(
            isa.f32(),
            self.data,
            #[inline(always)]
            |x| op.eval(isa, x),
        );
    }
}

/// Apply `op` to `data` in place on the current thread.
pub(crate) fn map_in_place<Op: SimdUnaryOp<f32>>(data: &mut [f32], op: &Op) {
    isa::dispatch(MapInPlace { data, op });
}

fn par_map<Op: SimdUnaryOp<f32> + Sync>(data: &mut [f32], op: &Op) {
    data.par_chunks_mut(CHUNK).for_each(|c| map_in_place(c, op));
}

/// `x · sigmoid(x)`, in place.
pub fn silu(x: &mut [f32]) {
    par_map(x, &Silu {});
}

/// `0.5 · x · (1 + erf(x / √2))` (PyTorch's default, exact-erf GELU), in place. rten's erf has
/// an absolute error below 2e-7.
pub fn gelu(x: &mut [f32]) {
    par_map(x, &Gelu {});
}

/// `out[i] = (hidden[i] + hidden_bias[i]) · gelu(gate[i] + gate_bias[i])` in one pass (the
/// biases zero when the projection has none).
struct GatedGelu<'a> {
    hidden: &'a [f32],
    gate: &'a [f32],
    bias: Option<(&'a [f32], &'a [f32])>,
    out: &'a mut [f32],
}

impl SimdOp for GatedGelu<'_> {
    type Output = ();

    #[inline(always)]
    fn eval<I: Isa>(self, isa: I) {
        let ops = isa.f32();
        let lanes = ops.len();
        let n = self.out.len();
        let body = n - n % lanes;
        let gelu = Gelu {};
        match self.bias {
            Some((hb, gb)) => {
                for i in (0..body).step_by(lanes) {
                    let g = ops.add(
                        ops.load(&self.gate[i..i + lanes]),
                        ops.load(&gb[i..i + lanes]),
                    );
                    let h = ops.add(
                        ops.load(&self.hidden[i..i + lanes]),
                        ops.load(&hb[i..i + lanes]),
                    );
                    ops.store(ops.mul(h, gelu.eval(isa, g)), &mut self.out[i..i + lanes]);
                }
            }
            None => {
                for i in (0..body).step_by(lanes) {
                    let g = gelu.eval(isa, ops.load(&self.gate[i..i + lanes]));
                    let y = ops.mul(ops.load(&self.hidden[i..i + lanes]), g);
                    ops.store(y, &mut self.out[i..i + lanes]);
                }
            }
        }
        for i in body..n {
            let (hb, gb) = self.bias.map_or((0.0, 0.0), |(h, g)| (h[i], g[i]));
            let mut g = [self.gate[i] + gb];
            map_in_place(&mut g, &gelu);
            self.out[i] = (self.hidden[i] + hb) * g[0];
        }
    }
}

/// GEGLU's gate: `x` is `[rows, 2·inner]` (a projection's output before its bias, `bias`
/// `[2·inner]`); `out[r, j] = (x[r, j] + bias[j]) · gelu(x[r, inner + j] + bias[inner + j])`, `out`
/// `[rows, inner]`, in one pass without materialising the halves. The bias is added here rather
/// than by the GEMM, so the projection's output is written once and read once.
pub fn geglu(x: &[f32], rows: usize, inner: usize, bias: Option<&[f32]>, out: &mut [f32]) {
    assert_eq!(x.len(), rows * 2 * inner, "geglu: input length");
    assert_eq!(out.len(), rows * inner, "geglu: output length");
    if let Some(b) = bias {
        assert_eq!(b.len(), 2 * inner, "geglu: bias length");
    }
    if inner == 0 {
        return;
    }
    let bias = bias.map(|b| b.split_at(inner));
    let rows_per_task = (CHUNK / inner).max(1);
    out.par_chunks_mut(rows_per_task * inner)
        .zip(x.par_chunks(rows_per_task * 2 * inner))
        .for_each(|(out, x)| {
            for (o, x) in out.chunks_mut(inner).zip(x.chunks(2 * inner)) {
                let (hidden, gate) = x.split_at(inner);
                isa::dispatch(GatedGelu {
                    hidden,
                    gate,
                    bias,
                    out: o,
                });
            }
        });
}
