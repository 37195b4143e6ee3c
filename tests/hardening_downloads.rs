//! Hardening of IsoDownload against hostile URLs and servers: loopback and private addresses
//! refused by default (also behind redirects), error pages, endless and oversized bodies, slow
//! servers holding a slot, another object's partial data, credentials without consent and a
//! malformed checksum. Each refusal leaves nothing in the pool.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "hostile/server.rs"]
mod hostile;

use std::sync::atomic::Ordering;
use std::time::Duration;

use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use virtplane::api::{DownloadPhase, IsoDownload};

use common::*;
use hostile::{Config, Hostile};

const T: Duration = Duration::from_secs(120);

fn manifest(name: &str, url: &str, pool: &str, extra: &str) -> String {
    format!(
        "apiVersion: virtplane.io/v1alpha1\nkind: IsoDownload\nmetadata:\n  name: {name}\nspec:\n  url: \"{url}\"\n  pool: {pool}\n{extra}"
    )
}

fn ready(o: &IsoDownload) -> Option<(String, String, String)> {
    condition_of(&o.status.as_ref()?.conditions, "Ready")
}

async fn wait_phase(client: &Client, ns: &str, name: &str, want: DownloadPhase) -> IsoDownload {
    wait_obj::<IsoDownload>(client, ns, name, &format!("{name} {want:?}"), T, |o| {
        o.status.as_ref().and_then(|s| s.phase) == Some(want)
    })
    .await
}

/// Fails with `reason`; returns the Ready message.
async fn wait_failed(client: &Client, ns: &str, name: &str, reason: &str) -> String {
    let o = wait_phase(client, ns, name, DownloadPhase::Failed).await;
    let (_, got, message) = ready(&o).unwrap();
    assert_eq!(got, reason, "{name}: {message}");
    message
}

fn config(ok_len: u64, ok_rate: u64) -> Config {
    Config { ok_len, ok_rate }
}

#[tokio::test]
async fn loopback_and_private_addresses_are_refused_by_default() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-hd-deny").await;
    // No allow list: the agent refuses what the test servers of other tests are allowed.
    let _op = Operator::start(&ns.name, &NO_LOOPBACK);
    let pool = TestPool::create("vp-hd-deny");
    let server = Hostile::start("127.0.0.1", config(64 << 10, 1 << 20));
    let port = server.addr.rsplit(':').next().unwrap().to_string();
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let urls = [
        ("metrics", "http://127.0.0.1:8081/metrics".to_string()),
        ("loopback", server.url("/ok/a.iso")),
        ("closed", format!("http://127.0.0.1:{closed}/ok/a.iso")),
        ("localhost", format!("http://localhost:{port}/ok/a.iso")),
        (
            "mapped",
            format!("http://[::ffff:127.0.0.1]:{port}/ok/a.iso"),
        ),
        ("this-host", format!("http://0.0.0.0:{port}/ok/a.iso")),
        ("private", "http://10.0.0.1/a.iso".to_string()),
        ("cgnat", "http://100.64.0.1/a.iso".to_string()),
        ("nat64", "http://[64:ff9b::a00:1]/a.iso".to_string()),
        ("ula", "http://[fd00::1]/a.iso".to_string()),
        (
            "metadata",
            "http://169.254.169.254/latest/a.iso".to_string(),
        ),
    ];
    for (name, url) in &urls {
        kubectl_apply(
            &ns.name,
            &manifest(name, url, &pool.name, &format!("  name: {name}.iso\n")),
        );
    }
    for (name, _) in &urls {
        let message = wait_failed(&client, &ns.name, name, "DestinationNotAllowed").await;
        assert!(
            message.contains("--download-allow-cidr"),
            "{name}: {message}"
        );
    }
    // Not a port scanner: an open and a closed port get the same answer (the URL aside).
    let open = wait_failed(&client, &ns.name, "loopback", "DestinationNotAllowed").await;
    let shut = wait_failed(&client, &ns.name, "closed", "DestinationNotAllowed").await;
    assert_eq!(
        open.replace(&format!(":{port}/"), ":PORT/"),
        shut.replace(&format!(":{closed}/"), ":PORT/")
    );
    assert_eq!(
        server.requests.load(Ordering::SeqCst),
        0,
        "no connection made"
    );
    assert_eq!(pool.files_settled(&[]).await, Vec::<String>::new());
}

