//! `--model FILE` and `ip2p convert` on the tiny model's original-layout checkpoint
//! (fixtures/single, made by tools/fixtures/fx_single.py).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::workdir;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn ip2p(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ip2p"))
        .args(args)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn edit_from_the_file_gives_the_folders_image() {
    let dir = workdir("edit");
    let input = dir.join("in.png");
    image::RgbImage::from_fn(16, 16, |x, y| {
        image::Rgb([(x * 15) as u8, (y * 15) as u8, 99])
    })
    .save(&input)
    .unwrap();
    let tiny = fixtures().join("models/tiny");
    let run = |model: &Path, out: &Path, extra: &[&str]| {
        let mut args = vec![
            "edit",
            "--model",
            s(model),
            "--image",
            s(&input),
            "--prompt",
            "make it snowy",
            "--output",
            s(out),
            "--steps",
            "3",
            "--seed",
            "7",
            "--quiet",
        ];
        args.extend_from_slice(extra);
        let o = ip2p(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(out).unwrap()
    };
    let folder = run(&tiny, &dir.join("folder.png"), &[]);
    let file = run(
        &fixtures().join("single/tiny_ldm.safetensors"),
        &dir.join("file.png"),
        &["--config", s(&tiny)],
    );
    assert!(
        folder == file,
        "the single file's edit differs from the folder's"
    );
    // The raw UNet copy (negated weights in the fixture) gives another image.
    let raw = run(
        &fixtures().join("single/tiny_ldm.safetensors"),
        &dir.join("raw.png"),
        &["--config", s(&tiny), "--weights", "raw"],
    );
    assert!(raw != folder, "--weights raw loaded the EMA copy");
}

#[test]
fn convert_writes_the_diffusers_folder() {
    let dir = workdir("convert");
    let out = dir.join("converted");
    let tiny = fixtures().join("models/tiny");
    let o = ip2p(&[
        "convert",
        "--checkpoint",
        s(&fixtures().join("single/tiny_ldm.safetensors")),
        "--config",
        s(&tiny),
        "--output",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Every weight file holds the folder's tensors: same names, dtypes, shapes and bytes.
    for rel in [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        let (a, b) = (
            std::fs::read(out.join(rel)).unwrap(),
            std::fs::read(tiny.join(rel)).unwrap(),
        );
        let (a, b) = (
            safetensors::SafeTensors::deserialize(&a).unwrap(),
            safetensors::SafeTensors::deserialize(&b).unwrap(),
        );
        let mut names = a.names();
        names.sort();
        let mut want = b.names();
        want.sort();
        assert_eq!(names, want, "{rel}: tensor names");
        for n in names {
            let (x, y) = (a.tensor(n).unwrap(), b.tensor(n).unwrap());
            assert_eq!(x.dtype(), y.dtype(), "{rel}: {n}");
            assert_eq!(x.shape(), y.shape(), "{rel}: {n}");
            assert!(x.data() == y.data(), "{rel}: {n} differs");
        }
    }
    // And ip2p edits with it.
    let input = dir.join("in.png");
    image::RgbImage::from_pixel(8, 8, image::Rgb([10, 200, 30]))
        .save(&input)
        .unwrap();
    let o = ip2p(&[
        "edit",
        "--model",
        s(&out),
        "--image",
        s(&input),
        "--prompt",
        "x",
        "--output",
        s(&dir.join("o.png")),
        "--steps",
        "1",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // A second convert into the now non-empty folder is refused.
    let o = ip2p(&[
        "convert",
        "--checkpoint",
        s(&fixtures().join("single/tiny_ldm.safetensors")),
        "--config",
        s(&tiny),
        "--output",
        s(&out),
    ]);
    assert!(!o.status.success());
}

#[test]
fn a_pickled_object_is_refused_with_the_class_name() {
    let dir = workdir("bad");
    let o = ip2p(&[
        "convert",
        "--checkpoint",
        s(&fixtures().join("single/bad_object.ckpt")),
        "--output",
        s(&dir.join("out")),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")
            && err.contains(".safetensors"),
        "{err}"
    );
}
