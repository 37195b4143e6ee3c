//! IsoDownload through the operator: downloads into a real dir pool from a real HTTP server,
//! refusals that leave nothing behind, pause and resume fetching only the missing bytes, an
//! agent restart, cancellation, reclaim policies, and a CD-ROM fed by a download.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "download/ftp_server.rs"]
#[allow(dead_code)]
mod ftp_server;
#[path = "download/pki.rs"]
#[allow(dead_code)]
mod pki;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use kube::Client;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, WatchEvent, WatchParams};
use serde_json::json;
use virtplane::api::{DownloadPhase, IsoDownload, IsoDownloadStatus, VirtualMachineStorage};
use virtplane::download;

use common::*;

const T: Duration = Duration::from_secs(120);

/// Serves `len` bytes of a pattern as `name`; returns its sha256.
fn pattern_file(server: &FixtureServer, name: &str, len: usize) -> String {
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    server.serve(name, &data);
    sha256(&server.path(name))
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn manifest(name: &str, url: &str, pool: &str, extra: &str) -> String {
    format!(
        "apiVersion: virtplane.io/v1alpha1\nkind: IsoDownload\nmetadata:\n  name: {name}\nspec:\n  url: {url}\n  pool: {pool}\n{extra}"
    )
}

fn phase(o: &IsoDownload) -> Option<DownloadPhase> {
    o.status.as_ref()?.phase
}

fn ready_reason(o: &IsoDownload) -> Option<String> {
    ready_reason_of(o.status.as_ref()?)
}

fn ready_reason_of(st: &IsoDownloadStatus) -> Option<String> {
    condition_of(&st.conditions, "Ready").map(|c| c.1)
}

async fn wait_phase(client: &Client, ns: &str, name: &str, want: DownloadPhase) -> IsoDownload {
    wait_obj::<IsoDownload>(client, ns, name, &format!("{want:?}"), T, |o| {
        phase(o) == Some(want)
    })
    .await
}

#[tokio::test]
async fn downloads_complete_verified_and_listed_by_libvirt() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-iso").await;
    let op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-iso");
    let server = FixtureServer::start(0);
    let sum = pattern_file(&server, "debian.iso", 3 << 20);

    kubectl_apply(
        &ns.name,
        &manifest(
            "debian",
            &server.url("debian.iso"),
            &pool.name,
            &format!("  checksum:\n    algorithm: sha256\n    value: {sum}\n"),
        ),
    );
    let done = wait_phase(&client, &ns.name, "debian", DownloadPhase::Completed).await;
    let st = done.status.clone().unwrap();
    assert_eq!(
        (st.total_bytes, st.downloaded_bytes),
        (Some(3 << 20), Some(3 << 20))
    );
    assert_eq!(st.progress.as_deref(), Some("100%"));
    assert_eq!(st.checksum_verified, Some(true));
    let vol = st.volume.unwrap();
    assert_eq!(vol.name, "debian.iso");
    assert_eq!(sha256(Path::new(&vol.path)), sum);
    assert!(
        virsh(&["vol-list", &pool.name]).contains("debian.iso"),
        "libvirt lists the volume"
    );
    assert_eq!(
        pool.files_settled(&["debian.iso"]).await,
        ["debian.iso"],
        "no partial data left"
    );
    let reasons = event_reasons(&client, &ns.name, "debian").await;
    assert!(reasons.iter().any(|r| r == "Completed"), "{reasons:?}");

    let metrics = op.agent.process.http_get("/metrics");
    assert!(
        metric(&metrics, "virtplane_downloaded_bytes_total").unwrap_or(0.0)
            >= f64::from(3u32 << 20),
        "{metrics}"
    );
    assert!(
        metrics.contains("virtplane_downloads_in_flight 0"),
        "{metrics}"
    );

    // A wrong checksum leaves nothing.
    kubectl_apply(
        &ns.name,
        &manifest(
            "bad-sum",
            &server.url("debian.iso"),
            &pool.name,
            &format!(
                "  name: other.iso\n  checksum:\n    algorithm: sha256\n    value: \"{}\"\n",
                "0".repeat(64)
            ),
        ),
    );
    let bad = wait_phase(&client, &ns.name, "bad-sum", DownloadPhase::Failed).await;
    assert_eq!(ready_reason(&bad).as_deref(), Some("ChecksumMismatch"));
    assert_eq!(pool.files_settled(&["debian.iso"]).await, ["debian.iso"]);

    // Deleting the object keeps a Completed volume (Retain), unless reclaimPolicy is Delete.
    kubectl_apply(
        &ns.name,
        &manifest(
            "reclaim",
            &server.url("debian.iso"),
            &pool.name,
            "  name: gone.iso\n  reclaimPolicy: Delete\n",
        ),
    );
    wait_phase(&client, &ns.name, "reclaim", DownloadPhase::Completed).await;
    assert!(pool.path.join("gone.iso").exists());
    kubectl_delete(&ns.name, "isodownload", "reclaim");
    kubectl_delete(&ns.name, "isodownload", "debian");
    wait_gone::<IsoDownload>(&client, &ns.name, "reclaim", T).await;
    wait_gone::<IsoDownload>(&client, &ns.name, "debian", T).await;
    assert!(
        !pool.path.join("gone.iso").exists(),
        "reclaimPolicy Delete removes the volume"
    );
    assert!(pool.path.join("debian.iso").exists(), "Retain keeps it");
}

