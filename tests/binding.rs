//! The controller binds objects to the node that has their domain or pool, elects one leader,
//! and notices nodes whose agent stopped reporting.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::{Client, ResourceExt};
use virtplane::api::{IsoDownload, NODE_LABEL, VirtualMachineStorage};

use common::*;

fn storage(name: &str, vm: &str, node: Option<&str>) -> String {
    let node = node
        .map(|n| format!("  nodeName: {n}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: virtplane.io/v1alpha1\nkind: VirtualMachineStorage\nmetadata:\n  name: {name}\nspec:\n  vm: {vm}\n  type: cdrom\n{node}"
    )
}

/// Waits until the storage object's Scheduled condition has `status` and `reason`.
async fn wait_scheduled(
    client: &Client,
    ns: &str,
    name: &str,
    status: &str,
    reason: &str,
) -> VirtualMachineStorage {
    let api: Api<VirtualMachineStorage> = Api::namespaced(client.clone(), ns);
    eventually(
        &format!("{name}: Scheduled={status} reason {reason}"),
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move {
                let obj = api.get(name).await.ok()?;
                let (s, r, _) = condition_of(&obj.status.as_ref()?.conditions, "Scheduled")?;
                // The controller writes the binding's label and status together, in either
                // order: a bound object is one with both.
                let labelled = status != "True"
                    || obj.labels().get(NODE_LABEL).map(String::as_str)
                        == obj.status.as_ref()?.node_name.as_deref();
                (s == status && r == reason && labelled).then_some(obj)
            }
        },
    )
    .await
}

fn message(obj: &VirtualMachineStorage) -> String {
    condition_of(&obj.status.as_ref().unwrap().conditions, "Scheduled")
        .unwrap()
        .2
}

#[tokio::test]
async fn binds_objects_to_the_node_that_has_their_domain_or_pool() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-bind").await;
    let agent = Agent::start(&unique("vp-node"), &["--heartbeat-seconds", "2"]);
    let _controller = start_controller(&unique("vp-ctl"), &ns.name, "virtplane-controller", &[]);
    let domain = TestDomain::define("vp-bind");
    let pool = TestPool::create("vp-bind");

    // A domain that exists before the object.
    kubectl_apply(&ns.name, &storage("existing", &domain.name, None));
    let obj = wait_scheduled(&client, &ns.name, "existing", "True", "Bound").await;
    assert_eq!(obj.labels().get(NODE_LABEL), Some(&agent.node));
    assert_eq!(
        obj.status.as_ref().unwrap().node_name.as_deref(),
        Some(agent.node.as_str())
    );

    // A domain defined after the object: the inventory change binds it, nobody touches the object.
    let later = unique("vp-later");
    kubectl_apply(&ns.name, &storage("later", &later, None));
    let obj = wait_scheduled(&client, &ns.name, "later", "False", "DomainNotFound").await;
    assert!(
        message(&obj).contains(&later),
        "message should name the domain: {}",
        message(&obj)
    );
    assert!(!obj.labels().contains_key(NODE_LABEL));
    let _later_domain = {
        let xml_domain = TestDomain {
            name: later.clone(),
        };
        let xml = format!(
            "<domain type='qemu'><name>{later}</name><memory unit='MiB'>64</memory>\
             <os><type arch='x86_64' machine='q35'>hvm</type></os></domain>"
        );
        let path = log_dir().join(format!("{later}.xml"));
        std::fs::write(&path, xml).unwrap();
        virsh(&["define", path.to_str().unwrap()]);
        xml_domain
    };
    let obj = wait_scheduled(&client, &ns.name, "later", "True", "Bound").await;
    assert_eq!(obj.labels().get(NODE_LABEL), Some(&agent.node));

    // spec.nodeName naming a node without an agent.
    kubectl_apply(
        &ns.name,
        &storage("nowhere", &domain.name, Some("no-such-node")),
    );
    let obj = wait_scheduled(&client, &ns.name, "nowhere", "False", "NodeNotFound").await;
    assert!(message(&obj).contains("no-such-node"));

    // IsoDownloads bind to the node that has the pool.
    let iso = |name: &str, pool: &str| {
        format!(
            "apiVersion: virtplane.io/v1alpha1\nkind: IsoDownload\nmetadata:\n  name: {name}\nspec:\n  url: https://example.invalid/{name}.iso\n  pool: {pool}\n"
        )
    };
    kubectl_apply(&ns.name, &iso("in-pool", &pool.name));
    kubectl_apply(&ns.name, &iso("no-pool", "no-such-pool"));
    let isos: Api<IsoDownload> = Api::namespaced(client.clone(), &ns.name);
    let scheduled = |name: &'static str| {
        let isos = isos.clone();
        move || {
            let isos = isos.clone();
            async move {
                let o = isos.get(name).await.ok()?;
                let c = condition_of(&o.status.as_ref()?.conditions, "Scheduled")?;
                Some((o, c))
            }
        }
    };
    let (o, (s, r, _)) = eventually(
        "in-pool bound",
        Duration::from_secs(30),
        scheduled("in-pool"),
    )
    .await;
    assert_eq!((s.as_str(), r.as_str()), ("True", "Bound"));
    assert_eq!(o.labels().get(NODE_LABEL), Some(&agent.node));
    let (_, (s, r, m)) = eventually(
        "no-pool judged",
        Duration::from_secs(30),
        scheduled("no-pool"),
    )
    .await;
    assert_eq!((s.as_str(), r.as_str()), ("False", "PoolNotFound"), "{m}");
}

