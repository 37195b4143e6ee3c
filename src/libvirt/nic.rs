//! A network interface's settings as libvirt has them (read from an `<interface>` element), the
//! element the agent writes for them, and the one live tuning call libvirt has for NICs:
//! bandwidth (`virDomainSetInterfaceParameters`, which the `virt` crate does not wrap).

use std::fmt::Write as _;
use std::future::Future;

use super::domain::escape_attr;
use super::{Libvirt, LibvirtError};

/// One direction of a bandwidth limit, in libvirt's units: `average` and `peak` in KiB/s,
/// `burst` in KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rate {
    /// Average rate (KiB/s).
    pub average: u32,
    /// Peak rate (KiB/s), if limited.
    pub peak: Option<u32>,
    /// Burst at peak (KiB), if limited.
    pub burst: Option<u32>,
}

/// The `<bandwidth>` of an interface; both `None` means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bandwidth {
    /// Traffic into the guest.
    pub inbound: Option<Rate>,
    /// Traffic out of the guest.
    pub outbound: Option<Rate>,
}

/// An interface's settings, as read from its XML or wanted by a spec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NicSettings {
    /// `network`, `bridge`, `direct`, `user`.
    pub type_: String,
    /// Network, bridge or host device.
    pub source: Option<String>,
    /// Model (`virtio`).
    pub model: Option<String>,
    /// Link down.
    pub link_down: bool,
    /// `<mtu size>`.
    pub mtu: Option<u32>,
    /// `<driver queues>`.
    pub queues: Option<u32>,
    /// `<boot order>`.
    pub boot_order: Option<u32>,
    /// `<bandwidth>`.
    pub bandwidth: Bandwidth,
}

/// The parts of an `<interface>` element libvirt keeps as written, copied into an update so that
/// libvirt sees them unchanged: `<address>` (the PCI slot) and, for a live update, the settings
/// a running guest cannot change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kept {
    /// The `<address>` element.
    pub address: Option<String>,
    /// `<model>`, `<driver>`, `<mtu>`, `<boot>` as the running guest has them.
    pub restart_only: Option<Vec<String>>,
}

fn num(n: Option<roxmltree::Node<'_, '_>>, attr: &str) -> Option<u32> {
    n.and_then(|n| n.attribute(attr))
        .and_then(|v| v.parse().ok())
        .filter(|v| *v != 0)
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(tag))
}

fn rate(n: Option<roxmltree::Node<'_, '_>>) -> Option<Rate> {
    let average = num(n, "average")?;
    Some(Rate {
        average,
        peak: num(n, "peak"),
        burst: num(n, "burst"),
    })
}

/// Reads the settings of an `<interface>` element, and what an update must keep of it.
pub fn parse(xml: &str) -> Result<(NicSettings, Kept), roxmltree::Error> {
    let doc = roxmltree::Document::parse(xml)?;
    let dev = doc.root_element();
    let source = child(dev, "source");
    let attr = |n: Option<roxmltree::Node<'_, '_>>, a: &str| {
        n.and_then(|n| n.attribute(a)).map(str::to_string)
    };
    let bw = child(dev, "bandwidth");
    let settings = NicSettings {
        type_: dev.attribute("type").unwrap_or_default().to_string(),
        source: attr(source, "network")
            .or_else(|| attr(source, "bridge"))
            .or_else(|| attr(source, "dev")),
        model: attr(child(dev, "model"), "type"),
        link_down: attr(child(dev, "link"), "state").as_deref() == Some("down"),
        mtu: num(child(dev, "mtu"), "size"),
        queues: num(child(dev, "driver"), "queues"),
        boot_order: num(child(dev, "boot"), "order"),
        bandwidth: Bandwidth {
            inbound: rate(bw.and_then(|b| child(b, "inbound"))),
            outbound: rate(bw.and_then(|b| child(b, "outbound"))),
        },
    };
    let text = |n: roxmltree::Node<'_, '_>| xml[n.range()].to_string();
    let restart_only = ["model", "driver", "mtu", "boot"]
        .iter()
        .filter_map(|t| child(dev, t))
        .map(text)
        .collect();
    let kept = Kept {
        address: child(dev, "address").map(text),
        restart_only: Some(restart_only),
    };
    Ok((settings, kept))
}

fn write_rate(x: &mut String, tag: &str, r: &Rate) {
    let _ = write!(x, "<{tag} average='{}'", r.average);
    if let Some(p) = r.peak {
        let _ = write!(x, " peak='{p}'");
    }
    if let Some(b) = r.burst {
        let _ = write!(x, " burst='{b}'");
    }
    x.push_str("/>");
}

/// The `<bandwidth>` element; empty for no limit.
pub fn bandwidth_xml(b: &Bandwidth) -> String {
    if b.inbound.is_none() && b.outbound.is_none() {
        return String::new();
    }
    let mut x = String::from("<bandwidth>");
    if let Some(r) = &b.inbound {
        write_rate(&mut x, "inbound", r);
    }
    if let Some(r) = &b.outbound {
        write_rate(&mut x, "outbound", r);
    }
    x.push_str("</bandwidth>");
    x
}

