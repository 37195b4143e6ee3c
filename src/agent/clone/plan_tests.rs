use super::*;
use crate::agent::refusal::{Reason, Retry};
use crate::api::CloneStorage;
use crate::libvirt::domain::{DiskXml, parse_domain};
use crate::libvirt::volume::VolumeSource;

pub(super) const GIB: u64 = 1 << 30;

pub(super) fn spec(target: Option<&str>, fallback: &str) -> VMCloneSpec {
    VMCloneSpec {
        source: "web".into(),
        target_name: target.map(str::to_string),
        node_name: None,
        storage: CloneStorage {
            pool: fallback.into(),
            ..Default::default()
        },
        start: false,
    }
}

pub(super) fn domain(devices: &str) -> DomainXml {
    parse_domain(&format!("<domain><devices>{devices}</devices></domain>")).unwrap()
}

pub(super) fn file_disk(path: &str, dev: &str) -> String {
    format!("<disk type='file' device='disk'><source file='{path}'/><target dev='{dev}'/></disk>")
}

pub(super) fn pool(name: &str, type_: &str, path: &str, available: u64) -> StoragePoolSummary {
    StoragePoolSummary {
        name: name.into(),
        type_: type_.into(),
        path: Some(path.into()),
        capacity: 100 * GIB,
        allocation: 0,
        available,
        active: true,
    }
}

pub(super) fn facts(dir: &str, allocated: u64) -> FileFacts {
    FileFacts {
        dir: dir.into(),
        allocated,
        data: allocated / 2,
        unsafe_image: None,
        overlay: None,
    }
}

/// A node with pool `p` at /p (10 GiB free) holding `web`'s disk /p/a.img (1 GiB).
pub(super) fn node(devices: &str) -> Observed {
    Observed {
        source: Source::ShutOff(domain(devices)),
        names: vec!["web".into()],
        pools: vec![pool("p", "dir", "/p", 10 * GIB)],
        pool_dirs: HashMap::from([("p".into(), "/p".into())]),
        allowed: vec!["/p".into()],
        files: HashMap::from([("/p/a.img".into(), facts("/p", GIB))]),
        ..Default::default()
    }
}

