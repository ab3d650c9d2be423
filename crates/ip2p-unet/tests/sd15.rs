//! The real SD 1.5 InstructPix2Pix UNet (random weights) at the pipeline's shapes.

use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Distribution, Tensor};
use ip2p_unet::{UNet2DConditionConfig, UNet2DConditionModel};

type B = burn::backend::Flex;

/// diffusers' `UNet2DConditionModel(**config).num_parameters()` for this config.
const SD15_IP2P_PARAMS: usize = 859_532_484;

#[test]
#[ignore = "heavy: ~860M f32 parameters (3.4 GB) and a full SD 1.5 forward on the CPU; \
            run with `cargo test -p ip2p-unet --test sd15 -- --ignored --nocapture`"]
fn sd15_ip2p_batch3_32x32() {
    let device = Default::default();
    let t0 = Instant::now();
    let unet = UNet2DConditionModel::<B>::from_config(&UNet2DConditionConfig::sd15_ip2p(), &device)
        .unwrap();
    assert_eq!(unet.num_params(), SD15_IP2P_PARAMS);
    println!("built in {:.1?}", t0.elapsed());

    // InstructPix2Pix's guidance batch: 3 × [noisy latents ‖ image latents] at 256×256 pixels.
    let sample = Tensor::<B, 4>::random([3, 8, 32, 32], Distribution::Normal(0.0, 1.0), &device);
    let context = Tensor::<B, 3>::random([3, 77, 768], Distribution::Normal(0.0, 1.0), &device);
    // Twice: the first call also pays for first-touch allocations; the second is the steady state
    // a sampling loop sees.
    for run in ["first", "second"] {
        let t0 = Instant::now();
        let out = unet
            .forward(sample.clone(), 980.25, context.clone())
            .unwrap();
        assert_eq!(out.dims(), [3, 4, 32, 32]);
        let finite = out.is_finite().all().into_data().to_vec::<bool>().unwrap()[0];
        println!(
            "{run} forward in {:.1?} (batch 3, 32×32 latents)",
            t0.elapsed()
        );
        assert!(finite, "output holds NaN or infinity");
    }
}
