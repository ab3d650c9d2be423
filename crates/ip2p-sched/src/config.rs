//! diffusers' `scheduler_config.json`, resolved per scheduler class.
//!
//! diffusers fills a key the file lacks from the defaults of the class being built, not of the
//! class that wrote the file (`DDIMScheduler.from_config(euler.config)` gets DDIM's `leading`
//! spacing when the file has no `timestep_spacing`). So the file is kept raw and resolved per
//! class. Keys a class does not know are ignored, as diffusers does; a value that changes
//! results and that we do not implement is a [`SchedError::Unsupported`], never a silent default.

use std::path::Path;

use serde::Deserialize;

use crate::error::SchedError;

/// Most training timesteps a config may name (each is a row of the noise tables).
pub const MAX_TRAIN_TIMESTEPS: usize = 1_000_000;

/// The scheduler classes ip2p implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    /// `EulerAncestralDiscreteScheduler`, InstructPix2Pix's own.
    EulerAncestral,
    /// `EulerDiscreteScheduler`.
    Euler,
    /// `DDIMScheduler`.
    Ddim,
    /// `DDPMScheduler` (stochastic sampling, and `add_noise` for training).
    Ddpm,
    /// `DPMSolverMultistepScheduler` with `algorithm_type` dpmsolver++ (DPM-Solver++ 2M by default).
    DpmSolverMultistep,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 5] = [
        SchedulerKind::EulerAncestral,
        SchedulerKind::Euler,
        SchedulerKind::Ddim,
        SchedulerKind::Ddpm,
        SchedulerKind::DpmSolverMultistep,
    ];

    /// The diffusers class name, as in `_class_name`.
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Ddpm => "DDPMScheduler",
            SchedulerKind::DpmSolverMultistep => "DPMSolverMultistepScheduler",
        }
    }

    /// The short name for command lines.
    pub fn short_name(self) -> &'static str {
        match self {
            SchedulerKind::EulerAncestral => "euler-ancestral",
            SchedulerKind::Euler => "euler",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Ddpm => "ddpm",
            SchedulerKind::DpmSolverMultistep => "dpm-solver++",
        }
    }

    /// Look a scheduler up by short name or diffusers class name (case-insensitive).
    pub fn from_name(name: &str) -> Result<Self, SchedError> {
        let lower = name.trim().to_ascii_lowercase();
        let alias = match lower.as_str() {
            "euler_a" | "euler-a" | "euler_ancestral" => Some(SchedulerKind::EulerAncestral),
            "dpm++" | "dpmsolver++" | "dpm-solver" | "dpm" | "dpm++2m" | "dpm++-2m" => {
                Some(SchedulerKind::DpmSolverMultistep)
            }
            _ => None,
        };
        alias
            .or_else(|| {
                Self::ALL.into_iter().find(|k| {
                    k.short_name() == lower || k.class_name().eq_ignore_ascii_case(name.trim())
                })
            })
            .ok_or_else(|| SchedError::UnknownClass(name.to_string()))
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = SchedError;
    fn from_str(s: &str) -> Result<Self, SchedError> {
        Self::from_name(s)
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.short_name())
    }
}

/// Every key of the five classes that ip2p reads; all optional, resolved per class.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<String>,
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<usize>,
    pub rescale_betas_zero_snr: Option<bool>,
    // DDIM / DDPM
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub set_alpha_to_one: Option<bool>,
    pub thresholding: Option<bool>,
    pub variance_type: Option<String>,
    // Euler / DPM sigmas
    pub interpolation_type: Option<String>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub use_dynamic_shifting: Option<bool>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub timestep_type: Option<String>,
    pub final_sigmas_type: Option<String>,
    // DPM-Solver
    pub solver_order: Option<usize>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    /// `null` (or `-Infinity` in the file) means no clipping.
    pub lambda_min_clipped: Option<f64>,
}

/// How the betas are made.
#[derive(Debug, Clone, PartialEq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredcosCapV2,
    /// `trained_betas`, given explicitly.
    Trained(Vec<f64>),
}

