//! Original single-file checkpoints (fixtures/single, made by tools/fixtures/fx_single.py from the
//! tiny folder, with names checked against diffusers' own LDM converter): every tensor loads
//! bit for bit as from the folder (EMA copy = the folder; raw copy = the folder negated),
//! from `.safetensors` and from a Lightning `.ckpt`; the 10-step pipeline fixture passes from
//! the file (tolerance as tests/parity.rs: 1e-3 relative L2); detection and foreign pickled
//! objects give typed errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::TensorData;
use ip2p_nn::testing::{Fixture, assert_fixture, fixtures_dir};
use ip2p_nn::{LoadError, WeightFile};
use ip2p_pipeline::*;
use ip2p_sched::SchedulerKind;

type B = burn::backend::Flex;

fn tiny() -> PathBuf {
    fixtures_dir().join("models").join("tiny")
}

fn single(name: &str) -> PathBuf {
    fixtures_dir().join("single").join(name)
}

fn options(weights: UnetWeights) -> LoadOptions {
    LoadOptions {
        config: Some(tiny()),
        weights,
        ..LoadOptions::default()
    }
}

fn params<M: Module<B>>(m: &M) -> Vec<(String, TensorData)> {
    ip2p_nn::testing::float_params::<B, M>(m)
}

/// Bitwise equality of two modules' parameters, `expected` optionally negated first.
fn assert_same<M: Module<B>>(what: &str, got: &M, expected: &M, negated: bool) {
    let (got, want) = (params(got), params(expected));
    assert_eq!(got.len(), want.len(), "{what}: parameter count");
    assert!(!got.is_empty());
    for ((pg, dg), (pw, dw)) in got.iter().zip(&want) {
        assert_eq!(pg, pw, "{what}: order");
        assert_eq!(dg.shape, dw.shape, "{what}: {pg} shape");
        let g = dg.to_vec::<f32>().unwrap();
        let mut w = dw.to_vec::<f32>().unwrap();
        if negated {
            w.iter_mut().for_each(|x| *x = -*x);
        }
        let same = g.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{what}: {pg} differs");
    }
}

fn load(path: &Path, options: &LoadOptions) -> Ip2pModel<B> {
    Ip2pModel::load(path, &Default::default(), options).unwrap()
}

fn compare(file: &Path, folder_variant: Option<&str>) {
    let folder = load(
        &tiny(),
        &LoadOptions {
            variant: folder_variant.map(str::to_string),
            // Widened to f32, as the file's values are read: compared parameter by parameter.
            half_weights: Some(false),
            ..LoadOptions::default()
        },
    );
    let ema = load(file, &options(UnetWeights::Ema));
    let what = file.display().to_string();
    assert_same(
        &format!("{what} unet (EMA)"),
        &ema.unet,
        &folder.unet,
        false,
    );
    assert_same(
        &format!("{what} vae"),
        &ema.vae.as_ref().unwrap().model,
        &folder.vae.as_ref().unwrap().model,
        false,
    );
    assert_same(
        &format!("{what} text encoder"),
        ema.text.as_ref().unwrap().encoder(),
        folder.text.as_ref().unwrap().encoder(),
        false,
    );
    let raw = load(
        file,
        &LoadOptions {
            vae: false,
            text_encoder: false,
            ..options(UnetWeights::Raw)
        },
    );
    assert_same(&format!("{what} unet (raw)"), &raw.unet, &folder.unet, true);
}

#[test]
fn safetensors_loads_as_the_folder() {
    compare(&single("tiny_ldm.safetensors"), None);
}

#[test]
fn lightning_ckpt_loads_as_the_folder() {
    // The .ckpt holds the fp16 variant's values (f16), read into the f32 model exactly.
    compare(&single("tiny_ldm.ckpt"), Some("fp16"));
}

