use std::path::Path;
use std::sync::{Arc, Mutex};

use super::*;
use crate::agent::iso::reason::IsoReason;
use crate::agent::jobs::Stop;
use crate::agent::refusal::Refusal;
use crate::api::StoragePoolSummary;
use crate::libvirt::ErrorKind;
use crate::libvirt::facade::VolumeLookup;
use crate::libvirt::fake::FakeLibvirt;
use crate::libvirt::volume::VolumeSource;
use kube::runtime::reflector::ObjectRef;

fn fake(dir: &Path) -> FakeLibvirt {
    FakeLibvirt::default()
        .with_pool(StoragePoolSummary {
            name: "p".into(),
            type_: "dir".into(),
            path: Some(dir.display().to_string()),
            capacity: 100,
            allocation: 0,
            available: 100,
            active: true,
        })
        .with_volume(
            "p",
            "a.iso",
            VolumeSource {
                path: dir.join("a.iso").display().to_string(),
                pool_type: "dir".into(),
                is_file: true,
            },
        )
}

fn at(dir: &Path) -> At {
    At {
        dir: dir.to_path_buf(),
        name: "a.iso".into(),
    }
}

fn volume(dir: &Path) -> DownloadedVolume {
    DownloadedVolume {
        pool: "p".into(),
        name: "a.iso".into(),
        path: dir.join("a.iso").display().to_string(),
    }
}

fn partial(dir: &Path, len: usize) {
    std::fs::write(dir.join(".a.iso.part"), vec![0u8; len]).unwrap();
}

fn never(_: Place) -> bool {
    panic!("no job may start")
}

#[tokio::test]
async fn completion_refreshes_the_pool_even_when_that_fails() {
    let dir = tempfile::tempdir().unwrap();
    let virt = fake(dir.path());
    let downloads = Downloads::new(crate::agent::DownloadSettings::default());
    let plan = || Plan::Complete {
        volume: volume(dir.path()),
        finished: download::Finished {
            format: None,
            compression: None,
            path: dir.path().join("a.iso"),
            bytes: 3,
            checksum_verified: false,
        },
        note: None,
        attempts: Some(1),
        at: at(dir.path()),
    };
    let out = apply(&virt, &downloads, "u", plan(), never).await;
    assert!(matches!(
        out,
        Outcome::Completed {
            attempts: Some(1),
            ..
        }
    ));
    assert_eq!(virt.calls(), ["refresh a storage pool"]);
    virt.fail_next("refresh a storage pool", None, ErrorKind::Unreachable);
    let out = apply(&virt, &downloads, "u", plan(), never).await;
    assert!(
        matches!(out, Outcome::Completed { .. }),
        "the file is in place either way"
    );
}

#[tokio::test]
async fn a_failure_removes_partial_data_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let virt = fake(dir.path());
    let downloads = Downloads::new(crate::agent::DownloadSettings::default());
    partial(dir.path(), 7);
    let refusal = Refusal::fix(IsoReason::NameConflict, "taken");
    let keep = Plan::Fail {
        refusal: refusal.clone(),
        stop: false,
        discard: None,
    };
    let out = apply(&virt, &downloads, "u", keep, never).await;
    assert_eq!(
        out,
        Outcome::Failed {
            refusal: refusal.clone(),
            removed: 0
        }
    );
    assert!(dir.path().join(".a.iso.part").exists());
    let discard = Plan::Fail {
        refusal: refusal.clone(),
        stop: false,
        discard: Some(at(dir.path())),
    };
    let out = apply(&virt, &downloads, "u", discard, never).await;
    assert_eq!(
        out,
        Outcome::Failed {
            refusal,
            removed: 7
        }
    );
    assert!(!dir.path().join(".a.iso.part").exists());
    assert!(
        virt.calls().is_empty(),
        "no libvirt call: {:?}",
        virt.calls()
    );
}

/// Starts a job that waits to be stopped and tells why it was.
fn waiting_job(downloads: &Downloads) -> Arc<Mutex<Option<Stop>>> {
    let why = Arc::new(Mutex::new(None));
    let seen = why.clone();
    assert!(
        downloads
            .jobs
            .start("u", ObjectRef::new("d").within("ns"), |job| async move {
                job.cancel.cancelled().await;
                *seen.lock().unwrap() = job.stop_reason();
                super::super::job::JobResult::Stopped
            })
    );
    why
}

