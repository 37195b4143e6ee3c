//! The IsoDownload round of `cargo bench --bench download`: a real agent and controller (the
//! built binary) bring a 1 GiB `IsoDownload` from apply to `Completed` into a dir pool in the
//! bench directory, next to `curl -o` of the same file into the same directory in the same
//! round. Prints, per round, both times, their ratio (curl time / IsoDownload time, goal ≥ 0.95)
//! and where the IsoDownload's time went: each step from the agent's log (`step=` fields) and
//! from the bench's own watch, in milliseconds after the create call. Ends with the agent's peak
//! RSS (VmHWM, goal < 64 MiB).

use std::path::Path;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams, WatchEvent, WatchParams};
use virtplane::api::{DownloadPhase, IsoDownload, NODE_LABEL};

use crate::common::*;
use crate::measure::peak_rss_mib;

/// Milliseconds from `from` to `to`.
fn ms(from: Timestamp, to: Timestamp) -> f64 {
    (to.as_nanosecond() - from.as_nanosecond()) as f64 / 1e6
}

/// One timed point of a round.
struct Mark {
    what: String,
    at: Timestamp,
}

/// The agent's `step=` lines (and its first sight and reconcile of `object`) logged at or after
/// `since`, in log order.
fn agent_marks(log: &str, since: Timestamp, object: &str) -> Vec<Mark> {
    let mut out: Vec<Mark> = Vec::new();
    let seen = |what: String, at: Timestamp, out: &mut Vec<Mark>, once: bool| {
        if !once || !out.iter().any(|m| m.what == what) {
            out.push(Mark { what, at });
        }
    };
    for line in log.lines() {
        let Some((stamp, rest)) = line.split_once(' ') else {
            continue;
        };
        let Ok(at) = stamp.parse::<Timestamp>() else {
            continue;
        };
        if at < since {
            continue;
        }
        if rest.contains(&format!("received kind=IsoDownload object={object}")) {
            seen("agent watch sees it".into(), at, &mut out, true);
        } else if rest.contains(&format!("reconcile{{object={object}}}"))
            && rest.ends_with("reconciling")
        {
            seen("agent reconcile starts".into(), at, &mut out, true);
        } else if let Some(step) = rest
            .split_whitespace()
            .find_map(|w| w.strip_prefix("step="))
        {
            let step = step.trim_matches('"');
            let what = if step == "status_written" {
                let phase = rest
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("phase="))
                    .unwrap_or("?");
                format!("agent status written ({phase})")
            } else {
                format!("agent {step}")
            };
            seen(what, at, &mut out, step != "status_written");
        }
    }
    out
}

/// Creates the IsoDownload and watches it until Completed; returns the create time and the
/// bench's own marks (bound, each phase seen, Completed seen).
async fn apply_and_wait(
    api: &Api<IsoDownload>,
    name: &str,
    url: &str,
    pool: &str,
) -> (Timestamp, Vec<Mark>) {
    let obj: IsoDownload = serde_json::from_value(serde_json::json!({
        "apiVersion": "virtplane.io/v1alpha1",
        "kind": "IsoDownload",
        "metadata": {"name": name},
        "spec": {"url": url, "pool": pool, "name": format!("{name}.img"), "reclaimPolicy": "Delete"},
    }))
    .unwrap();
    let start = Timestamp::now();
    let created = api.create(&PostParams::default(), &obj).await.unwrap();
    let mut marks = vec![Mark {
        what: "created (API answered)".into(),
        at: Timestamp::now(),
    }];
    let wp = WatchParams::default().fields(&format!("metadata.name={name}"));
    let mut version = created.resource_version().unwrap_or_default();
    let mut bound = false;
    let mut phase = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        assert!(Instant::now() < deadline, "{name} did not complete");
        let mut stream = api.watch(&wp, &version).await.unwrap().boxed();
        while let Some(ev) = stream.try_next().await.unwrap() {
            let o = match ev {
                WatchEvent::Added(o) | WatchEvent::Modified(o) => o,
                WatchEvent::Bookmark(b) => {
                    version = b.metadata.resource_version;
                    continue;
                }
                WatchEvent::Deleted(_) => panic!("{name} was deleted"),
                WatchEvent::Error(e) => panic!("watch of {name}: {e}"),
            };
            let now = Timestamp::now();
            version = o.resource_version().unwrap_or_default();
            if !bound && o.labels().contains_key(NODE_LABEL) {
                bound = true;
                marks.push(Mark {
                    what: "client sees it bound".into(),
                    at: now,
                });
            }
            let p = o.status.as_ref().and_then(|s| s.phase);
            if p != phase {
                phase = p;
                marks.push(Mark {
                    what: format!("client sees phase {p:?}"),
                    at: now,
                });
            }
            if p == Some(DownloadPhase::Failed) {
                panic!("{name} failed: {:?}", o.status);
            }
            if p == Some(DownloadPhase::Completed) {
                return (start, marks);
            }
        }
    }
}

