//! The node agent: keeps this node's `Hypervisor` inventory current and reconciles the objects
//! bound to this node (label `virtplane.io/node=<node>`, selected by the API server) against the
//! local libvirt.

mod clone;
mod context;
mod device;
mod finalizer;
mod hypervisor;
mod interface;
mod iso;
mod jobs;
mod refusal;
mod status;
mod storage;

use std::fmt::Debug;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::api::{IsoDownload, NODE_LABEL, VMClone, VMInterface, VirtualMachineStorage};
use crate::backoff::Backoff;
use crate::http::{self, Readiness};
use crate::libvirt::{DomainEvent, Event, Libvirt, LibvirtError};
use crate::shutdown::{self, Shutdown};

pub use context::FIELD_MANAGER;
use context::{Context, ReconcileError};

/// Settings of the agent.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Name of this node; the agent's `Hypervisor` object has this name.
    pub node_name: String,
    /// libvirt connection URI.
    pub libvirt_uri: String,
    /// Address of the health/readiness endpoint.
    pub http_addr: SocketAddr,
    /// How often the inventory is re-read and the heartbeat written, events or not.
    pub heartbeat_interval: Duration,
    /// Directories whose files may back devices, besides the active storage pools.
    pub allowed_paths: Vec<PathBuf>,
    /// Downloads that may transfer at once on this node.
    pub max_downloads: usize,
    /// Networks (CIDRs) that downloads may not connect to.
    pub download_deny: Vec<(std::net::IpAddr, u8)>,
}

pub use iso::parse_cidr;

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// libvirt could not be set up.
    #[error("failed to set up libvirt: {0}")]
    Libvirt(#[from] LibvirtError),
    /// The HTTP endpoint failed.
    #[error(transparent)]
    Http(#[from] http::HttpError),
    /// The Hypervisor object could not be maintained.
    #[error("failed to maintain Hypervisor {node}: {source}")]
    Hypervisor {
        /// Node name.
        node: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// Runs the agent until `shutdown` fires.
pub async fn run(
    client: Client,
    config: AgentConfig,
    shutdown: Shutdown,
) -> Result<(), AgentError> {
    let readiness = Readiness::default();
    let registered = readiness.gate();
    let storage_synced = readiness.gate();
    let interfaces_synced = readiness.gate();
    let clones_synced = readiness.gate();
    let downloads_synced = readiness.gate();
    let (addr, server) = http::serve(config.http_addr, readiness.clone(), shutdown.clone()).await?;
    tracing::info!(node = %config.node_name, %addr, uri = %config.libvirt_uri, "agent starting");

    let libvirt = Libvirt::new(&config.libvirt_uri)?;
    let supervisor = {
        let libvirt = libvirt.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { libvirt.supervise(shutdown).await })
    };
    let ctx = Arc::new(Context {
        backoff: Backoff::default(),
        client: client.clone(),
        libvirt: libvirt.clone(),
        node: config.node_name.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(config.node_name.clone()),
            },
        ),
        allowed_paths: config.allowed_paths.clone(),
        locks: Default::default(),
        detaches: Default::default(),
        removal_failures: Default::default(),
        clones: Default::default(),
        downloads: iso::Downloads::new(config.max_downloads, config.download_deny.clone()),
    });
    let failures = record_removal_failures(ctx.clone(), shutdown.clone());
    // On shutdown, stop copies and transfers at once (their tasks resume in the next agent):
    // a blocking copy would otherwise hold the process until it finished.
    let stop_jobs = {
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        async move {
            shutdown::wait(shutdown).await;
            ctx.clones.cancel_all();
            ctx.downloads.stop_all();
        }
    };

    let selector = format!("{NODE_LABEL}={}", config.node_name);
    let storage_ctrl = Controller::new(
        Api::<VirtualMachineStorage>::all(client.clone()),
        watcher::Config::default().labels(&selector),
    );
    let storage_store = storage_ctrl.store();
    let storage = storage_ctrl
        .watches(
            Api::<IsoDownload>::all(client.clone()),
            watcher::Config::default().labels(&selector),
            {
                let store = storage_store.clone();
                move |iso: IsoDownload| {
                    let (ns, name) = (iso.namespace(), iso.name_any());
                    store
                        .state()
                        .into_iter()
                        .filter(|s| s.namespace() == ns)
                        .filter(|s| {
                            s.spec
                                .source
                                .as_ref()
                                .and_then(|src| src.iso_download.as_deref())
                                == Some(name.as_str())
                        })
                        .map(|s| ObjectRef::from_obj(&*s))
                        .collect::<Vec<_>>()
                }
            },
        )
        .reconcile_on(domain_triggers(
            &libvirt,
            storage_store.clone(),
            |s: &VirtualMachineStorage| {
                s.status
                    .as_ref()
                    .and_then(|st| st.vm.clone())
                    .unwrap_or_else(|| s.spec.vm.clone())
            },
            |s: &VirtualMachineStorage| not_ready(s.status.as_ref().map(|st| &st.conditions)),
        ))
        .graceful_shutdown_on(shutdown::wait(shutdown.clone()))
        .run(
            |o, c| measured(o, c, storage::reconcile),
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));

    let nic_ctrl = Controller::new(
        Api::<VMInterface>::all(client.clone()),
        watcher::Config::default().labels(&selector),
    );
    let nic_store = nic_ctrl.store();
    let interfaces = nic_ctrl
        .reconcile_on(domain_triggers(
            &libvirt,
            nic_store.clone(),
            |n: &VMInterface| {
                n.status
                    .as_ref()
                    .and_then(|st| st.vm.clone())
                    .unwrap_or_else(|| n.spec.vm.clone())
            },
            |n: &VMInterface| not_ready(n.status.as_ref().map(|st| &st.conditions)),
        ))
        .graceful_shutdown_on(shutdown::wait(shutdown.clone()))
        .run(
            |o, c| measured(o, c, interface::reconcile),
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));
    let clone_ctrl = Controller::new(
        Api::<VMClone>::all(client.clone()),
        watcher::Config::default().labels(&selector),
    );
    let clone_store = clone_ctrl.store();
    let clones = clone_ctrl
        .reconcile_on(domain_triggers(
            &libvirt,
            clone_store.clone(),
            |c: &VMClone| c.spec.source.clone(),
            // A clone waits only for its source domain.
            |_: &VMClone| false,
        ))
        .graceful_shutdown_on(shutdown::wait(shutdown.clone()))
        .run(
            |o, c| measured(o, c, clone::reconcile),
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));
    let iso_ctrl = Controller::new(
        Api::<IsoDownload>::all(client.clone()),
        watcher::Config::default().labels(&selector),
    );
    let iso_store = iso_ctrl.store();
    let downloads = iso_ctrl
        .reconcile_on(ctx.downloads.wakeups())
        .graceful_shutdown_on(shutdown::wait(shutdown.clone()))
        .run(
            |o, c| measured(o, c, iso::reconcile),
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));
    let synced = async move {
        if storage_store.wait_until_ready().await.is_ok() {
            storage_synced.open();
        }
        if nic_store.wait_until_ready().await.is_ok() {
            interfaces_synced.open();
        }
        if clone_store.wait_until_ready().await.is_ok() {
            clones_synced.open();
        }
        if iso_store.wait_until_ready().await.is_ok() {
            downloads_synced.open();
        }
    };

    let inventory = hypervisor::run(
        client,
        libvirt.clone(),
        &config,
        registered,
        shutdown.clone(),
    );
    let (result, (), (), (), (), (), (), ()) = tokio::join!(
        inventory, storage, interfaces, clones, downloads, synced, failures, stop_jobs
    );

    let _ = supervisor.await;
    libvirt.disconnect();
    let _ = server.await;
    result
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

