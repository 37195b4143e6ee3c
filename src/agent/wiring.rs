//! Generic wiring of the agent's controllers: one watch per kind (selected by this node's label,
//! trimmed of managedFields, feeding the kind's domain index), libvirt events and job progress as
//! triggers, per-object back-off, metrics, and readiness once the watch has synced.

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::NamespaceResourceScope;
use kube::api::Api;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::context::{Context, ReconcileError};
use super::index::Index;
use crate::api::{NODE_LABEL, condition};
use crate::http::Gate;
use crate::libvirt::domain::DomainView;
use crate::libvirt::facade::Domains;
use crate::libvirt::{DomainEvent, Event, Libvirt};
use crate::shutdown::{self, Shutdown};

/// A kind the agent reconciles.
pub trait AgentKind:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + serde::Serialize
    + Debug
    + Send
    + Sync
    + 'static
{
    /// The domains whose libvirt events concern this object.
    fn domains(&self) -> Vec<String>;

    /// Whether the object waits for something a storage pool or network event may bring.
    fn waiting(&self) -> bool;

    /// The domain and alias of the device this object, being deleted, takes out of a domain
    /// definition in a batch (`batch`); queued as soon as the watch shows the deletion, so a
    /// domain's devices deleted together leave in one write.
    fn leaving(&self) -> Option<(String, String)> {
        None
    }

    /// The key of this object's record in [`Settled`](super::settled::Settled), when an event of
    /// its domain may spare it a reconcile (it is Ready and not being deleted); `None`: every
    /// event of its domains wakes it.
    fn settled_key(&self) -> Option<String> {
        None
    }

    /// A fingerprint of what this object's outcome depends on in its domain's `view`.
    fn fingerprint(&self, _view: &DomainView) -> u64 {
        0
    }
}

/// Whether a `Ready` condition is anything but True.
pub fn not_ready(conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> bool {
    !conditions
        .iter()
        .any(|c| c.type_ == condition::READY && c.status == "True")
}

/// The controller of kind `K` on this node, with its domain index. The caller adds triggers of
/// its own and then [`drive`]s it.
pub fn controller<K: AgentKind>(
    client: &kube::Client,
    node: &str,
    ctx: &Arc<Context>,
) -> (Controller<K>, reflector::Store<K>, Arc<Index<K>>) {
    let selector = format!("{NODE_LABEL}={node}");
    let (reader, writer) = reflector::store();
    let index = Index::new(K::domains);
    let stream = {
        let index = index.clone();
        let ctx = ctx.clone();
        watcher(
            Api::<K>::all(client.clone()),
            watcher::Config::default().labels(&selector),
        )
        .default_backoff()
        // Only the agent's own view matters: the field ownership records are dead weight.
        .modify(|o: &mut K| o.managed_fields_mut().clear())
        .inspect_ok(move |ev| {
            index.apply(ev);
            if let watcher::Event::Apply(o) | watcher::Event::InitApply(o) = ev
                && let Some((vm, alias)) = o.leaving()
            {
                ctx.definition_batches.enqueue(&vm, &alias);
            }
        })
        .reflect(writer)
        .applied_objects()
    };
    (
        Controller::for_stream(stream, reader.clone())
            .with_config(controller::Config::default().concurrency(RECONCILES_IN_FLIGHT)),
        reader,
        index,
    )
}

/// Reconciles of one kind in flight at once. libvirt takes [`MAX_CONCURRENT_CALLS`] calls at a
/// time and a domain one reconcile at a time, so more would only queue, each holding what it has
/// read so far. Unbounded, a burst of a thousand objects started a thousand reconciles at once: the
/// agent's peak RSS was 82 MiB in the scale benchmark (loaded), 58 MiB with this bound.
///
/// [`MAX_CONCURRENT_CALLS`]: crate::libvirt::MAX_CONCURRENT_CALLS
pub const RECONCILES_IN_FLIGHT: u16 = 32;

/// Runs `ctrl` with `reconcile` until shutdown: libvirt events wake the objects of a domain (and
/// the waiting ones on pool and network events, and all after a reconnect); a change of a
/// namespace's grants wakes its objects, whose plans check the grants again; the gate opens once
/// the watch has synced.
#[allow(clippy::too_many_arguments)]
pub async fn drive<K, Fut>(
    ctrl: Controller<K>,
    store: reflector::Store<K>,
    index: Arc<Index<K>>,
    libvirt: &Libvirt,
    reconcile: fn(Arc<K>, Arc<Context>) -> Fut,
    ctx: Arc<Context>,
    synced: Gate,
    shutdown: Shutdown,
) where
    K: AgentKind,
    Fut: Future<Output = Result<Action, ReconcileError>> + Send + 'static,
{
    let triggers = domain_triggers(libvirt, store.clone(), index, ctx.clone());
    let regranted = grant_changes(&ctx.grants, store.clone());
    let run = ctrl
        .reconcile_on(triggers)
        .reconcile_on(regranted)
        .graceful_shutdown_on(shutdown::wait(shutdown))
        .run(move |o, c| measured(o, c, reconcile), error_policy, ctx)
        .for_each(|_| futures::future::ready(()));
    let ready = async move {
        if store.wait_until_ready().await.is_ok() {
            synced.open();
        }
    };
    tokio::join!(run, ready);
}

fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    err: &ReconcileError,
    ctx: Arc<Context>,
) -> Action {
    let after = ctx.backoff.failed(&*obj);
    tracing::warn!(object = %obj.name_any(), error = %err, retry_in = ?after, "reconcile failed");
    Action::requeue(after)
}

