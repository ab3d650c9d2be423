//! One training step against diffusers' train_instruct_pix2pix.py on the tiny model
//! (fixtures/train/tiny_step.safetensors, made by tools/fixtures/fx_train.py): the same
//! posterior-sample noise, DDPM noise, timesteps and dropout draws give the same loss and
//! UNet gradients, and one clipped AdamW step gives the same parameters.

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::{DType, Tensor, TensorData};
use ip2p_nn::testing::{Fixture, assert_close, fixtures_dir};
use ip2p_sched::{Ddpm, PredictionType, SchedulerConfig};
use ip2p_text::PromptEncoder;
use ip2p_train::optim::{AdamW, AdamWSettings, global_grad_norm, named_grads, named_params};
use ip2p_train::*;
use ip2p_unet::UNet2DConditionModel;
use ip2p_vae::AutoencoderKL;

type I = burn::backend::Flex;
type B = Autodiff<I>;

#[derive(serde::Deserialize)]
struct Meta {
    p: f64,
    lr: f64,
    max_grad_norm: f64,
    grads: Vec<String>,
}

/// diffusers key → Burn path and whether the tensor is a Linear weight (stored transposed).
fn burn_path(key: &str) -> (String, bool) {
    let linear =
        key.contains("time_embedding.linear_") || key.contains(".attn") || key.contains(".ff.");
    let path = key
        .replace("proj_out.", "proj_out.Conv.")
        .replace("proj_in.", "proj_in.Conv.");
    (path, linear && key.ends_with(".weight"))
}

struct Setup {
    fx: Fixture,
    frozen: Frozen<I>,
    sched: Ddpm,
    unet: UNet2DConditionModel<B>,
    batch: TrainBatch<I>,
    draws: StepDraws<I>,
    meta: Meta,
}

fn setup() -> Setup {
    let dev = Default::default();
    let root = fixtures_dir().join("models/tiny");
    let fx = Fixture::open("train/tiny_step.safetensors");
    let meta: Meta = fx.meta_json("train");
    let vae = AutoencoderKL::<I>::load(root.join("vae"), &dev, DType::F32, None).unwrap();
    let text = PromptEncoder::<I>::load(&root, None, &dev).unwrap();
    let unet = UNet2DConditionModel::<B>::load(root.join("unet"), None, DType::F32, &dev).unwrap();
    let cfg = SchedulerConfig::from_file(root.join("scheduler/scheduler_config.json")).unwrap();
    let sched = Ddpm::new(&cfg).unwrap();
    let (ids, shape) = fx.ints("input_ids");
    let batch = TrainBatch {
        original: fx.tensor("original_pixels", &dev),
        edited: fx.tensor("edited_pixels", &dev),
        input_ids: ids.chunks(shape[1]).map(|c| c.to_vec()).collect(),
    };
    let draws = StepDraws {
        sample_noise: fx.tensor("sample_noise", &dev),
        noise: fx.tensor("noise", &dev),
        timesteps: fx.ints("timesteps").0.iter().map(|&t| t as usize).collect(),
        random_p: fx.values("random_p").0,
    };
    Setup {
        fx,
        frozen: Frozen { vae, text },
        sched,
        unet,
        batch,
        draws,
        meta,
    }
}

