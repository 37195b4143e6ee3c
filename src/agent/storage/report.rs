//! The pure last step of a VirtualMachineStorage reconcile: what happened, as status fields,
//! `Ready` and `RestartRequired`, Events, and when to look again.

use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::Outcome;
use super::apply::{Applied, Done, Failure};
use super::plan::{Plan, RestartCause, bus_name};
use super::reason::StorageReason;
use crate::agent::refusal::{Reason, Refusal};
use crate::api::{AttachMode, VirtualMachineStorageStatus, condition};
use crate::conditions::Desired;
use crate::libvirt::LibvirtError;

type Status = VirtualMachineStorageStatus;

/// A refused plan: `Ready=False` with the refusal's reason, the status as it was.
pub fn refused(prev: &Status, refusal: Refusal<StorageReason>) -> Outcome {
    Outcome::not_ready(
        prev,
        refusal.reason.as_str(),
        refusal.message,
        refusal.retry.action(),
    )
}

/// A libvirt call failed while libvirtd is reachable: `AttachFailed`, retried soon.
pub fn libvirt_failed(prev: &Status, err: &LibvirtError) -> Outcome {
    Outcome::not_ready(
        prev,
        StorageReason::AttachFailed.as_str(),
        format!("{err}. The agent retries; check the domain and the spec."),
        Action::requeue(Duration::from_secs(30)),
    )
}

/// The outcome of running `plan`.
pub fn report(prev: &Status, plan: &Plan, applied: Applied) -> Outcome {
    match applied {
        Applied::Failed(failure) => failed(prev, plan, failure),
        Applied::Done(done) => done_outcome(prev, plan, &done),
    }
}

fn failed(prev: &Status, plan: &Plan, failure: Failure) -> Outcome {
    let vm = &plan.vm;
    let later = Action::requeue(Duration::from_secs(300));
    let (message, action) = match failure {
        Failure::ScsiController(e) => (
            format!("Adding a virtio-scsi controller to {vm} failed: {e}."),
            later,
        ),
        Failure::HotPlugRefused(e) => (
            format!(
                "The running {vm} refused the device: {e}. Nothing was changed; fix the source (is it a valid image of spec.format, not in use by another guest?) or the spec."
            ),
            later,
        ),
        Failure::Definition(message) => (message, Action::await_change()),
    };
    Outcome::not_ready(prev, StorageReason::AttachFailed.as_str(), message, action)
}

/// Why a restart is needed, as the `RestartRequired` condition says it.
pub fn restart_message(cause: &RestartCause, vm: &str) -> String {
    match cause {
        RestartCause::BusCannotHotPlug(bus) => format!(
            "A {} device cannot be hot-plugged: it was added to the definition of {vm} and appears at the next boot. Use bus scsi to hot-plug instead.",
            bus_name(*bus)
        ),
        RestartCause::ScsiControllerHotPlugFailed(e) => format!(
            "{vm} had no SCSI controller and hot-plugging one failed ({e}); the controller and the device are in the definition and appear at the next boot."
        ),
        RestartCause::HotPlugLimit(e) => format!(
            "Hot-plugging into the running {vm} failed ({e}); the device is in the definition and appears at the next boot. A scsi bus hot-plugs without needing a free PCI slot."
        ),
    }
}

/// The Events of what was done: Attached, DriftCorrected (a device put back), MediaChanged,
/// Ejected.
pub fn events(prev: &Status, plan: &Plan, done: &Done) -> Vec<(EventType, &'static str, String)> {
    let (vm, target) = (&plan.vm, &plan.target);
    let mut events = Vec::new();
    if done.plugged {
        events.push(if prev.live == Some(true) {
            (
                EventType::Warning,
                "DriftCorrected",
                format!(
                    "{target} was removed from the running {vm} outside virtplane; it was put back."
                ),
            )
        } else {
            (
                EventType::Normal,
                "Attached",
                format!("Hot-plugged {target} into {vm}."),
            )
        });
    }
    if done.defined {
        if prev.persistent == Some(true) {
            events.push((
                EventType::Warning,
                "DriftCorrected",
                format!(
                    "{target} was removed from the definition of {vm} outside virtplane; it was put back."
                ),
            ));
        } else if !plan.want_live {
            events.push((
                EventType::Normal,
                "Attached",
                format!("Added {target} to the definition of {vm}; it appears at the next boot."),
            ));
        }
    }
    if done.media_changed {
        events.push(match &plan.source {
            Some(p) => (
                EventType::Normal,
                "MediaChanged",
                format!("Inserted {p} into {target} of {vm}."),
            ),
            None => (
                EventType::Normal,
                "Ejected",
                format!("Ejected the medium of {target} of {vm}."),
            ),
        });
    }
    events
}

fn done_outcome(prev: &Status, plan: &Plan, done: &Done) -> Outcome {
    let (vm, target, alias) = (&plan.vm, &plan.target, &plan.alias);
    let view = &done.view;
    let config_now = view.config.disk(alias).filter(|_| view.persistent);
    let live_now = view.live.as_ref().and_then(|l| l.disk(alias));
    let current = if view.active {
        live_now.or(config_now)
    } else {
        config_now
    };
    let status = Status {
        vm: Some(vm.clone()),
        target: Some(target.clone()),
        bus: Some(plan.bus),
        alias: Some(alias.clone()),
        current_source: current.and_then(|d| d.source_label()),
        live: Some(live_now.is_some()),
        persistent: Some(config_now.is_some()),
        ..prev.clone()
    };
    let placed = if view.active && plan.attach == AttachMode::LiveAndPersistent {
        live_now.is_some()
    } else {
        true
    } && (config_now.is_some() || !view.persistent);
    let restart = done.restart.as_ref().map(|c| restart_message(c, vm));
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
            StorageReason::Attached.as_str(),
            format!(
                "{target} ({}) is attached to {vm}, {where_}.",
                bus_name(plan.bus)
            ),
        )
    } else if let Some(msg) = &restart {
        Desired::falsy(
            condition::READY,
            StorageReason::RestartRequired.as_str(),
            msg.clone(),
        )
    } else {
        Desired::falsy(
            condition::READY,
            StorageReason::AttachFailed.as_str(),
            format!("{target} is not attached to {vm} yet; the agent retries."),
        )
    };
    let action = if placed {
        Action::requeue(Duration::from_secs(600))
    } else {
        Action::requeue(Duration::from_secs(30))
    };
    Outcome {
        status,
        ready,
        restart,
        events: events(prev, plan, done),
        action,
    }
}

#[cfg(test)]
#[path = "report_tests.rs"]
mod tests;
