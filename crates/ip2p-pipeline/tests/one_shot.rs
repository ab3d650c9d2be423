//! `edit_one_shot` (each part loaded for its stage, then dropped) gives the result of a model
//! held whole, and diffusers' (fixtures/pipeline, 1e-3 as in parity.rs). Against the held
//! model the computations are the same functions on the same inputs: 1e-6.

use burn::tensor::Tensor;
use ip2p_nn::testing::{Fixture, assert_close, assert_fixture, fixtures_dir};
use ip2p_pipeline::*;
use ip2p_sched::SchedulerKind;

type B = burn::backend::Flex;

fn settings<'a>(fx: &Fixture) -> RunSettings<'a, B> {
    let run: serde_json::Value = fx.meta_json("run");
    RunSettings {
        options: EditOptions {
            steps: run["steps"].as_u64().unwrap() as usize,
            guidance_scale: run["guidance_scale"].as_f64().unwrap(),
            image_guidance_scale: run["image_guidance_scale"].as_f64().unwrap(),
            ..EditOptions::default()
        },
        init_latents: Some(fx.tensor("noise", &Default::default())),
        ..Default::default()
    }
}

fn prompts(fx: &Fixture) -> Prompts<B> {
    let run: serde_json::Value = fx.meta_json("run");
    Prompts::Text(serde_json::from_value(run["prompts"].clone()).unwrap())
}

#[test]
fn one_shot_matches_the_held_model_and_diffusers() {
    let dir = fixtures_dir().join("models").join("tiny");
    let device = Default::default();
    let fx = Fixture::open("pipeline/tiny_euler.safetensors");
    let pixels: Tensor<B, 4> = fx.tensor("pixels", &device);
    let load = LoadOptions::default();

    let run = |return_latents: bool| {
        edit_one_shot::<B>(
            &dir,
            &device,
            &load,
            Some(SchedulerKind::Euler),
            pixels.clone(),
            prompts(&fx),
            false,
            return_latents,
            settings(&fx),
        )
        .unwrap()
    };

    // Full cycle, images out.
    let one = run(false);
    assert_fixture(&fx, "image", one.output.clone(), 1e-3);
    let held = Ip2pModel::<B>::load(&dir, &device, &load).unwrap();
    let mut sched = held.scheduler(Some(SchedulerKind::Euler)).unwrap();
    let whole = held
        .edit(
            sched.as_mut(),
            pixels.clone(),
            prompts(&fx),
            false,
            false,
            settings(&fx),
        )
        .unwrap();
    assert_close("one-shot vs held", one.output, whole.output, 1e-6);

    // Every stage ran, in order, and each part's load was timed (the VAE twice).
    let stages: Vec<Stage> = one.report.stages.iter().map(|s| s.stage).collect();
    assert_eq!(stages.first(), Some(&Stage::Tokenize), "{stages:?}");
    assert_eq!(stages[1], Stage::TextEncode);
    assert_eq!(stages[2], Stage::VaeEncode);
    assert!(matches!(stages[3], Stage::Denoise(0)), "{stages:?}");
    assert_eq!(stages.last(), Some(&Stage::VaeDecode));
    let t = one.load_times;
    assert!(
        t.unet_s > 0.0 && t.vae_s.is_some() && t.text_s.is_some(),
        "{t:?}"
    );

    // Latents out: the decoder is never loaded; the latents are diffusers'.
    let latents = run(true);
    assert_fixture(&fx, "latents", latents.output, 1e-3);
    assert!(
        !latents
            .report
            .stages
            .iter()
            .any(|s| s.stage == Stage::VaeDecode)
    );
}

/// Latents in, prompt embeddings with their negative in: neither the VAE nor the text encoder
/// is loaded at all.
#[test]
fn one_shot_loads_only_what_the_inputs_need() {
    let dir = fixtures_dir().join("models").join("tiny");
    let device = Default::default();
    let fx = Fixture::open("pipeline/tiny_euler.safetensors");
    let latents: Tensor<B, 4> = fx.tensor("image_latents", &device);
    let embeds: Tensor<B, 3> = fx.tensor("prompt_embeds", &device);
    let out = edit_one_shot::<B>(
        &dir,
        &device,
        &LoadOptions::default(),
        Some(SchedulerKind::Euler),
        latents,
        Prompts::Embeddings {
            prompt: embeds.clone().narrow(0, 0, 2),
            negative: Some(embeds.narrow(0, 2, 1)),
        },
        true,
        true,
        settings(&fx),
    )
    .unwrap();
    assert_eq!(out.load_times.vae_s, None);
    assert_eq!(out.load_times.text_s, None);
    // diffusers' embeddings and image latents in: within the text and VAE parity of the run.
    assert_fixture(&fx, "latents", out.output, 1e-3);
}
