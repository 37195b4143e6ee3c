//! The block routes of a clone job against the in-memory libvirt: a copy within the pool, its
//! record, the clone's XML, and cleanup and resume.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::reflector::ObjectRef;

use super::super::apply::{Job, JobEnd, Progress, run};
use super::super::ledger::{Ledger, NodeSide};
use crate::agent::jobs::Jobs;
use crate::api::{CloneDisk, ClonePhase, CopyKind, CopyStrategy, VMClone, VMCloneStatus};
use crate::libvirt::ErrorKind;
use crate::libvirt::block_clone::BlockVolume;
use crate::libvirt::clone_xml;
use crate::libvirt::domain::parse_domain;
use crate::libvirt::fake::FakeLibvirt;

const UID: &str = "task-b";

fn xml(devices: &str) -> String {
    format!(
        "<domain type='qemu'><name>web</name><os><type>hvm</type></os><devices>{devices}</devices></domain>"
    )
}

const PART: &str =
    "<disk type='block' device='disk'><source dev='/dev/loop0p1'/><target dev='vda'/></disk>";
const LV: &str =
    "<disk type='volume' device='disk'><source pool='vg' volume='root'/><target dev='vdb'/></disk>";

fn fake(devices: &str) -> Arc<FakeLibvirt> {
    Arc::new(
        FakeLibvirt::default()
            .with_domain_xml("web", &xml(devices))
            .with_block_volume(BlockVolume {
                pool: "dp".into(),
                pool_type: "disk".into(),
                volume: "loop0p1".into(),
                path: "/dev/loop0p1".into(),
                capacity: 8 << 20,
                pool_volumes: vec!["loop0p1".into()],
                disk_device: Some("/dev/loop0".into()),
                pool_available: 1 << 30,
            })
            .with_block_volume(BlockVolume {
                pool: "vg".into(),
                pool_type: "logical".into(),
                volume: "root".into(),
                path: "/dev/vg/root".into(),
                capacity: 4 << 20,
                pool_volumes: vec!["root".into()],
                disk_device: None,
                pool_available: 1 << 30,
            }),
    )
}

fn planned(source: &str, target: &str, pool: &str) -> CloneDisk {
    CloneDisk {
        source: source.into(),
        target: Some(target.into()),
        kind: Some(CopyKind::PoolVolume),
        pool: Some(pool.into()),
        total_bytes: Some(0),
        copied_bytes: Some(0),
        ..Default::default()
    }
}

fn ledger() -> Ledger {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("vp-bledger-{}-{n}", std::process::id()));
    NodeSide::new(&dir, 4).ledger(UID)
}

fn job(devices: &str, disks: Vec<CloneDisk>, ledger: Ledger) -> Job {
    Job {
        ledger,
        slots: Arc::new(tokio::sync::Semaphore::new(1)),
        uid: UID.into(),
        namespace: "ns".into(),
        source: "web".into(),
        start: false,
        strategy: CopyStrategy::Copy,
        config: parse_domain(&xml(devices)).unwrap(),
        status: VMCloneStatus {
            phase: Some(ClonePhase::Copying),
            target_name: Some("web-clone1".into()),
            disks,
            ..Default::default()
        },
    }
}

