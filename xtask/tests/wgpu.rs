//! The WGPU backend, when this machine has an adapter (lavapipe, a software Vulkan, is enough;
//! without one each test says so and passes): the bench's smoke test, and the pipeline fixtures
//! (fixtures/pipeline, made by tools/fixtures/fx_pipeline.py with diffusers'
//! StableDiffusionInstructPix2PixPipeline) giving diffusers' numbers. One test binary, so the
//! shaders, most of the time on a software adapter, compile once.
//!
//! Tolerances, relative L2: 1e-3 against diffusers, the CPU parity tests' bound (ten guided
//! UNet evaluations amplify f32 rounding; see crates/ip2p-pipeline/tests/parity.rs), and 1e-4
//! against the CPU backend on the same inputs: both run f32, and only the order of reductions
//! (matmul tiling, GroupNorm sums) differs, which the guidance amplifies as above.
#![cfg(feature = "wgpu")]

mod common;

use xtask::backends::{BackendKind, wgpu_adapter};
use xtask::parity::{AttentionArg, ParityPlan, Precision};

/// Whether an adapter initialised (else the test prints why and passes).
fn have_adapter() -> bool {
    match wgpu_adapter() {
        Ok(a) => {
            eprintln!("WGPU adapter: {}", a.describe());
            true
        }
        Err(e) => {
            eprintln!("no WGPU adapter, skipped: {e}");
            false
        }
    }
}

/// The bench's smoke test: the tiny preset, one step on each path.
#[test]
fn tiny_one_step_each_path_on_wgpu() {
    if !have_adapter() {
        return;
    }
    for c in common::check(BackendKind::Wgpu, &ip2p_pipeline::NoProbe) {
        // The pool probe sees the weights and the run's tensors.
        let m = c.memory.as_ref().expect("memory");
        assert_eq!(m.source, "wgpu pool");
        assert!(
            m.baseline_bytes > 0 && m.peak_bytes > m.baseline_bytes,
            "{m:?}"
        );
    }
}

/// `fixtures/pipeline/{model}_euler` through `cargo xtask parity`'s code: latents and images
/// against diffusers (1e-3) and against the CPU backend (1e-4).
fn matches_diffusers_and_cpu(model: &str) {
    if !have_adapter() {
        return;
    }
    let plan = ParityPlan {
        fixtures: vec![format!("{model}_euler")],
        dtypes: vec![Precision::F32],
        attention: vec![AttentionArg::Fused],
        vs_cpu: true,
    };
    for row in xtask::backends::parity(BackendKind::Wgpu, &plan) {
        assert_eq!(row.status, "ok", "{row:?}");
        assert!(row.vs_cpu_latents_rel_l2.is_some(), "{row:?}");
    }
}

#[test]
fn tiny_euler_on_wgpu() {
    matches_diffusers_and_cpu("tiny");
}

/// Three UNet levels, linear projections, per-level head dims, a 4-level VAE, non-square input.
/// Ignored by default: on lavapipe it doubles the binary's time (its own shaders compile);
/// `cargo test -p xtask --test wgpu -- --include-ignored` runs it.
#[test]
#[ignore = "slow on a software adapter: cargo test -p xtask --test wgpu -- --include-ignored"]
fn wide_euler_on_wgpu() {
    matches_diffusers_and_cpu("wide");
}
