//! The pure last step of a VirtualMachineStorage reconcile: what happened, as status fields,
//! `Ready` and `RestartRequired`, Events, and when to look again.

use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::Outcome;
use super::apply::{Applied, Done, Failure};
use super::fields;
use super::plan::{Plan, RestartCause, bus_name};
use super::reason::StorageReason;
use crate::agent::refusal::{Reason, Refusal};
use crate::api::{AttachMode, VirtualMachineStorageStatus, condition};
use crate::conditions::Desired;
use crate::libvirt::LibvirtError;
use crate::libvirt::facade::Affect;
use crate::libvirt::tuning::{self, disk_fields};

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
        Failure::Redefine(e) => (
            format!(
                "libvirt refused {} of {} in the definition of {vm}: {e}. Nothing was changed; fix the spec.",
                spec_fields(&plan.redefined),
                plan.target
            ),
            Action::await_change(),
        ),
        Failure::IoTune(e) => (
            format!(
                "libvirt refused the I/O limits (spec.iotune) of {} on {vm}: {e}. Nothing was changed; fix spec.iotune.",
                plan.target
            ),
            Action::await_change(),
        ),
    };
    Outcome::not_ready(prev, StorageReason::AttachFailed.as_str(), message, action)
}

/// `spec.a, spec.b` of field paths.
pub fn spec_fields(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("spec.{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `RestartRequired` message of fields that wait for the next boot.
pub fn pending_message(pending: &[&str], target: &str, vm: &str) -> String {
    format!(
        "{} of {target} {} in the definition of {vm} and take{} effect at its next boot; the running guest still has the old value{}.",
        spec_fields(pending),
        if pending.len() == 1 { "is" } else { "are" },
        if pending.len() == 1 { "s" } else { "" },
        if pending.len() == 1 { "" } else { "s" },
    )
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
    if done.redefined {
        let what = spec_fields(&plan.redefined);
        events.push((
            EventType::Normal,
            "Updated",
            if done.view.active {
                format!(
                    "Wrote {what} of {target} into the definition of {vm}; it takes effect at the next boot."
                )
            } else {
                format!("Wrote {what} of {target} into the definition of {vm}.")
            },
        ));
    }
    if let Some(how) = &done.boot_converted {
        events.push((
            EventType::Normal,
            "BootOrderConverted",
            format!(
                "{vm} listed its boot devices by type (<os><boot dev>); for spec.bootOrder of {target} the list was turned into per-device boot orders in its definition: {how}."
            ),
        ));
    }
    if let Some(affect) = done.iotune_set {
        let where_ = match affect {
            Affect::Live => "in the running guest",
            Affect::Config => "in the definition",
            Affect::Both => "in the running guest and the definition",
        };
        events.push(if plan.iotune_drift {
            (
                EventType::Warning,
                "DriftCorrected",
                format!(
                    "The I/O limits of {target} on {vm} were changed outside virtplane; spec.iotune was set again {where_}."
                ),
            )
        } else {
            (
                EventType::Normal,
                "IoTuneChanged",
                format!("Set the I/O limits of {target} on {vm} {where_}."),
            )
        });
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
    // What is in effect: the running guest's values, else the definition's.
    let effective = current.map(|d| disk_fields(&d.xml));
    let config_fields = config_now.map(|d| disk_fields(&d.xml));
    // Fields the definition has as asked but the running guest not yet: they wait for a boot.
    let pending: Vec<&'static str> = match (live_now, &config_fields) {
        (Some(live), Some(config)) if view.active => {
            let in_config = fields::differing(&plan.wanted, config);
            fields::differing(&plan.wanted, &disk_fields(&live.xml))
                .into_iter()
                .filter(|f| !in_config.contains(f))
                .collect()
        }
        _ => Vec::new(),
    };
    let iotune_in_effect = live_now
        .into_iter()
        .chain(config_now)
        .all(|d| disk_fields(&d.xml).iotune == plan.wanted.iotune);
    let status = Status {
        vm: Some(vm.clone()),
        iotune: effective.and_then(|f| tuning::iotune_of(f.iotune)),
        pending_restart: pending.iter().map(|f| f.to_string()).collect(),
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
    let restart = done
        .restart
        .as_ref()
        .map(|c| restart_message(c, vm))
        .or_else(|| (!pending.is_empty()).then(|| pending_message(&pending, target, vm)));
    let ready = if placed && !pending.is_empty() {
        Desired::falsy(
            condition::READY,
            StorageReason::RestartRequired.as_str(),
            pending_message(&pending, target, vm),
        )
    } else if placed && !iotune_in_effect {
        Desired::falsy(
            condition::READY,
            StorageReason::AttachFailed.as_str(),
            format!("The I/O limits of {target} on {vm} are not in effect yet; the agent retries."),
        )
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
    let action = if placed && iotune_in_effect {
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
