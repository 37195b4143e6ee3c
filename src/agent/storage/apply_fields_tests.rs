//! plan -> apply -> report of field edits against the in-memory libvirt: the running guest, the
//! definition, the conditions and the Events after each edit, a boot, and a refusal.

use std::path::PathBuf;

use super::*;
use crate::agent::storage::observe::Observed;
use crate::agent::storage::plan::plan;
use crate::agent::storage::report;
use crate::agent::storage::source::{FileKind, Found, PathFacts, SourceFacts};
use crate::api::{
    AttachMode, Bus, CacheMode, DriverTuning, IoTune, StorageSource, StorageType,
    VirtualMachineStorageSpec, VirtualMachineStorageStatus,
};
use crate::libvirt::ErrorKind;
use crate::libvirt::fake::FakeLibvirt;
use crate::libvirt::tuning::disk_fields;

const ALIAS: &str = "ua-vps-1";
const IMG: &str = "/pool/a.img";

fn base() -> VirtualMachineStorageSpec {
    VirtualMachineStorageSpec {
        vm: "vm".into(),
        node_name: None,
        type_: StorageType::Disk,
        bus: Bus::Scsi,
        source: Some(StorageSource {
            path: Some(IMG.into()),
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

/// One reconcile: plan, apply, report; the outcome and the plan's steps.
async fn reconcile(
    fake: &FakeLibvirt,
    spec: &VirtualMachineStorageSpec,
    prev: &VirtualMachineStorageStatus,
) -> (super::super::Outcome, Vec<Step>) {
    let observed = Observed {
        node: "n1".into(),
        domain: fake.domain("vm").await.unwrap(),
        source: SourceFacts::Path(PathFacts {
            requested: IMG.into(),
            found: Found::Present {
                real: IMG.into(),
                kind: Ok(FileKind::File),
                header: Some(Vec::new()),
            },
        }),
        pools: vec![("p".into(), PathBuf::from("/pool"))],
        ..Observed::default()
    };
    let p = plan(spec, prev, ALIAS, &observed).unwrap();
    let applied = apply(fake, &p).await.unwrap();
    (report::report(prev, &p, applied), p.steps)
}

fn disk(fake: &FakeLibvirt, live: bool) -> crate::libvirt::tuning::DiskFields {
    let d = fake.domain_state("vm").unwrap();
    let side = if live { d.live } else { d.config };
    disk_fields(&side.disk(ALIAS).unwrap().xml)
}

/// A boot: the running guest gets the definition's device.
async fn boot(fake: &FakeLibvirt) {
    let config = fake
        .domain_state("vm")
        .unwrap()
        .config
        .disk(ALIAS)
        .unwrap()
        .xml
        .clone();
    let live = fake
        .domain_state("vm")
        .unwrap()
        .live
        .disk(ALIAS)
        .unwrap()
        .xml
        .clone();
    fake.change_device("vm", &live, DeviceChange::Detach, Affect::Live)
        .await
        .unwrap();
    fake.change_device("vm", &config, DeviceChange::Attach, Affect::Live)
        .await
        .unwrap();
}

fn reasons(o: &super::super::Outcome) -> Vec<&'static str> {
    o.events.iter().map(|(_, r, _)| *r).collect()
}

#[tokio::test]
async fn edits_take_effect_live_or_wait_for_the_next_boot() {
    let fake = FakeLibvirt::default().with_domain(
        "vm",
        true,
        "<controller type='scsi' model='virtio-scsi'/>",
    );
    let (o, _) = reconcile(&fake, &base(), &Default::default()).await;
    assert!(o.ready.status, "{}", o.ready.message);
    let prev = o.status;

    // A cache mode and I/O limits: the limits live and in the definition, the cache mode in the
    // definition only, with RestartRequired naming it.
    let edited = VirtualMachineStorageSpec {
        driver: Some(DriverTuning {
            cache: Some(CacheMode::None),
            ..Default::default()
        }),
        iotune: Some(IoTune {
            total_iops_sec: Some(200),
            ..Default::default()
        }),
        ..base()
    };
    let (o, steps) = reconcile(&fake, &edited, &prev).await;
    assert_eq!(steps, [Step::Redefine, Step::SetIoTune(Affect::Live)]);
    let (live, config) = (disk(&fake, true), disk(&fake, false));
    assert_eq!((live.iotune[3], config.iotune[3]), (200, 200));
    assert_eq!((live.cache, config.cache.as_deref()), (None, Some("none")));
    assert!(!o.ready.status);
    assert_eq!(o.ready.reason, "RestartRequired");
    let restart = o.restart.clone().expect("RestartRequired");
    assert!(
        restart.contains("spec.driver.cache of sda is in the definition of vm"),
        "{restart}"
    );
    assert_eq!(o.status.pending_restart, ["driver.cache"]);
    assert_eq!(
        o.status.iotune.as_ref().and_then(|t| t.total_iops_sec),
        Some(200)
    );
    assert_eq!(reasons(&o), ["Updated", "IoTuneChanged"]);
    let prev = o.status;

    // Reconciling again changes nothing and still waits.
    let (o, steps) = reconcile(&fake, &edited, &prev).await;
    assert!(steps.is_empty(), "{steps:?}");
    assert!(o.restart.is_some() && o.events.is_empty());

    // After a boot the cache mode is in effect: Ready, no restart.
    boot(&fake).await;
    let (o, steps) = reconcile(&fake, &edited, &prev).await;
    assert!(steps.is_empty());
    assert!(o.ready.status, "{}", o.ready.message);
    assert!(o.restart.is_none() && o.status.pending_restart.is_empty());
    let prev = o.status;

    // Drift: the limits cleared in the running guest are set again, with a Warning.
    let bare = disk(&fake, true);
    assert_eq!(bare.iotune[3], 200);
    fake.set_block_iotune("vm", "sda", [0; 12], Affect::Live)
        .await
        .unwrap();
    let (o, steps) = reconcile(&fake, &edited, &prev).await;
    assert_eq!(steps, [Step::SetIoTune(Affect::Live)]);
    assert_eq!(reasons(&o), ["DriftCorrected"]);
    assert_eq!(disk(&fake, true).iotune[3], 200);
    let prev = o.status;

    // Revert: the limits go away live and persistent, the cache mode waits again.
    let (o, steps) = reconcile(&fake, &base(), &prev).await;
    assert_eq!(steps, [Step::Redefine, Step::SetIoTune(Affect::Live)]);
    assert_eq!(
        (disk(&fake, true).iotune, disk(&fake, false).iotune),
        ([0; 12], [0; 12])
    );
    assert_eq!(o.status.iotune, None);
    assert_eq!(o.status.pending_restart, ["driver.cache"]);
}

#[tokio::test]
async fn on_a_shut_off_domain_the_definition_is_the_whole_change() {
    let fake = FakeLibvirt::default().with_domain(
        "vm",
        false,
        "<controller type='scsi' model='virtio-scsi'/>",
    );
    let (o, _) = reconcile(&fake, &base(), &Default::default()).await;
    let edited = VirtualMachineStorageSpec {
        serial: Some("SN1".into()),
        iotune: Some(IoTune {
            read_bytes_sec: Some(1 << 20),
            ..Default::default()
        }),
        ..base()
    };
    let (o, steps) = reconcile(&fake, &edited, &o.status).await;
    assert_eq!(steps, [Step::Redefine]);
    let config = disk(&fake, false);
    assert_eq!(
        (config.serial.as_deref(), config.iotune[1]),
        (Some("SN1"), 1 << 20)
    );
    assert!(o.ready.status, "{}", o.ready.message);
    assert!(o.restart.is_none());
    assert_eq!(
        o.status.iotune.and_then(|t| t.read_bytes_sec),
        Some(1 << 20)
    );
    assert_eq!(
        o.events[0].2,
        "Wrote spec.serial of sda into the definition of vm."
    );
}

#[tokio::test]
async fn a_refused_change_is_reported_and_changes_nothing() {
    let fake = FakeLibvirt::default().with_domain(
        "vm",
        true,
        "<controller type='scsi' model='virtio-scsi'/>",
    );
    let (o, _) = reconcile(&fake, &base(), &Default::default()).await;
    let prev = o.status;
    let edited = VirtualMachineStorageSpec {
        boot_order: Some(1),
        ..base()
    };
    fake.fail_next(
        "write the device into the definition",
        Some(Affect::Config),
        ErrorKind::Refused,
    );
    let (o, _) = reconcile(&fake, &edited, &prev).await;
    assert_eq!(o.ready.reason, "AttachFailed");
    assert!(
        o.ready.message.contains("spec.bootOrder of sda"),
        "{}",
        o.ready.message
    );
    assert_eq!(disk(&fake, false).boot_order, None);
    let edited = VirtualMachineStorageSpec {
        iotune: Some(IoTune {
            read_iops_sec: Some(5),
            ..Default::default()
        }),
        ..base()
    };
    fake.fail_next("set the disk's I/O limits", None, ErrorKind::Refused);
    let (o, _) = reconcile(&fake, &edited, &prev).await;
    assert_eq!(o.ready.reason, "AttachFailed");
    assert!(
        o.ready.message.contains("spec.iotune"),
        "{}",
        o.ready.message
    );
}

#[tokio::test]
async fn a_boot_order_on_a_domain_ordered_by_type_converges_in_one_define() {
    let fake = FakeLibvirt::default().with_domain_xml(
        "vm",
        "<domain><name>vm</name><os><type>hvm</type><boot dev='hd'/></os>\
         <devices><controller type='scsi' model='virtio-scsi'/></devices></domain>",
    );
    fake.set_active("vm", true);
    let (o, _) = reconcile(&fake, &base(), &Default::default()).await;
    let prev = o.status;
    let edited = VirtualMachineStorageSpec {
        boot_order: Some(1),
        ..base()
    };
    let before = fake.calls().len();
    let (o, steps) = reconcile(&fake, &edited, &prev).await;
    assert_eq!(steps, [Step::Redefine]);
    // The conversion and the device's order went into the definition in one define.
    let defines = fake.calls()[before..]
        .iter()
        .filter(|c| c.starts_with("write the device into the definition"))
        .count();
    assert_eq!(defines, 1, "{:?}", fake.calls());
    let config = fake.domain_state("vm").unwrap().config;
    assert!(config.os_boot.is_empty());
    assert_eq!(disk(&fake, false).boot_order, Some(1));
    assert_eq!(disk(&fake, true).boot_order, None);
    assert!(
        reasons(&o).contains(&"BootOrderConverted"),
        "{:?}",
        o.events
    );
    assert_eq!(o.ready.reason, "RestartRequired");
    assert_eq!(o.status.pending_restart, ["bootOrder"]);
    // The next reconcile (the domain's DEFINED event wakes it) has nothing left to do.
    let before = fake.calls().len();
    let (again, steps) = reconcile(&fake, &edited, &o.status).await;
    assert!(steps.is_empty(), "{steps:?}");
    assert!(again.events.is_empty(), "{:?}", again.events);
    assert!(
        fake.calls()[before..]
            .iter()
            .all(|c| !c.starts_with("write the device")),
        "{:?}",
        fake.calls()
    );
    assert_eq!(again.status, o.status);
    // After a boot the order is in effect.
    boot(&fake).await;
    let (o, steps) = reconcile(&fake, &edited, &again.status).await;
    assert!(steps.is_empty(), "{steps:?}");
    assert_eq!(o.ready.reason, "Attached");
    assert!(o.status.pending_restart.is_empty());
}

#[tokio::test]
async fn a_new_device_with_a_boot_order_is_defined_with_the_conversion() {
    let fake = FakeLibvirt::default().with_domain_xml(
        "vm",
        "<domain><name>vm</name><os><type>hvm</type><boot dev='hd'/></os>\
         <devices><controller type='scsi' model='virtio-scsi'/></devices></domain>",
    );
    let spec = VirtualMachineStorageSpec {
        boot_order: Some(1),
        ..base()
    };
    let (o, steps) = reconcile(&fake, &spec, &Default::default()).await;
    assert_eq!(steps, [Step::WriteDefinition]);
    assert!(fake.domain_state("vm").unwrap().config.os_boot.is_empty());
    assert_eq!(disk(&fake, false).boot_order, Some(1));
    assert!(
        reasons(&o).contains(&"BootOrderConverted"),
        "{:?}",
        o.events
    );
    assert_eq!(o.ready.reason, "Attached");
    // libvirt refusing it (an order another device holds) leaves nothing behind.
    let fake = FakeLibvirt::default().with_domain(
        "vm",
        false,
        "<controller type='scsi' model='virtio-scsi'/>",
    );
    fake.fail_next(
        "write the device into the definition",
        Some(Affect::Config),
        ErrorKind::Refused,
    );
    let (o, _) = reconcile(&fake, &spec, &Default::default()).await;
    assert_eq!(o.ready.reason, "AttachFailed");
    assert!(
        o.ready.message.contains("Nothing was changed"),
        "{}",
        o.ready.message
    );
    assert!(
        fake.domain_state("vm")
            .unwrap()
            .config
            .disk(ALIAS)
            .is_none()
    );
}
