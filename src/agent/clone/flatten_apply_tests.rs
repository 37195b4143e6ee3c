//! The job's copies of qcow2 overlays, against `FakeLibvirt` and real images made with
//! `qemu-img`: a flattened copy stands alone and its definition names no backing chain; a
//! shared one stays an overlay of the same base; a merge that fails leaves nothing.

use std::path::Path;
use std::sync::Arc;

use super::tests::{job, planned, run_job, source_xml};
use super::*;
use crate::api::StoragePoolSummary;
use crate::copy::flatten::tests::{backing_of, chain, reads, run, s};
use crate::libvirt::fake::FakeLibvirt;
use crate::libvirt::volume::VolumeSource;

/// A qcow2 disk with the backing chain libvirt writes into a definition.
fn overlay_disk(source: &str, base: &Path) -> String {
    format!(
        "<disk type='{}' device='disk'><driver name='qemu' type='qcow2'/>{source}\
         <backingStore type='file'><format type='qcow2'/><source file='{}'/><backingStore/></backingStore>\
         <target dev='vda'/></disk>",
        if source.contains("pool=") {
            "volume"
        } else {
            "file"
        },
        base.display()
    )
}

/// The `<backingStore>` elements of the clone's first disk: whether each has children.
fn clone_backing(fake: &FakeLibvirt) -> Vec<bool> {
    let xml = fake.domain_xml("web-clone1").unwrap();
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let disk = doc.descendants().find(|n| n.has_tag_name("disk")).unwrap();
    disk.descendants()
        .filter(|n| n.has_tag_name("backingStore"))
        .map(|n| n.has_children())
        .collect()
}

fn overlay(src: &Path, dst: &Path, how: OverlayCopy) -> CloneDisk {
    CloneDisk {
        overlay: Some(how),
        total_bytes: Some(2 << 20),
        ..planned(src, dst)
    }
}

#[tokio::test]
async fn a_flattened_overlay_stands_alone_with_the_whole_chains_data() {
    let (dir, base, ovl) = chain();
    let copy = dir.path().join("ovl-clone1.qcow2");
    let xml = source_xml(
        &overlay_disk(&format!("<source file='{}'/>", ovl.display()), &base),
        None,
    );
    let fake = Arc::new(FakeLibvirt::default().with_domain_xml("web", &xml));
    let mut j = job(&xml, "web-clone1", vec![], false);
    // Reserved when planned, as `reserve` does.
    assert!(j.ledger.reserve_file(&copy).unwrap());
    j.status.disks = vec![overlay(&ovl, &copy, OverlayCopy::Flattened)];
    let base_before = std::fs::read(&base).unwrap();
    let end = run_job(fake.clone(), j).await;
    let JobEnd::Completed { status, .. } = end else {
        panic!("{end:?}");
    };
    assert_eq!(backing_of(&copy), None, "no backing file");
    assert!(reads(&copy, "0x33", "0"), "the base's data");
    assert!(reads(&copy, "0x44", "1M"), "the overlay's data");
    let d = &status.disks[0];
    assert_eq!(d.overlay, Some(OverlayCopy::Flattened));
    assert_eq!(d.strategy.as_deref(), Some("Copy"), "never a reflink");
    assert_eq!(d.copied_bytes, d.total_bytes);
    assert_eq!(clone_backing(&fake), [false], "an empty <backingStore/>");
    assert_eq!(std::fs::read(&base).unwrap(), base_before);
    // The clone needs the base no longer.
    std::fs::remove_file(&base).unwrap();
    assert!(reads(&copy, "0x33", "0"));
}

#[tokio::test]
async fn a_shared_overlay_copy_keeps_its_base_and_chain() {
    let (dir, base, ovl) = chain();
    let copy = dir.path().join("ovl-clone1.qcow2");
    let xml = source_xml(
        &overlay_disk(&format!("<source file='{}'/>", ovl.display()), &base),
        None,
    );
    let fake = Arc::new(FakeLibvirt::default().with_domain_xml("web", &xml));
    let d = overlay(&ovl, &copy, OverlayCopy::SharedBase);
    let end = run_job(fake.clone(), job(&xml, "web-clone1", vec![d], false)).await;
    assert!(matches!(end, JobEnd::Completed { .. }), "{end:?}");
    assert_eq!(backing_of(&copy).as_deref(), base.to_str());
    assert_eq!(
        clone_backing(&fake),
        [true, false],
        "the chain as the source's"
    );
}

