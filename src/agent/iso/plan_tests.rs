use std::path::PathBuf;

use super::*;
use crate::agent::iso::observe::Files;
use crate::agent::refusal::Retry;
use crate::api::{IsoDownloadStatus, StoragePoolSummary};
use crate::tenancy::Grants;

const URL: &str = "http://h/a.iso";

fn pool(name: &str, active: bool) -> StoragePoolSummary {
    StoragePoolSummary {
        name: name.into(),
        type_: "dir".into(),
        path: Some(format!("/pools/{name}")),
        capacity: 100,
        allocation: 0,
        available: 100,
        active,
    }
}

fn target(url: &str, name: &str) -> DownloadTarget {
    DownloadTarget {
        url: url.into(),
        pool: "p".into(),
        name: name.into(),
    }
}

fn obj(spec: serde_json::Value, status: IsoDownloadStatus) -> IsoDownload {
    let mut spec = spec;
    spec["pool"] = spec.get("pool").cloned().unwrap_or("p".into());
    let mut o = IsoDownload::new("d", serde_json::from_value(spec).unwrap());
    o.metadata.uid = Some("u1".into());
    o.status = Some(status);
    o
}

fn started(phase: DownloadPhase) -> IsoDownloadStatus {
    IsoDownloadStatus {
        phase: Some(phase),
        target: Some(target(URL, "a.iso")),
        ..IsoDownloadStatus::default()
    }
}

fn files(partial: u64) -> Files {
    Files {
        dir: PathBuf::from("/pools/p"),
        name: "a.iso".into(),
        finished: None,
        exists: false,
        partial,
        foreign_partial: false,
    }
}

fn seen(job: JobState, files: Option<Files>) -> Observed {
    Observed {
        node: "n1".into(),
        stopping: false,
        job,
        pools: Some(vec![pool("p", true), pool("off", false)]),
        files,
        grants: Grants::open(),
    }
}

fn finished() -> download::Finished {
    download::Finished {
        format: None,
        compression: None,
        path: PathBuf::from("/pools/p/a.iso"),
        bytes: 10,
        checksum_verified: true,
    }
}

fn at() -> At {
    At {
        dir: PathBuf::from("/pools/p"),
        name: "a.iso".into(),
    }
}

fn running() -> JobState {
    JobState::Running(JobProgress {
        seq: 3,
        ..JobProgress::default()
    })
}

fn failed_job(reason: IsoReason) -> JobState {
    JobState::Ended(
        JobResult::Failed(Refusal::fix(reason, "no")),
        JobProgress::default(),
    )
}

