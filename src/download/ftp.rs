//! FTP and FTPS (explicit `AUTH TLS`, `PBSZ 0`, `PROT P`) through suppaftp, passive mode.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use percent_encoding::percent_decode_str;
use reqwest::Url;
use rustls::ClientConfig;
use suppaftp::tokio::{
    AsyncRustlsConnector, AsyncRustlsFtpStream, AsyncRustlsStream, TransferStream,
};
use suppaftp::types::FileType;
use suppaftp::{FtpError, Mode};
use tokio::io::AsyncReadExt;

use super::deny::{self, Destinations};
use super::engine::{Body, Opened, RemoteFile};
use super::state::Sidecar;
use super::{DownloadError, DownloadOptions, DownloadRequest, RemoteInfo, RestartReason};

type Ftp = AsyncRustlsFtpStream;

/// A configured FTP client for one URL.
pub(crate) struct FtpSource {
    host: String,
    tls_name: String,
    port: u16,
    path: String,
    username: String,
    password: String,
    tls: Option<Arc<ClientConfig>>,
    connect_timeout: Duration,
    read_timeout: Duration,
    deny: Destinations,
    display: String,
}

impl FtpSource {
    pub(crate) fn new(
        url: &Url,
        display: String,
        request: &DownloadRequest,
        options: &DownloadOptions,
    ) -> Result<Self, DownloadError> {
        let invalid = |reason: &str| DownloadError::InvalidUrl {
            url: display.clone(),
            reason: reason.to_owned(),
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| invalid("the URL has no host"))?;
        // IPv6 literals come bracketed; names, resolution and TLS want them bare.
        let tls_name = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let decode = |s: &str| {
            percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| invalid("the URL is not valid UTF-8 once decoded"))
        };
        // RFC 1738: the path is relative to the login directory; "%2F" makes it absolute.
        let path = decode(url.path().strip_prefix('/').unwrap_or(url.path()))?;
        if path.is_empty() || path.ends_with('/') {
            return Err(invalid("the URL path names no file"));
        }
        if path.contains(['\r', '\n']) {
            return Err(invalid("the URL path contains a line break"));
        }
        let (username, password) = match &request.auth {
            Some(c) => (c.username.clone(), c.password.clone()),
            None if !url.username().is_empty() => (
                decode(url.username())?,
                decode(url.password().unwrap_or_default())?,
            ),
            None => ("anonymous".to_owned(), "anonymous@".to_owned()),
        };
        let tls = if url.scheme() == "ftps" {
            Some(Arc::new(super::tls::client_config(&request.tls, &[])?))
        } else {
            None
        };
        Ok(Self {
            host: tls_name.clone(),
            tls_name,
            port: url.port().unwrap_or(21),
            path,
            username,
            password,
            tls,
            connect_timeout: options.connect_timeout,
            read_timeout: options.read_timeout,
            deny: Destinations::of(options),
            display,
        })
    }

    /// Runs one FTP step with the read timeout.
    async fn timed<T>(
        &self,
        phase: &'static str,
        step: impl Future<Output = Result<T, FtpError>>,
    ) -> Result<T, DownloadError> {
        match tokio::time::timeout(self.read_timeout, step).await {
            Ok(result) => result.map_err(|e| self.error(e)),
            Err(_) => Err(DownloadError::Timeout {
                url: self.display.clone(),
                phase,
                after: self.read_timeout,
            }),
        }
    }

    fn error(&self, e: FtpError) -> DownloadError {
        match e {
            FtpError::ConnectionError(io) if io.kind() == std::io::ErrorKind::TimedOut => {
                DownloadError::Timeout {
                    url: self.display.clone(),
                    phase: "connecting",
                    after: self.connect_timeout,
                }
            }
            FtpError::ConnectionError(io) => DownloadError::Network {
                url: self.display.clone(),
                source: Box::new(io),
            },
            FtpError::SecureError(msg) => DownloadError::Tls {
                host: self.host.clone(),
                source: msg.into(),
            },
            FtpError::UnexpectedResponse(resp) => {
                let text = String::from_utf8_lossy(&resp.body).trim().to_owned();
                let code = text
                    .get(..3)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or_else(|| resp.status.code());
                match code {
                    550 => DownloadError::NotFound {
                        url: self.display.clone(),
                        reply: text,
                    },
                    430 | 530 | 532 => DownloadError::Unauthorized {
                        url: self.display.clone(),
                        reply: text,
                    },
                    code => DownloadError::FtpReply {
                        url: self.display.clone(),
                        code,
                        reply: text,
                    },
                }
            }
            other => DownloadError::Protocol {
                url: self.display.clone(),
                detail: other.to_string(),
            },
        }
    }

    /// Connects, secures (FTPS), logs in and switches to binary mode.
    async fn session(&self) -> Result<Ftp, DownloadError> {
        let addrs: Vec<SocketAddr> = match tokio::time::timeout(
            self.connect_timeout,
            tokio::net::lookup_host((self.host.as_str(), self.port)),
        )
        .await
        {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(e)) => {
                return Err(DownloadError::Network {
                    url: self.display.clone(),
                    source: Box::new(e),
                });
            }
            Err(_) => {
                return Err(DownloadError::Timeout {
                    url: self.display.clone(),
                    phase: "resolving the host",
                    after: self.connect_timeout,
                });
            }
        };
        // Connect only to the addresses checked here; data connections go to the same peer.
        deny::check(&self.deny, &self.host, addrs.iter().map(SocketAddr::ip))
            .map_err(|d| DownloadError::denied(&self.display, &d))?;
        let mut last = None;
        let mut connected = None;
        for addr in addrs {
            let greeting = tokio::time::timeout(
                self.connect_timeout + self.read_timeout,
                Ftp::connect_timeout(addr, self.connect_timeout),
            );
            match greeting.await {
                Ok(Ok(ftp)) => {
                    connected = Some((ftp, addr));
                    break;
                }
                Ok(Err(e)) => last = Some(self.error(e)),
                Err(_) => {
                    last = Some(DownloadError::Timeout {
                        url: self.display.clone(),
                        phase: "waiting for the FTP greeting",
                        after: self.connect_timeout + self.read_timeout,
                    })
                }
            }
        }
        let Some((mut ftp, addr)) = connected else {
            return Err(last.unwrap_or_else(|| DownloadError::Network {
                url: self.display.clone(),
                source: format!("{} resolves to no address", self.host).into(),
            }));
        };
        if let Some(config) = &self.tls {
            let connector =
                AsyncRustlsConnector::from(tokio_rustls::TlsConnector::from(Arc::clone(config)));
            ftp = self
                .timed(
                    "securing the connection",
                    ftp.into_secure(connector, &self.tls_name),
                )
                .await?;
        }
        // Passive mode; EPSV on IPv6, PASV with the control connection's address otherwise
        // (a server behind NAT often announces its private address).
        if addr.is_ipv6() {
            ftp.set_mode(Mode::ExtendedPassive);
        } else {
            ftp.set_mode(Mode::Passive);
            ftp.set_passive_nat_workaround(true);
        }
        self.timed("logging in", ftp.login(&self.username, &self.password))
            .await?;
        self.timed("setting binary mode", ftp.transfer_type(FileType::Binary))
            .await?;
        Ok(ftp)
    }

    /// `SIZE` and `MDTM`; a server without them gives `None` (but 550 is "not found").
    async fn describe(&self, ftp: &mut Ftp) -> Result<RemoteFile, DownloadError> {
        let total = match self.timed("asking the size", ftp.size(&self.path)).await {
            Ok(size) => Some(size as u64),
            Err(e @ (DownloadError::NotFound { .. } | DownloadError::Unauthorized { .. })) => {
                return Err(e);
            }
            Err(e) if e.is_transient() => return Err(e),
            Err(_) => None,
        };
        let last_modified = match self.timed("asking the date", ftp.mdtm(&self.path)).await {
            Ok(t) => Some(t.to_string()),
            Err(e) if e.is_transient() => return Err(e),
            Err(_) => None,
        };
        let accepts_ranges = match self.timed("asking the features", ftp.feat()).await {
            Ok(features) => features.iter().any(|(name, value)| {
                name.eq_ignore_ascii_case("REST")
                    && value
                        .as_deref()
                        .is_some_and(|v| v.trim().eq_ignore_ascii_case("STREAM"))
            }),
            Err(_) => false,
        };
        Ok(RemoteFile {
            etag: None,
            last_modified,
            total,
            accepts_ranges,
        })
    }

    pub(crate) async fn probe(&self) -> Result<RemoteInfo, DownloadError> {
        let mut ftp = self.session().await?;
        let remote = self.describe(&mut ftp).await?;
        quit(ftp).await;
        Ok(remote.info())
    }

    pub(crate) async fn open(
        &self,
        offset: u64,
        prior: Option<&Sidecar>,
    ) -> Result<Opened, DownloadError> {
        let mut ftp = self.session().await?;
        let now = self.describe(&mut ftp).await?;
        let mut start = 0;
        let mut restart = None;
        if let Some(prior) = prior.filter(|_| offset > 0) {
            if prior.contradicts(&now.sidecar(&self.display))
                || now.total.is_some_and(|total| offset > total)
            {
                restart = Some(RestartReason::RemoteChanged);
            } else {
                start = offset;
            }
        }
        if start > 0 && now.total == Some(start) {
            quit(ftp).await;
            return Ok(Opened {
                content_type: None,
                start,
                remote: now,
                restart,
                body: Body::Empty,
            });
        }
        if start > 0 {
            let offset = usize::try_from(start).map_err(|_| DownloadError::Protocol {
                url: self.display.clone(),
                detail: "offset too large for this platform".into(),
            })?;
            self.timed("resuming", ftp.resume_transfer(offset)).await?;
        }
        let stream = match self
            .timed("opening the transfer", ftp.retr_as_stream(&self.path))
            .await
        {
            Ok(stream) => stream,
            // REST refused (502/504/…): fetch the whole file instead.
            Err(DownloadError::FtpReply { code, .. }) if start > 0 && code >= 500 => {
                start = 0;
                restart = Some(RestartReason::RangeIgnored);
                self.timed("opening the transfer", ftp.retr_as_stream(&self.path))
                    .await?
            }
            Err(e) => return Err(e),
        };
        Ok(Opened {
            content_type: None,
            start,
            remote: now,
            restart,
            body: Body::Ftp(FtpBody {
                ftp,
                stream,
                source_display: self.display.clone(),
            }),
        })
    }

    /// The error for a body read failure.
    fn read_error(display: &str, e: std::io::Error) -> DownloadError {
        DownloadError::Network {
            url: display.to_owned(),
            source: Box::new(e),
        }
    }
}

/// A `RETR` in progress.
pub(crate) struct FtpBody {
    ftp: Ftp,
    stream: TransferStream<AsyncRustlsStream>,
    source_display: String,
}

impl FtpBody {
    /// Appends up to the buffer's spare capacity; 0 at the end of the data. Cancel-safe.
    pub(crate) async fn fill(&mut self, buf: &mut Vec<u8>) -> Result<usize, DownloadError> {
        let spare = buf.capacity() - buf.len();
        let mut limited = (&mut self.stream).take(spare as u64);
        limited
            .read_buf(buf)
            .await
            .map_err(|e| FtpSource::read_error(&self.source_display, e))
    }

    /// Closes the data connection and reads the server's verdict (226, or 426/451 when the
    /// transfer failed on its side).
    pub(crate) async fn finish(self, source: &FtpSource) -> Result<(), DownloadError> {
        let Self { ftp, stream, .. } = self;
        let verdict = source
            .timed("finishing the transfer", stream.finish())
            .await;
        quit(ftp).await;
        verdict
    }
}

/// Says goodbye, without waiting long or caring about the answer.
async fn quit(mut ftp: Ftp) {
    let _ = tokio::time::timeout(Duration::from_secs(2), ftp.quit()).await;
}
