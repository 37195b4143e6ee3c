//! The pure last step: what a decision or a job's progress or end means for the task's status,
//! its `Ready` and `Progressing` conditions, its Events and when to look again.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::apply::JobEnd;
use super::plan::{Plan, SHARED};
use super::reason::CloneReason;
use crate::agent::refusal::{Reason, Refusal};
use crate::api::{CloneDisk, ClonePhase, OverlayCopy, VMCloneSpec, VMCloneStatus, condition};
use crate::conditions::Desired;

/// What one reconcile of a task writes and publishes.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The agent's status fields.
    pub status: VMCloneStatus,
    /// The `Ready` condition.
    pub ready: Desired<'static>,
    /// The `Progressing` condition.
    pub progressing: Desired<'static>,
    /// Events to publish.
    pub events: Vec<(EventType, &'static str, String)>,
    /// A failure to count in the metrics.
    pub failure: Option<CloneReason>,
    /// When to look again.
    pub action: Action,
}

/// Both conditions False with `reason`.
fn idle(status: VMCloneStatus, reason: CloneReason, message: String, action: Action) -> Report {
    Report {
        status,
        ready: Desired::falsy(condition::READY, reason.as_str(), message.clone()),
        progressing: Desired::falsy(condition::PROGRESSING, reason.as_str(), message),
        events: Vec::new(),
        failure: None,
        action,
    }
}

/// Ready False and Progressing True with `reason`.
fn busy(status: VMCloneStatus, reason: CloneReason, message: String) -> Report {
    Report {
        status,
        ready: Desired::falsy(condition::READY, reason.as_str(), message.clone()),
        progressing: Desired::truthy(condition::PROGRESSING, reason.as_str(), message),
        events: Vec::new(),
        failure: None,
        action: Action::await_change(),
    }
}

/// Waiting for the source (phase Pending).
pub fn waiting(prev: &VMCloneStatus, why: Refusal<CloneReason>) -> Report {
    let status = VMCloneStatus {
        phase: Some(ClonePhase::Pending),
        ..prev.clone()
    };
    idle(status, why.reason, why.message, why.retry.action())
}

/// Refused before anything was made: Failed, with a Warning Event.
pub fn refused(prev: &VMCloneStatus, why: Refusal<CloneReason>, now: Timestamp) -> Report {
    let status = VMCloneStatus {
        phase: Some(ClonePhase::Failed),
        completion_time: Some(Time(now)),
        ..prev.clone()
    };
    failed(status, why.reason, why.message)
}

fn failed(status: VMCloneStatus, reason: CloneReason, message: String) -> Report {
    let mut r = idle(status, reason, message.clone(), Action::await_change());
    r.events
        .push((EventType::Warning, reason.as_str(), message));
    r.failure = Some(reason);
    r
}

fn copying(spec: &VMCloneSpec, status: &VMCloneStatus) -> String {
    format!(
        "Copying the disks of {} for {}.",
        spec.source,
        status.target_name.as_deref().unwrap_or_default()
    )
}

/// The plan is recorded before anything is copied: phase Copying, a `Started` Event.
pub fn started(spec: &VMCloneSpec, prev: &VMCloneStatus, plan: Plan, now: Timestamp) -> Report {
    let status = VMCloneStatus {
        phase: Some(ClonePhase::Copying),
        target_name: Some(plan.target.clone()),
        disks: plan.disks,
        progress: Some("0%".into()),
        start_time: Some(prev.start_time.clone().unwrap_or(Time(now))),
        ..prev.clone()
    };
    let msg = copying(spec, &status);
    let mut r = busy(status, CloneReason::Copying, msg);
    if prev.start_time.is_none() {
        r.events.push((
            EventType::Normal,
            "Started",
            format!("Cloning {} to {}.", spec.source, plan.target),
        ));
    }
    r
}

/// A task resumed after an agent restart, from the plan in its status.
pub fn resumed(spec: &VMCloneSpec, prev: &VMCloneStatus) -> Report {
    busy(prev.clone(), CloneReason::Copying, copying(spec, prev))
}

