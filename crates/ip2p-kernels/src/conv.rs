//! 2-D convolution, NCHW, as GEMMs: `out[co, p] = Σ_k weight[co, k] · col[k, p]` where `col` is
//! the input unrolled (im2col) one tile of output positions at a time, so the unrolled matrix
//! never exists whole. The weight is used in its stored `[out, in·kh·kw]` layout, which is
//! already the GEMM's row-major left operand: nothing is re-laid out per call. Bias and the
//! residual are written into the output before the GEMM accumulates onto them.

use rayon::prelude::*;

use crate::gemm::{MatMut, MatRef, Threads, matmul};

/// Shape of one convolution call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dShape {
    pub batch: usize,
    pub in_channels: usize,
    pub height: usize,
    pub width: usize,
    pub out_channels: usize,
    /// `[kh, kw]`.
    pub kernel: [usize; 2],
    /// `[sy, sx]`.
    pub stride: [usize; 2],
    /// `[top, left, bottom, right]`, zeros.
    pub padding: [usize; 4],
}

impl Conv2dShape {
    /// `[out_h, out_w]`.
    pub fn out_hw(&self) -> [usize; 2] {
        let [kh, kw] = self.kernel;
        let [sy, sx] = self.stride;
        let [t, l, b, r] = self.padding;
        [
            (self.height + t + b).saturating_sub(kh) / sy + 1,
            (self.width + l + r).saturating_sub(kw) / sx + 1,
        ]
    }

    pub fn input_len(&self) -> usize {
        self.batch * self.in_channels * self.height * self.width
    }

    pub fn weight_len(&self) -> usize {
        self.out_channels * self.in_channels * self.kernel[0] * self.kernel[1]
    }

    pub fn output_len(&self) -> usize {
        let [oh, ow] = self.out_hw();
        self.batch * self.out_channels * oh * ow
    }

    /// Multiply-adds × 2.
    pub fn flops(&self) -> f64 {
        2.0 * self.output_len() as f64 * (self.in_channels * self.kernel[0] * self.kernel[1]) as f64
    }

    fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.padding == [0; 4]
    }

    /// Whether the shape is valid: kernel fits the padded input, no zero stride.
    pub fn check(&self) -> Result<(), String> {
        let [kh, kw] = self.kernel;
        let [t, l, b, r] = self.padding;
        if self.stride.contains(&0) || kh == 0 || kw == 0 {
            return Err(format!("conv2d: zero stride or kernel in {self:?}"));
        }
        if self.height + t + b < kh || self.width + l + r < kw {
            return Err(format!(
                "conv2d: kernel larger than the padded input in {self:?}"
            ));
        }
        Ok(())
    }
}

/// Elements of unrolled input per im2col tile: 4 Mi floats (16 MiB), enough columns to keep
/// the GEMM efficient, small enough to stay out of the way at the VAE's 512² maps.
const TILE_ELEMS: usize = 4 << 20;
/// Below this many output positions per image the batch is folded into one GEMM.
const FOLD_BELOW: usize = 512;

/// Panics, naming `kernel`, when the shape is invalid or a slice's length disagrees with it.
pub(crate) fn check_args(
    kernel: &str,
    shape: &Conv2dShape,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    out: &[f32],
) {
    if let Err(e) = shape.check() {
        panic!("{e}");
    }
    assert_eq!(input.len(), shape.input_len(), "{kernel}: input length");
    assert_eq!(weight.len(), shape.weight_len(), "{kernel}: weight length");
    assert_eq!(out.len(), shape.output_len(), "{kernel}: output length");
    if let Some(b) = bias {
        assert_eq!(b.len(), shape.out_channels, "{kernel}: bias length");
    }
    if let Some(r) = residual {
        assert_eq!(r.len(), out.len(), "{kernel}: residual length");
    }
}

