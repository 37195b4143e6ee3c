//! Table tests of plan and report, and apply against the in-memory libvirt.

use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::apply::{Applied, apply};
use super::index::Claim;
use super::observe::{AgentAnswer, GuestSeen, MacsInUse, Observed};
use super::plan::{Identity, Plan, Step, plan};
use super::reason::Reason;
use super::report::{self, guest_interface};
use crate::agent::refusal::{Reason as _, Retry};
use crate::api::{GuestInfoSource, LinkState, VMInterfaceSpec, VMInterfaceStatus};
use crate::libvirt::ErrorKind;
use crate::libvirt::domain::{DomainView, parse_domain};
use crate::libvirt::facade::{Affect, Domains};
use crate::libvirt::fake::FakeLibvirt;
use crate::libvirt::networks::{GuestNic, HostInterface, NetworkState, NodeMac};

const ALIAS: &str = "ua-vpn-u1";
const M: &str = "52:54:00:00:00:07";
const FRESH: &str = "52:54:00:00:00:99";

fn nic(mac: &str, link: &str) -> String {
    format!(
        "<interface type='user'><mac address='{mac}'/><model type='virtio'/><link state='{link}'/><alias name='{ALIAS}'/></interface>"
    )
}

fn devices(xml: &str) -> crate::libvirt::domain::DomainXml {
    parse_domain(&format!(
        "<domain><os><type machine='pc-q35-10.0'>hvm</type></os><devices>{xml}</devices></domain>"
    ))
    .unwrap()
}

/// A domain, running or not, with `live` and `config` devices.
fn view(active: bool, live: &str, config: &str) -> DomainView {
    DomainView {
        active,
        persistent: true,
        live: active.then(|| devices(live)),
        config: devices(config),
    }
}

fn spec(json: serde_json::Value) -> VMInterfaceSpec {
    let mut v = serde_json::json!({"vm": "vm", "type": "user"});
    if let (Some(base), Some(extra)) = (v.as_object_mut(), json.as_object()) {
        base.extend(extra.clone());
    }
    serde_json::from_value(v).unwrap()
}

fn observed(domain: Option<DomainView>) -> Observed {
    Observed {
        node: "n1".into(),
        domain,
        network: None,
        host: None,
        macs: Some(MacsInUse {
            node: Vec::new(),
            claims: Vec::new(),
            fresh: FRESH.into(),
        }),
    }
}

fn recorded(mac: &str) -> VMInterfaceStatus {
    VMInterfaceStatus {
        mac: Some(mac.into()),
        ..Default::default()
    }
}

const ID: Identity<'static> = Identity {
    alias: ALIAS,
    uid: "u1",
    created: None,
};

fn reason_of(r: Result<Plan, super::reason::Refusal>) -> Option<(&'static str, Retry)> {
    r.err().map(|r| (r.reason.as_str(), r.retry))
}