#[tokio::test]
async fn ambiguous_domains_ask_for_a_node_and_silent_nodes_become_unreachable() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-ambig").await;
    // Two agents on the same libvirtd: every domain is on both nodes.
    let a = Agent::start(&unique("vp-a"), &["--heartbeat-seconds", "1"]);
    let mut b = Agent::start(&unique("vp-b"), &["--heartbeat-seconds", "1"]);
    let _controller = start_controller(
        &unique("vp-ctl"),
        &ns.name,
        "virtplane-controller",
        &["--node-grace-seconds", "4"],
    );
    let domain = TestDomain::define("vp-ambig");

    kubectl_apply(&ns.name, &storage("ambiguous", &domain.name, None));
    let obj = wait_scheduled(&client, &ns.name, "ambiguous", "False", "AmbiguousDomain").await;
    let msg = message(&obj);
    assert!(
        msg.contains(&a.node) && msg.contains(&b.node) && msg.contains("spec.nodeName"),
        "{msg}"
    );

    kubectl_apply(&ns.name, &storage("on-b", &domain.name, Some(&b.node)));
    let obj = wait_scheduled(&client, &ns.name, "on-b", "True", "Bound").await;
    assert_eq!(obj.labels().get(NODE_LABEL), Some(&b.node));

    // Node b's agent stops: after the grace period the binding holds but says the node is unreachable.
    assert!(b.process.terminate());
    let obj = wait_scheduled(&client, &ns.name, "on-b", "True", "NodeUnreachable").await;
    assert_eq!(obj.labels().get(NODE_LABEL), Some(&b.node));
    let hv = wait_hypervisor(
        &client,
        &b.node,
        "Ready=False NodeUnreachable",
        Duration::from_secs(30),
        |h| {
            h.status
                .as_ref()
                .and_then(|s| condition_of(&s.conditions, "Ready"))
                .is_some_and(|(s, r, _)| s == "False" && r == "NodeUnreachable")
        },
    )
    .await;
    assert!(hv.status.is_some());
    // The other node keeps reporting and stays Ready.
    wait_hypervisor(
        &client,
        &a.node,
        "still Ready",
        Duration::from_secs(10),
        |h| {
            h.status
                .as_ref()
                .and_then(|s| condition_of(&s.conditions, "Ready"))
                .is_some_and(|(s, _, _)| s == "True")
        },
    )
    .await;
}

