//! VMInterface against a real libvirtd: MACs allocated once and kept, link state in place, the
//! guest's own name for the NIC, confirmed detach, refusals and drift repair.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use virtplane::api::{GuestInfoSource, LinkState, VMInterface};

use common::*;

type Nic = VMInterface;
const T: Duration = Duration::from_secs(60);

fn cond(o: &Nic, type_: &str) -> Option<(String, String, String)> {
    condition_of(&o.status.as_ref()?.conditions, type_)
}

fn is_ready(o: &Nic) -> bool {
    cond(o, "Ready").is_some_and(|(s, _, _)| s == "True")
}

fn has_reason(reason: &'static str) -> impl Fn(&Nic) -> bool {
    move |o| cond(o, "Ready").is_some_and(|(s, r, _)| s == "False" && r == reason)
}

fn manifest(name: &str, vm: &str, body: &str) -> String {
    format!(
        "apiVersion: virtplane.io/v1alpha1\nkind: VMInterface\nmetadata:\n  name: {name}\nspec:\n  vm: {vm}\n{body}"
    )
}

fn mac(o: &Nic) -> String {
    o.status.as_ref().unwrap().mac.clone().unwrap()
}

async fn ready(client: &Client, ns: &str, name: &str) -> Nic {
    wait_obj::<Nic>(client, ns, name, "Ready=True", T, is_ready).await
}

