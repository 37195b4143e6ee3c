//! The pure decision of a VirtualMachineStorage reconcile: from the spec, the previous status and
//! what was observed, the steps to run live and on the definition, or a refusal.

use std::time::Duration;

use super::fields::{self, Wanted};
use super::observe::Observed;
use super::reason::StorageReason;
use super::source::Resolved;
use crate::agent::refusal::Refusal;
use crate::api::{
    AttachMode, Bus, StorageType, VirtualMachineStorageSpec, VirtualMachineStorageStatus,
};
use crate::libvirt::domain::{self, DiskSpec};
use crate::libvirt::facade::Affect;
use crate::libvirt::provision::with_backing_chain;
use crate::libvirt::tuning::{self, disk_fields};

type Refused = Refusal<StorageReason>;

/// The XML of the SCSI controller added for a scsi device.
pub const SCSI_CONTROLLER: &str = "<controller type='scsi' model='virtio-scsi'/>";

/// One step of a plan, run in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Add a virtio-scsi controller to the definition (`Config`) or, for a transient domain, the
    /// running guest (`Live`). A failure stops the plan.
    AddScsiController(Affect),
    /// Hot-plug a virtio-scsi controller into the running guest. A failure means the device
    /// waits for the next boot (no hot-plug is tried).
    HotPlugScsiController,
    /// Hot-plug the device into the running guest.
    HotPlug,
    /// Write the device into the definition (taking a hot-plug back if libvirt refuses). A
    /// device with a boot order is written by a redefinition that also turns an
    /// `<os><boot dev>` list into per-device orders, in one define.
    WriteDefinition,
    /// Change the CD medium in place (insert, swap, eject).
    UpdateMedia(Affect),
    /// Rewrite the device in the definition: fields that take effect at the next boot changed.
    /// A boot order turns the definition's `<os><boot dev>` list, if it has one, into
    /// per-device boot orders in the same define.
    Redefine,
    /// Set the disk's I/O limits (libvirt's block I/O tuning call).
    SetIoTune(Affect),
}

/// Why the device waits for the next boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestartCause {
    /// Its bus (sata, ide) cannot hot-plug.
    BusCannotHotPlug(Bus),
    /// The domain had no SCSI controller and hot-plugging one failed (libvirt's message).
    ScsiControllerHotPlugFailed(String),
    /// The running machine could not take the device (no free slot, hot-plug unsupported).
    HotPlugLimit(String),
}

/// What to do for one VirtualMachineStorage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The domain.
    pub vm: String,
    /// The device's alias.
    pub alias: String,
    /// The target device name.
    pub target: String,
    /// The bus.
    pub bus: Bus,
    /// Whether the spec asks for the running guest too.
    pub attach: AttachMode,
    /// The device's XML, for the definition.
    pub xml: String,
    /// The device's XML for the running guest (hot-plug, media change).
    pub live_xml: String,
    /// The source path the device should have; `None` is an empty tray.
    pub source: Option<String>,
    /// Whether the device should be in the running guest.
    pub want_live: bool,
    /// Whether the domain has a definition to write.
    pub want_config: bool,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// A restart already known to be needed (a bus that cannot hot-plug).
    pub restart: Option<RestartCause>,
    /// The tunable fields the spec asks for.
    pub wanted: Wanted,
    /// The fields [`Step::Redefine`] changes in the definition.
    pub redefined: Vec<&'static str>,
    /// The running guest's I/O limits were changed outside virtplane (the spec and the last
    /// status agree, libvirt does not).
    pub iotune_drift: bool,
}

/// libvirt's name of a bus.
pub fn bus_name(bus: Bus) -> &'static str {
    match bus {
        Bus::Virtio => "virtio",
        Bus::Scsi => "scsi",
        Bus::Sata => "sata",
        Bus::Ide => "ide",
        Bus::Usb => "usb",
    }
}

/// The prefix of a bus's target names.
pub fn target_prefix(bus: Bus) -> &'static str {
    match bus {
        Bus::Virtio => "vd",
        Bus::Ide => "hd",
        Bus::Scsi | Bus::Sata | Bus::Usb => "sd",
    }
}