#[test]
fn one_step_matches_diffusers() {
    let Setup {
        fx,
        frozen,
        sched,
        unet,
        batch,
        draws,
        meta,
    } = setup();
    let config = StepConfig {
        conditioning_dropout: meta.p,
        prediction_type: PredictionType::Epsilon,
    };
    let (loss, aux) = training_loss(&unet, &frozen, &sched, &config, &batch, &draws).unwrap();
    // Intermediates: f32 convs and attention in a different order than torch's: 1e-4.
    assert_close(
        "latents",
        aux.latents,
        fx.tensor("latents", &Default::default()),
        1e-4,
    );
    assert_close(
        "noisy_latents",
        aux.noisy_latents,
        fx.tensor("noisy_latents", &Default::default()),
        1e-4,
    );
    assert_close(
        "image_embeds",
        aux.image_embeds,
        fx.tensor("image_embeds", &Default::default()),
        1e-4,
    );

    let loss_value = f64::from(loss.clone().into_scalar());
    let expected = fx.values("loss").0[0];
    eprintln!(
        "loss {loss_value} vs diffusers {expected}: |Δ| {:.3e}",
        (loss_value - expected).abs()
    );
    // The tolerance: 1e-4 on the loss.
    assert!((loss_value - expected).abs() <= 1e-4 * expected.abs().max(1.0));

    let grads = GradientsParams::from_grads(loss.backward(), &unet);
    let named = named_grads::<B, _>(&unet, &grads);
    for key in &meta.grads {
        let (path, linear) = burn_path(key);
        let g = named
            .get(&path)
            .unwrap_or_else(|| panic!("no gradient for {path}"))
            .clone();
        let (vals, shape) = fx.values(&format!("grad.{key}"));
        let mut expected: Tensor<I, 1> = Tensor::from_data(
            TensorData::new(
                vals.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                [vals.len()],
            ),
            &Default::default(),
        );
        if linear {
            expected = expected
                .reshape([shape[0], shape[1]])
                .transpose()
                .reshape([vals.len()]);
        }
        // The tolerance: UNet gradients to 1e-3 relative (L2).
        assert_close(&format!("grad {key}"), g, expected, 1e-3);
    }
    let norm = global_grad_norm::<B, _>(&unet, &grads);
    let expected_norm = fx.values("grad_norm").0[0];
    eprintln!("grad norm {norm} vs {expected_norm}");
    assert!((norm - expected_norm).abs() <= 1e-3 * expected_norm);

    // One AdamW step after clipping the global norm: the parameters move as torch's do.
    let mut opt = AdamW::<I>::new(AdamWSettings {
        lr: meta.lr,
        max_grad_norm: Some(meta.max_grad_norm),
        ..AdamWSettings::default()
    });
    let (unet, info) = opt.step(unet, grads);
    assert!(
        info.grad_norm > meta.max_grad_norm,
        "the fixture exercises clipping"
    );
    let params = named_params(&unet.valid());
    for key in &meta.grads {
        let (path, linear) = burn_path(key);
        let (vals, shape) = fx.values(&format!("after.{key}"));
        let mut expected: Tensor<I, 1> = Tensor::from_data(
            TensorData::new(
                vals.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                [vals.len()],
            ),
            &Default::default(),
        );
        if linear {
            expected = expected
                .reshape([shape[0], shape[1]])
                .transpose()
                .reshape([vals.len()]);
        }
        // A step of lr 1e-3 moves the weights by ~1e-3. Adam's first step divides each
        // gradient element by its own magnitude, so an element whose gradient is near zero
        // moves by up to 2·lr on a summation-order difference; the frozen VAE and text encoder
        // run on the CPU kernels, whose order differs from PyTorch's (measured 1.4e-5 of the
        // weights, i.e. ~1 % of one step). 5e-5 is 5 % of a step: a wrong update rule is ≥ 1e-3.
        assert_close(
            &format!("after {key}"),
            params[&path].clone(),
            expected,
            5e-5,
        );
    }
}

#[test]
fn dropout_masks_follow_the_script() {
    let (text, image) = dropout_masks(&[0.1, 0.75, 0.95, 0.4], 0.3);
    assert_eq!(text, vec![true, false, false, true]);
    assert_eq!(image, vec![false, true, false, true]);
}

#[test]
fn widening_conv_in_keeps_weights_and_bias() {
    let dev = Default::default();
    let mut cfg = ip2p_unet::UNet2DConditionConfig::from_file(
        fixtures_dir().join("models/tiny/unet/config.json"),
    )
    .unwrap();
    cfg.in_channels = 4;
    let unet = UNet2DConditionModel::<I>::from_config(&cfg, &dev).unwrap();
    let w4 = unet.conv_in.weight.val();
    let b4 = unet.conv_in.bias.as_ref().unwrap().val();
    let wide = widen_conv_in(unet).unwrap();
    assert_eq!(wide.in_channels, 8);
    let w8 = wide.conv_in.weight.val();
    let [o, i, k1, k2] = w8.dims();
    assert_eq!([o, i, k1, k2], [32, 8, 3, 3]);
    assert_close(
        "old weights",
        w8.clone().slice([0..o, 0..4, 0..3, 0..3]),
        w4,
        0.0,
    );
    let new = w8.slice([0..o, 4..8, 0..3, 0..3]).abs().max().into_scalar();
    assert_eq!(new, 0.0);
    assert_close("bias", wide.conv_in.bias.as_ref().unwrap().val(), b4, 0.0);
    // The widened model runs on 8-channel input.
    let x = Tensor::<I, 4>::zeros([1, 8, 16, 16], &dev);
    let ctx = Tensor::<I, 3>::zeros([1, 77, 32], &dev);
    assert_eq!(wide.forward(x, 10.0, ctx).unwrap().dims(), [1, 4, 16, 16]);
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    // Burn's balanced checkpointing recomputes activations in the backward pass; the
    // gradients are the same computation, so the fixture's tolerance holds.
    type C = Autodiff<I, BalancedCheckpointing>;
    let Setup {
        fx,
        frozen,
        sched,
        batch,
        draws,
        meta,
        ..
    } = setup();
    let dev = Default::default();
    let unet = UNet2DConditionModel::<C>::load(
        fixtures_dir().join("models/tiny/unet"),
        None,
        DType::F32,
        &dev,
    )
    .unwrap();
    let config = StepConfig {
        conditioning_dropout: meta.p,
        prediction_type: PredictionType::Epsilon,
    };
    let (loss, _) = training_loss(&unet, &frozen, &sched, &config, &batch, &draws).unwrap();
    let expected = fx.values("loss").0[0];
    assert!((f64::from(loss.clone().into_scalar()) - expected).abs() <= 1e-4);
    let grads = GradientsParams::from_grads(loss.backward(), &unet);
    let norm = global_grad_norm::<C, _>(&unet, &grads);
    let expected_norm = fx.values("grad_norm").0[0];
    assert!(
        (norm - expected_norm).abs() <= 1e-3 * expected_norm,
        "{norm} vs {expected_norm}"
    );
    let named = named_grads::<C, _>(&unet, &grads);
    let (vals, _) = fx.values("grad.conv_in.weight");
    let expected: Tensor<I, 1> = Tensor::from_data(
        TensorData::new(
            vals.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            [vals.len()],
        ),
        &dev,
    );
    assert_close(
        "checkpointed grad conv_in.weight",
        named["conv_in.weight"].clone(),
        expected,
        1e-3,
    );
}

