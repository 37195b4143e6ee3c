//! The definition of a clone: the source's XML with everything that makes a machine distinct
//! replaced. Pure text edits on libvirt's XML, so everything else is kept exactly.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use super::domain::escape_attr;

/// XML namespace of the metadata virtplane writes into clones.
pub const CLONE_NS: &str = "https://virtplane.io/xmlns/clone/v1";

/// What changes between a source and its clone.
#[derive(Clone, Debug, Default)]
pub struct CloneEdits {
    /// Name of the clone.
    pub name: String,
    /// UID of the VMClone object, written into the clone's metadata.
    pub task_uid: String,
    /// Namespace of the VMClone object, written into the clone's metadata.
    pub namespace: String,
    /// New source path of each copied disk, by the original's path.
    pub disk_paths: HashMap<String, String>,
    /// New `(pool, volume)` of each copied `type='volume'` disk, by the original's.
    pub volumes: HashMap<(String, String), (String, String)>,
    /// New file of each `type='block'` disk copied into a file, by the device's path: the disk
    /// becomes `type='file'`.
    pub block_to_file: HashMap<String, String>,
    /// New file of each `type='volume'` disk copied into a file, by `(pool, volume)`: the disk
    /// becomes `type='file'`.
    pub volume_to_file: HashMap<(String, String), String>,
    /// New MAC address of each interface, in document order.
    pub macs: Vec<String>,
    /// New path of the UEFI variable store, if the source has one.
    pub nvram: Option<String>,
    /// Disks whose copy merged the backing chain (`type='file'` by the original's path,
    /// `type='volume'` by its `(pool, volume)`): their `<backingStore>` becomes empty, which
    /// tells libvirt the image has none.
    pub flattened: HashSet<DiskKey>,
}

/// A source disk as its `<source>` names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DiskKey {
    /// `type='file'`: its path.
    File(String),
    /// `type='volume'`: its pool and volume.
    Volume(String, String),
}

/// Whether the copy of `disk` (a `<disk>` element) merged its chain.
fn flattened(disk: roxmltree::Node<'_, '_>, e: &CloneEdits) -> bool {
    let Some(source) = disk.children().find(|c| c.has_tag_name("source")) else {
        return false;
    };
    let key = match (
        source.attribute("file"),
        source.attribute("pool"),
        source.attribute("volume"),
    ) {
        (Some(f), _, _) => DiskKey::File(f.to_string()),
        (None, Some(p), Some(v)) => DiskKey::Volume(p.to_string(), v.to_string()),
        _ => return false,
    };
    e.flattened.contains(&key)
}

/// Paths of files the domain writes per guest (serial logs, `<log file>`), which the clone must
/// not share: each gets the clone's name as a prefix of its file name.
pub fn per_guest_path(path: &str, clone: &str) -> String {
    match path.rsplit_once('/') {
        Some((dir, file)) => format!("{dir}/{clone}-{file}"),
        None => format!("{clone}-{path}"),
    }
}

