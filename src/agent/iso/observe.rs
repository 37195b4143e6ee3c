//! Reads what an IsoDownload's reconcile decides on: its job, the node's storage pools and the
//! files at the place the download started with (the finished record, a file or volume of the
//! name, partial data). The only step of the pipeline that reads.

use std::path::PathBuf;

use kube::ResourceExt;

use super::checks::{self, as_started};
use super::downloads::Downloads;
use super::job::{JobProgress, JobResult};
use crate::api::{DownloadPhase, IsoDownload, StoragePoolSummary};
use crate::download;
use crate::libvirt::LibvirtError;
use crate::libvirt::facade::{Storage, VolumeLookup};
use crate::tenancy::Grants;

/// The object's job.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum JobState {
    /// None runs.
    #[default]
    None,
    /// Running, with its latest progress.
    Running(JobProgress),
    /// Ended since the last reconcile, with its result and last progress.
    Ended(JobResult, JobProgress),
}

/// What is at the place the download started with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Files {
    /// The pool's directory.
    pub dir: PathBuf,
    /// The volume name.
    pub name: String,
    /// This object's finished download is there (the record next to it matches).
    pub finished: Option<download::Finished>,
    /// A file or libvirt volume of the name is there (not looked for when `finished`).
    pub exists: bool,
    /// Bytes of partial data kept.
    pub partial: u64,
    /// The partial data there was started by another object: it is neither resumed nor
    /// removed by this one.
    pub foreign_partial: bool,
}

/// What one reconcile sees.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// This node.
    pub node: String,
    /// The agent is shutting down.
    pub stopping: bool,
    /// The object's job.
    pub job: JobState,
    /// The node's storage pools, when they were needed.
    pub pools: Option<Vec<StoragePoolSummary>>,
    /// The files at the started place, when its pool has a directory and the name is valid
    /// (never looked for in a pool that is not granted).
    pub files: Option<Files>,
    /// What the object's namespace is granted (everything in open mode).
    pub grants: Grants,
}

/// The directory of pool `pool`, active or not (cleanup removes what it can still find).
pub fn pool_path(pools: &[StoragePoolSummary], pool: &str) -> Option<PathBuf> {
    pools
        .iter()
        .find(|p| p.name == pool)
        .and_then(|p| p.path.clone())
        .map(PathBuf::from)
}

/// Whether a reconcile needs the pools and files: not for a finished object, nor for a running
/// job that is neither paused nor changed.
pub fn needs_files(obj: &IsoDownload, running: bool) -> bool {
    let status = obj.status.clone().unwrap_or_default();
    if matches!(
        status.phase,
        Some(DownloadPhase::Completed | DownloadPhase::Failed)
    ) {
        return false;
    }
    !running || obj.spec.paused || checks::spec_change(&obj.spec, status.target.as_ref()).is_some()
}

/// Reads the object's job, and the pools and files when `needs_files` says so and the pool is
/// in `grants` (the object's namespace's).
pub async fn observe<V: Storage>(
    obj: &IsoDownload,
    virt: &V,
    downloads: &Downloads,
    node: &str,
    grants: Grants,
) -> Result<Observed, LibvirtError> {
    let uid = obj.uid().unwrap_or_default();
    let job = if downloads.jobs.running(&uid) {
        JobState::Running(downloads.jobs.progress(&uid).unwrap_or_default())
    } else {
        let last = downloads.jobs.progress(&uid).unwrap_or_default();
        match downloads.jobs.finished(&uid) {
            Some(r) => JobState::Ended(r, last),
            None => JobState::None,
        }
    };
    let mut observed = Observed {
        node: node.to_string(),
        stopping: downloads.stopping(),
        job,
        grants,
        ..Observed::default()
    };
    if !needs_files(obj, matches!(observed.job, JobState::Running(_)))
        || !observed.grants.pool(&as_started(obj).pool)
    {
        return Ok(observed);
    }
    let pools = virt.storage_pools().await?;
    observed.files = files(obj, virt, &pools, true).await;
    observed.pools = Some(pools);
    Ok(observed)
}

/// Reads the pools and the files at the started place, for a cleanup.
pub async fn observe_cleanup<V: Storage>(
    obj: &IsoDownload,
    virt: &V,
    node: &str,
) -> Result<Observed, LibvirtError> {
    let pools = virt.storage_pools().await?;
    Ok(Observed {
        node: node.to_string(),
        files: files(obj, virt, &pools, false).await,
        pools: Some(pools),
        ..Observed::default()
    })
}