/// Where the inference timesteps sit in the training range (Table 2 of arXiv:2305.08891).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

/// The beta/timestep part shared by all classes, resolved with one class's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
}

/// A parsed `scheduler_config.json`, ready to build any of the classes.
#[derive(Debug, Clone, Default)]
pub struct SchedulerConfig {
    pub raw: RawConfig,
}

impl SchedulerConfig {
    /// Read a diffusers `scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, SchedError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ip2p_nn::LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text).map_err(|e| match e {
            SchedError::Parse(reason) => SchedError::Load(ip2p_nn::LoadError::Config {
                path: path.to_path_buf(),
                reason,
            }),
            other => other,
        })
    }

    /// Parse the text of a `scheduler_config.json`.
    ///
    /// Python's `json` writes `-Infinity` for DPM's default `lambda_min_clipped`; that token is
    /// not JSON, so it is read as `null` (no clipping).
    pub fn from_json_str(text: &str) -> Result<Self, SchedError> {
        let cleaned = text.replace("-Infinity", "null");
        let raw: RawConfig =
            serde_json::from_str(&cleaned).map_err(|e| SchedError::Parse(e.to_string()))?;
        Ok(Self { raw })
    }

    /// The class named by `_class_name`; a typed error for a class ip2p does not have.
    pub fn kind(&self) -> Result<SchedulerKind, SchedError> {
        match &self.raw.class_name {
            Some(name) => SchedulerKind::ALL
                .into_iter()
                .find(|k| k.class_name() == name)
                .ok_or_else(|| SchedError::UnknownClass(name.clone())),
            None => Err(SchedError::Parse("`_class_name` is missing".into())),
        }
    }

    /// Resolve the shared keys with the defaults of `kind`.
    pub fn base(&self, kind: SchedulerKind) -> Result<BaseConfig, SchedError> {
        let class = kind.class_name();
        let r = &self.raw;
        let num_train_timesteps = r.num_train_timesteps.unwrap_or(1000);
        // The tables are num_train_timesteps long: bounded, so a hostile config cannot ask for
        // terabytes (diffusers' models use 1000).
        if !(2..=MAX_TRAIN_TIMESTEPS).contains(&num_train_timesteps) {
            return Err(SchedError::InvalidConfig {
                class,
                reason: format!(
                    "num_train_timesteps must be between 2 and {MAX_TRAIN_TIMESTEPS}, got {num_train_timesteps}"
                ),
            });
        }
        let beta_schedule = match &r.trained_betas {
            Some(b) => {
                if b.len() != num_train_timesteps
                    || b.iter().any(|v| !(v.is_finite() && *v > 0.0 && *v < 1.0))
                {
                    return Err(SchedError::InvalidConfig {
                        class,
                        reason: format!(
                            "trained_betas must hold {num_train_timesteps} values in (0, 1), got {} values",
                            b.len()
                        ),
                    });
                }
                BetaSchedule::Trained(b.clone())
            }
            None => match r.beta_schedule.as_deref().unwrap_or("linear") {
                "linear" => BetaSchedule::Linear,
                "scaled_linear" => BetaSchedule::ScaledLinear,
                "squaredcos_cap_v2" => BetaSchedule::SquaredcosCapV2,
                other => {
                    return Err(unsupported(
                        class,
                        "beta_schedule",
                        other,
                        "linear, scaled_linear, squaredcos_cap_v2",
                    ));
                }
            },
        };
        let prediction_type = match r.prediction_type.as_deref().unwrap_or("epsilon") {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            "sample" if kind != SchedulerKind::EulerAncestral => PredictionType::Sample,
            other => {
                let supported = if kind == SchedulerKind::EulerAncestral {
                    "epsilon, v_prediction (diffusers has no `sample` for this class)"
                } else {
                    "epsilon, v_prediction, sample"
                };
                return Err(unsupported(class, "prediction_type", other, supported));
            }
        };
        let default_spacing = match kind {
            SchedulerKind::Ddim | SchedulerKind::Ddpm => "leading",
            _ => "linspace",
        };
        let timestep_spacing = match r.timestep_spacing.as_deref().unwrap_or(default_spacing) {
            "linspace" => TimestepSpacing::Linspace,
            "leading" => TimestepSpacing::Leading,
            "trailing" => TimestepSpacing::Trailing,
            other => {
                return Err(unsupported(
                    class,
                    "timestep_spacing",
                    other,
                    "linspace, leading, trailing",
                ));
            }
        };
        if r.rescale_betas_zero_snr == Some(true) {
            return Err(unsupported(
                class,
                "rescale_betas_zero_snr",
                "true",
                "false",
            ));
        }
        let beta_start = r.beta_start.unwrap_or(0.0001);
        let beta_end = r.beta_end.unwrap_or(0.02);
        if !(beta_start.is_finite() && beta_end.is_finite() && beta_start >= 0.0 && beta_end < 1.0)
        {
            return Err(SchedError::InvalidConfig {
                class,
                reason: format!(
                    "beta_start {beta_start} and beta_end {beta_end} must lie in [0, 1)"
                ),
            });
        }
        // A timestep at or past num_train_timesteps has no noise level (diffusers would fail
        // indexing its tables mid-run); refused here, before any step.
        let steps_offset = r.steps_offset.unwrap_or(0);
        if steps_offset >= num_train_timesteps {
            return Err(SchedError::InvalidConfig {
                class,
                reason: format!(
                    "steps_offset {steps_offset} must be below num_train_timesteps {num_train_timesteps}"
                ),
            });
        }
        Ok(BaseConfig {
            num_train_timesteps,
            beta_start,
            beta_end,
            beta_schedule,
            prediction_type,
            timestep_spacing,
            steps_offset,
        })
    }

    /// `thresholding` (dynamic thresholding) is not implemented: refuse it where the class has it.
    pub(crate) fn no_thresholding(&self, kind: SchedulerKind) -> Result<(), SchedError> {
        if self.raw.thresholding == Some(true) {
            return Err(unsupported(
                kind.class_name(),
                "thresholding",
                "true",
                "false",
            ));
        }
        Ok(())
    }
}

