//! Benchmark (not a test): N `VirtualMachineStorage` objects (scsi disks) on M shut-off domains,
//! created at once, left alone, then deleted; idle and with a busy loop on every core.
//!
//! Needs the local environment (`eval "$(hack/env-up.sh)"`); run with
//! `cargo bench --bench scale`. Settings (environment): `VIRTPLANE_SCALE_OBJECTS` (1000),
//! `VIRTPLANE_SCALE_DOMAINS` (100), `VIRTPLANE_SCALE_REST_SECONDS` (60),
//! `VIRTPLANE_SCALE_MODES` (`idle,loaded`).
//!
//! Prints, per mode: time to create and to all Ready, writes at rest (every object read twice,
//! REST seconds apart, with the field managers that wrote any change), the agent's and the
//! controller's peak RSS (VmHWM), API requests per object (apiserver_request_total), the agent's
//! reconciles and libvirt calls per object (its `/metrics`), and the
//! time to delete everything until every object is gone and every definition clean. Each figure
//! is printed next to its goal.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/fleet/mod.rs"]
mod fleet;
#[path = "measure/mod.rs"]
mod measure;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fleet::*;
use measure::*;

/// Busy loops, one per core, until dropped.
struct Hogs(Vec<Child>);

impl Hogs {
    fn start() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self(
            (0..cores)
                .map(|_| {
                    Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .stdout(Stdio::null())
                        .spawn()
                        .expect("start a CPU hog")
                })
                .collect(),
        )
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn row(figure: &str, value: String, goal: &str) {
    println!("  {figure:<52} {value:>14}   goal {goal}");
}

async fn run(mode: &str, objects: usize, domains: usize, rest: Duration) {
    let client = client().await;
    install_crds(&client).await;
    let per_domain = objects.div_ceil(domains);
    let ns = TestNamespace::new(&client, "vp-scale").await;
    let fleet = Fleet::define("vp-scale", domains, per_domain);
    let n = fleet.names.len();
    let agent = Agent::start(&unique("vp-scale-node"), &[]);
    let controller = start_controller(
        &unique("vp-scale-ctl"),
        &ns.name,
        "virtplane-controller",
        &[],
    );
    wait_hypervisor(
        &client,
        &agent.node,
        "registered",
        Duration::from_secs(60),
        |h| {
            h.status
                .as_ref()
                .is_some_and(|s| s.domains.len() >= domains)
        },
    )
    .await;
    let _hogs = (mode == "loaded").then(Hogs::start);
    println!(
        "scale, {mode}: {n} VirtualMachineStorage objects (scsi disks) on {domains} shut-off domains"
    );

    let (all0, ours0) = api_requests();
    let start = Instant::now();
    fleet.create(&client, &ns.name).await;
    let created = start.elapsed();
    let ready = wait_all(
        &client,
        &ns.name,
        n,
        "all Ready",
        Duration::from_secs(900),
        |o| settled(o, "Bound"),
    )
    .await;
    let (all1, ours1) = api_requests();
    let at_ready = agent_counters(&agent.process.http_get("/metrics"));

    let first = snapshot(&client, &ns.name).await;
    tokio::time::sleep(rest).await;
    let second = snapshot(&client, &ns.name).await;
    let written = writes(&first, &second);
    let mut by_manager: BTreeMap<String, usize> = BTreeMap::new();
    for (_, managers) in &written {
        for m in managers {
            *by_manager.entry(m.clone()).or_default() += 1;
        }
    }
    let (all2, ours2) = api_requests();

    let start = Instant::now();
    fleet.delete(&client, &ns.name).await;
    let requested = start.elapsed();
    wait_all(
        &client,
        &ns.name,
        0,
        "all deleted",
        Duration::from_secs(900),
        |_| true,
    )
    .await;
    let gone = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !fleet.definitions_clean() {
        assert!(
            Instant::now() < deadline,
            "definitions still hold fleet disks"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deleted = start.elapsed();
    let (all3, ours3) = api_requests();
    let at_deleted = agent_counters(&agent.process.http_get("/metrics"));
    let (agent_rss, controller_rss) = (
        peak_rss_mib(agent.process.pid()),
        peak_rss_mib(controller.pid()),
    );

    let per = |d: f64| format!("{:.1}", d / n as f64);
    let per_min = written.len() as f64 * 60.0 / rest.as_secs_f64();
    row(
        "create (client, 32 at a time)",
        format!("{created:.1?}"),
        "-",
    );
    row(
        "all Ready, after the last create",
        format!("{ready:.1?}"),
        "< 60 s",
    );
    row(
        &format!("writes at rest per minute (over {}s)", rest.as_secs()),
        format!("{per_min:.0}"),
        "0",
    );
    if !by_manager.is_empty() {
        println!(
            "    written by: {by_manager:?}; first: {:?}",
            &written[..written.len().min(3)]
        );
    }
    row(
        "agent peak RSS (VmHWM)",
        format!("{agent_rss:.1} MiB"),
        "< 64 MiB",
    );
    row(
        "controller peak RSS (VmHWM)",
        format!("{controller_rss:.1} MiB"),
        "-",
    );
    row(
        "API requests per object, create to Ready (all)",
        per(all1 - all0),
        "-",
    );
    row("  of them virtplane.io", per(ours1 - ours0), "-");
    row(
        "API requests per object, at rest (all)",
        per(all2 - all1),
        "-",
    );
    row(
        "API requests per object, delete (all)",
        per(all3 - all2),
        "-",
    );
    row("  of them virtplane.io", per(ours3 - ours2), "-");
    row(
        "delete (client, 32 at a time; reference)",
        format!("{requested:.1?}"),
        "-",
    );
    row("delete all: objects gone", format!("{gone:.1?}"), "-");
    row(
        "delete all: objects gone and definitions clean",
        format!("{deleted:.1?}"),
        "< 60 s",
    );
    println!("  agent's work per object (its /metrics), create to Ready | delete:");
    for (what, total) in &at_deleted {
        let ready = at_ready.get(what).copied().unwrap_or(0.0);
        println!(
            "    {what:<58} {:>8.2} | {:>8.2}",
            ready / n as f64,
            (total - ready) / n as f64
        );
    }
    println!(
        "  (API requests include this benchmark's own: {n} creates, {n} deletes, and a list of the namespace every 250 ms while waiting)"
    );
    drop(agent);
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; nothing else is taken from the command line.
    let objects: usize = setting("VIRTPLANE_SCALE_OBJECTS", "1000").parse().unwrap();
    let domains: usize = setting("VIRTPLANE_SCALE_DOMAINS", "100").parse().unwrap();
    let rest = Duration::from_secs(
        setting("VIRTPLANE_SCALE_REST_SECONDS", "60")
            .parse()
            .unwrap(),
    );
    for mode in setting("VIRTPLANE_SCALE_MODES", "idle,loaded").split(',') {
        run(mode.trim(), objects, domains, rest).await;
    }
}