/// Writes the clone's XML.
pub fn clone_xml(source: &str, e: &CloneEdits) -> Result<String, roxmltree::Error> {
    let doc = roxmltree::Document::parse(source)?;
    let root = doc.root_element();
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    let text_range =
        |n: roxmltree::Node<'_, '_>| n.first_child().filter(|c| c.is_text()).map(|c| c.range());
    let attr_range = |n: roxmltree::Node<'_, '_>, name: &str| {
        n.attributes()
            .find(|a| a.name() == name)
            .map(|a| a.range_value())
    };

    let mut metadata_done = false;
    let mut mac_index = 0;
    for node in root.descendants().filter(roxmltree::Node::is_element) {
        let parent = node
            .parent_element()
            .map(|p| p.tag_name().name())
            .unwrap_or_default();
        match (parent, node.tag_name().name()) {
            ("domain", "name") => {
                if let Some(r) = text_range(node) {
                    edits.push((r, escape_attr(&e.name)));
                }
                if root.children().all(|c| !c.has_tag_name("metadata")) {
                    let end = node.range().end;
                    edits.push((end..end, metadata(e)));
                    metadata_done = true;
                }
            }
            // libvirt generates a new UUID when none is given.
            ("domain", "uuid") => edits.push((node.range(), String::new())),
            // An empty <genid/> makes libvirt generate a new VM generation ID.
            ("domain", "genid") => edits.push((node.range(), "<genid/>".into())),
            ("domain", "metadata") if !metadata_done => {
                let end = node.range().end - "</metadata>".len();
                if node.has_children() {
                    edits.push((end..end, inner_metadata(e)));
                } else {
                    edits.push((node.range(), metadata(e)));
                }
                metadata_done = true;
            }
            // SMBIOS serial numbers and UUIDs identify one machine: the clone gets none.
            ("system" | "baseBoard" | "chassis", "entry") if identifies_machine(node) => {
                edits.push((node.range(), String::new()));
            }
            ("os", "nvram") => {
                if let (Some(path), Some(r)) = (&e.nvram, text_range(node)) {
                    edits.push((r, escape_attr(path)));
                }
            }
            ("interface", "mac") => {
                if let (Some(mac), Some(r)) = (e.macs.get(mac_index), attr_range(node, "address")) {
                    edits.push((r, mac.clone()));
                }
                mac_index += 1;
            }
            ("disk", "source") if to_file(node, e).is_some() => {
                if let Some((new, attr)) = to_file(node, e)
                    && let Some(disk) = node.parent_element()
                    && let Some(kind) = attr_range(disk, "type")
                {
                    edits.push((kind, "file".into()));
                    let mut first = true;
                    for a in node.attributes() {
                        if [attr, "pool", "volume", "mode"].contains(&a.name()) {
                            let text = if first {
                                format!("file='{}'", escape_attr(new))
                            } else {
                                String::new()
                            };
                            first = false;
                            edits.push((a.range(), text));
                        }
                    }
                }
            }
            ("disk", "source") => {
                for attr in ["file", "dev"] {
                    if let Some(a) = node.attributes().find(|a| a.name() == attr)
                        && let Some(new) = e.disk_paths.get(a.value())
                    {
                        edits.push((a.range_value(), escape_attr(new)));
                    }
                }
                if let (Some(pool), Some(volume)) =
                    (attr_range(node, "pool"), attr_range(node, "volume"))
                    && let (Some(p), Some(v)) = (node.attribute("pool"), node.attribute("volume"))
                    && let Some((new_pool, new_volume)) =
                        e.volumes.get(&(p.to_string(), v.to_string()))
                {
                    edits.push((pool, escape_attr(new_pool)));
                    edits.push((volume, escape_attr(new_volume)));
                }
            }
            ("disk", "backingStore") if node.parent_element().is_some_and(|d| flattened(d, e)) => {
                edits.push((node.range(), "<backingStore/>".into()));
            }
            ("serial" | "console" | "parallel", "source") | ("serial" | "console", "log") => {
                let attr = if node.has_tag_name("log") {
                    "file"
                } else {
                    "path"
                };
                let is_file = node.parent_element().is_some_and(|p| {
                    p.attribute("type") == Some("file") || node.has_tag_name("log")
                });
                if is_file && let Some(a) = node.attributes().find(|a| a.name() == attr) {
                    edits.push((
                        a.range_value(),
                        escape_attr(&per_guest_path(a.value(), &e.name)),
                    ));
                }
            }
            // A unix channel's socket (the guest agent's): let libvirt choose a path of its own.
            ("channel", "source")
                if node.parent_element().and_then(|p| p.attribute("type")) == Some("unix") =>
            {
                if let Some(a) = node.attributes().find(|a| a.name() == "path") {
                    edits.push((a.range(), String::new()));
                }
            }
            ("devices", "graphics") => {
                for attr in ["port", "tlsPort", "websocket"] {
                    if let Some(a) = node.attributes().find(|a| a.name() == attr) {
                        edits.push((a.range(), String::new()));
                    }
                }
                if let Some(r) = attr_range(node, "autoport") {
                    edits.push((r, "yes".into()));
                }
            }
            _ => {}
        }
    }
    // From the end backwards, so earlier ranges stay valid. At one position a replacement goes
    // before an insertion (the metadata after `</name>` when `<uuid>` follows without space).
    edits.sort_by_key(|e| (std::cmp::Reverse(e.0.start), std::cmp::Reverse(e.0.end)));
    let mut out = source.to_string();
    for (range, text) in edits {
        out.replace_range(range, &text);
    }
    Ok(out)
}

