//! Benchmark (not a test): the multi-node variant of `benches/scale.rs`. N agents, each a real
//! `virtplane agent` process with its own node name, state directory and libvirt connection to
//! libvirt's `test:///` driver loaded from its own node XML file (shut-off domains and one dir
//! pool, no QEMU), and one controller; M `VirtualMachineStorage` objects spread across the nodes'
//! domains are created at once, left alone, then deleted.
//!
//! The `test:///` driver runs inside each agent's process (no libvirtd), so each agent has its
//! own in-memory inventory. It stands in for QEMU only here: it measures the controller's binding
//! throughput and memory and the agents' footprint at fleet size; the QEMU paths are measured by
//! `benches/scale.rs` and tested by `tests/`.
//!
//! Needs the apiserver of the local environment (`eval "$(hack/env-up.sh)"`); hold the test lock:
//! `flock -o /tmp/virtplane-itest.lock cargo bench --bench scale_nodes`. Settings (environment):
//! `VIRTPLANE_SCALE_NODES` (50), `VIRTPLANE_SCALE_OBJECTS` (5000),
//! `VIRTPLANE_SCALE_DOMAINS_PER_NODE` (10), `VIRTPLANE_SCALE_REST_SECONDS` (60),
//! `VIRTPLANE_SCALE_READY_TIMEOUT` (600 seconds; the other figures are measured anyway).
//!
//! Prints: time to all Bound (the controller's binding) and to all Ready (the agents' attach),
//! writes at rest, the controller's peak RSS and the agents' (largest and sum), API requests per
//! object, and the time to delete everything, each next to the single-node figures' goals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/fleet/mod.rs"]
mod fleet;
#[path = "measure/mod.rs"]
mod measure;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, DeleteParams, PostParams};
use virtplane::api::VirtualMachineStorage;

use common::*;
use fleet::*;
use measure::*;

/// Requests in flight at once when creating or deleting objects (as in `benches/scale.rs`).
const CONCURRENCY: usize = 32;

/// libvirt's test driver's namespace: `<test:runstate>5</test:runstate>` defines a domain shut
/// off (the driver starts the domains of a node file otherwise).
const TEST_NS: &str = "http://libvirt.org/schemas/domain/test/1.0";

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn row(figure: &str, value: String, goal: &str) {
    println!("  {figure:<56} {value:>14}   {goal}");
}

/// One node's libvirt: its node XML file, its domains, and the files behind its objects.
struct Node {
    name: String,
    uri: String,
    state_dir: PathBuf,
    /// (object name, domain, source path).
    objects: Vec<(String, String, PathBuf)>,
}

/// Writes the node file of node `n`: `domains` shut-off domains with a virtio-scsi controller
/// and a dir pool holding one sparse 1 MiB file per object (created on disk too: the agent
/// checks the source of a disk exists).
fn write_node(root: &Path, run: &str, n: usize, domains: usize, objects: usize) -> Node {
    let name = format!("{run}-n{n:03}");
    let dir = root.join(&name);
    let pool_dir = dir.join("pool");
    let state_dir = dir.join("state");
    std::fs::create_dir_all(&pool_dir).unwrap();
    std::fs::create_dir_all(&state_dir).unwrap();
    let mut xml = String::from("<?xml version=\"1.0\"?>\n<node>\n");
    let domain_names: Vec<String> = (0..domains).map(|d| format!("{name}-d{d:03}")).collect();
    for d in &domain_names {
        xml.push_str(&format!(
            "  <domain type='test' xmlns:test='{TEST_NS}'><name>{d}</name>\
             <memory unit='MiB'>64</memory><os><type>hvm</type></os>\
             <devices><controller type='scsi' index='0' model='virtio-scsi'/></devices>\
             <test:runstate>5</test:runstate></domain>\n"
        ));
    }
    let mut objs = Vec::new();
    xml.push_str(&format!(
        "  <pool type='dir'><name>{name}-pool</name><target><path>{}</path></target>\n",
        pool_dir.display()
    ));
    for i in 0..objects {
        let d = &domain_names[i % domains];
        let obj = format!("{name}-o{i:04}");
        let path = pool_dir.join(format!("{obj}.img"));
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        xml.push_str(&format!(
            "    <volume type='file'><name>{obj}.img</name><capacity unit='MiB'>1</capacity>\
             <target><path>{}</path></target></volume>\n",
            path.display()
        ));
        objs.push((obj, d.clone(), path));
    }
    xml.push_str("  </pool>\n");
    xml.push_str(
        "  <cpu><mhz>2000</mhz><model>i686</model><active>2</active><nodes>1</nodes>\
         <sockets>1</sockets><cores>2</cores><threads>1</threads></cpu>\n  <memory>8388608</memory>\n</node>\n",
    );
    let file = dir.join("node.xml");
    std::fs::write(&file, xml).unwrap();
    Node {
        name,
        uri: format!("test://{}", file.display()),
        state_dir,
        objects: objs,
    }
}

