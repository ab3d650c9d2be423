//! The training loop on the tiny model: data preparation and bad rows, the loss falls,
//! checkpoints resume to the same result, the diffusers export loads back, validation runs.

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::DType;
use image::{Rgb, RgbImage};
use ip2p_nn::testing::{assert_close, fixtures_dir};
use ip2p_pipeline::EditOptions;
use ip2p_sched::{Ddpm, SchedulerConfig};
use ip2p_text::{ClipTokenizer, PromptEncoder};
use ip2p_train::data::{BadRows, Dataset, load_rows, prepare_data};
use ip2p_train::optim::{AdamW, AdamWSettings, named_params};
use ip2p_train::*;
use ip2p_unet::UNet2DConditionModel;
use ip2p_vae::AutoencoderKL;

type I = burn::backend::Flex;
type B = Autodiff<I>;

fn tiny() -> PathBuf {
    fixtures_dir().join("models/tiny")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ip2p-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn image(seed: u32, w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let v = |k: u32| ((x * (3 + k) + y * (5 + seed) + k * 40 + seed * 17) % 256) as u8;
        Rgb([v(0), v(1), v(2)])
    })
}

/// `n` good pairs (32×32; the edit inverts the image), then a row whose edited image is
/// missing and a row of mismatched sizes. Returns the folder.
fn make_dataset(name: &str, n: u32) -> PathBuf {
    let dir = temp_dir(name);
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let mut lines = Vec::new();
    let prompts = [
        "make it snowy",
        "turn it into a painting",
        "add fireworks",
        "invert it",
    ];
    for i in 0..n {
        let a = image(i, 32, 32);
        let mut b = a.clone();
        b.pixels_mut().for_each(|p| p.0 = p.0.map(|v| 255 - v));
        a.save(dir.join(format!("img/{i}_in.png"))).unwrap();
        b.save(dir.join(format!("img/{i}_out.png"))).unwrap();
        lines.push(serde_json::json!({"input_image": format!("img/{i}_in.png"),
            "edit_prompt": prompts[i as usize % prompts.len()], "edited_image": format!("img/{i}_out.png")}));
    }
    image(90, 32, 32).save(dir.join("img/bad_in.png")).unwrap();
    image(91, 24, 32)
        .save(dir.join("img/small_out.png"))
        .unwrap();
    // Exists at prepare time, removed before training: the loader must report it.
    image(92, 32, 32)
        .save(dir.join("img/gone_out.png"))
        .unwrap();
    lines.push(serde_json::json!({"input_image": "img/bad_in.png", "edit_prompt": "x", "edited_image": "img/gone_out.png"}));
    lines.push(serde_json::json!({"input_image": "img/bad_in.png", "edit_prompt": "y", "edited_image": "img/small_out.png"}));
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.join("metadata.jsonl"), text).unwrap();
    dir
}

fn tokenizer() -> ClipTokenizer {
    ClipTokenizer::from_dir(tiny().join("tokenizer")).unwrap()
}

fn frozen() -> Frozen<I> {
    let dev = Default::default();
    Frozen {
        vae: AutoencoderKL::<I>::load(tiny().join("vae"), &dev, DType::F32, None).unwrap(),
        text: PromptEncoder::<I>::load(tiny(), None, &dev).unwrap(),
    }
}

fn scheduler_config() -> SchedulerConfig {
    SchedulerConfig::from_file(tiny().join("scheduler/scheduler_config.json")).unwrap()
}

