//! The live preview: latents projected to RGB by a fixed linear map, no VAE decode.

use base64::Engine;
use burn::tensor::Tensor;
use ip2p_nn::Backend;

/// The 4×3 latent→RGB factors commonly used for SD 1.5 previews (rows: latent channels,
/// columns: R, G, B), applied to the diffusion model's (scaled) latents; the result is about
/// [-1, 1]. An approximation of the VAE decoder's colours at 1/8 of the size.
pub const SD15_LATENT_RGB: [[f32; 3]; 4] = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
];

/// The first latent of a batch `[b, 4, h, w]` as RGB8 pixels (`w × h`, row-major), or `None`
/// for latents that are not 4-channel.
pub fn latent_rgb<B: Backend>(latents: &Tensor<B, 4>) -> Option<(u32, u32, Vec<u8>)> {
    let [_, c, h, w] = latents.dims();
    if c != 4 {
        return None;
    }
    let data = latents
        .clone()
        .narrow(0, 0, 1)
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .ok()?;
    let plane = h * w;
    // Early latents are mostly noise at sigma ≫ 1; brought back to unit spread they show
    // colours instead of saturating. Latents near the end (spread ≈ 1) are left alone.
    let n = data.len().max(1) as f32;
    let mean = data.iter().sum::<f32>() / n;
    let spread = (data.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n).sqrt();
    let scale = if spread.is_finite() && spread > 1.0 {
        1.0 / spread
    } else {
        1.0
    };
    let mut rgb = Vec::with_capacity(plane * 3);
    for p in 0..plane {
        let mut px = [0f32; 3];
        for (ch, factors) in SD15_LATENT_RGB.iter().enumerate() {
            let x = data[ch * plane + p] * scale;
            for (acc, f) in px.iter_mut().zip(factors) {
                *acc += x * f;
            }
        }
        for v in px {
            let v = ((v + 1.0) * 127.5).clamp(0.0, 255.0);
            rgb.push(if v.is_finite() { v.round() as u8 } else { 0 });
        }
    }
    Some((w as u32, h as u32, rgb))
}

/// The preview as a `data:image/png;base64,...` URL (a few KiB: one pixel per latent).
pub fn data_url<B: Backend>(latents: &Tensor<B, 4>) -> String {
    let png =
        latent_rgb(latents).and_then(|(w, h, rgb)| crate::output::encode_png(w, h, &rgb, &[]).ok());
    match png {
        Some(png) => format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(png)
        ),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    type B = burn::backend::Flex;

    #[test]
    fn projects_each_pixel_with_the_factors() {
        // One pixel, latent (1, 0, 0, 0): RGB = first row of the factors.
        let x = Tensor::<B, 4>::from_data(
            TensorData::new(vec![1.0f32, 0.0, 0.0, 0.0], [1, 4, 1, 1]),
            &Default::default(),
        );
        let (w, h, rgb) = latent_rgb(&x).unwrap();
        assert_eq!((w, h), (1, 1));
        let expect: Vec<u8> = SD15_LATENT_RGB[0]
            .iter()
            .map(|v| ((v + 1.0) * 127.5).round() as u8)
            .collect();
        assert_eq!(rgb, expect);
        assert!(data_url(&x).starts_with("data:image/png;base64,"));
    }
}