#[test]
fn v_prediction_target_matches_get_velocity() {
    let Setup {
        fx,
        frozen,
        sched,
        batch,
        draws,
        meta,
        ..
    } = setup();
    let config = StepConfig {
        conditioning_dropout: meta.p,
        prediction_type: PredictionType::VPrediction,
    };
    let inputs = prepare_inputs(&frozen, &sched, &config, &batch, &draws).unwrap();
    // sqrt(ᾱ)·noise − sqrt(1−ᾱ)·latents in f32: 1e-5.
    assert_close(
        "v target",
        inputs.aux.target,
        fx.tensor("v_target", &Default::default()),
        1e-5,
    );
}

/// Row `i` of a batch and its draws.
fn row(batch: &TrainBatch<I>, draws: &StepDraws<I>, i: usize) -> (TrainBatch<I>, StepDraws<I>) {
    let pick = |t: &Tensor<I, 4>| t.clone().narrow(0, i, 1);
    (
        TrainBatch {
            original: pick(&batch.original),
            edited: pick(&batch.edited),
            input_ids: vec![batch.input_ids[i].clone()],
        },
        StepDraws {
            sample_noise: pick(&draws.sample_noise),
            noise: pick(&draws.noise),
            timesteps: vec![draws.timesteps[i]],
            random_p: vec![draws.random_p[i]],
        },
    )
}

#[test]
fn accumulated_micro_batches_give_the_batch_gradient() {
    // accelerate's accumulation: each micro-batch's loss / n, gradients summed. With one row
    // per micro-batch that is the whole batch's mean loss gradient (GroupNorm is per sample).
    use burn::optim::GradientsAccumulator;
    let Setup {
        frozen,
        sched,
        unet,
        batch,
        draws,
        meta,
        ..
    } = setup();
    let config = StepConfig {
        conditioning_dropout: meta.p,
        prediction_type: PredictionType::Epsilon,
    };
    let (loss, _) = training_loss(&unet, &frozen, &sched, &config, &batch, &draws).unwrap();
    let whole = GradientsParams::from_grads(loss.backward(), &unet);
    let n = batch.input_ids.len();
    let mut acc = GradientsAccumulator::<UNet2DConditionModel<B>>::new();
    for i in 0..n {
        let (b, d) = row(&batch, &draws, i);
        let (loss, _) = training_loss(&unet, &frozen, &sched, &config, &b, &d).unwrap();
        let g = loss.div_scalar(n as f64).backward();
        acc.accumulate(&unet, GradientsParams::from_grads(g, &unet));
    }
    let accumulated = acc.grads();
    let a = named_grads::<B, _>(&unet, &whole);
    let b = named_grads::<B, _>(&unet, &accumulated);
    assert_eq!(a.len(), b.len());
    for key in [
        "conv_in.weight",
        "time_embedding.linear_1.weight",
        "conv_out.bias",
    ] {
        // Different summation order only, also in the frozen VAE and text encoder, whose CPU
        // kernels fold the batch into their GEMMs (one row vs the whole batch: measured 1.3e-5).
        assert_close(
            &format!("accumulated {key}"),
            b[key].clone(),
            a[key].clone(),
            1e-4,
        );
    }
}

#[test]
fn ema_follows_diffusers_decay_schedule() {
    use ip2p_train::optim::Ema;
    use std::collections::BTreeMap;
    let dev = Default::default();
    let linear = burn::nn::LinearConfig::new(2, 1).init::<I>(&dev);
    let mut ema = Ema::new(linear, 0.9999);
    let value = |v: f32| {
        let mut m = BTreeMap::new();
        m.insert(
            "weight".to_string(),
            Tensor::<I, 1>::from_floats([v, v], &dev),
        );
        m
    };
    // diffusers EMAModel.get_decay: 0 at the first step (a copy), then (1+s)/(10+s).
    let mut expected = 0.0f64;
    for (k, v) in [1.0f32, 2.0, 4.0].into_iter().enumerate() {
        let d = if k == 0 {
            0.0
        } else {
            (1.0 + k as f64) / (10.0 + k as f64)
        };
        assert!((ema.next_decay() - d).abs() < 1e-12);
        ema.update(&value(v));
        expected = expected - (1.0 - d) * (expected - v as f64);
    }
    let w: Vec<f32> = ema.model.weight.val().into_data().to_vec().unwrap();
    assert!((w[0] as f64 - expected).abs() < 1e-6, "{w:?} vs {expected}");
}
