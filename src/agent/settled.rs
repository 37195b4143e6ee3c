//! Domain events that cannot change a settled object's outcome do not wake it.
//!
//! Every definition write makes libvirt emit an event for the domain, and an event wakes every
//! object of that domain: ten disks attached one by one to a shut-off domain each re-ran the
//! pipeline of the domain's nine others, about ten reconciles (and domain reads) per object, all
//! of them queued behind the domain's lock.
//!
//! A reconcile that ends Ready records what its outcome was judged on: the object's generation
//! and a fingerprint of its own part of the domain (its device, the domain's state; see
//! [`AgentKind::fingerprint`]). An event then reads the domain once for all its objects, and
//! wakes only those whose part differs from the record, or that have none (not Ready, a new
//! generation, being deleted). A change made outside virtplane to an object's device (removed,
//! edited, the domain started or undefined) changes its fingerprint and wakes it as before.
//!
//! [`AgentKind::fingerprint`]: super::wiring::AgentKind::fingerprint

use std::collections::HashMap;
use std::sync::Mutex;

/// What a settled reconcile saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    generation: Option<i64>,
    fingerprint: u64,
}

/// The last settled reconcile of each object, by its device's alias.
#[derive(Default)]
pub struct Settled(Mutex<HashMap<String, Seen>>);

impl Settled {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Seen>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that the object with `key` was judged Ready for `generation` on a domain where
    /// its part had `fingerprint`.
    pub fn record(&self, key: &str, generation: Option<i64>, fingerprint: u64) {
        self.map().insert(
            key.to_string(),
            Seen {
                generation,
                fingerprint,
            },
        );
    }

    /// Forgets the object with `key` (its reconcile did not end Ready, or it is gone): every
    /// event of its domain wakes it again.
    pub fn forget(&self, key: &str) {
        self.map().remove(key);
    }

    /// Whether the object with `key` has a record for `generation` (a domain read can then
    /// spare it a reconcile).
    pub fn has(&self, key: &str, generation: Option<i64>) -> bool {
        self.map()
            .get(key)
            .is_some_and(|s| s.generation == generation)
    }

    /// Whether the object with `key`, at `generation`, was last judged Ready on a domain where
    /// its part had `fingerprint`: nothing it depends on changed, and it need not run.
    pub fn unchanged(&self, key: &str, generation: Option<i64>, fingerprint: u64) -> bool {
        self.map().get(key)
            == Some(&Seen {
                generation,
                fingerprint,
            })
    }
}

/// A fingerprint of `parts` (stable within one process, which is all a record lives for).
pub fn fingerprint<'a>(parts: impl IntoIterator<Item = Option<&'a str>>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for part in parts {
        part.hash(&mut h);
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_is_spared_only_for_the_same_generation_and_fingerprint() {
        let s = Settled::default();
        assert!(!s.has("a", Some(1)), "never recorded");
        assert!(!s.unchanged("a", Some(1), 7));
        s.record("a", Some(1), 7);
        assert!(s.has("a", Some(1)));
        assert!(s.unchanged("a", Some(1), 7));
        assert!(
            !s.unchanged("a", Some(1), 8),
            "its part of the domain changed"
        );
        assert!(!s.has("a", Some(2)), "a new generation");
        assert!(!s.unchanged("a", Some(2), 7));
        assert!(!s.unchanged("b", Some(1), 7), "another object");
        s.forget("a");
        assert!(!s.has("a", Some(1)));
        assert!(!s.unchanged("a", Some(1), 7), "forgotten");
    }

    #[test]
    fn a_fingerprint_tells_parts_and_their_absence_apart() {
        let f = |p: &[Option<&str>]| fingerprint(p.iter().copied());
        assert_eq!(f(&[Some("a"), None]), f(&[Some("a"), None]));
        assert_ne!(f(&[Some("a"), None]), f(&[None, Some("a")]));
        assert_ne!(f(&[Some("a"), None]), f(&[Some("a"), Some("")]));
        assert_ne!(f(&[Some("ab"), Some("c")]), f(&[Some("a"), Some("bc")]));
    }
}
