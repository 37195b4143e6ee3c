//! Many disks attached at once to shut-off domains: every definition write makes libvirt emit an
//! event for the domain, and the agent no longer re-runs the objects whose own disk the event left
//! as they last saw it. Every object still becomes Ready with its disk in the definition, and a
//! change made by hand to one object's disk afterwards is still seen and reported on that object.

#![allow(clippy::unwrap_used)]

mod common;
mod fleet;

use std::time::Duration;

use common::*;
use fleet::*;
use kube::ResourceExt;
use kube::api::Api;
use virtplane::api::VirtualMachineStorage;

const DOMAINS: usize = 2;
const PER_DOMAIN: usize = 6;
const T: Duration = Duration::from_secs(120);

/// A counter of the agent's `/metrics` (0 when absent).
fn counter(op: &Operator, name: &str) -> f64 {
    op.agent
        .process
        .http_get("/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn ready_reason(o: &VirtualMachineStorage) -> Option<(String, String)> {
    o.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone()))
}

#[tokio::test]
async fn disks_attached_together_are_all_defined_and_a_change_by_hand_is_still_seen() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-settled").await;
    let _leftovers = Leftovers(ns.name.clone());
    let op = Operator::start(&ns.name, &[]);
    let fleet = Fleet::define("vp-settled", DOMAINS, PER_DOMAIN);

    fleet
        .create_settled(&client, &ns.name, Duration::from_secs(300))
        .await;
    let api: Api<VirtualMachineStorage> = Api::namespaced(client.clone(), &ns.name);
    let objects = list(&client, &ns.name).await;
    for d in &fleet.domains {
        let xml = config_xml(&d.name);
        assert_eq!(
            xml.matches("bus='scsi'").count(),
            PER_DOMAIN,
            "every disk in the definition: {xml}"
        );
        for o in objects.iter().filter(|o| o.spec.vm == d.name) {
            let alias = format!("ua-vps-{}", o.uid().unwrap());
            assert!(
                xml.contains(&alias),
                "{} in {}: {xml}",
                o.name_any(),
                d.name
            );
        }
    }
    // One disk removed from the first definition by hand: its object puts it back and says so,
    // the domain's other objects stay Ready.
    let first = &fleet.domains[0].name;
    let removed = objects
        .iter()
        .find(|o| &o.spec.vm == first)
        .unwrap()
        .clone();
    let alias = format!("ua-vps-{}", removed.uid().unwrap());
    let target = removed.status.as_ref().unwrap().target.clone().unwrap();
    let spared = counter(&op, "virtplane_wakeups_spared_total");
    virsh(&["detach-disk", first, &target, "--config"]);
    eventually("the disk is back in the definition", T, || async {
        config_xml(first).contains(&alias).then_some(())
    })
    .await;
    eventually("a DriftCorrected event", T, || async {
        event_reasons(&client, &ns.name, &removed.name_any())
            .await
            .iter()
            .any(|r| r == "DriftCorrected")
            .then_some(())
    })
    .await;
    // The event of the removal did not wake the domain's other, untouched objects.
    let spared = counter(&op, "virtplane_wakeups_spared_total") - spared;
    assert!(
        spared >= (PER_DOMAIN - 1) as f64,
        "{spared} wake-ups spared by the removal's event"
    );

    // Another disk's source swapped by hand in the same definition: reported on that object only.
    let swapped = objects
        .iter()
        .find(|o| &o.spec.vm == first && o.uid() != removed.uid())
        .unwrap()
        .clone();
    let disk = swapped
        .spec
        .source
        .as_ref()
        .and_then(|s| s.path.clone())
        .unwrap();
    let other = fleet.pool.path.join("other.img");
    std::fs::File::create(&other)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let other = other.to_string_lossy().into_owned();
    let xml = config_xml(first).replace(&format!("'{disk}'"), &format!("'{other}'"));
    assert!(
        xml.contains(&other),
        "the source is in the definition: {xml}"
    );
    let file = fleet.pool.path.join("redefine.xml");
    std::fs::write(&file, xml).unwrap();
    virsh(&["define", file.to_str().unwrap()]);
    let o = wait_obj::<VirtualMachineStorage>(
        &client,
        &ns.name,
        &swapped.name_any(),
        "DriftDetected",
        T,
        |o| ready_reason(o).is_some_and(|(s, r)| s == "False" && r == "DriftDetected"),
    )
    .await;
    let msg = o.status.as_ref().unwrap().conditions[..]
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .message
        .clone();
    assert!(msg.contains(&other) && msg.contains(&disk), "{msg}");
    for o in api.list(&Default::default()).await.unwrap() {
        if o.uid() != swapped.uid() {
            assert_eq!(
                ready_reason(&o).map(|(s, _)| s).as_deref(),
                Some("True"),
                "{} stays Ready",
                o.name_any()
            );
        }
    }

    fleet.delete(&client, &ns.name).await;
    wait_all(&client, &ns.name, 0, "all deleted", T, |_| true).await;
}
