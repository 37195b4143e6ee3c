//! The cluster-wide controller: binds objects to nodes and watches node health. Several replicas
//! may run; one leader, chosen through a `coordination.k8s.io/v1` Lease, does the work.

pub mod binding;
pub mod health;
pub mod label;

use std::collections::HashMap;
use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::api::{
    Hypervisor, IsoDownload, NODE_LABEL, VMClone, VMInterface, VirtualMachineStorage, condition,
};
use crate::backoff::Backoff;
use crate::conditions::{self, Desired};
use crate::http::{self, Gate, Readiness};
use crate::shutdown::Shutdown;
use crate::tenancy::{self, NamespaceGrants};
use binding::{Bindable, Decision, reason};
use label::LabelAction;

/// Field manager of everything the controller writes.
pub const FIELD_MANAGER: &str = "virtplane-controller";

/// Settings of the controller.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Address of the health/readiness endpoint.
    pub http_addr: SocketAddr,
    /// Namespace of the leader-election Lease.
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    pub lease_name: String,
    /// This replica's identity in the Lease.
    pub identity: String,
    /// How long a leader's Lease is valid without renewal.
    pub lease_duration: Duration,
    /// How long a node's Lease may go without renewal before the node counts as unreachable.
    pub node_grace: Duration,
    /// Namespace of the agents' node Leases.
    pub node_lease_namespace: String,
    /// Whether namespaces reach only the domains and pools granted to them.
    pub tenancy: tenancy::Mode,
}

/// Errors of the controller.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The HTTP endpoint failed.
    #[error(transparent)]
    Http(#[from] http::HttpError),
    /// Leader election failed.
    #[error("failed to take part in leader election: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    /// An API call failed while reconciling.
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

struct Context {
    client: Client,
    hypervisors: Store<Hypervisor>,
    /// What each namespace is granted (fed by a watch of the Namespaces).
    grants: NamespaceGrants,
    grace: SignedDuration,
    /// Which nodes are reachable, judged from their Leases.
    health: health::Health,
    backoff: Backoff,
}

/// Runs the controller until `shutdown` fires.
pub async fn run(
    client: Client,
    config: ControllerConfig,
    mut shutdown: Shutdown,
) -> Result<(), ControllerError> {
    let readiness = Readiness::default();
    let starting = readiness.gate();
    let (addr, server) = http::serve(config.http_addr, readiness.clone(), shutdown.clone()).await?;
    tracing::info!(%addr, identity = %config.identity, "controller starting");

    let lease_secs = config.lease_duration.as_secs().max(2);
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &config.lease_name)
        .with_namespace(&config.lease_namespace)
        .with_identity(&config.identity)
        .with_duration(lease_secs)
        .with_grace((lease_secs / 3).max(1))
        .with_field_manager(format!("{FIELD_MANAGER}-lease"))
        .build()
        .await?;
    let (mut leader, lease_task) = manager.watch().await;
    // A standby is healthy and ready: it is waiting to take over.
    starting.open();

    loop {
        if *leader.borrow_and_update() {
            tracing::info!(identity = %config.identity, "became leader");
            let work = lead(client.clone(), &config, readiness.clone(), shutdown.clone());
            tokio::select! {
                () = work => {}
                _ = leader.changed() => tracing::warn!("lost leadership; stopping work"),
                _ = shutdown.changed() => break,
            }
        } else {
            tokio::select! {
                changed = leader.changed() => if changed.is_err() { break },
                _ = shutdown.changed() => break,
            }
        }
        if *shutdown.borrow() {
            break;
        }
    }
    // Dropping the receiver makes the lease task release the Lease, so a standby takes over at once.
    drop(leader);
    if let Ok(Err(err)) = lease_task.await {
        tracing::warn!(error = %err, "failed to release the lease");
    }
    let _ = server.await;
    Ok(())
}

