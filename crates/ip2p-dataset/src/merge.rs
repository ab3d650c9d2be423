//! `--merge`: check that every manifest item has an output (or a reported failure) and join the
//! shards' results into one file in manifest order.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::error::DatasetError;
use crate::manifest::Manifest;
use crate::output::OutputDir;
use crate::results::{ItemResult, Status, read_results};

/// What [`merge`] found and wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeSummary {
    pub total: usize,
    pub ok: usize,
    pub failed: usize,
    /// Results files read (`shard-*-of-*.jsonl`).
    pub shard_files: Vec<PathBuf>,
    /// Result lines whose id is not in the manifest (ignored).
    pub stray: usize,
    pub path: PathBuf,
}

/// Read every `shard-*-of-*.jsonl` in `dir`, and write `dir/results.jsonl`: one line per manifest
/// item, in manifest order. An item's edited line wins over a failed one (a rerun may have fixed
/// it); otherwise the last line read wins (files in name order). Fails, writing nothing, when an
/// item has no line, or its line says `ok` but its image is missing.
pub fn merge(manifest: &Manifest, dir: &OutputDir) -> Result<MergeSummary, DatasetError> {
    let root = dir.root();
    let mut shard_files: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(DatasetError::io(root))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("shard-") && n.ends_with(".jsonl"))
        })
        .collect();
    shard_files.sort();

    let positions = manifest.positions();
    let mut best: HashMap<String, ItemResult> = HashMap::new();
    let mut stray = 0;
    for file in &shard_files {
        for r in read_results(file)? {
            if !positions.contains_key(r.id.as_str()) {
                stray += 1;
                continue;
            }
            let replace = match best.get(&r.id) {
                None => true,
                Some(old) => !(old.status == Status::Ok && r.status == Status::Failed),
            };
            if replace {
                best.insert(r.id.clone(), r);
            }
        }
    }

    let mut lines = String::new();
    let (mut ok, mut failed) = (0, 0);
    let mut missing = Vec::new();
    for item in &manifest.items {
        match best.remove(&item.id) {
            Some(r) if r.status == Status::Ok => {
                let present = r.output.as_deref().is_some_and(|o| dir.path(o).is_file());
                if !present {
                    missing.push(item.id.clone());
                    continue;
                }
                ok += 1;
                lines.push_str(&to_line(&r, dir)?);
            }
            Some(r) => {
                failed += 1;
                lines.push_str(&to_line(&r, dir)?);
            }
            None => missing.push(item.id.clone()),
        }
    }
    if !missing.is_empty() {
        return Err(DatasetError::Missing {
            missing: missing.len(),
            total: manifest.items.len(),
            first: missing.into_iter().take(10).collect(),
        });
    }
    let path = dir.write_atomic("results.jsonl", lines.as_bytes())?;
    Ok(MergeSummary {
        total: manifest.items.len(),
        ok,
        failed,
        shard_files,
        stray,
        path,
    })
}

fn to_line(r: &ItemResult, dir: &OutputDir) -> Result<String, DatasetError> {
    let mut s = serde_json::to_string(r).map_err(|e| DatasetError::Results {
        path: dir.merged_path(),
        line: 0,
        reason: e.to_string(),
    })?;
    s.push('\n');
    Ok(s)
}
