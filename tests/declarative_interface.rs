//! Every field of `VMInterface.spec` against a real libvirtd: a change takes effect in the
//! running guest (checked with `virsh domiftune` and the live XML), or is written to the
//! definition with `RestartRequired=True` until the domain restarted, or is refused with nothing
//! changed; the same edits on a shut-off domain, a revert, and drift made with virsh.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use virtplane::api::VMInterface;

use common::*;

type Nic = VMInterface;
const T: Duration = Duration::from_secs(90);

fn cond(o: &Nic, type_: &str) -> Option<(String, String, String)> {
    condition_of(&o.status.as_ref()?.conditions, type_)
}

fn manifest(name: &str, vm: &str, body: &str) -> String {
    format!(
        "apiVersion: virtplane.io/v1alpha1\nkind: VMInterface\nmetadata:\n  name: {name}\nspec:\n  vm: {vm}\n{body}"
    )
}

fn mac(o: &Nic) -> String {
    o.status.as_ref().unwrap().mac.clone().unwrap()
}

/// The `<interface>` element with `mac` in a domain XML.
fn element(xml: &str, mac: &str) -> String {
    let doc = roxmltree::Document::parse(xml).unwrap();
    doc.descendants()
        .find(|n| {
            n.has_tag_name("interface")
                && n.children().any(|c| {
                    c.has_tag_name("mac")
                        && c.attribute("address")
                            .map(str::to_ascii_lowercase)
                            .as_deref()
                            == Some(mac)
                })
        })
        .map(|n| xml[n.range()].to_string())
        .unwrap_or_default()
}

/// `virsh domiftune --live` of the interface, as `name -> value`.
fn domiftune(vm: &str, mac: &str) -> Vec<(String, u64)> {
    virsh(&["domiftune", vm, mac, "--live"])
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn tune(vm: &str, mac: &str, key: &str) -> u64 {
    domiftune(vm, mac)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("domiftune has no {key}"))
}

/// Whether this host's kernel can shape a tap's traffic the way libvirt does it (htb + sfq
/// inbound, an ingress policer outbound). Some kernels (a Firecracker guest kernel without
/// `sch_sfq` and `act_police`) cannot: there libvirt refuses every bandwidth limit on a running
/// guest, and the tests assert that refusal instead of the limits.
fn host_can_shape() -> bool {
    let tap = unique("vptap");
    let tap = &tap[..tap.len().min(15)];
    let run = |args: &[&str]| {
        std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !run(&["ip", "tuntap", "add", "dev", tap, "mode", "tap"]) {
        return false;
    }
    let ok = run(&[
        "tc", "qdisc", "add", "dev", tap, "root", "handle", "1:", "htb",
    ]) && run(&[
        "tc", "class", "add", "dev", tap, "parent", "1:", "classid", "1:1", "htb", "rate", "1mbit",
    ]) && run(&[
        "tc", "qdisc", "add", "dev", tap, "parent", "1:1", "handle", "2:", "sfq",
    ]) && run(&["tc", "qdisc", "add", "dev", tap, "ingress"])
        && run(&[
            "tc", "filter", "add", "dev", tap, "parent", "ffff:", "protocol", "all", "u32",
            "match", "u32", "0", "0", "police", "rate", "1mbit", "burst", "64kb", "drop", "flowid",
            ":1",
        ]);
    run(&["ip", "tuntap", "del", "dev", tap, "mode", "tap"]);
    ok
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

async fn has_event(client: &Client, ns: &str, name: &str, reason: &str, says: &str) {
    eventually(&format!("a {reason} Event saying {says}"), T, || async {
        events(client, ns, name)
            .await
            .iter()
            .any(|(r, m)| r == reason && m.contains(says))
            .then_some(())
    })
    .await;
}

/// Patches the spec and waits until the agent has acted on this generation.
async fn edit(client: &Client, ns: &str, name: &str, spec: Value) -> Nic {
    let api: Api<Nic> = Api::namespaced(client.clone(), ns);
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": spec })),
    )
    .await
    .unwrap();
    settled(client, ns, name, &|_| true).await
}

/// Waits until the agent acted on the object's generation and `check` holds.
async fn settled(client: &Client, ns: &str, name: &str, check: &dyn Fn(&Nic) -> bool) -> Nic {
    wait_obj::<Nic>(client, ns, name, "this generation acted on", T, |o| {
        o.status.as_ref().and_then(|s| s.observed_generation) == o.metadata.generation
            && cond(o, "Ready").is_some()
            && check(o)
    })
    .await
}

fn ready(o: &Nic) -> (String, String) {
    let (s, r, _) = cond(o, "Ready").unwrap();
    (s, r)
}

fn restart_required(o: &Nic) -> Option<String> {
    cond(o, "RestartRequired")
        .filter(|(s, _, _)| s == "True")
        .map(|(_, _, m)| m)
}

fn waiting(o: &Nic) -> Vec<String> {
    o.status.as_ref().unwrap().waiting_for_restart.clone()
}

/// After an edit is in effect the object and the definition stay as they are: the agent does
/// not keep rewriting the definition, and a rewrite's DEFINED event does not wake it into another.
async fn quiet(client: &Client, ns: &str, name: &str, vm: &str) {
    let api: Api<Nic> = Api::namespaced(client.clone(), ns);
    let (rv, xml) = (
        api.get(name).await.unwrap().resource_version(),
        config_xml(vm),
    );
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            api.get(name).await.unwrap().resource_version(),
            rv,
            "the object keeps changing"
        );
        assert_eq!(config_xml(vm), xml, "the definition keeps being rewritten");
    }
}

