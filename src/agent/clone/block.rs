//! The plan of a writable disk that is no file: a block device or a volume of a pool whose
//! volumes are no files (logical, disk, iSCSI, SCSI, multipath, …). Pure.
//!
//! Its route follows what its pool can do:
//! * a pool that can create volumes gets the copy as a new volume of its own, named
//!   `<name>-cloneN<ext>` (in a `disk` pool: the next partition, which libvirt names), made by
//!   libvirt's create-from-volume; the status records the volume's name (no `/`) as `target`;
//! * a pool that cannot (iscsi, iscsi-direct, scsi, mpath), or one without room, gets the data
//!   streamed into a new sparse file of `spec.storage.pool`, named after the source volume; the
//!   status records the file's path as `target`.
//!
//! The space check counts the volume's capacity: what a new volume takes, and the most a
//! stream can write (a target seldom says which of its blocks hold data).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::plan::{DiskUse, Observed, disk_use, free_copy_name};
use super::reason::CloneReason;
use crate::agent::refusal::Refusal;
use crate::api::{CloneDisk, CopyKind, StoragePoolSummary, VMCloneSpec};
use crate::libvirt::block_clone::{BlockRef, BlockVolume, can_create_volumes};
use crate::libvirt::domain::DomainXml;
use crate::libvirt::facade::VolumeLookup;
use crate::libvirt::volume;
use crate::libvirt::volume_copy::next_partition;

/// What a block disk's copy needs from the rest of the plan.
pub struct Ctx<'a> {
    /// The task's spec.
    pub spec: &'a VMCloneSpec,
    /// What was observed.
    pub obs: &'a Observed,
    /// The fallback pool, or why it cannot take files.
    pub fallback: &'a Result<Option<&'a StoragePoolSummary>, String>,
    /// Whether the fallback pool is granted.
    pub fallback_granted: bool,
    /// The clone's number (`-cloneN`).
    pub number: u32,
}

/// A writable block disk of the source, with its volume.
pub struct Disk {
    /// Its target (`vda`).
    disk: String,
    /// What the status calls its source: the device path, or `volume V of pool P`.
    label: String,
    /// The volume.
    volume: BlockVolume,
}

impl Disk {
    /// Disk `disk`, labelled `label`, whose volume is `volume`.
    pub fn new(disk: &str, label: String, volume: &BlockVolume) -> Self {
        Self {
            disk: disk.to_string(),
            label,
            volume: volume.clone(),
        }
    }
}

fn storage(message: String) -> Refusal<CloneReason> {
    Refusal::fix(CloneReason::StorageNotUsable, message)
}

/// Whether the copy of status disk `d` is a new volume of its pool (made by libvirt) rather than
/// a file. A plan recorded by an agent that did not write `kind` yet says it by its target: a
/// volume name has no `/`, a path does.
pub fn into_pool(d: &CloneDisk) -> bool {
    match d.kind {
        Some(kind) => kind == CopyKind::PoolVolume,
        None => d.target.as_deref().is_some_and(|t| !t.starts_with('/')),
    }
}

/// Whether the agent can read a volume of this pool outside libvirt: a device node, or an
/// iscsi-direct LUN (through libiscsi).
pub fn readable(v: &BlockVolume) -> bool {
    v.pool_type == "iscsi-direct" || v.path.starts_with('/')
}

/// The name of the in-pool copy of `v`: `<name>-cloneN<ext>`, or the next partition in a disk
/// pool; never a volume of the pool or a copy planned before.
pub fn in_pool_copy_name(v: &BlockVolume, number: u32, planned: &[CloneDisk]) -> String {
    let taken: Vec<String> = v
        .pool_volumes
        .iter()
        .cloned()
        .chain(
            planned
                .iter()
                .filter(|d| d.pool.as_deref() == Some(v.pool.as_str()))
                .filter_map(|d| d.target.clone()),
        )
        .collect();
    if let Some(dev) = &v.disk_device {
        return next_partition(dev, &taken);
    }
    let (stem, ext) = match v.volume.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s.to_string(), format!(".{e}")),
        _ => (v.volume.clone(), String::new()),
    };
    (number..)
        .map(|n| format!("{stem}-clone{n}{ext}"))
        .find(|n| !taken.contains(n))
        .unwrap_or_else(|| format!("{stem}-clone{ext}"))
}

/// The file a streamed copy of `v` goes to in `dir`: named after the volume (`:` and `/`
/// made `-`), `-cloneN.img`.
pub fn file_copy_name(
    dir: &Path,
    v: &BlockVolume,
    number: u32,
    planned: &[CloneDisk],
    obs: &Observed,
) -> PathBuf {
    let base: String = v
        .volume
        .chars()
        .map(|c| if c == ':' || c == '/' { '-' } else { c })
        .collect();
    let base = if base.contains('.') {
        base
    } else {
        format!("{base}.img")
    };
    free_copy_name(dir, Path::new(&base), number, planned, &obs.existing)
}

