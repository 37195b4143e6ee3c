//! The background work of one IsoDownload, run by the agent's job runner: wait for a download
//! slot, transfer (checking and reserving the file's space once the server answered, before
//! any data is written), and after a transient failure wait (by its own timer) and
//! try again. It writes no status: it reports [`JobProgress`] through its [`JobCtx`] and returns
//! a [`JobResult`]; the reconciler turns both into status.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::Client;
use tokio::sync::watch;

use super::checks::{self, IsoRefusal, Place};
use super::credentials::credentials;
use super::reason::IsoReason;
use super::slots::{Slot, Slots};
use super::space::Reserved;
use crate::agent::jobs::JobCtx;
use crate::agent::refusal::Refusal;
use crate::api::IsoDownloadSpec;
use crate::download::{self, DownloadError, RestartReason};

/// The first wait after a transient failure; it doubles per failed attempt up to
/// [`RETRY_MAX`], and starts over once an attempt received data.
pub const RETRY_FIRST: Duration = Duration::from_secs(5);
/// The longest wait between attempts.
pub const RETRY_MAX: Duration = Duration::from_secs(300);
/// How long a phase change waits for the reconciler to write it before the transfer goes on.
const ACK_WAIT: Duration = Duration::from_secs(2);

/// The wait after `current`.
pub fn next_backoff(current: Duration) -> Duration {
    (current * 2).min(RETRY_MAX)
}

/// Where a job is.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum JobPhase {
    /// Started; nothing to report yet.
    #[default]
    Starting,
    /// Waiting for one of the node's `limit` download slots.
    Queued {
        /// `--max-downloads`.
        limit: usize,
    },
    /// Transferring (or connecting).
    Downloading,
    /// Checking the data kept from an earlier run against the checksum before resuming.
    VerifyingPartial,
    /// Checking the whole file against the checksum.
    VerifyingFile,
    /// An attempt failed for a transient reason; the next one starts at `at`.
    Retrying {
        /// The failure.
        error: String,
        /// When the next attempt starts.
        at: Timestamp,
        /// How long until then.
        wait: Duration,
        /// Bytes of partial data kept for the next attempt.
        kept: u64,
    },
}

/// What a job reports while it runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobProgress {
    /// Counts the changes worth writing at once (phase, restart); the reconciler acknowledges
    /// each once written.
    pub seq: u64,
    /// Where the job is.
    pub phase: JobPhase,
    /// Attempts so far, the ones of earlier jobs included.
    pub attempts: u32,
    /// Bytes of the file there, when known.
    pub bytes_done: Option<u64>,
    /// The file's length, when announced.
    pub total_bytes: Option<u64>,
    /// Transfer rate.
    pub bytes_per_second: Option<u64>,
    /// Whether the server announced support for resuming.
    pub accepts_ranges: bool,
    /// Why an attempt last started again from byte 0.
    pub restarted: Option<RestartReason>,
}

/// How a job ended.
#[derive(Clone, Debug, PartialEq)]
pub enum JobResult {
    /// The file is in place (its record next to it).
    Completed {
        /// The file.
        finished: download::Finished,
        /// A sentence on something noteworthy (a restart from byte 0).
        note: Option<String>,
    },
    /// The download failed for good.
    Failed(IsoRefusal),
    /// Stopped as asked (pause, deletion, shutdown); partial data kept.
    Stopped,
}

/// What a job needs.
pub struct JobInput {
    /// To read the Secret and ConfigMap the spec names.
    pub client: Client,
    /// The object's namespace.
    pub namespace: String,
    /// The spec.
    pub spec: IsoDownloadSpec,
    /// The object's UID, the owner of the finished file.
    pub owner: Option<String>,
    /// Where the file goes.
    pub place: Place,
    /// Attempts made by earlier jobs (`status.attempts`).
    pub base_attempts: u32,
    /// The node's download slots, shared fairly between namespaces.
    pub slots: Arc<Slots>,
    /// How many slots there are.
    pub limit: usize,
    /// The node's download limits.
    pub settings: super::settings::DownloadSettings,
    /// Space reserved in the pools by the downloads in flight.
    pub space: Arc<super::space::Reservations>,
    /// The last progress `seq` the reconciler wrote.
    pub written: watch::Receiver<u64>,
}

/// How one attempt ended, short of success.
enum Stop {
    Error(DownloadError),
    Refused(IsoRefusal),
}

