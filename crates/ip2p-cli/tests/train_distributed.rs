//! Data-parallel `ip2p train` over burn-collective on 127.0.0.1: the orchestrator and two
//! ranks (batch 1 each) end with bitwise-equal UNets, equal within 1e-5 to one process on
//! batch 2 over the same samples; one process with `--devices 2` ends bitwise equal to the two
//! processes (and resumes their checkpoint); two processes of two devices match one process
//! at batch 4; a rank killed mid-run makes the other fail with a clear error. Every child process runs under a deadline and is killed if the test fails.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

mod common;
use common::training_dataset;

fn model() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models/tiny")
        .to_string_lossy()
        .into_owned()
}

/// Child processes killed when dropped (a failing assertion leaves nothing running).
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ip2p() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ip2p"));
    // torchrun-style variables from the test's own environment must not leak in.
    for v in [
        "WORLD_SIZE",
        "RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "IP2P_NODE_ADDRESS",
    ] {
        c.env_remove(v);
    }
    c
}

fn train_args(data: &Path, out: &Path, batch: usize, steps: usize) -> Vec<String> {
    [
        "train",
        "--model",
        &model(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--resolution",
        "16",
        "--batch-size",
        &batch.to_string(),
        "--max-train-steps",
        &steps.to_string(),
        "--checkpointing-steps",
        "0",
        // Adam turns a gradient's rounding noise into a full step where the true gradient is
        // zero (the biases in front of a GroupNorm): at 1e-4 two correct runs differ by up to
        // 3e-5 there, at 1e-5 by 3e-6, under the 1e-5 tolerance.
        "--learning-rate",
        "1e-5",
        "--random-flip",
        "--quiet",
        "--no-save-pipeline",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn rank_args(rank: usize, orchestrator: u16, timeout: u32) -> Vec<String> {
    vec![
        "--num-nodes".into(),
        "2".into(),
        "--node-rank".into(),
        rank.to_string(),
        "--orchestrator".into(),
        format!("127.0.0.1:{orchestrator}"),
        "--node-address".into(),
        format!("127.0.0.1:{}", free_port()),
        "--collective-timeout".into(),
        timeout.to_string(),
    ]
}

fn spawn(args: &[String], log: &Path) -> Child {
    spawn_env(args, &[], log)
}

/// Run `ip2p args` with stderr to `log` and stdout to `log` + `.out` (see [`stdout_of`]).
fn spawn_env(args: &[String], env: &[(&str, String)], log: &Path) -> Child {
    let f = std::fs::File::create(log).unwrap();
    let out = std::fs::File::create(stdout_of(log)).unwrap();
    ip2p()
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(out)
        .stderr(f)
        .spawn()
        .unwrap()
}

/// Where [`spawn_env`] puts a child's stdout: training writes none (burn-collective's
/// "Connecting to ..." lines go to the stderr log, not there).
fn stdout_of(log: &Path) -> PathBuf {
    log.with_extension("out")
}

/// Wait for a child, failing the test past the deadline.
fn wait(child: &mut Child, deadline: Instant, name: &str) -> std::process::ExitStatus {
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{name} still running at the deadline"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read(path: &Path) -> String {
    let mut s = String::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_string(&mut s))
        .ok();
    s
}

fn fingerprint(log: &str) -> Option<String> {
    log.lines().find_map(|l| {
        l.split_once("UNet fingerprint ")
            .map(|(_, f)| f.trim().to_string())
    })
}

fn unet_tensors(out: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(out.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let vals = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, vals)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// `n` generated pairs, tokenized by `ip2p prepare-data`.
fn prepared_dataset(dir: &Path, n: u32) -> PathBuf {
    training_dataset(dir, n);
    let o = ip2p()
        .args([
            "prepare-data",
            "--data",
            dir.to_str().unwrap(),
            "--model",
            &model(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    dir.to_path_buf()
}

/// The largest difference between two exports' weights (same names required).
fn max_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs());
        }
    }
    worst
}

/// The orchestrator and two ranks of `steps` steps (batch 1), each rank's output under
/// `root/{name}{rank}`, `extra` flag-value pairs added, the ranks' places given by flags or
/// (`torchrun_env`) by `WORLD_SIZE`, `RANK`, `MASTER_ADDR` and `MASTER_PORT`; returns both
/// ranks' stderr after they succeed.
#[allow(clippy::too_many_arguments)]
fn run_pair(
    procs: &mut Procs,
    root: &Path,
    data: &Path,
    name: &str,
    steps: usize,
    extra: &[&str],
    torchrun_env: bool,
    deadline: Instant,
) -> [String; 2] {
    let port = free_port();
    procs.0.push(spawn(
        &[
            "orchestrator".into(),
            "--addr".into(),
            format!("127.0.0.1:{port}"),
        ],
        &root.join(format!("{name}-orchestrator.log")),
    ));
    let logs = [
        root.join(format!("{name}0.log")),
        root.join(format!("{name}1.log")),
    ];
    let first = procs.0.len();
    for (rank, log) in logs.iter().enumerate() {
        let mut args = train_args(data, &root.join(format!("{name}{rank}")), 1, steps);
        let mut env = Vec::new();
        if torchrun_env {
            env = vec![
                ("WORLD_SIZE", "2".to_string()),
                ("RANK", rank.to_string()),
                ("MASTER_ADDR", "127.0.0.1".to_string()),
                ("MASTER_PORT", port.to_string()),
                ("IP2P_NODE_ADDRESS", format!("127.0.0.1:{}", free_port())),
            ];
            args.extend(["--collective-timeout".to_string(), "60".to_string()]);
        } else {
            args.extend(rank_args(rank, port, 60));
        }
        for pair in extra.chunks(2) {
            // A flag given in `extra` replaces train_args' value.
            match args.iter().position(|a| a == pair[0]) {
                Some(i) => args[i + 1] = pair[1].to_string(),
                None => args.extend(pair.iter().map(|s| s.to_string())),
            }
        }
        procs.0.push(spawn_env(&args, &env, log));
    }
    for (rank, log) in logs.iter().enumerate() {
        let status = wait(&mut procs.0[first + rank], deadline, "a rank");
        assert!(status.success(), "rank {rank}: {}", read(log));
        assert_eq!(read(&stdout_of(log)), "", "rank {rank} wrote to stdout");
    }
    [read(&logs[0]), read(&logs[1])]
}

/// One process of two replicas (`--devices 2`), batch 1 each, its output under `root/name`;
/// returns its stderr after it succeeds.
fn run_devices(
    procs: &mut Procs,
    root: &Path,
    data: &Path,
    name: &str,
    steps: usize,
    extra: &[&str],
    deadline: Instant,
) -> String {
    let log = root.join(format!("{name}.log"));
    let mut args = train_args(data, &root.join(name), 1, steps);
    args.extend(["--devices", "2", "--collective-timeout", "60"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    procs.0.push(spawn(&args, &log));
    let i = procs.0.len() - 1;
    let status = wait(&mut procs.0[i], deadline, "the --devices 2 process");
    let err = read(&log);
    assert!(status.success(), "--devices 2: {err}");
    assert_eq!(read(&stdout_of(&log)), "", "--devices 2 wrote to stdout");
    err
}

/// Every fingerprint line of a log (one per replica).
fn fingerprints(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| {
            l.split_once("UNet fingerprint ")
                .map(|(_, f)| f.trim().to_string())
        })
        .collect()
}

#[test]
fn two_ranks_match_one_process_and_a_lost_rank_is_an_error() {
    let deadline = Instant::now() + Duration::from_secs(240);
    let root = std::env::temp_dir().join(format!("ip2p-cli-ddp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let data = prepared_dataset(&root.join("data"), 6);

    // One process, batch 2.
    let single = root.join("single");
    let o = ip2p()
        .args(train_args(&data, &single, 2, 3))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // The orchestrator and two ranks, batch 1 each.
    let mut procs = Procs(Vec::new());
    let [l0, l1] = run_pair(&mut procs, &root, &data, "ddp", 3, &[], false, deadline);
    let f0 = fingerprint(&l0).unwrap_or_else(|| panic!("{l0}"));
    assert_eq!(
        Some(f0.clone()),
        fingerprint(&l1),
        "the replicas differ: {l0}\n{l1}"
    );
    // Only rank 0 writes.
    assert!(root.join("ddp0/unet").is_dir());
    assert!(!root.join("ddp1/unet").exists());
    let (a, b) = (unet_tensors(&single), unet_tensors(&root.join("ddp0")));
    let worst = max_diff(&a, &b);
    assert!(worst <= 1e-5, "two ranks vs one process: max |Δ| {worst}");
    // The weights did move: the comparison is not between two untouched models.
    let init = unet_tensors(Path::new(&model()));
    let moved = init
        .iter()
        .zip(&a)
        .flat_map(|((_, x), (_, y))| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0f32, f32::max);
    assert!(moved > 2e-5, "training did not move the weights ({moved})");
    // Adam hides a gradient's scale: the logged loss and gradient norm show it (a sum instead
    // of a mean, one rank's gradient alone).
    let log = |dir: &Path| -> Vec<(f64, f64)> {
        read(&dir.join("train_log.jsonl"))
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["loss"].as_f64().unwrap(),
                    v["grad_norm"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let (one, two) = (log(&single), log(&root.join("ddp0")));
    assert_eq!(one.len(), 3);
    assert_eq!(one.len(), two.len());
    for ((l1, g1), (l2, g2)) in one.iter().zip(&two) {
        assert!((l1 - l2).abs() <= 1e-5 * l1.abs(), "loss {l1} vs {l2}");
        assert!(
            (g1 - g2).abs() <= 1e-4 * g1.abs(),
            "gradient norm {g1} vs {g2}"
        );
    }

    // One process, two replicas on threads (`--devices 2`, no orchestrator), batch 1 each:
    // global ranks 0 and 1 take the samples and draws of the two processes' ranks 0 and 1,
    // and the in-process all-reduce is the same arithmetic as the ring between two nodes (one
    // f32 addition per element, then a division by 2), so the UNet is bitwise the two
    // processes' (and so within 1e-5 of one process at batch 2).
    let dev = run_devices(&mut procs, &root, &data, "devices", 3, &[], deadline);
    assert_eq!(fingerprints(&dev), vec![f0.clone(), f0.clone()], "{dev}");
    let d = unet_tensors(&root.join("devices"));
    assert_eq!(d, b, "--devices 2 differs from two processes");
    let worst = max_diff(&a, &d);
    assert!(worst <= 1e-5, "--devices 2 vs one process: max |Δ| {worst}");
    assert_eq!(log(&root.join("devices")), two);

    // Two processes of two devices: each process sums its replicas, the ring adds the two
    // sums, the mean divides by all 4 (burn-collective's local + global path). The 4 replicas
    // agree and are within 1e-5 of one process at batch 4 (12 rows: 3 steps are one epoch,
    // before DistributedSampler's padding and one process's next shuffle part ways).
    let data12 = prepared_dataset(&root.join("data12"), 12);
    let single4 = root.join("single4");
    let o = ip2p()
        .args(train_args(&data12, &single4, 4, 3))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let [m0, m1] = run_pair(
        &mut procs,
        &root,
        &data12,
        "mixed",
        3,
        &["--devices", "2"],
        false,
        deadline,
    );
    let all = [fingerprints(&m0), fingerprints(&m1)].concat();
    assert_eq!(all.len(), 4, "{m0}\n{m1}");
    assert!(all.iter().all(|f| *f == all[0]), "{m0}\n{m1}");
    let worst = max_diff(&unet_tensors(&single4), &unet_tensors(&root.join("mixed0")));
    assert!(
        worst <= 1e-5,
        "2 nodes × 2 devices vs one process: max |Δ| {worst}"
    );

    // Two steps with a checkpoint (ranks placed by torchrun's variables), then both ranks
    // resume from rank 0's checkpoint: the same replicas as three steps in one go.
    run_pair(
        &mut procs,
        &root,
        &data,
        "part",
        2,
        &["--checkpointing-steps", "2"],
        true,
        deadline,
    );
    let ck = root.join("part0/checkpoint-2");
    let [r0, r1] = run_pair(
        &mut procs,
        &root,
        &data,
        "resumed",
        3,
        &["--resume-from-checkpoint", ck.to_str().unwrap()],
        false,
        deadline,
    );
    assert_eq!(fingerprint(&r0), Some(f0.clone()), "{r0}");
    assert_eq!(fingerprint(&r1), Some(f0.clone()), "{r1}");
    // The same world in one process: `--devices 2` resumes the two processes' checkpoint.
    let dev = run_devices(
        &mut procs,
        &root,
        &data,
        "devices-resumed",
        3,
        &["--resume-from-checkpoint", ck.to_str().unwrap()],
        deadline,
    );
    assert_eq!(fingerprints(&dev), vec![f0.clone(), f0.clone()], "{dev}");

    // Device lists that cannot work are errors before anything loads.
    for (devices, expect) in [
        ("0", "at least one device"),
        ("0,1", "the CPU backend has one device"),
        ("cuda:0", "names cuda devices"),
        ("two", "is not a device"),
    ] {
        let mut args = train_args(&data, &root.join("bad-devices"), 1, 1);
        args.extend(["--devices".to_string(), devices.to_string()]);
        let o = ip2p().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(expect),
            "--devices {devices}: {err}"
        );
    }

    // A rank killed mid-run: the other stops with a clear error, well before the deadline.
    let port = free_port();
    procs.0.push(spawn(
        &[
            "orchestrator".into(),
            "--addr".into(),
            format!("127.0.0.1:{port}"),
        ],
        &root.join("orchestrator2.log"),
    ));
    let logs = [root.join("kill0.log"), root.join("kill1.log")];
    let out0 = root.join("kill-out0");
    for (rank, log) in logs.iter().enumerate() {
        let mut args = train_args(&data, &root.join(format!("kill-out{rank}")), 1, 1000);
        args.extend(rank_args(rank, port, 10));
        procs.0.push(spawn(&args, log));
    }
    let (r0, r1) = (procs.0.len() - 2, procs.0.len() - 1);
    // Kill rank 1 once rank 0 has logged a step.
    while read(&out0.join("train_log.jsonl")).lines().count() < 2 {
        assert!(
            procs.0[r0].try_wait().unwrap().is_none(),
            "rank 0 stopped early: {}",
            read(&logs[0])
        );
        assert!(
            Instant::now() < deadline,
            "no step logged: {}",
            read(&logs[0])
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    procs.0[r1].kill().unwrap();
    let killed = Instant::now();
    let status = wait(
        &mut procs.0[r0],
        deadline,
        "rank 0 after its peer was killed",
    );
    let err = read(&logs[0]);
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("error: rank 0:") && err.contains("all-reduce"),
        "not a clear error: {err}"
    );
    assert!(
        killed.elapsed() < Duration::from_secs(60),
        "rank 0 took {:?} to notice",
        killed.elapsed()
    );
    drop(procs);
    std::fs::remove_dir_all(&root).ok();
}
