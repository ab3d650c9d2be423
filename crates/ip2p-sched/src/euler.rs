//! `EulerDiscreteScheduler`: deterministic Euler steps in sigma space (Karras et al. 2022, Alg. 2
//! with no churn), with optional Karras or exponential sigma spacing.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::config::{BaseConfig, SchedulerConfig, SchedulerKind, SigmaSpacing, unsupported};
use crate::euler_ancestral::{euler_init_noise_sigma, euler_scale, euler_x0, sigma_add_noise};
use crate::schedule::{self, f32r};
use crate::{PredictionType, SchedError, Scheduler, StepOutput};

/// Euler sampling (diffusers `EulerDiscreteScheduler`, `s_churn` 0).
#[derive(Debug, Clone)]
pub struct Euler {
    base: BaseConfig,
    spacing: SigmaSpacing,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    final_sigma_min: bool,
    alphas_cumprod: Vec<f64>,
    train_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    step_index: Option<usize>,
}

impl Euler {
    pub fn new(config: &SchedulerConfig) -> Result<Self, SchedError> {
        let kind = SchedulerKind::Euler;
        let class = kind.class_name();
        let base = config.base(kind)?;
        let r = &config.raw;
        match r.interpolation_type.as_deref().unwrap_or("linear") {
            "linear" => {}
            other => return Err(unsupported(class, "interpolation_type", other, "linear")),
        }
        match r.timestep_type.as_deref().unwrap_or("discrete") {
            "discrete" => {}
            // Only continuous v-prediction changes anything in diffusers.
            "continuous" if base.prediction_type != PredictionType::VPrediction => {}
            other => return Err(unsupported(class, "timestep_type", other, "discrete")),
        }
        let alphas_cumprod = schedule::alphas_cumprod(&schedule::betas(&base));
        let train_sigmas = schedule::train_sigmas(&alphas_cumprod);
        Ok(Self {
            base,
            spacing: config.sigma_spacing(kind)?,
            sigma_min: r.sigma_min,
            sigma_max: r.sigma_max,
            final_sigma_min: config.final_sigma_min(kind)?,
            alphas_cumprod,
            train_sigmas,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            step_index: None,
        })
    }

    pub fn config(&self) -> &BaseConfig {
        &self.base
    }
}

impl<B: Backend> Scheduler<B> for Euler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Euler
    }

    fn set_timesteps(&mut self, n: usize) -> Result<(), SchedError> {
        schedule::check_steps(n, self.base.num_train_timesteps)?;
        let timesteps = schedule::euler_timesteps(&self.base, n);
        let interpolated: Vec<f64> = timesteps
            .iter()
            .map(|t| schedule::interp(*t, &self.train_sigmas))
            .collect();
        let log_sigmas = schedule::log_sigmas(&self.train_sigmas);
        let sigma_min = self.sigma_min.unwrap_or(interpolated[n - 1]);
        let sigma_max = self.sigma_max.unwrap_or(interpolated[0]);
        let (timesteps, mut sigmas) = match self.spacing {
            SigmaSpacing::Interpolated => (timesteps, interpolated),
            SigmaSpacing::Karras | SigmaSpacing::Exponential => {
                let sigmas = if self.spacing == SigmaSpacing::Karras {
                    schedule::karras(sigma_min, sigma_max, n)
                } else {
                    schedule::exponential(sigma_min, sigma_max, n)
                };
                let ts = sigmas
                    .iter()
                    .map(|s| f32r(schedule::sigma_to_t(*s, &log_sigmas)))
                    .collect();
                (ts, sigmas)
            }
        };
        sigmas.push(if self.final_sigma_min {
            self.train_sigmas[0]
        } else {
            0.0
        });
        self.sigmas = sigmas.into_iter().map(f32r).collect();
        self.timesteps = timesteps;
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
        _noise: Option<Tensor<B, 4>>,
    ) -> Result<StepOutput<B>, SchedError> {
        crate::check_same_shape("model_output", &model_output, &sample)?;
        let i = crate::resolve_index(&self.timesteps, self.step_index, t)?;
        let dtype = model_output.dtype();
        let (sample, model_output) = (crate::to_f32(sample), crate::to_f32(model_output));
        let (sigma, sigma_next) = (self.sigmas[i] as f32, self.sigmas[i + 1] as f32);
        let x0 = euler_x0(
            self.base.prediction_type,
            model_output,
            &sample,
            sigma as f64,
        );
        let derivative = (sample.clone() - x0.clone()).div_scalar(sigma);
        let prev = sample + derivative.mul_scalar(sigma_next - sigma);
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

    fn set_generator(&mut self, _generator: crate::Generator) {}
}
