//! `VMClone`: a task cloning a shut-off domain: new name, UUID and MACs, copies of its writable
//! disks (reflink or sparse copy, per pool), progress, and nothing left half-made.
//!
//! The reconcile observes, plans and records the plan in the status; the copy and the
//! definition run as a job of the agent's job runner (see [`apply`]), whose progress and end
//! wake the reconcile, the only writer of the status. A deletion abandons the job and removes
//! what an unfinished task made.

mod apply;
mod block;
mod block_apply;
mod ledger;
mod observe;
mod plan;
pub(super) mod reason;
mod report;
mod reserve;
mod steps;
mod volume_ledger;

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;

use super::context::{Context, ReconcileError};
use super::jobs::{Jobs, Stop};
use super::refusal::Reason;
use super::{finalizer, status};
use crate::api::{ClonePhase, VMClone, VMCloneStatus};

/// How long a reconcile waits for the grants view's first full list of Namespaces.
const GRANTS_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Clone jobs, by task UID.
pub use ledger::NodeSide;

/// The job runner of clone tasks.
pub type CloneJobs = Jobs<VMClone, apply::Progress, apply::JobEnd>;

/// Reconciles one VMClone.
#[tracing::instrument(skip_all, fields(object = %format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())))]
pub(super) async fn reconcile(
    obj: Arc<VMClone>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    tracing::debug!("reconciling");
    let api: Api<VMClone> =
        Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    finalizer::finalizer(&api, obj, |event| async {
        match event {
            finalizer::Event::Cleanup(obj) => {
                Ok(finalizer::Step::Cleanup(cleanup(&api, &obj, &ctx).await?))
            }
            finalizer::Event::Apply(obj) => {
                Ok(finalizer::Step::Applied(apply(&api, &obj, &ctx).await?))
            }
        }
    })
    .await
}

/// Writes a report: status and conditions, then its Events.
async fn write(
    api: &Api<VMClone>,
    obj: &VMClone,
    ctx: &Context,
    prev: &VMCloneStatus,
    r: report::Report,
) -> Result<Action, ReconcileError> {
    status::write_status(api, obj, prev, r.status, &[r.ready, r.progressing]).await?;
    if let Some(reason) = r.failure {
        crate::metrics::get().error("VMClone", reason.as_str());
    }
    for (type_, reason, note) in r.events {
        status::publish(&ctx.recorder, obj, type_, reason, note).await;
    }
    Ok(r.action)
}

async fn apply(
    api: &Api<VMClone>,
    obj: &Arc<VMClone>,
    ctx: &Arc<Context>,
) -> Result<Action, ReconcileError> {
    let uid = obj.uid().unwrap_or_default();
    let cached = obj.status.clone().unwrap_or_default();
    let spec = &obj.spec;
    // Running first: a job cannot start by itself, so one seen ended stays ended.
    if ctx.clones.running(&uid) {
        let r = report::progress(spec, &cached, ctx.clones.progress(&uid).flatten());
        return write(api, obj, ctx, &cached, r).await;
    }
    if let Some(end) = ctx.clones.finished(&uid) {
        return match report::finished(spec, &cached, end, Timestamp::now()) {
            Some(r) => write(api, obj, ctx, &cached, r).await,
            None => Ok(Action::await_change()),
        };
    }
    if plan::settled(&cached) {
        return Ok(Action::await_change());
    }

    let prev = observe::fresh_status(api, obj).await?;
    if plan::settled(&prev) {
        return Ok(Action::await_change());
    }
    // An early "nothing granted" would hold a task back for no reason.
    if tokio::time::timeout(GRANTS_WAIT, ctx.grants.ready())
        .await
        .is_err()
    {
        tracing::warn!("the Namespace grants have not synced yet; waiting");
        return Ok(Action::requeue(std::time::Duration::from_secs(5)));
    }
    // A task not started yet holds no reservation but what a plan whose status was never
    // written left: released, so the plan sees those names free again.
    let ledger = ctx.clone_side.ledger(&uid);
    if !plan::resumes(&prev) {
        let l = ledger.clone();
        let _ = tokio::task::spawn_blocking(move || reserve::release(&l)).await;
    }
    let mut observed = observe::observe(obj, ctx, &prev).await?;
    let decision = reserve::decide(spec, &uid, &ctx.node, &prev, &mut observed, &ledger).await?;
    let (r, config) = match decision {
        plan::Decision::Wait(why) => {
            return write(api, obj, ctx, &prev, report::waiting(&prev, why)).await;
        }
        plan::Decision::Refuse(why) => {
            let r = report::refused(&prev, why, Timestamp::now());
            return write(api, obj, ctx, &prev, r).await;
        }
        plan::Decision::Resume => (report::resumed(spec, &prev), observed.source),
        plan::Decision::Start(p) => (
            report::started(spec, &prev, p, Timestamp::now()),
            observed.source,
        ),
    };
    let plan::Source::ShutOff(config) = config else {
        return Ok(Action::await_change());
    };
    // The plan is in the status before anything is copied: a new agent resumes it.
    let job = apply::Job {
        uid: uid.clone(),
        namespace: obj.namespace().unwrap_or_default(),
        source: spec.source.clone(),
        start: spec.start,
        strategy: spec.storage.strategy,
        config,
        status: r.status.clone(),
        ledger,
        slots: ctx.clone_side.slots.clone(),
    };
    let action = write(api, obj, ctx, &prev, r).await?;
    let libvirt = ctx.libvirt.clone();
    ctx.clones
        .start(&uid, ObjectRef::from_obj(&**obj), move |jctx| async move {
            apply::run(&libvirt, job, &jctx).await
        });
    Ok(action)
}

/// Stops the task's job; a task that did not complete leaves nothing behind.
async fn cleanup(
    api: &Api<VMClone>,
    obj: &VMClone,
    ctx: &Context,
) -> Result<finalizer::Cleanup, ReconcileError> {
    let uid = obj.uid().unwrap_or_default();
    // A job that ended before its end was reported: a completed clone is kept.
    let ended = ctx.clones.finished(&uid);
    if let Some(handle) = ctx.clones.stop(&uid, Stop::Abandon) {
        let _ = handle.await;
    }
    if matches!(ended, Some(apply::JobEnd::Completed { .. })) {
        return Ok(finalizer::Cleanup::Done);
    }
    let status = observe::fresh_status(api, obj).await?;
    if status.phase != Some(ClonePhase::Completed) {
        let target = status.target_name.clone().unwrap_or_default();
        apply::remove_leftovers(&ctx.libvirt, &uid, &target, &ctx.clone_side.ledger(&uid)).await?;
    }
    Ok(finalizer::Cleanup::Done)
}
