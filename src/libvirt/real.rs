//! The facade's traits implemented against libvirtd.

use virt::sys;

use super::definition;
use super::domain::{self, DomainView};
use super::facade::{Affect, DeviceChange, Domains, Storage, VolumeLookup};
use super::{Libvirt, LibvirtError, volume};
use crate::api::StoragePoolSummary;

/// libvirt's flags for where a change applies.
pub(super) fn affect_flags(affect: Affect) -> u32 {
    domain::affect(affect.live(), affect.config())
}

impl Domains for Libvirt {
    async fn domain(&self, name: &str) -> Result<Option<DomainView>, LibvirtError> {
        let name = name.to_string();
        self.call("read the domain", move |c| domain::read_domain(c, &name))
            .await
    }

    async fn domain_names(&self) -> Result<Vec<String>, LibvirtError> {
        self.call("list domains", |c| {
            Ok(c.list_all_domains(0)?
                .iter()
                .filter_map(|d| d.name().ok())
                .collect())
        })
        .await
    }

    async fn change_device(
        &self,
        vm: &str,
        xml: &str,
        change: DeviceChange,
        affect: Affect,
    ) -> Result<(), LibvirtError> {
        let (name, xml) = (vm.to_string(), xml.to_string());
        let test_driver = definition::is_test_driver(self.uri());
        self.call(change.action(affect), move |c| {
            let dom = c.lookup_domain_by_name(&name)?;
            // libvirt's test driver cannot change a definition device by device (see definition.rs).
            if test_driver && definition::change(c, &dom, &xml, change, affect)? {
                return Ok(());
            }
            let flags = affect_flags(affect);
            match change {
                DeviceChange::Attach => dom.attach_device_flags(&xml, flags),
                DeviceChange::Update => {
                    dom.update_device_flags(&xml, flags | sys::VIR_DOMAIN_DEVICE_MODIFY_FORCE)
                }
                DeviceChange::Detach => dom.detach_device_flags(&xml, flags),
            }
        })
        .await
    }
}

impl Storage for Libvirt {
    async fn storage_pools(&self) -> Result<Vec<StoragePoolSummary>, LibvirtError> {
        self.call("list storage pools", super::collect_storage_pools)
            .await
    }

    async fn volume(&self, pool: &str, vol: &str) -> Result<VolumeLookup, LibvirtError> {
        let (pool, vol) = (pool.to_string(), vol.to_string());
        let found = self
            .call(
                "look up a storage volume",
                move |c| match volume::resolve_volume(c, &pool, &vol) {
                    Ok(v) => Ok(Ok(v)),
                    Err(e) => Ok(Err(e)),
                },
            )
            .await?;
        match found {
            Ok(v) => Ok(VolumeLookup::Found(v)),
            Err(source) => {
                let err = LibvirtError::Call {
                    action: "look up a storage volume".into(),
                    source,
                };
                match err.code() {
                    Some(virt::error::ErrorNumber::NoStoragePool) => Ok(VolumeLookup::NoPool),
                    Some(virt::error::ErrorNumber::NoStorageVolume) => Ok(VolumeLookup::NoVolume),
                    Some(virt::error::ErrorNumber::OperationInvalid) => {
                        Ok(VolumeLookup::PoolInactive)
                    }
                    _ => Err(err),
                }
            }
        }
    }

    async fn refresh_pool(&self, pool: &str) -> Result<(), LibvirtError> {
        let pool = pool.to_string();
        self.call("refresh a storage pool", move |c| {
            c.lookup_storage_pool_by_name(&pool)?.refresh(0).map(|_| ())
        })
        .await
    }

    async fn delete_volume(&self, pool: &str, vol: &str) -> Result<(), LibvirtError> {
        let (pool, vol) = (pool.to_string(), vol.to_string());
        let result = self
            .call("delete a storage volume", move |c| {
                let p = c.lookup_storage_pool_by_name(&pool)?;
                let _ = p.refresh(0);
                p.lookup_storage_vol_by_name(&vol)?.delete(0)
            })
            .await;
        match result {
            Err(e) if e.is_not_found() => Ok(()),
            other => other,
        }
    }
}

impl Libvirt {
    /// The node's inventory: versions, domains, storage pools and networks.
    pub async fn inventory(&self) -> Result<super::Inventory, LibvirtError> {
        self.call("read the inventory", super::collect_inventory)
            .await
    }
}
