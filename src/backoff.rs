//! Per-object exponential back-off for failed reconciles.
//!
//! kube's `Controller` calls the error policy with the object that failed; the policy asks
//! [`Backoff::failed`] how long to wait, which doubles with every consecutive failure of the same
//! object (1 s, 2 s, 4 s ... capped). A reconcile that succeeds calls [`Backoff::succeeded`] and
//! the next failure starts again from the base delay. Objects that fail never hammer the
//! apiserver or libvirt, and one failing object does not slow the others down.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use kube::{Resource, ResourceExt};

/// Consecutive-failure counts, keyed by kind, namespace and name.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: Mutex<HashMap<String, u32>>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(300))
    }
}

impl Backoff {
    /// Delays start at `base` and double up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            failures: Mutex::default(),
        }
    }

    /// Records a failure of `obj` and returns how long to wait before the next attempt.
    pub fn failed<K: Resource<DynamicType = ()>>(&self, obj: &K) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(key(obj)).or_insert(0);
        let delay = delay(self.base, self.max, *n);
        *n = n.saturating_add(1);
        delay
    }

    /// Forgets the failures of `obj`.
    pub fn succeeded<K: Resource<DynamicType = ()>>(&self, obj: &K) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.remove(&key(obj));
    }
}

fn key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
}

/// `base * 2^failures`, capped at `max`.
fn delay(base: Duration, max: Duration, failures: u32) -> Duration {
    base.checked_mul(1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX))
        .map_or(max, |d| d.min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps() {
        let s = Duration::from_secs;
        let got: Vec<_> = (0..12).map(|n| delay(s(1), s(300), n)).collect();
        assert_eq!(
            got,
            [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300].map(s)
        );
        assert_eq!(delay(s(1), s(300), u32::MAX), s(300));
    }

    #[test]
    fn success_resets_and_objects_are_independent() {
        use k8s_openapi::api::core::v1::ConfigMap;
        let b = Backoff::default();
        let mut a = ConfigMap::default();
        a.metadata.name = Some("a".into());
        a.metadata.namespace = Some("ns".into());
        let mut other = a.clone();
        other.metadata.name = Some("b".into());
        assert_eq!(b.failed(&a), Duration::from_secs(1));
        assert_eq!(b.failed(&a), Duration::from_secs(2));
        assert_eq!(b.failed(&other), Duration::from_secs(1));
        b.succeeded(&a);
        assert_eq!(b.failed(&a), Duration::from_secs(1));
    }
}
