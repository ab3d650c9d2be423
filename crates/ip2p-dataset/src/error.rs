//! Typed errors: every manifest error names the file and the line (or Parquet row).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A line that is not a JSON object.
    #[error("{path}:{line}: not a JSON object: {reason}")]
    Json {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}:{line}: no `{field}` field")]
    MissingField {
        path: PathBuf,
        line: usize,
        field: &'static str,
    },
    #[error("{path}:{line}: `{field}` {reason}")]
    BadField {
        path: PathBuf,
        line: usize,
        field: String,
        reason: String,
    },
    #[error("{path}:{line}: id {id:?} {reason}")]
    BadId {
        path: PathBuf,
        line: usize,
        id: String,
        reason: String,
    },
    #[error("{path}:{line}: id {id:?} already used on line {first_line}")]
    DuplicateId {
        path: PathBuf,
        line: usize,
        id: String,
        first_line: usize,
    },
    #[error("{path}: the manifest has no items")]
    Empty { path: PathBuf },
    #[error("{path}: {reason}")]
    Parquet { path: PathBuf, reason: String },
    #[error("{path}: unknown manifest format (use .jsonl, .json or .parquet)")]
    UnknownFormat { path: PathBuf },
    /// Shard selection: bad flags or scheduler environment.
    #[error("shard selection: {0}")]
    Shard(String),
    /// A results file line that cannot be read.
    #[error("{path}:{line}: bad results line: {reason}")]
    Results {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// Merge: manifest items without an output or a result.
    #[error("{missing} of {total} manifest item(s) have no output or result (first: {first:?})")]
    Missing {
        missing: usize,
        total: usize,
        first: Vec<String>,
    },
}

impl DatasetError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| DatasetError::Io { path, source }
    }
}
