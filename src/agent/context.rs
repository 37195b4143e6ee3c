//! What every reconciler of the agent shares: its settings, its handles, and the reconcile error.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kube::runtime::events::Recorder;
use kube::{Client, Resource, ResourceExt};

use super::{clone, device, interface, iso};
use crate::backoff::Backoff;
use crate::libvirt::facade::Storage;
use crate::libvirt::{Libvirt, LibvirtError};

/// Field manager of everything the agent writes.
pub const FIELD_MANAGER: &str = "virtplane-agent";

/// Errors of a reconcile (transient: the object is retried with back-off).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
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

impl ReconcileError {
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

/// What every reconciler of the agent shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// libvirt on this node.
    pub libvirt: Libvirt,
    /// This node's name.
    pub node: String,
    /// Publishes Kubernetes Events as the agent.
    pub recorder: Recorder,
    /// Directories whose files may back devices, besides the active storage pools.
    pub allowed_paths: Vec<PathBuf>,
    /// Per-domain locks.
    pub locks: DomainLocks,
    /// Detaches in flight.
    pub detaches: device::Detaches,
    /// Detaches from shut-off domains waiting to be written together.
    pub definition_batches: super::batch::DefinitionBatches,
    /// What the last settled reconcile of each object saw: domain events that leave it so do
    /// not wake the object.
    pub settled: super::settled::Settled,
    /// Removals the guest refused.
    pub removal_failures: device::RemovalFailures,
    /// Clone jobs.
    pub clones: clone::CloneJobs,
    /// The node-side record of what clone tasks created, and the clone slots.
    pub clone_side: clone::NodeSide,
    /// Downloads.
    pub downloads: iso::Downloads,
    /// Per-object back-off of failed reconciles.
    pub backoff: Backoff,
    /// Which VMInterfaces claim which MAC, cluster-wide (fed by [`interface::index::watch`]).
    pub macs: interface::index::MacIndex,
    /// What each namespace is granted (fed by a watch of the Namespaces; `ready()` before use).
    pub grants: crate::tenancy::NamespaceGrants,
    /// The storage pools' directories, kept between reconciles (dropped on pool events).
    pub pools: crate::libvirt::pool_index::PoolIndex,
}

impl Context {
    /// Directories whose files may back devices: the configured ones and the target paths of the
    /// active storage pools, with symlinks resolved, none a system directory (`roots`).
    pub async fn allowed_dirs(&self) -> Result<Vec<PathBuf>, LibvirtError> {
        let pools = self.libvirt.storage_pools().await?;
        let extra = self.allowed_paths.clone();
        // Canonicalising can block (a hung NFS pool): off the async runtime. System
        // directories never count (`roots`).
        Ok(tokio::task::spawn_blocking(move || {
            let canonical = |d: &str| std::fs::canonicalize(d).ok();
            let pools = pools
                .into_iter()
                .filter(|p| p.active)
                .filter_map(|p| Some((p.name, canonical(p.path.as_deref()?)?)))
                .collect();
            let extra = extra
                .iter()
                .filter_map(|d| std::fs::canonicalize(d).ok())
                .collect();
            let mut dirs = super::roots::usable_dirs(extra);
            dirs.extend(super::roots::usable(pools).into_iter().map(|(_, d)| d));
            dirs
        })
        .await?)
    }
}

/// `Kind/namespace/name` of an object, for messages.
pub fn object_name<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
}
