//! Decides what one reconcile of an IsoDownload does, from its spec, its status and what was
//! observed. Pure: no client, no libvirt, no filesystem, no clock.

use std::path::PathBuf;

use super::checks::{self, IsoRefusal, Place, as_started};
use super::job::{JobProgress, JobResult};
use super::observe::{JobState, Observed, pool_path};
use super::reason::IsoReason;
use crate::agent::refusal::Refusal;
use crate::api::{DownloadPhase, DownloadTarget, DownloadedVolume, IsoDownload, ReclaimPolicy};
use crate::download;

/// A file's place: directory and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct At {
    /// The pool's directory.
    pub dir: PathBuf,
    /// The volume name.
    pub name: String,
}

/// What to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Nothing: the object is finished, or the agent is shutting down.
    Nothing,
    /// Pause the running job, then count the data kept at `at`.
    Pause {
        /// What the download started with.
        target: DownloadTarget,
        /// Where its partial data is.
        at: Option<At>,
    },
    /// Stay paused with `kept` bytes of partial data.
    StayPaused {
        /// What the download started with.
        target: DownloadTarget,
        /// Bytes kept.
        kept: u64,
    },
    /// Start the job.
    Start {
        /// Where the file goes.
        place: Place,
        /// The download was paused before.
        resumed: bool,
        /// A new download: what it starts with, recorded in the status by the same pass while
        /// the job connects (the job writes nothing before the server answered).
        record: Option<DownloadTarget>,
    },
    /// Report the running job's progress.
    Progress(JobProgress),
    /// The file is in place: refresh the pool, write Completed, then remove the record.
    Complete {
        /// The volume.
        volume: DownloadedVolume,
        /// The file.
        finished: download::Finished,
        /// A sentence on something noteworthy.
        note: Option<String>,
        /// Attempts, when a job just made them.
        attempts: Option<u32>,
        /// Where the record is.
        at: At,
    },
    /// The pool is not granted (any more): stop a running job keeping its partial data, change
    /// nothing else, and wait for a grant.
    Refuse {
        /// Why.
        refusal: IsoRefusal,
        /// A job runs and must be stopped first.
        stop: bool,
    },
    /// Fail for good: stop the job, remove partial data at `discard`, report.
    Fail {
        /// Why.
        refusal: IsoRefusal,
        /// A job runs and must be abandoned first.
        stop: bool,
        /// Partial data to remove.
        discard: Option<At>,
    },
}

/// What a cleanup removes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// The completed volume, under `reclaimPolicy: Delete`.
    pub delete: Option<DownloadedVolume>,
    /// The record of a finished download.
    pub clear_record: Option<At>,
    /// Partial data.
    pub discard: Option<At>,
}

fn at_of(dir: PathBuf, name: &str) -> At {
    At {
        dir,
        name: name.to_string(),
    }
}

/// The started place by the recorded (or spec) pool's directory, for removing partial data.
fn started_at(obj: &IsoDownload, observed: &Observed) -> Option<At> {
    if let Some(f) = &observed.files {
        return (!f.foreign_partial).then(|| at_of(f.dir.clone(), &f.name));
    }
    let spec = as_started(obj);
    let name = checks::volume_name(&spec).ok()?;
    let dir = pool_path(observed.pools.as_deref()?, &spec.pool)?;
    Some(at_of(dir, &name))
}

fn completed(
    obj: &IsoDownload,
    finished: download::Finished,
    note: Option<String>,
    attempts: Option<u32>,
    name: &str,
) -> Plan {
    let pool = as_started(obj).pool;
    let dir = finished
        .path
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    Plan::Complete {
        volume: DownloadedVolume {
            pool,
            name: name.to_string(),
            path: finished.path.display().to_string(),
        },
        finished,
        note,
        attempts,
        at: at_of(dir, name),
    }
}

