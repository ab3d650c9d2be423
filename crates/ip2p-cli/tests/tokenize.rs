//! `ip2p tokenize` against transformers' ids (fixtures/text/tokenize.json).

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

#[test]
fn prints_one_json_array_per_prompt() {
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("text/tokenize.json")).unwrap(),
    )
    .unwrap();
    let prompts: Vec<String> = serde_json::from_value(expected["prompts"].clone()).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(expected["clip_bpe"]["ids"].clone()).unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_ip2p"))
        .arg("tokenize")
        .arg("--tokenizer")
        .arg(fixtures().join("clip-bpe"))
        .args(&prompts)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<Vec<u32>> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), prompts.len());
    for (i, (got, want)) in lines.iter().zip(&ids).enumerate() {
        assert_eq!(got, want, "prompt {i} {:?}", prompts[i]);
    }
    // The over-long prompt is reported.
    assert!(String::from_utf8_lossy(&out.stderr).contains("truncated"));
}

#[test]
fn bad_folder_fails_with_a_message() {
    let missing = fixtures().join("no-such-tokenizer");
    let out = Command::new(env!("CARGO_BIN_EXE_ip2p"))
        .args(["tokenize", "--tokenizer"])
        .arg(&missing)
        .arg("a cat")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no-such-tokenizer"), "{stderr}");
}

#[test]
fn prompts_are_required() {
    let out = Command::new(env!("CARGO_BIN_EXE_ip2p"))
        .args(["tokenize", "--tokenizer"])
        .arg(fixtures().join("clip-bpe"))
        .output()
        .unwrap();
    assert!(!out.status.success());
}
