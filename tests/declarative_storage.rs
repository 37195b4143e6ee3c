//! Declarative VirtualMachineStorage against a real libvirtd and the small real guest: every
//! spec field either takes effect live (I/O limits), or is written to the definition and waits
//! for the next boot with `RestartRequired` naming it, or is refused (`FieldImmutable`,
//! `InvalidSpec`) with nothing changed in libvirt. Checked as a user would: `virsh blkdeviotune`,
//! the live and persistent XML, the conditions and the Events; then a restart, a revert, drift
//! made with virsh, and the same edits on a shut-off domain.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use virtplane::api::VirtualMachineStorage;
use virtplane::libvirt::domain::parse_domain;
use virtplane::libvirt::tuning::{DiskFields, disk_fields};

use common::*;

type Vms = VirtualMachineStorage;
const T: Duration = Duration::from_secs(60);

fn cond(o: &Vms, type_: &str) -> Option<(String, String, String)> {
    condition_of(&o.status.as_ref()?.conditions, type_)
}

/// The agent acted on the object's current generation.
fn current(o: &Vms) -> bool {
    o.status.as_ref().and_then(|s| s.observed_generation) == o.metadata.generation
}

fn alias(o: &Vms) -> String {
    format!("ua-vps-{}", o.uid().unwrap())
}

/// The fields of the object's disk in the domain's XML (`None` when it has no such disk).
fn fields_in(xml: &str, alias: &str) -> Option<DiskFields> {
    parse_domain(xml)
        .unwrap()
        .disk(alias)
        .map(|d| disk_fields(&d.xml))
}

/// `virsh blkdeviotune` of the running guest, as (name, value) pairs.
fn blkdeviotune(domain: &str, target: &str) -> Vec<(String, u64)> {
    virsh(&["blkdeviotune", domain, target])
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn limit(domain: &str, target: &str, name: &str) -> u64 {
    blkdeviotune(domain, target)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("virsh blkdeviotune shows no {name}"))
}

/// The Events about an object, as (reason, message).
async fn events(client: &Client, ns: &str, name: &str) -> Vec<(String, String)> {
    let api: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), ns);
    api.list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(name))
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect()
}

/// Waits for an Event with `reason` whose message contains `says`.
async fn has_event(client: &Client, ns: &str, name: &str, reason: &str, says: &str) {
    let what = format!("a {reason} Event saying {says}");
    eventually(&what, T, || async {
        events(client, ns, name)
            .await
            .iter()
            .any(|(r, m)| r == reason && m.contains(says))
            .then_some(())
    })
    .await;
}

async fn patch(api: &Api<Vms>, name: &str, spec: Value) {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": spec })),
    )
    .await
    .unwrap();
}

/// How an edit takes effect.
#[derive(Clone, Copy, Debug)]
enum Effect {
    /// In the running guest and the definition.
    Live,
    /// In the definition; the running guest waits for the next boot.
    NextBoot,
}

/// One edit: the spec field, the merge patch, how it takes effect, and what the disk's XML then
/// shows.
struct Edit {
    field: &'static str,
    patch: Value,
    effect: Effect,
    shows: fn(&DiskFields) -> bool,
}

/// Every field, applied one after the other. `bootOrder` comes last: the test domains are
/// ordered by type (`<os><boot dev='hd'/>`, which libvirt writes into every domain defined without
/// per-device orders), so it also converts that list.
fn edits() -> Vec<Edit> {
    vec![
        Edit {
            field: "iotune",
            patch: json!({"iotune": {"totalBytesSec": 10_485_760}}),
            effect: Effect::Live,
            shows: |f| f.iotune[0] == 10_485_760,
        },
        Edit {
            field: "iotune",
            patch: json!({"iotune": {"readIopsSec": 200, "readIopsSecMax": 400}}),
            effect: Effect::Live,
            shows: |f| f.iotune[0] == 10_485_760 && f.iotune[4] == 200 && f.iotune[10] == 400,
        },
        Edit {
            field: "driver.cache",
            patch: json!({"driver": {"cache": "none"}}),
            effect: Effect::NextBoot,
            shows: |f| f.cache.as_deref() == Some("none"),
        },
        Edit {
            field: "driver.io",
            patch: json!({"driver": {"io": "threads"}}),
            effect: Effect::NextBoot,
            shows: |f| f.io.as_deref() == Some("threads"),
        },
        Edit {
            field: "driver.discard",
            patch: json!({"driver": {"discard": "unmap"}}),
            effect: Effect::NextBoot,
            shows: |f| f.discard.as_deref() == Some("unmap"),
        },
        Edit {
            field: "driver.detectZeroes",
            patch: json!({"driver": {"detectZeroes": "on"}}),
            effect: Effect::NextBoot,
            shows: |f| f.detect_zeroes.as_deref() == Some("on"),
        },
        Edit {
            field: "serial",
            patch: json!({"serial": "VPS-SERIAL-1"}),
            effect: Effect::NextBoot,
            shows: |f| f.serial.as_deref() == Some("VPS-SERIAL-1"),
        },
        Edit {
            field: "shareable",
            patch: json!({"shareable": true}),
            effect: Effect::NextBoot,
            shows: |f| f.shareable,
        },
        Edit {
            field: "readOnly",
            patch: json!({"readOnly": true}),
            effect: Effect::NextBoot,
            shows: |f| f.readonly,
        },
        Edit {
            field: "bootOrder",
            patch: json!({"bootOrder": 1}),
            effect: Effect::NextBoot,
            shows: |f| f.boot_order == Some(1),
        },
    ]
}

