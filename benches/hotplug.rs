//! Benchmark (not a test): apply-to-Ready latency of a scsi disk hot-plug into a running domain
//! through virtplane, next to the bare libvirt attach call, measured in the same run.
//!
//! Needs the local environment (`eval "$(hack/env-up.sh)"`); run with
//! `cargo bench --bench hotplug`. Each round attaches one disk and then removes it, so the domain
//! never holds more than one benchmark disk.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use kube::runtime::watcher::{self, watcher};
use virtplane::api::{
    StorageSource, StorageType, VirtualMachineStorage, VirtualMachineStorageSpec,
};

use common::*;

/// Rounds of each, `VIRTPLANE_HOTPLUG_ROUNDS` (100).
fn rounds() -> usize {
    std::env::var("VIRTPLANE_HOTPLUG_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

/// The `_count` samples of a histogram family on /metrics, by their labels.
fn counts(metrics: &str, family: &str) -> Vec<(String, f64)> {
    samples(metrics, family, "count")
}

/// The `_<suffix>` samples of a histogram family on /metrics, by their labels.
fn samples(metrics: &str, family: &str, suffix: &str) -> Vec<(String, f64)> {
    let prefix = format!("{family}_{suffix}{{");
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| {
            let (labels, value) = l.rsplit_once(' ')?;
            Some((
                labels.trim_end_matches('}').to_string(),
                value.parse().ok()?,
            ))
        })
        .collect()
}

/// The two ways rounds follow each other, each measured for both the bare call and virtplane:
/// back to back (each round overlaps the previous one's teardown: the detach's events, the agent's
/// last reconciles of the deleted object), and apart, each starting from a quiet node, as a
/// single hot-plug would (this also lets the machine's cores go idle, which slows both sides).
const MODES: [(&str, Duration); 2] = [
    ("back to back", Duration::ZERO),
    ("250 ms apart", Duration::from_millis(250)),
];

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!(
        "{what:<40} n={:<4} p50={:>8.2?} p99={:>8.2?} mean={:>8.2?} max={:>8.2?}",
        samples.len(),
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        mean,
        samples[samples.len() - 1]
    );
}

fn disk_xml(path: &str, target: &str) -> String {
    format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{path}'/><target dev='{target}' bus='scsi'/></disk>"
    )
}

fn median(samples: &[Duration]) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    percentile(&s, 0.5)
}

fn p99(samples: &[Duration]) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    percentile(&s, 0.99)
}

fn op_metrics(op: &Operator) -> String {
    op.agent.process.http_get("/metrics")
}

