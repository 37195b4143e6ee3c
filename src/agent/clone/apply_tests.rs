use std::path::Path;
use std::sync::Arc;

use kube::runtime::reflector::ObjectRef;

use super::*;
use crate::agent::jobs::Jobs;
use crate::api::{StoragePoolSummary, VMClone};
use crate::libvirt::ErrorKind;
use crate::libvirt::fake::FakeLibvirt;
use crate::libvirt::volume::VolumeSource;

const UID: &str = "task-1";

pub(super) fn source_xml(devices: &str, nvram: Option<&Path>) -> String {
    let nvram = nvram
        .map(|p| format!("<nvram>{}</nvram>", p.display()))
        .unwrap_or_default();
    format!(
        "<domain type='qemu'><name>web</name><uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca427</uuid>\
         <os><type>hvm</type>{nvram}</os><devices>{devices}\
         <interface type='network'><mac address='52:54:00:00:00:01'/><source network='default'/></interface>\
         </devices></domain>"
    )
}

fn file_disk(path: &Path) -> String {
    format!(
        "<disk type='file' device='disk'><source file='{}'/><target dev='vda'/></disk>",
        path.display()
    )
}

pub(super) fn planned(src: &Path, dst: &Path) -> CloneDisk {
    CloneDisk {
        source: src.display().to_string(),
        target: Some(dst.display().to_string()),
        total_bytes: Some(0),
        copied_bytes: Some(0),
        ..Default::default()
    }
}

/// A record of its own for each test job (tests run in parallel with the same UID).
fn ledger() -> Ledger {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("vp-ledger-{}-{n}", std::process::id()));
    super::super::ledger::NodeSide::new(&dir, 4).ledger(UID)
}

pub(super) fn job(xml: &str, target: &str, disks: Vec<CloneDisk>, start: bool) -> Job {
    Job {
        ledger: ledger(),
        slots: Arc::new(tokio::sync::Semaphore::new(1)),
        uid: UID.into(),
        namespace: "ns".into(),
        source: "web".into(),
        start,
        strategy: CopyStrategy::Copy,
        config: domain::parse_domain(xml).unwrap(),
        status: VMCloneStatus {
            phase: Some(ClonePhase::Copying),
            target_name: Some(target.into()),
            disks,
            ..Default::default()
        },
    }
}

