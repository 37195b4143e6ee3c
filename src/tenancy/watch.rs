//! A shared view of what every namespace is granted, fed by a metadata-only watch of the
//! Namespace objects (linkerd policy-controller's `index` pattern): a reconcile asks the view,
//! never the API server. Changes to a namespace's grant annotations are published, so that the
//! objects waiting in that namespace are reconciled again without a restart.
//!
//! In `open` mode nothing is watched: every namespace is granted everything.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;

use futures::{FutureExt as _, Stream, StreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::broadcast;

use super::{DOMAINS, Grants, Mode, NETWORKS, POOLS};
use crate::http::Gate;
use crate::shutdown::{self, Shutdown};

/// A Namespace as the view keeps it: its metadata, without managed fields.
type NamespaceMeta = PartialObjectMeta<Namespace>;

/// How many grant changes a slow subscriber may fall behind before it misses some (it then
/// relies on its periodic requeue).
const CHANGE_BUFFER: usize = 1024;

/// What every namespace is granted; cheap to clone, shared by the reconcilers.
#[derive(Clone)]
pub struct NamespaceGrants {
    mode: Mode,
    /// The Namespaces' metadata; `None` in open mode.
    store: Option<Store<NamespaceMeta>>,
    changes: broadcast::Sender<String>,
}

/// Feeds a [`NamespaceGrants`]: run it with [`GrantsFeed::run`].
pub struct GrantsFeed {
    writer: Option<reflector::store::Writer<NamespaceMeta>>,
    changes: broadcast::Sender<String>,
}

impl NamespaceGrants {
    /// A view for `mode` and the feed that keeps it current.
    pub fn new(mode: Mode) -> (Self, GrantsFeed) {
        let (changes, _) = broadcast::channel(CHANGE_BUFFER);
        let (store, writer) = match mode {
            Mode::Namespaced => {
                let (store, writer) = reflector::store();
                (Some(store), Some(writer))
            }
            Mode::Open => (None, None),
        };
        (
            Self {
                mode,
                store,
                changes: changes.clone(),
            },
            GrantsFeed { writer, changes },
        )
    }

    /// The mode this view answers for.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// What `namespace` is granted: everything in open mode; in namespaced mode what its
    /// annotations grant, and nothing for a namespace the view does not know (yet). Call
    /// [`NamespaceGrants::ready`] first where an early "nothing" would be wrong.
    pub fn grants(&self, namespace: &str) -> Grants {
        let Some(store) = &self.store else {
            return Grants::open();
        };
        let annotations = store
            .get(&ObjectRef::new(namespace))
            .map(|ns| ns.annotations().clone())
            .unwrap_or_default();
        Grants::of(self.mode, namespace, &annotations)
    }

    /// Whether the first full list of Namespaces is in (always, in open mode).
    pub fn is_ready(&self) -> bool {
        self.store
            .as_ref()
            .is_none_or(|s| s.wait_until_ready().now_or_never().is_some())
    }

    /// Waits until the first full list of Namespaces is in (at once in open mode). Returns
    /// early, with an empty view, only if the feed was dropped.
    pub async fn ready(&self) {
        if let Some(store) = &self.store
            && store.wait_until_ready().await.is_err()
        {
            tracing::warn!("the Namespace feed of the grants view stopped before its first sync");
        }
    }

    /// The names of the namespaces whose grant annotations changed (or that were created or
    /// deleted) from now on. Never yields in open mode. A subscriber that falls more than
    /// `CHANGE_BUFFER` changes behind misses some, and says so in the log.
    pub fn changes(&self) -> impl Stream<Item = String> + Send + 'static {
        let rx = self.changes.subscribe();
        futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(ns) => return Some((ns, rx)),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "fell behind the Namespace grant changes");
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
    }
}

impl GrantsFeed {
    /// Watches the Namespaces (metadata only) until `stop` fires, keeping the view current and
    /// publishing grant changes; opens `synced` after the first full list (at once in open mode).
    pub fn run(
        self,
        client: Client,
        synced: Gate,
        stop: Shutdown,
    ) -> impl Future<Output = ()> + Send + 'static {
        let GrantsFeed { writer, changes } = self;
        async move {
            let Some(mut writer) = writer else {
                synced.open();
                // Open mode: nothing to watch. Keep the sender alive until shutdown, so the
                // subscribers' streams do not end early.
                shutdown::wait(stop).await;
                drop(changes);
                return;
            };
            let api: Api<NamespaceMeta> = Api::all(client);
            let events = watcher(api, watcher::Config::default())
                .default_backoff()
                .modify(|ns| ns.managed_fields_mut().clear())
                .take_until(shutdown::wait(stop));
            futures::pin_mut!(events);
            let mut tracker = Tracker::default();
            let mut synced = Some(synced);
            while let Some(event) = events.next().await {
                match event {
                    Ok(event) => {
                        writer.apply_watcher_event(&event);
                        for ns in tracker.handle(&event) {
                            tracing::info!(namespace = %ns, "grants changed");
                            // No subscriber is not an error.
                            let _ = changes.send(ns);
                        }
                        if matches!(event, watcher::Event::InitDone)
                            && let Some(gate) = synced.take()
                        {
                            gate.open();
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "watch of Namespaces for the grants view failed")
                    }
                }
            }
        }
    }
}

/// The grant annotations of one namespace.
type Granted = [Option<String>; 3];

fn granted(annotations: &BTreeMap<String, String>) -> Granted {
    [DOMAINS, POOLS, NETWORKS].map(|k| annotations.get(k).cloned())
}

