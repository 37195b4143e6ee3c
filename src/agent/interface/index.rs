//! Which VMInterfaces claim which MAC, cluster-wide, fed by a watch (linkerd policy-controller's
//! `index` pattern): a reconcile asks the index instead of listing every VMInterface.
//!
//! An object claims the MAC recorded in its status (it was attached with it); until it records
//! one, the valid MAC its spec requests, but only once it is bound to a node: an object that
//! never binds (its domain exists nowhere) cannot squat a MAC. Between two claims the rules of
//! [`Claim::beats`] decide.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::watch;

use super::mac::valid_mac;
use crate::api::{NODE_LABEL, VMInterface};
use crate::shutdown::{self, Shutdown};

/// What one object claims.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    created: Option<Time>,
    /// `status.mac`.
    recorded: Option<String>,
    /// A valid `spec.mac`, when the object is bound (has the node label).
    requested: Option<String>,
}

impl Entry {
    fn of(obj: &VMInterface) -> Self {
        Self {
            created: obj.creation_timestamp(),
            recorded: obj.status.as_ref().and_then(|s| s.mac.clone()),
            requested: obj
                .labels()
                .contains_key(NODE_LABEL)
                .then(|| obj.spec.mac.as_deref().and_then(|m| valid_mac(m).ok()))
                .flatten(),
        }
    }

    /// Every MAC the object names (both count as taken when allocating).
    fn macs(&self) -> impl Iterator<Item = &String> {
        self.recorded.iter().chain(self.requested.iter())
    }
}

/// One object's claim on a MAC, and since when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The claiming object's UID.
    pub uid: String,
    /// Its creation time.
    pub created: Option<Time>,
    /// Whether the MAC is recorded in its status (else only requested in its spec).
    pub recorded: bool,
}

impl Claim {
    /// Whether this claim holds the MAC ahead of the object `uid`, created at `created`, whose
    /// own claim is `recorded` or only requested. A recorded claim beats a request; of two claims
    /// of the same kind the older object wins, so a newer object never takes a MAC from an
    /// attached NIC.
    pub fn beats(&self, uid: &str, created: Option<&Time>, recorded: bool) -> bool {
        if self.uid == uid {
            return false;
        }
        let older = (self.created.as_ref(), self.uid.as_str()) < (created, uid);
        match (self.recorded, recorded) {
            (true, false) => true,
            (false, true) => false,
            _ => older,
        }
    }
}

#[derive(Default)]
struct Inner {
    by_uid: HashMap<String, Entry>,
    /// Objects listed since the last `Init`, swapped in at `InitDone`.
    relist: Option<HashMap<String, Entry>>,
}

/// The index; cheap to clone.
#[derive(Clone)]
pub struct MacIndex {
    inner: Arc<RwLock<Inner>>,
    synced: Arc<watch::Sender<bool>>,
}

impl Default for MacIndex {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
            synced: Arc::new(watch::channel(false).0),
        }
    }
}

impl MacIndex {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one event of the watch.
    pub fn handle(&self, event: watcher::Event<VMInterface>) {
        let mut inner = self.write();
        match event {
            watcher::Event::Apply(obj) => {
                if let Some(uid) = obj.uid() {
                    inner.by_uid.insert(uid, Entry::of(&obj));
                }
            }
            watcher::Event::Delete(obj) => {
                if let Some(uid) = obj.uid() {
                    inner.by_uid.remove(&uid);
                }
            }
            watcher::Event::Init => inner.relist = Some(HashMap::new()),
            watcher::Event::InitApply(obj) => {
                if let (Some(uid), Some(relist)) = (obj.uid(), inner.relist.as_mut()) {
                    relist.insert(uid, Entry::of(&obj));
                }
            }
            watcher::Event::InitDone => {
                if let Some(relist) = inner.relist.take() {
                    inner.by_uid = relist;
                }
                drop(inner);
                self.synced.send_replace(true);
            }
        }
    }

