//! A small hostile HTTP server for the hardening tests, on a loopback address of the test's
//! choosing. Paths:
//!
//! - `/html`: 200, `Content-Type: text/html`, a consistent length: an expired link's page;
//! - `/disguised`: 200, `application/octet-stream`, but the body is an HTML document;
//! - `/endless`: 200, no length, an endless body;
//! - `/slow`: 200, announces 1 MiB, then sends 1 byte every 50 s;
//! - `/redirect?to=URL`: 302 to URL (everything after `to=`, so chains nest);
//! - `/ok/NAME` (with `len`): 200, `len` bytes of a pattern, `ETag`, ranges, at `rate` bytes/s.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub struct Hostile {
    pub addr: String,
    pub requests: Arc<AtomicU64>,
}

pub struct Config {
    pub ok_len: u64,
    pub ok_rate: u64,
}

impl Hostile {
    pub fn start(ip: &str, config: Config) -> Self {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(AtomicU64::new(0));
        let config = Arc::new(config);
        let counter = requests.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let config = config.clone();
                counter.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let _ = serve(conn, &config);
                });
            }
        });
        Self { addr, requests }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

fn serve(mut conn: TcpStream, config: &Config) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut range_from = 0u64;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(r) = lower.strip_prefix("range: bytes=") {
            range_from = r.trim().trim_end_matches('-').parse().unwrap_or(0);
        }
    }
    let head = method == "HEAD";
    let page =
        b"<!DOCTYPE html><html><head><title>Link expired</title></head><body>Sorry.</body></html>";
    match path.as_str() {
        "/html" => {
            write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                page.len()
            )?;
            if !head {
                conn.write_all(page)?;
            }
        }
        "/disguised" => {
            let mut body = page.to_vec();
            body.resize(4096, b' ');
            write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            if !head {
                conn.write_all(&body)?;
            }
        }
        "/endless" => {
            conn.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
            )?;
            if !head {
                let chunk = vec![0u8; 64 << 10];
                loop {
                    conn.write_all(&chunk)?;
                }
            }
        }
        "/slow" => {
            conn.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1048576\r\nConnection: close\r\n\r\n",
            )?;
            if !head {
                loop {
                    conn.write_all(b"\0")?;
                    conn.flush()?;
                    std::thread::sleep(Duration::from_secs(50));
                }
            }
        }
        p if p.starts_with("/redirect?to=") => {
            let to = &p["/redirect?to=".len()..];
            write!(
                conn,
                "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
        }
        p if p.starts_with("/ok/") => {
            let len = config.ok_len;
            let from = range_from.min(len);
            let status = if from > 0 {
                format!(
                    "206 Partial Content\r\nContent-Range: bytes {from}-{}/{len}",
                    len - 1
                )
            } else {
                "200 OK".to_string()
            };
            write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\nAccept-Ranges: bytes\r\nETag: \"v1\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                len - from
            )?;
            if !head {
                let data: Vec<u8> = (from..len).map(|i| (i % 251) as u8).collect();
                let step = (config.ok_rate / 10).max(1) as usize;
                for c in data.chunks(step) {
                    conn.write_all(c)?;
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        _ => {
            conn.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
        }
    }
    conn.flush()
}
