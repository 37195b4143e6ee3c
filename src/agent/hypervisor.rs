//! Keeps this node's `Hypervisor` object current: inventory, readiness and heartbeat.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use super::{AgentConfig, AgentError, FIELD_MANAGER};
use crate::api::{Hypervisor, HypervisorStatus, condition};
use crate::conditions::{self, Desired};
use crate::http::Gate;
use crate::libvirt::{Event, Inventory, Libvirt};
use crate::shutdown::Shutdown;

/// Reasons of the Hypervisor `Ready` condition.
pub mod reason {
    /// Connected and the inventory is current.
    pub const CONNECTED: &str = "LibvirtConnected";
    /// libvirtd cannot be reached.
    pub const UNAVAILABLE: &str = "LibvirtUnavailable";
    /// Connected, but reading the inventory failed.
    pub const INVENTORY_FAILED: &str = "InventoryFailed";
}

/// How long to gather a burst of libvirt events into one inventory refresh.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// What this loop last wrote, to skip writes that would change nothing but the heartbeat.
struct Written {
    status: HypervisorStatus,
    at: std::time::Instant,
}

pub(super) async fn run(
    client: Client,
    libvirt: Libvirt,
    config: &AgentConfig,
    registered: Gate,
    mut shutdown: Shutdown,
) -> Result<(), AgentError> {
    let node = config.node_name.clone();
    let api: Api<Hypervisor> = Api::all(client);
    let params = PatchParams::apply(FIELD_MANAGER).force();

    // Register, retrying with back-off: a missing permission or an unreachable API server is
    // logged and retried, not a silent hang.
    let mut backoff = Duration::from_secs(1);
    let existing = loop {
        let attempt = async {
            register(&api, &node, &params, &config.libvirt_uri).await?;
            api.get_status(&node).await
        };
        match attempt.await {
            Ok(h) => break h,
            Err(source) => {
                let err = AgentError::Hypervisor {
                    node: node.clone(),
                    source,
                };
                tracing::warn!(error = %err, retry_in = ?backoff, "failed to register this node's Hypervisor");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    };
    let mut conditions = existing.status.map(|s| s.conditions).unwrap_or_default();
    let mut last_inventory: Option<Inventory> = None;
    let mut written: Option<Written> = None;
    let mut events = libvirt.subscribe();
    let mut registered = Some(registered);
    let mut heartbeat = tokio::time::interval(config.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        let ready = match libvirt.inventory().await {
            Ok(inventory) => {
                super::roots::warn_about(&inventory.storage_pools).await;
                last_inventory = Some(inventory);
                Desired::truthy(
                    condition::READY,
                    reason::CONNECTED,
                    "The agent is connected to libvirt and the inventory is current.",
                )
            }
            Err(err) if !libvirt.is_connected() => Desired::falsy(
                condition::READY,
                reason::UNAVAILABLE,
                format!(
                    "{err}. The inventory shown is the last one read and may be stale; check that libvirtd is running on the node."
                ),
            ),
            Err(err) => Desired::falsy(
                condition::READY,
                reason::INVENTORY_FAILED,
                format!("{err}. The inventory shown is the last one read and may be stale."),
            ),
        };
        // After a gap in this loop's writes the controller may have marked the node unreachable:
        // start from the conditions on the server, so Ready's transition time tells the truth.
        let gap = written
            .as_ref()
            .is_some_and(|w| w.at.elapsed() > config.heartbeat_interval * 3);
        if gap && let Ok(h) = api.get_status(&node).await {
            conditions = h.status.map(|s| s.conditions).unwrap_or_default();
            written = None;
        }
        conditions = conditions::compute(&conditions, &[ready], None, Timestamp::now());
        let status = build_status(last_inventory.as_ref(), conditions.clone());

        let due = written.as_ref().is_none_or(|w| {
            w.status != status
                || w.at.elapsed()
                    >= config
                        .heartbeat_interval
                        .saturating_sub(Duration::from_millis(500))
        });
        if due {
            let mut body = status.clone();
            body.last_heartbeat_time = Some(Time(Timestamp::now()));
            let mut result = write_status(&api, &node, &params, &body).await;
            if matches!(&result, Err(kube::Error::Api(s)) if s.code == 404) {
                // Someone deleted the Hypervisor: register again.
                result = match register(&api, &node, &params, &config.libvirt_uri).await {
                    Ok(()) => write_status(&api, &node, &params, &body).await,
                    Err(e) => Err(e),
                };
            }
            match result {
                Ok(()) => {
                    written = Some(Written {
                        status,
                        at: std::time::Instant::now(),
                    });
                    if let Some(gate) = registered.take() {
                        gate.open();
                    }
                }
                Err(err) => {
                    tracing::warn!(node = %node, error = %err, "failed to write Hypervisor status")
                }
            }
        }

        if !wait_for_change(&mut events, &mut heartbeat, &mut shutdown).await {
            return Ok(());
        }
    }
}

/// Waits for a relevant libvirt event (then gathers the rest of its burst), the heartbeat, or
/// shutdown; returns false on shutdown.
async fn wait_for_change(
    events: &mut tokio::sync::broadcast::Receiver<Event>,
    heartbeat: &mut tokio::time::Interval,
    shutdown: &mut Shutdown,
) -> bool {
    loop {
        tokio::select! {
            ev = events.recv() => {
                if is_relevant(&ev) {
                    tokio::time::sleep(DEBOUNCE).await;
                    while events.try_recv().is_ok() {}
                    return true;
                }
            }
            _ = heartbeat.tick() => return true,
            _ = shutdown.changed() => return false,
        }
    }
}

/// Creates or updates this node's Hypervisor object.
async fn register(
    api: &Api<Hypervisor>,
    node: &str,
    params: &PatchParams,
    uri: &str,
) -> Result<(), kube::Error> {
    let body = json!({
        "apiVersion": Hypervisor::api_version(&()),
        "kind": Hypervisor::kind(&()),
        "metadata": { "name": node },
        "spec": { "libvirtUri": uri },
    });
    api.patch(node, params, &Patch::Apply(body))
        .await
        .map(|_| ())
}

fn is_relevant(ev: &Result<Event, RecvError>) -> bool {
    match ev {
        Ok(Event::Domain {
            kind: crate::libvirt::DomainEvent::Lifecycle(_),
            ..
        })
        | Ok(
            Event::StoragePool { .. } | Event::Network { .. } | Event::Closed | Event::Connected,
        )
        | Err(RecvError::Lagged(_)) => true,
        Ok(Event::Domain { .. }) => false,
        Err(RecvError::Closed) => false,
    }
}

fn build_status(inventory: Option<&Inventory>, conditions: Vec<Condition>) -> HypervisorStatus {
    let inv = inventory.cloned().unwrap_or_default();
    HypervisorStatus {
        libvirt_version: inventory.map(|i| i.libvirt_version.clone()),
        hypervisor_version: inventory.map(|i| i.hypervisor_version.clone()),
        domains: inv.domains,
        storage_pools: inv.storage_pools,
        networks: inv.networks,
        last_heartbeat_time: None,
        conditions,
    }
}

async fn write_status(
    api: &Api<Hypervisor>,
    node: &str,
    params: &PatchParams,
    status: &HypervisorStatus,
) -> Result<(), kube::Error> {
    let body = json!({
        "apiVersion": Hypervisor::api_version(&()),
        "kind": Hypervisor::kind(&()),
        "metadata": { "name": node },
        "status": status,
    });
    api.patch_status(node, params, &Patch::Apply(body))
        .await
        .map(|_| ())
}