#[tokio::test]
async fn refusals_leave_nothing_in_the_pool() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-iso-bad").await;
    let op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-iso-bad");
    let server = FixtureServer::start(0);
    pattern_file(&server, "big.iso", 12 << 20);
    std::fs::write(pool.path.join("taken.iso"), b"mine").unwrap();
    virsh(&["pool-refresh", &pool.name]);
    let node = format!("  nodeName: {}\n", op.agent.node);

    kubectl_apply(
        &ns.name,
        &manifest(
            "taken",
            &server.url("big.iso"),
            &pool.name,
            "  name: taken.iso\n",
        ),
    );
    kubectl_apply(
        &ns.name,
        &manifest(
            "noname",
            &format!("http://127.0.0.1:{}/", server.port),
            &pool.name,
            "",
        ),
    );
    kubectl_apply(
        &ns.name,
        &manifest("nopool", &server.url("big.iso"), "no-such-pool", &node),
    );
    kubectl_apply(
        &ns.name,
        &manifest(
            "metadata",
            "http://169.254.169.254/latest/meta-data",
            &pool.name,
            "  name: md.iso\n",
        ),
    );
    kubectl_apply(
        &ns.name,
        &manifest("missing", &server.url("missing.iso"), &pool.name, ""),
    );
    // Passes the CRD's pattern but does not parse (port out of range).
    kubectl_apply(
        &ns.name,
        &manifest("badport", "http://127.0.0.1:99999/a.iso", &pool.name, ""),
    );
    for (name, reason) in [
        ("badport", "InvalidURL"),
        ("taken", "NameConflict"),
        ("noname", "InvalidName"),
        ("nopool", "PoolNotFound"),
        ("metadata", "DestinationNotAllowed"),
        ("missing", "NotFound"),
    ] {
        let o = wait_phase(&client, &ns.name, name, DownloadPhase::Failed).await;
        assert_eq!(
            ready_reason(&o).as_deref(),
            Some(reason),
            "{name}: {:?}",
            o.status
        );
    }
    assert_eq!(std::fs::read(pool.path.join("taken.iso")).unwrap(), b"mine");

    // A pool without room for the file.
    let small = pool.path.join("small");
    std::fs::create_dir(&small).unwrap();
    assert!(
        Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                "size=4m",
                "tmpfs",
                small.to_str().unwrap()
            ])
            .status()
            .unwrap()
            .success()
    );
    let small_pool = unique("vp-iso-small");
    virsh(&[
        "pool-define-as",
        &small_pool,
        "dir",
        "--target",
        small.to_str().unwrap(),
    ]);
    virsh(&["pool-start", &small_pool]);
    // Partial data left by an earlier run (as after a pause): refused too, and removed.
    std::fs::write(small.join(".big.iso.part"), vec![0u8; 1 << 20]).unwrap();
    kubectl_apply(
        &ns.name,
        &manifest("nospace", &server.url("big.iso"), &small_pool, ""),
    );
    let o = wait_phase(&client, &ns.name, "nospace", DownloadPhase::Failed).await;
    let leftovers = std::fs::read_dir(&small).unwrap().count();
    virsh(&["pool-destroy", &small_pool]);
    virsh(&["pool-undefine", &small_pool]);
    let _ = Command::new("umount").arg(&small).status();
    assert_eq!(
        ready_reason(&o).as_deref(),
        Some("InsufficientSpace"),
        "{:?}",
        o.status
    );
    let message = condition_of(&o.status.as_ref().unwrap().conditions, "Ready")
        .unwrap()
        .2;
    assert!(message.contains("partial data were removed"), "{message}");
    assert_eq!(leftovers, 0, "the partial data was removed");
    assert_eq!(
        pool.files_settled(&["small", "taken.iso"]).await,
        ["small", "taken.iso"]
    );
}