/// Decides what to do, or why not.
pub fn plan(
    spec: &VirtualMachineStorageSpec,
    prev: &VirtualMachineStorageStatus,
    alias: &str,
    observed: &Observed,
) -> Result<Plan, Refused> {
    let vm = spec.vm.as_str();
    validate(spec, prev)?;
    fields::validate(spec).map_err(|m| Refusal::fix(StorageReason::InvalidSpec, m))?;
    // Grants are checked first, so a refusal never tells whether the domain exists. A grant
    // revoked after the attach stops changes; the device stays.
    let grants = &observed.grants;
    if !grants.domain(vm) {
        return Err(Refusal::fix(
            StorageReason::NotGranted,
            grants.domain_refusal(vm),
        ));
    }
    let Some(view) = &observed.domain else {
        return Err(Refusal::wait(
            StorageReason::DomainNotFound,
            format!(
                "Domain {vm} is not defined on node {}; the device is attached as soon as it is.",
                observed.node
            ),
            Duration::from_secs(300),
        ));
    };
    let (resolved, chain) = super::volume_plan::resolve(spec, observed)?;
    let config_dev = view.config.disk(alias);
    let live_dev = view.live.as_ref().and_then(|l| l.disk(alias));
    let existing = config_dev.or(live_dev);
    let want_type = match spec.type_ {
        StorageType::Cdrom => "cdrom",
        StorageType::Disk => "disk",
    };
    if let Some(dev) = existing
        && dev.device != want_type
    {
        return Err(Refusal::fix(
            StorageReason::FieldImmutable,
            format!(
                "spec.type is immutable: the device is a {}. Delete and recreate the object.",
                dev.device
            ),
        ));
    }

    // Target: the device's own, else the recorded one, else the requested one, else the lowest free.
    let target = existing
        .and_then(|d| d.target.clone())
        .or_else(|| prev.target.clone())
        .or_else(|| spec.target.clone())
        .unwrap_or_else(|| {
            let used = view.used_targets();
            domain::lowest_free_target(target_prefix(spec.bus), used.iter().map(String::as_str))
        });
    let holder = view
        .config
        .disks
        .iter()
        .chain(view.live.iter().flat_map(|l| l.disks.iter()))
        .find(|d| {
            d.target.as_deref() == Some(target.as_str()) && d.alias.as_deref() != Some(alias)
        });
    if let Some(other) = holder {
        // Never the other device's alias: virtplane's hold the UID of another object, which
        // may be another tenant's.
        let who = if other
            .alias
            .as_deref()
            .is_some_and(|a| a.starts_with("ua-vp"))
        {
            "the device of another virtplane object"
        } else {
            "a device virtplane does not manage"
        };
        return Err(Refusal::wait(
            StorageReason::TargetConflict,
            format!(
                "Target {target} on {vm} is already used by {who}; choose another spec.target or leave it empty."
            ),
            Duration::from_secs(60),
        ));
    }
    let desired = resolved.as_ref().map(Resolved::label);
    if spec.type_ == StorageType::Disk
        && let Some(dev) = existing
        && dev.source_label() != desired
    {
        let now = dev.source_label().unwrap_or_else(|| "empty".into());
        // The spec still names what virtplane attached: libvirt's side was changed by hand.
        // Swapping a disk under a running guest is not a repair virtplane makes on its own.
        if prev.current_source.is_some() && prev.current_source == desired {
            return Err(Refusal::fix(
                StorageReason::DriftDetected,
                format!(
                    "The source of {target} on {vm} was changed outside virtplane to {now}; a disk is not swapped under the guest. Put {} back (virsh), or delete this object to detach it.",
                    desired.as_deref().unwrap_or("the empty source")
                ),
            ));
        }
        return Err(Refusal::fix(
            StorageReason::FieldImmutable,
            format!(
                "spec.source of a disk is immutable (it is {now}); nothing was detached. Restore spec.source, or delete this object and create a new one."
            ),
        ));
    }
    if spec.type_ == StorageType::Disk
        && let (Some(dev), Some(format)) = (existing, spec.format)
        && let Some(have) = disk_fields(&dev.xml).format
        && have != fields::libvirt_name(&format)
    {
        return Err(Refusal::fix(
            StorageReason::FieldImmutable,
            format!(
                "spec.format of a disk is immutable (the device is {have}); nothing was changed. Restore spec.format, or delete this object and create a new one."
            ),
        ));
    }

    let wanted = fields::wanted(spec);
    // The definition's device as the spec wants it; without spec.bootOrder it keeps the order
    // it has (see `fields::differing`).
    let keep_order = Wanted {
        boot_order: wanted
            .boot_order
            .or_else(|| config_dev.and_then(|d| disk_fields(&d.xml).boot_order)),
        ..wanted.clone()
    };
    let xml = with_backing_chain(
        &device_xml(spec, resolved.as_ref(), &target, alias, &keep_order),
        &chain,
    );
    // What the running guest is given: its device's next-boot fields as they are (a media
    // change may not touch them), and for a hot-plug no boot order (libvirt refuses one next
    // to an `<os><boot dev>` list, and it only matters at the next boot anyway).
    let live_fields = live_dev.map(|d| disk_fields(&d.xml));
    let live_xml = with_backing_chain(
        &device_xml(
            spec,
            resolved.as_ref(),
            &target,
            alias,
            &fields::as_running(&wanted, live_fields.as_ref()),
        ),
        &chain,
    );
    let want_live = view.active && spec.attach == AttachMode::LiveAndPersistent;
    let want_config = view.persistent;
    let mut steps = Vec::new();
    let mut restart = None;

    // A scsi device needs a SCSI controller.
    if spec.bus == Bus::Scsi && existing.is_none() && !view.config.has_controller("scsi", None) {
        let live_lacks = want_live
            && !view
                .live
                .as_ref()
                .is_some_and(|l| l.has_controller("scsi", None));
        if want_config {
            steps.push(Step::AddScsiController(Affect::Config));
            if live_lacks {
                steps.push(Step::HotPlugScsiController);
            }
        } else if live_lacks {
            // A transient domain has no definition: its controller goes to the running guest,
            // once.
            steps.push(Step::AddScsiController(Affect::Live));
        }
    }
    // The running guest first: a device QEMU refuses (an image it cannot open, or one another
    // guest holds) is refused before anything is written, so nothing is left behind and no
    // domain event wakes the object into trying again at once.
    if want_live && live_dev.is_none() {
        if matches!(spec.bus, Bus::Sata | Bus::Ide) {
            restart = Some(RestartCause::BusCannotHotPlug(spec.bus));
        } else {
            steps.push(Step::HotPlug);
        }
    }
    if want_config && config_dev.is_none() {
        steps.push(Step::WriteDefinition);
    }
    // Fields that take effect at the next boot: the definition's device is rewritten (with the
    // medium, for a CD). The running guest keeps its values until then (see `report`).
    let redefined = match config_dev {
        Some(dev) if want_config => fields::differing(&wanted, &disk_fields(&dev.xml)),
        _ => Vec::new(),
    };
    if !redefined.is_empty() {
        steps.push(Step::Redefine);
    }
    // CD media: insert, swap or eject in place, live and persistent, forcing a locked tray.
    if spec.type_ == StorageType::Cdrom {
        if redefined.is_empty() && config_dev.is_some_and(|d| d.source_label() != desired) {
            steps.push(Step::UpdateMedia(Affect::Config));
        }
        if want_live && live_dev.is_some_and(|d| d.source_label() != desired) {
            steps.push(Step::UpdateMedia(Affect::Live));
        }
    }
    // I/O limits: live and in the definition (a redefinition already carries them).
    let iotune_of = |d: Option<&domain::DiskXml>| d.map(|d| disk_fields(&d.xml).iotune);
    let live_io = want_live && iotune_of(live_dev).is_some_and(|v| v != wanted.iotune);
    let config_io = want_config
        && redefined.is_empty()
        && iotune_of(config_dev).is_some_and(|v| v != wanted.iotune);
    if let Some(affect) = Affect::of(live_io, config_io) {
        steps.push(Step::SetIoTune(affect));
    }
    let iotune_drift = live_io && prev.iotune == tuning::iotune_of(wanted.iotune);
    Ok(Plan {
        vm: vm.to_string(),
        alias: alias.to_string(),
        target,
        bus: spec.bus,
        attach: spec.attach,
        xml,
        live_xml,
        source: desired,
        want_live,
        want_config,
        steps,
        restart,
        wanted,
        redefined,
        iotune_drift,
    })
}

