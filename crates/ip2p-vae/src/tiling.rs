//! Batch slicing and tiled encode/decode, as diffusers' `enable_slicing` / `enable_tiling`.

use burn::tensor::{Tensor, TensorData};
use ip2p_nn::Backend;

use crate::model::AutoencoderKL;

/// Tiling parameters, in image pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TileConfig {
    /// Side of an image tile (diffusers' `tile_sample_min_size`, the config's `sample_size` by
    /// default: 512 for SD 1.5). The latent tile is this divided by the downscale factor.
    pub tile_sample_size: usize,
    /// Fraction of a tile that overlaps its neighbour and is blended (diffusers: 0.25).
    pub overlap: f64,
}

impl TileConfig {
    /// diffusers' defaults for a VAE of this `sample_size`.
    pub fn new(tile_sample_size: usize) -> Self {
        Self {
            tile_sample_size,
            overlap: 0.25,
        }
    }
}

/// Memory options of the VAE; both are off by default, as in diffusers.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct VaeMemory {
    /// Run the batch one image at a time (identical numbers, lower peak memory).
    pub slicing: bool,
    /// Encode/decode inputs larger than one tile in overlapping tiles blended at the seams.
    /// The result differs slightly from untiled (each tile sees only its own context).
    pub tiling: Option<TileConfig>,
}

/// Per-image when slicing, else the whole batch.
fn sliced<B: Backend>(
    slicing: bool,
    x: Tensor<B, 4>,
    f: impl Fn(Tensor<B, 4>) -> Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [b, c, h, w] = x.dims();
    if slicing && b > 1 {
        let parts = (0..b)
            .map(|i| f(x.clone().slice([i..i + 1, 0..c, 0..h, 0..w])))
            .collect();
        Tensor::cat(parts, 0)
    } else {
        f(x)
    }
}

pub(crate) fn encode_moments<B: Backend>(vae: &AutoencoderKL<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let model = &vae.model;
    let factor = vae.downscale_factor();
    sliced(vae.memory.slicing, x, |x| {
        let [_, _, h, w] = x.dims();
        match vae.memory.tiling {
            Some(t) if w > t.tile_sample_size || h > t.tile_sample_size => {
                let latent = t.tile_sample_size / factor;
                tiled(x, t.tile_sample_size, latent, t.overlap, |tile| {
                    model.moments(tile)
                })
            }
            _ => model.moments(x),
        }
    })
}

pub(crate) fn decode<B: Backend>(vae: &AutoencoderKL<B>, z: Tensor<B, 4>) -> Tensor<B, 4> {
    let model = &vae.model;
    let factor = vae.downscale_factor();
    sliced(vae.memory.slicing, z, |z| {
        let [_, _, h, w] = z.dims();
        match vae.memory.tiling {
            Some(t) if w > t.tile_sample_size / factor || h > t.tile_sample_size / factor => {
                let latent = t.tile_sample_size / factor;
                tiled(z, latent, t.tile_sample_size, t.overlap, |tile| {
                    model.decode_raw(tile)
                })
            }
            _ => model.decode_raw(z),
        }
    })
}

/// diffusers' `_tiled_encode` / `tiled_decode`: run `f` on `tile_in`-sized tiles of `x` whose
/// starts are `tile_in·(1-overlap)` apart, blend each output tile into the one above and the
/// one to the left over `tile_out·overlap` rows/columns, and keep `tile_out - blend` of each.
///
/// As in diffusers, a tile is blended with its neighbours *after* they were themselves blended.
fn tiled<B: Backend>(
    x: Tensor<B, 4>,
    tile_in: usize,
    tile_out: usize,
    overlap: f64,
    f: impl Fn(Tensor<B, 4>) -> Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [b, c, h, w] = x.dims();
    // Python's int() truncates; the products are positive.
    let step = ((tile_in as f64 * (1.0 - overlap)) as usize).max(1);
    let blend = (tile_out as f64 * overlap) as usize;
    let keep = tile_out - blend;
    let mut rows: Vec<Vec<Tensor<B, 4>>> = (0..h)
        .step_by(step)
        .map(|i| {
            (0..w)
                .step_by(step)
                .map(|j| {
                    f(x.clone().slice([
                        0..b,
                        0..c,
                        i..(i + tile_in).min(h),
                        j..(j + tile_in).min(w),
                    ]))
                })
                .collect()
        })
        .collect();
    let mut out_rows = Vec::with_capacity(rows.len());
    for i in 0..rows.len() {
        for j in 0..rows[i].len() {
            let mut tile = rows[i][j].clone();
            if i > 0 {
                tile = blend_along(rows[i - 1][j].clone(), tile, blend, 2);
            }
            if j > 0 {
                tile = blend_along(rows[i][j - 1].clone(), tile, blend, 3);
            }
            rows[i][j] = tile;
        }
        let parts = rows[i]
            .iter()
            .map(|t| {
                let [tb, tc, th, tw] = t.dims();
                t.clone()
                    .slice([0..tb, 0..tc, 0..th.min(keep), 0..tw.min(keep)])
            })
            .collect();
        out_rows.push(Tensor::cat(parts, 3));
    }
    Tensor::cat(out_rows, 2)
}

/// diffusers' `blend_v` (dim 2) / `blend_h` (dim 3): the first `extent` rows (columns) of `b`
/// become `a_tail·(1 - y/extent) + b·(y/extent)`, where `a_tail` is the last `extent` of `a`.
fn blend_along<B: Backend>(
    a: Tensor<B, 4>,
    b: Tensor<B, 4>,
    extent: usize,
    dim: usize,
) -> Tensor<B, 4> {
    let extent = extent.min(a.dims()[dim]).min(b.dims()[dim]);
    if extent == 0 {
        return b;
    }
    let device = b.device();
    let dtype = b.dtype();
    let (na, nb) = (a.dims()[dim], b.dims()[dim]);
    // The weights as torch computes them: a Python double, rounded to the tensor's dtype.
    let wb: Vec<f32> = (0..extent)
        .map(|y| (y as f64 / extent as f64) as f32)
        .collect();
    let wa: Vec<f32> = (0..extent)
        .map(|y| (1.0 - y as f64 / extent as f64) as f32)
        .collect();
    let mut shape = [1usize; 4];
    shape[dim] = extent;
    let wb = Tensor::<B, 4>::from_data(TensorData::new(wb, shape), &device).cast(dtype);
    let wa = Tensor::<B, 4>::from_data(TensorData::new(wa, shape), &device).cast(dtype);
    let a_tail = a.narrow(dim, na - extent, extent);
    let b_head = b.clone().narrow(dim, 0, extent);
    let mixed = a_tail * wa + b_head * wb;
    if nb == extent {
        mixed
    } else {
        Tensor::cat(vec![mixed, b.narrow(dim, extent, nb - extent)], dim)
    }
}
