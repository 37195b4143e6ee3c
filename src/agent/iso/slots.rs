//! The node's download slots, shared fairly between namespaces: a freed slot goes to the
//! waiting download whose namespace holds the fewest slots (the longest-waiting one among
//! equals), so one namespace's queue of downloads cannot keep another's waiting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

struct Waiter {
    namespace: String,
    tx: oneshot::Sender<Slot>,
}

#[derive(Default)]
struct State {
    free: usize,
    held: HashMap<String, usize>,
    waiting: Vec<Waiter>,
}

/// The slots.
pub struct Slots {
    state: Mutex<State>,
}

/// A held slot, given back when dropped.
pub struct Slot {
    slots: Arc<Slots>,
    namespace: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let undelivered = {
            let mut st = self.slots.lock();
            if let Some(n) = st.held.get_mut(&self.namespace) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    st.held.remove(&self.namespace);
                }
            }
            st.free += 1;
            Slots::dispatch(&self.slots, &mut st)
        };
        // Slots whose waiter left: dropped outside the lock (each gives itself back).
        drop(undelivered);
    }
}

impl Slots {
    /// `limit` slots (at least one).
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                free: limit.max(1),
                ..State::default()
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn grant(this: &Arc<Self>, st: &mut State, namespace: &str) -> Slot {
        st.free -= 1;
        *st.held.entry(namespace.to_string()).or_default() += 1;
        Slot {
            slots: Arc::clone(this),
            namespace: namespace.to_string(),
        }
    }

    /// Hands free slots to waiters, the fewest-holding namespace first; returns the slots
    /// whose waiter is gone.
    fn dispatch(this: &Arc<Self>, st: &mut State) -> Vec<Slot> {
        let mut undelivered = Vec::new();
        while st.free > 0 && !st.waiting.is_empty() {
            let next = (0..st.waiting.len())
                .min_by_key(|i| {
                    let ns = &st.waiting[*i].namespace;
                    (st.held.get(ns).copied().unwrap_or(0), *i)
                })
                .unwrap_or(0);
            let waiter = st.waiting.remove(next);
            let slot = Self::grant(this, st, &waiter.namespace);
            if let Err(slot) = waiter.tx.send(slot) {
                undelivered.push(slot);
            }
        }
        undelivered
    }

    /// A slot at once, when one is free and nobody waits.
    pub fn try_acquire(this: &Arc<Self>, namespace: &str) -> Option<Slot> {
        let mut st = this.lock();
        (st.free > 0 && st.waiting.is_empty()).then(|| Self::grant(this, &mut st, namespace))
    }

    /// Waits for a slot (cancel-safe: a dropped wait gives a slot it was handed back).
    pub async fn acquire(this: &Arc<Self>, namespace: &str) -> Option<Slot> {
        let rx = {
            let mut st = this.lock();
            if st.free > 0 && st.waiting.is_empty() {
                return Some(Self::grant(this, &mut st, namespace));
            }
            let (tx, rx) = oneshot::channel();
            st.waiting.push(Waiter {
                namespace: namespace.to_string(),
                tx,
            });
            rx
        };
        rx.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_namespace_holding_fewest() {
        let slots = Slots::new(2);
        let a1 = Slots::try_acquire(&slots, "a").unwrap();
        let a2 = Slots::try_acquire(&slots, "a").unwrap();
        assert!(Slots::try_acquire(&slots, "b").is_none());
        // Namespace a queues three more, then b one.
        let mut waits = Vec::new();
        for ns in ["a", "a", "a", "b"] {
            let s = slots.clone();
            waits.push((
                ns,
                tokio::spawn(async move { Slots::acquire(&s, ns).await }),
            ));
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        drop(a1);
        // b (holding none) goes before a's earlier waiters.
        let (_, b) = waits.pop().unwrap();
        let b = b.await.unwrap().unwrap();
        assert_eq!(b.namespace, "b");
        drop(a2);
        let (_, first_a) = waits.remove(0);
        let first_a = first_a.await.unwrap().unwrap();
        assert_eq!(first_a.namespace, "a");
        // A waiter that left does not swallow a slot.
        let (_, gone) = waits.remove(0);
        gone.abort();
        let _ = gone.await;
        drop(b);
        let (_, last) = waits.remove(0);
        assert!(last.await.unwrap().is_some());
    }
}
