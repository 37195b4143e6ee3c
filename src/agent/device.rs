//! Machinery shared by the device kinds (VirtualMachineStorage, VMInterface): per-domain locks,
//! the detach finalizer, confirmed detach, status writes and Kubernetes Events.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;

use super::FIELD_MANAGER;
use crate::libvirt::domain::{self, DomainView};
use crate::libvirt::{Libvirt, LibvirtError};

/// Finalizer that holds a device object until its device is gone from the domain.
pub const FINALIZER: &str = "virtplane.io/detach";

/// Errors of device reconcilers.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A libvirt call failed (transient: retried with back-off).
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    /// An API call failed.
    #[error("failed to {action} {object}: {source}")]
    Api {
        /// What was being done.
        action: &'static str,
        /// The object.
        object: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

impl DeviceError {
    /// A short class of the error, for metrics.
    pub fn class(&self) -> &'static str {
        match self {
            Self::Libvirt(_) => "libvirt",
            Self::Api { .. } => "api",
        }
    }
}

/// Serialises device changes per domain, so two objects never pick the same target or slot.
#[derive(Default)]
pub struct DomainLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl DomainLocks {
    /// The lock of `domain`.
    pub fn get(&self, domain: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(domain.to_string()).or_default().clone()
    }
}

/// In-flight detaches, keyed by alias: when the unplug was last requested and how often.
#[derive(Default)]
pub struct Detaches(Mutex<HashMap<String, DetachState>>);

#[derive(Clone, Copy, Debug)]
struct DetachState {
    last_request: Instant,
    requests: u32,
}

/// A removal the guest refused (DEVICE_REMOVAL_FAILED), keyed by alias.
#[derive(Default)]
pub struct RemovalFailures(Mutex<HashMap<String, String>>);

impl RemovalFailures {
    /// Records that the guest refused to release `alias` in `domain`.
    pub fn record(&self, alias: &str, domain: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(alias.to_string(), domain.to_string());
    }

    /// Takes the refusal recorded for `alias`, if any.
    pub fn take(&self, alias: &str) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(alias)
    }
}

/// How long to wait for the guest before asking it again to release a device; doubles per request.
fn reissue_after(requests: u32) -> Duration {
    Duration::from_secs(2u64.saturating_pow(requests.min(5))).min(Duration::from_secs(30))
}

/// Where a detach stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detach {
    /// The device is gone from the definition and the running guest.
    Done,
    /// The guest has not released it yet; check again after the duration.
    Pending(Duration),
}

/// Removes the device with `alias` (located with `find`) from the persistent definition at once
/// and asks the running guest to release it; confirms removal from the live XML. Re-sends the
/// unplug when the guest has not acted on it (a request sent during boot is lost).
pub async fn detach(
    libvirt: &Libvirt,
    detaches: &Detaches,
    vm: &str,
    alias: &str,
    find: fn(&domain::DomainXml, &str) -> Option<String>,
) -> Result<Detach, DeviceError> {
    let name = vm.to_string();
    let Some(view) = libvirt
        .call("read the domain", move |c| domain::read_domain(c, &name))
        .await?
    else {
        forget(detaches, alias);
        return Ok(Detach::Done);
    };
    if view.persistent
        && let Some(xml) = find(&view.config, alias)
    {
        detach_xml(libvirt, vm, xml, false, true).await?;
    }
    let live = view.live.as_ref().and_then(|l| find(l, alias));
    let Some(xml) = live else {
        forget(detaches, alias);
        return Ok(Detach::Done);
    };
    let now = Instant::now();
    let state = detaches
        .0
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(alias)
        .copied();
    let due = state.is_none_or(|s| now.duration_since(s.last_request) >= reissue_after(s.requests));
    let requests = state.map_or(0, |s| s.requests);
    if due {
        match detach_xml(libvirt, vm, xml, true, false).await {
            Ok(()) => {}
            // "already in the process of unplug" / guest busy: the request stands, keep waiting.
            Err(DeviceError::Libvirt(LibvirtError::Call { source, .. }))
                if source.message().contains("unplug") || source.message().contains("busy") => {}
            Err(e) => return Err(e),
        }
        let mut map = detaches.0.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(
            alias.to_string(),
            DetachState {
                last_request: now,
                requests: requests + 1,
            },
        );
        crate::metrics::get()
            .detach_pending
            .set(i64::try_from(map.len()).unwrap_or(i64::MAX));
        drop(map);
    }
    // The removal usually completes within a fraction of a second; look once more before waiting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let name = vm.to_string();
    let still = libvirt
        .call("read the domain", move |c| domain::read_domain(c, &name))
        .await?
        .and_then(|v| v.live)
        .is_some_and(|l| find(&l, alias).is_some());
    if still {
        Ok(Detach::Pending(reissue_after(requests + 1)))
    } else {
        forget(detaches, alias);
        Ok(Detach::Done)
    }
}