/// The leader's work: a Hypervisor reflector, the Namespace grants view, one binder per kind,
/// and node health.
async fn lead(client: Client, config: &ControllerConfig, readiness: Readiness, shutdown: Shutdown) {
    let (reader, writer) = reflector::store();
    let hv_api: Api<Hypervisor> = Api::all(client.clone());
    // Each change reaches the binders only after it is in `reader`, the view their reconciles
    // judge by: with a watch of their own, a binder could be woken before `reader` had the new
    // inventory, judge the object unschedulable again, and not look again for five minutes.
    let (hv_changes, _) = tokio::sync::broadcast::channel::<Arc<Hypervisor>>(256);
    let receivers: [_; 4] = std::array::from_fn(|_| hv_changes.subscribe());
    let [vms_rx, vmi_rx, clone_rx, iso_rx] = receivers;
    let hv_stream = reflector(writer, watcher(hv_api.clone(), watcher::Config::default()))
        .default_backoff()
        .touched_objects()
        .for_each(move |hv| {
            if let Ok(hv) = hv {
                let _ = hv_changes.send(Arc::new(hv));
            }
            futures::future::ready(())
        });
    let (grants, grants_feed) = NamespaceGrants::new(config.tenancy);
    let grants_feed = grants_feed.run(client.clone(), readiness.gate(), shutdown);
    let ctx = Arc::new(Context {
        client: client.clone(),
        hypervisors: reader.clone(),
        grants,
        grace: SignedDuration::try_from(config.node_grace).unwrap_or(SignedDuration::from_secs(40)),
        health: health::Health::new(config.node_grace),
        backoff: Backoff::default(),
    });
    let node_health = health::run(
        client.clone(),
        config.node_lease_namespace.clone(),
        reader.clone(),
        ctx.health.clone(),
    );
    // Not ready again until this leader's view of the Hypervisors is synced.
    let syncing = readiness.gate();
    let ready = {
        let reader = reader.clone();
        async move {
            if reader.wait_until_ready().await.is_ok() {
                syncing.open();
            }
            futures::future::pending::<()>().await
        }
    };
    tokio::join!(
        hv_stream,
        grants_feed,
        ready,
        bind::<VirtualMachineStorage>(client.clone(), ctx.clone(), readiness.gate(), vms_rx),
        bind::<VMInterface>(client.clone(), ctx.clone(), readiness.gate(), vmi_rx),
        bind::<VMClone>(client.clone(), ctx.clone(), readiness.gate(), clone_rx),
        bind::<IsoDownload>(client.clone(), ctx.clone(), readiness.gate(), iso_rx),
        node_health,
    );
}

