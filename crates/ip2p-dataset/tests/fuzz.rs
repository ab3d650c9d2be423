//! Fuzzed manifests (JSON Lines and Parquet): a valid manifest mutated by byte edits and, for
//! JSON Lines, by fields replaced with hostile values, then read with [`Manifest::read`]. The
//! property: a typed error or a manifest, never a panic or an abort. Cases per property: 2,000
//! (JSON Lines) and 500 (Parquet) in `cargo test`; `IP2P_FUZZ_CASES=N` for a longer run.

mod common;

use std::path::PathBuf;

use ip2p_dataset::Manifest;
use proptest::prelude::*;
use proptest::sample::Index;

fn config(default: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("IP2P_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ip2p-dataset-fuzz-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Byte edits: (position, kind, byte); kinds overwrite, xor, truncate, insert, delete.
fn edits() -> impl Strategy<Value = Vec<(Index, u8, u8)>> {
    prop::collection::vec((any::<Index>(), 0u8..5, any::<u8>()), 1..4)
}

fn mutate(bytes: &[u8], edits: &[(Index, u8, u8)]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for (i, kind, b) in edits {
        let p = i.index(out.len() + 1);
        match kind {
            0 if p < out.len() => out[p] = *b,
            1 if p < out.len() => out[p] ^= b.max(&1),
            2 => out.truncate(p),
            3 => out.insert(p, *b),
            4 if p < out.len() => {
                out.drain(p..(p + *b as usize % 32 + 1).min(out.len()));
            }
            _ => {}
        }
    }
    out
}

const JSONL: &str = r#"{"id": "a-1", "image": "a.png", "prompt": "make it snowy", "seed": 3, "steps": 10}
{"id": 7, "image": "b.png", "prompt_ids": [49406, 320, 49407], "guidance": 7.5, "image_guidance": 1.5}
{"id": "c", "image": "sub/c.png", "prompt": "turn him into a cyborg", "source": "x", "score": 0.5}
"#;

/// Hostile JSON values for a manifest field.
fn hostile() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "null",
        "-1",
        "0",
        "1e308",
        "-1e308",
        "18446744073709551615",
        "1.5",
        "\"\"",
        "\"../x\"",
        "\"a/b\"",
        "[]",
        "[-1]",
        "[1e20]",
        "{}",
        "true",
        "\"\\u0000\"",
    ])
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn jsonl_manifest(e in edits(), field in any::<Index>(), value in hostile(), structural in any::<bool>()) {
        let mut text = JSONL.to_string();
        if structural {
            // Replace one value (after a `": `) with a hostile one.
            let starts: Vec<usize> = text.match_indices("\": ").map(|(i, _)| i + 3).collect();
            let at = starts[field.index(starts.len())];
            let end = text[at..].find([',', '}']).map_or(text.len(), |n| at + n);
            text.replace_range(at..end, value);
        }
        let bytes = mutate(text.as_bytes(), if structural { &e[..0] } else { &e });
        let dir = scratch("jsonl");
        let path = dir.join("m.jsonl");
        std::fs::write(&path, bytes).unwrap();
        if let Ok(m) = Manifest::read(&path) {
            prop_assert!(m.items.len() <= 3);
        }
    }
}

#[cfg(feature = "parquet")]
proptest! {
    #![proptest_config(config(500))]

    #[test]
    fn parquet_manifest(e in edits()) {
        let original = parquet_bytes();
        let dir = scratch("parquet");
        let path = dir.join("m.parquet");
        std::fs::write(&path, mutate(original, &e)).unwrap();
        let _ = Manifest::read(&path);
    }
}

#[cfg(feature = "parquet")]
fn parquet_bytes() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| {
        let path = scratch("parquet-source").join("m.parquet");
        common::write_parquet(&path);
        std::fs::read(&path).unwrap()
    })
}