/// A failure of the downloader for good, with the message the user sees.
pub fn failure(e: &DownloadError) -> IsoRefusal {
    let message = match e {
        DownloadError::DestinationNotAllowed { default: true, .. } => format!(
            "{e}: loopback, private, link-local and multicast networks are refused unless an \
             administrator opens a mirror's network with the agent's --download-allow-cidr."
        ),
        DownloadError::DestinationNotAllowed { .. } => {
            format!(
                "{e} (the agent's --download-deny-cidr or --service-cidr, or a pod range of the cluster)."
            )
        }
        DownloadError::TooLarge { .. } => format!(
            "{e}. Raise spec.maxBytes if the file is expected to be this large (the node's \
             --download-max-bytes caps it)."
        ),
        DownloadError::CorruptImage { .. } => format!(
            "{e}. Check the file on the server (a compressed image that is cut short or \
             damaged); spec.checksum catches a damaged copy before it is decompressed."
        ),
        DownloadError::UnsafeImage { .. } => format!(
            "{e}. Download a standalone image (qemu-img convert -O qcow2 flattens one), or \
             make an overlay with a VirtualMachineStorage instead."
        ),
        DownloadError::ErrorPage { .. } => format!(
            "{e}. Check that the URL still points at the file (an expired or moved link serves \
             a page); set spec.allowMarkup only if the file really is such a document."
        ),
        DownloadError::BelowFloor { .. } => format!(
            "{e}. Free space in the pool (the node keeps --download-min-free-bytes free), then \
             create the IsoDownload again."
        ),
        _ => format!("{e}."),
    };
    Refusal::fix(IsoReason::of(e), message)
}

/// What an attempt's admission check learnt: the server's answer and (on the job's first
/// answer) the space reserved for the file, or why the file does not fit.
#[derive(Default)]
struct Admission(std::sync::Mutex<Option<Admitted>>);

type Admitted = Result<(download::RemoteInfo, Option<Reserved>), IsoRefusal>;

impl Admission {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Admitted>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records the server's answer; with `reserve`, reserves its space first.
    fn admit(
        &self,
        info: &download::RemoteInfo,
        url: &str,
        reserve: bool,
        reserved: impl FnOnce() -> Result<Reserved, IsoRefusal>,
    ) -> Result<(), DownloadError> {
        let got = if reserve {
            reserved().map(|r| (info.clone(), Some(r)))
        } else {
            Ok((info.clone(), None))
        };
        let out = match &got {
            Ok(_) => Ok(()),
            Err(r) => Err(DownloadError::NotAdmitted {
                url: url.to_string(),
                why: r.message.clone(),
            }),
        };
        *self.lock() = Some(got);
        out
    }

    fn take_admitted(&self) -> Option<(download::RemoteInfo, Option<Reserved>)> {
        let mut slot = self.lock();
        match slot.take() {
            Some(Ok(v)) => Some(v),
            other => {
                *slot = other;
                None
            }
        }
    }

    fn refusal(&self) -> Option<IsoRefusal> {
        self.lock().take().and_then(Result::err)
    }
}

struct Task {
    input: JobInput,
    job: Arc<JobCtx<JobProgress>>,
    progress: JobProgress,
    remote: Option<download::RemoteInfo>,
    /// The space this job holds in its pool, from the server's first answer to its end.
    reserved: Option<Reserved>,
    received: bool,
}

/// Runs one object's download until it completes, fails for good or is stopped.
pub async fn run(input: JobInput, job: Arc<JobCtx<JobProgress>>) -> JobResult {
    let progress = JobProgress {
        attempts: input.base_attempts,
        ..JobProgress::default()
    };
    Task {
        input,
        job,
        progress,
        remote: None,
        reserved: None,
        received: false,
    }
    .run()
    .await
}