fn object(name: &str, vm: &str, path: &Path) -> VirtualMachineStorage {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "virtplane.io/v1alpha1", "kind": "VirtualMachineStorage",
        "metadata": { "name": name },
        "spec": { "vm": vm, "type": "disk", "source": { "path": path } },
    }))
    .unwrap()
}

fn scheduled_bound(o: &VirtualMachineStorage) -> bool {
    scheduled_reason(o).as_deref() == Some("Bound")
}

/// The Ready condition's reason of every object, counted.
fn ready_reasons(items: &[VirtualMachineStorage]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for o in items {
        let r = o
            .status
            .as_ref()
            .and_then(|s| condition_of(&s.conditions, "Ready"))
            .map_or("(none)".to_string(), |(s, r, _)| format!("{s}/{r}"));
        *out.entry(r).or_default() += 1;
    }
    out
}

/// Waits until all `n` objects are Ready (and Bound); after `timeout`, prints how many are in
/// which Ready state and returns false, so the other figures are still measured.
async fn wait_ready(client: &kube::Client, ns: &str, n: usize, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        let items = list(client, ns).await;
        if items.iter().filter(|o| settled(o, "Bound")).count() == n {
            return true;
        }
        if start.elapsed() > timeout {
            println!(
                "  not all Ready after {timeout:?}; Ready status/reason of the {n}: {:?}",
                ready_reasons(&items)
            );
            return false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::main]
async fn main() {
    let nodes: usize = setting("VIRTPLANE_SCALE_NODES", "50").parse().unwrap();
    let objects: usize = setting("VIRTPLANE_SCALE_OBJECTS", "5000").parse().unwrap();
    let per_node_domains: usize = setting("VIRTPLANE_SCALE_DOMAINS_PER_NODE", "10")
        .parse()
        .unwrap();
    let rest = Duration::from_secs(
        setting("VIRTPLANE_SCALE_REST_SECONDS", "60")
            .parse()
            .unwrap(),
    );
    let per_node = objects.div_ceil(nodes);
    let n_objects = per_node * nodes;

    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-scalen").await;
    let _leftovers = Leftovers(ns.name.clone());
    let run = unique("vpsn");
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("scale-nodes");
    let _ = std::fs::remove_dir_all(&root);
    let fleet: Vec<Node> = (0..nodes)
        .map(|n| write_node(&root, &run, n, per_node_domains, per_node))
        .collect();
    println!(
        "scale, {nodes} nodes (libvirt test:/// driver, one agent process each): {n_objects} \
         VirtualMachineStorage objects on {} shut-off domains; load average before: {}",
        nodes * per_node_domains,
        load_average()
    );

    let started = Instant::now();
    let agents: Vec<Agent> = fleet
        .iter()
        .map(|node| {
            let state = node.state_dir.to_string_lossy().into_owned();
            Agent::start(
                &node.name,
                &["--libvirt-uri", &node.uri, "--state-dir", &state],
            )
        })
        .collect();
    let controller = start_controller(
        &unique("vp-scalen-ctl"),
        &ns.name,
        "virtplane-controller",
        &[],
    );
    for node in &fleet {
        wait_hypervisor(
            &client,
            &node.name,
            "registered",
            Duration::from_secs(300),
            |h| {
                h.status
                    .as_ref()
                    .is_some_and(|s| s.domains.len() >= per_node_domains)
            },
        )
        .await;
    }
    let registered = started.elapsed();
    let agents_rss_started: Vec<f64> = agents
        .iter()
        .map(|a| peak_rss_mib(a.process.pid()))
        .collect();

    let api: Api<VirtualMachineStorage> = Api::namespaced(client.clone(), &ns.name);
    let all: Vec<&(String, String, PathBuf)> = fleet.iter().flat_map(|n| &n.objects).collect();
    let (all0, ours0) = api_requests();
    let start = Instant::now();
    futures::stream::iter(all.iter())
        .map(|(name, vm, path)| {
            let api = api.clone();
            let obj = object(name, vm, path);
            async move {
                api.create(&PostParams::default(), &obj)
                    .await
                    .unwrap_or_else(|e| panic!("create {name}: {e}"));
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
    let created = start.elapsed();
    let after_create = Instant::now();
    wait_all(
        &client,
        &ns.name,
        n_objects,
        "all Bound",
        Duration::from_secs(1800),
        scheduled_bound,
    )
    .await;
    let bound = after_create.elapsed();
    let ready_timeout = Duration::from_secs(
        setting("VIRTPLANE_SCALE_READY_TIMEOUT", "600")
            .parse()
            .unwrap(),
    );
    let ready = wait_ready(&client, &ns.name, n_objects, ready_timeout)
        .await
        .then(|| after_create.elapsed());
    let (all1, ours1) = api_requests();

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
    let load_at_rest = load_average();

    let start = Instant::now();
    futures::stream::iter(all.iter())
        .map(|(name, _, _)| {
            let api = api.clone();
            async move {
                let _ = api.delete(name, &DeleteParams::default()).await;
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
    let requested = start.elapsed();
    wait_all(
        &client,
        &ns.name,
        0,
        "all deleted",
        Duration::from_secs(1800),
        |_| true,
    )
    .await;
    let gone = start.elapsed();
    let (all3, ours3) = api_requests();
    let controller_rss = peak_rss_mib(controller.pid());
    let agents_rss: Vec<f64> = agents
        .iter()
        .map(|a| peak_rss_mib(a.process.pid()))
        .collect();
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let sum = |v: &[f64]| v.iter().sum::<f64>();

    let per = |d: f64| format!("{:.1}", d / n_objects as f64);
    let per_min = written.len() as f64 * 60.0 / rest.as_secs_f64();
    row(
        "agents registered (start to every Hypervisor)",
        format!("{registered:.1?}"),
        "-",
    );
    row(
        "create (client, 32 at a time)",
        format!("{created:.1?}"),
        "-",
    );
    row(
        "all Bound (controller), after the last create",
        format!("{bound:.1?}"),
        "-",
    );
    row(
        "all Ready (agents), after the last create",
        ready.map_or("not reached".into(), |r| format!("{r:.1?}")),
        "single node: < 60 s for 1000",
    );
    row(
        &format!("writes at rest per minute (over {}s)", rest.as_secs()),
        format!("{per_min:.0}"),
        "goal 0",
    );
    if !by_manager.is_empty() {
        println!(
            "    written by: {by_manager:?}; first: {:?}",
            &written[..written.len().min(3)]
        );
    }
    row(
        "controller peak RSS (VmHWM)",
        format!("{controller_rss:.1} MiB"),
        "-",
    );
    row(
        "agent peak RSS, largest (VmHWM)",
        format!("{:.1} MiB", max(&agents_rss)),
        "goal < 64 MiB",
    );
    row(
        "agent peak RSS, sum over all agents",
        format!("{:.1} MiB", sum(&agents_rss)),
        "-",
    );
    row(
        "  reference: largest / sum once registered, no objects",
        format!(
            "{:.1} / {:.1} MiB",
            max(&agents_rss_started),
            sum(&agents_rss_started)
        ),
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
    row(
        "delete all: objects gone",
        format!("{gone:.1?}"),
        "single node: < 60 s for 1000",
    );
    println!(
        "  load average at rest: {load_at_rest}; after: {}",
        load_average()
    );
    println!(
        "  (API requests include this benchmark's own: {n_objects} creates, {n_objects} deletes, \
         and a list of the namespace every 250 ms while waiting)"
    );
    drop(controller);
    drop(agents);
}
