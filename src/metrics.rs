//! Prometheus metrics of both binaries, served on `/metrics`.

use std::sync::OnceLock;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of per-kind metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// Kind of the object (`VirtualMachineStorage`).
    pub kind: String,
}

/// Labels of error counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Kind of the object.
    pub kind: String,
    /// Short error class (`libvirt`, `api`), or the reason a task (VMClone) failed with
    /// (`UnsupportedDisk`, `CopyFailed`).
    pub reason: String,
}

/// Labels of libvirt call latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// What the call did ("attach a device").
    pub action: String,
}

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    /// Reconciles by kind.
    pub reconciles: Family<KindLabels, Counter>,
    /// Failed reconciles and failed tasks by kind and reason.
    pub errors: Family<ErrorLabels, Counter>,
    /// Reconcile duration by kind.
    pub reconcile_seconds: Family<KindLabels, Histogram>,
    /// Blocking libvirt call latency by action.
    pub libvirt_call_seconds: Family<CallLabels, Histogram>,
    /// Devices whose detach the guest has not confirmed yet.
    pub detach_pending: Gauge,
    /// Downloads transferring now.
    pub downloads_in_flight: Gauge,
    /// Bytes downloaded.
    pub downloaded_bytes: Counter,
    /// Bytes copied by clone tasks.
    pub clone_copied_bytes: Counter,
    /// Batches of definition changes by what they found queued (`empty`, `written`, `failed`).
    pub batch_flushes: Family<CallLabels, Counter>,
    /// Objects a domain event did not wake: their part of the domain was as they last saw it.
    pub wakeups_spared: Counter,
}

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let mut registry = Registry::with_prefix("virtplane");
        let m = Metrics {
            reconciles: Family::default(),
            errors: Family::default(),
            reconcile_seconds: Family::new_with_constructor(seconds_histogram),
            libvirt_call_seconds: Family::new_with_constructor(seconds_histogram),
            detach_pending: Gauge::default(),
            downloads_in_flight: Gauge::default(),
            downloaded_bytes: Counter::default(),
            clone_copied_bytes: Counter::default(),
            batch_flushes: Family::default(),
            wakeups_spared: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("reconciles", "Reconciles by kind", m.reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Failed reconciles and failed tasks by kind and reason",
            m.errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration by kind",
            m.reconcile_seconds.clone(),
        );
        registry.register(
            "libvirt_call_duration_seconds",
            "libvirt call latency by action",
            m.libvirt_call_seconds.clone(),
        );
        registry.register(
            "detach_pending",
            "Devices whose detach the guest has not confirmed",
            m.detach_pending.clone(),
        );
        registry.register(
            "downloads_in_flight",
            "Downloads transferring now",
            m.downloads_in_flight.clone(),
        );
        registry.register(
            "downloaded_bytes",
            "Bytes downloaded",
            m.downloaded_bytes.clone(),
        );
        registry.register(
            "clone_copied_bytes",
            "Bytes copied by clone tasks",
            m.clone_copied_bytes.clone(),
        );
        registry.register(
            "batch_flushes",
            "Batches of definition changes by what they found queued",
            m.batch_flushes.clone(),
        );
        registry.register(
            "wakeups_spared",
            "Objects a domain event did not wake: their part of the domain was unchanged",
            m.wakeups_spared.clone(),
        );
        Metrics { registry, ..m }
    })
}

impl Metrics {
    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Records one reconcile of `kind` that started at `start`, and its error class if it failed.
    pub fn reconciled(&self, kind: &str, start: Instant, error: Option<&str>) {
        let labels = KindLabels {
            kind: kind.to_string(),
        };
        self.reconciles.get_or_create(&labels).inc();
        self.reconcile_seconds
            .get_or_create(&labels)
            .observe(start.elapsed().as_secs_f64());
        if let Some(reason) = error {
            self.error(kind, reason);
        }
    }

    /// Creates the error counter of every failure reason of `kind` at zero, so that the label set
    /// is complete from the start.
    pub fn declare_reasons<'a>(&self, kind: &str, reasons: impl IntoIterator<Item = &'a str>) {
        for reason in reasons {
            let _ = self.errors.get_or_create(&ErrorLabels {
                kind: kind.to_string(),
                reason: reason.to_string(),
            });
        }
    }

    /// Counts one error of `kind`: a failed reconcile's class, or the reason a task failed.
    pub fn error(&self, kind: &str, reason: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                kind: kind.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }
}
