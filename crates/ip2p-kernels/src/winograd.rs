//! Winograd convolution for the 3×3, stride-1, padding-1 convs that dominate SD 1.5's UNet and
//! VAE: F(4×4, 3×3) on 6×6 input tiles (a quarter of direct conv's multiplies) and, for small
//! maps, F(2×2, 3×3) on 4×4 tiles.
//!
//! With `ξ` indexing the `N×N` elements of a transformed tile:
//! 1. input transform `V = Bᵀ d B` of each tile and input channel, laid out `[ξ][cin][tile]`;
//! 2. weight transform `U = G g Gᵀ` of each kernel, `[cout][ξ][cin]`;
//! 3. one GEMM per `ξ`, `M_ξ = U_ξ · V_ξ` (`[cout] × [tile]`), then the output transform
//!    `Aᵀ M A` plus bias and residual, written straight into `out`.
//!
//! The tiles of all images lie side by side as GEMM columns, so small maps still make wide
//! GEMMs. Weights are transformed per call and never stored. Only one operand is transformed
//! whole and kept while the other streams past it in pieces (`Plan`), which bounds the
//! scratch to 32 MiB; the scratch is pooled between calls, so that calls do not page fresh
//! memory in. The transforms run one tile (or kernel) per SIMD lane, compiled for the
//! machine's best instruction set through [`isa::dispatch`]. With AVX-512, whole rows of 16
//! tiles move between image rows and lanes by permutes (`avx512::deinterleave`,
//! `avx512::interleave`), and kernels into lanes by gathers, instead of one value at a time.

use std::sync::Mutex;

use rayon::prelude::*;
use rten_simd::ops::{BitOps, NumOps};
use rten_simd::{Isa, Simd, SimdOp};

use crate::conv::Conv2dShape;
use crate::gemm::{MatMut, MatRef, Threads, matmul};
use crate::isa;

/// Scratch of one call, in floats (32 MiB): half for the operand kept transformed, half for
/// the pieces of the other and the GEMM outputs.
const SCRATCH_FLOATS: usize = 8 << 20;

/// The widest f32 vector of any instruction set [`isa::dispatch`] picks (AVX-512).
const MAX_LANES: usize = 16;

/// Fewest tiles per image (of the algorithm used) at which Winograd measured faster than
/// im2col + GEMM for a guidance batch of three (40 tiles over the batch): with fewer,
/// transforming every weight costs more than the GEMMs save. Counted per image, not over the
/// batch, so an image takes the same algorithm, and gets the same bits, in any batch.
const MIN_TILES: usize = 14;

/// Fewest input channels at which Winograd measured faster: with fewer, the output transform
/// (per output channel and tile) outweighs the small GEMMs.
const MIN_IN_CHANNELS: usize = 16;

/// Tiles a core multiplies at a time when the weights are kept: a multiple of the GEMM
/// micro-kernel's 64 rows, few enough that their transformed tiles and GEMM outputs stay in
/// the core's cache.
const STEP: usize = 64;

/// Most output channels per block when the tiles are kept: more blocks than cores, so a core
/// slowed by another process does not hold the others up; and at most 48, below which the
/// `gemm` crate reads the transformed tiles in place instead of copying them into packed
/// panels first (measured faster at 16×16 and 8×8 maps, where the copy took ~18%).
const MAX_BLOCK: usize = 48;

/// Bands of tile rows per core when the weights are kept, for the same reason.
const BANDS_PER_THREAD: usize = 4;

/// Whether `shape` is one this module handles (3×3, stride 1, padding 1 on every side) and one
/// where it measured faster than im2col + GEMM (`examples/winograd_speed.rs`): at least 16
/// input channels and [`MIN_TILES`] tiles per image, which in SD 1.5 leaves out the UNet's 4×4
/// maps and the convs from the 3-, 4- and 8-channel images and latents. It depends on one
/// image's shape only, never on the batch size.
pub fn suitable(shape: &Conv2dShape) -> bool {
    handles(shape) && shape.in_channels >= MIN_IN_CHANNELS && tiles(shape, side(shape)) >= MIN_TILES
}

fn handles(shape: &Conv2dShape) -> bool {
    shape.kernel == [3, 3] && shape.stride == [1, 1] && shape.padding == [1; 4]
}

/// Tiles of side `m` per image.
fn tiles(shape: &Conv2dShape, m: usize) -> usize {
    shape.height.div_ceil(m) * shape.width.div_ceil(m)
}

/// The output tile side to use: 4 (F(4×4, 3×3)) when the map is at least 8 wide and high and
/// gives [`MIN_TILES`] such tiles per image, else 2. With fewer tiles F(4×4)'s weight transform, 36
/// values per kernel against F(2×2)'s 16, costs more than its GEMMs save (measured: at 8×8,
/// 12×12 and at 16×16 with batch 1, F(2×2) is faster; at 16×16 with batch 3, F(4×4)).
fn side(shape: &Conv2dShape) -> usize {
    if shape.height.min(shape.width) >= 8 && tiles(shape, 4) >= MIN_TILES {
        4
    } else {
        2
    }
}

/// `out = conv(input, weight) + bias + residual`, the contract of [`crate::conv::conv2d`], for
/// convs [`suitable`] accepts (every 3×3 conv with stride 1 and padding 1 gives the right
/// result).
///
/// `input` `[n, cin, h, w]`, `weight` `[cout, cin, 3, 3]`, `bias` `[cout]`, `residual` and `out`
/// `[n, cout, h, w]`.
///
/// # Panics
/// When the kernel, stride or padding differ from 3×3, 1 and 1, or a slice's length disagrees
/// with `shape`.
pub fn conv3x3(
    shape: &Conv2dShape,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    assert!(
        handles(shape),
        "winograd::conv3x3: not a 3×3 stride-1 pad-1 conv: {shape:?}"
    );
    crate::conv::check_args(
        "winograd::conv3x3",
        shape,
        input,
        weight,
        bias,
        residual,
        out,
    );
    if out.is_empty() {
        return;
    }
    let args = Args {
        shape,
        input,
        weight,
        bias,
        residual,
    };
    if side(shape) == 4 {
        run(F4, &args, out);
    } else {
        run(F2, &args, out);
    }
}

