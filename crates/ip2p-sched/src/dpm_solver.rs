//! `DPMSolverMultistepScheduler` with `algorithm_type` dpmsolver++ (Lu et al. 2022): multistep
//! solver on the data prediction, order 2 ("DPM-Solver++ 2M") by default, the usual choice for
//! 20-step runs. Deterministic; keeps the last `solver_order` x_0 estimates between steps.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::config::{
    BaseConfig, BetaSchedule, SchedulerConfig, SchedulerKind, SigmaSpacing, unsupported,
};
use crate::schedule::{self, f32r};
use crate::{PredictionType, SchedError, Scheduler, StepOutput};

/// The second-order update's form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverType {
    Midpoint,
    Heun,
}

/// DPM-Solver++ multistep (diffusers `DPMSolverMultistepScheduler`).
#[derive(Debug, Clone)]
pub struct DpmSolverMultistep<B: Backend> {
    base: BaseConfig,
    solver_order: usize,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_min: bool,
    spacing: SigmaSpacing,
    lambda_min_clipped: f64,
    alphas_cumprod: Vec<f64>,
    train_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    step_index: Option<usize>,
    /// The last `solver_order` converted model outputs (x_0 estimates), oldest first.
    model_outputs: Vec<Option<Tensor<B, 4>>>,
    lower_order_nums: usize,
}

/// alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t) of a sigma, in f32 as diffusers.
fn alpha_sigma_lambda(sigma: f64) -> (f32, f32, f32) {
    let s = sigma as f32;
    let alpha = 1.0 / (s * s + 1.0).sqrt();
    let sigma_t = s * alpha;
    (alpha, sigma_t, alpha.ln() - sigma_t.ln())
}

