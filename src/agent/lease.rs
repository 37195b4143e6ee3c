//! This node's heartbeat: a `coordination.k8s.io/v1` Lease renewed on a thread of its own, with
//! an API client of its own, the way kubelets renew theirs. Neither libvirt (its call slots, a
//! hung libvirtd) nor reconcile work (a burst of a thousand objects) can delay a renewal: they
//! share no queue, no runtime and no connection with it. The controller judges the node's
//! liveness from this Lease alone.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource};
use serde_json::json;

use super::AgentConfig;
use crate::api::NODE_LABEL;
use crate::shutdown::Shutdown;

/// Field manager of the node Lease.
const FIELD_MANAGER: &str = "virtplane-agent-lease";

/// Name of the Lease of `node`.
pub fn name(node: &str) -> String {
    format!("virtplane-node-{node}")
}

/// Starts the renewal thread; it stops when `shutdown` fires.
pub(super) fn spawn(
    config: &AgentConfig,
    shutdown: Shutdown,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let node = config.node_name.clone();
    let namespace = config.lease_namespace.clone();
    let every = config.heartbeat_interval;
    std::thread::Builder::new()
        .name("node-lease".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(err) => {
                    tracing::error!(error = %err, "failed to start the node Lease thread; the controller will count this node unreachable");
                    return;
                }
            };
            runtime.block_on(renew_until_shutdown(node, namespace, every, shutdown));
        })
}

async fn renew_until_shutdown(
    node: String,
    namespace: String,
    every: Duration,
    mut shutdown: Shutdown,
) {
    // A client of its own: its own connection pool, never queued behind reconcile requests.
    let client = loop {
        match Client::try_default().await {
            Ok(c) => break c,
            Err(err) => {
                tracing::warn!(error = %err, "failed to create the node Lease client; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    };
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let lease = name(&node);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let duration = i32::try_from(every.as_secs().saturating_mul(4)).unwrap_or(i32::MAX);
    let deadline =
        Duration::from_secs(u64::try_from(duration).unwrap_or(40)).max(Duration::from_secs(5));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let body = json!({
            "apiVersion": Lease::api_version(&()),
            "kind": Lease::kind(&()),
            "metadata": { "name": lease, "namespace": namespace, "labels": { NODE_LABEL: node } },
            "spec": {
                "holderIdentity": node,
                "leaseDurationSeconds": duration,
                "renewTime": MicroTime(Timestamp::now()),
            },
        });
        // Bounded by the Lease's own duration, so a hung connection cannot hold renewals back
        // for longer; a slow API server is waited for (dropping a slow renewal only adds load).
        let patch = Patch::Apply(body);
        let request = api.patch(&lease, &params, &patch);
        match tokio::time::timeout(deadline, request).await {
            Ok(Ok(_)) => {
                if failing {
                    tracing::info!(lease = %lease, "node Lease renewed again");
                }
                failing = false;
            }
            Ok(Err(err)) => {
                if !failing {
                    tracing::warn!(lease = %lease, namespace = %namespace, error = %err, "failed to renew the node Lease; the controller counts this node unreachable once its grace runs out");
                }
                failing = true;
            }
            Err(_) => {
                if !failing {
                    tracing::warn!(lease = %lease, "renewing the node Lease timed out");
                }
                failing = true;
            }
        }
    }
}
