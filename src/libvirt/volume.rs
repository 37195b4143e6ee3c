//! The storage volumes behind `type='volume'` disks.

use virt::connect::Connect;
use virt::sys;

use super::inventory::pool_type_and_path;

/// Where a volume's data is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeSource {
    /// The volume's path on the node (`virStorageVolGetPath`).
    pub path: String,
    /// Type of its pool (`dir`, `logical`, `iscsi`, …).
    pub pool_type: String,
    /// Whether the volume is a plain file (`VIR_STORAGE_VOL_FILE`).
    pub is_file: bool,
}

/// Whether pools of this type keep their volumes as files in a directory, so that a file copied
/// into the pool's directory becomes one of its volumes.
pub fn holds_files(pool_type: &str) -> bool {
    matches!(pool_type, "dir" | "fs" | "netfs")
}

/// How a domain disk reaches a volume of a pool of this type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskRoute {
    /// A file in the pool's directory (`type='file'`), checked like any path.
    File,
    /// A block device libvirt made or found (`type='block'`, `source/@dev` = the volume's path).
    Block,
    /// A volume that is no node path (iSCSI through libiscsi, RBD, Gluster): the disk names
    /// pool and volume (`type='volume'`) and libvirt fills in hosts, initiator and secrets when
    /// it starts the disk.
    Volume,
}

/// The route of a volume of a pool of type `pool_type`; `None` for a type virtplane does not
/// know (refused rather than guessed).
pub fn disk_route(pool_type: &str) -> Option<DiskRoute> {
    match pool_type {
        "dir" | "fs" | "netfs" => Some(DiskRoute::File),
        "logical" | "disk" | "iscsi" | "scsi" | "mpath" | "zfs" | "vstorage" => {
            Some(DiskRoute::Block)
        }
        "iscsi-direct" | "rbd" | "gluster" | "sheepdog" => Some(DiskRoute::Volume),
        _ => None,
    }
}

/// Resolves volume `volume` of pool `pool`.
pub fn resolve_volume(
    conn: &Connect,
    pool: &str,
    volume: &str,
) -> Result<VolumeSource, virt::error::Error> {
    let p = conn.lookup_storage_pool_by_name(pool)?;
    let v = p.lookup_storage_vol_by_name(volume)?;
    let (pool_type, _) = pool_type_and_path(&p.xml_desc(0)?);
    Ok(VolumeSource {
        path: v.path()?,
        pool_type,
        is_file: v.info()?.kind == sys::VIR_STORAGE_VOL_FILE,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_pool_type() {
        for (t, want) in [
            ("dir", Some(DiskRoute::File)),
            ("netfs", Some(DiskRoute::File)),
            ("logical", Some(DiskRoute::Block)),
            ("disk", Some(DiskRoute::Block)),
            ("iscsi", Some(DiskRoute::Block)),
            ("scsi", Some(DiskRoute::Block)),
            ("mpath", Some(DiskRoute::Block)),
            ("iscsi-direct", Some(DiskRoute::Volume)),
            ("rbd", Some(DiskRoute::Volume)),
            ("gluster", Some(DiskRoute::Volume)),
            ("something-new", None),
        ] {
            assert_eq!(disk_route(t), want, "{t}");
        }
    }

    #[test]
    fn only_directory_pools_take_file_copies() {
        for t in ["dir", "fs", "netfs"] {
            assert!(holds_files(t), "{t}");
        }
        for t in ["logical", "iscsi", "disk", "rbd", "zfs", "unknown"] {
            assert!(!holds_files(t), "{t}");
        }
    }
}
