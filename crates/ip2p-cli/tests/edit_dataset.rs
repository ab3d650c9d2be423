//! `ip2p edit-dataset` end to end on the tiny fixture model: shards run concurrently give the
//! bytes one run gives, an item's latents do not depend on its batch, position or shard, a
//! stopped shard resumes with only what is missing, bad items are reported, and `--merge`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

mod common;
use common::{model, workdir};

const SHARD_VARS: &[&str] = &[
    "JOB_COMPLETION_INDEX",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_STEP",
    "RANK",
    "WORLD_SIZE",
];

/// A 32×24 image (sides multiples of the tiny VAE's factor, so no resize): 16×12 latents, a
/// size where the CPU kernels once chose their algorithm by batch size (an item alone and in a
/// batch of 3 differed by up to 7e-4 after 3 steps).
fn image(dir: &Path, name: &str, seed: u32) {
    let img = image::RgbImage::from_fn(32, 24, |x, y| {
        let v = (x * 7 + y * 13 + seed * 31) % 256;
        image::Rgb([v as u8, (255 - v) as u8, ((v * 3 + seed) % 256) as u8])
    });
    img.save(dir.join(name)).unwrap();
}

/// Eight items, each with its own image, prompt and an extra column.
fn manifest(dir: &Path, order: &[usize]) -> PathBuf {
    let mut text = String::new();
    for &i in order {
        image(dir, &format!("in-{i}.png"), i as u32);
        text.push_str(&format!(
            "{{\"id\": \"item-{i}\", \"image\": \"in-{i}.png\", \"prompt\": \"make it snowy {i}\", \"source\": \"s{i}\"}}\n"
        ));
    }
    let path = dir.join(format!("m-{}.jsonl", order.len()));
    std::fs::write(&path, text).unwrap();
    path
}

fn command(manifest: &Path, out: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ip2p"));
    c.arg("edit-dataset")
        .arg("--model")
        .arg(model())
        .arg("--manifest")
        .arg(manifest)
        .arg("--output")
        .arg(out)
        .args(["--steps", "2", "--quiet"])
        .args(args);
    for v in SHARD_VARS {
        c.env_remove(v);
    }
    c.envs(env.iter().copied());
    c
}

fn run(manifest: &Path, out: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    command(manifest, out, args, env).output().unwrap()
}

fn ok(o: Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    err
}

fn merge(manifest: &Path, dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ip2p"))
        .args(["edit-dataset", "--merge"])
        .arg(dir)
        .arg("--manifest")
        .arg(manifest)
        .output()
        .unwrap()
}