async fn run_job(fake: Arc<FakeLibvirt>, job: Job) -> JobEnd {
    let jobs: Jobs<VMClone, Progress, JobEnd> = Jobs::new(Duration::ZERO);
    jobs.start(
        UID,
        ObjectRef::new("c").within("ns"),
        move |ctx| async move { run(&*fake, job, &ctx).await },
    );
    loop {
        if let Some(end) = jobs.finished(UID) {
            return end;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn copies_within_the_pool_and_points_the_clone_at_the_new_volumes() {
    let f = fake(&format!("{PART}{LV}"));
    let l = ledger();
    let disks = vec![
        planned("/dev/loop0p1", "loop0p2", "dp"),
        planned("volume root of pool vg", "root-clone1", "vg"),
    ];
    let end = run_job(f.clone(), job(&format!("{PART}{LV}"), disks, l.clone())).await;
    let JobEnd::Completed { status, .. } = end else {
        panic!("{end:?}");
    };
    assert_eq!(f.block_volumes("dp"), vec!["loop0p1", "loop0p2"]);
    assert_eq!(f.block_volumes("vg"), vec!["root", "root-clone1"]);
    assert_eq!(status.disks[0].strategy.as_deref(), Some("Copy"));
    assert_eq!(status.disks[0].copied_bytes, Some(8 << 20));
    assert_eq!(status.disks[1].copied_bytes, status.disks[1].total_bytes);
    let defined = f.domain_xml("web-clone1").unwrap();
    assert_eq!(clone_xml::clone_task_of(&defined).as_deref(), Some(UID));
    let d = parse_domain(&defined).unwrap();
    assert_eq!(
        (d.disks[0].kind.as_str(), d.disks[0].source.as_deref()),
        ("block", Some("/dev/fake/loop0p2"))
    );
    assert_eq!(
        (d.disks[1].pool.as_deref(), d.disks[1].volume.as_deref()),
        (Some("vg"), Some("root-clone1"))
    );
    assert!(l.volumes().list().is_empty(), "the volumes are the clone's");
}

#[tokio::test]
async fn a_failed_task_deletes_only_the_volumes_it_made() {
    let f = fake(PART);
    f.fail_next("define the clone", None, ErrorKind::Refused);
    let l = ledger();
    let end = run_job(
        f.clone(),
        job(
            PART,
            vec![planned("/dev/loop0p1", "loop0p2", "dp")],
            l.clone(),
        ),
    )
    .await;
    assert!(matches!(end, JobEnd::Failed { .. }), "{end:?}");
    assert_eq!(f.block_volumes("dp"), vec!["loop0p1"], "the copy is gone");
    assert!(l.volumes().list().is_empty());

    // A copy libvirt refuses (the name is taken by someone else): that volume stays.
    let f = fake(LV);
    let l = ledger();
    let end = run_job(
        f.clone(),
        job(
            LV,
            vec![planned("volume root of pool vg", "root", "vg")],
            l.clone(),
        ),
    )
    .await;
    assert!(matches!(end, JobEnd::Failed { .. }), "{end:?}");
    assert_eq!(f.block_volumes("vg"), vec!["root"], "not this task's");
    assert!(l.volumes().list().is_empty());
}

#[tokio::test]
async fn a_restarted_task_starts_an_unfinished_volume_over() {
    let f = fake(PART);
    // A partition this task created before the agent restarted, not finished.
    let made = {
        use crate::libvirt::block_clone::BlockClones;
        f.copy_in_pool("dp", "loop0p1", "loop0p2").await.unwrap()
    };
    let l = ledger();
    l.volumes().record("dp", &made.name).unwrap();
    let end = run_job(
        f.clone(),
        job(
            PART,
            vec![planned("/dev/loop0p1", "loop0p2", "dp")],
            l.clone(),
        ),
    )
    .await;
    assert!(matches!(end, JobEnd::Completed { .. }), "{end:?}");
    assert_eq!(f.block_volumes("dp"), vec!["loop0p1", "loop0p2"]);
    let calls = f.calls();
    assert!(
        calls.contains(&"delete a storage volume".to_string()),
        "{calls:?}"
    );

    // One finished before the restart is kept as it is.
    let mut done = planned("/dev/loop0p1", "loop0p2", "dp");
    done.strategy = Some("Copy".into());
    let f = fake(PART);
    let l = ledger();
    {
        use crate::libvirt::block_clone::BlockClones;
        f.copy_in_pool("dp", "loop0p1", "loop0p2").await.unwrap();
    }
    l.volumes().record("dp", "loop0p2").unwrap();
    let end = run_job(f.clone(), job(PART, vec![done], l)).await;
    assert!(matches!(end, JobEnd::Completed { .. }), "{end:?}");
    let calls = f.calls();
    assert_eq!(
        calls
            .iter()
            .filter(|c| *c == "copy a volume within its pool")
            .count(),
        1,
        "only the copy made before the restart: {calls:?}"
    );
    assert!(
        !calls.contains(&"delete a storage volume".to_string()),
        "{calls:?}"
    );
}