#[tokio::test]
async fn one_leader_binds_and_a_standby_takes_over_when_it_dies() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-leader").await;
    let _agent = Agent::start(&unique("vp-node"), &["--heartbeat-seconds", "2"]);
    let domain = TestDomain::define("vp-leader");
    let lease = unique("vp-lease");
    let (id1, id2) = (unique("vp-ctl1"), unique("vp-ctl2"));
    let mut c1 = start_controller(&id1, &ns.name, &lease, &["--lease-seconds", "4"]);
    let mut c2 = start_controller(&id2, &ns.name, &lease, &["--lease-seconds", "4"]);

    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let holder = || {
        let leases = leases.clone();
        let lease = lease.clone();
        async move {
            leases
                .get(&lease)
                .await
                .ok()?
                .spec?
                .holder_identity
                .filter(|h| !h.is_empty())
        }
    };
    // The leader is the holder that says it leads: the Lease can name a controller for a moment
    // before the election settles (CI once sampled the standby there).
    let leader = eventually("a settled leader", Duration::from_secs(30), || {
        let (c1, c2, id1, id2) = (&c1, &c2, &id1, &id2);
        let holder = holder();
        async move {
            let h = holder.await?;
            let (lead, other) = match h {
                _ if h == *id1 => (c1, c2),
                _ if h == *id2 => (c2, c1),
                _ => return None,
            };
            (lead.log_text().contains("became leader")
                && !other.log_text().contains("became leader"))
            .then_some(h)
        }
    })
    .await;

    kubectl_apply(&ns.name, &storage("first", &domain.name, None));
    wait_scheduled(&client, &ns.name, "first", "True", "Bound").await;
    let (leader_proc, standby_proc) = if leader == id1 {
        (&mut c1, &mut c2)
    } else {
        (&mut c2, &mut c1)
    };
    assert!(
        leader_proc.log_text().contains("bound"),
        "the leader should have bound the object"
    );
    assert!(
        !standby_proc.log_text().contains("bound"),
        "the standby must not bind:\n{}",
        standby_proc.log_text()
    );
    assert!(!standby_proc.log_text().contains("became leader"));

    // Kill the leader without letting it release the lease.
    let pid = leader_proc.pid();
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    let new_leader = eventually(
        "the standby holds the lease",
        Duration::from_secs(30),
        || async { holder().await.filter(|h| *h != leader) },
    )
    .await;
    assert_ne!(new_leader, leader);
    kubectl_apply(&ns.name, &storage("second", &domain.name, None));
    wait_scheduled(&client, &ns.name, "second", "True", "Bound").await;
    assert!(standby_proc.log_text().contains("became leader"));
}

#[tokio::test]
async fn an_agent_reconciles_only_the_objects_bound_to_its_node() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-sel").await;
    let a = Agent::start(&unique("vp-a"), &["--heartbeat-seconds", "2"]);
    let b = Agent::start(&unique("vp-b"), &["--heartbeat-seconds", "2"]);
    let _controller = start_controller(&unique("vp-ctl"), &ns.name, "virtplane-controller", &[]);
    let domain = TestDomain::define("vp-sel");
    for i in 0..3 {
        kubectl_apply(
            &ns.name,
            &storage(&format!("on-a-{i}"), &domain.name, Some(&a.node)),
        );
        kubectl_apply(
            &ns.name,
            &storage(&format!("on-b-{i}"), &domain.name, Some(&b.node)),
        );
    }
    let api: Api<VirtualMachineStorage> = Api::namespaced(client.clone(), &ns.name);
    for i in 0..3 {
        for (prefix, node) in [("on-a", &a.node), ("on-b", &b.node)] {
            let name = format!("{prefix}-{i}");
            let obj = wait_scheduled(&client, &ns.name, &name, "True", "Bound").await;
            assert_eq!(obj.labels().get(NODE_LABEL), Some(node));
            // The agent of the bound node, and only that one, answers with its Ready condition.
            eventually(&format!("{name} Ready from its agent"), Duration::from_secs(30), || {
                let api = api.clone();
                let name = name.clone();
                async move { condition_of(&api.get(&name).await.ok()?.status?.conditions, "Ready") }
            })
            .await;
        }
    }
    let (log_a, log_b) = (a.process.log_text(), b.process.log_text());
    for i in 0..3 {
        let (mine, theirs) = (
            format!("{}/on-a-{i}", ns.name),
            format!("{}/on-b-{i}", ns.name),
        );
        assert!(
            log_a.contains(&mine) && !log_a.contains(&theirs),
            "agent a reconciled {theirs} or missed {mine}"
        );
        let (mine, theirs) = (theirs, mine);
        assert!(
            log_b.contains(&mine) && !log_b.contains(&theirs),
            "agent b reconciled {theirs} or missed {mine}"
        );
    }
}