/// `out = conv(input, weight) + bias + residual`.
///
/// `input` `[n, cin, h, w]`, `weight` `[cout, cin, kh, kw]`, `bias` `[cout]`, `residual` and
/// `out` `[n, cout, oh, ow]`.
///
/// # Panics
/// When a slice's length disagrees with `shape` or [`Conv2dShape::check`] fails.
pub fn conv2d(
    shape: &Conv2dShape,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    check_args("conv2d", shape, input, weight, bias, residual, out);
    if crate::winograd::suitable(shape) {
        return crate::winograd::conv3x3(shape, input, weight, bias, residual, out);
    }
    conv2d_im2col(shape, input, weight, bias, residual, out);
}

/// [`conv2d`] always through im2col + GEMM, never Winograd (the baseline Winograd is measured
/// against).
///
/// # Panics
/// As [`conv2d`].
pub fn conv2d_im2col(
    shape: &Conv2dShape,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    check_args("conv2d", shape, input, weight, bias, residual, out);
    let [oh, ow] = shape.out_hw();
    let positions = oh * ow;
    let k = shape.in_channels * shape.kernel[0] * shape.kernel[1];
    let w = MatRef::row_major(weight, shape.out_channels, k);
    let image_in = shape.in_channels * shape.height * shape.width;
    let image_out = shape.out_channels * positions;

    if positions >= FOLD_BELOW || shape.batch == 1 {
        // One image at a time, GEMM straight into the output, tiles of output rows.
        let rows_per_tile = (TILE_ELEMS / (k * ow).max(1)).clamp(1, oh);
        let mut col = Vec::new();
        for n in 0..shape.batch {
            let x = &input[n * image_in..(n + 1) * image_in];
            let o = &mut out[n * image_out..(n + 1) * image_out];
            write_epilogue(
                o,
                shape.out_channels,
                positions,
                bias,
                residual.map(|r| &r[n * image_out..(n + 1) * image_out]),
            );
            if shape.is_pointwise() {
                let x = MatRef::row_major(x, k, positions);
                matmul(
                    MatMut::row_major(o, shape.out_channels, positions),
                    w,
                    x,
                    1.0,
                    true,
                    Threads::All,
                );
                continue;
            }
            for y0 in (0..oh).step_by(rows_per_tile) {
                let rows = rows_per_tile.min(oh - y0);
                let cols = rows * ow;
                col.resize(k * cols, 0.0);
                im2col(shape, x, y0, rows, &mut col[..k * cols]);
                let dst = &mut o[y0 * ow..];
                let c = MatMut::strided(dst, shape.out_channels, cols, positions, 1);
                matmul(
                    c,
                    w,
                    MatRef::row_major(&col, k, cols),
                    1.0,
                    true,
                    Threads::All,
                );
            }
        }
        return;
    }

    // Small maps: the whole batch's positions side by side as one GEMM's columns.
    let cols = shape.batch * positions;
    let mut col = vec![0.0; k * cols];
    for n in 0..shape.batch {
        let x = &input[n * image_in..(n + 1) * image_in];
        let mut part = vec![0.0; k * positions];
        if shape.is_pointwise() {
            part.copy_from_slice(x);
        } else {
            im2col(shape, x, 0, oh, &mut part);
        }
        for r in 0..k {
            col[r * cols + n * positions..r * cols + (n + 1) * positions]
                .copy_from_slice(&part[r * positions..(r + 1) * positions]);
        }
    }
    // The epilogue goes in first and the GEMM adds onto it, as in the unfolded path above, so
    // an image's values do not depend on whether its batch was folded.
    let mut tmp = vec![0.0; shape.out_channels * cols];
    tmp.par_chunks_mut(cols).enumerate().for_each(|(co, row)| {
        for (n, part) in row.chunks_exact_mut(positions).enumerate() {
            let plane = (n * shape.out_channels + co) * positions;
            write_epilogue(
                part,
                1,
                positions,
                bias.map(|b| &b[co..co + 1]),
                residual.map(|r| &r[plane..plane + positions]),
            );
        }
    });
    matmul(
        MatMut::row_major(&mut tmp, shape.out_channels, cols),
        w,
        MatRef::row_major(&col, k, cols),
        1.0,
        true,
        Threads::All,
    );
    out.par_chunks_mut(positions)
        .enumerate()
        .for_each(|(i, o)| {
            let (n, co) = (i / shape.out_channels, i % shape.out_channels);
            o.copy_from_slice(&tmp[co * cols + n * positions..co * cols + (n + 1) * positions]);
        });
}

