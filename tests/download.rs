//! The downloader against real servers: an in-process HTTP/HTTPS server that misbehaves on
//! request (tests/download/http_server.rs) and pyftpdlib for FTP/FTPS (hack/ftp-server.py).
#![allow(clippy::unwrap_used)]

#[path = "download/ftp_server.rs"]
mod ftp_server;
#[path = "download/http_server.rs"]
mod http_server;
#[path = "download/pki.rs"]
mod pki;

use std::path::Path;
use std::time::Duration;

use sha2::Digest;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use virtplane::download::{
    self, Checksum, ChecksumAlgorithm, Credentials, DownloadError, DownloadOptions,
    DownloadRequest, Outcome, Phase, Progress, RestartReason, RetryPolicy, TlsOptions,
};

use ftp_server::{FtpServer, TlsFiles};
use http_server::{Behavior, HttpServer};

const MIB: usize = 1024 * 1024;

/// Deterministic, non-repeating test data (xorshift), so misplaced bytes change the digest.
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha256(data: &[u8]) -> Checksum {
    let digest = sha2::Sha256::digest(data);
    Checksum {
        algorithm: ChecksumAlgorithm::Sha256,
        hex: digest.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

fn sha512(data: &[u8]) -> Checksum {
    let digest = sha2::Sha512::digest(data);
    Checksum {
        algorithm: ChecksumAlgorithm::Sha512,
        hex: digest.iter().map(|b| format!("{b:02X}")).collect(),
    }
}

/// Fast retries, short timeouts, small buffers (so data reaches the disk early).
fn options() -> DownloadOptions {
    DownloadOptions {
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(10),
        buffer_size: 256 * 1024,
        retry: RetryPolicy {
            max_failures: 4,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
        },
        ..DownloadOptions::default()
    }
}

fn request(url: String, dir: &Path, name: &str) -> DownloadRequest {
    DownloadRequest {
        url,
        dir: dir.to_owned(),
        name: name.to_owned(),
        ..DownloadRequest::default()
    }
}

async fn fetch(req: &DownloadRequest) -> Result<Outcome, DownloadError> {
    let (tx, _rx) = watch::channel(Progress::default());
    download::download(req, &options(), &CancellationToken::new(), &tx).await
}

async fn fetch_once(req: &DownloadRequest) -> Result<Outcome, DownloadError> {
    let (tx, _rx) = watch::channel(Progress::default());
    download::download_once(req, &options(), &CancellationToken::new(), &tx).await
}

/// Starts a download in a task, waits until some data arrived, then cancels it (a pause).
/// Returns the error it ended with.
async fn pause_midway(req: &DownloadRequest) -> DownloadError {
    let (tx, mut rx) = watch::channel(Progress::default());
    let cancel = CancellationToken::new();
    let task = {
        let (req, cancel) = (req.clone(), cancel.clone());
        tokio::spawn(async move { download::download(&req, &options(), &cancel, &tx).await })
    };
    rx.wait_for(|p| p.bytes_done > 0).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel.cancel();
    let result = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("a cancelled download must stop promptly")
        .unwrap();
    result.expect_err("a paused download must not complete")
}

fn assert_file(dir: &Path, name: &str, expected: &[u8]) {
    let got = std::fs::read(dir.join(name)).unwrap();
    assert!(got == expected, "{name}: content differs");
    assert_no_partial(dir, name);
}

fn assert_no_partial(dir: &Path, name: &str) {
    assert!(!dir.join(format!(".{name}.part")).exists(), "partial left");
    assert!(
        !dir.join(format!(".{name}.part.json")).exists(),
        "sidecar left"
    );
}

fn partial_len(dir: &Path, name: &str) -> u64 {
    std::fs::metadata(dir.join(format!(".{name}.part")))
        .map(|m| m.len())
        .unwrap_or(0)
}

// ------------------------------------------------------------------------------- HTTP(S)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_download_completes_and_checksum_matches() {
    let data = content(3 * MIB + 123, 1);
    let server = HttpServer::start(data.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(server.url("isos/disk.iso"), dir.path(), "disk.iso");
    req.checksum = Some(sha256(&data));

    let info = download::probe(&req, &options()).await.unwrap();
    assert_eq!(info.total_bytes, Some(data.len() as u64));
    assert!(info.etag.is_some() && info.last_modified.is_some());
    assert!(info.accepts_ranges);

    req.expected_size = info.total_bytes;
    let (tx, rx) = watch::channel(Progress::default());
    let outcome = download::download(&req, &options(), &CancellationToken::new(), &tx)
        .await
        .unwrap();
    assert_file(dir.path(), "disk.iso", &data);
    assert_eq!(outcome.path, dir.path().join("disk.iso"));
    assert_eq!(outcome.bytes, data.len() as u64);
    assert_eq!(outcome.transferred, data.len() as u64);
    assert_eq!((outcome.reused, outcome.attempts), (0, 1));
    assert!(outcome.checksum_verified);
    assert!(outcome.restarts.is_empty() && outcome.note().is_none());
    let last = rx.borrow().clone();
    assert_eq!(last.phase, Phase::Completed);
    assert_eq!(last.bytes_done, data.len() as u64);
    assert_eq!(last.percent(), Some(100));
    assert_eq!(server.served_total(), data.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_extra_ca_completes() {
    let pki = pki::make();
    let data = content(2 * MIB, 2);
    let server = HttpServer::start(data.clone(), Some(pki.server_config())).await;
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(server.url("disk.iso"), dir.path(), "disk.iso");
    req.checksum = Some(sha512(&data));
    req.tls.extra_ca_pem = Some(pki.ca_pem.clone().into_bytes());

    let info = download::probe(&req, &options()).await.unwrap();
    assert_eq!(info.total_bytes, Some(data.len() as u64));
    let outcome = fetch(&req).await.unwrap();
    assert!(outcome.checksum_verified);
    assert_file(dir.path(), "disk.iso", &data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_unknown_ca_is_a_tls_error_and_skip_verify_succeeds() {
    let pki = pki::make();
    let data = content(MIB, 3);
    let server = HttpServer::start(data.clone(), Some(pki.server_config())).await;
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(server.url("disk.iso"), dir.path(), "disk.iso");

    let err = download::probe(&req, &options()).await.unwrap_err();
    assert!(matches!(err, DownloadError::Tls { .. }), "{err:?}");
    let err = fetch(&req).await.unwrap_err();
    assert!(matches!(err, DownloadError::Tls { .. }), "{err:?}");
    assert!(!err.is_transient());
    assert_eq!(err.reason(), "TlsError");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    assert!(!dir.path().join("disk.iso").exists());

    req.tls = TlsOptions {
        extra_ca_pem: None,
        insecure_skip_verify: true,
    };
    fetch(&req).await.unwrap();
    assert_file(dir.path(), "disk.iso", &data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_then_resume_transfers_only_the_missing_bytes() {
    let data = content(4 * MIB, 4);
    let server = HttpServer::start(data.clone(), None).await;
    server.set_behavior(Behavior {
        stall_after: Some(MIB as u64 + 4321),
        stall_times: 1,
        ..Behavior::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(server.url("disk.iso"), dir.path(), "disk.iso");
    req.checksum = Some(sha256(&data));

    let err = pause_midway(&req).await;
    let kept = partial_len(dir.path(), "disk.iso");
    assert!(
        matches!(err, DownloadError::Cancelled { kept: k, .. } if k == kept),
        "{err:?}, partial holds {kept}"
    );
    assert_eq!(err.reason(), "Cancelled");
    assert_eq!(
        kept,
        MIB as u64 + 4321,
        "the pause keeps every byte received"
    );
    assert_eq!(
        download::partial_len(dir.path(), "disk.iso").await.unwrap(),
        kept
    );
    assert!(!dir.path().join("disk.iso").exists());

    let outcome = fetch(&req).await.unwrap();
    assert_file(dir.path(), "disk.iso", &data);
    let gets = server.gets();
    assert_eq!(gets.len(), 2);
    assert_eq!(
        gets[1].range.as_deref(),
        Some(format!("bytes={kept}-").as_str())
    );
    assert!(gets[1].if_range.is_some());
    assert_eq!(gets[1].status, 206);
    assert_eq!(gets[1].served(), data.len() as u64 - kept);
    assert_eq!(outcome.reused, kept);
    assert_eq!(outcome.transferred, data.len() as u64 - kept);
    assert!(outcome.checksum_verified && outcome.restarts.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_download_of_the_same_file_is_busy() {
    let data = content(2 * MIB, 5);
    let server = HttpServer::start(data.clone(), None).await;
    server.set_behavior(Behavior {
        stall_after: Some(MIB as u64),
        stall_times: 1,
        ..Behavior::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let req = request(server.url("disk.iso"), dir.path(), "disk.iso");
    let (tx, mut rx) = watch::channel(Progress::default());
    let cancel = CancellationToken::new();
    let first = {
        let (req, cancel) = (req.clone(), cancel.clone());
        tokio::spawn(async move { download::download(&req, &options(), &cancel, &tx).await })
    };
    rx.wait_for(|p| p.bytes_done > 0).await.unwrap();
    let err = fetch_once(&req).await.unwrap_err();
    assert!(matches!(err, DownloadError::Busy { .. }), "{err:?}");
    assert!(err.is_transient());
    let err = download::discard_partial(dir.path(), "disk.iso")
        .await
        .unwrap_err();
    assert!(matches!(err, DownloadError::Busy { .. }), "{err:?}");

    cancel.cancel();
    assert!(matches!(
        first.await.unwrap(),
        Err(DownloadError::Cancelled { .. })
    ));
    download::discard_partial(dir.path(), "disk.iso")
        .await
        .unwrap();
    assert_no_partial(dir.path(), "disk.iso");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_run_resumes_from_the_partial_file() {
    let data = content(4 * MIB, 6);
    let server = HttpServer::start(data.clone(), None).await;
    server.set_behavior(Behavior {
        stall_after: Some(2 * MIB as u64),
        stall_times: 1,
        ..Behavior::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(server.url("disk.iso"), dir.path(), "disk.iso");
    req.checksum = Some(sha256(&data));

    // A "crash": the task is dropped mid-transfer; no cancellation, no cleanup code.
    let (tx, mut rx) = watch::channel(Progress::default());
    let task = {
        let req = req.clone();
        tokio::spawn(async move {
            download::download(&req, &options(), &CancellationToken::new(), &tx).await
        })
    };
    rx.wait_for(|p| p.bytes_done >= MIB as u64).await.unwrap();
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert!(dir.path().join(".disk.iso.part.json").exists());

    // A new run knows nothing but the directory. Its first attempts may find the dead run's
    // writer still finishing (Busy, retried); on a loaded machine that takes a while.
    let patient = DownloadOptions {
        retry: RetryPolicy {
            max_failures: 20,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
        },
        ..options()
    };
    let outcome = fetch_with(&req, &patient).await.unwrap();
    assert_file(dir.path(), "disk.iso", &data);
    let resumed = outcome.reused;
    assert!(resumed >= MIB as u64 / 2, "resumed from {resumed}");
    let last = server.gets().pop().unwrap();
    assert_eq!(last.range, Some(format!("bytes={resumed}-")));
    assert_eq!(last.served(), data.len() as u64 - resumed);
    assert_eq!(outcome.transferred, data.len() as u64 - resumed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_is_retried_and_resumed() {
    let data = content(3 * MIB, 7);
    let server = HttpServer::start(data.clone(), None).await;
    server.set_behavior(Behavior {
        drop_after: Some(MIB as u64 + 777),
        drop_times: 1,
        ..Behavior::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(server.url("disk.iso"), dir.path(), "disk.iso");
    req.checksum = Some(sha256(&data));

    let outcome = fetch(&req).await.unwrap();
    assert_file(dir.path(), "disk.iso", &data);
    assert_eq!(outcome.attempts, 2);
    assert!(outcome.restarts.is_empty());
    let gets = server.gets();
    assert_eq!(gets.len(), 2);
    let offset = MIB as u64 + 777;
    assert_eq!(gets[1].range, Some(format!("bytes={offset}-")));
    assert_eq!(gets[1].served(), data.len() as u64 - offset);
    assert_eq!(
        outcome.transferred,
        data.len() as u64,
        "no byte fetched twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_ignoring_range_restarts_from_zero_with_a_note() {
    let data = content(3 * MIB, 8);
    let server = HttpServer::start(data.clone(), None).await;
    server.set_behavior(Behavior {
        drop_after: Some(MIB as u64),
        drop_times: 1,
        ..Behavior::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(server.url("disk.iso"), dir.path(), "disk.iso");
    req.checksum = Some(sha256(&data));
    let err = fetch_once(&req).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert_eq!(partial_len(dir.path(), "disk.iso"), MIB as u64);

    server.set_behavior(Behavior {
        ignore_range: true,
        ..Behavior::default()
    });
    server.clear_log();
    let outcome = fetch(&req).await.unwrap();
    assert_file(dir.path(), "disk.iso", &data);
    assert_eq!(outcome.restarts, vec![RestartReason::RangeIgnored]);
    assert_eq!(outcome.reused, 0);
    assert!(
        outcome
            .note()
            .unwrap()
            .contains("does not support resuming")
    );
    let gets = server.gets();
    assert_eq!(gets.len(), 1, "the 200 answer is used, not requested again");
    assert_eq!(gets[0].status, 200);
    assert_eq!(gets[0].served(), data.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_change_between_attempts_restarts_from_zero() {
    let old = content(3 * MIB, 9);
    let new = content(3 * MIB + 10, 10);
    let server = HttpServer::start(old, None).await;
    server.set_behavior(Behavior {
        drop_after: Some(MIB as u64),
        drop_times: 1,
        ..Behavior::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(server.url("disk.iso"), dir.path(), "disk.iso");
    fetch_once(&req).await.unwrap_err();
    assert!(partial_len(dir.path(), "disk.iso") > 0);

    server.replace_content(new.clone());
    req.checksum = Some(sha256(&new));
    let outcome = fetch(&req).await.unwrap();
    assert_file(dir.path(), "disk.iso", &new);
    assert_eq!(outcome.restarts, vec![RestartReason::RemoteChanged]);
    assert!(outcome.note().unwrap().contains("remote file changed"));
    assert!(outcome.checksum_verified);
    let last = server.gets().pop().unwrap();
    assert!(last.if_range.is_some(), "the resume carried a validator");
    assert_eq!(last.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_html_error_page_never_completes() {
    let data = content(2 * MIB, 11);
    let server = HttpServer::start(data, None).await;
    server.set_behavior(Behavior {
        error_page: true,
        ..Behavior::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(server.url("disk.iso"), dir.path(), "disk.iso");
    req.expected_size = download::probe(&req, &options()).await.unwrap().total_bytes;

    let err = fetch(&req).await.unwrap_err();
    assert!(
        matches!(err, DownloadError::LengthMismatch { expected, .. } if expected == 2 * MIB as u64),
        "{err:?}"
    );
    assert!(!err.is_transient());
    assert!(!dir.path().join("disk.iso").exists());
    assert_no_partial(dir.path(), "disk.iso");
    assert_eq!(server.gets().len(), 1, "a length mismatch is not retried");

    // Without the expected size, its Content-Type gives it away.
    req.expected_size = None;
    let err = fetch(&req).await.unwrap_err();
    assert!(matches!(err, DownloadError::ErrorPage { .. }), "{err:?}");
    assert_eq!(err.reason(), "ErrorPage");
    assert!(!err.is_transient());
    assert!(!dir.path().join("disk.iso").exists());
    assert_no_partial(dir.path(), "disk.iso");

    // Pages explicitly allowed: a checksum still catches it.
    req.allow_markup = true;
    req.checksum = Some(sha256(b"the real file"));
    let err = fetch(&req).await.unwrap_err();
    assert!(
        matches!(err, DownloadError::ChecksumMismatch { .. }),
        "{err:?}"
    );
    assert!(!dir.path().join("disk.iso").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_body_never_completes() {
    let data = content(2 * MIB, 12);
    let server = HttpServer::start(data, None).await;
    server.set_behavior(Behavior {
        drop_after: Some(MIB as u64),
        drop_times: 100,
        ..Behavior::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let req = request(server.url("disk.iso"), dir.path(), "disk.iso");
    let err = fetch_once(&req).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(!dir.path().join("disk.iso").exists());
    assert_eq!(
        partial_len(dir.path(), "disk.iso"),
        MIB as u64,
        "kept for resuming"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_times_out() {
    let data = content(2 * MIB, 13);
    let server = HttpServer::start(data, None).await;
    server.set_behavior(Behavior {
        stall_after: Some(MIB as u64),
        stall_times: 1,
        ..Behavior::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let req = request(server.url("disk.iso"), dir.path(), "disk.iso");
    let opts = DownloadOptions {
        read_timeout: Duration::from_millis(500),
        ..options()
    };
    let (tx, _rx) = watch::channel(Progress::default());
    let err = download::download_once(&req, &opts, &CancellationToken::new(), &tx)
        .await
        .unwrap_err();
    assert!(matches!(err, DownloadError::Timeout { .. }), "{err:?}");
    assert!(err.is_transient());
    assert_eq!(partial_len(dir.path(), "disk.iso"), MIB as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checksum_mismatch_leaves_nothing() {
    let data = content(2 * MIB, 14);
    let server = HttpServer::start(data.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(server.url("disk.iso"), dir.path(), "disk.iso");
    req.checksum = Some(sha256(b"something else"));
    let err = fetch(&req).await.unwrap_err();
    assert!(
        matches!(err, DownloadError::ChecksumMismatch { .. }),
        "{err:?}"
    );
    assert!(!err.is_transient());
    assert_eq!(err.reason(), "ChecksumMismatch");
    assert!(!dir.path().join("disk.iso").exists());
    assert_no_partial(dir.path(), "disk.iso");
    assert_eq!(server.gets().len(), 1, "not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_and_unauthorized_are_permanent() {
    let data = content(MIB, 15);
    let server = HttpServer::start(data.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(server.url("disk.iso"), dir.path(), "disk.iso");

    server.set_behavior(Behavior {
        status: Some(404),
        ..Behavior::default()
    });
    let err = fetch(&req).await.unwrap_err();
    assert!(matches!(err, DownloadError::NotFound { .. }), "{err:?}");
    assert!(!err.is_transient());
    assert!(matches!(
        download::probe(&req, &options()).await,
        Err(DownloadError::NotFound { .. })
    ));
    assert_eq!(server.gets().len(), 1, "not retried");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing written"
    );

    server.set_behavior(Behavior {
        basic_auth: Some(("alice".into(), "s3cret".into())),
        ..Behavior::default()
    });
    server.clear_log();
    let err = fetch(&req).await.unwrap_err();
    assert!(matches!(err, DownloadError::Unauthorized { .. }), "{err:?}");
    assert_eq!(err.reason(), "Unauthorized");
    assert_eq!(server.gets().len(), 1, "not retried");
    assert!(!dir.path().join("disk.iso").exists());

    req.auth = Some(Credentials {
        username: "alice".into(),
        password: "s3cret".into(),
    });
    fetch(&req).await.unwrap();
    assert_file(dir.path(), "disk.iso", &data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_until_success() {
    let data = content(MIB, 16);
    let server = HttpServer::start(data.clone(), None).await;
    server.set_behavior(Behavior {
        fail_times: 3,
        ..Behavior::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let req = request(server.url("disk.iso"), dir.path(), "disk.iso");
    let outcome = fetch(&req).await.unwrap();
    assert_eq!(outcome.attempts, 4);
    assert_file(dir.path(), "disk.iso", &data);

    // More failures in a row than the policy allows: the last error is returned.
    server.set_behavior(Behavior {
        fail_times: 10,
        ..Behavior::default()
    });
    let req = request(server.url("disk.iso"), dir.path(), "other.iso");
    let err = fetch(&req).await.unwrap_err();
    assert!(
        matches!(err, DownloadError::HttpStatus { status: 500, .. }),
        "{err:?}"
    );
    assert!(err.is_transient());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_file_is_a_name_conflict() {
    let server = HttpServer::start(content(1000, 17), None).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("disk.iso"), b"mine").unwrap();
    let req = request(server.url("disk.iso"), dir.path(), "disk.iso");
    let err = fetch(&req).await.unwrap_err();
    assert!(matches!(err, DownloadError::NameConflict { .. }), "{err:?}");
    assert_eq!(std::fs::read(dir.path().join("disk.iso")).unwrap(), b"mine");
    assert!(server.gets().is_empty(), "nothing requested");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let err = fetch(&request("gopher://x/y".into(), dir.path(), "y"))
        .await
        .unwrap_err();
    assert!(matches!(err, DownloadError::InvalidUrl { .. }), "{err:?}");
    let err = fetch(&request("http://x/y".into(), dir.path(), "../y"))
        .await
        .unwrap_err();
    assert!(matches!(err, DownloadError::InvalidName { .. }), "{err:?}");
    let mut req = request("http://x/y".into(), dir.path(), "y");
    req.checksum = Some(Checksum {
        algorithm: ChecksumAlgorithm::Sha256,
        hex: "abc".into(),
    });
    let err = fetch(&req).await.unwrap_err();
    assert!(
        matches!(err, DownloadError::InvalidChecksum { .. }),
        "{err:?}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owned_download_is_recognised_as_finished_until_cleared() {
    let data = content(200_000, 32);
    let server = HttpServer::start(data.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(server.url("disk.iso"), dir.path(), "disk.iso");
    req.checksum = Some(sha256(&data));
    req.owner = Some("uid-1".into());
    assert_eq!(download::finished(&req).await.unwrap(), None);
    fetch(&req).await.unwrap();
    assert_file(dir.path(), "disk.iso", &data);

    let finished = download::finished(&req).await.unwrap().expect("recognised");
    assert_eq!(finished.bytes, data.len() as u64);
    assert!(finished.checksum_verified);
    assert_eq!(finished.path, dir.path().join("disk.iso"));
    // Only by the same owner, for the same URL and checksum.
    for other in [
        DownloadRequest {
            owner: Some("uid-2".into()),
            ..req.clone()
        },
        DownloadRequest {
            owner: None,
            ..req.clone()
        },
        DownloadRequest {
            url: server.url("other.iso"),
            ..req.clone()
        },
        DownloadRequest {
            checksum: Some(sha512(&data)),
            ..req.clone()
        },
    ] {
        assert_eq!(download::finished(&other).await.unwrap(), None, "{other:?}");
    }
    // The downloader itself still refuses to overwrite the file.
    let err = fetch(&req).await.unwrap_err();
    assert!(matches!(err, DownloadError::NameConflict { .. }), "{err:?}");
    // A file changed since is not the one that was finished.
    std::fs::write(dir.path().join("disk.iso"), b"replaced").unwrap();
    assert_eq!(download::finished(&req).await.unwrap(), None);
    download::clear_finished(dir.path(), "disk.iso")
        .await
        .unwrap();
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["disk.iso"]);

    // Without an owner nothing is recorded.
    let dir = tempfile::tempdir().unwrap();
    let req = request(server.url("disk.iso"), dir.path(), "disk.iso");
    fetch(&req).await.unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

/// Options refusing connections into `cidrs`.
fn denying(cidrs: &[&str]) -> DownloadOptions {
    DownloadOptions {
        deny: cidrs
            .iter()
            .map(|c| download::parse_cidr(c).unwrap())
            .collect(),
        ..options()
    }
}

async fn fetch_with(
    req: &DownloadRequest,
    opts: &DownloadOptions,
) -> Result<Outcome, DownloadError> {
    let (tx, _rx) = watch::channel(Progress::default());
    download::download(req, opts, &CancellationToken::new(), &tx).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_networks_are_refused_on_every_connection() {
    let data = content(100_000, 30);
    let server = HttpServer::start(data.clone(), None).await;
    let port = server.addr.port();
    let dir = tempfile::tempdir().unwrap();

    // An IP-literal URL in a denied network: refused before any request.
    let req = request(server.url("disk.iso"), dir.path(), "disk.iso");
    let err = download::probe(&req, &denying(&["127.0.0.0/8"]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, DownloadError::DestinationNotAllowed { .. }),
        "{err:?}"
    );
    assert_eq!(err.reason(), "DestinationNotAllowed");
    assert!(!err.is_transient());
    // A host name resolving into one: refused by the resolver, before connecting.
    let by_name = request(
        format!("http://localhost:{port}/disk.iso"),
        dir.path(),
        "disk.iso",
    );
    let err = fetch_with(&by_name, &denying(&["127.0.0.0/8"]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DownloadError::DestinationNotAllowed { host, .. } if host == "localhost"),
        "{err:?}"
    );
    assert!(server.log().is_empty(), "nothing reached the server");

    // A redirect into a denied network (an IP literal, which skips the resolver) is not
    // followed, by the probe nor by the transfer.
    server.set_behavior(Behavior {
        redirect: Some(format!("http://127.0.0.2:{port}/disk.iso")),
        ..Behavior::default()
    });
    let opts = denying(&["127.0.0.2/32"]);
    let err = download::probe(&req, &opts).await.unwrap_err();
    assert!(
        matches!(&err, DownloadError::DestinationNotAllowed { host, .. } if host == "127.0.0.2"),
        "{err:?}"
    );
    let err = fetch_with(&req, &opts).await.unwrap_err();
    assert!(
        matches!(err, DownloadError::DestinationNotAllowed { .. }),
        "{err:?}"
    );
    // Nor is one to a host name resolving into one (checked by the resolver on connect).
    let redirector = HttpServer::start_on("127.0.0.2", Vec::new(), None).await;
    redirector.set_behavior(Behavior {
        redirect: Some(format!("http://localhost:{port}/disk.iso")),
        ..Behavior::default()
    });
    server.clear_log();
    let via = request(redirector.url("disk.iso"), dir.path(), "disk.iso");
    let err = fetch_with(&via, &denying(&["127.0.0.1/32"]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DownloadError::DestinationNotAllowed { host, .. } if host == "localhost"),
        "{err:?}"
    );
    assert!(!redirector.log().is_empty(), "the redirect was served");
    assert!(server.log().is_empty(), "its target was never reached");
    // Nor one to another scheme.
    server.set_behavior(Behavior {
        redirect: Some("file:///etc/passwd".into()),
        ..Behavior::default()
    });
    let err = fetch_with(&req, &options()).await.unwrap_err();
    assert!(matches!(err, DownloadError::Protocol { .. }), "{err:?}");
    assert!(err.to_string().contains("file:///etc/passwd"), "{err}");
    assert!(!err.is_transient());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    // Redirects elsewhere are still followed.
    server.set_behavior(Behavior::default());
    redirector.set_behavior(Behavior {
        redirect: Some(server.url("disk.iso")),
        ..Behavior::default()
    });
    let outcome = fetch_with(&via, &denying(&["169.254.0.0/16"]))
        .await
        .unwrap();
    assert_eq!(outcome.bytes, data.len() as u64);
    assert_file(dir.path(), "disk.iso", &data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ftp_to_a_denied_network_is_refused() {
    let data = content(1000, 31);
    let root = ftp_root("disk.iso", &data);
    let server = FtpServer::start(root.path(), None, None);
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(server.url("ftp", "pub/disk.iso"), dir.path(), "disk.iso");
    req.auth = ftp_auth();
    let opts = denying(&["127.0.0.0/8"]);
    let err = download::probe(&req, &opts).await.unwrap_err();
    assert!(
        matches!(err, DownloadError::DestinationNotAllowed { .. }),
        "{err:?}"
    );
    let err = fetch_with(&req, &opts).await.unwrap_err();
    assert!(
        matches!(err, DownloadError::DestinationNotAllowed { .. }),
        "{err:?}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    assert!(server.retrs(0).is_empty(), "nothing was transferred");
}

// --------------------------------------------------------------------------------- FTP(S)

/// A directory holding `name` with `data`, served by the FTP tests.
fn ftp_root(name: &str, data: &[u8]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("pub")).unwrap();
    std::fs::write(root.path().join("pub").join(name), data).unwrap();
    root
}

fn ftp_auth() -> Option<Credentials> {
    Some(Credentials {
        username: ftp_server::USER.into(),
        password: ftp_server::PASSWORD.into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ftp_download_completes_and_checksum_matches() {
    let data = content(3 * MIB + 5, 20);
    let root = ftp_root("disk.iso", &data);
    let server = FtpServer::start(root.path(), None, None);
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(server.url("ftp", "pub/disk.iso"), dir.path(), "disk.iso");
    req.auth = ftp_auth();
    req.checksum = Some(sha256(&data));

    let info = download::probe(&req, &options()).await.unwrap();
    assert_eq!(info.total_bytes, Some(data.len() as u64));
    assert!(info.last_modified.is_some());
    assert!(info.accepts_ranges);

    req.expected_size = info.total_bytes;
    let outcome = fetch(&req).await.unwrap();
    assert!(outcome.checksum_verified);
    assert_eq!(outcome.transferred, data.len() as u64);
    assert_file(dir.path(), "disk.iso", &data);
    assert_eq!(server.retrs(1)[0].bytes, data.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ftp_credentials_from_the_url_and_permanent_errors() {
    let data = content(1000, 21);
    let root = ftp_root("disk.iso", &data);
    let server = FtpServer::start(root.path(), None, None);
    let dir = tempfile::tempdir().unwrap();
    let url = |user: &str, path: &str| {
        format!(
            "ftp://{user}:{}@127.0.0.1:{}/{path}",
            ftp_server::PASSWORD,
            server.port
        )
    };

    let err = fetch(&request(
        url("tester", "pub/missing.iso"),
        dir.path(),
        "m.iso",
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, DownloadError::NotFound { .. }), "{err:?}");
    assert!(!err.to_string().contains(ftp_server::PASSWORD), "{err}");

    let err = fetch(&request(
        url("mallory", "pub/disk.iso"),
        dir.path(),
        "disk.iso",
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, DownloadError::Unauthorized { .. }), "{err:?}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing written"
    );

    fetch(&request(
        url("tester", "pub/disk.iso"),
        dir.path(),
        "disk.iso",
    ))
    .await
    .unwrap();
    assert_file(dir.path(), "disk.iso", &data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ftp_pause_then_resume_transfers_only_the_missing_bytes() {
    let data = content(MIB, 22);
    let root = ftp_root("disk.iso", &data);
    // 256 KiB/s (sent in bursts of 256 KiB every second): the pause lands midway.
    let server = FtpServer::start(root.path(), None, Some(256 * 1024));
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(server.url("ftp", "pub/disk.iso"), dir.path(), "disk.iso");
    req.auth = ftp_auth();
    req.checksum = Some(sha256(&data));

    let err = pause_midway(&req).await;
    assert!(matches!(err, DownloadError::Cancelled { .. }), "{err:?}");
    let kept = partial_len(dir.path(), "disk.iso");
    assert!(kept > 0 && kept < data.len() as u64, "kept {kept}");

    let outcome = fetch(&req).await.unwrap();
    assert_file(dir.path(), "disk.iso", &data);
    assert_eq!(outcome.reused, kept);
    let retrs = server.retrs(2);
    assert!(!retrs[0].completed);
    assert!(retrs[1].completed);
    assert_eq!(
        retrs[1].bytes,
        data.len() as u64 - kept,
        "REST resumed at {kept}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ftps_download_completes_and_unknown_ca_is_a_tls_error() {
    let pki = pki::make();
    let data = content(2 * MIB + 3, 23);
    let root = ftp_root("disk.iso", &data);
    let certs = tempfile::tempdir().unwrap();
    let tls = TlsFiles {
        cert: certs.path().join("cert.pem"),
        key: certs.path().join("key.pem"),
    };
    std::fs::write(&tls.cert, &pki.cert_pem).unwrap();
    std::fs::write(&tls.key, &pki.key_pem).unwrap();
    let server = FtpServer::start(root.path(), Some(&tls), None);
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(server.url("ftps", "pub/disk.iso"), dir.path(), "disk.iso");
    req.auth = ftp_auth();
    req.checksum = Some(sha256(&data));

    let err = fetch(&req).await.unwrap_err();
    assert!(matches!(err, DownloadError::Tls { .. }), "{err:?}");
    assert!(!err.is_transient());

    req.tls.extra_ca_pem = Some(pki.ca_pem.clone().into_bytes());
    let info = download::probe(&req, &options()).await.unwrap();
    assert_eq!(info.total_bytes, Some(data.len() as u64));
    let outcome = fetch(&req).await.unwrap();
    assert!(outcome.checksum_verified);
    assert_file(dir.path(), "disk.iso", &data);
    assert_eq!(server.retrs(1)[0].bytes, data.len() as u64);
}
