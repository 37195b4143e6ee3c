//! Tenancy: what a namespace may reach. Cluster admins grant libvirt domains, storage pools and
//! NIC sources to a namespace with annotations on the Namespace object; in `namespaced` mode (the
//! default) nothing else is reachable from that namespace. This file is pure (parsing and
//! matching); [`watch`] keeps every namespace's grants current from a watch.

use std::collections::BTreeMap;

pub mod watch;

pub use watch::{GrantsFeed, NamespaceGrants};

/// Annotation granting libvirt domains: comma-separated names; an entry ending in `*` is a prefix.
pub const DOMAINS: &str = "virtplane.io/domains";
/// Annotation granting storage pools: comma-separated pool names.
pub const POOLS: &str = "virtplane.io/pools";
/// Annotation granting NIC sources: a libvirt network name, `bridge:NAME`, `direct:NAME`, `user`.
pub const NETWORKS: &str = "virtplane.io/networks";

/// How far namespaces separate tenants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// A namespace reaches only what its annotations grant (the default).
    #[default]
    Namespaced,
    /// Every namespace reaches everything on the node (single-tenant labs).
    Open,
}

/// A NIC source, as granted and as asked for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum NicSource {
    /// A libvirt network.
    Network(String),
    /// A host bridge.
    Bridge(String),
    /// A host device in macvtap (direct) mode.
    Direct(String),
    /// User-mode networking (its guest reaches the host's loopback).
    User,
}

impl NicSource {
    /// Parses one grant entry.
    fn parse(entry: &str) -> Option<Self> {
        let entry = entry.trim();
        if entry.is_empty() {
            return None;
        }
        Some(match entry.split_once(':') {
            Some(("bridge", n)) if !n.is_empty() => Self::Bridge(n.to_string()),
            Some(("direct", n)) if !n.is_empty() => Self::Direct(n.to_string()),
            Some(_) => return None,
            None if entry == "user" => Self::User,
            None => Self::Network(entry.to_string()),
        })
    }

    /// How a grant spells it.
    pub fn grant_entry(&self) -> String {
        match self {
            Self::Network(n) => n.clone(),
            Self::Bridge(n) => format!("bridge:{n}"),
            Self::Direct(n) => format!("direct:{n}"),
            Self::User => "user".into(),
        }
    }
}

/// What one namespace may reach.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grants {
    /// `None` in open mode: everything.
    limited: Option<Limited>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Limited {
    namespace: String,
    domains: Vec<String>,
    pools: Vec<String>,
    networks: Vec<NicSource>,
}

