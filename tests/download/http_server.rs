//! An in-process HTTP/HTTPS server that serves one file and misbehaves on request, and
//! records what it served.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

type Body = BoxBody<Bytes, std::io::Error>;

/// How the server misbehaves; counters count down per GET request.
#[derive(Clone, Debug, Default)]
pub struct Behavior {
    /// The next `drop_times` GETs send this many body bytes, then break the connection.
    pub drop_after: Option<u64>,
    pub drop_times: u32,
    /// The next `stall_times` GETs send this many body bytes, then send nothing more.
    pub stall_after: Option<u64>,
    pub stall_times: u32,
    /// Answer range requests with the whole file (200).
    pub ignore_range: bool,
    /// The next `fail_times` requests (any method) get 500.
    pub fail_times: u32,
    /// Every request gets this status and a short body.
    pub status: Option<u16>,
    /// Basic-auth credentials every request must carry (else 401).
    pub basic_auth: Option<(String, String)>,
    /// GET answers 200 with a small HTML error page (HEAD still describes the file).
    pub error_page: bool,
    /// Each body frame is at most this long (default 64 KiB).
    pub frame: Option<usize>,
    /// Every request gets `302 Found` to this URL.
    pub redirect: Option<String>,
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Record {
    pub method: Method,
    pub range: Option<String>,
    pub if_range: Option<String>,
    pub status: u16,
    served: Arc<AtomicU64>,
}

impl Record {
    /// Body bytes handed to the connection for this request.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }
}

struct File {
    content: Bytes,
    version: u32,
}

impl File {
    fn etag(&self) -> String {
        format!("\"v{}-{}\"", self.version, self.content.len())
    }
    fn last_modified(&self) -> String {
        format!("Mon, 01 Jan 2024 00:00:{:02} GMT", self.version % 60)
    }
}

struct State {
    file: Mutex<File>,
    behavior: Mutex<Behavior>,
    log: Mutex<Vec<Record>>,
}

/// A running server; stops when dropped.
pub struct HttpServer {
    pub addr: SocketAddr,
    tls: bool,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpServer {
    /// Serves `content` at every path, over TLS when `tls` is given.
    pub async fn start(content: Vec<u8>, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        Self::start_on("127.0.0.1", content, tls).await
    }

    /// Like [`HttpServer::start`], listening on `ip` (any loopback address works on Linux).
    pub async fn start_on(
        ip: &str,
        content: Vec<u8>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Self {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            file: Mutex::new(File {
                content: Bytes::from(content),
                version: 1,
            }),
            behavior: Mutex::new(Behavior::default()),
            log: Mutex::new(Vec::new()),
        });
        let is_tls = tls.is_some();
        let acceptor = tls.map(TlsAcceptor::from);
        let st = Arc::clone(&state);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let st = Arc::clone(&st);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let st = Arc::clone(&st);
                        async move { Ok::<_, Infallible>(handle(&st, req)) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            tls: is_tls,
            state,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}/{path}", self.addr)
    }

    pub fn set_behavior(&self, behavior: Behavior) {
        *self.state.behavior.lock().unwrap() = behavior;
    }

    /// Replaces the file: new content, new ETag and Last-Modified.
    pub fn replace_content(&self, content: Vec<u8>) {
        let mut file = self.state.file.lock().unwrap();
        file.content = Bytes::from(content);
        file.version += 1;
    }

    pub fn log(&self) -> Vec<Record> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn gets(&self) -> Vec<Record> {
        self.log()
            .into_iter()
            .filter(|r| r.method == Method::GET)
            .collect()
    }

    pub fn served_total(&self) -> u64 {
        self.log().iter().map(Record::served).sum()
    }