/// Runs a reconcile, records it in the metrics, reports a libvirt timeout on the object (see
/// [`super::timeout`]) and resets the object's back-off on success.
fn measured<K, Fut>(
    obj: Arc<K>,
    ctx: Arc<Context>,
    reconcile: fn(Arc<K>, Arc<Context>) -> Fut,
) -> impl Future<Output = Result<Action, ReconcileError>> + Send + 'static
where
    K: AgentKind,
    Fut: Future<Output = Result<Action, ReconcileError>> + Send + 'static,
{
    // Logged before anything else looks at the object: what an agent receives is visible.
    tracing::debug!(
        kind = %K::kind(&()),
        object = %format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any()),
        "received",
    );
    // The watch selects this node's objects; one rebound elsewhere since is not ours.
    let ours = obj.labels().get(NODE_LABEL) == Some(&ctx.node);
    let fut = ours.then(|| reconcile(obj.clone(), ctx.clone()));
    async move {
        let Some(fut) = fut else {
            return Ok(Action::await_change());
        };
        let start = std::time::Instant::now();
        let result = fut.await;
        crate::metrics::get().reconciled(
            &K::kind(&()),
            start,
            result.as_ref().err().map(ReconcileError::class),
        );
        match &result {
            Ok(_) => ctx.backoff.succeeded(&*obj),
            Err(err) => super::timeout::report(&*obj, err, &ctx).await,
        }
        result
    }
}

/// libvirt's events as a stream; a lagging receiver yields `Connected` (resync everything).
pub fn libvirt_events(libvirt: &Libvirt) -> impl Stream<Item = Event> + Send + 'static {
    futures::stream::unfold(libvirt.subscribe(), |mut rx| async move {
        match rx.recv().await {
            Ok(ev) => Some((ev, rx)),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                Some((Event::Connected, rx))
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
        }
    })
}

