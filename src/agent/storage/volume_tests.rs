use super::*;
use crate::api::StoragePoolSummary;
use crate::libvirt::fake::FakeLibvirt;
use crate::libvirt::provision::NewVolume;

fn pool() -> StoragePoolSummary {
    StoragePoolSummary {
        name: "p".into(),
        type_: "dir".into(),
        path: Some("/pool".into()),
        active: true,
        ..Default::default()
    }
}

fn new(name: &str, capacity: u64) -> NewVolume {
    NewVolume {
        name: name.into(),
        capacity,
        format: "qcow2".into(),
        allocation: 0,
        prealloc_metadata: false,
        backing: None,
    }
}

#[tokio::test]
async fn records_survive_and_are_per_object() {
    let dir = tempfile::tempdir().unwrap();
    let records = Created::new(dir.path().join("volumes"));
    assert_eq!(records.read("u-1").await.unwrap(), None);
    let r = Record {
        pool: "p".into(),
        name: "d".into(),
    };
    records.write("u-1", &r).await.unwrap();
    // Another instance (an agent restart) reads it back.
    let again = Created::new(dir.path().join("volumes"));
    assert_eq!(again.read("u-1").await.unwrap(), Some(r));
    assert_eq!(again.read("u-2").await.unwrap(), None);
    // A UID cannot leave the directory.
    assert!(records.path("../x").starts_with(dir.path().join("volumes")));
    again.remove("u-1").await.unwrap();
    again.remove("u-1").await.unwrap();
    assert_eq!(records.read("u-1").await.unwrap(), None);
}

#[tokio::test]
async fn create_records_first_and_a_taken_name_is_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let records = Created::new(dir.path().to_path_buf());
    let fake = FakeLibvirt::default().with_pool(pool());
    let step = VolumeStep::Create(new("d", 1 << 30));
    let done = apply_step(&fake, &records, "u-1", "p", "d", &step, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.map(|(r, _)| r), Some("VolumeCreated"));
    assert_eq!(fake.capacity_of("p", "d"), Some(1 << 30));
    assert!(records.read("u-1").await.unwrap().is_some());

    // Another object racing for the same name: libvirt refuses, its record goes, NameConflict.
    let r = apply_step(&fake, &records, "u-2", "p", "d", &step, None)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(r.reason, StorageReason::NameConflict);
    assert_eq!(records.read("u-2").await.unwrap(), None);
    assert_eq!(fake.capacity_of("p", "d"), Some(1 << 30), "untouched");

    // libvirt refusing for another reason: ProvisionFailed, no record left.
    fake.fail_next("create a storage volume", None, ErrorKind::Refused);
    let r = apply_step(
        &fake,
        &records,
        "u-3",
        "p",
        "e",
        &VolumeStep::Create(new("e", 1)),
        None,
    )
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(r.reason, StorageReason::ProvisionFailed);
    assert_eq!(records.read("u-3").await.unwrap(), None);
    // A lost connection: retried, the record kept (the volume may have been made).
    fake.fail_next("create a storage volume", None, ErrorKind::Unreachable);
    assert!(
        apply_step(
            &fake,
            &records,
            "u-4",
            "p",
            "f",
            &VolumeStep::Create(new("f", 1)),
            None
        )
        .await
        .is_err()
    );
    assert!(records.read("u-4").await.unwrap().is_some());
}

#[tokio::test]
async fn grow_is_live_on_a_running_guest_else_offline() {
    let dir = tempfile::tempdir().unwrap();
    let records = Created::new(dir.path().to_path_buf());
    let fake = FakeLibvirt::default()
        .with_pool(pool())
        .with_domain(
            "vm",
            true,
            "<disk type='file' device='disk'><source file='/pool/d'/><target dev='vdb' bus='virtio'/><alias name='ua-vps-1'/></disk>",
        );
    fake.create_volume("p", &new("d", 1 << 20)).await.unwrap();
    let grow = VolumeStep::Grow {
        from: 1 << 20,
        to: 2 << 20,
    };
    let done = apply_step(&fake, &records, "u", "p", "d", &grow, Some(("vm", "vdb")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.map(|(r, _)| r), Some("VolumeResized"));
    assert!(
        fake.calls()
            .contains(&"resize a running guest's disk".to_string()),
        "{:?}",
        fake.calls()
    );
    assert!(
        !fake
            .calls()
            .contains(&"resize a storage volume".to_string())
    );
    apply_step(&fake, &records, "u", "p", "d", &grow, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fake.capacity_of("p", "d"), Some(2 << 20));
    // libvirt refusing the resize: ProvisionFailed, reported.
    fake.fail_next("resize a running guest's disk", None, ErrorKind::Refused);
    let r = apply_step(&fake, &records, "u", "p", "d", &grow, Some(("vm", "vdb")))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(r.reason, StorageReason::ProvisionFailed);
    // Keep does nothing.
    let before = fake.calls().len();
    assert_eq!(
        apply_step(&fake, &records, "u", "p", "d", &VolumeStep::Keep, None)
            .await
            .unwrap()
            .unwrap(),
        None
    );
    assert_eq!(fake.calls().len(), before);
}