impl<B: Backend> DpmSolverMultistep<B> {
    pub fn new(config: &SchedulerConfig) -> Result<Self, SchedError> {
        let kind = SchedulerKind::DpmSolverMultistep;
        let class = kind.class_name();
        let base = config.base(kind)?;
        config.no_thresholding(kind)?;
        let r = &config.raw;
        match r.algorithm_type.as_deref().unwrap_or("dpmsolver++") {
            // diffusers maps "deis" to dpmsolver++.
            "dpmsolver++" | "deis" => {}
            other => return Err(unsupported(class, "algorithm_type", other, "dpmsolver++")),
        }
        let solver_type = match r.solver_type.as_deref().unwrap_or("midpoint") {
            // diffusers maps the UniPC/DEIS names to midpoint.
            "midpoint" | "logrho" | "bh1" | "bh2" => SolverType::Midpoint,
            "heun" => SolverType::Heun,
            other => return Err(unsupported(class, "solver_type", other, "midpoint, heun")),
        };
        let solver_order = r.solver_order.unwrap_or(2);
        if !(1..=3).contains(&solver_order) {
            return Err(unsupported(
                class,
                "solver_order",
                &solver_order.to_string(),
                "1, 2, 3",
            ));
        }
        if let Some(v) = &r.variance_type {
            return Err(unsupported(class, "variance_type", v, "null"));
        }
        for (field, value) in [
            ("use_lu_lambdas", r.use_lu_lambdas),
            ("use_flow_sigmas", r.use_flow_sigmas),
            ("use_dynamic_shifting", r.use_dynamic_shifting),
        ] {
            if value == Some(true) {
                return Err(unsupported(class, field, "true", "false"));
            }
        }
        let alphas_cumprod = schedule::alphas_cumprod(&schedule::betas(&base));
        let train_sigmas = schedule::train_sigmas(&alphas_cumprod);
        Ok(Self {
            solver_order,
            solver_type,
            lower_order_final: r.lower_order_final.unwrap_or(true),
            euler_at_final: r.euler_at_final.unwrap_or(false),
            final_sigma_min: config.final_sigma_min(kind)?,
            spacing: config.sigma_spacing(kind)?,
            lambda_min_clipped: r.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY),
            base,
            alphas_cumprod,
            train_sigmas,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            step_index: None,
            model_outputs: vec![None; solver_order],
            lower_order_nums: 0,
        })
    }

    pub fn config(&self) -> &BaseConfig {
        &self.base
    }

    /// The last training timestep kept by `lambda_min_clipped` (all of them by default).
    fn last_timestep(&self) -> usize {
        let clipped = self
            .alphas_cumprod
            .iter()
            .map(|a| {
                let a = *a as f32;
                a.sqrt().ln() - (1.0 - a).sqrt().ln()
            })
            .filter(|l| (*l as f64) < self.lambda_min_clipped)
            .count();
        self.base.num_train_timesteps - clipped
    }

    /// The x_0 estimate at step `i` (dpmsolver++ works on data predictions).
    fn convert(&self, model_output: Tensor<B, 4>, sample: &Tensor<B, 4>, i: usize) -> Tensor<B, 4> {
        let (alpha, sigma, _) = alpha_sigma_lambda(self.sigmas[i]);
        match self.base.prediction_type {
            PredictionType::Epsilon => {
                (sample.clone() - model_output.mul_scalar(sigma)).div_scalar(alpha)
            }
            PredictionType::Sample => model_output,
            PredictionType::VPrediction => {
                sample.clone().mul_scalar(alpha) - model_output.mul_scalar(sigma)
            }
        }
    }

    fn history(&self, back: usize) -> Tensor<B, 4> {
        let n = self.model_outputs.len();
        self.model_outputs[n - 1 - back]
            .clone()
            .expect("the order logic only reaches back to stored outputs")
    }

    fn first_order(&self, i: usize, sample: Tensor<B, 4>) -> Tensor<B, 4> {
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(self.sigmas[i + 1]);
        let (_, sigma_s, lambda_s) = alpha_sigma_lambda(self.sigmas[i]);
        let h = lambda_t - lambda_s;
        sample.mul_scalar(sigma_t / sigma_s)
            - self.history(0).mul_scalar(alpha_t * ((-h).exp() - 1.0))
    }

    fn second_order(&self, i: usize, sample: Tensor<B, 4>) -> Tensor<B, 4> {
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(self.sigmas[i + 1]);
        let (_, sigma_s0, lambda_s0) = alpha_sigma_lambda(self.sigmas[i]);
        let (_, _, lambda_s1) = alpha_sigma_lambda(self.sigmas[i - 1]);
        let (m0, m1) = (self.history(0), self.history(1));
        let (h, h0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h0 / h;
        let d1 = (m0.clone() - m1).mul_scalar(1.0 / r0);
        let em1 = (-h).exp() - 1.0;
        let base = sample.mul_scalar(sigma_t / sigma_s0) - m0.mul_scalar(alpha_t * em1);
        match self.solver_type {
            SolverType::Midpoint => base - d1.mul_scalar(0.5 * (alpha_t * em1)),
            SolverType::Heun => base + d1.mul_scalar(alpha_t * (em1 / h + 1.0)),
        }
    }

    fn third_order(&self, i: usize, sample: Tensor<B, 4>) -> Tensor<B, 4> {
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(self.sigmas[i + 1]);
        let (_, sigma_s0, lambda_s0) = alpha_sigma_lambda(self.sigmas[i]);
        let (_, _, lambda_s1) = alpha_sigma_lambda(self.sigmas[i - 1]);
        let (_, _, lambda_s2) = alpha_sigma_lambda(self.sigmas[i - 2]);
        let (m0, m1, m2) = (self.history(0), self.history(1), self.history(2));
        let (h, h0, h1) = (
            lambda_t - lambda_s0,
            lambda_s0 - lambda_s1,
            lambda_s1 - lambda_s2,
        );
        let (r0, r1) = (h0 / h, h1 / h);
        let d1_0 = (m0.clone() - m1.clone()).mul_scalar(1.0 / r0);
        let d1_1 = (m1 - m2).mul_scalar(1.0 / r1);
        let d1 = d1_0.clone() + (d1_0.clone() - d1_1.clone()).mul_scalar(r0 / (r0 + r1));
        let d2 = (d1_0 - d1_1).mul_scalar(1.0 / (r0 + r1));
        let em1 = (-h).exp() - 1.0;
        sample.mul_scalar(sigma_t / sigma_s0) - m0.mul_scalar(alpha_t * em1)
            + d1.mul_scalar(alpha_t * (em1 / h + 1.0))
            - d2.mul_scalar(alpha_t * ((em1 + h) / (h * h) - 0.5))
    }
}

