//! Report (pure): what happened -> status fields, `Ready`, `RestartRequired`, Events, and when
//! to look again.

use std::time::Duration;

use kube::runtime::controller::Action;

use super::apply::Event;
use super::fields;
use super::observe::{AgentAnswer, GuestSeen};
use super::plan::Plan;
use super::reason::{Reason, Refusal};
use crate::agent::refusal::Reason as _;
use crate::agent::status;
use crate::api::{GuestInfoSource, GuestInterface, LinkState, VMInterfaceStatus, condition};
use crate::conditions::Desired;
use crate::libvirt::domain::DomainView;
use crate::libvirt::nic;

/// The outcome of one reconcile.
pub type Outcome = status::Outcome<VMInterfaceStatus>;

/// A refusal: `Ready=False` with its reason, the status as it was.
pub fn refused(prev: &VMInterfaceStatus, r: Refusal) -> Outcome {
    Outcome::not_ready(prev, r.reason.as_str(), r.message, r.retry.action())
}

/// A libvirt failure while libvirtd is reachable: `AttachFailed`, retried.
pub fn failed(prev: &VMInterfaceStatus, error: &dyn std::fmt::Display) -> Outcome {
    refused(
        prev,
        Refusal::wait(
            Reason::AttachFailed,
            format!("{error}. The agent retries; check the domain and the spec."),
            Duration::from_secs(30),
        ),
    )
}

/// The guest's view of the interface for `status.guest`.
pub fn guest_interface(vm: &str, seen: &GuestSeen) -> GuestInterface {
    let none = |message: String| GuestInterface {
        source: Some(GuestInfoSource::None),
        message: Some(message),
        ..Default::default()
    };
    let GuestSeen::Running { agent, lease } = seen else {
        return none(format!("{vm} is not running."));
    };
    let agent_error = match agent {
        AgentAnswer::Found(nic) => {
            return GuestInterface {
                name: Some(nic.name.clone()),
                ip_addresses: nic.addresses.clone(),
                source: Some(GuestInfoSource::Agent),
                message: None,
            };
        }
        AgentAnswer::NoChannel => {
            format!("{vm} has no QEMU guest agent channel (org.qemu.guest_agent.0)")
        }
        AgentAnswer::NotListed => "the guest agent does not list this MAC yet".to_string(),
        AgentAnswer::Failed(e) => format!("the guest agent does not answer ({e})"),
        AgentAnswer::TimedOut => "the guest agent did not answer within 3s".to_string(),
    };
    if let Some(lease) = lease.as_ref().filter(|l| !l.addresses.is_empty()) {
        return GuestInterface {
            name: None,
            ip_addresses: lease.addresses.clone(),
            source: Some(GuestInfoSource::Lease),
            message: Some(format!(
                "The guest's name for the interface is unknown: {agent_error}."
            )),
        };
    }
    none(format!(
        "Nothing is known about this interface inside the guest: {agent_error}, and no DHCP lease is known."
    ))
}

/// The outcome of a plan that ran: where the NIC is now (`view`, read after the changes), what
/// the guest says, the Events and the restart the apply step left.
pub fn report(
    prev: &VMInterfaceStatus,
    plan: &Plan,
    view: &DomainView,
    guest: &GuestSeen,
    events: Vec<Event>,
    restart: Option<String>,
) -> Outcome {
    let (vm, mac, alias) = (plan.vm.as_str(), plan.mac.as_str(), plan.alias.as_str());
    let config_now = view.config.nic(alias).filter(|_| view.persistent);
    let live_now = view.live.as_ref().and_then(|l| l.nic(alias));
    let shown = live_now.or(config_now);
    let status = VMInterfaceStatus {
        vm: Some(vm.to_string()),
        mac: Some(mac.to_string()),
        host_device: live_now.and_then(|d| d.host_device.clone()),
        alias: Some(alias.to_string()),
        guest: Some(guest_interface(vm, guest)),
        link_state: shown.map(|d| {
            if d.link_state.as_deref() == Some("down") {
                LinkState::Down
            } else {
                LinkState::Up
            }
        }),
        bandwidth: shown
            .and_then(|d| nic::parse(&d.xml).ok())
            .and_then(|(s, _)| fields::to_api(&s.bandwidth)),
        waiting_for_restart: plan.waiting.iter().map(|f| f.to_string()).collect(),
        live: Some(live_now.is_some()),
        persistent: Some(config_now.is_some()),
        ..prev.clone()
    };
    // Fields the running guest gets only at its next boot: in the definition, not in effect.
    let restart = restart.or_else(|| {
        (!plan.waiting.is_empty()).then(|| {
            let one = plan.waiting.len() == 1;
            format!(
                "{} of {mac} {} written to the definition of {vm} and take{} effect at its next boot; restart the domain (a reboot from inside the guest is not enough).",
                fields::list(&plan.waiting),
                if one { "is" } else { "are" },
                if one { "s" } else { "" },
            )
        })
    });
    let placed =
        (!plan.want_live || live_now.is_some()) && (!plan.want_config || config_now.is_some());
    let waits = restart.clone().filter(|_| !plan.waiting.is_empty());
    let ready = if placed && let Some(why) = waits {
        Desired::falsy(condition::READY, Reason::WaitingForRestart.as_str(), why)
    } else if placed {
        let where_ = match (live_now.is_some(), config_now.is_some()) {
            (true, true) => "live and persistent",
            (true, false) => "live",
            (false, _) if view.active => {
                "in the definition; it appears at the next boot (attach: Persistent)"
            }
            (false, _) => "in the definition; the domain is not running",
        };
        Desired::truthy(
            condition::READY,
            Reason::Attached.as_str(),
            format!("{mac} is attached to {vm}, {where_}."),
        )
    } else {
        Desired::falsy(
            condition::READY,
            Reason::AttachFailed.as_str(),
            restart.clone().unwrap_or_else(|| {
                format!("{mac} is not attached to {vm} yet; the agent retries.")
            }),
        )
    };
    // While the domain runs, refresh the guest's view at a modest interval.
    let action = if view.active {
        Action::requeue(Duration::from_secs(20))
    } else {
        Action::requeue(Duration::from_secs(600))
    };
    Outcome {
        status,
        ready,
        restart,
        events,
        action,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::agent::interface::observe::{AgentAnswer, GuestSeen};
    use crate::agent::interface::plan::{Plan, plan};
    use crate::agent::interface::reason::Reason;
    use crate::agent::interface::report;
    use crate::agent::interface::tests::{ALIAS, ID, M, nic, observed, recorded, spec, view};
    use crate::api::GuestInfoSource;
    use crate::api::VMInterfaceStatus;
    use crate::libvirt::domain::DomainView;
    use crate::libvirt::networks::GuestNic;

    fn plan_for(v: &DomainView, s: serde_json::Value) -> Plan {
        let mut o = observed(Some(v.clone()));
        o.macs = None;
        plan(&ID, &spec(s), &recorded(M), &o).unwrap()
    }

    #[test]
    fn report_sets_ready_and_restart_for_every_path() {
        let placed = nic(M, "up");
        let restart_msg =
            || Some("Hot-plugging into the running vm failed (x); next boot".to_string());
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
            Refusal::wait(Reason::MacConflict, "taken", Duration::from_secs(60)),
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
}
