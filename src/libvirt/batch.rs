//! Several devices removed from a shut-off domain's definition in one write. libvirt rewrites
//! (and syncs to disk) the whole definition for every persistent detach, so the detaches of a
//! domain's objects deleted together are gathered into one new definition: a hundred writes for
//! a thousand devices on a hundred domains instead of a thousand.

use virt::sys;

use super::{Libvirt, LibvirtError};

const ACTION: &str = "remove devices from the definition";

/// `domain_xml` without the devices (direct children of `<devices>`) whose `<alias name>` is in
/// `aliases`, and the aliases found; `None` when none is there.
pub fn without_devices(
    domain_xml: &str,
    aliases: &[String],
) -> Result<Option<(String, Vec<String>)>, roxmltree::Error> {
    let doc = roxmltree::Document::parse(domain_xml)?;
    let mut cuts = Vec::new();
    let mut found = Vec::new();
    let devices = doc
        .root_element()
        .children()
        .filter(|c| c.has_tag_name("devices"));
    for device in devices.flat_map(|d| d.children().filter(roxmltree::Node::is_element)) {
        let alias = device
            .children()
            .find(|c| c.has_tag_name("alias"))
            .and_then(|a| a.attribute("name"));
        if let Some(alias) = alias.filter(|a| aliases.iter().any(|x| x == a)) {
            cuts.push(device.range());
            found.push(alias.to_string());
        }
    }
    if cuts.is_empty() {
        return Ok(None);
    }
    let mut xml = domain_xml.to_string();
    // Back to front, so the earlier ranges stay valid.
    for range in cuts.into_iter().rev() {
        xml.replace_range(range, "");
    }
    Ok(Some((xml, found)))
}

impl Libvirt {
    /// Removes the devices with `aliases` from the definition of `vm` in one write, if `vm` is
    /// defined, shut off and has no managed save (whose restore expects the old devices).
    /// Returns the aliases removed, which are then gone from `vm` altogether: none when `vm` does
    /// not qualify, or was started while the new definition was written (its running guest may
    /// still hold them), so the caller's per-device path does the work (and reports its errors).
    pub async fn detach_from_shut_off(
        &self,
        vm: &str,
        aliases: Vec<String>,
    ) -> Result<Vec<String>, LibvirtError> {
        let name = vm.to_string();
        let current = self
            .call(ACTION, move |c| {
                let dom = c.lookup_domain_by_name(&name)?;
                if dom.is_active()? || !dom.is_persistent()? || dom.has_managed_save(0)? {
                    return Ok(None);
                }
                dom.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE)
                    .map(Some)
            })
            .await?;
        let Some(current) = current else {
            return Ok(Vec::new());
        };
        let Some((next, removed)) =
            without_devices(&current, &aliases).map_err(|source| LibvirtError::Xml {
                action: ACTION.into(),
                source,
            })?
        else {
            return Ok(Vec::new());
        };
        let started = self
            .call(ACTION, move |c| c.define_domain_xml(&next)?.is_active())
            .await?;
        Ok(if started { Vec::new() } else { removed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domain type='kvm'><name>vm</name><devices>\
        <emulator>/usr/bin/qemu</emulator>\
        <disk type='file' device='disk'><source file='/a.img'/><target dev='sda' bus='scsi'/><alias name='ua-vps-a'/></disk>\
        <disk type='file' device='disk'><source file='/b.img'/><target dev='sdb' bus='scsi'/><alias name='ua-vps-b'/></disk>\
        <interface type='network'><source network='default'/><alias name='ua-vmi-c'/></interface>\
        </devices><metadata><alias name='ua-vps-a'/></metadata></domain>";

    fn aliases(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn removes_only_the_named_devices_of_the_definition() {
        let (xml, found) = without_devices(XML, &aliases(&["ua-vps-a", "ua-vmi-c", "ua-x"]))
            .unwrap()
            .unwrap();
        assert_eq!(found, aliases(&["ua-vps-a", "ua-vmi-c"]));
        let parsed = crate::libvirt::domain::parse_domain(&xml).unwrap();
        assert!(parsed.disk("ua-vps-a").is_none(), "{xml}");
        assert!(parsed.disk("ua-vps-b").is_some(), "{xml}");
        assert!(parsed.interfaces.is_empty(), "{xml}");
        assert!(xml.contains("<emulator>"), "{xml}");
        // An alias outside <devices> is no device.
        assert!(
            xml.contains("<metadata><alias name='ua-vps-a'/></metadata>"),
            "{xml}"
        );
    }

    #[test]
    fn nothing_to_remove_is_no_new_definition() {
        assert_eq!(without_devices(XML, &aliases(&["ua-x"])).unwrap(), None);
        assert_eq!(without_devices(XML, &[]).unwrap(), None);
        assert!(without_devices("<domain", &aliases(&["a"])).is_err());
    }
}
