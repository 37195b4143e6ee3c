//! A reconcile whose libvirt call did not return in time (`--libvirt-call-timeout`) is reported
//! on its object, whatever the kind: `Ready=False` with reason [`LIBVIRT_TIMEOUT`] and a message
//! naming the call, plus a Warning Event when it is new. The reconcile is then retried with the
//! object's back-off, and its next outcome replaces the condition.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::context::{Context, ReconcileError};
use super::status;
use crate::api::condition;
use crate::conditions::{self, Desired};
use crate::libvirt::{ErrorKind, LibvirtError};

/// Ready reason of an object whose reconcile gave up on a libvirt call.
pub const LIBVIRT_TIMEOUT: &str = "LibvirtTimeout";

/// The `Ready` condition a failed reconcile reports: only a libvirt timeout gets one here (other
/// failures are transient, or each kind's plan reports them).
pub fn ready(err: &ReconcileError) -> Option<Desired<'static>> {
    let ReconcileError::Libvirt(e) = err else {
        return None;
    };
    if e.kind() != ErrorKind::Timeout {
        return None;
    }
    let message = match e {
        LibvirtError::Timeout { action, after } => format!(
            "libvirt did not answer within {}s to \"{action}\" (a hung storage pool or QEMU monitor on the node?). The agent retries by itself; if this persists, check libvirtd and the storage of the node.",
            after.as_secs()
        ),
        other => format!(
            "{other}. The agent retries by itself; if this persists, check libvirtd and the storage of the node."
        ),
    };
    Some(Desired::falsy(condition::READY, LIBVIRT_TIMEOUT, message))
}

/// The agent's part of `status` (an object's status as JSON) with `Ready` replaced by `ready`:
/// the agent's other fields and conditions as they are, without the controller's `nodeName`
/// and `Scheduled` (so a server-side apply of it changes nothing but `Ready`). Pure.
pub fn with_ready(
    status: Option<Value>,
    ready: &Desired<'_>,
    generation: Option<i64>,
    now: Timestamp,
) -> Value {
    let mut status = match status {
        Some(Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    let existing: Vec<Condition> = status
        .get("conditions")
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default();
    let agents: Vec<Condition> = existing
        .into_iter()
        .filter(|c| c.type_ != condition::SCHEDULED)
        .collect();
    let new = conditions::compute(&agents, std::slice::from_ref(ready), generation, now);
    status.remove("nodeName");
    status.insert("conditions".into(), json!(status::merge(&agents, &new)));
    Value::Object(status)
}

/// Reports `err` on `obj` when it is a libvirt timeout; a failure to report is logged (the
/// reconcile is retried anyway).
pub async fn report<K>(obj: &K, err: &ReconcileError, ctx: &Context)
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + Debug,
{
    let Some(ready) = ready(err) else {
        return;
    };
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    // The status as it is now, not as the cache had it: only Ready changes.
    let fresh = match api.get_opt(&obj.name_any()).await {
        Ok(Some(o)) => o,
        Ok(None) => return,
        Err(error) => {
            tracing::warn!(%error, "failed to read the object to report a libvirt timeout");
            return;
        }
    };
    let current = serde_json::to_value(&fresh)
        .ok()
        .and_then(|v| v.get("status").cloned());
    let was = current
        .as_ref()
        .and_then(|s| s.get("conditions"))
        .and_then(|c| serde_json::from_value::<Vec<Condition>>(c.clone()).ok())
        .and_then(|c| conditions::find(&c, condition::READY).map(|r| r.reason.clone()));
    let body = with_ready(current, &ready, fresh.meta().generation, Timestamp::now());
    if let Err(error) = status::apply_status(&api, &fresh, body).await {
        tracing::warn!(%error, "failed to report a libvirt timeout");
        return;
    }
    if was.as_deref() != Some(LIBVIRT_TIMEOUT) {
        crate::metrics::get().error(&K::kind(&()), LIBVIRT_TIMEOUT);
        status::publish(
            &ctx.recorder,
            &fresh,
            EventType::Warning,
            LIBVIRT_TIMEOUT,
            ready.message,
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::libvirt::facade::Domains;
    use crate::libvirt::fake::FakeLibvirt;

    #[tokio::test]
    async fn a_timed_out_call_becomes_a_ready_condition_naming_it() {
        let fake = FakeLibvirt::default();
        fake.fail_next("read the domain", None, ErrorKind::Timeout);
        let err = ReconcileError::from(fake.domain("web").await.unwrap_err());
        let r = ready(&err).unwrap();
        assert!(!r.status);
        assert_eq!(r.reason, LIBVIRT_TIMEOUT);
        assert!(r.message.contains("retries by itself"), "{}", r.message);

        let real = ReconcileError::from(LibvirtError::Timeout {
            action: "look up domain web".into(),
            after: Duration::from_secs(7),
        });
        let m = ready(&real).unwrap().message;
        assert!(
            m.starts_with("libvirt did not answer within 7s to \"look up domain web\""),
            "{m}"
        );

        // Other failures are not reported here.
        fake.fail_next("read the domain", None, ErrorKind::Unreachable);
        let other = ReconcileError::from(fake.domain("web").await.unwrap_err());
        assert!(ready(&other).is_none());
    }

    #[test]
    fn only_ready_changes_and_the_controllers_part_is_left_out() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let cond = |type_: &str, status: &str, reason: &str| {
            json!({"type": type_, "status": status, "reason": reason, "message": "m",
                   "lastTransitionTime": "1970-01-01T00:16:40Z"})
        };
        let status = json!({
            "nodeName": "n1",
            "phase": "Copying",
            "conditions": [
                cond("Scheduled", "True", "Bound"),
                cond("Ready", "False", "Copying"),
                cond("Progressing", "True", "Copying"),
            ],
        });
        let r = Desired::falsy(condition::READY, LIBVIRT_TIMEOUT, "slow");
        let out = with_ready(Some(status), &r, Some(3), Timestamp::now());
        assert_eq!(out["phase"], "Copying");
        assert!(out.get("nodeName").is_none());
        let conds: Vec<Condition> = serde_json::from_value(out["conditions"].clone()).unwrap();
        let types: Vec<_> = conds.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Progressing", "Ready"]);
        let ready = conditions::find(&conds, condition::READY).unwrap();
        assert_eq!(
            (ready.reason.as_str(), ready.message.as_str()),
            (LIBVIRT_TIMEOUT, "slow")
        );
        // Still False: the transition time is kept.
        assert_eq!(ready.last_transition_time.0, t0);
        assert_eq!(ready.observed_generation, Some(3));
        // An object without a status yet.
        let out = with_ready(None, &r, None, Timestamp::now());
        assert_eq!(out["conditions"][0]["reason"], LIBVIRT_TIMEOUT);
    }
}
