//! A busy or paused agent is not a dead one: the controller judges a node by its Lease, with
//! hysteresis. With many objects bound, pausing the agent (SIGSTOP) for less than the grace
//! period writes nothing to them; pausing it for longer changes each object exactly once each
//! way (Scheduled: Bound -> NodeUnreachable -> Bound).

#![allow(clippy::unwrap_used)]

mod common;
mod fleet;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::*;
use fleet::*;

/// Objects in the test: `DOMAINS` shut-off domains with `PER_DOMAIN` scsi disks each.
const DOMAINS: usize = 100;
const PER_DOMAIN: usize = 10;
/// The controller's grace (seconds); the agent renews its Lease every second.
const GRACE: u64 = 10;

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid} failed");
}

#[tokio::test]
async fn a_paused_agent_writes_nothing_and_a_dead_one_flips_each_object_once_each_way() {
    let n = DOMAINS * PER_DOMAIN;
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-lease").await;
    let _leftovers = Leftovers(ns.name.clone());
    let agent = Agent::start(&unique("vp-node"), &["--heartbeat-seconds", "1"]);
    let _controller = start_controller(
        &unique("vp-ctl"),
        &ns.name,
        "virtplane-controller",
        &["--node-grace-seconds", &GRACE.to_string()],
    );
    let fleet = Fleet::define("vp-lease", DOMAINS, PER_DOMAIN);
    fleet
        .create_settled(&client, &ns.name, Duration::from_secs(900))
        .await;

    // At rest, nothing is written: two reads of every object GRACE apart are the same.
    let (took, w) = wait_quiet(
        &client,
        &ns.name,
        Duration::from_secs(GRACE),
        Duration::from_secs(60),
    )
    .await;
    assert!(
        w.is_empty(),
        "still written {took:?} after all were Ready: {} objects, first {:?}",
        w.len(),
        &w[..w.len().min(3)]
    );

    // Paused for less than the grace period: not one write.
    let before = snapshot(&client, &ns.name).await;
    let pid = agent.process.pid();
    signal(pid, "-STOP");
    tokio::time::sleep(Duration::from_secs(GRACE / 2)).await;
    signal(pid, "-CONT");
    // Long enough for a flap to show: past the grace period counted from the pause.
    tokio::time::sleep(Duration::from_secs(GRACE * 2)).await;
    let w = writes(&before, &snapshot(&client, &ns.name).await);
    assert!(
        w.is_empty(),
        "a short pause wrote to {} objects: {:?}",
        w.len(),
        &w[..w.len().min(5)]
    );

    // Paused for longer than the grace period: each object once to NodeUnreachable and, once the
    // agent is back, once back to Bound. A watch records every write in between.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let recorder = tokio::spawn(record_writes(
        client.clone(),
        ns.name.clone(),
        started_tx,
        stop_rx,
    ));
    started_rx.await.unwrap();
    signal(pid, "-STOP");
    wait_all(
        &client,
        &ns.name,
        n,
        "NodeUnreachable while the agent is stopped",
        Duration::from_secs(300),
        |o| scheduled_reason(o).as_deref() == Some("NodeUnreachable"),
    )
    .await;
    // Still stopped, a while longer: the controller does not repeat itself.
    tokio::time::sleep(Duration::from_secs(GRACE)).await;
    signal(pid, "-CONT");
    wait_all(
        &client,
        &ns.name,
        n,
        "Bound again after the agent resumed",
        Duration::from_secs(300),
        |o| settled(o, "Bound"),
    )
    .await;
    // Settle, then count.
    tokio::time::sleep(Duration::from_secs(GRACE * 2)).await;
    stop_tx.send(true).unwrap();
    let seen = recorder.await.unwrap();
    let mut per_object: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    for (name, _rv, reason) in seen {
        per_object.entry(name).or_default().push(reason);
    }
    let want = vec![
        Some("NodeUnreachable".to_string()),
        Some("Bound".to_string()),
    ];
    let wrong: Vec<_> = per_object
        .iter()
        .filter(|(_, writes)| **writes != want)
        .take(5)
        .collect();
    assert_eq!(per_object.len(), n, "every object was written");
    assert!(
        wrong.is_empty(),
        "objects not written exactly once each way: {wrong:?}"
    );

    // Clean up: delete everything while the agent runs, so its finalizers are released.
    fleet.delete(&client, &ns.name).await;
    wait_all(
        &client,
        &ns.name,
        0,
        "all deleted",
        Duration::from_secs(600),
        |_| true,
    )
    .await;
    assert!(
        fleet.definitions_clean(),
        "a domain definition still holds a fleet disk"
    );
    drop(agent);
}
