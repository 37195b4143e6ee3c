//! Progress reporting: what the caller sees through a `tokio::sync::watch` channel.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::RestartReason;

/// Where a download is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    /// Nothing done yet.
    #[default]
    Starting,
    /// Connecting and sending the request.
    Connecting,
    /// Hashing the partial data kept from an earlier run, before resuming.
    VerifyingPartial,
    /// Receiving data.
    Transferring,
    /// Verifying the checksum, syncing and renaming the file.
    Finalizing,
    /// Waiting before the next attempt after a transient error.
    WaitingToRetry,
    /// The file is in place.
    Completed,
}

/// A snapshot of a download's progress, published on a `watch` channel. The downloader
/// publishes every 250 ms while transferring and at every phase change; the caller
/// throttles further as it likes (e.g. patching status every few seconds).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Progress {
    /// Where the download is.
    pub phase: Phase,
    /// Bytes of the file received so far, including a resumed prefix.
    pub bytes_done: u64,
    /// The file's length, when the server announced it.
    pub total_bytes: Option<u64>,
    /// The current attempt, from 1.
    pub attempt: u32,
    /// Transfer rate over the last few seconds.
    pub bytes_per_second: u64,
    /// Where the current attempt resumed (0 for a fresh start).
    pub resumed_from: u64,
    /// The error that ended the previous attempt, while [`Phase::WaitingToRetry`].
    pub last_error: Option<String>,
    /// Why the current attempt started again from byte 0, throwing away the data kept from
    /// an earlier one (a server ignoring ranges, a changed remote file).
    pub restarted: Option<RestartReason>,
}

impl Progress {
    /// Percentage done, rounded down (so 100 only when every byte is there); `None` when
    /// the length is unknown.
    pub fn percent(&self) -> Option<u8> {
        let total = self.total_bytes?;
        if total == 0 {
            return Some(100);
        }
        let pct = u128::from(self.bytes_done.min(total)) * 100 / u128::from(total);
        u8::try_from(pct).ok()
    }

    /// Estimated time to completion at the current rate; `None` when the length or the rate
    /// is unknown.
    pub fn eta(&self) -> Option<Duration> {
        let total = self.total_bytes?;
        if self.bytes_per_second == 0 {
            return None;
        }
        let left = total.saturating_sub(self.bytes_done);
        Some(Duration::from_secs(left.div_ceil(self.bytes_per_second)))
    }
}

/// A transfer rate over a sliding window of samples.
#[derive(Debug)]
pub(crate) struct RateMeter {
    window: Duration,
    samples: VecDeque<(Instant, u64)>,
}

impl RateMeter {
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            window,
            samples: VecDeque::new(),
        }
    }

    /// Forgets all samples (a new attempt starts).
    pub(crate) fn reset(&mut self) {
        self.samples.clear();
    }

    /// Records that `bytes` (a running total) were reached at `now`.
    pub(crate) fn record(&mut self, now: Instant, bytes: u64) {
        self.samples.push_back((now, bytes));
        // Keep one sample at or before the window start, so the window stays full.
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|(t, _)| now.saturating_duration_since(*t) >= self.window)
        {
            self.samples.pop_front();
        }
    }

    /// Bytes per second between the oldest and newest sample; 0 without two samples.
    pub(crate) fn rate(&self) -> u64 {
        let (Some((t0, b0)), Some((t1, b1))) = (self.samples.front(), self.samples.back()) else {
            return 0;
        };
        let secs = t1.saturating_duration_since(*t0).as_secs_f64();
        if secs <= 0.0 {
            return 0;
        }
        // Rounded down; f64 to u64 saturates.
        (b1.saturating_sub(*b0) as f64 / secs) as u64
    }
}

/// How often progress is published while transferring.
pub(crate) const PUBLISH_EVERY: Duration = Duration::from_millis(250);

/// Publishes [`Progress`] on a watch channel, throttled.
pub(crate) struct Reporter<'a> {
    tx: &'a watch::Sender<Progress>,
    state: Progress,
    meter: RateMeter,
}

impl<'a> Reporter<'a> {
    pub(crate) fn new(tx: &'a watch::Sender<Progress>) -> Self {
        Self {
            tx,
            state: Progress::default(),
            meter: RateMeter::new(Duration::from_secs(5)),
        }
    }

    pub(crate) fn snapshot(&self) -> &Progress {
        &self.state
    }

    pub(crate) fn start_attempt(&mut self, attempt: u32) {
        self.state.attempt = attempt;
        self.state.last_error = None;
        self.state.restarted = None;
        self.state.bytes_per_second = 0;
        self.meter.reset();
        self.phase(Phase::Connecting);
    }

    /// The transfer begins at `resumed_from` of `total`.
    pub(crate) fn begin(&mut self, resumed_from: u64, total: Option<u64>) {
        self.state.resumed_from = resumed_from;
        self.state.bytes_done = resumed_from;
        self.state.total_bytes = total;
        self.meter.record(Instant::now(), resumed_from);
    }