#[tokio::test]
async fn redirects_into_a_denied_network_fail() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-iso-deny").await;
    // The file server on 127.0.0.1 is off limits for this agent; the redirector on 127.0.0.3
    // is not.
    let _op = Operator::start(&ns.name, &["--download-deny-cidr", "127.0.0.1/32"]);
    let pool = TestPool::create("vp-iso-deny");
    let files = FixtureServer::start(0);
    pattern_file(&files, "f.iso", 1 << 20);
    let redirector = FixtureServer::start_on("127.0.0.3", 0);
    pattern_file(&redirector, "f.iso", 1 << 20);
    let via = |target: String| redirector.url(&format!("redirect?to={target}"));

    for (name, target) in [
        // An IP literal (no name resolution involved) and a host name resolving there.
        ("literal", format!("http://127.0.0.1:{}/f.iso", files.port)),
        ("byname", format!("http://localhost:{}/f.iso", files.port)),
        ("allowed", redirector.url("f.iso")),
    ] {
        kubectl_apply(
            &ns.name,
            &manifest(
                name,
                &via(target),
                &pool.name,
                &format!("  name: {name}.iso\n"),
            ),
        );
    }
    for name in ["literal", "byname"] {
        let o = wait_phase(&client, &ns.name, name, DownloadPhase::Failed).await;
        let st = o.status.as_ref().unwrap();
        let (_, reason, message) = condition_of(&st.conditions, "Ready").unwrap();
        assert_eq!(reason, "DestinationNotAllowed", "{name}: {st:?}");
        assert!(
            message.contains("127.0.0.1") && message.contains("--download-deny-cidr"),
            "{name}: {message}"
        );
    }
    wait_phase(&client, &ns.name, "allowed", DownloadPhase::Completed).await;
    assert!(
        files.served("f.iso").is_empty(),
        "the denied server sent nothing"
    );
    assert_eq!(pool.files_settled(&["allowed.iso"]).await, ["allowed.iso"]);
}

