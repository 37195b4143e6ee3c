//! The in-memory stand-in's device tuning (a child of `fake`, so it shares its state).

use super::{FakeLibvirt, not_found};
use crate::libvirt::LibvirtError;
use crate::libvirt::domain::parse_domain;
use crate::libvirt::facade::Affect;

/// Tuning: I/O limits rewrite the `<iotune>` of the disk's XML on each side; a redefinition
/// replaces the definition's disk, or adds it.
impl crate::libvirt::tuning::Tuning for FakeLibvirt {
    async fn set_block_iotune(
        &self,
        vm: &str,
        target: &str,
        values: [u64; 12],
        affect: Affect,
    ) -> Result<(), LibvirtError> {
        let action = "set the disk's I/O limits";
        self.enter(action, Some(affect))?;
        let mut st = self.state();
        let dom = st.domains.get_mut(vm).ok_or_else(|| not_found(action))?;
        let mut sides = Vec::new();
        if affect.live() {
            sides.push(&mut dom.live);
        }
        if affect.config() {
            sides.push(&mut dom.config);
        }
        for side in sides {
            let disk = side
                .disks
                .iter_mut()
                .find(|d| d.target.as_deref() == Some(target))
                .ok_or_else(|| not_found(action))?;
            let doc =
                roxmltree::Document::parse(&disk.xml).map_err(|source| LibvirtError::Xml {
                    action: action.into(),
                    source,
                })?;
            let mut bare = disk.xml.clone();
            if let Some(t) = doc
                .root_element()
                .children()
                .find(|c| c.has_tag_name("iotune"))
            {
                bare.replace_range(t.range(), "");
            }
            disk.xml = crate::libvirt::tuning::with_extras(&bare, None, false, &values);
        }
        Ok(())
    }

    async fn redefine_device(
        &self,
        vm: &str,
        alias: &str,
        device_xml: &str,
    ) -> Result<Option<String>, LibvirtError> {
        let action = "write the device into the definition";
        self.enter(action, Some(Affect::Config))?;
        let device = parse_domain(&format!("<domain><devices>{device_xml}</devices></domain>"))
            .map_err(|source| LibvirtError::Xml {
                action: action.into(),
                source,
            })?;
        let mut st = self.state();
        let dom = st.domains.get_mut(vm).ok_or_else(|| not_found(action))?;
        // Like the real one: a boot order turns the `<os><boot dev>` list into per-device
        // orders in the same define (the stand-in's other devices keep theirs unchanged).
        let doc = roxmltree::Document::parse(device_xml).map_err(|source| LibvirtError::Xml {
            action: action.into(),
            source,
        })?;
        let booted = doc
            .root_element()
            .children()
            .any(|c| c.has_tag_name("boot"));
        let converted = (booted && !dom.config.os_boot.is_empty()).then(|| {
            let list = std::mem::take(&mut dom.config.os_boot);
            format!("{} -> no device", list.join(", "))
        });
        let config = &mut dom.config;
        if let Some(new) = device.disks.first() {
            match config
                .disks
                .iter_mut()
                .find(|d| d.alias.as_deref() == Some(alias))
            {
                Some(have) => *have = new.clone(),
                None => config.disks.push(new.clone()),
            }
        } else if let Some(new) = device.interfaces.first() {
            match config
                .interfaces
                .iter_mut()
                .find(|d| d.alias.as_deref() == Some(alias))
            {
                Some(have) => *have = new.clone(),
                None => config.interfaces.push(new.clone()),
            }
        }
        Ok(converted)
    }
}