fn curl_into(url: &str, path: &Path) -> Duration {
    let start = Instant::now();
    let status = std::process::Command::new("curl")
        .args(["-s", "-f", "-o"])
        .arg(path)
        .arg(url)
        .status()
        .expect("curl must be installed");
    let elapsed = start.elapsed();
    assert!(status.success(), "curl failed: {status}");
    std::fs::remove_file(path).unwrap();
    elapsed
}

/// Runs `rounds` rounds against the server at `url` into a dir pool under `base`.
pub async fn run(url: &str, base: &Path, rounds: usize) {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-bench-dl").await;
    let pool_dir = tempfile::tempdir_in(base).unwrap();
    let pool = unique("vp-bench-dl");
    virsh(&[
        "pool-define-as",
        &pool,
        "dir",
        "--target",
        pool_dir.path().to_str().unwrap(),
    ]);
    virsh(&["pool-start", &pool]);
    let op = Operator::start(&ns.name, &[]);
    wait_hypervisor(
        &client,
        &op.agent.node,
        "lists the pool",
        Duration::from_secs(120),
        |h| {
            h.status
                .as_ref()
                .is_some_and(|s| s.storage_pools.iter().any(|p| p.name == pool))
        },
    )
    .await;
    let api: Api<IsoDownload> = Api::namespaced(client.clone(), &ns.name);
    println!(
        "IsoDownload apply→Completed against curl, {rounds} rounds, into {}",
        pool_dir.path().display()
    );
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let c = curl_into(url, &pool_dir.path().join("curl.img"));
        let name = format!("bench-{round}");
        let (start, mut marks) = apply_and_wait(&api, &name, url, &pool).await;
        let total = ms(start, marks.last().unwrap().at);
        let ratio = c.as_secs_f64() * 1e3 / total;
        ratios.push(ratio);
        println!(
            "round {round}: IsoDownload {total:8.1} ms   curl {:8.1} ms   ratio {ratio:.3}   (load {})",
            c.as_secs_f64() * 1e3,
            load()
        );
        let object = format!("{}/{name}", ns.name);
        marks.extend(agent_marks(&op.agent.process.log_text(), start, &object));
        marks.sort_by_key(|m| m.at);
        let mut prev = start;
        for m in &marks {
            println!(
                "    {:>9.1} ms  (+{:>8.1})  {}",
                ms(start, m.at),
                ms(prev, m.at),
                m.what
            );
            prev = m.at;
        }
        api.delete(&name, &DeleteParams::default()).await.unwrap();
        wait_gone::<IsoDownload>(&client, &ns.name, &name, Duration::from_secs(120)).await;
    }
    println!(
        "ratios (curl time / IsoDownload time, goal ≥ 0.95 in every round): {}",
        ratios
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "agent peak RSS (VmHWM): {:.1} MiB (goal < 64 MiB)",
        peak_rss_mib(op.agent.process.pid())
    );
    drop(op);
    for args in [["pool-destroy", &pool], ["pool-undefine", &pool]] {
        virsh(&args);
    }
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
