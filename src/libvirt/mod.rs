//! The only code that talks to libvirt: the connection, its events, and typed reads of its state.
//!
//! [`Libvirt`] owns one connection, reopens it after libvirtd comes back, and runs every blocking
//! libvirt call on tokio's blocking pool, at most [`MAX_CONCURRENT_CALLS`] at a time.

pub mod batch;
pub mod block_clone;
pub mod boot_order;
pub mod clone_xml;
pub mod clones;
mod definition;
pub mod domain;
mod error;
pub mod events;
pub mod facade;
#[cfg(test)]
pub mod fake;
mod iftune;
mod inventory;
pub mod iscsi_direct;
pub mod networks;
pub mod nic;
pub mod pool_index;
pub mod provision;
mod real;
pub mod tuning;
pub mod volume;
pub mod volume_copy;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Semaphore, broadcast};
use virt::connect::Connect;

pub use error::{ErrorKind, LibvirtError};
pub use events::{DomainEvent, Event, Lifecycle};
pub use inventory::{Inventory, collect_inventory, collect_storage_pools, format_version};

/// Upper bound of libvirt calls in flight at once.
pub const MAX_CONCURRENT_CALLS: usize = 8;

/// How long one libvirt call may take, by default, before the caller gives up on it
/// ([`LibvirtError::Timeout`]): a call hung on a dead NFS pool or a stuck QEMU monitor then
/// fails for the object that made it, and frees its slot for everyone else's calls. The blocking
/// thread itself cannot be cancelled; it ends when libvirt returns.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A live connection and its event callbacks. Field order matters: callbacks are deregistered
/// before the connection is released.
struct Live {
    _registration: events::Registration,
    conn: Connect,
}

struct Inner {
    uri: String,
    live: Mutex<Option<Live>>,
    permits: Semaphore,
    events: broadcast::Sender<Event>,
    call_timeout: Duration,
}

/// A handle to libvirt on this node; cheap to clone.
#[derive(Clone)]
pub struct Libvirt {
    inner: Arc<Inner>,
}

impl Libvirt {
    /// A handle for `uri`; no connection is opened yet (see [`Libvirt::supervise`]).
    pub fn new(uri: &str) -> Result<Self, LibvirtError> {
        Self::with_call_timeout(uri, CALL_TIMEOUT)
    }

    /// [`Libvirt::new`], each call bounded by `call_timeout` instead of [`CALL_TIMEOUT`].
    pub fn with_call_timeout(uri: &str, call_timeout: Duration) -> Result<Self, LibvirtError> {
        virt::error::clear_error_callback();
        events::start_event_loop().map_err(LibvirtError::EventLoop)?;
        let (events, _) = broadcast::channel(4096);
        Ok(Self {
            inner: Arc::new(Inner {
                uri: uri.to_string(),
                live: Mutex::new(None),
                permits: Semaphore::new(MAX_CONCURRENT_CALLS),
                events,
                call_timeout,
            }),
        })
    }

    /// The connection URI.
    pub fn uri(&self) -> &str {
        &self.inner.uri
    }

    /// Events from now on. A receiver that lags behind gets `RecvError::Lagged` and should
    /// treat everything it caches as stale.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Whether a connection is open.
    pub fn is_connected(&self) -> bool {
        self.live().is_some()
    }

    fn live(&self) -> MutexGuard<'_, Option<Live>> {
        // A poisoned lock only means a panic elsewhere while holding it; the Option is still sound.
        self.inner
            .live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Opens the connection if none is open, registers event callbacks, and announces
    /// [`Event::Connected`].
    pub async fn connect(&self) -> Result<(), LibvirtError> {
        if self.is_connected() {
            return Ok(());
        }
        let uri = self.inner.uri.clone();
        let tx = self.inner.events.clone();
        let live = tokio::task::spawn_blocking(move || -> Result<Live, LibvirtError> {
            let conn = Connect::open(Some(&uri)).map_err(|source| LibvirtError::Connect {
                uri: uri.clone(),
                source,
            })?;
            let registration = events::Registration::register(&conn, &tx).map_err(|source| {
                LibvirtError::Call {
                    action: "register libvirt event callbacks".into(),
                    source,
                }
            })?;
            Ok(Live {
                _registration: registration,
                conn,
            })
        })
        .await??;
        *self.live() = Some(live);
        let _ = self.inner.events.send(Event::Connected);
        Ok(())
    }

    /// Drops the connection (for example after libvirtd closed it).
    pub fn disconnect(&self) {
        let old = self.live().take();
        if let Some(old) = old {
            // Deregistering and closing talk to the daemon; keep that off the async runtime.
            tokio::task::spawn_blocking(move || drop(old));
        }
    }

    /// Keeps the connection open until `shutdown` fires: connects, notices a close (event or a
    /// failed liveness probe), and reconnects with back-off.
    pub async fn supervise(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut events = self.subscribe();
        let mut backoff = Duration::from_millis(500);
        loop {
            if *shutdown.borrow() {
                return;
            }
            if !self.is_connected() {
                match self.connect().await {
                    Ok(()) => {
                        tracing::info!(uri = %self.uri(), "connected to libvirt");
                        backoff = Duration::from_millis(500);
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, retry_in = ?backoff, "libvirt unavailable");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = shutdown.changed() => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            tokio::select! {
                ev = events.recv() => {
                    if matches!(ev, Ok(Event::Closed)) {
                        tracing::warn!(uri = %self.uri(), "libvirt connection closed");
                        self.disconnect();
                    }
                }
                _ = tokio::time::sleep(Duration::from_secs(5)) => {
                    let alive = self.call("probe the connection", |c| c.is_alive()).await;
                    if !matches!(alive, Ok(true)) {
                        tracing::warn!(uri = %self.uri(), "libvirt connection is dead");
                        self.disconnect();
                        let _ = self.inner.events.send(Event::Closed);
                    }
                }
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Runs a blocking libvirt call off the async runtime.
    async fn call<T, F>(&self, action: &str, f: F) -> Result<T, LibvirtError>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T, virt::error::Error> + Send + 'static,
    {
        let _permit =
            self.inner
                .permits
                .acquire()
                .await
                .map_err(|_| LibvirtError::NotConnected {
                    uri: self.inner.uri.clone(),
                })?;
        let conn = self
            .live()
            .as_ref()
            .map(|live| live.conn.clone())
            .ok_or_else(|| LibvirtError::NotConnected {
                uri: self.inner.uri.clone(),
            })?;
        let start = std::time::Instant::now();
        let call = tokio::task::spawn_blocking(move || {
            let began = start.elapsed();
            let r = f(&conn);
            (r, began, start.elapsed())
        });
        let bound = self.inner.call_timeout;
        let result = match tokio::time::timeout(bound, call).await {
            Ok(joined) => {
                let (r, began, ended) = joined?;
                tracing::debug!(
                    action,
                    queued_us = began.as_micros() as u64,
                    ran_us = (ended - began).as_micros() as u64,
                    back_us = (start.elapsed() - ended).as_micros() as u64,
                    "libvirt call"
                );
                r
            }
            Err(_) => {
                tracing::warn!(action, after = ?bound, "libvirt call timed out");
                return Err(LibvirtError::Timeout {
                    action: action.to_string(),
                    after: bound,
                });
            }
        };
        crate::metrics::get()
            .libvirt_call_seconds
            .get_or_create(&crate::metrics::CallLabels {
                action: action.to_string(),
            })
            .observe(start.elapsed().as_secs_f64());
        result.map_err(|source| LibvirtError::Call {
            action: action.to_string(),
            source,
        })
    }
}
