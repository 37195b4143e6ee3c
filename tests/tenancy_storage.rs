//! Tenancy, agent side, for VirtualMachineStorage and IsoDownload: in namespaced mode the agent
//! re-checks every grant in its plan, whatever bound the object (here the tenant labels its
//! objects with the node itself, as a stale controller view would leave them). Cross-tenant
//! requests are refused with `NotGranted` and change nothing in libvirt or on disk; the same
//! requests inside the grant go ahead; a revoked grant keeps the attached device, and deleting
//! the object still detaches it; a grant made later lets a waiting object go ahead without a
//! restart. Shut-off domains only: no guest is needed for any of it.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "download/http_server.rs"]
#[allow(dead_code)]
mod http_server;

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use virtplane::api::{DownloadPhase, IsoDownload, NODE_LABEL, VirtualMachineStorage};

use common::*;
use http_server::HttpServer;

type Vms = VirtualMachineStorage;
const T: Duration = Duration::from_secs(90);

/// Grants `domains` and `pools` to namespace `ns`, as a cluster admin would.
async fn grant(client: &Client, ns: &str, domains: &str, pools: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let patch = json!({"metadata": {"annotations": {
        "virtplane.io/domains": domains,
        "virtplane.io/pools": pools,
    }}});
    api.patch(ns, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// Creates object `name` of `kind` in `ns`, already labelled with `node`.
fn create(ns: &str, node: &str, kind: &str, name: &str, spec: serde_json::Value) {
    kubectl_apply(
        ns,
        &json!({
            "apiVersion": "virtplane.io/v1alpha1", "kind": kind,
            "metadata": {"name": name, "labels": {NODE_LABEL: node}},
            "spec": spec,
        })
        .to_string(),
    );
}

fn ready_of(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> Option<(String, String, String)> {
    condition_of(conditions, "Ready")
}

/// Waits until storage `name` is Ready with `status` and `reason`; returns it and the message.
async fn storage(
    client: &Client,
    ns: &str,
    name: &str,
    status: &str,
    reason: &str,
) -> (Vms, String) {
    let o: Vms = wait_obj(
        client,
        ns,
        name,
        &format!("Ready={status} {reason}"),
        T,
        |o: &Vms| {
            o.status
                .as_ref()
                .and_then(|s| ready_of(&s.conditions))
                .is_some_and(|(s, r, _)| s == status && r == reason)
        },
    )
    .await;
    let msg = ready_of(&o.status.as_ref().unwrap().conditions).unwrap().2;
    (o, msg)
}

/// Waits until download `name` is Ready with `status` and `reason`; returns it and the message.
async fn download(
    client: &Client,
    ns: &str,
    name: &str,
    status: &str,
    reason: &str,
) -> (IsoDownload, String) {
    let o: IsoDownload = wait_obj(
        client,
        ns,
        name,
        &format!("Ready={status} {reason}"),
        T,
        |o: &IsoDownload| {
            o.status
                .as_ref()
                .and_then(|s| ready_of(&s.conditions))
                .is_some_and(|(s, r, _)| s == status && r == reason)
        },
    )
    .await;
    let msg = ready_of(&o.status.as_ref().unwrap().conditions).unwrap().2;
    (o, msg)
}

/// Creates a sparse raw image in the pool and refreshes the pool; returns its path.
fn image(pool: &TestPool, name: &str) -> String {
    let path = pool.path.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    virsh(&["pool-refresh", &pool.name]);
    path.to_str().unwrap().to_string()
}

fn alias(o: &Vms) -> String {
    format!("ua-vps-{}", o.uid().unwrap())
}

fn namespaced_agent() -> Agent {
    Agent::start(
        &unique("vp-node"),
        &["--heartbeat-seconds", "2", NAMESPACED[0], NAMESPACED[1]],
    )
}

#[tokio::test]
async fn cross_tenant_requests_are_refused_and_the_same_ones_inside_the_grant_go_ahead() {
    let client = client().await;
    install_crds(&client).await;
    let ta = TestNamespace::new(&client, "vp-tsa").await;
    let tb = TestNamespace::new(&client, "vp-tsb").await;
    let (pa, pb) = (unique("vptsa"), unique("vptsb"));
    let dom_a = TestDomain::define(&format!("{pa}-web"));
    let dom_b = TestDomain::define(&format!("{pb}-web"));
    let pool_a = TestPool::create("vp-tsa");
    let pool_b = TestPool::create("vp-tsb");
    let a_img = image(&pool_a, "a.img");
    image(&pool_a, "a2.img");
    let b_img = image(&pool_b, "b.img");
    // Ways into the other tenant's pool from a path that starts in one's own.
    let link = pool_a.path.join("link.img");
    std::os::unix::fs::symlink(&b_img, &link).unwrap();
    let dotdot = format!("{}/../{}/b.img", pool_a.path.display(), pool_b.name);
    grant(&client, &ta.name, &format!("{pa}-*"), &pool_a.name).await;
    grant(&client, &tb.name, &format!("{pb}-*"), &pool_b.name).await;
    let server = HttpServer::start(vec![7u8; 1 << 20], None).await;
    let agent = namespaced_agent();
    let node = agent.node.as_str();
    let b_config = config_xml(&dom_b.name);
    let b_files = pool_b.files();

    // Tenant ta aims at tb's domain and pool every way it can.
    let ns = ta.name.as_str();
    let disk = |path: &str| json!({"vm": dom_a.name, "type": "disk", "source": {"path": path}});
    create(
        ns,
        node,
        "VirtualMachineStorage",
        "x-domain",
        json!({"vm": dom_b.name, "type": "disk", "source": {"path": a_img}}),
    );
    create(ns, node, "VirtualMachineStorage", "x-path", disk(&b_img));
    create(
        ns,
        node,
        "VirtualMachineStorage",
        "x-link",
        disk(link.to_str().unwrap()),
    );
    create(ns, node, "VirtualMachineStorage", "x-dotdot", disk(&dotdot));
    create(
        ns,
        node,
        "VirtualMachineStorage",
        "x-volume",
        json!({"vm": dom_a.name, "type": "disk", "source": {"volume": {"pool": pool_b.name, "name": "b.img"}}}),
    );
    create(
        ns,
        node,
        "IsoDownload",
        "x-iso",
        json!({"url": server.url("x.iso"), "pool": pool_b.name}),
    );
    create(
        ns,
        node,
        "VirtualMachineStorage",
        "x-cd",
        json!({"vm": dom_a.name, "type": "cdrom", "bus": "sata", "source": {"isoDownload": "x-iso"}}),
    );
    // The same requests inside its grant.
    create(ns, node, "VirtualMachineStorage", "own-path", disk(&a_img));
    create(
        ns,
        node,
        "VirtualMachineStorage",
        "own-volume",
        json!({"vm": dom_a.name, "type": "disk", "source": {"volume": {"pool": pool_a.name, "name": "a2.img"}}}),
    );
    create(
        ns,
        node,
        "IsoDownload",
        "own-iso",
        json!({"url": server.url("own.iso"), "pool": pool_a.name}),
    );
    create(
        ns,
        node,
        "VirtualMachineStorage",
        "own-cd",
        json!({"vm": dom_a.name, "type": "cdrom", "bus": "sata", "source": {"isoDownload": "own-iso"}}),
    );

    let mut messages = Vec::new();
    for name in [
        "x-domain", "x-path", "x-link", "x-dotdot", "x-volume", "x-cd",
    ] {
        messages.push(storage(&client, ns, name, "False", "NotGranted").await.1);
    }
    let (x_iso, iso_msg) = download(&client, ns, "x-iso", "False", "NotGranted").await;
    assert_eq!(x_iso.status.unwrap().phase, Some(DownloadPhase::Pending));
    messages.push(iso_msg);
    for m in &messages {
        assert!(m.starts_with(&format!("namespace {ns} may use ")), "{m}");
        assert!(!m.contains(&tb.name), "names the other namespace: {m}");
        assert!(
            !m.contains(&format!("{pb}-*")),
            "names the other's grant: {m}"
        );
    }
    assert!(
        messages[0].contains(&format!(
            "domains {pa}-*; {} is not one of them",
            dom_b.name
        )),
        "{}",
        messages[0]
    );
    for m in &messages[1..4] {
        assert!(
            m.contains(&format!("storage pools {}; ", pool_a.name)) && m.contains("is not inside"),
            "{m}"
        );
    }
    assert!(
        messages[4].contains(&format!(
            "storage pools {}; {} is not one of them",
            pool_a.name, pool_b.name
        )),
        "{}",
        messages[4]
    );

    // Inside the grant: attached to the definition, downloaded, inserted.
    let own_path = storage(&client, ns, "own-path", "True", "Attached").await.0;
    storage(&client, ns, "own-volume", "True", "Attached").await;
    download(&client, ns, "own-iso", "True", "Completed").await;
    storage(&client, ns, "own-cd", "True", "Attached").await;
    let a_config = config_xml(&dom_a.name);
    assert!(a_config.contains(&alias(&own_path)), "{a_config}");
    assert!(a_config.contains("own.iso"), "{a_config}");

    // Nothing changed in libvirt or on disk for the refused ones.
    assert_eq!(
        config_xml(&dom_b.name),
        b_config,
        "the other tenant's domain changed"
    );
    assert_eq!(pool_b.files(), b_files, "the other tenant's pool changed");
    assert!(
        !a_config.contains(&b_img) && !a_config.contains("link.img"),
        "{a_config}"
    );
    assert_eq!(a_config.matches("<disk").count(), 3, "{a_config}");

    // Deleting refused objects needs no grant and touches nothing.
    for name in ["x-domain", "x-path"] {
        kubectl_delete(ns, "virtualmachinestorage", name);
        wait_gone::<Vms>(&client, ns, name, T).await;
    }
    kubectl_delete(ns, "isodownload", "x-iso");
    wait_gone::<IsoDownload>(&client, ns, "x-iso", T).await;
    assert_eq!(config_xml(&dom_b.name), b_config);
    assert_eq!(pool_b.files(), b_files);
    drop(agent);
}

#[tokio::test]
async fn a_revoked_grant_keeps_the_device_and_a_later_grant_goes_ahead() {
    let client = client().await;
    install_crds(&client).await;
    let ta = TestNamespace::new(&client, "vp-tsr").await;
    let tb = TestNamespace::new(&client, "vp-tsl").await;
    let (pa, pb) = (unique("vptsr"), unique("vptsl"));
    let dom_a = TestDomain::define(&format!("{pa}-db"));
    let dom_b = TestDomain::define(&format!("{pb}-db"));
    let pool_a = TestPool::create("vp-tsr");
    let pool_b = TestPool::create("vp-tsl");
    let a_img = image(&pool_a, "a.img");
    let b_img = image(&pool_b, "b.img");
    grant(&client, &ta.name, &format!("{pa}-*"), &pool_a.name).await;
    let server = HttpServer::start(vec![9u8; 1 << 20], None).await;
    let agent = namespaced_agent();
    let node = agent.node.as_str();

    // Revoked: the device stays, the object says NotGranted and changes nothing more.
    create(
        &ta.name,
        node,
        "VirtualMachineStorage",
        "disk",
        json!({"vm": dom_a.name, "type": "disk", "source": {"path": a_img}}),
    );
    let (attached, _) = storage(&client, &ta.name, "disk", "True", "Attached").await;
    let dev = alias(&attached);
    assert!(config_xml(&dom_a.name).contains(&dev));
    grant(&client, &ta.name, "", &pool_a.name).await;
    let (revoked, msg) = storage(&client, &ta.name, "disk", "False", "NotGranted").await;
    assert!(msg.contains("may use domains none;"), "{msg}");
    assert!(
        config_xml(&dom_a.name).contains(&dev),
        "detached behind the user's back"
    );
    assert_eq!(
        revoked.status.unwrap().persistent,
        Some(true),
        "the status still tells the device is there"
    );
    // Deleting it still detaches its own device.
    kubectl_delete(&ta.name, "virtualmachinestorage", "disk");
    wait_gone::<Vms>(&client, &ta.name, "disk", T).await;
    assert!(
        !config_xml(&dom_a.name).contains(&dev),
        "not detached on delete"
    );

    // Granted later: tb's waiting objects go ahead, with no restart.
    let ns = tb.name.as_str();
    create(
        ns,
        node,
        "IsoDownload",
        "later",
        json!({"url": server.url("later.iso"), "pool": pool_b.name}),
    );
    create(
        ns,
        node,
        "VirtualMachineStorage",
        "waiting",
        json!({"vm": dom_b.name, "type": "disk", "source": {"path": b_img}}),
    );
    let (_, msg) = storage(&client, ns, "waiting", "False", "NotGranted").await;
    assert!(msg.contains("may use domains none;"), "{msg}");
    let (_, msg) = download(&client, ns, "later", "False", "NotGranted").await;
    assert!(msg.contains("may use storage pools none;"), "{msg}");
    assert!(!config_xml(&dom_b.name).contains("<disk"));
    assert!(!pool_b.files().iter().any(|f| f.contains("later")));
    grant(&client, ns, &format!("{pb}-*"), &pool_b.name).await;
    let (waiting, _) = storage(&client, ns, "waiting", "True", "Attached").await;
    assert!(config_xml(&dom_b.name).contains(&alias(&waiting)));
    download(&client, ns, "later", "True", "Completed").await;
    assert!(pool_b.files().contains(&"later.iso".to_string()));
    drop(agent);
}
