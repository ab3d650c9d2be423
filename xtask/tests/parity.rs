//! `cargo xtask parity` on the CPU backend: the report's verdicts agree with the parity tests
//! (crates/ip2p-pipeline/tests/parity.rs) in f32, and f16/bf16 runs fall inside the tolerances
//! xtask/src/parity.rs states, which the GPU check applies to CUDA.

use xtask::backends::BackendKind;
use xtask::parity::{self, AttentionArg, ParityPlan, Precision};

#[test]
fn cpu_parity_report_passes_in_every_dtype() {
    let plan = ParityPlan {
        fixtures: vec!["tiny_euler".into(), "tiny_ddim".into()],
        dtypes: vec![Precision::F32, Precision::F16, Precision::Bf16],
        attention: vec![AttentionArg::Fused, AttentionArg::Naive],
        vs_cpu: false,
    };
    let rows = xtask::backends::parity(BackendKind::Cpu, &plan);
    assert_eq!(rows.len(), 2 * 3 * 2);
    for r in &rows {
        assert_eq!(r.status, "ok", "{r:?}");
        let (l, i) = (r.latents_rel_l2.unwrap(), r.image_rel_l2.unwrap());
        assert!(l <= r.tolerance && i <= r.tolerance, "{r:?}");
        // Half precision really ran: its error is far above f32's.
        if r.dtype != Precision::F32 {
            assert!(l > 1e-4, "{r:?}");
        }
    }
}

/// A case outside its tolerance is reported failed, with the numbers, not passed.
#[test]
fn judge_fails_a_wrong_result() {
    let mut row =
        parity::ParityResult::new("cpu", "tiny_euler", Precision::F32, AttentionArg::Fused);
    let mut wrong = parity::expected("tiny_euler");
    wrong.latents.iter_mut().for_each(|v| *v *= 1.01);
    parity::judge(&mut row, &wrong, None).unwrap();
    assert_eq!(row.status, "failed");
    assert!(
        row.reason.as_deref().unwrap().contains("latents"),
        "{row:?}"
    );
    let right = parity::expected("tiny_euler");
    parity::judge(&mut row, &right, Some(&parity::expected("tiny_euler"))).unwrap();
    assert_eq!(row.status, "ok", "{row:?}");
    assert_eq!(row.vs_cpu_latents_rel_l2, Some(0.0));
}
