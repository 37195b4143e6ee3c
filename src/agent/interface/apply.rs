//! Apply: runs a [`Plan`]'s steps through the libvirt facade and says what happened.

use std::time::Duration;

use kube::runtime::events::EventType;

use super::plan::{Plan, Step};
use super::reason::{Reason, Refusal};
use crate::agent::device::{self, HotPlug};
use crate::libvirt::LibvirtError;
use crate::libvirt::facade::{Affect, DeviceChange, Domains};

/// An Event to publish.
pub type Event = (EventType, &'static str, String);

/// What applying a plan did.
#[derive(Debug)]
pub enum Applied {
    /// Every step ran; the Events to publish, and why a restart is needed if one is.
    Done {
        /// Events.
        events: Vec<Event>,
        /// Why the NIC waits for the next boot.
        restart: Option<String>,
    },
    /// A step could not go ahead; nothing after it ran.
    Stopped(Refusal),
}

/// Runs `plan`.
pub async fn apply<V: Domains>(virt: &V, plan: &Plan) -> Result<Applied, LibvirtError> {
    let (vm, mac, xml) = (plan.vm.as_str(), plan.mac.as_str(), plan.xml.as_str());
    let mut events = Vec::new();
    let mut restart = None;
    let mut plugged = false;
    for step in &plan.steps {
        match step {
            Step::RemoveDriftedConfig { xml: old } => {
                virt.change_device(vm, old, DeviceChange::Detach, Affect::Config)
                    .await?;
                events.push((
                    EventType::Warning,
                    "DriftCorrected",
                    format!(
                        "The MAC of {} on {vm} was changed outside virtplane; it is {mac} again.",
                        plan.alias
                    ),
                ));
            }
            Step::UnplugDriftedLive { xml: old } => {
                virt.change_device(vm, old, DeviceChange::Detach, Affect::Live)
                    .await?;
                return Ok(Applied::Stopped(Refusal::wait(
                    Reason::AttachFailed,
                    format!(
                        "The live MAC of the interface was changed outside virtplane; the guest is asked to release it and {mac} is plugged back after."
                    ),
                    Duration::from_secs(2),
                )));
            }
            Step::PlugLive { drift } => match device::attach_live(virt, vm, xml).await? {
                HotPlug::Refused(e) => {
                    return Ok(Applied::Stopped(Refusal::wait(
                        Reason::AttachFailed,
                        format!(
                            "The running {vm} refused the interface: {e}. Nothing was changed; fix the spec."
                        ),
                        Duration::from_secs(300),
                    )));
                }
                HotPlug::Limit(e) => {
                    restart = Some(format!(
                        "Hot-plugging into the running {vm} failed ({e}); the interface is in the definition and appears at the next boot."
                    ));
                }
                HotPlug::Plugged => {
                    plugged = true;
                    events.push(if *drift {
                        (
                            EventType::Warning,
                            "DriftCorrected",
                            format!(
                                "{mac} was removed from the running {vm} outside virtplane; it was put back."
                            ),
                        )
                    } else {
                        (
                            EventType::Normal,
                            "Attached",
                            format!("Hot-plugged {mac} into {vm}."),
                        )
                    });
                }
            },
            Step::UpdateLinkLive => {
                virt.change_device(vm, xml, DeviceChange::Update, Affect::Live)
                    .await?;
                events.push((
                    EventType::Normal,
                    "LinkChanged",
                    format!(
                        "Link of {mac} set {}.",
                        if plan.link_down { "down" } else { "up" }
                    ),
                ));
            }
            Step::AddConfig { drift } => {
                if let Err(message) =
                    device::attach_config(virt, vm, xml, plugged, "interface").await
                {
                    return Ok(Applied::Stopped(Refusal::fix(
                        Reason::AttachFailed,
                        message,
                    )));
                }
                if *drift {
                    events.push((
                        EventType::Warning,
                        "DriftCorrected",
                        format!(
                            "{mac} was removed from the definition of {vm} outside virtplane; it was put back."
                        ),
                    ));
                }
            }
            Step::UpdateLinkConfig => {
                virt.change_device(vm, xml, DeviceChange::Update, Affect::Config)
                    .await?;
            }
        }
    }
    Ok(Applied::Done { events, restart })
}