/// One F(M×M, 3×3) algorithm (`N = M + 2`) as its three 1-D transforms, each taking one vector
/// per row of a tile or kernel (one tile or kernel per lane); [`transform_2d`] applies them to
/// columns, then rows.
trait Algorithm<const M: usize, const N: usize>: Copy + Send + Sync {
    /// `Bᵀ d`.
    fn input<O: NumOps<f32>>(self, o: O, d: [O::Simd; N]) -> [O::Simd; N];
    /// `G g`.
    fn kernel<O: NumOps<f32>>(self, o: O, g: [O::Simd; 3]) -> [O::Simd; N];
    /// `Aᵀ m`.
    fn output<O: NumOps<f32>>(self, o: O, m: [O::Simd; N]) -> [O::Simd; M];
}

/// F(4×4, 3×3) on Lavin & Gray's points 0, ±1, ±2, ∞, written with shared subexpressions.
#[derive(Clone, Copy)]
struct F4;

impl Algorithm<4, 6> for F4 {
    #[inline(always)]
    fn input<O: NumOps<f32>>(self, o: O, d: [O::Simd; 6]) -> [O::Simd; 6] {
        let [d0, d1, d2, d3, d4, d5] = d;
        let (four, minus_five) = (o.splat(4.0), o.splat(-5.0));
        let (p, q) = (o.sub(d4, d2), o.sub(d3, d1));
        [
            o.mul_add(four, d0, o.mul_add(minus_five, d2, d4)),
            o.mul_add(o.splat(-4.0), o.add(d1, d2), o.add(d3, d4)),
            o.mul_add(four, o.sub(d1, d2), o.sub(d4, d3)),
            o.mul_add(o.splat(2.0), q, p),
            o.mul_add(o.splat(-2.0), q, p),
            o.mul_add(four, d1, o.mul_add(minus_five, d3, d5)),
        ]
    }

    #[inline(always)]
    fn kernel<O: NumOps<f32>>(self, o: O, g: [O::Simd; 3]) -> [O::Simd; 6] {
        let [g0, g1, g2] = g;
        let minus_sixth = o.splat(-1.0 / 6.0);
        let outer = o.add(g0, g2);
        let even = o.mul_add(o.splat(1.0 / 24.0), g0, o.mul(o.splat(1.0 / 6.0), g2));
        let odd = o.mul(o.splat(1.0 / 12.0), g1);
        [
            o.mul(o.splat(0.25), g0),
            o.mul(minus_sixth, o.add(outer, g1)),
            o.mul(minus_sixth, o.sub(outer, g1)),
            o.add(even, odd),
            o.sub(even, odd),
            g2,
        ]
    }

    #[inline(always)]
    fn output<O: NumOps<f32>>(self, o: O, m: [O::Simd; 6]) -> [O::Simd; 4] {
        let [m0, m1, m2, m3, m4, m5] = m;
        let (s12, d12) = (o.add(m1, m2), o.sub(m1, m2));
        let (s34, d34) = (o.add(m3, m4), o.sub(m3, m4));
        [
            o.add(m0, o.add(s12, s34)),
            o.mul_add(o.splat(2.0), d34, d12),
            o.mul_add(o.splat(4.0), s34, s12),
            o.add(o.mul_add(o.splat(8.0), d34, d12), m5),
        ]
    }
}

/// F(2×2, 3×3) on the points 0, ±1, ∞.
#[derive(Clone, Copy)]
struct F2;

impl Algorithm<2, 4> for F2 {
    #[inline(always)]
    fn input<O: NumOps<f32>>(self, o: O, d: [O::Simd; 4]) -> [O::Simd; 4] {
        let [d0, d1, d2, d3] = d;
        [o.sub(d0, d2), o.add(d1, d2), o.sub(d2, d1), o.sub(d1, d3)]
    }

    #[inline(always)]
    fn kernel<O: NumOps<f32>>(self, o: O, g: [O::Simd; 3]) -> [O::Simd; 4] {
        let [g0, g1, g2] = g;
        let (half, outer) = (o.splat(0.5), o.add(g0, g2));
        let (plus, minus) = (o.mul(half, o.add(outer, g1)), o.mul(half, o.sub(outer, g1)));
        [g0, plus, minus, g2]
    }

    #[inline(always)]
    fn output<O: NumOps<f32>>(self, o: O, m: [O::Simd; 4]) -> [O::Simd; 2] {
        let [m0, m1, m2, m3] = m;
        [o.add(m0, o.add(m1, m2)), o.sub(o.sub(m1, m2), m3)]
    }
}

/// The read-only operands of one call.
struct Args<'a> {
    shape: &'a Conv2dShape,
    input: &'a [f32],
    weight: &'a [f32],
    bias: Option<&'a [f32]>,
    residual: Option<&'a [f32]>,
}

/// Where the tiles of a batch lie: tile `t` is image `t / per_image`, row-major inside it.
#[derive(Debug, Clone, Copy)]
struct Tiling {
    /// Output tile side.
    m: usize,
    h: usize,
    w: usize,
    across: usize,
    per_image: usize,
}

/// A tile: its image and first output pixel.
#[derive(Debug, Clone, Copy)]
struct TilePos {
    n: usize,
    y: usize,
    x: usize,
}

impl Tiling {
    fn new(m: usize, h: usize, w: usize) -> Self {
        let across = w.div_ceil(m);
        Self {
            m,
            h,
            w,
            across,
            per_image: h.div_ceil(m) * across,
        }
    }

    fn locate(&self, t: usize) -> TilePos {
        let (n, r) = (t / self.per_image, t % self.per_image);
        TilePos {
            n,
            y: r / self.across * self.m,
            x: r % self.across * self.m,
        }
    }

