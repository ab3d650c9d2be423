//! `cargo xtask bench`: see `cargo xtask bench --help` and the README's Benchmarks section.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use ip2p_pipeline::CountingAllocator;
use ip2p_pipeline::preset::Preset;
use xtask::backends::{self, BackendKind, Plan};
use xtask::cell::{self, ModelSource, PathKind};
use xtask::output::{Host, Report};
use xtask::parity::{AttentionArg, ParityPlan, Precision};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator::new();

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ip2p project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Benchmark backends × paths × models × resolutions × batches; report under target/bench/.
    Bench(Box<BenchArgs>),
    /// Run the pipeline parity fixtures on a backend and dtype; report target/bench/parity.{md,json}.
    /// Exits non-zero when a case is outside its tolerance (skipped cases do not fail).
    Parity(ParityArgs),
}

#[derive(clap::Args, Debug)]
struct ParityArgs {
    /// Backends to run (those this build or machine cannot run are reported as skipped).
    #[arg(long = "backend", value_enum, value_delimiter = ',', default_values_t = [BackendKind::Cpu])]
    backends: Vec<BackendKind>,
    /// Compute dtypes of the UNet and text encoder.
    #[arg(long = "dtype", value_enum, value_delimiter = ',', default_values_t = [Precision::F32])]
    dtypes: Vec<Precision>,
    /// Attention kernels.
    #[arg(long = "attention", value_enum, value_delimiter = ',', default_values_t = [AttentionArg::Fused])]
    attention: Vec<AttentionArg>,
    /// Fixtures (fixtures/pipeline/<name>.safetensors). Default: all.
    #[arg(long = "fixture", value_delimiter = ',')]
    fixtures: Vec<String>,
    /// Also compare f32 cases on GPU backends with the CPU backend.
    #[arg(long)]
    vs_cpu: bool,
    /// Report folder (default: <workspace>/target/bench).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Backends to run (those this build or machine cannot run are reported as skipped).
    #[arg(long = "backend", value_enum, value_delimiter = ',', default_values_t = BackendKind::ALL)]
    backends: Vec<BackendKind>,
    /// Paths to run.
    #[arg(long = "path", value_enum, value_delimiter = ',', default_values_t = PathKind::ALL)]
    paths: Vec<PathKind>,
    /// Built-in presets with random weights: sd15 (the real SD 1.5 InstructPix2Pix architecture), tiny.
    /// Default: sd15 (unless --model is given).
    #[arg(long = "preset", value_delimiter = ',')]
    presets: Vec<String>,
    /// A diffusers InstructPix2Pix folder or an original single-file checkpoint (.ckpt,
    /// .safetensors; built-in SD 1.5 configs, EMA UNet) with real weights (repeatable).
    #[arg(long = "model")]
    models: Vec<PathBuf>,
    /// Image sizes, WxH or N (square). Default per model: sd15 256, tiny 64, folders 512.
    #[arg(long = "resolution", value_delimiter = ',')]
    resolutions: Vec<String>,
    /// Batch sizes (images per edit call).
    #[arg(long = "batch", value_delimiter = ',', default_value = "1")]
    batches: Vec<usize>,
    /// Compute dtypes of the UNet and text encoder (the VAE runs in f32, as in diffusers).
    /// The diffusers reference runs the f32 cells only.
    #[arg(long = "dtype", value_enum, value_delimiter = ',', default_values_t = [Precision::F32])]
    dtypes: Vec<Precision>,
    /// Denoising steps. Default per model: sd15 1, tiny 4.
    #[arg(long)]
    steps: Option<usize>,
    /// Unmeasured runs before the repeats. Default: sd15 0, tiny 1.
    #[arg(long)]
    warmup: Option<usize>,
    /// Measured runs (median reported). Default: sd15 1, tiny 3.
    #[arg(long)]
    repeats: Option<usize>,
    /// Run every model on a software WGPU adapter (lavapipe), not only the tiny preset.
    #[arg(long)]
    wgpu_software_full: bool,
    /// Also run the cells with diffusers (`diffusers`), for ip2p/diffusers ratios.
    #[arg(long)]
    reference: Option<String>,
    /// The Python for --reference (default: $IP2P_PYTHON, then /root/.cache/ip2p/venv/bin/python).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Report folder (default: <workspace>/target/bench).
    #[arg(long)]
    out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Op bench instead of the matrix: each CPU kernel alone at the SD 1.5 UNet's and VAE's
    /// layer shapes, burn vs ip2p (vs torch with --reference); report target/bench/ops.md and
    /// ops.json. Takes --resolution (default 256), --warmup (1), --repeats (5), --python, --out.
    #[arg(long)]
    ops: bool,
    /// With --ops: only the rows whose 'model layer op shape' contains one of these (comma list,
    /// case-insensitive), e.g. `attention`, `vae`, `level 0`, `3×3`.
    #[arg(long = "ops-filter", value_delimiter = ',')]
    ops_filter: Vec<String>,
    /// With --ops: no burn column (it is the slow one), on every row or on the rows matching
    /// these substrings (comma list).
    #[arg(long = "ops-skip-burn", value_delimiter = ',', num_args = 0..=1, default_missing_value = "")]
    ops_skip_burn: Option<Vec<String>>,
}

