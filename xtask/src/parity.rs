//! `cargo xtask parity`: the pipeline parity fixtures (fixtures/pipeline, made by
//! tools/fixtures/fx_pipeline.py with diffusers' StableDiffusionInstructPix2PixPipeline) on any
//! backend and dtype this build has, as a report rather than a test: the GPU check
//! (tools/gpu/check.sh) runs it on a machine that has no cargo.
//!
//! Tolerances, relative L2 on the final latents and the decoded images:
//! - f32: 1e-3 against diffusers, the CPU parity tests' bound (ten guided UNet evaluations
//!   amplify f32 rounding; crates/ip2p-pipeline/tests/parity.rs says why), and 1e-4 against
//!   the CPU backend on the same inputs (both f32; only the order of reductions differs).
//! - f16 and bf16 (the UNet and text encoder; the VAE stays f32, as in diffusers): 1e-2 and
//!   6e-2. Each operation rounds to 11 (f16) or 8 (bf16) significant bits, about 2.4e-4 and 2e-3
//!   relative, and the guidance multiplies the difference of two predictions by 7.5 at each of
//!   the ten steps. The CPU backend (exact widening, f32 accumulation) measured at most 3.4e-3
//!   (f16) and 2.4e-2 (bf16) on these fixtures; the bounds leave about 3× and 2.5× for a GPU's
//!   other accumulation order, and a wrong kernel (an error of order 1) still fails by far.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use burn::tensor::{DType, Tensor};
use ip2p_nn::testing::{Fixture, diff};
use ip2p_nn::{AttentionImpl, Backend};
use ip2p_pipeline::{EditOptions, Ip2pModel, LoadOptions, Prompts, RunSettings};
use ip2p_sched::SchedulerKind;
use serde::Serialize;

use crate::backends::panic_text;

/// The pipeline fixtures, `<model>_<scheduler>`.
pub const FIXTURES: [&str; 5] = [
    "tiny_euler",
    "tiny_ddim",
    "tiny_euler-noguidance",
    "wide_euler",
    "wide_ddim",
];

/// Compute dtype of the UNet and text encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }
}

/// The attention kernels a case runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AttentionArg {
    /// Burn's fused attention op (flash-style on cubecl backends): the default.
    Fused,
    /// The whole score matrix, softmax in f32: the reference the fused path is checked against.
    Naive,
}

impl AttentionArg {
    pub fn imp(self) -> AttentionImpl {
        match self {
            AttentionArg::Fused => AttentionImpl::Fused,
            AttentionArg::Naive => AttentionImpl::Naive,
        }
    }
}

/// Relative-L2 bound against diffusers' f32 outputs, per compute dtype.
pub fn tolerance(p: Precision) -> f64 {
    match p {
        Precision::F32 => 1e-3,
        Precision::F16 => 1e-2,
        Precision::Bf16 => 6e-2,
    }
}

/// Relative-L2 bound against the CPU backend on the same inputs (f32 only).
pub const TOL_VS_CPU: f64 = 1e-4;

/// The outputs of one fixture run, on the host.
#[derive(Clone)]
pub struct Outputs {
    pub latents: Vec<f64>,
    pub image: Vec<f64>,
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
pub struct ParityResult {
    pub backend: String,
    pub device: String,
    pub fixture: String,
    pub dtype: Precision,
    pub attention: AttentionArg,
    /// `ok`, `failed` (outside a tolerance, or an error) or `skipped`.
    pub status: String,
    pub reason: Option<String>,
    pub latents_rel_l2: Option<f64>,
    pub image_rel_l2: Option<f64>,
    pub tolerance: f64,
    /// Against the CPU backend (f32 cases on other backends, when asked).
    pub vs_cpu_latents_rel_l2: Option<f64>,
    pub vs_cpu_image_rel_l2: Option<f64>,
    pub tolerance_vs_cpu: Option<f64>,
    /// Wall time of the run (the first case on a GPU includes kernel compilation).
    pub seconds: Option<f64>,
}

impl ParityResult {
    pub fn new(backend: &str, fixture: &str, dtype: Precision, attention: AttentionArg) -> Self {
        Self {
            backend: backend.to_string(),
            device: String::new(),
            fixture: fixture.to_string(),
            dtype,
            attention,
            status: "skipped".into(),
            reason: None,
            latents_rel_l2: None,
            image_rel_l2: None,
            tolerance: tolerance(dtype),
            vs_cpu_latents_rel_l2: None,
            vs_cpu_image_rel_l2: None,
            tolerance_vs_cpu: None,
            seconds: None,
        }
    }

