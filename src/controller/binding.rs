//! Binding: which node's agent reconciles an object. Pure decisions, no client.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::agent::finalizer::FINALIZER;
use crate::api::{
    Hypervisor, IsoDownload, NODE_LABEL, VMClone, VMInterface, VirtualMachineStorage,
};
use crate::tenancy::Grants;

/// Reasons of the `Scheduled` condition.
pub mod reason {
    /// Bound to a node whose agent is reporting.
    pub const BOUND: &str = "Bound";
    /// The object's namespace is not granted its domain or pool.
    pub const NOT_GRANTED: &str = "NotGranted";
    /// `spec.nodeName` names no Hypervisor.
    pub const NODE_NOT_FOUND: &str = "NodeNotFound";
    /// No node reports the domain.
    pub const DOMAIN_NOT_FOUND: &str = "DomainNotFound";
    /// Several nodes report the domain.
    pub const AMBIGUOUS_DOMAIN: &str = "AmbiguousDomain";
    /// No node has the storage pool.
    pub const POOL_NOT_FOUND: &str = "PoolNotFound";
    /// Several nodes have the storage pool: `spec.nodeName` must choose.
    pub const NODE_NAME_REQUIRED: &str = "NodeNameRequired";
    /// Bound, but the node's agent stopped reporting.
    pub const NODE_UNREACHABLE: &str = "NodeUnreachable";
}

/// What an object needs from a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// A libvirt domain of this name.
    Domain(&'a str),
    /// A storage pool of this name.
    Pool(&'a str),
}

/// A kind the controller binds to nodes.
pub trait Bindable {
    /// `spec.nodeName`.
    fn node_name(&self) -> Option<&str>;
    /// What the object needs from its node.
    fn target(&self) -> Target<'_>;
    /// `status.nodeName`.
    fn status_node(&self) -> Option<&str>;
    /// `status.conditions`.
    fn conditions(&self) -> &[Condition];
}

macro_rules! bindable {
    ($kind:ty, |$s:ident| $target:expr) => {
        impl Bindable for $kind {
            fn node_name(&self) -> Option<&str> {
                self.spec.node_name.as_deref()
            }
            fn target(&self) -> Target<'_> {
                let $s = self;
                $target
            }
            fn status_node(&self) -> Option<&str> {
                self.status.as_ref().and_then(|s| s.node_name.as_deref())
            }
            fn conditions(&self) -> &[Condition] {
                self.status
                    .as_ref()
                    .map(|s| s.conditions.as_slice())
                    .unwrap_or_default()
            }
        }
    };
}

bindable!(VirtualMachineStorage, |s| Target::Domain(&s.spec.vm));
bindable!(VMInterface, |s| Target::Domain(&s.spec.vm));
bindable!(VMClone, |s| Target::Domain(&s.spec.source));
bindable!(IsoDownload, |s| Target::Pool(&s.spec.pool));

/// Where an unbound object goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Bind to `node`.
    Bind {
        /// Node name.
        node: String,
        /// Why this node, for the condition message.
        message: String,
    },
    /// No node can be chosen; wait for the inventory or the spec to change.
    Unschedulable {
        /// CamelCase reason.
        reason: &'static str,
        /// What to do about it.
        message: String,
    },
}

/// The server-side apply that binds object `name` to `node`: the node label, and with it the
/// agent's finalizer, so the agent's first reconcile finds it in place and goes straight to its
/// work (adding it itself was one more API write before every hot-plug; the agent still adds it
/// to an object that lacks it). An object already being deleted gets no new finalizer: the API
/// server refuses one, and the agent leaves such an object alone.
pub fn bind_body(
    api_version: &str,
    kind: &str,
    name: &str,
    node: &str,
    deleting: bool,
) -> serde_json::Value {
    let mut metadata = serde_json::json!({ "name": name, "labels": { NODE_LABEL: node } });
    if !deleting {
        metadata["finalizers"] = serde_json::json!([FINALIZER]);
    }
    serde_json::json!({ "apiVersion": api_version, "kind": kind, "metadata": metadata })
}

