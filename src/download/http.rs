//! HTTP and HTTPS through reqwest, with a rustls config built here (ring provider).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{self, HeaderMap};
use reqwest::{Method, StatusCode, Url};

use super::deny::{self, Denied, DenyingResolver, Destinations, RedirectRefused};
use super::engine::{Body, Opened, RemoteFile};
use super::error::find_cause;
use super::range::{ContentRange, is_strong_etag, parse_content_range, range_from};
use super::state::Sidecar;
use super::{
    Credentials, DownloadError, DownloadOptions, DownloadRequest, RemoteInfo, RestartReason,
};

/// A configured client for one URL.
pub(crate) struct HttpSource {
    client: reqwest::Client,
    url: Url,
    display: String,
    host: String,
    auth: Option<Credentials>,
    response_timeout: Duration,
}

impl HttpSource {
    pub(crate) fn new(
        url: Url,
        display: String,
        request: &DownloadRequest,
        options: &DownloadOptions,
    ) -> Result<Self, DownloadError> {
        let deny = Arc::new(Destinations::of(options));
        deny::check_url(&deny, &url).map_err(|d| DownloadError::denied(&display, &d))?;
        let tls = super::tls::client_config(&request.tls, &[b"http/1.1"])?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(options.connect_timeout)
            .dns_resolver(DenyingResolver::new(Arc::clone(&deny)))
            .redirect(deny::redirect_policy(deny))
            .user_agent(concat!("virtplane/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| DownloadError::Protocol {
                url: display.clone(),
                detail: format!("failed to build the HTTP client: {}", chain(&e)),
            })?;
        Ok(Self {
            client,
            host: url.host_str().unwrap_or_default().to_owned(),
            url,
            display,
            auth: request.auth.clone(),
            response_timeout: options.connect_timeout + options.read_timeout,
        })
    }

