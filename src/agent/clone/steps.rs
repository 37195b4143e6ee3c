//! The first, pure part of planning a clone: what the clone does with each disk of the source
//! (share it, copy a file, copy a block volume) and whether every disk may and can be copied at
//! all; [`super::plan`] then places the copies.

use super::block;
use super::plan::{Observed, not_granted, storage};
use super::reason::CloneReason;
use crate::agent::refusal::Refusal;
use crate::api::VMCloneSpec;
use crate::libvirt::block_clone::BlockRef;
use crate::libvirt::domain::{DiskXml, DomainXml};
use crate::libvirt::facade::VolumeLookup;
use crate::libvirt::volume;

/// What a clone does with one disk of the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskUse {
    /// No medium (an empty CD-ROM tray): nothing to do.
    Empty,
    /// Read-only or shareable: the clone refers to the same source, labelled so.
    Shared(String),
    /// A writable file, copied.
    File(String),
    /// A writable `type='volume'` disk: copied when it is a file in a directory pool.
    Volume {
        /// The pool.
        pool: String,
        /// The volume.
        volume: String,
    },
    /// A writable `type='block'` disk: copied when a pool holds its device (see `block`).
    Block(String),
    /// A writable disk that is no file: the task is refused with this message.
    Unsupported(String),
}

/// Decides from the XML alone what the clone does with disk `d` of domain `source`.
pub fn disk_use(d: &DiskXml, source: &str) -> DiskUse {
    let Some(label) = d.source_label() else {
        return DiskUse::Empty;
    };
    if d.readonly || d.shareable || d.device == "cdrom" {
        return DiskUse::Shared(label);
    }
    match (d.kind.as_str(), &d.source, &d.pool, &d.volume) {
        ("file", Some(path), _, _) => DiskUse::File(path.clone()),
        ("volume", _, Some(pool), Some(volume)) => DiskUse::Volume {
            pool: pool.clone(),
            volume: volume.clone(),
        },
        ("block", Some(dev), _, _) => DiskUse::Block(dev.clone()),
        (kind, _, _, _) => {
            let what = match kind {
                "network" => "network disk",
                _ => kind,
            };
            DiskUse::Unsupported(unsupported(
                d,
                &format!("{what} {label}, which names no storage pool"),
                source,
            ))
        }
    }
}

/// The refusal message of a writable disk the clone cannot copy.
fn unsupported(d: &DiskXml, what: &str, source: &str) -> String {
    format!(
        "Disk {} ({what}) of {source} is writable and nothing on this node can create a copy of \
         it, so the clone would write to the same storage as {source}: mark it <readonly/> or \
         <shareable/> in {source} to share it with the clone, or make it a volume of a storage \
         pool (a file in a dir, fs or netfs pool, or a volume of a disk, logical or iSCSI pool).",
        target_of(d),
    )
}

pub(super) fn target_of(d: &DiskXml) -> &str {
    d.target.as_deref().unwrap_or("without target")
}

/// A disk as planned: shared, copied from a file (of a known pool, for a volume disk), or
/// copied from a volume that is no file (see `block`).
pub(super) enum Step {
    Shared(String),
    Copy { path: String, pool: Option<String> },
    Block(block::Disk),
}

/// Refuses a copy from a disk outside the namespace's pools: a volume of an ungranted pool, or
/// a file in no granted pool's directory (in namespaced mode the agent's allowed directories do
/// not count). Checked before anything about the disk is said, so the answer is the same
/// whether the pool or volume exists or not.
fn check_copy_source(
    d: &DiskXml,
    source: &str,
    path: &str,
    volume_pool: Option<&str>,
    obs: &Observed,
) -> Result<(), Refusal<CloneReason>> {
    let g = &obs.grants;
    if g.is_open() {
        return Ok(());
    }
    let disk = target_of(d);
    if let Some(pool) = volume_pool {
        return if g.pool(pool) {
            Ok(())
        } else {
            Err(not_granted(format!(
                "Disk {disk} of {source} is a volume of pool {pool}: {}",
                g.pool_refusal(pool)
            )))
        };
    }
    let dir = obs
        .files
        .get(path)
        .map(|f| f.dir.clone())
        .unwrap_or_default();
    let mut pools: Vec<&String> = obs
        .pool_dirs
        .iter()
        .filter(|(_, d)| !dir.as_os_str().is_empty() && **d == dir)
        .map(|(name, _)| name)
        .collect();
    pools.sort();
    if pools.iter().any(|p| g.pool(p)) {
        return Ok(());
    }
    let what = pools
        .first()
        .map_or_else(|| format!("the directory of {path}"), |p| p.to_string());
    Err(not_granted(format!(
        "Disk {disk} of {source} ({path}) lies in no storage pool granted to the namespace: {}",
        g.pool_refusal(&what)
    )))
}

