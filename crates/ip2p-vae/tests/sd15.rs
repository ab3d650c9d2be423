//! The real SD 1.5 VAE (random weights) at a 256×256 image: a timing and profiling harness.

use std::time::Instant;

use burn::tensor::{Distribution, Tensor};
use ip2p_vae::{AutoencoderKL, AutoencoderKLModule, VaeConfig, VaeMemory};

type B = burn::backend::Flex;

const SD15_VAE_CONFIG: &str = r#"{
  "_class_name": "AutoencoderKL",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
  "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
  "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215
}"#;

#[test]
#[ignore = "heavy: the SD 1.5 VAE at 256×256 on the CPU; \
            run with `cargo test -p ip2p-vae --test sd15 -- --ignored --nocapture`"]
fn sd15_vae_256() {
    let device = Default::default();
    let config: VaeConfig = serde_json::from_str(SD15_VAE_CONFIG).unwrap();
    config.validate().unwrap();
    let vae = AutoencoderKL::<B> {
        model: AutoencoderKLModule::new(&config, &device),
        config,
        memory: VaeMemory::default(),
    };
    let image = Tensor::<B, 4>::random([1, 3, 256, 256], Distribution::Uniform(-1.0, 1.0), &device);
    let latents = Tensor::<B, 4>::random([1, 4, 32, 32], Distribution::Normal(0.0, 1.0), &device);
    for run in ["first", "second"] {
        let t0 = Instant::now();
        let mean = vae.encode(image.clone()).unwrap().mean;
        assert_eq!(mean.dims(), [1, 4, 32, 32]);
        let t1 = Instant::now();
        let decoded = vae.decode(latents.clone()).unwrap();
        assert_eq!(decoded.dims(), [1, 3, 256, 256]);
        println!("{run}: encode {:.2?}, decode {:.2?}", t1 - t0, t1.elapsed());
    }
}