#[test]
fn pipeline_from_the_file_matches_diffusers() {
    let m = load(&single("tiny_ldm.safetensors"), &options(UnetWeights::Ema));
    let fx = Fixture::open("pipeline/tiny_euler.safetensors");
    let meta: serde_json::Value = fx.meta_json("run");
    let options = EditOptions {
        steps: serde_json::from_value(meta["steps"].clone()).unwrap(),
        guidance_scale: serde_json::from_value(meta["guidance_scale"].clone()).unwrap(),
        image_guidance_scale: serde_json::from_value(meta["image_guidance_scale"].clone()).unwrap(),
        ..EditOptions::default()
    };
    let prompts: Vec<String> = serde_json::from_value(meta["prompts"].clone()).unwrap();
    let mut sched = m.scheduler(Some(SchedulerKind::Euler)).unwrap();
    let settings = RunSettings {
        options,
        init_latents: Some(fx.tensor("noise", &m.device)),
        ..Default::default()
    };
    let pixels = fx.tensor("pixels", &m.device);
    let out = m
        .edit(
            sched.as_mut(),
            pixels,
            Prompts::Text(prompts),
            false,
            false,
            settings,
        )
        .unwrap();
    assert_fixture(&fx, "image", out.output, 1e-3);
}

#[test]
fn one_shot_edit_from_the_ckpt_equals_the_fp16_folder() {
    // `ip2p edit`'s path (each part loaded for its stage) from the Lightning .ckpt, whose
    // values are the folder's fp16 variant: the same weights, so the same latents, bit for bit.
    let fx = Fixture::open("pipeline/tiny_euler.safetensors");
    let meta: serde_json::Value = fx.meta_json("run");
    let prompts: Vec<String> = serde_json::from_value(meta["prompts"].clone()).unwrap();
    let device = Default::default();
    let run = |model: PathBuf, options: &LoadOptions| {
        let settings = RunSettings {
            options: EditOptions {
                steps: 3,
                ..EditOptions::default()
            },
            init_latents: Some(fx.tensor("noise", &device)),
            ..Default::default()
        };
        edit_one_shot::<B>(
            model,
            &device,
            options,
            Some(SchedulerKind::Euler),
            fx.tensor("pixels", &device),
            Prompts::Text(prompts.clone()),
            false,
            true,
            settings,
        )
        .unwrap()
        .output
        .into_data()
    };
    let file = run(single("tiny_ldm.ckpt"), &options(UnetWeights::Ema));
    let folder = run(
        tiny(),
        &LoadOptions {
            variant: Some("fp16".into()),
            ..LoadOptions::default()
        },
    );
    assert!(file.as_bytes() == folder.as_bytes(), "latents differ");
}

