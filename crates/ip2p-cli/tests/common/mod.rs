//! What the CLI's end-to-end tests share: the tiny fixture model, a fresh folder per test and
//! a generated training dataset. (Each test file uses part of it.)
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// `fixtures/models/tiny`, the diffusers folder tools/fixtures makes.
pub fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/tiny")
}

/// An empty folder under the temp dir, named after the test file, `name` and the process.
pub fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ip2p-cli-{}-{name}-{}",
        env!("CARGO_CRATE_NAME"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `n` 20×20 input/edited image pairs and their `metadata.jsonl`, as `ip2p prepare-data` reads.
pub fn training_dataset(dir: &Path, n: u32) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let mut rows = String::new();
    for i in 0..n {
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
