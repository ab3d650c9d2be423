//! The pipeline's behaviour beyond parity: chunking, callbacks, repeats, reports and errors.

use std::path::Path;

use burn::tensor::Tensor;
use ip2p_nn::testing::{Fixture, assert_close, fixtures_dir};
use ip2p_pipeline::*;
use ip2p_sched::SchedulerKind;

type B = burn::backend::Flex;

/// The same edit run with the batch split or repeated differently: bit-identical, since the CPU
/// kernels give an item the same bits in any batch (ip2p-kernels' batch_invariance tests).
/// Before they did, other batch sizes summed in other orders (1.3e-5 after 2 steps).
const REBATCHED: f64 = 0.0;

fn tiny(options: &LoadOptions) -> Ip2pModel<B> {
    Ip2pModel::load(
        fixtures_dir().join("models/tiny"),
        &Default::default(),
        options,
    )
    .unwrap()
}

fn inputs(m: &Ip2pModel<B>) -> (Fixture, Tensor<B, 4>, Prompts<B>) {
    let fx = Fixture::open("pipeline/tiny_euler.safetensors");
    let pixels = fx.tensor("pixels", &m.device);
    let prompts = Prompts::Text(run_meta(&fx, "prompts"));
    (fx, pixels, prompts)
}

fn options(steps: usize) -> EditOptions {
    EditOptions {
        steps,
        ..EditOptions::default()
    }
}

fn edit(
    m: &Ip2pModel<B>,
    input: Tensor<B, 4>,
    prompts: Prompts<B>,
    settings: RunSettings<'_, B>,
) -> Result<EditOutput<B>, PipelineError> {
    let mut sched = m.scheduler(Some(SchedulerKind::Euler)).unwrap();
    m.edit(sched.as_mut(), input, prompts, false, true, settings)
}

