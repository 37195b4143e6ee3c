//! The storage pools' names, states and directories, kept between reconciles: every storage
//! reconcile needs them to judge a path, and listing them costs 1 + 3 libvirt round trips per
//! pool. What is kept cannot change without libvirt saying so: a pool is defined, undefined,
//! started, stopped (lifecycle events) or refreshed, and its target path changes only with a new
//! definition. So the copy is dropped on any storage pool event, on a reconnect or a closed
//! connection, when the event receiver lagged (events may be lost), and after [`MAX_AGE`]
//! regardless. A read that raced with such an event is returned but not kept.
//!
//! The copy never decides a refusal on its own: a caller that would refuse a path because it
//! lies in no known pool asks again with [`PoolIndex::fresh`] (see `agent::storage::observe`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast::{self, error::TryRecvError};

use super::facade::Storage;
use super::{Event, LibvirtError};

/// How long a copy is used at most, events or not (a safety net: events are the mechanism).
pub const MAX_AGE: Duration = Duration::from_secs(30);

/// What a reconcile needs of a storage pool (never its capacity, which changes without events).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolDir {
    /// Name.
    pub name: String,
    /// Whether it is running.
    pub active: bool,
    /// Its `target/path`, as libvirt has it (not resolved).
    pub path: Option<String>,
}

/// Whether an event (or what the receiver got instead of one) may change what is kept.
pub fn invalidates(ev: &Result<Event, TryRecvError>) -> bool {
    match ev {
        Ok(Event::StoragePool { .. } | Event::Connected | Event::Closed) => true,
        Ok(Event::Domain { .. } | Event::Network { .. }) => false,
        Err(TryRecvError::Lagged(_) | TryRecvError::Closed) => true,
        Err(TryRecvError::Empty) => false,
    }
}

struct State {
    events: broadcast::Receiver<Event>,
    kept: Option<(Instant, Arc<Vec<PoolDir>>)>,
    /// Bumped whenever `kept` is dropped, so a read that started before cannot be kept.
    generation: u64,
}

impl State {
    /// Takes every pending event; drops the copy if one of them may change it.
    fn drain(&mut self) {
        loop {
            let ev = self.events.try_recv();
            let stop = matches!(ev, Err(TryRecvError::Empty | TryRecvError::Closed));
            if invalidates(&ev) {
                self.drop_copy();
            }
            if stop {
                return;
            }
        }
    }

    fn drop_copy(&mut self) {
        self.kept = None;
        self.generation += 1;
    }

    /// The copy, when there is one young enough at `now`.
    fn current(&mut self, now: Instant) -> Option<Arc<Vec<PoolDir>>> {
        self.drain();
        match &self.kept {
            Some((at, pools)) if now.saturating_duration_since(*at) < MAX_AGE => {
                Some(pools.clone())
            }
            _ => None,
        }
    }

    /// Keeps `pools`, read at `at` from generation `generation`, unless something may have
    /// changed since the read began.
    fn keep(&mut self, generation: u64, at: Instant, pools: Arc<Vec<PoolDir>>) {
        self.drain();
        if self.generation == generation {
            self.kept = Some((at, pools));
        }
    }
}

/// The kept copy of the pools (see the module's documentation).
pub struct PoolIndex {
    state: Mutex<State>,
}

impl PoolIndex {
    /// An empty index fed by `events` (from [`super::Libvirt::subscribe`]).
    pub fn new(events: broadcast::Receiver<Event>) -> Self {
        Self {
            state: Mutex::new(State {
                events,
                kept: None,
                generation: 0,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere while holding it; the copy is still sound
        // (at worst dropped).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pools: the kept copy when it is current, else a fresh read (kept for the next
    /// caller). `Ok((pools, true))` when they came from the copy.
    pub async fn get<S: Storage>(
        &self,
        virt: &S,
    ) -> Result<(Arc<Vec<PoolDir>>, bool), LibvirtError> {
        let kept = self.state().current(Instant::now());
        if let Some(pools) = kept {
            return Ok((pools, true));
        }
        Ok((self.fresh(virt).await?, false))
    }

    /// The pools as libvirt has them now; kept for the next caller.
    pub async fn fresh<S: Storage>(&self, virt: &S) -> Result<Arc<Vec<PoolDir>>, LibvirtError> {
        let (generation, at) = {
            let mut state = self.state();
            state.drain();
            (state.generation, Instant::now())
        };
        let pools: Arc<Vec<PoolDir>> = Arc::new(
            virt.storage_pools()
                .await?
                .into_iter()
                .map(|p| PoolDir {
                    name: p.name,
                    active: p.active,
                    path: p.path,
                })
                .collect(),
        );
        self.state().keep(generation, at, pools.clone());
        Ok(pools)
    }

    /// Drops the copy (after a libvirt call failed: the next caller reads afresh).
    pub fn forget(&self) {
        self.state().drop_copy();
    }
}

#[cfg(test)]
#[path = "pool_index_tests.rs"]
mod tests;
