//! The node agent: keeps this node's `Hypervisor` inventory current and reconciles the objects
//! bound to this node (label `virtplane.io/node=<node>`, selected by the API server) against the
//! local libvirt. This file only wires things together; each kind is a pipeline in its own folder
//! (observe → plan → apply → report), see `docs/architecture.md`.

mod batch;
mod clone;
mod config;
mod context;
mod device;
pub(crate) mod finalizer;
mod hypervisor;
mod index;
mod interface;
mod iso;
mod jobs;
mod lease;
mod refusal;
mod roots;
mod settled;
mod status;
mod storage;
mod timeout;
mod wiring;

use std::sync::Arc;

use kube::Client;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;

pub use crate::download::parse_cidr;
pub use config::{AgentConfig, AgentError};
use context::Context;
pub use context::FIELD_MANAGER;
pub use iso::{DownloadSettings, parse_cidrs};
use wiring::{AgentKind, not_ready};

use crate::api::{IsoDownload, NODE_LABEL, VMClone, VMInterface, VirtualMachineStorage};
use crate::backoff::Backoff;
use crate::http::{self, Readiness};
use crate::libvirt::Libvirt;
use crate::shutdown::{self, Shutdown};

impl AgentKind for VirtualMachineStorage {
    fn domains(&self) -> Vec<String> {
        vec![device::domain_of(
            self.status.as_ref().and_then(|st| st.vm.as_ref()),
            &self.spec.vm,
        )]
    }
    fn waiting(&self) -> bool {
        not_ready(self.status.as_ref().map_or(&[][..], |s| &s.conditions))
    }
    fn leaving(&self) -> Option<(String, String)> {
        storage::leaving(self)
    }
    fn settled_key(&self) -> Option<String> {
        storage::settled_key(self)
    }
    fn fingerprint(&self, view: &crate::libvirt::domain::DomainView) -> u64 {
        storage::fingerprint(self, view)
    }
}

impl AgentKind for VMInterface {
    fn domains(&self) -> Vec<String> {
        vec![device::domain_of(
            self.status.as_ref().and_then(|st| st.vm.as_ref()),
            &self.spec.vm,
        )]
    }
    fn waiting(&self) -> bool {
        not_ready(self.status.as_ref().map_or(&[][..], |s| &s.conditions))
    }
}

impl AgentKind for VMClone {
    fn domains(&self) -> Vec<String> {
        // A clone waits only for its source domain.
        vec![self.spec.source.clone()]
    }
    fn waiting(&self) -> bool {
        false
    }
}

impl AgentKind for IsoDownload {
    fn domains(&self) -> Vec<String> {
        Vec::new()
    }
    fn waiting(&self) -> bool {
        false
    }
}

