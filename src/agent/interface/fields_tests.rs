//! Table tests of the rule for every spec field: the plan's outcome for each field on a running
//! and a shut-off domain, drift, refusals, and the whole reconcile against the fake libvirt up to
//! the restart that clears `RestartRequired`.

use super::apply::{Applied, apply};
use super::observe::GuestSeen;
use super::plan::{Identity, Plan, Step, plan};
use super::report;
use super::tests::{ALIAS, ID, M, devices, observed, spec};
use crate::agent::refusal::Reason as _;
use crate::api::VMInterfaceStatus;
use crate::libvirt::domain::DomainView;
use crate::libvirt::facade::Domains;
use crate::libvirt::fake::FakeLibvirt;
use crate::libvirt::nic::{self, Kept, NicSettings};

/// The NIC the base spec describes: a virtio NIC on network `default`, link up.
fn base() -> NicSettings {
    NicSettings {
        type_: "network".into(),
        source: Some("default".into()),
        model: Some("virtio".into()),
        ..Default::default()
    }
}

fn xml(s: &NicSettings) -> String {
    nic::interface_xml(s, M, ALIAS, &Kept::default())
}

fn domain(active: bool, live: &NicSettings, config: &NicSettings) -> DomainView {
    DomainView {
        active,
        persistent: true,
        live: active.then(|| devices(&xml(live))),
        config: devices(&xml(config)),
    }
}

fn placed() -> VMInterfaceStatus {
    VMInterfaceStatus {
        vm: Some("vm".into()),
        mac: Some(M.into()),
        live: Some(true),
        persistent: Some(true),
        observed_generation: Some(1),
        ..Default::default()
    }
}

fn spec_of(edit: serde_json::Value) -> crate::api::VMInterfaceSpec {
    let mut s = serde_json::json!({"type": "network"});
    if let (Some(b), Some(e)) = (s.as_object_mut(), edit.as_object()) {
        b.extend(e.clone());
    }
    spec(s)
}

fn planned(
    edit: serde_json::Value,
    v: DomainView,
    generation: i64,
) -> Result<Plan, super::reason::Refusal> {
    let mut o = observed(Some(v));
    o.macs = None;
    let id = Identity {
        generation: Some(generation),
        ..ID
    };
    plan(&id, &spec_of(edit), &placed(), &o)
}

/// The kinds of steps, without their XML.
fn kinds(p: &Plan) -> Vec<String> {
    p.steps
        .iter()
        .map(|s| match s {
            Step::UpdateLive { fields, .. } => format!("live {}", fields.join(",")),
            Step::SetBandwidthLive => "bandwidth live".into(),
            Step::UpdateConfig { fields, .. } => format!("config {}", fields.join(",")),
            other => format!("{other:?}"),
        })
        .collect()
}

const BW: &str =
    r#"{"inbound": {"average": 1000, "peak": 2000, "burst": 512}, "outbound": {"average": 500}}"#;

#[test]
fn every_field_on_a_running_and_a_shut_off_domain() {
    let bw: serde_json::Value = serde_json::from_str(BW).unwrap_or_default();
    // (field edit, steps on a running domain, fields waiting for a restart, steps when shut off)
    type Case = (
        serde_json::Value,
        Vec<&'static str>,
        Vec<&'static str>,
        Vec<&'static str>,
    );
    let cases: Vec<Case> = vec![
        (
            serde_json::json!({"source": "other"}),
            vec!["live source", "config source"],
            vec![],
            vec!["config source"],
        ),
        (
            serde_json::json!({"linkState": "down"}),
            vec!["live linkState", "config linkState"],
            vec![],
            vec!["config linkState"],
        ),
        (
            serde_json::json!({ "bandwidth": bw }),
            vec!["bandwidth live", "config bandwidth"],
            vec![],
            vec!["config bandwidth"],
        ),
        (
            serde_json::json!({"model": "e1000e"}),
            vec!["config model"],
            vec!["model"],
            vec!["config model"],
        ),
        (
            serde_json::json!({"mtu": 1400}),
            vec!["config mtu"],
            vec!["mtu"],
            vec!["config mtu"],
        ),
        (
            serde_json::json!({"queues": 2}),
            vec!["config queues"],
            vec!["queues"],
            vec!["config queues"],
        ),
        (
            serde_json::json!({"bootOrder": 1}),
            vec!["config bootOrder"],
            vec!["bootOrder"],
            vec!["config bootOrder"],
        ),
        (
            serde_json::json!({"model": "e1000e", "mtu": 9000, "linkState": "down"}),
            vec!["live linkState", "config model,linkState,mtu"],
            vec!["model", "mtu"],
            vec!["config model,linkState,mtu"],
        ),
        (serde_json::json!({}), vec![], vec![], vec![]),
    ];
    for (edit, running, waiting, shut_off) in cases {
        let p = planned(edit.clone(), domain(true, &base(), &base()), 2).unwrap();
        assert_eq!(kinds(&p), running, "{edit} running");
        assert_eq!(p.waiting, waiting, "{edit} waiting");
        assert!(!p.drift, "{edit}: a new generation is no drift");
        let p = planned(edit.clone(), domain(false, &base(), &base()), 2).unwrap();
        assert_eq!(kinds(&p), shut_off, "{edit} shut off");
        assert!(
            p.waiting.is_empty(),
            "{edit}: nothing waits on a shut-off domain"
        );
    }
}