#[tokio::test]
async fn pause_resume_and_agent_restart_fetch_only_missing_bytes() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-iso-pause").await;
    let mut op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-iso-pause");
    // 24 MiB at 4 MiB/s: about six seconds, so it can be paused and interrupted part-way.
    let server = FixtureServer::start(4 << 20);
    let sum = pattern_file(&server, "slow.iso", 24 << 20);
    let api: Api<IsoDownload> = Api::namespaced(client.clone(), &ns.name);
    kubectl_apply(
        &ns.name,
        &manifest(
            "slow",
            &server.url("slow.iso"),
            &pool.name,
            &format!("  checksum:\n    algorithm: sha256\n    value: {sum}\n"),
        ),
    );
    wait_obj::<IsoDownload>(&client, &ns.name, "slow", "some bytes", T, |o| {
        o.status
            .as_ref()
            .and_then(|s| s.downloaded_bytes)
            .is_some_and(|b| b >= 4 << 20)
    })
    .await;

    api.patch(
        "slow",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"paused": true}})),
    )
    .await
    .unwrap();
    let paused = wait_phase(&client, &ns.name, "slow", DownloadPhase::Paused).await;
    let kept = paused.status.as_ref().unwrap().downloaded_bytes.unwrap();
    assert!(kept > 0 && kept < 24 << 20, "kept {kept}");
    assert!(
        pool.files().iter().any(|f| f.starts_with(".slow.iso")),
        "partial data is kept: {:?}",
        pool.files()
    );

    // Every status from here on, to see the phases a poll could miss.
    let seen = {
        let events = api
            .watch(
                &WatchParams::default().fields("metadata.name=slow"),
                &paused.resource_version().unwrap(),
            )
            .await
            .unwrap();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut events = std::pin::pin!(events);
            while let Ok(Some(Ok(WatchEvent::Modified(o)))) =
                tokio::time::timeout(T, events.next()).await
            {
                let st = o.status.unwrap_or_default();
                seen.push((st.phase, st.downloaded_bytes));
                if st.phase == Some(DownloadPhase::Completed) {
                    break;
                }
            }
            seen
        })
    };
    api.patch(
        "slow",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"paused": false}})),
    )
    .await
    .unwrap();
    wait_obj::<IsoDownload>(&client, &ns.name, "slow", "downloading again", T, |o| {
        phase(o) == Some(DownloadPhase::Downloading)
            && o.status
                .as_ref()
                .and_then(|s| s.downloaded_bytes)
                .is_some_and(|b| b > kept + (2 << 20))
    })
    .await;
    // Kill the agent mid-transfer; the new one resumes from the partial file.
    op.agent.restart();
    let done = wait_phase(&client, &ns.name, "slow", DownloadPhase::Completed).await;
    let st = done.status.unwrap();
    assert_eq!(sha256(Path::new(&st.volume.unwrap().path)), sum);
    // Resuming with a checksum first checks the kept data (phase Verifying), counting it.
    let seen = seen.await.unwrap();
    assert!(
        seen.iter()
            .any(|(p, b)| *p == Some(DownloadPhase::Verifying) && *b == Some(kept)),
        "{seen:?}"
    );
    assert!(
        seen.iter().all(|(_, b)| b.is_some_and(|b| b >= kept)),
        "the count never drops below what was kept: {seen:?}"
    );
    let served = server.served("slow.iso");
    let total: u64 = served.iter().map(|(_, n)| n).sum();
    assert!(
        served.len() >= 3,
        "three transfers (start, after pause, after restart): {served:?}"
    );
    assert!(
        served.iter().skip(1).all(|(start, _)| *start > 0),
        "every later transfer resumed: {served:?}"
    );
    // Each resume starts where the kept data ends; bytes in flight when a transfer stopped
    // may be sent twice, but never the whole file again.
    assert!(
        total < (24 << 20) + (6 << 20),
        "served {total} bytes for a 24 MiB file: {served:?}"
    );
    let reasons = event_reasons(&client, &ns.name, "slow").await;
    assert!(
        reasons.iter().any(|r| r == "Paused") && reasons.iter().any(|r| r == "Resumed"),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn a_server_ignoring_ranges_is_reported_while_downloading() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-iso-norange").await;
    let _op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-iso-norange");
    let server = FixtureServer::start(2 << 20);
    pattern_file(&server, "whole.iso", 16 << 20);
    let api: Api<IsoDownload> = Api::namespaced(client.clone(), &ns.name);
    kubectl_apply(
        &ns.name,
        &manifest("whole", &server.url("whole.iso?norange=1"), &pool.name, ""),
    );
    let message =
        |o: &IsoDownload| condition_of(&o.status.as_ref()?.conditions, "Ready").map(|c| c.2);
    let o = wait_obj::<IsoDownload>(&client, &ns.name, "whole", "some bytes", T, |o| {
        o.status
            .as_ref()
            .and_then(|s| s.downloaded_bytes)
            .is_some_and(|b| b >= 2 << 20)
    })
    .await;
    let m = message(&o).unwrap();
    assert!(m.contains("does not announce support for resuming"), "{m}");

    for paused in [true, false] {
        api.patch(
            "whole",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": paused}})),
        )
        .await
        .unwrap();
        if paused {
            wait_phase(&client, &ns.name, "whole", DownloadPhase::Paused).await;
        }
    }
    // Resuming got the whole file again: the message says so while it downloads.
    wait_obj::<IsoDownload>(&client, &ns.name, "whole", "restart reported", T, |o| {
        phase(o) == Some(DownloadPhase::Downloading)
            && message(o).is_some_and(|m| {
                m.contains("from the beginning again because the server does not support resuming")
            })
    })
    .await;
    let done = wait_phase(&client, &ns.name, "whole", DownloadPhase::Completed).await;
    let m = message(&done).unwrap();
    assert!(m.contains("from the beginning again"), "{m}");
}