/// One edit of the table: the spec patch, what the live and persistent `<interface>` then
/// contain, the fields that wait for a restart, and the Event that says so.
struct Case {
    field: &'static str,
    patch: Value,
    live: Vec<String>,
    config: Vec<String>,
    not_live: Vec<String>,
    waiting: Vec<&'static str>,
    event: (&'static str, &'static str),
}

#[tokio::test]
async fn every_field_on_a_running_guest_until_its_restart_drift_revert_and_refusals() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-dif-run").await;
    let _op = Operator::start(&ns.name, &[]);
    let net2 = Network::start(&unique("vp-dif-net"));
    let guest = TestGuest::boot("vp-dif-run", true).await;
    let vm = guest.name.clone();
    let domid = virsh(&["domid", &vm]);

    kubectl_apply(
        &ns.name,
        &manifest("nic", &vm, "  type: network\n  source: default\n"),
    );
    let nic = settled(&client, &ns.name, "nic", &|o| ready(o).0 == "True").await;
    let m = mac(&nic);
    assert!(element(&live_xml(&vm), &m).contains("network='default'"));

    let shaping = host_can_shape();
    eprintln!("host kernel can shape tap traffic: {shaping}");
    let s = |v: &str| v.to_string();
    let bandwidth = json!({"bandwidth": {
        "inbound": {"average": 1000, "peak": 2000, "burst": 512},
        "outbound": {"average": 500}}});
    if !shaping {
        // libvirt refuses the limit on the running guest: reported, and nothing written.
        let config = element(&config_xml(&vm), &m);
        let o = edit(&client, &ns.name, "nic", bandwidth.clone()).await;
        let (st, r, msg) = cond(&o, "Ready").unwrap();
        assert_eq!(
            (st.as_str(), r.as_str()),
            ("False", "AttachFailed"),
            "{msg}"
        );
        assert!(
            msg.contains("failed to set the interface bandwidth"),
            "{msg}"
        );
        assert_eq!(
            element(&config_xml(&vm), &m),
            config,
            "definition unchanged"
        );
        assert!(!element(&live_xml(&vm), &m).contains("<bandwidth"));
        let o = edit(&client, &ns.name, "nic", json!({"bandwidth": null})).await;
        assert_eq!(ready(&o), (s("True"), s("Attached")));
    }
    let mut cases = vec![
        Case {
            field: "bandwidth",
            patch: bandwidth,
            live: vec![],
            config: vec![
                s("<inbound average='1000' peak='2000' burst='512'/>"),
                s("<outbound average='500'/>"),
            ],
            not_live: vec![],
            waiting: vec![],
            event: ("Updated", "Changed bandwidth"),
        },
        Case {
            field: "linkState",
            patch: json!({"linkState": "down"}),
            live: vec![s("<link state='down'/>")],
            config: vec![s("<link state='down'/>")],
            not_live: vec![],
            waiting: vec![],
            event: ("LinkChanged", "down"),
        },
        Case {
            field: "source",
            patch: json!({"source": net2.0}),
            live: vec![format!("network='{}'", net2.0)],
            config: vec![format!("network='{}'", net2.0)],
            not_live: vec![],
            waiting: vec![],
            event: ("Updated", "Changed source"),
        },
        Case {
            field: "mtu",
            patch: json!({"mtu": 1400}),
            live: vec![],
            config: vec![s("<mtu size='1400'/>")],
            not_live: vec![s("<mtu size='1400'/>")],
            waiting: vec!["mtu"],
            event: ("Updated", "Wrote mtu"),
        },
        Case {
            field: "queues",
            patch: json!({"queues": 2}),
            live: vec![],
            config: vec![s("queues='2'")],
            not_live: vec![s("queues='2'")],
            waiting: vec!["mtu", "queues"],
            event: ("Updated", "Wrote queues"),
        },
        // The guest orders booting by type (<os><boot dev='hd'/>, as libvirt writes it): the
        // list becomes per-device orders in the same define, like virt-manager does.
        Case {
            field: "bootOrder",
            patch: json!({"bootOrder": 2}),
            live: vec![],
            config: vec![s("<boot order='2'/>")],
            not_live: vec![s("<boot order")],
            waiting: vec!["mtu", "queues", "bootOrder"],
            event: ("BootOrderConverted", "hd -> "),
        },
    ];
    if !shaping {
        cases.remove(0);
    }
    for c in &cases {
        let o = edit(&client, &ns.name, "nic", c.patch.clone()).await;
        let (live, config) = (element(&live_xml(&vm), &m), element(&config_xml(&vm), &m));
        if c.field == "bootOrder" {
            assert!(
                !config_xml(&vm).contains("<boot dev="),
                "{}",
                config_xml(&vm)
            );
            quiet(&client, &ns.name, "nic", &vm).await;
        }
        for want in &c.live {
            assert!(live.contains(want), "{}: live {live}", c.field);
        }
        for want in &c.not_live {
            assert!(!live.contains(want), "{}: live {live}", c.field);
        }
        for want in &c.config {
            assert!(config.contains(want), "{}: config {config}", c.field);
        }
        assert_eq!(waiting(&o), c.waiting, "{}", c.field);
        if c.waiting.is_empty() {
            assert_eq!(ready(&o), (s("True"), s("Attached")), "{}", c.field);
            assert_eq!(restart_required(&o), None, "{}", c.field);
        } else {
            assert_eq!(
                ready(&o),
                (s("False"), s("WaitingForRestart")),
                "{}",
                c.field
            );
            let msg = restart_required(&o).unwrap();
            for f in &c.waiting {
                assert!(msg.contains(f), "{}: {msg}", c.field);
            }
            // Announced once, when the restart became required.
            has_event(&client, &ns.name, "nic", "RestartRequired", c.waiting[0]).await;
        }
        // Each distinct message is its own Event (the agent gives it its own action).
        has_event(&client, &ns.name, "nic", c.event.0, c.event.1).await;
    }
    let nic: Nic = Api::namespaced(client.clone(), &ns.name)
        .get("nic")
        .await
        .unwrap();
    if shaping {
        // Bandwidth in effect, through libvirt and in the status.
        assert_eq!(tune(&vm, &m, "inbound.average"), 1000);
        assert_eq!(tune(&vm, &m, "inbound.peak"), 2000);
        assert_eq!(tune(&vm, &m, "inbound.burst"), 512);
        assert_eq!(tune(&vm, &m, "outbound.average"), 500);
        let bw = nic.status.as_ref().unwrap().bandwidth.unwrap();
        assert_eq!(bw.inbound.unwrap().average, 1000);
        assert_eq!(bw.outbound.unwrap().average, 500);
    }
    assert_eq!(virsh(&["domid", &vm]), domid, "nothing restarted the guest");

    // Restart: the waiting fields come into effect and RestartRequired clears by itself.
    virsh(&["destroy", &vm]);
    guest.start().await;
    let o = settled(&client, &ns.name, "nic", &|o| {
        o.status.as_ref().unwrap().live == Some(true)
            && restart_required(o).is_none()
            && ready(o).0 == "True"
    })
    .await;
    assert!(waiting(&o).is_empty());
    let live = element(&live_xml(&vm), &m);
    assert!(
        live.contains("<mtu size='1400'/>")
            && live.contains("queues='2'")
            && live.contains("<boot order='2'/>"),
        "{live}"
    );
    assert!(live.contains("<link state='down'/>"), "{live}");

    // Drift: a link state and a bandwidth changed with virsh are set back, with Warning Events.
    virsh(&["domif-setlink", &vm, &m, "up"]);
    eventually("the link set back down", T, || async {
        element(&live_xml(&vm), &m)
            .contains("<link state='down'/>")
            .then_some(())
    })
    .await;
    has_event(&client, &ns.name, "nic", "DriftCorrected", "linkState").await;
    if shaping {
        assert_eq!(tune(&vm, &m, "inbound.average"), 1000);
        virsh(&["domiftune", &vm, &m, "--live", "--inbound", "123"]);
        eventually("the bandwidth set back", T, || async {
            (tune(&vm, &m, "inbound.average") == 1000).then_some(())
        })
        .await;
        has_event(&client, &ns.name, "nic", "DriftCorrected", "bandwidth").await;
    }

    // Revert to the first spec: limits lifted and the network back in place; the MTU and the
    // queues wait for the next boot again.
    let o = edit(
        &client,
        &ns.name,
        "nic",
        json!({"bandwidth": null, "linkState": "up", "source": "default", "mtu": null, "queues": null}),
    )
    .await;
    if shaping {
        assert_eq!(tune(&vm, &m, "inbound.average"), 0);
        assert_eq!(tune(&vm, &m, "outbound.average"), 0);
    }
    let bw = o.status.as_ref().unwrap().bandwidth.unwrap_or_default();
    assert_eq!((bw.inbound, bw.outbound), (None, None));
    let (live, config) = (element(&live_xml(&vm), &m), element(&config_xml(&vm), &m));
    assert!(
        live.contains("<link state='up'/>") && live.contains("network='default'"),
        "{live}"
    );
    assert!(
        !config.contains("<mtu") && !config.contains("queues="),
        "{config}"
    );
    assert_eq!(waiting(&o), ["mtu", "queues"]);

    // Refusals: named field, nothing changed in libvirt; setting it back makes it Ready again.
    let refusals = vec![
        (
            json!({"type": "bridge", "source": "virbr0"}),
            json!({"type": "network", "source": "default"}),
            "FieldImmutable",
            "spec.type",
        ),
        (
            json!({"mac": "52:54:00:5b:00:01"}),
            json!({"mac": null}),
            "FieldImmutable",
            "spec.mac",
        ),
        (
            json!({"vm": "vp-dif-other"}),
            json!({"vm": vm}),
            "FieldImmutable",
            "spec.vm",
        ),
        (
            json!({"model": "e1000e", "queues": 2}),
            json!({"model": "virtio", "queues": null}),
            "InvalidSpec",
            "spec.queues",
        ),
        (
            json!({"bandwidth": {"inbound": {"average": 1000, "peak": 10}}}),
            json!({"bandwidth": null}),
            "InvalidSpec",
            "spec.bandwidth.inbound.peak",
        ),
    ];
    for (bad, back, reason, field) in refusals {
        let (live, config) = (element(&live_xml(&vm), &m), element(&config_xml(&vm), &m));
        let o = edit(&client, &ns.name, "nic", bad.clone()).await;
        let (st, r, msg) = cond(&o, "Ready").unwrap();
        assert_eq!((st.as_str(), r.as_str()), ("False", reason), "{bad}: {msg}");
        assert!(msg.contains(field), "{bad}: {msg}");
        has_event(&client, &ns.name, "nic", reason, field).await;
        assert_eq!(element(&live_xml(&vm), &m), live, "{bad}: live unchanged");
        assert_eq!(
            element(&config_xml(&vm), &m),
            config,
            "{bad}: definition unchanged"
        );
        let o = edit(&client, &ns.name, "nic", back).await;
        assert_eq!(ready(&o).1, "WaitingForRestart", "{bad} set back");
    }
    // Zero and negative values never reach the agent: the API server refuses them.
    let api: Api<Nic> = Api::namespaced(client.clone(), &ns.name);
    for bad in [
        json!({"queues": 0}),
        json!({"bandwidth": {"inbound": {"average": -1}}}),
        json!({"bandwidth": {"outbound": {"average": 0}}}),
    ] {
        let r = api
            .patch(
                "nic",
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": bad })),
            )
            .await;
        assert!(r.is_err(), "{bad} accepted");
    }
    assert!(nic.uid().is_some());
}