/// The file a block or volume disk's `<source>` becomes, with the attribute naming the device
/// (`dev`, or `pool` for a volume).
fn to_file<'e>(
    source: roxmltree::Node<'_, '_>,
    e: &'e CloneEdits,
) -> Option<(&'e String, &'static str)> {
    if let Some(dev) = source.attribute("dev")
        && let Some(new) = e.block_to_file.get(dev)
    {
        return Some((new, "dev"));
    }
    let key = (
        source.attribute("pool")?.to_string(),
        source.attribute("volume")?.to_string(),
    );
    e.volume_to_file.get(&key).map(|new| (new, "pool"))
}

/// Whether an SMBIOS `<entry>` names one machine: a serial number, a UUID, or any value that is
/// a UUID (asset tags and SKUs are sometimes set to the machine's UUID).
fn identifies_machine(entry: roxmltree::Node<'_, '_>) -> bool {
    matches!(entry.attribute("name"), Some("serial" | "uuid"))
        || entry.text().is_some_and(|t| is_uuid(t.trim()))
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` or the same 32 hex digits without dashes.
fn is_uuid(s: &str) -> bool {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    let dashes_ok = s.len() == 32
        || (s.len() == 36 && [8, 13, 18, 23].iter().all(|&i| s.as_bytes()[i] == b'-'));
    dashes_ok && hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit())
}

fn inner_metadata(e: &CloneEdits) -> String {
    format!(
        "<vp:clone xmlns:vp='{CLONE_NS}' namespace='{}' task='{}'/>",
        escape_attr(&e.namespace),
        escape_attr(&e.task_uid)
    )
}

fn metadata(e: &CloneEdits) -> String {
    format!("<metadata>{}</metadata>", inner_metadata(e))
}

/// The UID of the VMClone task that made this domain, from its metadata.
pub fn clone_task_of(xml: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    doc.descendants()
        .find(|n| n.tag_name().namespace() == Some(CLONE_NS) && n.tag_name().name() == "clone")
        .and_then(|n| n.attribute("task"))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "<domain type='qemu'>\n  <name>web</name>\n  <uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca427</uuid>\n\
        <sysinfo type='smbios'><system><entry name='manufacturer'>ACME</entry><entry name='uuid'>1b4e28ba-2fa1-11d2-883f-0016d3cca427</entry><entry name='serial'>S1</entry></system></sysinfo>\n\
        <os><type>hvm</type><nvram>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram></os>\n\
        <devices><disk type='file' device='disk'><source file='/pool/web.qcow2'/><target dev='vda'/></disk>\
        <disk type='file' device='cdrom'><source file='/iso/d.iso'/><target dev='sda'/><readonly/></disk>\
        <interface type='network'><mac address='52:54:00:00:00:01'/><source network='default'/></interface>\
        <interface type='user'><mac address='52:54:00:00:00:02'/></interface>\
        <serial type='file'><source path='/var/log/web-serial.log'/></serial>\
        <channel type='unix'><source mode='bind' path='/run/libvirt/qemu/channel/1-web/org.qemu.guest_agent.0'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
        <graphics type='vnc' port='5901' autoport='no'/></devices></domain>";

    #[test]
    fn rewrites_identity_disks_macs_and_per_guest_paths() {
        let edits = CloneEdits {
            name: "web-clone1".into(),
            task_uid: "u-1".into(),
            namespace: "ta".into(),
            disk_paths: HashMap::from([(
                "/pool/web.qcow2".into(),
                "/pool/web-clone1.qcow2".into(),
            )]),
            macs: vec!["52:54:00:aa:00:01".into(), "52:54:00:aa:00:02".into()],
            nvram: Some("/var/lib/libvirt/qemu/nvram/web-clone1_VARS.fd".into()),
            ..Default::default()
        };
        let out = clone_xml(SRC, &edits).unwrap();
        let d = super::super::domain::parse_domain(&out).unwrap();
        assert!(out.contains("<name>web-clone1</name>"));
        assert!(
            !out.contains("<uuid>") && !out.contains("'uuid'") && !out.contains("S1"),
            "{out}"
        );
        assert!(out.contains("ACME"));
        assert_eq!(d.disks[0].source.as_deref(), Some("/pool/web-clone1.qcow2"));
        assert_eq!(
            d.disks[1].source.as_deref(),
            Some("/iso/d.iso"),
            "media are shared"
        );
        assert_eq!(d.interfaces[0].mac.as_deref(), Some("52:54:00:aa:00:01"));
        assert_eq!(d.interfaces[1].mac.as_deref(), Some("52:54:00:aa:00:02"));
        assert!(out.contains("/var/log/web-clone1-web-serial.log"));
        assert!(
            !out.contains("channel/1-web"),
            "the agent socket path is left to libvirt"
        );
        assert!(out.contains("web-clone1_VARS.fd"));
        assert!(!out.contains("5901") && out.contains("autoport='yes'"));
        assert_eq!(clone_task_of(&out).as_deref(), Some("u-1"));
        assert!(
            out.contains("namespace='ta' task='u-1'"),
            "the metadata records the namespace: {out}"
        );
        assert_eq!(clone_task_of(SRC), None);
    }

    #[test]
    fn clears_every_smbios_identity_and_regenerates_the_genid() {
        let src = "<domain type='qemu'><name>w</name><uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca427</uuid>\
            <genid>43dc0cf8-809b-4adb-9bea-a9abb5f3d90e</genid>\
            <sysinfo type='smbios'><bios><entry name='vendor'>BIOSCO</entry></bios>\
            <system><entry name='manufacturer'>ACME</entry><entry name='serial'>SYS-1</entry></system>\
            <baseBoard><entry name='product'>BRD</entry><entry name='serial'>BB-1</entry>\
            <entry name='asset'>1B4E28BA2FA111D2883F0016D3CCA427</entry></baseBoard>\
            <chassis><entry name='manufacturer'>CHS</entry><entry name='serial'>CH-1</entry>\
            <entry name='sku'>1b4e28ba-2fa1-11d2-883f-0016d3cca427</entry></chassis>\
            <oemStrings><entry>keep me</entry></oemStrings></sysinfo>\
            <devices/></domain>";
        let out = clone_xml(src, &CloneEdits::default()).unwrap();
        for gone in ["SYS-1", "BB-1", "CH-1", "1B4E28BA", "1b4e28ba", "43dc0cf8"] {
            assert!(!out.contains(gone), "{gone} left in {out}");
        }
        for kept in ["BIOSCO", "ACME", "BRD", "CHS", "keep me"] {
            assert!(out.contains(kept), "{kept} missing from {out}");
        }
        assert!(out.contains("<genid/>"), "{out}");
        roxmltree::Document::parse(&out).unwrap();

        let no_genid = clone_xml(
            "<domain><name>w</name><devices/></domain>",
            &CloneEdits::default(),
        )
        .unwrap();
        assert!(!no_genid.contains("genid"), "{no_genid}");
    }

    #[test]
    fn rewrites_volume_disks_to_their_copies() {
        let src = "<domain><name>w</name><devices>\
            <disk type='volume' device='disk'><source pool='p1' volume='root.img'/><target dev='vda'/></disk>\
            <disk type='volume' device='cdrom'><source pool='p1' volume='media.iso'/><target dev='sda'/><readonly/></disk>\
            </devices></domain>";
        let edits = CloneEdits {
            volumes: HashMap::from([(
                ("p1".into(), "root.img".into()),
                ("fallback".into(), "root-clone1.img".into()),
            )]),
            ..Default::default()
        };
        let d = super::super::domain::parse_domain(&clone_xml(src, &edits).unwrap()).unwrap();
        assert_eq!(
            (d.disks[0].pool.as_deref(), d.disks[0].volume.as_deref()),
            (Some("fallback"), Some("root-clone1.img"))
        );
        assert_eq!(
            (d.disks[1].pool.as_deref(), d.disks[1].volume.as_deref()),
            (Some("p1"), Some("media.iso")),
            "media are shared"
        );
    }

    #[test]
    fn block_and_volume_disks_copied_into_files_become_file_disks() {
        let src = "<domain><name>w</name><devices>\
            <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/loop7p1'/><target dev='vda'/></disk>\
            <disk type='volume' device='disk'><source pool='iscsi' volume='unit:0:0:1' mode='host'/><target dev='vdb'/></disk>\
            <disk type='block' device='disk'><source dev='/dev/loop7p2'/><target dev='vdc'/></disk>\
            <disk type='block' device='cdrom'><source dev='/dev/sr0'/><target dev='sda'/><readonly/></disk>\
            </devices></domain>";
        let edits = CloneEdits {
            block_to_file: HashMap::from([(
                "/dev/loop7p1".into(),
                "/img/loop7p1-clone1.img".into(),
            )]),
            volume_to_file: HashMap::from([(
                ("iscsi".into(), "unit:0:0:1".into()),
                "/img/unit-0-0-1-clone1.img".into(),
            )]),
            disk_paths: HashMap::from([("/dev/loop7p2".into(), "/dev/loop7p3".into())]),
            ..Default::default()
        };
        let out = clone_xml(src, &edits).unwrap();
        let d = super::super::domain::parse_domain(&out).unwrap();
        let got: Vec<_> = d
            .disks
            .iter()
            .map(|d| (d.kind.as_str(), d.source.as_deref(), d.pool.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("file", Some("/img/loop7p1-clone1.img"), None),
                ("file", Some("/img/unit-0-0-1-clone1.img"), None),
                ("block", Some("/dev/loop7p3"), None),
                ("block", Some("/dev/sr0"), None),
            ],
            "{out}"
        );
        assert!(!out.contains("mode="), "{out}");
    }

    #[test]
    fn a_flattened_disk_loses_its_backing_chain_and_a_shared_one_keeps_it() {
        let chain = "<backingStore type='file'><format type='qcow2'/><source file='/gold/base.qcow2'/><backingStore/></backingStore>";
        let src = format!(
            "<domain><name>web</name><devices>\
             <disk type='file' device='disk'><driver type='qcow2'/><source file='/p/a.qcow2'/>{chain}<target dev='vda'/></disk>\
             <disk type='file' device='disk'><driver type='qcow2'/><source file='/p/b.qcow2'/>{chain}<target dev='vdb'/></disk>\
             <disk type='volume' device='disk'><driver type='qcow2'/><source pool='p' volume='c.qcow2'/>{chain}<target dev='vdc'/></disk>\
             </devices></domain>"
        );
        let edits = CloneEdits {
            name: "web-clone1".into(),
            disk_paths: HashMap::from([
                ("/p/a.qcow2".into(), "/p/a-clone1.qcow2".into()),
                ("/p/b.qcow2".into(), "/p/b-clone1.qcow2".into()),
            ]),
            flattened: HashSet::from([
                DiskKey::File("/p/a.qcow2".into()),
                DiskKey::Volume("p".into(), "c.qcow2".into()),
            ]),
            ..Default::default()
        };
        let out = clone_xml(&src, &edits).unwrap();
        let doc = roxmltree::Document::parse(&out).unwrap();
        let disks: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("disk"))
            .collect();
        let backing = |d: &roxmltree::Node<'_, '_>| {
            d.descendants()
                .filter(|n| n.has_tag_name("backingStore"))
                .map(|b| b.has_children())
                .collect::<Vec<_>>()
        };
        assert_eq!(backing(&disks[0]), [false], "flattened: one empty element");
        assert_eq!(backing(&disks[1]), [true, false], "shared: the chain kept");
        assert_eq!(backing(&disks[2]), [false], "a flattened volume disk too");
        assert!(out.contains("/p/a-clone1.qcow2") && out.contains("/gold/base.qcow2"));
    }

    #[test]
    fn recognises_uuids() {
        assert!(is_uuid("1b4e28ba-2fa1-11d2-883f-0016d3cca427"));
        assert!(is_uuid("1B4E28BA2FA111D2883F0016D3CCA427"));
        assert!(!is_uuid("1b4e28ba-2fa1-11d2-883f-0016d3cca42"));
        assert!(!is_uuid("S1"));
        assert!(!is_uuid("1b4e28ba2fa1-11d2-883f-0016d3cca4277"));
    }
}
