//! The tunable fields of a VirtualMachineStorage (pure): what the spec asks for, the rules
//! libvirt and QEMU would otherwise refuse half-way, and which fields differ from a device.
//!
//! Every field has exactly one way of taking effect: I/O limits live and in the definition
//! (libvirt's block I/O tuning call), the rest in the definition only, for the next boot.
//! (`source.volume.create.capacity` is no device field: its growth is a live change, made on
//! the volume before the plan, by block resize in a running guest; see `volume.rs`.)

use serde::Serialize;

use crate::api::{CacheMode, IoMode, StorageType, VirtualMachineStorageSpec};
use crate::libvirt::tuning::{DiskFields, IOTUNE_FIELDS};

/// The values of the tunable fields the spec asks for, in libvirt's terms: the fields libvirt
/// has, without `format` (a disk's format is its source's, not a tunable).
pub type Wanted = DiskFields;

/// libvirt's name of an enum value: its serde name.
pub fn libvirt_name<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// What `spec` asks for.
pub fn wanted(spec: &VirtualMachineStorageSpec) -> Wanted {
    let driver = spec.driver.clone().unwrap_or_default();
    Wanted {
        format: None,
        // libvirt writes no attribute for the default cache mode.
        cache: driver
            .cache
            .filter(|c| *c != CacheMode::Default)
            .map(|c| libvirt_name(&c)),
        io: driver.io.map(|v| libvirt_name(&v)),
        discard: driver.discard.map(|v| libvirt_name(&v)),
        detect_zeroes: driver.detect_zeroes.map(|v| libvirt_name(&v)),
        serial: spec.serial.clone(),
        shareable: spec.shareable == Some(true),
        readonly: spec.type_ == StorageType::Cdrom || spec.read_only == Some(true),
        boot_order: spec.boot_order,
        iotune: crate::libvirt::tuning::iotune_values(spec.iotune.as_ref()),
    }
}

/// What the running guest can be given of `w`: a live device's fields as they are (its I/O
/// limits change through their own call, `SetIoTune`); for a new device everything but the
/// boot order.
pub fn as_running(w: &Wanted, live: Option<&DiskFields>) -> Wanted {
    match live {
        Some(f) => Wanted {
            format: None,
            ..f.clone()
        },
        None => Wanted {
            boot_order: None,
            ..w.clone()
        },
    }
}

/// The spec paths of the fields that take effect at the next boot and whose value in `have`
/// is not the one asked for.
pub fn differing(w: &Wanted, have: &DiskFields) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |name, same: bool| {
        if !same {
            out.push(name);
        }
    };
    check("driver.cache", w.cache == have.cache);
    check("driver.io", w.io == have.io);
    check("driver.discard", w.discard == have.discard);
    check("driver.detectZeroes", w.detect_zeroes == have.detect_zeroes);
    check("serial", w.serial == have.serial);
    check("shareable", w.shareable == have.shareable);
    check("readOnly", w.readonly == have.readonly);
    // Unset leaves the order the definition has: one a conversion of `<os><boot dev>` gave the
    // device keeps it bootable.
    check(
        "bootOrder",
        w.boot_order.is_none() || w.boot_order == have.boot_order,
    );
    out
}

/// The tuning rules the API server cannot enforce, each naming the field; libvirt or QEMU
/// would refuse these only half-way through a change.
pub fn validate(spec: &VirtualMachineStorageSpec) -> Result<(), String> {
    if let Some(driver) = &spec.driver
        && driver.io == Some(IoMode::Native)
        && !matches!(driver.cache, Some(CacheMode::None | CacheMode::Directsync))
    {
        return Err(
            "spec.driver.io native needs spec.driver.cache none or directsync (QEMU refuses native I/O through the host cache)."
                .into(),
        );
    }
    if spec.iotune.is_none() {
        return Ok(());
    }
    if spec.type_ == StorageType::Cdrom {
        return Err("spec.iotune applies to disks only; remove it from this cdrom.".into());
    }
    let v = crate::libvirt::tuning::iotune_values(spec.iotune.as_ref());
    // Groups of (total, read, write): bytes, operations, and their bursts.
    for group in [0, 3, 6, 9] {
        let (total, read, write) = (group, group + 1, group + 2);
        for other in [read, write] {
            if v[total] != 0 && v[other] != 0 {
                return Err(format!(
                    "spec.iotune.{} cannot be set together with spec.iotune.{} (libvirt refuses a total with a read or write limit of the same kind); set either the total or read and write.",
                    IOTUNE_FIELDS[total].1, IOTUNE_FIELDS[other].1
                ));
            }
        }
    }
    // A burst needs its base limit and may not be below it.
    for max in 6..12 {
        let base = max - 6;
        let (m, b) = (IOTUNE_FIELDS[max].1, IOTUNE_FIELDS[base].1);
        if v[max] != 0 && v[base] == 0 {
            return Err(format!(
                "spec.iotune.{m} needs spec.iotune.{b}: a burst is allowed only above a limit."
            ));
        }
        if v[max] != 0 && v[max] < v[base] {
            return Err(format!(
                "spec.iotune.{m} ({}) is below spec.iotune.{b} ({}); a burst must be at least the limit.",
                v[max], v[base]
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "fields_tests.rs"]
mod tests;
