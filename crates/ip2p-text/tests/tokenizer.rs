//! Tokenizer parity with transformers' `CLIPTokenizer` (fixtures/text/tokenize.json, made by
//! tools/fixtures/fx_text.py) and the tokenizer's typed errors. Ids must match exactly.

use std::path::{Path, PathBuf};

use ip2p_nn::testing::fixtures_dir;
use ip2p_text::{ClipTokenizer, TextError, check_ids};
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    ids: Vec<Vec<u32>>,
    truncated: Vec<bool>,
    decoded: Vec<String>,
}

#[derive(Deserialize)]
struct TokenizeFixture {
    prompts: Vec<String>,
    max_length: usize,
    clip_bpe: Expected,
    tiny: Expected,
    tokenizer_json: Expected,
}

fn fixture() -> TokenizeFixture {
    let path = fixtures_dir().join("text/tokenize.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn check(tok: &ClipTokenizer, fx: &TokenizeFixture, exp: &Expected) {
    assert_eq!(tok.max_length(), fx.max_length);
    for (i, prompt) in fx.prompts.iter().enumerate() {
        let t = tok.tokenize(prompt).unwrap();
        assert_eq!(t.ids, exp.ids[i], "ids of prompt {i} {prompt:?}");
        assert_eq!(
            t.truncated, exp.truncated[i],
            "truncated flag of prompt {i} {prompt:?}"
        );
        assert_eq!(
            tok.decode(&t.ids).unwrap(),
            exp.decoded[i],
            "decode of prompt {i} {prompt:?}"
        );
    }
    assert_eq!(tok.encode_batch(&fx.prompts).unwrap(), exp.ids);
}

#[test]
fn full_clip_vocabulary_matches_transformers() {
    let fx = fixture();
    // fixtures/clip-bpe has only vocab.json and merges.txt: CLIP's defaults apply.
    let tok = ClipTokenizer::from_dir(fixtures_dir().join("clip-bpe")).unwrap();
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.vocab_size()),
        (49406, 49407, 49407, 49408)
    );
    check(&tok, &fx, &fx.clip_bpe);
    assert!(
        fx.clip_bpe.truncated.iter().any(|&t| t),
        "the prompt list has an over-long prompt"
    );
}

#[test]
fn tiny_folder_matches_transformers() {
    let fx = fixture();
    let tok = ClipTokenizer::from_dir(fixtures_dir().join("models/tiny/tokenizer")).unwrap();
    // Special tokens come from the folder: the 1000-token cut puts them at 998/999.
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.vocab_size()),
        (998, 999, 999, 1000)
    );
    check(&tok, &fx, &fx.tiny);
}

#[test]
fn tokenizer_json_folder_matches_transformers() {
    let fx = fixture();
    let tok = ClipTokenizer::from_dir(fixtures_dir().join("text/tokenizer-json")).unwrap();
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (998, 999, 999));
    check(&tok, &fx, &fx.tokenizer_json);
}

#[test]
fn empty_batch_is_an_error() {
    let tok = ClipTokenizer::from_dir(fixtures_dir().join("models/tiny/tokenizer")).unwrap();
    let none: [&str; 0] = [];
    assert!(matches!(
        tok.encode_batch(&none),
        Err(TextError::EmptyBatch)
    ));
    assert!(matches!(tok.check_ids(&[]), Err(TextError::EmptyBatch)));
}