/// A memory budget that fits one edit at a time gives the same numbers as the whole batch.
#[test]
fn chunked_batch_equals_whole_batch() {
    let m = tiny(&LoadOptions::default());
    let (fx, pixels, prompts) = inputs(&m);
    let noise = fx.tensor::<B, 4>("noise", &m.device);
    let whole = edit(
        &m,
        pixels.clone(),
        prompts.clone(),
        RunSettings {
            options: options(3),
            init_latents: Some(noise.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let chunked = edit(
        &m,
        pixels,
        prompts,
        RunSettings {
            options: EditOptions {
                memory_budget: Some(1),
                ..options(3)
            },
            init_latents: Some(noise),
            ..Default::default()
        },
    )
    .unwrap();
    assert_close("chunked vs whole", chunked.output, whole.output, REBATCHED);
    // Two chunks of three steps each.
    let steps = chunked
        .report
        .stages
        .iter()
        .filter(|s| matches!(s.stage, Stage::Denoise(_)))
        .count();
    assert_eq!(steps, 6);
}

#[test]
fn callback_sees_every_step_and_can_cancel() {
    let m = tiny(&LoadOptions::default());
    let (_, pixels, prompts) = inputs(&m);
    let mut seen = Vec::new();
    let mut cb = |info: &StepInfo<'_, B>| {
        seen.push((info.step, info.steps, info.latents.dims()));
        if info.step == 1 {
            Flow::Cancel
        } else {
            Flow::Continue
        }
    };
    let err = edit(
        &m,
        pixels,
        prompts,
        RunSettings {
            options: options(4),
            callback: Some(&mut cb),
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(matches!(err, PipelineError::Cancelled { step: 2 }), "{err}");
    assert_eq!(seen, vec![(0, 4, [2, 4, 16, 16]), (1, 4, [2, 4, 16, 16])]);
}

/// num_images_per_prompt keeps each image with its own prompt (diffusers tiles the images and
/// interleaves the prompts, which mismatches them): with the same noise for each repeat, the
/// repeats equal the single edit.
#[test]
fn images_per_prompt_keep_their_pairs() {
    let m = tiny(&LoadOptions::default());
    let (fx, pixels, prompts) = inputs(&m);
    let noise = fx.tensor::<B, 4>("noise", &m.device);
    let single = edit(
        &m,
        pixels.clone(),
        prompts.clone(),
        RunSettings {
            options: options(2),
            init_latents: Some(noise.clone()),
            ..Default::default()
        },
    )
    .unwrap()
    .output;
    let rows = |t: &Tensor<B, 4>, i: usize| t.clone().narrow(0, i, 1);
    let repeated_noise = Tensor::cat(
        vec![
            rows(&noise, 0),
            rows(&noise, 0),
            rows(&noise, 1),
            rows(&noise, 1),
        ],
        0,
    );
    let double = edit(
        &m,
        pixels,
        prompts,
        RunSettings {
            options: EditOptions {
                num_images_per_prompt: 2,
                ..options(2)
            },
            init_latents: Some(repeated_noise),
            ..Default::default()
        },
    )
    .unwrap()
    .output;
    assert_eq!(double.dims(), [4, 4, 16, 16]);
    for (d, s) in [(0, 0), (1, 0), (2, 1), (3, 1)] {
        assert_close(
            &format!("repeat {d}"),
            rows(&double, d),
            rows(&single, s),
            REBATCHED,
        );
    }
}

#[test]
fn report_has_every_stage() {
    let m = tiny(&LoadOptions::default());
    let (_, pixels, prompts) = inputs(&m);
    let mut sched = m.scheduler(None).unwrap();
    let probe = CountingAllocator::new();
    let out = m
        .edit(
            sched.as_mut(),
            pixels,
            prompts,
            false,
            false,
            RunSettings {
                options: options(2),
                probe: &probe,
                ..Default::default()
            },
        )
        .unwrap();
    let stages: Vec<Stage> = out.report.stages.iter().map(|s| s.stage).collect();
    assert_eq!(
        stages,
        vec![
            Stage::Tokenize,
            Stage::TextEncode,
            Stage::VaeEncode,
            Stage::Denoise(0),
            Stage::Denoise(1),
            Stage::VaeDecode
        ]
    );
    assert_eq!(out.output.dims(), [2, 3, 32, 32]);
    let table = out.report.table();
    assert!(
        table.contains("VAE decode") && table.contains("denoise (2 steps"),
        "{table}"
    );
}

/// Latent-only work needs neither VAE nor text encoder when embeddings come in.
#[test]
fn latent_only_without_vae_or_text_encoder() {
    let m = tiny(&LoadOptions {
        vae: false,
        text_encoder: false,
        ..LoadOptions::default()
    });
    assert!(m.vae.is_none() && m.text.is_none());
    let fx = Fixture::open("pipeline/tiny_euler.safetensors");
    let latents: Tensor<B, 4> = fx.tensor("image_latents", &m.device);
    let embeds: Tensor<B, 3> = fx.tensor("prompt_embeds", &m.device);
    let prompts = Prompts::Embeddings {
        prompt: embeds.clone().narrow(0, 0, 2),
        negative: Some(embeds.narrow(0, 2, 1)),
    };
    let mut sched = m.scheduler(None).unwrap();
    let out = m
        .edit(
            sched.as_mut(),
            latents.clone(),
            prompts.clone(),
            true,
            true,
            RunSettings {
                options: options(2),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(out.output.dims(), [2, 4, 16, 16]);
    // Asking for images without a VAE is a typed error, not a panic.
    let err = m
        .edit(
            sched.as_mut(),
            latents,
            prompts,
            true,
            false,
            RunSettings {
                options: options(1),
                ..Default::default()
            },
        )
        .err()
        .unwrap();
    assert!(matches!(err, PipelineError::MissingPart(_)), "{err}");
}

#[test]
fn mismatched_inputs_are_errors() {
    let m = tiny(&LoadOptions::default());
    let (fx, pixels, _) = inputs(&m);
    let one_prompt = Prompts::Text(vec!["make it snowy".into()]);
    let err = edit(&m, pixels.clone(), one_prompt, RunSettings::default())
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("2 image(s) but 1 prompt(s)"),
        "{err}"
    );

    let prompts = Prompts::Text(run_meta(&fx, "prompts"));
    let bad_noise = Tensor::<B, 4>::zeros([2, 4, 8, 8], &m.device);
    let err = edit(
        &m,
        pixels.clone(),
        prompts.clone(),
        RunSettings {
            options: options(1),
            init_latents: Some(bad_noise),
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(
        err.to_string().contains("initial latents have shape"),
        "{err}"
    );

    let ids = Prompts::Ids(vec![vec![5; 77], vec![100_000; 77]]);
    let err = edit(&m, pixels.clone(), ids, RunSettings::default())
        .err()
        .unwrap();
    assert!(matches!(err, PipelineError::Text(_)), "{err}");

    let nan_noise = Tensor::<B, 4>::full([2, 4, 16, 16], f32::NAN, &m.device);
    let err = edit(
        &m,
        pixels,
        prompts,
        RunSettings {
            options: options(1),
            init_latents: Some(nan_noise),
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(
        err.to_string().to_lowercase().contains("nan") || err.to_string().contains("finite"),
        "{err}"
    );
}

/// Two steps of `m` on the pipeline fixture's inputs and noise (prepared with `inputs_from`).
fn two_fixture_steps(m: &Ip2pModel<B>, inputs_from: &Ip2pModel<B>) -> Tensor<B, 4> {
    let (fx, pixels, prompts) = inputs(inputs_from);
    let noise = fx.tensor::<B, 4>("noise", &inputs_from.device);
    edit(
        m,
        pixels,
        prompts,
        RunSettings {
            options: options(2),
            init_latents: Some(noise),
            ..Default::default()
        },
    )
    .unwrap()
    .output
}

/// The fp16 variant files load, and the UNet and text encoder run in f16 (VAE kept in f32).
/// Two steps in f16 against f32: f16 activations carry ~1e-3 relative error per layer, so the
/// latents agree to a few 1e-2; a wrong cast or an overflow would be off by far more or be NaN.
#[test]
fn half_precision_runs_close_to_f32() {
    let f32_model = tiny(&LoadOptions::default());
    let half = tiny(&LoadOptions {
        dtype: Some(burn::tensor::DType::F16),
        variant: Some("fp16".into()),
        ..LoadOptions::default()
    });
    assert_eq!(
        half.unet.conv_in.weight.val().dtype(),
        burn::tensor::DType::F16
    );
    assert_eq!(
        half.vae.as_ref().unwrap().model.dtype(),
        burn::tensor::DType::F32
    );
    let reference = two_fixture_steps(&f32_model, &f32_model);
    let out = two_fixture_steps(&half, &f32_model);
    assert_eq!(out.dtype(), burn::tensor::DType::F32);
    assert_close("f16 vs f32 latents", out, reference, 5e-2);
}

/// The fp16 variant computed in f32 with its Conv2d/Linear weights kept in f16 (the CPU
/// default): the weights take half the memory and the edit is bit-identical to the one whose
/// weights were widened to f32 at load, since f16 → f32 is exact and the kernels see the same
/// f32 values. Every part (text encoder, VAE, UNet) runs with half weights here.
#[test]
fn half_weights_kept_give_the_widened_result_exactly() {
    use burn::tensor::DType;
    let load = |half_weights| {
        tiny(&LoadOptions {
            variant: Some("fp16".into()),
            half_weights: Some(half_weights),
            ..LoadOptions::default()
        })
    };
    let (kept, widened) = (load(true), load(false));
    assert_eq!(kept.unet.conv_in.weight.val().dtype(), DType::F16);
    assert_eq!(
        kept.unet.conv_in.bias.as_ref().unwrap().val().dtype(),
        DType::F32
    );
    assert_eq!(kept.unet.dtype(), DType::F32);
    assert_eq!(kept.vae.as_ref().unwrap().model.dtype(), DType::F32);
    assert_eq!(widened.unet.conv_in.weight.val().dtype(), DType::F32);
    // The default on the CPU backend, for a variant computed in f32, is to keep them.
    let auto = LoadOptions {
        variant: Some("fp16".into()),
        ..LoadOptions::default()
    };
    assert!(auto.precision::<B>().half_weights);
    assert!(!LoadOptions::default().precision::<B>().half_weights);

    let (a, b) = (
        two_fixture_steps(&kept, &widened),
        two_fixture_steps(&widened, &widened),
    );
    assert_eq!(
        a.to_data().as_slice::<f32>().unwrap(),
        b.to_data().as_slice::<f32>().unwrap()
    );
}

/// A 4-channel (text-to-image) UNet is refused before any weights are read.
#[test]
fn a_text_to_image_model_is_refused() {
    let dir = std::env::temp_dir().join(format!("ip2p-not-ip2p-{}", std::process::id()));
    let src = fixtures_dir().join("models/tiny");
    std::fs::create_dir_all(dir.join("unet")).unwrap();
    std::fs::copy(src.join("model_index.json"), dir.join("model_index.json")).unwrap();
    let config = std::fs::read_to_string(src.join("unet/config.json"))
        .unwrap()
        .replace("\"in_channels\": 8", "\"in_channels\": 4");
    std::fs::write(dir.join("unet/config.json"), config).unwrap();
    let err = Ip2pModel::<B>::load(&dir, &Default::default(), &LoadOptions::default())
        .err()
        .unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        matches!(err, PipelineError::NotInstructPix2Pix { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("4 input channels"), "{err}");

    let err = Ip2pModel::<B>::load(
        Path::new("/no/such/model"),
        &Default::default(),
        &LoadOptions::default(),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("model_index.json"), "{err}");
}

/// A value of the run's metadata (fx_pipeline.py stores one JSON entry, `run`).
fn run_meta<T: serde::de::DeserializeOwned>(fx: &Fixture, key: &str) -> T {
    let run: serde_json::Value = fx.meta_json("run");
    serde_json::from_value(run[key].clone()).unwrap_or_else(|e| panic!("run.{key}: {e}"))
}