fn list(annotations: &BTreeMap<String, String>, key: &str) -> Vec<String> {
    annotations
        .get(key)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn joined(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

impl Grants {
    /// Everything (open mode).
    pub fn open() -> Self {
        Self { limited: None }
    }

    /// What namespace `namespace` with `annotations` may reach in `mode`.
    pub fn of(mode: Mode, namespace: &str, annotations: &BTreeMap<String, String>) -> Self {
        if mode == Mode::Open {
            return Self::open();
        }
        Self {
            limited: Some(Limited {
                namespace: namespace.to_string(),
                domains: list(annotations, DOMAINS),
                pools: list(annotations, POOLS),
                networks: list(annotations, NETWORKS)
                    .iter()
                    .filter_map(|e| NicSource::parse(e))
                    .collect(),
            }),
        }
    }

    /// Whether domain `name` is granted.
    pub fn domain(&self, name: &str) -> bool {
        self.limited.as_ref().is_none_or(|l| {
            l.domains.iter().any(|g| match g.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => g == name,
            })
        })
    }

    /// Whether storage pool `name` is granted.
    pub fn pool(&self, name: &str) -> bool {
        self.limited
            .as_ref()
            .is_none_or(|l| l.pools.iter().any(|p| p == name))
    }

    /// Whether NIC source `source` is granted.
    pub fn network(&self, source: &NicSource) -> bool {
        self.limited
            .as_ref()
            .is_none_or(|l| l.networks.contains(source))
    }

    /// Whether this is open mode (no limits).
    pub fn is_open(&self) -> bool {
        self.limited.is_none()
    }

    /// "namespace ta may use domains team-a-*; vm-b is not one of them": says only what the
    /// requester is granted, never whether the domain exists.
    pub fn domain_refusal(&self, name: &str) -> String {
        let (ns, granted) = self.limited.as_ref().map_or(("", String::new()), |l| {
            (l.namespace.as_str(), joined(&l.domains))
        });
        format!(
            "namespace {ns} may use domains {granted}; {name} is not one of them. A cluster admin grants domains with the annotation {DOMAINS} on the Namespace."
        )
    }

    /// The refusal message for an ungranted pool.
    pub fn pool_refusal(&self, name: &str) -> String {
        let (ns, granted) = self.limited.as_ref().map_or(("", String::new()), |l| {
            (l.namespace.as_str(), joined(&l.pools))
        });
        format!(
            "namespace {ns} may use storage pools {granted}; {name} is not one of them. A cluster admin grants pools with the annotation {POOLS} on the Namespace."
        )
    }

    /// The refusal message for a file outside every granted pool's directory: names the
    /// requester's pools, never the pool (or tenant) the file belongs to.
    pub fn path_refusal(&self, path: &str) -> String {
        let (ns, granted) = self.limited.as_ref().map_or(("", String::new()), |l| {
            (l.namespace.as_str(), joined(&l.pools))
        });
        format!(
            "namespace {ns} may use storage pools {granted}; {path} is not inside the directory of any of them. A cluster admin grants pools with the annotation {POOLS} on the Namespace."
        )
    }

    /// The refusal message for an ungranted NIC source.
    pub fn network_refusal(&self, source: &NicSource) -> String {
        let (ns, granted) = self.limited.as_ref().map_or(("", String::new()), |l| {
            let names: Vec<String> = l.networks.iter().map(NicSource::grant_entry).collect();
            (l.namespace.as_str(), joined(&names))
        });
        format!(
            "namespace {ns} may use NIC sources {granted}; {} is not one of them. A cluster admin grants them with the annotation {NETWORKS} on the Namespace.",
            source.grant_entry()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn domains_match_by_name_or_prefix() {
        let g = Grants::of(
            Mode::Namespaced,
            "ta",
            &ann(&[(DOMAINS, "team-a-*, db1 ,")]),
        );
        assert!(g.domain("team-a-web"));
        assert!(g.domain("team-a-web-clone1"));
        assert!(g.domain("db1"));
        assert!(!g.domain("db10"), "exact names are exact");
        assert!(!g.domain("team-b-web"));
        assert!(!g.pool("default"), "nothing granted, nothing reachable");
    }

    #[test]
    fn nothing_is_granted_by_default_and_everything_is_open() {
        let none = Grants::of(Mode::Namespaced, "ta", &BTreeMap::new());
        assert!(!none.domain("x") && !none.pool("x") && !none.network(&NicSource::User));
        let open = Grants::of(Mode::Open, "ta", &BTreeMap::new());
        assert!(open.domain("x") && open.pool("x") && open.network(&NicSource::User));
        assert!(open.is_open() && !none.is_open());
    }

    #[test]
    fn nic_sources_are_typed() {
        let g = Grants::of(
            Mode::Namespaced,
            "ta",
            &ann(&[(NETWORKS, "default, bridge:br0, direct:eth1, bogus:x, user")]),
        );
        assert!(g.network(&NicSource::Network("default".into())));
        assert!(g.network(&NicSource::Bridge("br0".into())));
        assert!(g.network(&NicSource::Direct("eth1".into())));
        assert!(g.network(&NicSource::User));
        assert!(
            !g.network(&NicSource::Network("br0".into())),
            "a bridge is not a network"
        );
        assert!(!g.network(&NicSource::Bridge("eth1".into())));
        let no_user = Grants::of(Mode::Namespaced, "ta", &ann(&[(NETWORKS, "default")]));
        assert!(!no_user.network(&NicSource::User));
    }

    #[test]
    fn refusals_name_only_the_requesters_grant() {
        let g = Grants::of(
            Mode::Namespaced,
            "ta",
            &ann(&[(DOMAINS, "team-a-*"), (POOLS, "pa")]),
        );
        assert!(
            g.domain_refusal("vm-b")
                .starts_with("namespace ta may use domains team-a-*; vm-b is not one of them.")
        );
        assert!(g.pool_refusal("pb").contains("storage pools pa; pb"));
        assert!(
            g.path_refusal("/b/x.img")
                .contains("storage pools pa; /b/x.img is not inside")
        );
        assert!(
            g.network_refusal(&NicSource::User)
                .contains("NIC sources none; user")
        );
    }
}
