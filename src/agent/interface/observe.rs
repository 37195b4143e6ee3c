//! Observe: the reads of a VMInterface reconcile (libvirt and the MAC index), nothing decided.

use std::time::Duration;

use super::index::{Claim, MacIndex};
use super::mac::{allocate_mac, valid_mac};
use super::plan;
use crate::api::{InterfaceType, VMInterfaceSpec, VMInterfaceStatus};
use crate::libvirt::LibvirtError;
use crate::libvirt::domain::DomainView;
use crate::libvirt::facade::Domains;
use crate::libvirt::networks::{
    AddressSource, GuestNic, HostInterface, NetworkState, Networks, NodeMac,
};
use crate::tenancy::Grants;

/// How long the guest agent may take to answer.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// What the plan needs to know.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// This node's name (for messages).
    pub node: String,
    /// The domain; `None` when it is not defined on this node.
    pub domain: Option<DomainView>,
    /// The libvirt network of a `network` interface not yet in the domain.
    pub network: Option<NetworkState>,
    /// The host bridge or device of a `bridge`/`direct` interface not yet in the domain.
    pub host: Option<HostInterface>,
    /// The MACs in use, while the NIC is not settled in its domain; `None` once it is.
    pub macs: Option<MacsInUse>,
    /// What the object's namespace is granted (everything in open mode).
    pub grants: Grants,
}

/// The MACs in use on the node and claimed in the cluster.
#[derive(Clone, Debug, Default)]
pub struct MacsInUse {
    /// Every MAC of every domain on the node.
    pub node: Vec<NodeMac>,
    /// Other objects' claims on the MAC this object would use.
    pub claims: Vec<Claim>,
    /// A MAC in use nowhere, for an object that neither has nor asks for one.
    pub fresh: String,
}

/// Who is asking: the object's identity.
pub struct Me<'a> {
    /// Its UID.
    pub uid: &'a str,
    /// Its alias in the domain.
    pub alias: &'a str,
}

/// Reads the domain, the host side a new NIC needs, and the MACs in use; `grants` are what the
/// object's namespace is granted, for the plan to check.
pub async fn observe<V: Domains + Networks>(
    virt: &V,
    index: &MacIndex,
    grants: Grants,
    node: &str,
    me: &Me<'_>,
    spec: &VMInterfaceSpec,
    prev: &VMInterfaceStatus,
) -> Result<Observed, LibvirtError> {
    let mut out = Observed {
        node: node.to_string(),
        grants,
        ..Default::default()
    };
    // Nothing of an ungranted domain is read: the plan refuses it, whatever libvirt would say.
    if !out.grants.domain(&spec.vm) {
        return Ok(out);
    }
    out.domain = virt.domain(&spec.vm).await?;
    let Some(view) = &out.domain else {
        return Ok(out);
    };
    let present = plan::present(view, me.alias);
    // The host side only before creating: an existing NIC keeps working if it goes away.
    if !present && let Ok(Some(source)) = plan::source_of(spec) {
        match spec.type_ {
            InterfaceType::Network => out.network = Some(virt.network(&source).await?),
            InterfaceType::Bridge | InterfaceType::Direct => {
                out.host = Some(virt.host_interface(&source).await?);
            }
            InterfaceType::User => {}
        }
    }
    // Checked until the NIC is in the domain; after that the steady-state reconciles (the guest
    // view refreshes every 20 s) read nothing more.
    if !(prev.mac.is_some() && present) {
        let node_macs = virt.node_macs().await?;
        let mut used: Vec<String> = node_macs.iter().map(|n| n.mac.clone()).collect();
        used.extend(index.macs(me.uid));
        let fresh = allocate_mac(&used);
        let requested = spec.mac.as_deref().and_then(|m| valid_mac(m).ok());
        let mine = prev
            .mac
            .clone()
            .or(requested)
            .unwrap_or_else(|| fresh.clone());
        out.macs = Some(MacsInUse {
            node: node_macs,
            claims: index.claims(&mine, me.uid),
            fresh,
        });
    }
    Ok(out)
}

/// The domain after the changes (an undefined domain reads as empty).
pub async fn placed<V: Domains>(virt: &V, vm: &str) -> Result<DomainView, LibvirtError> {
    Ok(virt.domain(vm).await?.unwrap_or_default())
}

/// What the guest agent said about the MAC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentAnswer {
    /// The domain has no guest agent channel.
    NoChannel,
    /// It lists the interface.
    Found(GuestNic),
    /// It does not list the MAC (yet).
    NotListed,
    /// It failed to answer.
    Failed(String),
    /// It did not answer within [`GUEST_TIMEOUT`].
    TimedOut,
}

/// What is known about the interface inside the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestSeen {
    /// The domain is not running.
    NotRunning,
    /// The guest agent's answer, and the DHCP lease when the agent did not name it.
    Running {
        /// The guest agent's answer.
        agent: AgentAnswer,
        /// The lease of a `network` interface, asked when the agent gave nothing.
        lease: Option<GuestNic>,
    },
}

