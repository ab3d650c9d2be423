//! `ip2p train --model DIR --data DIR --output DIR`: fine-tune InstructPix2Pix.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use burn::tensor::DType;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ip2p_nn::AutodiffBackend;
use ip2p_pipeline::EditOptions;
use ip2p_sched::SchedulerConfig;
use ip2p_text::PromptEncoder;
use ip2p_train::data::{BadRows, Dataset, load_rows};
use ip2p_train::optim::AdamWSettings;
use ip2p_train::{
    Autodiff, BalancedCheckpointing, Collective, Frozen, LocalGroup, TrainConfig, TrainError,
    Trainer, Validation, latest_checkpoint, load_unet_for_training,
};
use ip2p_vae::AutoencoderKL;

use crate::backend::BackendKind;
use crate::distributed::DistributedArgs;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// A diffusers folder: InstructPix2Pix (8-channel UNet) or Stable Diffusion (4-channel
    /// UNet, widened to 8 with zero weights for the new channels).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// A dataset folder prepared with `ip2p prepare-data`.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Checkpoints, validation images and logs go here.
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    #[arg(long, default_value_t = 256)]
    pub resolution: u32,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    #[arg(long, default_value_t = 1000)]
    pub max_train_steps: usize,
    #[arg(long, default_value_t = 1e-4)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = 0)]
    pub lr_warmup_steps: usize,
    /// Clip the global gradient norm; 0 turns clipping off.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 1e-2)]
    pub adam_weight_decay: f64,
    /// Keep an EMA of the UNet (decay 0.9999, diffusers' EMAModel schedule).
    #[arg(long)]
    pub use_ema: bool,
    #[arg(long, default_value_t = 0.05)]
    pub conditioning_dropout_prob: f64,
    #[arg(long)]
    pub random_flip: bool,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, default_value_t = 500)]
    pub checkpointing_steps: usize,
    /// Validation pairs: another prepared dataset folder (default: the training data's first
    /// --num-validation rows).
    #[arg(long, value_name = "DIR")]
    pub validation_data: Option<PathBuf>,
    /// Validate every N steps on --num-validation fixed pairs (0: never).
    #[arg(long, default_value_t = 0)]
    pub validation_steps: usize,
    #[arg(long, default_value_t = 2)]
    pub num_validation: usize,
    #[arg(long, default_value_t = 20)]
    pub validation_inference_steps: usize,
    /// Continue from a checkpoint folder, or `latest` (the newest under --output).
    #[arg(long)]
    pub resume_from_checkpoint: Option<String>,
    /// Recompute activations in the backward pass (Burn's balanced checkpointing).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Stop at the first bad dataset row instead of reporting and skipping it.
    #[arg(long)]
    pub strict: bool,
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
    #[arg(long)]
    pub quiet: bool,
    /// Write only the trained UNet to <output>/unet, not the whole pipeline folder (the
    /// VAE, text encoder, tokenizer and scheduler copied from --model).
    #[arg(long)]
    pub no_save_pipeline: bool,
    #[command(flatten)]
    pub distributed: DistributedArgs,
}

pub fn run(args: &TrainArgs) -> Result<()> {
    crate::backend::dispatch!(args.backend, (), |_device, _probe| {
        let devices = args.distributed.devices.resolve::<B>(args.backend, || {
            <B as burn::tensor::backend::Backend>::device_count(crate::devices::GPU_TYPE_ID)
        })?;
        if args.gradient_checkpointing {
            train::<Autodiff<B, BalancedCheckpointing>>(args, &devices)
        } else {
            train::<Autodiff<B>>(args, &devices)
        }
    })
}