/// After an edit is in effect, the object and the definition stay as they are: the agent does
/// not keep rewriting the definition, and each rewrite's DEFINED event does not wake it into
/// another one.
async fn stays_quiet(api: &Api<Vms>, name: &str, domain: &str) {
    let (rv, xml) = (
        api.get(name).await.unwrap().resource_version(),
        config_xml(domain),
    );
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            api.get(name).await.unwrap().resource_version(),
            rv,
            "the object keeps changing"
        );
        assert_eq!(
            config_xml(domain),
            xml,
            "the definition keeps being rewritten"
        );
    }
}

/// Applies the edits one by one to `name` on `domain` and checks each as a user would. On a
/// running domain the next-boot fields accumulate in `RestartRequired`; on a shut-off one every
/// edit is complete (`Ready=True`). Returns the next-boot fields written.
async fn apply_edits(
    client: &Client,
    ns: &str,
    name: &str,
    domain: &str,
    running: bool,
) -> Vec<&'static str> {
    let api: Api<Vms> = Api::namespaced(client.clone(), ns);
    let mut waiting: Vec<&'static str> = Vec::new();
    for edit in edits() {
        patch(&api, name, edit.patch.clone()).await;
        let want_waiting = {
            let mut w = waiting.clone();
            if matches!(edit.effect, Effect::NextBoot) && running {
                w.push(edit.field);
            }
            w
        };
        let what = format!("{} in effect", edit.field);
        let o = wait_obj::<Vms>(client, ns, name, &what, T, |o| {
            let (Some((ready, reason, _)), Some((restart, _, message))) =
                (cond(o, "Ready"), cond(o, "RestartRequired"))
            else {
                return false;
            };
            let status = o.status.as_ref().unwrap();
            current(o)
                && if want_waiting.is_empty() {
                    ready == "True" && restart == "False"
                } else {
                    ready == "False"
                        && reason == "RestartRequired"
                        && restart == "True"
                        && want_waiting
                            .iter()
                            .all(|f| message.contains(&format!("spec.{f}")))
                        && status.pending_restart.len() == want_waiting.len()
                }
        })
        .await;
        let a = alias(&o);
        let target = o.status.as_ref().unwrap().target.clone().unwrap();
        let config = fields_in(&config_xml(domain), &a).unwrap();
        assert!(
            (edit.shows)(&config),
            "{}: the definition has it: {config:?}",
            edit.field
        );
        if running {
            let live = fields_in(&live_xml(domain), &a).unwrap();
            match edit.effect {
                Effect::Live => {
                    assert!((edit.shows)(&live), "{}: live: {live:?}", edit.field);
                    assert_eq!(
                        limit(domain, &target, "total_bytes_sec"),
                        10_485_760,
                        "virsh blkdeviotune"
                    );
                }
                Effect::NextBoot => {
                    assert!(
                        !(edit.shows)(&live),
                        "{}: the running guest keeps the old value: {live:?}",
                        edit.field
                    );
                }
            }
        }
        if edit.field == "bootOrder" {
            assert!(
                !config_xml(domain).contains("<boot dev="),
                "the boot list was converted"
            );
            has_event(client, ns, name, "BootOrderConverted", "hd -> ").await;
            stays_quiet(&api, name, domain).await;
        }
        // Status shows the limits in effect.
        let io = o.status.as_ref().unwrap().iotune.clone().unwrap();
        assert_eq!(io.total_bytes_sec, Some(10_485_760));
        // The Event says what this edit did (each distinct message is its own Event).
        let (want, says) = match edit.effect {
            Effect::Live => ("IoTuneChanged", "Set the I/O limits of".to_string()),
            Effect::NextBoot => ("Updated", format!("Wrote spec.{} of", edit.field)),
        };
        has_event(client, ns, name, want, &says).await;
        waiting = want_waiting;
    }
    waiting
}

