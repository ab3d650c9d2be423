//! Text-encoder parity with transformers' `CLIPTextModel` on the fixture models
//! (fixtures/text/{tiny,wide}.safetensors, made by tools/fixtures/fx_text.py), the prompt
//! encoder's caching, and the typed errors.

use burn::backend::Flex;
use burn::tensor::{DType, Int, Tensor, TensorData};
use ip2p_nn::testing::{Fixture, assert_close, assert_fixture, fixtures_dir};
use ip2p_nn::{AttentionImpl, LoadError};
use ip2p_text::{
    ClipTextConfig, ClipTextModel, ClipTokenizer, EncodeStats, HiddenAct, PromptEncoder, TextError,
};

type B = Flex;

/// f32 on both sides; only summation order differs (5 layers of 32-wide matmuls, softmax,
/// layer norms), which stays far below 1e-4 relative L2.
const TOL: f64 = 1e-4;

fn ids(fx: &Fixture) -> Tensor<B, 2, Int> {
    let (v, shape) = fx.ints("input_ids");
    Tensor::from_data(
        TensorData::new(v, [shape[0], shape[1]]),
        &Default::default(),
    )
}

fn id_rows(fx: &Fixture) -> Vec<Vec<i64>> {
    let (v, shape) = fx.ints("input_ids");
    v.chunks(shape[1]).map(<[i64]>::to_vec).collect()
}

fn model_dir(name: &str) -> std::path::PathBuf {
    fixtures_dir().join("models").join(name)
}

fn parity(name: &str, act: HiddenAct, hidden: usize) {
    let device = Default::default();
    let fx = Fixture::open(format!("text/{name}.safetensors"));
    let model =
        ClipTextModel::<B>::load(model_dir(name).join("text_encoder"), None, &device).unwrap();
    assert_eq!(model.config().hidden_act, act);

    // The fixture's ids are what our tokenizer gives for its prompts.
    let prompts: Vec<String> = fx.meta_json("prompts");
    let tok = ClipTokenizer::from_dir(model_dir(name).join("tokenizer")).unwrap();
    let ours: Vec<Vec<i64>> = tok
        .encode_batch(&prompts)
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(i64::from).collect())
        .collect();
    assert_eq!(ours, id_rows(&fx));

    let out = model.forward(ids(&fx));
    assert_eq!(out.dims(), [2, 77, hidden]);
    let d = assert_fixture(&fx, "last_hidden_state", out.clone(), TOL);
    println!(
        "{name} fused: rel_l2 {:.2e}, max_abs {:.2e}",
        d.rel_l2, d.max_abs
    );

    // Checked entry point and the naive attention kernel give the same numbers.
    let naive = model.with_attention_impl(AttentionImpl::Naive);
    let out2 = naive.forward_ids(&id_rows(&fx), &device).unwrap();
    let d = assert_fixture(&fx, "last_hidden_state", out2, TOL);
    println!(
        "{name} naive: rel_l2 {:.2e}, max_abs {:.2e}",
        d.rel_l2, d.max_abs
    );
}

#[test]
fn tiny_matches_transformers() {
    parity("tiny", HiddenAct::QuickGelu, 32);
}

#[test]
fn wide_matches_transformers() {
    parity("wide", HiddenAct::Gelu, 48);
}

#[test]
fn fp16_variant_loads() {
    let device = Default::default();
    let fx = Fixture::open("text/tiny.safetensors");
    let model = ClipTextModel::<B>::load(
        model_dir("tiny").join("text_encoder"),
        Some("fp16"),
        &device,
    )
    .unwrap();
    let out = model.forward(ids(&fx));
    // Against transformers running the same fp16 weights in f32: same numbers, same tolerance.
    let d = assert_fixture(&fx, "last_hidden_state_fp16_weights", out.clone(), TOL);
    println!(
        "fp16 weights vs transformers: rel_l2 {:.2e}, max_abs {:.2e}",
        d.rel_l2, d.max_abs
    );
    // Against the f32 weights: the weights were rounded to f16 (relative step 2^-11 ≈ 5e-4), so
    // the output moves by about that much; 1e-2 is loose but catches any loading mistake.
    let d = assert_fixture(&fx, "last_hidden_state", out, 1e-2);
    println!(
        "fp16 weights vs f32 weights: rel_l2 {:.2e}, max_abs {:.2e}",
        d.rel_l2, d.max_abs
    );
}

