//! The model's thread: it loads the model, then runs one edit at a time from the queue.
//!
//! The model never leaves this thread (so it need not be `Send`); the HTTP side talks to it
//! only through [`Jobs`]. A panic inside an edit is caught and reported as that edit's error:
//! the thread, and the server, go on.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;

use burn::tensor::DType;
use ip2p_nn::Backend;
use ip2p_pipeline::{
    EditOptions, Flow, Ip2pModel, LoadOptions, NoProbe, PipelineError, Prompts, RngKind,
    RunSettings, StepInfo,
};
use ip2p_sched::SchedulerKind;
use ip2p_vae::{images_to_tensor, tensor_to_images};

use crate::error::ServeError;
use crate::jobs::{DoneInfo, Jobs, Outcome, Work};
use crate::{output, preview};

/// What the HTTP side needs to know about the loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The folder's name (reported in results; the full path is not).
    pub name: String,
    pub default_scheduler: SchedulerKind,
    /// The VAE's downscale factor (8 for SD 1.5).
    pub vae_factor: u32,
}

/// Start the thread; it answers on `ready` once the model is loaded (or failed to load).
pub fn spawn<B: Backend>(
    dir: PathBuf,
    load: LoadOptions,
    device: B::Device,
    jobs: Arc<Jobs>,
    ready: mpsc::Sender<Result<ModelInfo, ServeError>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("ip2p-model".into())
        .spawn(move || {
            let loaded = catch_unwind(AssertUnwindSafe(|| load_model::<B>(&dir, &load, &device)))
                .unwrap_or_else(|p| {
                    Err(ServeError::Config {
                        what: dir.display().to_string(),
                        reason: format!("panicked while loading: {}", panic_text(&p)),
                    })
                });
            let (model, info) = match loaded {
                Ok(x) => x,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            let _ = ready.send(Ok(info.clone()));
            while let Some(work) = jobs.next() {
                let outcome = catch_unwind(AssertUnwindSafe(|| edit(&model, &info, &work, &jobs)))
                    .unwrap_or_else(|p| {
                        Outcome::Error(format!("internal error: {}", panic_text(&p)))
                    });
                jobs.finish(&work.id, outcome);
            }
        })
}

fn load_model<B: Backend>(
    dir: &std::path::Path,
    load: &LoadOptions,
    device: &B::Device,
) -> Result<(Ip2pModel<B>, ModelInfo), ServeError> {
    let model = Ip2pModel::<B>::load(dir, device, load)?;
    let config = |e: &dyn std::fmt::Display| ServeError::Config {
        what: dir.join("vae").join("config.json").display().to_string(),
        reason: e.to_string(),
    };
    let vae =
        ip2p_vae::VaeConfig::load(dir.join("vae").join("config.json")).map_err(|e| config(&e))?;
    let default_scheduler = model
        .scheduler_config
        .kind()
        .map_err(|e| ServeError::Config {
            what: dir.join("scheduler").display().to_string(),
            reason: e.to_string(),
        })?;
    let name = dir
        .canonicalize()
        .unwrap_or_else(|_| dir.to_path_buf())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((
        model,
        ModelInfo {
            name,
            default_scheduler,
            vae_factor: vae.downscale_factor() as u32,
        },
    ))
}

/// Run one edit; progress and previews go to `jobs` as it runs.
fn edit<B: Backend>(model: &Ip2pModel<B>, info: &ModelInfo, work: &Work, jobs: &Jobs) -> Outcome {
    let p = &work.params;
    if work.cancel.load(Ordering::Relaxed) {
        return Outcome::Cancelled;
    }
    let (width, height) = work.image.dimensions();
    let done = |img: &image::RgbImage| match output::result_png(img, p, &info.name) {
        Ok(png) => Outcome::Done {
            png,
            info: DoneInfo {
                seed: p.seed,
                guidance: p.guidance,
                image_guidance: p.image_guidance,
                width,
                height,
                steps: p.steps,
                scheduler: p.scheduler.clone(),
            },
        },
        Err(e) => Outcome::Error(format!("encoding the PNG: {e}")),
    };
    // The original app: an empty instruction returns the (resized) input unchanged.
    if p.prompt.trim().is_empty() {
        return done(&work.image);
    }
    let run = || -> Result<image::RgbImage, PipelineError> {
        let mut scheduler = model.scheduler(Some(p.scheduler_kind))?;
        let input =
            images_to_tensor::<B>(std::slice::from_ref(&work.image), &model.device, DType::F32)?;
        let mut on_step = |s: &StepInfo<'_, B>| {
            if work.cancel.load(Ordering::Relaxed) {
                return Flow::Cancel;
            }
            let url = preview::data_url(s.latents);
            jobs.step(&work.id, s.step + 1, s.steps, url.into());
            if work.cancel.load(Ordering::Relaxed) {
                Flow::Cancel
            } else {
                Flow::Continue
            }
        };
        let settings = RunSettings {
            options: EditOptions {
                steps: p.steps,
                guidance_scale: p.guidance,
                image_guidance_scale: p.image_guidance,
                negative_prompt: p.negative_prompt.clone(),
                num_images_per_prompt: 1,
                seed: p.seed,
                rng: RngKind::Torch,
                cleanup_every: None,
                memory_budget: None,
            },
            init_latents: None,
            probe: &NoProbe,
            callback: Some(&mut on_step),
            activation_model: None,
        };
        let out = model.edit(
            scheduler.as_mut(),
            input,
            Prompts::Text(vec![p.prompt.clone()]),
            false,
            false,
            settings,
        )?;
        let mut images = tensor_to_images(out.output)?;
        images
            .pop()
            .ok_or_else(|| PipelineError::Input("the pipeline returned no image".into()))
    };
    match run() {
        Ok(img) => done(&img),
        Err(PipelineError::Cancelled { .. }) => Outcome::Cancelled,
        Err(e) => Outcome::Error(e.to_string()),
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panicked".into())
}
