//! Detaches from a shut-off domain gathered into one definition write (group commit). An object
//! being deleted enqueues its device's alias before it waits for its domain's lock; whoever holds
//! the lock next removes every device waiting for that domain at once. The others then find their
//! device gone and finish at once. Deleting a thousand disks of a hundred shut-off domains makes
//! about a hundred definition writes instead of a thousand.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::libvirt::Libvirt;

/// Aliases waiting to leave a domain's definition, by domain.
#[derive(Default)]
pub struct DefinitionBatches(Mutex<HashMap<String, Vec<String>>>);

impl DefinitionBatches {
    /// Queues the removal of `alias` from `vm`'s definition; call before taking `vm`'s lock.
    pub fn enqueue(&self, vm: &str, alias: &str) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let queued = map.entry(vm.to_string()).or_default();
        if !queued.iter().any(|a| a == alias) {
            queued.push(alias.to_string());
        }
    }

    /// Takes every alias queued for `vm`.
    fn take(&self, vm: &str) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(vm)
            .unwrap_or_default()
    }

    /// Under `vm`'s lock: removes the queued devices from `vm`'s definition in one write when
    /// `vm` is shut off. Whatever this does not do (a running domain, a failure) is left to each
    /// object's own detach, which reports its errors.
    pub async fn flush(&self, libvirt: &Libvirt, vm: &str) {
        let aliases = self.take(vm);
        if aliases.is_empty() {
            return;
        }
        let queued = aliases.len();
        match libvirt.detach_from_shut_off(vm, aliases).await {
            Ok(removed) => {
                tracing::debug!(
                    domain = vm,
                    queued,
                    removed = removed.len(),
                    "batched detach"
                );
            }
            Err(err) => {
                tracing::debug!(domain = vm, error = %err, "batched detach failed; detaching one by one");
            }
        }
    }
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
}
