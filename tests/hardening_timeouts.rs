//! A libvirt call that does not return within `--libvirt-call-timeout` is reported on the
//! object that made it: `Ready=False`, reason `LibvirtTimeout`, naming the call; once libvirtd
//! answers again the next reconcile replaces it.
//!
//! This test freezes the node's libvirtd (SIGSTOP) for a few seconds, so it lives in its own
//! test binary and must run alone under the integration-test lock.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use virtplane::api::VirtualMachineStorage;

use common::*;

const T: Duration = Duration::from_secs(90);

fn signal_libvirtd(sig: &str) {
    let status = Command::new("pkill")
        .args([&format!("-{sig}"), "-x", "libvirtd"])
        .status()
        .unwrap();
    assert!(status.success(), "pkill -{sig} libvirtd");
}

/// Lets libvirtd run again even when the test fails half-way.
struct Thaw;
impl Drop for Thaw {
    fn drop(&mut self) {
        signal_libvirtd("CONT");
    }
}

fn reason(o: &VirtualMachineStorage) -> Option<(String, String)> {
    let (_, reason, message) = condition_of(&o.status.as_ref()?.conditions, "Ready")?;
    Some((reason, message))
}

#[tokio::test]
async fn a_hung_libvirt_call_is_a_condition_and_is_retried() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-ht").await;
    let op = Operator::start(&ns.name, &["--libvirt-call-timeout", "2"]);
    let vm = unique("vp-ht-missing");
    let manifest = format!(
        "apiVersion: virtplane.io/v1alpha1\nkind: VirtualMachineStorage\nmetadata:\n  name: media\nspec:\n  vm: {vm}\n  type: cdrom\n  nodeName: {}\n",
        op.agent.node
    );
    kubectl_apply(&ns.name, &manifest);
    // Bound and looked at: waiting for a domain that does not exist.
    let first =
        wait_obj::<VirtualMachineStorage>(&client, &ns.name, "media", "a Ready reason", T, |o| {
            reason(o).is_some()
        })
        .await;
    let before = reason(&first).unwrap().0;
    assert_ne!(before, "LibvirtTimeout");

    // libvirtd frozen: the next reconcile's libvirt call times out.
    let thaw = Thaw;
    signal_libvirtd("STOP");
    let annotate = Command::new("kubectl")
        .args([
            "annotate",
            "-n",
            &ns.name,
            "virtualmachinestorage",
            "media",
            "poke=1",
            "--overwrite",
        ])
        .status()
        .unwrap();
    assert!(annotate.success());
    let hung =
        wait_obj::<VirtualMachineStorage>(&client, &ns.name, "media", "LibvirtTimeout", T, |o| {
            reason(o).is_some_and(|(r, _)| r == "LibvirtTimeout")
        })
        .await;
    drop(thaw);
    let (_, message) = reason(&hung).unwrap();
    assert!(message.contains("did not answer within 2s"), "{message}");
    assert!(message.contains("retries by itself"), "{message}");
    let events = event_reasons(&client, &ns.name, "media").await;
    assert!(events.iter().any(|r| r == "LibvirtTimeout"), "{events:?}");

    // libvirtd answers again: the retry replaces the condition.
    let back = wait_obj::<VirtualMachineStorage>(&client, &ns.name, "media", "recovered", T, |o| {
        reason(o).is_some_and(|(r, _)| r != "LibvirtTimeout")
    })
    .await;
    assert_eq!(reason(&back).unwrap().0, before);
}