    /// The tile `count` tiles after `p` in `p`'s row of tiles, or the first of the next row
    /// (or image) when that is the row's end.
    #[inline(always)]
    fn advance(&self, p: TilePos, count: usize) -> TilePos {
        let x = p.x + count * self.m;
        if x < self.w {
            TilePos { x, ..p }
        } else if p.y + self.m < self.h {
            TilePos {
                y: p.y + self.m,
                x: 0,
                ..p
            }
        } else {
            TilePos {
                n: p.n + 1,
                y: 0,
                x: 0,
            }
        }
    }

    /// Tiles from `p` to the end of its row.
    fn left_in_row(&self, p: TilePos) -> usize {
        (self.w - p.x).div_ceil(self.m)
    }
}

/// A run of consecutive tiles of the batch.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    tiling: Tiling,
    t0: usize,
    tiles: usize,
}

/// How one call is split: which operand is transformed once and kept while the other streams
/// past it. Keeping the smaller one (weights ∝ `cout`, tiles ∝ their count) transforms each
/// operand once as long as the kept one fits in half the scratch.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// Big maps (no more output channels than tiles): per block of output channels, their
    /// weights transformed (all of them when they fit); the tiles in bands of whole tile rows,
    /// run in parallel, each a [`STEP`] of tiles at a time through input transform, GEMMs and
    /// output transform.
    WeightsKept {
        band_rows: usize,
        block: usize,
        step: usize,
    },
    /// Small maps with many channels: per chunk of tiles (the whole batch when it fits), their
    /// transform; the output channels in blocks, run in parallel, each through weight
    /// transform, GEMMs and output transform.
    TilesKept { chunk: usize, block: usize },
}

impl Plan {
    fn new(shape: &Conv2dShape, nn: usize, tiling: &Tiling) -> Self {
        let (cin, cout) = (shape.in_channels, shape.out_channels);
        let total = tiling.per_image * shape.batch;
        let half = SCRATCH_FLOATS / 2;
        let threads = rayon::current_num_threads().max(1);
        if cout <= total {
            let tile_rows = tiling.h.div_ceil(tiling.m);
            let bands = (BANDS_PER_THREAD * threads).div_ceil(shape.batch);
            let block = balanced(cout, half / (nn * cin), 1);
            // Each core holds one step's transformed tiles and GEMM outputs.
            let per_core = half / threads / (nn * (cin + block));
            Self::WeightsKept {
                band_rows: tile_rows.div_ceil(bands),
                block,
                step: STEP.min(per_core / MAX_LANES * MAX_LANES).max(MAX_LANES),
            }
        } else {
            let fits = half / (nn * cin);
            let chunk = if fits >= total {
                total
            } else {
                (fits / MAX_LANES * MAX_LANES).max(MAX_LANES)
            };
            // Each core holds one block's transformed weights and GEMM outputs.
            let per_core = half / threads / (nn * (cin + chunk));
            Self::TilesKept {
                chunk,
                block: balanced(cout, per_core.min(MAX_BLOCK), threads),
            }
        }
    }
}

/// A block size of at most `max` that splits `n` into a multiple of `parts` near-equal blocks.
fn balanced(n: usize, max: usize, parts: usize) -> usize {
    let blocks = n.div_ceil(max.max(1)).next_multiple_of(parts);
    n.div_ceil(blocks)
}

fn run<const M: usize, const N: usize, A: Algorithm<M, N>>(alg: A, args: &Args, out: &mut [f32]) {
    let shape = args.shape;
    let tiling = Tiling::new(M, shape.height, shape.width);
    match Plan::new(shape, N * N, &tiling) {
        Plan::WeightsKept {
            band_rows,
            block,
            step,
        } => weights_kept(alg, args, &tiling, band_rows, block, step, out),
        Plan::TilesKept { chunk, block } => tiles_kept(alg, args, &tiling, chunk, block, out),
    }
}

/// [`Plan::WeightsKept`].
fn weights_kept<const M: usize, const N: usize, A: Algorithm<M, N>>(
    alg: A,
    args: &Args,
    tiling: &Tiling,
    band_rows: usize,
    block: usize,
    step: usize,
    out: &mut [f32],
) {
    let shape = args.shape;
    let (cin, cout, nn) = (shape.in_channels, shape.out_channels, N * N);
    let tile_rows = shape.height.div_ceil(M);
    let per_image = tile_rows.div_ceil(band_rows);
    // Each band's rows of every output plane, `bands[band][co]`: a band owns them.
    let mut bands: Vec<Vec<&mut [f32]>> = (0..shape.batch * per_image)
        .map(|_| Vec::with_capacity(cout))
        .collect();
    for (i, plane) in out.chunks_mut(shape.height * shape.width).enumerate() {
        let n = i / cout;
        for (b, band) in plane.chunks_mut(band_rows * M * shape.width).enumerate() {
            bands[n * per_image + b].push(band);
        }
    }
    let mut u = Scratch::default();
    for co0 in (0..cout).step_by(block) {
        let cob = block.min(cout - co0);
        let u = u.take(nn * cob * cin);
        u.par_chunks_mut(nn * cin).enumerate().for_each(|(j, dst)| {
            isa::dispatch(WeightTransform {
                alg,
                weight: args.weight,
                co: co0 + j,
                cin,
                dst,
            })
        });
        let u = &*u;
        bands
            .par_iter_mut()
            .enumerate()
            .for_each_init(Scratch::default, |scratch, (b, band)| {
                let (n, r0) = (b / per_image, b % per_image * band_rows);
                let r1 = (r0 + band_rows).min(tile_rows);
                let first = n * tiling.per_image + r0 * tiling.across;
                let last = n * tiling.per_image + r1 * tiling.across;
                for t0 in (first..last).step_by(step) {
                    let chunk = Chunk {
                        tiling: *tiling,
                        t0,
                        tiles: step.min(last - t0),
                    };
                    let v_len = nn * cin * chunk.tiles;
                    let (v, m) = scratch
                        .take(v_len + nn * cob * chunk.tiles)
                        .split_at_mut(v_len);
                    transform_tiles(alg, args, chunk, v);
                    let targets = Targets {
                        planes: &mut band[co0..co0 + cob],
                        first_image: n,
                        row0: r0 * M,
                    };
                    multiply_and_output(alg, args, &chunk, u, co0, v, m, targets);
                }
            });
    }
}