pub(super) async fn run_job(fake: Arc<FakeLibvirt>, job: Job) -> JobEnd {
    let jobs: Jobs<VMClone, Progress, JobEnd> = Jobs::new(Duration::ZERO);
    let obj = ObjectRef::new("c").within("ns");
    jobs.start(
        UID,
        obj,
        move |ctx| async move { run(&*fake, job, &ctx).await },
    );
    loop {
        if let Some(end) = jobs.finished(UID) {
            return end;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A source `web` with one 64 KiB disk in a temporary directory.
fn setup(nvram: bool) -> (tempfile::TempDir, PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("a.img");
    std::fs::write(&disk, vec![7u8; 64 << 10]).unwrap();
    let vars = dir.path().join("web_VARS.fd");
    std::fs::write(&vars, b"vars").unwrap();
    let xml = source_xml(&file_disk(&disk), nvram.then_some(vars.as_path()));
    (dir, disk, xml)
}

#[tokio::test]
async fn copies_the_disks_and_defines_a_clone_marked_as_this_tasks() {
    let (dir, disk, xml) = setup(false);
    let copy = dir.path().join("a-clone1.img");
    let fake = Arc::new(FakeLibvirt::default().with_domain_xml("web", &xml));
    let end = run_job(
        fake.clone(),
        job(&xml, "web-clone1", vec![planned(&disk, &copy)], false),
    )
    .await;
    let JobEnd::Completed { status, started } = end else {
        panic!("{end:?}");
    };
    assert_eq!(started, None, "not asked to start");
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&disk).unwrap());
    assert_eq!(status.disks[0].strategy.as_deref(), Some("Copy"));
    assert_eq!(status.disks[0].copied_bytes, status.disks[0].total_bytes);
    assert_eq!(status.target_uuid.as_deref(), Some("uuid-web-clone1"));
    let defined = fake.domain_xml("web-clone1").unwrap();
    assert_eq!(clone_xml::clone_task_of(&defined).as_deref(), Some(UID));
    let parsed = domain::parse_domain(&defined).unwrap();
    assert_eq!(parsed.disks[0].source.as_deref(), copy.to_str());
    assert_ne!(
        parsed.interfaces[0].mac.as_deref(),
        Some("52:54:00:00:00:01")
    );
    assert!(fake.calls().contains(&"refresh storage pools".to_string()));
    assert!(!fake.domain_state("web-clone1").unwrap().active);
}

#[tokio::test]
async fn starts_the_clone_when_asked() {
    let (dir, disk, xml) = setup(false);
    let copy = dir.path().join("a-clone1.img");
    let fake = Arc::new(FakeLibvirt::default().with_domain_xml("web", &xml));
    let end = run_job(
        fake.clone(),
        job(&xml, "web-clone1", vec![planned(&disk, &copy)], true),
    )
    .await;
    assert!(
        matches!(
            end,
            JobEnd::Completed {
                started: Some(Ok(())),
                ..
            }
        ),
        "{end:?}"
    );
    assert!(fake.domain_state("web-clone1").unwrap().active);
}

#[tokio::test]
async fn a_start_that_fails_still_completes_the_clone() {
    let (dir, disk, xml) = setup(false);
    let copy = dir.path().join("a-clone1.img");
    let fake = Arc::new(FakeLibvirt::default().with_domain_xml("web", &xml));
    fake.fail_next("start the clone", None, ErrorKind::Refused);
    let end = run_job(
        fake.clone(),
        job(&xml, "web-clone1", vec![planned(&disk, &copy)], true),
    )
    .await;
    assert!(
        matches!(
            end,
            JobEnd::Completed {
                started: Some(Err(_)),
                ..
            }
        ),
        "{end:?}"
    );
    assert!(copy.exists(), "the clone is kept");
}

#[tokio::test]
async fn after_a_restart_the_clone_this_task_defined_is_reused() {
    let (dir, disk, xml) = setup(false);
    let copy = dir.path().join("a-clone1.img");
    std::fs::copy(&disk, &copy).unwrap();
    let mine = "<domain><name>web-clone1</name><metadata><vp:clone xmlns:vp='https://virtplane.io/xmlns/clone/v1' task='task-1'/></metadata><devices/></domain>";
    let fake = Arc::new(
        FakeLibvirt::default()
            .with_domain_xml("web", &xml)
            .with_domain_xml("web-clone1", mine),
    );
    let mut done = planned(&disk, &copy);
    done.strategy = Some("Copy".into());
    // The copy was made, and recorded, by this task before the restart.
    let j = job(&xml, "web-clone1", vec![done], false);
    j.ledger.record(&copy).unwrap();
    let end = run_job(fake.clone(), j).await;
    assert!(matches!(end, JobEnd::Completed { .. }), "{end:?}");
    assert!(
        !fake.calls().iter().any(|c| c == "define the clone"),
        "defined once: {:?}",
        fake.calls()
    );
    assert_eq!(fake.domain_xml("web-clone1").as_deref(), Some(mine));
}

#[tokio::test]
async fn a_name_taken_meanwhile_fails_and_leaves_nothing() {
    let (dir, disk, xml) = setup(false);
    let copy = dir.path().join("a-clone1.img");
    let theirs = "<domain><name>web-clone1</name><devices/></domain>";
    let fake = Arc::new(
        FakeLibvirt::default()
            .with_domain_xml("web", &xml)
            .with_domain_xml("web-clone1", theirs),
    );
    let end = run_job(
        fake.clone(),
        job(&xml, "web-clone1", vec![planned(&disk, &copy)], false),
    )
    .await;
    let JobEnd::Failed { why, .. } = end else {
        panic!("{end:?}");
    };
    assert_eq!(why.reason, CloneReason::NameConflict);
    assert!(!copy.exists(), "the copy is removed");
    assert_eq!(
        fake.domain_xml("web-clone1").as_deref(),
        Some(theirs),
        "never touched"
    );
}

#[tokio::test]
async fn a_failed_copy_fails_the_task_and_leaves_nothing() {
    let (dir, _disk, xml) = setup(false);
    let copy = dir.path().join("gone-clone1.img");
    let fake = Arc::new(FakeLibvirt::default().with_domain_xml("web", &xml));
    let gone = dir.path().join("gone.img");
    let end = run_job(
        fake.clone(),
        job(&xml, "web-clone1", vec![planned(&gone, &copy)], false),
    )
    .await;
    let JobEnd::Failed { why, .. } = end else {
        panic!("{end:?}");
    };
    assert_eq!(why.reason, CloneReason::CopyFailed);
    assert!(why.message.starts_with("Copying "), "{}", why.message);
    assert!(fake.domain_state("web-clone1").is_none());
    assert!(!copy.exists());
}

#[tokio::test]
async fn a_disk_added_to_the_source_meanwhile_is_never_shared() {
    let (dir, disk, xml) = setup(false);
    let copy = dir.path().join("a-clone1.img");
    let other = dir.path().join("b.img");
    std::fs::write(&other, b"b").unwrap();
    // The source now has a second writable disk the plan did not copy.
    let changed = source_xml(
        &format!(
            "{}<disk type='file' device='disk'><source file='{}'/><target dev='vdb'/></disk>",
            file_disk(&disk),
            other.display()
        ),
        None,
    );
    let fake = Arc::new(FakeLibvirt::default().with_domain_xml("web", &changed));
    let end = run_job(
        fake.clone(),
        job(&xml, "web-clone1", vec![planned(&disk, &copy)], false),
    )
    .await;
    let JobEnd::Failed { why, .. } = end else {
        panic!("{end:?}");
    };
    assert_eq!(why.reason, CloneReason::DefineFailed);
    assert!(why.message.starts_with("Disk vdb ("), "{}", why.message);
    assert!(!copy.exists() && fake.domain_state("web-clone1").is_none());
}

#[tokio::test]
async fn a_refused_definition_fails_and_leaves_nothing() {
    let (dir, disk, xml) = setup(false);
    let copy = dir.path().join("a-clone1.img");
    let fake = Arc::new(FakeLibvirt::default().with_domain_xml("web", &xml));
    fake.fail_next("define the clone", None, ErrorKind::Refused);
    let end = run_job(
        fake.clone(),
        job(&xml, "web-clone1", vec![planned(&disk, &copy)], false),
    )
    .await;
    let JobEnd::Failed { why, .. } = end else {
        panic!("{end:?}");
    };
    assert_eq!(why.reason, CloneReason::DefineFailed);
    assert!(!copy.exists());
}

#[tokio::test]
async fn the_clone_gets_its_own_uefi_variables_recorded_for_cleanup() {
    let (dir, disk, xml) = setup(true);
    let copy = dir.path().join("a-clone1.img");
    let fake = Arc::new(FakeLibvirt::default().with_domain_xml("web", &xml));
    let end = run_job(
        fake.clone(),
        job(&xml, "web-clone1", vec![planned(&disk, &copy)], false),
    )
    .await;
    let JobEnd::Completed { status, .. } = end else {
        panic!("{end:?}");
    };
    let vars = dir.path().join("web-clone1-web_VARS.fd");
    assert_eq!(std::fs::read(&vars).unwrap(), b"vars");
    let entry = status.disks.last().unwrap();
    assert_eq!(entry.target.as_deref(), vars.to_str());
    assert_eq!(entry.message.as_deref(), Some("UEFI variable store"));
    assert!(
        fake.domain_xml("web-clone1")
            .unwrap()
            .contains("web-clone1-web_VARS.fd")
    );
}

#[tokio::test]
async fn volume_disks_point_at_the_copys_volume() {
    let (dir, disk, _) = setup(false);
    let copy = dir.path().join("a-clone1.img");
    let xml = source_xml(
        "<disk type='volume' device='disk'><source pool='p' volume='a.img'/><target dev='vda'/></disk>",
        None,
    );
    let fake = Arc::new(
        FakeLibvirt::default()
            .with_domain_xml("web", &xml)
            .with_pool(StoragePoolSummary {
                name: "p".into(),
                type_: "dir".into(),
                active: true,
                ..Default::default()
            })
            .with_volume(
                "p",
                "a.img",
                VolumeSource {
                    path: disk.display().to_string(),
                    pool_type: "dir".into(),
                    is_file: true,
                },
            ),
    );
    let mut d = planned(&disk, &copy);
    d.pool = Some("p".into());
    let end = run_job(fake.clone(), job(&xml, "web-clone1", vec![d], false)).await;
    assert!(matches!(end, JobEnd::Completed { .. }), "{end:?}");
    let parsed = domain::parse_domain(&fake.domain_xml("web-clone1").unwrap()).unwrap();
    assert_eq!(parsed.disks[0].volume.as_deref(), Some("a-clone1.img"));
    assert_eq!(parsed.disks[0].pool.as_deref(), Some("p"));
}

#[tokio::test]
async fn shared_disks_are_neither_copied_nor_removed() {
    let (dir, disk, _) = setup(false);
    let iso = dir.path().join("d.iso");
    std::fs::write(&iso, b"iso").unwrap();
    let shared = CloneDisk {
        source: iso.display().to_string(),
        target: Some(iso.display().to_string()),
        strategy: Some(SHARED.into()),
        ..Default::default()
    };
    let copy = dir.path().join("a-clone1.img");
    std::fs::write(&copy, b"partial").unwrap();
    // Someone else's file, named in an edited status: not in the record, so it stays.
    let theirs = dir.path().join("theirs.img");
    std::fs::write(&theirs, b"theirs").unwrap();
    let _listed = [planned(&disk, &copy), planned(&disk, &theirs), shared];
    let ledger = ledger();
    ledger.record(&copy).unwrap();
    let fake = FakeLibvirt::default();
    remove_leftovers(&fake, UID, "web-clone1", &ledger)
        .await
        .unwrap();
    assert!(!copy.exists(), "the copy goes");
    assert!(iso.exists() && disk.exists(), "media and sources stay");
    assert!(theirs.exists(), "a file the task did not create stays");
}

#[tokio::test]
async fn a_taken_destination_fails_the_task_and_stays() {
    let (dir, disk, xml) = setup(false);
    let copy = dir.path().join("a-clone1.img");
    std::fs::write(&copy, b"the winner's disk").unwrap();
    let fake = Arc::new(FakeLibvirt::default().with_domain_xml("web", &xml));
    let end = run_job(
        fake.clone(),
        job(&xml, "web-clone1", vec![planned(&disk, &copy)], false),
    )
    .await;
    match end {
        JobEnd::Failed { why, .. } => assert_eq!(why.reason, CloneReason::NameConflict),
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(&copy).unwrap(), b"the winner's disk");
    assert!(fake.domain_state("web-clone1").is_none());
}

#[tokio::test]
async fn an_nvram_of_another_domain_is_a_name_conflict_and_untouched() {
    let (dir, disk, xml) = setup(true);
    let copy = dir.path().join("a-clone1.img");
    let src_vars = dir.path().join("web_VARS.fd");
    let theirs = clone_xml::per_guest_path(&src_vars.display().to_string(), "web-clone1");
    std::fs::write(&theirs, b"another domain's variables").unwrap();
    let fake = Arc::new(FakeLibvirt::default().with_domain_xml("web", &xml));
    let end = run_job(
        fake.clone(),
        job(&xml, "web-clone1", vec![planned(&disk, &copy)], false),
    )
    .await;
    match end {
        JobEnd::Failed { why, .. } => {
            assert_eq!(why.reason, CloneReason::NameConflict, "{}", why.message);
            assert!(
                why.message.contains("UEFI variable store"),
                "{}",
                why.message
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        std::fs::read(&theirs).unwrap(),
        b"another domain's variables"
    );
    assert!(!copy.exists(), "this task's own copy is removed");
    assert!(fake.domain_state("web-clone1").is_none());
}

#[tokio::test]
async fn leftovers_undefine_only_a_clone_this_task_made() {
    let ours = "<domain><name>ours</name><metadata><vp:clone xmlns:vp='https://virtplane.io/xmlns/clone/v1' task='task-1'/></metadata><devices/></domain>";
    let other = "<domain><name>other</name><metadata><vp:clone xmlns:vp='https://virtplane.io/xmlns/clone/v1' task='task-2'/></metadata><devices/></domain>";
    let fake = FakeLibvirt::default()
        .with_domain_xml("ours", ours)
        .with_domain_xml("other", other)
        .with_domain_xml("plain", "<domain><name>plain</name><devices/></domain>");
    fake.set_active("ours", true);
    for name in ["ours", "other", "plain", "absent"] {
        remove_leftovers(&fake, UID, name, &ledger()).await.unwrap();
    }
    assert!(
        fake.domain_state("ours").is_none(),
        "ours is undefined, running or not"
    );
    assert!(fake.domain_state("other").is_some());
    assert!(fake.domain_state("plain").is_some());
    // Without a task UID nothing is ever undefined.
    remove_leftovers(&fake, "", "other", &ledger())
        .await
        .unwrap();
    assert!(fake.domain_state("other").is_some());
}

#[tokio::test]
async fn a_libvirt_failure_while_undefining_is_an_error() {
    let fake = FakeLibvirt::default();
    fake.fail_next("remove the unfinished clone", None, ErrorKind::Unreachable);
    let err = remove_leftovers(&fake, UID, "x", &ledger())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unreachable);
}

#[tokio::test]
async fn macs_of_every_domain_are_in_use() {
    let fake = FakeLibvirt::default()
        .with_domain("a", true, "<interface type='network'><mac address='52:54:00:00:00:0a'/><source network='n'/></interface>")
        .with_domain("b", false, "<interface type='network'><mac address='52:54:00:00:00:0b'/><source network='n'/></interface>");
    let mut macs = macs_in_use(&fake).await.unwrap();
    macs.sort();
    macs.dedup();
    assert_eq!(macs, ["52:54:00:00:00:0a", "52:54:00:00:00:0b"]);
}
