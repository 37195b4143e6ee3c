use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::agent::refusal::Refusal;
use crate::api::{DownloadTarget, DownloadedVolume};
use crate::download::RestartReason;

const NOW: i64 = 1_700_000_000;

fn now() -> Timestamp {
    Timestamp::from_second(NOW).unwrap()
}

fn obj(status: IsoDownloadStatus) -> IsoDownload {
    let mut o = IsoDownload::new(
        "d",
        serde_json::from_value(serde_json::json!({"url": "http://h/a.iso", "pool": "p"})).unwrap(),
    );
    o.status = Some(status);
    o
}

fn target() -> DownloadTarget {
    DownloadTarget {
        url: "http://h/a.iso".into(),
        pool: "p".into(),
        name: "a.iso".into(),
    }
}

fn progress(phase: JobPhase) -> JobProgress {
    JobProgress {
        seq: 4,
        phase,
        attempts: 2,
        bytes_done: Some(50),
        total_bytes: Some(200),
        bytes_per_second: Some(10),
        accepts_ranges: true,
        restarted: None,
    }
}

fn conds(r: &Report) -> (bool, &str, bool, &str) {
    let w = r.write.as_ref().unwrap();
    (
        w.ready.status,
        w.ready.reason,
        w.progressing.status,
        w.progressing.reason,
    )
}

fn event_reasons(r: &Report) -> Vec<&'static str> {
    r.events.iter().map(|e| e.1).collect()
}

/// Every reason a running job is reported with, its phase and conditions.
#[test]
fn job_progress_table() {
    let retry = JobPhase::Retrying {
        error: "failed to fetch: HTTP 503".into(),
        at: now(),
        wait: Duration::from_secs(5),
        kept: 0,
    };
    let table = [
        (
            JobPhase::Queued { limit: 1 },
            DownloadPhase::Pending,
            "Queued",
            false,
        ),
        (
            JobPhase::Downloading,
            DownloadPhase::Downloading,
            "Downloading",
            true,
        ),
        (
            JobPhase::VerifyingPartial,
            DownloadPhase::Verifying,
            "Verifying",
            true,
        ),
        (
            JobPhase::VerifyingFile,
            DownloadPhase::Verifying,
            "Verifying",
            true,
        ),
        (retry, DownloadPhase::Pending, "Retrying", true),
    ];
    let prev = IsoDownloadStatus {
        phase: Some(DownloadPhase::Pending),
        target: Some(target()),
        ..IsoDownloadStatus::default()
    };
    for (phase, want, reason, progressing) in table {
        let r = report(
            &obj(prev.clone()),
            "n1",
            &Outcome::Progress(progress(phase.clone())),
            now(),
        );
        assert_eq!(conds(&r), (false, reason, progressing, reason), "{phase:?}");
        let st = &r.write.as_ref().unwrap().status;
        assert_eq!(st.phase, Some(want), "{phase:?}");
        assert_eq!(st.attempts, Some(2), "{phase:?}");
        assert_eq!(st.target, Some(target()), "the target stays");
        assert_eq!(r.progress, Some(4), "{phase:?}: throttled and acknowledged");
        assert_eq!(r.action, Action::requeue(Duration::from_secs(1)));
    }
}

#[test]
fn downloading_counts_and_announces_the_start_once() {
    let r = report(
        &obj(IsoDownloadStatus::default()),
        "n1",
        &Outcome::Progress(progress(JobPhase::Downloading)),
        now(),
    );
    let st = &r.write.as_ref().unwrap().status;
    assert_eq!(
        (
            st.downloaded_bytes,
            st.total_bytes,
            st.progress.as_deref(),
            st.bytes_per_second
        ),
        (Some(50), Some(200), Some("25%"), Some(10))
    );
    assert_eq!(st.start_time, Some(Time(now())));
    assert_eq!(event_reasons(&r), ["Started"]);
    let again = report(
        &obj(st.clone()),
        "n1",
        &Outcome::Progress(progress(JobPhase::Downloading)),
        now(),
    );
    assert!(again.events.is_empty());
}

