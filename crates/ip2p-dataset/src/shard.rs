//! Which share of the manifest this process edits.
//!
//! The shard comes from flags or from the environment the cluster's scheduler sets, in this
//! order (the first that is present wins, and [`Shard::source`] says which):
//! 1. `--shard-index I --num-shards N`;
//! 2. `JOB_COMPLETION_INDEX` (Kubernetes Indexed Job; the Job's `completions` is not in the
//!    environment, so `--num-shards` gives it);
//! 3. `SLURM_ARRAY_TASK_ID` with `SLURM_ARRAY_TASK_COUNT` (Slurm job array; the index counts from
//!    `SLURM_ARRAY_TASK_MIN` in steps of `SLURM_ARRAY_TASK_STEP`, so `--array=1-8` works);
//! 4. `RANK` with `WORLD_SIZE` (torchrun, accelerate and other torch launchers);
//! 5. none: one shard, the whole manifest.
//!
//! The manifest is cut into batch groups of `--batch` consecutive items, and each shard takes a
//! contiguous run of groups with accelerate's `split_between_processes` formula (run lengths
//! differ by at most one). With `--batch 1` that is accelerate's split of the items themselves.
//! Groups, not items, are split so that an item is always edited in the same batch, whatever
//! the number of shards: a batch's numbers depend (in the last bits) on what else is in it.

use std::fmt;
use std::ops::Range;

use crate::error::DatasetError;

/// Where the shard index and count came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardSource {
    Flags,
    KubernetesIndexedJob,
    SlurmArray,
    TorchRun,
    /// No flags and no scheduler environment: the whole manifest.
    Single,
}

impl fmt::Display for ShardSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShardSource::Flags => "--shard-index/--num-shards",
            ShardSource::KubernetesIndexedJob => {
                "Kubernetes Indexed Job: JOB_COMPLETION_INDEX, --num-shards"
            }
            ShardSource::SlurmArray => {
                "Slurm job array: SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT"
            }
            ShardSource::TorchRun => "torch launcher: RANK/WORLD_SIZE",
            ShardSource::Single => "no shard flags or scheduler environment: one shard",
        })
    }
}

/// This process's shard: `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
    pub source: ShardSource,
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "shard {} of {} (from {})",
            self.index, self.count, self.source
        )
    }
}

/// Items `start..end` of `len` that process `index` of `count` takes: accelerate's
/// `split_between_processes` (`divmod(len, count)`; the first `len % count` processes take one
/// more). Callers check `index < count`.
pub fn split_between_processes(len: usize, count: usize, index: usize) -> Range<usize> {
    let per = len / count;
    let extra = len % count;
    let start = index * per + index.min(extra);
    let end = start + per + usize::from(index < extra);
    start..end
}

impl Shard {
    /// The shard from flags or `env` (a lookup such as `|k| std::env::var(k).ok()`).
    pub fn resolve(
        index: Option<usize>,
        count: Option<usize>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, DatasetError> {
        let err = |m: String| DatasetError::Shard(m);
        let var = |name: &str| -> Result<Option<usize>, DatasetError> {
            match env(name) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .map(Some)
                    .map_err(|_| err(format!("{name}={v:?} is not a non-negative integer"))),
            }
        };
        // The count from the environment must agree with --num-shards when both are given.
        let agree = |env_name: &str, env_count: usize| -> Result<usize, DatasetError> {
            match count {
                Some(c) if c != env_count => Err(err(format!(
                    "--num-shards {c} disagrees with {env_name}={env_count}"
                ))),
                _ => Ok(env_count),
            }
        };
        let (index, count, source) = if let Some(i) = index {
            let n = count.ok_or_else(|| err("--shard-index needs --num-shards".into()))?;
            (i, n, ShardSource::Flags)
        } else if let Some(i) = var("JOB_COMPLETION_INDEX")? {
            let n = count.ok_or_else(|| {
                err("JOB_COMPLETION_INDEX is set (Kubernetes Indexed Job): give --num-shards, the Job's completions".into())
            })?;
            (i, n, ShardSource::KubernetesIndexedJob)
        } else if let Some(id) = var("SLURM_ARRAY_TASK_ID")? {
            let n = var("SLURM_ARRAY_TASK_COUNT")?.ok_or_else(|| {
                err("SLURM_ARRAY_TASK_ID is set without SLURM_ARRAY_TASK_COUNT".into())
            })?;
            let min = var("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let step = var("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
            if id < min || (id - min) % step != 0 {
                return Err(err(format!(
                    "SLURM_ARRAY_TASK_ID={id} is not in the array {min}, {}, ... (SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_STEP)",
                    min + step
                )));
            }
            (
                (id - min) / step,
                agree("SLURM_ARRAY_TASK_COUNT", n)?,
                ShardSource::SlurmArray,
            )
        } else if let Some(rank) = var("RANK")? {
            let n =
                var("WORLD_SIZE")?.ok_or_else(|| err("RANK is set without WORLD_SIZE".into()))?;
            (rank, agree("WORLD_SIZE", n)?, ShardSource::TorchRun)
        } else if let Some(n) = count {
            if n != 1 {
                return Err(err(format!(
                    "--num-shards {n} without --shard-index, and no JOB_COMPLETION_INDEX, SLURM_ARRAY_TASK_ID or RANK in the environment"
                )));
            }
            (0, 1, ShardSource::Flags)
        } else {
            (0, 1, ShardSource::Single)
        };
        if count == 0 {
            return Err(err("the number of shards must be at least 1".into()));
        }
        if index >= count {
            return Err(err(format!(
                "shard index {index} is not below the number of shards {count} (from {source})"
            )));
        }
        Ok(Self {
            index,
            count,
            source,
        })
    }

    /// The items of a `len`-item manifest this shard edits: a contiguous run of whole batch
    /// groups of `batch` items (see the module documentation).
    pub fn items(&self, len: usize, batch: usize) -> Range<usize> {
        let batch = batch.max(1);
        let groups = len.div_ceil(batch);
        let g = split_between_processes(groups, self.count, self.index);
        (g.start * batch).min(len)..(g.end * batch).min(len)
    }
}

/// The batch groups of items `range` (aligned to multiples of `batch` from the manifest's
/// start), each as a range of manifest positions.
pub fn groups(range: Range<usize>, batch: usize) -> Vec<Range<usize>> {
    let batch = batch.max(1);
    let mut out = Vec::new();
    let mut start = range.start;
    while start < range.end {
        let end = ((start / batch + 1) * batch).min(range.end);
        out.push(start..end);
        start = end;
    }
    out
}