/// The files at the started place; `exists` looked for only when `conflicts`.
async fn files<V: Storage>(
    obj: &IsoDownload,
    virt: &V,
    pools: &[StoragePoolSummary],
    conflicts: bool,
) -> Option<Files> {
    let spec = as_started(obj);
    let name = checks::volume_name(&spec).ok()?;
    let dir = pool_path(pools, &spec.pool)?;
    let finished = download::finished(&checks::own_request(&spec, obj.uid(), &dir, &name))
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "failed to look for a finished download");
            None
        });
    let exists = conflicts
        && finished.is_none()
        && (dir.join(&name).exists()
            || matches!(
                virt.volume(&spec.pool, &name).await,
                Ok(VolumeLookup::Found(_))
            ));
    let partial = download::partial_len(&dir, &name).await.unwrap_or(0);
    let owner = download::partial_owner(&dir, &name).await.ok().flatten();
    let foreign_partial = owner.is_some_and(|o| Some(o) != obj.uid());
    Some(Files {
        dir,
        name,
        finished,
        exists,
        partial,
        foreign_partial,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{DownloadTarget, IsoDownloadStatus};
    use crate::libvirt::fake::FakeLibvirt;

    fn obj(phase: Option<DownloadPhase>, paused: bool, url: &str) -> IsoDownload {
        let mut o = IsoDownload::new(
            "d",
            serde_json::from_value(serde_json::json!({"url": url, "pool": "p", "paused": paused}))
                .unwrap(),
        );
        o.metadata.uid = Some("u1".into());
        o.status = Some(IsoDownloadStatus {
            phase,
            target: Some(DownloadTarget {
                url: "http://h/a.iso".into(),
                pool: "p".into(),
                name: "a.iso".into(),
            }),
            ..IsoDownloadStatus::default()
        });
        o
    }

    #[test]
    fn files_are_read_only_when_a_decision_needs_them() {
        let a = "http://h/a.iso";
        let table = [
            (obj(Some(DownloadPhase::Completed), false, a), false, false),
            (obj(Some(DownloadPhase::Failed), true, a), false, false),
            (obj(Some(DownloadPhase::Downloading), false, a), true, false),
            (obj(Some(DownloadPhase::Downloading), true, a), true, true),
            (
                obj(Some(DownloadPhase::Downloading), false, "http://h/b.iso"),
                true,
                true,
            ),
            (obj(Some(DownloadPhase::Paused), true, a), false, true),
            (obj(None, false, a), false, true),
        ];
        for (o, running, want) in table {
            assert_eq!(needs_files(&o, running), want, "{:?} {running}", o.status);
        }
    }

    fn pool(dir: &std::path::Path) -> StoragePoolSummary {
        StoragePoolSummary {
            name: "p".into(),
            type_: "dir".into(),
            path: Some(dir.display().to_string()),
            capacity: 100,
            allocation: 0,
            available: 100,
            active: true,
        }
    }

    #[tokio::test]
    async fn files_at_the_started_place_are_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".a.iso.part"), b"12345").unwrap();
        let fake = FakeLibvirt::default().with_pool(pool(dir.path()));
        let downloads = Downloads::new(crate::agent::DownloadSettings::default());
        let o = obj(Some(DownloadPhase::Paused), true, "http://h/a.iso");
        let seen = observe(&o, &fake, &downloads, "n1", Grants::open())
            .await
            .unwrap();
        assert_eq!(seen.job, JobState::None);
        let files = seen.files.unwrap();
        assert_eq!((files.name.as_str(), files.partial), ("a.iso", 5));
        assert!(!files.exists && files.finished.is_none());

        std::fs::write(dir.path().join("a.iso"), b"x").unwrap();
        let seen = observe(&o, &fake, &downloads, "n1", Grants::open())
            .await
            .unwrap();
        assert!(seen.files.unwrap().exists, "someone else's file");
        assert_eq!(
            fake.calls()
                .iter()
                .filter(|c| *c == "list storage pools")
                .count(),
            2
        );
    }

    #[tokio::test]
    async fn a_finished_object_reads_nothing_from_libvirt() {
        let fake = FakeLibvirt::default();
        let downloads = Downloads::new(crate::agent::DownloadSettings::default());
        let o = obj(Some(DownloadPhase::Completed), false, "http://h/a.iso");
        let seen = observe(&o, &fake, &downloads, "n1", Grants::open())
            .await
            .unwrap();
        assert!(seen.pools.is_none() && seen.files.is_none());
        assert!(fake.calls().is_empty());
    }
}
