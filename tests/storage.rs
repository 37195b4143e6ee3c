//! VirtualMachineStorage against a real libvirtd: attach to definitions, hot-plug into running
//! guests, CD media changes without a reboot, confirmed detach, refusals and drift repair.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use virtplane::api::VirtualMachineStorage;

use common::*;

type Vms = VirtualMachineStorage;
const T: Duration = Duration::from_secs(60);

fn cond(o: &Vms, type_: &str) -> Option<(String, String, String)> {
    condition_of(&o.status.as_ref()?.conditions, type_)
}

fn is_ready(o: &Vms) -> bool {
    cond(o, "Ready").is_some_and(|(s, _, _)| s == "True")
}

fn has_reason(reason: &'static str) -> impl Fn(&Vms) -> bool {
    move |o| cond(o, "Ready").is_some_and(|(s, r, _)| s == "False" && r == reason)
}

fn manifest(name: &str, vm: &str, body: &str) -> String {
    format!(
        "apiVersion: virtplane.io/v1alpha1\nkind: VirtualMachineStorage\nmetadata:\n  name: {name}\nspec:\n  vm: {vm}\n{body}"
    )
}

fn alias(o: &Vms) -> String {
    format!("ua-vps-{}", o.uid().unwrap())
}

/// Creates a sparse raw image in the pool and refreshes the pool.
fn image(pool: &TestPool, name: &str, mib: u64) -> String {
    let path = pool.path.join(name);
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(mib << 20).unwrap();
    virsh(&["pool-refresh", &pool.name]);
    path.to_str().unwrap().to_string()
}

async fn ready(client: &Client, ns: &str, name: &str) -> Vms {
    wait_obj::<Vms>(client, ns, name, "Ready=True", T, is_ready).await
}

#[tokio::test]
async fn shut_off_domain_gets_disk_and_cdrom_in_its_definition_and_loses_them_on_delete() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-st-off").await;
    let op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-st-off");
    let domain = TestDomain::define("vp-st-off");
    let disk = image(&pool, "disk1.img", 16);
    image(&pool, "cd.iso", 1);

    kubectl_apply(
        &ns.name,
        &manifest(
            "disk1",
            &domain.name,
            &format!("  type: disk\n  source:\n    path: {disk}\n"),
        ),
    );
    kubectl_apply(
        &ns.name,
        &manifest(
            "cd1",
            &domain.name,
            &format!(
                "  type: cdrom\n  source:\n    volume:\n      pool: {}\n      name: cd.iso\n",
                pool.name
            ),
        ),
    );
    let d = ready(&client, &ns.name, "disk1").await;
    let c = ready(&client, &ns.name, "cd1").await;
    let (ds, cs) = (d.status.clone().unwrap(), c.status.clone().unwrap());
    assert_eq!((ds.persistent, ds.live), (Some(true), Some(false)));
    assert_eq!(ds.current_source.as_deref(), Some(disk.as_str()));
    assert!(cs.current_source.as_deref().unwrap().ends_with("/cd.iso"));
    let mut targets = vec![ds.target.clone().unwrap(), cs.target.clone().unwrap()];
    targets.sort();
    assert_eq!(targets, ["sda", "sdb"], "lowest free scsi names");

    let xml = config_xml(&domain.name);
    assert!(
        xml.contains(&alias(&d)) && xml.contains(&alias(&c)),
        "{xml}"
    );
    assert!(
        xml.contains("model='virtio-scsi'"),
        "a virtio-scsi controller is added: {xml}"
    );

    // Reconciling again changes nothing: no new resourceVersion.
    let rv = d.resource_version();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let api: Api<Vms> = Api::namespaced(client.clone(), &ns.name);
    assert_eq!(api.get("disk1").await.unwrap().resource_version(), rv);

    // spec.vm is immutable: an edit is refused and the disk stays where it is, and the delete
    // below still detaches it from the domain it is on.
    let other = TestDomain::define("vp-st-off-other");
    api.patch(
        "disk1",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"vm": other.name}})),
    )
    .await
    .unwrap();
    let moved = wait_obj::<Vms>(&client, &ns.name, "disk1", "FieldImmutable", T, |o| {
        cond(o, "Ready").is_some_and(|(_, r, m)| r == "FieldImmutable" && m.contains("spec.vm"))
    })
    .await;
    assert_eq!(
        moved.status.as_ref().unwrap().vm.as_deref(),
        Some(domain.name.as_str())
    );
    assert!(config_xml(&domain.name).contains(&alias(&d)));
    assert!(!config_xml(&other.name).contains(&alias(&d)));

    kubectl_delete(&ns.name, "vmstorage", "disk1");
    kubectl_delete(&ns.name, "vmstorage", "cd1");
    wait_gone::<Vms>(&client, &ns.name, "disk1", T).await;
    wait_gone::<Vms>(&client, &ns.name, "cd1", T).await;
    let xml = config_xml(&domain.name);
    assert!(
        !xml.contains(&alias(&d)) && !xml.contains(&alias(&c)),
        "{xml}"
    );

    // Both binaries expose what they did on /metrics.
    let agent = op.agent.process.http_get("/metrics");
    let kind = "{kind=\"VirtualMachineStorage\"}";
    assert!(
        metric(&agent, &format!("virtplane_reconciles_total{kind}")).unwrap_or(0.0) > 0.0,
        "{agent}"
    );
    let duration = format!("virtplane_reconcile_duration_seconds_count{kind}");
    assert!(metric(&agent, &duration).unwrap_or(0.0) > 0.0, "{agent}");
    let attach = "virtplane_libvirt_call_duration_seconds_count{action=\"attach a device\"}";
    assert!(metric(&agent, attach).unwrap_or(0.0) > 0.0, "{agent}");
    assert!(agent.contains("virtplane_detach_pending"), "{agent}");
    let controller = op.controller.http_get("/metrics");
    assert!(
        metric(&controller, &format!("virtplane_reconciles_total{kind}")).unwrap_or(0.0) > 0.0,
        "{controller}"
    );
    assert_eq!(op.agent.process.http_get("/readyz"), "ready");
}