/// The rules the API server cannot enforce: immutable fields, and bus, type and target that
/// fit together.
fn validate(
    spec: &VirtualMachineStorageSpec,
    prev: &VirtualMachineStorageStatus,
) -> Result<(), Refused> {
    let immutable = |m: String| Err(Refusal::fix(StorageReason::FieldImmutable, m));
    let invalid = |m: String| Err(Refusal::fix(StorageReason::InvalidSpec, m));
    if let Some(had) = &prev.vm
        && *had != spec.vm
    {
        return immutable(format!(
            "spec.vm is immutable: the device is attached to {had}. Set spec.vm back, or delete this object (which detaches it from {had}) and create one for {}.",
            spec.vm
        ));
    }
    if spec.type_ == StorageType::Disk && spec.source.is_none() {
        return invalid(
            "A disk needs a source (path, volume or isoDownload); only a cdrom may be empty."
                .into(),
        );
    }
    if spec.type_ == StorageType::Cdrom && spec.bus == Bus::Virtio {
        return invalid(
            "A CD-ROM cannot sit on the virtio bus; use scsi (hot-pluggable) or sata.".into(),
        );
    }
    if let Some(t) = &spec.target
        && !t.starts_with(target_prefix(spec.bus))
    {
        return invalid(format!(
            "Target {t} does not fit bus {}: its names start with {}.",
            bus_name(spec.bus),
            target_prefix(spec.bus)
        ));
    }
    if let (Some(t), Some(had)) = (&spec.target, &prev.target)
        && t != had
    {
        return immutable(format!(
            "spec.target is immutable: the device is {had}. Delete and recreate the object to move it."
        ));
    }
    if let Some(had) = prev.bus
        && had != spec.bus
        && prev.alias.is_some()
    {
        return immutable(format!(
            "spec.bus is immutable: the device is on {}. Delete and recreate the object to move it.",
            bus_name(had)
        ));
    }
    Ok(())
}