#[tokio::test]
async fn a_pause_stops_the_job_and_counts_what_it_kept() {
    let dir = tempfile::tempdir().unwrap();
    let virt = fake(dir.path());
    let downloads = Downloads::new(crate::agent::DownloadSettings::default());
    let why = waiting_job(&downloads);
    partial(dir.path(), 5);
    let target = DownloadTarget {
        url: "http://h/a.iso".into(),
        pool: "p".into(),
        name: "a.iso".into(),
    };
    let plan = Plan::Pause {
        target: target.clone(),
        at: Some(at(dir.path())),
    };
    let out = apply(&virt, &downloads, "u", plan, never).await;
    assert_eq!(
        out,
        Outcome::Paused {
            target,
            kept: 5,
            announce: true
        }
    );
    assert_eq!(*why.lock().unwrap(), Some(Stop::Pause));
    assert!(!downloads.jobs.running("u"));
    assert!(dir.path().join(".a.iso.part").exists(), "kept for resuming");
}

#[tokio::test]
async fn a_spec_change_abandons_the_job_then_removes_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let virt = fake(dir.path());
    let downloads = Downloads::new(crate::agent::DownloadSettings::default());
    let why = waiting_job(&downloads);
    partial(dir.path(), 9);
    let refusal = Refusal::fix(IsoReason::SpecChanged, "changed");
    let plan = Plan::Fail {
        refusal: refusal.clone(),
        stop: true,
        discard: Some(at(dir.path())),
    };
    let out = apply(&virt, &downloads, "u", plan, never).await;
    assert_eq!(
        out,
        Outcome::Failed {
            refusal,
            removed: 9
        }
    );
    assert_eq!(*why.lock().unwrap(), Some(Stop::Abandon));
}

#[tokio::test]
async fn start_hands_the_place_to_the_job_runner() {
    let dir = tempfile::tempdir().unwrap();
    let virt = fake(dir.path());
    let downloads = Downloads::new(crate::agent::DownloadSettings::default());
    let place = Place {
        dir: dir.path().to_path_buf(),
        name: "a.iso".into(),
        available: 100,
    };
    let mut got = None;
    let out = apply(
        &virt,
        &downloads,
        "u",
        Plan::Start {
            place: place.clone(),
            resumed: true,
            record: None,
        },
        |p| {
            got = Some(p);
            true
        },
    )
    .await;
    assert_eq!(
        out,
        Outcome::Started {
            resumed: true,
            record: None
        }
    );
    assert_eq!(got, Some(place));
}

#[tokio::test]
async fn cleanup_deletes_the_volume_record_and_partial_data() {
    let dir = tempfile::tempdir().unwrap();
    let virt = fake(dir.path());
    std::fs::write(dir.path().join("a.iso"), b"iso").unwrap();
    partial(dir.path(), 3);
    let plan = Cleanup {
        delete: Some(volume(dir.path())),
        clear_record: Some(at(dir.path())),
        discard: Some(at(dir.path())),
    };
    cleanup(&virt, &plan).await;
    assert_eq!(
        virt.volume("p", "a.iso").await.unwrap(),
        VolumeLookup::NoVolume,
        "deleted through libvirt"
    );
    assert!(!dir.path().join(".a.iso.part").exists());
    // Running it again finds everything gone, which is fine.
    cleanup(&virt, &plan).await;
}

#[tokio::test]
async fn cleanup_removes_the_file_when_libvirt_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let virt = fake(dir.path());
    std::fs::write(dir.path().join("a.iso"), b"iso").unwrap();
    virt.fail_next("delete a storage volume", None, ErrorKind::Refused);
    let plan = Cleanup {
        delete: Some(volume(dir.path())),
        ..Cleanup::default()
    };
    cleanup(&virt, &plan).await;
    assert!(!dir.path().join("a.iso").exists());
    // Retain: the volume stays.
    std::fs::write(dir.path().join("a.iso"), b"iso").unwrap();
    cleanup(&virt, &Cleanup::default()).await;
    assert!(dir.path().join("a.iso").exists());
}
