//! The training loop: batches in data order, gradient accumulation, AdamW with warm-up and
//! global-norm clipping, EMA, checkpoints and validation at fixed intervals.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{DType, ElementConversion};
use ip2p_nn::AutodiffBackend;
use ip2p_sched::{Ddpm, PredictionType, SchedulerConfig};
use ip2p_unet::UNet2DConditionModel;

use crate::TrainError;
use crate::checkpoint::{CheckpointParts, TrainState, load_checkpoint, save_checkpoint};
use crate::collective::{Collective, Fingerprint};
use crate::data::{BadRows, BatchLoader, DataOrder, Dataset, Shard};
use crate::optim::{AdamW, AdamWSettings, Ema, named_grads, named_params};
use crate::rng::item_seed;
use crate::step::{Frozen, StepConfig, StepDraws, training_loss};
use crate::validate::{Validation, ValidationResult, validate};

/// The run's settings (diffusers' script's flags).
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub resolution: u32,
    pub batch_size: usize,
    pub gradient_accumulation: usize,
    pub max_steps: usize,
    pub adamw: AdamWSettings,
    /// EMA decay (diffusers' `--use_ema`: 0.9999); None: no EMA.
    pub ema_decay: Option<f64>,
    pub conditioning_dropout: f64,
    pub random_flip: bool,
    pub seed: u64,
    /// Save a checkpoint every this many optimiser steps (and at the end); 0: only at the end.
    pub checkpoint_every: usize,
    /// Validate every this many optimiser steps; 0: never.
    pub validate_every: usize,
    pub bad_rows: BadRows,
    pub output: PathBuf,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            resolution: 256,
            batch_size: 4,
            gradient_accumulation: 1,
            max_steps: 1000,
            adamw: AdamWSettings::default(),
            ema_decay: None,
            conditioning_dropout: 0.05,
            random_flip: true,
            seed: 42,
            checkpoint_every: 500,
            validate_every: 0,
            bad_rows: BadRows::Skip,
            output: PathBuf::from("train-output"),
        }
    }
}

/// Reported after each optimiser step.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub step: usize,
    pub max_steps: usize,
    /// Mean loss over the accumulated micro-batches (and the ranks).
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub seconds: f64,
    /// Of `seconds`, the time in the gradient all-reduce (0 on one process).
    pub all_reduce_seconds: f64,
    pub checkpoint: Option<PathBuf>,
    pub validation: Option<ValidationResult>,
    /// Rows skipped so far.
    pub skipped_rows: usize,
    /// Rows skipped during this step (row number, reason), each reported once.
    pub newly_skipped: Vec<(usize, String)>,
}

/// A training run in progress.
pub struct Trainer<A: AutodiffBackend> {
    pub unet: UNet2DConditionModel<A>,
    pub frozen: Frozen<A::InnerBackend>,
    pub scheduler: Ddpm,
    pub prediction_type: PredictionType,
    pub optimizer: AdamW<A::InnerBackend>,
    pub ema: Option<Ema<A::InnerBackend, UNet2DConditionModel<A::InnerBackend>>>,
    pub order: DataOrder,
    /// The data-parallel collective (set it before [`Self::resume`]: each rank's place in
    /// the data is part of a checkpoint); None: one process.
    pub collective: Option<Collective<A::InnerBackend>>,
    pub step: usize,
    pub config: TrainConfig,
    /// The source model's `unet/config.json` (for exports).
    pub unet_config: PathBuf,
    pub device: A::Device,
}