/// Chooses the node for an object that is not bound yet among `hypervisors`, each with whether
/// it is alive (heartbeating within the grace period). Without `spec.nodeName` only live nodes
/// are chosen: a dead node's stale inventory neither attracts objects nor makes them ambiguous.
///
/// `grants` are what the object's namespace may reach. A target outside them is refused first,
/// before any inventory is consulted, so the answer is the same whether the domain or pool
/// exists or not: no tenant learns what other tenants have.
pub fn decide(
    node_name: Option<&str>,
    target: Target<'_>,
    grants: &Grants,
    hypervisors: &[(&Hypervisor, bool)],
) -> Decision {
    match target {
        Target::Domain(vm) if !grants.domain(vm) => {
            return Decision::Unschedulable {
                reason: reason::NOT_GRANTED,
                message: grants.domain_refusal(vm),
            };
        }
        Target::Pool(pool) if !grants.pool(pool) => {
            return Decision::Unschedulable {
                reason: reason::NOT_GRANTED,
                message: grants.pool_refusal(pool),
            };
        }
        _ => {}
    }
    let name_of = |h: &&Hypervisor| h.metadata.name.clone().unwrap_or_default();
    if let Some(node) = node_name {
        return if hypervisors.iter().any(|(h, _)| name_of(h) == node) {
            Decision::Bind {
                node: node.to_string(),
                message: format!("Bound to node {node}, named in spec.nodeName."),
            }
        } else {
            Decision::Unschedulable {
                reason: reason::NODE_NOT_FOUND,
                message: format!(
                    "No Hypervisor named {node} exists: no virtplane agent runs on node {node}. \
                     Fix spec.nodeName (kubectl get hypervisors lists the nodes) or start the agent there."
                ),
            }
        };
    }
    let what = match target {
        Target::Domain(vm) => format!("domain {vm}"),
        Target::Pool(pool) => format!("storage pool {pool}"),
    };
    let has = |h: &Hypervisor| {
        h.status.as_ref().is_some_and(|s| match target {
            Target::Domain(vm) => s.domains.iter().any(|d| d.name == vm),
            Target::Pool(pool) => s.storage_pools.iter().any(|p| p.name == pool),
        })
    };
    let mut nodes: Vec<String> = hypervisors
        .iter()
        .filter(|(h, live)| *live && has(h))
        .map(|(h, _)| name_of(h))
        .collect();
    nodes.sort();
    let mut silent: Vec<String> = hypervisors
        .iter()
        .filter(|(h, live)| !*live && has(h))
        .map(|(h, _)| name_of(h))
        .collect();
    silent.sort();
    if nodes.is_empty() && !silent.is_empty() {
        return Decision::Unschedulable {
            reason: reason::NODE_UNREACHABLE,
            message: format!(
                "Only node(s) {} report {what}, and their agents stopped heartbeating. The object \
                 is bound when one comes back; set spec.nodeName to bind it now.",
                silent.join(", ")
            ),
        };
    }
    match (nodes.len(), target) {
        (1, _) => {
            let node = nodes.remove(0);
            Decision::Bind {
                message: format!("Bound to node {node}, the only node that has {what}."),
                node,
            }
        }
        (0, Target::Domain(_)) => Decision::Unschedulable {
            reason: reason::DOMAIN_NOT_FOUND,
            message: format!(
                "No hypervisor node reports {what}. Check the name in the spec; the object is bound \
                 as soon as a node's inventory lists the domain."
            ),
        },
        (0, Target::Pool(_)) => Decision::Unschedulable {
            reason: reason::POOL_NOT_FOUND,
            message: format!(
                "No hypervisor node has {what}. Create the pool on a node or fix spec.pool; the object \
                 is bound as soon as a node's inventory lists the pool."
            ),
        },
        (_, Target::Domain(_)) => Decision::Unschedulable {
            reason: reason::AMBIGUOUS_DOMAIN,
            message: format!(
                "Nodes {} all report {what}; set spec.nodeName to choose one.",
                nodes.join(", ")
            ),
        },
        (_, Target::Pool(_)) => Decision::Unschedulable {
            reason: reason::NODE_NAME_REQUIRED,
            message: format!(
                "Nodes {} all have {what}; set spec.nodeName to choose one.",
                nodes.join(", ")
            ),
        },
    }
}

