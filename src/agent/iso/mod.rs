//! `IsoDownload`: an ISO fetched into a storage pool on this node, resumably, with pause,
//! resume, cancel, progress and verification. The transfer itself is `crate::download`, run as a
//! job of the agent's job runner; this module checks the request, schedules the job within the
//! node's download slots, reports its progress at most about once a second, and cleans up.
//!
//! One reconcile: [`observe`] (the job, the pools, the files) → [`plan`] (pure) → [`apply`]
//! (start, pause or abandon the job; pool refresh; file removal) → [`report`] (pure) → one
//! status write. The job never writes status.

mod apply;
mod checks;
mod credentials;
mod downloads;
mod job;
mod observe;
mod plan;
pub mod ranges;
pub(super) mod reason;
mod report;
mod settings;
mod slots;
mod space;

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;

use super::context::{Context, ReconcileError};
use super::finalizer::{self, Event, Step};
use super::jobs::Stop;
use super::status;
use crate::api::IsoDownload;
use checks::Place;

pub use downloads::Downloads;
pub use ranges::ClusterRanges;
pub use settings::{DownloadSettings, parse_cidrs};

/// Reconciles one IsoDownload.
#[tracing::instrument(skip_all, fields(object = %format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())))]
pub(super) async fn reconcile(
    obj: Arc<IsoDownload>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    tracing::debug!("reconciling");
    let api: Api<IsoDownload> =
        Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    finalizer::finalizer(&api, obj, |event| async {
        match event {
            Event::Cleanup(obj) => cleanup(&obj, &ctx).await.map(Step::Cleanup),
            Event::Apply(obj) => apply_pass(&api, &obj, &ctx).await.map(Step::Applied),
        }
    })
    .await
}

/// Stops the job, then removes partial data, and the completed volume under
/// `reclaimPolicy: Delete`, by the names the download started with.
async fn cleanup(obj: &IsoDownload, ctx: &Context) -> Result<finalizer::Cleanup, ReconcileError> {
    let uid = obj.uid().unwrap_or_default();
    ctx.downloads.stop(&uid, Stop::Abandon).await;
    let observed = observe::observe_cleanup(obj, &ctx.libvirt, &ctx.node).await?;
    apply::cleanup(&ctx.libvirt, &plan::cleanup(obj, &observed)).await;
    ctx.downloads.forget(&uid);
    Ok(finalizer::Cleanup::Done)
}

/// observe → plan → apply → report, and the one status write.
async fn apply_pass(
    api: &Api<IsoDownload>,
    obj: &IsoDownload,
    ctx: &Context,
) -> Result<Action, ReconcileError> {
    let uid = obj.uid().unwrap_or_default();
    // An early, empty view of the grants would refuse everything.
    ctx.grants.ready().await;
    let grants = ctx.grants.grants(&obj.namespace().unwrap_or_default());
    let observed = observe::observe(obj, &ctx.libvirt, &ctx.downloads, &ctx.node, grants).await?;
    let plan = plan::plan(obj, &observed);
    let outcome = apply::apply(&ctx.libvirt, &ctx.downloads, &uid, plan, |place| {
        start(obj, ctx, &uid, place)
    })
    .await;
    let report = report::report(obj, &ctx.node, &outcome, Timestamp::now());
    if let Some(seq) = report.progress
        && let Some(wait) = ctx.downloads.due(&uid, seq)
    {
        // Progress only, written less than a second ago: the next one comes by then.
        return Ok(Action::requeue(wait));
    }
    if let Some(w) = report.write {
        let prev = obj.status.clone().unwrap_or_default();
        let phase = w.status.phase;
        status::write_status(api, obj, &prev, w.status, &[w.ready, w.progressing]).await?;
        tracing::debug!(step = "status_written", ?phase, "status written");
    }
    if let Some(seq) = report.progress {
        ctx.downloads.written(&uid, seq);
    }
    // The record goes as soon as Completed is written, not after the Events: whoever sees
    // Completed finds the pool as it stays.
    if let Some(at) = &report.clear {
        apply::clear_record(at).await;
    }
    for (type_, reason, note) in report.events {
        status::publish(&ctx.recorder, obj, type_, reason, note).await;
    }
    Ok(report.action)
}

/// Starts the object's download job at `place`; whether one was started.
fn start(obj: &IsoDownload, ctx: &Context, uid: &str, place: Place) -> bool {
    let d = &ctx.downloads;
    let input = job::JobInput {
        client: ctx.client.clone(),
        namespace: obj.namespace().unwrap_or_default(),
        spec: obj.spec.clone(),
        owner: obj.uid(),
        place,
        base_attempts: obj.status.as_ref().and_then(|s| s.attempts).unwrap_or(0),
        slots: d.slots.clone(),
        limit: d.limit,
        settings: d.settings.clone(),
        space: d.space.clone(),
        written: d.acks(uid),
    };
    d.jobs.start(uid, ObjectRef::from_obj(obj), move |job| {
        job::run(input, job)
    })
}
