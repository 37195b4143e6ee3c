//! Device changes shared by the device kinds (VirtualMachineStorage, VMInterface): hot-plug with
//! rollback, and the detach the guest must confirm.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use kube::Resource;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use serde::de::DeserializeOwned;

use super::context::{Context, ReconcileError};
use super::finalizer::Cleanup;
use super::status::{AgentStatus, DETACH_PENDING, Outcome, publish, write_outcome};
use crate::api::condition;
use crate::conditions::Desired;
use crate::libvirt::domain::DomainXml;
use crate::libvirt::facade::{Affect, DeviceChange, Domains};
use crate::libvirt::{ErrorKind, LibvirtError};

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

/// The domain a device object acts on: the one its device went to (recorded in `status.vm`),
/// even if `spec.vm` was edited since, else `spec.vm`.
pub fn domain_of(recorded: Option<&String>, spec_vm: &str) -> String {
    recorded.cloned().unwrap_or_else(|| spec_vm.to_string())
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
pub async fn detach<D: Domains>(
    virt: &D,
    detaches: &Detaches,
    vm: &str,
    alias: &str,
    find: fn(&DomainXml, &str) -> Option<String>,
) -> Result<Detach, LibvirtError> {
    let Some(view) = virt.domain(vm).await? else {
        forget(detaches, alias);
        return Ok(Detach::Done);
    };
    if view.persistent
        && let Some(xml) = find(&view.config, alias)
    {
        virt.change_device(vm, &xml, DeviceChange::Detach, Affect::Config)
            .await?;
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
        match virt
            .change_device(vm, &xml, DeviceChange::Detach, Affect::Live)
            .await
        {
            Ok(()) => {}
            Err(e) => match e.kind() {
                // "This type of disk cannot be hot unplugged": waiting for the guest is pointless.
                ErrorKind::Unsupported => return Ok(Detach::AtShutdown(e.to_string())),
                // An unplug already under way, or QEMU busy: the device is still in the live
                // XML, so the request stands; it is confirmed from the XML and sent again later.
                ErrorKind::Busy | ErrorKind::Refused => {
                    tracing::debug!(domain = vm, alias, error = %e, "unplug request not taken; waiting");
                }
                _ => return Err(e),
            },
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
    let still = virt
        .domain(vm)
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

/// What a hot-plug did.
#[derive(Debug)]
pub enum HotPlug {
    /// The device is in the running guest.
    Plugged,
    /// The running machine cannot take it now (a bus that cannot hot-plug, no free PCI slot):
    /// worth keeping in the definition for the next boot.
    Limit(LibvirtError),
    /// libvirt or QEMU refused the device itself (an image QEMU cannot open, or one another
    /// guest holds): nothing is worth keeping.
    Refused(LibvirtError),
}

/// Attaches `xml` to the running `vm`. A lost connection is no answer about the device: it is an
/// error, retried like any libvirt failure.
pub async fn attach_live<D: Domains>(
    virt: &D,
    vm: &str,
    xml: &str,
) -> Result<HotPlug, LibvirtError> {
    match virt
        .change_device(vm, xml, DeviceChange::Attach, Affect::Live)
        .await
    {
        Ok(()) => Ok(HotPlug::Plugged),
        Err(e) => match e.kind() {
            ErrorKind::Unsupported | ErrorKind::NoFreeSlot => Ok(HotPlug::Limit(e)),
            ErrorKind::Unreachable => Err(e),
            _ => Ok(HotPlug::Refused(e)),
        },
    }
}

/// Writes `xml` into the definition of `vm`. If libvirt refuses and the device was hot-plugged
/// just before (`plugged`), the hot-plug is taken back: a device that is not in the definition
/// is half-attached. `Err(message)` says what happened, for `AttachFailed`.
pub async fn attach_config<D: Domains>(
    virt: &D,
    vm: &str,
    xml: &str,
    plugged: bool,
    what: &str,
) -> Result<(), String> {
    let Err(e) = virt
        .change_device(vm, xml, DeviceChange::Attach, Affect::Config)
        .await
    else {
        return Ok(());
    };
    Err(take_back(virt, vm, xml, plugged, what, &e).await)
}

/// The message of a definition libvirt refused (`refused`) for a new device, after taking its
/// hot-plug (`live_xml`, when `plugged`) back out of the running guest.
pub async fn take_back<D: Domains>(
    virt: &D,
    vm: &str,
    live_xml: &str,
    plugged: bool,
    what: &str,
    refused: &LibvirtError,
) -> String {
    if !plugged {
        return format!(
            "libvirt refused the {what}: {refused}. Nothing was changed; fix the spec."
        );
    }
    match virt
        .change_device(vm, live_xml, DeviceChange::Detach, Affect::Live)
        .await
    {
        Ok(()) => format!(
            "libvirt refused the {what} in the definition: {refused}. The hot-plug was unplugged again; fix the spec."
        ),
        Err(e) => format!(
            "libvirt refused the {what} in the definition ({refused}) after it was hot-plugged, and unplugging it again failed ({e}); detach it from {vm} by hand."
        ),
    }
}

/// The outcome of a detach the guest has not confirmed yet (pure): `Ready=False DetachPending`
/// saying why, and when to look again. `refused` is `Some(news)` when the guest refused the
/// removal (DEVICE_REMOVAL_FAILED), `news` when that was not announced before. `None` when the
/// detach is done.
pub fn pending_outcome<S>(
    pending: S,
    what: &str,
    vm: &str,
    detach: &Detach,
    refused: Option<bool>,
) -> Option<Outcome<S>> {
    match detach {
        Detach::Done => None,
        Detach::AtShutdown(why) => Some(Outcome {
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
        }),
        Detach::Pending(after) => {
            let mut message = format!(
                "The guest has not acknowledged the unplug of {what} from {vm}; it was removed from the definition and the agent asks the guest again until it releases the device, or until the domain is shut off."
            );
            let mut events = Vec::new();
            if let Some(news) = refused {
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
            Some(Outcome {
                status: pending,
                ready: Desired::falsy(condition::READY, DETACH_PENDING, message),
                restart: None,
                events,
                action: Action::requeue(*after),
            })
        }
    }
}

/// The cleanup of a device kind: detaches the device with `alias` (called `what` in messages)
/// and lets the object go once the guest confirmed; meanwhile `Ready=False DetachPending`.
/// `guard`, the domain's lock if the caller passes it, is released before the `Detached` Event.
#[allow(clippy::too_many_arguments)]
pub async fn finish_detach<K, S>(
    api: &Api<K>,
    obj: &K,
    ctx: &Context,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    vm: &str,
    alias: &str,
    what: &str,
    was_attached: bool,
    find: fn(&DomainXml, &str) -> Option<String>,
    prev: &S,
    pending: S,
) -> Result<Cleanup, ReconcileError>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
    S: AgentStatus,
{
    let state = detach(&ctx.libvirt, &ctx.detaches, vm, alias, find).await?;
    let refused = match state {
        Detach::Pending(_) => ctx.removal_failures.check(alias),
        _ => None,
    };
    match pending_outcome(pending, what, vm, &state, refused) {
        None => {
            // The domain's other objects need not wait for this one's Event.
            drop(guard);
            detached(obj, ctx, vm, alias, what, was_attached).await;
            Ok(Cleanup::Done)
        }
        Some(outcome) => Ok(Cleanup::Pending(
            write_outcome(api, obj, ctx, prev, outcome).await?,
        )),
    }
}

/// The end of a detach: the device with `alias` (called `what`) is gone from `vm`; announces it
/// with a `Detached` Event if it was attached. Call without holding the domain's lock.
pub async fn detached<K>(
    obj: &K,
    ctx: &Context,
    vm: &str,
    alias: &str,
    what: &str,
    was_attached: bool,
) where
    K: Resource<DynamicType = ()>,
{
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
