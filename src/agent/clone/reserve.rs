//! Reserving a plan's names on the node before anything is copied: the clone's domain name
//! (a claim in the agent's state directory) and each copy's destination (created empty and
//! exclusively in its pool), both recorded in the task's [`Ledger`]. Two tasks of the same
//! source planned seconds apart see the same free names; the first to reserve a name keeps it,
//! and the other plans again around it. Nothing here deletes a file the task did not create.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::block::into_pool;
use super::ledger::Ledger;
use super::plan::{self, Decision, Observed, Plan};
use super::reason::CloneReason;
use crate::agent::context::ReconcileError;
use crate::agent::refusal::Refusal;
use crate::api::{VMCloneSpec, VMCloneStatus};
use crate::libvirt::LibvirtError;

/// Plans tried before the task waits: each retry follows a name another task took meanwhile.
const ATTEMPTS: usize = 8;

/// What another task holds: names to plan around.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Taken {
    /// Domain names claimed by another task.
    pub names: Vec<String>,
    /// Destinations that exist and are not this task's.
    pub paths: Vec<PathBuf>,
}

impl Taken {
    fn is_empty(&self) -> bool {
        self.names.is_empty() && self.paths.is_empty()
    }
}

/// Reserves `plan`'s domain name and copy destinations for task `uid`: everything, or (when
/// another task holds some) nothing, with what was taken. Blocking.
pub fn reserve(
    plan: &Plan,
    uid: &str,
    ledger: &Ledger,
) -> Result<Taken, (PathBuf, std::io::Error)> {
    let mut taken = Taken::default();
    let claimed = ledger
        .claim_name(uid, &plan.target)
        .map_err(|e| (PathBuf::from(&plan.target), e))?;
    if !claimed {
        taken.names.push(plan.target.clone());
        return Ok(taken);
    }
    for d in &plan.disks {
        let (None, Some(target)) = (d.strategy.as_deref(), &d.target) else {
            continue;
        };
        // A copy inside its pool names a volume, not a path: libvirt's create refuses a
        // taken name, and the task's volume list records it (`volume_ledger`).
        if into_pool(d) {
            continue;
        }
        let path = Path::new(target);
        match ledger.reserve_file(path) {
            Ok(true) => {}
            Ok(false) => taken.paths.push(path.to_path_buf()),
            Err(e) => {
                release(ledger);
                return Err((path.to_path_buf(), e));
            }
        }
    }
    if !taken.is_empty() {
        release(ledger);
    }
    Ok(taken)
}

/// Removes what this task reserved. Before a task has started, that is all its record holds (a
/// plan whose status was never written). Blocking.
pub fn release(ledger: &Ledger) {
    if let Err(error) = ledger.remove_all() {
        tracing::warn!(%error, "failed to release the task's reservations");
    }
}

/// [`plan::decide`], with a started plan's names reserved; a name another task took meanwhile
/// is planned around (`observed` learns it).
pub async fn decide(
    spec: &VMCloneSpec,
    uid: &str,
    node: &str,
    status: &VMCloneStatus,
    observed: &mut Observed,
    ledger: &Ledger,
) -> Result<Decision, ReconcileError> {
    for _ in 0..ATTEMPTS {
        let decision = plan::decide(spec, uid, node, status, observed);
        let Decision::Start(p) = &decision else {
            return Ok(decision);
        };
        let (p2, uid2, ledger2) = (p.clone(), uid.to_string(), ledger.clone());
        let reserved = tokio::task::spawn_blocking(move || reserve(&p2, &uid2, &ledger2))
            .await
            .map_err(LibvirtError::from)?;
        match reserved {
            Ok(t) if t.is_empty() => return Ok(decision),
            Ok(t) => {
                tracing::info!(names = ?t.names, paths = ?t.paths, "names taken by another task; planning again");
                observed.names.extend(t.names);
                observed.existing.extend(t.paths);
            }
            Err((path, e)) => {
                return Ok(Decision::Refuse(Refusal::fix(
                    CloneReason::CopyFailed,
                    format!(
                        "Reserving {} for the clone failed: {e}. Nothing was copied.",
                        path.display()
                    ),
                )));
            }
        }
    }
    Ok(Decision::Wait(Refusal::wait(
        CloneReason::NameConflict,
        "Other clones of this source keep taking the names this one plans; it plans again shortly.",
        Duration::from_secs(5),
    )))
}

#[cfg(test)]
mod tests {
    use super::super::plan::SHARED;
    use super::*;
    use crate::api::{CloneDisk, CopyKind};

    fn plan_of(target: &str, dir: &Path, files: &[&str]) -> Plan {
        let mut disks: Vec<CloneDisk> = files
            .iter()
            .map(|f| CloneDisk {
                source: format!("/src/{f}"),
                target: Some(dir.join(f).display().to_string()),
                kind: Some(CopyKind::File),
                ..Default::default()
            })
            .collect();
        // A new volume of a pool: libvirt creates it, nothing is reserved here.
        disks.push(CloneDisk {
            source: "/dev/vg/lv".into(),
            target: Some("lv-clone1".into()),
            pool: Some("vg".into()),
            kind: Some(CopyKind::PoolVolume),
            ..Default::default()
        });
        disks.push(CloneDisk {
            source: "/iso/shared.iso".into(),
            target: Some("/iso/shared.iso".into()),
            strategy: Some(SHARED.into()),
            ..Default::default()
        });
        Plan {
            target: target.into(),
            disks,
        }
    }

    #[test]
    fn a_plan_is_reserved_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let side = super::super::ledger::NodeSide::new(&dir.path().join("state"), 1);
        let (one, two) = (side.ledger("u-1"), side.ledger("u-2"));
        let p1 = plan_of("web-clone1", dir.path(), &["a-clone1.img", "b-clone1.img"]);
        assert_eq!(reserve(&p1, "u-1", &one).unwrap(), Taken::default());
        assert!(dir.path().join("a-clone1.img").exists());
        assert_eq!(
            one.files().len(),
            3,
            "the name and two copies, not the shared disk or the pool's volume"
        );
        // The same plan for another task: its domain name is taken; nothing is created.
        let t = reserve(&p1, "u-2", &two).unwrap();
        assert_eq!(t.names, ["web-clone1"]);
        assert!(two.files().is_empty());
        // Another name but one destination taken: what it reserved is released again.
        let p2 = plan_of("web-clone2", dir.path(), &["a-clone2.img", "b-clone1.img"]);
        let t = reserve(&p2, "u-2", &two).unwrap();
        assert_eq!(t.paths, [dir.path().join("b-clone1.img")]);
        assert!(!dir.path().join("a-clone2.img").exists());
        assert!(two.files().is_empty());
        assert!(dir.path().join("b-clone1.img").exists(), "the other task's");
        // Again for the first task: all its own already.
        assert_eq!(reserve(&p1, "u-1", &one).unwrap(), Taken::default());
    }
}
