//! What a client asks for, as it arrives (multipart fields or JSON), and the settings an edit
//! runs with once every default is filled in and every random choice is made.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

use ip2p_sched::SchedulerKind;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// Steps above this are refused: 1000 is the training schedule's length.
pub const MAX_STEPS: usize = 1000;
/// The largest `resolution` (long side before rounding to multiples of 64).
pub const MAX_RESOLUTION: u32 = 2048;
/// The smallest: one 64-pixel tile, the original's rounding unit.
pub const MIN_RESOLUTION: u32 = 64;
/// Prompts longer than this (bytes) are refused; CLIP reads 77 tokens anyway.
pub const MAX_PROMPT_BYTES: usize = 4096;
/// Guidance scales outside ±this are refused (the original's sliders stop well inside it).
pub const MAX_GUIDANCE: f64 = 100.0;

/// A request's fields. Every one but `prompt` (and the image) is optional and gets the original
/// app's default: 100 steps, text guidance 7.5, image guidance 1.5, resolution 512, a random
/// seed when none is given, the model's own scheduler.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditRequest {
    #[serde(alias = "instruction")]
    pub prompt: Option<String>,
    /// JSON only: the image as base64, optionally as a `data:` URL.
    pub image: Option<String>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub image_guidance: Option<f64>,
    pub seed: Option<u64>,
    /// Draw a new seed even if `seed` is given (the page's "randomize" toggle). Default: only
    /// when no seed is given.
    pub randomize_seed: Option<bool>,
    /// The original app's "Randomize CFG": text guidance uniform in [6, 9], image guidance in
    /// [1.2, 1.8], rounded to 2 decimals.
    pub randomize_guidance: Option<bool>,
    pub resolution: Option<u32>,
    pub scheduler: Option<String>,
    pub negative_prompt: Option<String>,
}

/// The settings an edit runs with; reported back so that it can be reproduced.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EditParams {
    pub prompt: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    pub steps: usize,
    pub guidance: f64,
    pub image_guidance: f64,
    pub seed: u64,
    pub resolution: u32,
    /// The scheduler's short name (`euler-ancestral`, ...).
    pub scheduler: String,
    #[serde(skip)]
    pub scheduler_kind: SchedulerKind,
}

impl EditRequest {
    /// Set one multipart text field, parsed to its type; the error names the field.
    pub fn set_field(&mut self, name: &str, value: &str) -> Result<(), ApiError> {
        let v = value.trim();
        fn num<T: std::str::FromStr>(name: &str, v: &str, what: &str) -> Result<T, ApiError> {
            v.parse()
                .map_err(|_| ApiError::bad(format!("{name}: expected {what}, got {v:?}")))
        }
        fn flag(name: &str, v: &str) -> Result<bool, ApiError> {
            match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "on" | "yes" => Ok(true),
                "false" | "0" | "off" | "no" | "" => Ok(false),
                _ => Err(ApiError::bad(format!(
                    "{name}: expected true or false, got {v:?}"
                ))),
            }
        }
        match name {
            "prompt" | "instruction" => self.prompt = Some(value.to_string()),
            "negative_prompt" => self.negative_prompt = Some(value.to_string()),
            "scheduler" => self.scheduler = Some(v.to_string()),
            "steps" => self.steps = Some(num(name, v, "a whole number of steps")?),
            "guidance" => self.guidance = Some(num(name, v, "a number")?),
            "image_guidance" => self.image_guidance = Some(num(name, v, "a number")?),
            "seed" if v.is_empty() => self.seed = None,
            "seed" => self.seed = Some(num(name, v, "a whole number ≥ 0")?),
            "resolution" => self.resolution = Some(num(name, v, "a whole number of pixels")?),
            "randomize_seed" => self.randomize_seed = Some(flag(name, v)?),
            "randomize_guidance" => self.randomize_guidance = Some(flag(name, v)?),
            other => return Err(ApiError::bad(format!("unknown field {other:?}"))),
        }
        Ok(())
    }

    /// Parse a JSON body; a wrong type or an unknown field is a 400 that names the field.
    pub fn from_json(body: &[u8]) -> Result<Self, ApiError> {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("JSON body: {e}")))?;
        let object = value
            .as_object()
            .ok_or_else(|| ApiError::bad("JSON body: expected an object of fields"))?;
        let mut req = Self::default();
        // One field at a time, so that serde's message can be prefixed with its name.
        for (key, v) in object {
            let one = serde_json::Value::Object([(key.clone(), v.clone())].into_iter().collect());
            let part: Self =
                serde_json::from_value(one).map_err(|e| ApiError::bad(format!("{key}: {e}")))?;
            req.merge(part);
        }
        Ok(req)
    }

    fn merge(&mut self, o: Self) {
        macro_rules! take {
            ($($f:ident),*) => { $( if o.$f.is_some() { self.$f = o.$f; } )* };
        }
        take!(
            prompt,
            image,
            steps,
            guidance,
            image_guidance,
            seed,
            randomize_seed,
            randomize_guidance,
            resolution,
            scheduler,
            negative_prompt
        );
    }

    /// Check every field and fill in the defaults; random choices are made here, once, so
    /// that the state, the events and the PNG all report the same values.
    pub fn resolve(&self, default_scheduler: SchedulerKind) -> Result<EditParams, ApiError> {
        let prompt = self
            .prompt
            .clone()
            .ok_or_else(|| ApiError::bad("prompt: missing (the edit instruction)"))?;
        if prompt.len() > MAX_PROMPT_BYTES {
            return Err(ApiError::bad(format!(
                "prompt: {} bytes, the limit is {MAX_PROMPT_BYTES}",
                prompt.len()
            )));
        }
        let steps = self.steps.unwrap_or(100);
        if !(1..=MAX_STEPS).contains(&steps) {
            return Err(ApiError::bad(format!(
                "steps: {steps} is outside 1..={MAX_STEPS}"
            )));
        }
        let resolution = self.resolution.unwrap_or(512);
        if !(MIN_RESOLUTION..=MAX_RESOLUTION).contains(&resolution) {
            return Err(ApiError::bad(format!(
                "resolution: {resolution} is outside {MIN_RESOLUTION}..={MAX_RESOLUTION}"
            )));
        }
        let (mut guidance, mut image_guidance) = (
            self.guidance.unwrap_or(7.5),
            self.image_guidance.unwrap_or(1.5),
        );
        for (name, v) in [("guidance", guidance), ("image_guidance", image_guidance)] {
            if !v.is_finite() || v.abs() > MAX_GUIDANCE {
                return Err(ApiError::bad(format!(
                    "{name}: {v} is not a number within ±{MAX_GUIDANCE}"
                )));
            }
        }
        let kind = match self.scheduler.as_deref().map(str::trim) {
            None | Some("") => default_scheduler,
            Some(name) => SchedulerKind::from_name(name).map_err(|_| {
                let names: Vec<_> = SchedulerKind::ALL.iter().map(|k| k.short_name()).collect();
                ApiError::bad(format!(
                    "scheduler: unknown {name:?}; use one of {}",
                    names.join(", ")
                ))
            })?,
        };
        let mut rng = Random::new();
        let seed = match (self.seed, self.randomize_seed) {
            (Some(seed), None | Some(false)) => seed,
            (None, Some(false)) => {
                return Err(ApiError::bad(
                    "seed: missing (randomize_seed is false, so a seed is needed)",
                ));
            }
            // The original app's range.
            _ => rng.below(100_001),
        };
        if self.randomize_guidance == Some(true) {
            guidance = rng.uniform_2dp(6.0, 9.0);
            image_guidance = rng.uniform_2dp(1.2, 1.8);
        }
        Ok(EditParams {
            prompt,
            negative_prompt: self.negative_prompt.clone().filter(|n| !n.is_empty()),
            steps,
            guidance,
            image_guidance,
            seed,
            resolution,
            scheduler: kind.short_name().to_string(),
            scheduler_kind: kind,
        })
    }
}

