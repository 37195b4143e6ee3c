use std::path::PathBuf;

use super::*;
use crate::agent::storage::observe::Observed;
use crate::agent::storage::plan::plan;
use crate::agent::storage::source::{FileKind, Found, PathFacts, SourceFacts};
use crate::api::{
    AttachMode, Bus, StorageType, VirtualMachineStorageSpec, VirtualMachineStorageStatus,
};
use crate::libvirt::ErrorKind;
use crate::libvirt::fake::FakeLibvirt;

const ALIAS: &str = "ua-vps-1";
const SCSI: &str = "<controller type='scsi' model='virtio-scsi'/>";
const ISO: &str = "/pool/a.iso";

fn spec(type_: StorageType, bus: Bus, path: Option<&str>) -> VirtualMachineStorageSpec {
    VirtualMachineStorageSpec {
        vm: "vm".into(),
        node_name: None,
        type_,
        bus,
        source: path.map(|p| crate::api::StorageSource {
            path: Some(p.into()),
            ..Default::default()
        }),
        format: None,
        read_only: None,
        target: None,
        boot_order: None,
        attach: AttachMode::LiveAndPersistent,
        driver: None,
        iotune: None,
        serial: None,
        shareable: None,
    }
}

/// Plans `spec` against the fake's current domain, as a reconcile would.
async fn plan_on(fake: &FakeLibvirt, spec: &VirtualMachineStorageSpec) -> Plan {
    let source = match spec.source.as_ref().and_then(|s| s.path.clone()) {
        Some(p) => SourceFacts::Path(PathFacts {
            requested: p.clone().into(),
            found: Found::Present {
                real: p.into(),
                kind: Ok(FileKind::File),
                header: Some(Vec::new()),
            },
        }),
        None => SourceFacts::None,
    };
    let observed = Observed {
        node: "n1".into(),
        domain: fake.domain("vm").await.unwrap(),
        source,
        pools: vec![("p".into(), PathBuf::from("/pool"))],
        ..Observed::default()
    };
    plan(
        spec,
        &VirtualMachineStorageStatus::default(),
        ALIAS,
        &observed,
    )
    .unwrap()
}

fn done(applied: Applied) -> Done {
    match applied {
        Applied::Done(d) => *d,
        Applied::Failed(f) => panic!("failed: {f:?}"),
    }
}

fn failure(applied: Applied) -> Failure {
    match applied {
        Applied::Failed(f) => f,
        Applied::Done(d) => panic!("done: {d:?}"),
    }
}

fn has(fake: &FakeLibvirt, live: bool) -> bool {
    let d = fake.domain_state("vm").unwrap();
    let side = if live { d.live } else { d.config };
    side.disk(ALIAS).is_some()
}

#[tokio::test]
async fn a_scsi_disk_gets_a_controller_and_is_plugged_and_defined() {
    let fake = FakeLibvirt::default().with_domain("vm", true, "");
    let p = plan_on(
        &fake,
        &spec(StorageType::Disk, Bus::Scsi, Some("/pool/a.img")),
    )
    .await;
    let d = done(apply(&fake, &p).await.unwrap());
    assert!(d.plugged && d.defined && !d.media_changed);
    assert_eq!(d.restart, None);
    assert!(has(&fake, true) && has(&fake, false));
    let state = fake.domain_state("vm").unwrap();
    assert!(state.config.has_controller("scsi", Some("virtio-scsi")));
    assert!(state.live.has_controller("scsi", Some("virtio-scsi")));
    assert!(d.view.config.disk(ALIAS).is_some(), "the view is read back");
    // Running it again changes nothing.
    let again = plan_on(
        &fake,
        &spec(StorageType::Disk, Bus::Scsi, Some("/pool/a.img")),
    )
    .await;
    assert!(again.steps.is_empty(), "{:?}", again.steps);
}

#[tokio::test]
async fn a_refused_controller_stops_everything() {
    let fake = FakeLibvirt::default().with_domain("vm", true, "");
    fake.fail_next("attach a device", Some(Affect::Config), ErrorKind::Refused);
    let p = plan_on(
        &fake,
        &spec(StorageType::Disk, Bus::Scsi, Some("/pool/a.img")),
    )
    .await;
    assert!(matches!(
        failure(apply(&fake, &p).await.unwrap()),
        Failure::ScsiController(_)
    ));
    assert!(!has(&fake, true) && !has(&fake, false));
}

