//! Fuzzed parsers, on stable Rust: each property takes a valid file from the fixtures, mutates
//! it (byte flips, overwrites, truncations, insertions, deletions; for JSON also values replaced
//! by hostile ones: negative, huge, wrong type, missing), and feeds it to the parser ip2p uses.
//! The property: a typed error or a valid result, never a panic (proptest fails the case) or an
//! abort (the test binary dies). Cases per property: [`CASES`] in CI, `IP2P_FUZZ_CASES=N` for a
//! longer run.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::tensor::Tensor;
use ip2p_nn::testing::fixtures_dir;
use ip2p_text::{ClipTextConfig, ClipTextModel, ClipTokenizer, PromptEncoder};
use ip2p_unet::UNet2DConditionConfig;
use ip2p_vae::VaeConfig;
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::Value;

type B = burn::backend::Flex;

/// Cases per property in `cargo test` (CI).
const CASES: u32 = 2000;

fn cases(scale: u32) -> u32 {
    std::env::var("IP2P_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES / scale)
}

fn config(scale: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(scale),
        // Failing inputs are printed by proptest; nothing is written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A folder of this test process for scratch files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ip2p-fuzz-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fixture(rel: &str) -> Vec<u8> {
    std::fs::read(fixtures_dir().join(rel)).unwrap()
}

/// One byte-level change.
#[derive(Debug, Clone)]
enum Edit {
    Set(bool, Index, u8),
    Flip(bool, Index, u8),
    Truncate(bool, Index),
    Insert(bool, Index, Vec<u8>),
    Remove(bool, Index, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let at = (any::<bool>(), any::<Index>());
    prop_oneof![
        (at.clone(), any::<u8>()).prop_map(|((f, i), b)| Edit::Set(f, i, b)),
        (at.clone(), 1u8..=255).prop_map(|((f, i), b)| Edit::Flip(f, i, b)),
        at.clone().prop_map(|(f, i)| Edit::Truncate(f, i)),
        (at.clone(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|((f, i), b)| Edit::Insert(f, i, b)),
        (at, 1usize..64).prop_map(|((f, i), n)| Edit::Remove(f, i, n)),
    ]
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(edit(), 1..4)
}

/// Apply `edits`; an edit with its flag set lands in the first `focus` bytes (a header).
fn mutate(bytes: &[u8], edits: &[Edit], focus: usize) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for e in edits {
        let pos = |focused: bool, i: &Index, len: usize| {
            let span = if focused { focus.min(len) } else { len };
            if span == 0 { 0 } else { i.index(span) }
        };
        match e {
            Edit::Set(f, i, b) if !out.is_empty() => {
                let p = pos(*f, i, out.len());
                out[p] = *b;
            }
            Edit::Flip(f, i, b) if !out.is_empty() => {
                let p = pos(*f, i, out.len());
                out[p] ^= *b;
            }
            Edit::Truncate(f, i) => {
                let p = pos(*f, i, out.len());
                out.truncate(p);
            }
            Edit::Insert(f, i, b) => {
                let p = pos(*f, i, out.len() + 1);
                out.splice(p..p, b.iter().copied());
            }
            Edit::Remove(f, i, n) if !out.is_empty() => {
                let p = pos(*f, i, out.len());
                let end = (p + n).min(out.len());
                out.drain(p..end);
            }
            _ => {}
        }
    }
    out
}

/// Values a hostile config might hold.
fn hostile() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(Value::Bool(true)),
        Just(serde_json::json!(-1)),
        Just(serde_json::json!(0)),
        Just(serde_json::json!(1)),
        Just(serde_json::json!(3)),
        Just(serde_json::json!(1.5)),
        Just(serde_json::json!(1e308)),
        Just(serde_json::json!(-1e308)),
        Just(serde_json::json!(u64::MAX)),
        Just(serde_json::json!(i64::MIN)),
        Just(serde_json::json!(1u64 << 40)),
        Just(serde_json::json!("")),
        Just(serde_json::json!("x")),
        Just(serde_json::json!([])),
        Just(serde_json::json!([0])),
        Just(serde_json::json!([1_000_000_000u64])),
        Just(serde_json::json!([-1, -1])),
        Just(serde_json::json!({})),
    ]
}

