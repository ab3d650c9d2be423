//! Images in and out: PNG/JPEG/WebP files, RGB conversion, the resize rules of diffusers and of
//! the original InstructPix2Pix, and conversion to and from [-1, 1] tensors.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use image::{DynamicImage, ImageFormat, RgbImage};

use crate::error::VaeError;
use crate::resample::{self, Filter};

/// The smallest side ip2p accepts: one latent pixel of SD 1.5.
pub const MIN_SIDE: u32 = 8;

/// How an input image is brought to a size the VAE takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResizeRule {
    /// diffusers' `VaeImageProcessor`: each side down to a multiple of `multiple` (8 for SD 1.5),
    /// Lanczos, no crop. A side that is already a multiple is left alone.
    #[default]
    Diffusers,
    /// The original InstructPix2Pix `edit_cli.py`: scale so the long side is about
    /// `resolution` (512), short side rounded up and both sides down to multiples of 64, then
    /// `ImageOps.fit` (centre crop to the aspect ratio, Lanczos).
    Ip2p { resolution: u32 },
    /// Leave the size alone (it must already be a multiple of the VAE's factor).
    None,
}

/// The default of [`load_image`] and [`decode_image`]'s pixel limit: what the machine's memory
/// holds for SD 1.5's VAE at that size (about 4 KiB of activations per pixel in its encoder
/// and decoder, so `MemTotal` / 4 KiB), between 4 and 64 megapixels; 16 Mpx where the memory
/// cannot be read.
pub fn default_max_pixels() -> u64 {
    const MIN: u64 = 4 << 20;
    const MAX: u64 = 64 << 20;
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib << 10)
    });
    match total {
        Some(bytes) => (bytes / 4096).clamp(MIN, MAX),
        None => 16 << 20,
    }
}

/// Read a PNG, JPEG or WebP file as 8-bit RGB (alpha dropped, greyscale expanded), refusing
/// images above [`default_max_pixels`].
pub fn load_image(path: impl AsRef<Path>) -> Result<RgbImage, VaeError> {
    load_image_limited(path, default_max_pixels())
}

/// [`load_image`] with a pixel limit of `max_pixels`.
pub fn load_image_limited(path: impl AsRef<Path>, max_pixels: u64) -> Result<RgbImage, VaeError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| VaeError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_image_limited(&bytes, path, max_pixels)
}

/// Decode image bytes; `name` is only used in errors. Images above [`default_max_pixels`] are
/// refused.
pub fn decode_image(bytes: &[u8], name: impl AsRef<Path>) -> Result<RgbImage, VaeError> {
    decode_image_limited(bytes, name, default_max_pixels())
}

/// [`decode_image`] with a pixel limit of `max_pixels`. The size is read from the file's header
/// and checked before anything is decoded, and the decoder may allocate no more than that many
/// pixels need (16-bit RGBA), so a decompression bomb is refused, not expanded.
pub fn decode_image_limited(
    bytes: &[u8],
    name: impl AsRef<Path>,
    max_pixels: u64,
) -> Result<RgbImage, VaeError> {
    let path = name.as_ref().to_path_buf();
    if bytes.is_empty() {
        return Err(VaeError::EmptyImage { path });
    }
    let corrupt = |e: image::ImageError| VaeError::CorruptImage {
        path: path.clone(),
        reason: e.to_string(),
    };
    let format = image::guess_format(bytes).map_err(corrupt)?;
    if !matches!(
        format,
        ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP
    ) {
        return Err(VaeError::CorruptImage {
            path,
            reason: format!("{format:?} is not supported"),
        });
    }
    let reader = || image::ImageReader::with_format(Cursor::new(bytes), format);
    let (width, height) = reader().into_dimensions().map_err(corrupt)?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(VaeError::ImageTooLarge {
            path,
            width,
            height,
            max_pixels,
        });
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    limits.max_alloc = Some(pixels.saturating_mul(8).max(64 << 20));
    let mut decoder = reader();
    decoder.limits(limits);
    let img = decoder.decode().map_err(corrupt)?;
    let rgb = to_rgb(img);
    check_size(&rgb, &path)?;
    Ok(rgb)
}

