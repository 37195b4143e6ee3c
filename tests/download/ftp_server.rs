//! The FTP/FTPS test server: hack/ftp-server.py (pyftpdlib) as a child process.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const USER: &str = "tester";
pub const PASSWORD: &str = "secret";

/// A finished or aborted transfer, as the server logged it.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Transfer {
    pub cmd: String,
    pub completed: bool,
    pub bytes: u64,
}

pub struct FtpServer {
    pub port: u16,
    child: Child,
    transfers: Arc<Mutex<Vec<Transfer>>>,
}

impl Drop for FtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// TLS material for FTPS: PEM files of the server certificate and key.
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn require_pyftpdlib() {
    let ok = Command::new("python3")
        .args(["-c", "import pyftpdlib, OpenSSL"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "the FTP tests need python3 with pyftpdlib and pyOpenSSL: run hack/install-deps.sh \
         (or `python3 -m pip install pyftpdlib pyopenssl`)"
    );
}

impl FtpServer {
    /// Serves `root` on a free loopback port; FTPS when `tls` is given; `rate` limits each
    /// data connection to that many bytes per second (plain FTP only).
    pub fn start(root: &Path, tls: Option<&TlsFiles>, rate: Option<u64>) -> Self {
        require_pyftpdlib();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/ftp-server.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script)
            .arg("--root")
            .arg(root)
            .args(["--user", USER, "--password", PASSWORD]);
        if let Some(tls) = tls {
            cmd.arg("--tls-cert")
                .arg(&tls.cert)
                .arg("--tls-key")
                .arg(&tls.key);
        }
        if let Some(rate) = rate {
            cmd.args(["--rate", &rate.to_string()]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("failed to start python3 hack/ftp-server.py");
        let stdout = child.stdout.take().unwrap();
        let transfers = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let log = Arc::clone(&transfers);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(port) = line.strip_prefix("READY ") {
                    let _ = ready_tx.send(port.trim().parse::<u16>().unwrap());
                } else if let Ok(t) = serde_json::from_str::<Transfer>(&line) {
                    log.lock().unwrap().push(t);
                }
            }
        });
        let port = match ready_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(port) => port,
            Err(_) => {
                let _ = child.kill();
                panic!("hack/ftp-server.py did not report READY within 20 s");
            }
        };
        Self {
            port,
            child,
            transfers,
        }
    }

    pub fn url(&self, scheme: &str, path: &str) -> String {
        format!("{scheme}://127.0.0.1:{}/{path}", self.port)
    }

    /// The RETR transfers logged so far (waits briefly for the log line of the last one).
    pub fn retrs(&self, at_least: usize) -> Vec<Transfer> {
        for _ in 0..100 {
            let retrs: Vec<Transfer> = self
                .transfers
                .lock()
                .unwrap()
                .iter()
                .filter(|t| t.cmd == "RETR")
                .cloned()
                .collect();
            if retrs.len() >= at_least {
                return retrs;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the FTP server logged fewer than {at_least} RETR transfers");
    }
}
