//! Node health from the node Leases the agents renew (agent/lease.rs), with hysteresis: a node
//! goes unreachable after `grace` without a renewal, and comes back only after two renewals at
//! most `grace` apart. A renewal that is merely late therefore costs at most one transition each
//! way, never a flap per renewal, and every object bound to the node is written only on those
//! transitions.
//!
//! Time is the controller's own (when it saw a renewal), never the agent's clock, so clock skew
//! between nodes does not matter.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::{broadcast, watch};

use super::FIELD_MANAGER;
use super::binding::reason;
use crate::api::{Hypervisor, NODE_LABEL, condition};
use crate::conditions::{self, Desired};

/// A change of a node's reachability.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Node name.
    pub node: String,
    /// Whether it is reachable now.
    pub up: bool,
}

#[derive(Clone, Debug)]
struct Node {
    up: bool,
    /// The Lease's last `renewTime` as seen, to tell a renewal from a repeated event.
    renew: Option<String>,
    /// When this controller last saw a renewal (or started watching).
    seen: Instant,
    /// While unreachable: renewals seen since.
    renewals_since_down: u32,
}

/// The pure state machine: which nodes are reachable.
#[derive(Debug)]
pub struct Tracker {
    grace: Duration,
    nodes: HashMap<String, Node>,
}

impl Tracker {
    /// A tracker with no nodes.
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            nodes: HashMap::new(),
        }
    }

    /// Adds a node seen at startup: reachable unless `unreachable` (what the Hypervisor says, so
    /// a new leader does not undo its predecessor's judgment), counted from `now`.
    pub fn know(&mut self, node: &str, unreachable: bool, now: Instant) {
        self.nodes.entry(node.to_string()).or_insert(Node {
            up: !unreachable,
            renew: None,
            seen: now,
            renewals_since_down: 0,
        });
    }

    /// Records the Lease of `node` with `renew` as its renewTime.
    pub fn observe(
        &mut self,
        node: &str,
        renew: Option<String>,
        now: Instant,
    ) -> Option<Transition> {
        let grace = self.grace;
        let n = self.nodes.entry(node.to_string()).or_insert(Node {
            up: true,
            renew: None,
            seen: now,
            renewals_since_down: 0,
        });
        if renew.is_none() || n.renew == renew {
            return None;
        }
        let first = n.renew.is_none();
        n.renew = renew;
        let since_last = now.saturating_duration_since(n.seen);
        n.seen = now;
        if n.up || first {
            // The first renewal seen after startup only starts the count.
            if !n.up {
                n.renewals_since_down = 1;
            }
            return None;
        }
        n.renewals_since_down += 1;
        if n.renewals_since_down >= 2 && since_last <= grace {
            n.up = true;
            n.renewals_since_down = 0;
            return Some(Transition {
                node: node.to_string(),
                up: true,
            });
        }
        if since_last > grace {
            // Too far apart: this renewal starts the count again.
            n.renewals_since_down = 1;
        }
        None
    }

    /// The nodes whose grace ran out by `now`.
    pub fn tick(&mut self, now: Instant) -> Vec<Transition> {
        let grace = self.grace;
        let mut out = Vec::new();
        for (name, n) in &mut self.nodes {
            if n.up && now.saturating_duration_since(n.seen) > grace {
                n.up = false;
                n.renewals_since_down = 0;
                out.push(Transition {
                    node: name.clone(),
                    up: false,
                });
            }
        }
        out.sort_by(|a, b| a.node.cmp(&b.node));
        out
    }

    /// Whether `node` is reachable; an unknown node is not.
    pub fn is_up(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(|n| n.up)
    }
}

/// The shared view of node health, fed by [`run`].
#[derive(Clone)]
pub struct Health {
    tracker: Arc<Mutex<Tracker>>,
    changes: broadcast::Sender<String>,
    ready: watch::Receiver<bool>,
    ready_tx: Arc<watch::Sender<bool>>,
    grace: Duration,
}

impl Health {
    /// An empty view, not ready until [`run`] has read the Leases and Hypervisors once.
    pub fn new(grace: Duration) -> Self {
        let (ready_tx, ready) = watch::channel(false);
        Self {
            tracker: Arc::new(Mutex::new(Tracker::new(grace))),
            changes: broadcast::channel(1024).0,
            ready,
            ready_tx: Arc::new(ready_tx),
            grace,
        }
    }

