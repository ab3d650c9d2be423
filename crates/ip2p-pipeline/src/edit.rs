//! The InstructPix2Pix denoising loop, as one free function the pipeline is built on.

use burn::tensor::cast::ToElement;
use burn::tensor::{DType, Tensor};
use ip2p_nn::Backend;
use ip2p_sched::{Generator, RngKind, Scheduler};
use ip2p_text::PromptEncoder;
use ip2p_unet::UNet2DConditionModel;
use ip2p_vae::AutoencoderKL;

use crate::batching::ActivationModel;
use crate::error::PipelineError;
use crate::memory::{MemoryProbe, NoProbe};
use crate::report::{RunReport, Stage, Tracker};

/// The prompts of a batch, in the form the caller already has them.
#[derive(Debug, Clone)]
pub enum Prompts<B: Backend> {
    /// Text: tokenized, then encoded.
    Text(Vec<String>),
    /// Token ids a dataset holds (`model_max_length` per row): encoded without tokenizing.
    Ids(Vec<Vec<i64>>),
    /// Prompt embeddings `[batch, tokens, hidden]`: no text encoder runs. `negative` is the
    /// unconditional embedding (`[1 or batch, tokens, hidden]`); without it the text encoder's
    /// cached empty-prompt embedding is used.
    Embeddings {
        prompt: Tensor<B, 3>,
        negative: Option<Tensor<B, 3>>,
    },
}

impl<B: Backend> Prompts<B> {
    pub fn len(&self) -> usize {
        match self {
            Prompts::Text(t) => t.len(),
            Prompts::Ids(ids) => ids.len(),
            Prompts::Embeddings { prompt, .. } => prompt.dims()[0],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Settings of an edit; the defaults are diffusers' (`num_inference_steps` 100,
/// `guidance_scale` 7.5, `image_guidance_scale` 1.5).
#[derive(Debug, Clone, PartialEq)]
pub struct EditOptions {
    pub steps: usize,
    /// Text guidance. Guidance runs only when this is > 1 and `image_guidance_scale` ≥ 1; then
    /// each step evaluates [text+image, negative+image, negative+no image].
    pub guidance_scale: f64,
    pub image_guidance_scale: f64,
    /// Replaces the empty prompt in the two unconditional rows.
    pub negative_prompt: Option<String>,
    /// Edits per (image, prompt) pair; each gets its own noise.
    pub num_images_per_prompt: usize,
    /// Seeds the initial noise and the noise of stochastic scheduler steps (through `rng`).
    pub seed: u64,
    /// Which generator `seed` drives: torch's by default, so a seed gives the image diffusers
    /// gives for `generator=torch.Generator().manual_seed(seed)`.
    pub rng: RngKind,
    /// Release cached device memory every this many steps (and always between stages).
    pub cleanup_every: Option<usize>,
    /// Activation memory budget in bytes: larger batches run in chunks sized by resolution.
    pub memory_budget: Option<u64>,
}

impl Default for EditOptions {
    fn default() -> Self {
        Self {
            steps: 100,
            guidance_scale: 7.5,
            image_guidance_scale: 1.5,
            negative_prompt: None,
            num_images_per_prompt: 1,
            seed: 0,
            rng: RngKind::default(),
            cleanup_every: None,
            memory_budget: None,
        }
    }
}

impl EditOptions {
    /// diffusers' gate: both guidances, or none.
    pub fn guidance(&self) -> bool {
        self.guidance_scale > 1.0 && self.image_guidance_scale >= 1.0
    }
}

/// What the per-step callback sees.
pub struct StepInfo<'a, B: Backend> {
    /// 0-based step within the chunk being denoised.
    pub step: usize,
    pub steps: usize,
    pub timestep: f64,
    /// First edit of the chunk within the whole batch.
    pub chunk_start: usize,
    /// The latents after this step (a preview can decode them).
    pub latents: &'a Tensor<B, 4>,
}

/// The per-step callback: progress, previews, cancel.
pub type StepCallback<'a, B> = &'a mut dyn FnMut(&StepInfo<'_, B>) -> Flow;

/// The callback's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Cancel,
}

/// Everything about a run that is not a model or an input.
pub struct RunSettings<'a, B: Backend> {
    pub options: EditOptions,
    /// Initial noise `[batch · num_images_per_prompt, 4, h, w]`, unit Gaussian (as diffusers'
    /// `latents=`; multiplied by the scheduler's `init_noise_sigma`). Drawn from the seed if `None`.
    pub init_latents: Option<Tensor<B, 4>>,
    pub probe: &'a dyn MemoryProbe,
    pub callback: Option<StepCallback<'a, B>>,
    /// For memory-budget chunking; `None` runs the batch whole.
    pub activation_model: Option<ActivationModel>,
}

impl<B: Backend> Default for RunSettings<'_, B> {
    fn default() -> Self {
        Self {
            options: EditOptions::default(),
            init_latents: None,
            probe: &NoProbe,
            callback: None,
            activation_model: None,
        }
    }
}