#[test]
fn prepare_data_tokenizes_once_and_reports_bad_rows() {
    let dir = make_dataset("prepare", 2);
    // A row naming a missing file, and a line that is not JSON.
    let mut meta = std::fs::read_to_string(dir.join("metadata.jsonl")).unwrap();
    meta.push_str("{\"input_image\": \"img/none.png\", \"edit_prompt\": \"z\", \"edited_image\": \"img/0_out.png\"}\nnot json\n");
    std::fs::write(dir.join("metadata.jsonl"), &meta).unwrap();

    let err = prepare_data(&dir, &tokenizer(), BadRows::Stop)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("row 5") && err.contains("img/none.png"),
        "{err}"
    );
    assert!(
        !dir.join("tokens.jsonl").exists(),
        "a failed run writes nothing"
    );

    let report = prepare_data(&dir, &tokenizer(), BadRows::Skip).unwrap();
    assert_eq!(report.rows, 4);
    let rows: Vec<usize> = report.skipped.iter().map(|(r, _)| *r).collect();
    assert_eq!(rows, vec![5, 6]);
    let data = Dataset::open(&dir).unwrap();
    assert_eq!(data.len(), 4);
    let expected = tokenizer().encode("make it snowy").unwrap();
    let ids: Vec<u32> = data.rows[0].input_ids.iter().map(|&i| i as u32).collect();
    assert_eq!(ids, expected);
    assert_eq!(data.rows[3].row, 4);

    // Loading: the mismatched pair is reported with its row number.
    let err = data.load_pair(3).unwrap_err().to_string();
    assert!(err.contains("row 4") && err.contains("24×32"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_loss_falls_on_a_fixed_batch() {
    let dev = Default::default();
    let dir = make_dataset("overfit", 2);
    prepare_data(&dir, &tokenizer(), BadRows::Skip).unwrap();
    let data = Dataset::open(&dir).unwrap();
    let batch = load_rows::<I>(&data, &[0, 1], 32, &dev).unwrap();
    let frozen = frozen();
    let sched = Ddpm::new(&scheduler_config()).unwrap();
    let mut unet =
        UNet2DConditionModel::<B>::load(tiny().join("unet"), None, DType::F32, &dev).unwrap();
    let draws = StepDraws::<I>::draw(7, [2, 4, 16, 16], 1000, &dev);
    let config = StepConfig {
        conditioning_dropout: 0.0,
        prediction_type: ip2p_sched::PredictionType::Epsilon,
    };
    let mut opt = AdamW::<I>::new(AdamWSettings {
        lr: 1e-3,
        ..AdamWSettings::default()
    });
    let mut losses = Vec::new();
    for _ in 0..10 {
        let (loss, _) = training_loss(&unet, &frozen, &sched, &config, &batch, &draws).unwrap();
        losses.push(f64::from(loss.clone().into_scalar()));
        let grads = GradientsParams::from_grads(loss.backward(), &unet);
        unet = opt.step(unet, grads).0;
    }
    eprintln!("losses: {losses:?}");
    assert!(
        losses[9] < 0.7 * losses[0],
        "the loss did not fall: {losses:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn trainer(output: &Path, max_steps: usize) -> Trainer<B> {
    let dev = Default::default();
    let (unet, widened) = load_unet_for_training::<B>(&tiny().join("unet"), &dev).unwrap();
    assert!(!widened);
    Trainer::new(
        unet,
        frozen(),
        &scheduler_config(),
        &tiny().join("unet/config.json"),
        TrainConfig {
            resolution: 32,
            batch_size: 2,
            gradient_accumulation: 2,
            max_steps,
            adamw: AdamWSettings {
                lr: 1e-3,
                warmup_steps: 2,
                ..AdamWSettings::default()
            },
            ema_decay: Some(0.999),
            conditioning_dropout: 0.3,
            random_flip: true,
            seed: 3,
            checkpoint_every: 2,
            validate_every: 0,
            bad_rows: BadRows::Skip,
            output: output.to_path_buf(),
        },
        &dev,
    )
    .unwrap()
}

#[test]
fn resumed_run_matches_an_uninterrupted_one() {
    let dir = make_dataset("resume", 3);
    prepare_data(&dir, &tokenizer(), BadRows::Skip).unwrap();
    std::fs::remove_file(dir.join("img/gone_out.png")).unwrap();
    let data = Dataset::open(&dir).unwrap();

    let out_a = dir.join("run-a");
    let mut a = trainer(&out_a, 3);
    let mut reports = Vec::new();
    a.run(&data, None, &mut |r| reports.push(r.clone()))
        .unwrap();
    assert_eq!(reports.len(), 3);
    assert_eq!(
        reports[0].lr, 0.0,
        "warm-up starts at 0 as torch's LambdaLR"
    );
    assert!(reports[1].lr > 0.0);
    assert!(reports[0].checkpoint.is_none() && reports[1].checkpoint.is_some());
    assert!(
        reports[2].skipped_rows >= 1,
        "the missing and mismatched rows are skipped"
    );
    assert!(
        out_a
            .join("checkpoint-2/unet/diffusion_pytorch_model.safetensors")
            .is_file()
    );
    assert!(out_a.join("checkpoint-3/ema_unet/config.json").is_file());
    assert!(!out_a.join("checkpoint-2.tmp").exists());

    // Resume from step 2 into another folder, run step 3: the same model.
    let out_b = dir.join("run-b");
    let mut b = trainer(&out_b, 3);
    b.resume(&out_a.join("checkpoint-2")).unwrap();
    assert_eq!(b.step, 2);
    b.run(&data, None, &mut |_| {}).unwrap();
    let pa = named_params(&a.unet.valid());
    let pb = named_params(&b.unet.valid());
    assert_eq!(pa.len(), pb.len());
    for (k, v) in &pa {
        // Same batches, draws and optimiser state: equal up to summation order (none here).
        assert_close(k, pb[k].clone(), v.clone(), 1e-6);
    }
    let ea = named_params(&a.ema.as_ref().unwrap().model);
    let eb = named_params(&b.ema.as_ref().unwrap().model);
    for (k, v) in &ea {
        assert_close(&format!("ema {k}"), eb[k].clone(), v.clone(), 1e-6);
    }

    // The diffusers export loads back with the strict diffusers-key loader.
    let dev = Default::default();
    let back =
        UNet2DConditionModel::<I>::load(out_a.join("checkpoint-3/unet"), None, DType::F32, &dev)
            .unwrap();
    for (k, v) in named_params(&back) {
        assert_close(&format!("export {k}"), v, pa[&k].clone(), 0.0);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn strict_mode_stops_at_a_bad_row_and_keeps_checkpoints() {
    let dir = make_dataset("strict", 1);
    prepare_data(&dir, &tokenizer(), BadRows::Skip).unwrap();
    std::fs::remove_file(dir.join("img/gone_out.png")).unwrap();
    let data = Dataset::open(&dir).unwrap();
    let out = dir.join("run");
    let mut t = trainer(&out, 2);
    t.config.gradient_accumulation = 1;
    t.config.batch_size = 1;
    t.config.checkpoint_every = 1;
    // Skipping: two steps on the one good row, two checkpoints.
    let mut skipped = Vec::new();
    t.run(&data, None, &mut |r| {
        skipped.extend(r.newly_skipped.clone())
    })
    .unwrap();
    let rows: Vec<usize> = skipped.iter().map(|(r, _)| *r).collect();
    assert!(
        rows.iter().all(|r| [2, 3].contains(r)) && !rows.is_empty(),
        "{skipped:?}"
    );
    // Stopping: the next bad row ends the run with its row number...
    t.config.bad_rows = BadRows::Stop;
    t.config.max_steps = 50;
    let err = t.run(&data, None, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("row 2") || err.contains("row 3"), "{err}");
    // ...and the checkpoints already written are intact and load.
    let latest = latest_checkpoint(&out).unwrap();
    let last_step = t.step;
    assert_eq!(latest, out.join(format!("checkpoint-{last_step}")));
    for step in 1..=last_step {
        let loaded =
            load_checkpoint::<I>(&out.join(format!("checkpoint-{step}")), &Default::default())
                .unwrap();
        assert_eq!(loaded.state.step, step);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_four_channel_unet_is_widened_on_load() {
    // A 4-channel SD-style UNet folder, written with the diffusers export.
    let dev = Default::default();
    let dir = temp_dir("widen");
    let mut cfg =
        ip2p_unet::UNet2DConditionConfig::from_file(tiny().join("unet/config.json")).unwrap();
    cfg.in_channels = 4;
    let sd = UNet2DConditionModel::<I>::from_config(&cfg, &dev).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny().join("unet/config.json")).unwrap())
            .unwrap();
    config["in_channels"] = 4.into();
    std::fs::write(dir.join("source_config.json"), config.to_string()).unwrap();
    export_unet_diffusers(&sd, &dir.join("source_config.json"), &dir.join("unet")).unwrap();
    // (Compare with the file: a fresh model's parameters are initialised lazily, per clone.)
    let sd = UNet2DConditionModel::<I>::load(dir.join("unet"), None, DType::F32, &dev).unwrap();
    assert_eq!(sd.in_channels, 4);
    let (unet, widened) = load_unet_for_training::<B>(&dir.join("unet"), &dev).unwrap();
    assert!(widened);
    assert_eq!(unet.in_channels, 8);
    let w = unet.conv_in.weight.val().inner();
    let [o, _, k1, k2] = w.dims();
    assert_close(
        "old weights",
        w.clone().slice([0..o, 0..4, 0..k1, 0..k2]),
        sd.conv_in.weight.val(),
        0.0,
    );
    assert_eq!(
        w.slice([0..o, 4..8, 0..k1, 0..k2])
            .abs()
            .max()
            .into_scalar(),
        0.0
    );
    assert_close(
        "bias kept",
        unet.conv_in.bias.as_ref().unwrap().val().inner(),
        sd.conv_in.bias.as_ref().unwrap().val(),
        0.0,
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn validation_runs_the_pipeline_on_stored_ids() {
    let dev = Default::default();
    let dir = make_dataset("validate", 2);
    prepare_data(&dir, &tokenizer(), BadRows::Skip).unwrap();
    let data = Dataset::open(&dir).unwrap();
    let rows = load_rows::<I>(&data, &[0, 1], 32, &dev).unwrap();
    let v = Validation::new(
        rows.original,
        rows.edited,
        rows.input_ids,
        scheduler_config(),
        EditOptions {
            steps: 2,
            ..EditOptions::default()
        },
    )
    .unwrap();
    let frozen = frozen();
    let unet =
        UNet2DConditionModel::<I>::load(tiny().join("unet"), None, DType::F32, &dev).unwrap();
    let sched = Ddpm::new(&scheduler_config()).unwrap();
    let out = dir.join("out");
    let r = validate(&unet, &frozen, &sched, &v, 5, &out).unwrap();
    assert!(r.loss.is_finite());
    assert_eq!(r.images.len(), 2);
    assert!(out.join("validation/step-5/1.png").is_file());
    let log = std::fs::read_to_string(out.join("validation/log.jsonl")).unwrap();
    assert!(log.contains("\"step\":5"));
    // The uncond embedding was computed once and the prompts came as ids: the encoder ran on
    // the two rows plus the cached empty prompt, never on text.
    let stats = frozen.text.stats();
    assert_eq!(
        stats.rows,
        2 + 2 + 1,
        "loss rows, pipeline rows, one empty prompt: {stats:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn preprocessing_matches_the_script() {
    use ip2p_nn::testing::Fixture;
    use ip2p_train::data::preprocess_pair;
    use ip2p_train::rng::SplitMix;
    use ip2p_vae::resample::{Filter, resize};
    let fx = Fixture::open("train/preprocess.safetensors");
    let to_img = |name: &str| {
        let (vals, shape) = fx.ints(name);
        let raw: Vec<u8> = vals.iter().map(|&v| v as u8).collect();
        RgbImage::from_raw(shape[1] as u32, shape[0] as u32, raw).unwrap()
    };
    for case in ["down", "up", "wide"] {
        let input = to_img(&format!("{case}.input"));
        let expected = to_img(&format!("{case}.resized"));
        let res = expected.width();
        // PIL's resize, bit for bit.
        assert_eq!(
            resize(&input, res, res, Filter::Bicubic),
            expected,
            "{case}"
        );
        // Both images of a pair get the same flip: over many draws, both flipped or neither.
        let mut rng = SplitMix::new(1);
        let mut flips = 0;
        for _ in 0..16 {
            let (a, b) = preprocess_pair(&input, &input, res, true, &mut rng);
            assert_eq!(a, b);
            if a != expected {
                assert_eq!(a, image::imageops::flip_horizontal(&expected));
                flips += 1;
            }
        }
        assert!(flips > 0 && flips < 16, "random flips: {flips}/16");
    }
}