/// [`Plan::TilesKept`].
fn tiles_kept<const M: usize, const N: usize, A: Algorithm<M, N>>(
    alg: A,
    args: &Args,
    tiling: &Tiling,
    chunk_tiles: usize,
    block: usize,
    out: &mut [f32],
) {
    let shape = args.shape;
    let (cin, cout, nn) = (shape.in_channels, shape.out_channels, N * N);
    let total = tiling.per_image * shape.batch;
    // Each output channel's planes, one per image, `planes[co][n]`: a block of channels owns
    // them.
    let mut planes: Vec<Vec<&mut [f32]>> = (0..cout).map(|_| Vec::new()).collect();
    for (i, p) in out.chunks_mut(shape.height * shape.width).enumerate() {
        planes[i % cout].push(p);
    }
    let mut v = Scratch::default();
    for t0 in (0..total).step_by(chunk_tiles) {
        let tiles = chunk_tiles.min(total - t0);
        let chunk = Chunk {
            tiling: *tiling,
            t0,
            tiles,
        };
        let v = v.take(nn * cin * tiles);
        let shared = SharedSlice::new(v);
        (0..cin).into_par_iter().for_each(|ci| {
            isa::dispatch(InputTransform {
                alg,
                chunk,
                input: args.input,
                ci,
                cin,
                dst: &shared,
            })
        });
        let v = &*v;
        planes.par_chunks_mut(block).enumerate().for_each_init(
            Scratch::default,
            |scratch, (b, planes)| {
                let (co0, cob) = (b * block, planes.len());
                let (u, m) = scratch
                    .take(nn * cob * (cin + tiles))
                    .split_at_mut(nn * cob * cin);
                for (j, dst) in u.chunks_mut(nn * cin).enumerate() {
                    isa::dispatch(WeightTransform {
                        alg,
                        weight: args.weight,
                        co: co0 + j,
                        cin,
                        dst,
                    });
                }
                let targets = Targets {
                    planes,
                    first_image: 0,
                    row0: 0,
                };
                multiply_and_output(alg, args, &chunk, u, co0, v, m, targets);
            },
        );
    }
}

/// The input transform of `chunk`'s tiles, every input channel, into `v` `[ξ][cin][tile]`.
fn transform_tiles<const M: usize, const N: usize, A: Algorithm<M, N>>(
    alg: A,
    args: &Args,
    chunk: Chunk,
    v: &mut [f32],
) {
    let cin = args.shape.in_channels;
    let shared = SharedSlice::new(v);
    for ci in 0..cin {
        isa::dispatch(InputTransform {
            alg,
            chunk,
            input: args.input,
            ci,
            cin,
            dst: &shared,
        });
    }
}

/// A slice that input transforms of different channels write in parallel, each its own
/// elements: channel `ci`'s `[ξ][tile]` at `(ξ · cin + ci) · tiles`, of `[ξ][cin][tile]`.
struct SharedSlice<'a> {
    ptr: *mut f32,
    len: usize,
    _slice: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: a `SharedSlice` is a `&mut [f32]` whose users write disjoint elements
// (`InputTransform`s of different channels), so sharing it between threads races nowhere.
unsafe impl Send for SharedSlice<'_> {}
// SAFETY: as for `Send`.
unsafe impl Sync for SharedSlice<'_> {}

impl<'a> SharedSlice<'a> {
    fn new(v: &'a mut [f32]) -> Self {
        Self {
            ptr: v.as_mut_ptr(),
            len: v.len(),
            _slice: std::marker::PhantomData,
        }
    }

    /// Elements `start..start + len`.
    ///
    /// # Safety
    /// No other thread may access these elements while the returned slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn part(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(start <= self.len && len <= self.len - start);
        // SAFETY: inside the slice `new` was given (asserted), which outlives `'a`; the
        // caller guarantees exclusive access to these elements.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

/// The output planes of a block of output channels, `planes[j]` for channel `co0 + j`: pixel
/// `(n, y, x)` of the batch lies in `planes[j].planes()[n − first_image]` at
/// `(y − row0) · width + x`.
struct Targets<'a, P> {
    planes: &'a mut [P],
    first_image: usize,
    row0: usize,
}

/// One output channel's planes: one per image, or one band of one image's.
trait Planes<'p> {
    fn planes(&mut self) -> &mut [&'p mut [f32]];
}

impl<'p> Planes<'p> for &'p mut [f32] {
    fn planes(&mut self) -> &mut [&'p mut [f32]] {
        std::slice::from_mut(self)
    }
}

impl<'p> Planes<'p> for Vec<&'p mut [f32]> {
    fn planes(&mut self) -> &mut [&'p mut [f32]] {
        self
    }
}

/// On the calling thread: the GEMMs `M_ξ = U_ξ · V_ξ` of output channels `co0..` (`u`
/// `[co][ξ][cin]`) over `chunk`'s tiles (`v` `[ξ][cin][tile]`), into `m` `[co][ξ][tile]`, then
/// each channel's output transform into `targets`.
#[allow(clippy::too_many_arguments)]
fn multiply_and_output<'p, const M: usize, const N: usize, A: Algorithm<M, N>, P: Planes<'p>>(
    alg: A,
    args: &Args,
    chunk: &Chunk,
    u: &[f32],
    co0: usize,
    v: &[f32],
    m: &mut [f32],
    targets: Targets<P>,
) {
    let (nn, cin, tiles) = (N * N, args.shape.in_channels, chunk.tiles);
    let cob = targets.planes.len();
    for xi in 0..nn {
        let a = MatRef::strided(&u[xi * cin..], cob, cin, nn * cin, 1);
        let b = MatRef::strided(&v[xi * cin * tiles..], cin, tiles, tiles, 1);
        let c = MatMut::strided(&mut m[xi * tiles..], cob, tiles, nn * tiles, 1);
        matmul(c, a, b, 1.0, false, Threads::One);
    }
    for (j, (planes, m)) in targets
        .planes
        .iter_mut()
        .zip(m.chunks(nn * tiles))
        .enumerate()
    {
        isa::dispatch(OutputTransform {
            alg,
            args,
            chunk,
            m,
            co: co0 + j,
            planes: planes.planes(),
            first_image: targets.first_image,
            row0: targets.row0,
        });
    }
}

