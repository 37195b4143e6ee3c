//! The agent's record of the storage volumes a clone task created inside a pool (copies made by
//! libvirt's create-from-volume), next to its record of files (see [`super::ledger`]):
//! `<state-dir>/clones/<uid>.volumes.json`, written atomically.
//!
//! A volume is recorded under the name chosen just before libvirt creates it, so that an agent
//! that dies during the copy still knows it; a creation that fails drops the name again (libvirt
//! refuses a name that is taken, and removes what a failed copy made). A task that does not
//! complete deletes exactly the volumes recorded here.

use std::io::{ErrorKind, Write};
use std::path::PathBuf;

use super::ledger::Ledger;

/// The volumes of one task, as `(pool, volume)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeLedger {
    path: PathBuf,
}

impl Ledger {
    /// The record of the volumes this task created in pools.
    pub fn volumes(&self) -> VolumeLedger {
        VolumeLedger {
            path: self.path.with_extension("volumes.json"),
        }
    }
}

impl VolumeLedger {
    /// The volumes recorded (none when there is no record).
    pub fn list(&self) -> Vec<(String, String)> {
        std::fs::read(&self.path)
            .ok()
            .and_then(|d| serde_json::from_slice(&d).ok())
            .unwrap_or_default()
    }

    /// Whether volume `name` of pool `pool` is recorded.
    pub fn owns(&self, pool: &str, name: &str) -> bool {
        self.list().iter().any(|(p, n)| p == pool && n == name)
    }

    fn write(&self, list: &[(String, String)]) -> std::io::Result<()> {
        if list.is_empty() {
            return match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(list).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }

    /// Records volume `name` of pool `pool`. Blocking (a small file).
    pub fn record(&self, pool: &str, name: &str) -> std::io::Result<()> {
        let mut list = self.list();
        if !list.iter().any(|(p, n)| p == pool && n == name) {
            list.push((pool.to_string(), name.to_string()));
        }
        self.write(&list)
    }

    /// Drops volume `name` of pool `pool` from the record (the volume stays).
    pub fn drop_one(&self, pool: &str, name: &str) -> std::io::Result<()> {
        let mut list = self.list();
        list.retain(|(p, n)| !(p == pool && n == name));
        self.write(&list)
    }

    /// Drops the whole record (the task completed: the volumes are the clone's).
    pub fn forget(&self) -> std::io::Result<()> {
        self.write(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::super::ledger::NodeSide;

    #[test]
    fn records_volumes_beside_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let side = NodeSide::new(dir.path(), 1);
        let v = side.ledger("u-1").volumes();
        assert!(v.list().is_empty());
        v.record("disk", "loop0p2").unwrap();
        v.record("disk", "loop0p2").unwrap();
        v.record("lvm", "root-clone1").unwrap();
        assert!(v.owns("disk", "loop0p2") && !v.owns("disk", "loop0p1"));
        assert_eq!(side.ledger("u-1").files(), Vec::<std::path::PathBuf>::new());
        v.drop_one("disk", "loop0p2").unwrap();
        assert_eq!(
            v.list(),
            vec![("lvm".to_string(), "root-clone1".to_string())]
        );
        v.forget().unwrap();
        assert!(v.list().is_empty());
        assert!(!dir.path().join("clones/u-1.volumes.json").exists());
    }
}
