//! Host-side tables: betas, cumulative alphas, timesteps and sigmas, as diffusers makes them.
//!
//! Everything is f64 here, but rounded to f32 at the points where diffusers holds f32 tensors or
//! arrays (torch betas, `alphas_cumprod`, np.float32 timesteps, the final sigma tables), so the
//! tables equal diffusers' to f32 rounding rather than drifting by a cumulative product's worth.

use crate::config::{BaseConfig, BetaSchedule, TimestepSpacing};

/// Round to the nearest f32, kept as f64.
pub(crate) fn f32r(x: f64) -> f64 {
    x as f32 as f64
}

/// `torch.linspace(start, end, n, dtype=float32)`: f32 arithmetic, from both ends toward the middle.
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f64> {
    let (s, e) = (start as f32, end as f32);
    if n == 1 {
        return vec![s as f64];
    }
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            let v = if i < half {
                s + step * i as f32
            } else {
                e - step * (n - 1 - i) as f32
            };
            v as f64
        })
        .collect()
}

/// `np.linspace(start, stop, n)` in f64 (`i * step + start`, the last value exactly `stop`).
pub(crate) fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    v[n - 1] = stop;
    v
}

/// `np.arange(start, 0, -step)` for float `step`, with numpy's length and fill rule.
fn np_arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = ((0.0 - start) / -step).ceil().max(0.0) as usize;
    if len == 0 {
        return Vec::new();
    }
    let first = start;
    let delta = (start + -step) - first;
    (0..len)
        .map(|i| {
            if i == 0 {
                first
            } else {
                first + i as f64 * delta
            }
        })
        .collect()
}

/// Betas as diffusers' float32 tensor.
pub fn betas(cfg: &BaseConfig) -> Vec<f64> {
    let n = cfg.num_train_timesteps;
    match &cfg.beta_schedule {
        BetaSchedule::Linear => torch_linspace_f32(cfg.beta_start, cfg.beta_end, n),
        BetaSchedule::ScaledLinear => {
            torch_linspace_f32(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n)
                .into_iter()
                .map(|b| {
                    let b = b as f32;
                    (b * b) as f64
                })
                .collect()
        }
        BetaSchedule::SquaredcosCapV2 => {
            let alpha_bar = |t: f64| {
                ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                    .cos()
                    .powi(2)
            };
            (0..n)
                .map(|i| {
                    let t1 = i as f64 / n as f64;
                    let t2 = (i + 1) as f64 / n as f64;
                    f32r((1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999))
                })
                .collect()
        }
        BetaSchedule::Trained(b) => b.iter().map(|v| f32r(*v)).collect(),
    }
}

/// `torch.cumprod(1 - betas)`: torch accumulates in f64 on the CPU and stores f32.
pub fn alphas_cumprod(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|b| {
            acc *= f32r(1.0 - b);
            f32r(acc)
        })
        .collect()
}

/// `((1 - acp) / acp) ** 0.5` in f32, one per training timestep (ascending noise).
pub fn train_sigmas(alphas_cumprod: &[f64]) -> Vec<f64> {
    alphas_cumprod
        .iter()
        .map(|a| {
            let a = *a as f32;
            ((1.0 - a) / a).sqrt() as f64
        })
        .collect()
}

/// `np.log` of the f32 training sigmas (f32 results, as numpy keeps the array's dtype).
pub(crate) fn log_sigmas(train_sigmas: &[f64]) -> Vec<f64> {
    train_sigmas
        .iter()
        .map(|s| (*s as f32).ln() as f64)
        .collect()
}

/// Check a step count against the training range.
pub(crate) fn check_steps(n: usize, train: usize) -> Result<(), crate::SchedError> {
    if n == 0 {
        return Err(crate::SchedError::ZeroSteps);
    }
    if n > train {
        return Err(crate::SchedError::TooManySteps { steps: n, train });
    }
    Ok(())
}

