//! Tenancy, agent side, for VMInterface and VMClone: with `--tenancy namespaced` the agent
//! re-checks every grant before it changes anything. A tenant may put the node label on its
//! objects itself (the controller then takes the binding as given), so each cross-tenant attempt
//! here reaches the agent, which refuses it with `NotGranted` and leaves libvirt and the disks
//! as they were. The same requests inside the grant succeed; a revoke keeps an attached NIC and
//! deleting it still detaches; a grant made later starts a waiting clone without a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use virtplane::api::{ClonePhase, NODE_LABEL, VMClone, VMInterface};

use common::*;

const T: Duration = Duration::from_secs(120);

/// Sets namespace `ns`'s grants, as a cluster admin would.
async fn grant(client: &Client, ns: &str, domains: &str, pools: &str, networks: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let patch = json!({"metadata": {"annotations": {
        "virtplane.io/domains": domains,
        "virtplane.io/pools": pools,
        "virtplane.io/networks": networks,
    }}});
    api.patch(ns, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotate the namespace");
}

/// An object of `kind`; with `node`, labelled for that node by its author (no controller asked).
fn manifest(kind: &str, name: &str, node: Option<&str>, spec: serde_json::Value) -> String {
    let mut m = json!({
        "apiVersion": "virtplane.io/v1alpha1", "kind": kind,
        "metadata": {"name": name}, "spec": spec,
    });
    if let Some(node) = node {
        m["metadata"]["labels"] = json!({ NODE_LABEL: node });
    }
    m.to_string()
}

fn ready_of(c: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> (String, String) {
    condition_of(c, "Ready")
        .map(|(s, r, _)| (s, r))
        .unwrap_or_default()
}

fn nic_ready(o: &VMInterface) -> (String, String) {
    ready_of(o.status.as_ref().map_or(&[][..], |s| &s.conditions))
}

fn clone_ready(o: &VMClone) -> (String, String) {
    ready_of(o.status.as_ref().map_or(&[][..], |s| &s.conditions))
}

fn ready_message(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> String {
    condition_of(conditions, "Ready").unwrap().2
}

async fn nic_reason(
    client: &Client,
    ns: &str,
    name: &str,
    status: &str,
    reason: &str,
) -> VMInterface {
    wait_obj::<VMInterface>(
        client,
        ns,
        name,
        &format!("Ready={status} {reason}"),
        T,
        |o| nic_ready(o) == (status.to_string(), reason.to_string()),
    )
    .await
}

async fn clone_reason(
    client: &Client,
    ns: &str,
    name: &str,
    status: &str,
    reason: &str,
) -> VMClone {
    wait_obj::<VMClone>(
        client,
        ns,
        name,
        &format!("Ready={status} {reason}"),
        T,
        |o| clone_ready(o) == (status.to_string(), reason.to_string()),
    )
    .await
}

/// The file names in `dir`.
fn files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Every domain libvirt has, running or not.
fn domains() -> BTreeSet<String> {
    virsh(&["list", "--all", "--name"])
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// A shut-off domain `{prefix}-…` with one writable raw disk `disk` (created sparse).
fn domain_with_disk(prefix: &str, disk: &Path) -> TestDomain {
    std::fs::File::create(disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let dom = TestDomain::define(prefix);
    let xml = config_xml(&dom.name).replace(
        "</devices>",
        &format!(
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vda' bus='virtio'/></disk></devices>",
            disk.display()
        ),
    );
    let path = log_dir().join(format!("{}-disk.xml", dom.name));
    std::fs::write(&path, xml).unwrap();
    virsh(&["define", path.to_str().unwrap()]);
    dom
}

/// Two tenants: each namespace and its own domain prefix.
struct Tenants {
    ta: TestNamespace,
    tb: TestNamespace,
    pa: String,
    pb: String,
}

async fn tenants(client: &Client, what: &str) -> Tenants {
    Tenants {
        ta: TestNamespace::new(client, &format!("vp-{what}-ta")).await,
        tb: TestNamespace::new(client, &format!("vp-{what}-tb")).await,
        pa: unique("vpta"),
        pb: unique("vptb"),
    }
}

fn start(ns: &str) -> (Agent, Process) {
    let agent = Agent::start(
        &unique("vp-node"),
        &["--heartbeat-seconds", "2", NAMESPACED[0], NAMESPACED[1]],
    );
    let controller = start_controller(&unique("vp-ctl"), ns, "virtplane-controller", &NAMESPACED);
    (agent, controller)
}

#[tokio::test]
async fn nics_reach_only_granted_domains_and_sources() {
    let client = client().await;
    install_crds(&client).await;
    let t = tenants(&client, "nic").await;
    let dom_a = TestDomain::define(&format!("{}-web", t.pa));
    let dom_b = TestDomain::define(&format!("{}-web", t.pb));
    grant(&client, &t.ta.name, &format!("{}-*", t.pa), "", "default").await;
    grant(&client, &t.tb.name, &format!("{}-*", t.pb), "", "user").await;
    let (agent, _controller) = start(&t.ta.name);
    let node = Some(agent.node.as_str());
    let (before_a, before_b) = (config_xml(&dom_a.name), config_xml(&dom_b.name));

    // Across the boundary, labelled for the node by the tenant itself.
    let ns = &t.ta.name;
    kubectl_apply(
        ns,
        &manifest(
            "VMInterface",
            "x-domain",
            node,
            json!({"vm": dom_b.name, "type": "network"}),
        ),
    );
    kubectl_apply(
        ns,
        &manifest(
            "VMInterface",
            "x-user",
            node,
            json!({"vm": dom_a.name, "type": "user"}),
        ),
    );
    kubectl_apply(
        ns,
        &manifest(
            "VMInterface",
            "x-bridge",
            node,
            json!({"vm": dom_a.name, "type": "bridge", "source": "virbr0"}),
        ),
    );
    for (name, refused) in [
        ("x-domain", dom_b.name.clone()),
        ("x-user", "user".to_string()),
        ("x-bridge", "bridge:virbr0".to_string()),
    ] {
        let o = nic_reason(&client, ns, name, "False", "NotGranted").await;
        let msg = ready_message(&o.status.as_ref().unwrap().conditions);
        assert!(
            msg.starts_with(&format!("namespace {ns} may use "))
                && msg.contains(&format!("; {refused} is not one of them")),
            "{name}: {msg}"
        );
        assert!(
            !msg.contains(&t.tb.name) && !msg.contains(&format!("{}-*", t.pb)),
            "{name} names the other tenant: {msg}"
        );
        assert!(
            o.status.as_ref().unwrap().mac.is_none(),
            "{name}: no MAC was even chosen"
        );
    }
    assert_eq!(
        config_xml(&dom_a.name),
        before_a,
        "nothing changed in the own domain"
    );
    assert_eq!(
        config_xml(&dom_b.name),
        before_b,
        "nothing changed in the other's domain"
    );

    // Inside the grant (bound by the controller): attached.
    kubectl_apply(
        ns,
        &manifest(
            "VMInterface",
            "own",
            None,
            json!({"vm": dom_a.name, "type": "network"}),
        ),
    );
    let own = nic_reason(&client, ns, "own", "True", "Attached").await;
    let mac = own.status.unwrap().mac.unwrap();
    assert!(config_xml(&dom_a.name).contains(&mac));

    // Revoked: the NIC stays, the object says why it no longer changes.
    grant(&client, ns, &format!("{}-*", t.pa), "", "").await;
    nic_reason(&client, ns, "own", "False", "NotGranted").await;
    kubectl_apply(
        ns,
        &manifest(
            "VMInterface",
            "own",
            None,
            json!({"vm": dom_a.name, "type": "network", "linkState": "down"}),
        ),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let xml = config_xml(&dom_a.name);
    assert!(
        xml.contains(&mac) && !xml.contains("state='down'"),
        "the NIC stays, unchanged: {xml}"
    );
    // Deleting it detaches it all the same.
    kubectl_delete(ns, "vminterface", "own");
    wait_gone::<VMInterface>(&client, ns, "own", T).await;
    assert!(!config_xml(&dom_a.name).contains(&mac));
}

#[tokio::test]
async fn clones_reach_only_granted_domains_and_pools() {
    let client = client().await;
    install_crds(&client).await;
    let t = tenants(&client, "cl").await;
    let pool_a = TestPool::create("vp-ta");
    let pool_b = TestPool::create("vp-tb");
    let dom_a = domain_with_disk(&format!("{}-web", t.pa), &pool_a.path.join("a.img"));
    let dom_b = domain_with_disk(&format!("{}-web", t.pb), &pool_b.path.join("b.img"));
    // A domain of tenant a whose disk lies in tenant b's pool (an admin's mistake).
    let dom_a_in_b = domain_with_disk(&format!("{}-odd", t.pa), &pool_b.path.join("odd.img"));
    grant(
        &client,
        &t.ta.name,
        &format!("{}-*", t.pa),
        &pool_a.name,
        "",
    )
    .await;
    grant(
        &client,
        &t.tb.name,
        &format!("{}-*", t.pb),
        &pool_b.name,
        "",
    )
    .await;
    let (agent, _controller) = start(&t.ta.name);
    let node = Some(agent.node.as_str());
    let ns = &t.ta.name;
    let outside = unique("vp-outside");
    let (domains_before, files_a, files_b) = (domains(), files(&pool_a.path), files(&pool_b.path));

    kubectl_apply(
        ns,
        &manifest("VMClone", "x-source", node, json!({"source": dom_b.name})),
    );
    kubectl_apply(
        ns,
        &manifest(
            "VMClone",
            "x-target",
            node,
            json!({"source": dom_a.name, "targetName": outside}),
        ),
    );
    kubectl_apply(
        ns,
        &manifest(
            "VMClone",
            "x-pool",
            node,
            json!({"source": dom_a_in_b.name}),
        ),
    );
    for (name, says) in [
        ("x-source", format!("; {} is not one of them", dom_b.name)),
        (
            "x-target",
            format!(
                "spec.targetName: namespace {ns} may use domains {}-*; {outside} is not",
                t.pa
            ),
        ),
        (
            "x-pool",
            format!(
                "storage pools {}; {} is not one of them",
                pool_a.name, pool_b.name
            ),
        ),
    ] {
        let o = clone_reason(&client, ns, name, "False", "NotGranted").await;
        let st = o.status.clone().unwrap();
        assert_eq!(
            st.phase,
            Some(ClonePhase::Pending),
            "{name}: waits for a grant"
        );
        assert!(
            st.target_name.is_none() && st.disks.is_empty(),
            "{name}: nothing planned"
        );
        let msg = ready_message(&st.conditions);
        assert!(msg.contains(&says), "{name}: {msg}");
        assert!(
            !msg.contains(&t.tb.name),
            "{name} names the other namespace: {msg}"
        );
    }
    assert_eq!(domains(), domains_before, "no domain was defined");
    assert_eq!(files(&pool_a.path), files_a, "nothing was copied");
    assert_eq!(files(&pool_b.path), files_b, "nothing was copied");

    // Inside the grant: cloned into the tenant's pool, the clone's metadata names the namespace.
    kubectl_apply(
        ns,
        &manifest("VMClone", "own", None, json!({"source": dom_a.name})),
    );
    let own = clone_reason(&client, ns, "own", "True", "Completed").await;
    let st = own.status.unwrap();
    let target = st.target_name.unwrap();
    let _clone = TestDomain {
        name: target.clone(),
    };
    assert_eq!(target, format!("{}-clone1", dom_a.name));
    assert_eq!(st.disks[0].pool.as_deref(), Some(pool_a.name.as_str()));
    assert!(PathBuf::from(st.disks[0].target.clone().unwrap()).starts_with(&pool_a.path));
    let xml = config_xml(&target);
    assert!(
        xml.contains(&format!("namespace=\"{ns}\""))
            && xml.contains("https://virtplane.io/xmlns/clone/v1"),
        "{xml}"
    );

    // Granted later: the waiting task starts without a restart.
    grant(
        &client,
        ns,
        &format!("{}-*, {outside}", t.pa),
        &pool_a.name,
        "",
    )
    .await;
    let later = clone_reason(&client, ns, "x-target", "True", "Completed").await;
    let _outside = TestDomain {
        name: outside.clone(),
    };
    assert_eq!(
        later.status.unwrap().target_name.as_deref(),
        Some(outside.as_str())
    );
    // The others still wait: their grants are still missing.
    for name in ["x-source", "x-pool"] {
        clone_reason(&client, ns, name, "False", "NotGranted").await;
    }
    assert!(!domains().contains(&format!("{}-clone1", dom_b.name)));
    assert_eq!(files(&pool_b.path), files_b);
}
