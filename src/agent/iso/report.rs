//! Turns what an IsoDownload's apply pass did, or its job's progress, into its status fields,
//! its Ready and Progressing conditions and its Events. Pure: the time comes in as `now`.

use super::checks::redact_url;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{Timestamp, Unit};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::apply::Outcome;
use super::job::{JobPhase, JobProgress};
use super::plan::At;
use super::reason::IsoReason;
use crate::agent::refusal::Reason;
use crate::api::{DownloadPhase, IsoDownload, IsoDownloadStatus, condition};
use crate::conditions::Desired;
use crate::download;

/// A status write: the fields and both conditions.
#[derive(Clone, Debug, PartialEq)]
pub struct Write {
    /// The agent's status fields.
    pub status: IsoDownloadStatus,
    /// Ready.
    pub ready: Desired<'static>,
    /// Progressing.
    pub progressing: Desired<'static>,
}

/// What to write and publish, and when to look again.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The status to write; `None` leaves it.
    pub write: Option<Write>,
    /// Events to publish after the write.
    pub events: Vec<(EventType, &'static str, String)>,
    /// When to reconcile again.
    pub action: Action,
    /// The job progress (`seq`) the write carries: throttled, and acknowledged once written.
    pub progress: Option<u64>,
    /// The record of a finished download, removed once the Completed status is written.
    pub clear: Option<At>,
}

impl Report {
    fn new(write: Option<Write>) -> Self {
        Self {
            write,
            events: Vec::new(),
            action: Action::await_change(),
            progress: None,
            clear: None,
        }
    }
}

/// `status.progress` for `done` of `total` bytes, rounded down.
pub fn percent(done: u64, total: Option<u64>) -> Option<String> {
    let p = download::Progress {
        bytes_done: done,
        total_bytes: total,
        ..download::Progress::default()
    };
    p.percent().map(|x| format!("{x}%"))
}

fn both(
    reason: IsoReason,
    message: String,
    ready: bool,
    progressing: bool,
) -> (Desired<'static>, Desired<'static>) {
    let r = reason.as_str();
    let d = |type_, on, m: String| {
        if on {
            Desired::truthy(type_, r, m)
        } else {
            Desired::falsy(type_, r, m)
        }
    };
    (
        d(condition::READY, ready, message.clone()),
        d(condition::PROGRESSING, progressing, message),
    )
}

fn write(
    status: IsoDownloadStatus,
    reason: IsoReason,
    message: String,
    ready: bool,
    progressing: bool,
) -> Write {
    let (ready, progressing) = both(reason, message, ready, progressing);
    Write {
        status,
        ready,
        progressing,
    }
}

/// The message while transferring.
fn downloading(obj: &IsoDownload, p: &JobProgress) -> String {
    let mut msg = format!(
        "Downloading {} into pool {}.",
        redact_url(&obj.spec.url),
        obj.spec.pool
    );
    if let Some(r) = p.restarted {
        msg.push_str(&format!(
            " Downloading from the beginning again because {r}."
        ));
    } else if !p.accepts_ranges {
        msg.push_str(
            " The server does not announce support for resuming: a pause or an interruption restarts from the beginning.",
        );
    }
    msg
}

/// The status while a job runs.
fn progress(obj: &IsoDownload, node: &str, p: &JobProgress, now: Timestamp) -> Report {
    let prev = obj.status.clone().unwrap_or_default();
    let mut st = prev.clone();
    if st.target.is_none() {
        // The pass that started the job failed to record its target: record it now.
        st.target = super::checks::volume_name(&obj.spec)
            .ok()
            .map(|name| super::checks::target_of(&obj.spec, &name));
    }
    if p.attempts > 0 {
        st.attempts = Some(p.attempts);
    }
    let counts = |st: &mut IsoDownloadStatus| {
        st.downloaded_bytes = p.bytes_done.or(st.downloaded_bytes);
        st.total_bytes = p.total_bytes.or(st.total_bytes);
        if let Some(done) = st.downloaded_bytes {
            st.progress = percent(done, st.total_bytes);
        }
        st.bytes_per_second = p.bytes_per_second;
    };
    let mut events = Vec::new();
    let w = match &p.phase {
        JobPhase::Starting => {
            return Report {
                action: Action::requeue(super::downloads::PROGRESS_EVERY),
                ..Report::new(None)
            };
        }
        JobPhase::Queued { limit } => {
            st.phase = Some(DownloadPhase::Pending);
            st.bytes_per_second = None;
            let msg = format!(
                "Queued: {limit} downloads already run on node {node} (the limit, --max-downloads)."
            );
            write(st, IsoReason::Queued, msg, false, false)
        }
        JobPhase::Downloading => {
            counts(&mut st);
            st.phase = Some(DownloadPhase::Downloading);
            let msg = downloading(obj, p);
            if prev.start_time.is_none() {
                st.start_time = Some(Time(now));
                events.push((EventType::Normal, "Started", msg.clone()));
            }
            write(st, IsoReason::Downloading, msg, false, true)
        }
        JobPhase::VerifyingPartial | JobPhase::VerifyingFile => {
            counts(&mut st);
            st.phase = Some(DownloadPhase::Verifying);
            let done = st.downloaded_bytes.unwrap_or(0);
            let msg = if p.phase == JobPhase::VerifyingPartial {
                format!(
                    "Checking the {done} bytes kept from an earlier run against the checksum before resuming."
                )
            } else {
                format!("Verifying the checksum of the {done} bytes downloaded.")
            };
            write(st, IsoReason::Verifying, msg, false, true)
        }
        JobPhase::Retrying {
            error,
            at,
            wait,
            kept,
        } => {
            st.phase = Some(DownloadPhase::Pending);
            st.bytes_per_second = None;
            let resume = if *kept > 0 {
                format!("resuming from the {kept} bytes kept")
            } else {
                "from the beginning".to_string()
            };
            let msg = format!(
                "{error}. Attempt {} failed; the next one starts at {} (in {}s), {resume}.",
                p.attempts,
                at.round(Unit::Second).unwrap_or(*at),
                wait.as_secs()
            );
            write(st, IsoReason::Retrying, msg, false, true)
        }
    };
    Report {
        events,
        progress: Some(p.seq),
        // A safety net: the job's wakeups drive the writes, and its end wakes the object once.
        action: Action::requeue(super::downloads::PROGRESS_EVERY),
        ..Report::new(Some(w))
    }
}