#[test]
fn dataset_ids_are_checked() {
    let tok = ClipTokenizer::from_dir(fixtures_dir().join("models/tiny/tokenizer")).unwrap();
    let good: Vec<i64> = tok
        .encode("a cat")
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    let ok = tok.check_ids(&[good.clone(), good.clone()]).unwrap();
    assert_eq!(ok[1], tok.encode("a cat").unwrap());

    let mut big = good.clone();
    big[5] = 1000;
    let err = tok.check_ids(&[good.clone(), big]).unwrap_err();
    assert!(
        matches!(
            err,
            TextError::IdOutOfRange {
                row: 1,
                position: 5,
                id: 1000,
                vocab_size: 1000
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("row 1") && msg.contains("position 5") && msg.contains("1000"),
        "{msg}"
    );

    let mut neg = good.clone();
    neg[0] = -1;
    assert!(matches!(
        tok.check_ids(&[neg]),
        Err(TextError::IdOutOfRange {
            row: 0,
            position: 0,
            id: -1,
            ..
        })
    ));

    let short = good[..10].to_vec();
    let err = tok.check_ids(&[good.clone(), short]).unwrap_err();
    assert!(
        matches!(
            err,
            TextError::WrongLength {
                row: 1,
                len: 10,
                expected: 77
            }
        ),
        "{err:?}"
    );

    assert!(matches!(check_ids(&[vec![0, 1, 2]], 3, 3), Ok(v) if v == vec![vec![0, 1, 2]]));
    assert!(matches!(
        tok.decode(&[998, 1000]),
        Err(TextError::IdOutOfRange {
            position: 1,
            id: 1000,
            ..
        })
    ));
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ip2p-text-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn copy_tiny(to: &Path, files: &[&str]) {
    for f in files {
        std::fs::copy(
            fixtures_dir().join("models/tiny/tokenizer").join(f),
            to.join(f),
        )
        .unwrap();
    }
}

#[test]
fn unreadable_folders_are_typed_errors() {
    let missing = fixtures_dir().join("text/no-such-tokenizer");
    let err = ClipTokenizer::from_dir(&missing).unwrap_err();
    assert!(
        matches!(&err, TextError::Tokenizer { path, .. } if *path == missing),
        "{err:?}"
    );

    // vocab.json without merges.txt.
    let dir = scratch("no-merges");
    copy_tiny(&dir, &["vocab.json"]);
    let err = ClipTokenizer::from_dir(&dir).unwrap_err();
    assert!(err.to_string().contains("merges.txt"), "{err}");

    // A tokenizer_config.json that is not JSON.
    let dir = scratch("bad-config");
    copy_tiny(&dir, &["vocab.json", "merges.txt"]);
    std::fs::write(
        dir.join("tokenizer_config.json"),
        "{ \"model_max_length\": ",
    )
    .unwrap();
    let err = ClipTokenizer::from_dir(&dir).unwrap_err();
    assert!(
        matches!(&err, TextError::Tokenizer { path, .. } if path.ends_with("tokenizer_config.json")),
        "{err:?}"
    );

    // A pad token the vocabulary does not have.
    let dir = scratch("bad-pad");
    copy_tiny(&dir, &["vocab.json", "merges.txt"]);
    std::fs::write(
        dir.join("special_tokens_map.json"),
        r#"{"pad_token": "<|pad|>"}"#,
    )
    .unwrap();
    let err = ClipTokenizer::from_dir(&dir).unwrap_err();
    assert!(err.to_string().contains("<|pad|>"), "{err}");

    // A corrupt tokenizer.json.
    let dir = scratch("bad-json");
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    assert!(matches!(
        ClipTokenizer::from_dir(&dir),
        Err(TextError::Tokenizer { .. })
    ));
}

#[test]
fn model_max_length_and_pad_token_come_from_the_folder() {
    // SD 2.x style: pad token "!" and a shorter model_max_length.
    let dir = scratch("pad-bang");
    copy_tiny(&dir, &["vocab.json", "merges.txt"]);
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"model_max_length": 8, "pad_token": {"content": "!", "normalized": false}}"#,
    )
    .unwrap();
    let tok = ClipTokenizer::from_dir(&dir).unwrap();
    let bang = tok.inner().token_to_id("!").unwrap();
    assert_eq!(tok.pad_id(), bang);
    let t = tok.tokenize("a").unwrap();
    let a = tok.inner().token_to_id("a</w>").unwrap();
    assert_eq!(t.ids, vec![998, a, 999, bang, bang, bang, bang, bang]);
    assert!(!t.truncated);
    let long = tok.tokenize("one two three four five six seven").unwrap();
    assert!(long.truncated);
    assert_eq!(
        (long.ids[0], long.ids[7]),
        (998, 999),
        "bos and eos survive truncation"
    );
}