/// Train on `devices`: on this thread for one device (joining other processes if there are
/// any), else one replica per device, each on its own thread.
fn train<A: AutodiffBackend>(args: &TrainArgs, devices: &[A::Device]) -> Result<()> {
    let settings = args.distributed.settings()?;
    let data = Dataset::open(&args.data)?;
    let Some(settings) = settings else {
        return replica::<A>(args, &data, &devices[0], None);
    };
    crate::distributed::collective_logging();
    let ranks = settings.ranks();
    match &settings.nodes {
        Some(n) => eprintln!(
            "node {} of {} ({} device(s), ranks {}..{} of {}): joining through the orchestrator \
             at {} (this node: {})",
            n.node_rank,
            n.num_nodes,
            ranks.devices,
            ranks.global_rank(0),
            ranks.global_rank(ranks.devices),
            ranks.world(),
            n.orchestrator,
            n.node_address
        ),
        None => eprintln!("{} replicas in this process", ranks.devices),
    }
    if devices.len() > 1
        && let Ok(cores) = std::thread::available_parallelism()
        && args.backend == BackendKind::Cpu
        && devices.len() > cores.get()
    {
        eprintln!(
            "warning: {} CPU replicas on {cores} cores: each replica wants at least a core \
             (--batch-size or --gradient-accumulation-steps grow the batch without it)",
            devices.len()
        );
    }
    let group = Arc::new(LocalGroup::default());
    // Join the other replicas first: a missing peer or orchestrator fails before the model
    // loads.
    let run_one = |local: usize, device: &A::Device| -> Result<()> {
        let _guard = group.fail_on_panic();
        let result = Collective::<A::InnerBackend>::join(&settings, local, group.clone(), device)
            .map_err(anyhow::Error::from)
            .and_then(|c| replica::<A>(args, &data, device, Some(c)));
        if result.is_err() {
            group.fail();
        }
        result
    };
    if let [device] = devices {
        return run_one(0, device);
    }
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(local, device)| {
                let run_one = &run_one;
                std::thread::Builder::new()
                    .name(format!("ip2p-replica-{local}"))
                    // Burn's backward pass recurses over the graph: the main thread's size.
                    .stack_size(REPLICA_STACK)
                    .spawn_scoped(scope, move || run_one(local, device))
                    // The replicas already started would wait for this one to register.
                    .inspect_err(|_| group.fail())
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(local, h)| match h {
                Err(e) => Err(anyhow::anyhow!(
                    "could not start replica {local}'s thread: {e}"
                )),
                Ok(h) => h.join().unwrap_or_else(|p| {
                    Err(anyhow::anyhow!(
                        "replica {local} (rank {}) panicked: {}",
                        ranks.global_rank(local),
                        panic_message(&*p)
                    ))
                }),
            })
            .collect()
    });
    first_error(results)
}

/// Stack of a replica's thread (Rust's main thread gets 8 MiB; spawned threads 2 MiB).
const REPLICA_STACK: usize = 8 << 20;

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// The replicas' outcome: the first error that says what went wrong, rather than one of the
/// replicas that only stopped because of it ([`TrainError::ReplicaStopped`]).
fn first_error(results: Vec<Result<()>>) -> Result<()> {
    let stopped = |e: &anyhow::Error| {
        matches!(
            e.downcast_ref::<TrainError>(),
            Some(TrainError::ReplicaStopped { .. })
        )
    };
    let mut errors: Vec<anyhow::Error> = results.into_iter().filter_map(Result::err).collect();
    match errors.iter().position(|e| !stopped(e)) {
        Some(i) => Err(errors.swap_remove(i)),
        None => errors.into_iter().next().map_or(Ok(()), Err),
    }
}

