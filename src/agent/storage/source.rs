//! The source of a device: what observe found on the node ([`SourceFacts`]) and the pure decision
//! whether it may be used ([`resolve`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::reason::StorageReason;
use crate::agent::refusal::Refusal;
use crate::api::{DiskFormat, DownloadPhase};
use crate::image::qcow2;
use crate::libvirt::facade::VolumeLookup;
use crate::libvirt::volume::{self, DiskRoute, VolumeSource};
use crate::tenancy::Grants;

type Refused = Refusal<StorageReason>;

/// What observe found about a path on the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathFacts {
    /// The path as given (by the spec, a volume or an IsoDownload).
    pub requested: PathBuf,
    /// What is there.
    pub found: Found,
}

/// What is at a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// The path is not absolute; nothing was looked at.
    Relative,
    /// Nothing (the path does not resolve). `parent` is the parent directory with symlinks
    /// resolved, when it exists.
    Missing {
        /// The resolved parent directory.
        parent: Option<PathBuf>,
    },
    /// Something, at `real` (symlinks and `..` resolved).
    Present {
        /// The resolved path.
        real: PathBuf,
        /// Its file type, or why it could not be read.
        kind: Result<FileKind, String>,
        /// Its header ([`qcow2::read_header`]: a qcow2 image's first cluster, else its first
        /// bytes); `None` when it was not opened (not a file or block device, or outside the
        /// allowed directories: observe never opens those).
        header: Option<Vec<u8>>,
    },
}

/// The file type at a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file.
    File,
    /// A block device.
    Block,
    /// Anything else (a directory, a socket, a FIFO).
    Other,
}

/// An IsoDownload as observe read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IsoFacts {
    /// Its phase.
    pub phase: Option<DownloadPhase>,
    /// The node it is bound to (its node label).
    pub node: Option<String>,
    /// The pool its file is in (or goes to).
    pub pool: String,
    /// The completed volume's file, when completed.
    pub file: Option<PathFacts>,
}

/// What observe found about `spec.source`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SourceFacts {
    /// No source (an empty CD tray), or not looked at because the domain does not exist.
    #[default]
    None,
    /// More than one of path, volume and isoDownload is set.
    Ambiguous,
    /// `source` is set but names nothing (`source: {}`).
    Empty,
    /// `source.path`.
    Path(PathFacts),
    /// `source.volume`: the lookup, and the volume's file when found.
    Volume {
        /// Pool name.
        pool: String,
        /// Volume name.
        name: String,
        /// What libvirt said.
        lookup: VolumeLookup,
        /// The volume's path on the node, when found.
        file: Option<PathFacts>,
    },
    /// `source.isoDownload`: the object, when it exists.
    Iso {
        /// The IsoDownload's name.
        name: String,
        /// The object, `None` when it does not exist.
        iso: Option<IsoFacts>,
    },
}

/// A source resolved to a path on the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The real path.
    pub path: PathBuf,
    /// Whether it is a block device.
    pub block: bool,
    /// `raw` or `qcow2`.
    pub format: String,
    /// Pool and volume, when the disk names them (`type='volume'`) rather than a path.
    pub volume: Option<(String, String)>,
}

impl Resolved {
    /// What the device's source is, as [`crate::libvirt::domain::DiskXml::source_label`] reads
    /// it back from the domain: the path, or `volume V of pool P`.
    pub fn label(&self) -> String {
        match &self.volume {
            Some((pool, volume)) => format!("volume {volume} of pool {pool}"),
            None => self.path.to_string_lossy().into_owned(),
        }
    }
}

/// The directories whose files an object may use. In open mode: the active pools' directories
/// and the agent's `--allowed-path` ones. In namespaced mode: only the directories of the pools
/// granted to the object's namespace (`--allowed-path` does not apply).
pub fn usable_dirs(
    grants: &Grants,
    pools: &[(String, PathBuf)],
    extra: &[PathBuf],
) -> Vec<PathBuf> {
    let pools = pools
        .iter()
        .filter(|(name, _)| grants.pool(name))
        .map(|(_, dir)| dir.clone());
    if grants.is_open() {
        extra.iter().cloned().chain(pools).collect()
    } else {
        pools.collect()
    }
}

/// The refusal of a pool the namespace is not granted.
fn pool_not_granted(grants: &Grants, pool: &str) -> Refused {
    Refusal::fix(StorageReason::NotGranted, grants.pool_refusal(pool))
}

/// Whether the source may back the device, and where it is: `Ok(None)` for no source. A
/// volume's or IsoDownload's pool must be granted, a path must lie in `allowed` (the usable
/// directories, see [`usable_dirs`]); what is not granted is refused before anything is said
/// of whether it exists.
pub fn resolve(
    facts: &SourceFacts,
    allowed: &[PathBuf],
    grants: &Grants,
    format: Option<DiskFormat>,
    node: &str,
) -> Result<Option<Resolved>, Refused> {
    resolve_with(facts, allowed, grants, format, node, false)
}