/// RGB of any decoded image: alpha is dropped (not composited, as PIL's `convert("RGB")`),
/// grey is copied to all three channels, 16-bit and float are brought to 8 bits.
pub fn to_rgb(img: DynamicImage) -> RgbImage {
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    }
}

fn check_size(img: &RgbImage, path: &Path) -> Result<(), VaeError> {
    let (width, height) = img.dimensions();
    if width < MIN_SIDE || height < MIN_SIDE {
        return Err(VaeError::ImageTooSmall {
            path: path.to_path_buf(),
            width,
            height,
            min: MIN_SIDE,
        });
    }
    Ok(())
}

/// Write `img` as PNG, JPEG (quality 95) or lossless WebP, chosen by the file extension,
/// atomically: encoded in memory, written to a temporary file in the same folder and renamed,
/// so `path` holds the old image or the new one, never part of one.
pub fn save_image(img: &RgbImage, path: impl AsRef<Path>) -> Result<(), VaeError> {
    let path = path.as_ref();
    let bytes = encode_image(img, path)?;
    ip2p_io::write(path, &bytes).map_err(|e| VaeError::Io {
        path: e.path,
        source: e.source,
    })
}

/// `img` encoded as [`save_image`] would write it to `path` (the format from its extension).
pub fn encode_image(img: &RgbImage, path: impl AsRef<Path>) -> Result<Vec<u8>, VaeError> {
    let path = path.as_ref();
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let encode_err = |e: image::ImageError| VaeError::Encode {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut buf = Cursor::new(Vec::new());
    match ext.as_deref() {
        Some("png") => img
            .write_to(&mut buf, ImageFormat::Png)
            .map_err(encode_err)?,
        Some("jpg" | "jpeg") => {
            let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 95);
            img.write_with_encoder(enc).map_err(encode_err)?
        }
        Some("webp") => {
            let enc = image::codecs::webp::WebPEncoder::new_lossless(&mut buf);
            img.write_with_encoder(enc).map_err(encode_err)?
        }
        _ => {
            return Err(VaeError::UnsupportedFormat {
                path: path.to_path_buf(),
            });
        }
    }
    Ok(buf.into_inner())
}

/// The output size of a rule for a `width × height` input; `multiple` is the VAE's factor.
pub fn target_size(width: u32, height: u32, rule: ResizeRule, multiple: u32) -> (u32, u32) {
    match rule {
        ResizeRule::Diffusers => (width - width % multiple, height - height % multiple),
        ResizeRule::Ip2p { resolution } => ip2p_size(width, height, resolution),
        ResizeRule::None => (width, height),
    }
}

/// edit_cli.py's arithmetic, in f64 as Python does it.
fn ip2p_size(width: u32, height: u32, resolution: u32) -> (u32, u32) {
    let (w, h) = (width as f64, height as f64);
    let factor = resolution as f64 / w.max(h);
    let short = w.min(h);
    let factor = (short * factor / 64.0).ceil() * 64.0 / short;
    let w = ((w * factor) / 64.0).floor() as u32 * 64;
    let h = ((h * factor) / 64.0).floor() as u32 * 64;
    (w, h)
}

/// Bring an image to a size the VAE takes (`multiple`: the VAE's downscale factor, 8).
///
/// Errors when the result would be smaller than `multiple` on a side.
pub fn resize_for_vae(
    img: &RgbImage,
    rule: ResizeRule,
    multiple: u32,
) -> Result<RgbImage, VaeError> {
    let (w, h) = img.dimensions();
    let (tw, th) = target_size(w, h, rule, multiple);
    if tw < multiple.max(1) || th < multiple.max(1) || tw % multiple != 0 || th % multiple != 0 {
        return Err(VaeError::Input(format!(
            "an image of {w}×{h} becomes {tw}×{th} under {rule:?}, which the VAE cannot take (sides must be positive multiples of {multiple})"
        )));
    }
    Ok(match rule {
        ResizeRule::Ip2p { .. } => fit(img, tw, th),
        _ => resize_lanczos(img, tw, th),
    })
}

/// PIL's `Image.resize(size, LANCZOS)`.
pub fn resize_lanczos(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    resample::resize(img, width, height, Filter::Lanczos)
}

