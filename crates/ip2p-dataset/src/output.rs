//! The output folder: `{id}.png` (and `{id}.safetensors` latents) per item, written under a
//! temporary name and renamed, so a file with the final name is always complete and a killed
//! process leaves at most a `.{name}.{pid}.partial` file, which is never taken as done and is
//! removed when the item's shard runs again.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::DatasetError;
use crate::shard::Shard;

/// Where a dataset edit writes.
#[derive(Debug, Clone)]
pub struct OutputDir {
    root: PathBuf,
}

impl OutputDir {
    /// The folder `root`, created if missing.
    pub fn create(root: impl Into<PathBuf>) -> Result<Self, DatasetError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(DatasetError::io(&root))?;
        Ok(Self { root })
    }

    /// An existing folder (for merging).
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, DatasetError> {
        let root = root.into();
        if !root.is_dir() {
            return Err(DatasetError::Io {
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such folder"),
                path: root,
            });
        }
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The edited image's file name, `{id}.png`.
    pub fn image_name(id: &str) -> String {
        format!("{id}.png")
    }

    /// The final latents' file name, `{id}.safetensors`.
    pub fn latents_name(id: &str) -> String {
        format!("{id}.safetensors")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Whether item `id` is done: its image (and, with `latents`, its latents) exist under
    /// their final names.
    pub fn is_done(&self, id: &str, latents: bool) -> bool {
        self.path(&Self::image_name(id)).is_file()
            && (!latents || self.path(&Self::latents_name(id)).is_file())
    }

    /// This shard's results file, `shard-{i}-of-{n}.jsonl`.
    pub fn results_path(&self, shard: &Shard) -> PathBuf {
        self.path(&format!("shard-{}-of-{}.jsonl", shard.index, shard.count))
    }

    /// The merged results file, `results.jsonl`.
    pub fn merged_path(&self) -> PathBuf {
        self.path("results.jsonl")
    }

    /// The temporary name this process writes `name` under ([`ip2p_io::partial_path`]).
    pub fn partial_path(&self, name: &str) -> PathBuf {
        ip2p_io::partial_path(&self.path(name))
    }

    /// Write `bytes` to `name` atomically ([`ip2p_io::write`]: a temporary file, synced, then
    /// renamed into place). An existing file of that name is replaced.
    pub fn write_atomic(&self, name: &str, bytes: &[u8]) -> Result<PathBuf, DatasetError> {
        let dest = self.path(name);
        ip2p_io::write(&dest, bytes).map_err(|e| DatasetError::Io {
            path: e.path,
            source: e.source,
        })?;
        Ok(dest)
    }

    /// Remove the temporary files a killed run left for the items in `ids` (other shards'
    /// temporary files are left alone: they may be being written). Returns how many.
    pub fn remove_partials(&self, ids: &HashSet<&str>) -> Result<usize, DatasetError> {
        let mut removed = 0;
        let entries = std::fs::read_dir(&self.root).map_err(DatasetError::io(&self.root))?;
        for entry in entries {
            let entry = entry.map_err(DatasetError::io(&self.root))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(id) = partial_item(name)
                && ids.contains(id)
            {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(DatasetError::io(&path))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// The item id of a temporary file name `.{id}.{ext}.{pid}.partial`.
fn partial_item(name: &str) -> Option<&str> {
    let (file, _pid) = ip2p_io::parse_partial(name)?;
    file.strip_suffix(".png")
        .or_else(|| file.strip_suffix(".safetensors"))
}

/// Lower-case hex SHA-256 of `bytes` (the results file's `sha256`).
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_names() {
        assert_eq!(partial_item(".a-1.png.123.partial"), Some("a-1"));
        assert_eq!(partial_item(".x.y.safetensors.9.partial"), Some("x.y"));
        assert_eq!(partial_item("a.png"), None);
        assert_eq!(partial_item(".a.png.partial"), None);
        assert_eq!(partial_item(".a.txt.1.partial"), None);
    }

    #[test]
    fn sha256_of_abc() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
