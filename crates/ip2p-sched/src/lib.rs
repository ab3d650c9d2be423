//! Diffusion schedulers of ip2p, with the numbers of diffusers 0.42.
//!
//! A scheduler is built from a diffusers `scheduler_config.json` ([`SchedulerConfig`]), as the
//! folder's class or as another one chosen by name ([`SchedulerKind`]), exactly as diffusers'
//! `OtherClass.from_config(scheduler.config)` does. Tables (betas, `alphas_cumprod`, timesteps,
//! sigmas) are computed on the host; steps run on Burn tensors of any backend, in f32 (an f16
//! sample is upcast for the step and cast back, as diffusers does).
//!
//! ```ignore
//! let cfg = SchedulerConfig::from_file("model/scheduler/scheduler_config.json")?;
//! let mut sched = build::<B>(&cfg, None)?;           // the folder's own class
//! sched.set_timesteps(20)?;
//! let mut x = noise.mul_scalar(sched.init_noise_sigma());
//! for t in sched.timesteps().to_vec() {
//!     let input = sched.scale_model_input(x.clone(), t)?;
//!     let eps = unet(input, t);
//!     x = sched.step(eps, t, x, None)?.prev_sample;
//! }
//! ```

mod cephes;
pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
pub mod error;
pub mod euler;
pub mod euler_ancestral;
pub mod generator;
mod mt19937;
pub mod noise;
pub mod schedule;
pub mod splitmix;
pub mod torch_generator;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

pub use config::{PredictionType, SchedulerConfig, SchedulerKind, TimestepSpacing};
pub use ddim::Ddim;
pub use ddpm::Ddpm;
pub use dpm_solver::DpmSolverMultistep;
pub use error::SchedError;
pub use euler::Euler;
pub use euler_ancestral::EulerAncestral;
pub use generator::{Generator, RngKind};
pub use noise::NoiseRng;
pub use splitmix::SplitMix;
pub use torch_generator::{NormalKernel, TorchGenerator};

/// What one denoising step returns.
#[derive(Debug, Clone)]
pub struct StepOutput<B: Backend> {
    /// x_{t-1}, in the model output's dtype: the next loop's sample.
    pub prev_sample: Tensor<B, 4>,
    /// The x_0 estimate, where the scheduler makes one (previews, guidance); f32.
    pub pred_original_sample: Option<Tensor<B, 4>>,
}

/// The interface every scheduler offers, so a pipeline can swap them.
///
/// Timesteps are f64 because Euler's `linspace` timesteps are fractional; pass them to the UNet
/// as floats. The stateful schedulers (Euler's step index, DPM-Solver's history of model outputs)
/// expect the loop order `scale_model_input(x, t)`, `step(.., t, x, ..)` over `timesteps()`.
pub trait Scheduler<B: Backend>: Send {
    /// Which class this is.
    fn kind(&self) -> SchedulerKind;

    /// Make the schedule for `num_inference_steps` steps and reset the step state.
    ///
    /// Zero steps, or more steps than training timesteps, are errors.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedError>;

    /// The current schedule, first (noisiest) timestep first; empty before `set_timesteps`
    /// (DDPM starts with the full training schedule, as diffusers does).
    fn timesteps(&self) -> &[f64];

    /// The sigma table (`timesteps().len() + 1` values, f32-rounded) for sigma-based schedulers.
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }

    /// `alphas_cumprod` over the training timesteps (f32-rounded).
    fn alphas_cumprod(&self) -> &[f64];

    /// The standard deviation of the initial noise: multiply unit noise by it.
    fn init_noise_sigma(&self) -> f64;

    /// Scale the UNet input for timestep `t` (Euler-family: divide by sqrt(sigma² + 1)).
    fn scale_model_input(
        &mut self,
        sample: Tensor<B, 4>,
        t: f64,
    ) -> Result<Tensor<B, 4>, SchedError>;

    /// One step from `sample` at `t` to the previous timestep.
    ///
    /// `noise` is the standard normal noise of a stochastic step (Euler ancestral, DDPM, DDIM with
    /// eta > 0), so a test can pass the exact noise diffusers drew; when `None` it is drawn from
    /// the scheduler's [`Generator`] where diffusers' `step` draws it. Deterministic steps ignore it.
    fn step(
        &mut self,
        model_output: Tensor<B, 4>,
        t: f64,
        sample: Tensor<B, 4>,
        noise: Option<Tensor<B, 4>>,
    ) -> Result<StepOutput<B>, SchedError>;

    /// Noise `original` to timestep `t` (one per batch sample, or one for all).
    fn add_noise(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        t: &[f64],
    ) -> Result<Tensor<B, 4>, SchedError>;

    /// The generator stochastic steps draw from when `step` gets no noise (torch's, seeded 0,
    /// until set). The pipeline hands over its own after drawing the initial latents, so both
    /// come from one generator in diffusers' order.
    fn set_generator(&mut self, generator: Generator);

    /// Draw step noise from `torch.Generator("cpu").manual_seed(seed)`.
    fn set_noise_seed(&mut self, seed: u64) {
        self.set_generator(Generator::torch(seed));
    }
}