/// Builds the `<interface>` the agent writes: `s` with `mac` and `alias`, keeping what `kept`
/// says (the PCI address; for a live update, the restart-only settings the guest runs with).
pub fn interface_xml(s: &NicSettings, mac: &str, alias: &str, kept: &Kept) -> String {
    let mut x = format!("<interface type='{}'>", escape_attr(&s.type_));
    let _ = write!(x, "<mac address='{}'/>", escape_attr(mac));
    if let Some(src) = &s.source {
        let attr = match s.type_.as_str() {
            "bridge" => " bridge",
            "direct" => " mode='bridge' dev",
            _ => " network",
        };
        let _ = write!(x, "<source{attr}='{}'/>", escape_attr(src));
    }
    match &kept.restart_only {
        Some(parts) => parts.iter().for_each(|p| x.push_str(p)),
        None => {
            if let Some(m) = &s.model {
                let _ = write!(x, "<model type='{}'/>", escape_attr(m));
            }
            if let Some(q) = s.queues {
                let _ = write!(x, "<driver queues='{q}'/>");
            }
            if let Some(mtu) = s.mtu {
                let _ = write!(x, "<mtu size='{mtu}'/>");
            }
            if let Some(order) = s.boot_order {
                let _ = write!(x, "<boot order='{order}'/>");
            }
        }
    }
    let _ = write!(
        x,
        "<link state='{}'/>",
        if s.link_down { "down" } else { "up" }
    );
    x.push_str(&bandwidth_xml(&s.bandwidth));
    if let Some(a) = &kept.address {
        x.push_str(a);
    }
    let _ = write!(x, "<alias name='{}'/></interface>", escape_attr(alias));
    x
}

/// Live tuning of a domain's interfaces.
pub trait NicTuning: Send + Sync {
    /// Sets the bandwidth of the running guest's interface with `mac` (both directions; `None`
    /// lifts the limit).
    fn set_live_bandwidth(
        &self,
        vm: &str,
        mac: &str,
        bandwidth: &Bandwidth,
    ) -> impl Future<Output = Result<(), LibvirtError>> + Send;
}

impl NicTuning for Libvirt {
    async fn set_live_bandwidth(
        &self,
        vm: &str,
        mac: &str,
        bandwidth: &Bandwidth,
    ) -> Result<(), LibvirtError> {
        let (name, mac, bw) = (vm.to_string(), mac.to_string(), *bandwidth);
        self.call("set the interface bandwidth", move |c| {
            let dom = c.lookup_domain_by_name(&name)?;
            super::iftune::set_interface_bandwidth(&dom, &mac, &bw)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_survive_a_round_trip() {
        let s = NicSettings {
            type_: "network".into(),
            source: Some("default".into()),
            model: Some("virtio".into()),
            link_down: true,
            mtu: Some(9000),
            queues: Some(4),
            boot_order: Some(2),
            bandwidth: Bandwidth {
                inbound: Some(Rate {
                    average: 1000,
                    peak: Some(2000),
                    burst: Some(512),
                }),
                outbound: Some(Rate {
                    average: 300,
                    peak: None,
                    burst: None,
                }),
            },
        };
        let xml = interface_xml(&s, "52:54:00:00:00:07", "ua-x", &Kept::default());
        let (back, kept) = parse(&xml).unwrap();
        assert_eq!(back, s);
        assert_eq!(kept.address, None);
        assert_eq!(kept.restart_only.unwrap().len(), 4);
    }

    #[test]
    fn a_live_update_keeps_what_the_guest_runs_with() {
        let live = "<interface type='network'><mac address='52:54:00:00:00:07'/>\
            <source network='default' portid='x' bridge='virbr0'/><target dev='vnet3'/>\
            <model type='e1000e'/><mtu size='1400'/><link state='up'/>\
            <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>\
            <alias name='ua-x'/></interface>";
        let (now, kept) = parse(live).unwrap();
        assert_eq!(now.model.as_deref(), Some("e1000e"));
        assert_eq!(now.bandwidth, Bandwidth::default());
        let want = NicSettings {
            model: Some("virtio".into()),
            mtu: None,
            source: Some("other".into()),
            ..now.clone()
        };
        let xml = interface_xml(&want, "52:54:00:00:00:07", "ua-x", &kept);
        let (sent, _) = parse(&xml).unwrap();
        assert_eq!(sent.model.as_deref(), Some("e1000e"), "model as running");
        assert_eq!(sent.mtu, Some(1400));
        assert_eq!(sent.source.as_deref(), Some("other"));
        assert!(xml.contains("slot='0x00'"), "{xml}");
    }

    #[test]
    fn zero_reads_as_unset_and_no_limit_writes_nothing() {
        let (s, _) = parse(
            "<interface type='user'><bandwidth><inbound average='0'/><outbound average='5' peak='0'/></bandwidth></interface>",
        )
        .unwrap();
        assert_eq!(s.bandwidth.inbound, None);
        assert_eq!(
            s.bandwidth.outbound,
            Some(Rate {
                average: 5,
                peak: None,
                burst: None
            })
        );
        assert_eq!(bandwidth_xml(&Bandwidth::default()), "");
    }
}