pub(super) fn refusal(d: Decision) -> Refusal<CloneReason> {
    match d {
        Decision::Wait(r) | Decision::Refuse(r) => r,
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn every_reason_the_plan_reports() {
    let a = file_disk("/p/a.img", "vda");
    let vol = "<disk type='volume' device='disk'><source pool='q' volume='v.img'/><target dev='vdb'/></disk>";
    let block =
        "<disk type='block' device='disk'><source dev='/dev/vg/lv'/><target dev='vdc'/></disk>";
    let copying = VMCloneStatus {
        phase: Some(ClonePhase::Copying),
        target_name: Some("web-clone1".into()),
        ..Default::default()
    };
    let none = VMCloneStatus::default();
    type Case = (
        &'static str,
        VMCloneSpec,
        Observed,
        CloneReason,
        bool,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "source missing",
            spec(None, "default"),
            Observed::default(),
            CloneReason::SourceNotFound,
            true,
            "is not defined on node n1",
        ),
        (
            "source running",
            spec(None, "default"),
            Observed {
                source: Source::Running,
                ..node(&a)
            },
            CloneReason::SourceRunning,
            true,
            "web is running",
        ),
        (
            "an image with an external data file",
            spec(None, "default"),
            Observed {
                files: HashMap::from([(
                    "/p/a.img".into(),
                    FileFacts {
                        unsafe_image: Some("a qcow2 image with an external data file".into()),
                        ..facts("/p", GIB)
                    },
                )]),
                ..node(&a)
            },
            CloneReason::UnsafeImage,
            false,
            "/p/a.img of web is a qcow2 image with an external data file",
        ),
        (
            "writable block disk",
            spec(None, "default"),
            node(&format!("{a}{block}")),
            CloneReason::UnsupportedDisk,
            false,
            "Disk vdc (block device /dev/vg/lv, which belongs to no active storage pool) of web is writable",
        ),
        (
            "volume of a logical pool",
            spec(None, "default"),
            Observed {
                volumes: HashMap::from([(
                    ("q".into(), "v.img".into()),
                    VolumeLookup::Found(VolumeSource {
                        path: "/dev/q/v.img".into(),
                        pool_type: "logical".into(),
                        is_file: false,
                    }),
                )]),
                ..node(vol)
            },
            CloneReason::UnsupportedDisk,
            false,
            "volume v.img of the logical pool q, at /dev/q/v.img",
        ),
        (
            "volume of an inactive pool",
            spec(None, "default"),
            Observed {
                volumes: HashMap::from([(
                    ("q".into(), "v.img".into()),
                    VolumeLookup::PoolInactive,
                )]),
                ..node(vol)
            },
            CloneReason::StorageNotUsable,
            false,
            "which libvirt cannot resolve (the pool is not running)",
        ),
        (
            "unknown pool",
            spec(None, "default"),
            Observed {
                volumes: HashMap::from([(("q".into(), "v.img".into()), VolumeLookup::NoPool)]),
                ..node(vol)
            },
            CloneReason::StorageNotUsable,
            false,
            "(no such pool)",
        ),
        (
            "target name taken",
            spec(Some("taken"), "default"),
            Observed {
                names: vec!["web".into(), "taken".into()],
                target_task: Some("someone-else".into()),
                ..node(&a)
            },
            CloneReason::NameConflict,
            false,
            "A domain named taken already exists on node n1",
        ),
        (
            "outside allowed directories",
            spec(None, "default"),
            Observed {
                files: HashMap::from([("/p/a.img".into(), facts("/elsewhere", GIB))]),
                ..node(&a)
            },
            CloneReason::StorageNotUsable,
            false,
            "/p/a.img lies outside the storage pools and allowed directories",
        ),
        (
            "pool cannot hold files, no fallback",
            spec(None, "missing"),
            Observed {
                pools: vec![pool("p", "logical", "/p", 10 * GIB)],
                ..node(&a)
            },
            CloneReason::StorageNotUsable,
            false,
            "Pool p (logical) cannot take a file copy and the fallback pool missing is not an active pool",
        ),
        (
            "pool cannot hold files, fallback is no dir pool",
            spec(None, "lvm"),
            Observed {
                pools: vec![
                    pool("p", "logical", "/p", 10 * GIB),
                    pool("lvm", "logical", "/dev/lvm", 10 * GIB),
                ],
                ..node(&a)
            },
            CloneReason::StorageNotUsable,
            false,
            "the fallback pool lvm is a logical pool, which cannot hold file copies",
        ),
        (
            "full pool, fallback no dir pool",
            spec(None, "lvm"),
            Observed {
                pools: vec![
                    pool("p", "dir", "/p", GIB / 2),
                    pool("lvm", "logical", "/dev/lvm", 10 * GIB),
                ],
                ..node(&a)
            },
            CloneReason::StorageNotUsable,
            false,
            "p lacks room for a copy of /p/a.img (1073741824 bytes), and the fallback pool lvm",
        ),
        (
            "no room anywhere",
            spec(None, "default"),
            Observed {
                pools: vec![pool("p", "dir", "/p", GIB / 2)],
                ..node(&a)
            },
            CloneReason::InsufficientSpace,
            false,
            "The copies need 1073741824 bytes (the sources' allocated size) in p (/p), which has 536870912 available",
        ),
    ];
    let mut seen = HashSet::new();
    for (name, spec, obs, reason, waits, text) in cases {
        let d = decide(&spec, "u1", "n1", &none, &obs);
        assert_eq!(matches!(d, Decision::Wait(_)), waits, "{name}");
        let r = refusal(d);
        assert_eq!(r.reason, reason, "{name}: {}", r.message);
        assert!(r.message.contains(text), "{name}: {}", r.message);
        assert_eq!(r.retry == Retry::OnChange, !waits, "{name}");
        seen.insert(reason);
    }
    // Copying, Defining, Completed, CopyFailed and DefineFailed come from the job (report);
    // NotGranted has a test of its own.
    seen.insert(CloneReason::NotGranted);
    let planned: Vec<_> = CloneReason::ALL
        .iter()
        .filter(|r| !seen.contains(r))
        .map(|r| r.as_str())
        .collect();
    assert_eq!(
        planned,
        [
            "Copying",
            "Defining",
            "CopyFailed",
            "DefineFailed",
            "Completed"
        ]
    );
    // A task that started resumes once its source is there and shut off, without planning.
    assert_eq!(
        decide(
            &spec(None, "default"),
            "u1",
            "n1",
            &copying,
            &Observed::default()
        ),
        Decision::Wait(Refusal::wait(
            CloneReason::SourceNotFound,
            "Domain web is not defined on node n1; the task starts once it is.",
            Duration::from_secs(300)
        ))
    );
    assert_eq!(
        decide(&spec(None, "default"), "u1", "n1", &copying, &node(&a)),
        Decision::Resume
    );
}

#[test]
fn waits_look_again_later() {
    let running = Observed {
        source: Source::Running,
        ..Default::default()
    };
    let r = refusal(decide(
        &spec(None, "default"),
        "u",
        "n",
        &VMCloneStatus::default(),
        &running,
    ));
    assert_eq!(r.retry, Retry::After(Duration::from_secs(600)));
}

pub(super) fn start(spec: &VMCloneSpec, obs: &Observed) -> Plan {
    match decide(spec, "u1", "n1", &VMCloneStatus::default(), obs) {
        Decision::Start(p) => p,
        other => panic!("not started: {other:?}"),
    }
}

#[test]
fn copies_go_next_to_their_source_with_the_lowest_free_number() {
    let a = file_disk("/p/a.img", "vda");
    let iso = "<disk type='file' device='cdrom'><source file='/iso/d.iso'/><target dev='sda'/><readonly/></disk>";
    let mut obs = node(&format!("{a}{iso}"));
    obs.names.push("web-clone1".into());
    obs.existing.insert("/p/a-clone2.img".into());
    let p = start(&spec(None, "default"), &obs);
    assert_eq!(p.target, "web-clone2");
    assert_eq!(
        p.disks,
        vec![
            CloneDisk {
                source: "/p/a.img".into(),
                target: Some("/p/a-clone3.img".into()),
                kind: Some(crate::api::CopyKind::File),
                pool: Some("p".into()),
                total_bytes: Some(GIB / 2),
                copied_bytes: Some(0),
                ..Default::default()
            },
            CloneDisk {
                source: "/iso/d.iso".into(),
                target: Some("/iso/d.iso".into()),
                strategy: Some(SHARED.into()),
                ..Default::default()
            },
        ]
    );
}

#[test]
fn a_target_name_this_task_made_is_no_conflict() {
    let mut obs = node(&file_disk("/p/a.img", "vda"));
    obs.names.push("mine".into());
    obs.target_task = Some("u1".into());
    assert_eq!(start(&spec(Some("mine"), "default"), &obs).target, "mine");
}

#[test]
fn a_full_pool_sends_the_copy_to_the_fallback_pool() {
    let mut obs = node(&file_disk("/p/a.img", "vda"));
    obs.pools = vec![
        pool("p", "dir", "/p", GIB / 2),
        pool("big", "dir", "/big", 10 * GIB),
    ];
    let p = start(&spec(None, "big"), &obs);
    assert_eq!(p.disks[0].target.as_deref(), Some("/big/a-clone1.img"));
    assert_eq!(p.disks[0].pool.as_deref(), Some("big"));
    assert!(
        p.disks[0]
            .message
            .as_deref()
            .is_some_and(|m| m.contains("p lacks room for 1073741824 bytes")),
        "{:?}",
        p.disks[0].message
    );
}

#[test]
fn two_copies_that_fit_alone_but_not_together_are_refused() {
    let mut obs = node(&format!(
        "{}{}",
        file_disk("/p/a.img", "vda"),
        file_disk("/p/b.img", "vdb")
    ));
    obs.files.insert("/p/b.img".into(), facts("/p", GIB));
    obs.pools = vec![pool("p", "dir", "/p", 3 * GIB / 2)];
    let r = refusal(decide(
        &spec(None, "default"),
        "u1",
        "n1",
        &VMCloneStatus::default(),
        &obs,
    ));
    assert_eq!(r.reason, CloneReason::InsufficientSpace, "{}", r.message);
}

#[test]
fn a_pool_that_holds_no_files_copies_to_the_fallback() {
    let mut obs = node(&file_disk("/p/a.img", "vda"));
    obs.pools = vec![
        pool("p", "logical", "/p", 10 * GIB),
        pool("default", "dir", "/d", 10 * GIB),
    ];
    let p = start(&spec(None, "default"), &obs);
    assert_eq!(p.disks[0].target.as_deref(), Some("/d/a-clone1.img"));
    assert!(
        p.disks[0]
            .message
            .as_deref()
            .unwrap()
            .contains("cannot take a file copy")
    );
}

#[test]
fn volume_disks_copy_within_their_own_pool() {
    let vol = "<disk type='volume' device='disk'><source pool='q' volume='v.img'/><target dev='vdb'/></disk>";
    let mut obs = node(vol);
    obs.pools.push(pool("q", "dir", "/p", 10 * GIB));
    obs.volumes.insert(
        ("q".into(), "v.img".into()),
        VolumeLookup::Found(VolumeSource {
            path: "/p/v.img".into(),
            pool_type: "dir".into(),
            is_file: true,
        }),
    );
    obs.files.insert("/p/v.img".into(), facts("/p", GIB));
    let p = start(&spec(None, "default"), &obs);
    assert_eq!(
        p.disks[0].pool.as_deref(),
        Some("q"),
        "not p, which shares the directory"
    );
    assert_eq!(p.disks[0].target.as_deref(), Some("/p/v-clone1.img"));
}

#[test]
fn files_in_allowed_directories_use_the_directory_free_space() {
    let mut obs = node(&file_disk("/srv/a.img", "vda"));
    obs.allowed.push("/srv".into());
    obs.files = HashMap::from([("/srv/a.img".into(), facts("/srv", GIB))]);
    obs.free.insert("/srv".into(), 2 * GIB);
    let p = start(&spec(None, "default"), &obs);
    assert_eq!(p.disks[0].pool, None);
    assert_eq!(p.disks[0].target.as_deref(), Some("/srv/a-clone1.img"));
    obs.free.insert("/srv".into(), GIB / 2);
    let r = refusal(decide(
        &spec(None, "default"),
        "u",
        "n",
        &VMCloneStatus::default(),
        &obs,
    ));
    assert_eq!(r.reason, CloneReason::InsufficientSpace);
}

#[test]
fn settled_and_resuming_tasks() {
    let st = |phase, target: Option<&str>| VMCloneStatus {
        phase,
        target_name: target.map(str::to_string),
        ..Default::default()
    };
    assert!(settled(&st(Some(ClonePhase::Completed), None)));
    assert!(settled(&st(Some(ClonePhase::Failed), None)));
    assert!(!settled(&st(Some(ClonePhase::Copying), None)));
    assert!(!settled(&st(None, None)));
    assert!(resumes(&st(Some(ClonePhase::Defining), Some("t"))));
    assert!(resumes(&st(Some(ClonePhase::Copying), Some("t"))));
    assert!(!resumes(&st(Some(ClonePhase::Copying), None)));
    assert!(!resumes(&st(Some(ClonePhase::Pending), Some("t"))));
}

#[test]
fn copies_are_named_after_the_original() {
    let existing = HashSet::from([PathBuf::from("/d/disk-clone1.img")]);
    let none = HashSet::new();
    assert_eq!(
        free_copy_name(Path::new("/d"), Path::new("/x/disk.img"), 1, &[], &none),
        PathBuf::from("/d/disk-clone1.img")
    );
    assert_eq!(
        free_copy_name(Path::new("/d"), Path::new("/x/disk.img"), 1, &[], &existing),
        PathBuf::from("/d/disk-clone2.img")
    );
    let planned = [CloneDisk {
        target: Some("/d/disk-clone2.img".into()),
        ..Default::default()
    }];
    assert_eq!(
        free_copy_name(
            Path::new("/d"),
            Path::new("/x/disk.img"),
            1,
            &planned,
            &existing
        ),
        PathBuf::from("/d/disk-clone3.img")
    );
    assert_eq!(
        free_copy_name(Path::new("/d"), Path::new("/x/root"), 3, &[], &none),
        PathBuf::from("/d/root-clone3")
    );
}

pub(super) fn disk(xml: &str) -> DiskXml {
    domain(xml).disks.remove(0)
}

#[test]
fn writable_disks_that_are_no_files_are_refused() {
    let file = disk(&file_disk("/p/a.img", "vda"));
    assert_eq!(disk_use(&file, "web"), DiskUse::File("/p/a.img".into()));
    let floppy = disk(
        "<disk type='file' device='floppy'><source file='/p/f.img'/><target dev='fda'/></disk>",
    );
    assert_eq!(disk_use(&floppy, "web"), DiskUse::File("/p/f.img".into()));
    let vol = disk(
        "<disk type='volume' device='disk'><source pool='p' volume='v.img'/><target dev='vdb'/></disk>",
    );
    assert_eq!(
        disk_use(&vol, "web"),
        DiskUse::Volume {
            pool: "p".into(),
            volume: "v.img".into()
        }
    );
    let empty = disk("<disk type='file' device='cdrom'><target dev='sda'/><readonly/></disk>");
    assert_eq!(disk_use(&empty, "web"), DiskUse::Empty);

    // Writable block devices take the block routes when a pool holds them (see `block`).
    for (xml, dev) in [
        (
            "<disk type='block' device='disk'><source dev='/dev/vg/lv'/><target dev='vdc'/></disk>",
            "/dev/vg/lv",
        ),
        (
            "<disk type='block' device='lun'><source dev='/dev/sdx'/><target dev='sdb'/></disk>",
            "/dev/sdx",
        ),
    ] {
        assert_eq!(disk_use(&disk(xml), "web"), DiskUse::Block(dev.into()));
    }
    // A network disk names no pool: nothing can create a copy of it.
    let net = "<disk type='network' device='disk'><source protocol='iscsi' name='iqn.x/1'><host name='san'/></source><target dev='vdd'/></disk>";
    let DiskUse::Unsupported(m) = disk_use(&disk(net), "web") else {
        panic!("{net} is not refused");
    };
    assert!(
        m.starts_with(
            "Disk vdd (network disk iscsi://san/iqn.x/1, which names no storage pool) of web is writable"
        ),
        "{m}"
    );
    assert!(
        m.contains("<readonly/> or <shareable/>") && m.contains("dir, fs or netfs pool"),
        "{m}"
    );

    for xml in [
        "<disk type='block' device='disk'><source dev='/dev/vg/lv'/><target dev='vdc'/><readonly/></disk>",
        "<disk type='block' device='lun'><source dev='/dev/sdx'/><target dev='sdb'/><shareable/></disk>",
        "<disk type='network' device='cdrom'><source protocol='https' name='/d.iso'><host name='h'/></source><target dev='sdc'/></disk>",
        "<disk type='volume' device='disk'><source pool='p' volume='v.img'/><target dev='vdb'/><readonly/></disk>",
    ] {
        assert!(
            matches!(disk_use(&disk(xml), "web"), DiskUse::Shared(_)),
            "{xml}"
        );
    }
}

#[test]
fn observe_lists_the_sources_and_the_fallback_directory() {
    let vol = "<disk type='volume' device='disk'><source pool='q' volume='v.img'/><target dev='vdb'/></disk>";
    let config = domain(&format!("{}{vol}", file_disk("/p/a.img", "vda")));
    assert_eq!(file_disks(&config, "web"), ["/p/a.img"]);
    assert_eq!(
        volume_disks(&config, "web"),
        [("q".to_string(), "v.img".to_string())]
    );
    let mut obs = node("");
    obs.pools.push(pool("default", "dir", "/d", GIB));
    assert_eq!(
        destination_dirs(&spec(None, "default"), &obs),
        [PathBuf::from("/d"), PathBuf::from("/p")]
    );
}