#[tokio::main]
async fn main() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-bench").await;
    let pool = TestPool::create("vp-bench");
    let guest = TestGuest::define_with("vp-bench", false, false);
    virsh(&["start", &guest.name]);
    let image = pool.path.join("bench.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let image = image.to_str().unwrap().to_string();

    // Baseline: the bare libvirt attach call (live), then detach, on the same domain.
    let conn = virt::connect::Connect::open(Some(&libvirt_uri())).unwrap();
    let dom = conn.lookup_domain_by_name(&guest.name).unwrap();
    let rounds = rounds();
    let mut bare = Vec::new();
    for (_, pause) in MODES {
        let mut samples = Vec::new();
        for _ in 0..rounds {
            tokio::time::sleep(pause).await;
            let xml = disk_xml(&image, "sdz");
            let start = Instant::now();
            dom.attach_device_flags(&xml, virt::sys::VIR_DOMAIN_AFFECT_LIVE)
                .unwrap();
            samples.push(start.elapsed());
            dom.detach_device_flags(&xml, virt::sys::VIR_DOMAIN_AFFECT_LIVE)
                .unwrap();
            eventually("bare disk gone", Duration::from_secs(10), || async {
                (!live_xml(&guest.name).contains("sdz")).then_some(())
            })
            .await;
        }
        bare.push(samples);
    }

    // virtplane: create the object, wait for Ready=True, delete it and wait until it is gone.
    let _op = Operator::start(&ns.name, &[]);
    let api: Api<VirtualMachineStorage> = Api::namespaced(client.clone(), &ns.name);
    let mut via = Vec::new();
    // What the agent did before the first round (its start-up), to subtract.
    eventually("the agent listens", Duration::from_secs(60), || async {
        _op.agent.process.log_text().contains("addr=").then_some(())
    })
    .await;
    let before = op_metrics(&_op);
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    while !matches!(
        events.try_next().await.unwrap(),
        Some(watcher::Event::InitDone) | None
    ) {}
    // `VIRTPLANE_HOTPLUG_TIMELINE=<file>`: each round's create and Ready-seen wall-clock times,
    // to line up with the agent's and controller's debug logs (printed below) for a profile.
    let timeline = std::env::var("VIRTPLANE_HOTPLUG_TIMELINE").ok();
    if timeline.is_some() {
        println!("agent log: {}", _op.agent.process.log.display());
        println!("controller log: {}", _op.controller.log.display());
    }
    for (_, pause) in MODES {
        let mut samples = Vec::new();
        for i in 0..rounds {
            let name = format!("bench-{}-{i}", via.len());
            let obj = VirtualMachineStorage::new(
                &name,
                VirtualMachineStorageSpec {
                    vm: guest.name.clone(),
                    node_name: None,
                    type_: StorageType::Disk,
                    bus: Default::default(),
                    source: Some(StorageSource {
                        path: Some(image.clone()),
                        ..Default::default()
                    }),
                    format: None,
                    read_only: None,
                    target: None,
                    boot_order: None,
                    attach: Default::default(),
                    driver: None,
                    iotune: None,
                    serial: None,
                    shareable: None,
                },
            );
            tokio::time::sleep(pause).await;
            let start = Instant::now();
            let sent = k8s_openapi::jiff::Timestamp::now();
            api.create(&PostParams::default(), &obj).await.unwrap();
            // Seen as `kubectl wait` sees it: on the watch, opened before the first round.
            tokio::time::timeout(Duration::from_secs(60), async {
                while let Some(ev) = events.try_next().await.unwrap() {
                    let watcher::Event::Apply(o) = ev else {
                        continue;
                    };
                    let ready = o.status.as_ref().is_some_and(|s| {
                        condition_of(&s.conditions, "Ready").is_some_and(|(s, _, _)| s == "True")
                    });
                    if o.name_any() == name && ready {
                        return;
                    }
                }
                panic!("the watch ended");
            })
            .await
            .unwrap_or_else(|_| panic!("{name} not Ready after 60 s"));
            samples.push(start.elapsed());
            if let Some(path) = &timeline {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap();
                writeln!(f, "{name} {sent} {}", k8s_openapi::jiff::Timestamp::now()).unwrap();
            }
            kubectl_delete(&ns.name, "vmstorage", &name);
            wait_gone::<VirtualMachineStorage>(&client, &ns.name, &name, Duration::from_secs(60))
                .await;
        }
        via.push(samples);
    }

    let after = op_metrics(&_op);

    println!("scsi disk hot-plug into a running domain ({rounds} rounds of each):");
    for (((mode, _), bare), via) in MODES.iter().zip(bare).zip(via) {
        let (b50, v50) = (median(&bare), median(&via));
        let (b99, v99) = (p99(&bare), p99(&via));
        println!("rounds {mode}:");
        report("  bare libvirt attach call", bare);
        report("  virtplane apply-to-Ready (watch)", via);
        println!(
            "  ratio virtplane/bare: p50 {:.1}x, p99 {:.1}x (goal <= 4x)",
            v50.as_secs_f64() / b50.as_secs_f64(),
            v99.as_secs_f64() / b99.as_secs_f64()
        );
    }
    // Per round (one create and one delete, plus the agent's heartbeat meanwhile).
    println!("agent's work per round (create + delete), from its /metrics:");
    for family in [
        "virtplane_reconcile_duration_seconds",
        "virtplane_libvirt_call_duration_seconds",
    ] {
        for (labels, n) in counts(&after, family) {
            let was = counts(&before, family)
                .into_iter()
                .find(|(l, _)| *l == labels)
                .map_or(0.0, |(_, v)| v);
            let seconds = |m: &str| {
                samples(m, family, "sum")
                    .into_iter()
                    .find(|(l, _)| *l == labels)
                    .map_or(0.0, |(_, v)| v)
            };
            if n > was {
                println!(
                    "  {family}{{{labels}}}: {:.2} per round, {:.2} ms each",
                    (n - was) / (rounds * MODES.len()) as f64,
                    (seconds(&after) - seconds(&before)) * 1000.0 / (n - was)
                );
            }
        }
    }
}