#[test]
fn download_messages_explain_resuming() {
    let msg = |p: JobProgress| {
        let r = report(
            &obj(IsoDownloadStatus::default()),
            "n1",
            &Outcome::Progress(p),
            now(),
        );
        r.write.unwrap().ready.message
    };
    let p = progress(JobPhase::Downloading);
    assert_eq!(msg(p.clone()), "Downloading http://h/a.iso into pool p.");
    let no_ranges = JobProgress {
        accepts_ranges: false,
        ..p.clone()
    };
    assert!(msg(no_ranges).contains("does not announce support for resuming"));
    let restarted = JobProgress {
        restarted: Some(RestartReason::RangeIgnored),
        ..p
    };
    assert!(
        msg(restarted)
            .contains("from the beginning again because the server does not support resuming")
    );
    let q = msg(progress(JobPhase::Queued { limit: 3 }));
    assert!(q.contains("3 downloads already run on node n1"), "{q}");
    let v = msg(progress(JobPhase::VerifyingPartial));
    assert!(v.contains("Checking the 50 bytes kept"), "{v}");
    let retry = msg(progress(JobPhase::Retrying {
        error: "HTTP 503".into(),
        at: now(),
        wait: Duration::from_secs(10),
        kept: 50,
    }));
    assert!(
        retry.contains("HTTP 503. Attempt 2 failed; the next one starts at")
            && retry.contains("(in 10s), resuming from the 50 bytes kept"),
        "{retry}"
    );
}

#[test]
fn a_job_with_nothing_to_say_writes_nothing() {
    let r = report(
        &obj(IsoDownloadStatus::default()),
        "n1",
        &Outcome::Progress(JobProgress::default()),
        now(),
    );
    assert_eq!(r.write, None);
    assert_eq!(r.progress, None);
    assert_eq!(
        report(
            &obj(IsoDownloadStatus::default()),
            "n1",
            &Outcome::Nothing,
            now()
        )
        .write,
        None
    );
}

#[test]
fn starting_records_the_target() {
    let r = report(
        &obj(IsoDownloadStatus::default()),
        "n1",
        &Outcome::Started {
            resumed: false,
            record: Some(target()),
        },
        now(),
    );
    assert_eq!(conds(&r), (false, "Starting", true, "Starting"));
    let st = &r.write.as_ref().unwrap().status;
    assert_eq!(
        (st.phase, st.target.clone()),
        (Some(DownloadPhase::Pending), Some(target()))
    );
}

#[test]
fn pause_and_resume_events() {
    let paused = |announce| Outcome::Paused {
        target: target(),
        kept: 42,
        announce,
    };
    let prev = IsoDownloadStatus {
        bytes_per_second: Some(9),
        ..IsoDownloadStatus::default()
    };
    let r = report(&obj(prev.clone()), "n1", &paused(true), now());
    assert_eq!(conds(&r), (false, "Paused", false, "Paused"));
    let st = &r.write.as_ref().unwrap().status;
    assert_eq!(
        (st.phase, st.downloaded_bytes, st.bytes_per_second),
        (Some(DownloadPhase::Paused), Some(42), None)
    );
    assert_eq!(event_reasons(&r), ["Paused"]);
    assert!(
        report(&obj(prev.clone()), "n1", &paused(false), now())
            .events
            .is_empty()
    );
    let resumed = report(
        &obj(prev.clone()),
        "n1",
        &Outcome::Started {
            resumed: true,
            record: None,
        },
        now(),
    );
    assert_eq!(
        (resumed.write.is_none(), event_reasons(&resumed)),
        (true, vec!["Resumed"])
    );
    let fresh = report(
        &obj(prev),
        "n1",
        &Outcome::Started {
            resumed: false,
            record: None,
        },
        now(),
    );
    assert!(fresh.events.is_empty() && fresh.write.is_none());
}

#[test]
fn completion_is_ready_and_clears_the_record_after_the_write() {
    let at = At {
        dir: PathBuf::from("/p"),
        name: "a.iso".into(),
    };
    let out = Outcome::Completed {
        volume: DownloadedVolume {
            pool: "p".into(),
            name: "a.iso".into(),
            path: "/p/a.iso".into(),
        },
        finished: download::Finished {
            path: PathBuf::from("/p/a.iso"),
            bytes: 200,
            checksum_verified: true,
            format: Some(crate::image::sniff::Format::Qcow2),
            compression: Some(download::Compression::Xz),
        },
        note: Some("Downloaded from the beginning again because x.".into()),
        attempts: Some(3),
        at: at.clone(),
    };
    let prev = IsoDownloadStatus {
        attempts: Some(2),
        ..IsoDownloadStatus::default()
    };
    let r = report(&obj(prev), "n1", &out, now());
    assert_eq!(conds(&r), (true, "Completed", false, "Completed"));
    let w = r.write.as_ref().unwrap();
    assert_eq!(
        w.ready.message,
        "200 bytes are in pool p as volume a.iso, decompressed from xz. Downloaded from the beginning again because x."
    );
    let st = &w.status;
    assert_eq!(
        (
            st.phase,
            st.downloaded_bytes,
            st.total_bytes,
            st.progress.as_deref()
        ),
        (
            Some(DownloadPhase::Completed),
            Some(200),
            Some(200),
            Some("100%")
        )
    );
    assert_eq!((st.checksum_verified, st.attempts), (Some(true), Some(3)));
    assert_eq!(st.format.as_deref(), Some("qcow2"));
    assert_eq!(st.compression.as_deref(), Some("xz"));
    assert_eq!(st.completion_time, Some(Time(now())));
    assert_eq!(event_reasons(&r), ["Completed"]);
    assert_eq!(r.clear, Some(at));
    assert_eq!(r.progress, None, "not throttled");
}

