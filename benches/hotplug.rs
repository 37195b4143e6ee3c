//! Benchmark (not a test): apply-to-Ready latency of a scsi disk hot-plug into a running domain
//! through virtplane, next to the bare libvirt attach call, measured in the same run.
//!
//! Needs the local environment (`eval "$(hack/env-up.sh)"`); run with
//! `cargo bench --bench hotplug`. Each round attaches one disk and then removes it, so the domain
//! never holds more than one benchmark disk.
//!
//! Then the operator stops, and the same rounds run against the API server alone: stand-in
//! watchers in this process write what the controller and the agent write (the binding, the
//! agent's Ready status as virtplane last wrote it), with no libvirt call. They show the share
//! of a round that no agent code can remove: with the binding as virtplane writes it (label and
//! `Scheduled` status at once), with the label alone, and with no binding step at all.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, watcher};
use virtplane::api::{
    NODE_LABEL, StorageSource, StorageType, VirtualMachineStorage, VirtualMachineStorageSpec,
    VirtualMachineStorageStatus,
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

/// The benchmark's object: a scsi disk of `image` for `vm`, everything else left to defaults.
fn storage(vm: &str, image: &str) -> VirtualMachineStorage {
    VirtualMachineStorage::new(
        "template",
        VirtualMachineStorageSpec {
            vm: vm.to_string(),
            node_name: None,
            type_: StorageType::Disk,
            bus: Default::default(),
            source: Some(StorageSource {
                path: Some(image.to_string()),
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
    )
}

fn is_ready(o: &VirtualMachineStorage) -> bool {
    o.status
        .as_ref()
        .is_some_and(|s| condition_of(&s.conditions, "Ready").is_some_and(|(s, _, _)| s == "True"))
}

/// `rounds()` rounds, `pause` apart: create a copy of `template` named `<prefix>-<i>`, wait until
/// `events` (a watch opened before the first round, as `kubectl wait` has) shows it Ready, then
/// delete it and wait until it is gone. Returns each round's create-to-Ready time and the last
/// Ready status seen. With `timeline`, appends each round's name, create and Ready-seen times.
async fn apply_rounds(
    client: &kube::Client,
    ns: &str,
    events: &mut (
             impl futures::Stream<Item = watcher::Result<watcher::Event<VirtualMachineStorage>>> + Unpin
         ),
    prefix: &str,
    template: &VirtualMachineStorage,
    pause: Duration,
    timeline: Option<&str>,
) -> (Vec<Duration>, VirtualMachineStorageStatus) {
    let api: Api<VirtualMachineStorage> = Api::namespaced(client.clone(), ns);
    let mut samples = Vec::new();
    let mut last = None;
    for i in 0..rounds() {
        let name = format!("{prefix}-{i}");
        let mut obj = template.clone();
        obj.metadata.name = Some(name.clone());
        tokio::time::sleep(pause).await;
        let start = Instant::now();
        let sent = k8s_openapi::jiff::Timestamp::now();
        api.create(&PostParams::default(), &obj).await.unwrap();
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(ev) = events.try_next().await.unwrap() {
                let watcher::Event::Apply(o) = ev else {
                    continue;
                };
                if o.name_any() == name && is_ready(&o) {
                    return o;
                }
            }
            panic!("the watch ended");
        })
        .await
        .unwrap_or_else(|_| panic!("{name} not Ready after 60 s"));
        samples.push(start.elapsed());
        last = ready.status;
        if let Some(path) = timeline {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap();
            writeln!(f, "{name} {sent} {}", k8s_openapi::jiff::Timestamp::now()).unwrap();
        }
        kubectl_delete(ns, "vmstorage", &name);
        wait_gone::<VirtualMachineStorage>(client, ns, &name, Duration::from_secs(60)).await;
    }
    (samples, last.unwrap())
}

/// The API-server-alone variants, in the order they are printed.
const FLOORS: [Binding; 3] = [Binding::LabelAndStatus, Binding::Label, Binding::Nothing];

/// `events` once its initial list is done, so every later object shows up on it.
async fn listed<S>(mut events: S) -> S
where
    S: futures::Stream<Item = watcher::Result<watcher::Event<VirtualMachineStorage>>> + Unpin,
{
    while !matches!(
        events.try_next().await.unwrap(),
        Some(watcher::Event::InitDone) | None
    ) {}
    events
}

/// What the stand-in controller writes before the stand-in agent's watch shows the object.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Binding {
    /// The node label and the `Scheduled` status at once, as virtplane's controller does.
    LabelAndStatus,
    /// The node label alone (what the agent waits for), the status never.
    Label,
    /// Nothing: the agent's watch takes every object.
    Nothing,
}

/// The API server's part of a round, without libvirt and without virtplane: watchers in this
/// process write what the controller and the agent write, each as soon as its watch shows the step
/// before. Unless `binding` is [`Binding::Nothing`], a watch of every object writes the binding,
/// and a watch selecting the node label then writes `status` (the agent's Ready status);
/// otherwise the watch of every object writes `status` at once. Returns the tasks, once their
/// watches are listening, to abort when done.
async fn api_stand_ins(
    client: &kube::Client,
    ns: &str,
    status: serde_json::Value,
    binding: Binding,
) -> Vec<tokio::task::JoinHandle<()>> {
    let api: Api<VirtualMachineStorage> = Api::namespaced(client.clone(), ns);
    let node = "vp-bench-floor";
    let body = |name: &str, extra: serde_json::Value| {
        let mut body = serde_json::json!({
            "apiVersion": "virtplane.io/v1alpha1", "kind": "VirtualMachineStorage",
            "metadata": { "name": name },
        });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let agent = {
        let api = api.clone();
        let config = if binding != Binding::Nothing {
            watcher::Config::default().labels(&format!("{NODE_LABEL}={node}"))
        } else {
            watcher::Config::default()
        };
        let mut events = listed(watcher(api.clone(), config).boxed()).await;
        tokio::spawn(async move {
            let mut done = std::collections::HashSet::new();
            while let Some(ev) = events.try_next().await.unwrap() {
                let watcher::Event::Apply(o) = ev else {
                    continue;
                };
                if o.metadata.deletion_timestamp.is_some() || !done.insert(o.name_any()) {
                    continue;
                }
                let patch = body(&o.name_any(), serde_json::json!({ "status": status }));
                api.patch_status(
                    &o.name_any(),
                    &PatchParams::apply("vp-bench-agent").force(),
                    &Patch::Apply(patch),
                )
                .await
                .unwrap();
            }
        })
    };
    if binding == Binding::Nothing {
        return vec![agent];
    }
    let mut events = listed(watcher(api.clone(), watcher::Config::default()).boxed()).await;
    let controller = tokio::spawn(async move {
        let mut done = std::collections::HashSet::new();
        while let Some(ev) = events.try_next().await.unwrap() {
            let watcher::Event::Apply(o) = ev else {
                continue;
            };
            if o.metadata.deletion_timestamp.is_some() || !done.insert(o.name_any()) {
                continue;
            }
            let name = o.name_any();
            let params = PatchParams::apply("vp-bench-controller").force();
            let label = Patch::Apply(body(
                &name,
                serde_json::json!({ "metadata": { "name": name, "labels": { NODE_LABEL: node } } }),
            ));
            let scheduled = Patch::Apply(body(
                &name,
                serde_json::json!({ "status": { "nodeName": node, "conditions": [{
                    "type": "Scheduled", "status": "True", "reason": "Bound",
                    "message": format!("bound to node {node}, where the domain is defined"),
                    "observedGeneration": 1,
                    "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string(),
                }] } }),
            ));
            if binding == Binding::Label {
                api.patch(&name, &params, &label).await.unwrap();
                continue;
            }
            let (a, b) = tokio::join!(
                api.patch(&name, &params, &label),
                api.patch_status(&name, &params, &scheduled)
            );
            a.unwrap();
            b.unwrap();
        }
    });
    vec![agent, controller]
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
    let mut events = listed(watcher(api.clone(), watcher::Config::default()).boxed()).await;
    // `VIRTPLANE_HOTPLUG_TIMELINE=<file>`: each round's create and Ready-seen wall-clock times,
    // to line up with the agent's and controller's debug logs (printed below) for a profile.
    let timeline = std::env::var("VIRTPLANE_HOTPLUG_TIMELINE").ok();
    if timeline.is_some() {
        println!("agent log: {}", _op.agent.process.log.display());
        println!("controller log: {}", _op.controller.log.display());
    }
    let template = storage(&guest.name, &image);
    let mut ready_status = None;
    for (_, pause) in MODES {
        let prefix = format!("bench-{}", via.len());
        let (samples, status) = apply_rounds(
            &client,
            &ns.name,
            &mut events,
            &prefix,
            &template,
            pause,
            timeline.as_deref(),
        )
        .await;
        ready_status = Some(status);
        via.push(samples);
    }
    let after = op_metrics(&_op);
    drop(_op);

    // The same rounds against the API server alone, with the agent's Ready status as it wrote it.
    let mut status = serde_json::to_value(ready_status.unwrap()).unwrap();
    let fields = status.as_object_mut().unwrap();
    fields.remove("nodeName");
    if let Some(conditions) = fields.get_mut("conditions").and_then(|c| c.as_array_mut()) {
        conditions.retain(|c| c["type"] != "Scheduled");
    }
    let mut floors = Vec::new();
    for (_, pause) in MODES {
        let mut variants = Vec::new();
        for (i, binding) in FLOORS.iter().enumerate() {
            let tasks = api_stand_ins(&client, &ns.name, status.clone(), *binding).await;
            let prefix = format!("floor-{}-{i}", floors.len());
            let (samples, _) = apply_rounds(
                &client,
                &ns.name,
                &mut events,
                &prefix,
                &template,
                pause,
                None,
            )
            .await;
            tasks.iter().for_each(|t| t.abort());
            variants.push(samples);
        }
        floors.push(variants);
    }

    println!("scsi disk hot-plug into a running domain ({rounds} rounds of each):");
    let ratio = |of: &[Duration], to: &[Duration]| {
        format!(
            "p50 {:.1}x, p99 {:.1}x",
            median(of).as_secs_f64() / median(to).as_secs_f64(),
            p99(of).as_secs_f64() / p99(to).as_secs_f64()
        )
    };
    for ((((mode, _), bare), via), floor) in MODES.iter().zip(bare).zip(via).zip(floors) {
        println!("rounds {mode}:");
        report("  bare libvirt attach call", bare.clone());
        report("  virtplane apply-to-Ready (watch)", via.clone());
        println!(
            "  ratio virtplane/bare: {} (goal <= 4x)",
            ratio(&via, &bare)
        );
        println!(
            "  the API server alone, no libvirt, same watch (stand-ins write what virtplane writes):"
        );
        for (what, floor) in [
            "create, label + Scheduled, Ready",
            "create, label only, Ready",
            "create, Ready (no binding step)",
        ]
        .into_iter()
        .zip(floor)
        {
            report(&format!("    {what}"), floor.clone());
            println!("      ratio to bare: {}", ratio(&floor, &bare));
        }
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
