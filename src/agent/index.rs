//! Cross-object questions answered from memory: which objects of a kind name a key (the domain
//! they act on, say). The index is fed by the kind's own watch, so no reconcile lists a kind.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use kube::Resource;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;

/// Objects of kind `K` by key; an object has any number of keys.
pub struct Index<K: Resource<DynamicType = ()>> {
    keys_of: fn(&K) -> Vec<String>,
    inner: RwLock<Inner<K>>,
}

struct Inner<K: Resource<DynamicType = ()>> {
    by_key: HashMap<String, HashSet<ObjectRef<K>>>,
    by_obj: HashMap<ObjectRef<K>, Vec<String>>,
    /// Objects seen during a relist, swapped in when it ends.
    relist: Option<Vec<(ObjectRef<K>, Vec<String>)>>,
}

impl<K: Resource<DynamicType = ()>> Default for Inner<K> {
    fn default() -> Self {
        Self {
            by_key: HashMap::new(),
            by_obj: HashMap::new(),
            relist: None,
        }
    }
}

impl<K: Resource<DynamicType = ()>> Inner<K> {
    fn remove(&mut self, obj: &ObjectRef<K>) {
        for key in self.by_obj.remove(obj).unwrap_or_default() {
            if let Some(set) = self.by_key.get_mut(&key) {
                set.remove(obj);
                if set.is_empty() {
                    self.by_key.remove(&key);
                }
            }
        }
    }

    fn insert(&mut self, obj: ObjectRef<K>, keys: Vec<String>) {
        self.remove(&obj);
        for key in &keys {
            self.by_key
                .entry(key.clone())
                .or_default()
                .insert(obj.clone());
        }
        self.by_obj.insert(obj, keys);
    }
}

impl<K: Resource<DynamicType = ()>> Index<K> {
    /// An empty index keyed by `keys_of`.
    pub fn new(keys_of: fn(&K) -> Vec<String>) -> Arc<Self> {
        Arc::new(Self {
            keys_of,
            inner: RwLock::new(Inner::default()),
        })
    }

    /// Takes in one event of the kind's watch.
    pub fn apply(&self, event: &watcher::Event<K>) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        match event {
            watcher::Event::Apply(obj) => {
                inner.insert(ObjectRef::from_obj(obj), (self.keys_of)(obj));
            }
            watcher::Event::Delete(obj) => inner.remove(&ObjectRef::from_obj(obj)),
            watcher::Event::Init => inner.relist = Some(Vec::new()),
            watcher::Event::InitApply(obj) => {
                let entry = (ObjectRef::from_obj(obj), (self.keys_of)(obj));
                inner.relist.get_or_insert_with(Vec::new).push(entry);
            }
            watcher::Event::InitDone => {
                let objects = inner.relist.take().unwrap_or_default();
                inner.by_key.clear();
                inner.by_obj.clear();
                for (obj, keys) in objects {
                    inner.insert(obj, keys);
                }
            }
        }
    }

    /// The objects with `key`.
    pub fn get(&self, key: &str) -> Vec<ObjectRef<K>> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        inner
            .by_key
            .get(key)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Every object.
    pub fn all(&self) -> Vec<ObjectRef<K>> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        inner.by_obj.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{VirtualMachineStorage, VirtualMachineStorageSpec};

    fn storage(name: &str, vm: &str) -> VirtualMachineStorage {
        let mut s = VirtualMachineStorage::new(
            name,
            serde_json::from_value::<VirtualMachineStorageSpec>(
                serde_json::json!({"vm": vm, "type": "disk"}),
            )
            .unwrap(),
        );
        s.metadata.namespace = Some("ns".into());
        s
    }

    fn index() -> Arc<Index<VirtualMachineStorage>> {
        Index::new(|s: &VirtualMachineStorage| vec![s.spec.vm.clone()])
    }

    #[test]
    fn objects_follow_their_key() {
        let idx = index();
        idx.apply(&watcher::Event::Apply(storage("a", "vm1")));
        idx.apply(&watcher::Event::Apply(storage("b", "vm1")));
        assert_eq!(idx.get("vm1").len(), 2);
        idx.apply(&watcher::Event::Apply(storage("a", "vm2")));
        assert_eq!(idx.get("vm1").len(), 1, "moved away from vm1");
        assert_eq!(idx.get("vm2").len(), 1);
        idx.apply(&watcher::Event::Delete(storage("b", "vm1")));
        assert!(idx.get("vm1").is_empty());
        assert_eq!(idx.all().len(), 1);
    }

    #[test]
    fn a_relist_replaces_everything_when_it_ends() {
        let idx = index();
        idx.apply(&watcher::Event::Apply(storage("gone", "vm1")));
        idx.apply(&watcher::Event::Init);
        idx.apply(&watcher::Event::InitApply(storage("new", "vm2")));
        assert_eq!(
            idx.get("vm1").len(),
            1,
            "the old view holds until the relist ends"
        );
        idx.apply(&watcher::Event::InitDone);
        assert!(idx.get("vm1").is_empty());
        assert_eq!(idx.get("vm2").len(), 1);
    }
}