/// When the Hypervisor's agent last reported, if ever.
pub fn last_heartbeat(h: &Hypervisor) -> Option<Timestamp> {
    h.status.as_ref()?.last_heartbeat_time.as_ref().map(|t| t.0)
}

/// How long until the Hypervisor counts as unreachable; `None` when it already does.
pub fn time_until_stale(
    h: &Hypervisor,
    grace: SignedDuration,
    now: Timestamp,
) -> Option<SignedDuration> {
    let beat = last_heartbeat(h)?;
    let left = grace - now.duration_since(beat);
    (left > SignedDuration::ZERO).then_some(left)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_puts_the_agents_finalizer_on_unless_the_object_is_leaving() {
        let body = bind_body("virtplane.io/v1alpha1", "VMInterface", "nic", "n1", false);
        assert_eq!(
            body,
            serde_json::json!({
                "apiVersion": "virtplane.io/v1alpha1", "kind": "VMInterface",
                "metadata": {
                    "name": "nic",
                    "labels": { NODE_LABEL: "n1" },
                    "finalizers": ["virtplane.io/detach"],
                },
            })
        );
        let leaving = bind_body("virtplane.io/v1alpha1", "VMInterface", "nic", "n1", true);
        assert_eq!(leaving["metadata"]["labels"][NODE_LABEL], "n1");
        assert!(
            leaving["metadata"].get("finalizers").is_none(),
            "no new finalizer on an object being deleted"
        );
    }
    use crate::api::{DomainSummary, HypervisorSpec, HypervisorStatus, StoragePoolSummary};
    use crate::tenancy::{DOMAINS, Mode, POOLS};
    use std::collections::BTreeMap;

    fn open() -> Grants {
        Grants::open()
    }

    fn granted(ns: &str, domains: &str, pools: &str) -> Grants {
        let annotations = BTreeMap::from([
            (DOMAINS.to_string(), domains.to_string()),
            (POOLS.to_string(), pools.to_string()),
        ]);
        Grants::of(Mode::Namespaced, ns, &annotations)
    }

    fn hv(name: &str, domains: &[&str], pools: &[&str]) -> Hypervisor {
        let mut h = Hypervisor::new(name, HypervisorSpec::default());
        h.status = Some(HypervisorStatus {
            domains: domains
                .iter()
                .map(|d| DomainSummary {
                    name: d.to_string(),
                    ..Default::default()
                })
                .collect(),
            storage_pools: pools
                .iter()
                .map(|p| StoragePoolSummary {
                    name: p.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
        h
    }

    #[test]
    fn binds_to_the_only_node_with_the_domain() {
        let (a, b) = (hv("a", &["web-1"], &[]), hv("b", &["db-1"], &[]));
        match decide(
            None,
            Target::Domain("db-1"),
            &open(),
            &[(&a, true), (&b, true)],
        ) {
            Decision::Bind { node, .. } => assert_eq!(node, "b"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn silent_nodes_neither_attract_objects_nor_make_them_ambiguous() {
        let (a, b) = (hv("a", &["web-1"], &[]), hv("b", &["web-1"], &[]));
        match decide(
            None,
            Target::Domain("web-1"),
            &open(),
            &[(&a, false), (&b, true)],
        ) {
            Decision::Bind { node, .. } => assert_eq!(node, "b"),
            other => panic!("{other:?}"),
        }
        let Decision::Unschedulable { reason, message } = decide(
            None,
            Target::Domain("web-1"),
            &open(),
            &[(&a, false), (&b, false)],
        ) else {
            panic!("expected no binding")
        };
        assert_eq!(reason, reason::NODE_UNREACHABLE);
        assert!(message.contains("a, b") && message.contains("spec.nodeName"));
        // Named explicitly, a silent node is still taken: the user chose it.
        assert!(matches!(
            decide(Some("a"), Target::Domain("web-1"), &open(), &[(&a, false)]),
            Decision::Bind { .. }
        ));
    }

    #[test]
    fn reports_missing_and_ambiguous_domains() {
        let (a, b) = (hv("a", &["web-1"], &[]), hv("b", &["web-1"], &[]));
        let Decision::Unschedulable { reason, message } = decide(
            None,
            Target::Domain("web-1"),
            &open(),
            &[(&b, true), (&a, true)],
        ) else {
            panic!("expected ambiguity")
        };
        assert_eq!(reason, reason::AMBIGUOUS_DOMAIN);
        assert!(
            message.contains("a, b") && message.contains("spec.nodeName"),
            "{message}"
        );
        let Decision::Unschedulable { reason, .. } =
            decide(None, Target::Domain("nope"), &open(), &[(&a, true)])
        else {
            panic!("expected not found")
        };
        assert_eq!(reason, reason::DOMAIN_NOT_FOUND);
    }

    #[test]
    fn node_name_wins_but_must_exist() {
        let a = hv("a", &[], &[]);
        assert!(matches!(
            decide(Some("a"), Target::Domain("x"), &open(), &[(&a, true)]),
            Decision::Bind { .. }
        ));
        let Decision::Unschedulable { reason, .. } =
            decide(Some("z"), Target::Domain("x"), &open(), &[(&a, true)])
        else {
            panic!("expected NodeNotFound")
        };
        assert_eq!(reason, reason::NODE_NOT_FOUND);
    }

    #[test]
    fn pools_bind_to_one_node_or_ask_for_a_name() {
        let (a, b) = (hv("a", &[], &["ISO"]), hv("b", &[], &["ISO", "default"]));
        assert!(
            matches!(decide(None, Target::Pool("default"), &open(), &[(&a, true), (&b, true)]), Decision::Bind { node, .. } if node == "b")
        );
        let Decision::Unschedulable { reason, .. } = decide(
            None,
            Target::Pool("ISO"),
            &open(),
            &[(&a, true), (&b, true)],
        ) else {
            panic!()
        };
        assert_eq!(reason, reason::NODE_NAME_REQUIRED);
        let Decision::Unschedulable { reason, .. } = decide(
            None,
            Target::Pool("nfs"),
            &open(),
            &[(&a, true), (&b, true)],
        ) else {
            panic!()
        };
        assert_eq!(reason, reason::POOL_NOT_FOUND);
    }

    fn obj<K: serde::de::DeserializeOwned>(kind: &str, spec: serde_json::Value) -> K {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "virtplane.io/v1alpha1", "kind": kind,
            "metadata": {"name": "o", "namespace": "ta"}, "spec": spec,
        }))
        .unwrap()
    }

    /// What `decide` says of object `o` with `grants` on node `a` (which has team-a-web,
    /// team-b-web, pools pa and pb): (reason or "Bind", message).
    fn judge(o: &dyn Bindable, grants: &Grants) -> (&'static str, String) {
        let a = hv("a", &["team-a-web", "team-b-web"], &["pa", "pb"]);
        match decide(o.node_name(), o.target(), grants, &[(&a, true)]) {
            Decision::Bind { message, .. } => ("Bind", message),
            Decision::Unschedulable { reason, message } => (reason, message),
        }
    }

    #[test]
    fn only_granted_domains_and_pools_are_considered() {
        use serde_json::json;
        let ta = granted("ta", "team-a-*, db1", "pa");
        let storage = |vm: &str| -> VirtualMachineStorage {
            obj("VirtualMachineStorage", json!({"vm": vm, "type": "cdrom"}))
        };
        let nic =
            |vm: &str| -> VMInterface { obj("VMInterface", json!({"vm": vm, "type": "user"})) };
        let clone = |source: &str| -> VMClone { obj("VMClone", json!({"source": source})) };
        let iso = |pool: &str| -> IsoDownload {
            obj(
                "IsoDownload",
                json!({"url": "https://example.com/x.iso", "pool": pool}),
            )
        };
        let pinned: VirtualMachineStorage = obj(
            "VirtualMachineStorage",
            json!({"vm": "team-b-web", "type": "cdrom", "nodeName": "a"}),
        );
        let everything = Grants::open();
        let cases: Vec<(&str, Box<dyn Bindable>, &Grants, &str)> = vec![
            (
                "storage, other's domain",
                Box::new(storage("team-b-web")),
                &ta,
                reason::NOT_GRANTED,
            ),
            (
                "interface, other's domain",
                Box::new(nic("team-b-web")),
                &ta,
                reason::NOT_GRANTED,
            ),
            (
                "clone, other's source",
                Box::new(clone("team-b-web")),
                &ta,
                reason::NOT_GRANTED,
            ),
            (
                "download, other's pool",
                Box::new(iso("pb")),
                &ta,
                reason::NOT_GRANTED,
            ),
            (
                "spec.nodeName does not bypass the grant",
                Box::new(pinned),
                &ta,
                reason::NOT_GRANTED,
            ),
            (
                "storage, granted by prefix",
                Box::new(storage("team-a-web")),
                &ta,
                "Bind",
            ),
            (
                "interface, granted by prefix",
                Box::new(nic("team-a-web")),
                &ta,
                "Bind",
            ),
            (
                "clone, granted by prefix",
                Box::new(clone("team-a-web")),
                &ta,
                "Bind",
            ),
            ("download, granted pool", Box::new(iso("pa")), &ta, "Bind"),
            (
                "granted but missing",
                Box::new(storage("team-a-gone")),
                &ta,
                reason::DOMAIN_NOT_FOUND,
            ),
            (
                "open mode, any domain",
                Box::new(storage("team-b-web")),
                &everything,
                "Bind",
            ),
            (
                "open mode, any pool",
                Box::new(iso("pb")),
                &everything,
                "Bind",
            ),
        ];
        for (case, o, grants, want) in &cases {
            let (got, message) = judge(o.as_ref(), grants);
            assert_eq!(got, *want, "{case}: {message}");
            if got == reason::NOT_GRANTED {
                assert!(
                    message.starts_with("namespace ta may use "),
                    "{case}: {message}"
                );
                assert!(
                    !message.contains("node"),
                    "{case}: says nothing of nodes: {message}"
                );
            }
        }
        assert_eq!(
            judge(&storage("team-b-web"), &ta).1,
            "namespace ta may use domains team-a-*, db1; team-b-web is not one of them. \
             A cluster admin grants domains with the annotation virtplane.io/domains on the Namespace."
        );
        assert!(
            judge(&iso("pb"), &ta)
                .1
                .contains("storage pools pa; pb is not one of them")
        );
    }

    #[test]
    fn a_refusal_does_not_tell_whether_the_domain_exists() {
        let ta = granted("ta", "team-a-*", "");
        let existing: VirtualMachineStorage = obj(
            "VirtualMachineStorage",
            serde_json::json!({"vm": "team-b-web", "type": "cdrom"}),
        );
        let missing: VirtualMachineStorage = obj(
            "VirtualMachineStorage",
            serde_json::json!({"vm": "team-b-gone", "type": "cdrom"}),
        );
        let (r1, m1) = judge(&existing, &ta);
        let (r2, m2) = judge(&missing, &ta);
        assert_eq!((r1, r2), (reason::NOT_GRANTED, reason::NOT_GRANTED));
        assert_eq!(
            m1.replace("team-b-web", "X"),
            m2.replace("team-b-gone", "X")
        );
        let nothing = Grants::of(Mode::Namespaced, "tc", &BTreeMap::new());
        assert!(
            judge(&existing, &nothing)
                .1
                .starts_with("namespace tc may use domains none;")
        );
    }

    #[test]
    fn staleness_counts_from_the_last_heartbeat() {
        let mut h = hv("a", &[], &[]);
        let now = Timestamp::from_second(1_000).unwrap();
        assert_eq!(
            time_until_stale(&h, SignedDuration::from_secs(40), now),
            None
        );
        h.status.as_mut().unwrap().last_heartbeat_time =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Timestamp::from_second(990).unwrap(),
            ));
        assert_eq!(
            time_until_stale(&h, SignedDuration::from_secs(40), now),
            Some(SignedDuration::from_secs(30))
        );
        assert_eq!(
            time_until_stale(&h, SignedDuration::from_secs(5), now),
            None
        );
    }
}
