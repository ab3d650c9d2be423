//! The smoke check shared by the CPU (smoke.rs) and WGPU (wgpu.rs) tests.

use indicatif::ProgressBar;
use ip2p_pipeline::MemoryProbe;
use ip2p_pipeline::preset::Preset;
use xtask::backends::{BackendKind, Plan, run};
use xtask::cell::{CellResult, ModelSource, PathKind, compute_savings};
use xtask::parity::Precision;

/// The tiny preset, 32×32, one step on each path, no warm-up.
pub fn plan() -> Plan {
    Plan {
        models: vec![ModelSource::Preset(Preset::Tiny)],
        paths: PathKind::ALL.to_vec(),
        resolutions: vec![(32, 32)],
        batches: vec![1],
        dtypes: vec![Precision::F32],
        steps: Some(1),
        warmup: Some(0),
        repeats: Some(1),
        software_full: false,
    }
}

/// Run [`plan`] on `backend`: every cell ran and reported its stages with finite times, and
/// the latent paths their savings. Never checks speed.
pub fn check(backend: BackendKind, heap: &dyn MemoryProbe) -> Vec<CellResult> {
    let mut notes = Vec::new();
    let mut cells = run(backend, &plan(), heap, &ProgressBar::hidden(), &mut notes);
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
