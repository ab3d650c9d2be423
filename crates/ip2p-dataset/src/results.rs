//! The results files: one JSON line per item a shard edited or failed on, appended as each
//! item finishes, with the manifest's other columns copied in.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::DatasetError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Edited; `output` and `sha256` are set.
    Ok,
    /// Not edited (missing or corrupt image, empty prompt, bad token ids); `reason` says why.
    Failed,
}

/// One item's line in a results file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemResult {
    pub id: String,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The item's manifest line (or Parquet row), 1-based.
    pub line: usize,
    /// `image` as the manifest gives it.
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_ids: Option<Vec<i64>>,
    /// The seed the item's generator was seeded with (its `seed` column or the derived one).
    pub seed: u64,
    pub steps: usize,
    pub guidance: f64,
    pub image_guidance: f64,
    /// The batch group (manifest position / batch): the item was edited with the others of it.
    pub group: usize,
    /// The image's file name in the output folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latents: Option<String>,
    /// SHA-256 of the image file, lower-case hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// Wall time of the item's batch divided by its items (`None` when recovered from a file
    /// a killed run wrote without its line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// The manifest's other columns.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Read a results file. A last line without its newline (a process killed while appending) is
/// ignored; any other unreadable line is an error naming it.
pub fn read_results(path: &Path) -> Result<Vec<ItemResult>, DatasetError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(DatasetError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    let mut out = Vec::new();
    for (i, line) in complete.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r = serde_json::from_str(line).map_err(|e| DatasetError::Results {
            path: path.to_path_buf(),
            line: i + 1,
            reason: e.to_string(),
        })?;
        out.push(r);
    }
    Ok(out)
}

/// A shard's results file, open for appending.
#[derive(Debug)]
pub struct ResultsFile {
    path: PathBuf,
    file: std::fs::File,
}

impl ResultsFile {
    /// Open (or create) `path` for appending and return the results already in it. A torn
    /// last line is cut off first, so the next line starts on a line of its own.
    pub fn open(path: impl Into<PathBuf>) -> Result<(Self, Vec<ItemResult>), DatasetError> {
        let path = path.into();
        let existing = read_results(&path)?;
        if let Ok(text) = std::fs::read(&path)
            && !text.is_empty()
            && !text.ends_with(b"\n")
        {
            let keep = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(DatasetError::io(&path))?;
            f.set_len(keep as u64).map_err(DatasetError::io(&path))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(DatasetError::io(&path))?;
        Ok((Self { path, file }, existing))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one line (one write call, then flushed).
    pub fn append(&mut self, result: &ItemResult) -> Result<(), DatasetError> {
        let mut line = serde_json::to_string(result).map_err(|e| DatasetError::Results {
            path: self.path.clone(),
            line: 0,
            reason: e.to_string(),
        })?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(DatasetError::io(&self.path))
    }
}
