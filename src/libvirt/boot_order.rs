//! Boot order: libvirt refuses per-device `<boot order>` next to the `<os><boot dev=.../>` list
//! it writes into every domain defined without per-device orders. Like virt-manager, the list is
//! turned into per-device orders on the definition: each `dev` in turn gives its devices (`hd`
//! the disks, `cdrom` the CD-ROMs, `fd` the floppies, `network` the interfaces) the next order,
//! skipping the order a new device asks for, so the existing devices keep their relative order.

use super::tuning::RewriteError;

/// A definition with its boot list converted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Converted {
    /// The domain XML with per-device boot orders and no `<os><boot dev>`.
    pub xml: String,
    /// What was converted, for an Event: `hd -> sda=2, vda=3; network -> ...`.
    pub summary: String,
}

/// Converts `domain_xml`'s `<os><boot dev=.../>` list into per-device boot orders, leaving
/// `reserved` free (and the device with alias `skip` alone: it carries its own). `None` when the
/// domain has no such list.
pub fn convert(
    domain_xml: &str,
    skip: &str,
    reserved: u32,
) -> Result<Option<Converted>, RewriteError> {
    let doc = roxmltree::Document::parse(domain_xml)?;
    let root = doc.root_element();
    let Some(os) = root.children().find(|c| c.has_tag_name("os")) else {
        return Ok(None);
    };
    let boots: Vec<_> = os
        .children()
        .filter(|c| c.has_tag_name("boot") && c.attribute("dev").is_some())
        .collect();
    if boots.is_empty() {
        return Ok(None);
    }
    let devices: Vec<_> = root
        .children()
        .find(|c| c.has_tag_name("devices"))
        .map(|d| d.children().filter(roxmltree::Node::is_element).collect())
        .unwrap_or_default();
    let name_of = |d: &roxmltree::Node<'_, '_>| {
        let target = d.children().find(|c| c.has_tag_name("target"));
        let mac = d.children().find(|c| c.has_tag_name("mac"));
        target
            .and_then(|t| t.attribute("dev"))
            .or_else(|| mac.and_then(|m| m.attribute("address")))
            .unwrap_or("?")
            .to_string()
    };
    let is_skipped = |d: &roxmltree::Node<'_, '_>| {
        d.children()
            .any(|c| c.has_tag_name("alias") && c.attribute("name") == Some(skip))
    };
    // (insert position, text) edits, and the removal of each <boot dev>.
    let mut edits: Vec<(std::ops::Range<usize>, String)> =
        boots.iter().map(|b| (b.range(), String::new())).collect();
    let mut next = 1;
    let mut summary = Vec::new();
    for boot in &boots {
        let dev = boot.attribute("dev").unwrap_or_default();
        let mut given = Vec::new();
        for d in devices.iter().filter(|d| !is_skipped(d)) {
            let kind = d.attribute("device").unwrap_or("disk");
            let matches = match (d.tag_name().name(), dev) {
                ("disk", "hd") => kind == "disk" || kind == "lun",
                ("disk", "cdrom") => kind == "cdrom",
                ("disk", "fd") => kind == "floppy",
                ("interface", "network") => true,
                _ => false,
            };
            if !matches || d.children().any(|c| c.has_tag_name("boot")) {
                continue;
            }
            let close = format!("</{}>", d.tag_name().name());
            let text = &domain_xml[d.range()];
            if !text.ends_with(&close) {
                continue;
            }
            if next == reserved {
                next += 1;
            }
            let at = d.range().end - close.len();
            edits.push((at..at, format!("<boot order='{next}'/>")));
            given.push(format!("{}={next}", name_of(d)));
            next += 1;
        }
        summary.push(format!(
            "{dev} -> {}",
            if given.is_empty() {
                "no device".to_string()
            } else {
                given.join(", ")
            }
        ));
    }
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut xml = domain_xml.to_string();
    for (range, text) in edits {
        xml.replace_range(range, &text);
    }
    Ok(Some(Converted {
        xml,
        summary: summary.join("; "),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::domain::parse_domain;
    use crate::libvirt::tuning::disk_fields;

    const DOMAIN: &str = "<domain><name>d</name><os><type>hvm</type><boot dev='cdrom'/><boot dev='hd'/><boot dev='network'/></os>\
        <devices><disk type='file' device='disk'><target dev='vda'/></disk>\
        <disk type='file' device='cdrom'><target dev='sda'/><readonly/></disk>\
        <disk type='file' device='disk'><target dev='vdb'/><alias name='ua-vps-1'/></disk>\
        <disk type='file' device='disk'><target dev='vdc'/></disk>\
        <interface type='network'><mac address='52:54:00:00:00:01'/><source network='default'/></interface></devices></domain>";

    fn orders(xml: &str) -> Vec<(Option<String>, Option<u32>)> {
        parse_domain(xml)
            .unwrap()
            .disks
            .iter()
            .map(|d| (d.target.clone(), disk_fields(&d.xml).boot_order))
            .collect()
    }

    #[test]
    fn the_os_boot_list_becomes_per_device_orders_around_the_requested_one() {
        let c = convert(DOMAIN, "ua-vps-1", 1).unwrap().unwrap();
        assert!(!c.xml.contains("boot dev"), "{}", c.xml);
        // cdrom first, then the disks in their order, then the NIC; 1 is left for ua-vps-1.
        assert_eq!(
            orders(&c.xml),
            [
                (Some("vda".into()), Some(3)),
                (Some("sda".into()), Some(2)),
                (Some("vdb".into()), None),
                (Some("vdc".into()), Some(4)),
            ]
        );
        assert!(c.xml.contains("<boot order='5'/></interface>"), "{}", c.xml);
        assert_eq!(
            c.summary,
            "cdrom -> sda=2; hd -> vda=3, vdc=4; network -> 52:54:00:00:00:01=5"
        );
        // A reserved order in the middle is skipped.
        let c = convert(DOMAIN, "ua-vps-1", 3).unwrap().unwrap();
        assert_eq!(orders(&c.xml)[0], (Some("vda".into()), Some(2)));
        assert_eq!(orders(&c.xml)[3], (Some("vdc".into()), Some(4)));
    }

    #[test]
    fn a_domain_without_the_list_is_left_alone() {
        assert_eq!(
            convert(
                "<domain><os><type>hvm</type></os><devices/></domain>",
                "a",
                1
            )
            .unwrap(),
            None
        );
        assert!(convert("<domain", "a", 1).is_err());
    }
}