/// Euler-family timesteps (`EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`):
/// np.float32 values, fractional for `linspace`.
pub fn euler_timesteps(cfg: &BaseConfig, n: usize) -> Vec<f64> {
    let train = cfg.num_train_timesteps;
    match cfg.timestep_spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(f32r)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = train / n;
            (0..n)
                .rev()
                .map(|i| f32r((i * ratio) as f64) + cfg.steps_offset as f64)
                .collect()
        }
        TimestepSpacing::Trailing => np_arange_down(train as f64, train as f64 / n as f64)
            .into_iter()
            .map(|t| f32r(t.round_ties_even()) - 1.0)
            .collect(),
    }
}

/// DDIM/DDPM timesteps: integers.
pub fn integer_timesteps(cfg: &BaseConfig, n: usize) -> Vec<f64> {
    let train = cfg.num_train_timesteps;
    match cfg.timestep_spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(f64::round_ties_even)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio + cfg.steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => np_arange_down(train as f64, train as f64 / n as f64)
            .into_iter()
            .map(|t| t.round_ties_even() - 1.0)
            .collect(),
    }
}

/// DPM-Solver timesteps: integers over `0..last_timestep` (`lambda_min_clipped` may cut the end).
pub fn dpm_timesteps(cfg: &BaseConfig, n: usize, last_timestep: usize) -> Vec<f64> {
    let train = cfg.num_train_timesteps;
    match cfg.timestep_spacing {
        TimestepSpacing::Linspace => {
            let mut v: Vec<f64> = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1)
                .into_iter()
                .map(f64::round_ties_even)
                .collect();
            v.remove(0);
            v.reverse();
            v
        }
        TimestepSpacing::Leading => {
            let ratio = last_timestep / (n + 1);
            (1..=n)
                .rev()
                .map(|i| (i * ratio + cfg.steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => np_arange_down(last_timestep as f64, train as f64 / n as f64)
            .into_iter()
            .map(|t| t.round_ties_even() - 1.0)
            .collect(),
    }
}

/// `np.interp(x, arange(len(fp)), fp)`.
pub(crate) fn interp(x: f64, fp: &[f64]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0];
    }
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize;
    let slope = (fp[j + 1] - fp[j]) / 1.0;
    slope * (x - j as f64) + fp[j]
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma interpolates to `sigma`.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // The last index whose log-sigma is <= log_sigma (0 when none is), clipped to len - 2.
    let low_idx = log_sigmas
        .iter()
        .rposition(|ls| log_sigma - ls >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    // `low - high` is an f32 - f32 numpy operation.
    let w = ((low - log_sigma) / ((low as f32 - high as f32) as f64)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// Karras et al. (2022) sigmas, rho 7, from `sigma_max` down to `sigma_min`.
pub(crate) fn karras(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// Sigmas evenly spaced in log space, from `sigma_max` down to `sigma_min`.
pub(crate) fn exponential(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// The index of `t` in `timesteps`, as diffusers' `index_for_timestep`: with duplicates, the
/// second match (so a schedule started mid-way does not skip a sigma).
pub(crate) fn index_for_timestep(timesteps: &[f64], t: f64) -> Result<usize, crate::SchedError> {
    let mut matches = timesteps
        .iter()
        .enumerate()
        .filter(|(_, v)| **v == t)
        .map(|(i, _)| i);
    let first = matches
        .next()
        .ok_or(crate::SchedError::TimestepNotInSchedule { t })?;
    Ok(matches.next().unwrap_or(first))
}

/// An integer training timestep in `0..train`, or a typed error.
pub(crate) fn train_index(t: f64, train: usize) -> Result<usize, crate::SchedError> {
    if t.fract() == 0.0 && t >= 0.0 && t < train as f64 {
        Ok(t as usize)
    } else {
        Err(crate::SchedError::TimestepOutOfRange { t, train })
    }
}