/// What to write and publish for `outcome`.
pub fn report(obj: &IsoDownload, node: &str, outcome: &Outcome, now: Timestamp) -> Report {
    let prev = obj.status.clone().unwrap_or_default();
    match outcome {
        Outcome::Nothing => Report::new(None),
        Outcome::Progress(p) => progress(obj, node, p, now),
        Outcome::Started {
            resumed: _,
            record: Some(target),
        } => {
            let st = IsoDownloadStatus {
                phase: Some(DownloadPhase::Pending),
                target: Some(target.clone()),
                ..prev
            };
            let msg = format!(
                "Starting the download of {} into pool {}.",
                redact_url(&obj.spec.url),
                obj.spec.pool
            );
            Report::new(Some(write(st, IsoReason::Starting, msg, false, true)))
        }
        Outcome::Paused {
            target,
            kept,
            announce,
        } => {
            let st = IsoDownloadStatus {
                phase: Some(DownloadPhase::Paused),
                downloaded_bytes: Some(*kept),
                bytes_per_second: None,
                target: Some(target.clone()),
                ..prev
            };
            let msg = format!(
                "Paused with {kept} bytes kept; set spec.paused to false to resume where it stopped."
            );
            let mut r = Report::new(Some(write(
                st,
                IsoReason::Paused,
                msg.clone(),
                false,
                false,
            )));
            if *announce {
                r.events.push((EventType::Normal, "Paused", msg));
            }
            r
        }
        Outcome::Started {
            resumed,
            record: None,
        } => {
            let mut r = Report::new(None);
            if *resumed {
                r.events.push((
                    EventType::Normal,
                    "Resumed",
                    "Resuming the download.".into(),
                ));
            }
            r
        }
        Outcome::Completed {
            volume,
            finished,
            note,
            attempts,
            at,
        } => {
            let st = IsoDownloadStatus {
                phase: Some(DownloadPhase::Completed),
                downloaded_bytes: Some(finished.bytes),
                total_bytes: Some(finished.bytes),
                progress: Some("100%".into()),
                bytes_per_second: None,
                checksum_verified: Some(finished.checksum_verified),
                format: finished.format.map(|f| f.as_str().to_string()),
                compression: finished.compression.map(|c| c.as_str().to_string()),
                completion_time: Some(Time(now)),
                volume: Some(volume.clone()),
                attempts: attempts.or(prev.attempts),
                ..prev
            };
            let unpacked = finished
                .compression
                .map(|c| format!(", decompressed from {c}"))
                .unwrap_or_default();
            let mut done = format!(
                "{} bytes are in pool {} as volume {}{unpacked}.",
                finished.bytes, volume.pool, volume.name
            );
            if let Some(note) = note {
                done = format!("{done} {note}");
            }
            let reason = IsoReason::Completed.as_str();
            let mut r = Report::new(Some(Write {
                status: st,
                ready: Desired::truthy(condition::READY, reason, done.clone()),
                progressing: Desired::falsy(
                    condition::PROGRESSING,
                    reason,
                    "The download is done.",
                ),
            }));
            r.events.push((EventType::Normal, "Completed", done));
            r.clear = Some(at.clone());
            r
        }
        Outcome::Refused(refusal) => {
            // Waiting, not failed: a Paused download stays Paused, any other one is Pending.
            let phase = match prev.phase {
                Some(DownloadPhase::Paused) => DownloadPhase::Paused,
                _ => DownloadPhase::Pending,
            };
            let again = prev
                .conditions
                .iter()
                .any(|c| c.type_ == condition::READY && c.reason == refusal.reason.as_str());
            let st = IsoDownloadStatus {
                phase: Some(phase),
                bytes_per_second: None,
                ..prev
            };
            let msg = refusal.message.clone();
            let mut r = Report::new(Some(write(st, refusal.reason, msg.clone(), false, false)));
            if !again {
                r.events
                    .push((EventType::Warning, refusal.reason.as_str(), msg));
            }
            r.action = refusal.retry.action();
            r
        }
        Outcome::Failed { refusal, removed } => {
            let mut msg = refusal.message.clone();
            if *removed > 0 {
                msg.push_str(&format!(
                    " The {removed} bytes of partial data were removed."
                ));
            }
            if refusal.reason == IsoReason::SpecChanged {
                msg.push_str(" Delete this object and create a new one for the new file.");
            }
            let st = IsoDownloadStatus {
                phase: Some(DownloadPhase::Failed),
                completion_time: Some(Time(now)),
                bytes_per_second: None,
                ..prev
            };
            let mut r = Report::new(Some(write(st, refusal.reason, msg.clone(), false, false)));
            r.events.push((EventType::Warning, "DownloadFailed", msg));
            r.action = refusal.retry.action();
            r
        }
    }
}

#[cfg(test)]
#[path = "report_tests.rs"]
mod tests;
