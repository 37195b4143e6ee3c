//! The agent's settings and the errors that stop it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::http;
use crate::libvirt::LibvirtError;

/// Settings of the agent.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Name of this node; the agent's `Hypervisor` object has this name.
    pub node_name: String,
    /// libvirt connection URI.
    pub libvirt_uri: String,
    /// How long one libvirt call may take before the object that made it reports a Timeout.
    pub libvirt_call_timeout: Duration,
    /// Address of the health/readiness endpoint.
    pub http_addr: SocketAddr,
    /// How often the node Lease is renewed, and the inventory re-read (written only when it
    /// changed), events or not.
    pub heartbeat_interval: Duration,
    /// Namespace of this node's Lease.
    pub lease_namespace: String,
    /// Directories whose files may back devices, besides the active storage pools.
    pub allowed_paths: Vec<PathBuf>,
    /// Download slots, destinations, sizes and rates.
    pub downloads: crate::agent::iso::DownloadSettings,
    /// Clone jobs that may copy at once on this node.
    pub max_clones: usize,
    /// Where the agent keeps its node-side records (what clone tasks created).
    pub state_dir: PathBuf,
    /// Whether namespaces reach only what is granted to them.
    pub tenancy: crate::tenancy::Mode,
}

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
