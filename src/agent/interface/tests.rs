//! Table tests of plan, and the fixtures the apply and report tests share.

use std::time::Duration;

use super::index::Claim;
use super::observe::{MacsInUse, Observed};
use super::plan::{Identity, Plan, Step, plan};
use crate::agent::refusal::{Reason as _, Retry};
use crate::api::{VMInterfaceSpec, VMInterfaceStatus};
use crate::libvirt::domain::{DomainView, parse_domain};
use crate::libvirt::networks::{HostInterface, NetworkState, NodeMac};
use crate::tenancy::{Grants, Mode};

pub(super) const ALIAS: &str = "ua-vpn-u1";
pub(super) const M: &str = "52:54:00:00:00:07";
const FRESH: &str = "52:54:00:00:00:99";

pub(super) fn nic(mac: &str, link: &str) -> String {
    format!(
        "<interface type='user'><mac address='{mac}'/><model type='virtio'/><link state='{link}'/><alias name='{ALIAS}'/></interface>"
    )
}

pub(super) fn devices(xml: &str) -> crate::libvirt::domain::DomainXml {
    parse_domain(&format!(
        "<domain><os><type machine='pc-q35-10.0'>hvm</type></os><devices>{xml}</devices></domain>"
    ))
    .unwrap()
}

/// A domain, running or not, with `live` and `config` devices.
pub(super) fn view(active: bool, live: &str, config: &str) -> DomainView {
    DomainView {
        active,
        persistent: true,
        live: active.then(|| devices(live)),
        config: devices(config),
    }
}

pub(super) fn spec(json: serde_json::Value) -> VMInterfaceSpec {
    let mut v = serde_json::json!({"vm": "vm", "type": "user"});
    if let (Some(base), Some(extra)) = (v.as_object_mut(), json.as_object()) {
        base.extend(extra.clone());
    }
    serde_json::from_value(v).unwrap()
}

pub(super) fn observed(domain: Option<DomainView>) -> Observed {
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
        grants: Grants::open(),
    }
}

pub(super) fn recorded(mac: &str) -> VMInterfaceStatus {
    VMInterfaceStatus {
        mac: Some(mac.into()),
        ..Default::default()
    }
}

pub(super) const ID: Identity<'static> = Identity {
    alias: ALIAS,
    uid: "u1",
    created: None,
    generation: None,
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
            Some(("FieldImmutable", fix)),
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
            Some(("FieldImmutable", fix)),
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
    let br = nic(M, "up").replace("type='user'>", "type='bridge'><source bridge='br9'/>");
    let mut o = observed(Some(view(false, "", &br)));
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
            vec![
                Step::UpdateLive {
                    xml: nic(M, "down"),
                    fields: vec!["linkState"],
                },
                Step::UpdateConfig {
                    xml: nic(M, "down"),
                    fields: vec!["linkState"],
                },
            ],
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

fn granted(domains: &str, networks: &str) -> Grants {
    use crate::tenancy::{DOMAINS, NETWORKS};
    let annotations = std::collections::BTreeMap::from([
        (DOMAINS.to_string(), domains.to_string()),
        (NETWORKS.to_string(), networks.to_string()),
    ]);
    Grants::of(Mode::Namespaced, "ta", &annotations)
}