/// Runs a reconcile, records it in the metrics and resets the object's back-off on success.
async fn measured<K, F>(
    obj: Arc<K>,
    ctx: Arc<Context>,
    reconcile: fn(Arc<K>, Arc<Context>) -> F,
) -> Result<Action, ReconcileError>
where
    K: Resource<DynamicType = ()>,
    F: std::future::Future<Output = Result<Action, ReconcileError>>,
{
    // Logged before anything else looks at the object: what an agent receives is visible.
    tracing::debug!(
        kind = %K::kind(&()),
        object = %format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any()),
        "received",
    );
    let start = std::time::Instant::now();
    let result = reconcile(obj.clone(), ctx.clone()).await;
    crate::metrics::get().reconciled(
        &K::kind(&()),
        start,
        result.as_ref().err().map(ReconcileError::class),
    );
    if result.is_ok() {
        ctx.backoff.succeeded(&*obj);
    }
    result
}

/// libvirt's events as a stream; a lagging receiver yields `Connected` (resync everything).
fn libvirt_events(libvirt: &Libvirt) -> impl Stream<Item = Event> + Send + 'static {
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

/// Whether an object's `Ready` condition is anything but True.
fn not_ready(
    conditions: Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>,
) -> bool {
    !conditions
        .into_iter()
        .flatten()
        .any(|c| c.type_ == crate::api::condition::READY && c.status == "True")
}

/// Wakes the objects of a domain when libvirt reports something about it (device removed,
/// started, stopped, undefined...), the objects that are `waiting` when a storage pool or network
/// changes (the one they lack may have appeared), and every object after a reconnect.
fn domain_triggers<K>(
    libvirt: &Libvirt,
    store: Store<K>,
    vm_of: fn(&K) -> String,
    waiting: fn(&K) -> bool,
) -> impl Stream<Item = ObjectRef<K>> + Send + 'static
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    libvirt_events(libvirt).flat_map(move |ev| {
        let refs: Vec<ObjectRef<K>> = match ev {
            Event::Domain { name, .. } => store
                .state()
                .iter()
                .filter(|o| vm_of(o) == name)
                .map(|o| ObjectRef::from_obj(&**o))
                .collect(),
            Event::StoragePool { .. } | Event::Network { .. } => store
                .state()
                .iter()
                .filter(|o| waiting(o))
                .map(|o| ObjectRef::from_obj(&**o))
                .collect(),
            Event::Connected => store
                .state()
                .iter()
                .map(|o| ObjectRef::from_obj(&**o))
                .collect(),
            Event::Closed => Vec::new(),
        };
        futures::stream::iter(refs)
    })
}

/// Remembers DEVICE_REMOVAL_FAILED events so the detach reports them.
async fn record_removal_failures(ctx: Arc<Context>, shutdown: Shutdown) {
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