/// Every reason a download fails with: phase Failed, both conditions False with the reason,
/// one Warning, and the partial data removed said so.
#[test]
fn every_failure_reason() {
    use crate::agent::refusal::Reason;
    let waiting = [
        IsoReason::Queued,
        IsoReason::Downloading,
        IsoReason::Verifying,
        IsoReason::Paused,
        IsoReason::Completed,
        IsoReason::Retrying,
        IsoReason::Starting,
    ];
    for reason in IsoReason::ALL
        .iter()
        .copied()
        .filter(|r| !waiting.contains(r))
    {
        assert!(!reason.waiting(), "{reason:?}");
        for removed in [0, 1024] {
            let out = Outcome::Failed {
                refusal: Refusal::fix(reason, "It broke."),
                removed,
            };
            let r = report(&obj(IsoDownloadStatus::default()), "n1", &out, now());
            let name = reason.as_str();
            assert_eq!(conds(&r), (false, name, false, name));
            let w = r.write.as_ref().unwrap();
            assert_eq!(w.status.phase, Some(DownloadPhase::Failed));
            assert_eq!(w.status.completion_time, Some(Time(now())));
            assert_eq!(
                w.ready
                    .message
                    .contains("The 1024 bytes of partial data were removed."),
                removed > 0,
                "{}",
                w.ready.message
            );
            assert_eq!(
                w.ready
                    .message
                    .ends_with("create a new one for the new file."),
                reason == IsoReason::SpecChanged
            );
            assert_eq!(r.events.len(), 1);
            assert_eq!(
                (r.events[0].0, r.events[0].1),
                (EventType::Warning, "DownloadFailed")
            );
            assert_eq!(r.action, Action::await_change());
        }
    }
    for reason in waiting {
        assert!(reason.waiting(), "{reason:?}");
    }
}

#[test]
fn not_granted_waits_without_failing_and_warns_once() {
    let refusal = Refusal::fix(
        IsoReason::NotGranted,
        "namespace ta may use storage pools none; p is not one of them.",
    );
    let out = Outcome::Refused(refusal);
    let downloading = IsoDownloadStatus {
        phase: Some(DownloadPhase::Downloading),
        bytes_per_second: Some(10),
        downloaded_bytes: Some(50),
        target: Some(target()),
        ..IsoDownloadStatus::default()
    };
    let r = report(&obj(downloading), "n1", &out, now());
    assert_eq!(conds(&r), (false, "NotGranted", false, "NotGranted"));
    let st = &r.write.as_ref().unwrap().status;
    assert_eq!(
        st.phase,
        Some(DownloadPhase::Pending),
        "waiting, not failed"
    );
    assert_eq!((st.downloaded_bytes, st.bytes_per_second), (Some(50), None));
    assert_eq!(event_reasons(&r), ["NotGranted"]);
    assert_eq!(r.action, Action::await_change());
    // Told once: a second pass with the condition already written adds no Event.
    let mut again = r.write.unwrap().status;
    again.conditions = vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        type_: condition::READY.into(),
        status: "False".into(),
        reason: "NotGranted".into(),
        message: String::new(),
        last_transition_time: Time(now()),
        observed_generation: None,
    }];
    let r = report(&obj(again), "n1", &out, now());
    assert!(r.events.is_empty());
    // A paused download stays paused.
    let paused = IsoDownloadStatus {
        phase: Some(DownloadPhase::Paused),
        ..IsoDownloadStatus::default()
    };
    let r = report(&obj(paused), "n1", &out, now());
    assert_eq!(r.write.unwrap().status.phase, Some(DownloadPhase::Paused));
}