/// Random numbers for seeds, guidance and ids from std's randomly keyed hasher: nothing here
/// needs to be reproducible or cryptographic, only different each time.
pub(crate) struct Random(ip2p_sched::SplitMix);

impl Random {
    pub fn new() -> Self {
        Self(ip2p_sched::SplitMix::new(
            RandomState::new().build_hasher().finish(),
        ))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in [lo, hi], rounded to 2 decimals as the original's `round(uniform(..), 2)`.
    pub fn uniform_2dp(&mut self, lo: f64, hi: f64) -> f64 {
        let u = self.0.uniform();
        ((lo + (hi - lo) * u) * 100.0).round() / 100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_original_apps() {
        let req = EditRequest {
            prompt: Some("make it snow".into()),
            seed: Some(7),
            ..Default::default()
        };
        let p = req.resolve(SchedulerKind::EulerAncestral).unwrap();
        assert_eq!(
            (p.steps, p.guidance, p.image_guidance, p.seed, p.resolution),
            (100, 7.5, 1.5, 7, 512)
        );
        assert_eq!(p.scheduler, "euler-ancestral");
    }

    #[test]
    fn randomized_values_stay_in_the_original_ranges() {
        let req = EditRequest {
            prompt: Some("x".into()),
            randomize_guidance: Some(true),
            ..Default::default()
        };
        for _ in 0..200 {
            let p = req.resolve(SchedulerKind::Euler).unwrap();
            assert!(p.seed <= 100_000);
            assert!((6.0..=9.0).contains(&p.guidance), "{}", p.guidance);
            assert!((1.2..=1.8).contains(&p.image_guidance));
            assert_eq!((p.guidance * 100.0).round() / 100.0, p.guidance);
        }
    }

    #[test]
    fn bad_fields_name_themselves() {
        let mut req = EditRequest::default();
        let e = req.set_field("steps", "many").unwrap_err();
        assert!(e.message.starts_with("steps:"), "{}", e.message);
        assert!(req.set_field("colour", "red").is_err());
        req.set_field("prompt", "x").unwrap();
        req.set_field("steps", "0").unwrap();
        let e = req.resolve(SchedulerKind::Euler).unwrap_err();
        assert!(e.message.starts_with("steps:"), "{}", e.message);
        req.set_field("steps", "5").unwrap();
        req.set_field("scheduler", "plms").unwrap();
        let e = req.resolve(SchedulerKind::Euler).unwrap_err();
        assert!(e.message.contains("euler-ancestral"), "{}", e.message);
        req.set_field("scheduler", "").unwrap();
        req.set_field("guidance", "NaN").unwrap();
        assert!(req.resolve(SchedulerKind::Euler).is_err());
    }
}