/// Runs the binder for one kind; opens `gate` once its watch is synced. Hypervisor changes
/// (`hv_changes`, sent once they are in `ctx.hypervisors`) wake the objects they may concern; a
/// change of a namespace's grants wakes its unbound objects. Starts only once the grants view is
/// synced, so no object is refused on an empty view.
async fn bind<K>(
    client: Client,
    ctx: Arc<Context>,
    gate: Gate,
    hv_changes: tokio::sync::broadcast::Receiver<Arc<Hypervisor>>,
) where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Bindable
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    ctx.grants.ready().await;
    ctx.health.ready().await;
    let ctrl = Controller::new(Api::<K>::all(client.clone()), watcher::Config::default());
    let store = ctrl.store();
    let synced = store.clone();
    let regranted = {
        let store = store.clone();
        ctx.grants.changes().flat_map(move |ns| {
            // Bound objects stay with their node: the agent re-checks their grants.
            let waiting: Vec<ObjectRef<K>> = store
                .state()
                .into_iter()
                .filter(|o| o.namespace().as_deref() == Some(ns.as_str()))
                .filter(|o| !o.labels().contains_key(NODE_LABEL))
                .map(|o| ObjectRef::from_obj(&*o))
                .collect();
            futures::stream::iter(waiting)
        })
    };
    // A node's reachability changed: its objects' Scheduled condition follows, once per change.
    let health_changed = {
        let store = store.clone();
        ctx.health.changes().flat_map(move |node| {
            let bound: Vec<ObjectRef<K>> = store
                .state()
                .into_iter()
                .filter(|o| o.labels().get(NODE_LABEL) == Some(&node))
                .map(|o| ObjectRef::from_obj(&*o))
                .collect();
            futures::stream::iter(bound)
        })
    };
    let hv_changed = {
        let store = store.clone();
        let mut seen = HashMap::<String, u64>::new();
        hypervisor_changes(hv_changes).flat_map(move |hv| {
            // A missed change (a lagging receiver) may concern any node: wake every object.
            let node = hv.as_ref().map(|hv| hv.name_any());
            let changed = hv.as_ref().is_none_or(|hv| {
                // A heartbeat alone changes nothing for binding: only a changed inventory or Ready.
                let print = binding_fingerprint(hv);
                seen.insert(hv.name_any(), print) != Some(print)
            });
            let woken: Vec<ObjectRef<K>> = if changed {
                store
                    .state()
                    .into_iter()
                    .filter(|o| {
                        node.as_ref()
                            .is_none_or(|node| o.labels().get(NODE_LABEL).is_none_or(|n| n == node))
                    })
                    .map(|o| ObjectRef::from_obj(&*o))
                    .collect()
            } else {
                Vec::new()
            };
            futures::stream::iter(woken)
        })
    };
    let cache = store.clone();
    let binder = ctrl
        .reconcile_on(hv_changed)
        .reconcile_on(regranted)
        .reconcile_on(health_changed)
        .run(
            move |obj, ctx| {
                let cache = cache.clone();
                async move {
                    let start = std::time::Instant::now();
                    let result = reconcile::<K>(obj.clone(), ctx.clone(), &cache).await;
                    if result.is_ok() {
                        ctx.backoff.succeeded(&*obj);
                    }
                    crate::metrics::get().reconciled(
                        &K::kind(&()),
                        start,
                        result.as_ref().err().map(|_| "api"),
                    );
                    result
                }
            },
            error_policy::<K>,
            ctx,
        )
        .for_each(|res| {
            if let Err(err) = res {
                tracing::debug!(error = %err, "binder event");
            }
            futures::future::ready(())
        });
    let ready = async move {
        if synced.wait_until_ready().await.is_ok() {
            gate.open();
        }
    };
    tokio::join!(binder, ready);
}

/// The Hypervisors changed, from `rx`; `None` when some were missed (the receiver lagged).
fn hypervisor_changes(
    rx: tokio::sync::broadcast::Receiver<Arc<Hypervisor>>,
) -> impl Stream<Item = Option<Arc<Hypervisor>>> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Ok(hv) => Some((Some(hv), rx)),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Some((None, rx)),
            Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
        }
    })
}

/// What binding reads of a Hypervisor: its domains, pools and Ready status.
fn binding_fingerprint(hv: &Hypervisor) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    if let Some(s) = &hv.status {
        for d in &s.domains {
            d.name.hash(&mut h);
        }
        0xffu8.hash(&mut h);
        for p in &s.storage_pools {
            p.name.hash(&mut h);
        }
        s.conditions
            .iter()
            .find(|c| c.type_ == condition::READY)
            .map(|c| c.status.as_str())
            .hash(&mut h);
    }
    h.finish()
}

fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    err: &ControllerError,
    ctx: Arc<Context>,
) -> Action {
    let after = ctx.backoff.failed(&*obj);
    tracing::warn!(object = %obj.name_any(), error = %err, retry_in = ?after, "bind failed");
    Action::requeue(after)
}

