//! Validation during training: the pipeline on fixed pairs, fed the stored token ids (the
//! text encoder's empty-prompt embedding is computed once and cached), images saved, and the
//! training loss on the same pairs with fixed draws.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{ElementConversion, Tensor};
use ip2p_nn::Backend;
use ip2p_sched::{Ddpm, Generator, SchedulerConfig, SchedulerKind};
use ip2p_unet::UNet2DConditionModel;

use crate::TrainError;
use crate::step::{Frozen, StepConfig, StepDraws, TrainBatch, prepare_inputs};
use ip2p_pipeline::edit::{EditOptions, Prompts, RunSettings, run_diffusion_inference_batch};

/// The fixed validation pairs and how to run the pipeline on them.
#[derive(Debug, Clone)]
pub struct Validation {
    /// Original and edited pixels `[n, 3, h, w]` in [-1, 1], and the rows' token ids.
    pub original: Vec<f32>,
    pub edited: Vec<f32>,
    pub shape: [usize; 4],
    pub input_ids: Vec<Vec<i64>>,
    /// The scheduler for the pipeline run (the model folder's, or another class).
    pub scheduler_config: SchedulerConfig,
    pub scheduler: Option<SchedulerKind>,
    pub options: EditOptions,
    pub conditioning_dropout: f64,
    pub seed: u64,
}

impl Validation {
    /// From tensors (see [`crate::data::load_rows`]).
    pub fn new<B: Backend>(
        original: Tensor<B, 4>,
        edited: Tensor<B, 4>,
        input_ids: Vec<Vec<i64>>,
        scheduler_config: SchedulerConfig,
        options: EditOptions,
    ) -> Result<Self, TrainError> {
        let shape = original.dims();
        let flat = |t: Tensor<B, 4>| {
            t.into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .map_err(|e| TrainError::Input(format!("validation pixels: {e:?}")))
        };
        Ok(Self {
            original: flat(original)?,
            edited: flat(edited)?,
            shape,
            input_ids,
            scheduler_config,
            scheduler: None,
            options,
            conditioning_dropout: 0.0,
            seed: 0,
        })
    }

    fn tensor<B: Backend>(&self, v: &[f32], device: &B::Device) -> Tensor<B, 4> {
        Tensor::from_data(
            burn::tensor::TensorData::new(v.to_vec(), self.shape),
            device,
        )
    }
}

/// What a validation run gave.
#[derive(Debug, Clone)]
pub struct ValidationResult {
    pub step: usize,
    /// The training loss on the validation pairs with fixed draws (no dropout).
    pub loss: f64,
    pub seconds: f64,
    /// The edited images written, one per pair.
    pub images: Vec<PathBuf>,
}

/// Run validation with `unet` (the EMA model when there is one) and write
/// `<output>/validation/step-<step>/<i>.png` and a line to `<output>/validation/log.jsonl`.
pub fn validate<B: Backend>(
    unet: &UNet2DConditionModel<B>,
    frozen: &Frozen<B>,
    train_scheduler: &Ddpm,
    v: &Validation,
    step: usize,
    output: &Path,
) -> Result<ValidationResult, TrainError> {
    let start = Instant::now();
    let device = unet.conv_in.weight.val().device();
    let original = v.tensor::<B>(&v.original, &device);
    let edited = v.tensor::<B>(&v.edited, &device);

    // The loss with fixed draws: comparable from one validation to the next.
    let batch = TrainBatch {
        original: original.clone(),
        edited,
        input_ids: v.input_ids.clone(),
    };
    let f = frozen.vae.downscale_factor();
    let [n, _, h, w] = v.shape;
    let latent = [n, frozen.vae.config.latent_channels, h / f, w / f];
    let draws = StepDraws::draw(
        v.seed,
        latent,
        train_scheduler.config().num_train_timesteps,
        &device,
    );
    let config = StepConfig {
        conditioning_dropout: v.conditioning_dropout,
        prediction_type: train_scheduler.config().prediction_type,
    };
    let inputs = prepare_inputs(frozen, train_scheduler, &config, &batch, &draws)?;
    let (sample, t, context, aux) = (inputs.sample, inputs.timesteps, inputs.context, inputs.aux);
    let pred = unet.forward(sample, t, context)?;
    let loss: f64 = (pred - aux.target)
        .square()
        .mean()
        .into_scalar()
        .elem::<f64>();

    // The pipeline, fed the stored ids; the empty prompt's embedding is the encoder's cache.
    let mut scheduler = ip2p_sched::build::<B>(&v.scheduler_config, v.scheduler)?;
    let mut generator = Generator::new(v.options.rng, v.options.seed);
    let out = run_diffusion_inference_batch(
        unet,
        Some(&frozen.vae),
        Some(&frozen.text),
        scheduler.as_mut(),
        original,
        Prompts::Ids(v.input_ids.clone()),
        &device,
        &mut generator,
        false,
        false,
        RunSettings {
            options: v.options.clone(),
            ..RunSettings::default()
        },
    )?;
    let dir = output.join("validation").join(format!("step-{step}"));
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    let images = ip2p_vae::tensor_to_images(out.output)?;
    let mut paths = Vec::new();
    for (i, img) in images.iter().enumerate() {
        let p = dir.join(format!("{i}.png"));
        ip2p_vae::save_image(img, &p)?;
        paths.push(p);
    }
    let seconds = start.elapsed().as_secs_f64();
    let log = output.join("validation").join("log.jsonl");
    let line = serde_json::json!({"step": step, "loss": loss, "seconds": seconds});
    use std::io::Write;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .and_then(|mut f| writeln!(f, "{line}"))
        .map_err(|e| TrainError::io(&log, e))?;
    Ok(ValidationResult {
        step,
        loss,
        seconds,
        images: paths,
    })
}
