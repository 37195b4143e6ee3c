//! Status and Events of the agent's kinds: the agent's own status fields and conditions, written
//! by server-side apply only when something changed, and a Warning Event for each new failure.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;

use super::context::{Context, FIELD_MANAGER, ReconcileError, object_name};
use crate::api::{
    IsoDownloadStatus, VMCloneStatus, VMInterfaceStatus, VirtualMachineStorageStatus, condition,
};
use crate::conditions::{self, Desired};

/// The agent's part of a status: every field but the controller's `nodeName`, with only the
/// agent's own conditions. Absent fields are left out (so server-side apply drops them).
pub fn agent_status<T: serde::Serialize>(
    status: &T,
    mine: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> serde_json::Value {
    let mut value = serde_json::to_value(status).unwrap_or_else(|_| json!({}));
    if let Some(map) = value.as_object_mut() {
        map.remove("nodeName");
        map.insert("conditions".into(), json!(mine));
    }
    value
}

/// Server-side applies `status` (a JSON object of the agent's own status fields).
pub async fn apply_status<K>(
    api: &Api<K>,
    obj: &K,
    status: serde_json::Value,
) -> Result<(), ReconcileError>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let body = json!({
        "apiVersion": K::api_version(&()), "kind": K::kind(&()),
        "metadata": { "name": obj.name_any() },
        "status": status,
    });
    match api
        .patch_status(
            &obj.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
    {
        Ok(_) => Ok(()),
        // The object went away meanwhile: nothing to report on.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(ReconcileError::Api {
            action: "update the status of",
            object: object_name(obj),
            source,
        }),
    }
}

/// Publishes a Kubernetes Event about `obj`; failures are logged, never fatal.
pub async fn publish<K>(recorder: &Recorder, obj: &K, type_: EventType, reason: &str, note: String)
where
    K: Resource<DynamicType = ()>,
{
    publish_to(recorder, &obj.object_ref(&()), type_, reason, note).await;
}

/// [`publish`] about the object `reference` names.
async fn publish_to(
    recorder: &Recorder,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let ev = KubeEvent {
        type_,
        reason: reason.to_string(),
        action: event_action(reason, &note),
        note: Some(note),
        secondary: None,
    };
    if let Err(err) = recorder.publish(&ev, reference).await {
        tracing::warn!(error = %err, reason, "failed to publish event");
    }
}

/// The Event's `action`: its reason and a short hash of its note. kube's `Recorder` folds Events
/// with the same type, reason and action about one object into a series that keeps the first
/// note, so each distinct message needs its own action; the same message repeated still counts
/// up one series.
pub fn event_action(reason: &str, note: &str) -> String {
    use std::hash::{Hash, Hasher};
    // `DefaultHasher::new()` has fixed keys: the same note gives the same action in a process,
    // which is as long as the Recorder's cache lives.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    note.hash(&mut h);
    format!("{reason}-{:08x}", h.finish() as u32)
}

/// A status the agent writes; gives access to the fields every kind's status shares.
pub trait AgentStatus: Clone + Default + PartialEq + serde::Serialize {
    /// `conditions`.
    fn conditions(&self) -> &[Condition];
    /// `nodeName` (the controller's).
    fn node_name(&self) -> Option<String>;
    /// Sets `observedGeneration`, `nodeName` and `conditions`.
    fn set_common(
        &mut self,
        generation: Option<i64>,
        node_name: Option<String>,
        conditions: Vec<Condition>,
    );
}

macro_rules! agent_status {
    ($($t:ty),*) => {$(
        impl AgentStatus for $t {
            fn conditions(&self) -> &[Condition] {
                &self.conditions
            }
            fn node_name(&self) -> Option<String> {
                self.node_name.clone()
            }
            fn set_common(&mut self, generation: Option<i64>, node_name: Option<String>, conditions: Vec<Condition>) {
                self.observed_generation = generation;
                self.node_name = node_name;
                self.conditions = conditions;
            }
        }
    )*};
}

agent_status!(
    VirtualMachineStorageStatus,
    VMInterfaceStatus,
    VMCloneStatus,
    IsoDownloadStatus
);

