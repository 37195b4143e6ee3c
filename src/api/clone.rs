//! `VMClone`: a task that clones a shut-off domain, with copies of its disks.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{DOMAIN_NAME_PATTERN, NODE_NAME_PATTERN, conditions_schema};

/// A clone task: a new domain made from a shut-off one, with a new name, UUID and MAC addresses
/// and copies of its writable disks. This object is the record of the task; once Completed,
/// deleting it does not touch the clone.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "virtplane.io",
    version = "v1alpha1",
    kind = "VMClone",
    plural = "vmclones",
    shortname = "vmclone",
    category = "virtplane",
    namespaced,
    status = "VMCloneStatus",
    derive = "PartialEq",
    doc = "A task that clones a libvirt virtual machine. Deleting a Completed VMClone keeps the clone.",
    printcolumn(name = "Source", type_ = "string", json_path = ".spec.source"),
    printcolumn(name = "Target", type_ = "string", json_path = ".status.targetName"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Progress", type_ = "string", json_path = ".status.progress"),
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
pub struct VMCloneSpec {
    /// Name of the domain to clone; it must be shut off for the copy to start. Immutable.
    #[schemars(pattern(DOMAIN_NAME_PATTERN))]
    pub source: String,
    /// Name of the new domain. Default: `<source>-clone<N>` with the lowest free N on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DOMAIN_NAME_PATTERN))]
    pub target_name: Option<String>,
    /// Node that has the source domain. Leave empty to let the controller find it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(NODE_NAME_PATTERN))]
    pub node_name: Option<String>,
    /// Where and how disks are copied.
    #[serde(default)]
    pub storage: CloneStorage,
    /// Start the clone once it is defined.
    #[serde(default)]
    pub start: bool,
}

/// Disk copy settings of a clone.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloneStorage {
    /// Pool for copies whose own pool cannot create volumes or lacks room.
    #[serde(default = "default_pool")]
    #[schemars(length(min = 1, max = 255))]
    pub pool: String,
    /// Copy strategy: `Auto` (reflink where the filesystem supports it, else a sparse copy),
    /// `Copy` (always a sparse-aware copy) or `Reflink` (copy-on-write or fail).
    #[serde(default)]
    pub strategy: CopyStrategy,
    /// Make standalone copies of qcow2 overlays. By default (false) the copy of an overlay is an
    /// overlay too: it keeps reading the source's backing image, which the source and the clone
    /// then share and which must stay in place. With true, every overlay disk is copied into a
    /// qcow2 image with no backing file, its whole backing chain merged in (`qemu-img convert`;
    /// never a reflink): the clone no longer needs the backing image, and the copy needs room
    /// for the data of every image of the chain. Either way each image of the chain must lie
    /// in a pool granted to the namespace. Disks that are no overlays are copied as
    /// `strategy` says.
    #[serde(default)]
    pub flatten: bool,
}

impl Default for CloneStorage {
    fn default() -> Self {
        Self {
            pool: default_pool(),
            strategy: CopyStrategy::default(),
            flatten: false,
        }
    }
}

fn default_pool() -> String {
    "default".to_string()
}

/// How a disk is copied.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum CopyStrategy {
    /// Reflink where supported, else a sparse-aware copy.
    #[default]
    Auto,
    /// A sparse-aware copy that skips holes and zero blocks.
    Copy,
    /// A copy-on-write reflink; fails where the filesystem cannot.
    Reflink,
}

/// Phase of a clone task.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ClonePhase {
    /// Waiting to start (for example for the source to shut off).
    Pending,
    /// Copying disks.
    Copying,
    /// Defining the new domain.
    Defining,
    /// The clone exists.
    Completed,
    /// The task failed; nothing of the clone was left behind.
    Failed,
}

/// Observed state of a `VMClone`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VMCloneStatus {
    /// Phase of the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ClonePhase>,
    /// Name of the new domain, fixed when the task starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_name: Option<String>,
    /// UUID of the new domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "targetUUID")]
    pub target_uuid: Option<String>,
    /// One entry per disk of the source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<CloneDisk>,
    /// Overall progress, for example `42%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// When copying started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the task completed or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Node the object is bound to (set by the controller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The `metadata.generation` the agent last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Scheduled, Progressing and Ready conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// Copy state of one disk of a clone.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloneDisk {
    /// Path of the source disk (for a shared disk that is no file, its volume or network
    /// source).
    pub source: String,
    /// Path of the copy (or of the shared medium when it is referenced, not copied); for a copy
    /// made as a new volume of the source's pool, the volume's name in `pool`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Pool the copy went to, and why when it is not the source's pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// How the disk was copied: `Reflink`, `Copy`, or `Shared` for read-only and shareable
    /// disks, which the clone uses as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// Bytes to copy: the source's data extents (holes are never read), the measure
    /// `copiedBytes` counts in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    /// Bytes of `totalBytes` copied so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copied_bytes: Option<u64>,
    /// Why the copy went where it did, when that was not the obvious place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What the copy is: `File` (`target` is its path) or `PoolVolume` (`target` names a new
    /// volume of `pool`, made by libvirt from the source volume). Absent for shared disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<CopyKind>,
    /// For the copy of a qcow2 overlay, what became of its backing chain (see [`OverlayCopy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<OverlayCopy>,
}

/// What the copy of a disk is: `File` (`target` is its path) or `PoolVolume` (`target` names a
/// new volume of `pool`, made by libvirt from the source volume). Absent for shared disks.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum CopyKind {
    /// A file, at the path `target`.
    File,
    /// A new volume of `pool`, named `target`.
    PoolVolume,
}

/// For the copy of a qcow2 overlay, what became of its backing chain: `SharedBase` (the copy
/// is an overlay of the same backing image as the source) or `Flattened` (the chain was merged
/// into a standalone copy, `spec.storage.flatten`). Absent for disks that are no overlays.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum OverlayCopy {
    /// The copy is an overlay of the same backing image, which the source and the clone share.
    SharedBase,
    /// The backing chain was merged into the copy, which has no backing file.
    Flattened,
}