    pub fn failed(&self) -> bool {
        self.status == "failed"
    }
}

/// Run fixture `name` (`<model>_<scheduler>`) through the full cycle on `B`: final latents
/// (before decoding) and the decoded images.
pub fn run_fixture<B: Backend>(
    device: &B::Device,
    name: &str,
    dtype: Precision,
    attention: AttentionArg,
) -> Result<Outputs> {
    let (model, sched) = name
        .split_once('_')
        .ok_or_else(|| anyhow!("fixture {name:?}: expected <model>_<scheduler>"))?;
    let kind = if sched.starts_with("ddim") {
        SchedulerKind::Ddim
    } else {
        SchedulerKind::Euler
    };
    let dir = ip2p_nn::testing::fixtures_dir();
    let options = LoadOptions {
        dtype: Some(dtype.dtype()),
        attention: attention.imp(),
        ..LoadOptions::default()
    };
    let m = Ip2pModel::<B>::load(dir.join("models").join(model), device, &options)
        .with_context(|| format!("loading fixtures/models/{model}"))?;
    let fx = Fixture::open(format!("pipeline/{name}.safetensors"));
    let run: serde_json::Value = fx.meta_json("run");
    let prompts: Vec<String> = serde_json::from_value(run["prompts"].clone())?;
    let number = |k: &str| {
        run[k]
            .as_f64()
            .ok_or_else(|| anyhow!("fixture {name}: run.{k} is not a number"))
    };
    let options = EditOptions {
        steps: number("steps")? as usize,
        guidance_scale: number("guidance_scale")?,
        image_guidance_scale: number("image_guidance_scale")?,
        ..EditOptions::default()
    };
    let mut scheduler = m.scheduler(Some(kind))?;
    let latents = m
        .edit(
            scheduler.as_mut(),
            fx.tensor("pixels", device),
            Prompts::Text(prompts),
            false,
            true,
            RunSettings {
                options,
                init_latents: Some(fx.tensor("noise", device)),
                ..Default::default()
            },
        )?
        .output;
    let vae = m
        .vae
        .as_ref()
        .ok_or_else(|| anyhow!("fixtures/models/{model}: no VAE"))?;
    let image = vae.decode_scaled(latents.clone())?;
    Ok(Outputs {
        latents: host(latents)?,
        image: host(image)?,
    })
}

fn host<B: Backend>(t: Tensor<B, 4>) -> Result<Vec<f64>> {
    t.into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .map_err(|e| anyhow!("reading back a tensor: {e:?}"))
}

/// The fixture's expected latents and image.
pub fn expected(name: &str) -> Outputs {
    let fx = Fixture::open(format!("pipeline/{name}.safetensors"));
    Outputs {
        latents: fx.values("latents").0,
        image: fx.values("image").0,
    }
}

fn rel_l2(actual: &[f64], expected: &[f64], what: &str) -> Result<f64> {
    if actual.len() != expected.len() {
        bail!(
            "{what}: {} values, expected {}",
            actual.len(),
            expected.len()
        );
    }
    Ok(diff(actual, expected).rel_l2)
}

/// Fill `row` from a run against the fixture and, if given, the CPU backend's outputs.
pub fn judge(row: &mut ParityResult, out: &Outputs, cpu: Option<&Outputs>) -> Result<()> {
    let want = expected(&row.fixture);
    let l = rel_l2(&out.latents, &want.latents, "latents")?;
    let i = rel_l2(&out.image, &want.image, "image")?;
    row.latents_rel_l2 = Some(l);
    row.image_rel_l2 = Some(i);
    let mut bad = Vec::new();
    if !(l <= row.tolerance && i <= row.tolerance) {
        bad.push(format!(
            "vs diffusers: latents {l:.2e}, image {i:.2e} > {:.0e}",
            row.tolerance
        ));
    }
    if let Some(cpu) = cpu {
        let cl = rel_l2(&out.latents, &cpu.latents, "latents vs cpu")?;
        let ci = rel_l2(&out.image, &cpu.image, "image vs cpu")?;
        row.vs_cpu_latents_rel_l2 = Some(cl);
        row.vs_cpu_image_rel_l2 = Some(ci);
        row.tolerance_vs_cpu = Some(TOL_VS_CPU);
        if !(cl <= TOL_VS_CPU && ci <= TOL_VS_CPU) {
            bad.push(format!(
                "vs cpu: latents {cl:.2e}, image {ci:.2e} > {TOL_VS_CPU:.0e}"
            ));
        }
    }
    if bad.is_empty() {
        row.status = "ok".into();
        row.reason = None;
    } else {
        row.status = "failed".into();
        row.reason = Some(bad.join("; "));
    }
    Ok(())
}

/// What to run.
#[derive(Debug, Clone)]
pub struct ParityPlan {
    pub fixtures: Vec<String>,
    pub dtypes: Vec<Precision>,
    pub attention: Vec<AttentionArg>,
    /// Also compare f32 cases on a GPU backend with the CPU backend (needs feature flex).
    pub vs_cpu: bool,
}

impl ParityPlan {
    /// The cases, fixtures outermost.
    pub fn cases(&self) -> Vec<(String, Precision, AttentionArg)> {
        let mut out = Vec::new();
        for f in &self.fixtures {
            for &d in &self.dtypes {
                for &a in &self.attention {
                    out.push((f.clone(), d, a));
                }
            }
        }
        out
    }
}

/// Run `plan` on backend `B` (label `backend`). `cpu_reference` gives the CPU backend's f32
/// outputs of a fixture, when the plan asks for them.
pub fn run_backend<B: Backend>(
    backend: &str,
    device: &B::Device,
    plan: &ParityPlan,
    cpu_reference: &mut dyn FnMut(&str) -> Option<Outputs>,
    log: &mut dyn FnMut(&ParityResult),
) -> Vec<ParityResult> {
    let device_name = B::name(device);
    let mut rows = Vec::new();
    for (fixture, dtype, attention) in plan.cases() {
        let mut row = ParityResult::new(backend, &fixture, dtype, attention);
        row.device = device_name.clone();
        let start = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            run_fixture::<B>(device, &fixture, dtype, attention)
        }));
        row.seconds = Some(start.elapsed().as_secs_f64());
        let judged = match outcome {
            Ok(Ok(out)) => {
                let cpu = if plan.vs_cpu && dtype == Precision::F32 {
                    cpu_reference(&fixture)
                } else {
                    None
                };
                catch_unwind(AssertUnwindSafe(|| judge(&mut row, &out, cpu.as_ref())))
                    .unwrap_or_else(|p| Err(anyhow!("panicked: {}", panic_text(&p))))
            }
            Ok(Err(e)) => Err(e),
            Err(p) => Err(anyhow!("panicked: {}", panic_text(&p))),
        };
        if let Err(e) = judged {
            row.status = "failed".into();
            row.reason = Some(format!("{e:#}"));
        }
        log(&row);
        rows.push(row);
    }
    rows
}

