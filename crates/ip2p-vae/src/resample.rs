//! PIL's 8-bit resampling, ported from Pillow's `Resample.c`: separable, horizontal pass first,
//! 22-bit fixed-point coefficients, each pass rounded and clipped to 8 bits. It matches PIL's
//! output pixel for pixel (tests/images.rs), so images reach the VAE exactly as diffusers
//! (Lanczos, inference) and its training script (bicubic, PIL's default) prepare them.

use image::RgbImage;

/// The resampling filters ip2p needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `Image.LANCZOS`: diffusers' `VaeImageProcessor` and the original `ImageOps.fit`.
    Lanczos,
    /// `Image.BICUBIC` (PIL's default for RGB `resize`): diffusers' training script.
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Lanczos => 3.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Lanczos => lanczos(x),
            Filter::Bicubic => bicubic(x),
        }
    }
}

/// Pillow's `bicubic_filter` (a = -0.5, support 2).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// PIL's `Image.resize(size, filter)` of the whole image.
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let (w, h) = img.dimensions();
    resize_box(img, width, height, [0.0, 0.0, w as f64, h as f64], filter)
}

/// PIL's 8-bit resample of the region `bbox` (x0, y0, x1, y1) of `img`.
pub fn resize_box(
    img: &RgbImage,
    width: u32,
    height: u32,
    bbox: [f64; 4],
    filter: Filter,
) -> RgbImage {
    let (iw, ih) = img.dimensions();
    let (ow, oh) = (width as usize, height as usize);
    if ow == 0 || oh == 0 {
        return RgbImage::new(width, height);
    }
    let need_h = width != iw || bbox[0] != 0.0 || bbox[2] != width as f64;
    let need_v = height != ih || bbox[1] != 0.0 || bbox[3] != height as f64;
    let horiz = Coeffs::new(iw as usize, bbox[0], bbox[2], ow, filter);
    let vert = Coeffs::new(ih as usize, bbox[1], bbox[3], oh, filter);
    let src: &[u8] = img.as_raw();

    // Horizontal pass over the rows the vertical pass will read.
    let (tmp, tmp_w, row0) = if need_h {
        let first = vert.bounds[0].0;
        let last = vert.bounds[oh - 1].0 + vert.bounds[oh - 1].1;
        let rows = last - first;
        let mut tmp = vec![0u8; rows * ow * 3];
        for y in 0..rows {
            let in_row = &src[(first + y) * iw as usize * 3..][..iw as usize * 3];
            for x in 0..ow {
                let (xmin, n) = horiz.bounds[x];
                let k = &horiz.k[x * horiz.ksize..][..n];
                for c in 0..3 {
                    let mut ss = 1i64 << (PRECISION_BITS - 1);
                    for (t, kk) in k.iter().enumerate() {
                        ss += in_row[(xmin + t) * 3 + c] as i64 * *kk as i64;
                    }
                    tmp[(y * ow + x) * 3 + c] = clip8(ss);
                }
            }
        }
        (tmp, ow, first)
    } else {
        (src.to_vec(), iw as usize, 0)
    };
    if !need_v {
        return RgbImage::from_raw(width, height, tmp)
            .unwrap_or_else(|| RgbImage::new(width, height));
    }
    let mut out = vec![0u8; oh * ow * 3];
    for y in 0..oh {
        let (ymin, n) = vert.bounds[y];
        let ymin = ymin - row0;
        let k = &vert.k[y * vert.ksize..][..n];
        for x in 0..ow {
            for c in 0..3 {
                let mut ss = 1i64 << (PRECISION_BITS - 1);
                for (t, kk) in k.iter().enumerate() {
                    ss += tmp[((ymin + t) * tmp_w + x) * 3 + c] as i64 * *kk as i64;
                }
                out[(y * ow + x) * 3 + c] = clip8(ss);
            }
        }
    }
    RgbImage::from_raw(width, height, out).unwrap_or_else(|| RgbImage::new(width, height))
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn clip8(ss: i64) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `lanczos_filter` (support 3).
fn lanczos(x: f64) -> f64 {
    fn sinc(x: f64) -> f64 {
        if x == 0.0 {
            1.0
        } else {
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
    }
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis.
struct Coeffs {
    ksize: usize,
    /// (first input index, number of taps) per output index.
    bounds: Vec<(usize, usize)>,
    k: Vec<i32>,
}

impl Coeffs {
    fn new(in_size: usize, in0: f64, in1: f64, out_size: usize, filter: Filter) -> Self {
        let scale = (in1 - in0) / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut k = vec![0i32; out_size * ksize];
        let mut w = vec![0f64; ksize];
        for xx in 0..out_size {
            let center = in0 + (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64)
                .min(in_size as i64)
                .max(xmin as i64) as usize;
            let n = (xmax - xmin).min(ksize);
            let mut ww = 0.0;
            for (x, wx) in w.iter_mut().enumerate().take(n) {
                *wx = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
                ww += *wx;
            }
            for x in 0..n {
                let v = if ww != 0.0 { w[x] / ww } else { w[x] };
                let scaled = v * (1i64 << PRECISION_BITS) as f64;
                k[xx * ksize + x] = if v < 0.0 {
                    (scaled - 0.5) as i32
                } else {
                    (scaled + 0.5) as i32
                };
            }
            bounds.push((xmin, n));
        }
        Self { ksize, bounds, k }
    }
}
