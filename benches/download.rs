//! Throughput of `virtplane::download` against `curl -o`, from the same loopback server.
//!
//! `cargo bench --bench download` serves a 1 GiB file (a 1 MiB pseudo-random block
//! repeated, never held whole in memory) from an in-process HTTP server on its own thread,
//! then downloads it alternately with virtplane and with curl, five times each, into
//! `/dev/shm` (tmpfs, so the disk does not dominate; set `VIRTPLANE_BENCH_DIR` to measure
//! another directory). Prints MiB/s for both, their ratio, one run with SHA-256 verification
//! and the peak RSS of this process. Not run by `cargo test`.
//!
//! With the local environment up (`eval "$(hack/env-up.sh)"`, so `KUBECONFIG` is set) it then
//! runs `VIRTPLANE_BENCH_ROUNDS` (3) rounds of a 1 GiB `IsoDownload` from apply to `Completed`
//! through a real agent and controller, each next to curl of the same file in the same round,
//! with a per-step timing table and the agent's peak RSS (see `download/iso.rs`).
//! `VIRTPLANE_BENCH_PARTS` (`engine,iso`) chooses the parts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "download/iso.rs"]
mod iso;
#[path = "measure/mod.rs"]
mod measure;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use sha2::Digest;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use virtplane::download::{
    self, Checksum, ChecksumAlgorithm, DownloadOptions, DownloadRequest, Progress,
};

const MIB: u64 = 1024 * 1024;
const SIZE: u64 = 1024 * MIB;
const RUNS: usize = 5;

fn block() -> Bytes {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut out = Vec::with_capacity(MIB as usize);
    while out.len() < MIB as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    Bytes::from(out)
}

type Body = BoxBody<Bytes, Infallible>;

fn respond(req: &Request<hyper::body::Incoming>, block: &Bytes) -> Response<Body> {
    let builder = Response::builder()
        .header("content-length", SIZE)
        .header("etag", "\"bench\"")
        .header("accept-ranges", "none");
    if req.method() == Method::HEAD {
        return builder.body(Empty::new().boxed()).unwrap();
    }
    let block = block.clone();
    let frames = futures::stream::iter(
        (0..SIZE / MIB).map(move |_| Ok::<_, Infallible>(Frame::data(block.clone()))),
    );
    builder
        .body(BodyExt::boxed(StreamBody::new(frames)))
        .unwrap()
}

/// Starts the server on a dedicated thread with its own single-threaded runtime.
fn start_server() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let block = block();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let block = block.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let resp = respond(&req, &block);
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    rx.recv().unwrap()
}

fn mib_per_s(elapsed: Duration) -> f64 {
    SIZE as f64 / MIB as f64 / elapsed.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn check_size(path: &Path) {
    let len = std::fs::metadata(path).unwrap().len();
    assert_eq!(len, SIZE, "{} has {len} bytes", path.display());
}

async fn ours(url: &str, dir: &Path, checksum: Option<Checksum>) -> Duration {
    let request = DownloadRequest {
        url: url.to_owned(),
        dir: dir.to_owned(),
        name: "ours.img".to_owned(),
        checksum,
        ..DownloadRequest::default()
    };
    let (tx, _rx) = watch::channel(Progress::default());
    let start = Instant::now();
    download::download_once(
        &request,
        &DownloadOptions::default(),
        &CancellationToken::new(),
        &tx,
    )
    .await
    .unwrap();
    let elapsed = start.elapsed();
    let path = dir.join("ours.img");
    check_size(&path);
    std::fs::remove_file(path).unwrap();
    elapsed
}

fn curl(url: &str, dir: &Path) -> Duration {
    let path = dir.join("curl.img");
    let start = Instant::now();
    let status = Command::new("curl")
        .args(["-s", "-f", "-o"])
        .arg(&path)
        .arg(url)
        .status()
        .expect("curl must be installed");
    let elapsed = start.elapsed();
    assert!(status.success(), "curl failed: {status}");
    check_size(&path);
    std::fs::remove_file(path).unwrap();
    elapsed
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    // `cargo bench` passes --bench; any other argument is a filter we do not support.
    let base = std::env::var_os("VIRTPLANE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/shm"));
    let dir = tempfile::tempdir_in(&base).unwrap();
    let addr = start_server();
    let url = format!("http://{addr}/bench.img");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let parts = std::env::var("VIRTPLANE_BENCH_PARTS").unwrap_or_else(|_| "engine,iso".into());
    if parts.split(',').any(|p| p == "engine") {
        engine(&rt, &url, dir.path(), &base);
    }
    if parts.split(',').any(|p| p == "iso") {
        if std::env::var_os("KUBECONFIG").is_none() {
            println!(
                "IsoDownload rounds skipped: KUBECONFIG is not set (eval \"$(hack/env-up.sh)\")"
            );
            return;
        }
        let rounds = std::env::var("VIRTPLANE_BENCH_ROUNDS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(3);
        rt.block_on(iso::run(&url, &base, rounds));
    }
}

/// The engine alone against curl.
fn engine(rt: &tokio::runtime::Runtime, url: &str, dir: &Path, base: &Path) {
    let url = url.to_owned();

    println!(
        "downloading {} MiB from {url} into {} ({RUNS} runs each, alternating)",
        SIZE / MIB,
        base.display()
    );
    // Warm up both paths (page cache, allocator, server).
    rt.block_on(ours(&url, dir, None));
    curl(&url, dir);

    let (mut our_rates, mut curl_rates) = (Vec::new(), Vec::new());
    for run in 1..=RUNS {
        let o = mib_per_s(rt.block_on(ours(&url, dir, None)));
        let c = mib_per_s(curl(&url, dir));
        println!("run {run}: virtplane {o:8.1} MiB/s   curl {c:8.1} MiB/s");
        our_rates.push(o);
        curl_rates.push(c);
    }
    let (o, c) = (median(our_rates), median(curl_rates));
    println!(
        "median:  virtplane {o:8.1} MiB/s   curl {c:8.1} MiB/s   ratio {:.3}",
        o / c
    );

    let digest = {
        let block = block();
        let mut h = sha2::Sha256::new();
        for _ in 0..SIZE / MIB {
            h.update(&block);
        }
        h.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let checksum = Checksum {
        algorithm: ChecksumAlgorithm::Sha256,
        hex: digest,
    };
    let s = mib_per_s(rt.block_on(ours(&url, dir, Some(checksum))));
    println!("with SHA-256 verification: virtplane {s:8.1} MiB/s");
    if let Some(kib) = peak_rss_kib() {
        println!(
            "peak RSS of this process (server and client): {:.1} MiB",
            kib as f64 / 1024.0
        );
    }
}