#[test]
fn a_restart_with_the_new_definition_leaves_nothing_waiting() {
    let want = NicSettings {
        model: Some("e1000e".into()),
        mtu: Some(1400),
        ..base()
    };
    let edit = serde_json::json!({"model": "e1000e", "mtu": 1400});
    // Written, not yet booted: the definition has it, the guest does not.
    let p = planned(edit.clone(), domain(true, &base(), &want), 2).unwrap();
    assert!(p.steps.is_empty(), "{:?}", p.steps);
    assert_eq!(p.waiting, ["model", "mtu"]);
    // Restarted: both have it.
    let p = planned(edit, domain(true, &want, &want), 2).unwrap();
    assert!(p.steps.is_empty() && p.waiting.is_empty(), "{p:?}");
}

#[test]
fn a_live_update_keeps_the_guests_restart_only_settings() {
    let live = NicSettings {
        mtu: Some(1400),
        ..base()
    };
    let p = planned(
        serde_json::json!({"linkState": "down", "mtu": 9000}),
        domain(true, &live, &live),
        2,
    )
    .unwrap();
    let Step::UpdateLive { xml, .. } = &p.steps[0] else {
        panic!("{:?}", p.steps);
    };
    let (sent, _) = nic::parse(xml).unwrap();
    assert!(sent.link_down);
    assert_eq!(sent.mtu, Some(1400), "QEMU cannot change the MTU in place");
    let Step::UpdateConfig { xml, .. } = &p.steps[1] else {
        panic!("{:?}", p.steps);
    };
    assert_eq!(nic::parse(xml).unwrap().0.mtu, Some(9000));
}

#[test]
fn a_direct_interface_switches_device_at_the_next_boot() {
    let direct = NicSettings {
        type_: "direct".into(),
        source: Some("eth0".into()),
        ..base()
    };
    let p = planned(
        serde_json::json!({"type": "direct", "source": "eth1"}),
        domain(true, &direct, &direct),
        2,
    )
    .unwrap();
    assert_eq!(kinds(&p), ["config source"]);
    assert_eq!(p.waiting, ["source"]);
}

#[test]
fn drift_goes_through_the_same_comparison() {
    let bw: serde_json::Value = serde_json::from_str(BW).unwrap_or_default();
    let edit = serde_json::json!({ "bandwidth": bw });
    let want = nic::NicSettings {
        bandwidth: super::fields::to_libvirt(spec_of(edit.clone()).bandwidth.as_ref()),
        ..base()
    };
    // The same generation as last acted on: the live bandwidth was changed with virsh.
    let p = planned(edit.clone(), domain(true, &base(), &want), 1).unwrap();
    assert_eq!(kinds(&p), ["bandwidth live"]);
    assert!(p.drift);
    // A model changed behind our back in the definition is written back.
    let drifted = NicSettings {
        model: Some("rtl8139".into()),
        ..want.clone()
    };
    let p = planned(edit, domain(true, &want, &drifted), 1).unwrap();
    assert_eq!(kinds(&p), ["config model"]);
    assert!(
        p.waiting.is_empty(),
        "the guest still runs the spec's model"
    );
}

#[test]
fn every_refusal_names_the_field_and_plans_nothing() {
    let running = || domain(true, &base(), &base());
    let cases: Vec<(serde_json::Value, DomainView, &str, &str)> = vec![
        (
            serde_json::json!({"type": "bridge", "source": "br0"}),
            running(),
            "FieldImmutable",
            "spec.type",
        ),
        (
            serde_json::json!({"vm": "other"}),
            running(),
            "FieldImmutable",
            "spec.vm",
        ),
        (
            serde_json::json!({"mac": "52:54:00:00:00:08"}),
            running(),
            "FieldImmutable",
            "spec.mac",
        ),
        (
            serde_json::json!({"model": "e1000e", "queues": 4}),
            running(),
            "InvalidSpec",
            "spec.queues",
        ),
        (
            serde_json::json!({"bandwidth": {"inbound": {"average": 10, "peak": 5}}}),
            running(),
            "InvalidSpec",
            "spec.bandwidth.inbound.peak",
        ),
    ];
    for (edit, v, reason, field) in cases {
        let r = planned(edit.clone(), v, 2).unwrap_err();
        assert_eq!(r.reason.as_str(), reason, "{edit}");
        assert!(r.message.contains(field), "{edit}: {}", r.message);
        assert!(r.message.contains("Nothing was changed") || reason == "InvalidSpec");
    }
}

