//! Typed errors of the schedulers: bad configs and bad calls.

use ip2p_nn::LoadError;

/// Why a scheduler could not be built or could not take a step.
#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    /// The config file could not be read or parsed (names the file and the field).
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("scheduler config: {0}")]
    Parse(String),
    #[error(
        "unknown scheduler `{0}` (known: EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, DDIMScheduler, \
         DDPMScheduler, DPMSolverMultistepScheduler, or euler-ancestral, euler, ddim, ddpm, dpm-solver++)"
    )]
    UnknownClass(String),
    /// A config value that changes results and that ip2p does not implement.
    #[error("{class}: `{field}` = {value} is not supported ({supported})")]
    Unsupported {
        class: &'static str,
        field: &'static str,
        value: String,
        supported: &'static str,
    },
    /// Values that are each fine but contradict one another, or are out of range.
    #[error("{class}: invalid config: {reason}")]
    InvalidConfig { class: &'static str, reason: String },
    #[error("the number of inference steps must be at least 1")]
    ZeroSteps,
    #[error("{steps} inference steps exceed the {train} training timesteps")]
    TooManySteps { steps: usize, train: usize },
    #[error("call set_timesteps before using the schedule")]
    NoSchedule,
    #[error("timestep {t} is not in the current schedule")]
    TimestepNotInSchedule { t: f64 },
    #[error("timestep {t} is not an integer in 0..{train}")]
    TimestepOutOfRange { t: f64, train: usize },
    #[error("{what} has shape {found:?}, expected {expected:?}")]
    Shape {
        what: &'static str,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("add_noise: {count} timesteps for a batch of {batch} (give one, or one per sample)")]
    TimestepCount { count: usize, batch: usize },
    #[error("DDIM eta must be a finite number >= 0, got {0}")]
    BadEta(f64),
    #[error("{generators} per-item generator(s) for a batch of {batch}: give one per item")]
    GeneratorCount { generators: usize, batch: usize },
    #[error("noise rows {start}..{end} fall outside a batch of {total}")]
    GeneratorRows {
        start: usize,
        end: usize,
        total: usize,
    },
}