    pub fn clear_log(&self) {
        self.state.log.lock().unwrap().clear();
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn handle(state: &State, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let served = Arc::new(AtomicU64::new(0));
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::to_owned)
    };
    let range = header(header::RANGE);
    let if_range = header(header::IF_RANGE);
    let resp = respond(state, &req, range.as_deref(), if_range.as_deref(), &served);
    state.log.lock().unwrap().push(Record {
        method: req.method().clone(),
        range,
        if_range,
        status: resp.status().as_u16(),
        served,
    });
    resp
}

fn respond(
    state: &State,
    req: &Request<hyper::body::Incoming>,
    range: Option<&str>,
    if_range: Option<&str>,
    served: &Arc<AtomicU64>,
) -> Response<Body> {
    let mut behavior = state.behavior.lock().unwrap();
    if let Some(to) = &behavior.redirect {
        let mut resp = text(StatusCode::FOUND, "moved\n");
        resp.headers_mut()
            .insert(header::LOCATION, HeaderValue::from_str(to).unwrap());
        return resp;
    }
    if let Some(status) = behavior.status {
        return text(StatusCode::from_u16(status).unwrap(), "no\n");
    }
    if behavior.fail_times > 0 {
        behavior.fail_times -= 1;
        return text(StatusCode::INTERNAL_SERVER_ERROR, "try later\n");
    }
    if let Some((user, password)) = &behavior.basic_auth {
        let expected = format!("Basic {}", base64(format!("{user}:{password}").as_bytes()));
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if given != Some(expected.as_str()) {
            let mut resp = text(StatusCode::UNAUTHORIZED, "who are you?\n");
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"test\""),
            );
            return resp;
        }
    }
    let file = state.file.lock().unwrap();
    let (content, etag, last_modified) = (file.content.clone(), file.etag(), file.last_modified());
    drop(file);
    let len = content.len() as u64;

    if *req.method() == Method::GET && behavior.error_page {
        let mut resp = text(
            StatusCode::OK,
            "<html><body><h1>Service temporarily unavailable</h1></body></html>\n",
        );
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
        return resp;
    }

    let mut builder = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::LAST_MODIFIED, &last_modified)
        .header(
            header::ACCEPT_RANGES,
            if behavior.ignore_range {
                "none"
            } else {
                "bytes"
            },
        );
    if *req.method() == Method::HEAD {
        return builder
            .header(header::CONTENT_LENGTH, len)
            .body(full(Bytes::new()))
            .unwrap();
    }

    // Range: only "bytes=N-", which is what the downloader sends.
    let validator_ok = if_range.is_none_or(|v| v == etag || v == last_modified);
    let start = range
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|_| !behavior.ignore_range && validator_ok);
    let (status, from) = match start {
        Some(s) if s >= len => {
            return builder
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .body(full(Bytes::new()))
                .unwrap();
        }
        Some(s) => {
            builder = builder.header(
                header::CONTENT_RANGE,
                format!("bytes {s}-{}/{len}", len - 1),
            );
            (StatusCode::PARTIAL_CONTENT, s)
        }
        None => (StatusCode::OK, 0),
    };

    let mut drop_at = None;
    if behavior.drop_times > 0 {
        behavior.drop_times -= 1;
        drop_at = behavior.drop_after;
    }
    let mut stall_at = None;
    if behavior.stall_times > 0 {
        behavior.stall_times -= 1;
        stall_at = behavior.stall_after;
    }
    let frame = behavior.frame.unwrap_or(64 * 1024);
    let body = body_stream(
        content.slice(from as usize..),
        frame,
        drop_at,
        stall_at,
        served,
    );
    builder
        .status(status)
        .header(header::CONTENT_LENGTH, len - from)
        .body(body)
        .unwrap()
}

/// The body: frames of `data`, breaking the connection after `drop_at` bytes or going
/// silent after `stall_at` bytes. Counts what it hands out in `served`.
fn body_stream(
    data: Bytes,
    frame: usize,
    drop_at: Option<u64>,
    stall_at: Option<u64>,
    served: &Arc<AtomicU64>,
) -> Body {
    struct S {
        data: Bytes,
        sent: u64,
        frame: usize,
        drop_at: Option<u64>,
        stall_at: Option<u64>,
        served: Arc<AtomicU64>,
    }
    let state = S {
        data,
        sent: 0,
        frame,
        drop_at,
        stall_at,
        served: Arc::clone(served),
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        if s.data.is_empty() {
            return None;
        }
        let mut n = s.frame.min(s.data.len());
        for limit in [s.drop_at, s.stall_at].into_iter().flatten() {
            if s.sent < limit {
                n = n.min((limit - s.sent) as usize);
            }
        }
        if s.drop_at.is_some_and(|d| s.sent >= d) {
            // Give hyper a moment to flush what was sent, then break the connection.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let err =
                std::io::Error::new(std::io::ErrorKind::ConnectionReset, "dropped on purpose");
            s.data = Bytes::new();
            return Some((Err(err), s));
        }
        if s.stall_at.is_some_and(|d| s.sent >= d) {
            std::future::pending::<()>().await;
        }
        let chunk = s.data.split_to(n);
        s.sent += n as u64;
        s.served.fetch_add(n as u64, Ordering::SeqCst);
        Some((Ok(Frame::data(chunk)), s))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