#[tracing::instrument(skip_all, fields(object = %format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())))]
async fn reconcile<K>(
    obj: Arc<K>,
    ctx: Arc<Context>,
    cache: &Store<K>,
) -> Result<Action, ControllerError>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Bindable
        + Clone
        + DeserializeOwned
        + Debug,
{
    tracing::debug!("binding");
    let now = Timestamp::now();
    let hypervisors = ctx.hypervisors.state();
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    let object = format!("{}/{ns}/{name}", K::kind(&()));

    // The label is the controller's: anyone else's edit is put back, a label naming no node
    // is removed (`label`).
    let found = obj.labels().get(NODE_LABEL).map(String::as_str);
    let exists = |n: &str| hypervisors.iter().any(|h| h.name_any() == n);
    let bound = match label::judge(found, obj.status_node(), exists) {
        LabelAction::Decide => None,
        LabelAction::Keep(node) => Some(node),
        LabelAction::Restore { node, found } => {
            tracing::warn!(%node, found = found.as_deref().unwrap_or("(removed)"), "the node label differs from the binding (changed or removed by someone else, or its write failed); putting the binding back");
            set_label(&api, &name, Some(&node), &object).await?;
            Some(node)
        }
        LabelAction::Remove(ghost) => {
            tracing::warn!(label = %ghost, "the node label names no node; removing it");
            set_label(&api, &name, None, &object).await?;
            None
        }
    };
    // The binding apply (node label and finalizer), when this reconcile binds the object.
    let mut bind = None;
    let (node, desired, action) = match bound.as_ref() {
        Some(node) => {
            // Reachability changes wake the object (health_changed); no timer is needed.
            match ctx.health.is_up(node) {
                true => (
                    Some(node.clone()),
                    Desired::truthy(
                        condition::SCHEDULED,
                        reason::BOUND,
                        format!("Bound to node {node}."),
                    ),
                    Action::requeue(Duration::from_secs(300)),
                ),
                false => (
                    Some(node.clone()),
                    Desired::truthy(
                        condition::SCHEDULED,
                        reason::NODE_UNREACHABLE,
                        format!(
                            "Bound to node {node}, whose agent has not renewed its Lease for more than {}s; changes wait until it is back. Check the virtplane agent on {node}.",
                            ctx.grace.as_secs()
                        ),
                    ),
                    Action::requeue(Duration::from_secs(300)),
                ),
            }
        }
        None => {
            let hvs: Vec<(&Hypervisor, bool)> = hypervisors
                .iter()
                .map(|h| (h.as_ref(), ctx.health.is_up(&h.name_any())))
                .collect();
            let grants = ctx.grants.grants(&ns);
            match binding::decide(obj.node_name(), obj.target(), &grants, &hvs) {
                Decision::Bind { node, message } => {
                    bind = Some(binding::bind_body(
                        &K::api_version(&()),
                        &K::kind(&()),
                        &name,
                        &node,
                        obj.meta().deletion_timestamp.is_some(),
                    ));
                    (
                        Some(node),
                        Desired::truthy(condition::SCHEDULED, reason::BOUND, message),
                        Action::await_change(),
                    )
                }
                Decision::Unschedulable { reason, message } => (
                    None,
                    Desired::falsy(condition::SCHEDULED, reason, message),
                    // Hypervisor and grant changes wake the object; this is only a safety net.
                    Action::requeue(Duration::from_secs(300)),
                ),
            }
        }
    };

    let current = conditions::find(obj.conditions(), condition::SCHEDULED);
    let unchanged = current.is_some_and(|c| {
        c.status == if desired.status { "True" } else { "False" }
            && c.reason == desired.reason
            && c.message == desired.message
    }) && obj.status_node() == node.as_deref();
    // The binding and the status go out together. The agent starts as soon as it sees the label,
    // and a status write after the label would run on the API server at the same time as the
    // agent's libvirt work, slowing both on a small node. Either order is safe if one of them
    // fails: the reconcile is retried, and a status naming the node puts a missing label back
    // (`label::judge`).
    let bind_written = bind.is_some();
    let binding = async {
        let Some(body) = bind else {
            return Ok(());
        };
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .map_err(|source| ControllerError::Api {
            action: "label",
            object: object.clone(),
            source,
        })?;
        tracing::info!(node = node.as_deref().unwrap_or_default(), "bound");
        Ok(())
    };
    let status = async {
        if unchanged {
            return Ok(());
        }
        let conds = conditions::compute(obj.conditions(), &[desired], obj.meta().generation, now);
        let body = json!({
            "apiVersion": K::api_version(&()), "kind": K::kind(&()),
            "metadata": { "name": name },
            "status": { "nodeName": node, "conditions": conds },
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .map_err(|source| ControllerError::Api {
            action: "update status of",
            object: object.clone(),
            source,
        })
        .map(|_| ())
    };
    tokio::try_join!(binding, status)?;
    if let (true, Some(node)) = (bind_written, node.as_deref()) {
        // The two writes' watch events reach the cache in either order. A reconcile reading
        // only the status would take the label as removed by someone and write it again; one
        // reading only the label would write the status again. The next reconcile of this
        // object starts only after this one returns, so wait until the cache has both.
        seen_bound(cache, &obj, node).await;
    }
    Ok(action)
}

/// Waits (up to two seconds) until `cache` holds `obj` labelled with and recorded as bound to
/// `node`, or no longer holds it.
async fn seen_bound<K>(cache: &Store<K>, obj: &K, node: &str)
where
    K: Resource<DynamicType = ()> + Bindable + Clone,
{
    let key = ObjectRef::from_obj(obj);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    // Short at first (the events come within milliseconds on a quiet cluster), then backing
    // off, so a burst of bindings does not spin while the API server is slow.
    let mut pause = Duration::from_millis(1);
    while tokio::time::Instant::now() < deadline {
        let cached = cache.get(&key);
        if cached.is_none_or(|o| {
            o.labels().get(NODE_LABEL).map(String::as_str) == Some(node)
                && o.status_node() == Some(node)
        }) {
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
    tracing::debug!("the binding is not in the cache after 2 s");
}

/// Sets (or, with `None`, removes) the node label of `name`, whoever set it before.
async fn set_label<K>(
    api: &Api<K>,
    name: &str,
    node: Option<&str>,
    object: &str,
) -> Result<(), ControllerError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let body = json!({ "metadata": { "labels": { NODE_LABEL: node } } });
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Merge(body),
    )
    .await
    .map(|_| ())
    .map_err(|source| ControllerError::Api {
        action: "label",
        object: object.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector::store::Writer;

    fn vms(label: Option<&str>, recorded: Option<&str>) -> VirtualMachineStorage {
        let labels: std::collections::BTreeMap<_, _> =
            label.map(|l| (NODE_LABEL, l)).into_iter().collect();
        serde_json::from_value(json!({
            "apiVersion": "virtplane.io/v1alpha1", "kind": "VirtualMachineStorage",
            "metadata": { "name": "disk", "namespace": "ns", "labels": labels },
            "spec": { "vm": "vm", "type": "disk" },
            "status": { "nodeName": recorded },
        }))
        .expect("a VirtualMachineStorage")
    }

    #[tokio::test]
    async fn the_binding_reconcile_returns_once_the_cache_holds_both_writes() {
        let mut writer = Writer::<VirtualMachineStorage>::default();
        let cache = writer.as_reader();
        let asked = vms(None, None);
        // Not in the cache (deleted meanwhile): nothing to wait for.
        tokio::time::timeout(Duration::from_millis(100), seen_bound(&cache, &asked, "n1"))
            .await
            .expect("no wait for an object the cache does not hold");

        // The status event first, the label's later: the wait ends only with both.
        writer.apply_watcher_event(&watcher::Event::Apply(vms(None, Some("n1"))));
        let wait = tokio::spawn({
            let cache = cache.clone();
            async move { seen_bound(&cache, &asked, "n1").await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!wait.is_finished(), "the label is not in the cache yet");
        writer.apply_watcher_event(&watcher::Event::Apply(vms(Some("n1"), Some("n1"))));
        tokio::time::timeout(Duration::from_secs(1), wait)
            .await
            .expect("the wait ends once the cache holds both")
            .expect("the wait does not panic");
    }
}
