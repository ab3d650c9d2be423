//! Only a seed given: diffusers' StableDiffusionInstructPix2PixPipeline with
//! `generator=torch.Generator().manual_seed(SEED)` (or a list of generators, one per item) draws
//! the initial latents and every stochastic step's noise; ip2p must draw the same
//! (fixtures/rng/tiny_*.safetensors, made by tools/fixtures/fx_rng.py; 10 steps, guidance 7.5/1.5).
//!
//! Tolerance: 1e-3 relative L2 on the final latents and the decoded images, the pipeline
//! tolerance of tests/parity.rs (ten guided UNet evaluations amplify f32 rounding). The noise
//! itself is bit-exact (crates/ip2p-sched/tests/torch_rng.rs), so any error in the order or
//! shape of the draws shows up here as an O(1) difference, far above 1e-3.

use burn::tensor::Tensor;
use ip2p_nn::testing::{Fixture, assert_close, assert_fixture, fixtures_dir};
use ip2p_pipeline::*;
use ip2p_sched::{Ddim, NormalKernel, Scheduler, SchedulerKind, TorchGenerator};

type B = burn::backend::Flex;
const TOL: f64 = 1e-3;

fn model() -> Ip2pModel<B> {
    Ip2pModel::load(
        fixtures_dir().join("models").join("tiny"),
        &Default::default(),
        &LoadOptions::default(),
    )
    .unwrap()
}

fn meta<T: serde::de::DeserializeOwned>(fx: &Fixture, key: &str) -> T {
    let run: serde_json::Value = fx.meta_json("run");
    serde_json::from_value(run[key].clone()).unwrap_or_else(|e| panic!("run.{key}: {e}"))
}

/// The f32 randn kernel torch used for the fixture (x86 torch: the AVX2 one).
fn kernel(fx: &Fixture) -> NormalKernel {
    match meta::<String>(fx, "torch_kernel").as_str() {
        "avx2" => NormalKernel::Avx2,
        "portable" => NormalKernel::Portable,
        other => panic!("unknown torch_kernel {other}"),
    }
}

fn scheduler(m: &Ip2pModel<B>, name: &str) -> Box<dyn Scheduler<B>> {
    match name {
        "euler-ancestral" => m.scheduler(None).unwrap(), // the folder's own
        "ddpm" => m.scheduler(Some(SchedulerKind::Ddpm)).unwrap(),
        "ddim-eta1" => Box::new(
            Ddim::new(&m.scheduler_config)
                .unwrap()
                .with_eta(1.0)
                .unwrap(),
        ),
        other => panic!("unknown scheduler {other}"),
    }
}

fn options(fx: &Fixture, budget: Option<u64>) -> EditOptions {
    EditOptions {
        steps: meta(fx, "steps"),
        guidance_scale: meta(fx, "guidance_scale"),
        image_guidance_scale: meta(fx, "image_guidance_scale"),
        memory_budget: budget,
        ..EditOptions::default()
    }
}

/// The fixture's generator: one seeded torch generator, or one per item.
fn generator(fx: &Fixture) -> Generator {
    let k = kernel(fx);
    let run: serde_json::Value = fx.meta_json("run");
    match run.get("seeds") {
        Some(_) => Generator::per_item_generators(
            meta::<Vec<u64>>(fx, "seeds")
                .into_iter()
                .map(|s| TorchGenerator::with_kernel(s, k))
                .collect(),
        ),
        None => TorchGenerator::with_kernel(meta(fx, "seed"), k).into(),
    }
}

/// Final latents of the fixture's run, given only its generator.
fn latents(m: &Ip2pModel<B>, fx: &Fixture, sched: &str, budget: Option<u64>) -> Tensor<B, 4> {
    let mut s = scheduler(m, sched);
    m.edit_with_generator(
        s.as_mut(),
        &mut generator(fx),
        fx.tensor("pixels", &m.device),
        Prompts::Text(meta(fx, "prompts")),
        false,
        true,
        RunSettings {
            options: options(fx, budget),
            ..Default::default()
        },
    )
    .unwrap()
    .output
}

fn matches_diffusers(file: &str, sched: &str) {
    let m = model();
    let fx = Fixture::open(format!("rng/{file}.safetensors"));
    let out = latents(&m, &fx, sched, None);
    assert_fixture(&fx, "latents", out.clone(), TOL);
    let image = m.vae.as_ref().unwrap().decode_scaled(out).unwrap();
    assert_fixture(&fx, "image", image, TOL);
}

