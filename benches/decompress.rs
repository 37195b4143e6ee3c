//! Download plus decompression of a 1 GiB `.xz` disk image with `virtplane::download`
//! (`disk_image`: decompressed while it streams in) against `curl | xz -d > file`, from the
//! same loopback server in the same run.
//!
//! `cargo bench --bench decompress` writes a 1 GiB raw image (every MiB: 256 KiB of
//! pseudo-random data, then zeros, like a sparse cloud image), compresses it with the `xz`
//! tool, serves it with the test fixture server (tests/fixtures/http_server.py, a separate
//! process, so this process's peak RSS is the downloader's alone) and fetches it
//! alternately with virtplane and with curl piped into xz, three times each, into
//! `/dev/shm` (set `VIRTPLANE_BENCH_DIR` to measure another directory). Both outputs are
//! checked against the image's SHA-256 once. Prints seconds and MiB/s of image for both,
//! their ratio, and the peak RSS of this process. Not run by `cargo test`.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use virtplane::download::{self, DownloadOptions, DownloadRequest, Progress};

const MIB: u64 = 1024 * 1024;
const SIZE: u64 = 1024 * MIB;
const RUNS: usize = 3;

/// Writes the image to `path`; returns its SHA-256.
fn write_image(path: &Path) -> String {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut h = sha2::Sha256::new();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut block = vec![0u8; MIB as usize];
    for _ in 0..SIZE / MIB {
        for chunk in block[..256 * 1024].chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        h.update(&block);
        file.write_all(&block).unwrap();
    }
    file.flush().unwrap();
    hex(&h.finalize())
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(dir: &Path, files: &Path) -> Server {
    let port_file = dir.join("port");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/http_server.py");
    let child = Command::new("python3")
        .arg(script)
        .arg(&port_file)
        .arg(files)
        .arg("0")
        .arg("/dev/null")
        .spawn()
        .expect("python3 must be installed");
    let start = Instant::now();
    while !port_file.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no server");
        std::thread::sleep(Duration::from_millis(50));
    }
    let port = std::fs::read_to_string(&port_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    Server { child, port }
}

async fn ours(url: &str, dir: &Path) -> Duration {
    let request = DownloadRequest {
        url: url.to_owned(),
        dir: dir.to_owned(),
        name: "ours.img".to_owned(),
        disk_image: true,
        ..DownloadRequest::default()
    };
    let options = DownloadOptions {
        default_deny: false,
        ..DownloadOptions::default()
    };
    let (tx, _rx) = watch::channel(Progress::default());
    let start = Instant::now();
    let outcome = download::download_once(&request, &options, &CancellationToken::new(), &tx)
        .await
        .unwrap();
    let elapsed = start.elapsed();
    assert_eq!(outcome.bytes, SIZE);
    assert_eq!(outcome.compression, Some(download::Compression::Xz));
    elapsed
}

fn curl_xz(url: &str, out: &Path) -> Duration {
    let start = Instant::now();
    let status = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; curl -sf '{url}' | xz -d > '{}'",
            out.display()
        ))
        .stdout(Stdio::null())
        .status()
        .expect("bash, curl and xz must be installed");
    let elapsed = start.elapsed();
    assert!(status.success(), "curl | xz -d failed: {status}");
    assert_eq!(std::fs::metadata(out).unwrap().len(), SIZE);
    elapsed
}

fn mib_per_s(elapsed: Duration) -> f64 {
    SIZE as f64 / MIB as f64 / elapsed.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    let base = std::env::var_os("VIRTPLANE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/shm"));
    let dir = tempfile::tempdir_in(&base).unwrap();
    let files = dir.path().join("files");
    let out = dir.path().join("out");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::create_dir_all(&out).unwrap();

    let raw = dir.path().join("image.raw");
    let want = write_image(&raw);
    let xz_path = files.join("bench.img.xz");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "xz -1 -T2 -c '{}' > '{}'",
            raw.display(),
            xz_path.display()
        ))
        .status()
        .expect("xz must be installed");
    assert!(status.success());
    std::fs::remove_file(&raw).unwrap();
    let packed = std::fs::metadata(&xz_path).unwrap().len();

    let server = start_server(dir.path(), &files);
    let url = format!("http://127.0.0.1:{}/bench.img.xz", server.port);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "a {} MiB image as {:.1} MiB of xz from {url} into {} ({RUNS} runs each, alternating)",
        SIZE / MIB,
        packed as f64 / MIB as f64,
        base.display()
    );

    // Warm-up run of each, checked against the image's digest.
    rt.block_on(ours(&url, &out));
    assert_eq!(
        sha256_file(&out.join("ours.img")),
        want,
        "virtplane's bytes"
    );
    std::fs::remove_file(out.join("ours.img")).unwrap();
    let theirs = out.join("curl.img");
    curl_xz(&url, &theirs);
    assert_eq!(sha256_file(&theirs), want, "curl | xz -d's bytes");
    std::fs::remove_file(&theirs).unwrap();

    let (mut o_all, mut c_all) = (Vec::new(), Vec::new());
    for run in 1..=RUNS {
        let o = rt.block_on(ours(&url, &out));
        std::fs::remove_file(out.join("ours.img")).unwrap();
        let c = curl_xz(&url, &theirs);
        std::fs::remove_file(&theirs).unwrap();
        println!(
            "run {run}: virtplane {:6.2} s {:7.1} MiB/s   curl | xz -d {:6.2} s {:7.1} MiB/s",
            o.as_secs_f64(),
            mib_per_s(o),
            c.as_secs_f64(),
            mib_per_s(c)
        );
        o_all.push(mib_per_s(o));
        c_all.push(mib_per_s(c));
    }
    let (o, c) = (median(o_all), median(c_all));
    println!(
        "median (MiB/s of decompressed image): virtplane {o:7.1}   curl | xz -d {c:7.1}   ratio {:.3}",
        o / c
    );
    if let Some(kib) = peak_rss_kib() {
        println!(
            "peak RSS of this process (the downloader alone; server, curl and xz are other processes): {:.1} MiB",
            kib as f64 / 1024.0
        );
    }
    drop(server);
}
