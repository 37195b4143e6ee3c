use std::time::Duration;

use super::*;
use crate::api::CloneStorage;

fn spec() -> VMCloneSpec {
    VMCloneSpec {
        source: "web".into(),
        target_name: None,
        node_name: None,
        storage: CloneStorage::default(),
        start: false,
    }
}

fn now() -> Timestamp {
    Timestamp::from_second(1_700_000_000).unwrap()
}

fn copy(copied: u64, total: u64) -> CloneDisk {
    CloneDisk {
        source: "/p/a.img".into(),
        target: Some("/p/a-clone1.img".into()),
        total_bytes: Some(total),
        copied_bytes: Some(copied),
        ..Default::default()
    }
}

fn copying() -> VMCloneStatus {
    VMCloneStatus {
        phase: Some(ClonePhase::Copying),
        target_name: Some("web-clone1".into()),
        disks: vec![copy(0, 100)],
        progress: Some("0%".into()),
        start_time: Some(Time(now())),
        ..Default::default()
    }
}

/// (phase, Ready reason, Ready status, Progressing status, Warning reasons).
type Summary<'a> = (Option<ClonePhase>, &'a str, bool, bool, Vec<&'a str>);

fn summary(r: &Report) -> Summary<'_> {
    (
        r.status.phase,
        r.ready.reason,
        r.ready.status,
        r.progressing.status,
        r.events
            .iter()
            .filter(|e| e.0 == EventType::Warning)
            .map(|e| e.1)
            .collect(),
    )
}

#[test]
fn every_reason_maps_to_phase_conditions_and_events() {
    use ClonePhase::*;
    let none = VMCloneStatus::default();
    let plan = Plan {
        target: "web-clone1".into(),
        disks: vec![copy(0, 100)],
    };
    let defining = VMCloneStatus {
        phase: Some(Defining),
        ..copying()
    };
    let failed_job = |reason, message: &str| JobEnd::Failed {
        status: copying(),
        why: Refusal::fix(reason, message),
    };
    let done = JobEnd::Completed {
        status: copying(),
        started: None,
    };
    let cases: Vec<(Report, Summary<'_>)> = vec![
        (
            waiting(
                &none,
                Refusal::wait(
                    CloneReason::SourceNotFound,
                    "gone",
                    Duration::from_secs(300),
                ),
            ),
            (Some(Pending), "SourceNotFound", false, false, vec![]),
        ),
        (
            waiting(
                &none,
                Refusal::wait(CloneReason::SourceRunning, "runs", Duration::from_secs(600)),
            ),
            (Some(Pending), "SourceRunning", false, false, vec![]),
        ),
        (
            started(&spec(), &none, plan.clone(), now()),
            (Some(Copying), "Copying", false, true, vec![]),
        ),
        (
            progress(&spec(), &copying(), Some(defining)),
            (Some(Defining), "Defining", false, true, vec![]),
        ),
        (
            finished(&spec(), &copying(), done, now()).unwrap(),
            (Some(Completed), "Completed", true, false, vec![]),
        ),
        (
            finished(
                &spec(),
                &copying(),
                failed_job(CloneReason::CopyFailed, "x"),
                now(),
            )
            .unwrap(),
            (Some(Failed), "CopyFailed", false, false, vec!["CopyFailed"]),
        ),
        (
            finished(
                &spec(),
                &copying(),
                failed_job(CloneReason::DefineFailed, "x"),
                now(),
            )
            .unwrap(),
            (
                Some(Failed),
                "DefineFailed",
                false,
                false,
                vec!["DefineFailed"],
            ),
        ),
        (
            finished(
                &spec(),
                &copying(),
                failed_job(CloneReason::NameConflict, "x"),
                now(),
            )
            .unwrap(),
            (
                Some(Failed),
                "NameConflict",
                false,
                false,
                vec!["NameConflict"],
            ),
        ),
    ];
    for (report, want) in &cases {
        assert_eq!(summary(report), *want);
    }
    for reason in [
        CloneReason::NameConflict,
        CloneReason::InsufficientSpace,
        CloneReason::StorageNotUsable,
        CloneReason::UnsupportedDisk,
    ] {
        let r = refused(&none, Refusal::fix(reason, "no"), now());
        assert_eq!(
            summary(&r),
            (
                Some(Failed),
                reason.as_str(),
                false,
                false,
                vec![reason.as_str()]
            )
        );
        assert_eq!(r.failure, Some(reason));
        assert_eq!(r.status.completion_time, Some(Time(now())));
        assert_eq!(r.action, Action::await_change());
    }
}

#[test]
fn waiting_keeps_the_retry_and_the_status() {
    let prev = VMCloneStatus {
        target_name: Some("t".into()),
        ..Default::default()
    };
    let r = waiting(
        &prev,
        Refusal::wait(CloneReason::SourceRunning, "runs", Duration::from_secs(600)),
    );
    assert_eq!(r.action, Action::requeue(Duration::from_secs(600)));
    assert_eq!(r.status.target_name.as_deref(), Some("t"));
    assert_eq!(r.ready.message, "runs");
    assert_eq!(r.failure, None);
}