/// Plans the copy of block disk `b`, after the copies `planned`. `dirs` counts the bytes of
/// files by destination directory (bytes, available, name) as the file copies do; `pools` the
/// bytes of new volumes by pool.
pub fn plan_block(
    c: &Ctx<'_>,
    b: &Disk,
    planned: &[CloneDisk],
    dirs: &mut HashMap<PathBuf, (u64, u64, String)>,
    pools: &mut HashMap<String, u64>,
) -> Result<CloneDisk, Refusal<CloneReason>> {
    let (disk, label, v) = (&b.disk, &b.label, &b.volume);
    let source = &c.spec.source;
    let size = v.capacity;
    let copy = |target: String, pool: &str, kind, message: Option<String>| CloneDisk {
        source: label.to_string(),
        target: Some(target),
        kind: Some(kind),
        pool: Some(pool.to_string()),
        strategy: None,
        total_bytes: Some(size),
        copied_bytes: Some(0),
        message,
        overlay: None,
    };
    let mut why_file = format!(
        "Pool {} ({}) cannot create volumes; the data was streamed into a file of pool {}.",
        v.pool, v.pool_type, c.spec.storage.pool
    );
    if can_create_volumes(&v.pool_type) {
        // From the volume's pool itself: a pool on a system directory (`/dev`) is left out of
        // the observed pools, which are the file copies' destinations.
        let available = v.pool_available;
        let already = pools.get(&v.pool).copied().unwrap_or(0);
        if already + size <= available {
            *pools.entry(v.pool.clone()).or_default() += size;
            let name = in_pool_copy_name(v, c.number, planned);
            return Ok(copy(name, &v.pool, CopyKind::PoolVolume, None));
        }
        if !readable(v) {
            return Err(Refusal::fix(
                CloneReason::InsufficientSpace,
                format!(
                    "Pool {} lacks room for a copy of disk {disk} of {source} ({size} bytes, {available} available), and its volumes cannot be read outside libvirt to stream them into pool {}. Free space in {}.",
                    v.pool, c.spec.storage.pool, v.pool
                ),
            ));
        }
        why_file = format!(
            "Pool {} lacks room for {size} bytes; the data was streamed into a file of the fallback pool {}.",
            v.pool, c.spec.storage.pool
        );
    } else if !readable(v) {
        return Err(storage(format!(
            "Disk {disk} of {source} is volume {} of the {} pool {}, which can neither create a copy nor be read outside libvirt.",
            v.volume, v.pool_type, v.pool
        )));
    }
    let fallback = match c.fallback {
        Ok(Some(f)) => f,
        Ok(None) if !c.fallback_granted => {
            return Err(Refusal::fix(
                CloneReason::NotGranted,
                format!(
                    "Disk {disk} of {source} must be streamed into a file of spec.storage.pool, and spec.storage.pool: {}",
                    c.obs.grants.pool_refusal(&c.spec.storage.pool)
                ),
            ));
        }
        Ok(None) => {
            return Err(storage(format!(
                "Disk {disk} of {source} must be streamed into a file of spec.storage.pool, and pool {} is not an active pool on this node.",
                c.spec.storage.pool
            )));
        }
        Err(why) => {
            return Err(storage(format!(
                "Disk {disk} of {source} must be streamed into a file of spec.storage.pool, and {why}."
            )));
        }
    };
    let dir = PathBuf::from(fallback.path.clone().unwrap_or_default());
    dirs.entry(dir.clone())
        .or_insert((0, fallback.available, fallback.name.clone()))
        .0 += size;
    let dest = file_copy_name(&dir, v, c.number, planned, c.obs);
    Ok(copy(
        dest.display().to_string(),
        &fallback.name,
        CopyKind::File,
        Some(why_file),
    ))
}

/// The writable disks of a source whose copies take the block routes: block devices, and
/// volumes (resolved in `volumes`) of pools that hold no files.
pub fn block_refs(
    config: &DomainXml,
    source: &str,
    volumes: &HashMap<(String, String), VolumeLookup>,
) -> Vec<BlockRef> {
    config
        .disks
        .iter()
        .filter_map(|d| match disk_use(d, source) {
            DiskUse::Block(dev) => Some(BlockRef::Device(dev)),
            DiskUse::Volume { pool, volume } => {
                match volumes.get(&(pool.clone(), volume.clone())) {
                    Some(VolumeLookup::Found(v))
                        if !(v.is_file && volume::holds_files(&v.pool_type)) =>
                    {
                        Some(BlockRef::Volume { pool, volume })
                    }
                    _ => None,
                }
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
#[path = "block_tests.rs"]
mod tests;