/// [`resolve`]; with `backing_ok` a qcow2 image whose only finding is its backing file is
/// accepted (the caller judged that chain: see `volume_plan::resolve`).
pub fn resolve_with(
    facts: &SourceFacts,
    allowed: &[PathBuf],
    grants: &Grants,
    format: Option<DiskFormat>,
    node: &str,
    backing_ok: bool,
) -> Result<Option<Resolved>, Refused> {
    let file = match facts {
        SourceFacts::None => return Ok(None),
        SourceFacts::Ambiguous => {
            return Err(Refusal::fix(
                StorageReason::InvalidSpec,
                "Set at most one of source.path, source.volume and source.isoDownload.",
            ));
        }
        SourceFacts::Empty => {
            return Err(Refusal::fix(
                StorageReason::InvalidSpec,
                "spec.source is empty: set one of source.path, source.volume and source.isoDownload, or leave source out for an empty CD-ROM tray.",
            ));
        }
        SourceFacts::Path(file) => file,
        SourceFacts::Volume { pool, .. } if !grants.pool(pool) => {
            return Err(pool_not_granted(grants, pool));
        }
        SourceFacts::Volume {
            pool,
            name,
            lookup,
            file,
        } => match (lookup, file) {
            (VolumeLookup::Found(found), _)
                if matches!(
                    volume::disk_route(&found.pool_type),
                    Some(DiskRoute::Block | DiskRoute::Volume)
                ) =>
            {
                return pool_volume(pool, name, found, format).map(Some);
            }
            (VolumeLookup::Found(_), Some(file)) => file,
            (VolumeLookup::NoPool, _) => {
                return Err(Refusal::wait(
                    StorageReason::SourceNotFound,
                    format!("Storage pool {pool} does not exist on this node."),
                    Duration::from_secs(60),
                ));
            }
            _ => {
                return Err(Refusal::wait(
                    StorageReason::SourceNotFound,
                    format!(
                        "Volume {name} does not exist in pool {pool}; check the name with virsh vol-list."
                    ),
                    Duration::from_secs(60),
                ));
            }
        },
        SourceFacts::Iso { name, iso } => {
            let Some(iso) = iso else {
                return Err(Refusal::wait(
                    StorageReason::WaitingForDownload,
                    format!(
                        "IsoDownload {name} does not exist in this namespace; create it, and the medium is inserted once it completes."
                    ),
                    Duration::from_secs(60),
                ));
            };
            if !grants.pool(&iso.pool) {
                return Err(pool_not_granted(grants, &iso.pool));
            }
            match (iso.phase, &iso.file) {
                (Some(DownloadPhase::Completed), Some(file)) => {
                    if iso.node.as_deref() != Some(node) {
                        return Err(Refusal::fix(
                            StorageReason::SourceNotFound,
                            format!(
                                "IsoDownload {name} completed on another node; download it on node {node} (spec.nodeName)."
                            ),
                        ));
                    }
                    file
                }
                (phase, _) => {
                    return Err(Refusal::wait(
                        StorageReason::WaitingForDownload,
                        format!(
                            "Waiting for IsoDownload {name} to complete (phase {}); the medium is inserted as soon as it does.",
                            phase.map_or("unknown".to_string(), |p| format!("{p:?}"))
                        ),
                        Duration::from_secs(30),
                    ));
                }
            }
        }
    };
    check_path_with(file, allowed, grants, format, backing_ok).map(Some)
}

/// A volume of a pool whose volumes are block devices or no node path at all, as libvirt
/// resolved it: allowed because its pool is granted (checked before), never judged by where its
/// path lies. Only raw: the agent does not open such devices, so it cannot check a qcow2 image
/// on them for backing files.
fn pool_volume(
    pool: &str,
    name: &str,
    found: &VolumeSource,
    format: Option<DiskFormat>,
) -> Result<Resolved, Refused> {
    if format == Some(DiskFormat::Qcow2) {
        return Err(Refusal::fix(
            StorageReason::InvalidSpec,
            format!(
                "Volume {name} of pool {pool} is a {} pool volume, which virtplane attaches as raw only (it cannot check a qcow2 image there for backing files); leave spec.format unset or raw.",
                found.pool_type
            ),
        ));
    }
    let block = volume::disk_route(&found.pool_type) == Some(DiskRoute::Block);
    Ok(Resolved {
        path: PathBuf::from(&found.path),
        block,
        format: "raw".into(),
        volume: (!block).then(|| (pool.to_string(), name.to_string())),
    })
}

