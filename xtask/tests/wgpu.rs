//! The WGPU backend, when this machine has an adapter (lavapipe, a software Vulkan, is enough;
//! without one each test says so and passes): the bench's smoke test, and the pipeline fixtures
//! (fixtures/pipeline, made by tools/fixtures/fx_pipeline.py with diffusers'
//! StableDiffusionInstructPix2PixPipeline) giving diffusers' numbers. One test binary, so the
//! shaders, most of the time on a software adapter, compile once.
//!
//! Tolerances, relative L2: 1e-3 against diffusers, the CPU parity tests' bound (ten guided
//! UNet evaluations amplify f32 rounding; see crates/ip2p-pipeline/tests/parity.rs), and 1e-4
//! against the CPU backend on the same inputs: both run f32, and only the order of reductions
//! (matmul tiling, GroupNorm sums) differs, which the guidance amplifies as above.
#![cfg(feature = "wgpu")]

mod common;

use burn::tensor::Tensor;
use ip2p_nn::Backend;
use ip2p_nn::testing::{Fixture, assert_close, assert_fixture, fixtures_dir};
use ip2p_pipeline::{EditOptions, Ip2pModel, LoadOptions, Prompts, RunSettings};
use ip2p_sched::SchedulerKind;
use xtask::backends::{BackendKind, wgpu_adapter};

type Gpu = burn::backend::Wgpu;
type Cpu = burn::backend::Flex;

/// Full cycle of `fixtures/pipeline/{model}_euler`: final latents and decoded images.
fn full_cycle<B: Backend>(model: &str) -> (Fixture, Tensor<B, 4>, Tensor<B, 4>) {
    let device = B::Device::default();
    let m = Ip2pModel::<B>::load(
        fixtures_dir().join("models").join(model),
        &device,
        &LoadOptions::default(),
    )
    .unwrap();
    let fx = Fixture::open(format!("pipeline/{model}_euler.safetensors"));
    let run: serde_json::Value = fx.meta_json("run");
    let prompts: Vec<String> = serde_json::from_value(run["prompts"].clone()).unwrap();
    let options = EditOptions {
        steps: run["steps"].as_u64().unwrap() as usize,
        guidance_scale: run["guidance_scale"].as_f64().unwrap(),
        image_guidance_scale: run["image_guidance_scale"].as_f64().unwrap(),
        ..EditOptions::default()
    };
    let mut sched = m.scheduler(Some(SchedulerKind::Euler)).unwrap();
    let latents = m
        .edit(
            sched.as_mut(),
            fx.tensor("pixels", &device),
            Prompts::Text(prompts),
            false,
            true,
            RunSettings {
                options,
                init_latents: Some(fx.tensor("noise", &device)),
                ..Default::default()
            },
        )
        .unwrap()
        .output;
    let images = m
        .vae
        .as_ref()
        .unwrap()
        .decode_scaled(latents.clone())
        .unwrap();
    (fx, latents, images)
}

/// Whether an adapter initialised (else the test prints why and passes).
fn have_adapter() -> bool {
    match wgpu_adapter() {
        Ok(a) => {
            eprintln!("WGPU adapter: {}", a.describe());
            true
        }
        Err(e) => {
            eprintln!("no WGPU adapter, skipped: {e}");
            false
        }
    }
}

/// The bench's smoke test: the tiny preset, one step on each path.
#[test]
fn tiny_one_step_each_path_on_wgpu() {
    if !have_adapter() {
        return;
    }
    for c in common::check(BackendKind::Wgpu, &ip2p_pipeline::NoProbe) {
        // The pool probe sees the weights and the run's tensors.
        let m = c.memory.as_ref().expect("memory");
        assert_eq!(m.source, "wgpu pool");
        assert!(
            m.baseline_bytes > 0 && m.peak_bytes > m.baseline_bytes,
            "{m:?}"
        );
    }
}

fn matches_diffusers_and_cpu(model: &str) {
    if !have_adapter() {
        return;
    }
    let (fx, latents, images) = full_cycle::<Gpu>(model);
    assert_fixture(&fx, "latents", latents.clone(), 1e-3);
    assert_fixture(&fx, "image", images.clone(), 1e-3);

    let (_, cpu_latents, cpu_images) = full_cycle::<Cpu>(model);
    let on_cpu =
        |t: Tensor<Gpu, 4>| Tensor::<Cpu, 4>::from_data(t.into_data(), &Default::default());
    assert_close("wgpu vs cpu latents", on_cpu(latents), cpu_latents, 1e-4);
    assert_close("wgpu vs cpu images", on_cpu(images), cpu_images, 1e-4);
}

#[test]
fn tiny_euler_on_wgpu() {
    matches_diffusers_and_cpu("tiny");
}

/// Three UNet levels, linear projections, per-level head dims, a 4-level VAE, non-square input.
/// Ignored by default: on lavapipe it doubles the binary's time (its own shaders compile);
/// `cargo test -p xtask --test wgpu -- --include-ignored` runs it.
#[test]
#[ignore = "slow on a software adapter: cargo test -p xtask --test wgpu -- --include-ignored"]
fn wide_euler_on_wgpu() {
    matches_diffusers_and_cpu("wide");
}
