//! Binding and identity against a real apiserver and libvirtd: the controller owns the node
//! label (a tenant's overwrite or removal is put back, and the device is neither orphaned nor
//! duplicated), a label naming a node that does not exist is no binding, and a VMInterface that
//! can never bind cannot squat a MAC.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use virtplane::api::{NODE_LABEL, VMInterface, VirtualMachineStorage};

use common::*;

type Vms = VirtualMachineStorage;
const T: Duration = Duration::from_secs(60);

fn cdrom(name: &str, vm: &str, label: Option<&str>) -> String {
    cdrom_on(name, vm, label, None)
}

/// With `node`, `spec.nodeName` (two agents on one libvirtd both report every domain).
fn cdrom_on(name: &str, vm: &str, label: Option<&str>, node: Option<&str>) -> String {
    let labels = label
        .map(|l| format!("  labels:\n    {NODE_LABEL}: {l}\n"))
        .unwrap_or_default();
    let node = node
        .map(|n| format!("  nodeName: {n}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: virtplane.io/v1alpha1\nkind: VirtualMachineStorage\nmetadata:\n  name: {name}\n{labels}spec:\n  vm: {vm}\n  type: cdrom\n  bus: scsi\n{node}"
    )
}

fn scheduled(o: &Vms) -> Option<(String, String, String)> {
    condition_of(&o.status.as_ref()?.conditions, "Scheduled")
}

fn ready(o: &Vms) -> bool {
    condition_of(
        &o.status.as_ref().unwrap_or(&Default::default()).conditions,
        "Ready",
    )
    .is_some_and(|(s, _, _)| s == "True")
}

/// Sets (or removes) the node label as a tenant would: a plain merge patch by another manager.
async fn tenant_labels(api: &Api<Vms>, name: &str, node: Option<&str>) {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {NODE_LABEL: node}}})),
    )
    .await
    .unwrap();
}

async fn wait_label(client: &Client, ns: &str, name: &str, want: Option<&str>) -> Vms {
    wait_obj::<Vms>(client, ns, name, &format!("label {want:?}"), T, |o| {
        o.labels().get(NODE_LABEL).map(String::as_str) == want
    })
    .await
}

#[tokio::test]
async fn a_tenant_cannot_move_or_drop_a_binding() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-hb-move").await;
    let op = Operator::start(&ns.name, &[]);
    let other = Agent::start(&unique("vp-node"), &["--heartbeat-seconds", "2"]);
    wait_hypervisor(&client, &other.node, "reporting", T, |_| true).await;
    let domain = TestDomain::define("vp-hb-move");
    let api: Api<Vms> = Api::namespaced(client.clone(), &ns.name);

    kubectl_apply(
        &ns.name,
        &cdrom_on("cd", &domain.name, None, Some(&op.agent.node)),
    );
    wait_obj::<Vms>(&client, &ns.name, "cd", "Ready=True", T, ready).await;
    let node = op.agent.node.as_str();
    // The controller writes the label and its record (`status.nodeName`) together, in either
    // order: bound is both.
    wait_obj::<Vms>(&client, &ns.name, "cd", "labelled and recorded", T, |o| {
        o.labels().get(NODE_LABEL).map(String::as_str) == Some(node)
            && o.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
    })
    .await;
    let with_cd = config_xml(&domain.name);
    assert_eq!(with_cd.matches("device='cdrom'").count(), 1, "{with_cd}");

    // Overwritten with another live node: put back; the device stays where it is, once.
    tenant_labels(&api, "cd", Some(&other.node)).await;
    wait_label(&client, &ns.name, "cd", Some(node)).await;
    // Removed: put back too.
    tenant_labels(&api, "cd", None).await;
    let back = wait_label(&client, &ns.name, "cd", Some(node)).await;
    // Overwritten with a node that does not exist: put back.
    tenant_labels(&api, "cd", Some("vp-no-such-node")).await;
    wait_label(&client, &ns.name, "cd", Some(node)).await;
    assert_eq!(
        back.status.as_ref().unwrap().node_name.as_deref(),
        Some(node),
        "the controller's record is unchanged"
    );
    let o = wait_obj::<Vms>(&client, &ns.name, "cd", "Ready=True", T, ready).await;
    assert_eq!(scheduled(&o).unwrap().1, "Bound");
    assert_eq!(o.labels().get(NODE_LABEL).map(String::as_str), Some(node));
    assert_eq!(
        config_xml(&domain.name),
        with_cd,
        "the device was neither moved nor duplicated"
    );
    assert!(
        op.controller
            .log_text()
            .contains("putting the binding back"),
        "the controller says what it did"
    );

    // The device's cleanup stayed with its node: deleting the object removes it.
    kubectl_delete(&ns.name, "virtualmachinestorage", "cd");
    wait_gone::<Vms>(&client, &ns.name, "cd", T).await;
    let after = config_xml(&domain.name);
    assert!(!after.contains("cdrom"), "the device was orphaned: {after}");
}