/// Scratch memory, taken from [`POOL`] and given back when dropped.
#[derive(Default)]
struct Scratch(Vec<f32>);

/// Scratch buffers kept between calls, so that calls do not page fresh memory in (which cost
/// a tenth of a call's time). Holds at most [`SCRATCH_FLOATS`] in all.
static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

impl Scratch {
    /// `len` floats of unspecified contents (earlier contents may be gone).
    fn take(&mut self, len: usize) -> &mut [f32] {
        if self.0.len() < len {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            // The smallest pooled buffer big enough, else the biggest, to grow.
            let pick = (0..pool.len())
                .filter(|&i| pool[i].len() >= len)
                .min_by_key(|&i| pool[i].len())
                .or_else(|| (0..pool.len()).max_by_key(|&i| pool[i].len()));
            if let Some(i) = pick
                && pool[i].len() > self.0.len()
            {
                std::mem::swap(&mut self.0, &mut pool[i]);
            }
            drop(pool);
            if self.0.len() < len {
                self.0.resize(len, 0.0);
            }
        }
        &mut self.0[..len]
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        pool.push(std::mem::take(&mut self.0));
        // Keep the biggest buffers that fit the bound.
        pool.retain(|b| !b.is_empty());
        pool.sort_by_key(|b| std::cmp::Reverse(b.len()));
        let mut kept = 0;
        pool.retain(|b| {
            kept += b.len();
            kept <= SCRATCH_FLOATS
        });
    }
}

/// A 1-D transform applied to the columns of `x`, then to the rows of the result: `P x Pᵀ`.
#[inline(always)]
fn transform_2d<S: Copy, const C: usize, const R: usize>(
    x: &[[S; C]; C],
    f: impl Fn([S; C]) -> [S; R],
) -> [[S; R]; R] {
    let mut cols = [[x[0][0]; C]; R];
    for c in 0..C {
        let mut col = [x[0][c]; C];
        for (v, row) in col.iter_mut().zip(x) {
            *v = row[c];
        }
        for (dst, v) in cols.iter_mut().zip(f(col)) {
            dst[c] = v;
        }
    }
    let mut out = [[x[0][0]; R]; R];
    for (o, row) in out.iter_mut().zip(cols) {
        *o = f(row);
    }
    out
}

/// Matrices gathered one lane at a time, `[row][col][lane]`, to be loaded as vectors.
type Gathered<const N: usize> = [[[f32; MAX_LANES]; N]; N];

/// The vectors of `buf`.
#[inline(always)]
fn load_gathered<O: NumOps<f32>, const N: usize>(o: O, buf: &Gathered<N>) -> [[O::Simd; N]; N] {
    let mut d = [[o.zero(); N]; N];
    for (drow, brow) in d.iter_mut().zip(buf) {
        for (v, b) in drow.iter_mut().zip(brow) {
            *v = o.load(b);
        }
    }
    d
}

/// The first `len` lanes of `v` into `dst`.
#[inline(always)]
fn store<O: NumOps<f32>>(o: O, v: O::Simd, dst: &mut [f32], len: usize) {
    if len == o.len() {
        o.store(v, dst);
    } else {
        dst[..len].copy_from_slice(&v.to_array().as_ref()[..len]);
    }
}

/// `len` values of `src` into the first lanes of a vector, zeros after.
#[inline(always)]
fn load<O: NumOps<f32>>(o: O, src: &[f32], len: usize) -> O::Simd {
    if len == o.len() {
        o.load(src)
    } else {
        o.load_pad(&src[..len]).0
    }
}

/// `V = Bᵀ d B` of one input channel's tiles in a chunk, into its elements of `dst`
/// `[ξ][cin][tile]`.
struct InputTransform<'a, const M: usize, const N: usize, A> {
    alg: A,
    chunk: Chunk,
    input: &'a [f32],
    ci: usize,
    cin: usize,
    dst: &'a SharedSlice<'a>,
}

/// Whether the transforms may gather with AVX-512 (the instruction set in use is AVX-512).
fn gathers() -> bool {
    isa::current() == isa::Isa::Avx512
}