async fn disk_object(client: &Client, ns: &str, pool: &TestPool, domain: &str) -> Vms {
    let path = pool.path.join("data.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    virsh(&["pool-refresh", &pool.name]);
    kubectl_apply(
        ns,
        &format!(
            "apiVersion: virtplane.io/v1alpha1\nkind: VirtualMachineStorage\nmetadata:\n  name: data\nspec:\n  vm: {domain}\n  type: disk\n  source:\n    path: {}\n",
            path.display()
        ),
    );
    wait_obj::<Vms>(client, ns, "data", "Ready=True", T, |o| {
        cond(o, "Ready").is_some_and(|(s, _, _)| s == "True")
    })
    .await
}

#[tokio::test]
async fn running_guest_every_field_live_or_at_next_boot_then_restart_drift_revert() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-ds-run").await;
    let _op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-ds-run");
    let guest = TestGuest::boot("vp-ds-run", false).await;
    let o = disk_object(&client, &ns.name, &pool, &guest.name).await;
    let a = alias(&o);
    let target = o.status.as_ref().unwrap().target.clone().unwrap();
    let api: Api<Vms> = Api::namespaced(client.clone(), &ns.name);

    let waiting = apply_edits(&client, &ns.name, "data", &guest.name, true).await;
    assert_eq!(waiting.len(), 8, "{waiting:?}");

    // A restart brings every waiting field into effect; RestartRequired clears by itself.
    virsh(&["destroy", &guest.name]);
    guest.start().await;
    let o = wait_obj::<Vms>(&client, &ns.name, "data", "restart cleared", T, |o| {
        current(o)
            && cond(o, "Ready").is_some_and(|(s, _, _)| s == "True")
            && cond(o, "RestartRequired").is_some_and(|(s, _, _)| s == "False")
    })
    .await;
    assert!(o.status.as_ref().unwrap().pending_restart.is_empty());
    let live = fields_in(&live_xml(&guest.name), &a).unwrap();
    for edit in edits() {
        assert!(
            (edit.shows)(&live),
            "{} after the boot: {live:?}",
            edit.field
        );
    }
    assert_eq!(limit(&guest.name, &target, "read_iops_sec"), 200);

    // Drift: a limit changed with virsh is put back, with a Warning Event.
    virsh(&[
        "blkdeviotune",
        &guest.name,
        &target,
        "--read-iops-sec",
        "7",
        "--live",
    ]);
    eventually("the limit put back", T, || async {
        (limit(&guest.name, &target, "read_iops_sec") == 200).then_some(())
    })
    .await;
    has_event(
        &client,
        &ns.name,
        "data",
        "DriftCorrected",
        "spec.iotune was set again",
    )
    .await;

    // Revert: the limits go away live and in the definition; the next-boot fields wait again.
    api.patch(
        "data",
        &PatchParams::default(),
        &Patch::Json::<()>(
            serde_json::from_value(json!([
                {"op": "remove", "path": "/spec/iotune"},
                {"op": "remove", "path": "/spec/driver"},
            ]))
            .unwrap(),
        ),
    )
    .await
    .unwrap();
    let o = wait_obj::<Vms>(&client, &ns.name, "data", "reverted", T, |o| {
        current(o)
            && cond(o, "RestartRequired").is_some_and(|(s, _, m)| {
                s == "True" && m.contains("spec.driver.cache") && !m.contains("spec.serial")
            })
    })
    .await;
    assert_eq!(o.status.as_ref().unwrap().iotune, None);
    assert!(
        blkdeviotune(&guest.name, &target)
            .iter()
            .all(|(_, v)| *v == 0)
    );
    let config = fields_in(&config_xml(&guest.name), &a).unwrap();
    assert_eq!((config.iotune, config.cache), ([0; 12], None));

    // Refusals: nothing changes in libvirt, and the field is named.
    let (live_before, config_before) = (live_xml(&guest.name), config_xml(&guest.name));
    let refusals: Vec<(&str, Value, &str, &str)> = vec![
        ("vm", json!({"vm": "other-vm"}), "FieldImmutable", "spec.vm"),
        (
            "type",
            json!({"type": "cdrom"}),
            "FieldImmutable",
            "spec.type",
        ),
        (
            "target",
            json!({"target": "sdq"}),
            "FieldImmutable",
            "spec.target",
        ),
        ("bus", json!({"bus": "sata"}), "FieldImmutable", "spec.bus"),
        (
            "source",
            json!({"source": {"path": pool.path.join("other.img")}}),
            "FieldImmutable",
            "spec.source",
        ),
        (
            "total with read",
            json!({"iotune": {"totalBytesSec": 100, "readBytesSec": 50}}),
            "InvalidSpec",
            "spec.iotune.totalBytesSec",
        ),
        (
            "burst below its limit",
            json!({"iotune": {"writeBytesSec": 100, "writeBytesSecMax": 10}}),
            "InvalidSpec",
            "spec.iotune.writeBytesSecMax",
        ),
        (
            "native io through the host cache",
            json!({"driver": {"io": "native", "cache": "writeback"}}),
            "InvalidSpec",
            "spec.driver.io",
        ),
    ];
    std::fs::File::create(pool.path.join("other.img"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let before = api.get("data").await.unwrap().spec;
    for (name, edit, reason, field) in refusals {
        patch(&api, "data", edit).await;
        wait_obj::<Vms>(&client, &ns.name, "data", name, T, |o| {
            current(o)
                && cond(o, "Ready")
                    .is_some_and(|(s, r, m)| s == "False" && r == reason && m.contains(field))
        })
        .await;
        assert_eq!(live_xml(&guest.name), live_before, "{name}: live unchanged");
        assert_eq!(
            config_xml(&guest.name),
            config_before,
            "{name}: definition unchanged"
        );
        // Back to the accepted spec.
        api.replace(
            "data",
            &Default::default(),
            &Vms {
                spec: before.clone(),
                ..api.get("data").await.unwrap()
            },
        )
        .await
        .unwrap();
    }
    // A negative limit never reaches the agent: the API server names the field.
    let err = api
        .patch(
            "data",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"iotune": {"readBytesSec": -1}}})),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("readBytesSec"), "{err}");
}