/// What the clone does with each disk of `config`, the source's definition: every disk is
/// judged first, and a disk that cannot be copied (or may not be: outside the namespace's pools,
/// or an image that would make QEMU open what it names) refuses the whole task.
pub(super) fn steps(
    spec: &VMCloneSpec,
    config: &DomainXml,
    obs: &Observed,
) -> Result<Vec<Step>, Refusal<CloneReason>> {
    let source = &spec.source;
    // Shared media are referenced as the (granted) source does, not copied: they are not
    // checked against pools.
    let mut steps = Vec::new();
    let mut refused = Vec::new();
    for d in &config.disks {
        match disk_use(d, source) {
            DiskUse::Empty => {}
            DiskUse::Shared(label) => steps.push(Step::Shared(label)),
            DiskUse::File(path) => {
                check_copy_source(d, source, &path, None, obs)?;
                steps.push(Step::Copy { path, pool: None });
            }
            DiskUse::Unsupported(message) => refused.push(message),
            DiskUse::Block(dev) => match obs.block.get(&BlockRef::Device(dev.clone())) {
                Some(v) => {
                    check_copy_source(d, source, "", Some(&v.pool), obs)?;
                    steps.push(Step::Block(block::Disk::new(target_of(d), dev, v)));
                }
                None => refused.push(unsupported(
                    d,
                    &format!("block device {dev}, which belongs to no active storage pool"),
                    source,
                )),
            },
            DiskUse::Volume { pool, volume } => {
                check_copy_source(d, source, "", Some(&pool), obs)?;
                let why = match obs.volumes.get(&(pool.clone(), volume.clone())) {
                    Some(VolumeLookup::Found(v))
                        if v.is_file && volume::holds_files(&v.pool_type) =>
                    {
                        steps.push(Step::Copy {
                            path: v.path.clone(),
                            pool: Some(pool),
                        });
                        continue;
                    }
                    Some(VolumeLookup::Found(_))
                        if let Some(v) = obs.block.get(&BlockRef::Volume {
                            pool: pool.clone(),
                            volume: volume.clone(),
                        }) =>
                    {
                        let label = d.source_label().unwrap_or_default();
                        steps.push(Step::Block(block::Disk::new(target_of(d), label, v)));
                        continue;
                    }
                    Some(VolumeLookup::Found(v)) => {
                        refused.push(unsupported(
                            d,
                            &format!(
                                "volume {volume} of the {} pool {pool}, at {}",
                                v.pool_type, v.path
                            ),
                            source,
                        ));
                        continue;
                    }
                    Some(VolumeLookup::NoPool) => "no such pool",
                    Some(VolumeLookup::PoolInactive) => "the pool is not running",
                    Some(VolumeLookup::NoVolume) | None => "no such volume",
                };
                return Err(storage(format!(
                    "Disk {} of {source} is volume {volume} of pool {pool}, which libvirt cannot resolve ({why}); start the pool or fix the disk.",
                    target_of(d)
                )));
            }
        }
    }
    if !refused.is_empty() {
        return Err(Refusal::fix(
            CloneReason::UnsupportedDisk,
            refused.join(" "),
        ));
    }
    // A copy would still make QEMU open what the image names (a backing or data file).
    for step in &steps {
        let Step::Copy { path, .. } = step else {
            continue;
        };
        if let Some(why) = obs.files.get(path).and_then(|f| f.unsafe_image.as_ref()) {
            let fix = if spec.storage.flatten {
                "spec.storage.flatten reads every image of a backing chain, so each must lie in a storage pool granted to the namespace and name its format; nothing was created. Fix the chain, or convert the disk into a standalone image with qemu-img convert, then clone."
            } else {
                "virtplane copies standalone images, and overlays whose whole backing chain lies in the storage pools granted to the namespace; convert it with qemu-img convert, then clone."
            };
            return Err(Refusal::fix(
                CloneReason::UnsafeImage,
                format!("{path} of {source} is {why}. {fix}"),
            ));
        }
    }

    Ok(steps)
}
