//! PIL's `Image.resize(size)` with its default filter (bicubic, for RGB images since Pillow
//! 7), ported from Pillow's `Resample.c`: separable, horizontal pass first, 22-bit fixed-point
//! coefficients, each pass rounded and clipped to 8 bits. diffusers' training script resizes
//! with it, so the training pixels match the script's exactly (see tests/train_loop.rs).

use image::RgbImage;

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn clip8(ss: i64) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `bicubic_filter` (a = -0.5), support 2.
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

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    k: Vec<i32>,
}

impl Coeffs {
    fn new(in_size: usize, out_size: usize) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = 2.0 * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut k = vec![0i32; out_size * ksize];
        let mut w = vec![0f64; ksize];
        let ss = 1.0 / filterscale;
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64)
                .min(in_size as i64)
                .max(xmin as i64) as usize;
            let n = (xmax - xmin).min(ksize);
            let mut ww = 0.0;
            for (x, wx) in w.iter_mut().enumerate().take(n) {
                *wx = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
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

/// `img.resize((width, height))` as PIL does it for an RGB image.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (iw, ih) = img.dimensions();
    let (ow, oh) = (width as usize, height as usize);
    if ow == 0 || oh == 0 || iw == 0 || ih == 0 {
        return RgbImage::new(width, height);
    }
    if (iw, ih) == (width, height) {
        return img.clone();
    }
    let (iw, ih) = (iw as usize, ih as usize);
    let src: &[u8] = img.as_raw();
    let horiz = Coeffs::new(iw, ow);
    let vert = Coeffs::new(ih, oh);
    // Horizontal pass over the rows the vertical pass reads (all rows when it is skipped).
    let (tmp, tmp_w, row0) = if ow != iw {
        let (first, last) = if oh != ih {
            (
                vert.bounds[0].0,
                vert.bounds[oh - 1].0 + vert.bounds[oh - 1].1,
            )
        } else {
            (0, ih)
        };
        let rows = last - first;
        let mut tmp = vec![0u8; rows * ow * 3];
        for y in 0..rows {
            let in_row = &src[(first + y) * iw * 3..][..iw * 3];
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
        (src.to_vec(), iw, 0)
    };
    if oh == ih {
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
