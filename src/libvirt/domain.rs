//! Typed views of a domain's XML, and the device XML the agent writes.

use std::fmt::Write as _;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

/// The parts of a domain definition the agent works with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DomainXml {
    /// Machine type, for example `pc-q35-10.0`.
    pub machine: String,
    /// Disks and CD-ROMs.
    pub disks: Vec<DiskXml>,
    /// Network interfaces.
    pub interfaces: Vec<NicXml>,
    /// Controllers (`type`, `model`).
    pub controllers: Vec<(String, Option<String>)>,
    /// Whether the domain has the QEMU guest agent channel.
    pub has_guest_agent: bool,
    /// Path of the UEFI variable store (`os/nvram`).
    pub nvram: Option<String>,
    /// The `dev` of each `<os><boot>` (a boot order libvirt refuses to mix with per-device ones).
    pub os_boot: Vec<String>,
}

/// A `<disk>` element.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskXml {
    /// `disk`, `cdrom`, `floppy`, `lun`.
    pub device: String,
    /// Bus of the target.
    pub bus: Option<String>,
    /// Target device name (`sda`).
    pub target: Option<String>,
    /// Alias (`ua-...` for user aliases).
    pub alias: Option<String>,
    /// Source file or block device path.
    pub source: Option<String>,
    /// Storage pool of a `type='volume'` disk (`source/@pool`).
    pub pool: Option<String>,
    /// Volume of a `type='volume'` disk in [`DiskXml::pool`] (`source/@volume`).
    pub volume: Option<String>,
    /// Source of a `type='network'` disk, as `protocol://host/name` (host when given).
    pub network: Option<String>,
    /// Disk type (`file`, `block`, `volume`, `network`).
    pub kind: String,
    /// Marked `<readonly/>`.
    pub readonly: bool,
    /// Marked `<shareable/>`.
    pub shareable: bool,
    /// The element as libvirt wrote it.
    pub xml: String,
}

/// An `<interface>` element.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NicXml {
    /// Interface type (`network`, `bridge`, `direct`, `user`).
    pub type_: String,
    /// MAC address, lower case.
    pub mac: Option<String>,
    /// Alias.
    pub alias: Option<String>,
    /// Network, bridge or device name.
    pub source: Option<String>,
    /// Model type.
    pub model: Option<String>,
    /// Link state (`up`/`down`); absent means up.
    pub link_state: Option<String>,
    /// Host-side device (`vnet3`) of a running domain.
    pub host_device: Option<String>,
    /// The element as libvirt wrote it.
    pub xml: String,
}

impl DomainXml {
    /// The disk with this alias.
    pub fn disk(&self, alias: &str) -> Option<&DiskXml> {
        self.disks
            .iter()
            .find(|d| d.alias.as_deref() == Some(alias))
    }

    /// The interface with this alias.
    pub fn nic(&self, alias: &str) -> Option<&NicXml> {
        self.interfaces
            .iter()
            .find(|n| n.alias.as_deref() == Some(alias))
    }

    /// Whether the domain has a controller of this type (and model, when given).
    pub fn has_controller(&self, type_: &str, model: Option<&str>) -> bool {
        self.controllers
            .iter()
            .any(|(t, m)| t == type_ && (model.is_none() || m.as_deref() == model))
    }

    /// Whether the machine type is q35 (PCIe, AHCI) rather than i440fx (PCI, IDE).
    pub fn is_q35(&self) -> bool {
        self.machine.contains("q35")
    }
}