#[test]
fn runs_in_f16() {
    let device = Default::default();
    let fx = Fixture::open("text/tiny.safetensors");
    let dir = model_dir("tiny").join("text_encoder");
    for imp in [AttentionImpl::Fused, AttentionImpl::Naive] {
        let model = ClipTextModel::<B>::load_as(&dir, Some("fp16"), DType::F16, &device)
            .unwrap()
            .with_attention_impl(imp);
        let out = model.forward(ids(&fx));
        assert_eq!(out.dtype(), DType::F16);
        // f16 activations (10-bit mantissa, relative step 1e-3) through 5 layers; layer norms
        // and softmax keep f32 statistics. Measured ~9e-4 relative L2; 5e-3 bounds that rounding.
        let d = assert_fixture(
            &fx,
            "last_hidden_state_fp16_weights",
            out.cast(DType::F32),
            5e-3,
        );
        println!(
            "f16 run ({imp:?}) vs transformers f32 on fp16 weights: rel_l2 {:.2e}, max_abs {:.2e}",
            d.rel_l2, d.max_abs
        );
    }
}

#[test]
fn prompt_encoder_caches_uncond_and_dedups() {
    let device = Default::default();
    let fx = Fixture::open("text/tiny.safetensors");
    let enc = PromptEncoder::<B>::load(model_dir("tiny"), None, &device).unwrap();
    assert_eq!(enc.stats(), EncodeStats::default());

    let uncond = enc.uncond();
    let d = assert_fixture(&fx, "uncond", uncond.clone(), TOL);
    println!("uncond: rel_l2 {:.2e}, max_abs {:.2e}", d.rel_l2, d.max_abs);
    assert_eq!(enc.stats(), EncodeStats { calls: 1, rows: 1 });
    let _ = enc.uncond();
    let _ = enc.uncond_batch(3).unwrap();
    assert_eq!(
        enc.stats(),
        EncodeStats { calls: 1, rows: 1 },
        "uncond is computed once"
    );

    let prompts: Vec<String> = fx.meta_json("prompts");
    let p0 = prompts[0].as_str();
    // "  Make the SKY  purple" tokenizes like p0 (lowercase, whitespace collapsed).
    let batch = [p0, "", p0, "  Make the SKY  purple", prompts[1].as_str()];
    let out = enc.encode(&batch).unwrap();
    assert_eq!(out.dims(), [5, 77, 32]);
    assert_eq!(
        enc.stats(),
        EncodeStats { calls: 2, rows: 3 },
        "one pass over the 2 distinct prompts, uncond cached"
    );

    let expected = fx.tensor::<B, 3>("last_hidden_state", &device);
    let row = |t: &Tensor<B, 3>, i: usize| t.clone().narrow(0, i, 1);
    for (i, from) in [(0, 0), (2, 0), (3, 0), (4, 1)] {
        assert_close(&format!("row {i}"), row(&out, i), row(&expected, from), TOL);
    }
    assert_close("row 1 (uncond)", row(&out, 1), uncond.clone(), 0.0);

    // Dataset ids: tokenization skipped, same dedup.
    let mut rows = id_rows(&fx);
    rows.push(rows[0].clone());
    let out = enc.encode_ids(&rows).unwrap();
    assert_eq!(enc.stats(), EncodeStats { calls: 3, rows: 5 });
    assert_close("ids row 2", row(&out, 2), row(&expected, 0), TOL);
    assert_eq!(enc.decode(&rows[0]).unwrap(), p0);

    // Ids equal to the empty prompt's come from the cache: no encoder call.
    let empty: Vec<i64> = enc
        .tokenizer()
        .encode("")
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    let out = enc.encode_ids(&[empty.clone(), empty]).unwrap();
    assert_eq!(enc.stats(), EncodeStats { calls: 3, rows: 5 });
    assert_close("uncond from ids", row(&out, 1), uncond, 0.0);
}

