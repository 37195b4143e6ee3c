//! The libvirt side of cloning disks that are no files: which pool holds a block or network
//! disk's volume and what that pool can do, a copy within the pool (libvirt's
//! create-from-volume, under a name chosen beforehand so that the agent records it before it
//! exists), and where an iscsi-direct LUN is for a reader outside libvirt.

use std::future::Future;

use virt::connect::Connect;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use super::inventory::pool_type_and_path;
use super::iscsi_direct::{IscsiDirectError, IscsiLun};
use super::volume_copy::{PoolCopy, copy_xml, next_partition};
use super::{Libvirt, LibvirtError};

/// A disk's storage as its domain names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum BlockRef {
    /// `type='volume'`: a volume of a pool.
    Volume {
        /// The pool.
        pool: String,
        /// The volume.
        volume: String,
    },
    /// `type='block'`: a device node, which may be a volume of some pool.
    Device(String),
}

/// A volume that is no file, as a clone plans its copy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockVolume {
    /// Its pool.
    pub pool: String,
    /// The pool's type (`disk`, `logical`, `iscsi-direct`, …).
    pub pool_type: String,
    /// The volume's name in its pool.
    pub volume: String,
    /// Its path (a device node, or libvirt's name for a LUN without one).
    pub path: String,
    /// Its size in bytes.
    pub capacity: u64,
    /// The names of every volume of its pool (what a new name must avoid).
    pub pool_volumes: Vec<String>,
    /// The source device of a `disk` pool, which names its partitions itself.
    pub disk_device: Option<String>,
    /// Bytes the pool has available for new volumes.
    pub pool_available: u64,
}

/// Whether a pool of this type can create volumes, so that a copy is a new volume of the same
/// pool (libvirt's create-from-volume). iSCSI, SCSI and multipath pools only list what the
/// storage offers.
pub fn can_create_volumes(pool_type: &str) -> bool {
    matches!(
        pool_type,
        "dir" | "fs" | "netfs" | "logical" | "disk" | "zfs" | "rbd" | "gluster" | "vstorage"
    )
}

/// The name of the next copy in a pool: `wanted`, except in a `disk` pool, whose partitions
/// libvirt names itself (the next partition of its device).
pub fn in_pool_name(wanted: &str, disk_device: Option<&str>, pool_volumes: &[String]) -> String {
    disk_device.map_or_else(|| wanted.to_string(), |d| next_partition(d, pool_volumes))
}

/// Block and network volumes of clone tasks.
pub trait BlockClones: Send + Sync {
    /// The volume behind a disk and its pool; `None` when no active pool holds it.
    fn block_volume(
        &self,
        disk: &BlockRef,
    ) -> impl Future<Output = Result<Option<BlockVolume>, LibvirtError>> + Send;

    /// Creates volume `name` in pool `pool` as a copy of its volume `volume` (libvirt copies,
    /// sparse where the pool allows). A name already taken is an error; nothing is removed.
    fn copy_in_pool(
        &self,
        pool: &str,
        volume: &str,
        name: &str,
    ) -> impl Future<Output = Result<PoolCopy, LibvirtError>> + Send;

