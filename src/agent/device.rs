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

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;

use super::{Context, FIELD_MANAGER};
use crate::api::{
    IsoDownloadStatus, VMCloneStatus, VMInterfaceStatus, VirtualMachineStorageStatus, condition,
};
use crate::conditions::{self, Desired};
use crate::libvirt::domain::{self, DomainView};
use crate::libvirt::{Libvirt, LibvirtError};
use virt::error::ErrorNumber;

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
pub struct RemovalFailures(Mutex<HashMap<String, Refusal>>);

/// A guest's refusal to release a device, and whether its Event was published.
struct Refusal {
    announced: bool,
}

impl RemovalFailures {
    /// Records that the guest refused to release `alias`.
    pub fn record(&self, alias: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(alias.to_string(), Refusal { announced: false });
    }

    /// Whether the guest refused to release `alias` (it stays said until the detach ends), and
    /// whether that is news (not announced before; it is from now on).
    fn check(&self, alias: &str) -> Option<bool> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let refusal = map.get_mut(alias)?;
        let news = !refusal.announced;
        refusal.announced = true;
        Some(news)
    }

    /// Forgets `alias` once its detach ended.
    fn clear(&self, alias: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(alias);
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
    /// The device cannot be unplugged from a running guest (libvirt's reason); it is released
    /// when the domain shuts off.
    AtShutdown(String),
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
        change(libvirt, vm, xml, false, true, Op::Detach).await?;
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
        match change(libvirt, vm, xml, true, false, Op::Detach).await {
            Ok(()) => {}
            // "This type of disk cannot be hot unplugged": waiting for the guest is pointless.
            Err(e) if e.code() == Some(ErrorNumber::OperationUnsupported) => {
                return Ok(Detach::AtShutdown(e.to_string()));
            }
            // "already in the process of unplug" / guest busy: the request stands, keep waiting.
            Err(LibvirtError::Call { source, .. })
                if source.message().contains("unplug") || source.message().contains("busy") => {}
            Err(e) => return Err(e.into()),
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

/// Reads a domain; `None` when it does not exist.
pub async fn read(libvirt: &Libvirt, vm: &str) -> Result<Option<DomainView>, DeviceError> {
    let name = vm.to_string();
    Ok(libvirt
        .call("read the domain", move |c| domain::read_domain(c, &name))
        .await?)
}

/// What [`change`] does with device XML.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Attach a new device.
    Attach,
    /// Update a device in place (media, link state), forcing a locked tray.
    Update,
    /// Detach a device (from a running guest: a request the guest must answer).
    Detach,
}

/// Attaches, updates or detaches device XML on the live and/or persistent definition.
pub async fn change(
    libvirt: &Libvirt,
    vm: &str,
    xml: String,
    live: bool,
    config: bool,
    op: Op,
) -> Result<(), LibvirtError> {
    let name = vm.to_string();
    let action = match (op, live) {
        (Op::Attach, _) => "attach a device",
        (Op::Update, _) => "update a device",
        (Op::Detach, true) => "ask the guest to release a device",
        (Op::Detach, false) => "remove a device from the definition",
    };
    libvirt
        .call(action, move |c| {
            let dom = c.lookup_domain_by_name(&name)?;
            let flags = domain::affect(live, config);
            match op {
                Op::Attach => dom.attach_device_flags(&xml, flags),
                Op::Update => {
                    dom.update_device_flags(&xml, flags | virt::sys::VIR_DOMAIN_DEVICE_MODIFY_FORCE)
                }
                Op::Detach => dom.detach_device_flags(&xml, flags),
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
) -> Result<(), DeviceError>
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
    if next != *prev {
        apply_status(api, obj, agent_status(&next, &mine)).await?;
    }
    Ok(())
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
) -> Result<Action, DeviceError>
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
    for (type_, reason, note) in events {
        publish(&ctx.recorder, obj, type_, reason, note).await;
    }
    Ok(outcome.action)
}

/// Whether a failed hot-plug hit a limit of the running machine (no free PCI slot, a bus or
/// device that cannot be hot-plugged) rather than a problem with the device itself (an image
/// QEMU cannot open or that another guest has locked). Only the former is worth keeping in the
/// definition for the next boot.
pub fn hotplug_limit(err: &LibvirtError) -> bool {
    if err.code() == Some(ErrorNumber::OperationUnsupported) {
        return true;
    }
    let msg = err.to_string().to_lowercase();
    ["pci", "slot", "hotplug", "hot-plug", "hot plug"]
        .iter()
        .any(|k| msg.contains(k))
}

/// Attaches `xml` to the running `vm`. `Ok(Ok(None))`: plugged; `Ok(Ok(Some(error)))`: a
/// [`hotplug_limit`], worth keeping in the definition for the next boot; `Ok(Err(message))`: the
/// guest refused the device itself.
pub async fn attach_live(
    libvirt: &Libvirt,
    vm: &str,
    xml: &str,
) -> Result<Result<Option<LibvirtError>, String>, DeviceError> {
    match change(libvirt, vm, xml.to_string(), true, false, Op::Attach).await {
        Ok(()) => Ok(Ok(None)),
        Err(e) if hotplug_limit(&e) => Ok(Ok(Some(e))),
        // A lost connection is no answer about the device: retried like any libvirt failure.
        Err(e) if matches!(e.code(), Some(ErrorNumber::Rpc | ErrorNumber::NoConnect)) => {
            Err(e.into())
        }
        Err(LibvirtError::Call { source, .. }) => Ok(Err(source.message().to_string())),
        Err(e) => Err(e.into()),
    }
}

/// Writes `xml` into the definition of `vm`. If libvirt refuses and the device was hot-plugged
/// just before (`plugged`), the hot-plug is taken back: a device that is not in the definition
/// is half-attached. `Err(message)` says what happened, for `AttachFailed`.
pub async fn attach_config(
    libvirt: &Libvirt,
    vm: &str,
    xml: &str,
    plugged: bool,
    what: &str,
) -> Result<(), String> {
    let Err(e) = change(libvirt, vm, xml.to_string(), false, true, Op::Attach).await else {
        return Ok(());
    };
    if !plugged {
        return Err(format!(
            "libvirt refused the {what}: {e}. Nothing was changed; fix the spec."
        ));
    }
    Err(
        match change(libvirt, vm, xml.to_string(), true, false, Op::Detach).await {
            Ok(()) => format!(
                "libvirt refused the {what} in the definition: {e}. The hot-plug was unplugged again; fix the spec."
            ),
            Err(e2) => format!(
                "libvirt refused the {what} in the definition ({e}) after it was hot-plugged, and unplugging it again failed ({e2}); detach it from {vm} by hand."
            ),
        },
    )
}

/// Reasons that mean "waiting as asked", not a failure: no Warning Event for them.
const WAITING: &[&str] = &[DETACH_PENDING, "WaitingForDownload"];

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

/// The finalizer of a device kind: detaches the device with `alias` (called `what` in messages)
/// and releases the object once the guest confirmed; meanwhile `Ready=False DetachPending`.
#[allow(clippy::too_many_arguments)]
pub async fn finish_detach<K, S>(
    api: &Api<K>,
    obj: &K,
    ctx: &Context,
    vm: &str,
    alias: &str,
    what: &str,
    was_attached: bool,
    find: fn(&domain::DomainXml, &str) -> Option<String>,
    prev: &S,
    pending: S,
) -> Result<Action, DeviceError>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
    S: AgentStatus,
{
    match detach(&ctx.libvirt, &ctx.detaches, vm, alias, find).await? {
        Detach::Done => {
            ctx.removal_failures.clear(alias);
            if was_attached {
                publish(
                    &ctx.recorder,
                    obj,
                    EventType::Normal,
                    "Detached",
                    format!("Detached {what} from {vm}."),
                )
                .await;
            }
            remove_finalizer(api, obj).await?;
            Ok(Action::await_change())
        }
        Detach::AtShutdown(why) => {
            let outcome = Outcome {
                status: pending,
                ready: Desired::falsy(
                    condition::READY,
                    DETACH_PENDING,
                    format!(
                        "{what} cannot be unplugged from the running {vm} ({why}). It was removed from the definition and is released when {vm} shuts off; the object stays until then."
                    ),
                ),
                restart: Some(format!(
                    "{what} leaves {vm} at its next shutdown; it cannot be hot-unplugged."
                )),
                events: Vec::new(),
                // The domain's stop event wakes the object.
                action: Action::requeue(Duration::from_secs(600)),
            };
            write_outcome(api, obj, ctx, prev, outcome).await
        }
        Detach::Pending(after) => {
            let mut message = format!(
                "The guest has not acknowledged the unplug of {what} from {vm}; it was removed from the definition and the agent asks the guest again until it releases the device, or until the domain is shut off."
            );
            let mut events = Vec::new();
            if let Some(news) = ctx.removal_failures.check(alias) {
                message = format!(
                    "The guest refused to release {what} (DEVICE_REMOVAL_FAILED). {message}"
                );
                if news {
                    events.push((
                        EventType::Warning,
                        "DetachRefused",
                        format!("The guest refused to release {what}."),
                    ));
                }
            }
            let outcome = Outcome {
                status: pending,
                ready: Desired::falsy(condition::READY, DETACH_PENDING, message),
                restart: None,
                events,
                action: Action::requeue(after),
            };
            write_outcome(api, obj, ctx, prev, outcome).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_refused_detach_stays_said_and_is_announced_once() {
        let r = RemovalFailures::default();
        assert_eq!(r.check("ua-x"), None);
        r.record("ua-x");
        assert_eq!(r.check("ua-x"), Some(true), "news the first time");
        assert_eq!(r.check("ua-x"), Some(false), "still refused, not news");
        r.clear("ua-x");
        assert_eq!(r.check("ua-x"), None);
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