#[test]
fn plan_refuses_every_reason_it_can() {
    let shut_off = || Some(view(false, "", ""));
    let minute = Retry::After(Duration::from_secs(60));
    let fix = Retry::OnChange;
    let claim = |recorded| Claim {
        uid: "u0".into(),
        created: None,
        recorded,
    };
    let with = |f: &dyn Fn(&mut Observed)| {
        let mut o = observed(shut_off());
        f(&mut o);
        o
    };
    type Case = (
        &'static str,
        serde_json::Value,
        VMInterfaceStatus,
        Observed,
        Option<(&'static str, Retry)>,
    );
    let cases: Vec<Case> = vec![
        (
            "spec.vm edited",
            serde_json::json!({}),
            VMInterfaceStatus {
                vm: Some("other".into()),
                ..Default::default()
            },
            observed(shut_off()),
            Some(("InvalidSpec", fix)),
        ),
        (
            "multicast MAC",
            serde_json::json!({"mac": "01:00:5e:00:00:01"}),
            Default::default(),
            observed(shut_off()),
            Some(("InvalidSpec", fix)),
        ),
        (
            "spec.mac edited",
            serde_json::json!({"mac": "52:54:00:00:00:08"}),
            recorded(M),
            observed(shut_off()),
            Some(("InvalidSpec", fix)),
        ),
        (
            "user with a source",
            serde_json::json!({"source": "x"}),
            Default::default(),
            observed(shut_off()),
            Some(("InvalidSpec", fix)),
        ),
        (
            "bridge without source",
            serde_json::json!({"type": "bridge"}),
            Default::default(),
            observed(shut_off()),
            Some(("InvalidSpec", fix)),
        ),
        (
            "direct without source",
            serde_json::json!({"type": "direct"}),
            Default::default(),
            observed(shut_off()),
            Some(("InvalidSpec", fix)),
        ),
        (
            "no domain",
            serde_json::json!({}),
            Default::default(),
            observed(None),
            Some(("DomainNotFound", Retry::After(Duration::from_secs(300)))),
        ),
        (
            "no network",
            serde_json::json!({"type": "network"}),
            Default::default(),
            with(&|o| o.network = Some(NetworkState::Missing)),
            Some(("NetworkNotFound", minute)),
        ),
        (
            "inactive network",
            serde_json::json!({"type": "network", "source": "n"}),
            Default::default(),
            with(&|o| o.network = Some(NetworkState::Inactive)),
            Some(("NetworkNotFound", minute)),
        ),
        (
            "active network",
            serde_json::json!({"type": "network"}),
            Default::default(),
            with(&|o| o.network = Some(NetworkState::Active)),
            None,
        ),
        (
            "no bridge",
            serde_json::json!({"type": "bridge", "source": "br9"}),
            Default::default(),
            with(&|o| o.host = Some(HostInterface::Missing)),
            Some(("HostDeviceNotFound", minute)),
        ),
        (
            "not a bridge",
            serde_json::json!({"type": "bridge", "source": "lo"}),
            Default::default(),
            with(&|o| o.host = Some(HostInterface::Present { bridge: false })),
            Some(("HostDeviceNotFound", minute)),
        ),
        (
            "a bridge",
            serde_json::json!({"type": "bridge", "source": "virbr0"}),
            Default::default(),
            with(&|o| o.host = Some(HostInterface::Present { bridge: true })),
            None,
        ),
        (
            "no device",
            serde_json::json!({"type": "direct", "source": "eth9"}),
            Default::default(),
            with(&|o| o.host = Some(HostInterface::Missing)),
            Some(("HostDeviceNotFound", minute)),
        ),
        (
            "a device is no bridge and need not be",
            serde_json::json!({"type": "direct", "source": "eth0"}),
            Default::default(),
            with(&|o| o.host = Some(HostInterface::Present { bridge: false })),
            None,
        ),
        (
            "a path is no device",
            serde_json::json!({"type": "direct", "source": "../eth0"}),
            Default::default(),
            with(&|o| o.host = Some(HostInterface::Unknown)),
            Some(("HostDeviceNotFound", minute)),
        ),
        (
            "no interface driver: the attach tells",
            serde_json::json!({"type": "bridge", "source": "br0"}),
            Default::default(),
            with(&|o| o.host = Some(HostInterface::Unknown)),
            None,
        ),
        (
            "MAC of another NIC on the node",
            serde_json::json!({"mac": M}),
            Default::default(),
            with(&|o| {
                if let Some(m) = o.macs.as_mut() {
                    m.node.push(NodeMac {
                        mac: M.into(),
                        alias: Some("net0".into()),
                    });
                }
            }),
            Some(("MACConflict", minute)),
        ),
        (
            "MAC our own alias has is no conflict",
            serde_json::json!({"mac": M}),
            Default::default(),
            with(&|o| {
                if let Some(m) = o.macs.as_mut() {
                    m.node.push(NodeMac {
                        mac: M.into(),
                        alias: Some(ALIAS.into()),
                    });
                }
            }),
            None,
        ),
        (
            "MAC recorded by another VMInterface",
            serde_json::json!({"mac": M}),
            Default::default(),
            with(&|o| {
                if let Some(m) = o.macs.as_mut() {
                    m.claims.push(claim(true));
                }
            }),
            Some(("MACConflict", minute)),
        ),
        (
            "a request never takes a recorded MAC",
            serde_json::json!({}),
            recorded(M),
            with(&|o| {
                if let Some(m) = o.macs.as_mut() {
                    m.claims.push(claim(false));
                }
            }),
            None,
        ),
        (
            "the MACs in use are unknown",
            serde_json::json!({}),
            Default::default(),
            with(&|o| o.macs = None),
            Some(("AttachFailed", Retry::After(Duration::from_secs(5)))),
        ),
    ];
    for (name, s, prev, o, want) in cases {
        let got = reason_of(plan(&ID, &spec(s), &prev, &o));
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn an_existing_nic_is_not_checked_against_the_host_side() {
    let mut o = observed(Some(view(false, "", &nic(M, "up"))));
    o.host = Some(HostInterface::Missing);
    let p = plan(
        &ID,
        &spec(serde_json::json!({"type": "bridge", "source": "br9"})),
        &recorded(M),
        &o,
    );
    assert!(p.is_ok(), "{p:?}");
}

#[test]
fn plan_chooses_the_recorded_then_the_requested_then_a_fresh_mac() {
    let o = observed(Some(view(false, "", "")));
    let p = |s, prev: &VMInterfaceStatus| plan(&ID, &spec(s), prev, &o).unwrap();
    let fresh = p(serde_json::json!({}), &Default::default());
    assert_eq!((fresh.mac.as_str(), fresh.record_mac), (FRESH, true));
    let asked = p(
        serde_json::json!({"mac": "52:54:00:AA:00:01"}),
        &Default::default(),
    );
    assert_eq!(asked.mac, "52:54:00:aa:00:01", "lower case");
    let kept = p(serde_json::json!({}), &recorded(M));
    assert_eq!((kept.mac.as_str(), kept.record_mac), (M, false));
}

#[test]
fn plan_steps_for_every_situation() {
    let down = || serde_json::json!({"linkState": "down"});
    type Case = (
        &'static str,
        serde_json::Value,
        VMInterfaceStatus,
        DomainView,
        Vec<Step>,
    );
    let was_placed = VMInterfaceStatus {
        live: Some(true),
        persistent: Some(true),
        ..recorded(M)
    };
    let cases: Vec<Case> = vec![
        (
            "new NIC, running guest",
            serde_json::json!({}),
            recorded(M),
            view(true, "", ""),
            vec![
                Step::PlugLive { drift: false },
                Step::AddConfig { drift: false },
            ],
        ),
        (
            "new NIC, shut off",
            serde_json::json!({}),
            recorded(M),
            view(false, "", ""),
            vec![Step::AddConfig { drift: false }],
        ),
        (
            "attach: Persistent on a running guest",
            serde_json::json!({"attach": "Persistent"}),
            recorded(M),
            view(true, "", ""),
            vec![Step::AddConfig { drift: false }],
        ),
        (
            "in place: nothing to do",
            serde_json::json!({}),
            was_placed.clone(),
            view(true, &nic(M, "up"), &nic(M, "up")),
            vec![],
        ),
        (
            "link state follows the NIC when the spec says nothing",
            serde_json::json!({}),
            was_placed.clone(),
            view(true, &nic(M, "down"), &nic(M, "down")),
            vec![],
        ),
        (
            "link down in place",
            down(),
            was_placed.clone(),
            view(true, &nic(M, "up"), &nic(M, "up")),
            vec![Step::UpdateLinkLive, Step::UpdateLinkConfig],
        ),
        (
            "removed from the running guest behind our back",
            serde_json::json!({}),
            was_placed.clone(),
            view(true, "", &nic(M, "up")),
            vec![Step::PlugLive { drift: true }],
        ),
        (
            "removed from the definition behind our back",
            serde_json::json!({}),
            was_placed.clone(),
            view(true, &nic(M, "up"), ""),
            vec![Step::AddConfig { drift: true }],
        ),
        (
            "MAC changed in the definition",
            serde_json::json!({}),
            was_placed.clone(),
            view(false, "", &nic("52:54:00:00:00:08", "up")),
            vec![
                Step::RemoveDriftedConfig {
                    xml: devices(&nic("52:54:00:00:00:08", "up")).interfaces[0]
                        .xml
                        .clone(),
                },
                Step::AddConfig { drift: false },
            ],
        ),
    ];
    for (name, s, prev, v, want) in cases {
        let mut o = observed(Some(v));
        o.macs = None;
        let got = plan(&ID, &spec(s), &prev, &o).unwrap();
        assert_eq!(got.steps, want, "{name}");
    }
}

#[test]
fn a_live_mac_changed_behind_our_back_is_unplugged_first() {
    let other = nic("52:54:00:00:00:08", "up");
    let mut o = observed(Some(view(true, &other, &nic(M, "up"))));
    o.macs = None;
    let p = plan(&ID, &spec(serde_json::json!({})), &recorded(M), &o).unwrap();
    assert!(
        matches!(p.steps[0], Step::UnplugDriftedLive { .. }),
        "{p:?}"
    );
}

#[test]
fn the_plans_xml_carries_the_spec() {
    let o = observed(Some(view(false, "", "")));
    let p = plan(
        &ID,
        &spec(serde_json::json!({"type": "network", "linkState": "down", "mtu": 1400, "bootOrder": 2})),
        &recorded(M),
        &o,
    )
    .unwrap();
    let x = devices(&p.xml).interfaces[0].clone();
    assert_eq!(x.mac.as_deref(), Some(M));
    assert_eq!(x.source.as_deref(), Some("default"));
    assert_eq!(x.link_state.as_deref(), Some("down"));
    assert_eq!(x.alias.as_deref(), Some(ALIAS));
    assert!(p.xml.contains("<mtu size='1400'/>") && p.xml.contains("<boot order='2'/>"));
}

// --- apply against the in-memory libvirt ---

fn planned(fake: &FakeLibvirt, s: serde_json::Value, prev: &VMInterfaceStatus) -> Plan {
    let v = futures::executor::block_on(fake.domain("vm")).unwrap();
    let mut o = observed(v);
    o.macs = None;
    plan(&ID, &spec(s), prev, &o).unwrap()
}

fn reasons(events: &[super::apply::Event]) -> Vec<&'static str> {
    events.iter().map(|(_, r, _)| *r).collect()
}

#[tokio::test]
async fn apply_hot_plugs_and_writes_the_definition() {
    let fake = FakeLibvirt::default().with_domain("vm", true, "");
    let p = planned(&fake, serde_json::json!({}), &recorded(M));
    let Applied::Done { events, restart } = apply(&fake, &p).await.unwrap() else {
        panic!("done");
    };
    assert_eq!(reasons(&events), ["Attached"]);
    assert_eq!(restart, None);
    let d = fake.domain_state("vm").unwrap();
    assert!(d.live.nic(ALIAS).is_some() && d.config.nic(ALIAS).is_some());
}

#[tokio::test]
async fn a_nic_that_cannot_be_hot_plugged_waits_for_the_next_boot() {
    let fake = FakeLibvirt::default().with_domain("vm", true, "");
    fake.fail_next("attach a device", Some(Affect::Live), ErrorKind::NoFreeSlot);
    let p = planned(&fake, serde_json::json!({}), &recorded(M));
    let Applied::Done { events, restart } = apply(&fake, &p).await.unwrap() else {
        panic!("done");
    };
    assert!(events.is_empty());
    assert!(restart.unwrap().contains("next boot"));
    let d = fake.domain_state("vm").unwrap();
    assert!(d.live.nic(ALIAS).is_none() && d.config.nic(ALIAS).is_some());
}

#[tokio::test]
async fn a_nic_qemu_refuses_changes_nothing() {
    let fake = FakeLibvirt::default().with_domain("vm", true, "");
    fake.fail_next("attach a device", Some(Affect::Live), ErrorKind::Refused);
    let p = planned(&fake, serde_json::json!({}), &recorded(M));
    let Applied::Stopped(r) = apply(&fake, &p).await.unwrap() else {
        panic!("stopped");
    };
    assert_eq!(r.reason, Reason::AttachFailed);
    assert_eq!(r.retry, Retry::After(Duration::from_secs(300)));
    assert!(fake.domain_state("vm").unwrap().config.nic(ALIAS).is_none());
}

#[tokio::test]
async fn a_definition_libvirt_refuses_takes_the_hot_plug_back() {
    let fake = FakeLibvirt::default().with_domain("vm", true, "");
    fake.fail_next(
        "add a device to the definition",
        Some(Affect::Config),
        ErrorKind::Refused,
    );
    let p = planned(&fake, serde_json::json!({}), &recorded(M));
    let Applied::Stopped(r) = apply(&fake, &p).await.unwrap() else {
        panic!("stopped");
    };
    assert_eq!((r.reason, r.retry), (Reason::AttachFailed, Retry::OnChange));
    assert!(r.message.contains("unplugged again"), "{}", r.message);
    assert!(fake.domain_state("vm").unwrap().live.nic(ALIAS).is_none());
}

#[tokio::test]
async fn a_lost_connection_is_an_error_not_an_answer() {
    let fake = FakeLibvirt::default().with_domain("vm", true, "");
    fake.fail_next(
        "attach a device",
        Some(Affect::Live),
        ErrorKind::Unreachable,
    );
    let p = planned(&fake, serde_json::json!({}), &recorded(M));
    assert_eq!(
        apply(&fake, &p).await.unwrap_err().kind(),
        ErrorKind::Unreachable
    );
}

#[tokio::test]
async fn apply_sets_the_link_in_place() {
    let fake = FakeLibvirt::default().with_domain("vm", true, &nic(M, "up"));
    let prev = VMInterfaceStatus {
        live: Some(true),
        persistent: Some(true),
        ..recorded(M)
    };
    let p = planned(&fake, serde_json::json!({"linkState": "down"}), &prev);
    let Applied::Done { events, .. } = apply(&fake, &p).await.unwrap() else {
        panic!("done");
    };
    assert_eq!(reasons(&events), ["LinkChanged"]);
    assert!(events[0].2.contains("down"));
    let d = fake.domain_state("vm").unwrap();
    assert_eq!(
        d.live.nic(ALIAS).unwrap().link_state.as_deref(),
        Some("down")
    );
    assert_eq!(
        d.config.nic(ALIAS).unwrap().link_state.as_deref(),
        Some("down")
    );
    assert_eq!(
        fake.calls()
            .iter()
            .filter(|c| c.starts_with("attach") || c.starts_with("ask"))
            .count(),
        0,
        "no detach, no attach"
    );
}

#[tokio::test]
async fn apply_puts_back_what_was_removed_and_says_so() {
    let fake = FakeLibvirt::default().with_domain("vm", false, "");
    let prev = VMInterfaceStatus {
        persistent: Some(true),
        ..recorded(M)
    };
    let p = planned(&fake, serde_json::json!({}), &prev);
    let Applied::Done { events, .. } = apply(&fake, &p).await.unwrap() else {
        panic!("done");
    };
    assert_eq!(reasons(&events), ["DriftCorrected"]);
    assert_eq!(events[0].0, EventType::Warning);
    assert!(fake.domain_state("vm").unwrap().config.nic(ALIAS).is_some());
}

#[tokio::test]
async fn apply_replaces_a_nic_whose_mac_was_changed() {
    let fake = FakeLibvirt::default().with_domain("vm", false, &nic("52:54:00:00:00:08", "up"));
    let prev = VMInterfaceStatus {
        persistent: Some(true),
        ..recorded(M)
    };
    let p = planned(&fake, serde_json::json!({}), &prev);
    let Applied::Done { events, .. } = apply(&fake, &p).await.unwrap() else {
        panic!("done");
    };
    assert_eq!(reasons(&events), ["DriftCorrected"], "one event, not two");
    let d = fake.domain_state("vm").unwrap();
    assert_eq!(d.config.interfaces.len(), 1);
    assert_eq!(d.config.nic(ALIAS).unwrap().mac.as_deref(), Some(M));
}

#[tokio::test]
async fn a_changed_live_mac_is_unplugged_and_looked_at_again_soon() {
    let fake = FakeLibvirt::default().with_domain("vm", true, &nic("52:54:00:00:00:08", "up"));
    let p = planned(&fake, serde_json::json!({}), &recorded(M));
    let Applied::Stopped(r) = apply(&fake, &p).await.unwrap() else {
        panic!("stopped");
    };
    assert_eq!(r.retry, Retry::After(Duration::from_secs(2)));
    assert!(fake.domain_state("vm").unwrap().live.interfaces.is_empty());
}

// --- report ---

fn plan_for(v: &DomainView, s: serde_json::Value) -> Plan {
    let mut o = observed(Some(v.clone()));
    o.macs = None;
    plan(&ID, &spec(s), &recorded(M), &o).unwrap()
}

#[test]
fn report_sets_ready_and_restart_for_every_path() {
    let placed = nic(M, "up");
    let restart_msg = || Some("Hot-plugging into the running vm failed (x); next boot".to_string());
    type Case = (
        &'static str,
        DomainView,
        serde_json::Value,
        Option<String>,
        bool,
        &'static str,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "live and persistent",
            view(true, &placed, &placed),
            serde_json::json!({}),
            None,
            true,
            "Attached",
            "live and persistent",
        ),
        (
            "shut off",
            view(false, "", &placed),
            serde_json::json!({}),
            None,
            true,
            "Attached",
            "the domain is not running",
        ),
        (
            "attach: Persistent on a running guest",
            view(true, "", &placed),
            serde_json::json!({"attach": "Persistent"}),
            None,
            true,
            "Attached",
            "next boot (attach: Persistent)",
        ),
        (
            "hot-plug not possible: restart required",
            view(true, "", &placed),
            serde_json::json!({}),
            restart_msg(),
            false,
            "AttachFailed",
            "next boot",
        ),
        (
            "not there yet",
            view(true, "", ""),
            serde_json::json!({}),
            None,
            false,
            "AttachFailed",
            "the agent retries",
        ),
    ];
    for (name, v, s, restart, ready, reason, says) in cases {
        // The plan as it was before the apply: the NIC belongs live when the guest runs.
        let p = plan_for(&view(v.active, "", ""), s);
        let out = report::report(
            &recorded(M),
            &p,
            &v,
            &GuestSeen::NotRunning,
            Vec::new(),
            restart.clone(),
        );
        assert_eq!(out.ready.status, ready, "{name}");
        assert_eq!(out.ready.reason, reason, "{name}");
        assert!(
            out.ready.message.contains(says),
            "{name}: {}",
            out.ready.message
        );
        assert_eq!(out.restart, restart, "{name}");
        let every = if v.active { 20 } else { 600 };
        assert_eq!(
            out.action,
            Action::requeue(Duration::from_secs(every)),
            "{name}"
        );
    }
}

#[test]
fn report_fills_the_status() {
    let live = "<interface type='user'><mac address='52:54:00:00:00:07'/><target dev='vnet3'/><link state='down'/><alias name='ua-vpn-u1'/></interface>";
    let v = view(true, live, &nic(M, "down"));
    let p = plan_for(&v, serde_json::json!({}));
    let out = report::report(
        &VMInterfaceStatus {
            node_name: Some("n1".into()),
            ..Default::default()
        },
        &p,
        &v,
        &GuestSeen::NotRunning,
        Vec::new(),
        None,
    );
    let s = out.status;
    assert_eq!(s.vm.as_deref(), Some("vm"));
    assert_eq!(s.mac.as_deref(), Some(M));
    assert_eq!(s.alias.as_deref(), Some(ALIAS));
    assert_eq!(s.host_device.as_deref(), Some("vnet3"));
    assert_eq!(s.link_state, Some(LinkState::Down));
    assert_eq!((s.live, s.persistent), (Some(true), Some(true)));
    assert_eq!(
        s.node_name.as_deref(),
        Some("n1"),
        "the controller's field is kept"
    );
    assert!(s.guest.is_some());
}

#[test]
fn refusals_and_failures_keep_the_status() {
    let prev = recorded(M);
    let out = report::refused(
        &prev,
        super::reason::Refusal::wait(Reason::MacConflict, "taken", Duration::from_secs(60)),
    );
    assert_eq!(out.status, prev);
    assert_eq!((out.ready.status, out.ready.reason), (false, "MACConflict"));
    assert_eq!(out.action, Action::requeue(Duration::from_secs(60)));
    assert_eq!(out.restart, None);
    let out = report::failed(&prev, &"failed to attach a device: boom");
    assert_eq!(out.ready.reason, "AttachFailed");
    assert!(
        out.ready
            .message
            .starts_with("failed to attach a device: boom. The agent retries")
    );
    assert_eq!(out.action, Action::requeue(Duration::from_secs(30)));
}

#[test]
fn the_guest_view_says_where_it_comes_from() {
    let eth0 = GuestNic {
        name: "eth0".into(),
        addresses: vec!["10.0.0.5/24".into()],
    };
    let running = |agent, lease| GuestSeen::Running { agent, lease };
    type Case = (
        GuestSeen,
        GuestInfoSource,
        Option<&'static str>,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            GuestSeen::NotRunning,
            GuestInfoSource::None,
            None,
            "vm is not running.",
        ),
        (
            running(AgentAnswer::Found(eth0.clone()), None),
            GuestInfoSource::Agent,
            Some("eth0"),
            "",
        ),
        (
            running(AgentAnswer::NoChannel, None),
            GuestInfoSource::None,
            None,
            "no QEMU guest agent channel",
        ),
        (
            running(AgentAnswer::NotListed, Some(eth0.clone())),
            GuestInfoSource::Lease,
            None,
            "does not list this MAC yet",
        ),
        (
            running(AgentAnswer::TimedOut, None),
            GuestInfoSource::None,
            None,
            "within 3s",
        ),
        (
            running(
                AgentAnswer::Failed("boom".into()),
                Some(GuestNic {
                    name: "x".into(),
                    addresses: vec![],
                }),
            ),
            GuestInfoSource::None,
            None,
            "does not answer (boom)",
        ),
    ];
    for (seen, source, name, says) in cases {
        let g = guest_interface("vm", &seen);
        assert_eq!(g.source, Some(source), "{seen:?}");
        assert_eq!(g.name.as_deref(), name, "{seen:?}");
        assert!(g.message.unwrap_or_default().contains(says), "{seen:?}");
        if source != GuestInfoSource::None {
            assert_eq!(g.ip_addresses, ["10.0.0.5/24"]);
        }
    }
}
