//! Apply: runs a [`Plan`]'s steps through the libvirt facade and says what happened.

use std::time::Duration;

use kube::runtime::events::EventType;

use super::fields;
use super::plan::{Plan, Step};
use super::reason::{Reason, Refusal};
use crate::agent::device::{self, HotPlug};
use crate::libvirt::facade::{Affect, DeviceChange, Domains};
use crate::libvirt::nic::NicTuning;
use crate::libvirt::tuning::Tuning;
use crate::libvirt::{ErrorKind, LibvirtError};

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

/// The Event of a change of `fields`: `Updated`, `LinkChanged` for the link alone, or a Warning
/// `DriftCorrected` when the spec had not changed (someone changed libvirt behind our back).
fn changed_event(plan: &Plan, fields: &[&str], live: bool) -> Event {
    let (vm, mac) = (plan.vm.as_str(), plan.mac.as_str());
    let list = fields::list(fields);
    if plan.drift {
        let where_ = if live {
            "the running guest"
        } else {
            "the definition"
        };
        return (
            EventType::Warning,
            "DriftCorrected",
            format!(
                "{list} of {mac} in {where_} of {vm} was changed outside virtplane; set back to the spec."
            ),
        );
    }
    if live && fields == ["linkState"] {
        let state = if plan.link_down { "down" } else { "up" };
        return (
            EventType::Normal,
            "LinkChanged",
            format!("Link of {mac} set {state}."),
        );
    }
    let note = match (live, plan.active) {
        (true, _) => format!("Changed {list} of {mac} in the running {vm}."),
        (false, true) => format!(
            "Wrote {list} of {mac} to the definition of {vm}; the running guest has the spec's values once they are in effect (see RestartRequired)."
        ),
        (false, false) => {
            format!("Wrote {list} of {mac} to the definition of {vm}; in effect when it starts.")
        }
    };
    (EventType::Normal, "Updated", note)
}

/// The Warning of a NIC put back into the definition.
fn put_back(plan: &Plan) -> Event {
    (
        EventType::Warning,
        "DriftCorrected",
        format!(
            "{} was removed from the definition of {} outside virtplane; it was put back.",
            plan.mac, plan.vm
        ),
    )
}

/// The Event of a definition whose `<os><boot dev>` list was turned into per-device orders.
fn converted_event(plan: &Plan, converted: Option<String>) -> Option<Event> {
    converted.map(|how| {
        (
            EventType::Normal,
            "BootOrderConverted",
            format!(
                "{} listed its boot devices by type (<os><boot dev>); for spec.bootOrder of {} the list was turned into per-device boot orders in its definition: {how}.",
                plan.vm, plan.mac
            ),
        )
    })
}

/// Runs `plan`.
pub async fn apply<V: Domains + NicTuning + Tuning>(
    virt: &V,
    plan: &Plan,
) -> Result<Applied, LibvirtError> {
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
            Step::PlugLive { drift } => {
                match device::attach_live(virt, vm, &plan.live_xml).await? {
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
                }
            }
            Step::UpdateLive { xml, fields } => {
                virt.change_device(vm, xml, DeviceChange::Update, Affect::Live)
                    .await?;
                events.push(changed_event(plan, fields, true));
            }
            Step::SetBandwidthLive => {
                virt.set_live_bandwidth(vm, mac, &plan.bandwidth).await?;
                events.push(changed_event(plan, &["bandwidth"], true));
            }
            Step::AddConfig { drift } if plan.convert_boot => {
                match virt.redefine_device(vm, &plan.alias, xml).await {
                    Ok(converted) => events.extend(converted_event(plan, converted)),
                    Err(e) if e.kind() == ErrorKind::Refused => {
                        return Ok(Applied::Stopped(Refusal::fix(
                            Reason::AttachFailed,
                            device::take_back(virt, vm, &plan.live_xml, plugged, "interface", &e)
                                .await,
                        )));
                    }
                    Err(e) => return Err(e),
                }
                if *drift {
                    events.push(put_back(plan));
                }
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
                    events.push(put_back(plan));
                }
            }
            Step::UpdateConfig { xml, fields } => {
                if plan.convert_boot {
                    match virt.redefine_device(vm, &plan.alias, xml).await {
                        Ok(converted) => events.extend(converted_event(plan, converted)),
                        Err(e) if e.kind() == ErrorKind::Refused => {
                            return Ok(Applied::Stopped(Refusal::fix(
                                Reason::AttachFailed,
                                format!(
                                    "libvirt refused spec.bootOrder of {mac} in the definition of {vm}: {e}. Nothing was changed; fix the spec."
                                ),
                            )));
                        }
                        Err(e) => return Err(e),
                    }
                } else {
                    virt.change_device(vm, xml, DeviceChange::Update, Affect::Config)
                        .await?;
                }
                // What the running guest took in place was announced with the live step.
                let rest: Vec<&str> = fields
                    .iter()
                    .copied()
                    .filter(|f| {
                        !plan.steps.iter().any(|s| match s {
                            Step::UpdateLive { fields: live, .. } => live.contains(f),
                            Step::SetBandwidthLive => *f == "bandwidth",
                            _ => false,
                        })
                    })
                    .collect();
                if !rest.is_empty() {
                    events.push(changed_event(plan, &rest, false));
                }
            }
        }
    }
    Ok(Applied::Done { events, restart })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::agent::interface::plan::{Plan, plan};
    use crate::agent::interface::reason::Reason;
    use crate::agent::interface::tests::{ALIAS, ID, M, nic, observed, recorded, spec};
    use crate::agent::refusal::Retry;
    use crate::api::VMInterfaceStatus;
    use crate::libvirt::ErrorKind;
    use crate::libvirt::facade::Domains;
    use crate::libvirt::fake::FakeLibvirt;

    fn planned(fake: &FakeLibvirt, s: serde_json::Value, prev: &VMInterfaceStatus) -> Plan {
        let v = futures::executor::block_on(fake.domain("vm")).unwrap();
        let mut o = observed(v);
        o.macs = None;
        plan(&ID, &spec(s), prev, &o).unwrap()
    }

    fn reasons(events: &[Event]) -> Vec<&'static str> {
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
        fake.fail_next("attach a device", Some(Affect::Config), ErrorKind::Refused);
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
}
