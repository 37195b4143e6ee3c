//! The download engine: fetches an `http`, `https`, `ftp` or `ftps` URL into a directory
//! (a libvirt storage pool's), resumably, with no Kubernetes in it.
//!
//! # Usage
//!
//! 1. [`probe`] asks the server for the file's length (HTTP `HEAD`, FTP `SIZE`/`MDTM`) so the
//!    caller can check the pool has room before anything is written.
//! 2. [`download`] fetches the file, retrying transient errors with capped exponential
//!    back-off; [`download_once`] makes a single attempt and leaves retrying to the caller.
//!    Both stream into a hidden partial file `dir/.NAME.part` next to a sidecar
//!    `dir/.NAME.part.json` that records what the server said about the file (URL, ETag,
//!    Last-Modified, length). Every attempt, in this process or a later one, resumes from the
//!    partial file's length (HTTP `Range` + `If-Range`, FTP `REST`) once the server confirms
//!    the file did not change; a changed file or a server that ignores ranges restarts from
//!    zero and [`Outcome::restarts`] says so.
//! 3. On completion the length is checked against what the server announced, the checksum
//!    (computed while streaming) is verified, the file is fsynced, renamed to `dir/NAME` and
//!    the directory fsynced. A checksum mismatch deletes the data.
//! 4. Cancelling the token stops promptly and keeps the partial data (pause); the caller
//!    deletes it with [`discard_partial`] when the download is abandoned.
//!
//! Progress is published on a `tokio::sync::watch` channel ([`Progress`]). Memory use is
//! bounded by three buffers of [`DownloadOptions::buffer_size`] whatever the file size.
//!
//! The partial file is locked (`flock`) for the duration of an attempt, so two downloads of
//! the same name into the same directory cannot interleave: the second gets
//! [`DownloadError::Busy`].

mod checksum;
mod decompress;
mod deny;
mod engine;
mod error;
mod ftp;
mod http;
mod limits;
mod names;
mod progress;
mod range;
mod sink;
mod state;
mod tls;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use checksum::{Checksum, ChecksumAlgorithm};
pub use decompress::Compression;
pub use deny::{Cidr, DEFAULT_DENY, default_deny, parse_cidr};
pub use error::{BoxError, DownloadError};
pub use names::{MAX_NAME_LEN, Paths, default_name, validate_name};
pub use progress::{Phase, Progress};

/// Who the partial data of `name` in `dir` belongs to
/// ([`DownloadRequest::owner`] of the download that started it), when there is any.
pub async fn partial_owner(dir: &Path, name: &str) -> Result<Option<String>, DownloadError> {
    let paths = Paths::new(dir, name)?;
    blocking(move || Ok(state::load_sidecar(&paths.sidecar).and_then(|s| s.owner))).await
}

/// One file to download.
#[derive(Clone, Debug, Default)]
pub struct DownloadRequest {
    /// `http://`, `https://`, `ftp://` or `ftps://` (explicit TLS, `AUTH TLS`, default port
    /// 21). Credentials in the URL are used when [`DownloadRequest::auth`] is `None`.
    pub url: String,
    /// The directory to download into (the storage pool's path). It must exist.
    pub dir: PathBuf,
    /// The final file name in `dir`; see [`validate_name`] and [`default_name`].
    pub name: String,
    /// The digest the file must have.
    pub checksum: Option<Checksum>,
    /// Basic-auth (HTTP) or login (FTP) credentials; FTP defaults to anonymous.
    pub auth: Option<Credentials>,
    /// TLS settings for `https` and `ftps`.
    pub tls: TlsOptions,
    /// The length the file must have, typically [`RemoteInfo::total_bytes`] from the
    /// [`probe`] the space check was based on. A response announcing another length (an
    /// error page served with 200, a different file) fails with
    /// [`DownloadError::LengthMismatch`] before anything is written.
    pub expected_size: Option<u64>,
    /// Who the download is for (say, an object's UID). When set, a finished download leaves
    /// a record next to the file, written before the final rename, that [`finished`]
    /// recognises and [`clear_finished`] removes once the owner has recorded the completion:
    /// a crash between the rename and that bookkeeping then does not turn the owner's own
    /// file into a name conflict. The partial data's sidecar records it too: partial data of
    /// another owner is never resumed nor deleted ([`DownloadError::NameConflict`]).
    pub owner: Option<String>,
    /// Accept a response that is an HTML or XML document (by `Content-Type` or by its first
    /// bytes). Without it such a response fails with [`DownloadError::ErrorPage`].
    pub allow_markup: bool,
    /// Treat the file as a disk image: data compressed with xz, gzip or zstd (found by its
    /// magic bytes, not its name) is decompressed while it streams in and stored
    /// decompressed (see the `decompress` module; the checksum and
    /// [`DownloadRequest::expected_size`] still apply to the bytes as served), and a qcow2
    /// image the agent refuses ([`crate::image::qcow2::judge`]) fails with
    /// [`DownloadError::UnsafeImage`].
    pub disk_image: bool,
}