/// Every refusal the plan reports, with whether a job is stopped and partial data removed.
#[test]
fn every_reason_the_plan_reports() {
    use serde_json::json;
    let fresh = IsoDownloadStatus::default;
    let table: Vec<(&str, IsoDownload, Observed, IsoReason, bool, bool)> = vec![
        (
            "bad port",
            obj(json!({"url": "http://h:99999/a.iso"}), fresh()),
            seen(JobState::None, None),
            IsoReason::InvalidUrl,
            false,
            false,
        ),
        (
            "no file in the URL",
            obj(json!({"url": "http://h/"}), fresh()),
            seen(JobState::None, None),
            IsoReason::InvalidName,
            false,
            false,
        ),
        (
            "no such pool",
            obj(json!({"url": URL, "pool": "nope"}), fresh()),
            seen(JobState::None, None),
            IsoReason::PoolNotFound,
            false,
            false,
        ),
        (
            "inactive pool",
            obj(json!({"url": URL, "pool": "off"}), fresh()),
            seen(JobState::None, None),
            IsoReason::PoolNotFound,
            false,
            false,
        ),
        (
            "someone else's file",
            obj(json!({"url": URL}), fresh()),
            seen(
                JobState::None,
                Some(Files {
                    exists: true,
                    ..files(0)
                }),
            ),
            IsoReason::NameConflict,
            false,
            false,
        ),
        (
            "another object's paused data of the name",
            obj(json!({"url": URL}), fresh()),
            seen(
                JobState::None,
                Some(Files {
                    foreign_partial: true,
                    ..files(7)
                }),
            ),
            IsoReason::NameConflict,
            false,
            false,
        ),
        (
            "url changed while running",
            obj(
                json!({"url": "http://h/b.iso", "name": "a.iso"}),
                started(DownloadPhase::Downloading),
            ),
            seen(running(), Some(files(5))),
            IsoReason::SpecChanged,
            true,
            true,
        ),
        (
            "name changed while paused",
            obj(
                json!({"url": URL, "name": "b.iso", "paused": true}),
                started(DownloadPhase::Paused),
            ),
            seen(JobState::None, Some(files(5))),
            IsoReason::SpecChanged,
            false,
            true,
        ),
        (
            "no room",
            obj(json!({"url": URL}), started(DownloadPhase::Pending)),
            seen(failed_job(IsoReason::InsufficientSpace), Some(files(5))),
            IsoReason::InsufficientSpace,
            false,
            true,
        ),
        (
            "credentials",
            obj(json!({"url": URL}), started(DownloadPhase::Pending)),
            seen(failed_job(IsoReason::CredentialsNotFound), Some(files(0))),
            IsoReason::CredentialsNotFound,
            false,
            true,
        ),
        (
            "denied",
            obj(json!({"url": URL}), started(DownloadPhase::Pending)),
            seen(failed_job(IsoReason::DestinationNotAllowed), None),
            IsoReason::DestinationNotAllowed,
            false,
            true,
        ),
        (
            "an error page deletes only this object's data",
            obj(json!({"url": URL}), started(DownloadPhase::Downloading)),
            seen(failed_job(IsoReason::ErrorPage), Some(files(5))),
            IsoReason::ErrorPage,
            false,
            true,
        ),
        (
            "a failure never removes another object's data",
            obj(json!({"url": URL}), started(DownloadPhase::Downloading)),
            seen(
                failed_job(IsoReason::TooLarge),
                Some(Files {
                    foreign_partial: true,
                    ..files(5)
                }),
            ),
            IsoReason::TooLarge,
            false,
            false,
        ),
        (
            "the downloader found a file there",
            obj(json!({"url": URL}), started(DownloadPhase::Downloading)),
            seen(failed_job(IsoReason::NameConflict), Some(files(0))),
            IsoReason::NameConflict,
            false,
            false,
        ),
    ];
    for (what, o, observed, reason, stop, discard) in table {
        match plan(&o, &observed) {
            Plan::Fail {
                refusal,
                stop: s,
                discard: d,
            } => {
                assert_eq!(refusal.reason, reason, "{what}: {}", refusal.message);
                assert_eq!(s, stop, "{what}: stop");
                assert_eq!(d.is_some(), discard, "{what}: discard {d:?}");
                if let Some(d) = d {
                    assert_eq!(d, at(), "{what}");
                }
            }
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[test]
fn a_spec_change_names_the_field_and_asks_for_a_new_object() {
    let o = obj(
        serde_json::json!({"url": URL, "pool": "q"}),
        started(DownloadPhase::Paused),
    );
    let Plan::Fail { refusal, .. } = plan(&o, &seen(JobState::None, None)) else {
        panic!()
    };
    assert!(
        refusal.message.starts_with("spec.pool changed from p to q"),
        "{}",
        refusal.message
    );
}

#[test]
fn finished_and_stopping_objects_are_left_alone() {
    for phase in [DownloadPhase::Completed, DownloadPhase::Failed] {
        let o = obj(serde_json::json!({"url": "http://h/b.iso"}), started(phase));
        assert_eq!(plan(&o, &seen(JobState::None, None)), Plan::Nothing);
    }
    let o = obj(
        serde_json::json!({"url": URL}),
        started(DownloadPhase::Pending),
    );
    let mut observed = seen(JobState::None, Some(files(0)));
    observed.stopping = true;
    assert_eq!(plan(&o, &observed), Plan::Nothing);
}

#[test]
fn a_new_download_starts_and_records_its_target_in_the_same_pass() {
    let o = obj(
        serde_json::json!({"url": URL}),
        IsoDownloadStatus::default(),
    );
    let observed = seen(JobState::None, Some(files(0)));
    // A new download starts at once and records its target in the same pass.
    let Plan::Start {
        place,
        resumed,
        record,
    } = plan(&o, &observed)
    else {
        panic!()
    };
    assert_eq!(place.name, "a.iso");
    assert_eq!(place.dir, PathBuf::from("/pools/p"));
    assert!(!resumed);
    assert_eq!(record, Some(target(URL, "a.iso")));
    // Recorded already: started again without recording.
    let o = obj(
        serde_json::json!({"url": URL}),
        started(DownloadPhase::Pending),
    );
    let Plan::Start { record, .. } = plan(&o, &observed) else {
        panic!()
    };
    assert_eq!(record, None);
}

#[test]
fn pause_and_resume() {
    let paused = serde_json::json!({"url": URL, "paused": true});
    // A running job is paused; its data counted where it started.
    let o = obj(paused.clone(), started(DownloadPhase::Downloading));
    assert_eq!(
        plan(&o, &seen(running(), Some(files(4)))),
        Plan::Pause {
            target: target(URL, "a.iso"),
            at: Some(at())
        }
    );
    // Created paused, or paused already: stays so with what is kept.
    let o = obj(paused, IsoDownloadStatus::default());
    assert_eq!(
        plan(&o, &seen(JobState::None, Some(files(7)))),
        Plan::StayPaused {
            target: target(URL, "a.iso"),
            kept: 7
        }
    );
    // Unpaused: a new job, announced as resumed.
    let o = obj(
        serde_json::json!({"url": URL}),
        started(DownloadPhase::Paused),
    );
    let Plan::Start { resumed, .. } = plan(&o, &seen(JobState::None, Some(files(7)))) else {
        panic!()
    };
    assert!(resumed);
    // A job stopped by the agent's shutdown is started again by the next agent.
    let o = obj(
        serde_json::json!({"url": URL}),
        started(DownloadPhase::Downloading),
    );
    let stopped = JobState::Ended(JobResult::Stopped, JobProgress::default());
    assert!(matches!(
        plan(&o, &seen(stopped, Some(files(7)))),
        Plan::Start { resumed: false, .. }
    ));
}

#[test]
fn a_running_job_reports_its_progress() {
    let o = obj(
        serde_json::json!({"url": URL}),
        started(DownloadPhase::Downloading),
    );
    let JobState::Running(p) = running() else {
        unreachable!()
    };
    assert_eq!(plan(&o, &seen(running(), None)), Plan::Progress(p));
}

#[test]
fn completion_from_the_job_and_from_the_record_alone() {
    let o = obj(
        serde_json::json!({"url": URL}),
        started(DownloadPhase::Downloading),
    );
    let done = JobState::Ended(
        JobResult::Completed {
            finished: finished(),
            note: Some("again".into()),
        },
        JobProgress {
            attempts: 3,
            ..JobProgress::default()
        },
    );
    let Plan::Complete {
        volume,
        note,
        attempts,
        at: a,
        ..
    } = plan(&o, &seen(done, None))
    else {
        panic!()
    };
    assert_eq!(
        (
            volume.pool.as_str(),
            volume.name.as_str(),
            volume.path.as_str()
        ),
        ("p", "a.iso", "/pools/p/a.iso")
    );
    assert_eq!((note.as_deref(), attempts), (Some("again"), Some(3)));
    assert_eq!(a, at());

    // After a crash: the record says the file is ours, even while paused.
    let o = obj(
        serde_json::json!({"url": URL, "paused": true}),
        started(DownloadPhase::Paused),
    );
    let mine = Files {
        finished: Some(finished()),
        ..files(0)
    };
    let Plan::Complete { note, attempts, .. } = plan(&o, &seen(JobState::None, Some(mine))) else {
        panic!()
    };
    assert_eq!((note, attempts), (None, None));
}

#[test]
fn cleanup_removes_partial_data_and_deleted_volumes_only() {
    let volume = DownloadedVolume {
        pool: "p".into(),
        name: "a.iso".into(),
        path: "/pools/p/a.iso".into(),
    };
    let completed = IsoDownloadStatus {
        volume: Some(volume.clone()),
        ..started(DownloadPhase::Completed)
    };
    let retain = obj(serde_json::json!({"url": URL}), completed.clone());
    let delete = obj(
        serde_json::json!({"url": URL, "reclaimPolicy": "Delete"}),
        completed,
    );
    let none = seen(JobState::None, Some(files(0)));
    assert_eq!(
        cleanup(&retain, &none),
        Cleanup {
            delete: None,
            clear_record: Some(at()),
            discard: None
        }
    );
    assert_eq!(cleanup(&delete, &none).delete, Some(volume.clone()));

    // Not completed: partial data goes; a finished file found by its record too under Delete.
    let running = obj(
        serde_json::json!({"url": URL, "reclaimPolicy": "Delete"}),
        started(DownloadPhase::Downloading),
    );
    assert_eq!(
        cleanup(&running, &seen(JobState::None, Some(files(3)))),
        Cleanup {
            delete: None,
            clear_record: None,
            discard: Some(at())
        }
    );
    let mine = Files {
        finished: Some(finished()),
        ..files(0)
    };
    assert_eq!(
        cleanup(&running, &seen(JobState::None, Some(mine))),
        Cleanup {
            delete: Some(volume),
            clear_record: Some(at()),
            discard: Some(at())
        }
    );
    // Another object's partial data of the name: never removed by this one.
    let theirs = Files {
        foreign_partial: true,
        ..files(3)
    };
    assert_eq!(
        cleanup(&running, &seen(JobState::None, Some(theirs))),
        Cleanup::default()
    );
    // Nothing found (the pool is gone): nothing to do.
    assert_eq!(
        cleanup(&running, &seen(JobState::None, None)),
        Cleanup::default()
    );
}

/// Namespace `ta`, granted `pools` (namespaced mode).
fn granted(pools: &str) -> Grants {
    let ann = [(crate::tenancy::POOLS.to_string(), pools.to_string())].into();
    Grants::of(crate::tenancy::Mode::Namespaced, "ta", &ann)
}

#[test]
fn only_a_granted_pool_is_downloaded_into() {
    use serde_json::json;
    let with = |grants: Grants, job: JobState| Observed {
        grants,
        ..seen(job, Some(files(0)))
    };
    let fresh = obj(json!({"url": URL}), IsoDownloadStatus::default());
    // Granted, or open mode: the download goes ahead.
    for g in [granted("p"), Grants::open()] {
        let Plan::Start { record, .. } = plan(&fresh, &with(g, JobState::None)) else {
            panic!()
        };
        assert_eq!(record, Some(checks::target_of(&fresh.spec, "a.iso")));
    }
    // Not granted: refused before the pool is looked at (no PoolNotFound for a pool that is
    // not the namespace's), waiting for a grant.
    for (what, o) in [
        ("another tenant's pool", fresh.clone()),
        (
            "a pool that does not exist",
            obj(
                json!({"url": URL, "pool": "nope"}),
                IsoDownloadStatus::default(),
            ),
        ),
    ] {
        let Plan::Refuse { refusal, stop } = plan(&o, &with(granted("mine"), JobState::None))
        else {
            panic!("{what}")
        };
        assert_eq!(
            (refusal.reason, refusal.retry, stop),
            (IsoReason::NotGranted, Retry::OnChange, false),
            "{what}"
        );
        assert!(
            refusal
                .message
                .starts_with("namespace ta may use storage pools mine; "),
            "{}",
            refusal.message
        );
    }
}

#[test]
fn a_revoked_pool_stops_the_transfer_and_keeps_what_is_done() {
    use serde_json::json;
    let revoked = |o: &IsoDownload, job: JobState| {
        plan(
            o,
            &Observed {
                grants: granted(""),
                ..seen(job, Some(files(5)))
            },
        )
    };
    let downloading = obj(json!({"url": URL}), started(DownloadPhase::Downloading));
    match revoked(&downloading, running()) {
        Plan::Refuse { refusal, stop } => {
            assert_eq!(refusal.reason, IsoReason::NotGranted);
            assert!(stop, "the running transfer stops (its data kept)");
        }
        other => panic!("{other:?}"),
    }
    let paused = obj(
        json!({"url": URL, "paused": true}),
        started(DownloadPhase::Paused),
    );
    assert!(matches!(
        revoked(&paused, JobState::None),
        Plan::Refuse { stop: false, .. }
    ));
    // A completed download is left as it is.
    let done = obj(json!({"url": URL}), started(DownloadPhase::Completed));
    assert_eq!(revoked(&done, JobState::None), Plan::Nothing);
}
