//! Editing a dataset in shards, the parts that do not touch a model.
//!
//! A dataset edit runs as N independent worker processes scheduled by a cluster's own job
//! system (Kubernetes Indexed Jobs, Slurm job arrays, torchrun-style launchers). Each worker:
//! 1. reads the whole manifest ([`manifest`]: JSON Lines or Parquet), so every worker sees the
//!    same items in the same order and bad manifests fail before any work;
//! 2. finds its shard ([`shard`]: flags, or the scheduler's environment) and takes a contiguous
//!    share of the manifest's batch groups (accelerate's `split_between_processes`);
//! 3. seeds each item from the global seed and the item's id ([`seed`]), so an item's noise does
//!    not depend on its shard, batch or position;
//! 4. writes each output atomically and skips outputs already present ([`output`]), so a
//!    retried or resumed shard does only what is missing, and appends one line per item to its
//!    results file ([`results`]); [`merge`] checks the outputs and joins the results.

pub mod error;
pub mod manifest;
#[cfg(feature = "parquet")]
mod manifest_parquet;
pub mod merge;
pub mod output;
pub mod results;
pub mod seed;
pub mod shard;

pub use error::DatasetError;
pub use manifest::{Item, Manifest, PromptSource};
pub use merge::{MergeSummary, merge};
pub use output::OutputDir;
pub use results::{ItemResult, ResultsFile, Status};
pub use seed::item_seed;
pub use shard::{Shard, ShardSource, groups, split_between_processes};
