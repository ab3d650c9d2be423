//! Image input/output against PIL and diffusers' VaeImageProcessor (fixtures/vae/images.safetensors
//! and src.png, made by tools/fixtures/fx_vae.py), and the typed errors for bad files.

use std::path::PathBuf;

use burn::tensor::{DType, Tensor};
use image::{GrayImage, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use ip2p_nn::testing::{Fixture, assert_fixture, fixtures_dir};
use ip2p_vae::image_io::{
    self, ResizeRule, decode_image, fit, resize_for_vae, resize_lanczos, target_size,
};
use ip2p_vae::{VaeError, images_to_tensor, load_image, save_image, tensor_to_images};

type B = burn::backend::Flex;

fn fx() -> Fixture {
    Fixture::open("vae/images.safetensors")
}

/// A uint8 HWC fixture tensor as an image.
fn fx_image(fx: &Fixture, name: &str) -> RgbImage {
    let (vals, shape) = fx.ints(name);
    assert_eq!(shape.len(), 3);
    RgbImage::from_raw(
        shape[1] as u32,
        shape[0] as u32,
        vals.into_iter().map(|v| v as u8).collect(),
    )
    .unwrap()
}

/// Largest per-channel difference, and how many values differ.
fn pixel_diff(a: &RgbImage, b: &RgbImage) -> (u8, usize) {
    assert_eq!(a.dimensions(), b.dimensions());
    let mut max = 0;
    let mut n = 0;
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        n += (d > 0) as usize;
    }
    (max, n)
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ip2p-vae-img-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn png_fixture_decodes_to_the_same_pixels() {
    let fx = fx();
    let img = load_image(fixtures_dir().join("vae/src.png")).unwrap();
    assert_eq!(pixel_diff(&img, &fx_image(&fx, "src")), (0, 0));
}

#[test]
fn resize_matches_pil_lanczos_exactly() {
    let fx = fx();
    let src = fx_image(&fx, "src");
    // diffusers' rule: 71×45 → 64×40, PIL LANCZOS.
    let expected = fx_image(&fx, "diffusers_resized");
    let ours = resize_for_vae(&src, ResizeRule::Diffusers, 8).unwrap();
    // Our resampler is a port of Pillow's fixed-point Lanczos, so we expect bit-exact pixels.
    let d = pixel_diff(&ours, &expected);
    println!(
        "diffusers resize vs PIL: max diff {}, differing values {}",
        d.0, d.1
    );
    assert_eq!(d, (0, 0));
    // The original InstructPix2Pix rule (ImageOps.fit with a fractional crop box), down and up.
    let resolutions: Vec<u32> = fx.meta_json("ip2p_resolutions");
    for (name, resolution) in ["ip2p_fit", "ip2p_fit_up"].into_iter().zip(resolutions) {
        let expected = fx_image(&fx, name);
        let ours = resize_for_vae(&src, ResizeRule::Ip2p { resolution }, 8).unwrap();
        let d = pixel_diff(&ours, &expected);
        println!(
            "{name} ({}×{}) vs PIL: max diff {}, differing values {}",
            ours.width(),
            ours.height(),
            d.0,
            d.1
        );
        assert_eq!(d, (0, 0));
    }
    // The image crate's own Lanczos3 is close to PIL but not equal; we do not use it.
    let theirs = image::imageops::resize(&src, 64, 40, image::imageops::FilterType::Lanczos3);
    println!(
        "image crate Lanczos3 vs PIL: {:?}",
        pixel_diff(&theirs, &expected_diffusers(&fx))
    );
}

fn expected_diffusers(fx: &Fixture) -> RgbImage {
    fx_image(fx, "diffusers_resized")
}

#[test]
fn resize_rules_sizes() {
    // Sizes from the reference's worked examples of edit_cli.py's rule.
    let ip2p = ResizeRule::Ip2p { resolution: 512 };
    assert_eq!(target_size(1024, 768, ip2p, 8), (512, 384));
    assert_eq!(target_size(1000, 700, ip2p, 8), (512, 384));
    assert_eq!(target_size(2000, 100, ip2p, 8), (1280, 64));
    assert_eq!(target_size(504, 504, ResizeRule::Diffusers, 8), (504, 504));
    assert_eq!(target_size(511, 300, ResizeRule::Diffusers, 8), (504, 296));
    // A size already right is left untouched (PIL copies too).
    let img = RgbImage::from_fn(16, 8, |x, y| Rgb([x as u8, y as u8, 7]));
    assert_eq!(resize_lanczos(&img, 16, 8), img);
    assert_eq!(fit(&img, 16, 8), img);
    // A result under one latent pixel is an error, not a panic.
    let small = RgbImage::new(12, 9);
    assert!(matches!(
        resize_for_vae(&small, ResizeRule::Diffusers, 16),
        Err(VaeError::Input(_))
    ));
}

#[test]
fn to_tensor_matches_diffusers_preprocess() {
    let device = Default::default();
    let fx = fx();
    let resized = expected_diffusers(&fx);
    let t: Tensor<B, 4> = images_to_tensor(&[resized], &device, DType::F32).unwrap();
    // Same f32 arithmetic as numpy/torch (v/255, then 2x-1): exact.
    let d = assert_fixture(&fx, "diffusers_tensor", t, 1e-7);
    assert_eq!(d.max_abs, 0.0);
    let a = RgbImage::new(8, 8);
    let b = RgbImage::new(16, 8);
    assert!(images_to_tensor::<B>(&[a, b], &device, DType::F32).is_err());
    assert!(images_to_tensor::<B>(&[], &device, DType::F32).is_err());
}

#[test]
fn from_tensor_matches_diffusers_postprocess() {
    let device = Default::default();
    let fx = fx();
    let out = tensor_to_images::<B>(fx.tensor("post_in", &device)).unwrap();
    assert_eq!(pixel_diff(&out[0], &fx_image(&fx, "post_out")), (0, 0));
    // Round trip of exact 8-bit values.
    let img = fx_image(&fx, "src");
    let back = tensor_to_images(
        images_to_tensor::<B>(std::slice::from_ref(&img), &device, DType::F32).unwrap(),
    )
    .unwrap();
    assert_eq!(back[0], img);
    assert!(tensor_to_images::<B>(Tensor::zeros([1, 4, 2, 2], &device)).is_err());
}

#[test]
fn rgb_conversion_drops_alpha_and_expands_grey() {
    let dir = temp_dir("rgb");
    let rgba = RgbaImage::from_fn(9, 10, |x, y| {
        Rgba([x as u8 * 20, y as u8 * 20, 100, (x * y) as u8])
    });
    let path = dir.join("rgba.png");
    rgba.save(&path).unwrap();
    let rgb = load_image(&path).unwrap();
    for (x, y, p) in rgb.enumerate_pixels() {
        let q = rgba.get_pixel(x, y);
        assert_eq!(p.0, [q[0], q[1], q[2]]);
    }
    let grey = GrayImage::from_fn(8, 12, |x, y| Luma([(x * 10 + y) as u8]));
    let path = dir.join("grey.png");
    grey.save(&path).unwrap();
    let rgb = load_image(&path).unwrap();
    assert_eq!(rgb.dimensions(), (8, 12));
    for (x, y, p) in rgb.enumerate_pixels() {
        let g = grey.get_pixel(x, y)[0];
        assert_eq!(p.0, [g, g, g]);
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn png_jpeg_webp_round_trip() {
    let dir = temp_dir("formats");
    let img = fx_image(&fx(), "src");
    for ext in ["png", "webp", "jpg", "JPEG"] {
        let path = dir.join(format!("out.{ext}"));
        save_image(&img, &path).unwrap();
        let back = load_image(&path).unwrap();
        let (max, _) = pixel_diff(&back, &img);
        let mean: f64 = back
            .as_raw()
            .iter()
            .zip(img.as_raw())
            .map(|(a, b)| a.abs_diff(*b) as f64)
            .sum::<f64>()
            / img.as_raw().len() as f64;
        println!("{ext}: max diff {max}, mean abs diff {mean:.2}");
        if ext == "png" || ext == "webp" {
            assert_eq!(max, 0, "{ext} is lossless");
        } else {
            // JPEG q95 on a noisy image: a few levels on average.
            assert!(mean < 6.0, "{ext} mean diff {mean}");
        }
    }
    let err = save_image(&img, dir.join("out.bmp")).unwrap_err();
    assert!(matches!(err, VaeError::UnsupportedFormat { .. }), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn bad_files_are_typed_errors() {
    let dir = temp_dir("bad");
    let good = std::fs::read(fixtures_dir().join("vae/src.png")).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty.png", Vec::new()),
        (
            "garbage.png",
            b"definitely not an image, just some text".to_vec(),
        ),
        ("truncated.png", good[..good.len() / 2].to_vec()),
        (
            "bad_jpeg.jpg",
            [&[0xFFu8, 0xD8, 0xFF, 0xE0][..], &[0u8; 64][..]].concat(),
        ),
    ];
    for (name, bytes) in &cases {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = load_image(&path).unwrap_err();
        println!("{name}: {err}");
        match *name {
            "empty.png" => assert!(matches!(err, VaeError::EmptyImage { .. }), "{err:?}"),
            _ => assert!(matches!(err, VaeError::CorruptImage { .. }), "{err:?}"),
        }
    }
    let tiny = RgbImage::new(7, 20);
    let path = dir.join("small.png");
    tiny.save(&path).unwrap();
    let err = load_image(&path).unwrap_err();
    assert!(
        matches!(
            err,
            VaeError::ImageTooSmall {
                width: 7,
                height: 20,
                min: 8,
                ..
            }
        ),
        "{err}"
    );
    let err = load_image(dir.join("missing.png")).unwrap_err();
    assert!(matches!(err, VaeError::Io { .. }), "{err}");
    assert!(matches!(
        decode_image(&[], "mem"),
        Err(VaeError::EmptyImage { .. })
    ));
    let _ = image_io::MIN_SIDE;
    std::fs::remove_dir_all(dir).ok();
}
