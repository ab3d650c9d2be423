//! Atomic file output, shared by every writer in ip2p (images, latents, dataset outputs, bench
//! reports): the bytes go to a temporary file in the destination's folder, are synced, and the
//! file is renamed over the destination. A rename within one file system is atomic, so a
//! process killed at any moment leaves the old file or the new one under the final name, never
//! a truncated one; at most a hidden `.{name}.{pid}.partial` file stays behind, which
//! [`remove_stale_partials`] (or a dataset shard's cleanup) removes later.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Suffix of the temporary files.
pub const PARTIAL: &str = ".partial";

/// A write that failed, with the file it was for.
#[derive(Debug, thiserror::Error)]
#[error("writing {}: {source}", path.display())]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// The temporary name this process writes `dest` under: `.{name}.{pid}.partial`, next to it.
pub fn partial_path(dest: &Path) -> PathBuf {
    let name = dest.file_name().unwrap_or(OsStr::new("output"));
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{}{PARTIAL}", std::process::id()));
    dest.with_file_name(tmp)
}

/// The final file name and process id of a temporary file name `.{name}.{pid}.partial`.
pub fn parse_partial(file_name: &str) -> Option<(&str, u32)> {
    let inner = file_name.strip_prefix('.')?.strip_suffix(PARTIAL)?;
    let (name, pid) = inner.rsplit_once('.')?;
    if name.is_empty() || pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((name, pid.parse().ok()?))
}

/// Write `bytes` to `dest` atomically (see the crate docs). An existing `dest` is replaced.
pub fn write(dest: impl AsRef<Path>, bytes: &[u8]) -> Result<(), WriteError> {
    write_with(dest, |f| f.write_all(bytes))
}

/// [`write`] with the contents produced by `fill`, which writes into the temporary file (so a
/// large output need not be held in memory twice).
pub fn write_with(
    dest: impl AsRef<Path>,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), WriteError> {
    let dest = dest.as_ref();
    let tmp = partial_path(dest);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, dest)?;
        sync_parent(dest);
        Ok(())
    })();
    result.map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        WriteError {
            path: dest.to_path_buf(),
            source,
        }
    })
}

/// Sync the folder that holds `path`, so the rename itself survives a power cut. Best effort:
/// not every platform or file system can open or sync a folder.
fn sync_parent(path: &Path) {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(dir) = File::open(parent) {
        let _ = dir.sync_all();
    }
}

/// Remove the temporary files that killed processes left for `dest` (`.{name}.{pid}.partial`
/// whose process no longer runs; on systems without `/proc`, those of any other process).
/// Returns how many were removed.
pub fn remove_stale_partials(dest: impl AsRef<Path>) -> Result<usize, WriteError> {
    let dest = dest.as_ref();
    let Some(name) = dest.file_name().and_then(OsStr::to_str) else {
        return Ok(0);
    };
    let folder = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let io = |source| WriteError {
        path: folder.to_path_buf(),
        source,
    };
    let entries = match std::fs::read_dir(folder) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(e)),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(io)?;
        let file_name = entry.file_name();
        let Some((target, pid)) = file_name.to_str().and_then(parse_partial) else {
            continue;
        };
        if target == name && pid != std::process::id() && !running(pid) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(e)),
            }
        }
    }
    Ok(removed)
}

/// Whether process `pid` still runs (Linux: `/proc/{pid}` exists; elsewhere: assume not).
fn running(pid: u32) -> bool {
    let proc = Path::new("/proc");
    proc.join("self").exists() && proc.join(pid.to_string()).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ip2p-io-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn partial_names_round_trip() {
        let p = partial_path(Path::new("out/a.b.png"));
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_partial(name), Some(("a.b.png", std::process::id())));
        assert_eq!(parse_partial("a.png"), None);
        assert_eq!(parse_partial(".a.png.partial"), None);
        assert_eq!(parse_partial(".a.png.x1.partial"), None);
        assert_eq!(parse_partial("..1.partial"), None);
    }

    #[test]
    fn write_replaces_and_leaves_no_temporary() {
        let dir = scratch("write");
        let dest = dir.join("x.bin");
        write(&dest, b"old").unwrap();
        write(&dest, b"new contents").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new contents");
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_failed_fill_keeps_the_old_file() {
        let dir = scratch("fail");
        let dest = dir.join("x.bin");
        write(&dest, b"old").unwrap();
        let err = write_with(&dest, |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(err.path, dest);
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[test]
    fn stale_partials_of_dead_processes_are_removed() {
        let dir = scratch("stale");
        let dest = dir.join("y.png");
        // A pid above Linux's maximum (2^22) never runs.
        let dead = dir.join(".y.png.4194305.partial");
        let other = dir.join(".z.png.4194305.partial");
        let mine = partial_path(&dest);
        for p in [&dead, &other, &mine] {
            std::fs::write(p, b"x").unwrap();
        }
        assert_eq!(remove_stale_partials(&dest).unwrap(), 1);
        assert!(!dead.exists() && other.exists() && mine.exists());
    }
}
