//! Deleting many disks of shut-off domains at once: the agent gathers a domain's detaches into
//! one new definition. Every object goes, every disk leaves the definition, each object gets its
//! `Detached` Event, and what virtplane did not add (a disk defined by hand) stays.

#![allow(clippy::unwrap_used)]

mod common;
mod fleet;

use std::time::Duration;

use common::*;
use fleet::*;

const DOMAINS: usize = 2;
const PER_DOMAIN: usize = 6;

#[tokio::test]
async fn disks_deleted_together_leave_shut_off_definitions_and_nothing_else_does() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-batch").await;
    let _leftovers = Leftovers(ns.name.clone());
    let _op = Operator::start(&ns.name, &[]);
    let fleet = Fleet::define("vp-batch", DOMAINS, PER_DOMAIN);
    // A disk of the user's own in the first definition, which no object names.
    let own = fleet.pool.path.join("own.img");
    std::fs::File::create(&own)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let own_xml = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vdz' bus='virtio'/></disk>",
        own.display()
    );
    let own_file = fleet.pool.path.join("own.xml");
    std::fs::write(&own_file, own_xml).unwrap();
    virsh(&[
        "attach-device",
        &fleet.domains[0].name,
        own_file.to_str().unwrap(),
        "--config",
    ]);

    fleet
        .create_settled(&client, &ns.name, Duration::from_secs(300))
        .await;
    for d in &fleet.domains {
        let xml = config_xml(&d.name);
        assert_eq!(
            xml.matches("bus='scsi'").count(),
            PER_DOMAIN,
            "every disk in the definition: {xml}"
        );
    }

    fleet.delete(&client, &ns.name).await;
    wait_all(
        &client,
        &ns.name,
        0,
        "all deleted",
        Duration::from_secs(120),
        |_| true,
    )
    .await;
    for d in &fleet.domains {
        let xml = config_xml(&d.name);
        assert_eq!(
            xml.matches("bus='scsi'").count(),
            0,
            "no fleet disk left in {}: {xml}",
            d.name
        );
    }
    let first = config_xml(&fleet.domains[0].name);
    assert!(
        first.contains("own.img") && first.contains("dev='vdz'"),
        "the user's own disk stays: {first}"
    );
    for name in &fleet.names {
        let reasons = event_reasons(&client, &ns.name, name).await;
        assert!(
            reasons.iter().any(|r| r == "Detached"),
            "{name}: Detached Event expected, got {reasons:?}"
        );
    }
}
