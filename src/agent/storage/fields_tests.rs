use super::*;
use crate::api::{AttachMode, Bus, DetectZeroes, DiscardMode, DriverTuning, IoTune, StorageSource};
use crate::libvirt::tuning::disk_fields;

fn disk() -> VirtualMachineStorageSpec {
    VirtualMachineStorageSpec {
        vm: "vm".into(),
        node_name: None,
        type_: StorageType::Disk,
        bus: Bus::Scsi,
        source: Some(StorageSource {
            path: Some("/p/a.img".into()),
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

fn tune(f: impl Fn(&mut IoTune)) -> VirtualMachineStorageSpec {
    let mut t = IoTune::default();
    f(&mut t);
    VirtualMachineStorageSpec {
        iotune: Some(t),
        ..disk()
    }
}

#[test]
fn bad_values_are_refused_naming_the_field() {
    let cd = VirtualMachineStorageSpec {
        type_: StorageType::Cdrom,
        ..tune(|t| t.read_bytes_sec = Some(1))
    };
    let native = |cache| VirtualMachineStorageSpec {
        driver: Some(DriverTuning {
            io: Some(IoMode::Native),
            cache,
            ..Default::default()
        }),
        ..disk()
    };
    // name, spec, the field the message names first (None: accepted).
    let cases: Vec<(&str, VirtualMachineStorageSpec, Option<&str>)> = vec![
        ("nothing", disk(), None),
        ("iotune on a cdrom", cd, Some("spec.iotune ")),
        (
            "total with read bytes",
            tune(|t| {
                t.total_bytes_sec = Some(10);
                t.read_bytes_sec = Some(5);
            }),
            Some("spec.iotune.totalBytesSec "),
        ),
        (
            "total with write iops",
            tune(|t| {
                t.total_iops_sec = Some(10);
                t.write_iops_sec = Some(5);
            }),
            Some("spec.iotune.totalIopsSec "),
        ),
        (
            "total burst with read burst",
            tune(|t| {
                t.total_bytes_sec = Some(1);
                t.total_bytes_sec_max = Some(10);
                t.read_bytes_sec_max = Some(5);
            }),
            Some("spec.iotune.totalBytesSecMax "),
        ),
        (
            "read and write together",
            tune(|t| {
                t.read_bytes_sec = Some(10);
                t.write_bytes_sec = Some(5);
                t.read_iops_sec = Some(1);
            }),
            None,
        ),
        (
            "a zero total is unlimited",
            tune(|t| {
                t.total_bytes_sec = Some(0);
                t.read_bytes_sec = Some(5);
            }),
            None,
        ),
        (
            "burst without its limit",
            tune(|t| t.write_iops_sec_max = Some(5)),
            Some("spec.iotune.writeIopsSecMax "),
        ),
        (
            "burst below its limit",
            tune(|t| {
                t.read_bytes_sec = Some(100);
                t.read_bytes_sec_max = Some(50);
            }),
            Some("spec.iotune.readBytesSecMax "),
        ),
        (
            "burst above its limit",
            tune(|t| {
                t.read_bytes_sec = Some(100);
                t.read_bytes_sec_max = Some(500);
            }),
            None,
        ),
        (
            "native io through the cache",
            native(Some(CacheMode::Writeback)),
            Some("spec.driver.io "),
        ),
        (
            "native io by default cache",
            native(None),
            Some("spec.driver.io "),
        ),
        (
            "native io without cache",
            native(Some(CacheMode::None)),
            None,
        ),
    ];
    for (name, spec, want) in cases {
        match (validate(&spec), want) {
            (Ok(()), None) => {}
            (Err(m), Some(field)) => {
                assert!(m.starts_with(field), "{name}: {m}");
                assert!(m.ends_with('.'), "{name}: a sentence: {m}");
            }
            (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn each_field_is_compared_with_the_device() {
    let have = disk_fields(
        "<disk><driver name='qemu' type='raw'/><target dev='sda'/><alias name='a'/></disk>",
    );
    assert!(differing(&wanted(&disk()), &have).is_empty());
    let with = |f: &dyn Fn(&mut VirtualMachineStorageSpec)| {
        let mut s = disk();
        f(&mut s);
        differing(&wanted(&s), &have)
    };
    let driver = |d: DriverTuning| Some(d);
    assert_eq!(
        with(&|s| {
            s.driver = driver(DriverTuning {
                cache: Some(CacheMode::None),
                ..Default::default()
            })
        }),
        ["driver.cache"]
    );
    // The default cache mode is what libvirt writes no attribute for.
    assert!(
        with(&|s| {
            s.driver = driver(DriverTuning {
                cache: Some(CacheMode::Default),
                ..Default::default()
            })
        })
        .is_empty()
    );
    assert_eq!(
        with(&|s| {
            s.driver = driver(DriverTuning {
                io: Some(IoMode::Threads),
                discard: Some(DiscardMode::Unmap),
                detect_zeroes: Some(DetectZeroes::On),
                ..Default::default()
            })
        }),
        ["driver.io", "driver.discard", "driver.detectZeroes"]
    );
    assert_eq!(with(&|s| s.serial = Some("x".into())), ["serial"]);
    assert_eq!(with(&|s| s.shareable = Some(true)), ["shareable"]);
    assert!(with(&|s| s.shareable = Some(false)).is_empty());
    assert_eq!(with(&|s| s.read_only = Some(true)), ["readOnly"]);
    assert_eq!(with(&|s| s.boot_order = Some(1)), ["bootOrder"]);
    assert_eq!(with(&|s| s.type_ = StorageType::Cdrom), ["readOnly"]);
    // I/O limits are not a next-boot field.
    assert!(with(&|s| s.iotune = Some(IoTune::default())).is_empty());
    assert_eq!(libvirt_name(&IoMode::IoUring), "io_uring");
}