impl<A: AutodiffBackend> Trainer<A> {
    /// Start a run: `unet` must take 8 channels (see [`crate::widen_conv_in`]).
    pub fn new(
        unet: UNet2DConditionModel<A>,
        frozen: Frozen<A::InnerBackend>,
        scheduler_config: &SchedulerConfig,
        unet_config: &Path,
        config: TrainConfig,
        device: &A::Device,
    ) -> Result<Self, TrainError> {
        let scheduler = Ddpm::new(scheduler_config)?;
        let prediction_type = scheduler.config().prediction_type;
        if config.batch_size == 0 || config.gradient_accumulation == 0 {
            return Err(TrainError::Input(
                "batch size and gradient accumulation must be at least 1".into(),
            ));
        }
        if unet.in_channels != 8 {
            return Err(TrainError::Input(format!(
                "the UNet takes {} channels; InstructPix2Pix training needs 8 (widen a 4-channel UNet first)",
                unet.in_channels
            )));
        }
        let ema = config.ema_decay.map(|d| Ema::new(unet.valid(), d));
        Ok(Self {
            optimizer: AdamW::new(config.adamw),
            order: DataOrder::new(config.seed),
            collective: None,
            unet,
            frozen,
            scheduler,
            prediction_type,
            ema,
            step: 0,
            unet_config: unet_config.to_path_buf(),
            device: device.clone(),
            config,
        })
    }

    /// Continue from a checkpoint folder: model, optimiser, EMA, step and data order.
    pub fn resume(&mut self, dir: &Path) -> Result<(), TrainError> {
        let loaded = load_checkpoint::<A::InnerBackend>(dir, &self.device)?;
        self.unet = UNet2DConditionModel::load(dir.join("unet"), None, DType::F32, &self.device)?;
        self.optimizer.exp_avg = loaded.exp_avg;
        self.optimizer.exp_avg_sq = loaded.exp_avg_sq;
        self.optimizer.steps = loaded.state.step;
        self.step = loaded.state.step;
        let shard = self.shard();
        if loaded.state.world_size != shard.world {
            return Err(TrainError::Checkpoint {
                path: dir.to_path_buf(),
                reason: format!(
                    "written by a run of {} replicas (processes × devices); resuming with {} is \
                     not supported (each rank's place in the data is part of the checkpoint)",
                    loaded.state.world_size, shard.world
                ),
            });
        }
        self.order = match loaded.state.rank_data_orders.get(shard.rank) {
            Some(o) if shard.world > 1 => *o,
            _ => loaded.state.data_order,
        };
        if let (Some(ema), Some(model)) = (self.ema.as_mut(), loaded.ema) {
            ema.model = model;
            ema.steps = loaded.state.ema_steps.unwrap_or(loaded.state.step);
        } else if let Some(ema) = self.ema.as_mut() {
            ema.model = self.unet.valid();
            ema.steps = 0;
        }
        Ok(())
    }

    /// Check that all ranks hold the same weights, optimiser step, settings and data listing
    /// ([`Self::run`] does, before its first step).
    pub fn check_replicas(&self, data: &Dataset) -> Result<(), TrainError> {
        let Some(collective) = &self.collective else {
            return Ok(());
        };
        let weights = self.weights_fingerprint();
        let mut settings = Fingerprint::default();
        let c = &self.config;
        settings.add(
            format!(
                "{} {} {} {} {:?} {:?} {} {} {} {} {} {:?} {:?}",
                c.resolution,
                c.batch_size,
                c.gradient_accumulation,
                c.max_steps,
                c.adamw,
                c.ema_decay,
                c.conditioning_dropout,
                c.random_flip,
                c.seed,
                c.checkpoint_every,
                self.step,
                self.order.epoch,
                self.prediction_type,
            )
            .as_bytes(),
        );
        let mut rows = Fingerprint::default();
        for r in &data.rows {
            rows.add(
                format!(
                    "{} {} {} {:?}",
                    r.row, r.input_image, r.edited_image, r.input_ids
                )
                .as_bytes(),
            );
        }
        collective.check_same(
            &[
                ("UNet weights", weights),
                ("training settings and step", settings.value()),
                ("dataset (tokens.jsonl)", rows.value()),
            ],
            &self.device,
        )
    }