/// A user name and password.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// How to verify the server's certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM certificates trusted in addition to the system's roots.
    pub extra_ca_pem: Option<Vec<u8>>,
    /// Accept any certificate (the handshake signature is still checked).
    pub insecure_skip_verify: bool,
}

/// Process-wide settings: timeouts, buffer size and retrying.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownloadOptions {
    /// Limit for establishing a connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// Limit for the server to answer a request or send more data; a stalled transfer fails
    /// with [`DownloadError::Timeout`] (transient) after this long.
    pub read_timeout: Duration,
    /// Size of each write buffer (up to three exist at a time).
    pub buffer_size: usize,
    /// How [`download`] retries.
    pub retry: RetryPolicy,
    /// Networks no connection may go to (see the `deny` module): a host that is, or
    /// resolves to, an address in one fails with [`DownloadError::DestinationNotAllowed`],
    /// also when a redirect leads there. Always refused, [`DownloadOptions::allow`] or not.
    pub deny: Vec<Cidr>,
    /// Whether the networks of [`DEFAULT_DENY`] (loopback, private, link-local, multicast,
    /// and their IPv4-in-IPv6 forms, `localhost`) are refused too, except where
    /// [`DownloadOptions::allow`] opens them.
    pub default_deny: bool,
    /// Networks of the default deny list that may be reached (a private mirror).
    pub allow: Vec<Cidr>,
    /// The largest file: a larger announced length, or more data, fails with
    /// [`DownloadError::TooLarge`] and deletes the partial data.
    pub max_bytes: Option<u64>,
    /// The slowest transfer accepted: less data than this over a window fails the attempt
    /// with [`DownloadError::TooSlow`] (transient; the data is kept).
    pub min_rate: Option<MinRate>,
    /// The longest one attempt may transfer before it fails with [`DownloadError::TooSlow`].
    pub deadline: Option<Duration>,
    /// Bytes the destination's file system keeps free: checked by one [`limits::Floor`] per
    /// file written, before every [`limits::FLOOR_EVERY`] bytes of the data as served and of a
    /// compressed file's decompressed data (whose size is not known beforehand); a transfer
    /// that reaches it stops with [`DownloadError::BelowFloor`], its data kept.
    pub min_free_bytes: Option<u64>,
}

/// A minimum transfer rate, averaged over a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MinRate {
    /// Bytes per second.
    pub bytes_per_second: u64,
    /// The window the rate is averaged over.
    pub window: Duration,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            buffer_size: 2 * 1024 * 1024,
            retry: RetryPolicy::default(),
            deny: Vec::new(),
            default_deny: false,
            allow: Vec::new(),
            max_bytes: None,
            min_rate: None,
            deadline: None,
            min_free_bytes: None,
        }
    }
}