#[tokio::test]
async fn a_label_naming_no_node_is_no_binding() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-hb-ghost").await;
    let op = Operator::start(&ns.name, &[]);
    let domain = TestDomain::define("vp-hb-ghost");
    let before = config_xml(&domain.name);

    // Labelled for a node that does not exist, with a domain that exists nowhere: the label is
    // removed and the object is not bound.
    kubectl_apply(
        &ns.name,
        &cdrom("nowhere", "vp-hb-no-such-domain", Some("vp-ghost-node")),
    );
    wait_label(&client, &ns.name, "nowhere", None).await;
    let o = wait_obj::<Vms>(&client, &ns.name, "nowhere", "DomainNotFound", T, |o| {
        scheduled(o).is_some_and(|(s, r, _)| s == "False" && r == "DomainNotFound")
    })
    .await;
    assert_eq!(o.status.unwrap().node_name, None);

    // Labelled for a node that does not exist, with a domain on a real node: bound there by the
    // controller's own decision.
    kubectl_apply(
        &ns.name,
        &cdrom("ghost", &domain.name, Some("vp-ghost-node")),
    );
    wait_label(&client, &ns.name, "ghost", Some(&op.agent.node)).await;
    wait_obj::<Vms>(&client, &ns.name, "ghost", "Ready=True", T, ready).await;
    assert_ne!(config_xml(&domain.name), before);
}

fn nic(name: &str, vm: &str, mac: &str) -> String {
    format!(
        "apiVersion: virtplane.io/v1alpha1\nkind: VMInterface\nmetadata:\n  name: {name}\nspec:\n  vm: {vm}\n  type: user\n  mac: {mac}\n"
    )
}

#[tokio::test]
async fn a_nic_that_never_binds_cannot_squat_a_mac() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-hb-mac").await;
    let _op = Operator::start(&ns.name, &[]);
    let domain = TestDomain::define("vp-hb-mac");
    let mac = format!(
        "52:54:00:5b:{:02x}:{:02x}",
        std::process::id() % 256,
        (std::process::id() / 256) % 256
    );
    // First: a NIC for a domain that exists nowhere, asking for the MAC.
    kubectl_apply(&ns.name, &nic("squatter", "vp-hb-no-such-domain", &mac));
    wait_obj::<VMInterface>(&client, &ns.name, "squatter", "unschedulable", T, |o| {
        o.status
            .as_ref()
            .and_then(|s| condition_of(&s.conditions, "Scheduled"))
            .is_some_and(|(s, _, _)| s == "False")
    })
    .await;
    // Then a real one: it gets the MAC.
    kubectl_apply(&ns.name, &nic("real", &domain.name, &mac));
    let real = wait_obj::<VMInterface>(&client, &ns.name, "real", "Ready=True", T, |o| {
        o.status
            .as_ref()
            .and_then(|s| condition_of(&s.conditions, "Ready"))
            .is_some_and(|(s, _, _)| s == "True")
    })
    .await;
    assert_eq!(real.status.unwrap().mac.as_deref(), Some(mac.as_str()));
    assert!(config_xml(&domain.name).contains(&mac));
    let api: Api<VMInterface> = Api::namespaced(client.clone(), &ns.name);
    let squatter = api.get("squatter").await.unwrap();
    assert!(!squatter.labels().contains_key(NODE_LABEL));
    assert_eq!(squatter.status.and_then(|s| s.mac), None);
}
