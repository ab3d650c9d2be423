//! Smoke test of the benchmark: the tiny preset for one step on each path, on the CPU backend
//! (WGPU: tests/wgpu.rs). Checks that each cell ran and reported its stages with finite times;
//! never checks speed (targets live in the report).

mod common;

use common::{check, plan};
use indicatif::ProgressBar;
use ip2p_pipeline::CountingAllocator;
use xtask::backends::{BackendKind, run};
use xtask::cell::PathKind;
use xtask::output::{Host, Report};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

#[test]
fn tiny_one_step_each_path_on_cpu() {
    let cells = check(BackendKind::Cpu, &ALLOC);
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