/// Retrying of transient errors by [`download`].
///
/// The back-off starts at `initial_backoff` and doubles up to `max_backoff`. An attempt that
/// received data resets both the back-off and the failure count, so a flaky server that
/// drops the connection every few hundred MiB still completes; `max_failures` consecutive
/// attempts without any new data end the download with the last error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Consecutive failed attempts without progress before giving up (at least 1).
    pub max_failures: u32,
    /// First delay.
    pub initial_backoff: Duration,
    /// Longest delay.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_failures: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// What the server says about the file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RemoteInfo {
    /// The length, when announced (`Content-Length`, `Content-Range`, FTP `SIZE`).
    pub total_bytes: Option<u64>,
    /// The HTTP entity tag.
    pub etag: Option<String>,
    /// HTTP `Last-Modified`, or FTP `MDTM` (`YYYY-MM-DD HH:MM:SS`, UTC).
    pub last_modified: Option<String>,
    /// Whether the server announced range support (`Accept-Ranges: bytes`, FTP `REST STREAM`).
    pub accepts_ranges: bool,
}

/// Why a download threw away its partial data and started again from byte 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartReason {
    /// The server's ETag, Last-Modified or length differs from when the data was started.
    RemoteChanged,
    /// The server answered a range request with the whole file (or refused `REST`).
    RangeIgnored,
    /// The partial file had no usable sidecar (missing, corrupt, another URL).
    PartialUnusable,
}

impl fmt::Display for RestartReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::RemoteChanged => "the remote file changed since the download started",
            Self::RangeIgnored => "the server does not support resuming",
            Self::PartialUnusable => "the partial data could not be matched to this URL",
        })
    }
}

/// A completed download.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The final file.
    pub path: PathBuf,
    /// Its length.
    pub bytes: u64,
    /// Bytes received over the network by this call (all attempts).
    pub transferred: u64,
    /// Bytes taken from a partial file left by an earlier call.
    pub reused: u64,
    /// Attempts this call made.
    pub attempts: u32,
    /// Every restart from byte 0, in order.
    pub restarts: Vec<RestartReason>,
    /// Whether a checksum was given and verified.
    pub checksum_verified: bool,
    /// The compression the file was served with; it was stored decompressed.
    pub compression: Option<Compression>,
}

impl Outcome {
    /// A sentence for a status message when something noteworthy happened (a restart).
    pub fn note(&self) -> Option<String> {
        let last = self.restarts.last()?;
        Some(format!(
            "Downloaded from the beginning again because {last}."
        ))
    }
}

/// A download found finished by [`finished`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finished {
    /// The final file.
    pub path: PathBuf,
    /// Its length.
    pub bytes: u64,
    /// Whether a checksum was verified.
    pub checksum_verified: bool,
    /// The format its magic bytes show ([`crate::image::sniff::Format`]), when it was read.
    pub format: Option<crate::image::sniff::Format>,
    /// The compression it was served with ([`Outcome::compression`]).
    pub compression: Option<Compression>,
}