#[test]
fn euler_ancestral_batch_1() {
    matches_diffusers("tiny_euler-ancestral_b1", "euler-ancestral");
}

#[test]
fn euler_ancestral_batch_2() {
    matches_diffusers("tiny_euler-ancestral_b2", "euler-ancestral");
}

#[test]
fn ddpm_batch_1() {
    matches_diffusers("tiny_ddpm_b1", "ddpm");
}

#[test]
fn ddpm_batch_2() {
    matches_diffusers("tiny_ddpm_b2", "ddpm");
}

#[test]
fn ddim_eta_1_batch_1() {
    matches_diffusers("tiny_ddim-eta1_b1", "ddim-eta1");
}

#[test]
fn ddim_eta_1_batch_2() {
    matches_diffusers("tiny_ddim-eta1_b2", "ddim-eta1");
}

/// diffusers' list of generators: item i draws from generator i only.
#[test]
fn one_generator_per_item() {
    matches_diffusers("tiny_euler-ancestral_b2_items", "euler-ancestral");
}

/// A memory budget that runs the batch one edit at a time leaves every edit's noise as
/// diffusers draws it for the whole batch (one generator) or for its item (per item).
#[test]
fn chunking_keeps_diffusers_noise() {
    let m = model();
    for file in ["tiny_euler-ancestral_b2", "tiny_euler-ancestral_b2_items"] {
        let fx = Fixture::open(format!("rng/{file}.safetensors"));
        let out = latents(&m, &fx, "euler-ancestral", Some(1));
        assert_fixture(&fx, "latents", out, TOL);
    }
}

/// `Ip2pModel::edit` with the default options seeds torch's generator from `options.seed`;
/// `RngKind::Ip2p` keeps the earlier generator, whose noise is different.
#[test]
fn the_default_rng_is_torch_and_ip2p_is_still_there() {
    let m = model();
    let fx = Fixture::open("rng/tiny_euler-ancestral_b1.safetensors");
    let run = |rng: RngKind| {
        let mut s = scheduler(&m, "euler-ancestral");
        let options = EditOptions {
            seed: meta(&fx, "seed"),
            rng,
            ..options(&fx, None)
        };
        m.edit(
            s.as_mut(),
            fx.tensor("pixels", &m.device),
            Prompts::Text(meta(&fx, "prompts")),
            false,
            true,
            RunSettings {
                options,
                ..Default::default()
            },
        )
        .unwrap()
        .output
    };
    // On a CPU whose torch kernel is not the fixture's, the noise moves by a few ulps.
    assert_fixture(&fx, "latents", run(RngKind::default()), TOL);
    let ip2p = run(RngKind::Ip2p);
    assert_close("ip2p rng, twice", run(RngKind::Ip2p), ip2p.clone(), 0.0);
    let expected: Tensor<B, 4> = fx.tensor("latents", &m.device);
    let d = ip2p_nn::testing::diff(
        &ip2p.into_data().convert::<f64>().to_vec::<f64>().unwrap(),
        &expected
            .into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .unwrap(),
    );
    assert!(d.rel_l2 > 0.1, "ip2p's generator gave diffusers' result");
}

/// diffusers refuses a list of generators whose length is not the batch; so does ip2p.
#[test]
fn a_generator_per_item_needs_one_per_edit() {
    let m = model();
    let fx = Fixture::open("rng/tiny_euler-ancestral_b2.safetensors");
    let mut s = scheduler(&m, "euler-ancestral");
    let err = m
        .edit_with_generator(
            s.as_mut(),
            &mut Generator::per_item([1, 2, 3]),
            fx.tensor("pixels", &m.device),
            Prompts::Text(meta(&fx, "prompts")),
            false,
            true,
            RunSettings {
                options: EditOptions {
                    steps: 1,
                    ..EditOptions::default()
                },
                ..Default::default()
            },
        )
        .err()
        .expect("three generators for two edits");
    assert!(
        matches!(
            err,
            PipelineError::Sched(ip2p_sched::SchedError::GeneratorCount {
                generators: 3,
                batch: 2
            })
        ),
        "{err}"
    );
}