    /// A 64-bit fingerprint of the UNet's parameters (paths and bytes): equal on two ranks
    /// when their replicas are bitwise equal.
    pub fn weights_fingerprint(&self) -> u64 {
        let mut f = Fingerprint::default();
        for (path, t) in named_params(&self.unet.valid()) {
            f.add(path.as_bytes());
            f.add(t.into_data().as_bytes());
        }
        f.value()
    }

    /// This process's share of the data.
    pub fn shard(&self) -> Shard {
        match &self.collective {
            Some(c) => Shard {
                rank: c.rank(),
                world: c.world(),
            },
            None => Shard::SINGLE,
        }
    }

    /// Whether this process writes checkpoints, exports and validation (rank 0).
    pub fn is_main(&self) -> bool {
        self.shard().rank == 0
    }

    fn state(&self, rank_data_orders: Vec<DataOrder>) -> TrainState {
        TrainState {
            step: self.step,
            ema_steps: self.ema.as_ref().map(|e| e.steps),
            ema_decay: self.ema.as_ref().map(|e| e.decay),
            data_order: self.order,
            adamw: self.optimizer.settings,
            seed: self.config.seed,
            world_size: self.shard().world,
            rank_data_orders,
        }
    }

    /// Every rank's data order (all ranks call this together); on one process, its own.
    fn gather_orders(&self) -> Result<Vec<DataOrder>, TrainError> {
        let Some(c) = &self.collective else {
            return Ok(Vec::new());
        };
        let fit = |v: usize| {
            u32::try_from(v)
                .ok()
                .filter(|&v| v < 1 << 24)
                .ok_or_else(|| TrainError::Input(format!("data position {v} too large to share")))
        };
        let mine = [fit(self.order.epoch)?, fit(self.order.position)?];
        let all = c.gather(&mine, "sharing the ranks' data positions", &self.device)?;
        Ok(all
            .into_iter()
            .map(|v| DataOrder {
                seed: self.order.seed,
                epoch: v[0] as usize,
                position: v[1] as usize,
            })
            .collect())
    }

    /// Write a checkpoint of the current state under the output folder. In a data-parallel
    /// run every rank calls it (they share their data positions) and rank 0 writes; the
    /// others get None.
    pub fn save(&self) -> Result<Option<PathBuf>, TrainError> {
        let orders = self.gather_orders()?;
        if !self.is_main() {
            return Ok(None);
        }
        let unet = self.unet.valid();
        save_checkpoint(
            &self.config.output,
            &CheckpointParts {
                unet: &unet,
                ema: self.ema.as_ref().map(|e| &e.model),
                exp_avg: &self.optimizer.exp_avg,
                exp_avg_sq: &self.optimizer.exp_avg_sq,
                state: &self.state(orders),
                unet_config: &self.unet_config,
            },
        )
        .map(Some)
    }