/// Parses a domain's XML.
pub fn parse_domain(xml: &str) -> Result<DomainXml, roxmltree::Error> {
    let doc = roxmltree::Document::parse(xml)?;
    let root = doc.root_element();
    let mut out = DomainXml {
        machine: attr(
            child(root, "os").and_then(|os| child(os, "type")),
            "machine",
        )
        .unwrap_or_default(),
        ..Default::default()
    };
    out.nvram = child(root, "os")
        .and_then(|os| child(os, "nvram"))
        .and_then(|n| n.text())
        .map(|t| t.trim().to_string());
    out.os_boot = child(root, "os")
        .into_iter()
        .flat_map(|os| os.children().filter(|c| c.has_tag_name("boot")))
        .filter_map(|b| b.attribute("dev").map(str::to_string))
        .collect();
    let Some(devices) = child(root, "devices") else {
        return Ok(out);
    };
    for dev in devices.children().filter(roxmltree::Node::is_element) {
        let text = xml[dev.range()].to_string();
        match dev.tag_name().name() {
            "disk" => {
                let source = child(dev, "source");
                out.disks.push(DiskXml {
                    device: dev.attribute("device").unwrap_or("disk").to_string(),
                    bus: attr(child(dev, "target"), "bus"),
                    target: attr(child(dev, "target"), "dev"),
                    alias: attr(child(dev, "alias"), "name"),
                    source: attr(source, "file").or_else(|| attr(source, "dev")),
                    pool: attr(source, "pool"),
                    volume: attr(source, "volume"),
                    network: network_source(source),
                    kind: dev.attribute("type").unwrap_or("file").to_string(),
                    readonly: child(dev, "readonly").is_some(),
                    shareable: child(dev, "shareable").is_some(),
                    xml: text,
                });
            }
            "interface" => {
                let source = child(dev, "source");
                out.interfaces.push(NicXml {
                    type_: dev.attribute("type").unwrap_or_default().to_string(),
                    mac: attr(child(dev, "mac"), "address").map(|m| m.to_ascii_lowercase()),
                    alias: attr(child(dev, "alias"), "name"),
                    source: attr(source, "network")
                        .or_else(|| attr(source, "bridge"))
                        .or_else(|| attr(source, "dev")),
                    model: attr(child(dev, "model"), "type"),
                    link_state: attr(child(dev, "link"), "state"),
                    host_device: attr(child(dev, "target"), "dev"),
                    xml: text,
                });
            }
            "controller" => out.controllers.push((
                dev.attribute("type").unwrap_or_default().to_string(),
                dev.attribute("model").map(str::to_string),
            )),
            "channel"
                if attr(child(dev, "target"), "name").as_deref()
                    == Some("org.qemu.guest_agent.0") =>
            {
                out.has_guest_agent = true;
            }
            _ => {}
        }
    }
    Ok(out)
}

/// `protocol://host/name` of a network disk's `<source>`.
fn network_source(source: Option<roxmltree::Node<'_, '_>>) -> Option<String> {
    let source = source?;
    let protocol = source.attribute("protocol")?;
    let name = source.attribute("name").unwrap_or_default();
    Some(match attr(child(source, "host"), "name") {
        Some(host) => format!("{protocol}://{host}/{name}"),
        None => format!("{protocol}:{name}"),
    })
}

impl DiskXml {
    /// Where the disk's data is, for messages: the file or device path, `volume V of pool P`,
    /// or the network source.
    pub fn source_label(&self) -> Option<String> {
        if let Some(s) = &self.source {
            return Some(s.clone());
        }
        if let (Some(p), Some(v)) = (&self.pool, &self.volume) {
            return Some(format!("volume {v} of pool {p}"));
        }
        self.network.clone()
    }
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(tag))
}

fn attr(n: Option<roxmltree::Node<'_, '_>>, name: &str) -> Option<String> {
    n.and_then(|n| n.attribute(name)).map(str::to_string)
}

