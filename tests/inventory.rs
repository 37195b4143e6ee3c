//! The agent's Hypervisor inventory follows libvirt through its events.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use kube::ResourceExt;
use kube::api::Api;
use virtplane::api::Hypervisor;
use virtplane::conditions::{find, is_true};

use common::*;

fn domain_state(h: &Hypervisor, name: &str) -> Option<String> {
    h.status
        .as_ref()?
        .domains
        .iter()
        .find(|d| d.name == name)
        .map(|d| d.state.clone())
}

#[tokio::test]
async fn inventory_follows_libvirt_domain_events() {
    let client = client().await;
    install_crds(&client).await;
    let node = unique("vp-inv");
    // A heartbeat of an hour: only libvirt events can refresh the inventory during this test.
    let agent = Agent::start(&node, &["--heartbeat-seconds", "3600"]);

    let hv = wait_hypervisor(&client, &node, "Ready=True", Duration::from_secs(60), |h| {
        h.status
            .as_ref()
            .is_some_and(|s| is_true(&s.conditions, "Ready"))
    })
    .await;
    let status = hv.status.unwrap();
    assert!(
        status
            .libvirt_version
            .as_deref()
            .is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit()))
    );
    assert!(status.hypervisor_version.is_some());
    assert!(status.last_heartbeat_time.is_some());
    assert!(
        status
            .storage_pools
            .iter()
            .any(|p| p.name == "default" && p.type_ == "dir" && p.active),
        "the default pool is missing from {:?}",
        status.storage_pools
    );
    assert_eq!(
        find(&status.conditions, "Ready").unwrap().reason,
        "LibvirtConnected"
    );

    let domain = TestDomain::define("vp-inv");
    wait_hypervisor(
        &client,
        &node,
        "defined domain listed as shutoff",
        Duration::from_secs(20),
        |h| domain_state(h, &domain.name).as_deref() == Some("shutoff"),
    )
    .await;

    virsh(&["start", &domain.name]);
    wait_hypervisor(
        &client,
        &node,
        "started domain listed as running",
        Duration::from_secs(20),
        |h| domain_state(h, &domain.name).as_deref() == Some("running"),
    )
    .await;

    virsh(&["destroy", &domain.name]);
    wait_hypervisor(
        &client,
        &node,
        "stopped domain listed as shutoff",
        Duration::from_secs(20),
        |h| domain_state(h, &domain.name).as_deref() == Some("shutoff"),
    )
    .await;

    virsh(&["undefine", &domain.name]);
    wait_hypervisor(
        &client,
        &node,
        "undefined domain gone",
        Duration::from_secs(20),
        |h| h.status.is_some() && domain_state(h, &domain.name).is_none(),
    )
    .await;
    drop(agent);
}

#[tokio::test]
async fn heartbeat_advances_and_agent_stops_cleanly_on_sigterm() {
    use k8s_openapi::api::coordination::v1::Lease;
    let client = client().await;
    install_crds(&client).await;
    let node = unique("vp-hb");
    let mut agent = Agent::start(&node, &["--heartbeat-seconds", "1"]);

    // The heartbeat is the node Lease, renewed every second; the Hypervisor is not rewritten.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease = format!("virtplane-node-{node}");
    let renewed = |l: Lease| l.spec?.renew_time.map(|t| t.0);
    let first = eventually("a heartbeat", Duration::from_secs(60), || async {
        renewed(leases.get(&lease).await.ok()?)
    })
    .await;
    eventually("a later heartbeat", Duration::from_secs(20), || async {
        let hb = renewed(leases.get(&lease).await.ok()?)?;
        (hb > first).then_some(())
    })
    .await;
    let l = leases.get(&lease).await.unwrap();
    assert_eq!(
        l.labels().get("virtplane.io/node"),
        Some(&node),
        "the controller finds node Leases by this label"
    );
    assert_eq!(
        l.spec.unwrap().holder_identity.as_deref(),
        Some(node.as_str())
    );
    assert!(
        agent.process.terminate(),
        "the agent did not exit cleanly on SIGTERM:\n{}",
        agent.process.log_text()
    );
}