#[tokio::test]
async fn running_guest_hot_plugs_swaps_media_and_confirms_detach() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-st-live").await;
    let _op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-st-live");
    let guest = TestGuest::boot("vp-st-live", false).await;
    let domid = virsh(&["domid", &guest.name]);
    let scsi = image(&pool, "scsi.img", 8);
    let vdisk = image(&pool, "virtio.img", 8);
    let (iso1, iso2) = (image(&pool, "one.iso", 1), image(&pool, "two.iso", 1));

    // scsi disk and virtio disk hot-plugged.
    kubectl_apply(
        &ns.name,
        &manifest(
            "scsi",
            &guest.name,
            &format!("  type: disk\n  source:\n    path: {scsi}\n"),
        ),
    );
    kubectl_apply(
        &ns.name,
        &manifest(
            "vdisk",
            &guest.name,
            &format!("  type: disk\n  bus: virtio\n  source:\n    path: {vdisk}\n"),
        ),
    );
    let s = ready(&client, &ns.name, "scsi").await;
    let v = ready(&client, &ns.name, "vdisk").await;
    assert_eq!(v.status.as_ref().unwrap().target.as_deref(), Some("vda"));
    assert_eq!(s.status.as_ref().unwrap().live, Some(true));
    let live = live_xml(&guest.name);
    assert!(
        live.contains(&alias(&s)) && live.contains(&alias(&v)),
        "{live}"
    );
    assert!(
        config_xml(&guest.name).contains(&alias(&v)),
        "hot-plugged devices are persistent too"
    );

    // CD-ROM: empty tray, insert, swap, eject: all without a reboot.
    kubectl_apply(&ns.name, &manifest("cd", &guest.name, "  type: cdrom\n"));
    let c = ready(&client, &ns.name, "cd").await;
    assert_eq!(c.status.as_ref().unwrap().current_source, None);
    let api: Api<Vms> = Api::namespaced(client.clone(), &ns.name);
    for iso in [&iso1, &iso2] {
        api.patch(
            "cd",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"source": {"path": iso}}})),
        )
        .await
        .unwrap();
        wait_obj::<Vms>(&client, &ns.name, "cd", "medium inserted", T, |o| {
            is_ready(o)
                && o.status.as_ref().unwrap().current_source.as_deref() == Some(iso.as_str())
        })
        .await;
        assert!(
            live_xml(&guest.name).contains(iso.as_str()),
            "live XML shows {iso}"
        );
    }
    api.patch(
        "cd",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"source": null}})),
    )
    .await
    .unwrap();
    wait_obj::<Vms>(&client, &ns.name, "cd", "ejected", T, |o| {
        is_ready(o) && o.status.as_ref().unwrap().current_source.is_none()
    })
    .await;
    let live = live_xml(&guest.name);
    assert!(
        !live.contains(iso2.as_str()) && live.contains(&alias(&c)),
        "tray empty, drive kept: {live}"
    );
    let reasons = event_reasons(&client, &ns.name, "cd").await;
    assert!(
        reasons.iter().any(|r| r == "MediaChanged") && reasons.iter().any(|r| r == "Ejected"),
        "{reasons:?}"
    );
    assert_eq!(
        virsh(&["domid", &guest.name]),
        domid,
        "the guest was not restarted"
    );

    // Detach: the object goes only once the guest released the device.
    kubectl_delete(&ns.name, "vmstorage", "vdisk");
    kubectl_delete(&ns.name, "vmstorage", "scsi");
    wait_gone::<Vms>(&client, &ns.name, "vdisk", T).await;
    wait_gone::<Vms>(&client, &ns.name, "scsi", T).await;
    let live = live_xml(&guest.name);
    assert!(
        !live.contains(&alias(&v)) && !live.contains(&alias(&s)),
        "{live}"
    );
    assert!(!config_xml(&guest.name).contains(&alias(&v)));
}