impl<B: Backend> Scheduler<B> for DpmSolverMultistep<B> {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::DpmSolverMultistep
    }

    fn set_timesteps(&mut self, n: usize) -> Result<(), SchedError> {
        schedule::check_steps(n, self.base.num_train_timesteps)?;
        let last = self.last_timestep();
        let log_sigmas = schedule::log_sigmas(&self.train_sigmas);
        let (sigma_min, sigma_max) = (
            self.train_sigmas[0],
            self.train_sigmas[self.train_sigmas.len() - 1],
        );
        let (timesteps, mut sigmas) = match self.spacing {
            SigmaSpacing::Interpolated => {
                let ts = schedule::dpm_timesteps(&self.base, n, last);
                let sigmas = ts
                    .iter()
                    .map(|t| schedule::interp(*t, &self.train_sigmas))
                    .collect();
                (ts, sigmas)
            }
            SigmaSpacing::Karras | SigmaSpacing::Exponential => {
                let karras = self.spacing == SigmaSpacing::Karras;
                let sigmas = if karras {
                    schedule::karras(sigma_min, sigma_max, n)
                } else {
                    schedule::exponential(sigma_min, sigma_max, n)
                };
                // Karras timesteps are rounded (but for squaredcos_cap_v2); all are then cast to int64.
                let round = karras && self.base.beta_schedule != BetaSchedule::SquaredcosCapV2;
                let ts = sigmas
                    .iter()
                    .map(|s| {
                        let t = schedule::sigma_to_t(*s, &log_sigmas);
                        if round {
                            t.round_ties_even()
                        } else {
                            t.trunc()
                        }
                    })
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
        self.model_outputs = vec![None; self.solver_order];
        self.lower_order_nums = 0;
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
        1.0
    }

    /// The identity, but `t` must be in the schedule.
    fn scale_model_input(
        &mut self,
        sample: Tensor<B, 4>,
        t: f64,
    ) -> Result<Tensor<B, 4>, SchedError> {
        crate::resolve_index(&self.timesteps, self.step_index, t)?;
        Ok(sample)
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
        if self.step_index.is_some_and(|expected| expected != i) {
            // The caller jumped in the schedule: the stored outputs belong to other steps.
            self.model_outputs = vec![None; self.solver_order];
            self.lower_order_nums = 0;
        }
        let n = self.timesteps.len();
        let short = self.lower_order_final && n < 15;
        let lower_order_final =
            i == n - 1 && (self.euler_at_final || short || !self.final_sigma_min);
        let lower_order_second = n >= 2 && i == n - 2 && short;

        let dtype = model_output.dtype();
        let (sample, model_output) = (crate::to_f32(sample), crate::to_f32(model_output));
        let x0 = self.convert(model_output, &sample, i);
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(x0));

        let prev = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(i, sample)
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(i, sample)
        } else {
            self.third_order(i, sample)
        };
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.solver_order);
        self.step_index = Some(i + 1);
        Ok(StepOutput {
            prev_sample: crate::to_dtype(prev, dtype),
            pred_original_sample: None,
        })
    }

    fn add_noise(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        t: &[f64],
    ) -> Result<Tensor<B, 4>, SchedError> {
        if self.timesteps.is_empty() {
            return Err(SchedError::NoSchedule);
        }
        crate::check_same_shape("noise", &noise, &original)?;
        let ts = crate::batch_timesteps(t, original.dims()[0])?;
        let (mut a, mut s) = (Vec::new(), Vec::new());
        for t in ts {
            let (alpha, sigma, _) =
                alpha_sigma_lambda(self.sigmas[schedule::index_for_timestep(&self.timesteps, t)?]);
            a.push(alpha as f64);
            s.push(sigma as f64);
        }
        let dtype = original.dtype();
        let (a, s) = (
            crate::per_sample(&a, &original),
            crate::per_sample(&s, &original),
        );
        Ok(crate::to_dtype(
            crate::to_f32(original) * a + crate::to_f32(noise) * s,
            dtype,
        ))
    }

    fn set_generator(&mut self, _generator: crate::Generator) {}
}