#[tokio::test]
async fn redirect_chains_into_denied_ranges_are_refused() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-hd-redir").await;
    // The server's own address is opened; the loopback addresses it redirects to are not.
    let _op = Operator::start(&ns.name, &["--download-allow-cidr", "127.0.0.2/32"]);
    let pool = TestPool::create("vp-hd-redir");
    let server = Hostile::start("127.0.0.2", config(64 << 10, 1 << 20));
    let port = server.addr.rsplit(':').next().unwrap().to_string();
    let hop = |to: &str| server.url(&format!("/redirect?to={to}"));
    let targets = [
        (
            "to-loopback",
            hop(&format!("http://127.0.0.1:{port}/ok/a.iso")),
        ),
        (
            "to-localhost",
            hop(&format!("http://localhost:{port}/ok/a.iso")),
        ),
        ("to-metadata", hop("http://169.254.169.254/latest/a.iso")),
        ("to-mapped", hop("http://[::ffff:10.0.0.1]/a.iso")),
        // A chain: allowed hop, allowed hop, then loopback.
        (
            "chain",
            hop(&hop(&format!("http://127.0.0.1:{port}/ok/a.iso"))),
        ),
    ];
    for (name, url) in &targets {
        kubectl_apply(
            &ns.name,
            &manifest(name, url, &pool.name, &format!("  name: {name}.iso\n")),
        );
    }
    for (name, _) in &targets {
        wait_failed(&client, &ns.name, name, "DestinationNotAllowed").await;
    }
    // The allowed address itself downloads.
    kubectl_apply(
        &ns.name,
        &manifest("direct", &server.url("/ok/a.iso"), &pool.name, ""),
    );
    wait_phase(&client, &ns.name, "direct", DownloadPhase::Completed).await;
    assert_eq!(pool.files_settled(&["a.iso"]).await, ["a.iso"]);
}

#[tokio::test]
async fn error_pages_are_never_completed() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-hd-html").await;
    let _op = Operator::start(&ns.name, &["--download-allow-cidr", "127.0.0.2/32"]);
    let pool = TestPool::create("vp-hd-html");
    let server = Hostile::start("127.0.0.2", config(64 << 10, 1 << 20));
    kubectl_apply(
        &ns.name,
        &manifest(
            "html",
            &server.url("/html"),
            &pool.name,
            "  name: html.iso\n",
        ),
    );
    kubectl_apply(
        &ns.name,
        &manifest(
            "disguised",
            &server.url("/disguised"),
            &pool.name,
            "  name: disguised.iso\n",
        ),
    );
    let m = wait_failed(&client, &ns.name, "html", "ErrorPage").await;
    assert!(m.contains("text/html"), "{m}");
    let m = wait_failed(&client, &ns.name, "disguised", "ErrorPage").await;
    assert!(m.contains("an HTML document"), "{m}");
    assert_eq!(pool.files_settled(&[]).await, Vec::<String>::new());
    // Explicitly allowed: completed, and the format says what it is.
    kubectl_apply(
        &ns.name,
        &manifest(
            "allowed",
            &server.url("/html"),
            &pool.name,
            "  name: page.html\n  allowMarkup: true\n",
        ),
    );
    let done = wait_phase(&client, &ns.name, "allowed", DownloadPhase::Completed).await;
    assert_eq!(done.status.unwrap().format.as_deref(), Some("raw"));
    kubectl_apply(
        &ns.name,
        &manifest("file", &server.url("/ok/a.iso"), &pool.name, ""),
    );
    let done = wait_phase(&client, &ns.name, "file", DownloadPhase::Completed).await;
    assert_eq!(done.status.unwrap().format.as_deref(), Some("raw"));
    assert_eq!(
        pool.files_settled(&["a.iso", "page.html"]).await,
        ["a.iso", "page.html"]
    );
}

