//! The in-memory stand-in's volume creation and growth (a child of `fake`, so it shares its
//! state): a created volume is a file volume at `<pool path>/<name>` with its capacity; an
//! existing name is refused, as libvirt does.

use super::{FakeLibvirt, not_found};
use crate::libvirt::provision::{NewVolume, Provision};
use crate::libvirt::volume::VolumeSource;
use crate::libvirt::{ErrorKind, LibvirtError};

impl FakeLibvirt {
    /// The capacity of a volume created through [`Provision`].
    pub fn capacity_of(&self, pool: &str, name: &str) -> Option<u64> {
        self.state()
            .capacities
            .get(&(pool.to_string(), name.to_string()))
            .copied()
    }
}

impl Provision for FakeLibvirt {
    async fn create_volume(&self, pool: &str, v: &NewVolume) -> Result<(), LibvirtError> {
        let action = "create a storage volume";
        self.enter(action, None)?;
        let mut st = self.state();
        let key = (pool.to_string(), v.name.clone());
        if st.volumes.contains_key(&key) {
            return Err(LibvirtError::Fake {
                action: action.into(),
                kind: ErrorKind::Refused,
            });
        }
        let dir = st
            .pools
            .iter()
            .find(|p| p.name == pool)
            .and_then(|p| p.path.clone())
            .ok_or_else(|| not_found(action))?;
        st.volumes.insert(
            key.clone(),
            VolumeSource {
                path: format!("{dir}/{}", v.name),
                pool_type: "dir".into(),
                is_file: true,
            },
        );
        st.capacities.insert(key, v.capacity);
        Ok(())
    }

    async fn volume_capacity(&self, pool: &str, name: &str) -> Result<Option<u64>, LibvirtError> {
        self.enter("read a storage volume's capacity", None)?;
        let st = self.state();
        let key = (pool.to_string(), name.to_string());
        Ok(st
            .volumes
            .contains_key(&key)
            .then(|| st.capacities.get(&key).copied().unwrap_or(0)))
    }

    async fn resize_volume(&self, pool: &str, name: &str, bytes: u64) -> Result<(), LibvirtError> {
        let action = "resize a storage volume";
        self.enter(action, None)?;
        let mut st = self.state();
        let key = (pool.to_string(), name.to_string());
        if !st.volumes.contains_key(&key) {
            return Err(not_found(action));
        }
        st.capacities.insert(key, bytes);
        Ok(())
    }

    async fn block_resize(&self, vm: &str, target: &str, _bytes: u64) -> Result<(), LibvirtError> {
        let action = "resize a running guest's disk";
        self.enter(action, None)?;
        let st = self.state();
        let dom = st.domains.get(vm).ok_or_else(|| not_found(action))?;
        if !dom.active
            || !dom
                .live
                .disks
                .iter()
                .any(|d| d.target.as_deref() == Some(target))
        {
            return Err(not_found(action));
        }
        Ok(())
    }
}
