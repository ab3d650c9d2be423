//! `DDPMScheduler` (Ho et al. 2020): ancestral sampling, and `add_noise` for training.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::config::{BaseConfig, SchedulerConfig, SchedulerKind, unsupported};
use crate::ddim::{alpha_add_noise, x0_and_eps};
use crate::schedule;
use crate::{Generator, SchedError, Scheduler, StepOutput};

/// How the step's noise is scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarianceType {
    /// The posterior variance beta~_t (the DDPM paper's sigma² = beta~).
    FixedSmall,
    /// The same, through log/exp (as diffusers computes it).
    FixedSmallLog,
    /// beta_t (sigma² = beta).
    FixedLarge,
}

/// DDPM sampling (diffusers `DDPMScheduler`).
#[derive(Debug, Clone)]
pub struct Ddpm {
    base: BaseConfig,
    variance_type: VarianceType,
    clip: Option<f64>,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<f64>,
    /// None: the full training schedule, stepping from t to t - 1 (diffusers before set_timesteps).
    num_inference_steps: Option<usize>,
    generator: Generator,
}

impl Ddpm {
    pub fn new(config: &SchedulerConfig) -> Result<Self, SchedError> {
        let kind = SchedulerKind::Ddpm;
        let base = config.base(kind)?;
        config.no_thresholding(kind)?;
        let r = &config.raw;
        let variance_type = match r.variance_type.as_deref().unwrap_or("fixed_small") {
            "fixed_small" => VarianceType::FixedSmall,
            "fixed_small_log" => VarianceType::FixedSmallLog,
            "fixed_large" => VarianceType::FixedLarge,
            other => {
                return Err(unsupported(
                    kind.class_name(),
                    "variance_type",
                    other,
                    "fixed_small, fixed_small_log, fixed_large",
                ));
            }
        };
        let alphas_cumprod = schedule::alphas_cumprod(&schedule::betas(&base));
        let timesteps = (0..base.num_train_timesteps)
            .rev()
            .map(|t| t as f64)
            .collect();
        Ok(Self {
            clip: r
                .clip_sample
                .unwrap_or(true)
                .then(|| r.clip_sample_range.unwrap_or(1.0)),
            base,
            variance_type,
            alphas_cumprod,
            timesteps,
            num_inference_steps: None,
            generator: Generator::default(),
        })
    }

    pub fn config(&self) -> &BaseConfig {
        &self.base
    }

    fn previous_timestep(&self, t: f64) -> Result<i64, SchedError> {
        let ti = schedule::train_index(t, self.base.num_train_timesteps)?;
        if self.num_inference_steps.is_none() {
            return Ok(ti as i64 - 1);
        }
        let i = self
            .timesteps
            .iter()
            .position(|v| *v == t)
            .ok_or(SchedError::TimestepNotInSchedule { t })?;
        Ok(self.timesteps.get(i + 1).map_or(-1, |v| *v as i64))
    }
}

impl<B: Backend> Scheduler<B> for Ddpm {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddpm
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
        crate::check_same_shape("model_output", &model_output, &sample)?;
        let prev_t = self.previous_timestep(t)?;
        let ti = t as usize;
        let a_t = self.alphas_cumprod[ti] as f32;
        let a_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize] as f32
        } else {
            1.0
        };
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;

        let dtype = model_output.dtype();
        let (sample, model_output) = (crate::to_f32(sample), crate::to_f32(model_output));
        let (mut x0, _) = x0_and_eps(self.base.prediction_type, model_output, &sample, a_t);
        if let Some(range) = self.clip {
            x0 = x0.clamp(-range as f32, range as f32);
        }
        let x0_coeff = a_prev.sqrt() * cur_beta / b_t;
        let sample_coeff = cur_alpha.sqrt() * b_prev / b_t;
        let mut prev = x0.clone().mul_scalar(x0_coeff) + sample.mul_scalar(sample_coeff);
        if ti > 0 {
            let variance = ((1.0 - a_prev) / (1.0 - a_t) * cur_beta).max(1e-20);
            let std_dev = match self.variance_type {
                VarianceType::FixedSmall => variance.sqrt(),
                VarianceType::FixedSmallLog => (0.5 * variance.ln()).exp(),
                VarianceType::FixedLarge => cur_beta.sqrt(),
            };
            let noise = crate::step_noise(noise, &prev, &mut self.generator)?;
            prev = prev + noise.mul_scalar(std_dev);
        }
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
        alpha_add_noise(&self.alphas_cumprod, original, noise, t)
    }

    fn set_generator(&mut self, generator: Generator) {
        self.generator = generator;
    }
}
