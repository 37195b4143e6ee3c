//! `VMInterface`: network interfaces identified by their MAC: hot-plug, every spec field changed
//! in place, for the next boot or refused ([`fields`]), the guest's own view (name and
//! addresses), confirmed detach, drift repair.
//!
//! One reconcile is a pipeline: [`observe`] reads libvirt and the cluster-wide MAC [`index`],
//! [`plan`] decides (pure), [`apply`] runs the steps through the libvirt facade, [`report`]
//! turns what happened into the status, conditions and Events (pure), written once here.

mod apply;
mod fields;
pub mod index;
pub(super) mod mac;
mod observe;
mod plan;
pub(super) mod reason;
mod report;

use std::sync::Arc;
use std::time::Duration;

use kube::api::Api;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::context::{Context, ReconcileError};
use super::{device, finalizer, status};
use crate::api::{VMInterface, VMInterfaceStatus};
use crate::libvirt::domain::DomainXml;

/// How long a reconcile that must check MACs waits for the index's first full list.
const INDEX_WAIT: Duration = Duration::from_secs(30);

fn alias_of(obj: &VMInterface) -> String {
    format!("ua-vpn-{}", obj.uid().unwrap_or_default())
}

fn find_nic(d: &DomainXml, alias: &str) -> Option<String> {
    d.nic(alias).map(|x| x.xml.clone())
}

/// Reconciles one VMInterface.
#[tracing::instrument(skip_all, fields(object = %format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())))]
pub(super) async fn reconcile(
    obj: Arc<VMInterface>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    tracing::debug!("reconciling");
    let api: Api<VMInterface> =
        Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let alias = alias_of(&obj);
    let vm = device::domain_of(
        obj.status.as_ref().and_then(|s| s.vm.as_ref()),
        &obj.spec.vm,
    );
    let guard = ctx.locks.get(&vm).lock_owned().await;
    let (api, ctx, alias, vm) = (&api, &ctx, alias.as_str(), vm.as_str());
    finalizer::finalizer(api, obj, |event| async move {
        match event {
            finalizer::Event::Cleanup(obj) => Ok(finalizer::Step::Cleanup(
                cleanup(api, &obj, ctx, vm, alias).await?,
            )),
            finalizer::Event::Apply(obj) => Ok(finalizer::Step::Applied(
                reconcile_apply(api, &obj, ctx, alias, guard).await?,
            )),
        }
    })
    .await
}

/// Detaches the NIC and lets the object go once the guest released it.
async fn cleanup(
    api: &Api<VMInterface>,
    obj: &VMInterface,
    ctx: &Context,
    vm: &str,
    alias: &str,
) -> Result<finalizer::Cleanup, ReconcileError> {
    let prev = obj.status.clone().unwrap_or_default();
    let what = prev.mac.clone().unwrap_or_else(|| alias.to_string());
    let was_attached = prev.live == Some(true) || prev.persistent == Some(true);
    let pending = VMInterfaceStatus {
        persistent: Some(false),
        ..prev.clone()
    };
    device::finish_detach(
        api,
        obj,
        ctx,
        None,
        vm,
        alias,
        &what,
        was_attached,
        find_nic,
        &prev,
        pending,
    )
    .await
}

/// observe -> plan -> apply -> report, and the one status write.
async fn reconcile_apply(
    api: &Api<VMInterface>,
    obj: &VMInterface,
    ctx: &Context,
    alias: &str,
    guard: tokio::sync::OwnedMutexGuard<()>,
) -> Result<Action, ReconcileError> {
    let prev = obj.status.clone().unwrap_or_default();
    let outcome = match pipeline(api, obj, ctx, alias, &prev, guard).await {
        Ok(Some(o)) => o,
        // The MAC index or the grants have not seen the cluster yet: look again shortly,
        // nothing decided.
        Ok(None) => return Ok(Action::requeue(Duration::from_secs(5))),
        // A timed-out call is reported as such, like every kind's (see `timeout`).
        Err(e) if super::timeout::ready(&e).is_some() => return Err(e),
        Err(ReconcileError::Libvirt(err)) if ctx.libvirt.is_connected() => {
            report::failed(&prev, &err)
        }
        Err(e) => return Err(e),
    };
    status::write_outcome(api, obj, ctx, &prev, outcome).await
}

async fn pipeline(
    api: &Api<VMInterface>,
    obj: &VMInterface,
    ctx: &Context,
    alias: &str,
    prev: &VMInterfaceStatus,
    guard: tokio::sync::OwnedMutexGuard<()>,
) -> Result<Option<report::Outcome>, ReconcileError> {
    // Only right after start: the MAC claims are answered from a complete list.
    if !ctx.macs.synced(INDEX_WAIT).await {
        tracing::warn!("the VMInterface MAC index has not synced yet; waiting");
        return Ok(None);
    }
    // Likewise the grants: an early "nothing granted" would flap an attached NIC's status.
    if tokio::time::timeout(INDEX_WAIT, ctx.grants.ready())
        .await
        .is_err()
    {
        tracing::warn!("the Namespace grants have not synced yet; waiting");
        return Ok(None);
    }
    let grants = ctx.grants.grants(&obj.namespace().unwrap_or_default());
    let uid = obj.uid().unwrap_or_default();
    let me = observe::Me { uid: &uid, alias };
    let observed = observe::observe(
        &ctx.libvirt,
        &ctx.macs,
        grants,
        &ctx.node,
        &me,
        &obj.spec,
        prev,
    )
    .await?;
    let id = plan::Identity {
        alias,
        uid: &uid,
        created: obj.meta().creation_timestamp.as_ref(),
        generation: obj.meta().generation,
    };
    let plan = match plan::plan(&id, &obj.spec, prev, &observed) {
        Ok(p) => p,
        Err(refusal) => return Ok(Some(report::refused(prev, refusal))),
    };
    if plan.record_mac {
        // Recorded before anything is attached, so a restart never picks another one.
        status::apply_status(api, obj, json!({ "mac": plan.mac })).await?;
    }
    let (events, restart) = match apply::apply(&ctx.libvirt, &plan).await? {
        apply::Applied::Done { events, restart } => (events, restart),
        apply::Applied::Stopped(refusal) => return Ok(Some(report::refused(prev, refusal))),
    };
    let view = observe::placed(&ctx.libvirt, &plan.vm).await?;
    // Asking the guest may take seconds: other devices of this domain need not wait for it.
    drop(guard);
    let guest = observe::guest(&ctx.libvirt, &plan.vm, &plan.mac, &view, obj.spec.type_).await;
    Ok(Some(report::report(
        prev, &plan, &view, &guest, events, restart,
    )))
}

#[cfg(test)]
mod fields_tests;
#[cfg(test)]
mod tests;