impl<const M: usize, const N: usize, A: Algorithm<M, N>> SimdOp for InputTransform<'_, M, N, A> {
    type Output = ();

    #[inline(always)]
    fn eval<I: Isa>(self, isa: I) {
        let (o, alg) = (isa.f32(), self.alg);
        let Chunk { tiling, t0, tiles } = self.chunk;
        let (h, w) = (tiling.h, tiling.w);
        let plane = |n: usize| &self.input[(n * self.cin + self.ci) * h * w..][..h * w];
        let mut pos = tiling.locate(t0);
        self.prefetch_next_channel(o, pos);
        let mut buf: Gathered<N> = [[[0.0; MAX_LANES]; N]; N];
        // AVX-512 picks whole rows of 16 tiles out of vectors of the input rows.
        let fast = o.len() == MAX_LANES && gathers();
        for g0 in (0..tiles).step_by(o.len()) {
            let len = o.len().min(tiles - g0);
            if fast && len == MAX_LANES && tiling.left_in_row(pos) >= MAX_LANES {
                let span = MAX_LANES * M + 2;
                let mut padded = [0.0; MAX_LANES * 4 + 2];
                for (r, brow) in buf.iter_mut().enumerate() {
                    let y = (pos.y + r).wrapping_sub(1);
                    let src = row_span(plane(pos.n), h, w, pos, y, span, &mut padded);
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `fast` holds only when AVX-512 is the instruction set in use,
                    // which `isa` picks only when the CPU has it.
                    unsafe {
                        avx512::deinterleave::<M, N>(src, brow)
                    };
                    #[cfg(not(target_arch = "x86_64"))]
                    let _ = (src, brow);
                }
                pos = tiling.advance(pos, MAX_LANES);
            } else {
                let mut lane = 0;
                while lane < len {
                    let count = (len - lane).min(tiling.left_in_row(pos));
                    gather_row::<M, N>(plane(pos.n), h, w, pos, count, lane, &mut buf);
                    lane += count;
                    pos = tiling.advance(pos, count);
                }
            }
            let v = transform_2d(
                &load_gathered(o, &buf),
                #[inline(always)]
                |d| alg.input(o, d),
            );
            for (i, row) in v.into_iter().enumerate() {
                for (j, x) in row.into_iter().enumerate() {
                    let at = ((i * N + j) * self.cin + self.ci) * tiles + g0;
                    // SAFETY: channel `ci`'s elements, which only this transform writes.
                    store(o, x, unsafe { self.dst.part(at, len) }, len);
                }
            }
        }
    }
}

impl<const M: usize, const N: usize, A> InputTransform<'_, M, N, A> {
    /// Asks for the next input channel's rows under this chunk (when in one image), so that
    /// they arrive from memory while this channel is transformed.
    #[inline(always)]
    fn prefetch_next_channel<O: BitOps<f32>>(&self, o: O, first: TilePos) {
        let Chunk { tiling, t0, tiles } = self.chunk;
        let last = tiling.locate(t0 + tiles - 1);
        if self.ci + 1 == self.cin || last.n != first.n {
            return;
        }
        let (h, w) = (tiling.h, tiling.w);
        let rows = first.y.saturating_sub(1) * w..(last.y + N - 1).min(h) * w;
        let next = &self.input[(first.n * self.cin + self.ci + 1) * h * w..][rows];
        for x in next.iter().step_by(16) {
            o.prefetch(x);
        }
    }
}

/// Input row `y` from one pixel left of `pos` on, `span` values, zeros outside the image:
/// straight from `plane` when inside it, else copied into `padded` among zeros.
#[inline(always)]
fn row_span<'a>(
    plane: &'a [f32],
    h: usize,
    w: usize,
    pos: TilePos,
    y: usize,
    span: usize,
    padded: &'a mut [f32; MAX_LANES * 4 + 2],
) -> &'a [f32] {
    if y >= h {
        // Above or below the image (`y` wrapped from −1 or past the last row): zeros.
        padded.fill(0.0);
        return &padded[..span];
    }
    if pos.x >= 1 && pos.x - 1 + span <= w {
        &plane[y * w + pos.x - 1..][..span]
    } else {
        // At the left or right edge: the row's part among zeros.
        padded.fill(0.0);
        let (x0, x1) = (pos.x.saturating_sub(1), (pos.x + span - 1).min(w));
        padded[x0 + 1 - pos.x..][..x1 - x0].copy_from_slice(&plane[y * w + x0..][..x1 - x0]);
        &padded[..span]
    }
}

/// The input patches of `count` tiles side by side from `pos` (`N×N` each, from one pixel up
/// and left of the tile's first output pixel; zeros outside the image) into lanes `lane0..` of
/// `buf`: each patch row is a stride-`M` slice of one input row.
#[inline(always)]
fn gather_row<const M: usize, const N: usize>(
    plane: &[f32],
    h: usize,
    w: usize,
    pos: TilePos,
    count: usize,
    lane0: usize,
    buf: &mut Gathered<N>,
) {
    let span = count * M + 2;
    let mut padded = [0.0; MAX_LANES * 4 + 2];
    for (r, brow) in buf.iter_mut().enumerate() {
        let y = (pos.y + r).wrapping_sub(1);
        let src = row_span(plane, h, w, pos, y, span, &mut padded);
        for (c, lanes) in brow.iter_mut().enumerate() {
            for (t, v) in lanes[lane0..lane0 + count].iter_mut().enumerate() {
                *v = src[t * M + c];
            }
        }
    }
}

/// `U = G g Gᵀ` of output channel `co`'s kernels, into `dst` `[ξ][cin]`.
struct WeightTransform<'a, const M: usize, const N: usize, A> {
    alg: A,
    weight: &'a [f32],
    co: usize,
    cin: usize,
    dst: &'a mut [f32],
}

impl<const M: usize, const N: usize, A: Algorithm<M, N>> SimdOp for WeightTransform<'_, M, N, A> {
    type Output = ();

    #[inline(always)]
    fn eval<I: Isa>(self, isa: I) {
        let (o, alg, cin) = (isa.f32(), self.alg, self.cin);
        let kernels = &self.weight[self.co * cin * 9..][..cin * 9];
        let mut buf: Gathered<3> = [[[0.0; MAX_LANES]; 3]; 3];
        let fast = o.len() == MAX_LANES && gathers();
        let first = self.co * cin * 9;
        for c0 in (0..cin).step_by(o.len()) {
            let len = o.len().min(cin - c0);
            // The weights arrive from memory: ask for the kernels four vectors ahead (the next
            // output channel's past the end).
            let ahead = first + (c0 + 4 * o.len()) * 9;
            for x in self.weight[ahead.min(self.weight.len())..]
                .iter()
                .take(o.len() * 9)
                .step_by(16)
            {
                o.prefetch(x);
            }
            if fast {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `fast` holds only when AVX-512 is the instruction set in use, which
                // `isa` picks only when the CPU has it.
                unsafe {
                    avx512::gather_kernels(&kernels[c0 * 9..][..len * 9], &mut buf)
                };
            } else {
                self.gather_kernels(kernels, c0, len, &mut buf);
            }
            let u = transform_2d(
                &load_gathered(o, &buf),
                #[inline(always)]
                |g| alg.kernel(o, g),
            );
            for (i, row) in u.into_iter().enumerate() {
                for (j, x) in row.into_iter().enumerate() {
                    store(o, x, &mut self.dst[(i * N + j) * cin + c0..], len);
                }
            }
        }
    }
}