/// Which namespaces' grants a watch event changed. The first full list changes nothing: the
/// reconcilers start after it and see every object anyway.
#[derive(Default)]
struct Tracker {
    known: HashMap<String, Granted>,
    /// Namespaces listed since the last `Init`.
    relisted: Option<HashSet<String>>,
    /// Whether the first full list is in.
    synced: bool,
}

impl Tracker {
    fn set(&mut self, ns: &NamespaceMeta) -> Option<String> {
        let name = ns.name_any();
        let now = granted(ns.annotations());
        (self.known.insert(name.clone(), now.clone()) != Some(now)).then_some(name)
    }

    fn handle(&mut self, event: &watcher::Event<NamespaceMeta>) -> Vec<String> {
        match event {
            watcher::Event::Apply(ns) => self.set(ns).into_iter().collect(),
            watcher::Event::Delete(ns) => {
                let name = ns.name_any();
                self.known.remove(&name).map(|_| name).into_iter().collect()
            }
            watcher::Event::Init => {
                self.relisted = Some(HashSet::new());
                Vec::new()
            }
            watcher::Event::InitApply(ns) => {
                if let Some(seen) = self.relisted.as_mut() {
                    seen.insert(ns.name_any());
                }
                let changed = self.set(ns);
                changed.filter(|_| self.synced).into_iter().collect()
            }
            watcher::Event::InitDone => {
                let Some(seen) = self.relisted.take() else {
                    return Vec::new();
                };
                if !std::mem::replace(&mut self.synced, true) {
                    return Vec::new();
                }
                let gone: Vec<String> = self
                    .known
                    .keys()
                    .filter(|n| !seen.contains(*n))
                    .cloned()
                    .collect();
                for n in &gone {
                    self.known.remove(n);
                }
                gone
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;
    use kube::core::PartialObjectMetaExt;

    fn ns(name: &str, pairs: &[(&str, &str)]) -> NamespaceMeta {
        ObjectMeta {
            name: Some(name.into()),
            annotations: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        }
        .into_response_partial()
    }

    /// A tracker past its first full list.
    fn synced() -> Tracker {
        let mut t = Tracker::default();
        for e in [
            watcher::Event::Init,
            watcher::Event::InitApply(ns("before", &[(DOMAINS, "x")])),
        ] {
            assert!(t.handle(&e).is_empty(), "the first list changes nothing");
        }
        assert!(t.handle(&watcher::Event::InitDone).is_empty());
        t
    }

    #[test]
    fn only_grant_annotations_count_as_changes() {
        let mut t = synced();
        assert_eq!(
            t.handle(&watcher::Event::Apply(ns("ta", &[]))),
            vec!["ta".to_string()],
            "a new namespace is a change"
        );
        assert!(
            t.handle(&watcher::Event::Apply(ns("ta", &[("owner", "x")])))
                .is_empty(),
            "other annotations are not"
        );
        assert_eq!(
            t.handle(&watcher::Event::Apply(ns("ta", &[(DOMAINS, "a-*")]))),
            vec!["ta".to_string()]
        );
        assert!(
            t.handle(&watcher::Event::Apply(ns("ta", &[(DOMAINS, "a-*")])))
                .is_empty()
        );
        assert_eq!(
            t.handle(&watcher::Event::Apply(ns("ta", &[]))),
            vec!["ta".to_string()],
            "a revoke is a change"
        );
        assert_eq!(
            t.handle(&watcher::Event::Delete(ns("ta", &[]))),
            vec!["ta".to_string()]
        );
    }

    #[test]
    fn a_relist_reports_what_changed_while_the_watch_was_down() {
        let mut t = synced();
        t.handle(&watcher::Event::Apply(ns("same", &[(POOLS, "p")])));
        t.handle(&watcher::Event::Apply(ns("edited", &[(POOLS, "p")])));
        t.handle(&watcher::Event::Apply(ns("deleted", &[])));
        let mut changed = Vec::new();
        for e in [
            watcher::Event::Init,
            watcher::Event::InitApply(ns("same", &[(POOLS, "p")])),
            watcher::Event::InitApply(ns("edited", &[(POOLS, "q")])),
            watcher::Event::InitApply(ns("new", &[])),
            watcher::Event::InitDone,
        ] {
            changed.extend(t.handle(&e));
        }
        changed.sort();
        assert_eq!(changed, ["before", "deleted", "edited", "new"]);
    }

    #[tokio::test]
    async fn the_view_answers_from_the_store() {
        let (view, feed) = NamespaceGrants::new(Mode::Namespaced);
        let mut writer = feed.writer.expect("namespaced mode has a store");
        assert!(!view.is_ready());
        assert!(!view.grants("ta").domain("a-1"), "unknown: nothing");
        for e in [
            watcher::Event::Init,
            watcher::Event::InitApply(ns("ta", &[(DOMAINS, "a-*")])),
            watcher::Event::InitDone,
        ] {
            writer.apply_watcher_event(&e);
        }
        view.ready().await;
        assert!(view.is_ready());
        assert!(view.grants("ta").domain("a-1"));
        assert!(!view.grants("ta").domain("b-1"));
        assert!(
            !view.grants("tb").domain("a-1"),
            "unknown namespace: nothing"
        );

        let (open, _) = NamespaceGrants::new(Mode::Open);
        assert!(open.is_ready() && open.grants("any").domain("b-1"));
    }
}
