//! The in-memory stand-in's block and network volumes for clone tasks (a child of `fake`, so
//! it shares its state).

use super::{FakeLibvirt, not_found};
use crate::libvirt::block_clone::{BlockClones, BlockRef, BlockVolume};
use crate::libvirt::iscsi_direct::{IscsiDirectError, IscsiLun};
use crate::libvirt::volume_copy::PoolCopy;
use crate::libvirt::{ErrorKind, LibvirtError};

impl FakeLibvirt {
    /// Adds a volume that is no file.
    pub fn with_block_volume(self, v: BlockVolume) -> Self {
        self.state().block.push(v);
        self
    }

    /// The block volumes of pool `pool`, by name.
    pub fn block_volumes(&self, pool: &str) -> Vec<String> {
        self.state()
            .block
            .iter()
            .filter(|b| b.pool == pool)
            .map(|b| b.volume.clone())
            .collect()
    }
}

impl BlockClones for FakeLibvirt {
    async fn block_volume(&self, disk: &BlockRef) -> Result<Option<BlockVolume>, LibvirtError> {
        self.enter("look up a disk's volume", None)?;
        Ok(self
            .state()
            .block
            .iter()
            .find(|b| match disk {
                BlockRef::Volume { pool, volume } => b.pool == *pool && b.volume == *volume,
                BlockRef::Device(dev) => b.path == *dev,
            })
            .cloned())
    }

    async fn copy_in_pool(
        &self,
        pool: &str,
        volume: &str,
        name: &str,
    ) -> Result<PoolCopy, LibvirtError> {
        let action = "copy a volume within its pool";
        self.enter(action, None)?;
        let mut st = self.state();
        let src = st
            .block
            .iter()
            .find(|b| b.pool == pool && b.volume == volume)
            .cloned()
            .ok_or_else(|| not_found(action))?;
        if st.block.iter().any(|b| b.pool == pool && b.volume == name) {
            return Err(LibvirtError::Fake {
                action: action.into(),
                kind: ErrorKind::Refused,
            });
        }
        let path = format!("/dev/fake/{name}");
        st.block.push(BlockVolume {
            volume: name.to_string(),
            path: path.clone(),
            ..src.clone()
        });
        Ok(PoolCopy {
            name: name.to_string(),
            path,
            capacity: src.capacity,
        })
    }

    async fn pool_volume_path(
        &self,
        pool: &str,
        name: &str,
    ) -> Result<Option<String>, LibvirtError> {
        self.enter("look up a copied volume", None)?;
        Ok(self
            .state()
            .block
            .iter()
            .find(|b| b.pool == pool && b.volume == name)
            .map(|b| b.path.clone()))
    }

    async fn lun(
        &self,
        pool: &str,
        volume: &str,
    ) -> Result<Result<IscsiLun, IscsiDirectError>, LibvirtError> {
        let action = "locate an iSCSI LUN";
        self.enter(action, None)?;
        let st = self.state();
        let b = st
            .block
            .iter()
            .find(|b| b.pool == pool && b.volume == volume)
            .ok_or_else(|| not_found(action))?;
        if b.pool_type != "iscsi-direct" {
            return Ok(Err(IscsiDirectError::NotIscsiDirect(b.pool_type.clone())));
        }
        Ok(Ok(IscsiLun {
            portal: "127.0.0.1:3260".into(),
            target: format!("iqn.fake:{pool}"),
            lun: 1,
            initiator: "iqn.fake:agent".into(),
        }))
    }
}