    fn request(&self, method: Method) -> reqwest::RequestBuilder {
        let rb = self.client.request(method, self.url.clone());
        match &self.auth {
            Some(c) => rb.basic_auth(&c.username, Some(&c.password)),
            None => rb,
        }
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response, DownloadError> {
        match tokio::time::timeout(self.response_timeout, rb.send()).await {
            Err(_) => Err(DownloadError::Timeout {
                url: self.display.clone(),
                phase: "waiting for the response",
                after: self.response_timeout,
            }),
            Ok(Err(e)) => Err(self.error(e, "connecting")),
            // reqwest hands back a redirect it does not follow itself (a Location with
            // another scheme, or none); the policy reports the ones it refuses as errors.
            Ok(Ok(resp)) if resp.status().is_redirection() => {
                let location = header_str(resp.headers(), header::LOCATION)
                    .unwrap_or("(no Location)")
                    .to_owned();
                Err(DownloadError::Protocol {
                    url: self.display.clone(),
                    detail: format!(
                        "refused to follow a redirect (HTTP {}) to {location}: only http and https redirects are followed",
                        resp.status()
                    ),
                })
            }
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    /// Maps a reqwest error: a denied destination, a refused redirect, TLS failures,
    /// timeouts, everything else as a network error.
    fn error(&self, e: reqwest::Error, phase: &'static str) -> DownloadError {
        let e = e.without_url();
        if let Some(denied) = find_cause::<Denied>(&e) {
            return DownloadError::denied(&self.display, denied);
        }
        if let Some(refused) = find_cause::<RedirectRefused>(&e) {
            return DownloadError::Protocol {
                url: self.display.clone(),
                detail: refused.to_string(),
            };
        }
        if let Some(tls) = find_cause::<rustls::Error>(&e) {
            return DownloadError::Tls {
                host: self.host.clone(),
                source: Box::new(tls.clone()),
            };
        }
        if e.is_timeout() {
            return DownloadError::Timeout {
                url: self.display.clone(),
                phase,
                after: self.response_timeout,
            };
        }
        DownloadError::Network {
            url: self.display.clone(),
            source: chain(&e).into(),
        }
    }

    fn check_status(&self, status: StatusCode) -> Result<(), DownloadError> {
        let reply = || format!("HTTP {status}");
        match status.as_u16() {
            200..=299 => Ok(()),
            404 | 410 => Err(DownloadError::NotFound {
                url: self.display.clone(),
                reply: reply(),
            }),
            401 | 403 | 407 => Err(DownloadError::Unauthorized {
                url: self.display.clone(),
                reply: reply(),
            }),
            status => Err(DownloadError::HttpStatus {
                url: self.display.clone(),
                status,
            }),
        }
    }

    pub(crate) async fn probe(&self) -> Result<RemoteInfo, DownloadError> {
        let resp = self.send(self.request(Method::HEAD)).await?;
        if matches!(
            resp.status(),
            StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_IMPLEMENTED
        ) {
            // No HEAD: ask for the first byte and read the length from Content-Range.
            let resp = self
                .send(self.request(Method::GET).header(header::RANGE, "bytes=0-0"))
                .await?;
            self.check_status(resp.status())?;
            let headers = resp.headers();
            let total =
                match header_str(headers, header::CONTENT_RANGE).and_then(parse_content_range) {
                    Some(ContentRange::Bytes { total, .. }) => total,
                    _ => content_length(headers),
                };
            return Ok(RemoteInfo {
                total_bytes: total,
                etag: header_string(headers, header::ETAG),
                last_modified: header_string(headers, header::LAST_MODIFIED),
                accepts_ranges: resp.status() == StatusCode::PARTIAL_CONTENT,
            });
        }
        self.check_status(resp.status())?;
        let headers = resp.headers();
        Ok(RemoteInfo {
            total_bytes: content_length(headers),
            etag: header_string(headers, header::ETAG),
            last_modified: header_string(headers, header::LAST_MODIFIED),
            accepts_ranges: accepts_ranges(headers),
        })
    }

    /// Requests the file from `offset` on, checking against `prior` that the remote did not
    /// change; restarts from 0 when it did or when ranges are not honoured.
    pub(crate) async fn open(
        &self,
        offset: u64,
        prior: Option<&Sidecar>,
    ) -> Result<Opened, DownloadError> {
        let Some(prior) = prior.filter(|_| offset > 0) else {
            return self.open_full(None).await;
        };
        let mut rb = self
            .request(Method::GET)
            .header(header::RANGE, range_from(offset));
        if let Some(etag) = prior.etag.as_deref().filter(|e| is_strong_etag(e)) {
            rb = rb.header(header::IF_RANGE, etag);
        } else if let Some(lm) = &prior.last_modified {
            rb = rb.header(header::IF_RANGE, lm);
        }
        let resp = self.send(rb).await?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let headers = resp.headers();
                let range =
                    header_str(headers, header::CONTENT_RANGE).and_then(parse_content_range);
                let Some(ContentRange::Bytes { first, total, .. }) = range else {
                    return self.open_full(Some(RestartReason::RangeIgnored)).await;
                };
                let now = remote_file(headers, total);
                if prior.contradicts(&now.sidecar(&self.display)) {
                    return self.open_full(Some(RestartReason::RemoteChanged)).await;
                }
                if first != offset {
                    return self.open_full(Some(RestartReason::RangeIgnored)).await;
                }
                Ok(Opened {
                    content_type: header_string(resp.headers(), header::CONTENT_TYPE),
                    start: offset,
                    remote: RemoteFile {
                        etag: now.etag.or_else(|| prior.etag.clone()),
                        last_modified: now.last_modified.or_else(|| prior.last_modified.clone()),
                        total: now.total.or(prior.total_bytes),
                        accepts_ranges: true,
                    },
                    restart: None,
                    body: Body::Http(HttpBody::new(resp, self)),
                })
            }
            StatusCode::OK => {
                let now = remote_file(resp.headers(), content_length(resp.headers()));
                let reason = if prior.contradicts(&now.sidecar(&self.display)) {
                    RestartReason::RemoteChanged
                } else {
                    RestartReason::RangeIgnored
                };
                Ok(Opened {
                    content_type: header_string(resp.headers(), header::CONTENT_TYPE),
                    start: 0,
                    remote: now,
                    restart: Some(reason),
                    body: Body::Http(HttpBody::new(resp, self)),
                })
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                let total = match header_str(resp.headers(), header::CONTENT_RANGE)
                    .and_then(parse_content_range)
                {
                    Some(ContentRange::Unsatisfied { total }) => Some(total),
                    _ => None,
                };
                if total == Some(offset) && prior.total_bytes == Some(offset) {
                    // Everything is already here (a run stopped between the last byte and
                    // the rename).
                    return Ok(Opened {
                        content_type: None,
                        start: offset,
                        remote: RemoteFile::from_sidecar(prior),
                        restart: None,
                        body: Body::Empty,
                    });
                }
                self.open_full(Some(RestartReason::RemoteChanged)).await
            }
            status => {
                self.check_status(status)?;
                // Another 2xx to a range request: not usable, start over.
                self.open_full(Some(RestartReason::RangeIgnored)).await
            }
        }
    }

    async fn open_full(&self, restart: Option<RestartReason>) -> Result<Opened, DownloadError> {
        let resp = self.send(self.request(Method::GET)).await?;
        self.check_status(resp.status())?;
        if resp.status() != StatusCode::OK {
            return Err(DownloadError::Protocol {
                url: self.display.clone(),
                detail: format!("unexpected HTTP {} to a plain GET", resp.status()),
            });
        }
        Ok(Opened {
            content_type: header_string(resp.headers(), header::CONTENT_TYPE),
            start: 0,
            remote: remote_file(resp.headers(), content_length(resp.headers())),
            restart,
            body: Body::Http(HttpBody::new(resp, self)),
        })
    }
}

/// A response body being read.
pub(crate) struct HttpBody {
    resp: reqwest::Response,
    pending: Bytes,
    display: String,
    host: String,
}

impl HttpBody {
    fn new(resp: reqwest::Response, source: &HttpSource) -> Self {
        Self {
            resp,
            pending: Bytes::new(),
            display: source.display.clone(),
            host: source.host.clone(),
        }
    }