/// The result: latents in the diffusion model's space (`return_latents`) or images in
/// [-1, 1], and the per-stage report.
pub struct EditOutput<B: Backend> {
    pub output: Tensor<B, 4>,
    pub report: RunReport,
}

/// Run InstructPix2Pix on a batch: one edit per (image, prompt) pair, in order.
///
/// The shape of the design document's `run_diffusion_inference_batch`: `images_or_latents` are
/// images `[b, 3, H, W]` in [-1, 1], or, with `input_is_latents`, the VAE's unscaled `mode()`
/// latents `[b, 4, H/f, W/f]` (no VAE encode). `return_latents` skips the decode and returns the
/// final latents. The `text_encoder` holds its tokenizer; it is needed unless prompts come as
/// embeddings with their negative.
///
/// `generator` is diffusers' `generator=`: it draws the initial noise (unless `init_latents`
/// are given), then the scheduler draws each stochastic step's noise from it, in diffusers'
/// order, so a torch generator gives diffusers' result for the same seed. A per-item generator
/// ([`Generator::per_item`]) needs one generator per edit (`images × num_images_per_prompt`).
/// The step noise is drawn from a copy per chunk (see [`Generator::for_chunk`]): memory-budget
/// chunking does not change any edit's noise, and `generator` itself is left where the initial
/// noise left it.
#[allow(clippy::too_many_arguments)]
pub fn run_diffusion_inference_batch<B: Backend>(
    unet: &UNet2DConditionModel<B>,
    vae: Option<&AutoencoderKL<B>>,
    text_encoder: Option<&PromptEncoder<B>>,
    scheduler: &mut dyn Scheduler<B>,
    images_or_latents: Tensor<B, 4>,
    prompts_or_ids: Prompts<B>,
    device: &B::Device,
    generator: &mut Generator,
    input_is_latents: bool,
    return_latents: bool,
    settings: RunSettings<'_, B>,
) -> Result<EditOutput<B>, PipelineError> {
    let RunSettings {
        options,
        init_latents,
        probe,
        mut callback,
        activation_model,
    } = settings;
    let mut tracker = Tracker::new(probe, || B::memory_cleanup(device));
    let sync = || B::sync(device).map_err(|e| PipelineError::Device(e.to_string()));

    let n = images_or_latents.dims()[0];
    check_batch(n, &prompts_or_ids, &options)?;
    let per = options.num_images_per_prompt;
    let latent_channels = unet.in_channels / 2;
    if unet.in_channels != 2 * latent_channels || unet.in_channels < 2 {
        return Err(PipelineError::Input(format!(
            "the UNet takes {} input channels; InstructPix2Pix needs noise + image latents (8)",
            unet.in_channels
        )));
    }

    // Text: prompt rows and their negatives, one row per image.
    let (prompt_embeds, negative_embeds) = encode_prompts(
        &mut tracker,
        text_encoder,
        prompts_or_ids,
        n,
        &options,
        &sync,
    )?;

    // Image latents: VAE mode(), unscaled (the model was trained on unscaled conditioning).
    let image_latents = if input_is_latents {
        let c = images_or_latents.dims()[1];
        if c != latent_channels {
            return Err(PipelineError::Input(format!(
                "image latents have {c} channels, the UNet expects {latent_channels}"
            )));
        }
        images_or_latents
    } else {
        let vae = vae.ok_or(PipelineError::MissingPart("VAE (to encode the images)"))?;
        tracker.run(Stage::VaeEncode, sync, || {
            let z = vae.encode(images_or_latents)?.mode();
            finite(z, Stage::VaeEncode)
        })?
    };
    tracker.cleanup();

    // num_images_per_prompt: each pair repeated in place (p0 p0 p1 p1), images and prompts alike.
    let image_latents = repeat_interleave(image_latents, per);
    let prompt_embeds = repeat_interleave(prompt_embeds, per);
    let negative_embeds = repeat_interleave(negative_embeds, per);
    let total = n * per;
    let [_, _, h, w] = image_latents.dims();
    generator.check_batch(total)?;

    let noise = match init_latents {
        Some(x) => {
            let expected = [total, latent_channels, h, w];
            if x.dims() != expected {
                return Err(PipelineError::Input(format!(
                    "initial latents have shape {:?}, expected {expected:?}",
                    x.dims()
                )));
            }
            x.cast(DType::F32)
        }
        None => generator.normal::<B>([total, latent_channels, h, w], device)?,
    };

    let guidance = options.guidance();
    let chunk = activation_model.as_ref().map_or(total, |m| {
        m.chunk_size(
            total,
            h,
            w,
            if guidance { 3 } else { 1 },
            options.memory_budget,
        )
    });
    let mut outputs = Vec::new();
    for (index, start) in (0..total).step_by(chunk.max(1)).enumerate() {
        let len = chunk.min(total - start);
        let take = |x: &Tensor<B, 4>| x.clone().narrow(0, start, len);
        let take3 = |x: &Tensor<B, 3>| x.clone().narrow(0, start, len);
        scheduler.set_timesteps(options.steps)?;
        scheduler.set_generator(generator.for_chunk(index, start, len, total)?);
        let latents = denoise(
            unet,
            scheduler,
            take(&noise),
            take(&image_latents),
            take3(&prompt_embeds),
            take3(&negative_embeds),
            &options,
            &mut tracker,
            &sync,
            start,
            &mut callback,
        )?;
        outputs.push(latents);
    }
    let latents = Tensor::cat(outputs, 0);
    tracker.cleanup();

    let output = if return_latents {
        latents
    } else {
        let vae = vae.ok_or(PipelineError::MissingPart("VAE (to decode the latents)"))?;
        tracker.run(Stage::VaeDecode, sync, || {
            let images = vae.decode_scaled(latents)?;
            finite(images, Stage::VaeDecode)
        })?
    };
    tracker.cleanup();
    Ok(EditOutput {
        output,
        report: tracker.report,
    })
}