impl<const M: usize, const N: usize, A> WeightTransform<'_, M, N, A> {
    /// Kernels `c0..c0 + len` into lanes `0..len` of `buf`, one value at a time.
    #[inline(always)]
    fn gather_kernels(&self, kernels: &[f32], c0: usize, len: usize, buf: &mut Gathered<3>) {
        {
            for (lane, k) in kernels[c0 * 9..][..len * 9].chunks_exact(9).enumerate() {
                for (row, krow) in buf.iter_mut().zip(k.chunks_exact(3)) {
                    for (v, &kv) in row.iter_mut().zip(krow) {
                        v[lane] = kv;
                    }
                }
            }
        }
    }
}

/// `Aᵀ M A + bias + residual` of output channel `co` over a chunk's tiles: pixel `(n, y, x)` of
/// the batch goes to `planes[n − first_image][(y − row0) · width + x]`.
struct OutputTransform<'a, 'p, const M: usize, const N: usize, A> {
    alg: A,
    args: &'a Args<'a>,
    chunk: &'a Chunk,
    /// The channel's GEMM outputs, `[ξ][tile]`.
    m: &'a [f32],
    co: usize,
    planes: &'a mut [&'p mut [f32]],
    first_image: usize,
    row0: usize,
}

impl<const M: usize, const N: usize, A: Algorithm<M, N>> SimdOp
    for OutputTransform<'_, '_, M, N, A>
{
    type Output = ();

    #[inline(always)]
    fn eval<I: Isa>(mut self, isa: I) {
        let (o, alg) = (isa.f32(), self.alg);
        let Chunk { tiling, t0, tiles } = *self.chunk;
        let bias = o.splat(self.args.bias.map_or(0.0, |b| b[self.co]));
        let mut buf: Gathered<M> = [[[0.0; MAX_LANES]; M]; M];
        let mut pos = tiling.locate(t0);
        // AVX-512 interleaves whole rows of 16 tiles into the output rows.
        let fast = o.len() == MAX_LANES && gathers();
        for g0 in (0..tiles).step_by(o.len()) {
            let len = o.len().min(tiles - g0);
            let mut mm = [[o.zero(); N]; N];
            for (i, row) in mm.iter_mut().enumerate() {
                for (k, v) in row.iter_mut().enumerate() {
                    *v = load(o, &self.m[(i * N + k) * tiles + g0..], len);
                }
            }
            let y = transform_2d(
                &mm,
                #[inline(always)]
                |m| alg.output(o, m),
            );
            for (brow, yrow) in buf.iter_mut().zip(y) {
                for (b, v) in brow.iter_mut().zip(yrow) {
                    o.store(o.add(v, bias), b);
                }
            }
            if fast && len == MAX_LANES && tiling.left_in_row(pos) >= MAX_LANES {
                self.write_row16(&buf, pos);
                pos = tiling.advance(pos, MAX_LANES);
                continue;
            }
            let mut lane = 0;
            while lane < len {
                let count = (len - lane).min(tiling.left_in_row(pos));
                self.write_row(&buf, pos, count, lane);
                lane += count;
                pos = tiling.advance(pos, count);
            }
        }
    }
}

impl<const M: usize, const N: usize, A> OutputTransform<'_, '_, M, N, A> {
    /// [`Self::write_row`] of 16 tiles from `pos` in one row of tiles, with AVX-512.
    #[inline(always)]
    fn write_row16(&mut self, buf: &Gathered<M>, pos: TilePos) {
        let Tiling { h, w, .. } = self.chunk.tiling;
        let cout = self.args.shape.out_channels;
        let plane = &mut *self.planes[pos.n - self.first_image];
        let residual = self
            .args
            .residual
            .map(|r| &r[(pos.n * cout + self.co) * h * w..][..h * w]);
        let cols = (MAX_LANES * M).min(w - pos.x);
        for (p, brow) in buf.iter().enumerate().take(h - pos.y) {
            let at = (pos.y + p) * w + pos.x;
            let dst = &mut plane[at - self.row0 * w..][..cols];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: only called when AVX-512 is the instruction set in use, which `isa`
            // picks only when the CPU has it.
            unsafe {
                avx512::interleave::<M>(brow, dst, residual.map(|r| &r[at..][..cols]))
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (brow, dst);
        }
    }

    /// Lanes `lane0..lane0 + count` of `buf`, output tiles side by side from `pos`, plus the
    /// residual, into the output rows they cover (their part inside the image).
    #[inline(always)]
    fn write_row(&mut self, buf: &Gathered<M>, pos: TilePos, count: usize, lane0: usize) {
        let Tiling { h, w, .. } = self.chunk.tiling;
        let cout = self.args.shape.out_channels;
        let plane = &mut *self.planes[pos.n - self.first_image];
        let residual = self
            .args
            .residual
            .map(|r| &r[(pos.n * cout + self.co) * h * w..][..h * w]);
        let cols = (count * M).min(w - pos.x);
        let whole = cols / M;
        for (p, brow) in buf.iter().enumerate().take(h - pos.y) {
            let at = (pos.y + p) * w + pos.x;
            let dst = &mut plane[at - self.row0 * w..][..cols];
            for (q, lanes) in brow.iter().enumerate() {
                for (t, &v) in lanes[lane0..lane0 + whole].iter().enumerate() {
                    dst[t * M + q] = v;
                }
                if whole * M + q < cols {
                    dst[whole * M + q] = lanes[lane0 + whole];
                }
            }
            if let Some(r) = residual {
                for (d, r) in dst.iter_mut().zip(&r[at..][..cols]) {
                    *d += r;
                }
            }
        }
    }
}

/// Gathers with AVX-512: one instruction fills a vector from 16 places.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Gathered, MAX_LANES};