async fn reconcile(
    fake: &FakeLibvirt,
    edit: serde_json::Value,
    generation: i64,
) -> report::Outcome {
    let v = fake.domain("vm").await.unwrap().unwrap();
    let p = planned(edit, v, generation).unwrap();
    let Applied::Done { events, restart } = apply(fake, &p).await.unwrap() else {
        panic!("done");
    };
    let after = fake.domain("vm").await.unwrap().unwrap();
    report::report(
        &placed(),
        &p,
        &after,
        &GuestSeen::NotRunning,
        events,
        restart,
    )
}

#[tokio::test]
async fn live_fields_apply_at_once_and_restart_fields_wait_until_the_restart() {
    let fake = FakeLibvirt::default().with_domain("vm", true, &xml(&base()));
    let bw: serde_json::Value = serde_json::from_str(BW).unwrap_or_default();
    let edit = serde_json::json!({"bandwidth": bw, "mtu": 1400});
    let out = reconcile(&fake, edit.clone(), 2).await;
    let reasons: Vec<&str> = out.events.iter().map(|(_, r, _)| *r).collect();
    assert_eq!(reasons, ["Updated", "Updated"], "{:?}", out.events);
    assert!(out.events[0].2.contains("bandwidth") && out.events[1].2.contains("mtu"));
    // Bandwidth in effect in the running guest, shown in the status; the MTU waits.
    let d = fake.domain_state("vm").unwrap();
    let live = nic::parse(&d.live.nic(ALIAS).unwrap().xml).unwrap().0;
    let config = nic::parse(&d.config.nic(ALIAS).unwrap().xml).unwrap().0;
    assert_eq!(live.bandwidth.inbound.map(|r| r.average), Some(1000));
    assert_eq!((live.mtu, config.mtu), (None, Some(1400)));
    assert_eq!(config.bandwidth, live.bandwidth);
    let status_bw = out.status.bandwidth.unwrap();
    assert_eq!(status_bw.outbound.map(|l| l.average), Some(500));
    assert_eq!(out.status.waiting_for_restart, ["mtu"]);
    assert_eq!(
        (out.ready.status, out.ready.reason),
        (false, "WaitingForRestart")
    );
    let msg = out.restart.unwrap();
    assert!(
        msg.starts_with("mtu of 52:54:00:00:00:07 is written"),
        "{msg}"
    );
    // Looked at again before the restart: nothing more to do, still waiting.
    let again = reconcile(&fake, edit.clone(), 2).await;
    assert!(again.events.is_empty(), "{:?}", again.events);
    assert!(again.restart.is_some());
    // After the restart RestartRequired clears by itself and Ready is True.
    fake.restart("vm");
    let out = reconcile(&fake, edit, 2).await;
    assert_eq!(out.restart, None);
    assert!(out.status.waiting_for_restart.is_empty());
    assert_eq!((out.ready.status, out.ready.reason), (true, "Attached"));
}

#[tokio::test]
async fn a_revert_and_drift_are_set_back_with_their_events() {
    let fake = FakeLibvirt::default().with_domain("vm", true, &xml(&base()));
    let bw: serde_json::Value = serde_json::from_str(BW).unwrap_or_default();
    reconcile(&fake, serde_json::json!({ "bandwidth": bw }), 2).await;
    // Revert: no bandwidth in the spec lifts the limits, live and persistent.
    let out = reconcile(&fake, serde_json::json!({}), 3).await;
    assert_eq!(out.status.bandwidth, None);
    let d = fake.domain_state("vm").unwrap();
    assert!(!d.live.nic(ALIAS).unwrap().xml.contains("bandwidth"));
    assert!(!d.config.nic(ALIAS).unwrap().xml.contains("bandwidth"));
    // Drift: a limit set behind our back at the same generation is lifted with a Warning.
    use crate::libvirt::nic::NicTuning as _;
    let limit = super::fields::to_libvirt(
        spec_of(serde_json::json!({ "bandwidth": bw }))
            .bandwidth
            .as_ref(),
    );
    fake.set_live_bandwidth("vm", M, &limit).await.unwrap();
    let out = reconcile(&fake, serde_json::json!({}), 1).await;
    assert_eq!(out.events.len(), 1);
    assert_eq!(out.events[0].1, "DriftCorrected");
    assert!(out.events[0].2.contains("bandwidth"), "{}", out.events[0].2);
    assert_eq!(out.status.bandwidth, None);
}

