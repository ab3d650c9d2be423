//! The real SD 1.5 VAE (random weights, the preset's config) at a 256×256 image: a timing and
//! profiling harness.

use std::time::Instant;

use burn::tensor::{Distribution, Tensor};
use ip2p_pipeline::preset::SD15_VAE_CONFIG;
use ip2p_vae::{AutoencoderKL, AutoencoderKLModule, VaeConfig, VaeMemory};

type B = burn::backend::Flex;

#[test]
#[ignore = "heavy: the SD 1.5 VAE at 256×256 on the CPU; \
            run with `cargo test -p ip2p-pipeline --test sd15_vae -- --ignored --nocapture`"]
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
