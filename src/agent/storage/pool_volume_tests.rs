//! Volumes of pools whose volumes are block devices (logical, disk, iscsi, scsi, mpath) or no
//! node path at all (iscsi-direct, rbd, gluster): resolved through libvirt, allowed by the
//! pool's grant, never by where the path lies.

use std::collections::BTreeMap;

use super::*;
use crate::tenancy::{DOMAINS, Mode, POOLS};

fn volume(pool_type: &str, path: &str) -> SourceFacts {
    SourceFacts::Volume {
        pool: "p".into(),
        name: "v".into(),
        lookup: VolumeLookup::Found(VolumeSource {
            path: path.into(),
            pool_type: pool_type.into(),
            is_file: false,
        }),
        file: None,
    }
}

fn granted(pools: &str) -> Grants {
    let ann: BTreeMap<String, String> = [(DOMAINS, "*"), (POOLS, pools)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Grants::of(Mode::Namespaced, "ta", &ann)
}

#[test]
fn block_pool_volumes_are_block_disks_at_libvirts_path() {
    for pool_type in ["logical", "disk", "iscsi", "scsi", "mpath"] {
        let r = resolve(
            &volume(pool_type, "/dev/loop7p1"),
            &[],
            &Grants::open(),
            None,
            "n1",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            r,
            Resolved {
                path: PathBuf::from("/dev/loop7p1"),
                block: true,
                format: "raw".into(),
                volume: None,
            },
            "{pool_type}"
        );
        assert_eq!(r.label(), "/dev/loop7p1");
    }
}

#[test]
fn network_pool_volumes_are_named_by_pool_and_volume() {
    for pool_type in ["iscsi-direct", "rbd", "gluster"] {
        let r = resolve(
            &volume(pool_type, "ip-127.0.0.1:3260-iscsi-iqn.x-lun-1"),
            &[],
            &Grants::open(),
            Some(DiskFormat::Raw),
            "n1",
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.volume, Some(("p".into(), "v".into())), "{pool_type}");
        assert!(!r.block);
        assert_eq!(r.label(), "volume v of pool p");
    }
}

#[test]
fn the_pool_grant_decides_not_the_path() {
    let facts = volume("iscsi-direct", "ip-127.0.0.1:3260-iscsi-iqn.x-lun-1");
    assert!(resolve(&facts, &[], &granted("p"), None, "n1").is_ok());
    let r = resolve(&facts, &[], &granted("q"), None, "n1").unwrap_err();
    assert_eq!(r.reason, StorageReason::NotGranted);
    assert!(!r.message.contains("lun-1"), "{}", r.message);
    let r = resolve(
        &volume("disk", "/dev/loop7p1"),
        &[],
        &granted("q"),
        None,
        "n1",
    )
    .unwrap_err();
    assert_eq!(r.reason, StorageReason::NotGranted);
}

#[test]
fn qcow2_on_a_block_or_network_volume_is_refused() {
    let r = resolve(
        &volume("logical", "/dev/vg/lv"),
        &[],
        &Grants::open(),
        Some(DiskFormat::Qcow2),
        "n1",
    )
    .unwrap_err();
    assert_eq!(r.reason, StorageReason::InvalidSpec);
    assert!(r.message.contains("raw"), "{}", r.message);
}

#[test]
fn a_pool_type_virtplane_does_not_know_stays_on_the_path_check() {
    // Unknown type: the path is checked like a file's, and a path outside is refused.
    let mut facts = volume("vitastor", "/dev/vit0");
    if let SourceFacts::Volume { file, .. } = &mut facts {
        *file = Some(PathFacts {
            requested: "/dev/vit0".into(),
            found: Found::Present {
                real: "/dev/vit0".into(),
                kind: Ok(FileKind::Block),
                header: None,
            },
        });
    }
    let r = resolve(
        &facts,
        &[PathBuf::from("/pool")],
        &Grants::open(),
        None,
        "n1",
    )
    .unwrap_err();
    assert_eq!(r.reason, StorageReason::PathNotAllowed);
}
