//! Smoke test of the benchmark: the tiny preset for one step on each path, on the CPU backend
//! (and on WGPU when built with it and an adapter is present). Checks that each cell ran and
//! reported its stages with finite times; never checks speed (targets live in the report).

use indicatif::ProgressBar;
use ip2p_pipeline::CountingAllocator;
use ip2p_pipeline::preset::Preset;
use xtask::backends::{BackendKind, Plan, run};
use xtask::cell::{ModelSource, PathKind, compute_savings};
use xtask::output::{Host, Report};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

fn plan() -> Plan {
    Plan {
        models: vec![ModelSource::Preset(Preset::Tiny)],
        paths: PathKind::ALL.to_vec(),
        resolutions: vec![(32, 32)],
        batches: vec![1],
        steps: Some(1),
        warmup: Some(0),
        repeats: Some(1),
        software_full: false,
    }
}

fn check(backend: BackendKind) -> Vec<xtask::cell::CellResult> {
    let mut notes = Vec::new();
    let mut cells = run(backend, &plan(), &ALLOC, &ProgressBar::hidden(), &mut notes);
    compute_savings(&mut cells);
    assert_eq!(cells.len(), 3);
    for c in &cells {
        assert!(c.ok(), "{} {}: {:?}", c.backend, c.path.name(), c.reason);
        let t = c.timing.as_ref().expect("timing");
        assert!(t.total_s.is_finite() && t.total_s > 0.0);
        assert!(t.text_s.is_some_and(f64::is_finite));
        assert_eq!(t.step_s.len(), 1);
        assert!(t.step_s[0].is_finite() && t.step_s[0] > 0.0);
        let (enc, dec) = match c.path {
            PathKind::FullCycle => (true, true),
            PathKind::LatentIn => (false, true),
            PathKind::LatentOnly => (false, false),
        };
        assert_eq!(t.vae_encode_s.is_some(), enc, "{}", c.path.name());
        assert_eq!(t.vae_decode_s.is_some(), dec, "{}", c.path.name());
        if c.path != PathKind::FullCycle {
            assert!(c.saves.is_some(), "{} has no savings", c.path.name());
        }
    }
    cells
}

#[test]
fn tiny_one_step_each_path_on_cpu() {
    let cells = check(BackendKind::Cpu);
    for c in &cells {
        let m = c.memory.as_ref().expect("memory");
        assert!(m.peak_bytes >= m.baseline_bytes && m.peak_bytes > 0);
    }
    // The report renders and names every path.
    let report = Report {
        command: "smoke".into(),
        started: String::new(),
        wall_s: 0.0,
        host: Host::detect(),
        notes: vec![],
        cells,
    };
    let md = report.markdown();
    for p in PathKind::ALL {
        assert!(md.contains(p.name()));
    }
    assert_eq!(report.csv().lines().count(), 4);
    assert!(report.svg().starts_with("<svg"));
}

#[cfg(feature = "wgpu")]
#[test]
fn tiny_one_step_each_path_on_wgpu() {
    if xtask::backends::vulkan_adapter().is_none() {
        eprintln!("no Vulkan adapter: skipped");
        return;
    }
    check(BackendKind::Wgpu);
}

#[test]
fn backends_this_build_lacks_are_skipped_with_a_reason() {
    let mut notes = Vec::new();
    if !cfg!(feature = "cuda") {
        let cells = run(
            BackendKind::Cuda,
            &plan(),
            &ALLOC,
            &ProgressBar::hidden(),
            &mut notes,
        );
        assert_eq!(cells.len(), 3);
        assert!(
            cells
                .iter()
                .all(|c| c.status == "skipped" && c.reason.is_some())
        );
    }
}