    /// Whether the first full list was taken in.
    #[cfg(test)]
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits up to `limit` for the first full list; whether it arrived.
    pub async fn synced(&self, limit: Duration) -> bool {
        let mut rx = self.synced.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The claims of every object but `except` on `mac`.
    pub fn claims(&self, mac: &str, except: &str) -> Vec<Claim> {
        let mut out: Vec<Claim> = self
            .read()
            .by_uid
            .iter()
            .filter(|(uid, _)| uid.as_str() != except)
            .filter_map(|(uid, e)| {
                let recorded = e.recorded.as_deref() == Some(mac);
                // A request counts only until its object records a MAC.
                let requested = e.recorded.is_none() && e.requested.as_deref() == Some(mac);
                (recorded || requested).then(|| Claim {
                    uid: uid.clone(),
                    created: e.created.clone(),
                    recorded,
                })
            })
            .collect();
        out.sort_by(|a, b| a.uid.cmp(&b.uid));
        out
    }

    /// Every MAC some object other than `except` records or requests, sorted.
    pub fn macs(&self, except: &str) -> Vec<String> {
        self.read()
            .by_uid
            .iter()
            .filter(|(uid, _)| uid.as_str() != except)
            .flat_map(|(_, e)| e.macs().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }
}

/// Feeds `index` from a cluster-wide watch of VMInterfaces until `shutdown` fires.
pub fn watch(
    client: Client,
    index: MacIndex,
    stop: Shutdown,
) -> impl Future<Output = ()> + Send + 'static {
    let events = watcher(Api::<VMInterface>::all(client), watcher::Config::default())
        .default_backoff()
        .take_until(shutdown::wait(stop));
    async move {
        futures::pin_mut!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => index.handle(event),
                Err(err) => {
                    tracing::warn!(error = %err, "watch of VMInterfaces for the MAC index failed")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::VMInterfaceStatus;

    const M: &str = "52:54:00:00:00:01";

    fn nic(uid: &str, created: i64, spec_mac: Option<&str>, recorded: Option<&str>) -> VMInterface {
        let mut o = VMInterface::new(
            uid,
            serde_json::from_value(serde_json::json!({"vm": "v", "type": "user", "mac": spec_mac}))
                .unwrap(),
        );
        o.metadata.uid = Some(uid.into());
        o.metadata.labels = Some([(NODE_LABEL.to_string(), "n1".to_string())].into());
        o.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(created).unwrap(),
        ));
        o.status = Some(VMInterfaceStatus {
            mac: recorded.map(Into::into),
            ..Default::default()
        });
        o
    }

    fn claim(o: &VMInterface, recorded: bool) -> Claim {
        Claim {
            uid: o.uid().unwrap(),
            created: o.creation_timestamp(),
            recorded,
        }
    }

    fn beats(a: &Claim, b: &VMInterface, recorded: bool) -> bool {
        a.beats(&b.uid().unwrap(), b.creation_timestamp().as_ref(), recorded)
    }

    #[test]
    fn a_newer_object_never_takes_a_recorded_mac() {
        let attached = nic("a", 1, None, Some(M));
        let newcomer = nic("b", 2, Some(M), None);
        // The newcomer is refused; the attached NIC keeps its MAC.
        assert!(beats(&claim(&attached, true), &newcomer, false));
        assert!(!beats(&claim(&newcomer, false), &attached, true));
        // Two recorded claims (a race): the older wins.
        let racer = nic("c", 3, None, Some(M));
        assert!(beats(&claim(&attached, true), &racer, true));
        assert!(!beats(&claim(&racer, true), &attached, true));
        // Two requests: the older wins.
        let first = nic("d", 4, Some(M), None);
        let second = nic("e", 5, Some(M), None);
        assert!(beats(&claim(&first, false), &second, false));
        assert!(!beats(&claim(&second, false), &first, false));
        // Itself never conflicts.
        assert!(!beats(&claim(&attached, true), &attached, true));
    }

    #[test]
    fn a_recorded_mac_beats_an_older_request() {
        let old_request = nic("a", 1, Some(M), None);
        let young_record = nic("b", 9, None, Some(M));
        assert!(!beats(&claim(&old_request, false), &young_record, true));
        assert!(beats(&claim(&young_record, true), &old_request, false));
    }

    #[test]
    fn same_second_claims_are_ordered_by_uid() {
        let a = nic("a", 1, Some(M), None);
        let b = nic("b", 1, Some(M), None);
        assert!(beats(&claim(&a, false), &b, false));
        assert!(!beats(&claim(&b, false), &a, false));
    }

    #[test]
    fn the_index_follows_the_watch() {
        let index = MacIndex::default();
        assert!(!index.is_synced());
        index.handle(watcher::Event::Init);
        index.handle(watcher::Event::InitApply(nic("a", 1, None, Some(M))));
        index.handle(watcher::Event::InitApply(nic(
            "b",
            2,
            Some("52:54:00:00:00:02"),
            None,
        )));
        assert!(!index.is_synced(), "not before the list is complete");
        index.handle(watcher::Event::InitDone);
        assert!(index.is_synced());
        assert_eq!(
            index.claims(M, "z"),
            [claim(&nic("a", 1, None, Some(M)), true)]
        );
        assert!(
            index.claims(M, "a").is_empty(),
            "an object never claims against itself"
        );
        assert_eq!(index.macs("z"), ["52:54:00:00:00:01", "52:54:00:00:00:02"]);
        // b records its MAC; a is deleted.
        index.handle(watcher::Event::Apply(nic(
            "b",
            2,
            Some("52:54:00:00:00:02"),
            Some("52:54:00:00:00:02"),
        )));
        index.handle(watcher::Event::Delete(nic("a", 1, None, Some(M))));
        assert!(index.claims(M, "z").is_empty());
        assert!(index.claims("52:54:00:00:00:02", "z")[0].recorded);
        assert_eq!(index.macs("b"), Vec::<String>::new());
    }

    #[test]
    fn a_request_stops_counting_once_a_mac_is_recorded() {
        let index = MacIndex::default();
        // spec.mac edited to another MAC after one was recorded (refused as immutable).
        index.handle(watcher::Event::Apply(nic(
            "a",
            1,
            Some("52:54:00:00:00:09"),
            Some(M),
        )));
        assert!(index.claims("52:54:00:00:00:09", "z").is_empty());
        // It still counts as taken when allocating.
        assert!(index.macs("z").contains(&"52:54:00:00:00:09".to_string()));
        // Invalid requests claim nothing.
        index.handle(watcher::Event::Apply(nic(
            "c",
            1,
            Some("01:00:5e:00:00:01"),
            None,
        )));
        assert!(index.claims("01:00:5e:00:00:01", "z").is_empty());
    }

    #[test]
    fn an_unbound_request_claims_nothing() {
        let index = MacIndex::default();
        // Never bound (its domain exists nowhere): its spec.mac blocks no one.
        let mut squatter = nic("s", 1, Some(M), None);
        squatter.metadata.labels = None;
        index.handle(watcher::Event::Apply(squatter.clone()));
        assert!(index.claims(M, "z").is_empty());
        assert!(index.macs("z").is_empty());
        // Once bound it claims like any request.
        index.handle(watcher::Event::Apply(nic("s", 1, Some(M), None)));
        assert_eq!(index.claims(M, "z"), [claim(&squatter, false)]);
        // An attached object's recorded MAC counts even without the label.
        let mut attached = nic("t", 2, None, Some("52:54:00:00:00:07"));
        attached.metadata.labels = None;
        index.handle(watcher::Event::Apply(attached));
        assert_eq!(index.claims("52:54:00:00:00:07", "z").len(), 1);
    }

    #[test]
    fn a_relist_drops_objects_deleted_while_the_watch_was_down() {
        let index = MacIndex::default();
        index.handle(watcher::Event::Apply(nic("a", 1, None, Some(M))));
        index.handle(watcher::Event::Init);
        // Until the relist is complete the old view answers.
        assert_eq!(index.claims(M, "z").len(), 1);
        index.handle(watcher::Event::InitDone);
        assert!(index.claims(M, "z").is_empty());
    }

    #[tokio::test]
    async fn waiting_for_the_first_list_is_bounded() {
        let index = MacIndex::default();
        assert!(!index.synced(Duration::from_millis(10)).await);
        index.handle(watcher::Event::Init);
        index.handle(watcher::Event::InitDone);
        assert!(index.synced(Duration::from_millis(10)).await);
    }
}
