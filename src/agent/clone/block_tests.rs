//! The block routes of the plan, by table.

use std::collections::HashMap;

use super::super::plan::{Decision, Observed, Source, decide};
use super::into_pool;
use crate::agent::refusal::Refusal;
use crate::api::{
    CloneDisk, CloneStorage, CopyKind, StoragePoolSummary, VMCloneSpec, VMCloneStatus,
};
use crate::libvirt::block_clone::{BlockRef, BlockVolume};
use crate::libvirt::domain::parse_domain;
use crate::libvirt::facade::VolumeLookup;
use crate::libvirt::volume::VolumeSource;

use super::super::reason::CloneReason;

const MIB: u64 = 1 << 20;

fn spec(fallback: &str) -> VMCloneSpec {
    VMCloneSpec {
        source: "web".into(),
        target_name: None,
        node_name: None,
        storage: CloneStorage {
            pool: fallback.into(),
            ..Default::default()
        },
        start: false,
    }
}

fn pool(name: &str, type_: &str, path: &str, available: u64) -> StoragePoolSummary {
    StoragePoolSummary {
        name: name.into(),
        type_: type_.into(),
        path: Some(path.into()),
        capacity: 1 << 40,
        allocation: 0,
        available,
        active: true,
    }
}

fn vol(pool: &str, type_: &str, volume: &str, path: &str, capacity: u64) -> BlockVolume {
    BlockVolume {
        pool: pool.into(),
        pool_type: type_.into(),
        volume: volume.into(),
        path: path.into(),
        capacity,
        pool_volumes: vec![volume.into()],
        disk_device: (type_ == "disk").then(|| "/dev/loop0".into()),
        pool_available: 1 << 30,
    }
}

const PART: &str =
    "<disk type='block' device='disk'><source dev='/dev/loop0p1'/><target dev='vda'/></disk>";
const LUN: &str = "<disk type='volume' device='disk'><source pool='iscsi' volume='unit:0:0:1'/><target dev='vdb'/></disk>";
const LV: &str = "<disk type='volume' device='disk'><source pool='vg' volume='root.img'/><target dev='vdc'/></disk>";
const LOOSE: &str =
    "<disk type='block' device='disk'><source dev='/dev/sdz'/><target dev='vdd'/></disk>";
const NET: &str = "<disk type='network' device='disk'><source protocol='iscsi' name='iqn.x/1'><host name='h'/></source><target dev='vde'/></disk>";

/// A node with a disk pool `dp` (room: `dp_room`), an iscsi-direct pool, a logical pool `vg`
/// and the file pool `default` at /d (room: `d_room`).
fn node(devices: &str, dp_room: u64, d_room: u64) -> Observed {
    let mut block = HashMap::new();
    block.insert(
        BlockRef::Device("/dev/loop0p1".into()),
        BlockVolume {
            pool_available: dp_room,
            ..vol("dp", "disk", "loop0p1", "/dev/loop0p1", 8 * MIB)
        },
    );
    block.insert(
        BlockRef::Volume {
            pool: "iscsi".into(),
            volume: "unit:0:0:1".into(),
        },
        vol(
            "iscsi",
            "iscsi-direct",
            "unit:0:0:1",
            "ip-x-lun-1",
            64 * MIB,
        ),
    );
    let mut lv = vol("vg", "logical", "root.img", "/dev/vg/root.img", 4 * MIB);
    lv.pool_volumes.push("root-clone1.img".into());
    block.insert(
        BlockRef::Volume {
            pool: "vg".into(),
            volume: "root.img".into(),
        },
        lv,
    );
    let found = |t: &str| {
        VolumeLookup::Found(VolumeSource {
            path: "x".into(),
            pool_type: t.into(),
            is_file: false,
        })
    };
    Observed {
        source: Source::ShutOff(
            parse_domain(&format!("<domain><devices>{devices}</devices></domain>")).unwrap(),
        ),
        names: vec!["web".into()],
        pools: vec![
            pool("dp", "disk", "/dev", dp_room),
            pool("iscsi", "iscsi-direct", "/dev", 0),
            pool("vg", "logical", "/dev/vg", 1 << 30),
            pool("default", "dir", "/d", d_room),
        ],
        pool_dirs: HashMap::from([("default".into(), "/d".into())]),
        volumes: HashMap::from([
            (("iscsi".into(), "unit:0:0:1".into()), found("iscsi-direct")),
            (("vg".into(), "root.img".into()), found("logical")),
        ]),
        block,
        ..Default::default()
    }
}

fn disks(d: Decision) -> Vec<CloneDisk> {
    match d {
        Decision::Start(p) => p.disks,
        other => panic!("not started: {other:?}"),
    }
}

fn refusal(d: Decision) -> Refusal<CloneReason> {
    match d {
        Decision::Wait(r) | Decision::Refuse(r) => r,
        other => panic!("not refused: {other:?}"),
    }
}

fn plan(devices: &str, dp_room: u64, d_room: u64) -> Decision {
    decide(
        &spec("default"),
        "u",
        "n1",
        &VMCloneStatus::default(),
        &node(devices, dp_room, d_room),
    )
}

/// (devices, disk-pool room, default room, source, target, pool, what the message says).
type Route = (
    &'static str,
    u64,
    u64,
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
);