#[tokio::test]
async fn a_download_finished_before_its_status_was_written_completes() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-iso-done").await;
    let _op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-iso-done");
    let server = FixtureServer::start(0);
    let sum = pattern_file(&server, "done.iso", 2 << 20);
    let checksum = format!("  checksum:\n    algorithm: sha256\n    value: {sum}\n");
    kubectl_apply(
        &ns.name,
        &manifest(
            "done",
            &server.url("done.iso"),
            &pool.name,
            &format!("  paused: true\n{checksum}"),
        ),
    );
    let paused = wait_phase(&client, &ns.name, "done", DownloadPhase::Paused).await;

    // What the agent's task does up to the final rename, as if the agent then died (or its
    // Completed status write failed): the file is in place and the status does not say so.
    let request = download::DownloadRequest {
        url: server.url("done.iso"),
        dir: pool.path.clone(),
        name: "done.iso".into(),
        checksum: Some(download::Checksum {
            algorithm: download::ChecksumAlgorithm::Sha256,
            hex: sum.clone(),
        }),
        owner: paused.uid(),
        ..download::DownloadRequest::default()
    };
    let (tx, _rx) = tokio::sync::watch::channel(download::Progress::default());
    download::download(
        &request,
        &download::DownloadOptions::default(),
        &tokio_util::sync::CancellationToken::new(),
        &tx,
    )
    .await
    .unwrap();

    let api: Api<IsoDownload> = Api::namespaced(client.clone(), &ns.name);
    api.patch(
        "done",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"paused": false}})),
    )
    .await
    .unwrap();
    let done = wait_phase(&client, &ns.name, "done", DownloadPhase::Completed).await;
    let st = done.status.unwrap();
    assert_eq!(ready_reason_of(&st).as_deref(), Some("Completed"));
    assert_eq!(st.checksum_verified, Some(true));
    assert_eq!(st.downloaded_bytes, Some(2 << 20));
    assert_eq!(sha256(Path::new(&st.volume.unwrap().path)), sum);
    assert!(server.served("done.iso").len() == 1, "not downloaded again");
    assert_eq!(
        pool.files_settled(&["done.iso"]).await,
        ["done.iso"],
        "the record is gone"
    );

    // Another object for the same name still gets a conflict.
    kubectl_apply(
        &ns.name,
        &manifest("other", &server.url("done.iso"), &pool.name, &checksum),
    );
    let other = wait_phase(&client, &ns.name, "other", DownloadPhase::Failed).await;
    assert_eq!(ready_reason(&other).as_deref(), Some("NameConflict"));
}

#[tokio::test]
async fn changing_url_name_or_pool_after_the_start_fails_and_leaves_nothing() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-iso-immut").await;
    let _op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-iso-immut");
    let server = FixtureServer::start(2 << 20);
    pattern_file(&server, "a.iso", 32 << 20);
    pattern_file(&server, "b.iso", 32 << 20);
    let api: Api<IsoDownload> = Api::namespaced(client.clone(), &ns.name);
    for name in ["running", "paused"] {
        kubectl_apply(
            &ns.name,
            &manifest(
                name,
                &server.url("a.iso"),
                &pool.name,
                &format!("  name: {name}.iso\n"),
            ),
        );
    }
    for name in ["running", "paused"] {
        let o = wait_obj::<IsoDownload>(&client, &ns.name, name, "some bytes", T, |o| {
            o.status
                .as_ref()
                .and_then(|s| s.downloaded_bytes)
                .is_some_and(|b| b > 0)
        })
        .await;
        let target = o.status.unwrap().target.unwrap();
        assert_eq!(
            (target.url.as_str(), target.name.as_str()),
            (server.url("a.iso").as_str(), format!("{name}.iso").as_str())
        );
    }
    api.patch(
        "paused",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"paused": true}})),
    )
    .await
    .unwrap();
    wait_phase(&client, &ns.name, "paused", DownloadPhase::Paused).await;

    // A new URL while it runs; a new name while it is paused.
    for (name, spec) in [
        ("running", json!({"url": server.url("b.iso")})),
        ("paused", json!({"name": "renamed.iso"})),
    ] {
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await
        .unwrap();
        let o = wait_phase(&client, &ns.name, name, DownloadPhase::Failed).await;
        let (_, reason, message) =
            condition_of(&o.status.as_ref().unwrap().conditions, "Ready").unwrap();
        assert_eq!(reason, "SpecChanged", "{name}: {message}");
        assert!(
            message.contains("partial data were removed") && message.contains("create a new one"),
            "{name}: {message}"
        );
    }
    assert_eq!(pool.files_settled(&[]).await, Vec::<String>::new());
    for name in ["running", "paused"] {
        kubectl_delete(&ns.name, "isodownload", name);
        wait_gone::<IsoDownload>(&client, &ns.name, name, T).await;
    }
    assert_eq!(pool.files_settled(&[]).await, Vec::<String>::new());
}

