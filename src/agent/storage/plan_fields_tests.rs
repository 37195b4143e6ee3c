//! Every spec field against every outcome: live and persistent, persistent only (next boot), or
//! refused; on a running and on a shut-off domain; and drift through the same comparison.

use super::tests::{ALIAS, IMG, file, observed, spec};
use super::*;
use crate::agent::storage::source::SourceFacts;
use crate::api::{CacheMode, DetectZeroes, DiscardMode, DiskFormat, DriverTuning, IoMode, IoTune};
use crate::libvirt::domain::{DomainView, parse_domain};

const SCSI: &str = "<controller type='scsi' model='virtio-scsi'/>";

fn base() -> VirtualMachineStorageSpec {
    spec(StorageType::Disk, Bus::Scsi, Some(IMG))
}

fn attached() -> VirtualMachineStorageStatus {
    VirtualMachineStorageStatus {
        vm: Some("vm".into()),
        target: Some("sda".into()),
        bus: Some(Bus::Scsi),
        alias: Some(ALIAS.into()),
        current_source: Some(IMG.into()),
        ..Default::default()
    }
}

/// The device `s` asks for, as the plan writes it.
fn device_of(s: &VirtualMachineStorageSpec) -> String {
    let empty = DomainView {
        persistent: true,
        config: parse_domain(&format!("<domain><devices>{SCSI}</devices></domain>")).unwrap(),
        ..Default::default()
    };
    plan(
        s,
        &Default::default(),
        ALIAS,
        &observed(Some(empty), SourceFacts::Path(file(IMG))),
    )
    .unwrap()
    .xml
}

/// A domain whose device is `live` in the running guest (when `active`) and `config` in the
/// definition.
fn domain(active: bool, live: &str, config: &str) -> DomainView {
    let xml =
        |d: &str| parse_domain(&format!("<domain><devices>{SCSI}{d}</devices></domain>")).unwrap();
    DomainView {
        active,
        persistent: true,
        live: active.then(|| xml(live)),
        config: xml(config),
    }
}

fn in_place(active: bool) -> DomainView {
    let d = device_of(&base());
    domain(active, &d, &d)
}

