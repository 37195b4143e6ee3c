//! A node's inventory: domains, storage pools, networks and versions.

use virt::connect::Connect;
use virt::domain::DomainState;
use virt::enumutil::Enum;

use crate::api::{DomainSummary, NetworkSummary, StoragePoolSummary};

/// What libvirt on this node has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    /// libvirtd version.
    pub libvirt_version: String,
    /// Hypervisor (QEMU) version.
    pub hypervisor_version: String,
    /// Domains, sorted by name.
    pub domains: Vec<DomainSummary>,
    /// Storage pools, sorted by name.
    pub storage_pools: Vec<StoragePoolSummary>,
    /// Networks, sorted by name.
    pub networks: Vec<NetworkSummary>,
}

/// Formats libvirt's `major * 1_000_000 + minor * 1_000 + release` version number.
pub fn format_version(v: u64) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1_000) % 1_000, v % 1_000)
}

/// Reads the inventory. Objects that vanish while being read are skipped, not errors.
pub fn collect_inventory(conn: &Connect) -> Result<Inventory, virt::error::Error> {
    let mut domains = Vec::new();
    for dom in conn.list_all_domains(0)? {
        let (Ok(name), Ok(uuid)) = (dom.name(), dom.uuid_string()) else {
            continue;
        };
        let Ok((state, _)) = dom.state() else {
            continue;
        };
        domains.push(DomainSummary {
            name,
            uuid,
            state: state_name(state).to_string(),
            persistent: dom.is_persistent().unwrap_or(false),
        });
    }
    domains.sort_by(|a, b| a.name.cmp(&b.name));

    let storage_pools = collect_storage_pools(conn)?;

    let mut networks = Vec::new();
    for net in conn.list_all_networks(0)? {
        let Ok(name) = net.name() else { continue };
        networks.push(NetworkSummary {
            name,
            bridge: net.bridge_name().ok().filter(|b| !b.is_empty()),
            active: net.is_active().unwrap_or(false),
        });
    }
    networks.sort_by(|a, b| a.name.cmp(&b.name));

    Ok(Inventory {
        libvirt_version: format_version(u64::from(conn.lib_version()?)),
        hypervisor_version: format_version(u64::from(conn.hyp_version()?)),
        domains,
        storage_pools,
        networks,
    })
}

/// Reads the storage pools, sorted by name (all a caller that places files needs, without
/// listing domains and networks).
pub fn collect_storage_pools(
    conn: &Connect,
) -> Result<Vec<StoragePoolSummary>, virt::error::Error> {
    let mut storage_pools = Vec::new();
    for pool in conn.list_all_storage_pools(0)? {
        let (Ok(name), Ok(info), Ok(xml)) = (pool.name(), pool.info(), pool.xml_desc(0)) else {
            continue;
        };
        let (type_, path) = pool_type_and_path(&xml);
        storage_pools.push(StoragePoolSummary {
            name,
            type_,
            path,
            capacity: info.capacity,
            allocation: info.allocation,
            available: info.available,
            active: pool.is_active().unwrap_or(false),
        });
    }
    storage_pools.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(storage_pools)
}

fn state_name(state: Enum<DomainState, u32>) -> &'static str {
    match state {
        Enum::Known(DomainState::Running) => "running",
        Enum::Known(DomainState::Blocked) => "blocked",
        Enum::Known(DomainState::Paused) => "paused",
        Enum::Known(DomainState::Shutdown) => "shutdown",
        Enum::Known(DomainState::Shutoff) => "shutoff",
        Enum::Known(DomainState::Crashed) => "crashed",
        Enum::Known(DomainState::PMSuspended) => "pmsuspended",
        Enum::Known(DomainState::NoState) | Enum::Unknown(_) => "nostate",
    }
}

/// The `type` attribute and `target/path` of a storage pool's XML.
pub(super) fn pool_type_and_path(xml: &str) -> (String, Option<String>) {
    let Ok(doc) = roxmltree::Document::parse(xml) else {
        return ("unknown".into(), None);
    };
    let root = doc.root_element();
    let type_ = root.attribute("type").unwrap_or("unknown").to_string();
    let path = root
        .children()
        .find(|n| n.has_tag_name("target"))
        .and_then(|t| t.children().find(|n| n.has_tag_name("path")))
        .and_then(|p| p.text())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    (type_, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_versions() {
        assert_eq!(format_version(11_003_000), "11.3.0");
        assert_eq!(format_version(10_000_002), "10.0.2");
    }

    #[test]
    fn reads_pool_type_and_path() {
        let xml = "<pool type='dir'><name>default</name><target><path>/var/lib/libvirt/images</path></target></pool>";
        assert_eq!(
            pool_type_and_path(xml),
            ("dir".into(), Some("/var/lib/libvirt/images".into()))
        );
        assert_eq!(
            pool_type_and_path("<pool type='iscsi'><name>x</name></pool>"),
            ("iscsi".into(), None)
        );
    }
}