#[test]
fn bad_ids_are_typed_errors() {
    let device = Default::default();
    let enc = PromptEncoder::<B>::load(model_dir("tiny"), None, &device).unwrap();
    let good: Vec<i64> = enc
        .tokenizer()
        .encode("a cat")
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();

    let mut bad = good.clone();
    bad[3] = 5000;
    let err = enc.encode_ids(&[good.clone(), bad]).unwrap_err();
    assert!(
        matches!(
            err,
            TextError::IdOutOfRange {
                row: 1,
                position: 3,
                id: 5000,
                vocab_size: 1000
            }
        ),
        "{err:?}"
    );
    let err = enc.encode_ids(&[good[..76].to_vec()]).unwrap_err();
    assert!(
        matches!(
            err,
            TextError::WrongLength {
                row: 0,
                len: 76,
                expected: 77
            }
        ),
        "{err:?}"
    );
    assert!(matches!(enc.encode_ids(&[]), Err(TextError::EmptyBatch)));
    let none: [&str; 0] = [];
    assert!(matches!(enc.encode(&none), Err(TextError::EmptyBatch)));
    assert!(matches!(enc.uncond_batch(0), Err(TextError::EmptyBatch)));
    assert_eq!(enc.stats().calls, 0, "nothing reached the encoder");

    // The bare model accepts shorter rows (up to max_position_embeddings) but not ragged ones.
    let model = enc.encoder();
    assert_eq!(
        model
            .forward_ids(&[good[..10].to_vec()], &device)
            .unwrap()
            .dims(),
        [1, 10, 32]
    );
    let err = model
        .forward_ids(&[good[..10].to_vec(), good[..9].to_vec()], &device)
        .unwrap_err();
    assert!(
        matches!(
            err,
            TextError::WrongLength {
                row: 1,
                len: 9,
                expected: 10
            }
        ),
        "{err:?}"
    );
    let err = model.forward_ids(&[vec![0; 78]], &device).unwrap_err();
    assert!(
        matches!(
            err,
            TextError::WrongLength {
                row: 0,
                len: 78,
                expected: 77
            }
        ),
        "{err:?}"
    );
}

#[test]
fn broken_configs_are_typed_errors() {
    let path = fixtures_dir().join("broken/text_encoder_missing_field.json");
    let err = ClipTextConfig::from_file(&path).unwrap_err();
    assert!(
        matches!(&err, TextError::Load(LoadError::Config { path: p, .. }) if *p == path),
        "{err:?}"
    );
    assert!(err.to_string().contains("hidden_size"), "{err}");

    let good: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model_dir("tiny").join("text_encoder/config.json")).unwrap(),
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("ip2p-text-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (field, value, says) in [
        ("hidden_act", serde_json::json!("swish"), "hidden_act"),
        (
            "num_attention_heads",
            serde_json::json!(5),
            "num_attention_heads",
        ),
        ("hidden_size", serde_json::json!(0), "hidden_size"),
    ] {
        let mut cfg = good.clone();
        cfg[field] = value;
        let p = dir.join(format!("{field}.json"));
        std::fs::write(&p, cfg.to_string()).unwrap();
        let err = ClipTextConfig::from_file(&p).unwrap_err();
        assert!(
            matches!(err, TextError::Load(LoadError::Config { .. })),
            "{field}: {err:?}"
        );
        assert!(err.to_string().contains(says), "{field}: {err}");
    }

    // A tokenizer whose length exceeds the encoder's positions cannot be paired with it.
    let tok = ClipTokenizer::from_dir(fixtures_dir().join("clip-bpe")).unwrap();
    let model = ClipTextModel::<B>::load(
        model_dir("tiny").join("text_encoder"),
        None,
        &Default::default(),
    )
    .unwrap();
    let err = PromptEncoder::new(tok, model, &Default::default()).unwrap_err();
    assert!(matches!(err, TextError::Mismatch(_)), "{err:?}");

    // Weights that are not there.
    let err = ClipTextModel::<B>::load(
        model_dir("tiny").join("text_encoder"),
        Some("bf16"),
        &Default::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, TextError::Load(LoadError::Io { .. })),
        "{err:?}"
    );
}
