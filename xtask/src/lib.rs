//! `cargo xtask bench`: the backend × path × model × resolution × batch benchmark matrix, and
//! `cargo xtask bench --ops`: each CPU kernel alone at the SD 1.5 shapes (burn vs ip2p vs torch).
//!
//! The library half of the xtask binary, so the smoke test can run cells directly.

pub mod backends;
pub mod cell;
pub mod ops;
pub mod output;
pub mod parity;
pub mod reference;

use std::path::PathBuf;

/// The workspace root (reports go to `<root>/target/bench`, fixtures are read from `<root>/fixtures`):
/// `$IP2P_WORKSPACE` when set (a binary carried to another machine, tools/gpu/check.sh), else
/// where this crate was built.
pub fn workspace_root() -> PathBuf {
    if let Some(root) = std::env::var_os("IP2P_WORKSPACE") {
        return PathBuf::from(root);
    }
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}