/// A running job's progress (`job`: the job's view of the status, if it reported yet).
pub fn progress(spec: &VMCloneSpec, prev: &VMCloneStatus, job: Option<VMCloneStatus>) -> Report {
    let status = job.map_or_else(|| prev.clone(), |j| with_job(prev, j));
    match status.phase {
        Some(ClonePhase::Defining) => {
            let msg = format!(
                "Defining {}.",
                status.target_name.as_deref().unwrap_or_default()
            );
            busy(status, CloneReason::Defining, msg)
        }
        _ => {
            let msg = copying(spec, &status);
            busy(status, CloneReason::Copying, msg)
        }
    }
}

/// `prev` with what the job knows: phase, target, disks, progress, start.
fn with_job(prev: &VMCloneStatus, job: VMCloneStatus) -> VMCloneStatus {
    VMCloneStatus {
        phase: job.phase.or(prev.phase),
        target_name: job.target_name.or_else(|| prev.target_name.clone()),
        target_uuid: job.target_uuid.or_else(|| prev.target_uuid.clone()),
        progress: Some(percent(&job.disks)),
        disks: job.disks,
        start_time: job.start_time.or_else(|| prev.start_time.clone()),
        ..prev.clone()
    }
}

/// A job's end. `None` when the job was stopped (the agent is shutting down, or the task is
/// being deleted): nothing to report.
pub fn finished(
    spec: &VMCloneSpec,
    prev: &VMCloneStatus,
    end: JobEnd,
    now: Timestamp,
) -> Option<Report> {
    match end {
        JobEnd::Stopped => None,
        JobEnd::Completed { status, started } => {
            let mut status = with_job(prev, status);
            status.phase = Some(ClonePhase::Completed);
            status.completion_time = Some(Time(now));
            status.progress = Some("100%".into());
            let note = match started {
                None => ".".to_string(),
                Some(Ok(())) => " and started.".to_string(),
                Some(Err(e)) => format!(", but starting it failed: {e}."),
            };
            let msg = format!(
                "{} was cloned from {}{note}{}",
                status.target_name.as_deref().unwrap_or_default(),
                spec.source,
                overlays(&status.disks)
            );
            Some(Report {
                status,
                ready: Desired::truthy(
                    condition::READY,
                    CloneReason::Completed.as_str(),
                    msg.clone(),
                ),
                progressing: Desired::falsy(
                    condition::PROGRESSING,
                    CloneReason::Completed.as_str(),
                    "The task is done.",
                ),
                events: vec![(EventType::Normal, "Completed", msg)],
                failure: None,
                action: Action::await_change(),
            })
        }
        JobEnd::Failed { status, why } => {
            let mut status = with_job(prev, status);
            status.phase = Some(ClonePhase::Failed);
            status.completion_time = Some(Time(now));
            Some(failed(status, why.reason, why.message))
        }
    }
}

/// What became of the overlays' backing chains, as sentences after the completion message
/// (empty when no disk was an overlay).
pub fn overlays(disks: &[CloneDisk]) -> String {
    let of = |kind: OverlayCopy| {
        disks
            .iter()
            .filter(|d| d.overlay == Some(kind))
            .filter_map(|d| d.target.as_deref())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = String::new();
    let flat = of(OverlayCopy::Flattened);
    if !flat.is_empty() {
        out.push_str(&format!(
            " Overlays merged with their backing chain into standalone copies: {flat}."
        ));
    }
    let shared = of(OverlayCopy::SharedBase);
    if !shared.is_empty() {
        out.push_str(&format!(
            " Overlays that share their backing image with the source (keep it in place, or clone with spec.storage.flatten): {shared}."
        ));
    }
    out
}

/// Overall progress of the copies (shared disks do not count), never above 100%.
pub fn percent(disks: &[CloneDisk]) -> String {
    let (done, total) = disks
        .iter()
        .filter(|d| d.strategy.as_deref() != Some(SHARED))
        .fold((0u64, 0u64), |(a, b), d| {
            (
                a + d.copied_bytes.unwrap_or(0),
                b + d.total_bytes.unwrap_or(0),
            )
        });
    match done.saturating_mul(100).checked_div(total) {
        Some(pct) => format!("{}%", pct.min(100)),
        None => "100%".into(),
    }
}

#[cfg(test)]
#[path = "report_tests.rs"]
mod tests;