    /// Whether `node` counts as reachable.
    pub fn is_up(&self, node: &str) -> bool {
        self.lock().is_up(node)
    }

    /// Waits until the first view is complete.
    pub async fn ready(&self) {
        let mut rx = self.ready.clone();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Names of the nodes whose reachability changes from now on.
    pub fn changes(&self) -> impl Stream<Item = String> + Send + 'static {
        let rx = self.changes.subscribe();
        futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(node) => return Some((node, rx)),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "fell behind the node health changes");
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Watches the node Leases in `namespace` (those labelled with [`NODE_LABEL`]) and keeps
/// `health` current; marks a node's Hypervisor `Ready=False NodeUnreachable` when it goes down
/// (the agent takes the condition back when it returns).
pub async fn run(
    client: Client,
    namespace: String,
    hypervisors: Store<Hypervisor>,
    health: Health,
) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let stream = watcher(leases, watcher::Config::default().labels(NODE_LABEL)).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let tick_every =
        (health.lock().grace / 8).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut initialised = false;
    let _ = hypervisors.wait_until_ready().await;
    loop {
        tokio::select! {
            ev = stream.next() => {
                let Some(ev) = ev else { return };
                let now = Instant::now();
                match ev {
                    Ok(watcher::Event::InitApply(l) | watcher::Event::Apply(l)) => {
                        if let Some(node) = node_of(&l) {
                            if !initialised {
                                know_from_hypervisor(&health, &hypervisors, &node, now);
                            }
                            let t = health.lock().observe(&node, renew_time(&l), now);
                            if let Some(t) = t {
                                publish(&client, &hypervisors, &health, t).await;
                            }
                        }
                    }
                    Ok(watcher::Event::InitDone) if !initialised => {
                        for hv in hypervisors.state() {
                            know_from_hypervisor(&health, &hypervisors, &hv.name_any(), now);
                        }
                        initialised = true;
                        let _ = health.ready_tx.send(true);
                    }
                    Ok(_) => {}
                    Err(err) => tracing::warn!(namespace = %namespace, error = %err, "failed to watch the node Leases; binding waits for them"),
                }
            }
            _ = tick.tick(), if initialised => {
                let now = Instant::now();
                // Hypervisors registered since (without a Lease yet) count from now.
                for hv in hypervisors.state() {
                    health.lock().know(&hv.name_any(), false, now);
                }
                let changes = health.lock().tick(now);
                for t in changes {
                    publish(&client, &hypervisors, &health, t).await;
                }
            }
        }
    }
}

fn know_from_hypervisor(
    health: &Health,
    hypervisors: &Store<Hypervisor>,
    node: &str,
    now: Instant,
) {
    let unreachable = hypervisors
        .state()
        .iter()
        .find(|h| h.name_any() == node)
        .is_some_and(|h| marked_unreachable(h));
    health.lock().know(node, unreachable, now);
}

fn node_of(l: &Lease) -> Option<String> {
    l.labels().get(NODE_LABEL).cloned()
}

fn renew_time(l: &Lease) -> Option<String> {
    l.spec
        .as_ref()?
        .renew_time
        .as_ref()
        .map(|t| t.0.to_string())
}

fn marked_unreachable(hv: &Hypervisor) -> bool {
    let conds = hv
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    conditions::find(conds, condition::READY).is_some_and(|c| c.reason == reason::NODE_UNREACHABLE)
}

async fn publish(client: &Client, hypervisors: &Store<Hypervisor>, health: &Health, t: Transition) {
    if t.up {
        tracing::info!(node = %t.node, "node reachable again");
    } else {
        tracing::warn!(node = %t.node, "node unreachable");
        let hv = hypervisors
            .state()
            .into_iter()
            .find(|h| h.name_any() == t.node);
        if let Some(hv) = hv
            && !marked_unreachable(&hv)
            && let Err(err) = mark_unreachable(client, &hv, health.grace).await
        {
            tracing::warn!(node = %t.node, error = %err, "failed to mark the Hypervisor unreachable");
        }
    }
    let _ = health.changes.send(t.node);
}

