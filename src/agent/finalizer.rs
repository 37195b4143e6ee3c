//! The agent's finalizer, following kube-runtime's finalizer contract (add before any change,
//! clean up on deletion, remove only after cleanup succeeded), with one addition: a cleanup can
//! stay pending (a detach the guest has not confirmed yet) and keeps the finalizer meanwhile.

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;

use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;

use super::context::{ReconcileError, object_name};

/// The agent's finalizer on every kind it reconciles.
pub const FINALIZER: &str = "virtplane.io/detach";

/// What the reconciler is asked to do.
pub enum Event<K> {
    /// Make the object's desired state real; the finalizer is in place.
    Apply(Arc<K>),
    /// The object is being deleted; undo what it made.
    Cleanup(Arc<K>),
}

/// Where a cleanup stands.
#[derive(Debug)]
pub enum Cleanup {
    /// Done: the finalizer is removed.
    Done,
    /// Not yet (a guest has not released a device): keep the finalizer and look again.
    Pending(Action),
}

/// Runs `reconcile` under the finalizer: adds it before `Apply`; on deletion runs `Cleanup` and
/// removes it once the cleanup is done. An object being deleted without the finalizer is left
/// alone (cleanup tolerates Apply never having run, so it is safe to skip).
pub async fn finalizer<K, F, Fut>(
    api: &Api<K>,
    obj: Arc<K>,
    reconcile: F,
) -> Result<Action, ReconcileError>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
    F: FnOnce(Event<K>) -> Fut,
    Fut: Future<Output = Result<Step, ReconcileError>>,
{
    let has = obj.finalizers().iter().any(|f| f == FINALIZER);
    if obj.meta().deletion_timestamp.is_some() {
        if !has {
            return Ok(Action::await_change());
        }
        return match reconcile(Event::Cleanup(obj.clone())).await? {
            Step::Cleanup(Cleanup::Done) => {
                remove(api, &*obj).await?;
                Ok(Action::await_change())
            }
            Step::Cleanup(Cleanup::Pending(action)) | Step::Applied(action) => Ok(action),
        };
    }
    if !has {
        add(api, &*obj).await?;
    }
    match reconcile(Event::Apply(obj)).await? {
        Step::Applied(action) | Step::Cleanup(Cleanup::Pending(action)) => Ok(action),
        Step::Cleanup(Cleanup::Done) => Ok(Action::await_change()),
    }
}

/// What one pass under the finalizer did.
#[derive(Debug)]
pub enum Step {
    /// An apply pass, and when to look again.
    Applied(Action),
    /// A cleanup pass.
    Cleanup(Cleanup),
}

/// Adds the finalizer, unless it is there already.
async fn add<K>(api: &Api<K>, obj: &K) -> Result<(), ReconcileError>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
{
    if obj.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    // No resourceVersion precondition: the controller's status write usually makes the cached
    // object stale, and appending to the list is safe whatever changed meanwhile.
    let patch = if obj.finalizers().is_empty() {
        json!([{ "op": "add", "path": "/metadata/finalizers", "value": [FINALIZER] }])
    } else {
        json!([{ "op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER }])
    };
    send(api, obj, patch, "add the finalizer to").await
}

/// Removes the finalizer; an object already gone is fine.
async fn remove<K>(api: &Api<K>, obj: &K) -> Result<(), ReconcileError>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let Some(index) = obj.finalizers().iter().position(|f| f == FINALIZER) else {
        return Ok(());
    };
    let patch = json!([{ "op": "test", "path": format!("/metadata/finalizers/{index}"), "value": FINALIZER },
                       { "op": "remove", "path": format!("/metadata/finalizers/{index}") }]);
    send(api, obj, patch, "remove the finalizer from").await
}

async fn send<K>(
    api: &Api<K>,
    obj: &K,
    patch: serde_json::Value,
    action: &'static str,
) -> Result<(), ReconcileError>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let patch: json_patch::Patch =
        serde_json::from_value(patch).map_err(|e| ReconcileError::Api {
            action: "build the finalizer patch for",
            object: object_name(obj),
            source: kube::Error::SerdeError(e),
        })?;
    match api
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::<()>::Json(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(ReconcileError::Api {
            action,
            object: object_name(obj),
            source,
        }),
    }
}