fn forget(detaches: &Detaches, alias: &str) {
    detaches
        .0
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(alias);
}

async fn detach_xml(
    libvirt: &Libvirt,
    vm: &str,
    xml: String,
    live: bool,
    config: bool,
) -> Result<(), DeviceError> {
    let name = vm.to_string();
    let what = if live {
        "ask the guest to release a device"
    } else {
        "remove a device from the definition"
    };
    libvirt
        .call(what, move |c| {
            let dom = c.lookup_domain_by_name(&name)?;
            dom.detach_device_flags(&xml, domain::affect(live, config))
        })
        .await?;
    Ok(())
}

/// Reads a domain; `None` when it does not exist.
pub async fn read(libvirt: &Libvirt, vm: &str) -> Result<Option<DomainView>, DeviceError> {
    let name = vm.to_string();
    Ok(libvirt
        .call("read the domain", move |c| domain::read_domain(c, &name))
        .await?)
}

/// Attaches (or, with `update`, updates) device XML on the live and/or persistent definition.
pub async fn change(
    libvirt: &Libvirt,
    vm: &str,
    xml: String,
    live: bool,
    config: bool,
    update: bool,
) -> Result<(), LibvirtError> {
    let name = vm.to_string();
    let action = if update {
        "update a device"
    } else {
        "attach a device"
    };
    libvirt
        .call(action, move |c| {
            let dom = c.lookup_domain_by_name(&name)?;
            let flags = domain::affect(live, config);
            if update {
                dom.update_device_flags(&xml, flags | virt::sys::VIR_DOMAIN_DEVICE_MODIFY_FORCE)
            } else {
                dom.attach_device_flags(&xml, flags)
            }
        })
        .await
}

fn object_name<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
}

/// Adds the detach finalizer if missing.
pub async fn add_finalizer<K>(api: &Api<K>, obj: &K) -> Result<(), DeviceError>
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
    let patch: json_patch::Patch = serde_json::from_value(patch).map_err(|e| DeviceError::Api {
        action: "build the finalizer patch for",
        object: object_name(obj),
        source: kube::Error::SerdeError(e),
    })?;
    api.patch(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::<()>::Json(patch),
    )
    .await
    .map_err(|source| DeviceError::Api {
        action: "add the finalizer to",
        object: object_name(obj),
        source,
    })?;
    Ok(())
}

/// Removes the detach finalizer.
pub async fn remove_finalizer<K>(api: &Api<K>, obj: &K) -> Result<(), DeviceError>
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
    let patch: json_patch::Patch = serde_json::from_value(patch).map_err(|e| DeviceError::Api {
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
        Err(source) => Err(DeviceError::Api {
            action: "remove the finalizer from",
            object: object_name(obj),
            source,
        }),
    }
}

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
) -> Result<(), DeviceError>
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
        Err(source) => Err(DeviceError::Api {
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
    let ev = KubeEvent {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: reason.to_string(),
        secondary: None,
    };
    if let Err(err) = recorder.publish(&ev, &obj.object_ref(&())).await {
        tracing::warn!(error = %err, reason, "failed to publish event");
    }
}

/// Detaches device XML from the live and/or persistent definition without waiting.
pub async fn change_detach(
    libvirt: &Libvirt,
    vm: &str,
    xml: String,
    live: bool,
    config: bool,
) -> Result<(), DeviceError> {
    detach_xml(libvirt, vm, xml, live, config).await
}