#[test]
fn each_pool_capability_takes_its_route() {
    let g = 1 << 30;
    // (devices, disk-pool room, default room) -> (source, target, pool, message says)
    let table: &[Route] = &[
        // A disk pool with room: the next partition of the same pool.
        (PART, g, g, "/dev/loop0p1", "loop0p2", "dp", None),
        // An iscsi-direct LUN: streamed into a file of the fallback pool, named after it.
        (
            LUN,
            g,
            g,
            "volume unit:0:0:1 of pool iscsi",
            "/d/unit-0-0-1-clone1.img",
            "default",
            Some("cannot create volumes"),
        ),
        // A logical volume: `<name>-cloneN<ext>`, past the names its pool has.
        (
            LV,
            g,
            g,
            "volume root.img of pool vg",
            "root-clone2.img",
            "vg",
            None,
        ),
        // A disk pool without room: streamed from its device into the fallback pool.
        (
            PART,
            MIB,
            g,
            "/dev/loop0p1",
            "/d/loop0p1-clone1.img",
            "default",
            Some("lacks room"),
        ),
    ];
    for (devices, dp, d, source, target, pool, says) in table {
        let got = disks(plan(devices, *dp, *d));
        assert_eq!(got.len(), 1, "{devices}");
        let c = &got[0];
        assert_eq!(
            (c.source.as_str(), c.target.as_deref(), c.pool.as_deref()),
            (*source, Some(*target), Some(*pool)),
            "{devices}"
        );
        assert_eq!(c.strategy, None);
        assert_eq!(c.copied_bytes, Some(0));
        let kind = if target.starts_with('/') {
            CopyKind::File
        } else {
            CopyKind::PoolVolume
        };
        assert_eq!(c.kind, Some(kind), "{devices}");
        match says {
            Some(s) => assert!(c.message.as_deref().unwrap_or("").contains(s), "{c:?}"),
            None => assert_eq!(c.message, None),
        }
    }
}

#[test]
fn mixed_block_sources_get_distinct_destinations() {
    let part2 =
        "<disk type='block' device='disk'><source dev='/dev/loop0p1'/><target dev='vdf'/></disk>";
    let got = disks(plan(&format!("{PART}{LUN}{part2}"), 1 << 30, 1 << 30));
    let targets: Vec<_> = got.iter().filter_map(|d| d.target.clone()).collect();
    assert_eq!(
        targets,
        vec!["loop0p2", "/d/unit-0-0-1-clone1.img", "loop0p3"],
        "two copies of one partition get two partitions"
    );
}

#[test]
fn what_cannot_be_copied_or_has_no_room_is_refused() {
    let table: &[(&str, u64, u64, CloneReason, &str)] = &[
        // A block device in no pool: nothing can create a copy of it.
        (
            LOOSE,
            1 << 30,
            1 << 30,
            CloneReason::UnsupportedDisk,
            "no active storage pool",
        ),
        (
            NET,
            1 << 30,
            1 << 30,
            CloneReason::UnsupportedDisk,
            "names no storage pool",
        ),
        // The stream does not fit into the fallback pool.
        (LUN, 1 << 30, MIB, CloneReason::InsufficientSpace, "default"),
        // Neither the disk pool nor the fallback has room.
        (PART, MIB, MIB, CloneReason::InsufficientSpace, "default"),
    ];
    for (devices, dp, d, reason, says) in table {
        let r = refusal(plan(devices, *dp, *d));
        assert_eq!(r.reason, *reason, "{devices}: {r:?}");
        assert!(r.message.contains(says), "{devices}: {}", r.message);
        assert!(
            r.message.contains("<readonly/>") || *reason != CloneReason::UnsupportedDisk,
            "{}",
            r.message
        );
    }
    // A fallback that is no file pool cannot take a stream.
    let mut obs = node(LUN, 1 << 30, 1 << 30);
    obs.pools.retain(|p| p.name != "default");
    let r = refusal(decide(
        &spec("vg"),
        "u",
        "n1",
        &VMCloneStatus::default(),
        &obs,
    ));
    assert_eq!(r.reason, CloneReason::StorageNotUsable, "{r:?}");
    assert!(
        r.message.contains("cannot hold file copies"),
        "{}",
        r.message
    );
}

#[test]
fn read_only_block_disks_stay_shared() {
    let ro = "<disk type='block' device='disk'><source dev='/dev/sdz'/><target dev='vda'/><readonly/></disk>";
    let got = disks(plan(ro, 1 << 30, 1 << 30));
    assert_eq!(got[0].strategy.as_deref(), Some("Shared"));
    assert_eq!(got[0].target.as_deref(), Some("/dev/sdz"));
}

#[test]
fn the_planned_kind_says_where_a_copy_goes() {
    let d = |target: &str, kind| CloneDisk {
        target: Some(target.into()),
        kind,
        ..Default::default()
    };
    // The kind decides, whatever the target looks like.
    assert!(into_pool(&d("lv-clone1", Some(CopyKind::PoolVolume))));
    assert!(!into_pool(&d("relative/file.img", Some(CopyKind::File))));
    assert!(!into_pool(&d("noslash.img", Some(CopyKind::File))));
    // A plan recorded before `kind` existed: by the target's shape.
    assert!(into_pool(&d("lv-clone1", None)));
    assert!(!into_pool(&d("/p/a-clone1.img", None)));
    assert!(!into_pool(&CloneDisk::default()));
}