/// PIL's `ImageOps.fit(img, size, LANCZOS)` (no bleed, centred): crop the largest centred
/// region of the target's aspect ratio (fractional edges allowed) and resize it.
pub fn fit(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = (img.width() as f64, img.height() as f64);
    let live_ratio = w / h;
    let out_ratio = width as f64 / height as f64;
    let (cw, ch) = if live_ratio == out_ratio {
        (w, h)
    } else if live_ratio >= out_ratio {
        (out_ratio * h, h)
    } else {
        (w, w / out_ratio)
    };
    let left = (w - cw) * 0.5;
    let top = (h - ch) * 0.5;
    resample::resize_box(
        img,
        width,
        height,
        [left, top, left + cw, top + ch],
        Filter::Lanczos,
    )
}

/// Stack equally sized RGB images into `[n, 3, h, w]` in [-1, 1] (`2·(v/255) - 1`, as
/// diffusers' `VaeImageProcessor.preprocess`), in `dtype`.
pub fn images_to_tensor<B: Backend>(
    images: &[RgbImage],
    device: &B::Device,
    dtype: DType,
) -> Result<Tensor<B, 4>, VaeError> {
    let first = images
        .first()
        .ok_or_else(|| VaeError::Input("no images to convert".into()))?;
    let (w, h) = first.dimensions();
    if let Some(other) = images.iter().find(|i| i.dimensions() != (w, h)) {
        return Err(VaeError::Input(format!(
            "images of different sizes cannot share a batch: {w}×{h} and {}×{}",
            other.width(),
            other.height()
        )));
    }
    let (w, h) = (w as usize, h as usize);
    let mut data = Vec::with_capacity(images.len() * 3 * h * w);
    for img in images {
        let raw = img.as_raw();
        for c in 0..3 {
            data.extend(
                raw[c..]
                    .iter()
                    .step_by(3)
                    .map(|&v| (v as f32 / 255.0) * 2.0 - 1.0),
            );
        }
    }
    let t: Tensor<B, 4> = Tensor::from_data(TensorData::new(data, [images.len(), 3, h, w]), device);
    Ok(t.cast(dtype))
}

/// `[n, 3, h, w]` images in [-1, 1] → 8-bit RGB: `round(clamp(x/2 + 0.5, 0, 1)·255)` with
/// ties to even, exactly as diffusers' `postprocess` + `numpy_to_pil`.
pub fn tensor_to_images<B: Backend>(x: Tensor<B, 4>) -> Result<Vec<RgbImage>, VaeError> {
    let [n, c, h, w] = x.dims();
    if c != 3 {
        return Err(VaeError::Channels {
            what: "image tensor",
            expected: 3,
            found: c,
            shape: [n, c, h, w],
        });
    }
    let vals: Vec<f32> = x
        .cast(DType::F32)
        .mul_scalar(0.5)
        .add_scalar(0.5)
        .clamp(0.0, 1.0)
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| VaeError::Input(format!("image tensor: {e:?}")))?;
    let plane = h * w;
    (0..n)
        .map(|i| {
            let mut raw = vec![0u8; plane * 3];
            for ch in 0..3 {
                let src = &vals[(i * 3 + ch) * plane..][..plane];
                for (p, v) in src.iter().enumerate() {
                    raw[p * 3 + ch] = (v * 255.0).round_ties_even().clamp(0.0, 255.0) as u8;
                }
            }
            RgbImage::from_raw(w as u32, h as u32, raw)
                .ok_or_else(|| VaeError::Input("image tensor: size overflow".into()))
        })
        .collect()
}

/// Load image files and make them one batch for [`crate::AutoencoderKL::encode`]: RGB, resized by
/// `rule`, to `[n, 3, h, w]` in [-1, 1].
pub fn load_batch<B: Backend>(
    paths: &[PathBuf],
    rule: ResizeRule,
    multiple: u32,
    device: &B::Device,
    dtype: DType,
) -> Result<Tensor<B, 4>, VaeError> {
    let images = paths
        .iter()
        .map(|p| resize_for_vae(&load_image(p)?, rule, multiple))
        .collect::<Result<Vec<_>, _>>()?;
    images_to_tensor(&images, device, dtype)
}