#[tokio::test]
async fn shut_off_domain_takes_every_field_in_its_definition() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-ds-off").await;
    let _op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-ds-off");
    let domain = TestDomain::define("vp-ds-off");
    // A disk virtplane does not manage: the conversion of <os><boot dev='hd'/> gives it the
    // order after the requested one.
    let os_disk = pool.path.join("os.img");
    std::fs::File::create(&os_disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    virsh(&[
        "attach-disk",
        &domain.name,
        os_disk.to_str().unwrap(),
        "vdz",
        "--targetbus",
        "virtio",
        "--config",
    ]);
    let o = disk_object(&client, &ns.name, &pool, &domain.name).await;
    let (a, t) = (
        alias(&o),
        o.status.as_ref().unwrap().target.clone().unwrap(),
    );
    let waiting = apply_edits(&client, &ns.name, "data", &domain.name, false).await;
    assert!(waiting.is_empty());
    has_event(
        &client,
        &ns.name,
        "data",
        "BootOrderConverted",
        "hd -> vdz=2",
    )
    .await;
    assert_eq!(
        boot_orders(&config_xml(&domain.name)),
        [(t, 1), (s("vdz"), 2)]
    );

    // Deleting the object removes its disk with its boot order; the other disk keeps the order
    // the conversion gave it, so the domain boots from it as it did before, and no order is
    // left twice or dangling.
    let api: Api<Vms> = Api::namespaced(client.clone(), &ns.name);
    api.delete("data", &Default::default()).await.unwrap();
    wait_gone::<Vms>(&client, &ns.name, "data", T).await;
    let config = config_xml(&domain.name);
    assert!(fields_in(&config, &a).is_none(), "{config}");
    assert_eq!(boot_orders(&config), [(s("vdz"), 2)], "{config}");
    assert!(!config.contains("<boot dev="), "{config}");
}

fn s(v: &str) -> String {
    v.to_string()
}

/// The (target, boot order) of the definition's disks that have an order.
fn boot_orders(xml: &str) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = parse_domain(xml)
        .unwrap()
        .disks
        .iter()
        .filter_map(|d| Some((d.target.clone()?, disk_fields(&d.xml).boot_order?)))
        .collect();
    out.sort();
    out
}
