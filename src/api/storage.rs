//! `VirtualMachineStorage`: a disk or CD-ROM attached to a libvirt domain.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{AttachMode, DOMAIN_NAME_PATTERN, NODE_NAME_PATTERN, conditions_schema};

/// A disk or CD-ROM attached to a virtual machine. The agent on the VM's node attaches it (hot-plugs
/// it into a running guest), changes or ejects CD media in place, and detaches it when this object
/// is deleted, letting the object go only once the guest has released the device.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "virtplane.io",
    version = "v1alpha1",
    kind = "VirtualMachineStorage",
    plural = "virtualmachinestorages",
    shortname = "vmstorage",
    category = "virtplane",
    namespaced,
    status = "VirtualMachineStorageStatus",
    derive = "PartialEq",
    doc = "A disk or CD-ROM attached to a libvirt virtual machine.",
    printcolumn(name = "VM", type_ = "string", json_path = ".spec.vm"),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Target", type_ = "string", json_path = ".status.target"),
    printcolumn(name = "Source", type_ = "string", json_path = ".status.currentSource"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Node",
        type_ = "string",
        json_path = ".status.nodeName",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineStorageSpec {
    /// Name of the libvirt domain (VM) to attach to. Immutable.
    #[schemars(pattern(DOMAIN_NAME_PATTERN))]
    pub vm: String,
    /// Node whose hypervisor runs the VM. Leave empty to let the controller find the node that has
    /// the domain; set it when the same domain name exists on several nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(NODE_NAME_PATTERN))]
    pub node_name: Option<String>,
    /// Kind of device: `disk` or `cdrom`. Immutable.
    #[serde(rename = "type")]
    pub type_: StorageType,
    /// Bus the device sits on. `scsi` (the default) and `virtio` can be hot-plugged; a new `sata`
    /// or `ide` drive takes effect at the next boot.
    #[serde(default)]
    pub bus: Bus,
    /// What backs the device: at most one of `path`, `volume` or `isoDownload`. On a `cdrom`,
    /// changing it swaps the medium in place and removing it ejects; on a `disk` it is immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<StorageSource>,
    /// Image format of the source: `raw` or `qcow2`. Detected from the volume when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// Attach the device read-only. CD-ROMs are always read-only. A change is written to the
    /// definition and takes effect at the next boot (`RestartRequired` while the domain runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    /// Device name inside the domain definition (for example `sdb` or `vdc`). When empty the
    /// lowest free name for the bus is chosen and kept in `status.target`. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^(sd|vd|hd)[a-z]{1,2}$"))]
    pub target: Option<String>,
    /// Boot priority of the device (1 boots first). A change is written to the definition and
    /// takes effect at the next boot. On a domain that orders boot devices by type
    /// (`<os><boot dev=.../>`) that order is turned into per-device boot orders in the same
    /// write, keeping the other devices' relative order (an Event says how). Deleting the object
    /// removes the device with its order; the other devices keep theirs.
    /// Unset leaves the order the definition has (such as one a conversion gave it), so
    /// removing the field does not remove an order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub boot_order: Option<u32>,
    /// `LiveAndPersistent` (default) hot-plugs into a running guest and writes the definition;
    /// `Persistent` writes the definition only, for the next boot.
    #[serde(default)]
    pub attach: AttachMode,
    /// Optional QEMU driver tuning for the device. A change is written to the definition and
    /// takes effect at the next boot (`RestartRequired` while the domain runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<DriverTuning>,
    /// Disk I/O limits (libvirt `<iotune>`), applied live to a running guest and to the
    /// definition. Disks only. An unset limit is unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iotune: Option<IoTune>,
    /// Serial number the guest sees (libvirt `<serial>`). Takes effect at the next boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[A-Za-z0-9_.+-]{1,20}$"))]
    pub serial: Option<String>,
    /// Whether several domains may use the image at once (libvirt `<shareable/>`; pair it with
    /// `driver.cache: none`). Takes effect at the next boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shareable: Option<bool>,
}

/// Disk I/O limits with libvirt's semantics: bytes or operations per second; `0` or unset is
/// unlimited. Within each group (bytes, operations, and their `...Max` bursts) a total limit
/// excludes the read and write ones. A burst (`...Max`) needs the matching base limit and may
/// not be below it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IoTune {
    /// Total throughput limit in bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes_sec: Option<u64>,
    /// Read throughput limit in bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_bytes_sec: Option<u64>,
    /// Write throughput limit in bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_bytes_sec: Option<u64>,
    /// Total I/O operations per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_iops_sec: Option<u64>,
    /// Read I/O operations per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_iops_sec: Option<u64>,
    /// Write I/O operations per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_iops_sec: Option<u64>,
    /// Burst of the total throughput, in bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes_sec_max: Option<u64>,
    /// Burst of the read throughput, in bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_bytes_sec_max: Option<u64>,
    /// Burst of the write throughput, in bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_bytes_sec_max: Option<u64>,
    /// Burst of the total I/O operations per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_iops_sec_max: Option<u64>,
    /// Burst of the read I/O operations per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_iops_sec_max: Option<u64>,
    /// Burst of the write I/O operations per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_iops_sec_max: Option<u64>,
}

/// Kind of storage device.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StorageType {
    /// A writable (or read-only) block device.
    Disk,
    /// A CD-ROM drive whose medium can be inserted, swapped and ejected live.
    Cdrom,
}

/// Bus a storage device sits on.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Bus {
    /// virtio-blk: one PCI slot per disk, hot-pluggable when a slot is free; no CD-ROMs.
    Virtio,
    /// virtio-scsi: hot-pluggable disks and CD-ROMs, many per controller.
    #[default]
    Scsi,
    /// AHCI SATA: not hot-pluggable; changes apply at the next boot.
    Sata,
    /// IDE (i440fx machines only): not hot-pluggable.
    Ide,
    /// USB mass storage.
    Usb,
}