#[tokio::test]
async fn detach_stays_pending_until_the_guest_lets_go_or_stops() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-st-pend").await;
    let _op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-st-pend");
    // Same hardware as the test guest, but no kernel: nothing answers the unplug request.
    let guest = TestGuest::define_with("vp-st-pend", false, false);
    virsh(&["start", &guest.name]);
    let vdisk = image(&pool, "virtio.img", 8);
    kubectl_apply(
        &ns.name,
        &manifest(
            "vdisk",
            &guest.name,
            &format!("  type: disk\n  bus: virtio\n  source:\n    path: {vdisk}\n"),
        ),
    );
    let v = ready(&client, &ns.name, "vdisk").await;
    assert!(live_xml(&guest.name).contains(&alias(&v)));

    kubectl_delete(&ns.name, "vmstorage", "vdisk");
    let o = wait_obj::<Vms>(
        &client,
        &ns.name,
        "vdisk",
        "DetachPending",
        T,
        has_reason("DetachPending"),
    )
    .await;
    let (_, _, msg) = cond(&o, "Ready").unwrap();
    assert!(msg.contains("not acknowledged"), "{msg}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let api: Api<Vms> = Api::namespaced(client.clone(), &ns.name);
    assert!(
        api.get_opt("vdisk").await.unwrap().is_some(),
        "an unacknowledged detach must not be reported done"
    );
    assert!(
        live_xml(&guest.name).contains(&alias(&v)),
        "the guest still has the device"
    );
    assert!(
        !config_xml(&guest.name).contains(&alias(&v)),
        "the definition no longer has it"
    );

    virsh(&["destroy", &guest.name]);
    wait_gone::<Vms>(&client, &ns.name, "vdisk", T).await;
}