/// Escapes a string for an XML attribute value in single quotes.
pub fn escape_attr(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// What a `<disk>` the agent writes contains.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskSpec {
    /// `disk` or `cdrom`.
    pub device: String,
    /// Source path; `None` is an empty CD tray.
    pub source: Option<String>,
    /// Whether the source is a block device.
    pub block: bool,
    /// `raw` or `qcow2`.
    pub format: String,
    /// Target device name.
    pub target: String,
    /// Target bus.
    pub bus: String,
    /// Read-only.
    pub readonly: bool,
    /// Boot order.
    pub boot_order: Option<u32>,
    /// User alias.
    pub alias: String,
    /// `driver/@cache`, `@io`, `@discard`.
    pub driver: Vec<(&'static str, String)>,
    /// Pool and volume of a `type='volume'` disk (then `source` and `block` are not used).
    pub volume: Option<(String, String)>,
}

/// Builds the XML of a disk.
pub fn disk_xml(d: &DiskSpec) -> String {
    let kind = match (&d.volume, d.block) {
        (Some(_), _) => "volume",
        (None, true) => "block",
        (None, false) => "file",
    };
    let mut x = format!("<disk type='{kind}' device='{}'>", escape_attr(&d.device));
    let _ = write!(x, "<driver name='qemu' type='{}'", escape_attr(&d.format));
    for (k, v) in &d.driver {
        let _ = write!(x, " {k}='{}'", escape_attr(v));
    }
    x.push_str("/>");
    if let Some((pool, volume)) = &d.volume {
        let _ = write!(
            x,
            "<source pool='{}' volume='{}'/>",
            escape_attr(pool),
            escape_attr(volume)
        );
    } else if let Some(src) = &d.source {
        let attr = if d.block { "dev" } else { "file" };
        let _ = write!(x, "<source {attr}='{}'/>", escape_attr(src));
    }
    let _ = write!(
        x,
        "<target dev='{}' bus='{}'/>",
        escape_attr(&d.target),
        escape_attr(&d.bus)
    );
    if d.readonly {
        x.push_str("<readonly/>");
    }
    if let Some(order) = d.boot_order {
        let _ = write!(x, "<boot order='{order}'/>");
    }
    let _ = write!(x, "<alias name='{}'/></disk>", escape_attr(&d.alias));
    x
}

/// What an `<interface>` the agent writes contains.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NicSpec {
    /// `network`, `bridge`, `direct` or `user`.
    pub type_: String,
    /// Network, bridge or host device.
    pub source: Option<String>,
    /// MAC address.
    pub mac: String,
    /// Model.
    pub model: String,
    /// Link down.
    pub link_down: bool,
    /// MTU.
    pub mtu: Option<u32>,
    /// Boot order.
    pub boot_order: Option<u32>,
    /// User alias.
    pub alias: String,
}

/// Builds the XML of a network interface.
pub fn nic_xml(n: &NicSpec) -> String {
    let mut x = format!("<interface type='{}'>", escape_attr(&n.type_));
    let _ = write!(x, "<mac address='{}'/>", escape_attr(&n.mac));
    if let Some(src) = &n.source {
        let attr = match n.type_.as_str() {
            "bridge" => " bridge",
            "direct" => " mode='bridge' dev",
            _ => " network",
        };
        let _ = write!(x, "<source{attr}='{}'/>", escape_attr(src));
    }
    let _ = write!(x, "<model type='{}'/>", escape_attr(&n.model));
    let _ = write!(
        x,
        "<link state='{}'/>",
        if n.link_down { "down" } else { "up" }
    );
    if let Some(mtu) = n.mtu {
        let _ = write!(x, "<mtu size='{mtu}'/>");
    }
    if let Some(order) = n.boot_order {
        let _ = write!(x, "<boot order='{order}'/>");
    }
    let _ = write!(x, "<alias name='{}'/></interface>", escape_attr(&n.alias));
    x
}

/// The device name with this index for a prefix: 0 -> `sda`, 25 -> `sdz`, 26 -> `sdaa`.
pub fn target_name(prefix: &str, mut index: usize) -> String {
    let mut suffix = Vec::new();
    loop {
        suffix.push(b'a' + (index % 26) as u8);
        if index < 26 {
            break;
        }
        index = index / 26 - 1;
    }
    suffix.reverse();
    format!("{prefix}{}", String::from_utf8_lossy(&suffix))
}

