//! One download: preparing the partial file, an attempt, the retry loop and finalizing.

use std::time::Instant;

use reqwest::Url;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

mod finish;

use super::checksum::Hasher;
use super::decompress::{self, Compression, DecodeConfig};
use super::ftp::{FtpBody, FtpSource};
use super::http::{HttpBody, HttpSource};
use super::limits::Limits;
use super::names::Paths;
use super::progress::{PUBLISH_EVERY, Reporter};
use super::sink::{Sink, SinkStart};
use super::state::{self, SIDECAR_VERSION, Sidecar};
use super::{
    Admit, ChecksumAlgorithm, DownloadError, DownloadOptions, DownloadRequest, Outcome, Phase,
    Progress, RemoteInfo, RestartReason, blocking,
};

/// Parses a request's URL.
fn parse_url(url: &str) -> Result<Url, DownloadError> {
    Url::parse(url).map_err(|e| DownloadError::InvalidUrl {
        url: url.to_owned(),
        reason: e.to_string(),
    })
}

/// The URL without credentials, for messages and the state files.
fn display(url: &Url) -> String {
    let mut url = url.clone();
    // Both only fail for URLs that cannot have credentials, which then have none.
    let _ = url.set_password(None);
    let _ = url.set_username("");
    url.to_string()
}

/// [`display`] of a URL string.
pub(crate) fn display_url(url: &str) -> Result<String, DownloadError> {
    parse_url(url).map(|u| display(&u))
}

/// What the server says about the file in the response being used.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct RemoteFile {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    pub total: Option<u64>,
    /// Whether the server announced (or showed) range support.
    pub accepts_ranges: bool,
}

impl RemoteFile {
    /// What [`crate::download::probe`] would have said, learnt from the transfer's own answer.
    pub(crate) fn info(&self) -> RemoteInfo {
        RemoteInfo {
            total_bytes: self.total,
            etag: self.etag.clone(),
            last_modified: self.last_modified.clone(),
            accepts_ranges: self.accepts_ranges,
        }
    }

    pub(crate) fn sidecar(&self, url: &str) -> Sidecar {
        Sidecar {
            version: SIDECAR_VERSION,
            url: url.to_owned(),
            etag: self.etag.clone(),
            last_modified: self.last_modified.clone(),
            total_bytes: self.total,
            owner: None,
        }
    }

    pub(crate) fn from_sidecar(s: &Sidecar) -> Self {
        Self {
            etag: s.etag.clone(),
            last_modified: s.last_modified.clone(),
            total: s.total_bytes,
            // Only a resume (a range request) is answered from what was recorded.
            accepts_ranges: true,
        }
    }
}

/// A response ready to be streamed.
pub(crate) struct Opened {
    /// The file offset of the first byte of the body: the resume offset, or 0.
    pub start: u64,
    /// The server's description of the file.
    pub remote: RemoteFile,
    /// Why the partial data is thrown away, if it is.
    pub restart: Option<RestartReason>,
    /// The response's `Content-Type`, when it has one.
    pub content_type: Option<String>,
    /// The data.
    pub body: Body,
}

/// The data of a response.
pub(crate) enum Body {
    Http(HttpBody),
    Ftp(FtpBody),
    /// Nothing to transfer: the partial file already holds the whole file.
    Empty,
}

impl Body {
    async fn fill(&mut self, buf: &mut Vec<u8>) -> Result<usize, DownloadError> {
        match self {
            Self::Http(b) => b.fill(buf).await,
            Self::Ftp(b) => b.fill(buf).await,
            Self::Empty => Ok(0),
        }
    }
}

enum Source {
    Http(HttpSource),
    Ftp(FtpSource),
}