/// Checks the resolved path lies in an allowed directory and exists, and works out the format
/// from the header (see [`qcow2::judge`]): a qcow2 image with a backing file, an external data
/// file, an incompatible feature the agent does not know or a malformed header is
/// `UnsafeImage`; a declared format the header contradicts is `InvalidSpec`. Outside the
/// directories is `NotGranted` in namespaced mode, `PathNotAllowed` in open mode.
#[cfg(test)]
pub fn check_path(
    file: &PathFacts,
    allowed: &[PathBuf],
    grants: &Grants,
    format: Option<DiskFormat>,
) -> Result<Resolved, Refused> {
    check_path_with(file, allowed, grants, format, false)
}

/// [`check_path`], accepting a backing file when `backing_ok` (see [`resolve_with`]).
fn check_path_with(
    file: &PathFacts,
    allowed: &[PathBuf],
    grants: &Grants,
    format: Option<DiskFormat>,
    backing_ok: bool,
) -> Result<Resolved, Refused> {
    let path = &file.requested;
    let inside = |p: &Path| allowed.iter().any(|a| p.starts_with(a));
    let (real, kind, header) = match &file.found {
        Found::Relative => {
            return Err(Refusal::fix(
                StorageReason::InvalidSpec,
                format!("{} is not an absolute path.", path.display()),
            ));
        }
        // Judge the parent so a missing file in a forbidden place is still "not allowed".
        Found::Missing { parent } if parent.as_deref().is_some_and(inside) => {
            return Err(Refusal::wait(
                StorageReason::SourceNotFound,
                format!(
                    "{} does not exist on this node; create it or fix source.path.",
                    path.display()
                ),
                Duration::from_secs(60),
            ));
        }
        Found::Missing { .. } => return Err(not_allowed(path, grants)),
        Found::Present { real, .. } if !inside(real) => return Err(not_allowed(path, grants)),
        Found::Present { real, kind, header } => (real, kind, header),
    };
    let kind = kind.as_ref().map_err(|e| {
        Refusal::fix(
            StorageReason::SourceNotFound,
            format!("Cannot read {}: {e}.", real.display()),
        )
    })?;
    let block = *kind == FileKind::Block;
    if *kind == FileKind::Other {
        return Err(Refusal::fix(
            StorageReason::InvalidSpec,
            format!("{} is neither a file nor a block device.", real.display()),
        ));
    }
    // Decided from the header, never left to QEMU's probing; what could make QEMU open
    // another file is refused, whatever format is declared.
    let verdict = qcow2::judge(header.as_deref().unwrap_or_default());
    let refusal = match &verdict {
        qcow2::Verdict::Unsafe(found)
            if backing_ok && found.as_slice() == [qcow2::Finding::BackingFile] =>
        {
            None
        }
        other => other.refusal(),
    };
    if let Some(why) = refusal {
        return Err(Refusal::fix(
            StorageReason::UnsafeImage,
            format!(
                "{} is {why}. virtplane uses only standalone images; make one with qemu-img convert -O qcow2 (or -O raw) and use that.",
                real.display()
            ),
        ));
    }
    let is_qcow2 = verdict.is_qcow2();
    let mismatch = match format {
        Some(DiskFormat::Qcow2) if !is_qcow2 => Some(("is not a qcow2 image", "qcow2")),
        Some(DiskFormat::Raw) if is_qcow2 => Some(("is a qcow2 image", "raw")),
        _ => None,
    };
    if let Some((found, declared)) = mismatch {
        return Err(Refusal::fix(
            StorageReason::InvalidSpec,
            format!(
                "{} {found}, but spec.format says {declared}; fix spec.format (or leave it out: the format is read from the image) or the image.",
                real.display()
            ),
        ));
    }
    let format = match format {
        Some(DiskFormat::Raw) => "raw",
        Some(DiskFormat::Qcow2) => "qcow2",
        None if is_qcow2 => "qcow2",
        None => "raw",
    };
    Ok(Resolved {
        path: real.clone(),
        block,
        format: format.into(),
        volume: None,
    })
}

/// The refusal of a path outside the usable directories. It names neither those directories
/// nor the pool the path is in: only, in namespaced mode, the requester's own grant.
fn not_allowed(path: &Path, grants: &Grants) -> Refused {
    if grants.is_open() {
        Refusal::fix(
            StorageReason::PathNotAllowed,
            format!(
                "{} is outside the directories this agent may use (the active storage pools' and those given with --allowed-path). Use a storage pool volume, or ask the node's administrator to add the directory with --allowed-path.",
                path.display()
            ),
        )
    } else {
        Refusal::fix(
            StorageReason::NotGranted,
            grants.path_refusal(&path.display().to_string()),
        )
    }
}

#[cfg(test)]
#[path = "source_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "pool_volume_tests.rs"]
mod pool_volume_tests;