#[tokio::test]
async fn endless_and_oversized_bodies_are_cut_off() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-hd-size").await;
    let _op = Operator::start(
        &ns.name,
        &[
            "--download-allow-cidr",
            "127.0.0.2/32",
            "--download-max-bytes",
            "4194304",
        ],
    );
    let pool = TestPool::create("vp-hd-size");
    let server = Hostile::start("127.0.0.2", config(2 << 20, 64 << 20));
    // No length and no end: the node's limit cuts it off.
    kubectl_apply(
        &ns.name,
        &manifest(
            "endless",
            &server.url("/endless"),
            &pool.name,
            "  name: endless.iso\n",
        ),
    );
    // Announced larger than the object's own limit.
    kubectl_apply(
        &ns.name,
        &manifest(
            "big",
            &server.url("/ok/big.iso"),
            &pool.name,
            "  maxBytes: 1048576\n",
        ),
    );
    let m = wait_failed(&client, &ns.name, "endless", "TooLarge").await;
    assert!(m.contains("4194304"), "{m}");
    let m = wait_failed(&client, &ns.name, "big", "TooLarge").await;
    assert!(m.contains("1048576"), "{m}");
    assert_eq!(pool.files_settled(&[]).await, Vec::<String>::new());
}

#[tokio::test]
async fn a_slow_server_gives_up_its_slot() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-hd-slow").await;
    let _op = Operator::start(
        &ns.name,
        &[
            "--download-allow-cidr",
            "127.0.0.2/32",
            "--max-downloads",
            "1",
            "--download-min-rate-bytes",
            "1000",
            "--download-rate-window-seconds",
            "2",
        ],
    );
    let pool = TestPool::create("vp-hd-slow");
    let server = Hostile::start("127.0.0.2", config(64 << 10, 1 << 20));
    kubectl_apply(
        &ns.name,
        &manifest(
            "slow",
            &server.url("/slow"),
            &pool.name,
            "  name: slow.iso\n",
        ),
    );
    let slow = wait_obj::<IsoDownload>(&client, &ns.name, "slow", "slow Retrying", T, |o| {
        ready(o).is_some_and(|(_, r, m)| r == "Retrying" && m.contains("bytes/s"))
    })
    .await;
    let (_, _, m) = ready(&slow).unwrap();
    assert!(m.contains("below the minimum of 1000 bytes/s"), "{m}");
    // The only slot is free again: another download completes meanwhile.
    kubectl_apply(
        &ns.name,
        &manifest("fast", &server.url("/ok/fast.iso"), &pool.name, ""),
    );
    wait_phase(&client, &ns.name, "fast", DownloadPhase::Completed).await;
    // Deleting the slow one leaves only the completed file.
    kubectl_delete(&ns.name, "isodownload", "slow");
    wait_gone::<IsoDownload>(&client, &ns.name, "slow", T).await;
    assert_eq!(pool.files_settled(&["fast.iso"]).await, ["fast.iso"]);
}

#[tokio::test]
async fn a_paused_downloads_data_stays_its_own() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-hd-name").await;
    let _op = Operator::start(&ns.name, &["--download-allow-cidr", "127.0.0.2/32"]);
    let pool = TestPool::create("vp-hd-name");
    let server = Hostile::start("127.0.0.2", config(4 << 20, 512 << 10));
    let api: Api<IsoDownload> = Api::namespaced(client.clone(), &ns.name);
    kubectl_apply(
        &ns.name,
        &manifest("first", &server.url("/ok/shared.iso"), &pool.name, ""),
    );
    wait_obj::<IsoDownload>(&client, &ns.name, "first", "first has data", T, |o| {
        o.status
            .as_ref()
            .and_then(|s| s.downloaded_bytes)
            .is_some_and(|b| b > 0)
    })
    .await;
    api.patch(
        "first",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"paused": true}})),
    )
    .await
    .unwrap();
    wait_phase(&client, &ns.name, "first", DownloadPhase::Paused).await;
    let partial = pool.path.join(".shared.iso.part");
    let kept = std::fs::read(&partial).unwrap();
    assert!(!kept.is_empty());

    // A second object of the same pool and name: refused at once, and its deletion leaves the
    // first one's data alone.
    kubectl_apply(
        &ns.name,
        &manifest("second", &server.url("/ok/shared.iso"), &pool.name, ""),
    );
    let m = wait_failed(&client, &ns.name, "second", "NameConflict").await;
    assert!(!m.contains("first"), "names no other object: {m}");
    kubectl_delete(&ns.name, "isodownload", "second");
    wait_gone::<IsoDownload>(&client, &ns.name, "second", T).await;
    assert_eq!(std::fs::read(&partial).unwrap(), kept);

    // The first resumes and completes.
    api.patch(
        "first",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"paused": false}})),
    )
    .await
    .unwrap();
    wait_phase(&client, &ns.name, "first", DownloadPhase::Completed).await;
    assert_eq!(pool.files_settled(&["shared.iso"]).await, ["shared.iso"]);
}