impl Task {
    async fn run(mut self) -> JobResult {
        tracing::debug!(step = "job_started", "download job started");
        let mut backoff = RETRY_FIRST;
        loop {
            let Some(permit) = self.slot().await else {
                return JobResult::Stopped;
            };
            self.progress.attempts += 1;
            self.received = false;
            let outcome = self.attempt().await;
            drop(permit);
            let e = match outcome {
                Ok(done) => return done,
                Err(Stop::Error(DownloadError::Cancelled { .. })) => return JobResult::Stopped,
                Err(Stop::Error(e)) if e.is_transient() => e,
                Err(Stop::Error(e)) => return JobResult::Failed(failure(&e)),
                Err(Stop::Refused(r)) => return JobResult::Failed(r),
            };
            if self.received {
                backoff = RETRY_FIRST;
            }
            let kept = self.kept().await;
            let at = Timestamp::now()
                .checked_add(backoff)
                .unwrap_or_else(|_| Timestamp::now());
            tracing::info!(attempt = self.progress.attempts, ?backoff, error = %e, "download attempt failed; retrying");
            self.progress.phase = JobPhase::Retrying {
                error: e.to_string(),
                at,
                wait: backoff,
                kept,
            };
            self.progress.bytes_per_second = None;
            self.milestone().await;
            tokio::select! {
                () = self.job.cancel.cancelled() => return JobResult::Stopped,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = next_backoff(backoff);
        }
    }

    async fn kept(&self) -> u64 {
        let p = &self.input.place;
        download::partial_len(&p.dir, &p.name).await.unwrap_or(0)
    }

    /// Reports a change worth writing at once and waits (briefly) until the reconciler wrote
    /// it, so that a short phase (checking kept data) is seen.
    async fn milestone(&mut self) {
        let seq = self.announce();
        let written = &mut self.input.written;
        tokio::select! {
            _ = tokio::time::timeout(ACK_WAIT, written.wait_for(|w| *w >= seq)) => {}
            () = self.job.cancel.cancelled() => {}
        }
    }

    /// Reports a change worth writing at once without waiting for the write; returns its seq.
    fn announce(&mut self) -> u64 {
        self.progress.seq += 1;
        self.job.report(self.progress.clone());
        self.job.wake_now();
        self.progress.seq
    }

    /// Takes what the transfer's admission learnt (the server's answer, the space reserved);
    /// whether it is the first answer of this job, to be announced.
    fn admitted(&mut self, admission: &Admission) -> bool {
        let Some((info, reserved)) = admission.take_admitted() else {
            return false;
        };
        tracing::debug!(step = "admitted", total = ?info.total_bytes, ranges = info.accepts_ranges, "the server answered; space reserved");
        if reserved.is_some() {
            self.reserved = reserved;
        }
        self.progress.total_bytes = info.total_bytes.or(self.progress.total_bytes);
        self.progress.accepts_ranges = info.accepts_ranges;
        self.progress.phase = JobPhase::Downloading;
        self.remote.replace(info).is_none()
    }

    /// A download slot; `None` when stopped while waiting in the queue.
    async fn slot(&mut self) -> Option<Slot> {
        let slots = self.input.slots.clone();
        let namespace = self.input.namespace.clone();
        if let Some(p) = Slots::try_acquire(&slots, &namespace) {
            return Some(p);
        }
        self.progress.phase = JobPhase::Queued {
            limit: self.input.limit,
        };
        self.progress.bytes_per_second = None;
        self.milestone().await;
        tokio::select! {
            p = Slots::acquire(&slots, &namespace) => p,
            () = self.job.cancel.cancelled() => None,
        }
    }

    /// One attempt: a single transfer attempt that resumes from the partial data; the file's
    /// space is checked and reserved once the server first answered.
    async fn attempt(&mut self) -> Result<JobResult, Stop> {
        let input = &self.input;
        let place = input.place.clone();
        let (auth, tls) = credentials(&input.client, &input.namespace, &input.spec)
            .await
            .map_err(Stop::Refused)?;
        let mut request = download::DownloadRequest {
            auth,
            tls,
            ..checks::own_request(&input.spec, input.owner.clone(), &place.dir, &place.name)
        };
        let options = input.settings.options(input.spec.max_bytes);
        // What the server said is learnt from the transfer's own request, not a probe first:
        // once it answered, and before any data is written, the file's rest must fit in the
        // pool (space reserved from then until the job ends).
        request.expected_size = self.remote.as_ref().and_then(|i| i.total_bytes);
        let uid = input.owner.clone().unwrap_or_default();
        // Decompressing a disk image writes more than the reserved bytes: it keeps the floor
        // and what the other downloads in flight reserved free.
        let options = download::DownloadOptions {
            min_free_bytes: Some(
                input
                    .settings
                    .min_free_bytes
                    .saturating_add(input.space.others(&place.dir, &uid)),
            ),
            ..options
        };
        let (space, floor) = (input.space.clone(), input.settings.min_free_bytes);
        let (pool, url) = (input.spec.pool.clone(), checks::redact_url(&input.spec.url));
        let kept = self.kept().await;
        self.progress.bytes_done = Some(kept);
        let admission = Admission::default();
        let reserve = self.reserved.is_none();
        let admit = |info: &download::RemoteInfo| {
            admission.admit(info, &url, reserve, || {
                let space_of = checks::Space {
                    total: info.total_bytes,
                    kept,
                    available: place.available,
                    floor,
                    pool: &pool,
                };
                space.reserve(&place.dir, &uid, space_of.need(), |others| {
                    space_of.check(others)
                })
            })
        };
        if self.remote.is_some() {
            // A later attempt: what the server said is known; the transfer starts while the
            // reconciler writes the Downloading status.
            self.progress.phase = JobPhase::Downloading;
            self.announce();
        }
        tracing::debug!(step = "transfer_started", "starting the transfer");

        let (tx, mut rx) = watch::channel(download::Progress::default());
        let metrics = crate::metrics::get();
        metrics.downloads_in_flight.inc();
        let cancel = self.job.cancel.clone();
        let work = download::download_once_admitted(&request, &options, &cancel, &tx, &admit);
        tokio::pin!(work);
        let mut counted = kept;
        let result = loop {
            tokio::select! {
                r = &mut work => break r,
                changed = rx.changed() => {
                    if changed.is_err() { continue; }
                    if self.admitted(&admission) {
                        // The transfer runs while the reconciler writes Downloading.
                        self.announce();
                    }
                    let p = rx.borrow_and_update().clone();
                    if matches!(p.phase, download::Phase::Starting | download::Phase::Connecting) {
                        // Not transferring yet: the phase stays until the server answered.
                        continue;
                    }
                    if p.bytes_done > p.resumed_from {
                        self.received = true;
                    }
                    let before = (self.progress.phase.clone(), self.progress.restarted);
                    if p.restarted.is_some() {
                        self.progress.restarted = p.restarted;
                    }
                    if p.phase == download::Phase::Completed {
                        continue;
                    }
                    self.progress.phase = match p.phase {
                        download::Phase::VerifyingPartial => JobPhase::VerifyingPartial,
                        download::Phase::Finalizing if request.checksum.is_some() => JobPhase::VerifyingFile,
                        _ => JobPhase::Downloading,
                    };
                    metrics.downloaded_bytes.inc_by(p.bytes_done.saturating_sub(counted));
                    counted = counted.max(p.bytes_done);
                    self.progress.bytes_done = Some(p.bytes_done);
                    self.progress.total_bytes = p.total_bytes.or(self.progress.total_bytes);
                    self.progress.bytes_per_second = Some(p.bytes_per_second);
                    if before != (self.progress.phase.clone(), self.progress.restarted) {
                        self.milestone().await;
                    } else {
                        self.job.report(self.progress.clone());
                    }
                }
            }
        };
        metrics.downloads_in_flight.dec();
        self.admitted(&admission);
        if let Some(refusal) = admission.refusal() {
            return Err(Stop::Refused(refusal));
        }
        let outcome = result.map_err(Stop::Error)?;
        metrics
            .downloaded_bytes
            .inc_by(outcome.bytes.saturating_sub(counted));
        let note = outcome.note().or_else(|| {
            self.progress
                .restarted
                .map(|r| format!("Downloaded from the beginning again because {r}."))
        });
        let path = outcome.path.clone();
        let format = tokio::task::spawn_blocking(move || crate::image::sniff::sniff_file(&path))
            .await
            .ok()
            .and_then(Result::ok);
        Ok(JobResult::Completed {
            finished: download::Finished {
                format,
                path: outcome.path.clone(),
                bytes: outcome.bytes,
                checksum_verified: outcome.checksum_verified,
                compression: outcome.compression,
            },
            note,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_up_to_five_minutes() {
        let mut w = RETRY_FIRST;
        let mut seen = vec![w.as_secs()];
        for _ in 0..8 {
            w = next_backoff(w);
            seen.push(w.as_secs());
        }
        assert_eq!(seen, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }

    #[test]
    fn permanent_failures_keep_the_downloader_reason() {
        let denied = DownloadError::DestinationNotAllowed {
            url: "http://h/".into(),
            host: "h".into(),
            addr: "127.0.0.1".parse().unwrap(),
            network: "127.0.0.1/32".into(),
            default: false,
        };
        let r = failure(&denied);
        assert_eq!(r.reason, IsoReason::DestinationNotAllowed);
        assert!(
            r.message
                .ends_with("(the agent's --download-deny-cidr or --service-cidr, or a pod range of the cluster)."),
            "{}",
            r.message
        );
        let nf = DownloadError::NotFound {
            url: "http://h/a".into(),
            reply: "404".into(),
        };
        let r = failure(&nf);
        assert_eq!(r.reason, IsoReason::NotFound);
        assert!(r.message.ends_with('.'));
    }
}