#[tokio::test]
async fn bad_input_is_refused_with_a_reason_and_leaves_the_domain_alone() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-st-bad").await;
    let op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-st-bad");
    let guest = TestGuest::boot("vp-st-bad", false).await;
    let disk = image(&pool, "ok.img", 8);
    let (live_before, config_before) = (live_xml(&guest.name), config_xml(&guest.name));

    kubectl_apply(
        &ns.name,
        &manifest(
            "shadow",
            &guest.name,
            "  type: disk\n  source:\n    path: /etc/shadow\n",
        ),
    );
    let escape = format!("{}/../../../../etc/passwd", pool.path.display());
    kubectl_apply(
        &ns.name,
        &manifest(
            "escape",
            &guest.name,
            &format!("  type: disk\n  source:\n    path: {escape}\n"),
        ),
    );
    let missing = format!("{}/missing.img", pool.path.display());
    kubectl_apply(
        &ns.name,
        &manifest(
            "missing",
            &guest.name,
            &format!("  type: disk\n  source:\n    path: {missing}\n"),
        ),
    );
    kubectl_apply(
        &ns.name,
        &manifest(
            "novm",
            "no-such-vm",
            &format!("  nodeName: {}\n  type: cdrom\n", op.agent.node),
        ),
    );
    // A qcow2 header of a version QEMU does not know: the agent's header check refuses it before
    // libvirt sees it.
    let corrupt = pool.path.join("corrupt.qcow2");
    let mut header = b"QFI\xfb\0\0\0\x63".to_vec();
    header.resize(1 << 20, 0);
    std::fs::write(&corrupt, header).unwrap();
    // Not a qcow2 image at all: refused before libvirt sees it.
    let notqcow = pool.path.join("notqcow.qcow2");
    std::fs::write(&notqcow, vec![b'x'; 1 << 20]).unwrap();
    kubectl_apply(
        &ns.name,
        &manifest(
            "notqcow",
            &guest.name,
            &format!(
                "  type: disk\n  format: qcow2\n  source:\n    path: {}\n",
                notqcow.display()
            ),
        ),
    );
    kubectl_apply(
        &ns.name,
        &manifest(
            "corrupt",
            &guest.name,
            &format!(
                "  type: disk\n  format: qcow2\n  source:\n    path: {}\n",
                corrupt.display()
            ),
        ),
    );
    for (name, reason) in [
        ("corrupt", "UnsafeImage"),
        ("notqcow", "InvalidSpec"),
        ("shadow", "PathNotAllowed"),
        ("escape", "PathNotAllowed"),
        ("missing", "SourceNotFound"),
        ("novm", "DomainNotFound"),
    ] {
        let o = wait_obj::<Vms>(&client, &ns.name, name, reason, T, has_reason(reason)).await;
        let (_, _, msg) = cond(&o, "Ready").unwrap();
        assert!(
            msg.len() > 30,
            "{name}: the message should tell what to do: {msg}"
        );
        // Each refusal is also a Warning Event.
        eventually(
            &format!("a {reason} Event about {name}"),
            Duration::from_secs(10),
            || async {
                event_reasons(&client, &ns.name, name)
                    .await
                    .iter()
                    .any(|r| r == reason)
                    .then_some(())
            },
        )
        .await;
    }
    // And each is counted on /metrics by its reason.
    let agent = op.agent.process.http_get("/metrics");
    let errors = "virtplane_reconcile_errors_total{kind=\"VirtualMachineStorage\",reason=\"PathNotAllowed\"}";
    assert!(metric(&agent, errors).unwrap_or(0.0) >= 2.0, "{agent}");
    assert_eq!(
        live_xml(&guest.name),
        live_before,
        "refusals change nothing in the running domain"
    );
    assert_eq!(
        config_xml(&guest.name),
        config_before,
        "refusals change nothing in the definition"
    );

    // Two objects wanting one target: the later one is refused.
    kubectl_apply(
        &ns.name,
        &manifest(
            "first",
            &guest.name,
            &format!(
                "  type: disk\n  target: sdc\n  source:\n    path: {disk}\n  readOnly: true\n"
            ),
        ),
    );
    ready(&client, &ns.name, "first").await;
    kubectl_apply(
        &ns.name,
        &manifest("second", &guest.name, "  type: cdrom\n  target: sdc\n"),
    );
    wait_obj::<Vms>(
        &client,
        &ns.name,
        "second",
        "TargetConflict",
        T,
        has_reason("TargetConflict"),
    )
    .await;

    // A SATA drive cannot be hot-plugged: written to the definition, restart required, and said so.
    kubectl_apply(
        &ns.name,
        &manifest("sata", &guest.name, "  type: cdrom\n  bus: sata\n"),
    );
    let o = wait_obj::<Vms>(&client, &ns.name, "sata", "RestartRequired", T, |o| {
        cond(o, "RestartRequired").is_some_and(|(s, _, _)| s == "True")
    })
    .await;
    let (_, _, msg) = cond(&o, "RestartRequired").unwrap();
    assert!(
        msg.contains("scsi"),
        "the message says what would hot-plug: {msg}"
    );
    assert!(!is_ready(&o));
    assert!(config_xml(&guest.name).contains(&alias(&o)));
    assert!(!live_xml(&guest.name).contains(&alias(&o)));

    // The refused images are let go first: on a shut-off domain they would go into the
    // definition (libvirt cannot tell) and the reboot would fail.
    kubectl_delete(&ns.name, "vmstorage", "corrupt");
    kubectl_delete(&ns.name, "vmstorage", "notqcow");
    wait_gone::<Vms>(&client, &ns.name, "corrupt", T).await;
    wait_gone::<Vms>(&client, &ns.name, "notqcow", T).await;

    // After a reboot the drive is there; it cannot be unplugged while the guest runs, so the
    // delete waits for the shutdown and says so instead of waiting for the guest in vain.
    virsh(&["destroy", &guest.name]);
    virsh(&["start", &guest.name]);
    ready(&client, &ns.name, "sata").await;
    assert!(live_xml(&guest.name).contains(&alias(&o)));
    let api: Api<Vms> = Api::namespaced(client.clone(), &ns.name);
    api.delete("sata", &Default::default()).await.unwrap();
    let held = wait_obj::<Vms>(&client, &ns.name, "sata", "DetachPending", T, |o| {
        has_reason("DetachPending")(o)
    })
    .await;
    let (_, _, msg) = cond(&held, "Ready").unwrap();
    assert!(msg.contains("cannot be unplugged"), "{msg}");
    assert!(!config_xml(&guest.name).contains(&alias(&o)));
    virsh(&["destroy", &guest.name]);
    eventually("the object is released at shutdown", T, || async {
        api.get_opt("sata").await.unwrap().is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_device_removed_behind_the_agents_back_is_put_back() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-st-drift").await;
    let _op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-st-drift");
    let domain = TestDomain::define("vp-st-drift");
    let disk = image(&pool, "drift.img", 8);
    kubectl_apply(
        &ns.name,
        &manifest(
            "drift",
            &domain.name,
            &format!("  type: disk\n  source:\n    path: {disk}\n"),
        ),
    );
    let o = ready(&client, &ns.name, "drift").await;
    let target = o.status.as_ref().unwrap().target.clone().unwrap();

    // The agent reacts to libvirt's event at once, so the removal itself is not asserted here:
    // the DriftCorrected event below proves the disk was gone and put back.
    virsh(&["detach-disk", &domain.name, &target, "--config"]);
    eventually("the disk is back in the definition", T, || async {
        config_xml(&domain.name).contains(&alias(&o)).then_some(())
    })
    .await;
    eventually("a DriftCorrected event", T, || async {
        event_reasons(&client, &ns.name, "drift")
            .await
            .iter()
            .any(|r| r == "DriftCorrected")
            .then_some(())
    })
    .await;

    // The disk's source swapped by hand: not blamed on the spec, not silently swapped back under
    // the guest, but reported with a Warning saying what to do.
    let other = image(&pool, "other.img", 8);
    let xml = config_xml(&domain.name).replace(&disk, &other);
    let file = pool.path.join("redefine.xml");
    std::fs::write(&file, xml).unwrap();
    virsh(&["define", file.to_str().unwrap()]);
    let o = wait_obj::<Vms>(
        &client,
        &ns.name,
        "drift",
        "DriftDetected",
        T,
        has_reason("DriftDetected"),
    )
    .await;
    let (_, _, msg) = cond(&o, "Ready").unwrap();
    assert!(msg.contains(&other) && msg.contains(&disk), "{msg}");
    eventually("a DriftDetected event", T, || async {
        event_reasons(&client, &ns.name, "drift")
            .await
            .iter()
            .any(|r| r == "DriftDetected")
            .then_some(())
    })
    .await;
}