    /// One optimiser step: `gradient_accumulation` micro-batches of `batch_size` pairs.
    pub fn train_step(&mut self, loader: &mut BatchLoader<'_>) -> Result<StepReport, TrainError> {
        let start = Instant::now();
        let skipped_before = loader.skipped.len();
        let n = self.config.gradient_accumulation;
        let step_config = StepConfig {
            conditioning_dropout: self.config.conditioning_dropout,
            prediction_type: self.prediction_type,
        };
        let shard = self.shard();
        let b = self.config.batch_size;
        let mut accumulator = GradientsAccumulator::<UNet2DConditionModel<A>>::new();
        let mut loss_sum = 0.0;
        for micro in 0..n {
            // Item k of rank r is item k·N + r of the global batch: its draws are those of a
            // single process running the global batch.
            let seeds: Vec<u64> = (0..b)
                .map(|k| item_seed(self.config.seed, self.step, micro, shard.global_item(k)))
                .collect();
            let batch =
                loader.next_batch::<A::InnerBackend>(&mut self.order, &seeds, &self.device)?;
            let [_, _, h, w] = batch.edited.dims();
            let f = self.frozen.vae.downscale_factor();
            let latent = [self.frozen.vae.config.latent_channels, h / f, w / f];
            let train_steps = self.scheduler.config().num_train_timesteps;
            let draws = StepDraws::draw_items(&seeds, latent, train_steps, &self.device);
            let (loss, _) = training_loss(
                &self.unet,
                &self.frozen,
                &self.scheduler,
                &step_config,
                &batch,
                &draws,
            )?;
            // A non-finite loss stops the run after the all-reduce, on every rank together.
            loss_sum += loss.clone().into_scalar().elem::<f64>();
            // accelerate divides the loss by the accumulation steps before backward.
            let grads = loss.div_scalar(n as f64).backward();
            accumulator.accumulate(&self.unet, GradientsParams::from_grads(grads, &self.unet));
        }
        let grads = accumulator.grads();
        let named = named_grads::<A, _>(&self.unet, &grads);
        let (named, loss, all_reduce) = match &self.collective {
            Some(c) => {
                let avg = c.mean_gradients(self.step + 1, named, &[loss_sum / n as f64])?;
                let loss = avg.extra.first().copied().unwrap_or(f64::NAN);
                (avg.grads, loss, avg.seconds)
            }
            None => (named, loss_sum / n as f64, 0.0),
        };
        if !loss.is_finite() {
            return Err(TrainError::NonFinite {
                step: self.step + 1,
                loss,
            });
        }
        let unet = self.unet.clone();
        let (unet, info) = self.optimizer.step_named::<A, _>(unet, named);
        self.unet = unet;
        if let Some(ema) = self.ema.as_mut() {
            ema.update(&named_params(&self.unet.valid()));
        }
        self.step += 1;
        Ok(StepReport {
            step: self.step,
            max_steps: self.config.max_steps,
            loss,
            lr: info.lr,
            grad_norm: info.grad_norm,
            seconds: start.elapsed().as_secs_f64(),
            all_reduce_seconds: all_reduce,
            checkpoint: None,
            validation: None,
            skipped_rows: loader.skipped.len(),
            newly_skipped: loader.skipped[skipped_before..].to_vec(),
        })
    }

    /// Train to `max_steps`, checkpointing and validating at the configured intervals;
    /// `on_step` sees every step's report. A failing step returns its error; checkpoints
    /// written before it stay as they are.
    pub fn run(
        &mut self,
        data: &Dataset,
        validation: Option<&Validation>,
        on_step: &mut dyn FnMut(&StepReport),
    ) -> Result<(), TrainError> {
        self.check_replicas(data)?;
        let mut loader = BatchLoader {
            data,
            resolution: self.config.resolution,
            random_flip: self.config.random_flip,
            bad_rows: self.config.bad_rows,
            shard: self.shard(),
            skipped: Vec::new(),
        };
        while self.step < self.config.max_steps {
            let mut report = self.train_step(&mut loader)?;
            let last = self.step == self.config.max_steps;
            let every = |k: usize| k > 0 && self.step.is_multiple_of(k);
            if let Some(v) = validation
                && self.is_main()
                && every(self.config.validate_every)
            {
                let model = match &self.ema {
                    Some(e) => e.model.clone(),
                    None => self.unet.valid(),
                };
                report.validation = Some(validate(
                    &model,
                    &self.frozen,
                    &self.scheduler,
                    v,
                    self.step,
                    &self.config.output,
                )?);
            }
            if every(self.config.checkpoint_every) || last {
                report.checkpoint = self.save()?;
            }
            on_step(&report);
        }
        // The replicas must have stayed bitwise equal.
        if let Some(c) = &self.collective {
            c.check_same(
                &[("UNet weights after training", self.weights_fingerprint())],
                &self.device,
            )?;
        }
        Ok(())
    }
}