#[tokio::test]
async fn credentials_need_consent_and_never_show() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-hd-cred").await;
    let _op = Operator::start(&ns.name, &["--download-allow-cidr", "127.0.0.2/32"]);
    let pool = TestPool::create("vp-hd-cred");
    let server = Hostile::start("127.0.0.2", config(64 << 10, 1 << 20));
    kubectl_apply(
        &ns.name,
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: login\nstringData:\n  username: u\n  password: hunter2\n",
    );
    let secret = "  auth:\n    secretRef:\n      name: login\n";
    // Plain http: refused before anything is sent.
    kubectl_apply(
        &ns.name,
        &manifest("plain", &server.url("/ok/a.iso"), &pool.name, secret),
    );
    // Consent to plain text, but the Secret did not opt in.
    kubectl_apply(
        &ns.name,
        &manifest(
            "not-opted-in",
            &server.url("/ok/b.iso"),
            &pool.name,
            &format!("{secret}  allowPlainTextCredentials: true\n"),
        ),
    );
    // A password in the URL over plain http.
    let with_pass = server
        .url("/ok/c.iso")
        .replace("http://", "http://user:s3cret@");
    kubectl_apply(&ns.name, &manifest("in-url", &with_pass, &pool.name, ""));
    wait_failed(&client, &ns.name, "plain", "CredentialsNotAllowed").await;
    let m = wait_failed(&client, &ns.name, "not-opted-in", "CredentialsNotAllowed").await;
    assert!(m.contains("virtplane.io/download-hosts"), "{m}");
    let m = wait_failed(&client, &ns.name, "in-url", "CredentialsNotAllowed").await;
    assert!(!m.contains("s3cret"), "{m}");
    let o = wait_phase(&client, &ns.name, "in-url", DownloadPhase::Failed).await;
    let status = serde_json::to_string(&o.status).unwrap();
    assert!(!status.contains("s3cret"), "{status}");
    let events = event_reasons(&client, &ns.name, "in-url").await;
    assert!(!events.is_empty());
    assert_eq!(
        server.requests.load(Ordering::SeqCst),
        0,
        "nothing was sent"
    );
    assert_eq!(pool.files_settled(&[]).await, Vec::<String>::new());
}

#[tokio::test]
async fn a_checksum_of_the_wrong_length_is_refused_before_a_slot() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-hd-sum").await;
    let _op = Operator::start(&ns.name, &["--download-allow-cidr", "127.0.0.2/32"]);
    let pool = TestPool::create("vp-hd-sum");
    let server = Hostile::start("127.0.0.2", config(64 << 10, 1 << 20));
    let short = "a".repeat(63);
    kubectl_apply(
        &ns.name,
        &manifest(
            "short",
            &server.url("/ok/a.iso"),
            &pool.name,
            &format!("  checksum:\n    algorithm: sha256\n    value: \"{short}\"\n"),
        ),
    );
    let m = wait_failed(&client, &ns.name, "short", "InvalidChecksum").await;
    assert!(m.contains("63 hex digits") && m.contains("64"), "{m}");
    assert_eq!(server.requests.load(Ordering::SeqCst), 0, "never connected");
    assert_eq!(pool.files_settled(&[]).await, Vec::<String>::new());
}

/// A tmpfs of `mib` MiB as a dir pool; unmounted when dropped (after the pool).
struct SmallPool {
    pool: Option<TestPool>,
    dir: std::path::PathBuf,
}

impl SmallPool {
    fn create(prefix: &str, mib: u64) -> Self {
        let name = unique(prefix);
        let dir = std::path::PathBuf::from("/var/lib/libvirt/images").join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let size = format!("size={mib}m");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &size, "tmpfs", dir.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(ok.success(), "mount a tmpfs");
        virsh(&[
            "pool-define-as",
            &name,
            "dir",
            "--target",
            dir.to_str().unwrap(),
        ]);
        virsh(&["pool-start", &name]);
        Self {
            pool: Some(TestPool {
                name,
                path: dir.clone(),
            }),
            dir,
        }
    }
}