/// Build the scheduler the config names, or `kind` instead (the folder's keys, the new class's
/// defaults for the rest, as `Kind.from_config(config)` in diffusers).
pub fn build<B: Backend>(
    config: &SchedulerConfig,
    kind: Option<SchedulerKind>,
) -> Result<Box<dyn Scheduler<B>>, SchedError> {
    let kind = match kind {
        Some(k) => k,
        None => config.kind()?,
    };
    Ok(match kind {
        SchedulerKind::EulerAncestral => Box::new(EulerAncestral::new(config)?),
        SchedulerKind::Euler => Box::new(Euler::new(config)?),
        SchedulerKind::Ddim => Box::new(Ddim::new(config)?),
        SchedulerKind::Ddpm => Box::new(Ddpm::new(config)?),
        SchedulerKind::DpmSolverMultistep => Box::new(DpmSolverMultistep::<B>::new(config)?),
    })
}

/// The f32 working copy of a tensor (diffusers upcasts the sample in `step`).
pub(crate) fn to_f32<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    match x.dtype() {
        DType::F32 => x,
        _ => x.cast(DType::F32),
    }
}

/// Cast a result back to `dtype`.
pub(crate) fn to_dtype<B: Backend>(x: Tensor<B, 4>, dtype: DType) -> Tensor<B, 4> {
    if x.dtype() == dtype { x } else { x.cast(dtype) }
}

pub(crate) fn check_same_shape<B: Backend>(
    what: &'static str,
    x: &Tensor<B, 4>,
    reference: &Tensor<B, 4>,
) -> Result<(), SchedError> {
    let (found, expected) = (x.dims(), reference.dims());
    if found != expected {
        return Err(SchedError::Shape {
            what,
            expected: expected.to_vec(),
            found: found.to_vec(),
        });
    }
    Ok(())
}

/// The noise of a stochastic step: the caller's (checked and upcast) or the generator's.
pub(crate) fn step_noise<B: Backend>(
    noise: Option<Tensor<B, 4>>,
    like: &Tensor<B, 4>,
    generator: &mut Generator,
) -> Result<Tensor<B, 4>, SchedError> {
    match noise {
        Some(n) => {
            check_same_shape("noise", &n, like)?;
            Ok(to_f32(n))
        }
        None => generator.normal::<B>(like.dims(), &like.device()),
    }
}

/// Per-sample coefficients broadcast over [b, c, h, w].
pub(crate) fn per_sample<B: Backend>(values: &[f64], like: &Tensor<B, 4>) -> Tensor<B, 4> {
    let v: Vec<f32> = values.iter().map(|v| *v as f32).collect();
    let n = v.len();
    to_f32(Tensor::from_data(
        burn::tensor::TensorData::new(v, [n, 1, 1, 1]),
        &like.device(),
    ))
}

/// Expand `add_noise` timesteps to one per batch sample.
pub(crate) fn batch_timesteps(t: &[f64], batch: usize) -> Result<Vec<f64>, SchedError> {
    match t.len() {
        1 => Ok(vec![t[0]; batch]),
        n if n == batch => Ok(t.to_vec()),
        n => Err(SchedError::TimestepCount { count: n, batch }),
    }
}

/// The step index for `t`: the expected next one when `t` matches it, otherwise `t`'s position
/// in the schedule (diffusers' `_init_step_index`), or a typed error when `t` is not in it.
pub(crate) fn resolve_index(
    timesteps: &[f64],
    current: Option<usize>,
    t: f64,
) -> Result<usize, SchedError> {
    if timesteps.is_empty() {
        return Err(SchedError::NoSchedule);
    }
    match current {
        Some(i) if i < timesteps.len() && timesteps[i] == t => Ok(i),
        _ => schedule::index_for_timestep(timesteps, t),
    }
}
