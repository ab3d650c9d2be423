//! `ip2p edit` end to end on the tiny fixture model: outputs, latent files, and user errors
//! that exit non-zero with a message and write nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/tiny")
}

fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ip2p-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn image(dir: &Path, name: &str, w: u32, h: u32, seed: u32) -> PathBuf {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let v = (x * 7 + y * 13 + seed * 31) % 256;
        image::Rgb([v as u8, (255 - v) as u8, ((v * 3) % 256) as u8])
    });
    let path = dir.join(name);
    img.save(&path).unwrap();
    path
}

fn ip2p(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ip2p"))
        .arg("edit")
        .arg("--model")
        .arg(model())
        .args(args)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn edits_a_batch_and_writes_each_image() {
    let dir = workdir("batch");
    let a = image(&dir, "a.png", 32, 24, 1);
    let b = image(&dir, "b.png", 32, 24, 2);
    let out = dir.join("out.png");
    let o = ip2p(&[
        "--image",
        s(&a),
        "--image",
        s(&b),
        "--prompt",
        "make it snowy",
        "--prompt",
        "turn him into a cyborg",
        "--output",
        s(&out),
        "--steps",
        "2",
        "--quiet",
        "--memory-report",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for name in ["out-0.png", "out-1.png"] {
        let img = image::open(dir.join(name)).unwrap();
        assert_eq!((img.width(), img.height()), (32, 24));
    }
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(
        report.contains("VAE encode") && report.contains("denoise (2 steps"),
        "{report}"
    );
}

#[test]
fn latents_out_then_latents_in() {
    let dir = workdir("latents");
    let a = image(&dir, "a.png", 16, 16, 3);
    let lat = dir.join("final.safetensors");
    let o = ip2p(&[
        "--image",
        s(&a),
        "--prompt",
        "x",
        "--no-decode",
        "--output-latents",
        s(&lat),
        "--steps",
        "1",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(&lat).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    // The tiny VAE halves each side.
    assert_eq!(st.tensor("latents").unwrap().shape(), &[1, 4, 8, 8]);

    let out = dir.join("from-latents.png");
    let o = ip2p(&[
        "--image-latents",
        s(&lat),
        "--prompt",
        "x",
        "--output",
        s(&out),
        "--steps",
        "1",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(image::open(&out).unwrap().width(), 16);
}

#[test]
fn odd_sizes_are_resized_with_a_warning() {
    let dir = workdir("odd");
    let a = image(&dir, "a.png", 17, 15, 4);
    let out = dir.join("o.png");
    let o = ip2p(&[
        "--image",
        s(&a),
        "--prompt",
        "x",
        "--output",
        s(&out),
        "--steps",
        "1",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("resized to 16×14"));
    assert_eq!(image::open(&out).unwrap().width(), 16);
}

#[test]
fn user_errors_exit_non_zero_and_write_nothing() {
    let dir = workdir("errors");
    let a = image(&dir, "a.png", 16, 16, 5);
    let b = image(&dir, "b.png", 24, 16, 6);
    let out = dir.join("never.png");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--image", s(&a), "--prompt", "x", "--prompt", "y"],
            "each image needs its own --prompt",
        ),
        (
            vec![
                "--image",
                s(&a),
                "--image",
                s(&b),
                "--prompt",
                "x",
                "--prompt",
                "y",
            ],
            "same size",
        ),
        (
            vec!["--image", "/no/such.png", "--prompt", "x"],
            "/no/such.png",
        ),
        (
            vec![
                "--image",
                s(&a),
                "--prompt",
                "x",
                "--scheduler",
                "warp-drive",
            ],
            "warp-drive",
        ),
    ];
    for (args, needle) in cases {
        let mut args = args;
        args.extend(["--output", s(&out), "--steps", "1", "--quiet"]);
        let o = ip2p(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists(), "{args:?} wrote an output");
    }

    let bad = dir.join("bad.safetensors");
    let data = vec![0u8; 4 * 2 * 8 * 8 * 4];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 4, 8, 8], &data)
            .unwrap();
    std::fs::write(
        &bad,
        safetensors::serialize([("latents", view)], None).unwrap(),
    )
    .unwrap();
    let o = ip2p(&[
        "--image",
        s(&a),
        "--prompt",
        "x",
        "--init-latents",
        s(&bad),
        "--output",
        s(&out),
        "--steps",
        "1",
        "--quiet",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("initial latents have shape"));
    assert!(!out.exists());

    let not_ip2p = dir.join("model");
    std::fs::create_dir_all(not_ip2p.join("unet")).unwrap();
    std::fs::copy(
        model().join("model_index.json"),
        not_ip2p.join("model_index.json"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(model().join("unet/config.json"))
        .unwrap()
        .replace("\"in_channels\": 8", "\"in_channels\": 4");
    std::fs::write(not_ip2p.join("unet/config.json"), cfg).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_ip2p"))
        .args([
            "edit",
            "--model",
            s(&not_ip2p),
            "--image",
            s(&a),
            "--prompt",
            "x",
            "--output",
            s(&out),
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not an InstructPix2Pix model"));
}