/// A validated request with its client.
pub(crate) struct Job<'a> {
    options: &'a DownloadOptions,
    expected_size: Option<u64>,
    /// The URL without credentials, for messages and the sidecar.
    display: String,
    paths: Paths,
    checksum: Option<(ChecksumAlgorithm, String)>,
    owner: Option<String>,
    allow_markup: bool,
    /// Decompression and image checks ([`DownloadRequest::disk_image`]).
    decode: Option<DecodeConfig>,
    source: Source,
    /// Asked once the server answered, before any data is written.
    admit: Option<Admit<'a>>,
}

/// Totals over the attempts of one call.
#[derive(Default)]
struct Stats {
    transferred: u64,
    since_restart: u64,
    restarts: Vec<RestartReason>,
}

/// A successful attempt.
struct Attempted {
    /// The stored file's length (decompressed).
    bytes: u64,
    /// The length as served.
    received: u64,
    /// Whether a checksum was verified.
    verified: bool,
    /// The compression it was served with.
    compression: Option<Compression>,
}

/// How the streaming loop ended.
enum Stop {
    End,
    Cancelled,
    Failed(DownloadError),
}

impl<'a> Job<'a> {
    pub(crate) fn new(
        request: &'a DownloadRequest,
        options: &'a DownloadOptions,
    ) -> Result<Self, DownloadError> {
        let url = parse_url(&request.url)?;
        let display = display(&url);
        let paths = Paths::new(&request.dir, &request.name)?;
        let checksum = match &request.checksum {
            Some(c) => Some((c.algorithm, c.normalized()?)),
            None => None,
        };
        let source = match url.scheme() {
            "http" | "https" => {
                Source::Http(HttpSource::new(url, display.clone(), request, options)?)
            }
            "ftp" | "ftps" => Source::Ftp(FtpSource::new(&url, display.clone(), request, options)?),
            other => {
                return Err(DownloadError::InvalidUrl {
                    url: display,
                    reason: format!("unsupported scheme {other:?}; use http, https, ftp or ftps"),
                });
            }
        };
        let decode = request.disk_image.then(|| DecodeConfig {
            out: paths.decoded.clone(),
            url: display.clone(),
            max_bytes: options.max_bytes,
            min_free_bytes: options.min_free_bytes,
        });
        Ok(Self {
            decode,
            options,
            expected_size: request.expected_size,
            display,
            paths,
            checksum,
            owner: request.owner.clone(),
            allow_markup: request.allow_markup,
            source,
            admit: None,
        })
    }

    /// Asks `admit` about the server's answer of each attempt before writing its data.
    pub(crate) fn admitted(self, admit: Admit<'a>) -> Self {
        Self {
            admit: Some(admit),
            ..self
        }
    }

    pub(crate) async fn probe(&self) -> Result<RemoteInfo, DownloadError> {
        match &self.source {
            Source::Http(s) => s.probe().await,
            Source::Ftp(s) => s.probe().await,
        }
    }

    async fn open(&self, offset: u64, prior: Option<&Sidecar>) -> Result<Opened, DownloadError> {
        match &self.source {
            Source::Http(s) => s.open(offset, prior).await,
            Source::Ftp(s) => s.open(offset, prior).await,
        }
    }