/// Wakes the objects of a domain when libvirt reports something about it (device removed,
/// started, stopped, undefined...) unless their part of it is as their last settled reconcile
/// saw it ([`super::settled`]), the objects that are waiting when a storage pool or network
/// changes (the one they lack may have appeared), and every object after a reconnect.
fn domain_triggers<K: AgentKind>(
    libvirt: &Libvirt,
    store: reflector::Store<K>,
    index: Arc<Index<K>>,
    ctx: Arc<Context>,
) -> impl Stream<Item = ObjectRef<K>> + Send + 'static {
    libvirt_events(libvirt)
        .map(move |ev| {
            let (store, ctx) = (store.clone(), ctx.clone());
            let refs: Vec<ObjectRef<K>> = match &ev {
                Event::Domain { name, .. } => index.get(name),
                Event::StoragePool { .. } | Event::Network { .. } => store
                    .state()
                    .iter()
                    .filter(|o| o.waiting())
                    .map(|o| ObjectRef::from_obj(&**o))
                    .collect(),
                Event::Connected => index.all(),
                Event::Closed => Vec::new(),
            };
            async move {
                match ev {
                    Event::Domain { name, .. } => unsettled(&ctx, &store, &name, refs).await,
                    _ => refs,
                }
            }
        })
        // One domain read per event at most; a few events' reads in flight, in order.
        .buffered(4)
        .flat_map(futures::stream::iter)
}

/// Of `refs`, the objects of `domain` an event must wake: those without a settled record for
/// their generation, and those whose part of the domain, read once for all, differs from it.
async fn unsettled<K: AgentKind>(
    ctx: &Context,
    store: &reflector::Store<K>,
    domain: &str,
    refs: Vec<ObjectRef<K>>,
) -> Vec<ObjectRef<K>> {
    let settled = |o: &K| {
        o.settled_key()
            .filter(|key| ctx.settled.has(key, o.meta().generation))
    };
    let any_settled = refs
        .iter()
        .filter_map(|r| store.get(r))
        .any(|o| settled(&o).is_some());
    if !any_settled {
        return refs;
    }
    // Unreadable or gone: everyone looks for themselves.
    let Ok(Some(view)) = ctx.libvirt.domain(domain).await else {
        return refs;
    };
    let before = refs.len();
    let woken: Vec<ObjectRef<K>> = refs
        .into_iter()
        .filter(|r| {
            let Some(o) = store.get(r) else {
                return true;
            };
            !settled(&o).is_some_and(|key| {
                ctx.settled
                    .unchanged(&key, o.meta().generation, o.fingerprint(&view))
            })
        })
        .collect();
    let spared = before - woken.len();
    crate::metrics::get().wakeups_spared.inc_by(spared as u64);
    tracing::debug!(domain, woken = woken.len(), spared, "domain event");
    woken
}

/// Wakes the objects of a namespace whose grants changed, so their plans check them again: a
/// revoked grant stops changes, a new one lets a waiting object go ahead (no restart needed).
fn grant_changes<K: AgentKind>(
    grants: &crate::tenancy::NamespaceGrants,
    store: reflector::Store<K>,
) -> impl Stream<Item = ObjectRef<K>> + Send + 'static {
    grants.changes().flat_map(move |ns| {
        let refs: Vec<ObjectRef<K>> = store
            .state()
            .iter()
            .filter(|o| o.namespace().as_deref() == Some(ns.as_str()))
            .map(|o| ObjectRef::from_obj(&**o))
            .collect();
        futures::stream::iter(refs)
    })
}

/// Remembers DEVICE_REMOVAL_FAILED events so the detach reports them.
pub async fn record_removal_failures(ctx: Arc<Context>, shutdown: Shutdown) {
    let events = libvirt_events(&ctx.libvirt).take_until(shutdown::wait(shutdown));
    futures::pin_mut!(events);
    while let Some(ev) = events.next().await {
        if let Event::Domain {
            name,
            kind: DomainEvent::DeviceRemovalFailed(alias),
        } = ev
        {
            tracing::warn!(domain = %name, %alias, "guest refused to release a device");
            ctx.removal_failures.record(&alias);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn cond(status: &str) -> Condition {
        Condition {
            type_: condition::READY.into(),
            status: status.into(),
            reason: "R".into(),
            message: String::new(),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
            observed_generation: None,
        }
    }

    #[test]
    fn only_ready_true_is_ready() {
        assert!(not_ready(&[]));
        assert!(not_ready(&[cond("False")]));
        assert!(not_ready(&[cond("Unknown")]));
        assert!(!not_ready(&[cond("True")]));
    }
}