impl Drop for SmallPool {
    fn drop(&mut self) {
        drop(self.pool.take());
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[tokio::test]
async fn a_body_without_length_stops_at_the_free_space_floor() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-hd-floor").await;
    // 64 MiB of pool, 40 MiB kept free: an endless body without a length passes the check
    // before the transfer and is stopped while it streams, long before the pool is full.
    let _op = Operator::start(
        &ns.name,
        &[
            "--download-allow-cidr",
            "127.0.0.2/32",
            "--download-min-free-bytes",
            "41943040",
        ],
    );
    let small = SmallPool::create("vp-hd-floor", 64);
    let pool = small.pool.as_ref().unwrap();
    let server = Hostile::start("127.0.0.2", config(2 << 20, 64 << 20));
    kubectl_apply(
        &ns.name,
        &manifest(
            "floor",
            &server.url("/endless"),
            &pool.name,
            "  name: floor.iso\n",
        ),
    );
    let m = wait_failed(&client, &ns.name, "floor", "InsufficientSpace").await;
    assert!(m.contains("41943040 bytes kept free"), "{m}");
    assert!(m.contains("Free space in the pool"), "{m}");
    // The pool never filled up, and the failed download left nothing in it.
    eventually("the partial data removed", T, || async {
        pool.files().is_empty().then_some(())
    })
    .await;
}

/// A Node object (no kubelet behind it) with pod ranges; deleted when dropped.
struct FakeNode(String);

impl FakeNode {
    async fn create(client: &Client, prefix: &str, pod_cidrs: &[&str]) -> Self {
        use k8s_openapi::api::core::v1::Node;
        let name = unique(prefix);
        let node: Node = serde_json::from_value(json!({
            "metadata": { "name": name },
            "spec": { "podCIDR": pod_cidrs[0], "podCIDRs": pod_cidrs },
        }))
        .unwrap();
        Api::<Node>::all(client.clone())
            .create(&Default::default(), &node)
            .await
            .unwrap();
        Self(name)
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kubectl")
            .args(["delete", "node", &self.0, "--wait=false"])
            .stdout(std::process::Stdio::null())
            .status();
    }
}

#[tokio::test]
async fn the_clusters_pod_and_service_ranges_are_refused() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-hd-cluster").await;
    // The test servers' loopback addresses stand in for the cluster's ranges: a Node's pod
    // range and the --service-cidr win over the allow list that opens loopback.
    let _node = FakeNode::create(&client, "vp-hd-podnet", &["127.0.0.2/32"]).await;
    let op = Operator::start(
        &ns.name,
        &[
            "--download-allow-cidr",
            "127.0.0.0/8",
            "--service-cidr",
            "127.0.0.3/32",
        ],
    );
    eventually("the agent learns the pod ranges", T, || async {
        op.agent
            .process
            .log_text()
            .contains("the cluster's pod ranges are refused")
            .then_some(())
    })
    .await;
    let pool = TestPool::create("vp-hd-cluster");
    let pod = Hostile::start("127.0.0.2", config(64 << 10, 64 << 20));
    let service = Hostile::start("127.0.0.3", config(64 << 10, 64 << 20));
    let other = Hostile::start("127.0.0.4", config(64 << 10, 64 << 20));
    for (name, server) in [("pod", &pod), ("service", &service), ("other", &other)] {
        kubectl_apply(
            &ns.name,
            &manifest(
                name,
                &server.url("/ok/a.iso"),
                &pool.name,
                &format!("  name: {name}.iso\n"),
            ),
        );
    }
    for name in ["pod", "service"] {
        let m = wait_failed(&client, &ns.name, name, "DestinationNotAllowed").await;
        assert!(m.contains("pod range of the cluster"), "{name}: {m}");
    }
    // The same server elsewhere on loopback is reachable: the ranges made the difference.
    wait_phase(&client, &ns.name, "other", DownloadPhase::Completed).await;
    assert_eq!(pod.requests.load(Ordering::SeqCst), 0, "no connection made");
    assert_eq!(
        service.requests.load(Ordering::SeqCst),
        0,
        "no connection made"
    );
    eventually("only the reachable download's file", T, || async {
        (pool.files() == ["other.iso"]).then_some(())
    })
    .await;
}