    /// Appends up to the buffer's spare capacity; 0 at the end of the body. Cancel-safe.
    pub(crate) async fn fill(&mut self, buf: &mut Vec<u8>) -> Result<usize, DownloadError> {
        if self.pending.is_empty() {
            match self.resp.chunk().await {
                Ok(Some(chunk)) => self.pending = chunk,
                Ok(None) => return Ok(0),
                Err(e) => {
                    let e = e.without_url();
                    if let Some(tls) = find_cause::<rustls::Error>(&e) {
                        return Err(DownloadError::Tls {
                            host: self.host.clone(),
                            source: Box::new(tls.clone()),
                        });
                    }
                    return Err(DownloadError::Network {
                        url: self.display.clone(),
                        source: chain(&e).into(),
                    });
                }
            }
        }
        let n = self.pending.len().min(buf.capacity() - buf.len());
        buf.extend_from_slice(&self.pending[..n]);
        self.pending = self.pending.slice(n..);
        Ok(n)
    }
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn header_string(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    header_str(headers, name).map(str::to_owned)
}

/// The `Content-Length` header (not the body's size hint, which is 0 for `HEAD`).
fn content_length(headers: &HeaderMap) -> Option<u64> {
    header_str(headers, header::CONTENT_LENGTH).and_then(|v| v.trim().parse().ok())
}

fn remote_file(headers: &HeaderMap, total: Option<u64>) -> RemoteFile {
    RemoteFile {
        etag: header_string(headers, header::ETAG),
        last_modified: header_string(headers, header::LAST_MODIFIED),
        total,
        accepts_ranges: accepts_ranges(headers),
    }
}

/// `Accept-Ranges: bytes`.
fn accepts_ranges(headers: &HeaderMap) -> bool {
    header_str(headers, header::ACCEPT_RANGES)
        .is_some_and(|v| v.split(',').any(|u| u.trim().eq_ignore_ascii_case("bytes")))
}

/// An error and its causes, joined with ": " (reqwest's own message hides the cause).
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}