/// `existing` with the conditions of `mine` replaced or added by type.
pub fn merge(existing: &[Condition], mine: &[Condition]) -> Vec<Condition> {
    let mut out: Vec<Condition> = existing
        .iter()
        .filter(|c| !mine.iter().any(|m| m.type_ == c.type_))
        .cloned()
        .collect();
    out.extend(mine.iter().cloned());
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

/// Writes the agent's status fields and its `desired` conditions, only when something changed:
/// a reconcile that finds everything in place makes no API write.
pub async fn write_status<K, S>(
    api: &Api<K>,
    obj: &K,
    prev: &S,
    status: S,
    desired: &[Desired<'_>],
) -> Result<(), ReconcileError>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
    S: AgentStatus,
{
    let mine = conditions::compute(
        prev.conditions(),
        desired,
        obj.meta().generation,
        Timestamp::now(),
    );
    let mut next = status;
    next.set_common(
        obj.meta().generation,
        prev.node_name(),
        merge(prev.conditions(), &mine),
    );
    if changed(&next, prev, obj.meta().generation) {
        apply_status(api, obj, agent_status(&next, &mine)).await?;
    }
    Ok(())
}

/// Whether `next` differs from `prev` other than in the order of the conditions: the server keeps
/// them in the order they were first written (the controller's `Scheduled` often first), so
/// comparing lists would write every reconcile, and an old API server bumps the
/// resourceVersion of even a no-op apply, which wakes the object again: a write loop at rest.
fn changed<S: AgentStatus>(next: &S, prev: &S, generation: Option<i64>) -> bool {
    let mut conds = next.conditions().to_vec();
    conds.sort_by_key(|c| {
        prev.conditions()
            .iter()
            .position(|p| p.type_ == c.type_)
            .unwrap_or(usize::MAX)
    });
    let mut in_prev_order = next.clone();
    in_prev_order.set_common(generation, next.node_name(), conds);
    in_prev_order != *prev
}

/// What one reconcile of a device kind decided: its status fields, `Ready`, `RestartRequired`,
/// Events, and when to look again.
pub struct Outcome<S> {
    /// The agent's status fields.
    pub status: S,
    /// The Ready condition.
    pub ready: Desired<'static>,
    /// Why a restart is needed, if it is.
    pub restart: Option<String>,
    /// Events to publish.
    pub events: Vec<(EventType, &'static str, String)>,
    /// When to reconcile again.
    pub action: Action,
}

impl<S: Clone> Outcome<S> {
    /// `Ready=False` with `reason`, the status as it was.
    pub fn not_ready(prev: &S, reason: &'static str, message: String, action: Action) -> Self {
        Outcome {
            status: prev.clone(),
            ready: Desired::falsy(condition::READY, reason, message),
            restart: None,
            events: Vec::new(),
            action,
        }
    }
}

/// Condition type set while a change waits for the next boot.
pub const RESTART_REQUIRED: &str = "RestartRequired";
/// Ready reason while the guest has not released a device being detached.
pub const DETACH_PENDING: &str = "DetachPending";

/// Writes a device outcome: status, `Ready`, `RestartRequired`, and its Events.
pub async fn write_outcome<K, S>(
    api: &Api<K>,
    obj: &K,
    ctx: &Context,
    prev: &S,
    outcome: Outcome<S>,
) -> Result<Action, ReconcileError>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
    S: AgentStatus,
{
    let restart = match &outcome.restart {
        Some(msg) => Desired::truthy(RESTART_REQUIRED, "RestartRequired", msg.clone()),
        None => Desired::falsy(RESTART_REQUIRED, "NotRequired", "No restart is needed."),
    };
    let mut events = outcome.events;
    let new_failures = warnings(prev.conditions(), &outcome.ready, &restart);
    for (_, reason, _) in &new_failures {
        crate::metrics::get().error(&K::kind(&()), reason);
    }
    events.extend(new_failures);
    write_status(api, obj, prev, outcome.status, &[outcome.ready, restart]).await?;
    // Events are published off the reconcile: each is an API call, and the status above
    // already says what they say. Failures are logged, as before.
    if !events.is_empty() {
        let recorder = ctx.recorder.clone();
        let reference = obj.object_ref(&());
        tokio::spawn(async move {
            for (type_, reason, note) in events {
                publish_to(&recorder, &reference, type_, reason, note).await;
            }
        });
    }
    Ok(outcome.action)
}

/// Reasons that mean "waiting as asked", not a failure: no Warning Event for them.
const WAITING: &[&str] = &[DETACH_PENDING, "WaitingForDownload", "WaitingForRestart"];

/// A Warning Event for each failure that is new: `Ready` turning False with another reason than
/// before, or a restart becoming required. Repeated reconciles of the same failure publish
/// nothing, so `kubectl get events` shows each problem once.
fn warnings(
    before: &[Condition],
    ready: &Desired<'static>,
    restart: &Desired<'static>,
) -> Vec<(EventType, &'static str, String)> {
    let was = |type_: &str| before.iter().find(|c| c.type_ == type_);
    let mut out = Vec::new();
    let ready_changed =
        was(condition::READY).is_none_or(|c| c.status != "False" || c.reason != ready.reason);
    if !ready.status && ready_changed && !WAITING.contains(&ready.reason) {
        out.push((EventType::Warning, ready.reason, ready.message.clone()));
    }
    if restart.status && was(RESTART_REQUIRED).is_none_or(|c| c.status != "True") {
        out.push((
            EventType::Warning,
            RESTART_REQUIRED,
            restart.message.clone(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_order_of_conditions_on_the_server_is_no_change() {
        use crate::api::VirtualMachineStorageStatus;
        let c = |t: &str| Condition {
            type_: t.into(),
            status: "True".into(),
            reason: "R".into(),
            message: "m".into(),
            observed_generation: Some(1),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Timestamp::from_second(1).unwrap(),
            ),
        };
        let status = |conds: Vec<Condition>| VirtualMachineStorageStatus {
            observed_generation: Some(1),
            conditions: conds,
            ..Default::default()
        };
        let prev = status(vec![c("Scheduled"), c("Ready"), c("RestartRequired")]);
        let next = status(merge(&prev.conditions, &[c("Ready"), c("RestartRequired")]));
        assert_ne!(next, prev, "merge sorts by type");
        assert!(!changed(&next, &prev, Some(1)));
        let mut other = c("Ready");
        other.status = "False".into();
        let next = status(merge(&prev.conditions, &[other, c("RestartRequired")]));
        assert!(changed(&next, &prev, Some(1)));
        assert!(
            changed(&prev, &prev, Some(2)),
            "a new generation is a change"
        );
    }

    use super::*;

    #[test]
    fn each_distinct_note_has_its_own_event_action() {
        let a = event_action(
            "Updated",
            "Wrote spec.serial of sda into the definition of vm.",
        );
        let b = event_action(
            "Updated",
            "Wrote spec.shareable of sda into the definition of vm.",
        );
        assert_ne!(a, b);
        assert_eq!(
            a,
            event_action(
                "Updated",
                "Wrote spec.serial of sda into the definition of vm."
            )
        );
        assert!(a.starts_with("Updated-") && a.len() <= 128, "{a}");
    }

    fn cond(type_: &str, status: &str, reason: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Timestamp::now(),
            ),
            observed_generation: None,
        }
    }

    #[test]
    fn a_failure_is_announced_once() {
        let failed = Desired::falsy(condition::READY, "PathNotAllowed", "outside");
        let fine = Desired::falsy(RESTART_REQUIRED, "NotRequired", "");
        let reasons = |before: &[Condition], ready: &Desired<'static>, restart| {
            warnings(before, ready, restart)
                .into_iter()
                .map(|(_, r, _)| r)
                .collect::<Vec<_>>()
        };
        // New failure: one Warning; the same failure again: none.
        assert_eq!(reasons(&[], &failed, &fine), ["PathNotAllowed"]);
        let before = [cond("Ready", "False", "PathNotAllowed")];
        assert!(reasons(&before, &failed, &fine).is_empty());
        // Another failure after it, or after being Ready: a Warning again.
        let other = Desired::falsy(condition::READY, "SourceNotFound", "gone");
        assert_eq!(reasons(&before, &other, &fine), ["SourceNotFound"]);
        let ready = [cond("Ready", "True", "Attached")];
        assert_eq!(reasons(&ready, &failed, &fine), ["PathNotAllowed"]);
        // Waiting as asked is no failure; success is none either.
        let waiting = Desired::falsy(condition::READY, DETACH_PENDING, "guest");
        assert!(reasons(&ready, &waiting, &fine).is_empty());
        let ok = Desired::truthy(condition::READY, "Attached", "ok");
        assert!(reasons(&[], &ok, &fine).is_empty());
        // A restart that becomes required is announced once.
        let restart = Desired::truthy(RESTART_REQUIRED, RESTART_REQUIRED, "next boot");
        assert_eq!(reasons(&ready, &ok, &restart), [RESTART_REQUIRED]);
        let required = [cond(RESTART_REQUIRED, "True", RESTART_REQUIRED)];
        assert!(reasons(&required, &ok, &restart).is_empty());
    }
}