    /// Attempts until success, a permanent error, cancellation or too many failures in a
    /// row (`retry` false: one attempt).
    pub(crate) async fn run(
        &self,
        cancel: &CancellationToken,
        progress: &watch::Sender<Progress>,
        retry: bool,
    ) -> Result<Outcome, DownloadError> {
        let policy = &self.options.retry;
        let mut reporter = Reporter::new(progress);
        let mut stats = Stats::default();
        let mut attempt = 0u32;
        let mut failures = 0u32;
        let mut backoff = policy.initial_backoff;
        loop {
            attempt += 1;
            reporter.start_attempt(attempt);
            let before = stats.transferred;
            let error = match self.attempt(cancel, &mut reporter, &mut stats).await {
                Ok(done) => {
                    return Ok(Outcome {
                        path: self.paths.target.clone(),
                        bytes: done.bytes,
                        transferred: stats.transferred,
                        reused: done.received.saturating_sub(stats.since_restart),
                        attempts: attempt,
                        restarts: stats.restarts,
                        checksum_verified: done.verified,
                        compression: done.compression,
                    });
                }
                Err(e) => e,
            };
            if !retry || !error.is_transient() {
                return Err(error);
            }
            if stats.transferred > before {
                failures = 0;
                backoff = policy.initial_backoff;
            }
            failures += 1;
            if failures >= policy.max_failures.max(1) {
                return Err(error);
            }
            tracing::info!(url = %self.display, attempt, %error, ?backoff, "download attempt failed; retrying");
            reporter.retrying(&error.to_string());
            tokio::select! {
                () = cancel.cancelled() => {
                    return Err(self.cancelled(reporter.snapshot().bytes_done));
                }
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(policy.max_backoff);
        }
    }

    fn cancelled(&self, kept: u64) -> DownloadError {
        DownloadError::Cancelled {
            url: self.display.clone(),
            kept,
        }
    }

    /// One attempt.
    async fn attempt(
        &self,
        cancel: &CancellationToken,
        reporter: &mut Reporter<'_>,
        stats: &mut Stats,
    ) -> Result<Attempted, DownloadError> {
        // Lock the partial file and see what it holds.
        let paths = self.paths.clone();
        let display = self.display.clone();
        let owner = self.owner.clone();
        let (file, len, prior) = blocking(move || {
            if paths.target.exists() {
                return Err(DownloadError::NameConflict {
                    path: paths.target.clone(),
                });
            }
            let file = state::open_partial(&paths)?;
            let len = file
                .metadata()
                .map_err(|e| DownloadError::io("inspect", &paths.partial, e))?
                .len();
            let sidecar = state::load_sidecar(&paths.sidecar);
            if let (Some(theirs), Some(mine)) =
                (sidecar.as_ref().and_then(|s| s.owner.as_ref()), &owner)
                && theirs != mine
            {
                // Another object's partial data: neither resumed nor touched.
                return Err(DownloadError::NameConflict {
                    path: paths.target.clone(),
                });
            }
            let prior = sidecar.filter(|s| s.allows_resume(&display, len));
            Ok((file, len, prior))
        })
        .await?;
        let offset = if prior.is_some() { len } else { 0 };

        // Resuming with a checksum: hash the kept prefix first (before connecting, so the
        // server does not wait on us).
        let mut hasher = self.checksum.as_ref().map(|(alg, _)| Hasher::new(*alg));
        let mut file = file;
        if let Some(h) = hasher.take() {
            if offset > 0 {
                reporter.verifying(offset, prior.as_ref().and_then(|p| p.total_bytes));
                let path = self.paths.partial.clone();
                let chunk = self.options.buffer_size;
                let token = cancel.clone();
                let (f, h, complete) = blocking(move || {
                    let mut h = h;
                    let complete = state::hash_prefix(&file, &path, offset, &mut h, chunk, &token)?;
                    Ok((file, h, complete))
                })
                .await?;
                if !complete {
                    return Err(self.cancelled(len));
                }
                file = f;
                hasher = Some(h);
                reporter.phase(Phase::Connecting);
            } else {
                hasher = Some(h);
            }
        }

        // Resuming a compressed file: its decoder is rebuilt from the kept bytes.
        let (mut file, mut resumed) = (file, None);
        if let (Some(config), true) = (&self.decode, offset > 0) {
            let (f, decode) = self.rebuild(config, file, offset, cancel).await?;
            let Some(decode) = decode else {
                return Err(self.cancelled(len));
            };
            reporter.phase(Phase::Connecting);
            (file, resumed) = (f, Some(decode));
        }

        let opened = tokio::select! {
            () = cancel.cancelled() => Err(self.cancelled(len)),
            opened = self.open(offset, prior.as_ref()) => opened,
        };
        let opened = match opened {
            Ok(opened) => opened,
            Err(e) => {
                // Leave no empty partial file behind a request that never got data (404,
                // bad credentials, unreachable server).
                if len == 0 {
                    self.discard_held(file).await?;
                }
                return Err(e);
            }
        };
        let Opened {
            start,
            remote,
            restart,
            content_type,
            mut body,
        } = opened;
        tracing::debug!(step = "response", start, total = ?remote.total, "response headers received");
        if start == 0 {
            if let Some(reason) = restart.or((len > 0).then_some(RestartReason::PartialUnusable)) {
                tracing::info!(url = %self.display, %reason, discarded = len, "restarting the download from zero");
                stats.restarts.push(reason);
                reporter.restarted(reason);
            }
            stats.since_restart = 0;
            hasher = self.checksum.as_ref().map(|(alg, _)| Hasher::new(*alg));
        }
        if let (Some(expected), Some(announced)) = (self.expected_size, remote.total)
            && expected != announced
        {
            drop(body);
            self.discard_held(file).await?;
            return Err(DownloadError::LengthMismatch {
                url: self.display.clone(),
                expected,
                actual: announced,
                detail: "announced",
            });
        }
        let mut limits = Limits::new(
            self.options,
            &self.display,
            start,
            self.allow_markup,
            Instant::now(),
        );
        if let Err(e) = limits.response(remote.total, content_type.as_deref()) {
            drop(body);
            self.discard_held(file).await?;
            return Err(e);
        }
        // The caller's own checks (free space) on what the server said, instead of asking it
        // first in a separate request.
        if let Some(e) = self.admit.and_then(|admit| admit(&remote.info()).err()) {
            drop(body);
            if len == 0 {
                self.discard_held(file).await?;
            }
            return Err(e);
        }
        let limit = remote.total.or(self.expected_size);

        let mut sink = Sink::spawn(
            SinkStart {
                file,
                path: self.paths.partial.clone(),
                start,
                floor: self.options.min_free_bytes.map(super::limits::Floor::new),
                sidecar: (start == 0).then(|| {
                    let mut sidecar = remote.sidecar(&self.display);
                    sidecar.owner = self.owner.clone();
                    (self.paths.sidecar.clone(), sidecar)
                }),
                hasher,
                decode: match (start, resumed) {
                    (0, _) => self
                        .decode
                        .clone()
                        .map(|c| decompress::Decode::Pending(c, Vec::new())),
                    (_, resumed) => resumed,
                },
            },
            self.options.buffer_size,
        );
        reporter.begin(start, remote.total);
        reporter.phase(Phase::Transferring);
        let (stop, received) = self
            .stream(
                &mut body,
                &mut sink,
                (start, limit),
                &mut limits,
                cancel,
                reporter,
            )
            .await;
        let stop = match (stop, body) {
            (Stop::End, Body::Ftp(ftp)) => match &self.source {
                Source::Ftp(source) => match ftp.finish(source).await {
                    Ok(()) => Stop::End,
                    Err(e) => Stop::Failed(e),
                },
                Source::Http(_) => Stop::End,
            },
            (stop, _) => stop,
        };
        stats.transferred += received;
        stats.since_restart += received;
        tracing::debug!(step = "last_byte", received, "transfer ended");
        let mut done = sink.finish().await?;
        tracing::debug!(step = "synced", "data written and synced");
        if let Some(e) = done.failure.take() {
            self.discard_held(done.file).await?;
            return Err(e);
        }

        match stop {
            Stop::Cancelled => return Err(self.cancelled(done.len)),
            Stop::Failed(
                e @ (DownloadError::LengthMismatch { .. }
                | DownloadError::TooLarge { .. }
                | DownloadError::ErrorPage { .. }),
            ) => {
                self.discard_held(done.file).await?;
                return Err(e);
            }
            Stop::Failed(e) => return Err(e),
            Stop::End => {}
        }
        if let Some(expected) = limit {
            if done.len < expected {
                return Err(DownloadError::Interrupted {
                    url: self.display.clone(),
                    received: done.len,
                    expected,
                });
            }
            if done.len > expected {
                self.discard_held(done.file).await?;
                return Err(DownloadError::LengthMismatch {
                    url: self.display.clone(),
                    expected,
                    actual: done.len,
                    detail: "sent",
                });
            }
        }
        reporter.phase(Phase::Finalizing);
        let verified = self.verify(&done)?;
        if let Err(e) = verified {
            self.discard_held(done.file).await?;
            return Err(e);
        }
        let received = done.len;
        let decoded = match self.decoded(&mut done).await? {
            Ok(decoded) => decoded,
            Err(e) => {
                self.discard_held(done.file).await?;
                return Err(e);
            }
        };
        let bytes = decoded.as_ref().map_or(received, |d| d.len);
        let compression = decoded.as_ref().map(|d| d.compression);
        tracing::debug!(step = "verified", "data checked");
        self.finalize(done.file, bytes, decoded).await?;
        tracing::debug!(step = "renamed", bytes, "file renamed into place");
        reporter.phase(Phase::Completed);
        Ok(Attempted {
            bytes,
            received,
            verified: self.checksum.is_some(),
            compression,
        })
    }

    /// Receives into buffers handed to the writer until the body ends, an error, a stall
    /// longer than the read timeout, or cancellation. Returns how it ended and the bytes
    /// received (all of them reach the writer).
    async fn stream(
        &self,
        body: &mut Body,
        sink: &mut Sink,
        (start, limit): (u64, Option<u64>),
        limits: &mut Limits,
        cancel: &CancellationToken,
        reporter: &mut Reporter<'_>,
    ) -> (Stop, u64) {
        let read_timeout = self.options.read_timeout;
        let mut received = 0u64;
        let mut buf = sink.buffer();
        // One timer for progress and stall detection, rather than one per read.
        let mut ticker = tokio::time::interval(PUBLISH_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_data = Instant::now();
        let mut seen = 0u64;
        // The body's first bytes stay in `buf` until it is first full, long enough to be
        // looked at (`Limits::data`).
        let mut first = true;
        let stop = loop {
            if buf.len() == buf.capacity() {
                first = false;
                let full = std::mem::replace(&mut buf, sink.buffer());
                if !sink.write(full).await {
                    // The writer failed; its error comes from `finish`.
                    break Stop::End;
                }
            }
            let read = tokio::select! {
                biased;
                () = cancel.cancelled() => break Stop::Cancelled,
                now = ticker.tick() => {
                    let now = now.into_std();
                    if received != seen {
                        seen = received;
                        last_data = now;
                    } else if now.saturating_duration_since(last_data) >= read_timeout {
                        break Stop::Failed(DownloadError::Timeout {
                            url: self.display.clone(),
                            phase: "receiving data",
                            after: read_timeout,
                        });
                    }
                    if let Err(e) = limits.tick(now, received) {
                        break Stop::Failed(e);
                    }
                    reporter.tick(now);
                    continue;
                }
                read = body.fill(&mut buf) => read,
            };
            let head: &[u8] = if first { &buf } else { &[] };
            if let Ok(n) = read
                && let Err(e) = limits.data(start, received + n as u64, head, n == 0)
            {
                break Stop::Failed(e);
            }
            match read {
                Ok(0) => break Stop::End,
                Ok(n) => {
                    if received == 0 {
                        tracing::debug!(step = "first_byte", "first data received");
                    }
                    received += n as u64;
                    reporter.add(n);
                    if let Some(limit) = limit
                        && start + received > limit
                    {
                        break Stop::Failed(DownloadError::LengthMismatch {
                            url: self.display.clone(),
                            expected: limit,
                            actual: start + received,
                            detail: "sent",
                        });
                    }
                }
                Err(e) => break Stop::Failed(e),
            }
        };
        // Whatever arrived is valid data: keep it, whatever the reason for stopping.
        sink.write(buf).await;
        (stop, received)
    }
}