/// The files of a folder with their bytes (results files and merged results left out).
fn outputs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_none_or(|e| e != "jsonl"))
        .map(|p| {
            (
                p.file_name().unwrap().to_str().unwrap().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

/// Result lines without their timing, keyed by id.
fn results(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v
        })
        .collect()
}

fn wait(child: Child) -> Output {
    child.wait_with_output().unwrap()
}

#[test]
fn two_concurrent_shards_give_the_bytes_of_one_run() {
    let dir = workdir("shards");
    let m = manifest(&dir, &[0, 1, 2, 3, 4, 5, 6, 7]);
    let one = dir.join("one");
    ok(run(&m, &one, &["--batch", "3"], &[]));
    assert_eq!(outputs(&one).len(), 8);

    // Two shards at once, one told by Slurm's environment, one by torchrun's.
    let two = dir.join("two");
    let spawn = |env: &[(&str, &str)]| {
        command(&m, &two, &["--batch", "3"], env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = spawn(&[
        ("SLURM_ARRAY_TASK_ID", "0"),
        ("SLURM_ARRAY_TASK_COUNT", "2"),
    ]);
    let b = spawn(&[("RANK", "1"), ("WORLD_SIZE", "2")]);
    let (a, b) = (ok(wait(a)), ok(wait(b)));
    assert!(a.contains("shard 0 of 2 (from Slurm job array"), "{a}");
    assert!(
        b.contains("shard 1 of 2 (from torch launcher: RANK/WORLD_SIZE)"),
        "{b}"
    );
    // Groups of 3 over 8 items: shard 0 takes groups {0,1,2}, {3,4,5}; shard 1 {6,7}.
    assert!(a.contains("items 0..6 of 8"), "{a}");
    assert!(b.contains("items 6..8 of 8"), "{b}");
    assert!(two.join("shard-0-of-2.jsonl").is_file() && two.join("shard-1-of-2.jsonl").is_file());
    assert_eq!(outputs(&one), outputs(&two));

    ok(merge(&m, &one));
    ok(merge(&m, &two));
    let r = results(&one.join("results.jsonl"));
    assert_eq!(r, results(&two.join("results.jsonl")));
    let ids: Vec<&str> = r.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(ids, (0..8).map(|i| format!("item-{i}")).collect::<Vec<_>>());
    assert_eq!(r[3]["source"], "s3");
    assert_eq!(r[3]["group"], 1);
    assert_eq!(r[3]["status"], "ok");
    assert_eq!(r[3]["output"], "item-3.png");
    assert_eq!(r[3]["sha256"].as_str().unwrap().len(), 64);
}

#[test]
fn an_items_latents_do_not_depend_on_batch_position_or_shard() {
    let dir = workdir("position");
    // item-5 alone (batch 1); third of a batch of 3 in another order; in shard 1 of 3.
    let m8 = manifest(&dir, &[0, 1, 2, 3, 4, 5, 6, 7]);
    let alone = dir.join("alone");
    ok(run(&m8, &alone, &["--batch", "1", "--save-latents"], &[]));
    let m_other = manifest(&dir, &[6, 7, 5]);
    let batched = dir.join("batched");
    ok(run(
        &m_other,
        &batched,
        &["--batch", "3", "--save-latents"],
        &[],
    ));
    let sharded = dir.join("sharded");
    ok(run(
        &m8,
        &sharded,
        &["--batch", "1", "--save-latents", "--num-shards", "3"],
        &[("JOB_COMPLETION_INDEX", "1")],
    ));
    let read = |d: &Path, name: &str| std::fs::read(d.join(name)).unwrap();
    for name in [
        "item-5.safetensors",
        "item-5.png",
        "item-7.png",
        "item-6.png",
    ] {
        assert_eq!(
            read(&alone, name),
            read(&batched, name),
            "{name}: batch of 3"
        );
    }
    // Kubernetes index 1 of 3 over 8 items: 3..6.
    assert_eq!(
        read(&alone, "item-5.safetensors"),
        read(&sharded, "item-5.safetensors")
    );
    assert!(!sharded.join("item-2.png").exists() && !sharded.join("item-6.png").exists());
    // And a different global seed gives a different image.
    let reseeded = dir.join("reseeded");
    ok(run(
        &m_other,
        &reseeded,
        &["--batch", "3", "--seed", "1"],
        &[],
    ));
    assert_ne!(read(&alone, "item-5.png"), read(&reseeded, "item-5.png"));
}

#[test]
fn a_stopped_shard_resumes_with_only_what_is_missing() {
    let dir = workdir("resume");
    let m = manifest(&dir, &[0, 1, 2, 3, 4, 5, 6, 7]);
    let full = dir.join("full");
    ok(run(&m, &full, &["--batch", "3"], &[]));

    let out = dir.join("out");
    let o = run(&m, &out, &["--batch", "3", "--test-stop-after", "4"], &[]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let names: Vec<String> = outputs(&out).into_keys().collect();
    let partial: Vec<&String> = names.iter().filter(|n| n.ends_with(".partial")).collect();
    assert_eq!(partial.len(), 1, "{names:?}");
    assert!(partial[0].starts_with(".item-4.png."), "{names:?}");
    assert!(
        !out.join("item-4.png").exists(),
        "a partial file is not an output"
    );
    assert_eq!(names.iter().filter(|n| n.ends_with(".png")).count(), 4);

    let err = ok(run(&m, &out, &["--batch", "3"], &[]));
    assert!(err.contains("4 to edit, 4 already done"), "{err}");
    assert!(
        err.contains("1 partial file(s) of a stopped run removed"),
        "{err}"
    );
    assert_eq!(outputs(&out), outputs(&full));

    // Each item has one results line; a third run edits nothing.
    let lines = results(&out.join("shard-0-of-1.jsonl"));
    assert_eq!(lines.len(), 8);
    let before = std::fs::metadata(out.join("item-0.png"))
        .unwrap()
        .modified()
        .unwrap();
    let err = ok(run(&m, &out, &["--batch", "3"], &[]));
    assert!(err.contains("0 to edit, 8 already done"), "{err}");
    assert_eq!(
        std::fs::metadata(out.join("item-0.png"))
            .unwrap()
            .modified()
            .unwrap(),
        before
    );
    assert_eq!(results(&out.join("shard-0-of-1.jsonl")).len(), 8);
    ok(merge(&m, &out));
    assert_eq!(results(&out.join("results.jsonl")), {
        ok(merge(&m, &full));
        results(&full.join("results.jsonl"))
    });
}

#[test]
fn bad_items_are_reported_and_strict_stops() {
    let dir = workdir("bad");
    image(&dir, "good.png", 1);
    std::fs::write(dir.join("corrupt.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let m = dir.join("m.jsonl");
    std::fs::write(
        &m,
        [
            r#"{"id": "good", "image": "good.png", "prompt": "snow"}"#,
            r#"{"id": "missing", "image": "nope.png", "prompt": "snow"}"#,
            r#"{"id": "corrupt", "image": "corrupt.png", "prompt": "snow"}"#,
            r#"{"id": "empty", "image": "good.png", "prompt": "  "}"#,
            r#"{"id": "ids", "image": "good.png", "prompt_ids": [1, 2, 3]}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let out = dir.join("out");
    let err = ok(run(&m, &out, &["--batch", "2"], &[]));
    assert!(err.contains("1 edited, 4 failed"), "{err}");
    let r = results(&out.join("shard-0-of-1.jsonl"));
    let reason = |id: &str| {
        let line = r.iter().find(|v| v["id"] == id).unwrap();
        assert_eq!(line["status"], if id == "good" { "ok" } else { "failed" });
        line.get("reason")
            .and_then(|x| x.as_str())
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(reason("good"), "");
    assert!(
        reason("missing").contains("nope.png"),
        "{}",
        reason("missing")
    );
    assert!(
        reason("corrupt").contains("corrupt.png"),
        "{}",
        reason("corrupt")
    );
    assert!(
        reason("empty").contains("empty prompt"),
        "{}",
        reason("empty")
    );
    assert!(reason("ids").contains("prompt_ids"), "{}", reason("ids"));
    // Reported failures count as done for --merge and for a rerun.
    let s = String::from_utf8_lossy(&merge(&m, &out).stdout).to_string();
    assert!(s.contains("5 items: 1 edited, 4 failed"), "{s}");
    let err = ok(run(&m, &out, &["--batch", "2"], &[]));
    assert!(err.contains("0 to edit"), "{err}");

    let strict = dir.join("strict");
    let o = run(&m, &strict, &["--batch", "2", "--strict"], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("m.jsonl:2: item \"missing\""), "{err}");
}

#[test]
fn user_errors_exit_non_zero_naming_the_cause() {
    let dir = workdir("errors");
    let m = manifest(&dir, &[0, 1, 2]);
    let out = dir.join("out");
    // A merge with items missing writes nothing and names them.
    ok(run(
        &m,
        &out,
        &["--num-shards", "2", "--shard-index", "0"],
        &[],
    ));
    let o = merge(&m, &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("1 of 3 manifest item(s) have no output"),
        "{err}"
    );
    assert!(err.contains("item-2"), "{err}");
    assert!(!out.join("results.jsonl").exists());

    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"id\": \"a\", \"image\": \"in-0.png\", \"prompt\": \"p\"}\n{\"id\": \"a\", \"image\": \"in-1.png\", \"prompt\": \"p\"}\n",
    )
    .unwrap();
    let o = run(&bad, &out, &[], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("bad.jsonl:2: id \"a\" already used on line 1"),
        "{err}"
    );

    let o = run(&m, &out, &[], &[("JOB_COMPLETION_INDEX", "0")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("give --num-shards"), "{err}");
}
