//! Report (pure): what happened -> status fields, `Ready`, `RestartRequired`, Events, and when
//! to look again.

use std::time::Duration;

use kube::runtime::controller::Action;

use super::apply::Event;
use super::observe::{AgentAnswer, GuestSeen};
use super::plan::Plan;
use super::reason::{Reason, Refusal};
use crate::agent::refusal::Reason as _;
use crate::agent::status;
use crate::api::{GuestInfoSource, GuestInterface, LinkState, VMInterfaceStatus, condition};
use crate::conditions::Desired;
use crate::libvirt::domain::DomainView;

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
        live: Some(live_now.is_some()),
        persistent: Some(config_now.is_some()),
        ..prev.clone()
    };
    let placed =
        (!plan.want_live || live_now.is_some()) && (!plan.want_config || config_now.is_some());
    let ready = if placed {
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