/// A JSON change: a value (anywhere in the tree) replaced or removed, or byte edits.
#[derive(Debug, Clone)]
enum JsonEdit {
    Replace(Index, Value),
    Remove(Index),
    Bytes(Vec<Edit>),
}

fn json_edits() -> impl Strategy<Value = Vec<JsonEdit>> {
    let one = prop_oneof![
        4 => (any::<Index>(), hostile()).prop_map(|(i, v)| JsonEdit::Replace(i, v)),
        1 => any::<Index>().prop_map(JsonEdit::Remove),
        2 => edits().prop_map(JsonEdit::Bytes),
    ];
    prop::collection::vec(one, 1..4)
}

/// Paths to every value of a JSON tree (object keys and array indices).
fn paths(v: &Value, prefix: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                prefix.push(Value::String(k.clone()));
                out.push(prefix.clone());
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                prefix.push(serde_json::json!(i));
                out.push(prefix.clone());
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn mutate_json(text: &[u8], edits: &[JsonEdit]) -> Vec<u8> {
    let mut bytes = text.to_vec();
    for e in edits {
        if let JsonEdit::Bytes(b) = e {
            bytes = mutate(&bytes, b, usize::MAX);
            continue;
        }
        let Ok(mut tree) = serde_json::from_slice::<Value>(&bytes) else {
            continue;
        };
        let mut all = Vec::new();
        paths(&tree, &mut Vec::new(), &mut all);
        if all.is_empty() {
            continue;
        }
        let (i, replacement) = match e {
            JsonEdit::Replace(i, v) => (i, Some(v.clone())),
            JsonEdit::Remove(i) => (i, None),
            JsonEdit::Bytes(_) => unreachable!(),
        };
        let path = &all[i.index(all.len())];
        let (last, parents) = path.split_last().unwrap();
        let mut node = &mut tree;
        for p in parents {
            node = match p {
                Value::String(k) => &mut node[k.as_str()],
                other => &mut node[other.as_u64().unwrap() as usize],
            };
        }
        match (node, last, replacement) {
            (Value::Object(m), Value::String(k), Some(v)) => {
                m.insert(k.clone(), v);
            }
            (Value::Object(m), Value::String(k), None) => {
                m.remove(k);
            }
            (Value::Array(a), idx, Some(v)) => a[idx.as_u64().unwrap() as usize] = v,
            (Value::Array(a), idx, None) => {
                a.remove(idx.as_u64().unwrap() as usize);
            }
            _ => {}
        }
        bytes = serde_json::to_vec_pretty(&tree).unwrap();
    }
    bytes
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Length of a safetensors file's header (its first 8 bytes + JSON): where edits matter most.
fn safetensors_header(bytes: &[u8]) -> usize {
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

fn tiny(part: &str) -> PathBuf {
    fixtures_dir().join("models").join("tiny").join(part)
}

proptest! {
    #![proptest_config(config(4))]

    /// A weights file (the tiny text encoder's `model.safetensors`): header and body mutated,
    /// loaded through the strict loader into the model.
    #[test]
    fn safetensors_weights(e in edits()) {
        let original = std::fs::read(tiny("text_encoder/model.safetensors")).unwrap();
        let dir = scratch("weights");
        std::fs::copy(tiny("text_encoder/config.json"), dir.join("config.json")).unwrap();
        write(&dir, "model.safetensors", &mutate(&original, &e, safetensors_header(&original)));
        let _ = ClipTextModel::<B>::load(&dir, None, &Default::default());
        let _ = ip2p_nn::WeightFile::open(dir.join("model.safetensors"));
    }

    /// An original checkpoint's pickle (`.ckpt`), read as `torch.load(weights_only=True)` would.
    #[test]
    fn ckpt_pickle(e in edits()) {
        let original = fixture("single/bad_object.ckpt");
        let dir = scratch("ckpt");
        let path = write(&dir, "model.ckpt", &mutate(&original, &e, original.len()));
        let _ = ip2p_nn::WeightFile::open(&path);
    }
}

proptest! {
    #![proptest_config(config(1))]

    /// A latents file (`--init-latents`, `--image-latents`).
    #[test]
    fn latents_file(e in edits(), dtype in 0usize..3) {
        let shape = [2usize, 4, 3, 5];
        let n: usize = shape.iter().product();
        let (dt, bytes): (safetensors::Dtype, Vec<u8>) = match dtype {
            0 => (safetensors::Dtype::F32, (0..n).flat_map(|i| (i as f32 * 0.1).to_le_bytes()).collect()),
            1 => (safetensors::Dtype::F16, (0..n).flat_map(|i| half::f16::from_f32(i as f32).to_le_bytes()).collect()),
            _ => (safetensors::Dtype::BF16, (0..n).flat_map(|i| half::bf16::from_f32(i as f32).to_le_bytes()).collect()),
        };
        let view = safetensors::tensor::TensorView::new(dt, shape.to_vec(), &bytes).unwrap();
        let file = safetensors::serialize([("latents", view)], None).unwrap();
        let mutated = mutate(&file, &e, safetensors_header(&file));
        if let Ok((values, shape)) = ip2p_pipeline::latents::parse(&mutated) {
            prop_assert_eq!(values.len(), shape.iter().product::<usize>());
            prop_assert!(values.iter().all(|v| v.is_finite()));
        }
    }

    /// `unet/config.json`, parsed and resolved into the block plan.
    #[test]
    fn unet_config(e in json_edits()) {
        let text = mutate_json(&std::fs::read(tiny("unet/config.json")).unwrap(), &e);
        if let Ok(cfg) = UNet2DConditionConfig::from_json(&String::from_utf8_lossy(&text)) {
            let _ = cfg.resolve();
        }
    }

    /// `vae/config.json`.
    #[test]
    fn vae_config(e in json_edits()) {
        let dir = scratch("vae-config");
        let path = write(&dir, "config.json", &mutate_json(&std::fs::read(tiny("vae/config.json")).unwrap(), &e));
        if let Ok(cfg) = VaeConfig::load(&path) {
            let _ = cfg.downscale_factor();
        }
    }

    /// `text_encoder/config.json`.
    #[test]
    fn text_encoder_config(e in json_edits()) {
        let dir = scratch("text-config");
        let path = write(&dir, "config.json", &mutate_json(&std::fs::read(tiny("text_encoder/config.json")).unwrap(), &e));
        let _ = ClipTextConfig::from_file(&path);
    }

    /// `scheduler/scheduler_config.json`, built into each scheduler and given a few step counts.
    #[test]
    fn scheduler_config(e in json_edits(), steps in prop_oneof![0usize..60, Just(usize::MAX)]) {
        let text = mutate_json(&std::fs::read(tiny("scheduler/scheduler_config.json")).unwrap(), &e);
        if let Ok(cfg) = ip2p_sched::SchedulerConfig::from_json_str(&String::from_utf8_lossy(&text)) {
            for kind in ip2p_sched::SchedulerKind::ALL {
                if let Ok(mut s) = ip2p_sched::build::<B>(&cfg, Some(kind))
                    && s.set_timesteps(steps).is_ok()
                {
                    // Every step of a short run, on a small latent.
                    let device = Default::default();
                    let mut x = Tensor::<B, 4>::ones([1, 4, 2, 2], &device);
                    for t in s.timesteps().to_vec().into_iter().take(8) {
                        let input = s.scale_model_input(x.clone(), t);
                        prop_assert!(input.is_ok() || s.timesteps().is_empty());
                        let eps = Tensor::<B, 4>::ones([1, 4, 2, 2], &device).mul_scalar(0.1);
                        let noise = Some(Tensor::<B, 4>::zeros([1, 4, 2, 2], &device));
                        match s.step(eps, t, x.clone(), noise) {
                            Ok(out) => x = out.prev_sample,
                            Err(_) => break,
                        }
                    }
                }
            }
        }
    }

    /// Images: PNG, JPEG and WebP files byte-flipped and truncated, decoded under a pixel limit.
    #[test]
    fn images(e in edits(), format in 0usize..3) {
        let bytes = &encoded_images()[format];
        let mutated = mutate(bytes, &e, 256);
        if let Ok(img) = ip2p_vae::image_io::decode_image_limited(&mutated, "fuzz", 1 << 20) {
            prop_assert!(u64::from(img.width()) * u64::from(img.height()) <= 1 << 20);
        }
    }

    /// Token ids a dataset holds: wrong lengths, out-of-range and negative ids.
    #[test]
    fn token_ids(rows in prop::collection::vec(
        prop::collection::vec(prop_oneof![0i64..100, -3i64..0, Just(i64::MAX), Just(i64::MIN), 0i64..1_000_000], 0..90),
        0..3,
    )) {
        let text = prompt_encoder();
        if let Ok(t) = text.encode_ids(&rows) {
            let t: Tensor<B, 3> = t;
            prop_assert_eq!(t.dims()[0], rows.len());
        }
    }
}

proptest! {
    #![proptest_config(config(2))]

    /// A `vocab.json` + `merges.txt` tokenizer folder (and its two small configs).
    #[test]
    fn tokenizer_files(which in 0usize..4, e in edits(), j in json_edits()) {
        let names = ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"];
        let dir = scratch(&format!("tokenizer-{which}"));
        for (i, name) in names.iter().enumerate() {
            let original = std::fs::read(tiny("tokenizer").join(name)).unwrap();
            let bytes = match (i == which, name.ends_with(".json")) {
                (false, _) => original,
                (true, true) => mutate_json(&original, &j),
                (true, false) => mutate(&original, &e, original.len()),
            };
            write(&dir, name, &bytes);
        }
        if let Ok(tok) = ClipTokenizer::from_dir(&dir) {
            let _ = tok.tokenize("a photo of a cat, lots of details");
        }
    }

    /// A `tokenizer.json` folder.
    #[test]
    fn tokenizer_json(e in json_edits()) {
        let dir = scratch("tokenizer-json");
        let src = fixtures_dir().join("text").join("tokenizer-json");
        std::fs::copy(src.join("tokenizer_config.json"), dir.join("tokenizer_config.json")).unwrap();
        write(&dir, "tokenizer.json", &mutate_json(&std::fs::read(src.join("tokenizer.json")).unwrap(), &e));
        if let Ok(tok) = ClipTokenizer::from_dir(&dir) {
            let _ = tok.tokenize("make it snowy");
        }
    }
}

/// `fixtures/vae/src.png` as PNG, JPEG and WebP bytes.
fn encoded_images() -> &'static [Vec<u8>; 3] {
    static IMAGES: OnceLock<[Vec<u8>; 3]> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let img = ip2p_vae::load_image(fixtures_dir().join("vae/src.png")).unwrap();
        ["a.png", "a.jpg", "a.webp"].map(|n| ip2p_vae::image_io::encode_image(&img, n).unwrap())
    })
}

/// The tiny model's tokenizer and text encoder, loaded once.
fn prompt_encoder() -> &'static PromptEncoder<B> {
    static TEXT: OnceLock<PromptEncoder<B>> = OnceLock::new();
    TEXT.get_or_init(|| {
        PromptEncoder::load(
            fixtures_dir().join("models").join("tiny"),
            None,
            &Default::default(),
        )
        .unwrap()
    })
}