/// The tiny file's tensors, edited, written to a temporary safetensors file.
fn edited(name: &str, edit: impl FnOnce(&mut HashMap<String, (Vec<usize>, Vec<u8>)>)) -> PathBuf {
    let bytes = std::fs::read(single("tiny_ldm.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: HashMap<String, (Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .filter(|(_, v)| v.dtype() == safetensors::Dtype::F32)
        .map(|(k, v)| (k, (v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (shape, data))| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .unwrap(),
            )
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("ip2p-single-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    path
}

fn open_err(path: &Path) -> PipelineError {
    match SingleFile::open(path, &options(UnetWeights::Ema)) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e,
    }
}

#[test]
fn a_four_channel_unet_is_refused() {
    let path = edited("sd_4ch.safetensors", |t| {
        let (shape, data) = t
            .get_mut("model.diffusion_model.input_blocks.0.0.weight")
            .unwrap();
        shape[1] = 4;
        data.truncate(data.len() / 2);
    });
    let e = open_err(&path);
    assert!(
        matches!(&e, PipelineError::NotInstructPix2Pix { reason, .. } if reason.contains("4 input channels")),
        "{e}"
    );
}

#[test]
fn a_cross_attention_1024_file_is_refused_as_sd2() {
    let path = edited("sd2.safetensors", |t| {
        let keys: Vec<String> = t
            .keys()
            .filter(|k| k.contains("attn2.to_k.weight") || k.contains("attn2.to_v.weight"))
            .cloned()
            .collect();
        for k in keys {
            let (shape, data) = t.get_mut(&k).unwrap();
            *data = vec![0u8; shape[0] * 1024 * 4];
            shape[1] = 1024;
        }
    });
    let e = open_err(&path);
    assert!(
        matches!(&e, PipelineError::UnsupportedModel { reason, .. } if reason.contains("1024") && reason.contains("2.x")),
        "{e}"
    );
}

#[test]
fn unknown_tensors_are_refused_by_name() {
    let path = edited("extra.safetensors", |t| {
        t.insert(
            "model.diffusion_model.extra_head.weight".into(),
            (vec![2], vec![0; 8]),
        );
        t.insert("cond_stage_model.projection".into(), (vec![2], vec![0; 8]));
    });
    let e = open_err(&path);
    match &e {
        PipelineError::Load(LoadError::UnexpectedTensors { keys, .. }) => {
            assert!(keys.contains(&"model.diffusion_model.extra_head.weight".to_string()));
            assert!(keys.contains(&"cond_stage_model.projection".to_string()));
        }
        other => panic!("{other}"),
    }
}

#[test]
fn a_missing_ema_tensor_is_named() {
    let path = edited("no_ema_conv_in.safetensors", |t| {
        assert!(
            t.remove("model_ema.diffusion_modelinput_blocks00weight")
                .is_some()
        );
    });
    let e = Ip2pModel::<B>::load(&path, &Default::default(), &options(UnetWeights::Ema))
        .err()
        .expect("loaded without an EMA tensor");
    assert!(
        matches!(&e, PipelineError::Load(LoadError::MissingTensors { keys, .. }) if keys.iter().any(|k| k.starts_with("conv_in"))),
        "{e}"
    );
}

#[test]
fn a_pickled_object_is_refused_by_class() {
    let e = WeightFile::open(single("bad_object.ckpt"))
        .err()
        .expect("the pickled object was accepted");
    match &e {
        LoadError::PickledObject { class, .. } => {
            assert_eq!(
                class,
                "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
            )
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains(".safetensors"), "{e}");
}

#[test]
fn the_builtin_vocabulary_is_clips() {
    let builtin = ip2p_text::ClipTokenizer::builtin().unwrap();
    let folder = ip2p_text::ClipTokenizer::from_dir(fixtures_dir().join("clip-bpe")).unwrap();
    for p in ["a photo of a cat", "Turn it into a Van Gogh painting!", ""] {
        assert_eq!(builtin.encode(p).unwrap(), folder.encode(p).unwrap(), "{p}");
    }
    assert_eq!(builtin.encode("a photo").unwrap()[..3], [49406, 320, 1125]);
}

#[test]
fn sd15_names_match_diffusers_converter() {
    // fixtures/single/sd15_names.json: every UNet and VAE tensor of the real SD 1.5
    // InstructPix2Pix architecture (the built-in configs), LDM name → diffusers name, each pair
    // checked with diffusers' convert_ldm_unet_checkpoint / convert_ldm_vae_checkpoint.
    let text = std::fs::read_to_string(single("sd15_names.json")).unwrap();
    let table: serde_json::Value = serde_json::from_str(&text).unwrap();
    let plan = ip2p_pipeline::preset::Preset::Sd15
        .unet_config()
        .unwrap()
        .resolve()
        .unwrap();
    let unet = table["unet"].as_array().unwrap();
    assert_eq!(unet.len(), 686);
    for row in unet {
        let ldm = row[0].as_str().unwrap();
        let want = row[2].as_str().unwrap();
        assert_eq!(
            ip2p_pipeline::single_file::unet_name(ldm, &plan).as_deref(),
            Some(want),
            "{ldm}"
        );
    }
    let vae = table["vae"].as_array().unwrap();
    assert_eq!(vae.len(), 248);
    for row in vae {
        let ldm = row[0].as_str().unwrap();
        let shape: Vec<usize> = serde_json::from_value(row[1].clone()).unwrap();
        let want: Vec<usize> = serde_json::from_value(row[3].clone()).unwrap();
        assert_eq!(
            ip2p_pipeline::single_file::vae_name(ldm, 4, &shape),
            Some((row[2].as_str().unwrap().to_string(), want)),
            "{ldm}"
        );
    }
}