    /// Hashing the `kept` bytes of an earlier run (of `total`) before resuming: they count
    /// as done.
    pub(crate) fn verifying(&mut self, kept: u64, total: Option<u64>) {
        self.state.bytes_done = kept;
        self.state.total_bytes = total;
        self.phase(Phase::VerifyingPartial);
    }

    /// The attempt starts from byte 0 again, for `reason`; published with the next update.
    pub(crate) fn restarted(&mut self, reason: RestartReason) {
        self.state.restarted = Some(reason);
    }

    pub(crate) fn phase(&mut self, phase: Phase) {
        self.state.phase = phase;
        self.publish(Instant::now());
    }

    pub(crate) fn retrying(&mut self, error: &str) {
        self.state.last_error = Some(error.to_owned());
        self.state.bytes_per_second = 0;
        self.phase(Phase::WaitingToRetry);
    }

    /// `n` more bytes arrived. Published by the next [`Reporter::tick`] or phase change.
    pub(crate) fn add(&mut self, n: usize) {
        self.state.bytes_done = self.state.bytes_done.saturating_add(n as u64);
    }

    /// Updates the rate and publishes; called every [`PUBLISH_EVERY`] while transferring.
    pub(crate) fn tick(&mut self, now: Instant) {
        self.meter.record(now, self.state.bytes_done);
        self.state.bytes_per_second = self.meter.rate();
        self.publish(now);
    }

    fn publish(&mut self, _now: Instant) {
        self.tx.send_replace(self.state.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_and_eta() {
        let mut p = Progress {
            bytes_done: 999,
            total_bytes: Some(1000),
            bytes_per_second: 10,
            ..Progress::default()
        };
        assert_eq!(p.percent(), Some(99));
        assert_eq!(p.eta(), Some(Duration::from_secs(1)));
        p.bytes_done = 1000;
        assert_eq!(p.percent(), Some(100));
        assert_eq!(p.eta(), Some(Duration::ZERO));
        p.bytes_done = 250;
        assert_eq!(p.percent(), Some(25));
        assert_eq!(p.eta(), Some(Duration::from_secs(75)));
        p.total_bytes = None;
        assert_eq!(p.percent(), None);
        assert_eq!(p.eta(), None);
        p.total_bytes = Some(u64::MAX);
        p.bytes_done = u64::MAX / 2;
        assert_eq!(p.percent(), Some(49));
        p.bytes_per_second = 0;
        assert_eq!(p.eta(), None);
        let empty = Progress {
            total_bytes: Some(0),
            ..Progress::default()
        };
        assert_eq!(empty.percent(), Some(100));
    }

    #[test]
    fn rate_over_window() {
        let t0 = Instant::now();
        let mut m = RateMeter::new(Duration::from_secs(5));
        assert_eq!(m.rate(), 0);
        m.record(t0, 0);
        assert_eq!(m.rate(), 0);
        m.record(t0 + Duration::from_secs(1), 1000);
        assert_eq!(m.rate(), 1000);
        m.record(t0 + Duration::from_secs(2), 3000);
        assert_eq!(m.rate(), 1500);
        // Ten seconds later at a slower pace: only the last window counts.
        for s in 3..=12 {
            m.record(t0 + Duration::from_secs(s), 3000 + (s - 2) * 100);
        }
        assert_eq!(m.rate(), 100);
        assert!(m.samples.len() <= 7);
        m.reset();
        assert_eq!(m.rate(), 0);
    }

    #[test]
    fn reporter_counts_bytes() {
        let (tx, rx) = watch::channel(Progress::default());
        let mut r = Reporter::new(&tx);
        r.start_attempt(2);
        r.begin(100, Some(1000));
        r.add(50);
        assert_eq!(r.snapshot().bytes_done, 150);
        let seen = rx.borrow().clone();
        assert_eq!((seen.attempt, seen.bytes_done), (2, 0));
        assert_eq!(seen.phase, Phase::Connecting);
        r.phase(Phase::Transferring);
        assert_eq!(rx.borrow().bytes_done, 150);
        assert_eq!(rx.borrow().resumed_from, 100);
        r.add(50);
        r.tick(Instant::now() + Duration::from_secs(1));
        assert_eq!(rx.borrow().bytes_done, 200);
        assert!(rx.borrow().bytes_per_second > 0);
    }

    #[test]
    fn reporter_counts_kept_bytes_while_verifying_and_tells_restarts() {
        let (tx, rx) = watch::channel(Progress::default());
        let mut r = Reporter::new(&tx);
        r.start_attempt(1);
        r.verifying(400, Some(1000));
        let seen = rx.borrow().clone();
        assert_eq!(seen.phase, Phase::VerifyingPartial);
        assert_eq!((seen.bytes_done, seen.percent()), (400, Some(40)));
        r.restarted(RestartReason::RangeIgnored);
        r.begin(0, Some(1000));
        r.phase(Phase::Transferring);
        assert_eq!(rx.borrow().restarted, Some(RestartReason::RangeIgnored));
        r.start_attempt(2);
        assert_eq!(rx.borrow().restarted, None);
    }
}