/// Every case of `plan` marked skipped with `reason`.
pub fn skip_all(backend: &str, plan: &ParityPlan, reason: &str) -> Vec<ParityResult> {
    plan.cases()
        .into_iter()
        .map(|(f, d, a)| {
            let mut r = ParityResult::new(backend, &f, d, a);
            r.reason = Some(reason.to_string());
            r
        })
        .collect()
}

fn sci(v: Option<f64>) -> String {
    v.map_or("–".into(), |x| format!("{x:.2e}"))
}

/// The report as Markdown.
pub fn markdown(command: &str, rows: &[ParityResult]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "# ip2p parity with diffusers\n");
    let _ = writeln!(
        s,
        "`{command}`. Relative L2 of the final latents and the decoded images against diffusers' outputs (fixtures/pipeline), and against the CPU backend where given. Tolerances: f32 {:.0e} (vs CPU {TOL_VS_CPU:.0e}), f16 {:.0e}, bf16 {:.0e}; xtask/src/parity.rs says why.\n",
        tolerance(Precision::F32),
        tolerance(Precision::F16),
        tolerance(Precision::Bf16)
    );
    let _ = writeln!(
        s,
        "| backend | device | fixture | dtype | attention | latents | image | tolerance | vs CPU latents | vs CPU image | s | status |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        let status = match &r.reason {
            Some(why) => format!("**{}**: {}", r.status, why.replace('|', "/")),
            None => r.status.clone(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:?} | {} | {} | {:.0e} | {} | {} | {} | {status} |",
            r.backend,
            r.device,
            r.fixture,
            r.dtype.name(),
            r.attention,
            sci(r.latents_rel_l2),
            sci(r.image_rel_l2),
            r.tolerance,
            sci(r.vs_cpu_latents_rel_l2),
            sci(r.vs_cpu_image_rel_l2),
            r.seconds.map_or("–".into(), |x| format!("{x:.1}")),
        );
    }
    s
}
