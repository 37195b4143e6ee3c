//! Detaches from a shut-off domain gathered into one definition write (group commit). An object
//! being deleted enqueues its device's alias, then waits either for its domain's lock or for news
//! that a batch took its device away, whichever comes first. Whoever holds the lock next removes
//! every device waiting for that domain at once and wakes their objects, which finish (Event,
//! finalizer) without taking the lock at all. Deleting a thousand disks of a hundred shut-off
//! domains makes about a hundred definition writes instead of a thousand, and no object waits for
//! the lock behind another one's API calls.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, OwnedMutexGuard};

use crate::libvirt::Libvirt;

/// What waits for one domain's definition.
#[derive(Default)]
struct Pending {
    /// Aliases queued for the next batch.
    queued: Vec<String>,
    /// Aliases a batch removed (the domain shut off), not yet picked up by their objects.
    removed: HashSet<String>,
    /// Wakes the objects waiting for a batch of this domain.
    done: Arc<Notify>,
}

/// Aliases waiting to leave a domain's definition, by domain.
#[derive(Default)]
pub struct DefinitionBatches(Mutex<HashMap<String, Pending>>);

/// How an object being deleted got past its domain.
pub enum Turn {
    /// A batch removed its device from the shut-off domain: nothing is left to do there.
    Removed,
    /// It holds the domain's lock (and its device may still be there).
    Locked(OwnedMutexGuard<()>),
}

impl DefinitionBatches {
    fn with<T>(&self, vm: &str, f: impl FnOnce(&mut Pending) -> T) -> T {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(map.entry(vm.to_string()).or_default())
    }

    /// Queues the removal of `alias` from `vm`'s definition; call before taking `vm`'s lock.
    pub fn enqueue(&self, vm: &str, alias: &str) {
        self.with(vm, |p| {
            if !p.queued.iter().any(|a| a == alias) {
                p.queued.push(alias.to_string());
            }
        });
    }

    /// Takes every alias queued for `vm`.
    fn take(&self, vm: &str) -> Vec<String> {
        self.with(vm, |p| std::mem::take(&mut p.queued))
    }

    /// Whether a batch removed `alias` from `vm` (said once).
    fn take_removed(&self, vm: &str, alias: &str) -> bool {
        self.with(vm, |p| p.removed.remove(alias))
    }

    /// Under `vm`'s lock, before an apply pass that may put `alias`'s device back (one that
    /// started before its object's deletion was seen): a batch's earlier removal no longer holds.
    pub fn forget_removed(&self, vm: &str, alias: &str) {
        self.with(vm, |p| p.removed.remove(alias));
    }

    /// Records what a batch removed from `vm` and wakes the objects waiting for it.
    fn record_removed(&self, vm: &str, removed: Vec<String>) {
        let done = self.with(vm, |p| {
            p.removed.extend(removed);
            p.done.clone()
        });
        done.notify_waiters();
    }

    /// Waits for `vm`'s lock (`lock`) or for a batch that removed `alias` (enqueued before),
    /// whichever comes first; under the lock, first writes the batch of `vm` (taking `alias`'s
    /// device with it, if `vm` is shut off). The wait for the lock costs no more than one batch:
    /// whoever holds it next writes every queued alias and wakes their objects.
    pub async fn turn(
        &self,
        libvirt: &Libvirt,
        lock: Arc<tokio::sync::Mutex<()>>,
        vm: &str,
        alias: &str,
    ) -> Turn {
        let done = self.with(vm, |p| p.done.clone());
        let locked = lock.lock_owned();
        tokio::pin!(locked);
        let guard = loop {
            let notified = done.notified();
            tokio::pin!(notified);
            // Registered before looking, so a batch written in between still wakes this one.
            notified.as_mut().enable();
            if self.take_removed(vm, alias) {
                return Turn::Removed;
            }
            tokio::select! {
                // A batch that took this device away usually ends just before its writer lets
                // the lock go: looked at first, that news saves taking the lock to flush an
                // empty queue (one in five deletions did, picked at random).
                biased;
                () = &mut notified => {}
                guard = &mut locked => break guard,
            }
        };
        self.flush(libvirt, vm).await;
        if self.take_removed(vm, alias) {
            return Turn::Removed;
        }
        Turn::Locked(guard)
    }

    /// Under `vm`'s lock: removes the queued devices from `vm`'s definition in one write when
    /// `vm` is shut off. Whatever this does not do (a running domain, a failure) is left to each
    /// object's own detach, which reports its errors.
    async fn flush(&self, libvirt: &Libvirt, vm: &str) {
        let aliases = self.take(vm);
        if aliases.is_empty() {
            flushed("empty");
            return;
        }
        let queued = aliases.len();
        match libvirt.detach_from_shut_off(vm, aliases).await {
            Ok(removed) => {
                flushed("written");
                tracing::debug!(
                    domain = vm,
                    queued,
                    removed = removed.len(),
                    "batched detach"
                );
                self.record_removed(vm, removed);
            }
            Err(err) => {
                flushed("failed");
                tracing::debug!(domain = vm, error = %err, "batched detach failed; detaching one by one");
            }
        }
    }
}

/// Counts a flush by what it found (`virtplane_batch_flushes_total`).
fn flushed(result: &str) {
    crate::metrics::get()
        .batch_flushes
        .get_or_create(&crate::metrics::CallLabels {
            action: result.to_string(),
        })
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_taken_once_per_domain_without_duplicates() {
        let b = DefinitionBatches::default();
        b.enqueue("vm1", "ua-a");
        b.enqueue("vm1", "ua-b");
        b.enqueue("vm1", "ua-a");
        b.enqueue("vm2", "ua-c");
        assert_eq!(b.take("vm1"), vec!["ua-a".to_string(), "ua-b".to_string()]);
        assert!(b.take("vm1").is_empty(), "taken once");
        assert_eq!(b.take("vm2"), vec!["ua-c".to_string()]);
    }

    #[test]
    fn what_a_batch_removed_is_said_once_to_its_object_only() {
        let b = DefinitionBatches::default();
        b.record_removed("vm1", vec!["ua-a".into()]);
        assert!(!b.take_removed("vm2", "ua-a"), "another domain");
        assert!(!b.take_removed("vm1", "ua-b"), "another device");
        assert!(b.take_removed("vm1", "ua-a"));
        assert!(!b.take_removed("vm1", "ua-a"), "said once");
        b.record_removed("vm1", vec!["ua-a".into()]);
        b.forget_removed("vm1", "ua-a");
        assert!(
            !b.take_removed("vm1", "ua-a"),
            "an apply pass since may have put it back"
        );
    }

    #[tokio::test]
    async fn a_waiter_is_woken_by_a_batch_while_the_lock_stays_held() {
        let b = Arc::new(DefinitionBatches::default());
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        let held = lock.clone().lock_owned().await;
        b.enqueue("vm1", "ua-a");
        let waiter = {
            let (b, lock) = (b.clone(), lock.clone());
            tokio::spawn(async move {
                // Never connected: a flush would fail, but the waiter never gets the lock.
                let libvirt = Libvirt::new("test:///default").unwrap();
                matches!(b.turn(&libvirt, lock, "vm1", "ua-a").await, Turn::Removed)
            })
        };
        tokio::task::yield_now().await;
        assert_eq!(b.take("vm1"), vec!["ua-a".to_string()]);
        b.record_removed("vm1", vec!["ua-a".into()]);
        assert!(waiter.await.unwrap(), "woken by the batch, not the lock");
        drop(held);
    }
}