pub(crate) fn unsupported(
    class: &'static str,
    field: &'static str,
    value: &str,
    supported: &'static str,
) -> SchedError {
    SchedError::Unsupported {
        class,
        field,
        value: format!("{value:?}"),
        supported,
    }
}

/// Which sigma spacing replaces the interpolated one (Euler, DPM-Solver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigmaSpacing {
    Interpolated,
    Karras,
    Exponential,
}

impl SchedulerConfig {
    /// `use_karras_sigmas` / `use_exponential_sigmas` / `use_beta_sigmas` (Euler and DPM).
    pub(crate) fn sigma_spacing(&self, kind: SchedulerKind) -> Result<SigmaSpacing, SchedError> {
        let class = kind.class_name();
        let r = &self.raw;
        let karras = r.use_karras_sigmas.unwrap_or(false);
        let exponential = r.use_exponential_sigmas.unwrap_or(false);
        let beta = r.use_beta_sigmas.unwrap_or(false);
        if [karras, exponential, beta].iter().filter(|b| **b).count() > 1 {
            return Err(SchedError::InvalidConfig {
                class,
                reason: "only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set".into(),
            });
        }
        if beta {
            return Err(unsupported(class, "use_beta_sigmas", "true", "false"));
        }
        Ok(if karras {
            SigmaSpacing::Karras
        } else if exponential {
            SigmaSpacing::Exponential
        } else {
            SigmaSpacing::Interpolated
        })
    }

    /// `final_sigmas_type`: true for `sigma_min`, false for `zero`.
    pub(crate) fn final_sigma_min(&self, kind: SchedulerKind) -> Result<bool, SchedError> {
        match self.raw.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => Ok(false),
            "sigma_min" => Ok(true),
            other => Err(unsupported(
                kind.class_name(),
                "final_sigmas_type",
                other,
                "zero, sigma_min",
            )),
        }
    }
}