#[tokio::test]
async fn deleting_a_running_download_removes_its_partial_data() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-iso-del").await;
    let _op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-iso-del");
    let server = FixtureServer::start(2 << 20);
    pattern_file(&server, "cancel.iso", 24 << 20);
    kubectl_apply(
        &ns.name,
        &manifest("cancel", &server.url("cancel.iso"), &pool.name, ""),
    );
    wait_obj::<IsoDownload>(&client, &ns.name, "cancel", "some bytes", T, |o| {
        o.status
            .as_ref()
            .and_then(|s| s.downloaded_bytes)
            .is_some_and(|b| b > 0)
    })
    .await;
    kubectl_delete(&ns.name, "isodownload", "cancel");
    wait_gone::<IsoDownload>(&client, &ns.name, "cancel", T).await;
    assert_eq!(pool.files_settled(&[]).await, Vec::<String>::new());
}

#[tokio::test]
async fn transient_failures_are_retried_by_timer_with_back_off_and_counted() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-iso-retry").await;
    let _op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-iso-retry");
    let server = FixtureServer::start(0);
    pattern_file(&server, "flaky.iso", 1 << 20);
    // The first two requests (both probes) get 503: two retries, 5 s and 10 s later.
    kubectl_apply(
        &ns.name,
        &manifest("flaky", &server.url("flaky.iso?fail=2"), &pool.name, ""),
    );
    let retrying = wait_obj::<IsoDownload>(&client, &ns.name, "flaky", "Retrying", T, |o| {
        ready_reason(o).as_deref() == Some("Retrying")
    })
    .await;
    let st = retrying.status.unwrap();
    let (_, _, message) = condition_of(&st.conditions, "Ready").unwrap();
    assert!(
        message.contains("503") && message.contains("the next one starts at"),
        "{message}"
    );
    assert_eq!(st.phase, Some(DownloadPhase::Pending));
    let done = wait_phase(&client, &ns.name, "flaky", DownloadPhase::Completed).await;
    assert_eq!(done.status.unwrap().attempts, Some(3));
    assert_eq!(pool.files_settled(&["flaky.iso"]).await, ["flaky.iso"]);
}

#[tokio::test]
async fn deleting_a_queued_download_reports_no_pause() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-iso-queue").await;
    let _op = Operator::start(&ns.name, &["--max-downloads", "1"]);
    let pool = TestPool::create("vp-iso-queue");
    let server = FixtureServer::start(1 << 20);
    pattern_file(&server, "first.iso", 32 << 20);
    pattern_file(&server, "second.iso", 1 << 20);
    kubectl_apply(
        &ns.name,
        &manifest("first", &server.url("first.iso"), &pool.name, ""),
    );
    wait_phase(&client, &ns.name, "first", DownloadPhase::Downloading).await;
    kubectl_apply(
        &ns.name,
        &manifest("second", &server.url("second.iso"), &pool.name, ""),
    );
    wait_obj::<IsoDownload>(&client, &ns.name, "second", "Queued", T, |o| {
        ready_reason(o).as_deref() == Some("Queued")
    })
    .await;
    kubectl_delete(&ns.name, "isodownload", "second");
    wait_gone::<IsoDownload>(&client, &ns.name, "second", T).await;
    let reasons = event_reasons(&client, &ns.name, "second").await;
    assert!(!reasons.iter().any(|r| r == "Paused"), "{reasons:?}");
    assert!(
        !pool.files().iter().any(|f| f.contains("second")),
        "{:?}",
        pool.files()
    );
}