#[tokio::test]
async fn macs_are_allocated_once_honoured_and_never_shared() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-if-mac").await;
    let mut op = Operator::start(&ns.name, &[]);
    let domain = TestDomain::define("vp-if-mac");

    // A MAC of this run only: VMInterfaces of every namespace count for uniqueness.
    let given_mac = format!(
        "52:54:00:5A:{:02X}:{:02X}",
        std::process::id() % 256,
        (std::process::id() / 256) % 256
    );
    let given_lower = given_mac.to_ascii_lowercase();
    kubectl_apply(&ns.name, &manifest("auto", &domain.name, "  type: user\n"));
    kubectl_apply(
        &ns.name,
        &manifest(
            "given",
            &domain.name,
            &format!("  type: network\n  source: default\n  mac: {given_mac}\n"),
        ),
    );
    let auto = ready(&client, &ns.name, "auto").await;
    let given = ready(&client, &ns.name, "given").await;
    let allocated = mac(&auto);
    assert!(
        allocated.starts_with("52:54:00:") && allocated != given_lower,
        "{allocated}"
    );
    assert_eq!(mac(&given), given_lower);
    let xml = config_xml(&domain.name);
    assert!(
        xml.contains(&allocated) && xml.contains(&given_lower),
        "{xml}"
    );
    assert_eq!(auto.status.as_ref().unwrap().persistent, Some(true));

    // The MAC survives an agent restart.
    op.agent.restart();
    let api: Api<Nic> = Api::namespaced(client.clone(), &ns.name);
    api.patch(
        "auto",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"touch": "1"}}})),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let again = ready(&client, &ns.name, "auto").await;
    assert_eq!(mac(&again), allocated);
    assert_eq!(
        config_xml(&domain.name).matches(&allocated).count(),
        1,
        "no second NIC was added"
    );

    // A MAC in use by another NIC is refused.
    kubectl_apply(
        &ns.name,
        &manifest(
            "dup",
            &domain.name,
            &format!("  type: user\n  mac: {allocated}\n"),
        ),
    );
    let dup = wait_obj::<Nic>(
        &client,
        &ns.name,
        "dup",
        "MACConflict",
        T,
        has_reason("MACConflict"),
    )
    .await;
    assert!(cond(&dup, "Ready").unwrap().2.contains(&allocated));
    assert_eq!(config_xml(&domain.name).matches(&allocated).count(), 1);
    // The NIC that had the MAC first keeps it and stays Ready.
    api.patch(
        "auto",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"touch": "2"}}})),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = api.get("auto").await.unwrap();
    assert!(
        is_ready(&still),
        "auto lost its MAC: {:?}",
        cond(&still, "Ready")
    );
    assert_eq!(mac(&still), allocated);

    // Multicast MACs pass the schema's pattern but not the agent.
    kubectl_apply(
        &ns.name,
        &manifest(
            "multicast",
            &domain.name,
            "  type: user\n  mac: 01:00:5e:00:00:01\n",
        ),
    );
    let m = wait_obj::<Nic>(
        &client,
        &ns.name,
        "multicast",
        "InvalidSpec",
        T,
        has_reason("InvalidSpec"),
    )
    .await;
    assert!(cond(&m, "Ready").unwrap().2.contains("multicast"));

    // Unknown host-side sources are refused before anything is attached.
    let before = config_xml(&domain.name);
    let missing_net = unique("vp-net");
    kubectl_apply(
        &ns.name,
        &manifest(
            "nonet",
            &domain.name,
            &format!("  type: network\n  source: {missing_net}\n"),
        ),
    );
    kubectl_apply(
        &ns.name,
        &manifest(
            "nobridge",
            &domain.name,
            "  type: bridge\n  source: nobr0\n",
        ),
    );
    kubectl_apply(
        &ns.name,
        &manifest("nodev", &domain.name, "  type: direct\n  source: nodev0\n"),
    );
    // lo exists on every host but is no bridge.
    kubectl_apply(
        &ns.name,
        &manifest("notbridge", &domain.name, "  type: bridge\n  source: lo\n"),
    );
    wait_obj::<Nic>(
        &client,
        &ns.name,
        "nonet",
        "NetworkNotFound",
        T,
        has_reason("NetworkNotFound"),
    )
    .await;
    wait_obj::<Nic>(
        &client,
        &ns.name,
        "nobridge",
        "HostDeviceNotFound",
        T,
        has_reason("HostDeviceNotFound"),
    )
    .await;
    wait_obj::<Nic>(
        &client,
        &ns.name,
        "nodev",
        "HostDeviceNotFound",
        T,
        has_reason("HostDeviceNotFound"),
    )
    .await;
    // The network appears: libvirt's network event wakes the interface well before its one-minute
    // retry.
    let net = Network::start(&missing_net);
    wait_obj::<Nic>(
        &client,
        &ns.name,
        "nonet",
        "Ready=True",
        Duration::from_secs(30),
        is_ready,
    )
    .await;
    drop(net);
    kubectl_delete(&ns.name, "vmif", "nonet");
    wait_gone::<Nic>(&client, &ns.name, "nonet", T).await;

    let notbridge = wait_obj::<Nic>(
        &client,
        &ns.name,
        "notbridge",
        "HostDeviceNotFound",
        T,
        has_reason("HostDeviceNotFound"),
    )
    .await;
    assert!(cond(&notbridge, "Ready").unwrap().2.contains("bridge lo"));
    // (libvirt may have added a PCIe root port for the NIC that came and went: only the NICs
    // are compared.)
    let nics = |xml: &str| xml.matches("<interface").count();
    assert_eq!(
        nics(&config_xml(&domain.name)),
        nics(&before),
        "nothing half-attached"
    );

    // A real host bridge (libvirt's virbr0, which env-up.sh starts) is accepted.
    kubectl_apply(
        &ns.name,
        &manifest(
            "onbridge",
            &domain.name,
            "  type: bridge\n  source: virbr0\n",
        ),
    );
    let on = ready(&client, &ns.name, "onbridge").await;
    let xml = config_xml(&domain.name);
    assert!(xml.contains("<source bridge='virbr0'/>"), "{xml}");
    assert!(xml.contains(&mac(&on)));
}

