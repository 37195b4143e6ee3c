//! The agent's finalizer (`virtplane.io/detach`) is on an object before its agent changes
//! anything in libvirt: the controller puts it on with the node label, so the agent's first
//! reconcile makes no write of its own before the attach. An object deleted before its agent ever
//! acted on it is still let go once the agent runs (its cleanup tolerates no attach).

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use kube::api::Api;
use kube::{Client, ResourceExt};
use virtplane::api::{NODE_LABEL, VirtualMachineStorage};

use common::*;

const FINALIZER: &str = "virtplane.io/detach";
const T: Duration = Duration::from_secs(60);

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid} failed");
}

fn cdrom(name: &str, vm: &str) -> String {
    format!(
        "apiVersion: virtplane.io/v1alpha1\nkind: VirtualMachineStorage\nmetadata:\n  name: {name}\nspec:\n  vm: {vm}\n  type: cdrom\n"
    )
}

fn alias(o: &VirtualMachineStorage) -> String {
    format!("ua-vps-{}", o.uid().unwrap())
}

fn ready(o: &VirtualMachineStorage) -> bool {
    o.status
        .as_ref()
        .and_then(|s| condition_of(&s.conditions, "Ready"))
        .is_some_and(|(s, _, _)| s == "True")
}

async fn get(client: &Client, ns: &str, name: &str) -> Option<VirtualMachineStorage> {
    Api::<VirtualMachineStorage>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_finalizer_comes_with_the_binding_and_a_deletion_before_the_agent_acted_is_let_go() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-bindfin").await;
    let agent = Agent::start(&unique("vp-node"), &["--heartbeat-seconds", "1"]);
    let _controller = start_controller(&unique("vp-ctl"), &ns.name, "virtplane-controller", &[]);
    let domain = TestDomain::define("vp-bindfin");

    // A working agent: the object is attached, holding the finalizer.
    kubectl_apply(&ns.name, &cdrom("first", &domain.name));
    let first =
        wait_obj::<VirtualMachineStorage>(&client, &ns.name, "first", "Ready", T, ready).await;
    assert!(first.finalizers().iter().any(|f| f == FINALIZER));
    assert!(config_xml(&domain.name).contains(&alias(&first)));

    // The agent is paused (well within the controller's grace): the controller still binds, and
    // the object carries the finalizer before the agent has done anything with it.
    let pid = agent.process.pid();
    signal(pid, "-STOP");
    kubectl_apply(&ns.name, &cdrom("held", &domain.name));
    let held = wait_obj::<VirtualMachineStorage>(&client, &ns.name, "held", "bound", T, |o| {
        o.labels().get(NODE_LABEL) == Some(&agent.node)
    })
    .await;
    assert_eq!(
        held.finalizers(),
        [FINALIZER],
        "bound with the agent's finalizer"
    );
    assert!(
        !config_xml(&domain.name).contains(&alias(&held)),
        "the paused agent attached nothing"
    );

    // Deleted before its agent acted: the finalizer holds it while the agent is paused...
    kubectl_delete(&ns.name, "vmstorage", "held");
    let leaving = get(&client, &ns.name, "held").await.unwrap();
    assert!(leaving.metadata.deletion_timestamp.is_some());
    assert_eq!(leaving.finalizers(), [FINALIZER]);
    // ...and the agent, back, lets it go without ever attaching it.
    signal(pid, "-CONT");
    wait_gone::<VirtualMachineStorage>(&client, &ns.name, "held", T).await;
    assert!(!config_xml(&domain.name).contains(&alias(&held)));

    // The attached one is detached on deletion as before.
    kubectl_delete(&ns.name, "vmstorage", "first");
    wait_gone::<VirtualMachineStorage>(&client, &ns.name, "first", T).await;
    assert!(!config_xml(&domain.name).contains(&alias(&first)));
}
