//! Keeps this node's `Hypervisor` object current: inventory and readiness, written only when they
//! change. Liveness is not written here: the node Lease (lease.rs) carries the heartbeat, so a
//! thousand bound objects never depend on this loop keeping time.

use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
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
    /// Connected, but libvirt did not answer in time (`--libvirt-call-timeout`).
    pub const LIBVIRT_TIMEOUT: &str = "LibvirtTimeout";
}

/// How long to gather a burst of libvirt events into one inventory refresh.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// What this loop last wrote, to skip writes that would change nothing.
struct Written {
    status: HypervisorStatus,
}

/// What woke the loop.
enum Wake {
    /// A libvirt event or the periodic re-read: read the inventory again.
    Refresh,
    /// Someone else changed (or deleted) this Hypervisor's Ready condition, for example the
    /// controller marking the node unreachable while this agent was stopped: take it back.
    Overwritten(Option<Vec<Condition>>),
    /// Stop.
    Shutdown,
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
    let own = watcher(
        api.clone(),
        watcher::Config::default().fields(&format!("metadata.name={node}")),
    )
    .default_backoff();
    let mut own = std::pin::pin!(own);
    let mut overwritten = false;
    let mut own_ended = false;

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
            Err(err) if err.kind() == crate::libvirt::ErrorKind::Timeout => Desired::falsy(
                condition::READY,
                reason::LIBVIRT_TIMEOUT,
                format!(
                    "{err}. The inventory shown is the last one read and may be stale; check libvirtd and the node's storage pools."
                ),
            ),
            Err(err) => Desired::falsy(
                condition::READY,
                reason::INVENTORY_FAILED,
                format!("{err}. The inventory shown is the last one read and may be stale."),
            ),
        };
        conditions = conditions::compute(&conditions, &[ready], None, Timestamp::now());
        let status = build_status(last_inventory.as_ref(), conditions.clone());

        let due = overwritten || written.as_ref().is_none_or(|w| w.status != status);
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
                    written = Some(Written { status });
                    overwritten = false;
                    if let Some(gate) = registered.take() {
                        gate.open();
                    }
                }
                Err(err) => {
                    tracing::warn!(node = %node, error = %err, "failed to write Hypervisor status")
                }
            }
        }

        loop {
            match wait_for_change(
                &mut events,
                &mut heartbeat,
                &mut own,
                &mut own_ended,
                &mut shutdown,
            )
            .await
            {
                Wake::Refresh => break,
                Wake::Overwritten(server) => {
                    if server
                        .as_deref()
                        .is_some_and(|s| same_ready(s, &conditions))
                    {
                        // The echo of this loop's own write.
                        continue;
                    }
                    // Start from the conditions on the server, so Ready's transition time
                    // tells the truth, and write Ready back.
                    if let Some(server) = server {
                        conditions = server;
                    }
                    overwritten = true;
                    break;
                }
                Wake::Shutdown => return Ok(()),
            }
        }
    }
}

/// Whether both lists say the same of `Ready` (status, reason, message; times are not compared:
/// the server keeps them to the second).
fn same_ready(a: &[Condition], b: &[Condition]) -> bool {
    let key = |c: &[Condition]| {
        conditions::find(c, condition::READY)
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    key(a) == key(b)
}

/// Waits for a relevant libvirt event (then gathers the rest of its burst), the periodic
/// re-read, a change of this node's Hypervisor on the server, or shutdown.
async fn wait_for_change(
    events: &mut tokio::sync::broadcast::Receiver<Event>,
    heartbeat: &mut tokio::time::Interval,
    own: &mut (impl Stream<Item = Result<watcher::Event<Hypervisor>, watcher::Error>> + Unpin),
    own_ended: &mut bool,
    shutdown: &mut Shutdown,
) -> Wake {
    loop {
        tokio::select! {
            ev = events.recv() => {
                if is_relevant(&ev) {
                    tokio::time::sleep(DEBOUNCE).await;
                    while events.try_recv().is_ok() {}
                    return Wake::Refresh;
                }
            }
            _ = heartbeat.tick() => return Wake::Refresh,
            ev = own.next(), if !*own_ended => match ev {
                Some(Ok(watcher::Event::Apply(h) | watcher::Event::InitApply(h))) => {
                    return Wake::Overwritten(Some(h.status.map(|s| s.conditions).unwrap_or_default()));
                }
                Some(Ok(watcher::Event::Delete(_))) => return Wake::Overwritten(None),
                Some(Ok(_)) => {}
                Some(Err(err)) => tracing::debug!(error = %err, "watch of this node's Hypervisor"),
                // The watcher retries with back-off and never ends; if it did, libvirt events and
                // the periodic re-read still drive this loop.
                None => *own_ended = true,
            },
            _ = shutdown.changed() => return Wake::Shutdown,
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

/// Whether `ev` can change the inventory. A replaced definition cannot (a device attached to a
/// shut-off domain, say): the inventory holds each domain's name, UUID, state and persistence.
fn is_relevant(ev: &Result<Event, RecvError>) -> bool {
    use crate::libvirt::{DomainEvent, Lifecycle};
    match ev {
        Ok(Event::Domain {
            kind: DomainEvent::Lifecycle(Lifecycle::Updated),
            ..
        }) => false,
        Ok(Event::Domain {
            kind: DomainEvent::Lifecycle(_),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::{DomainEvent, Lifecycle};

    fn domain(kind: DomainEvent) -> Result<Event, RecvError> {
        Ok(Event::Domain {
            name: "vm".into(),
            kind,
        })
    }

    #[test]
    fn only_events_that_can_change_the_inventory_refresh_it() {
        assert!(!is_relevant(&domain(DomainEvent::Lifecycle(
            Lifecycle::Updated
        ))));
        assert!(!is_relevant(&domain(DomainEvent::DeviceAdded(
            "ua-x".into()
        ))));
        for l in [
            Lifecycle::Defined,
            Lifecycle::Undefined,
            Lifecycle::Started,
            Lifecycle::Stopped,
        ] {
            assert!(is_relevant(&domain(DomainEvent::Lifecycle(l))), "{l:?}");
        }
        assert!(is_relevant(&Ok(Event::Closed)));
        assert!(is_relevant(&Err(RecvError::Lagged(3))));
    }
}