/// Decides an apply pass.
pub fn plan(obj: &IsoDownload, observed: &Observed) -> Plan {
    let status = obj.status.clone().unwrap_or_default();
    let spec = &obj.spec;
    if matches!(
        status.phase,
        Some(DownloadPhase::Completed | DownloadPhase::Failed)
    ) || observed.stopping
    {
        return Plan::Nothing;
    }
    let running = matches!(observed.job, JobState::Running(_));
    if let Some(change) = checks::spec_change(spec, status.target.as_ref()) {
        return Plan::Fail {
            refusal: Refusal::fix(
                IsoReason::SpecChanged,
                format!(
                    "{change} after the download started; spec.url, spec.name and spec.pool cannot change."
                ),
            ),
            stop: running,
            discard: started_at(obj, observed),
        };
    }
    // The spec did not change since the start: its pool is the started one. A grant revoked
    // midway stops the transfer (partial data kept) until the pool is granted again.
    if !observed.grants.pool(&spec.pool) {
        return Plan::Refuse {
            refusal: Refusal::fix(
                IsoReason::NotGranted,
                observed.grants.pool_refusal(&spec.pool),
            ),
            stop: running,
        };
    }
    match &observed.job {
        JobState::Running(progress) => {
            if spec.paused {
                return Plan::Pause {
                    target: status.target.clone().unwrap_or_else(|| {
                        checks::target_of(spec, &checks::volume_name(spec).unwrap_or_default())
                    }),
                    at: started_at(obj, observed),
                };
            }
            return Plan::Progress(progress.clone());
        }
        JobState::Ended(JobResult::Completed { finished, note }, last) => {
            let name = status
                .target
                .as_ref()
                .map(|t| t.name.clone())
                .or_else(|| checks::volume_name(spec).ok())
                .unwrap_or_default();
            return completed(
                obj,
                finished.clone(),
                note.clone(),
                Some(last.attempts).filter(|a| *a > 0),
                &name,
            );
        }
        JobState::Ended(JobResult::Failed(refusal), _) => {
            // A name conflict found by the downloader: the file there is someone else's.
            let discard = (refusal.reason != IsoReason::NameConflict)
                .then(|| started_at(obj, observed))
                .flatten();
            return Plan::Fail {
                refusal: refusal.clone(),
                stop: false,
                discard,
            };
        }
        JobState::Ended(JobResult::Stopped, _) | JobState::None => {}
    }
    let place = match checks::place(
        spec,
        observed.pools.as_deref().unwrap_or_default(),
        &observed.node,
    ) {
        Ok(p) => p,
        Err(refusal) => {
            return Plan::Fail {
                refusal,
                stop: false,
                discard: None,
            };
        }
    };
    let files = observed.files.clone().unwrap_or_default();
    if let Some(finished) = files.finished {
        // The file is in place but the Completed status was never written.
        return completed(obj, finished, None, None, &place.name);
    }
    if files.exists {
        return Plan::Fail {
            refusal: checks::name_conflict(&spec.pool, &place.name),
            stop: false,
            discard: None,
        };
    }
    if files.foreign_partial {
        return Plan::Fail {
            refusal: checks::partial_conflict(&spec.pool, &place.name),
            stop: false,
            discard: None,
        };
    }
    let target = checks::target_of(spec, &place.name);
    if spec.paused {
        return Plan::StayPaused {
            target,
            kept: files.partial,
        };
    }
    Plan::Start {
        place,
        resumed: status.phase == Some(DownloadPhase::Paused),
        record: status.target.is_none().then_some(target),
    }
}

/// Decides a cleanup: partial data always goes; the completed volume under `Delete`.
pub fn cleanup(obj: &IsoDownload, observed: &Observed) -> Cleanup {
    let status = obj.status.clone().unwrap_or_default();
    let delete = obj.spec.reclaim_policy == ReclaimPolicy::Delete;
    if status.phase == Some(DownloadPhase::Completed) {
        let Some(vol) = status.volume else {
            return Cleanup::default();
        };
        let record = std::path::Path::new(&vol.path)
            .parent()
            .map(|d| at_of(d.to_path_buf(), &vol.name));
        return Cleanup {
            delete: delete.then_some(vol),
            // A record of the finished download left by a failed removal.
            clear_record: record,
            discard: None,
        };
    }
    let Some(files) = observed.files.as_ref().filter(|f| !f.foreign_partial) else {
        return Cleanup::default();
    };
    let at = at_of(files.dir.clone(), &files.name);
    let mut out = Cleanup {
        discard: Some(at.clone()),
        ..Cleanup::default()
    };
    if let Some(finished) = &files.finished {
        // Finished, but deleted before the Completed status was written: the volume is this
        // object's all the same.
        out.delete = delete.then(|| DownloadedVolume {
            pool: as_started(obj).pool,
            name: files.name.clone(),
            path: finished.path.display().to_string(),
        });
        out.clear_record = Some(at);
    }
    out
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