#[test]
fn plan_refuses_what_the_namespace_is_not_granted() {
    let ta = granted("vm", "default, bridge:br0, direct:eth0");
    let with = |grants: &Grants, domain: Option<DomainView>| Observed {
        grants: grants.clone(),
        ..observed(domain)
    };
    let shut_off = || Some(view(false, "", ""));
    type Case = (
        &'static str,
        serde_json::Value,
        Observed,
        Option<&'static str>,
    );
    let cases: Vec<Case> = vec![
        (
            "user mode, granted the domain only",
            serde_json::json!({}),
            with(&ta, shut_off()),
            Some(
                "namespace ta may use NIC sources default, bridge:br0, direct:eth0; user is not one of them.",
            ),
        ),
        (
            "user mode, granted",
            serde_json::json!({}),
            with(&granted("vm", "user"), shut_off()),
            None,
        ),
        (
            "the default network",
            serde_json::json!({"type": "network"}),
            with(&ta, shut_off()),
            None,
        ),
        (
            "another network",
            serde_json::json!({"type": "network", "source": "lab"}),
            with(&ta, shut_off()),
            Some(
                "namespace ta may use NIC sources default, bridge:br0, direct:eth0; lab is not one of them.",
            ),
        ),
        (
            "a granted bridge",
            serde_json::json!({"type": "bridge", "source": "br0"}),
            with(&ta, shut_off()),
            None,
        ),
        (
            "a bridge named like a granted device",
            serde_json::json!({"type": "bridge", "source": "eth0"}),
            with(&ta, shut_off()),
            Some(
                "namespace ta may use NIC sources default, bridge:br0, direct:eth0; bridge:eth0 is not one of them.",
            ),
        ),
        (
            "a granted device",
            serde_json::json!({"type": "direct", "source": "eth0"}),
            with(&ta, shut_off()),
            None,
        ),
        (
            "another domain",
            serde_json::json!({"vm": "vm-b", "type": "network"}),
            with(&ta, shut_off()),
            Some("namespace ta may use domains vm; vm-b is not one of them."),
        ),
        (
            "another domain that does not exist: the same answer",
            serde_json::json!({"vm": "vm-b", "type": "network"}),
            with(&ta, None),
            Some("namespace ta may use domains vm; vm-b is not one of them."),
        ),
        (
            "another network that does not exist: no NetworkNotFound",
            serde_json::json!({"type": "network", "source": "lab"}),
            Observed {
                network: Some(NetworkState::Missing),
                ..with(&ta, shut_off())
            },
            Some(
                "namespace ta may use NIC sources default, bridge:br0, direct:eth0; lab is not one of them.",
            ),
        ),
        (
            "open mode: everything",
            serde_json::json!({"vm": "vm", "type": "bridge", "source": "br9"}),
            with(&Grants::open(), shut_off()),
            None,
        ),
    ];
    for (name, s, o, want) in cases {
        let got = plan(&ID, &spec(s), &Default::default(), &o);
        match (got, want) {
            (Ok(_), None) => {}
            (Err(r), Some(text)) => {
                assert_eq!(r.reason.as_str(), "NotGranted", "{name}: {}", r.message);
                assert_eq!(r.retry, Retry::OnChange, "{name}: a grant change wakes it");
                assert_eq!(
                    r.message.split(" A cluster admin").next(),
                    Some(text),
                    "{name}"
                );
            }
            (got, _) => panic!("{name}: {got:?}"),
        }
    }
}

#[test]
fn a_revoked_grant_keeps_the_attached_nic_and_changes_nothing() {
    // Attached live and in the definition, link up; the spec now asks for the link down.
    let net = nic(M, "up").replace("type='user'>", "type='network'><source network='default'/>");
    let attached = view(true, &net, &net);
    let placed = VMInterfaceStatus {
        mac: Some(M.into()),
        vm: Some("vm".into()),
        live: Some(true),
        persistent: Some(true),
        ..Default::default()
    };
    let s = spec(serde_json::json!({"type": "network", "linkState": "down"}));
    let mut o = observed(Some(attached));
    o.grants = granted("vm", "default");
    let p = plan(&ID, &s, &placed, &o).expect("granted: planned");
    assert!(
        !p.steps.is_empty(),
        "the link change is planned while granted"
    );
    for revoked in [granted("", "default"), granted("vm", "")] {
        o.grants = revoked;
        let r = plan(&ID, &s, &placed, &o).expect_err("revoked: refused");
        // A refusal runs no step: nothing is detached or changed; deleting still detaches.
        assert_eq!(r.reason.as_str(), "NotGranted", "{}", r.message);
        let out = super::report::refused(&placed, r);
        assert_eq!(
            (
                out.status.live,
                out.status.persistent,
                out.status.mac.as_deref()
            ),
            (Some(true), Some(true), Some(M)),
            "the status still says where the NIC is"
        );
    }
}
