//! The downloads of this node: their jobs (in the agent's job runner), the download slots, the
//! deny list, and when each object's progress was last written.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::Stream;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::watch;

use super::job::{JobProgress, JobResult};
use super::settings::DownloadSettings;
use crate::agent::jobs::{Jobs, Stop};
use crate::api::IsoDownload;

/// Progress of a running download is written at most this often.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What was last written for one object's job.
struct Written {
    /// Tells the job which progress `seq` is written.
    acks: watch::Sender<u64>,
    /// The last `seq` written, and when.
    last: Option<(u64, Instant)>,
}

/// Downloads of this node.
pub struct Downloads {
    pub(super) jobs: Jobs<IsoDownload, JobProgress, JobResult>,
    pub(super) slots: Arc<super::slots::Slots>,
    pub(super) limit: usize,
    pub(super) settings: DownloadSettings,
    pub(super) space: Arc<super::space::Reservations>,
    stopping: AtomicBool,
    written: Mutex<HashMap<String, Written>>,
}

impl Downloads {
    /// At most `settings.max_downloads` transfers at once, within `settings`' limits.
    pub fn new(settings: DownloadSettings) -> Self {
        let limit = settings.max_downloads.max(1);
        Self {
            jobs: Jobs::new(PROGRESS_EVERY),
            slots: super::slots::Slots::new(limit),
            limit,
            settings,
            space: Arc::default(),
            stopping: AtomicBool::new(false),
            written: Mutex::default(),
        }
    }

    /// The objects whose download made progress or ended; taken once, for `reconcile_on`.
    pub fn wakeups(&self) -> impl Stream<Item = ObjectRef<IsoDownload>> + Send + 'static {
        self.jobs.wakeups()
    }

    /// Stops every transfer, keeping partial data: the agent is shutting down and the next one
    /// resumes.
    pub fn stop_all(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.jobs.stop_all();
    }

    /// Whether the agent is shutting down.
    pub(super) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn written_map(&self) -> MutexGuard<'_, HashMap<String, Written>> {
        self.written.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh acknowledgement channel for `uid`'s next job.
    pub(super) fn acks(&self, uid: &str) -> watch::Receiver<u64> {
        let (tx, rx) = watch::channel(0);
        self.written_map().insert(
            uid.to_string(),
            Written {
                acks: tx,
                last: None,
            },
        );
        rx
    }

    /// `None` when progress `seq` of `uid` is due for a write (new, or the last write is
    /// [`PROGRESS_EVERY`] old); else how long until it is.
    pub(super) fn due(&self, uid: &str, seq: u64) -> Option<Duration> {
        let map = self.written_map();
        let (last_seq, at) = map.get(uid)?.last?;
        if last_seq != seq {
            return None;
        }
        PROGRESS_EVERY.checked_sub(at.elapsed())
    }

    /// Progress `seq` of `uid` is written; its job may go on.
    pub(super) fn written(&self, uid: &str, seq: u64) {
        if let Some(w) = self.written_map().get_mut(uid) {
            w.last = Some((seq, Instant::now()));
            w.acks.send_replace(seq);
        }
    }

    /// Asks `uid`'s job to stop and waits for it to end.
    pub(super) async fn stop(&self, uid: &str, why: Stop) {
        if let Some(handle) = self.jobs.stop(uid, why) {
            let _ = handle.await;
        }
    }

    /// Forgets `uid` (the object is gone).
    pub(super) fn forget(&self, uid: &str) {
        self.written_map().remove(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn progress_is_written_when_new_and_then_once_a_second() {
        let d = Downloads::new(DownloadSettings::default());
        let mut rx = d.acks("u");
        assert_eq!(d.due("u", 1), None, "never written");
        d.written("u", 1);
        assert_eq!(*rx.borrow_and_update(), 1, "the job hears of it");
        assert!(d.due("u", 1).is_some(), "the same progress again waits");
        assert_eq!(d.due("u", 2), None, "a new phase goes at once");
        assert_eq!(d.due("other", 1), None);
        d.forget("u");
        assert_eq!(d.due("u", 1), None);
    }

    #[tokio::test]
    async fn stop_all_marks_the_agent_stopping() {
        let d = Downloads::new(DownloadSettings {
            max_downloads: 0,
            ..DownloadSettings::default()
        });
        assert_eq!(d.limit, 1, "at least one slot");
        assert!(!d.stopping());
        d.stop_all();
        assert!(d.stopping());
    }
}