/// Asks the guest agent, else the DHCP leases, about `mac`; never waits more than a few seconds
/// for a guest that does not answer.
pub async fn guest<V: Networks>(
    virt: &V,
    vm: &str,
    mac: &str,
    view: &DomainView,
    type_: InterfaceType,
) -> GuestSeen {
    if !view.active {
        return GuestSeen::NotRunning;
    }
    let ask = |source| tokio::time::timeout(GUEST_TIMEOUT, virt.guest_addresses(vm, mac, source));
    let has_agent = view.live.as_ref().is_some_and(|l| l.has_guest_agent);
    let agent = if has_agent {
        match ask(AddressSource::Agent).await {
            Ok(Ok(Some(nic))) => AgentAnswer::Found(nic),
            Ok(Ok(None)) => AgentAnswer::NotListed,
            Ok(Err(e)) => AgentAnswer::Failed(e.to_string()),
            Err(_) => AgentAnswer::TimedOut,
        }
    } else {
        AgentAnswer::NoChannel
    };
    let lease = if !matches!(agent, AgentAnswer::Found(_)) && type_ == InterfaceType::Network {
        match ask(AddressSource::Lease).await {
            Ok(Ok(Some(nic))) => Some(nic),
            _ => None,
        }
    } else {
        None
    };
    GuestSeen::Running { agent, lease }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::fake::FakeLibvirt;

    const NIC: &str = "<interface type='user'><mac address='52:54:00:00:00:07'/><alias name='ua-vpn-u1'/></interface>";
    const OTHER: &str = "<interface type='user'><mac address='52:54:00:00:00:08'/><alias name='ua-other'/></interface>";

    fn spec(json: serde_json::Value) -> VMInterfaceSpec {
        serde_json::from_value(json).unwrap()
    }

    const ME: Me<'static> = Me {
        uid: "u1",
        alias: "ua-vpn-u1",
    };

    #[tokio::test]
    async fn a_new_nic_looks_up_its_network_and_the_macs_in_use() {
        let fake = FakeLibvirt::default()
            .with_domain("vm", true, OTHER)
            .with_network("default", false);
        let s = spec(serde_json::json!({"vm": "vm"}));
        let o = observe(
            &fake,
            &MacIndex::default(),
            Grants::open(),
            "n1",
            &ME,
            &s,
            &Default::default(),
        )
        .await
        .unwrap();
        assert_eq!(o.network, Some(NetworkState::Inactive));
        let macs = o.macs.unwrap();
        assert_eq!(
            macs.node.len(),
            2,
            "live and persistent of the other domain"
        );
        assert_ne!(macs.fresh, "52:54:00:00:00:08");
    }

    #[tokio::test]
    async fn a_settled_nic_reads_only_its_domain() {
        let fake = FakeLibvirt::default().with_domain("vm", true, NIC);
        let s = spec(serde_json::json!({"vm": "vm", "type": "bridge", "source": "br0"}));
        let prev = VMInterfaceStatus {
            mac: Some("52:54:00:00:00:07".into()),
            ..Default::default()
        };
        let o = observe(
            &fake,
            &MacIndex::default(),
            Grants::open(),
            "n1",
            &ME,
            &s,
            &prev,
        )
        .await
        .unwrap();
        assert!(o.macs.is_none() && o.host.is_none() && o.network.is_none());
        assert_eq!(fake.calls(), ["read the domain"]);
    }

    #[tokio::test]
    async fn an_ungranted_domain_is_not_read() {
        let fake = FakeLibvirt::default().with_domain("vm", true, OTHER);
        let s = spec(serde_json::json!({"vm": "vm"}));
        let grants = Grants::of(crate::tenancy::Mode::Namespaced, "ta", &Default::default());
        let o = observe(
            &fake,
            &MacIndex::default(),
            grants,
            "n1",
            &ME,
            &s,
            &Default::default(),
        )
        .await
        .unwrap();
        assert!(o.domain.is_none() && o.macs.is_none());
        assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    }

    #[tokio::test]
    async fn a_missing_domain_stops_the_reads() {
        let fake = FakeLibvirt::default();
        let s = spec(serde_json::json!({"vm": "vm"}));
        let o = observe(
            &fake,
            &MacIndex::default(),
            Grants::open(),
            "n1",
            &ME,
            &s,
            &Default::default(),
        )
        .await
        .unwrap();
        assert!(o.domain.is_none());
        assert_eq!(fake.calls(), ["read the domain"]);
    }

    #[tokio::test]
    async fn the_guest_agent_is_asked_first_then_the_leases() {
        let agent_xml =
            "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>";
        let fake = FakeLibvirt::default()
            .with_domain("vm", true, agent_xml)
            .with_guest_nic(
                "vm",
                AddressSource::Lease,
                "52:54:00:00:00:07",
                GuestNic {
                    name: "vnet0".into(),
                    addresses: vec!["192.168.122.5/24".into()],
                },
            );
        let view = fake.domain("vm").await.unwrap().unwrap();
        let seen = guest(
            &fake,
            "vm",
            "52:54:00:00:00:07",
            &view,
            InterfaceType::Network,
        )
        .await;
        let GuestSeen::Running { agent, lease } = seen else {
            panic!("running");
        };
        assert_eq!(agent, AgentAnswer::NotListed);
        assert_eq!(lease.unwrap().addresses, ["192.168.122.5/24"]);
        // A user-mode NIC has no lease to ask for.
        let seen = guest(&fake, "vm", "52:54:00:00:00:07", &view, InterfaceType::User).await;
        assert!(matches!(seen, GuestSeen::Running { lease: None, .. }));
        let off = DomainView::default();
        assert_eq!(
            guest(&fake, "vm", "x", &off, InterfaceType::User).await,
            GuestSeen::NotRunning
        );
    }
}
