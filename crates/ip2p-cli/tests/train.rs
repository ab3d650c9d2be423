//! `ip2p prepare-data` and `ip2p train` end to end on the tiny fixture model and a generated
//! dataset: ids stored once, a few steps, a checkpoint and a diffusers-layout UNet written.

use std::path::Path;
use std::process::Command;

mod common;
use common::{model, training_dataset};

fn ip2p(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ip2p"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn prepare_data_then_train_a_few_steps() {
    let root = std::env::temp_dir().join(format!("ip2p-cli-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (data, out) = (root.join("data"), root.join("out"));
    training_dataset(&data, 3);
    let m = model();
    let m = m.to_str().unwrap();

    let o = ip2p(&[
        "prepare-data",
        "--data",
        data.to_str().unwrap(),
        "--model",
        m,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tokens = std::fs::read_to_string(data.join("tokens.jsonl")).unwrap();
    assert_eq!(tokens.lines().count(), 3);

    let o = ip2p(&[
        "train",
        "--model",
        m,
        "--data",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--resolution",
        "16",
        "--batch-size",
        "2",
        "--max-train-steps",
        "2",
        "--checkpointing-steps",
        "2",
        "--learning-rate",
        "1e-4",
        "--quiet",
        "--no-save-pipeline",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let files: Vec<String> = walk(&out);
    assert!(
        files.iter().any(|f| f.contains("checkpoint-2")),
        "{files:?}"
    );
    assert!(
        files
            .iter()
            .any(|f| f.ends_with("diffusion_pytorch_model.safetensors")),
        "{files:?}"
    );

    // A dataset that was never prepared is a clear error, not a panic.
    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = ip2p(&[
        "train",
        "--model",
        m,
        "--data",
        empty.to_str().unwrap(),
        "--output",
        root.join("o2").to_str().unwrap(),
        "--quiet",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("tokens.jsonl") && !err.contains("panicked"),
        "{err}"
    );
    std::fs::remove_dir_all(&root).ok();
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p.to_string_lossy().into_owned());
            }
        }
    }
    out
}
