//! The node agent: keeps this node's `Hypervisor` inventory current and reconciles the objects
//! bound to this node against the local libvirt.

mod hypervisor;

use std::net::SocketAddr;
use std::time::Duration;

use kube::Client;

use crate::http::{self, Readiness};
use crate::libvirt::{Libvirt, LibvirtError};
use crate::shutdown::Shutdown;

/// Field manager of everything the agent writes.
pub const FIELD_MANAGER: &str = "virtplane-agent";

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

/// Runs the agent until `shutdown` fires.
pub async fn run(
    client: Client,
    config: AgentConfig,
    shutdown: Shutdown,
) -> Result<(), AgentError> {
    let readiness = Readiness::default();
    let (addr, server) = http::serve(config.http_addr, readiness.clone(), shutdown.clone()).await?;
    tracing::info!(node = %config.node_name, %addr, uri = %config.libvirt_uri, "agent starting");

    let libvirt = Libvirt::new(&config.libvirt_uri)?;
    let supervisor = {
        let libvirt = libvirt.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { libvirt.supervise(shutdown).await })
    };

    let result = hypervisor::run(client, libvirt.clone(), &config, readiness, shutdown).await;

    let _ = supervisor.await;
    libvirt.disconnect();
    let _ = server.await;
    result
}