#[tokio::test]
async fn a_shared_overlay_copied_elsewhere_names_its_relative_base_absolutely() {
    let (_dir, base, ovl) = chain();
    // The overlay names its base relative to its own directory, as made by hand.
    run(&[
        "qemu-img",
        "rebase",
        "-u",
        "-F",
        "qcow2",
        "-b",
        "base.qcow2",
        &s(&ovl),
    ]);
    assert_eq!(backing_of(&ovl).as_deref(), Some("base.qcow2"));
    // The copy goes to another pool's directory (the fallback pool had the room).
    let other = tempfile::tempdir().unwrap();
    let copy = other.path().join("ovl-clone1.qcow2");
    let xml = source_xml(
        &overlay_disk(&format!("<source file='{}'/>", ovl.display()), &base),
        None,
    );
    let fake = Arc::new(FakeLibvirt::default().with_domain_xml("web", &xml));
    let d = overlay(&ovl, &copy, OverlayCopy::SharedBase);
    let end = run_job(fake.clone(), job(&xml, "web-clone1", vec![d], false)).await;
    assert!(matches!(end, JobEnd::Completed { .. }), "{end:?}");
    assert_eq!(backing_of(&copy).as_deref(), base.to_str());
    assert!(
        reads(&copy, "0x33", "0"),
        "the base's data, through the copy"
    );
    assert!(reads(&copy, "0x44", "1M"), "the overlay's own data");
    assert_eq!(
        backing_of(&ovl).as_deref(),
        Some("base.qcow2"),
        "the source is untouched"
    );
}

#[tokio::test]
async fn a_flattened_volume_disk_defines_no_backing_chain() {
    let (dir, base, ovl) = chain();
    let copy = dir.path().join("ovl-clone1.qcow2");
    let xml = source_xml(
        &overlay_disk("<source pool='p' volume='ovl.qcow2'/>", &base),
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
                "ovl.qcow2",
                VolumeSource {
                    path: s(&ovl),
                    pool_type: "dir".into(),
                    is_file: true,
                },
            ),
    );
    let mut d = overlay(&ovl, &copy, OverlayCopy::Flattened);
    d.pool = Some("p".into());
    let end = run_job(fake.clone(), job(&xml, "web-clone1", vec![d], false)).await;
    assert!(matches!(end, JobEnd::Completed { .. }), "{end:?}");
    let parsed = domain::parse_domain(&fake.domain_xml("web-clone1").unwrap()).unwrap();
    assert_eq!(parsed.disks[0].volume.as_deref(), Some("ovl-clone1.qcow2"));
    assert_eq!(backing_of(&copy), None);
    assert_eq!(clone_backing(&fake), [false]);
}

#[tokio::test]
async fn a_merge_that_fails_fails_the_task_and_leaves_nothing() {
    let (dir, base, ovl) = chain();
    let copy = dir.path().join("ovl-clone1.qcow2");
    let xml = source_xml(
        &overlay_disk(&format!("<source file='{}'/>", ovl.display()), &base),
        None,
    );
    // The base went away after the plan: the chain cannot be read.
    std::fs::remove_file(&base).unwrap();
    let fake = Arc::new(FakeLibvirt::default().with_domain_xml("web", &xml));
    let mut j = job(&xml, "web-clone1", vec![], false);
    assert!(j.ledger.reserve_file(&copy).unwrap());
    j.status.disks = vec![overlay(&ovl, &copy, OverlayCopy::Flattened)];
    let end = run_job(fake.clone(), j).await;
    let JobEnd::Failed { why, .. } = end else {
        panic!("{end:?}");
    };
    assert_eq!(why.reason, CloneReason::CopyFailed);
    assert!(why.message.contains("backing chain"), "{}", why.message);
    assert!(fake.domain_state("web-clone1").is_none());
    assert!(!copy.exists(), "the reserved copy is removed");
    assert!(ovl.exists());
}