enum Want {
    /// These steps, and these fields rewritten in the definition.
    Steps(Vec<Step>, Vec<&'static str>),
    /// Refused with this reason, the message naming this field.
    Refused(StorageReason, &'static str),
}

#[test]
fn every_field_against_every_outcome() {
    use Want::*;
    let edit = |f: &dyn Fn(&mut VirtualMachineStorageSpec)| {
        let mut s = base();
        f(&mut s);
        s
    };
    let driver = |d: DriverTuning| Some(d);
    let redefine = |field: &'static str| {
        (
            Steps(vec![Step::Redefine], vec![field]),
            Steps(vec![Step::Redefine], vec![field]),
        )
    };
    /// field, the edited spec, the source the edit points to, on a running and on a shut-off domain.
    type Row = (
        &'static str,
        VirtualMachineStorageSpec,
        &'static str,
        (Want, Want),
    );
    let immutable = |field| {
        (
            Refused(StorageReason::FieldImmutable, field),
            Refused(StorageReason::FieldImmutable, field),
        )
    };
    let rows: Vec<Row> = vec![
        (
            "nothing",
            base(),
            IMG,
            (Steps(vec![], vec![]), Steps(vec![], vec![])),
        ),
        (
            "driver.cache",
            edit(&|s| {
                s.driver = driver(DriverTuning {
                    cache: Some(CacheMode::None),
                    ..Default::default()
                })
            }),
            IMG,
            redefine("driver.cache"),
        ),
        (
            "driver.io",
            edit(&|s| {
                s.driver = driver(DriverTuning {
                    io: Some(IoMode::Threads),
                    ..Default::default()
                })
            }),
            IMG,
            redefine("driver.io"),
        ),
        (
            "driver.discard",
            edit(&|s| {
                s.driver = driver(DriverTuning {
                    discard: Some(DiscardMode::Unmap),
                    ..Default::default()
                })
            }),
            IMG,
            redefine("driver.discard"),
        ),
        (
            "driver.detectZeroes",
            edit(&|s| {
                s.driver = driver(DriverTuning {
                    detect_zeroes: Some(DetectZeroes::On),
                    ..Default::default()
                })
            }),
            IMG,
            redefine("driver.detectZeroes"),
        ),
        (
            "serial",
            edit(&|s| s.serial = Some("SN9".into())),
            IMG,
            redefine("serial"),
        ),
        (
            "shareable",
            edit(&|s| s.shareable = Some(true)),
            IMG,
            redefine("shareable"),
        ),
        (
            "readOnly",
            edit(&|s| s.read_only = Some(true)),
            IMG,
            redefine("readOnly"),
        ),
        (
            "bootOrder",
            edit(&|s| s.boot_order = Some(1)),
            IMG,
            (
                Steps(vec![Step::Redefine], vec!["bootOrder"]),
                Steps(vec![Step::Redefine], vec!["bootOrder"]),
            ),
        ),
        (
            "iotune",
            edit(&|s| {
                s.iotune = Some(IoTune {
                    total_iops_sec: Some(100),
                    ..Default::default()
                })
            }),
            IMG,
            (
                Steps(vec![Step::SetIoTune(Affect::Both)], vec![]),
                Steps(vec![Step::SetIoTune(Affect::Config)], vec![]),
            ),
        ),
        (
            "vm",
            edit(&|s| s.vm = "other".into()),
            IMG,
            immutable("spec.vm"),
        ),
        (
            "type",
            edit(&|s| s.type_ = StorageType::Cdrom),
            IMG,
            immutable("spec.type"),
        ),
        (
            "target",
            edit(&|s| s.target = Some("sdc".into())),
            IMG,
            immutable("spec.target"),
        ),
        (
            "bus",
            edit(&|s| s.bus = Bus::Sata),
            IMG,
            immutable("spec.bus"),
        ),
        (
            "source",
            edit(&|s| s.source.as_mut().unwrap().path = Some("/pool/new.img".into())),
            "/pool/new.img",
            immutable("spec.source"),
        ),
        (
            "bad iotune",
            edit(&|s| {
                s.iotune = Some(IoTune {
                    total_bytes_sec: Some(1),
                    read_bytes_sec: Some(1),
                    ..Default::default()
                })
            }),
            IMG,
            (
                Refused(StorageReason::InvalidSpec, "spec.iotune.totalBytesSec"),
                Refused(StorageReason::InvalidSpec, "spec.iotune.totalBytesSec"),
            ),
        ),
    ];
    for (field, s, src, (running, off)) in rows {
        for (active, want) in [(true, running), (false, off)] {
            let name = format!(
                "{field} on a {} domain",
                if active { "running" } else { "shut-off" }
            );
            let got = plan(
                &s,
                &attached(),
                ALIAS,
                &observed(Some(in_place(active)), SourceFacts::Path(file(src))),
            );
            match (got, want) {
                (Ok(p), Steps(steps, redefined)) => {
                    assert_eq!(p.steps, steps, "{name}");
                    assert_eq!(p.redefined, redefined, "{name}");
                    assert!(!p.iotune_drift, "{name}: an edit is no drift");
                }
                (Err(r), Refused(reason, named)) => {
                    assert_eq!(r.reason, reason, "{name}: {}", r.message);
                    assert!(r.message.contains(named), "{name}: {}", r.message);
                }
                (Ok(p), Refused(..)) => panic!("{name}: planned {:?}, want a refusal", p.steps),
                (Err(r), Steps(..)) => panic!("{name}: refused: {}", r.message),
            }
        }
    }
}

#[test]
fn a_changed_field_is_written_with_the_others_kept() {
    let s = VirtualMachineStorageSpec {
        driver: Some(DriverTuning {
            cache: Some(CacheMode::Writeback),
            ..Default::default()
        }),
        serial: Some("KEEP".into()),
        iotune: Some(IoTune {
            read_bytes_sec: Some(4096),
            ..Default::default()
        }),
        ..base()
    };
    // The definition has the serial and limits already, not the cache.
    let mut before = s.clone();
    before.driver = None;
    let d = device_of(&before);
    let p = plan(
        &s,
        &attached(),
        ALIAS,
        &observed(Some(domain(true, &d, &d)), SourceFacts::Path(file(IMG))),
    )
    .unwrap();
    assert_eq!(
        (p.steps.as_slice(), p.redefined.as_slice()),
        ([Step::Redefine].as_slice(), ["driver.cache"].as_slice())
    );
    let f = crate::libvirt::tuning::disk_fields(&p.xml);
    assert_eq!(
        (f.cache.as_deref(), f.serial.as_deref(), f.iotune[1]),
        (Some("writeback"), Some("KEEP"), 4096)
    );
}

#[test]
fn drift_goes_through_the_same_comparison() {
    let s = VirtualMachineStorageSpec {
        iotune: Some(IoTune {
            total_bytes_sec: Some(1_000_000),
            ..Default::default()
        }),
        ..base()
    };
    let mine = device_of(&s);
    let bare = device_of(&base());
    let prev = VirtualMachineStorageStatus {
        iotune: s.iotune.clone(),
        ..attached()
    };
    let obs = |v| observed(Some(v), SourceFacts::Path(file(IMG)));
    // Limits cleared with virsh in the running guest: set again, live, and called drift.
    let p = plan(&s, &prev, ALIAS, &obs(domain(true, &bare, &mine))).unwrap();
    assert_eq!(p.steps, [Step::SetIoTune(Affect::Live)]);
    assert!(p.iotune_drift);
    // The same picture right after the spec changed (the status still has the old limits) is
    // an edit, not drift.
    let p = plan(&s, &attached(), ALIAS, &obs(domain(true, &bare, &bare))).unwrap();
    assert_eq!(p.steps, [Step::SetIoTune(Affect::Both)]);
    assert!(!p.iotune_drift);
    // A next-boot field changed by hand in the definition is written back.
    let cached = device_of(&VirtualMachineStorageSpec {
        driver: Some(DriverTuning {
            cache: Some(CacheMode::Unsafe),
            ..Default::default()
        }),
        ..s.clone()
    });
    let p = plan(&s, &prev, ALIAS, &obs(domain(true, &mine, &cached))).unwrap();
    assert_eq!(
        (p.steps.as_slice(), p.redefined.as_slice()),
        ([Step::Redefine].as_slice(), ["driver.cache"].as_slice())
    );
    // A live value that differs while the definition is right is waiting for a boot: no step.
    let p = plan(&s, &prev, ALIAS, &obs(domain(true, &cached, &mine))).unwrap();
    assert!(p.steps.is_empty(), "{:?}", p.steps);
}

#[test]
fn a_new_device_carries_every_field_and_needs_no_extra_step() {
    let s = VirtualMachineStorageSpec {
        iotune: Some(IoTune {
            write_iops_sec: Some(10),
            ..Default::default()
        }),
        serial: Some("S".into()),
        ..base()
    };
    let p = plan(
        &s,
        &Default::default(),
        ALIAS,
        &observed(Some(domain(true, "", "")), SourceFacts::Path(file(IMG))),
    )
    .unwrap();
    assert_eq!(p.steps, [Step::HotPlug, Step::WriteDefinition]);
    let f = crate::libvirt::tuning::disk_fields(&p.xml);
    assert_eq!((f.iotune[5], f.serial.as_deref()), (10, Some("S")));
}

#[test]
fn a_disk_format_is_immutable() {
    let s = VirtualMachineStorageSpec {
        format: Some(DiskFormat::Raw),
        ..base()
    };
    let qcow = device_of(&base()).replace("type='raw'", "type='qcow2'");
    for active in [true, false] {
        let r = plan(
            &s,
            &attached(),
            ALIAS,
            &observed(
                Some(domain(active, &qcow, &qcow)),
                SourceFacts::Path(file(IMG)),
            ),
        )
        .expect_err("refused");
        assert_eq!(r.reason, StorageReason::FieldImmutable);
        assert!(r.message.starts_with("spec.format"), "{}", r.message);
    }
}

#[test]
fn a_new_device_with_a_boot_order_hot_plugs_without_it() {
    let s = VirtualMachineStorageSpec {
        boot_order: Some(1),
        ..base()
    };
    let obs = |active| observed(Some(domain(active, "", "")), SourceFacts::Path(file(IMG)));
    let p = plan(&s, &Default::default(), ALIAS, &obs(true)).unwrap();
    assert_eq!(p.steps, [Step::HotPlug, Step::WriteDefinition]);
    assert!(p.xml.contains("<boot order='1'/>"), "{}", p.xml);
    assert!(!p.live_xml.contains("<boot"), "{}", p.live_xml);
    let p = plan(&s, &Default::default(), ALIAS, &obs(false)).unwrap();
    assert_eq!(p.steps, [Step::WriteDefinition]);
}

#[test]
fn an_unset_boot_order_keeps_the_one_the_definition_has() {
    // Another device's bootOrder converted <os><boot dev='hd'/> and gave this disk order 2: it
    // stays, so the domain still boots from it.
    let ordered = device_of(&VirtualMachineStorageSpec {
        boot_order: Some(2),
        ..base()
    });
    let plain = device_of(&base());
    let obs = observed(
        Some(domain(true, &plain, &ordered)),
        SourceFacts::Path(file(IMG)),
    );
    let p = plan(&base(), &attached(), ALIAS, &obs).unwrap();
    assert!(p.steps.is_empty(), "{:?}", p.steps);
    // Another field rewrites the device with the order it has.
    let s = VirtualMachineStorageSpec {
        serial: Some("S1".into()),
        ..base()
    };
    let p = plan(&s, &attached(), ALIAS, &obs).unwrap();
    assert_eq!(
        (p.steps.as_slice(), p.redefined.as_slice()),
        ([Step::Redefine].as_slice(), ["serial"].as_slice())
    );
    assert!(p.xml.contains("<boot order='2'/>"), "{}", p.xml);
}
