//! Directories that never become usable roots, whatever pool is defined on them: a pool whose
//! directory is `/`, `/dev`, `/proc`, `/sys`, `/etc`, `/boot` or `/var/lib/libvirt` itself would
//! otherwise let any object use (and a clone copy, and a download write) anything below it.
//! Subdirectories (`/var/lib/libvirt/images`) stay usable.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::api::StoragePoolSummary;

/// The directories a pool may not make usable.
pub const UNSAFE_ROOTS: &[&str] = &[
    "/",
    "/dev",
    "/proc",
    "/sys",
    "/etc",
    "/boot",
    "/var/lib/libvirt",
];

/// Whether `dir` (symlinks resolved) is one of [`UNSAFE_ROOTS`] itself.
pub fn is_unsafe(dir: &Path) -> bool {
    UNSAFE_ROOTS.iter().any(|r| dir == Path::new(r))
}

/// The pools whose (resolved) directory is an unsafe root, as `(pool, dir)`.
pub fn unsafe_pools(pools: &[(String, PathBuf)]) -> Vec<(String, PathBuf)> {
    pools
        .iter()
        .filter(|(_, d)| is_unsafe(d))
        .cloned()
        .collect()
}

/// Pools already warned about, so each is logged once (at startup, and when a pool appears or
/// moves), not on every reconcile.
static WARNED: Mutex<Option<HashSet<(String, PathBuf)>>> = Mutex::new(None);

/// Drops the pools whose directory is an unsafe root from `pools` (name, resolved directory),
/// logging each the first time it is seen.
pub fn usable(pools: Vec<(String, PathBuf)>) -> Vec<(String, PathBuf)> {
    let bad = unsafe_pools(&pools);
    if !bad.is_empty() {
        let mut warned = WARNED.lock().unwrap_or_else(PoisonError::into_inner);
        let warned = warned.get_or_insert_with(HashSet::new);
        for (pool, dir) in &bad {
            if warned.insert((pool.clone(), dir.clone())) {
                tracing::warn!(
                    pool = %pool,
                    dir = %dir.display(),
                    "storage pool directory is a system directory; virtplane does not use it as an allowed root (define the pool on a subdirectory)"
                );
            }
        }
    }
    pools.into_iter().filter(|(_, d)| !is_unsafe(d)).collect()
}

/// Drops unsafe roots from plain directories (the agent's `--allowed-path` ones, resolved).
pub fn usable_dirs(dirs: Vec<PathBuf>) -> Vec<PathBuf> {
    usable(
        dirs.into_iter()
            .map(|d| ("--allowed-path".to_string(), d))
            .collect(),
    )
    .into_iter()
    .map(|(_, d)| d)
    .collect()
}

/// Logs the pools of `pools` on a system directory not logged before: called with every
/// inventory read, so at startup and whenever the pools change.
pub async fn warn_about(pools: &[StoragePoolSummary]) {
    let pools: Vec<(String, String)> = pools
        .iter()
        .filter(|p| p.active)
        .filter_map(|p| Some((p.name.clone(), p.path.clone()?)))
        .collect();
    // Canonicalising can block: off the async runtime.
    let _ = tokio::task::spawn_blocking(move || {
        usable(
            pools
                .into_iter()
                .filter_map(|(name, dir)| Some((name, std::fs::canonicalize(dir).ok()?)))
                .collect(),
        )
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_directories_themselves_are_unsafe_their_subdirectories_are_not() {
        for dir in UNSAFE_ROOTS {
            assert!(is_unsafe(Path::new(dir)), "{dir}");
        }
        assert!(is_unsafe(Path::new("/var/lib/libvirt/")));
        for dir in [
            "/var/lib/libvirt/images",
            "/srv/pool",
            "/etc2",
            "/var/lib",
            "/devices",
            "/boot/efi",
        ] {
            assert!(!is_unsafe(Path::new(dir)), "{dir}");
        }
    }

    #[test]
    fn unsafe_pools_are_dropped_and_the_others_kept() {
        let pools = vec![
            ("root".to_string(), PathBuf::from("/")),
            (
                "images".to_string(),
                PathBuf::from("/var/lib/libvirt/images"),
            ),
            ("lv".to_string(), PathBuf::from("/var/lib/libvirt")),
            ("etc".to_string(), PathBuf::from("/etc")),
        ];
        assert_eq!(
            unsafe_pools(&pools)
                .into_iter()
                .map(|p| p.0)
                .collect::<Vec<_>>(),
            ["root", "lv", "etc"]
        );
        assert_eq!(
            usable(pools),
            [(
                "images".to_string(),
                PathBuf::from("/var/lib/libvirt/images")
            )]
        );
        assert_eq!(
            usable_dirs(vec![PathBuf::from("/dev"), PathBuf::from("/srv/x")]),
            [PathBuf::from("/srv/x")]
        );
    }
}