/// The device's `<disk>` with the tunable fields of `w`.
fn device_xml(
    spec: &VirtualMachineStorageSpec,
    source: Option<&Resolved>,
    target: &str,
    alias: &str,
    w: &Wanted,
) -> String {
    let driver = [
        ("cache", &w.cache),
        ("io", &w.io),
        ("discard", &w.discard),
        ("detect_zeroes", &w.detect_zeroes),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k, v.clone()?)))
    .collect();
    let disk = DiskSpec {
        device: match spec.type_ {
            StorageType::Cdrom => "cdrom",
            StorageType::Disk => "disk",
        }
        .into(),
        source: source.map(|s| s.path.to_string_lossy().into_owned()),
        block: source.is_some_and(|s| s.block),
        format: source.map_or_else(|| "raw".into(), |s| s.format.clone()),
        target: target.to_string(),
        bus: bus_name(spec.bus).into(),
        readonly: w.readonly,
        boot_order: w.boot_order,
        alias: alias.to_string(),
        driver,
        volume: source.and_then(|s| s.volume.clone()),
    };
    tuning::with_extras(
        &domain::disk_xml(&disk),
        w.serial.as_deref(),
        w.shareable,
        &w.iotune,
    )
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "grants_tests.rs"]
mod grants_tests;

#[cfg(test)]
#[path = "plan_fields_tests.rs"]
mod fields_tests;
