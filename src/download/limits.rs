//! The limits one attempt's response is held to, besides its announced length: the largest
//! file, HTML or XML pages instead of the file, the minimum rate over a window and the
//! deadline of an attempt. Pure: the streaming loop feeds it times and byte counts. And the
//! free-space floor ([`Floor`]), which the writer checks as it writes.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{DownloadError, DownloadOptions, MinRate};
use crate::image::sniff;

/// The checks of one attempt.
pub(crate) struct Limits {
    url: String,
    max_bytes: Option<u64>,
    min_rate: Option<MinRate>,
    deadline: Option<Duration>,
    started: Instant,
    window_start: Instant,
    window_received: u64,
    /// The body starts at byte 0 and its first bytes are not looked at yet.
    sniff: bool,
}

impl Limits {
    /// For a body starting at file offset `start`, at `now`.
    pub(crate) fn new(
        options: &DownloadOptions,
        url: &str,
        start: u64,
        allow_markup: bool,
        now: Instant,
    ) -> Self {
        Self {
            url: url.to_owned(),
            max_bytes: options.max_bytes,
            min_rate: options.min_rate.filter(|r| !r.window.is_zero()),
            deadline: options.deadline,
            started: now,
            window_start: now,
            window_received: 0,
            sniff: start == 0 && !allow_markup,
        }
    }

    /// Before any data: refuses a response announcing more than the largest file, or whose
    /// `Content-Type` is HTML or XML.
    pub(crate) fn response(
        &self,
        total: Option<u64>,
        content_type: Option<&str>,
    ) -> Result<(), DownloadError> {
        if let (Some(max), Some(total)) = (self.max_bytes, total)
            && total > max
        {
            return Err(self.too_large(max));
        }
        if self.sniff
            && let Some(ct) = content_type.filter(|ct| sniff::markup_type(ct))
        {
            return Err(DownloadError::ErrorPage {
                url: self.url.clone(),
                detail: format!("a Content-Type of {}", ct.trim()),
            });
        }
        Ok(())
    }

    /// After data arrived: the file (`start + received` bytes so far) within the largest
    /// size, and the head of a fresh body (`head`, the body's first bytes) not a page once
    /// enough of it is there (`ended`: all of it is).
    pub(crate) fn data(
        &mut self,
        start: u64,
        received: u64,
        head: &[u8],
        ended: bool,
    ) -> Result<(), DownloadError> {
        if let Some(max) = self.max_bytes
            && start + received > max
        {
            return Err(self.too_large(max));
        }
        if self.sniff && (ended || head.len() >= sniff::MARKUP_LEN) {
            self.sniff = false;
            if let Some(what) = sniff::markup(&head[..head.len().min(sniff::MARKUP_LEN)]) {
                return Err(DownloadError::ErrorPage {
                    url: self.url.clone(),
                    detail: what.to_string(),
                });
            }
        }
        Ok(())
    }

    /// On a timer tick: the rate over the window that just ended, and the deadline.
    pub(crate) fn tick(&mut self, now: Instant, received: u64) -> Result<(), DownloadError> {
        if let Some(deadline) = self.deadline
            && now.saturating_duration_since(self.started) >= deadline
        {
            return Err(DownloadError::TooSlow {
                url: self.url.clone(),
                detail: format!(
                    "the attempt ran past its deadline of {}s; it gives up its slot and resumes later",
                    deadline.as_secs()
                ),
            });
        }
        let Some(rate) = self.min_rate else {
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed < rate.window {
            return Ok(());
        }
        let got = received.saturating_sub(self.window_received);
        let need = u128::from(rate.bytes_per_second) * elapsed.as_millis() / 1000;
        if u128::from(got) < need {
            return Err(DownloadError::TooSlow {
                url: self.url.clone(),
                detail: format!(
                    "{got} bytes arrived in {}s, below the minimum of {} bytes/s; it gives up its slot and resumes later",
                    elapsed.as_secs(),
                    rate.bytes_per_second
                ),
            });
        }
        self.window_start = now;
        self.window_received = received;
        Ok(())
    }

    fn too_large(&self, limit: u64) -> DownloadError {
        DownloadError::TooLarge {
            url: self.url.clone(),
            limit,
        }
    }
}

/// Bytes written between two checks of the free space: a `statvfs` per 16 MiB is cheap, and
/// the floor (1 GiB by default) is far above what one interval can write.
pub const FLOOR_EVERY: u64 = 16 << 20;

/// The free space the destination keeps while a download writes (`--download-min-free-bytes`),
/// checked on the writer thread before every [`FLOOR_EVERY`] bytes (and the first buffer).
pub(crate) struct Floor {
    floor: u64,
    since: u64,
}

impl Floor {
    pub(crate) fn new(floor: u64) -> Self {
        Self {
            floor,
            since: FLOOR_EVERY,
        }
    }

    /// Counts `n` more bytes about to be written: whether the space is to be checked first.
    pub(crate) fn due(&mut self, n: u64) -> bool {
        let due = self.since >= FLOOR_EVERY;
        if due {
            self.since = 0;
        }
        self.since += n;
        due
    }

    /// Refuses to go on when `available` bytes are below the floor.
    pub(crate) fn judge(&self, available: u64, path: &Path) -> Result<(), DownloadError> {
        if available < self.floor {
            return Err(DownloadError::BelowFloor {
                path: path.to_path_buf(),
                available,
                floor: self.floor,
            });
        }
        Ok(())
    }