#[tokio::test]
async fn an_immutable_field_changes_nothing_in_libvirt() {
    let fake = FakeLibvirt::default().with_domain("vm", true, &xml(&base()));
    let v = fake.domain("vm").await.unwrap().unwrap();
    assert!(planned(serde_json::json!({"type": "bridge", "source": "br0"}), v, 2).is_err());
    assert_eq!(fake.calls(), ["read the domain"], "a refusal runs no step");
}

/// A domain as `virsh define` leaves it (`<os><boot dev='hd'/>`) with the base NIC.
fn ordered_by_type(fake: FakeLibvirt, nic_xml: &str) -> FakeLibvirt {
    let fake = fake.with_domain_xml(
        "vm",
        &format!(
            "<domain><name>vm</name><os><type>hvm</type><boot dev='hd'/></os><devices>{nic_xml}</devices></domain>"
        ),
    );
    fake.set_active("vm", true);
    fake
}

#[tokio::test]
async fn a_boot_order_on_a_domain_ordered_by_type_is_converted_in_one_define() {
    let fake = ordered_by_type(FakeLibvirt::default(), &xml(&base()));
    let edit = serde_json::json!({"bootOrder": 2});
    let v = fake.domain("vm").await.unwrap().unwrap();
    let p = planned(edit.clone(), v, 2).unwrap();
    assert!(p.convert_boot);
    assert_eq!(kinds(&p), ["config bootOrder"]);
    let out = reconcile(&fake, edit.clone(), 2).await;
    let reasons: Vec<&str> = out.events.iter().map(|(_, r, _)| *r).collect();
    assert_eq!(
        reasons,
        ["BootOrderConverted", "Updated"],
        "{:?}",
        out.events
    );
    let defines = |calls: &[String]| {
        calls
            .iter()
            .filter(|c| c.starts_with("write the device into the definition"))
            .count()
    };
    assert_eq!(defines(&fake.calls()), 1, "{:?}", fake.calls());
    let d = fake.domain_state("vm").unwrap();
    assert!(d.config.os_boot.is_empty());
    let config = nic::parse(&d.config.nic(ALIAS).unwrap().xml).unwrap().0;
    assert_eq!(config.boot_order, Some(2));
    assert_eq!(out.status.waiting_for_restart, ["bootOrder"]);
    // Looked at again (the DEFINED event wakes it): nothing more is written.
    let before = fake.calls().len();
    let again = reconcile(&fake, edit.clone(), 2).await;
    assert!(again.events.is_empty(), "{:?}", again.events);
    assert_eq!(defines(&fake.calls()[before..]), 0, "{:?}", fake.calls());
    // After the restart the order is in effect.
    fake.restart("vm");
    let out = reconcile(&fake, edit, 2).await;
    assert!(out.status.waiting_for_restart.is_empty());
    assert_eq!((out.ready.status, out.ready.reason), (true, "Attached"));
}

#[test]
fn a_new_nic_with_a_boot_order_hot_plugs_without_it_on_a_guest_ordered_by_type() {
    let mut v = DomainView {
        active: true,
        persistent: true,
        live: Some(devices("")),
        config: devices(""),
    };
    v.config.os_boot = vec!["hd".into()];
    if let Some(l) = v.live.as_mut() {
        l.os_boot = vec!["hd".into()];
    }
    let mut o = observed(Some(v));
    o.macs = None;
    let p = plan(
        &ID,
        &spec_of(serde_json::json!({"bootOrder": 1})),
        &super::tests::recorded(M),
        &o,
    )
    .unwrap();
    assert!(p.convert_boot);
    assert!(p.xml.contains("<boot order='1'/>"), "{}", p.xml);
    assert!(!p.live_xml.contains("<boot"), "{}", p.live_xml);
}

#[test]
fn an_unset_boot_order_keeps_the_one_the_definition_has() {
    // A disk's bootOrder converted <os><boot dev> and gave this NIC order 3: it stays.
    let ordered = NicSettings {
        boot_order: Some(3),
        ..base()
    };
    let p = planned(serde_json::json!({}), domain(true, &base(), &ordered), 2).unwrap();
    assert!(kinds(&p).is_empty(), "{:?}", kinds(&p));
    let p = planned(
        serde_json::json!({"mtu": 1400}),
        domain(true, &base(), &ordered),
        2,
    )
    .unwrap();
    assert_eq!(kinds(&p), ["config mtu"]);
    let Some(Step::UpdateConfig { xml, .. }) = p.steps.first() else {
        panic!("{:?}", p.steps);
    };
    assert!(xml.contains("<boot order='3'/>"), "{xml}");
}