/// Marks a Hypervisor `Ready=False NodeUnreachable`, like the node lifecycle controller does
/// for Nodes.
async fn mark_unreachable(
    client: &Client,
    hv: &Hypervisor,
    grace: Duration,
) -> Result<(), kube::Error> {
    let name = hv.name_any();
    let conds = hv
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let desired = Desired::falsy(
        condition::READY,
        reason::NODE_UNREACHABLE,
        format!(
            "The virtplane agent on node {name} has not renewed its Lease for more than {}s. Check that it runs and can reach the API server.",
            grace.as_secs()
        ),
    );
    let body = json!({
        "apiVersion": Hypervisor::api_version(&()), "kind": Hypervisor::kind(&()),
        "metadata": { "name": name },
        "status": { "conditions": conditions::compute(conds, &[desired], None, Timestamp::now()) },
    });
    Api::<Hypervisor>::all(client.clone())
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(40);

    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    fn renew(tr: &mut Tracker, t0: Instant, secs: u64) -> Option<Transition> {
        tr.observe("a", Some(format!("r{secs}")), at(t0, secs))
    }

    #[test]
    fn regular_renewals_keep_a_node_up_without_transitions() {
        let t0 = Instant::now();
        let mut tr = Tracker::new(GRACE);
        for s in (0..300).step_by(10) {
            assert_eq!(renew(&mut tr, t0, s), None);
            assert!(tr.tick(at(t0, s + 5)).is_empty());
        }
        assert!(tr.is_up("a"));
    }

    #[test]
    fn a_pause_shorter_than_the_grace_changes_nothing() {
        let t0 = Instant::now();
        let mut tr = Tracker::new(GRACE);
        renew(&mut tr, t0, 0);
        assert!(tr.tick(at(t0, 39)).is_empty());
        assert_eq!(renew(&mut tr, t0, 39), None);
        assert!(tr.tick(at(t0, 70)).is_empty());
        assert!(tr.is_up("a"));
    }

    #[test]
    fn a_long_pause_is_one_transition_each_way() {
        let t0 = Instant::now();
        let mut tr = Tracker::new(GRACE);
        renew(&mut tr, t0, 0);
        let down = tr.tick(at(t0, 41));
        assert_eq!(
            down,
            vec![Transition {
                node: "a".into(),
                up: false
            }]
        );
        assert!(tr.tick(at(t0, 60)).is_empty(), "no second down");
        // Back: the first renewal is not enough, the second one is.
        assert_eq!(renew(&mut tr, t0, 90), None);
        assert!(!tr.is_up("a"));
        assert_eq!(
            renew(&mut tr, t0, 100),
            Some(Transition {
                node: "a".into(),
                up: true
            })
        );
        assert!(tr.is_up("a"));
    }

    #[test]
    fn renewals_that_keep_coming_late_do_not_flap() {
        let t0 = Instant::now();
        let mut tr = Tracker::new(GRACE);
        renew(&mut tr, t0, 0);
        let mut transitions = 0;
        // Every renewal 45 s after the last: each is past the grace.
        for s in (45..1000).step_by(45) {
            transitions += tr.tick(at(t0, s - 1)).len();
            transitions += usize::from(renew(&mut tr, t0, s).is_some());
        }
        assert_eq!(transitions, 1, "down once, then it stays down");
        assert!(!tr.is_up("a"));
    }

    #[test]
    fn repeated_events_of_the_same_renewal_count_once() {
        let t0 = Instant::now();
        let mut tr = Tracker::new(GRACE);
        renew(&mut tr, t0, 0);
        tr.tick(at(t0, 50));
        assert_eq!(tr.observe("a", Some("r60".into()), at(t0, 60)), None);
        assert_eq!(tr.observe("a", Some("r60".into()), at(t0, 61)), None);
        assert!(!tr.is_up("a"));
    }

    #[test]
    fn startup_keeps_the_previous_judgment_and_unknown_nodes_are_down() {
        let t0 = Instant::now();
        let mut tr = Tracker::new(GRACE);
        tr.know("a", true, t0);
        tr.know("b", false, t0);
        assert!(!tr.is_up("a") && tr.is_up("b") && !tr.is_up("zz"));
        // A node whose Hypervisor exists but whose Lease never shows goes down after the grace.
        assert_eq!(
            tr.tick(at(t0, 41)),
            vec![Transition {
                node: "b".into(),
                up: false
            }]
        );
        // The down node comes back after two renewals.
        assert_eq!(renew(&mut tr, t0, 50), None);
        assert!(renew(&mut tr, t0, 55).is_some_and(|t| t.up));
    }
}
