//! tools/gpu/check.sh, dry run: with no device it runs every step it can (the environment, and
//! xtask's parity and bench command lines, which report their CUDA cases as skipped) and says
//! each GPU step skipped, so the script does not rot between the sessions that have a GPU.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn gpu_check_dry_run_says_every_gpu_step_skipped() {
    let out = std::env::temp_dir().join(format!("ip2p-gpu-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let bin = Path::new(env!("CARGO_BIN_EXE_xtask")).parent().unwrap();
    let run = Command::new("bash")
        .arg(root().join("tools/gpu/check.sh"))
        .arg("--dry-run")
        .env("OUT", &out)
        .env("IP2P_GPU_BIN", bin)
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "check.sh failed:\n{stdout}\n{stderr}");

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap())
            .expect("summary.json is JSON");
    assert_eq!(summary["dry_run"], true);
    assert_eq!(summary["gpu"], false);
    let steps = summary["steps"].as_array().unwrap();
    let status = |name: &str| {
        steps
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no step {name}: {steps:?}"))["status"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(status("env"), "ok");
    for step in [
        "cuda-smoke",
        "cuda-bench-f16-b1",
        "cuda-parity",
        "cuda-bench-f32-b1",
        "cuda-bench-f16-b4",
        "cuda-bench-f32-b4",
        "cuda-edit",
        "wgpu-bench",
        "wgpu-parity",
    ] {
        assert_eq!(status(step), "skipped", "{step}: {steps:?}");
    }
    // xtask ran the real command lines: every parity case and bench cell is there, skipped.
    let reports = &summary["reports"];
    let cases = reports["cuda-parity"]["cases"]
        .as_array()
        .expect("parity cases");
    assert_eq!(
        cases.len(),
        5 * 3 * 2,
        "5 fixtures × 3 dtypes × 2 attention kernels"
    );
    assert!(cases.iter().all(|c| c["status"] == "skipped"));
    for (step, dtype, batch) in [
        ("cuda-bench-f16-b1", "f16", 1),
        ("cuda-bench-f32-b1", "f32", 1),
        ("cuda-bench-f16-b4", "f16", 4),
        ("cuda-bench-f32-b4", "f32", 4),
    ] {
        let cells = reports[step]["cells"].as_array().expect("bench cells");
        assert_eq!(cells.len(), 1, "{step}");
        assert_eq!(cells[0]["status"], "skipped", "{step}");
        assert_eq!(cells[0]["dtype"], dtype, "{step}");
        assert_eq!(cells[0]["batch"], batch, "{step}");
    }
    assert!(
        std::fs::read_to_string(out.join("summary.md"))
            .unwrap()
            .contains("| cuda-parity | skipped |")
    );
    let _ = std::fs::remove_dir_all(&out);
}