fn parse_resolution(s: &str) -> Result<(usize, usize)> {
    let s = s.trim();
    let (w, h) = match s.split_once(['x', 'X', '×']) {
        Some((w, h)) => (w.trim().parse()?, h.trim().parse()?),
        None => {
            let n = s.parse()?;
            (n, n)
        }
    };
    if w == 0 || h == 0 {
        bail!("resolution {s}: sides must be positive");
    }
    Ok((h, w))
}

fn main() -> Result<()> {
    ip2p_pipeline::memory::keep_freed_memory();
    let cli = Cli::parse();
    match cli.task {
        Task::Bench(args) => bench(*args),
        Task::Parity(args) => parity(args),
    }
}

fn bench(args: BenchArgs) -> Result<()> {
    if args.ops {
        return ops(args);
    }
    let started = Instant::now();
    let mut models = Vec::new();
    for p in &args.presets {
        match Preset::from_name(p.trim()) {
            Some(p) => models.push(ModelSource::Preset(p)),
            None => bail!("unknown preset {p:?} (sd15, tiny)"),
        }
    }
    for d in &args.models {
        cell::check_model_dir(d)?;
        models.push(ModelSource::Dir(d.clone()));
    }
    if models.is_empty() {
        models.push(ModelSource::Preset(Preset::Sd15));
    }
    let resolutions = args
        .resolutions
        .iter()
        .map(|r| parse_resolution(r))
        .collect::<Result<Vec<_>>>()?;
    let mut notes = vec![format!(
        "Built-in presets use random weights (Burn's default init; with --reference, diffusers' saved weights); the work per stage is that of the real architecture. Defaults: sd15 at 256×256, 1 step, no warm-up, 1 repeat (so the default run takes minutes on a 2-core CPU; pass --resolution 512 --steps 20 --warmup 1 --repeats 3 for the real workload); tiny at 64×64, 4 steps, 1 warm-up, 3 repeats. Guidance is on (text 7.5, image 1.5): each step runs the UNet on 3× the batch."
    )];
    // The reference runs on the same weights: diffusers draws each preset's random weights once
    // and saves them as a diffusers folder, which ip2p then loads too.
    let python = match args.reference.as_deref() {
        None => None,
        Some("diffusers") if args.models.iter().any(|m| m.is_file()) => bail!(
            "the diffusers reference loads diffusers folders: convert the single file first (`ip2p convert --checkpoint FILE --output DIR`) and pass the folder"
        ),
        Some("diffusers") => match xtask::reference::find_python(args.python.as_deref())
            .and_then(|p| xtask::reference::check_python(&p).map(|v| (p, v)))
        {
            Ok((python, versions)) => {
                notes.push(format!(
                    "diffusers reference: {} ({versions}); CPU cells only.",
                    python.display()
                ));
                for m in models.iter_mut() {
                    let ModelSource::Preset(preset) = *m else {
                        continue;
                    };
                    match xtask::reference::share_weights(&python, preset) {
                        Ok(dir) => {
                            notes.push(format!(
                                "{}: random weights drawn by diffusers/PyTorch (seed 0) and saved to {}; ip2p and diffusers both load them.",
                                preset.name(),
                                dir.display()
                            ));
                            *m = ModelSource::Shared { preset, dir };
                        }
                        Err(e) => notes.push(format!(
                            "{}: no shared weights ({e:#}); the reference draws its own.",
                            preset.name()
                        )),
                    }
                }
                Some(python)
            }
            Err(e) => {
                notes.push(format!("--reference diffusers skipped: {e:#}"));
                None
            }
        },
        Some(other) => bail!("unknown reference {other:?} (diffusers)"),
    };
    let plan = Plan {
        models: models.clone(),
        paths: args.paths.clone(),
        resolutions,
        batches: args.batches.clone(),
        dtypes: args.dtypes.clone(),
        steps: args.steps,
        warmup: args.warmup,
        repeats: args.repeats,
        software_full: args.wgpu_software_full,
    };
    let total = plan.runs(&models) * args.backends.len() as u64;
    let pb = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} runs  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.enable_steady_tick(std::time::Duration::from_millis(250));

    let mut cells = Vec::new();
    for &backend in &args.backends {
        cells.extend(backends::run(backend, &plan, &ALLOC, &pb, &mut notes));
    }
    cell::compute_savings(&mut cells);

    if let Some(python) = &python {
        xtask::reference::run(python, &mut cells, &models, &pb)?;
    }
    pb.finish_and_clear();

    let report = Report {
        command: std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        started: format!("{:?}", std::time::SystemTime::now()),
        wall_s: started.elapsed().as_secs_f64(),
        host: Host::detect(),
        notes,
        cells,
    };
    let out = args
        .out
        .unwrap_or_else(|| xtask::workspace_root().join("target").join("bench"));
    report.write(&out)?;
    println!("{}", report.markdown());
    println!(
        "Reports: {}/{{report.md,report.json,report.csv,chart.svg}}",
        out.display()
    );
    Ok(())
}