#[tokio::test]
async fn a_controller_that_cannot_hot_plug_defers_the_device_to_the_next_boot() {
    let fake = FakeLibvirt::default().with_domain("vm", true, "");
    fake.fail_next("attach a device", Some(Affect::Live), ErrorKind::NoFreeSlot);
    let p = plan_on(
        &fake,
        &spec(StorageType::Disk, Bus::Scsi, Some("/pool/a.img")),
    )
    .await;
    let d = done(apply(&fake, &p).await.unwrap());
    assert!(matches!(
        d.restart,
        Some(RestartCause::ScsiControllerHotPlugFailed(_))
    ));
    assert!(!d.plugged && d.defined);
    assert!(!has(&fake, true) && has(&fake, false));
    // No hot-plug of the device was tried: one live attach only (the controller's).
    let live_attaches = fake
        .calls()
        .iter()
        .filter(|c| c.as_str() == "attach a device Live")
        .count();
    assert_eq!(live_attaches, 1);
}

#[tokio::test]
async fn a_hot_plug_limit_keeps_the_device_for_the_next_boot() {
    let fake = FakeLibvirt::default().with_domain("vm", true, SCSI);
    fake.fail_next(
        "attach a device",
        Some(Affect::Live),
        ErrorKind::Unsupported,
    );
    let p = plan_on(
        &fake,
        &spec(StorageType::Disk, Bus::Scsi, Some("/pool/a.img")),
    )
    .await;
    let d = done(apply(&fake, &p).await.unwrap());
    assert!(matches!(d.restart, Some(RestartCause::HotPlugLimit(_))));
    assert!(!has(&fake, true) && has(&fake, false));
}

#[tokio::test]
async fn a_device_the_guest_refuses_leaves_nothing_behind() {
    let fake = FakeLibvirt::default().with_domain("vm", true, SCSI);
    fake.fail_next("attach a device", Some(Affect::Live), ErrorKind::Refused);
    let p = plan_on(
        &fake,
        &spec(StorageType::Disk, Bus::Scsi, Some("/pool/a.img")),
    )
    .await;
    assert!(matches!(
        failure(apply(&fake, &p).await.unwrap()),
        Failure::HotPlugRefused(_)
    ));
    assert!(!has(&fake, true) && !has(&fake, false));
}

#[tokio::test]
async fn a_lost_connection_during_hot_plug_is_an_error() {
    let fake = FakeLibvirt::default().with_domain("vm", true, SCSI);
    fake.fail_next(
        "attach a device",
        Some(Affect::Live),
        ErrorKind::Unreachable,
    );
    let p = plan_on(
        &fake,
        &spec(StorageType::Disk, Bus::Scsi, Some("/pool/a.img")),
    )
    .await;
    let err = apply(&fake, &p).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unreachable);
}

#[tokio::test]
async fn a_refused_definition_takes_the_hot_plug_back() {
    let fake = FakeLibvirt::default().with_domain("vm", true, SCSI);
    fake.fail_next("attach a device", Some(Affect::Config), ErrorKind::Refused);
    let p = plan_on(
        &fake,
        &spec(StorageType::Disk, Bus::Scsi, Some("/pool/a.img")),
    )
    .await;
    let Failure::Definition(msg) = failure(apply(&fake, &p).await.unwrap()) else {
        panic!("a definition failure")
    };
    assert!(msg.contains("unplugged again"), "{msg}");
    assert!(!has(&fake, true) && !has(&fake, false));
}

#[tokio::test]
async fn sata_on_a_running_guest_goes_to_the_definition_only() {
    let fake = FakeLibvirt::default().with_domain("vm", true, "");
    let p = plan_on(
        &fake,
        &spec(StorageType::Disk, Bus::Sata, Some("/pool/a.img")),
    )
    .await;
    let d = done(apply(&fake, &p).await.unwrap());
    assert_eq!(d.restart, Some(RestartCause::BusCannotHotPlug(Bus::Sata)));
    assert!(!has(&fake, true) && has(&fake, false));
    assert!(
        !fake.calls().iter().any(|c| c == "attach a device Live"),
        "no hot-plug tried: {:?}",
        fake.calls()
    );
}

