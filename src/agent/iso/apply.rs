//! Runs an IsoDownload's plan: starts, pauses or abandons its job, refreshes the pool, removes
//! partial data and volumes. Generic over the libvirt facade so it runs against the in-memory
//! fake in unit tests.

use super::checks::{IsoRefusal, Place};
use super::downloads::Downloads;
use super::job::JobProgress;
use super::plan::{At, Cleanup, Plan};
use crate::agent::jobs::Stop;
use crate::api::{DownloadTarget, DownloadedVolume};
use crate::download;
use crate::libvirt::facade::Storage;

/// What an apply pass did.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Nothing.
    Nothing,
    /// Paused with `kept` bytes; `announce` when a running transfer was just stopped.
    Paused {
        /// What the download started with.
        target: DownloadTarget,
        /// Bytes kept.
        kept: u64,
        /// A running transfer was stopped now.
        announce: bool,
    },
    /// A job started (or one already ran).
    Started {
        /// After a pause.
        resumed: bool,
        /// A new download's target, to record.
        record: Option<DownloadTarget>,
    },
    /// The running job's progress.
    Progress(JobProgress),
    /// The volume is in the pool; its record is removed once the status says so.
    Completed {
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
    /// Refused until something changes (a grant); a running transfer was stopped, its data kept.
    Refused(IsoRefusal),
    /// Failed for good; `removed` bytes of partial data were removed.
    Failed {
        /// Why.
        refusal: IsoRefusal,
        /// Bytes of partial data removed.
        removed: u64,
    },
}

/// Runs `plan` for the object `uid`; `start` starts its job at a place and says whether one
/// was started.
pub async fn apply<V: Storage>(
    virt: &V,
    downloads: &Downloads,
    uid: &str,
    plan: Plan,
    start: impl FnOnce(Place) -> bool,
) -> Outcome {
    match plan {
        Plan::Nothing => Outcome::Nothing,
        Plan::Progress(p) => Outcome::Progress(p),
        Plan::StayPaused { target, kept } => Outcome::Paused {
            target,
            kept,
            announce: false,
        },
        Plan::Pause { target, at } => {
            downloads.stop(uid, Stop::Pause).await;
            let kept = match at {
                Some(at) => download::partial_len(&at.dir, &at.name).await.unwrap_or(0),
                None => 0,
            };
            Outcome::Paused {
                target,
                kept,
                announce: true,
            }
        }
        Plan::Start {
            place,
            resumed,
            record,
        } => {
            if !start(place) {
                tracing::debug!("the download already runs");
            }
            Outcome::Started { resumed, record }
        }
        Plan::Complete {
            volume,
            finished,
            note,
            attempts,
            at,
        } => {
            // libvirt lists the new file once the pool is refreshed.
            if let Err(e) = virt.refresh_pool(&volume.pool).await {
                tracing::warn!(error = %e, pool = %volume.pool, "failed to refresh the pool");
            }
            Outcome::Completed {
                volume,
                finished,
                note,
                attempts,
                at,
            }
        }
        Plan::Refuse { refusal, stop } => {
            if stop {
                downloads.stop(uid, Stop::Pause).await;
            }
            Outcome::Refused(refusal)
        }
        Plan::Fail {
            refusal,
            stop,
            discard,
        } => {
            if stop {
                downloads.stop(uid, Stop::Abandon).await;
            }
            let removed = match discard {
                Some(at) => discard_partial(&at).await,
                None => 0,
            };
            Outcome::Failed { refusal, removed }
        }
    }
}

/// Removes the partial data at `at`; returns how many bytes it held.
async fn discard_partial(at: &At) -> u64 {
    let kept = download::partial_len(&at.dir, &at.name).await.unwrap_or(0);
    match download::discard_partial(&at.dir, &at.name).await {
        Ok(()) => kept,
        Err(e) => {
            tracing::warn!(error = %e, "failed to remove the partial data");
            0
        }
    }
}

/// Removes the record of a finished download (after the Completed status is written).
pub async fn clear_record(at: &At) {
    if let Err(e) = download::clear_finished(&at.dir, &at.name).await {
        tracing::warn!(error = %e, "failed to remove the record of the finished download");
    }
}

/// Runs a cleanup: the volume (through libvirt, or its file when libvirt cannot), the record,
/// the partial data. Everything already gone is fine.
pub async fn cleanup<V: Storage>(virt: &V, plan: &Cleanup) {
    if let Some(vol) = &plan.delete
        && let Err(e) = virt.delete_volume(&vol.pool, &vol.name).await
    {
        tracing::warn!(error = %e, volume = %vol.name, "failed to delete the volume through libvirt; removing its file");
        let _ = tokio::fs::remove_file(&vol.path).await;
    }
    if let Some(at) = &plan.clear_record {
        clear_record(at).await;
    }
    if let Some(at) = &plan.discard {
        let _ = discard_partial(at).await;
    }
}

#[cfg(test)]
#[path = "apply_tests.rs"]
mod tests;