/// Whether the final file of `request` exists because a download with the same owner, URL
/// and checksum finished it (see [`DownloadRequest::owner`]): its record is there and the
/// file has the recorded length. `None` without an owner.
pub async fn finished(request: &DownloadRequest) -> Result<Option<Finished>, DownloadError> {
    let Some(owner) = request.owner.clone() else {
        return Ok(None);
    };
    let paths = Paths::new(&request.dir, &request.name)?;
    let url = engine::display_url(&request.url)?;
    let digest = match &request.checksum {
        Some(c) => Some(format!("{}:{}", c.algorithm, c.normalized()?)),
        None => None,
    };
    blocking(move || {
        let Some(done) = state::load_done(&paths.done) else {
            return Ok(None);
        };
        if done.owner != owner || done.url != url || done.digest != digest {
            return Ok(None);
        }
        match std::fs::metadata(&paths.target) {
            Ok(meta) if meta.is_file() && meta.len() == done.bytes => Ok(Some(Finished {
                format: crate::image::sniff::sniff_file(&paths.target).ok(),
                path: paths.target,
                bytes: done.bytes,
                checksum_verified: done.digest.is_some(),
                compression: done.compression,
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DownloadError::io("inspect", paths.target, e)),
        }
    })
    .await
}

/// Removes the record a finished download with an owner left (nothing there is success).
pub async fn clear_finished(dir: &Path, name: &str) -> Result<(), DownloadError> {
    let paths = Paths::new(dir, name)?;
    let dir = dir.to_owned();
    blocking(move || {
        state::remove_if_exists(&paths.done)?;
        state::sync_dir(&dir)
    })
    .await
}

/// Asks the server about the file without downloading it.
pub async fn probe(
    request: &DownloadRequest,
    options: &DownloadOptions,
) -> Result<RemoteInfo, DownloadError> {
    engine::Job::new(request, options)?.probe().await
}

/// Downloads the file, retrying transient errors per [`DownloadOptions::retry`]; see the
/// module documentation. Returns [`DownloadError::Cancelled`] when `cancel` fires.
pub async fn download(
    request: &DownloadRequest,
    options: &DownloadOptions,
    cancel: &CancellationToken,
    progress: &watch::Sender<Progress>,
) -> Result<Outcome, DownloadError> {
    engine::Job::new(request, options)?
        .run(cancel, progress, true)
        .await
}

/// Makes a single attempt (which still resumes from, and keeps, partial data). For callers
/// that schedule retries themselves, e.g. by requeueing with [`DownloadError::is_transient`].
pub async fn download_once(
    request: &DownloadRequest,
    options: &DownloadOptions,
    cancel: &CancellationToken,
    progress: &watch::Sender<Progress>,
) -> Result<Outcome, DownloadError> {
    engine::Job::new(request, options)?
        .run(cancel, progress, false)
        .await
}

/// Decides, from the server's answer to an attempt's request (length, validators, range
/// support), whether its data may be written: called once per attempt before any byte is
/// written; an error ends the attempt with it (partial data kept when there was some).
pub type Admit<'a> = &'a (dyn Fn(&RemoteInfo) -> Result<(), DownloadError> + Send + Sync);

/// [`download_once`] that asks `admit` about the server's answer before writing, so a caller
/// learns what [`probe`] would say from the transfer's own request instead of a separate one.
pub async fn download_once_admitted(
    request: &DownloadRequest,
    options: &DownloadOptions,
    cancel: &CancellationToken,
    progress: &watch::Sender<Progress>,
    admit: Admit<'_>,
) -> Result<Outcome, DownloadError> {
    engine::Job::new(request, options)?
        .admitted(admit)
        .run(cancel, progress, false)
        .await
}

/// Deletes the partial data of `name` in `dir` (both the `.part` file and its sidecar).
/// Nothing there is success; a running download of it gives [`DownloadError::Busy`].
pub async fn discard_partial(dir: &Path, name: &str) -> Result<(), DownloadError> {
    let paths = Paths::new(dir, name)?;
    let dir = dir.to_owned();
    blocking(move || {
        state::discard(&paths)?;
        state::sync_dir(&dir)
    })
    .await
}

/// Bytes of partial data kept for `name` in `dir` (0 when there is none).
pub async fn partial_len(dir: &Path, name: &str) -> Result<u64, DownloadError> {
    let paths = Paths::new(dir, name)?;
    match tokio::fs::metadata(&paths.partial).await {
        Ok(meta) => Ok(meta.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(DownloadError::io("inspect", paths.partial, e)),
    }
}

/// Runs blocking file work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DownloadError> + Send + 'static,
) -> Result<T, DownloadError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        DownloadError::io(
            "run file operation for",
            PathBuf::from("(download)"),
            std::io::Error::other(e.to_string()),
        )
    })?
}