pub(crate) fn check_batch<B: Backend>(
    n: usize,
    prompts: &Prompts<B>,
    options: &EditOptions,
) -> Result<(), PipelineError> {
    if n == 0 {
        return Err(PipelineError::Input("the batch has no images".into()));
    }
    if prompts.len() != n {
        return Err(PipelineError::Input(format!(
            "{n} image(s) but {} prompt(s): each image needs its own prompt",
            prompts.len()
        )));
    }
    if options.steps == 0 {
        return Err(PipelineError::Input("steps must be at least 1".into()));
    }
    if options.num_images_per_prompt == 0 {
        return Err(PipelineError::Input(
            "num_images_per_prompt must be at least 1".into(),
        ));
    }
    for (name, v) in [
        ("guidance_scale", options.guidance_scale),
        ("image_guidance_scale", options.image_guidance_scale),
    ] {
        if !v.is_finite() {
            return Err(PipelineError::Input(format!(
                "{name} must be finite, got {v}"
            )));
        }
    }
    Ok(())
}

/// Prompt and negative embeddings, `[n, tokens, hidden]` each.
pub(crate) fn encode_prompts<B: Backend, S>(
    tracker: &mut Tracker<'_>,
    text: Option<&PromptEncoder<B>>,
    prompts: Prompts<B>,
    n: usize,
    options: &EditOptions,
    sync: &S,
) -> Result<(Tensor<B, 3>, Tensor<B, 3>), PipelineError>
where
    S: Fn() -> Result<(), PipelineError>,
{
    let need_text = || text.ok_or(PipelineError::MissingPart("text encoder"));
    let (prompt, negative) = match prompts {
        Prompts::Embeddings { prompt, negative } => (prompt, negative),
        Prompts::Text(texts) => {
            let text = need_text()?;
            let rows = tracker.run(Stage::Tokenize, sync, || {
                let rows = text.tokenizer().encode_batch(&texts)?;
                Ok::<_, PipelineError>(
                    rows.into_iter()
                        .map(|r| r.into_iter().map(i64::from).collect())
                        .collect::<Vec<Vec<i64>>>(),
                )
            })?;
            (
                tracker.run(Stage::TextEncode, sync, || {
                    Ok::<_, PipelineError>(text.encode_ids(&rows)?)
                })?,
                None,
            )
        }
        Prompts::Ids(rows) => {
            let text = need_text()?;
            (
                tracker.run(Stage::TextEncode, sync, || {
                    Ok::<_, PipelineError>(text.encode_ids(&rows)?)
                })?,
                None,
            )
        }
    };
    let negative = match (negative, &options.negative_prompt) {
        (Some(neg), _) => neg,
        (None, Some(neg)) => need_text()?.encode(&[neg.as_str()])?,
        (None, None) => need_text()?.uncond(),
    };
    let [b, tokens, hidden] = prompt.dims();
    let [nb, ntokens, nhidden] = negative.dims();
    if b != n {
        return Err(PipelineError::Input(format!(
            "{b} prompt embedding rows for {n} images"
        )));
    }
    if (ntokens, nhidden) != (tokens, hidden) || (nb != 1 && nb != n) {
        return Err(PipelineError::Input(format!(
            "negative embeddings {:?} do not match prompt embeddings {:?}",
            negative.dims(),
            prompt.dims()
        )));
    }
    let negative = if nb == 1 {
        negative.expand([n, tokens, hidden])
    } else {
        negative
    };
    let prompt = finite(prompt, Stage::TextEncode)?;
    Ok((prompt, negative))
}