    /// One row of the input patches of 16 tiles side by side, `src` (`16·M + 2` values, tile
    /// `l`'s at `M·l..`), into `brow[c][l] = src[M·l + c]`.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn deinterleave<const M: usize, const N: usize>(
        src: &[f32],
        brow: &mut [[f32; MAX_LANES]; N],
    ) {
        assert!(M * (MAX_LANES - 1) + N <= src.len() && N <= M + 2 && M <= 4);
        // The vectors src[16k..16k + 16], zeros past the end (masked loads touch only
        // elements inside `src`).
        let mut v = [_mm512_setzero_ps(); 6];
        for (k, v) in v.iter_mut().enumerate() {
            let first = k * MAX_LANES;
            if first >= src.len() {
                break;
            }
            let n = (src.len() - first).min(MAX_LANES);
            let mask = ((1u32 << n) - 1) as __mmask16;
            // SAFETY: lanes `0..n` read `src[first..first + n]`, inside `src`; the others
            // are masked off and touch no memory.
            *v = unsafe { _mm512_maskz_loadu_ps(mask, src.as_ptr().wrapping_add(first)) };
        }
        let iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        let lane_start = _mm512_mullo_epi32(iota, _mm512_set1_epi32(M as i32));
        for (c, b) in brow.iter_mut().enumerate() {
            // Lane `l` wants element `g = M·l + c`: from the pair of vectors `g / 32`, at
            // `g % 32` within it.
            let g = _mm512_add_epi32(lane_start, _mm512_set1_epi32(c as i32));
            let idx = _mm512_and_si512(g, _mm512_set1_epi32(31));
            let pair = _mm512_srli_epi32::<5>(g);
            let mut out = _mm512_permutex2var_ps(v[0], idx, v[1]);
            for p in 1..3 {
                if 32 * p > M * (MAX_LANES - 1) + c {
                    break;
                }
                let from = _mm512_cmpeq_epi32_mask(pair, _mm512_set1_epi32(p as i32));
                let part = _mm512_permutex2var_ps(v[2 * p], idx, v[2 * p + 1]);
                out = _mm512_mask_mov_ps(out, from, part);
            }
            // SAFETY: `b` holds 16 floats; unaligned store.
            unsafe { _mm512_storeu_ps(b.as_mut_ptr(), out) };
        }
    }

    /// The reverse of [`deinterleave`]: `dst[M·l + q] = brow[q][l]` (plus `residual`'s) for
    /// the `dst.len() ≤ 16·M` values of one output row of 16 tiles side by side.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn interleave<const M: usize>(
        brow: &[[f32; MAX_LANES]; M],
        dst: &mut [f32],
        residual: Option<&[f32]>,
    ) {
        assert!(M == 2 || M == 4);
        assert!(dst.len() <= M * MAX_LANES && residual.is_none_or(|r| r.len() == dst.len()));
        // SAFETY: each row holds 16 floats; unaligned loads.
        let q: [__m512; M] = std::array::from_fn(|i| unsafe { _mm512_loadu_ps(brow[i].as_ptr()) });
        let iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        for k in 0..M {
            let first = k * MAX_LANES;
            if first >= dst.len() {
                break;
            }
            let n = (dst.len() - first).min(MAX_LANES);
            let mask = ((1u32 << n) - 1) as __mmask16;
            // Element `e = 16k + j` is tile `e / M`'s column `e % M`.
            let e = _mm512_add_epi32(iota, _mm512_set1_epi32(first as i32));
            let (tile, col) = if M == 4 {
                (
                    _mm512_srli_epi32::<2>(e),
                    _mm512_and_si512(e, _mm512_set1_epi32(3)),
                )
            } else {
                (
                    _mm512_srli_epi32::<1>(e),
                    _mm512_and_si512(e, _mm512_set1_epi32(1)),
                )
            };
            let mut out = _mm512_permutexvar_ps(tile, q[0]);
            for (c, q) in q.iter().enumerate().skip(1) {
                let from = _mm512_cmpeq_epi32_mask(col, _mm512_set1_epi32(c as i32));
                out = _mm512_mask_permutexvar_ps(out, from, tile, *q);
            }
            if let Some(r) = residual {
                // SAFETY: lanes `0..n` read `r[first..first + n]`, inside `r`; the others are
                // masked off.
                let rv = unsafe { _mm512_maskz_loadu_ps(mask, r.as_ptr().wrapping_add(first)) };
                out = _mm512_add_ps(out, rv);
            }
            // SAFETY: lanes `0..n` write `dst[first..first + n]`, inside `dst`; the others are
            // masked off.
            unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr().wrapping_add(first), mask, out) };
        }
    }

    /// The `len ≤ 16` 3×3 kernels in `kernels` (`9 · len` floats) into lanes `0..len` of
    /// `buf`, zeros after.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gather_kernels(kernels: &[f32], buf: &mut Gathered<3>) {
        let len = kernels.len() / 9;
        assert!(len <= MAX_LANES);
        let live: __mmask16 = ((1u32 << len) - 1) as __mmask16;
        let nine = _mm512_mullo_epi32(
            _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
            _mm512_set1_epi32(9),
        );
        for (r, brow) in buf.iter_mut().enumerate() {
            for (c, b) in brow.iter_mut().enumerate() {
                let at = _mm512_add_epi32(nine, _mm512_set1_epi32((r * 3 + c) as i32));
                // SAFETY: live lanes `l < len` load `kernels[9l + 3r + c]`, inside `kernels`.
                let v = unsafe {
                    _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), live, at, kernels.as_ptr())
                };
                // SAFETY: `b` holds 16 floats; unaligned store.
                unsafe { _mm512_storeu_ps(b.as_mut_ptr(), v) };
            }
        }
    }
}
