//! The manifest: one item per JSON Lines line (or Parquet row), read whole and checked before
//! any work, so every shard of a run sees the same items in the same order.
//!
//! Columns: `id` (string of ASCII letters, digits, `.`, `_`, `-`, not starting with `.`; or a
//! non-negative integer), `image` (a path, relative to the manifest's folder), `prompt` (text) or
//! `prompt_ids` (CLIP token ids, `model_max_length` of them), and optionally `seed`, `steps`,
//! `guidance`, `image_guidance`. Other columns are kept and copied into the results.
//!
//! What makes the manifest unusable (not an object, a missing or malformed column, a bad or
//! duplicate id) is an error naming the line. What only makes one item fail (its image file is
//! missing or corrupt, its prompt is empty) is found when the item runs, and reported in the
//! results file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::DatasetError;

/// Columns the results file adds; a manifest column of the same name would be overwritten.
pub const RESULT_COLUMNS: &[&str] = &[
    "line", "status", "reason", "output", "latents", "sha256", "width", "height", "seconds",
    "group",
];

/// Longest id, in bytes (ids become file names).
pub const MAX_ID_LEN: usize = 200;

/// A manifest row before checking: its 1-based line (or Parquet row) and its columns.
pub type Row = (usize, Map<String, Value>);

/// The prompt of an item, as the manifest gives it.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptSource {
    Text(String),
    /// Token ids (checked against the tokenizer when the item runs).
    Ids(Vec<i64>),
}

/// One manifest item.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// 1-based line of a JSON Lines manifest, or 1-based row of a Parquet one.
    pub line: usize,
    pub id: String,
    /// `image` as written in the manifest.
    pub image: String,
    /// `image` resolved against the manifest's folder.
    pub image_path: PathBuf,
    pub prompt: PromptSource,
    pub seed: Option<u64>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub image_guidance: Option<f64>,
    /// The manifest's other columns (kept, sorted by name, into the results).
    pub extra: Map<String, Value>,
}

/// A manifest read whole, in file order.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub path: PathBuf,
    pub items: Vec<Item>,
}

impl Manifest {
    /// Read `path` by its extension: `.jsonl`/`.json` (JSON Lines) or `.parquet`.
    pub fn read(path: impl AsRef<Path>) -> Result<Self, DatasetError> {
        let path = path.as_ref();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let rows = match ext.as_deref() {
            Some("jsonl" | "json" | "ndjson") => read_jsonl(path)?,
            Some("parquet") => read_parquet(path)?,
            _ => {
                return Err(DatasetError::UnknownFormat {
                    path: path.to_path_buf(),
                });
            }
        };
        Self::from_rows(path, rows)
    }

    /// A manifest from rows already parsed: `(line, object)` pairs. `path` names the manifest
    /// in errors and is where relative image paths start.
    pub fn from_rows(path: impl AsRef<Path>, rows: Vec<Row>) -> Result<Self, DatasetError> {
        let path = path.as_ref().to_path_buf();
        let dir = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let mut first_line: HashMap<String, usize> = HashMap::with_capacity(rows.len());
        let mut items = Vec::with_capacity(rows.len());
        for (line, row) in rows {
            let item = parse_item(&path, &dir, line, row)?;
            if let Some(&first) = first_line.get(&item.id) {
                return Err(DatasetError::DuplicateId {
                    path,
                    line,
                    id: item.id,
                    first_line: first,
                });
            }
            first_line.insert(item.id.clone(), line);
            items.push(item);
        }
        if items.is_empty() {
            return Err(DatasetError::Empty { path });
        }
        Ok(Self { path, items })
    }

    /// The position of each id in the manifest.
    pub fn positions(&self) -> HashMap<&str, usize> {
        self.items
            .iter()
            .enumerate()
            .map(|(i, item)| (item.id.as_str(), i))
            .collect()
    }
}

/// The non-blank lines of a JSON Lines file as objects, with their 1-based line numbers.
fn read_jsonl(path: &Path) -> Result<Vec<Row>, DatasetError> {
    let text = std::fs::read_to_string(path).map_err(DatasetError::io(path))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| DatasetError::Json {
            path: path.to_path_buf(),
            line: line_no,
            reason,
        };
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(map)) => rows.push((line_no, map)),
            Ok(other) => return Err(bad(format!("found {}", kind(&other)))),
            Err(e) => return Err(bad(e.to_string())),
        }
    }
    Ok(rows)
}

