//! The agent's own record, on the node, of the files each clone task created: a copy or a UEFI
//! variable store is recorded once the task has created it exclusively (so never a file that
//! was there before), and a task that does not complete removes exactly what its record lists.
//! Paths in `status` are never trusted for a removal: anyone with status-write rights can edit
//! them.
//!
//! One JSON file per task, `<state-dir>/clones/<uid>.json`, written atomically.
//!
//! A task reserves its names when it is planned, before anything is copied: each copy's
//! destination is created (empty) exclusively, and the clone's domain name is claimed by an
//! exclusive create of `<state-dir>/clones/names/<hex of the name>` holding the task's UID. Two
//! tasks planned at once thus never share a name: the second finds it taken and plans the next.
//! A claim is recorded like a file, and dropped once the task completes (the domain then holds
//! the name) or is removed.

use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::Semaphore;

/// What the agent keeps for clone tasks on this node: the records and the copy slots.
#[derive(Clone)]
pub struct NodeSide {
    /// Where the records are.
    pub dir: PathBuf,
    /// Clone jobs that may copy at once (`--max-clones`).
    pub slots: Arc<Semaphore>,
}

impl NodeSide {
    /// Records under `state_dir/clones`, `max_clones` copying at once.
    pub fn new(state_dir: &Path, max_clones: usize) -> Self {
        Self {
            dir: state_dir.join("clones"),
            slots: Arc::new(Semaphore::new(max_clones.max(1))),
        }
    }

    /// The record of task `uid`.
    pub fn ledger(&self, uid: &str) -> Ledger {
        Ledger {
            path: self.dir.join(format!("{}.json", sanitize(uid))),
            claims: self.dir.join("names"),
        }
    }
}

impl Default for NodeSide {
    fn default() -> Self {
        Self::new(Path::new("/var/lib/virtplane"), 2)
    }
}

/// A UID as a file name (UIDs are UUIDs; anything else is made harmless).
fn sanitize(uid: &str) -> String {
    uid.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A domain name as a file name, exactly (libvirt names may hold any character).
fn hex(name: &str) -> String {
    name.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The record of one task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ledger {
    pub(super) path: PathBuf,
    /// Where domain-name claims are.
    claims: PathBuf,
}

impl Ledger {
    /// The files recorded (none when there is no record).
    pub fn files(&self) -> Vec<PathBuf> {
        std::fs::read(&self.path)
            .ok()
            .and_then(|d| serde_json::from_slice::<Vec<PathBuf>>(&d).ok())
            .unwrap_or_default()
    }

    /// Whether `path` was created by this task.
    pub fn owns(&self, path: &Path) -> bool {
        self.files().iter().any(|p| p == path)
    }

    /// Records `path` as created by this task. Blocking.
    pub fn record(&self, path: &Path) -> std::io::Result<()> {
        let mut files = self.files();
        if files.iter().any(|p| p == path) {
            return Ok(());
        }
        files.push(path.to_path_buf());
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(&files).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }

    /// Removes `path` if this task created it (a file this task did not create stays);
    /// whether it was removed. Blocking.
    pub fn remove_own(&self, path: &Path) -> std::io::Result<bool> {
        if !self.owns(path) {
            return Ok(false);
        }
        match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates `path` empty and exclusively for this task and records it: whether it is this
    /// task's now (created now, or before by this task); `false` when someone else's file is
    /// there, which is left untouched. Blocking.
    pub fn reserve_file(&self, path: &Path) -> std::io::Result<bool> {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => self.record(path).map(|()| true),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(self.owns(path)),
            Err(e) => Err(e),
        }
    }

    /// Claims the domain name `name` for task `uid` on this node, and records the claim:
    /// whether the name is this task's now; `false` when another task holds it. Blocking.
    pub fn claim_name(&self, uid: &str, name: &str) -> std::io::Result<bool> {
        std::fs::create_dir_all(&self.claims)?;
        let path = self.claims.join(hex(name));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut f) => {
                f.write_all(uid.as_bytes())?;
                f.sync_all()?;
            }
            // This task's own claim from an earlier attempt (say, before an agent restart).
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                if std::fs::read(&path)? != uid.as_bytes() {
                    return Ok(false);
                }
            }
            Err(e) => return Err(e),
        }
        self.record(&path).map(|()| true)
    }

    /// Removes every file recorded, then the record. Blocking.
    pub fn remove_all(&self) -> std::io::Result<()> {
        for f in self.files() {
            match std::fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        self.forget()
    }

    /// Drops the record and the task's name claims, keeping the files (the task completed:
    /// they are the clone's). Blocking.
    pub fn forget(&self) -> std::io::Result<()> {
        for f in self.files().iter().filter(|f| f.starts_with(&self.claims)) {
            match std::fs::remove_file(f) {
                Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_recorded_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let side = NodeSide::new(&dir.path().join("state"), 1);
        let ledger = side.ledger("u-1/../x");
        assert!(ledger.path.starts_with(dir.path().join("state/clones")));
        let mine = dir.path().join("mine.qcow2");
        let theirs = dir.path().join("theirs.qcow2");
        std::fs::write(&mine, b"m").unwrap();
        std::fs::write(&theirs, b"t").unwrap();
        assert!(ledger.files().is_empty());
        ledger.record(&mine).unwrap();
        ledger.record(&mine).unwrap();
        assert_eq!(ledger.files(), vec![mine.clone()]);
        assert!(!ledger.remove_own(&theirs).unwrap(), "not this task's");
        assert!(theirs.exists());
        ledger.remove_all().unwrap();
        assert!(!mine.exists() && theirs.exists());
        assert!(ledger.files().is_empty(), "the record is gone too");
        // A record of files already gone is fine; forgetting keeps the files.
        ledger.record(&theirs).unwrap();
        ledger.forget().unwrap();
        assert!(theirs.exists());
        ledger.forget().unwrap();
    }

    #[test]
    fn names_are_reserved_exclusively_and_claims_end_with_the_task() {
        let dir = tempfile::tempdir().unwrap();
        let side = NodeSide::new(&dir.path().join("state"), 1);
        let (one, two) = (side.ledger("u-1"), side.ledger("u-2"));
        let copy = dir.path().join("disk-clone1.img");
        assert!(one.reserve_file(&copy).unwrap());
        assert!(one.reserve_file(&copy).unwrap(), "its own, again");
        assert!(!two.reserve_file(&copy).unwrap(), "taken");
        assert_eq!(std::fs::metadata(&copy).unwrap().len(), 0);
        assert!(one.claim_name("u-1", "web/clone1").unwrap());
        assert!(
            one.claim_name("u-1", "web/clone1").unwrap(),
            "its own, again"
        );
        assert!(!two.claim_name("u-2", "web/clone1").unwrap(), "taken");
        assert!(two.claim_name("u-2", "web-clone1").unwrap(), "another name");
        // A task that does not complete frees both; the other task's claim stays.
        one.remove_all().unwrap();
        assert!(!copy.exists());
        assert!(two.claim_name("u-2", "web/clone1").unwrap(), "free again");
        // A completed task keeps its files and frees its names.
        assert!(two.reserve_file(&copy).unwrap());
        two.forget().unwrap();
        assert!(copy.exists());
        assert!(one.claim_name("u-1", "web-clone1").unwrap());
        assert!(one.claim_name("u-1", "web/clone1").unwrap());
    }
}
