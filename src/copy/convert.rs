//! Running `qemu-img convert -p` as a copy: its percentage scaled to the caller's total, a cancel
//! flag that kills it within one progress poll, and what it wrote on stderr when it failed. The
//! LUN copy ([`super::lun`]) and the flattened clone copy ([`super::flatten`]) share it.

use std::io::{self, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How a run ended, when it could be started and watched.
pub(super) enum Ended {
    /// `qemu-img` succeeded.
    Done,
    /// The cancel flag was raised; `qemu-img` was killed.
    Cancelled,
    /// `qemu-img` failed; what it wrote on stderr, trimmed.
    Failed(String),
}

/// Runs `cmd` (a `qemu-img convert -p …`) to its end. Every 100 ms, `progress(done, total)`
/// gets the share of `total` that `qemu-img` reports done. An error is one spawning or watching
/// the process.
pub(super) fn run(
    cmd: &mut Command,
    total: u64,
    progress: &mut dyn FnMut(u64, u64),
    cancel: &AtomicBool,
) -> io::Result<Ended> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // The progress lines, read on their own thread; the last percentage in hundredths.
    let hundredths = Arc::new(AtomicU64::new(0));
    let reader = child.stdout.take().map(|mut out| {
        let hundredths = Arc::clone(&hundredths);
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            let mut pending = String::new();
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                pending.push_str(&String::from_utf8_lossy(&buf[..n]));
                while let Some(i) = pending.find(['\r', '\n']) {
                    if let Some(p) = parse_percent(&pending[..i]) {
                        hundredths.fetch_max((p * 100.0) as u64, Ordering::Relaxed);
                    }
                    pending.drain(..=i);
                }
            }
        })
    });
    let mut stderr = child.stderr.take();
    let status = loop {
        if cancel.load(Ordering::Relaxed) {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Ended::Cancelled);
        }
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        }
        let h = hundredths.load(Ordering::Relaxed).min(10_000);
        progress((u128::from(total) * u128::from(h) / 10_000) as u64, total);
        std::thread::sleep(Duration::from_millis(100));
    };
    if let Some(r) = reader {
        let _ = r.join();
    }
    if status.success() {
        return Ok(Ended::Done);
    }
    let mut message = String::new();
    if let Some(e) = stderr.as_mut() {
        let _ = e.read_to_string(&mut message);
    }
    Ok(Ended::Failed(message.trim().to_string()))
}

/// Parses the percentages `qemu-img convert -p` prints (`    (12.50/100%)`, `\r`-separated).
pub fn parse_percent(chunk: &str) -> Option<f64> {
    let inner = chunk.trim().strip_prefix('(')?.strip_suffix("/100%)")?;
    inner.parse().ok()
}

/// Removes the file when dropped, unless disarmed (`.0 = None`).
pub(super) struct RemoveOnDrop<'a>(pub(super) Option<&'a Path>);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_percentages_qemu_img_prints() {
        assert_eq!(parse_percent("    (12.50/100%)"), Some(12.5));
        assert_eq!(parse_percent("(100.00/100%)"), Some(100.0));
        assert_eq!(parse_percent("garbage"), None);
    }
}
