//! Per-stage time and memory of a run.

use std::fmt;
use std::time::Instant;

use crate::memory::MemoryProbe;

/// A stage of an edit, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Stage {
    Tokenize,
    TextEncode,
    VaeEncode,
    /// One denoising step (0-based).
    Denoise(usize),
    VaeDecode,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stage::Tokenize => f.write_str("tokenize"),
            Stage::TextEncode => f.write_str("text encode"),
            Stage::VaeEncode => f.write_str("VAE encode"),
            Stage::Denoise(i) => write!(f, "denoise step {}", i + 1),
            Stage::VaeDecode => f.write_str("VAE decode"),
        }
    }
}

/// Time and memory of one stage. Memory is read after a device sync.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageRecord {
    pub stage: Stage,
    pub seconds: f64,
    /// Bytes in use when the stage ended.
    pub current_bytes: u64,
    /// Most bytes in use during the stage.
    pub peak_bytes: u64,
}

/// Every stage of a run, in order.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunReport {
    /// Where the memory numbers come from.
    pub memory_source: String,
    pub stages: Vec<StageRecord>,
}

impl RunReport {
    pub fn total_seconds(&self) -> f64 {
        self.stages.iter().map(|s| s.seconds).sum()
    }

    pub fn peak_bytes(&self) -> u64 {
        self.stages.iter().map(|s| s.peak_bytes).max().unwrap_or(0)
    }

    /// Time and peak of all denoising steps together.
    pub fn denoise(&self) -> (f64, u64) {
        self.stages
            .iter()
            .filter(|s| matches!(s.stage, Stage::Denoise(_)))
            .fold((0.0, 0), |(t, p), s| (t + s.seconds, p.max(s.peak_bytes)))
    }

    /// The first record of `stage` (`None` if it did not run).
    pub fn stage(&self, stage: Stage) -> Option<&StageRecord> {
        self.stages.iter().find(|s| s.stage == stage)
    }

    /// A Markdown table: one row per stage (steps folded into one row), then the total.
    pub fn table(&self) -> String {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let mut out = "| stage | time (s) | current (MiB) | peak (MiB) |
|---|---:|---:|---:|
"
        .to_string();
        let mut steps = 0;
        for s in &self.stages {
            if let Stage::Denoise(_) = s.stage {
                steps += 1;
                continue;
            }
            out += &format!(
                "| {} | {:.3} | {:.1} | {:.1} |\n",
                s.stage,
                s.seconds,
                mib(s.current_bytes),
                mib(s.peak_bytes)
            );
        }
        if steps > 0 {
            let (t, p) = self.denoise();
            let last = self
                .stages
                .iter()
                .rev()
                .find(|s| matches!(s.stage, Stage::Denoise(_)));
            let cur = last.map_or(0, |s| s.current_bytes);
            out += &format!(
                "| denoise ({steps} steps, {:.3} s/step) | {t:.3} | {:.1} | {:.1} |\n",
                t / steps as f64,
                mib(cur),
                mib(p)
            );
        }
        out += &format!(
            "| **total** | {:.3} | | {:.1} |\n",
            self.total_seconds(),
            mib(self.peak_bytes())
        );
        out += &format!("\nmemory: {}\n", self.memory_source);
        out
    }
}

/// Times stages and reads the probe around them.
pub(crate) struct Tracker<'a> {
    probe: &'a dyn MemoryProbe,
    /// The backend's own release of cached memory (`Backend::memory_cleanup`).
    release: Box<dyn Fn() + 'a>,
    pub report: RunReport,
}

impl<'a> Tracker<'a> {
    pub fn new(probe: &'a dyn MemoryProbe, release: impl Fn() + 'a) -> Self {
        Self {
            probe,
            release: Box::new(release),
            report: RunReport {
                memory_source: probe.source().to_string(),
                stages: Vec::new(),
            },
        }
    }

    /// Run `f` as `stage`; `sync` must wait for the device so time and memory are real.
    pub fn run<T, E>(
        &mut self,
        stage: Stage,
        sync: impl FnOnce() -> Result<(), E>,
        f: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        self.probe.reset_peak();
        let start = Instant::now();
        let out = f()?;
        sync()?;
        self.report.stages.push(StageRecord {
            stage,
            seconds: start.elapsed().as_secs_f64(),
            current_bytes: self.probe.current(),
            peak_bytes: self.probe.peak(),
        });
        Ok(out)
    }

    /// Give cached device memory back: between stages and every N steps.
    pub fn cleanup(&self) {
        (self.release)();
        self.probe.cleanup();
    }
}