/// The guidance loop for one chunk; returns its final latents (f32).
#[allow(clippy::too_many_arguments)]
fn denoise<B: Backend, S>(
    unet: &UNet2DConditionModel<B>,
    scheduler: &mut dyn Scheduler<B>,
    noise: Tensor<B, 4>,
    image_latents: Tensor<B, 4>,
    prompt: Tensor<B, 3>,
    negative: Tensor<B, 3>,
    options: &EditOptions,
    tracker: &mut Tracker<'_>,
    sync: &S,
    chunk_start: usize,
    callback: &mut Option<StepCallback<'_, B>>,
) -> Result<Tensor<B, 4>, PipelineError>
where
    S: Fn() -> Result<(), PipelineError>,
{
    let guidance = options.guidance();
    let (context, image_cond) = if guidance {
        (
            Tensor::cat(vec![prompt, negative.clone(), negative], 0),
            Tensor::cat(
                vec![
                    image_latents.clone(),
                    image_latents.clone(),
                    image_latents.zeros_like(),
                ],
                0,
            ),
        )
    } else {
        (prompt, image_latents)
    };
    let mut latents = noise.mul_scalar(scheduler.init_noise_sigma());
    let timesteps = scheduler.timesteps().to_vec();
    let steps = timesteps.len();
    for (i, &t) in timesteps.iter().enumerate() {
        latents = tracker.run(Stage::Denoise(i), sync, || {
            let input = if guidance {
                Tensor::cat(vec![latents.clone(), latents.clone(), latents.clone()], 0)
            } else {
                latents.clone()
            };
            // Scheduler scaling applies to the noise channels only; the image latents join after.
            let input = scheduler.scale_model_input(input, t)?;
            let dtype = input.dtype();
            let input = Tensor::cat(vec![input, image_cond.clone().cast(dtype)], 1);
            let eps = unet.forward(input, t, context.clone())?.cast(DType::F32);
            let eps = if guidance {
                let [text, image, uncond]: [Tensor<B, 4>; 3] =
                    eps.chunk(3, 0).try_into().map_err(|_| {
                        PipelineError::Input("guidance batch did not split in three".into())
                    })?;
                uncond.clone()
                    + (text - image.clone()).mul_scalar(options.guidance_scale)
                    + (image - uncond).mul_scalar(options.image_guidance_scale)
            } else {
                eps
            };
            let next = scheduler.step(eps, t, latents.clone(), None)?.prev_sample;
            finite(next, Stage::Denoise(i))
        })?;
        if let Some(cb) = callback.as_mut() {
            let info = StepInfo {
                step: i,
                steps,
                timestep: t,
                chunk_start,
                latents: &latents,
            };
            if cb(&info) == Flow::Cancel {
                return Err(PipelineError::Cancelled { step: i + 1 });
            }
        }
        if options
            .cleanup_every
            .is_some_and(|every| every > 0 && (i + 1) % every == 0)
        {
            tracker.cleanup();
        }
    }
    Ok(latents)
}

/// Each row repeated `k` times in place: rows a, b → a, a, b, b.
fn repeat_interleave<B: Backend, const D: usize>(x: Tensor<B, D>, k: usize) -> Tensor<B, D> {
    if k == 1 {
        return x;
    }
    let dims = x.dims();
    let rows: Vec<Tensor<B, D>> = (0..dims[0])
        .flat_map(|i| std::iter::repeat_n(x.clone().narrow(0, i, 1), k))
        .collect();
    Tensor::cat(rows, 0)
}

/// `x`, or the stage's NonFinite error if any value is NaN or infinite.
pub(crate) fn finite<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    stage: Stage,
) -> Result<Tensor<B, D>, PipelineError> {
    if x.clone().is_finite().all().into_scalar().to_bool() {
        Ok(x)
    } else {
        Err(PipelineError::NonFinite { stage })
    }
}
