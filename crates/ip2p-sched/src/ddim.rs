//! `DDIMScheduler` (Song et al. 2020): deterministic at eta 0, DDPM-like noise as eta grows.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::config::{BaseConfig, SchedulerConfig, SchedulerKind};
use crate::schedule;
use crate::{Generator, PredictionType, SchedError, Scheduler, StepOutput};

/// DDIM sampling (diffusers `DDIMScheduler`).
#[derive(Debug, Clone)]
pub struct Ddim {
    base: BaseConfig,
    /// `clip_sample_range` when `clip_sample` is on.
    clip: Option<f64>,
    /// The "previous" alpha of the last step: 1, or `alphas_cumprod[0]` without `set_alpha_to_one`.
    final_alpha_cumprod: f64,
    eta: f64,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
    generator: Generator,
}

/// x_0 and epsilon from the model output, with the f32 scalars diffusers uses.
pub(crate) fn x0_and_eps<B: Backend>(
    prediction: PredictionType,
    model_output: Tensor<B, 4>,
    sample: &Tensor<B, 4>,
    alpha_prod_t: f32,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let beta_prod_t = 1.0 - alpha_prod_t;
    let (sa, sb) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
    match prediction {
        PredictionType::Epsilon => (
            (sample.clone() - model_output.clone().mul_scalar(sb)).div_scalar(sa),
            model_output,
        ),
        PredictionType::Sample => {
            let eps = (sample.clone() - model_output.clone().mul_scalar(sa)).div_scalar(sb);
            (model_output, eps)
        }
        PredictionType::VPrediction => (
            sample.clone().mul_scalar(sa) - model_output.clone().mul_scalar(sb),
            model_output.mul_scalar(sa) + sample.clone().mul_scalar(sb),
        ),
    }
}

/// `sqrt(acp[t]) * x + sqrt(1 - acp[t]) * noise` for integer training timesteps.
pub(crate) fn alpha_add_noise<B: Backend>(
    alphas_cumprod: &[f64],
    original: Tensor<B, 4>,
    noise: Tensor<B, 4>,
    t: &[f64],
) -> Result<Tensor<B, 4>, SchedError> {
    crate::check_same_shape("noise", &noise, &original)?;
    let ts = crate::batch_timesteps(t, original.dims()[0])?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for t in ts {
        let acp = alphas_cumprod[schedule::train_index(t, alphas_cumprod.len())?] as f32;
        a.push(acp.sqrt() as f64);
        b.push((1.0 - acp).sqrt() as f64);
    }
    let dtype = original.dtype();
    let (a, b) = (
        crate::per_sample(&a, &original),
        crate::per_sample(&b, &original),
    );
    let out = crate::to_f32(original) * a + crate::to_f32(noise) * b;
    Ok(crate::to_dtype(out, dtype))
}

impl Ddim {
    pub fn new(config: &SchedulerConfig) -> Result<Self, SchedError> {
        let kind = SchedulerKind::Ddim;
        let base = config.base(kind)?;
        config.no_thresholding(kind)?;
        let r = &config.raw;
        let alphas_cumprod = schedule::alphas_cumprod(&schedule::betas(&base));
        let final_alpha_cumprod = if r.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let clip = r
            .clip_sample
            .unwrap_or(true)
            .then(|| r.clip_sample_range.unwrap_or(1.0));
        Ok(Self {
            base,
            clip,
            final_alpha_cumprod,
            eta: 0.0,
            alphas_cumprod,
            timesteps: Vec::new(),
            num_inference_steps: None,
            generator: Generator::default(),
        })
    }

    /// The weight of the fresh noise in each step: 0 is deterministic DDIM, 1 is DDPM-like.
    /// diffusers passes it to every `step`; the pipelines' default is 0.
    pub fn with_eta(mut self, eta: f64) -> Result<Self, SchedError> {
        self.set_eta(eta)?;
        Ok(self)
    }

    pub fn set_eta(&mut self, eta: f64) -> Result<(), SchedError> {
        if !(eta.is_finite() && eta >= 0.0) {
            return Err(SchedError::BadEta(eta));
        }
        self.eta = eta;
        Ok(())
    }

    pub fn eta(&self) -> f64 {
        self.eta
    }

    pub fn config(&self) -> &BaseConfig {
        &self.base
    }
}

impl<B: Backend> Scheduler<B> for Ddim {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }

    fn set_timesteps(&mut self, n: usize) -> Result<(), SchedError> {
        schedule::check_steps(n, self.base.num_train_timesteps)?;
        self.timesteps = schedule::integer_timesteps(&self.base, n);
        self.num_inference_steps = Some(n);
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(
        &mut self,
        sample: Tensor<B, 4>,
        _t: f64,
    ) -> Result<Tensor<B, 4>, SchedError> {
        Ok(sample)
    }

    fn step(
        &mut self,
        model_output: Tensor<B, 4>,
        t: f64,
        sample: Tensor<B, 4>,
        noise: Option<Tensor<B, 4>>,
    ) -> Result<StepOutput<B>, SchedError> {
        let n = self.num_inference_steps.ok_or(SchedError::NoSchedule)?;
        crate::check_same_shape("model_output", &model_output, &sample)?;
        if !self.timesteps.contains(&t) {
            return Err(SchedError::TimestepNotInSchedule { t });
        }
        let train = self.base.num_train_timesteps;
        let ti = schedule::train_index(t, train)?;
        // diffusers steps back by train // n whatever the spacing.
        let prev = ti as i64 - (train / n) as i64;
        let a_t = self.alphas_cumprod[ti] as f32;
        let a_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha_cumprod
        } as f32;

        let dtype = model_output.dtype();
        let (sample, model_output) = (crate::to_f32(sample), crate::to_f32(model_output));
        let (mut x0, eps) = x0_and_eps(self.base.prediction_type, model_output, &sample, a_t);
        if let Some(range) = self.clip {
            x0 = x0.clamp(-range as f32, range as f32);
        }
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let variance = (b_prev / b_t) * (1.0 - a_t / a_prev);
        let std_dev = self.eta as f32 * variance.sqrt();
        let direction = eps.mul_scalar((1.0 - a_prev - std_dev * std_dev).sqrt());
        let mut prev_sample = x0.clone().mul_scalar(a_prev.sqrt()) + direction;
        if self.eta > 0.0 {
            let noise = crate::step_noise(noise, &prev_sample, &mut self.generator)?;
            prev_sample = prev_sample + noise.mul_scalar(std_dev);
        }
        Ok(StepOutput {
            prev_sample: crate::to_dtype(prev_sample, dtype),
            pred_original_sample: Some(x0),
        })
    }

    fn add_noise(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        t: &[f64],
    ) -> Result<Tensor<B, 4>, SchedError> {
        alpha_add_noise(&self.alphas_cumprod, original, noise, t)
    }

    fn set_generator(&mut self, generator: Generator) {
        self.generator = generator;
    }
}