/// `--ops`: the op bench (xtask/src/ops.rs).
fn ops(args: BenchArgs) -> Result<()> {
    if !args.models.is_empty() || !args.presets.is_empty() {
        bail!("--ops times single layers at the SD 1.5 shapes: it takes no --model or --preset");
    }
    let resolutions = if args.resolutions.is_empty() {
        vec![(256, 256)]
    } else {
        args.resolutions
            .iter()
            .map(|r| parse_resolution(r))
            .collect::<Result<Vec<_>>>()?
    };
    let mut notes = Vec::new();
    let python = match args.reference.as_deref() {
        None => None,
        Some("diffusers" | "torch") => {
            match xtask::reference::find_python(args.python.as_deref()) {
                Ok(p) => Some(p),
                Err(e) => {
                    notes.push(format!("torch column skipped: {e:#}"));
                    None
                }
            }
        }
        Some(other) => bail!("unknown reference {other:?} (diffusers or torch: the torch column)"),
    };
    let plan = xtask::ops::OpsPlan {
        resolutions,
        warmup: args.warmup.unwrap_or(1),
        repeats: args.repeats.unwrap_or(5).max(1),
        filter: args.ops_filter.clone(),
        skip_burn: args.ops_skip_burn.clone().unwrap_or_default(),
        python,
        quiet: args.quiet,
        notes,
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| xtask::workspace_root().join("target").join("bench"));
    let command = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    let report = xtask::ops::run(&plan, command, &out)?;
    report.write(&out)?;
    println!("{}", report.markdown());
    println!("Reports: {}/{{ops.md,ops.json}}", out.display());
    Ok(())
}

/// `parity`: the pipeline fixtures on each backend asked for (xtask/src/parity.rs).
fn parity(args: ParityArgs) -> Result<()> {
    let fixtures = if args.fixtures.is_empty() {
        xtask::parity::FIXTURES
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        args.fixtures.clone()
    };
    let plan = ParityPlan {
        fixtures,
        dtypes: args.dtypes.clone(),
        attention: args.attention.clone(),
        vs_cpu: args.vs_cpu,
    };
    let mut rows = Vec::new();
    for &backend in &args.backends {
        rows.extend(backends::parity(backend, &plan));
    }
    let command = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    let md = xtask::parity::markdown(&command, &rows);
    let out = args
        .out
        .unwrap_or_else(|| xtask::workspace_root().join("target").join("bench"));
    std::fs::create_dir_all(&out)?;
    ip2p_io::write(out.join("parity.md"), md.as_bytes())?;
    ip2p_io::write(
        out.join("parity.json"),
        serde_json::to_string_pretty(&serde_json::json!({ "command": command, "cases": rows }))?
            .as_bytes(),
    )?;
    println!("{md}");
    println!("Reports: {}/{{parity.md,parity.json}}", out.display());
    let failed = rows.iter().filter(|r| r.failed()).count();
    if failed > 0 {
        bail!("{failed} of {} parity cases failed", rows.len());
    }
    Ok(())
}
