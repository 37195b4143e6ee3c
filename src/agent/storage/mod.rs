//! `VirtualMachineStorage`: attach and hot-plug disks and CD-ROMs, change or eject media in place,
//! detach with the guest's confirmation, and put back what was removed behind the agent's back.
//!
//! A pipeline: [`observe`] reads the domain, the source and the allowed directories; [`plan`]
//! (pure) decides the steps or refuses; [`apply`] runs the steps through the libvirt facade;
//! [`report`] (pure) turns what happened into status, conditions and Events, written once here.

mod apply;
mod fields;
mod observe;
mod plan;
pub(super) mod reason;
mod report;
mod settle;
mod source;
mod volume;
mod volume_plan;

use std::sync::Arc;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;

use super::batch::Turn;
use super::context::{Context, ReconcileError};
use super::{device, finalizer, status};
use crate::api::{VirtualMachineStorage, VirtualMachineStorageStatus};
use crate::libvirt::domain::DomainXml;
pub(super) use settle::{fingerprint, settled_key};

type Outcome = status::Outcome<VirtualMachineStorageStatus>;

/// The alias virtplane gives the device of `obj` in the domain.
fn alias_of(obj: &VirtualMachineStorage) -> String {
    format!("ua-vps-{}", obj.uid().unwrap_or_default())
}

fn find_disk(d: &DomainXml, alias: &str) -> Option<String> {
    d.disk(alias).map(|x| x.xml.clone())
}

/// The domain and alias of the disk `obj` takes out of a definition, when it is being deleted
/// and holds the agent's finalizer (so its cleanup is still to come).
pub(super) fn leaving(obj: &VirtualMachineStorage) -> Option<(String, String)> {
    let deleting = obj.metadata.deletion_timestamp.is_some()
        && obj.finalizers().iter().any(|f| f == finalizer::FINALIZER);
    deleting.then(|| {
        let vm = device::domain_of(
            obj.status.as_ref().and_then(|s| s.vm.as_ref()),
            &obj.spec.vm,
        );
        (vm, alias_of(obj))
    })
}

/// Reconciles one VirtualMachineStorage.
#[tracing::instrument(skip_all, fields(object = %format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())))]
pub(super) async fn reconcile(
    obj: Arc<VirtualMachineStorage>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    tracing::debug!("reconciling");
    let api: Api<VirtualMachineStorage> =
        Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let alias = alias_of(&obj);
    let vm = device::domain_of(
        obj.status.as_ref().and_then(|s| s.vm.as_ref()),
        &obj.spec.vm,
    );
    let lock = ctx.locks.get(&vm);
    if let Some((vm, alias)) = leaving(&obj) {
        // Gathered with the domain's other detaches into one definition write (`batch`); queued
        // already when the watch showed the deletion, again here in case a batch failed since.
        ctx.definition_batches.enqueue(&vm, &alias);
    }

    let start = std::time::Instant::now();
    finalizer::finalizer(&api, obj, |event| async {
        // The domain's lock covers the libvirt work (observe, plan, apply), not the status
        // write, the finalizer's own API calls nor Events: none of them holds up the domain's
        // other objects. The outcome is this object's alone, and the runtime never reconciles
        // one object twice at once, so its status cannot be overtaken by an older one.
        match event {
            finalizer::Event::Cleanup(obj) => Ok(finalizer::Step::Cleanup(
                cleanup(&api, &obj, &ctx, lock.clone(), &vm, &alias).await?,
            )),
            finalizer::Event::Apply(obj) => {
                let locking = std::time::Instant::now();
                let guard = lock.lock().await;
                let locked = std::time::Instant::now();
                // This pass may put back a device a batch removed meanwhile (its object's deletion
                // came after this pass began): that object's cleanup must then detach it again.
                ctx.definition_batches.forget_removed(&vm, &alias);
                let prev = obj.status.clone().unwrap_or_default();
                let mut steps = Steps::default();
                let (outcome, seen) = match pipeline(&obj, &ctx, &alias, &prev, &mut steps).await {
                    Ok(judged) => judged,
                    // A timed-out call is reported as such, like every kind's (`timeout`).
                    Err(e) if super::timeout::ready(&e).is_some() => return Err(e),
                    Err(ReconcileError::Libvirt(err)) if ctx.libvirt.is_connected() => {
                        (report::libvirt_failed(&prev, &err), None)
                    }
                    Err(e) => return Err(e),
                };
                settle::note(&ctx, &obj, seen, &outcome);
                drop(guard);
                let written = std::time::Instant::now();
                let action = status::write_outcome(&api, &*obj, &ctx, &prev, outcome).await?;
                tracing::debug!(
                    before_lock_us = (locking - start).as_micros() as u64,
                    lock_wait_us = (locked - locking).as_micros() as u64,
                    observe_us = steps.observe.as_micros() as u64,
                    plan_us = steps.plan.as_micros() as u64,
                    apply_us = steps.apply.as_micros() as u64,
                    steps = steps.steps,
                    status_us = written.elapsed().as_micros() as u64,
                    "reconciled",
                );
                Ok(finalizer::Step::Applied(action))
            }
        }
    })
    .await
}