/// The lowest device name with `prefix` that no name in `used` has.
pub fn lowest_free_target<'a>(
    prefix: &str,
    used: impl IntoIterator<Item = &'a str> + Clone,
) -> String {
    (0..)
        .map(|i| target_name(prefix, i))
        .find(|name| !used.clone().into_iter().any(|u| u == name))
        .unwrap_or_else(|| format!("{prefix}zz"))
}

/// A domain's state and definitions, read in one go.
#[derive(Clone, Debug, Default)]
pub struct DomainView {
    /// Whether the domain runs.
    pub active: bool,
    /// Whether it has a persistent definition.
    pub persistent: bool,
    /// The running configuration (when active).
    pub live: Option<DomainXml>,
    /// The persistent definition (the live one for a transient domain).
    pub config: DomainXml,
}

impl DomainView {
    /// Every target name used in the live or persistent configuration.
    pub fn used_targets(&self) -> Vec<String> {
        self.config
            .disks
            .iter()
            .chain(self.live.iter().flat_map(|l| l.disks.iter()))
            .filter_map(|d| d.target.clone())
            .collect()
    }
}

/// Whether a libvirt error means "no such domain".
pub fn is_no_domain(err: &virt::error::Error) -> bool {
    matches!(
        err.code(),
        virt::enumutil::Enum::Known(virt::error::ErrorNumber::NoDomain)
    )
}