#[tokio::test]
async fn a_cdrom_waits_for_its_download_and_gets_the_medium() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-iso-cd").await;
    let _op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-iso-cd");
    let guest = TestGuest::define_with("vp-iso-cd", false, false);
    virsh(&["start", &guest.name]);
    let server = FixtureServer::start(2 << 20);
    pattern_file(&server, "install.iso", 6 << 20);

    let cd = format!(
        "apiVersion: virtplane.io/v1alpha1\nkind: VirtualMachineStorage\nmetadata:\n  name: cd\nspec:\n  vm: {}\n  type: cdrom\n  source:\n    isoDownload: install\n",
        guest.name
    );
    kubectl_apply(&ns.name, &cd);
    wait_obj::<VirtualMachineStorage>(&client, &ns.name, "cd", "WaitingForDownload", T, |o| {
        o.status
            .as_ref()
            .and_then(|s| condition_of(&s.conditions, "Ready"))
            .is_some_and(|c| c.1 == "WaitingForDownload")
    })
    .await;
    kubectl_apply(
        &ns.name,
        &manifest("install", &server.url("install.iso"), &pool.name, ""),
    );
    let path = pool.path.join("install.iso");
    let o = wait_obj::<VirtualMachineStorage>(&client, &ns.name, "cd", "medium inserted", T, |o| {
        o.status
            .as_ref()
            .is_some_and(|s| s.current_source.as_deref() == path.to_str() && s.live == Some(true))
    })
    .await;
    assert!(o.status.is_some());
    assert!(live_xml(&guest.name).contains(path.to_str().unwrap()));
}

#[tokio::test]
async fn ftps_with_login_and_ca_from_the_namespace_completes_into_the_pool() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-iso-ftps").await;
    let _op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-iso-ftps");
    let root = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..(2 << 20)).map(|i: u32| (i % 253) as u8).collect();
    std::fs::write(root.path().join("netinst.iso"), &data).unwrap();
    let sum = sha256(&root.path().join("netinst.iso"));
    let tls = pki::make();
    let cert = root.path().join("cert.pem");
    let key = root.path().join("key.pem");
    std::fs::write(&cert, &tls.cert_pem).unwrap();
    std::fs::write(&key, &tls.key_pem).unwrap();
    let server =
        ftp_server::FtpServer::start(root.path(), Some(&ftp_server::TlsFiles { cert, key }), None);

    // The login comes from a Secret (opted in for download hosts) and the CA from a ConfigMap of
    // the object's namespace.
    let ca = tls
        .ca_pem
        .lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n");
    kubectl_apply(
        &ns.name,
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: ftp-login\n  labels:\n    virtplane.io/download-credentials: \"true\"\nstringData:\n  username: {}\n  password: {}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ftp-ca\ndata:\n  ca.crt: |\n{ca}\n",
            ftp_server::USER,
            ftp_server::PASSWORD
        ),
    );
    let extra = format!(
        "  checksum:\n    algorithm: sha256\n    value: \"{sum}\"\n  auth:\n    secretRef:\n      name: ftp-login\n  tls:\n    caBundle:\n      configMapKeyRef:\n        name: ftp-ca\n"
    );
    kubectl_apply(
        &ns.name,
        &manifest(
            "ftps",
            &server.url("ftps", "netinst.iso"),
            &pool.name,
            &extra,
        ),
    );
    let done = wait_phase(&client, &ns.name, "ftps", DownloadPhase::Completed).await;
    let st = done.status.unwrap();
    assert_eq!(st.checksum_verified, Some(true));
    assert_eq!(sha256(Path::new(&st.volume.unwrap().path)), sum);
    assert!(virsh(&["vol-list", &pool.name]).contains("netinst.iso"));

    // Without the CA the server's certificate is not trusted: a TLS failure, nothing kept.
    kubectl_apply(
        &ns.name,
        &manifest(
            "untrusted",
            &server.url("ftps", "netinst.iso"),
            &pool.name,
            "  name: untrusted.iso\n  auth:\n    secretRef:\n      name: ftp-login\n",
        ),
    );
    let failed = wait_phase(&client, &ns.name, "untrusted", DownloadPhase::Failed).await;
    assert_eq!(
        ready_reason(&failed).as_deref(),
        Some("TlsError"),
        "{:?}",
        failed.status
    );
    assert_eq!(pool.files_settled(&["netinst.iso"]).await, ["netinst.iso"]);
}
