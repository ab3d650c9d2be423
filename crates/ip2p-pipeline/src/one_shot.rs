//! One edit from a model folder or single-file checkpoint, holding only the part each stage
//! needs.
//!
//! A process that edits once (the `ip2p edit` command) does not need the whole model at once:
//! the text encoder is loaded, used and dropped before the VAE encodes the images; the VAE is
//! dropped before the UNet is loaded, and loaded again (a tenth of a second) only if the result
//! is decoded. The peak is then the largest part plus its activations, not the sum of all
//! parts. A caller that edits many times (a server) keeps an [`Ip2pModel`] instead.
//!
//! The stages run the same functions as [`Ip2pModel::edit`]: the UNet run takes the prompt
//! embeddings and the image latents the first stages made, which gives the full path's result
//! (the parity tests check latents-in and embeddings-in against it).

use std::path::Path;
use std::time::Instant;

use burn::tensor::Tensor;
use ip2p_nn::Backend;
use ip2p_sched::SchedulerKind;

use crate::edit::{Prompts, RunSettings, check_batch, encode_prompts, finite};
use crate::error::PipelineError;
use crate::model::{Ip2pModel, LoadOptions, LoadTimes, ModelSource};
use crate::report::{RunReport, Stage, Tracker};

/// The result of [`edit_one_shot`]: as [`crate::EditOutput`], with what loading took.
pub struct OneShotOutput<B: Backend> {
    pub output: Tensor<B, 4>,
    /// The final latents (equal to `output` when latents were asked for), so a decoded run can
    /// write them too.
    pub latents: Tensor<B, 4>,
    pub report: RunReport,
    /// The VAE's time counts both of its loads.
    pub load_times: LoadTimes,
}

/// Edit `images_or_latents` with the model in `dir`, loading each part for its stage only
/// (`load.vae` and `load.text_encoder` are ignored: a part is loaded when a stage needs it).
/// Arguments as [`Ip2pModel::edit`]; `scheduler` picks another scheduler class than the
/// folder's.
#[allow(clippy::too_many_arguments)]
pub fn edit_one_shot<B: Backend>(
    dir: impl AsRef<Path>,
    device: &B::Device,
    load: &LoadOptions,
    scheduler: Option<SchedulerKind>,
    images_or_latents: Tensor<B, 4>,
    prompts: Prompts<B>,
    input_is_latents: bool,
    return_latents: bool,
    settings: RunSettings<'_, B>,
) -> Result<OneShotOutput<B>, PipelineError> {
    let dir = dir.as_ref();
    let started = Instant::now();
    let source = ModelSource::open(dir, load)?;
    let mut times = LoadTimes::default();
    let mut tracker = Tracker::new(settings.probe, || B::memory_cleanup(device));
    let sync = || B::sync(device).map_err(|e| PipelineError::Device(e.to_string()));
    let n = images_or_latents.dims()[0];
    check_batch(n, &prompts, &settings.options)?;
    // The step count against the scheduler's training steps, before any part is loaded.
    ip2p_sched::build::<B>(&source.scheduler_config()?, scheduler)?
        .set_timesteps(settings.options.steps)?;

    // Text: prompt and negative embeddings; the encoder is dropped at the end of the block.
    let prompts = match prompts {
        given @ Prompts::Embeddings {
            negative: Some(_), ..
        } => given,
        prompts => {
            let t = Instant::now();
            let text = source.load_text::<B>(device, load)?;
            times.text_s = Some(t.elapsed().as_secs_f64());
            let (prompt, negative) = encode_prompts(
                &mut tracker,
                Some(&text),
                prompts,
                n,
                &settings.options,
                &sync,
            )?;
            Prompts::Embeddings {
                prompt,
                negative: Some(negative),
            }
        }
    };
    tracker.cleanup();

    // Image latents: VAE mode(), unscaled, as the full path makes them.
    let latents = if input_is_latents {
        images_or_latents
    } else {
        let t = Instant::now();
        let vae = source.load_vae::<B>(device, load)?;
        times.vae_s = Some(t.elapsed().as_secs_f64());
        tracker.run(Stage::VaeEncode, sync, || {
            let z = vae.encode(images_or_latents)?.mode();
            finite(z, Stage::VaeEncode)
        })?
    };
    tracker.cleanup();

    // Denoising: the UNet alone.
    let unet_load = LoadOptions {
        vae: false,
        text_encoder: false,
        ..load.clone()
    };
    let model = Ip2pModel::<B>::load_from(&source, dir, device, &unet_load)?;
    times.unet_s = model.load_times.unet_s;
    let mut sched = model.scheduler(scheduler)?;
    let run = model.edit(sched.as_mut(), latents, prompts, true, true, settings)?;
    drop(model);
    tracker.cleanup();
    tracker.report.stages.extend(run.report.stages);

    let latents = run.output.clone();
    let output = if return_latents {
        run.output
    } else {
        let t = Instant::now();
        let vae = source.load_vae::<B>(device, load)?;
        times.vae_s = Some(times.vae_s.unwrap_or(0.0) + t.elapsed().as_secs_f64());
        tracker.run(Stage::VaeDecode, sync, || {
            let images = vae.decode_scaled(run.output)?;
            finite(images, Stage::VaeDecode)
        })?
    };
    tracker.cleanup();
    times.total_s = started.elapsed().as_secs_f64();
    Ok(OneShotOutput {
        output,
        latents,
        report: tracker.report,
        load_times: times,
    })
}