/// Reads a domain; `Ok(None)` when it does not exist.
pub fn read_domain(conn: &Connect, name: &str) -> Result<Option<DomainView>, virt::error::Error> {
    let dom = match conn.lookup_domain_by_name(name) {
        Ok(d) => d,
        Err(e) if is_no_domain(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    view(&dom).map(Some)
}

fn parse(xml: &str) -> Result<DomainXml, virt::error::Error> {
    parse_domain(xml).map_err(|_| virt::error::Error::last_error())
}

/// Reads the state and both definitions of a domain.
pub fn view(dom: &Domain) -> Result<DomainView, virt::error::Error> {
    let active = dom.is_active()?;
    let persistent = dom.is_persistent()?;
    let live = if active {
        Some(parse(&dom.xml_desc(0)?)?)
    } else {
        None
    };
    let config = if persistent {
        parse(&dom.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)?)?
    } else {
        live.clone().unwrap_or_default()
    };
    Ok(DomainView {
        active,
        persistent,
        live,
        config,
    })
}

/// `VIR_DOMAIN_AFFECT_*` flags for the live and/or persistent configuration.
pub fn affect(live: bool, config: bool) -> u32 {
    (if live { sys::VIR_DOMAIN_AFFECT_LIVE } else { 0 })
        | (if config {
            sys::VIR_DOMAIN_AFFECT_CONFIG
        } else {
            0
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domain type='qemu'><name>d</name><os><type arch='x86_64' machine='pc-q35-10.0'>hvm</type></os>\
        <devices><disk type='file' device='cdrom'><source file='/isos/a.iso'/><target dev='sda' bus='scsi'/><readonly/>\
        <alias name='ua-vps-1'/></disk><disk type='file' device='disk'><target dev='vda' bus='virtio'/></disk>\
        <controller type='scsi' index='0' model='virtio-scsi'/>\
        <interface type='network'><mac address='52:54:00:AA:BB:CC'/><source network='default'/><target dev='vnet3'/>\
        <model type='virtio'/><link state='down'/><alias name='ua-vpn-2'/></interface>\
        <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel></devices></domain>";

    #[test]
    fn parses_devices() {
        let d = parse_domain(XML).unwrap();
        assert!(d.is_q35());
        assert!(d.has_guest_agent);
        assert!(d.has_controller("scsi", Some("virtio-scsi")));
        let cd = d.disk("ua-vps-1").unwrap();
        assert_eq!(
            (
                cd.device.as_str(),
                cd.target.as_deref(),
                cd.source.as_deref()
            ),
            ("cdrom", Some("sda"), Some("/isos/a.iso"))
        );
        assert!(cd.xml.starts_with("<disk") && cd.xml.ends_with("</disk>"));
        let nic = d.nic("ua-vpn-2").unwrap();
        assert_eq!(nic.mac.as_deref(), Some("52:54:00:aa:bb:cc"));
        assert_eq!(nic.host_device.as_deref(), Some("vnet3"));
        assert_eq!(nic.link_state.as_deref(), Some("down"));
        assert_eq!(nic.source.as_deref(), Some("default"));
    }

    #[test]
    fn parses_volume_and_network_disk_sources() {
        let d = parse_domain(
            "<domain><devices><disk type='volume' device='disk'><source pool='p1' volume='v.img'/><target dev='vda'/></disk>\
             <disk type='network' device='disk'><source protocol='rbd' name='rbd/img'><host name='mon1' port='6789'/></source><target dev='vdb'/></disk>\
             <disk type='block' device='disk'><source dev='/dev/sdz'/><target dev='vdc'/></disk></devices></domain>",
        )
        .unwrap();
        let (vol, net, blk) = (&d.disks[0], &d.disks[1], &d.disks[2]);
        assert_eq!(
            (
                vol.kind.as_str(),
                vol.pool.as_deref(),
                vol.volume.as_deref(),
                vol.source.as_deref()
            ),
            ("volume", Some("p1"), Some("v.img"), None)
        );
        assert_eq!(
            vol.source_label().as_deref(),
            Some("volume v.img of pool p1")
        );
        assert_eq!(net.source_label().as_deref(), Some("rbd://mon1/rbd/img"));
        assert_eq!(blk.source_label().as_deref(), Some("/dev/sdz"));
    }

    #[test]
    fn names_targets_like_libvirt() {
        assert_eq!(target_name("sd", 0), "sda");
        assert_eq!(target_name("sd", 25), "sdz");
        assert_eq!(target_name("sd", 26), "sdaa");
        assert_eq!(target_name("vd", 27), "vdab");
        assert_eq!(lowest_free_target("sd", ["sda", "sdc"]), "sdb");
        assert_eq!(lowest_free_target("vd", ["sda"]), "vda");
    }

    #[test]
    fn builds_escaped_device_xml() {
        let x = disk_xml(&DiskSpec {
            device: "cdrom".into(),
            source: Some("/isos/it's&.iso".into()),
            format: "raw".into(),
            target: "sdb".into(),
            bus: "scsi".into(),
            readonly: true,
            alias: "ua-vps-x".into(),
            ..Default::default()
        });
        let parsed = parse_domain(&format!("<domain><devices>{x}</devices></domain>")).unwrap();
        assert_eq!(parsed.disks[0].source.as_deref(), Some("/isos/it's&.iso"));
        assert_eq!(parsed.disks[0].alias.as_deref(), Some("ua-vps-x"));
        let n = nic_xml(&NicSpec {
            type_: "user".into(),
            mac: "52:54:00:00:00:01".into(),
            model: "virtio".into(),
            link_down: true,
            alias: "ua-vpn-y".into(),
            ..Default::default()
        });
        let parsed = parse_domain(&format!("<domain><devices>{n}</devices></domain>")).unwrap();
        assert_eq!(parsed.interfaces[0].link_state.as_deref(), Some("down"));
        assert_eq!(parsed.interfaces[0].source, None);
        let v = disk_xml(&DiskSpec {
            device: "disk".into(),
            format: "raw".into(),
            target: "vdb".into(),
            bus: "virtio".into(),
            alias: "ua-vps-v".into(),
            volume: Some(("pool's".into(), "unit:0:0:1".into())),
            ..Default::default()
        });
        let parsed = parse_domain(&format!("<domain><devices>{v}</devices></domain>")).unwrap();
        assert_eq!(parsed.disks[0].kind, "volume");
        assert_eq!(
            parsed.disks[0].source_label().as_deref(),
            Some("volume unit:0:0:1 of pool pool's")
        );
    }
}