    /// [`Floor::judge`] of the free space of `file`'s filesystem. Blocking.
    pub(crate) fn check(&self, file: &File, path: &Path) -> Result<(), DownloadError> {
        let s = rustix::fs::fstatvfs(file)
            .map_err(|e| DownloadError::io("check the free space of", path, e.into()))?;
        self.judge(s.f_bavail.saturating_mul(s.f_frsize), path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_is_checked_first_and_then_every_interval() {
        let mut f = Floor::new(100);
        assert!(f.due(10), "before the first buffer");
        assert!(!f.due(FLOOR_EVERY - 10));
        assert!(f.due(1), "an interval later");
        assert!(!f.due(1));
        let p = Path::new("/pool/.x.partial");
        assert!(f.judge(100, p).is_ok());
        let e = f.judge(99, p).unwrap_err();
        assert_eq!(e.reason(), "InsufficientSpace");
        assert!(!e.is_transient());
        assert!(e.to_string().contains("99 bytes are free"), "{e}");
        // The real filesystem: nothing has u64::MAX bytes free.
        let file = tempfile::tempfile().unwrap();
        assert!(Floor::new(0).check(&file, p).is_ok());
        assert!(Floor::new(u64::MAX).check(&file, p).is_err());
    }

    fn options(
        max: Option<u64>,
        rate: Option<(u64, u64)>,
        deadline: Option<u64>,
    ) -> DownloadOptions {
        DownloadOptions {
            max_bytes: max,
            min_rate: rate.map(|(b, w)| MinRate {
                bytes_per_second: b,
                window: Duration::from_secs(w),
            }),
            deadline: deadline.map(Duration::from_secs),
            ..DownloadOptions::default()
        }
    }

    #[test]
    fn the_size_limit_counts_the_whole_file() {
        let t = Instant::now();
        let mut l = Limits::new(&options(Some(100), None, None), "u", 0, true, t);
        assert!(l.response(Some(100), None).is_ok());
        assert!(matches!(
            l.response(Some(101), None),
            Err(DownloadError::TooLarge { limit: 100, .. })
        ));
        assert!(l.data(0, 100, b"", false).is_ok());
        assert!(l.data(0, 101, b"", false).is_err());
        let mut resumed = Limits::new(&options(Some(100), None, None), "u", 60, true, t);
        assert!(resumed.data(60, 40, b"", false).is_ok());
        assert!(resumed.data(60, 41, b"", false).is_err());
        let mut none = Limits::new(&options(None, None, None), "u", 0, true, t);
        assert!(none.data(0, u64::MAX / 2, b"", false).is_ok());
    }

    #[test]
    fn pages_are_refused_unless_allowed_or_resumed() {
        let t = Instant::now();
        let o = options(None, None, None);
        let l = Limits::new(&o, "u", 0, false, t);
        assert!(matches!(
            l.response(None, Some("text/html; charset=utf-8")),
            Err(DownloadError::ErrorPage { .. })
        ));
        assert!(l.response(None, Some("application/octet-stream")).is_ok());
        let mut l = Limits::new(&o, "u", 0, false, t);
        // Not enough to decide yet; then the body ends.
        assert!(l.data(0, 6, b"<html>", false).is_ok());
        assert!(l.data(0, 6, b"<html>", true).is_err());
        let mut l = Limits::new(&o, "u", 0, false, t);
        let mut iso = vec![0u8; 2048];
        iso[..6].copy_from_slice(b"<html>");
        assert!(l.data(0, 2048, &iso, false).is_err());
        let mut l = Limits::new(&o, "u", 0, false, t);
        assert!(l.data(0, 2048, &[0u8; 2048], false).is_ok());
        // Decided once: later bytes are the file's own.
        assert!(l.data(0, 4096, &iso, false).is_ok());
        let allowed = Limits::new(&o, "u", 0, true, t);
        assert!(allowed.response(None, Some("text/html")).is_ok());
        let mut resumed = Limits::new(&o, "u", 10, false, t);
        assert!(resumed.response(None, Some("text/html")).is_ok());
        assert!(resumed.data(10, 6, b"<html>", true).is_ok());
    }

    #[test]
    fn slow_bodies_and_the_deadline() {
        let t = Instant::now();
        let s = Duration::from_secs;
        let mut l = Limits::new(&options(None, Some((100, 10)), None), "u", 0, true, t);
        assert!(l.tick(t + s(5), 0).is_ok(), "the window is not over");
        assert!(l.tick(t + s(10), 1000).is_ok(), "exactly the minimum");
        assert!(l.tick(t + s(15), 1001).is_ok());
        let e = l.tick(t + s(20), 1999).unwrap_err();
        assert!(e.is_transient() && e.reason() == "Timeout", "{e}");
        let mut d = Limits::new(&options(None, None, Some(60)), "u", 0, true, t);
        assert!(d.tick(t + s(59), 0).is_ok());
        assert!(matches!(
            d.tick(t + s(60), 10),
            Err(DownloadError::TooSlow { .. })
        ));
        let mut off = Limits::new(&options(None, Some((100, 0)), None), "u", 0, true, t);
        assert!(
            off.tick(t + s(1000), 0).is_ok(),
            "a zero window disables the rate"
        );
    }
}
