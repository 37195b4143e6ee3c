//! Networks as the agent asks about them: libvirt networks, host interfaces (bridges and
//! devices), what the guest reports about its interfaces, and the MACs in use on the node.

use std::future::Future;

use virt::sys;

use super::domain;
use super::{ErrorKind, Libvirt, LibvirtError};

/// A libvirt network by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkState {
    /// No network of that name.
    Missing,
    /// Defined but not started.
    Inactive,
    /// Running.
    Active,
}

/// A host interface by name, as libvirt sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostInterface {
    /// No interface of that name.
    Missing,
    /// Present; `bridge` when it is a bridge.
    Present {
        /// Whether the interface is a bridge.
        bridge: bool,
    },
    /// This libvirtd has no interface driver: the attach itself tells.
    Unknown,
}

/// Where the guest's addresses come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddressSource {
    /// The QEMU guest agent inside the guest.
    Agent,
    /// The DHCP leases of the libvirt network.
    Lease,
}

impl AddressSource {
    fn flag(self) -> u32 {
        match self {
            Self::Agent => sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
            Self::Lease => sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
        }
    }
}

/// One interface as the guest (or the DHCP server) reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestNic {
    /// The guest's name for it (`eth0`); leases carry whatever libvirt puts there.
    pub name: String,
    /// Addresses with prefix length, `192.168.122.10/24`.
    pub addresses: Vec<String>,
}

/// A MAC of a domain on the node, live or persistent, with the alias of its interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeMac {
    /// The MAC, lower case.
    pub mac: String,
    /// The interface's alias, if it has one.
    pub alias: Option<String>,
}

/// Networks, host interfaces and guest addresses.
pub trait Networks: Send + Sync {
    /// The state of libvirt network `name`.
    fn network(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<NetworkState, LibvirtError>> + Send;

    /// Host interface `name`.
    fn host_interface(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<HostInterface, LibvirtError>> + Send;

    /// What `source` reports about the interface of `vm` with `mac`; `None` when it does not
    /// list that MAC.
    fn guest_addresses(
        &self,
        vm: &str,
        mac: &str,
        source: AddressSource,
    ) -> impl Future<Output = Result<Option<GuestNic>, LibvirtError>> + Send;

    /// Every MAC of every domain on the node (live and persistent).
    fn node_macs(&self) -> impl Future<Output = Result<Vec<NodeMac>, LibvirtError>> + Send;
}

/// Whether an interface's XML (`virInterfaceGetXMLDesc`) describes a bridge.
pub fn is_bridge(xml: &str) -> Result<bool, roxmltree::Error> {
    let doc = roxmltree::Document::parse(xml)?;
    let root = doc.root_element();
    Ok(root.has_tag_name("interface") && root.attribute("type") == Some("bridge"))
}

/// Turns a lookup's outcome into `Ok(Some)`, `Ok(None)` for "not found", or the error.
fn found<T>(action: &str, r: Result<T, virt::error::Error>) -> Result<Option<T>, LibvirtError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(source) => {
            let err = LibvirtError::Call {
                action: action.to_string(),
                source,
            };
            if err.kind() == ErrorKind::NotFound {
                Ok(None)
            } else {
                Err(err)
            }
        }
    }
}

impl Networks for Libvirt {
    async fn network(&self, name: &str) -> Result<NetworkState, LibvirtError> {
        const ACTION: &str = "look up the network";
        let n = name.to_string();
        let looked = self
            .call(ACTION, move |c| {
                Ok(c.lookup_network_by_name(&n)
                    .map(|net| net.is_active().unwrap_or(false)))
            })
            .await?;
        Ok(match found(ACTION, looked)? {
            None => NetworkState::Missing,
            Some(false) => NetworkState::Inactive,
            Some(true) => NetworkState::Active,
        })
    }

    async fn host_interface(&self, name: &str) -> Result<HostInterface, LibvirtError> {
        const ACTION: &str = "look up the host interface";
        let n = name.to_string();
        // Asked of libvirt, which sees the host's interfaces (the agent's pod may not).
        let looked = self
            .call(ACTION, move |c| {
                Ok(c.lookup_interface_by_name(&n).and_then(|i| i.xml_desc(0)))
            })
            .await?;
        let xml = match found(ACTION, looked) {
            Ok(Some(xml)) => xml,
            Ok(None) => return Ok(HostInterface::Missing),
            Err(e) if e.kind() == ErrorKind::Unsupported => return Ok(HostInterface::Unknown),
            Err(e) => return Err(e),
        };
        let bridge = is_bridge(&xml).map_err(|source| LibvirtError::Xml {
            action: ACTION.into(),
            source,
        })?;
        Ok(HostInterface::Present { bridge })
    }

    async fn guest_addresses(
        &self,
        vm: &str,
        mac: &str,
        source: AddressSource,
    ) -> Result<Option<GuestNic>, LibvirtError> {
        let (name, mac) = (vm.to_string(), mac.to_ascii_lowercase());
        self.call("ask for the guest's interfaces", move |c| {
            let dom = c.lookup_domain_by_name(&name)?;
            let ifaces = dom.interface_addresses(source.flag(), 0)?;
            Ok(ifaces
                .into_iter()
                .find(|i| {
                    i.hwaddr.as_deref().map(str::to_ascii_lowercase).as_deref()
                        == Some(mac.as_str())
                })
                .map(|i| GuestNic {
                    addresses: i
                        .addrs
                        .iter()
                        .map(|a| format!("{}/{}", a.addr, a.prefix))
                        .collect(),
                    name: i.name,
                }))
        })
        .await
    }

    async fn node_macs(&self) -> Result<Vec<NodeMac>, LibvirtError> {
        self.call("list the domains' interfaces", |c| {
            let mut out = Vec::new();
            for dom in c.list_all_domains(0)? {
                // A domain that went away meanwhile has no MACs.
                let Ok(view) = domain::view(&dom) else {
                    continue;
                };
                for nic in view
                    .config
                    .interfaces
                    .iter()
                    .chain(view.live.iter().flat_map(|l| l.interfaces.iter()))
                {
                    if let Some(mac) = &nic.mac {
                        out.push(NodeMac {
                            mac: mac.clone(),
                            alias: nic.alias.clone(),
                        });
                    }
                }
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridges_are_told_by_the_interface_type() {
        let br = "<interface type='bridge' name='virbr0'><bridge stp='on'/></interface>";
        let eth = "<interface type='ethernet' name='lo'><!-- type='bridge' --></interface>";
        assert!(is_bridge(br).unwrap());
        // A comment or attribute elsewhere saying bridge is no bridge.
        assert!(!is_bridge(eth).unwrap());
        assert!(
            !is_bridge("<interface type='ethernet' name='x'><source type='bridge'/></interface>")
                .unwrap()
        );
        assert!(is_bridge("<interface").is_err());
    }
}