#[test]
fn a_start_records_the_plan_and_announces_it_once() {
    let plan = Plan {
        target: "web-clone1".into(),
        disks: vec![copy(0, 100)],
    };
    let r = started(&spec(), &VMCloneStatus::default(), plan.clone(), now());
    assert_eq!(r.status.target_name.as_deref(), Some("web-clone1"));
    assert_eq!(r.status.disks, plan.disks);
    assert_eq!(r.status.progress.as_deref(), Some("0%"));
    assert_eq!(r.status.start_time, Some(Time(now())));
    assert_eq!(
        r.events,
        [(
            EventType::Normal,
            "Started",
            "Cloning web to web-clone1.".to_string()
        )]
    );
    assert_eq!(r.ready.message, "Copying the disks of web for web-clone1.");
    let again = started(&spec(), &r.status, plan, now());
    assert!(again.events.is_empty(), "started before: no second Event");
}

#[test]
fn a_resumed_task_keeps_its_plan() {
    let r = resumed(&spec(), &copying());
    assert_eq!(r.status, copying());
    assert_eq!(r.progressing.reason, "Copying");
    assert!(r.events.is_empty());
}

#[test]
fn progress_comes_from_the_job_not_the_cache() {
    // The cache has not seen the plan yet; the job's view carries it.
    let mut job = copying();
    job.disks = vec![copy(50, 200)];
    let r = progress(&spec(), &VMCloneStatus::default(), Some(job));
    assert_eq!(r.status.target_name.as_deref(), Some("web-clone1"));
    assert_eq!(r.status.progress.as_deref(), Some("25%"));
    assert_eq!(r.status.disks[0].copied_bytes, Some(50));
    assert_eq!(r.action, Action::await_change());
    // No report yet: the status stays.
    let r = progress(&spec(), &copying(), None);
    assert_eq!(r.status, copying());
}

#[test]
fn completion_says_whether_the_clone_started() {
    let end = |started| JobEnd::Completed {
        status: VMCloneStatus {
            target_uuid: Some("uuid-1".into()),
            ..copying()
        },
        started,
    };
    let msg = |started| {
        finished(&spec(), &copying(), end(started), now())
            .unwrap()
            .ready
            .message
    };
    assert_eq!(msg(None), "web-clone1 was cloned from web.");
    assert_eq!(
        msg(Some(Ok(()))),
        "web-clone1 was cloned from web and started."
    );
    assert_eq!(
        msg(Some(Err("no memory".into()))),
        "web-clone1 was cloned from web, but starting it failed: no memory."
    );
    let r = finished(&spec(), &copying(), end(None), now()).unwrap();
    assert_eq!(r.status.progress.as_deref(), Some("100%"));
    assert_eq!(r.status.target_uuid.as_deref(), Some("uuid-1"));
    assert_eq!(r.status.completion_time, Some(Time(now())));
    assert_eq!(r.events[0].1, "Completed");
    assert_eq!(r.progressing.message, "The task is done.");
}

#[test]
fn completion_says_which_overlays_were_flattened_or_share_their_base() {
    let disk = |target: &str, overlay| CloneDisk {
        target: Some(target.into()),
        overlay,
        ..copy(1, 1)
    };
    let status = VMCloneStatus {
        disks: vec![
            disk("/p/a-clone1.qcow2", Some(OverlayCopy::Flattened)),
            disk("/p/b-clone1.qcow2", Some(OverlayCopy::SharedBase)),
            disk("/p/c-clone1.img", None),
        ],
        ..copying()
    };
    let end = JobEnd::Completed {
        status,
        started: None,
    };
    let r = finished(&spec(), &copying(), end, now()).unwrap();
    assert_eq!(
        r.ready.message,
        "web-clone1 was cloned from web. Overlays merged with their backing chain into \
         standalone copies: /p/a-clone1.qcow2. Overlays that share their backing image with the \
         source (keep it in place, or clone with spec.storage.flatten): /p/b-clone1.qcow2."
    );
    assert_eq!(overlays(&[disk("/p/c-clone1.img", None)]), "");
}

#[test]
fn a_stopped_job_reports_nothing() {
    assert!(finished(&spec(), &copying(), JobEnd::Stopped, now()).is_none());
}

#[test]
fn a_failure_keeps_the_disks_the_job_knew() {
    let mut st = copying();
    st.disks.push(CloneDisk {
        source: "/nv/web_VARS.fd".into(),
        target: Some("/nv/web-clone1-web_VARS.fd".into()),
        strategy: Some("Copy".into()),
        ..Default::default()
    });
    let r = finished(
        &spec(),
        &VMCloneStatus::default(),
        JobEnd::Failed {
            status: st,
            why: Refusal::fix(CloneReason::DefineFailed, "bad"),
        },
        now(),
    )
    .unwrap();
    assert_eq!(r.status.disks.len(), 2);
    assert_eq!(r.failure, Some(CloneReason::DefineFailed));
    assert_eq!(r.ready.message, "bad");
}

#[test]
fn progress_counts_copied_disks_only() {
    let disks = vec![
        CloneDisk {
            strategy: Some(SHARED.into()),
            ..Default::default()
        },
        copy(50, 200),
        copy(200, 200),
    ];
    assert_eq!(percent(&disks), "62%");
    assert_eq!(percent(&[]), "100%");
    assert_eq!(percent(&[copy(150, 100)]), "100%", "never above 100%");
}