#[tokio::test]
async fn running_guest_gets_a_nic_named_by_the_guest_link_toggled_in_place_and_confirmed_detach() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-if-live").await;
    let _op = Operator::start(&ns.name, &[]);
    let guest = TestGuest::boot("vp-if-live", true).await;
    let domid = virsh(&["domid", &guest.name]);

    kubectl_apply(&ns.name, &manifest("nic", &guest.name, "  type: user\n"));
    let nic = ready(&client, &ns.name, "nic").await;
    let m = mac(&nic);
    assert!(live_xml(&guest.name).contains(&m));
    assert_eq!(nic.status.as_ref().unwrap().live, Some(true));

    // The guest agent tells the guest's name for it.
    let nic = wait_obj::<Nic>(
        &client,
        &ns.name,
        "nic",
        "the guest's name",
        Duration::from_secs(90),
        |o| {
            o.status
                .as_ref()
                .and_then(|s| s.guest.as_ref())
                .is_some_and(|g| g.source == Some(GuestInfoSource::Agent) && g.name.is_some())
        },
    )
    .await;
    let name = nic
        .status
        .as_ref()
        .unwrap()
        .guest
        .as_ref()
        .unwrap()
        .name
        .clone()
        .unwrap();
    assert!(name.starts_with("eth"), "{name}");
    let reported = virsh(&[
        "qemu-agent-command",
        &guest.name,
        r#"{"execute":"guest-network-get-interfaces"}"#,
    ]);
    assert!(
        reported.contains(&format!("\"name\":\"{name}\"")) && reported.contains(&m),
        "agent says: {reported}"
    );

    // Link down and up, in place.
    let api: Api<Nic> = Api::namespaced(client.clone(), &ns.name);
    for (state, word) in [(LinkState::Down, "down"), (LinkState::Up, "up")] {
        api.patch(
            "nic",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"linkState": word}})),
        )
        .await
        .unwrap();
        wait_obj::<Nic>(&client, &ns.name, "nic", word, T, |o| {
            o.status.as_ref().unwrap().link_state == Some(state)
        })
        .await;
        let live = live_xml(&guest.name);
        let dev = &live[live.find(&m).unwrap()..];
        let dev = &dev[..dev.find("</interface>").unwrap()];
        assert!(dev.contains(&format!("<link state='{word}'/>")), "{dev}");
    }
    assert_eq!(virsh(&["domid", &guest.name]), domid, "no restart");

    kubectl_delete(&ns.name, "vmif", "nic");
    wait_gone::<Nic>(&client, &ns.name, "nic", T).await;
    assert!(!live_xml(&guest.name).contains(&m));
    assert!(!config_xml(&guest.name).contains(&m));
}

#[tokio::test]
async fn a_guest_without_agent_says_why_and_holds_the_detach() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-if-noga").await;
    let _op = Operator::start(&ns.name, &[]);
    let guest = TestGuest::define_with("vp-if-noga", false, false);
    virsh(&["start", &guest.name]);

    kubectl_apply(&ns.name, &manifest("nic", &guest.name, "  type: user\n"));
    let nic = wait_obj::<Nic>(&client, &ns.name, "nic", "guest info", T, |o| {
        is_ready(o) && o.status.as_ref().unwrap().guest.is_some()
    })
    .await;
    let g = nic.status.as_ref().unwrap().guest.clone().unwrap();
    assert_eq!(g.source, Some(GuestInfoSource::None));
    assert_eq!(g.name, None);
    assert!(g.message.unwrap().contains("no QEMU guest agent"));

    kubectl_delete(&ns.name, "vmif", "nic");
    wait_obj::<Nic>(
        &client,
        &ns.name,
        "nic",
        "DetachPending",
        T,
        has_reason("DetachPending"),
    )
    .await;
    virsh(&["destroy", &guest.name]);
    wait_gone::<Nic>(&client, &ns.name, "nic", T).await;
}

#[tokio::test]
async fn a_nic_removed_behind_the_agents_back_is_put_back() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-if-drift").await;
    let _op = Operator::start(&ns.name, &[]);
    let domain = TestDomain::define("vp-if-drift");
    kubectl_apply(&ns.name, &manifest("nic", &domain.name, "  type: user\n"));
    let nic = ready(&client, &ns.name, "nic").await;
    let m = mac(&nic);
    assert!(nic.uid().is_some());

    virsh(&[
        "detach-interface",
        &domain.name,
        "user",
        "--mac",
        &m,
        "--config",
    ]);
    eventually("a DriftCorrected event", T, || async {
        event_reasons(&client, &ns.name, "nic")
            .await
            .iter()
            .any(|r| r == "DriftCorrected")
            .then_some(())
    })
    .await;
    assert_eq!(
        config_xml(&domain.name).matches(&m).count(),
        1,
        "the NIC is back, once"
    );
}

/// An isolated libvirt network of a test, destroyed and undefined when dropped.
struct Network(String);

impl Network {
    fn start(name: &str) -> Self {
        let file = std::env::temp_dir().join(format!("{name}.xml"));
        std::fs::write(&file, format!("<network><name>{name}</name></network>")).unwrap();
        virsh(&["net-define", file.to_str().unwrap()]);
        let net = Network(name.to_string());
        virsh(&["net-start", name]);
        net
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = std::process::Command::new("virsh")
            .args(["-c", &libvirt_uri(), "net-destroy", &self.0])
            .output();
        let _ = std::process::Command::new("virsh")
            .args(["-c", &libvirt_uri(), "net-undefine", &self.0])
            .output();
    }
}