    /// The path of volume `name` of pool `pool`; `None` when it does not exist.
    fn pool_volume_path(
        &self,
        pool: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<String>, LibvirtError>> + Send;

    /// Where volume `volume` of the iscsi-direct pool `pool` is, for a libiscsi reader; the
    /// inner error says why it cannot be read that way.
    fn lun(
        &self,
        pool: &str,
        volume: &str,
    ) -> impl Future<Output = Result<Result<IscsiLun, IscsiDirectError>, LibvirtError>> + Send;
}

fn describe(p: &StoragePool, v: &StorageVol) -> Result<BlockVolume, virt::error::Error> {
    let xml = p.xml_desc(0)?;
    let (pool_type, _) = pool_type_and_path(&xml);
    let disk_device = if pool_type == "disk" {
        roxmltree::Document::parse(&xml).ok().and_then(|d| {
            d.descendants()
                .find(|n| n.has_tag_name("device"))
                .and_then(|n| n.attribute("path"))
                .map(str::to_string)
        })
    } else {
        None
    };
    Ok(BlockVolume {
        pool: p.name()?,
        pool_type,
        volume: v.name()?,
        path: v.path()?,
        capacity: v.info()?.capacity,
        pool_volumes: p.list_volumes()?,
        disk_device,
        pool_available: p.info()?.available,
    })
}

fn block_volume(c: &Connect, disk: &BlockRef) -> Result<Option<BlockVolume>, virt::error::Error> {
    let found = match disk {
        BlockRef::Volume { pool, volume } => c
            .lookup_storage_pool_by_name(pool)
            .and_then(|p| Ok((p.lookup_storage_vol_by_name(volume)?, p))),
        BlockRef::Device(dev) => c
            .lookup_storage_vol_by_path(dev)
            .and_then(|v| Ok((v.lookup_storage_pool()?, v)))
            .map(|(p, v)| (v, p)),
    };
    match found {
        Ok((v, p)) if p.is_active().unwrap_or(false) => describe(&p, &v).map(Some),
        Ok(_) => Ok(None),
        Err(e) if is_missing(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether a libvirt error means "no such pool or volume".
fn is_missing(e: &virt::error::Error) -> bool {
    use virt::enumutil::Enum::Known;
    use virt::error::ErrorNumber;
    matches!(
        e.code(),
        Known(ErrorNumber::NoStoragePool | ErrorNumber::NoStorageVolume)
    )
}

impl BlockClones for Libvirt {
    async fn block_volume(&self, disk: &BlockRef) -> Result<Option<BlockVolume>, LibvirtError> {
        let disk = disk.clone();
        self.call("look up a disk's volume", move |c| block_volume(c, &disk))
            .await
    }

    async fn copy_in_pool(
        &self,
        pool: &str,
        volume: &str,
        name: &str,
    ) -> Result<PoolCopy, LibvirtError> {
        let (p, v) = (pool.to_string(), volume.to_string());
        let source_xml = self
            .call("read the volume to copy", move |c| {
                c.lookup_storage_pool_by_name(&p)?
                    .lookup_storage_vol_by_name(&v)?
                    .xml_desc(0)
            })
            .await?;
        let xml = copy_xml(&source_xml, name).map_err(|source| LibvirtError::Xml {
            action: "read the volume to copy".into(),
            source,
        })?;
        let (pool, volume) = (pool.to_string(), volume.to_string());
        self.call("copy a volume within its pool", move |c| {
            let p = c.lookup_storage_pool_by_name(&pool)?;
            let src = p.lookup_storage_vol_by_name(&volume)?;
            let made = StorageVol::create_xml_from(&p, &xml, &src, 0)?;
            Ok(PoolCopy {
                name: made.name()?,
                path: made.path()?,
                capacity: made.info()?.capacity,
            })
        })
        .await
    }

    async fn pool_volume_path(
        &self,
        pool: &str,
        name: &str,
    ) -> Result<Option<String>, LibvirtError> {
        let (pool, name) = (pool.to_string(), name.to_string());
        self.call("look up a copied volume", move |c| {
            let p = c.lookup_storage_pool_by_name(&pool)?;
            let _ = p.refresh(0);
            match p.lookup_storage_vol_by_name(&name) {
                Ok(v) => v.path().map(Some),
                Err(e) if is_missing(&e) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await
    }

    async fn lun(
        &self,
        pool: &str,
        volume: &str,
    ) -> Result<Result<IscsiLun, IscsiDirectError>, LibvirtError> {
        self.iscsi_lun(pool, volume).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_that_create_volumes_and_their_copy_names() {
        for t in ["dir", "fs", "netfs", "logical", "disk", "zfs"] {
            assert!(can_create_volumes(t), "{t}");
        }
        for t in ["iscsi", "iscsi-direct", "scsi", "mpath", "unknown"] {
            assert!(!can_create_volumes(t), "{t}");
        }
        let vols = vec!["loop3p1".to_string(), "loop3p2".to_string()];
        assert_eq!(
            in_pool_name("x-clone1", Some("/dev/loop3"), &vols),
            "loop3p3"
        );
        assert_eq!(in_pool_name("lv-clone1", None, &vols), "lv-clone1");
    }
}