/// `out[c, p] = bias[c] + residual[c, p]` (either may be absent), before the GEMM adds onto it.
fn write_epilogue(
    out: &mut [f32],
    channels: usize,
    positions: usize,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
) {
    debug_assert_eq!(out.len(), channels * positions);
    out.par_chunks_mut(positions)
        .enumerate()
        .for_each(|(c, o)| {
            let b = bias.map_or(0.0, |b| b[c]);
            match residual {
                Some(r) => {
                    for (o, r) in o.iter_mut().zip(&r[c * positions..(c + 1) * positions]) {
                        *o = r + b;
                    }
                }
                None => o.fill(b),
            }
        });
}

/// Unroll output rows `y0..y0 + rows` of one image: `col[(ci·kh + ky)·kw + kx, (y − y0)·ow + x]`.
fn im2col(shape: &Conv2dShape, x: &[f32], y0: usize, rows: usize, col: &mut [f32]) {
    let [kh, kw] = shape.kernel;
    let [sy, sx] = shape.stride;
    let [pt, pl, _, _] = shape.padding;
    let [_, ow] = shape.out_hw();
    let (h, w) = (shape.height, shape.width);
    let cols = rows * ow;
    col.par_chunks_mut(cols).enumerate().for_each(|(r, dst)| {
        let ci = r / (kh * kw);
        let (ky, kx) = ((r / kw) % kh, r % kw);
        let plane = &x[ci * h * w..(ci + 1) * h * w];
        for (row, out_row) in dst.chunks_mut(ow).enumerate() {
            let iy = ((y0 + row) * sy + ky) as isize - pt as isize;
            if iy < 0 || iy >= h as isize {
                out_row.fill(0.0);
                continue;
            }
            let src = &plane[iy as usize * w..(iy as usize + 1) * w];
            if sx == 1 {
                // ix = ox + kx − pl: a shifted copy with zeros where it leaves the row.
                let shift = kx as isize - pl as isize;
                let lo = (-shift).clamp(0, ow as isize) as usize;
                let hi = (w as isize - shift).clamp(lo as isize, ow as isize) as usize;
                out_row[..lo].fill(0.0);
                out_row[lo..hi].copy_from_slice(
                    &src[(lo as isize + shift) as usize..(hi as isize + shift) as usize],
                );
                out_row[hi..].fill(0.0);
            } else {
                for (ox, o) in out_row.iter_mut().enumerate() {
                    let ix = (ox * sx + kx) as isize - pl as isize;
                    *o = if ix < 0 || ix >= w as isize {
                        0.0
                    } else {
                        src[ix as usize]
                    };
                }
            }
        }
    });
}

/// Direct convolution in f64, the reference the tests compare against.
#[doc(hidden)]
pub fn conv2d_reference(
    shape: &Conv2dShape,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
) -> Vec<f32> {
    let [oh, ow] = shape.out_hw();
    let [kh, kw] = shape.kernel;
    let [sy, sx] = shape.stride;
    let [pt, pl, _, _] = shape.padding;
    let (h, w, cin, cout) = (
        shape.height,
        shape.width,
        shape.in_channels,
        shape.out_channels,
    );
    let mut out = vec![0.0; shape.output_len()];
    for n in 0..shape.batch {
        for co in 0..cout {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut s = bias.map_or(0.0, |b| b[co] as f64);
                    for ci in 0..cin {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * sy + ky) as isize - pt as isize;
                                let ix = (ox * sx + kx) as isize - pl as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let xi = ((n * cin + ci) * h + iy as usize) * w + ix as usize;
                                let wi = ((co * cin + ci) * kh + ky) * kw + kx;
                                s += input[xi] as f64 * weight[wi] as f64;
                            }
                        }
                    }
                    let oi = ((n * cout + co) * oh + oy) * ow + ox;
                    out[oi] = (s + residual.map_or(0.0, |r| r[oi] as f64)) as f32;
                }
            }
        }
    }
    out
}