/// What backs a disk or CD-ROM. At most one field may be set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("maxProperties" = 1))]
pub struct StorageSource {
    /// Absolute path of an image file on the node. It must lie inside a directory the agent allows
    /// (`--allowed-path`) or inside an active storage pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^/"), length(max = 4096))]
    pub path: Option<String>,
    /// A volume of a libvirt storage pool on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeRef>,
    /// Name of an `IsoDownload` in the same namespace; its volume is inserted once the download
    /// has completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub iso_download: Option<String>,
}

/// A libvirt storage volume.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRef {
    /// Name of the storage pool.
    #[schemars(length(min = 1, max = 255))]
    pub pool: String,
    /// Name of the volume in the pool.
    #[schemars(length(min = 1, max = 255))]
    pub name: String,
    /// Create the volume when it does not exist (a blank volume, or a qcow2 overlay of
    /// `backingVolume`). The agent keeps a record on the node of the volumes it created; a
    /// volume of this name that this object did not create is refused (`NameConflict`) and
    /// left untouched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create: Option<VolumeCreate>,
}

/// How to create a volume that does not exist yet.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeCreate {
    /// Size the guest sees, as a Kubernetes quantity (`10Gi`, `512Mi`, `1G`). Raising it later
    /// grows the volume, live when the guest runs (block resize); lowering it is refused. A
    /// string: quote a plain number of bytes (`"1073741824"`).
    #[schemars(schema_with = "super::common::quantity_schema")]
    pub capacity: k8s_openapi::apimachinery::pkg::api::resource::Quantity,
    /// Image format of the new volume: `qcow2` (the default, and the only one for an overlay)
    /// or `raw`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// Space allocated up front: `off` (the default, thin), `metadata` (qcow2 metadata only)
    /// or `full` (every byte allocated). Not allowed with `backingVolume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preallocation: Option<Preallocation>,
    /// Make the volume a qcow2 overlay whose backing store is this volume (a golden image).
    /// Its pool must be granted, and its whole backing chain must lie in granted pools; it is
    /// only ever read, and deleting the overlay never touches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_volume: Option<BackingVolume>,
    /// What deleting this object does to a volume it created: `Retain` (the default) keeps
    /// it, `Delete` removes it once the device is detached. A volume this object did not
    /// create is never removed.
    #[serde(default)]
    pub reclaim_policy: super::iso::ReclaimPolicy,
}

/// The backing store of an overlay: a volume of a storage pool on the node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackingVolume {
    /// Name of the storage pool (granted to the namespace).
    #[schemars(length(min = 1, max = 255))]
    pub pool: String,
    /// Name of the volume in the pool.
    #[schemars(length(min = 1, max = 255))]
    pub name: String,
}

/// Space allocated when a volume is created.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Preallocation {
    /// Thin: space is allocated as the guest writes.
    #[default]
    Off,
    /// qcow2 metadata allocated up front (qcow2 only).
    Metadata,
    /// Every byte allocated up front.
    Full,
}

/// Image format.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// Raw image.
    Raw,
    /// QEMU copy-on-write v2 image.
    Qcow2,
}

/// QEMU driver tuning of a storage device.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DriverTuning {
    /// Host page-cache mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheMode>,
    /// I/O mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io: Option<IoMode>,
    /// Whether discard (TRIM) requests from the guest are passed to the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discard: Option<DiscardMode>,
    /// Whether writes of zeroes are detected and turned into cheaper operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_zeroes: Option<DetectZeroes>,
}

/// Zero-write detection of a disk (libvirt `driver/@detect_zeroes`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DetectZeroes {
    /// No detection.
    Off,
    /// Detect zero writes and write zeroes efficiently.
    On,
    /// Detect zero writes and discard them (needs `discard: unmap`).
    Unmap,
}

/// Host page-cache mode of a disk (libvirt `driver/@cache`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Hypervisor default.
    Default,
    /// No host cache.
    None,
    /// Write-through host cache.
    Writethrough,
    /// Write-back host cache.
    Writeback,
    /// Direct I/O, synchronous writes.
    Directsync,
    /// Ignore flushes (unsafe).
    Unsafe,
}

/// I/O mode of a disk (libvirt `driver/@io`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    /// POSIX threads.
    Threads,
    /// Linux native AIO.
    Native,
    /// Linux io_uring.
    #[serde(rename = "io_uring")]
    IoUring,
}

/// Discard mode of a disk (libvirt `driver/@discard`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiscardMode {
    /// Pass discard requests to the image.
    Unmap,
    /// Ignore discard requests.
    Ignore,
}

/// Observed state of a `VirtualMachineStorage`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineStorageStatus {
    /// Domain the device was attached to. `spec.vm` is immutable: a change is refused
    /// (`FieldImmutable`) and the device stays on this domain until the object is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// Device name the device got in the domain (for example `sdb`); stable once chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Bus the device is attached on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<Bus>,
    /// libvirt user alias (`ua-...`) by which the agent recognises its own device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Path of the image currently attached, or in the CD tray; empty for an empty tray.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_source: Option<String>,
    /// Whether the device is present in the running guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<bool>,
    /// Whether the device is present in the persistent domain definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
    /// The disk I/O limits in effect: the running guest's, or the definition's when the domain
    /// is shut off. Absent when no limit is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iotune: Option<IoTune>,
    /// Spec fields written to the definition that the running guest gets only at its next
    /// boot (for example `driver.cache`); empty when everything is in effect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_restart: Vec<String>,
    /// Node the object is bound to (set by the controller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The `metadata.generation` the agent last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Scheduled, Ready and RestartRequired conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}