#[tokio::test]
async fn every_field_on_a_shut_off_domain_is_the_whole_change() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-dif-off").await;
    let _op = Operator::start(&ns.name, &[]);
    let net2 = Network::start(&unique("vp-dif-net"));
    // A domain as `virsh define` leaves it: libvirt orders booting with <os><boot dev='hd'/>.
    let domain = TestDomain::define("vp-dif-off");
    let vm = domain.name.clone();
    assert!(
        config_xml(&vm).contains("<boot dev="),
        "{}",
        config_xml(&vm)
    );

    kubectl_apply(
        &ns.name,
        &manifest("nic", &vm, "  type: network\n  source: default\n"),
    );
    let nic = settled(&client, &ns.name, "nic", &|o| ready(o).0 == "True").await;
    let m = mac(&nic);
    let cases: Vec<(Value, String)> = vec![
        (
            json!({"bandwidth": {"inbound": {"average": 800}}}),
            "<inbound average='800'/>".into(),
        ),
        (json!({"linkState": "down"}), "<link state='down'/>".into()),
        (json!({"source": net2.0}), format!("network='{}'", net2.0)),
        (json!({"mtu": 1300}), "<mtu size='1300'/>".into()),
        (json!({"queues": 2}), "queues='2'".into()),
        (
            json!({"model": "e1000e", "queues": null}),
            "<model type='e1000e'/>".into(),
        ),
    ];
    for (patch, want) in cases {
        let o = edit(&client, &ns.name, "nic", patch.clone()).await;
        let config = element(&config_xml(&vm), &m);
        assert!(config.contains(&want), "{patch}: {config}");
        assert_eq!(ready(&o), ("True".into(), "Attached".into()), "{patch}");
        assert_eq!(restart_required(&o), None, "{patch}");
        assert!(waiting(&o).is_empty(), "{patch}");
    }
    has_event(
        &client,
        &ns.name,
        "nic",
        "Updated",
        "in effect when it starts",
    )
    .await;
    let shaping = host_can_shape();
    if !shaping {
        // A kernel that cannot shape makes libvirt refuse to start a domain with limits: the
        // revert is the whole change too.
        let o = edit(&client, &ns.name, "nic", json!({"bandwidth": null})).await;
        // Unlimited: absent, or (server-side apply keeps the emptied map) empty.
        let bw = o.status.as_ref().unwrap().bandwidth.unwrap_or_default();
        assert_eq!((bw.inbound, bw.outbound), (None, None));
        assert!(!element(&config_xml(&vm), &m).contains("<bandwidth"));
    }
    assert!(
        !element(&config_xml(&vm), &m).contains("queues="),
        "queues removed"
    );

    // bootOrder on a domain ordered by <os><boot dev='hd'/>: the list becomes per-device
    // orders in the same define (like virt-manager), announced in an Event; nothing waits.
    let o = edit(&client, &ns.name, "nic", json!({"bootOrder": 1})).await;
    assert_eq!(ready(&o), ("True".into(), "Attached".into()));
    assert!(element(&config_xml(&vm), &m).contains("<boot order='1'/>"));
    assert!(
        !config_xml(&vm).contains("<boot dev="),
        "{}",
        config_xml(&vm)
    );
    has_event(&client, &ns.name, "nic", "BootOrderConverted", "hd -> ").await;
    quiet(&client, &ns.name, "nic", &vm).await;

    // Started: the guest runs with what the definition has; nothing waits.
    virsh(&["start", &vm]);
    let o = settled(&client, &ns.name, "nic", &|o| {
        o.status.as_ref().unwrap().live == Some(true)
    })
    .await;
    assert_eq!(ready(&o), ("True".into(), "Attached".into()));
    assert_eq!(restart_required(&o), None);
    let live = element(&live_xml(&vm), &m);
    assert!(
        live.contains("<model type='e1000e'/>") && live.contains("<mtu size='1300'/>"),
        "{live}"
    );
    if shaping {
        assert_eq!(tune(&vm, &m, "inbound.average"), 800);
    }
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
        for cmd in ["net-destroy", "net-undefine"] {
            let _ = std::process::Command::new("virsh")
                .args(["-c", &libvirt_uri(), cmd, &self.0])
                .output();
        }
    }
}
