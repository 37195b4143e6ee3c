//! One runner for the agent's long work (clone copies, downloads), keyed by object UID.
//!
//! A job gets a cancellation token, a progress channel and a handle. It never writes status: its
//! progress and its end wake the object's reconciler (through [`Jobs::wakeups`], fed to the
//! controller's `reconcile_on`), which reads [`Jobs::progress`] and [`Jobs::finished`] and stays
//! the only status writer of its kind.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::Stream;
use kube::Resource;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Why a job was asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The user paused it: keep what was done, report it paused.
    Pause,
    /// The object is being deleted or its work is void: stop without a word; cleanup follows.
    Abandon,
    /// The agent is shutting down: keep what was done; the next agent resumes.
    Shutdown,
}

/// What a running job sees: its cancellation and where to report progress.
pub struct JobCtx<P> {
    /// Fires when the job should stop; [`JobCtx::stop_reason`] says why.
    pub cancel: CancellationToken,
    why: Arc<Mutex<Option<Stop>>>,
    progress: watch::Sender<P>,
    wake: Box<dyn Fn() + Send + Sync>,
    every: Duration,
    last_wake: Mutex<Option<Instant>>,
}

impl<P> JobCtx<P> {
    /// Publishes progress; wakes the reconciler at most once per interval.
    pub fn report(&self, progress: P) {
        let _ = self.progress.send_replace(progress);
        let mut last = self.last_wake.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= self.every) {
            *last = Some(Instant::now());
            (self.wake)();
        }
    }

    /// Wakes the reconciler now (a phase change worth reporting at once).
    pub fn wake_now(&self) {
        (self.wake)();
    }

    /// Why the job was stopped, once [`JobCtx::cancel`] fired.
    pub fn stop_reason(&self) -> Option<Stop> {
        *self.why.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Entry<P, R> {
    cancel: CancellationToken,
    why: Arc<Mutex<Option<Stop>>>,
    progress: watch::Receiver<P>,
    result: Arc<Mutex<Option<R>>>,
    handle: tokio::task::JoinHandle<()>,
}

impl<P, R> Entry<P, R> {
    fn running(&self) -> bool {
        !self.handle.is_finished()
            && self
                .result
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_none()
    }
}

/// The jobs of one kind, by object UID.
pub struct Jobs<K: Resource, P, R> {
    entries: Mutex<HashMap<String, Entry<P, R>>>,
    wake_tx: mpsc::UnboundedSender<ObjectRef<K>>,
    wake_rx: Mutex<Option<mpsc::UnboundedReceiver<ObjectRef<K>>>>,
    every: Duration,
}

impl<K, P, R> Default for Jobs<K, P, R>
where
    K: Resource<DynamicType = ()> + 'static,
    P: Clone + Default + Send + Sync + 'static,
    R: Send + 'static,
{
    fn default() -> Self {
        Self::new(Duration::from_secs(1))
    }
}

impl<K, P, R> Jobs<K, P, R>
where
    K: Resource<DynamicType = ()> + 'static,
    P: Clone + Default + Send + Sync + 'static,
    R: Send + 'static,
{
    /// A runner whose jobs wake their reconciler at most once per `every` with progress.
    pub fn new(every: Duration) -> Self {
        let (wake_tx, wake_rx) = mpsc::unbounded_channel();
        Self {
            entries: Mutex::default(),
            wake_tx,
            wake_rx: Mutex::new(Some(wake_rx)),
            every,
        }
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<String, Entry<P, R>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The objects whose job made progress or ended; taken once, for `reconcile_on`.
    pub fn wakeups(&self) -> impl Stream<Item = ObjectRef<K>> + Send + 'static {
        let rx = self
            .wake_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        futures::stream::unfold(rx, |rx| async move {
            let mut rx = rx?;
            let next = rx.recv().await?;
            Some((next, Some(rx)))
        })
    }

    /// Starts `work` for `uid` unless a job for it is already running. The object is woken
    /// when the job reports progress and when it ends; its result waits in
    /// [`Jobs::finished`]. Returns whether a job was started.
    pub fn start<F, Fut>(&self, uid: &str, obj: ObjectRef<K>, work: F) -> bool
    where
        F: FnOnce(Arc<JobCtx<P>>) -> Fut,
        Fut: Future<Output = R> + Send + 'static,
    {
        let mut entries = self.entries();
        if entries.get(uid).is_some_and(Entry::running) {
            return false;
        }
        let cancel = CancellationToken::new();
        let why = Arc::new(Mutex::new(None));
        let (tx, rx) = watch::channel(P::default());
        let wake = {
            let (tx, obj) = (self.wake_tx.clone(), obj.clone());
            move || {
                let _ = tx.send(obj.clone());
            }
        };
        let ctx = Arc::new(JobCtx {
            cancel: cancel.clone(),
            why: why.clone(),
            progress: tx,
            wake: Box::new(wake),
            every: self.every,
            last_wake: Mutex::new(None),
        });
        let result = Arc::new(Mutex::new(None));
        let fut = work(ctx.clone());
        let handle = {
            let result = result.clone();
            tokio::spawn(async move {
                let r = fut.await;
                *result.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                ctx.wake_now();
            })
        };
        entries.insert(
            uid.to_string(),
            Entry {
                cancel,
                why,
                progress: rx,
                result,
                handle,
            },
        );
        true
    }

    /// Whether a job for `uid` is running (its result is not in yet).
    pub fn running(&self, uid: &str) -> bool {
        self.entries().get(uid).is_some_and(Entry::running)
    }

    /// The latest progress of `uid`'s job, running or ended.
    pub fn progress(&self, uid: &str) -> Option<P> {
        self.entries().get(uid).map(|e| e.progress.borrow().clone())
    }

    /// The result of `uid`'s job once it ended; the job is forgotten then. The result is in
    /// before the job's end wakes the reconciler, so that wakeup always finds it.
    pub fn finished(&self, uid: &str) -> Option<R> {
        let mut entries = self.entries();
        let result = entries
            .get(uid)?
            .result
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        entries.remove(uid);
        Some(result)
    }

    /// Asks `uid`'s job to stop, saying why; returns the handle to await its end.
    pub fn stop(&self, uid: &str, why: Stop) -> Option<tokio::task::JoinHandle<()>> {
        let entry = self.entries().remove(uid)?;
        *entry.why.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        entry.cancel.cancel();
        Some(entry.handle)
    }

    /// Asks every job to stop (the agent is shutting down; the next agent resumes them).
    pub fn stop_all(&self) {
        for entry in self.entries().values() {
            *entry.why.lock().unwrap_or_else(|p| p.into_inner()) = Some(Stop::Shutdown);
            entry.cancel.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::VMClone;
    use futures::StreamExt;

    fn obj() -> ObjectRef<VMClone> {
        ObjectRef::new("c").within("ns")
    }

    #[tokio::test]
    async fn a_job_reports_progress_and_its_result_through_the_reconciler() {
        let jobs: Jobs<VMClone, u64, &'static str> = Jobs::new(Duration::ZERO);
        let mut wakes = Box::pin(jobs.wakeups());
        assert!(jobs.start("u1", obj(), |ctx| async move {
            ctx.report(42);
            "done"
        }));
        assert_eq!(wakes.next().await, Some(obj()), "progress wakes");
        assert_eq!(wakes.next().await, Some(obj()), "the end wakes");
        assert_eq!(jobs.progress("u1"), Some(42));
        assert_eq!(jobs.finished("u1"), Some("done"));
        assert_eq!(jobs.finished("u1"), None, "taken once");
    }

    #[tokio::test]
    async fn a_job_is_started_once_and_stops_when_asked() {
        let jobs: Jobs<VMClone, (), Option<Stop>> = Jobs::default();
        let started = jobs.start("u1", obj(), |ctx| async move {
            ctx.cancel.cancelled().await;
            ctx.stop_reason()
        });
        assert!(started);
        assert!(
            !jobs.start("u1", obj(), |_| async { None }),
            "already running"
        );
        assert!(jobs.running("u1"));
        let handle = jobs.stop("u1", Stop::Pause).unwrap();
        handle.await.unwrap();
        assert!(!jobs.running("u1"));
        assert!(
            jobs.stop("u1", Stop::Pause).is_none(),
            "forgotten once stopped"
        );
    }
}