#[tokio::test]
async fn media_are_swapped_and_ejected_in_place() {
    let cd = format!(
        "{SCSI}<disk type='file' device='cdrom'><source file='{ISO}'/><target dev='sda' bus='scsi'/><readonly/><alias name='{ALIAS}'/></disk>"
    );
    let fake = FakeLibvirt::default().with_domain("vm", true, &cd);
    let p = plan_on(
        &fake,
        &spec(StorageType::Cdrom, Bus::Scsi, Some("/pool/b.iso")),
    )
    .await;
    let d = done(apply(&fake, &p).await.unwrap());
    assert!(d.media_changed && !d.plugged && !d.defined);
    let source = |live: bool| {
        let s = fake.domain_state("vm").unwrap();
        let side = if live { s.live } else { s.config };
        side.disk(ALIAS).unwrap().source.clone()
    };
    assert_eq!(source(true).as_deref(), Some("/pool/b.iso"));
    assert_eq!(source(false).as_deref(), Some("/pool/b.iso"));
    let p = plan_on(&fake, &spec(StorageType::Cdrom, Bus::Scsi, None)).await;
    let d = done(apply(&fake, &p).await.unwrap());
    assert!(d.media_changed);
    assert_eq!((source(true), source(false)), (None, None));
}

#[tokio::test]
async fn a_failed_media_change_is_an_error() {
    let cd = format!(
        "{SCSI}<disk type='file' device='cdrom'><source file='{ISO}'/><target dev='sda' bus='scsi'/><alias name='{ALIAS}'/></disk>"
    );
    let fake = FakeLibvirt::default().with_domain("vm", true, &cd);
    fake.fail_next("update a device", Some(Affect::Live), ErrorKind::Busy);
    let p = plan_on(&fake, &spec(StorageType::Cdrom, Bus::Scsi, None)).await;
    assert_eq!(apply(&fake, &p).await.unwrap_err().kind(), ErrorKind::Busy);
}

#[tokio::test]
async fn a_shut_off_domain_gets_its_definition_written() {
    let fake = FakeLibvirt::default().with_domain("vm", false, "");
    let p = plan_on(
        &fake,
        &spec(StorageType::Disk, Bus::Virtio, Some("/pool/a.img")),
    )
    .await;
    let d = done(apply(&fake, &p).await.unwrap());
    assert!(d.defined && !d.plugged);
    assert_eq!(
        fake.calls().last().map(String::as_str),
        Some("read the domain")
    );
    assert!(has(&fake, false));
}

#[tokio::test]
async fn a_controller_added_for_a_refused_device_is_removed_again() {
    // Running guest: controller defined and hot-plugged, then the guest refuses the disk.
    let fake = FakeLibvirt::default().with_domain("vm", true, "");
    fake.fail_after("attach a device", Some(Affect::Live), 1, ErrorKind::Refused);
    let p = plan_on(
        &fake,
        &spec(StorageType::Disk, Bus::Scsi, Some("/pool/a.img")),
    )
    .await;
    assert!(matches!(
        failure(apply(&fake, &p).await.unwrap()),
        Failure::HotPlugRefused(_)
    ));
    let state = fake.domain_state("vm").unwrap();
    assert!(
        !state.config.has_controller("scsi", None),
        "{:?}",
        fake.calls()
    );
    assert!(
        !state.live.has_controller("scsi", None),
        "{:?}",
        fake.calls()
    );
    // Shut off: controller defined, then the definition refuses the disk.
    let fake = FakeLibvirt::default().with_domain("vm", false, "");
    fake.fail_after(
        "attach a device",
        Some(Affect::Config),
        1,
        ErrorKind::Refused,
    );
    let p = plan_on(
        &fake,
        &spec(StorageType::Disk, Bus::Scsi, Some("/pool/a.img")),
    )
    .await;
    assert!(matches!(
        failure(apply(&fake, &p).await.unwrap()),
        Failure::Definition(_)
    ));
    assert!(
        !fake
            .domain_state("vm")
            .unwrap()
            .config
            .has_controller("scsi", None)
    );
}

#[tokio::test]
async fn a_plan_without_steps_reads_nothing_again() {
    let fake = FakeLibvirt::default().with_domain("vm", true, "");
    let wanted = spec(StorageType::Disk, Bus::Scsi, Some("/pool/a.img"));
    let first = plan_on(&fake, &wanted).await;
    assert!(unchanged(&first, None).is_none(), "steps to run");
    done(apply(&fake, &first).await.unwrap());
    let again = plan_on(&fake, &wanted).await;
    let view = fake.domain("vm").await.unwrap();
    let reads = fake.calls().len();
    let d = done(unchanged(&again, view).expect("nothing to run"));
    assert_eq!(fake.calls().len(), reads, "no libvirt call");
    assert!(!d.plugged && !d.defined && d.restart.is_none());
    assert!(
        d.view.config.disk(ALIAS).is_some(),
        "the observed view is reported"
    );
}