/// How long the steps of one pipeline took (for the debug log that profiles a reconcile).
#[derive(Default)]
struct Steps {
    observe: std::time::Duration,
    plan: std::time::Duration,
    apply: std::time::Duration,
    steps: usize,
}

/// observe -> plan -> apply -> report; with the outcome, the fingerprint of the domain it was
/// judged on (`None` for a refusal or a failed step: nothing to spare it for).
async fn pipeline(
    obj: &VirtualMachineStorage,
    ctx: &Context,
    alias: &str,
    prev: &VirtualMachineStorageStatus,
    took: &mut Steps,
) -> Result<(Outcome, Option<u64>), ReconcileError> {
    let t = std::time::Instant::now();
    let mut observed = volume::observe(obj, ctx).await?;
    match volume::ensure(obj, ctx, &observed, alias).await? {
        volume::Ensured::Unchanged => {}
        volume::Ensured::Changed => observed = volume::observe(obj, ctx).await?,
        volume::Ensured::Refused(refusal) => return Ok((report::refused(prev, refusal), None)),
    }
    took.observe = t.elapsed();
    let t = std::time::Instant::now();
    let plan = match plan::plan(&obj.spec, prev, alias, &observed) {
        Ok(plan) => plan,
        Err(refusal) => return Ok((report::refused(prev, refusal), None)),
    };
    took.plan = t.elapsed();
    took.steps = plan.steps.len();
    let t = std::time::Instant::now();
    let applied = match apply::unchanged(&plan, observed.domain) {
        Some(nothing) => nothing,
        None => {
            let applied = apply::apply(&ctx.libvirt, &plan).await;
            // What libvirt refused may have been judged on a kept copy of the pools: the next
            // reconcile reads them afresh.
            if !matches!(applied, Ok(apply::Applied::Done(_))) {
                ctx.pools.forget();
            }
            applied?
        }
    };
    took.apply = t.elapsed();
    let seen = settle::seen(&applied, alias);
    Ok((report::report(prev, &plan, applied), seen))
}

/// Detaches the disk: in a batch with the domain's other detaches when it is shut off (then
/// without waiting for the domain's lock), else on its own under the lock.
async fn cleanup(
    api: &Api<VirtualMachineStorage>,
    obj: &VirtualMachineStorage,
    ctx: &Context,
    lock: Arc<tokio::sync::Mutex<()>>,
    vm: &str,
    alias: &str,
) -> Result<finalizer::Cleanup, ReconcileError> {
    ctx.settled.forget(alias);
    let prev = obj.status.clone().unwrap_or_default();
    let what = prev.target.clone().unwrap_or_else(|| alias.to_string());
    let was_attached = prev.live == Some(true) || prev.persistent == Some(true);
    let done = match ctx
        .definition_batches
        .turn(&ctx.libvirt, lock, vm, alias)
        .await
    {
        Turn::Removed => {
            device::detached(obj, ctx, vm, alias, &what, was_attached).await;
            finalizer::Cleanup::Done
        }
        Turn::Locked(guard) => {
            let pending = VirtualMachineStorageStatus {
                persistent: Some(false),
                ..prev.clone()
            };
            device::finish_detach(
                api,
                obj,
                ctx,
                Some(guard),
                vm,
                alias,
                &what,
                was_attached,
                find_disk,
                &prev,
                pending,
            )
            .await?
        }
    };
    if matches!(done, finalizer::Cleanup::Done) {
        volume::reclaim(obj, ctx).await?;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(deleting: bool, finalizer: bool, recorded_vm: Option<&str>) -> VirtualMachineStorage {
        let mut o: VirtualMachineStorage = serde_json::from_value(serde_json::json!({
            "apiVersion": "virtplane.io/v1alpha1", "kind": "VirtualMachineStorage",
            "metadata": { "name": "d", "namespace": "ns", "uid": "u1" },
            "spec": { "vm": "spec-vm", "type": "disk", "source": { "path": "/a.img" } },
        }))
        .unwrap();
        if deleting {
            o.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::now(),
                ));
        }
        if finalizer {
            o.metadata.finalizers = Some(vec![finalizer::FINALIZER.to_string()]);
        }
        o.status = recorded_vm.map(|vm| VirtualMachineStorageStatus {
            vm: Some(vm.to_string()),
            ..Default::default()
        });
        o
    }

    #[test]
    fn only_a_deletion_still_holding_the_finalizer_leaves_a_domain() {
        assert_eq!(
            leaving(&obj(true, true, None)),
            Some(("spec-vm".to_string(), "ua-vps-u1".to_string()))
        );
        assert_eq!(
            leaving(&obj(true, true, Some("recorded-vm"))).map(|(vm, _)| vm),
            Some("recorded-vm".to_string()),
            "the domain the device went to"
        );
        assert_eq!(leaving(&obj(true, false, None)), None, "cleanup done");
        assert_eq!(leaving(&obj(false, true, None)), None, "not deleted");
    }
}