#[cfg(feature = "parquet")]
fn read_parquet(path: &Path) -> Result<Vec<Row>, DatasetError> {
    crate::manifest_parquet::read(path)
}

#[cfg(not(feature = "parquet"))]
fn read_parquet(path: &Path) -> Result<Vec<Row>, DatasetError> {
    Err(DatasetError::Parquet {
        path: path.to_path_buf(),
        reason: "this build has no Parquet support (ip2p-dataset's `parquet` feature)".into(),
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Whether `id` is usable as a file name on every system: ASCII letters, digits, `.`, `_`,
/// `-`, at most [`MAX_ID_LEN`] bytes, not starting with `.` (no hidden files, no `..`).
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("is empty".into());
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!("is longer than {MAX_ID_LEN} bytes"));
    }
    if id.starts_with('.') {
        return Err("starts with `.`".into());
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "contains {c:?} (ids become file names: use ASCII letters, digits, `.`, `_`, `-`)"
        ));
    }
    Ok(())
}

fn parse_item(
    path: &Path,
    dir: &Path,
    line: usize,
    mut row: Map<String, Value>,
) -> Result<Item, DatasetError> {
    let bad = |field: &str, reason: String| DatasetError::BadField {
        path: path.to_path_buf(),
        line,
        field: field.to_string(),
        reason,
    };
    let missing = |field: &'static str| DatasetError::MissingField {
        path: path.to_path_buf(),
        line,
        field,
    };

    let id = match row.remove("id") {
        None | Some(Value::Null) => return Err(missing("id")),
        Some(Value::String(s)) => s,
        Some(Value::Number(n)) if n.is_u64() => n.to_string(),
        Some(other) => {
            return Err(bad(
                "id",
                format!(
                    "must be a string or a non-negative integer, found {}",
                    kind(&other)
                ),
            ));
        }
    };
    check_id(&id).map_err(|reason| DatasetError::BadId {
        path: path.to_path_buf(),
        line,
        id: id.clone(),
        reason,
    })?;

    let image = match row.remove("image") {
        None | Some(Value::Null) => return Err(missing("image")),
        Some(Value::String(s)) if !s.is_empty() => s,
        Some(Value::String(_)) => return Err(bad("image", "is empty".into())),
        Some(other) => {
            return Err(bad(
                "image",
                format!("must be a path (a string), found {}", kind(&other)),
            ));
        }
    };
    let image_path = dir.join(&image);

    let text = row.remove("prompt").filter(|v| !v.is_null());
    let ids = row.remove("prompt_ids").filter(|v| !v.is_null());
    let prompt = match (text, ids) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "prompt",
                "and `prompt_ids` are both given: give one".into(),
            ));
        }
        (None, None) => return Err(missing("prompt")),
        (Some(Value::String(s)), None) => PromptSource::Text(s),
        (Some(other), None) => {
            return Err(bad(
                "prompt",
                format!("must be a string, found {}", kind(&other)),
            ));
        }
        (None, Some(Value::Array(values))) => PromptSource::Ids(
            values
                .iter()
                .map(|v| v.as_i64())
                .collect::<Option<Vec<i64>>>()
                .ok_or_else(|| bad("prompt_ids", "must be an array of integers".into()))?,
        ),
        (None, Some(other)) => {
            return Err(bad(
                "prompt_ids",
                format!("must be an array of integers, found {}", kind(&other)),
            ));
        }
    };

    let seed = match row.remove("seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| bad("seed", format!("must be an integer in 0..2^64, found {v}")))?,
        ),
    };
    let steps = match row.remove("steps") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Some(n as usize),
            _ => {
                return Err(bad(
                    "steps",
                    format!("must be a positive integer, found {v}"),
                ));
            }
        },
    };
    let mut scale = |field: &str| -> Result<Option<f64>, DatasetError> {
        match row.remove(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(bad(field, format!("must be a finite number, found {v}"))),
            },
        }
    };
    let guidance = scale("guidance")?;
    let image_guidance = scale("image_guidance")?;

    if let Some(key) = row.keys().find(|k| RESULT_COLUMNS.contains(&k.as_str())) {
        return Err(bad(
            key,
            "is a column the results file writes; rename it in the manifest".into(),
        ));
    }
    Ok(Item {
        line,
        id,
        image,
        image_path,
        prompt,
        seed,
        steps,
        guidance,
        image_guidance,
        extra: row,
    })
}
