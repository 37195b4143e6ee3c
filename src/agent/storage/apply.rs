//! Runs a [`Plan`] through the libvirt facade and says what happened.

use super::plan::{Plan, RestartCause, SCSI_CONTROLLER, Step};
use crate::agent::device::{self, HotPlug};
use crate::libvirt::domain::DomainView;
use crate::libvirt::facade::{Affect, DeviceChange, Domains};
use crate::libvirt::tuning::Tuning;
use crate::libvirt::{ErrorKind, LibvirtError};

/// What running a plan did.
#[derive(Debug)]
pub enum Applied {
    /// Every step ran (a hot-plug may have been put off to the next boot).
    Done(Box<Done>),
    /// A step failed and the rest did not run.
    Failed(Failure),
}

/// The steps ran.
#[derive(Debug, Default)]
pub struct Done {
    /// The device was hot-plugged.
    pub plugged: bool,
    /// The device was written into the definition.
    pub defined: bool,
    /// A CD medium was changed.
    pub media_changed: bool,
    /// The device was rewritten in the definition (fields for the next boot).
    pub redefined: bool,
    /// The I/O limits were set, and where.
    pub iotune_set: Option<Affect>,
    /// The definition's `<os><boot dev>` list was turned into per-device boot orders: how.
    pub boot_converted: Option<String>,
    /// Why the device waits for the next boot, if it does.
    pub restart: Option<RestartCause>,
    /// The domain as libvirt has it now (default when it vanished meanwhile).
    pub view: DomainView,
}

/// A step that failed, with libvirt's message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Adding the SCSI controller to the definition failed.
    ScsiController(String),
    /// The running guest refused the device itself.
    HotPlugRefused(String),
    /// The definition refused the device (the message says what became of the hot-plug).
    Definition(String),
    /// libvirt refused the changed fields in the definition; nothing was changed.
    Redefine(String),
    /// libvirt refused the I/O limits; nothing was changed.
    IoTune(String),
}

/// Runs the steps of `plan` in order, then reads the domain back. Errors are libvirt failures
/// the reconcile retries (a lost connection, a failed media change, the read-back).
pub async fn apply<D: Domains + Tuning>(virt: &D, plan: &Plan) -> Result<Applied, LibvirtError> {
    let vm = plan.vm.as_str();
    let mut done = Done {
        restart: plan.restart.clone(),
        ..Done::default()
    };
    // The SCSI controllers this run added, taken back if the device then fails.
    let mut added = Vec::new();
    if let Some(failure) = run_steps(virt, plan, &mut done, &mut added).await? {
        for affect in added {
            if let Err(e) = virt
                .change_device(vm, SCSI_CONTROLLER, DeviceChange::Detach, affect)
                .await
            {
                tracing::warn!(domain = vm, error = %e, ?affect, "failed to remove the SCSI controller added for a device that failed");
            }
        }
        return Ok(Applied::Failed(failure));
    }
    // Report what libvirt now has, not what was asked for.
    done.view = virt.domain(vm).await?.unwrap_or_default();
    Ok(Applied::Done(Box::new(done)))
}

/// [`apply`] of a plan without steps: nothing ran, and the domain is as observe read it under
/// the same domain lock, so it is not read again. `view` is that read (`None`: the domain
/// vanished, reported as [`apply`] does).
pub fn unchanged(plan: &Plan, view: Option<DomainView>) -> Option<Applied> {
    plan.steps.is_empty().then(|| {
        Applied::Done(Box::new(Done {
            restart: plan.restart.clone(),
            view: view.unwrap_or_default(),
            ..Done::default()
        }))
    })
}

/// Runs the steps; `Ok(Some(_))` when one failed and the rest did not run.
async fn run_steps<D: Domains + Tuning>(
    virt: &D,
    plan: &Plan,
    done: &mut Done,
    added: &mut Vec<Affect>,
) -> Result<Option<Failure>, LibvirtError> {
    let vm = plan.vm.as_str();
    for step in &plan.steps {
        match *step {
            Step::AddScsiController(affect) => {
                if let Err(e) = virt
                    .change_device(vm, SCSI_CONTROLLER, DeviceChange::Attach, affect)
                    .await
                {
                    return Ok(Some(Failure::ScsiController(e.to_string())));
                }
                added.push(affect);
            }
            Step::HotPlugScsiController => {
                match virt
                    .change_device(vm, SCSI_CONTROLLER, DeviceChange::Attach, Affect::Live)
                    .await
                {
                    Ok(()) => added.push(Affect::Live),
                    Err(e) => {
                        done.restart =
                            Some(RestartCause::ScsiControllerHotPlugFailed(e.to_string()));
                    }
                }
            }
            // Without a controller in the running guest there is nothing to plug into.
            Step::HotPlug if done.restart.is_some() => {}
            Step::HotPlug => match device::attach_live(virt, vm, &plan.live_xml).await? {
                HotPlug::Refused(e) => {
                    return Ok(Some(Failure::HotPlugRefused(e.to_string())));
                }
                HotPlug::Limit(e) => {
                    done.restart = Some(RestartCause::HotPlugLimit(e.to_string()));
                }
                HotPlug::Plugged => done.plugged = true,
            },
            Step::WriteDefinition if plan.wanted.boot_order.is_some() => {
                match virt.redefine_device(vm, &plan.alias, &plan.xml).await {
                    Ok(converted) => {
                        done.defined = true;
                        done.boot_converted = converted;
                    }
                    Err(e) if e.kind() == ErrorKind::Refused => {
                        return Ok(Some(Failure::Definition(
                            device::take_back(virt, vm, &plan.live_xml, done.plugged, "device", &e)
                                .await,
                        )));
                    }
                    Err(e) => return Err(e),
                }
            }
            Step::WriteDefinition => {
                if let Err(message) =
                    device::attach_config(virt, vm, &plan.xml, done.plugged, "device").await
                {
                    return Ok(Some(Failure::Definition(message)));
                }
                done.defined = true;
            }
            Step::UpdateMedia(affect) => {
                let xml = if affect == Affect::Live {
                    &plan.live_xml
                } else {
                    &plan.xml
                };
                virt.change_device(vm, xml, DeviceChange::Update, affect)
                    .await?;
                done.media_changed = true;
            }
            Step::Redefine => match virt.redefine_device(vm, &plan.alias, &plan.xml).await {
                Ok(converted) => {
                    done.redefined = true;
                    done.boot_converted = converted;
                }
                Err(e) if e.kind() == ErrorKind::Refused => {
                    return Ok(Some(Failure::Redefine(e.to_string())));
                }
                Err(e) => return Err(e),
            },
            Step::SetIoTune(affect) => {
                match virt
                    .set_block_iotune(vm, &plan.target, plan.wanted.iotune, affect)
                    .await
                {
                    Ok(()) => done.iotune_set = Some(affect),
                    Err(e) if matches!(e.kind(), ErrorKind::Refused | ErrorKind::Unsupported) => {
                        return Ok(Some(Failure::IoTune(e.to_string())));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
#[path = "apply_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "apply_fields_tests.rs"]
mod fields_tests;
