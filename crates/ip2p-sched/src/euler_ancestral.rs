//! `EulerAncestralDiscreteScheduler`: InstructPix2Pix's own scheduler.
//!
//! An Euler step down to `sigma_down`, then fresh noise up to `sigma_to` (k-diffusion's
//! `sample_euler_ancestral`, eta 1). Stochastic: each step takes one noise tensor.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::config::{BaseConfig, PredictionType, SchedulerConfig, SchedulerKind, TimestepSpacing};
use crate::schedule::{self, f32r};
use crate::{Generator, SchedError, Scheduler, StepOutput};

/// Euler ancestral sampling (diffusers `EulerAncestralDiscreteScheduler`).
#[derive(Debug, Clone)]
pub struct EulerAncestral {
    base: BaseConfig,
    alphas_cumprod: Vec<f64>,
    train_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    step_index: Option<usize>,
    generator: Generator,
}

impl EulerAncestral {
    pub fn new(config: &SchedulerConfig) -> Result<Self, SchedError> {
        let base = config.base(SchedulerKind::EulerAncestral)?;
        let alphas_cumprod = schedule::alphas_cumprod(&schedule::betas(&base));
        let train_sigmas = schedule::train_sigmas(&alphas_cumprod);
        Ok(Self {
            base,
            alphas_cumprod,
            train_sigmas,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            step_index: None,
            generator: Generator::default(),
        })
    }

    pub fn config(&self) -> &BaseConfig {
        &self.base
    }
}

/// `sample / sqrt(sigma² + 1)`, the Euler-family input scaling (f32 scalar as in diffusers).
pub(crate) fn euler_scale<B: Backend>(sample: Tensor<B, 4>, sigma: f64) -> Tensor<B, 4> {
    let s = sigma as f32;
    sample.div_scalar((s * s + 1.0).sqrt())
}

/// The x_0 estimate of the Euler family for epsilon and v prediction, in f32.
pub(crate) fn euler_x0<B: Backend>(
    prediction: PredictionType,
    model_output: Tensor<B, 4>,
    sample: &Tensor<B, 4>,
    sigma: f64,
) -> Tensor<B, 4> {
    let s = sigma as f32;
    match prediction {
        PredictionType::Epsilon => sample.clone() - model_output.mul_scalar(s),
        PredictionType::VPrediction => {
            model_output.mul_scalar(-s / (s * s + 1.0).sqrt())
                + sample.clone().div_scalar(s * s + 1.0)
        }
        PredictionType::Sample => model_output,
    }
}

/// Euler-family `init_noise_sigma`: the largest sigma, or sqrt(max² + 1) for `leading`.
pub(crate) fn euler_init_noise_sigma(spacing: TimestepSpacing, sigmas: &[f64]) -> f64 {
    let max = sigmas.iter().cloned().fold(0.0f64, f64::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => {
            let m = max as f32;
            (m * m + 1.0).sqrt() as f64
        }
    }
}

/// Euler-family `add_noise`: `original + noise * sigma(t)`.
pub(crate) fn sigma_add_noise<B: Backend>(
    timesteps: &[f64],
    sigmas: &[f64],
    original: Tensor<B, 4>,
    noise: Tensor<B, 4>,
    t: &[f64],
) -> Result<Tensor<B, 4>, SchedError> {
    if timesteps.is_empty() {
        return Err(SchedError::NoSchedule);
    }
    crate::check_same_shape("noise", &noise, &original)?;
    let ts = crate::batch_timesteps(t, original.dims()[0])?;
    let s = ts
        .iter()
        .map(|t| schedule::index_for_timestep(timesteps, *t).map(|i| sigmas[i]))
        .collect::<Result<Vec<_>, _>>()?;
    let dtype = original.dtype();
    let sigma = crate::per_sample(&s, &original);
    let out = crate::to_f32(original) + crate::to_f32(noise) * sigma;
    Ok(crate::to_dtype(out, dtype))
}

impl<B: Backend> Scheduler<B> for EulerAncestral {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerAncestral
    }

    fn set_timesteps(&mut self, n: usize) -> Result<(), SchedError> {
        schedule::check_steps(n, self.base.num_train_timesteps)?;
        self.timesteps = schedule::euler_timesteps(&self.base, n);
        self.sigmas = self
            .timesteps
            .iter()
            .map(|t| f32r(schedule::interp(*t, &self.train_sigmas)))
            .chain(std::iter::once(0.0))
            .collect();
        self.step_index = None;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    fn init_noise_sigma(&self) -> f64 {
        let sigmas = if self.sigmas.is_empty() {
            &self.train_sigmas
        } else {
            &self.sigmas
        };
        euler_init_noise_sigma(self.base.timestep_spacing, sigmas)
    }

    fn scale_model_input(
        &mut self,
        sample: Tensor<B, 4>,
        t: f64,
    ) -> Result<Tensor<B, 4>, SchedError> {
        let i = crate::resolve_index(&self.timesteps, self.step_index, t)?;
        self.step_index = Some(i);
        Ok(euler_scale(sample, self.sigmas[i]))
    }

    fn step(
        &mut self,
        model_output: Tensor<B, 4>,
        t: f64,
        sample: Tensor<B, 4>,
        noise: Option<Tensor<B, 4>>,
    ) -> Result<StepOutput<B>, SchedError> {
        crate::check_same_shape("model_output", &model_output, &sample)?;
        let i = crate::resolve_index(&self.timesteps, self.step_index, t)?;
        let dtype = model_output.dtype();
        let (sample, model_output) = (crate::to_f32(sample), crate::to_f32(model_output));
        let noise = crate::step_noise(noise, &model_output, &mut self.generator)?;

        let (sigma, sigma_to) = (self.sigmas[i] as f32, self.sigmas[i + 1] as f32);
        let x0 = euler_x0(
            self.base.prediction_type,
            model_output,
            &sample,
            sigma as f64,
        );
        let sigma_up =
            (sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma)).sqrt();
        // Clamped at 0: when sigma_from dwarfs sigma_to (squaredcos_cap_v2's first sigma is ~2e4)
        // f32 rounding makes the difference slightly negative and diffusers returns NaN.
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).max(0.0).sqrt();
        let derivative = (sample.clone() - x0.clone()).div_scalar(sigma);
        let prev = sample + derivative.mul_scalar(sigma_down - sigma) + noise.mul_scalar(sigma_up);

        self.step_index = Some(i + 1);
        Ok(StepOutput {
            prev_sample: crate::to_dtype(prev, dtype),
            pred_original_sample: Some(x0),
        })
    }

    fn add_noise(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        t: &[f64],
    ) -> Result<Tensor<B, 4>, SchedError> {
        sigma_add_noise(&self.timesteps, &self.sigmas, original, noise, t)
    }

    fn set_generator(&mut self, generator: Generator) {
        self.generator = generator;
    }
}
