//! The fixture HTTP server (`tests/fixtures/http_server.py`: Range, ETag, a rate limit, a log
//! of the bytes of every response), serving the files of a temporary directory.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub struct FixtureServer {
    child: Child,
    address: &'static str,
    pub port: u16,
    dir: tempfile::TempDir,
    log: PathBuf,
}

impl FixtureServer {
    /// On 127.0.0.1, sending at most `bytes_per_second` per response (0: no limit).
    pub fn start(bytes_per_second: u64) -> Self {
        Self::start_on("127.0.0.1", bytes_per_second)
    }

    /// Listening on `address` (any 127.x address works on Linux).
    pub fn start_on(address: &'static str, bytes_per_second: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port_file = dir.path().join("port");
        let log = dir.path().join("served.log");
        let files = dir.path().join("files");
        std::fs::create_dir(&files).unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/http_server.py");
        let child = Command::new("python3")
            .arg(script)
            .args([&port_file, &files])
            .arg(bytes_per_second.to_string())
            .arg(&log)
            .arg(address)
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !port_file.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the HTTP fixture did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let port = std::fs::read_to_string(&port_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        Self {
            child,
            address,
            port,
            dir,
            log,
        }
    }

    /// Where the file served as `name` lives.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join("files").join(name)
    }

    /// Serves `data` as `name`.
    pub fn serve(&self, name: &str, data: &[u8]) {
        std::fs::write(self.path(name), data).unwrap();
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://{}:{}/{name}", self.address, self.port)
    }

    /// (range start, bytes sent) of every GET response for `name`.
    pub fn served(&self, name: &str) -> Vec<(u64, u64)> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut it = l.split(' ');
                (it.next()? == format!("/{name}")).then(|| {
                    (
                        it.next().unwrap().parse().unwrap(),
                        it.next().unwrap().parse().unwrap(),
                    )
                })
            })
            .collect()
    }
}

impl Drop for FixtureServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
