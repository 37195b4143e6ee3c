//! VirtualMachineStorage with volumes of pools whose volumes are no files: an iSCSI LUN of a
//! libvirt `iscsi-direct` pool (served by the userspace tgtd on loopback) and a partition of a
//! libvirt `disk` pool on a loop device, hot-plugged into a running guest and detached again.

#![allow(clippy::unwrap_used)]

mod block;
mod common;

use std::time::Duration;

use kube::{Client, ResourceExt};
use virtplane::api::VirtualMachineStorage;

use block::{DiskPool, IscsiPool, write_pattern};
use common::*;

type Vms = VirtualMachineStorage;
const T: Duration = Duration::from_secs(60);

fn is_ready(o: &Vms) -> bool {
    condition_of(
        &o.status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default(),
        "Ready",
    )
    .is_some_and(|(s, _, _)| s == "True")
}

fn volume_manifest(name: &str, vm: &str, pool: &str, volume: &str) -> String {
    format!(
        "apiVersion: virtplane.io/v1alpha1\nkind: VirtualMachineStorage\nmetadata:\n  name: {name}\nspec:\n  vm: {vm}\n  type: disk\n  bus: virtio\n  source:\n    volume:\n      pool: {pool}\n      name: \"{volume}\"\n"
    )
}

async fn ready(client: &Client, ns: &str, name: &str) -> Vms {
    wait_obj::<Vms>(client, ns, name, "Ready=True", T, is_ready).await
}

/// The `<disk>` element with `alias` in `xml`, as text.
fn disk_with_alias(xml: &str, alias: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).unwrap();
    doc.descendants()
        .filter(|n| n.has_tag_name("disk"))
        .find(|d| {
            d.children()
                .any(|c| c.has_tag_name("alias") && c.attribute("name") == Some(alias))
        })
        .map(|d| xml[d.range()].to_string())
}

/// The guest's block devices as its kernel lists them (qemu-ga `guest-get-disks`), or `None`
/// when the agent cannot say.
fn guest_disks(domain: &str) -> Option<String> {
    let out = std::process::Command::new("virsh")
        .args(["-c", &libvirt_uri(), "qemu-agent-command", domain])
        .arg(r#"{"execute":"guest-get-disks"}"#)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test]
async fn iscsi_lun_and_disk_partition_hot_plug_into_a_running_guest_and_detach() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-bs-live").await;
    let _op = Operator::start(&ns.name, &[]);
    let iscsi = IscsiPool::create("vp-bs-iscsi", &[16 << 20], |_, f| {
        write_pattern(f, 0, 1 << 20, 7);
    });
    let disk = DiskPool::create("vp-bs-disk", 64 << 20);
    let (part, part_dev) = disk.volume(8 << 20);
    let guest = TestGuest::boot("vp-bs-live", true).await;
    let domid = virsh(&["domid", &guest.name]);
    let disks_before = guest_disks(&guest.name);

    kubectl_apply(
        &ns.name,
        &volume_manifest("lun", &guest.name, &iscsi.name, &IscsiPool::volume(1)),
    );
    kubectl_apply(
        &ns.name,
        &volume_manifest("part", &guest.name, &disk.name, &part),
    );
    let lun = ready(&client, &ns.name, "lun").await;
    let prt = ready(&client, &ns.name, "part").await;
    let (lun_alias, part_alias) = (
        format!("ua-vps-{}", lun.uid().unwrap()),
        format!("ua-vps-{}", prt.uid().unwrap()),
    );

    // The LUN is a type='volume' disk that libvirt resolved to the iSCSI target.
    let live = live_xml(&guest.name);
    let d = disk_with_alias(&live, &lun_alias).unwrap_or_else(|| panic!("{live}"));
    assert!(d.contains("type='volume'"), "{d}");
    assert!(
        d.contains(&format!("pool='{}'", iscsi.name)) && d.contains("volume='unit:0:0:1'"),
        "{d}"
    );
    let st = lun.status.as_ref().unwrap();
    assert_eq!(st.live, Some(true));
    assert_eq!(st.persistent, Some(true));
    assert_eq!(
        st.current_source.as_deref(),
        Some(format!("volume unit:0:0:1 of pool {}", iscsi.name).as_str())
    );
    assert!(
        disk_with_alias(&config_xml(&guest.name), &lun_alias).is_some(),
        "the LUN is in the definition too"
    );

    // The partition is a type='block' disk at the device libvirt reports.
    let d = disk_with_alias(&live, &part_alias).unwrap_or_else(|| panic!("{live}"));
    assert!(d.contains("type='block'"), "{d}");
    assert!(d.contains(&format!("dev='{part_dev}'")), "{d}");
    assert_eq!(
        prt.status.as_ref().unwrap().current_source.as_deref(),
        Some(part_dev.as_str())
    );

    // The guest sees two more disks, when its agent can list them.
    if let Some(before) = &disks_before {
        let after = eventually("the guest lists the new disks", T, || async {
            guest_disks(&guest.name)
                .filter(|a| a.matches("\"name\"").count() > before.matches("\"name\"").count() + 1)
        })
        .await;
        assert!(after.contains("vd"), "{after}");
    }

    // Detach: both leave the running guest and the definition; the guest kept running.
    kubectl_delete(&ns.name, "vmstorage", "lun");
    kubectl_delete(&ns.name, "vmstorage", "part");
    wait_gone::<Vms>(&client, &ns.name, "lun", T).await;
    wait_gone::<Vms>(&client, &ns.name, "part", T).await;
    let live = live_xml(&guest.name);
    assert!(disk_with_alias(&live, &lun_alias).is_none(), "{live}");
    assert!(disk_with_alias(&live, &part_alias).is_none(), "{live}");
    let config = config_xml(&guest.name);
    assert!(disk_with_alias(&config, &lun_alias).is_none(), "{config}");
    assert_eq!(virsh(&["domid", &guest.name]), domid, "not restarted");
    // The pools still hold their volumes.
    assert!(disk.volumes().contains(&part));
    drop(guest);
}
