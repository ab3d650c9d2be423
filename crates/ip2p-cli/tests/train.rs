//! `ip2p prepare-data` and `ip2p train` end to end on the tiny fixture model and a generated
//! dataset: ids stored once, a few steps, a checkpoint and a diffusers-layout UNet written.

use std::path::{Path, PathBuf};
use std::process::Command;

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/tiny")
}

fn dataset(dir: &Path) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let mut rows = String::new();
    for i in 0..3u32 {
        let img = |salt: u32| {
            image::RgbImage::from_fn(20, 20, move |x, y| {
                let v = (x * 11 + y * 5 + i * 40 + salt) % 256;
                image::Rgb([v as u8, (v / 2) as u8, 255 - v as u8])
            })
        };
        img(0).save(dir.join(format!("images/in{i}.png"))).unwrap();
        img(90)
            .save(dir.join(format!("images/out{i}.png")))
            .unwrap();
        rows += &format!(
            "{{\"input_image\": \"images/in{i}.png\", \"edit_prompt\": \"make it number {i}\", \"edited_image\": \"images/out{i}.png\"}}\n"
        );
    }
    std::fs::write(dir.join("metadata.jsonl"), rows).unwrap();
}

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
    dataset(&data);
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
