//! `ip2p edit`'s guarantees on the tiny fixture model: limits refused with their message,
//! outputs written atomically (a process killed at any moment leaves the old file or the new
//! one), Ctrl-C stopping without output, and bit-identical results across runs, chunkings and
//! thread counts.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{model, workdir};

fn image(dir: &Path, name: &str, w: u32, h: u32, seed: u32) -> PathBuf {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let v = (x * 7 + y * 13 + seed * 31 + (x * y) % 5) % 256;
        image::Rgb([v as u8, (255 - v) as u8, ((v * 3) % 256) as u8])
    });
    let path = dir.join(name);
    img.save(&path).unwrap();
    path
}

fn edit_command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ip2p"));
    c.arg("edit").arg("--model").arg(model()).args(args);
    c
}

fn ip2p(args: &[&str]) -> Output {
    edit_command(args).output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Files in `dir` whose names start with a dot (the temporary `.{name}.{pid}.partial` files).
fn hidden(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn limits_are_refused_with_their_message() {
    let dir = workdir("limits");
    let a = image(&dir, "a.png", 64, 48, 1);
    let out = dir.join("never.png");
    let cases: [(&[&str], &str); 5] = [
        (
            &["--max-pixels", "3000"],
            "64×48 (3072 pixels), above the limit of 3000 (--max-pixels",
        ),
        (
            &["--steps", "1001"],
            "1001 inference steps exceed the 1000 training timesteps",
        ),
        (&["--guidance", "NaN"], "guidance_scale must be finite"),
        (
            &["--image-guidance", "inf"],
            "image_guidance_scale must be finite",
        ),
        (&["--guidance=-inf"], "guidance_scale must be finite"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["--image", s(&a), "--prompt", "x", "--output", s(&out)];
        args.extend_from_slice(extra);
        if !extra.contains(&"--steps") {
            args.extend(["--steps", "1"]);
        }
        let o = ip2p(&args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{extra:?} succeeded");
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{extra:?}: one line, got {err}");
        assert!(!out.exists());
    }

    // A decompression bomb: a PNG header claiming 100000×100000 pixels is refused from the
    // header, before any pixel is decoded (default limit).
    let bomb = dir.join("bomb.png");
    let mut png = std::fs::read(&a).unwrap();
    png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    std::fs::write(&bomb, &png).unwrap();
    let o = ip2p(&["--image", s(&bomb), "--prompt", "x", "--output", s(&out)]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("100000×100000"), "{err}");
    assert!(!out.exists());

    // Prompts over 77 tokens: truncated with a warning, as diffusers does.
    let long = "word ".repeat(100);
    let o = ip2p(&[
        "--image",
        s(&a),
        "--prompt",
        &long,
        "--output",
        s(&out),
        "--steps",
        "1",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("longer than the text encoder's 77 tokens"));
    assert!(out.exists());
}

/// PNG's chunk checksum (CRC-32, polynomial 0xEDB88320).
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 == 1 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// The run of [`determinism`]: a batch of two at 24×32 (12×16 latents, where the kernels once
/// chose their algorithm by batch size), Euler ancestral (noise every step), seed 7.
fn batch_run(dir: &Path, tag: &str, extra: &[&str], env: &[(&str, &str)]) -> (Vec<u8>, Vec<u8>) {
    let a = image(dir, "a.png", 32, 24, 3);
    let b = image(dir, "b.png", 32, 24, 4);
    let out = dir.join(format!("{tag}.png"));
    let lat = dir.join(format!("{tag}.safetensors"));
    let mut args = vec![
        "--image",
        s(&a),
        "--image",
        s(&b),
        "--prompt",
        "make it snowy",
        "--prompt",
        "a cyborg",
        "--output",
        s(&out),
        "--output-latents",
        s(&lat),
        "--steps",
        "3",
        "--seed",
        "7",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let mut c = edit_command(&args);
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{tag}: {}", stderr(&o));
    let image = std::fs::read(dir.join(format!("{tag}-1.png"))).unwrap();
    (image, std::fs::read(&lat).unwrap())
}

#[test]
fn determinism() {
    let dir = workdir("determinism");
    let whole = batch_run(&dir, "whole", &[], &[]);
    let again = batch_run(&dir, "again", &[], &[]);
    let chunked = batch_run(&dir, "chunked", &["--memory-budget-mib", "1"], &[]);
    let one_thread = batch_run(&dir, "one-thread", &[], &[("RAYON_NUM_THREADS", "1")]);
    assert!(whole == again, "two runs differ");
    assert!(
        whole == chunked,
        "--memory-budget-mib 1 (one edit per chunk) differs"
    );
    assert!(whole == one_thread, "RAYON_NUM_THREADS=1 differs");

    // --output-latents next to a decoded --output: the same latents as a --no-decode run.
    let a = image(&dir, "a.png", 32, 24, 3);
    let b = image(&dir, "b.png", 32, 24, 4);
    let lat = dir.join("only.safetensors");
    let o = ip2p(&[
        "--image",
        s(&a),
        "--image",
        s(&b),
        "--prompt",
        "make it snowy",
        "--prompt",
        "a cyborg",
        "--no-decode",
        "--output-latents",
        s(&lat),
        "--steps",
        "3",
        "--seed",
        "7",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read(&lat).unwrap() == whole.1);
}

/// The reference output of [`killed_runs_leave_the_old_file_or_the_new_one`], and its time.
fn complete_run(args: &[&str]) -> Duration {
    let t = Instant::now();
    let o = ip2p(args);
    assert!(o.status.success(), "{}", stderr(&o));
    t.elapsed()
}

#[test]
fn killed_runs_leave_the_old_file_or_the_new_one() {
    let dir = workdir("sigkill");
    let a = image(&dir, "a.png", 64, 64, 9);
    let out = dir.join("out.png");
    let lat = dir.join("out.safetensors");
    let args = [
        "--image",
        s(&a),
        "--prompt",
        "x",
        "--output",
        s(&out),
        "--output-latents",
        s(&lat),
        "--steps",
        "4",
        "--seed",
        "1",
        "--quiet",
    ];
    let took = complete_run(&args);
    let new_png = std::fs::read(&out).unwrap();
    let new_lat = std::fs::read(&lat).unwrap();
    let old = b"the previous file".to_vec();
    // Kill points spread over a whole run (with a per-process offset), most near its end,
    // where the files are written.
    let trials = 10;
    let offset = std::process::id() as u64 % 97;
    for i in 0..trials {
        std::fs::write(&out, &old).unwrap();
        std::fs::write(&lat, &old).unwrap();
        let frac = ((i as u64 * 97 + offset) % 100) as f64 / 100.0;
        let at = took.mul_f64(0.5 + 0.6 * frac);
        let mut child = edit_command(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(at);
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        for (path, new) in [(&out, &new_png), (&lat, &new_lat)] {
            let now = std::fs::read(path).unwrap();
            assert!(
                now == old || now == *new,
                "trial {i} (killed at {at:?}): {} is neither the old file nor the new one ({} bytes)",
                path.display(),
                now.len()
            );
        }
        for name in hidden(&dir) {
            assert!(name.ends_with(".partial"), "unexpected file {name}");
        }
    }
    // A later run removes the temporary files killed runs left.
    complete_run(&args);
    assert_eq!(hidden(&dir), Vec::<String>::new());
    assert!(std::fs::read(&out).unwrap() == new_png);
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_writes_nothing_and_exits_non_zero() {
    let dir = workdir("sigint");
    // 1000 steps at 128² (64² latents): seconds of work even on a fast machine, so the signal
    // lands mid-run.
    let a = image(&dir, "a.png", 128, 128, 2);
    let out = dir.join("out.png");
    std::fs::write(&out, b"old").unwrap();
    let child = edit_command(&[
        "--image",
        s(&a),
        "--prompt",
        "x",
        "--output",
        s(&out),
        "--steps",
        "1000",
        "--quiet",
    ])
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let t = Instant::now();
    let o = child.wait_with_output().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "did not stop at the next step"
    );
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stderr(&o).contains("interrupted"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&out).unwrap(), b"old");
    assert_eq!(hidden(&dir), Vec::<String>::new());
}
