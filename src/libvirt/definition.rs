//! Persistent-only device changes written as a new definition, for libvirt's in-process `test:`
//! driver only.
//!
//! The `test:///` driver (a node file of domains, pools and networks served from memory inside
//! the calling process, no QEMU) is what `benches/scale_nodes.rs` runs many agents against. It
//! defines domains (`virDomainDefineXML`), but `virDomainAttachDeviceFlags` refuses
//! `VIR_DOMAIN_AFFECT_CONFIG` ("unsupported flags (0x2)") and it has no
//! `virDomainDetachDeviceFlags` at all. For such a connection, adding a device to or removing a
//! device (found by its `<alias>`) from the persistent definition is done the way an editor does
//! it: read the secure inactive XML, change `<devices>`, define it again. Every other change, and
//! every change on any other URI, goes to libvirt's own call unchanged, so the QEMU path is the
//! same as before and a change this module cannot express gets libvirt's own answer.

use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

use super::facade::{Affect, DeviceChange};

/// Whether `uri` names libvirt's in-process test driver (`test:///default`, `test:///path.xml`).
pub fn is_test_driver(uri: &str) -> bool {
    uri.starts_with("test:")
}

/// `domain_xml` with `device_xml` appended to `<devices>`; `None` when either does not parse or
/// the definition has no `<devices>…</devices>` to append to.
pub fn with_device(domain_xml: &str, device_xml: &str) -> Option<String> {
    roxmltree::Document::parse(device_xml).ok()?;
    let doc = roxmltree::Document::parse(domain_xml).ok()?;
    let devices = doc
        .root_element()
        .children()
        .find(|c| c.has_tag_name("devices"))?;
    let end = devices.range().end;
    let close = "</devices>";
    let at = end.checked_sub(close.len())?;
    if domain_xml.get(at..end) != Some(close) {
        return None;
    }
    let mut xml = domain_xml.to_string();
    xml.insert_str(at, device_xml);
    Some(xml)
}

/// The `<alias name>` of a device's XML.
fn alias_of(device_xml: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(device_xml).ok()?;
    let alias = doc
        .root_element()
        .children()
        .find(|c| c.has_tag_name("alias"))?
        .attribute("name")?
        .to_string();
    Some(alias)
}

/// The definition of `dom` after `change` of `device_xml`, when this module can write it: a
/// persistent-only attach, or a persistent-only detach of a device with an alias. `Ok(None)`: not
/// expressible here (the caller makes libvirt's own call). A detach of a device the definition
/// does not hold leaves it as it is, like libvirt's "already gone".
pub(super) fn edited(
    dom: &Domain,
    device_xml: &str,
    change: DeviceChange,
    affect: Affect,
) -> Result<Option<String>, virt::error::Error> {
    if affect != Affect::Config {
        return Ok(None);
    }
    let current = || dom.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE);
    match change {
        DeviceChange::Attach => Ok(with_device(&current()?, device_xml)),
        DeviceChange::Detach => {
            let Some(alias) = alias_of(device_xml) else {
                return Ok(None);
            };
            let current = current()?;
            Ok(match super::batch::without_devices(&current, &[alias]) {
                Ok(Some((xml, _))) => Some(xml),
                Ok(None) => Some(current),
                Err(_) => None,
            })
        }
        DeviceChange::Update => Ok(None),
    }
}

/// Makes `change` in the definition of `dom` on a test-driver connection; `Ok(false)` when the
/// change is not one this module writes.
pub(super) fn change(
    conn: &Connect,
    dom: &Domain,
    device_xml: &str,
    change: DeviceChange,
    affect: Affect,
) -> Result<bool, virt::error::Error> {
    match edited(dom, device_xml, change, affect)? {
        Some(xml) => conn.define_domain_xml(&xml).map(|_| true),
        None => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = "<domain type='test'><name>vm</name><devices>\
        <controller type='scsi' index='0' model='virtio-scsi'/></devices></domain>";
    const DISK: &str = "<disk type='file' device='disk'><source file='/a.img'/>\
        <target dev='sda' bus='scsi'/><alias name='ua-vps-a'/></disk>";

    #[test]
    fn only_test_uris_edit_definitions() {
        assert!(is_test_driver("test:///default"));
        assert!(is_test_driver("test:///var/tmp/node.xml"));
        assert!(!is_test_driver("qemu:///system"));
        assert!(!is_test_driver("qemu+ssh://host/system"));
    }

    #[test]
    fn appends_the_device_to_devices() {
        let xml = with_device(DOMAIN, DISK).unwrap();
        let parsed = crate::libvirt::domain::parse_domain(&xml).unwrap();
        assert!(parsed.disk("ua-vps-a").is_some(), "{xml}");
        assert!(xml.contains("model='virtio-scsi'/>"), "{xml}");
        // Removing it again gives the definition back.
        let (back, found) = crate::libvirt::batch::without_devices(&xml, &["ua-vps-a".into()])
            .unwrap()
            .unwrap();
        assert_eq!(back, DOMAIN);
        assert_eq!(found, vec!["ua-vps-a".to_string()]);
    }

    #[test]
    fn what_cannot_be_edited_is_left_to_libvirt() {
        assert_eq!(with_device(DOMAIN, "<disk"), None);
        assert_eq!(with_device("<domain", DISK), None);
        assert_eq!(
            with_device(
                "<domain type='test'><name>vm</name><devices/></domain>",
                DISK
            ),
            None
        );
        assert_eq!(with_device("<domain><name>vm</name></domain>", DISK), None);
        assert_eq!(alias_of(DISK).as_deref(), Some("ua-vps-a"));
        assert_eq!(alias_of("<controller type='scsi'/>"), None);
    }
}
