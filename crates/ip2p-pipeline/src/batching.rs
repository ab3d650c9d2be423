//! Resolution-aware batch sizing: how many edits fit in a memory budget at a given size.
//!
//! The estimate counts the activations an edit holds at its peak, from the model's own
//! configs, so it scales correctly from the tiny test models to SD 1.5: the UNet's skip
//! connections and working tensors (linear in pixels, ×3 for the guidance batch), the attention
//! scores of the first level (quadratic in pixels, bounded by the fused kernel's tiling), and
//! the VAE decoder's full-resolution tensors. Weights are not counted: the budget is for
//! activations. It is an estimate, made to err high; measure with `cargo xtask bench`.

/// What the estimate needs to know about the models.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivationModel {
    /// UNet `block_out_channels`.
    pub unet_channels: Vec<usize>,
    /// Attention heads at the first UNet level (0 if it has no attention).
    pub unet_heads_level0: usize,
    /// VAE `block_out_channels` (empty when there is no decode).
    pub vae_channels: Vec<usize>,
    /// Image pixels per latent pixel along a side (8 for SD 1.5).
    pub vae_factor: usize,
    /// Bytes per element of the activations (4 for f32, 2 for f16).
    pub bytes_per_element: usize,
}

/// Query rows the fused attention kernel holds scores for at once (flex tiles beyond this).
const ATTENTION_ROWS: usize = 4096;

impl ActivationModel {
    /// The estimate's inputs from a resolved UNet config and a VAE config; `with_vae` is false
    /// when the VAE is not loaded (latent-only work), `dtype` the activations' dtype.
    pub fn from_configs(
        unet: &ip2p_unet::UnetPlan,
        vae: &ip2p_vae::VaeConfig,
        with_vae: bool,
        dtype: burn::tensor::DType,
    ) -> Self {
        Self {
            unet_channels: unet.block_out_channels.clone(),
            unet_heads_level0: unet
                .down
                .first()
                .filter(|l| l.cross_attention)
                .map_or(0, |l| l.heads),
            vae_channels: if with_vae {
                vae.block_out_channels.clone()
            } else {
                Vec::new()
            },
            vae_factor: vae.downscale_factor(),
            bytes_per_element: dtype.size(),
        }
    }

    /// Peak activation bytes of one edit (one image) at latent size `h × w`.
    pub fn bytes_per_edit(&self, h: usize, w: usize, guidance_batch: usize) -> u64 {
        let bpe = self.bytes_per_element as u64;
        let mut unet = 0u64;
        let (mut lh, mut lw) = (h as u64, w as u64);
        for (i, &c) in self.unet_channels.iter().enumerate() {
            // A ResNet/attention level keeps ~3 tensors of its width alive: skips and work.
            unet += 3 * c as u64 * lh * lw;
            if i == 0 {
                // The largest working set: GroupNorm in/out, conv in/out, attention projections.
                unet += 6 * c as u64 * lh * lw;
            }
            lh = lh.div_ceil(2);
            lw = lw.div_ceil(2);
        }
        let tokens = h as u64 * w as u64;
        unet += self.unet_heads_level0 as u64 * tokens * tokens.min(ATTENTION_ROWS as u64);
        let unet = unet * bpe * guidance_batch as u64;

        let vae = match self.vae_channels.first() {
            Some(&c0) => {
                let (ih, iw) = ((h * self.vae_factor) as u64, (w * self.vae_factor) as u64);
                // Decoder's last level: 4 tensors of c0 channels at full size, plus the mid
                // block's single-head attention over the latent pixels.
                (4 * c0 as u64 * ih * iw + tokens * tokens.min(ATTENTION_ROWS as u64)) * 4
            }
            None => 0,
        };
        unet.max(vae)
    }

    /// How many edits of latent size `h × w` to run together within `budget` bytes: at least
    /// one (a single edit over budget still runs), at most `n`.
    pub fn chunk_size(
        &self,
        n: usize,
        h: usize,
        w: usize,
        guidance_batch: usize,
        budget: Option<u64>,
    ) -> usize {
        match budget {
            None => n.max(1),
            Some(budget) => {
                let per = self.bytes_per_edit(h, w, guidance_batch).max(1);
                ((budget / per) as usize).clamp(1, n.max(1))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15() -> ActivationModel {
        ActivationModel {
            unet_channels: vec![320, 640, 1280, 1280],
            unet_heads_level0: 8,
            vae_channels: vec![128, 256, 512, 512],
            vae_factor: 8,
            bytes_per_element: 4,
        }
    }

    #[test]
    fn larger_images_cost_more_than_linearly() {
        let m = sd15();
        let small = m.bytes_per_edit(32, 32, 3);
        let big = m.bytes_per_edit(64, 64, 3);
        assert!(big > 4 * small, "{big} vs {small}");
        // SD 1.5 at 512×512 with guidance: a few GiB of activations per edit.
        let gib = big as f64 / (1u64 << 30) as f64;
        assert!((1.0..16.0).contains(&gib), "{gib} GiB");
    }

    #[test]
    fn chunks_follow_budget_and_resolution() {
        let m = sd15();
        assert_eq!(m.chunk_size(8, 64, 64, 3, None), 8);
        let per = m.bytes_per_edit(64, 64, 3);
        assert_eq!(m.chunk_size(8, 64, 64, 3, Some(3 * per)), 3);
        assert_eq!(m.chunk_size(8, 64, 64, 3, Some(per / 2)), 1);
        assert_eq!(m.chunk_size(2, 64, 64, 3, Some(100 * per)), 2);
        // The same budget fits more small edits than large ones.
        let budget = Some(4 * per);
        assert!(m.chunk_size(64, 32, 32, 3, budget) > m.chunk_size(64, 64, 64, 3, budget));
    }

    #[test]
    fn half_precision_halves_the_unet_share() {
        let mut m = sd15();
        m.vae_channels.clear();
        let f32_bytes = m.bytes_per_edit(64, 64, 3);
        m.bytes_per_element = 2;
        assert_eq!(m.bytes_per_edit(64, 64, 3) * 2, f32_bytes);
    }
}