/// Declares every failure reason of kind `K` in the error metric (waiting is no failure).
fn declare_reasons<K: kube::Resource<DynamicType = ()>, R: refusal::Reason>() {
    crate::metrics::get().declare_reasons(
        &K::kind(&()),
        R::ALL.iter().filter(|r| !r.waiting()).map(|r| r.as_str()),
    );
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
    let grants_synced = readiness.gate();
    let (addr, server) = http::serve(config.http_addr, readiness.clone(), shutdown.clone()).await?;
    tracing::info!(node = %config.node_name, %addr, uri = %config.libvirt_uri, "agent starting");

    declare_reasons::<VirtualMachineStorage, storage::reason::StorageReason>();
    declare_reasons::<VMInterface, interface::reason::Reason>();
    declare_reasons::<VMClone, clone::reason::CloneReason>();
    declare_reasons::<IsoDownload, iso::reason::IsoReason>();

    let libvirt = Libvirt::with_call_timeout(&config.libvirt_uri, config.libvirt_call_timeout)?;
    let supervisor = {
        let libvirt = libvirt.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { libvirt.supervise(shutdown).await })
    };
    let (grants, grants_feed) = crate::tenancy::NamespaceGrants::new(config.tenancy);
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
        definition_batches: Default::default(),
        settled: Default::default(),
        removal_failures: Default::default(),
        clones: Default::default(),
        clone_side: clone::NodeSide::new(&config.state_dir, config.max_clones),
        downloads: iso::Downloads::new(config.downloads.clone()),
        macs: Default::default(),
        grants,
        pools: crate::libvirt::pool_index::PoolIndex::new(libvirt.subscribe()),
    });
    let grants_feed = grants_feed.run(client.clone(), grants_synced, shutdown.clone());
    let mac_index = interface::index::watch(client.clone(), ctx.macs.clone(), shutdown.clone());
    let failures = wiring::record_removal_failures(ctx.clone(), shutdown.clone());
    let pod_ranges = iso::ranges::watch(
        client.clone(),
        config.downloads.cluster.clone(),
        shutdown.clone(),
    );
    // On shutdown, stop copies and transfers at once (their tasks resume in the next agent):
    // a blocking copy would otherwise hold the process until it finished.
    let stop_jobs = {
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        async move {
            shutdown::wait(shutdown).await;
            ctx.clones.stop_all();
            ctx.downloads.stop_all();
        }
    };

    let node = &config.node_name;
    let (storage_ctrl, storage_store, storage_index) =
        wiring::controller::<VirtualMachineStorage>(&client, node, &ctx);
    // A storage object waiting for an IsoDownload is woken when that download changes.
    let storage_ctrl = storage_ctrl.watches(
        Api::<IsoDownload>::all(client.clone()),
        watcher::Config::default().labels(&format!("{NODE_LABEL}={node}")),
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
    );
    let storage = wiring::drive(
        storage_ctrl,
        storage_store,
        storage_index,
        &libvirt,
        storage::reconcile,
        ctx.clone(),
        storage_synced,
        shutdown.clone(),
    );

    let (nic_ctrl, nic_store, nic_index) = wiring::controller::<VMInterface>(&client, node, &ctx);
    let interfaces = wiring::drive(
        nic_ctrl,
        nic_store,
        nic_index,
        &libvirt,
        interface::reconcile,
        ctx.clone(),
        interfaces_synced,
        shutdown.clone(),
    );

    let (clone_ctrl, clone_store, clone_index) = wiring::controller::<VMClone>(&client, node, &ctx);
    // A copy's progress and its end wake the task's reconciler, its only status writer.
    let clone_ctrl = clone_ctrl.reconcile_on(ctx.clones.wakeups());
    let clones = wiring::drive(
        clone_ctrl,
        clone_store,
        clone_index,
        &libvirt,
        clone::reconcile,
        ctx.clone(),
        clones_synced,
        shutdown.clone(),
    );

    let (iso_ctrl, iso_store, iso_index) = wiring::controller::<IsoDownload>(&client, node, &ctx);
    // A transfer's progress and its end wake the download's reconciler, its only status writer.
    let iso_ctrl = iso_ctrl.reconcile_on(ctx.downloads.wakeups());
    let downloads = wiring::drive(
        iso_ctrl,
        iso_store,
        iso_index,
        &libvirt,
        iso::reconcile,
        ctx.clone(),
        downloads_synced,
        shutdown.clone(),
    );

    // The heartbeat: its own thread, runtime and client.
    if let Err(err) = lease::spawn(&config, shutdown.clone()) {
        tracing::error!(error = %err, "failed to start the node Lease thread; the controller will count this node unreachable");
    }
    let inventory = hypervisor::run(
        client,
        libvirt.clone(),
        &config,
        registered,
        shutdown.clone(),
    );
    let (result, (), (), (), (), (), (), (), (), ()) = tokio::join!(
        inventory,
        storage,
        interfaces,
        clones,
        downloads,
        failures,
        stop_jobs,
        mac_index,
        grants_feed,
        pod_ranges
    );

    let _ = supervisor.await;
    libvirt.disconnect();
    let _ = server.await;
    result
}