/// One replica: load the model on `device`, train, and (global rank 0) write the outputs.
fn replica<A: AutodiffBackend>(
    args: &TrainArgs,
    data: &Dataset,
    device: &A::Device,
    collective: Option<Collective<A::InnerBackend>>,
) -> Result<()> {
    let main = collective.as_ref().is_none_or(|c| c.rank() == 0);
    let model = &args.model;
    let unet_dir = model.join("unet");
    let (unet, widened) = load_unet_for_training::<A>(&unet_dir, device)
        .with_context(|| format!("loading {}", unet_dir.display()))?;
    if widened && main {
        eprintln!("widened the 4-channel UNet's conv_in to 8 channels (new weights zero)");
    }
    let vae = AutoencoderKL::<A::InnerBackend>::load(model.join("vae"), device, DType::F32, None)?;
    let text = PromptEncoder::<A::InnerBackend>::load(model, None, device)?;
    let scheduler_config =
        SchedulerConfig::from_file(model.join("scheduler").join("scheduler_config.json"))?;
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("creating {}", args.output.display()))?;

    let config = TrainConfig {
        resolution: args.resolution,
        batch_size: args.batch_size,
        gradient_accumulation: args.gradient_accumulation_steps,
        max_steps: args.max_train_steps,
        adamw: AdamWSettings {
            lr: args.learning_rate,
            weight_decay: args.adam_weight_decay,
            max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
            warmup_steps: args.lr_warmup_steps,
            ..AdamWSettings::default()
        },
        ema_decay: args.use_ema.then_some(0.9999),
        conditioning_dropout: args.conditioning_dropout_prob,
        random_flip: args.random_flip,
        seed: args.seed,
        checkpoint_every: args.checkpointing_steps,
        validate_every: args.validation_steps,
        bad_rows: if args.strict {
            BadRows::Stop
        } else {
            BadRows::Skip
        },
        output: args.output.clone(),
    };
    let validation = if args.validation_steps > 0 && main {
        let rows: Vec<usize> = (0..args.num_validation.min(data.len())).collect();
        let rows = load_rows::<A::InnerBackend>(data, &rows, args.resolution, device)?;
        Some(Validation::new(
            rows.original,
            rows.edited,
            rows.input_ids,
            scheduler_config.clone(),
            EditOptions {
                steps: args.validation_inference_steps,
                guidance_scale: 7.0,
                image_guidance_scale: 1.5,
                seed: args.seed,
                ..EditOptions::default()
            },
        )?)
    } else {
        None
    };
    let mut trainer = Trainer::<A>::new(
        unet,
        Frozen { vae, text },
        &scheduler_config,
        &unet_dir.join("config.json"),
        config,
        device,
    )?;
    // Before a resume: each rank's place in the data is part of the checkpoint.
    trainer.collective = collective;
    if let Some(from) = &args.resume_from_checkpoint {
        let dir = if from == "latest" {
            latest_checkpoint(&args.output)
                .with_context(|| format!("no checkpoint under {}", args.output.display()))?
        } else {
            PathBuf::from(from)
        };
        trainer.resume(&dir)?;
        if main {
            eprintln!("resumed from {} at step {}", dir.display(), trainer.step);
        }
    }

    let bar = if args.quiet || !main {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(args.max_train_steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "train [{bar:30}] {pos}/{len} steps, {msg}, {elapsed} (eta {eta})",
        )?
        .progress_chars("=> "),
    );
    bar.set_position(trainer.step as u64);
    // One JSON line per optimiser step: step, loss, lr, grad norm, seconds.
    let log_path = args.output.join("train_log.jsonl");
    let result = trainer.run(data, validation.as_ref(), &mut |r| {
        bar.set_position(r.step as u64);
        bar.set_message(format!("loss {:.4}, lr {:.2e}", r.loss, r.lr));
        for (row, reason) in &r.newly_skipped {
            bar.suspend(|| eprintln!("warning: skipped row {row}: {reason}"));
        }
        let line = serde_json::json!({"step": r.step, "loss": r.loss, "lr": r.lr,
            "grad_norm": r.grad_norm, "seconds": r.seconds,
            "all_reduce_seconds": r.all_reduce_seconds, "skipped_rows": r.skipped_rows});
        if !main {
            return;
        }
        if let Err(e) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()))
        {
            bar.suspend(|| eprintln!("warning: {}: {e}", log_path.display()));
        }
        if let Some(v) = &r.validation {
            let msg = format!(
                "step {}: validation loss {:.4} in {:.1}s, images in {}",
                v.step,
                v.loss,
                v.seconds,
                v.images
                    .first()
                    .and_then(|p| p.parent())
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            );
            bar.suspend(|| eprintln!("{msg}"));
        }
        if let Some(c) = &r.checkpoint {
            bar.suspend(|| eprintln!("step {}: checkpoint {}", r.step, c.display()));
        }
    });
    bar.finish();
    result?;
    let rank = trainer.shard().rank;
    if let Some(c) = trainer.collective.take() {
        eprintln!(
            "rank {}: replicas equal, UNet fingerprint {:016x}",
            c.rank(),
            trainer.weights_fingerprint()
        );
        c.finish()?;
    }
    if !main {
        eprintln!("rank {rank}: done (rank 0 writes the outputs)");
        return Ok(());
    }
    // Final export: the EMA model when there is one, as diffusers' script saves it.
    let final_dir = args.output.join("unet");
    match &trainer.ema {
        Some(ema) => ip2p_train::export_unet_diffusers(
            &ema.model,
            &unet_dir.join("config.json"),
            &final_dir,
        )?,
        None => {
            use burn::module::AutodiffModule;
            ip2p_train::export_unet_diffusers(
                &trainer.unet.valid(),
                &unet_dir.join("config.json"),
                &final_dir,
            )?
        }
    }
    if args.no_save_pipeline {
        eprintln!("wrote {}", final_dir.display());
    } else {
        // The rest of the pipeline, as diffusers' script saves it: --output is then a model
        // folder `ip2p edit --model` takes.
        for part in [
            "model_index.json",
            "vae",
            "text_encoder",
            "tokenizer",
            "scheduler",
        ] {
            let from = model.join(part);
            if from.exists() {
                copy_all(&from, &args.output.join(part))
                    .with_context(|| format!("copying {}", from.display()))?;
            }
        }
        eprintln!("wrote the pipeline to {}", args.output.display());
    }
    Ok(())
}

fn copy_all(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    if from.is_dir() {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            copy_all(&entry.path(), &to.join(entry.file_name()))?;
        }
        Ok(())
    } else {
        std::fs::copy(from, to).map(|_| ())
    }
}
