//! Many `VirtualMachineStorage` objects on many shut-off domains, for the lease test and the
//! scale benchmark: scsi disks backed by small sparse files in one throwaway pool.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use virtplane::api::VirtualMachineStorage;

use crate::common::*;

/// Requests in flight at once when creating or deleting objects.
const CONCURRENCY: usize = 32;

/// The domains, the pool and the names of the objects.
pub struct Fleet {
    pub domains: Vec<TestDomain>,
    pub pool: TestPool,
    pub names: Vec<String>,
}

impl Fleet {
    /// Defines `domains` shut-off domains and one sparse image per future object.
    pub fn define(prefix: &str, domains: usize, per_domain: usize) -> Self {
        let pool = TestPool::create(prefix);
        let domains: Vec<TestDomain> = (0..domains).map(|_| TestDomain::define(prefix)).collect();
        let mut names = Vec::new();
        for (d, _) in domains.iter().enumerate() {
            for i in 0..per_domain {
                let name = format!("d{d:03}-disk{i:02}");
                let f = std::fs::File::create(pool.path.join(format!("{name}.img"))).unwrap();
                f.set_len(1 << 20).unwrap();
                names.push(name);
            }
        }
        Self {
            domains,
            pool,
            names,
        }
    }

    fn object(&self, name: &str) -> VirtualMachineStorage {
        let d: usize = name[1..4].parse().unwrap();
        let path = self.pool.path.join(format!("{name}.img"));
        // From JSON, so fields other changes add to the spec keep their defaults.
        serde_json::from_value(serde_json::json!({
            "apiVersion": "virtplane.io/v1alpha1", "kind": "VirtualMachineStorage",
            "metadata": { "name": name },
            "spec": { "vm": self.domains[d].name, "type": "disk", "source": { "path": path } },
        }))
        .unwrap()
    }

    /// Creates every object in `ns`, `CONCURRENCY` at a time; returns when the last is created.
    pub async fn create(&self, client: &Client, ns: &str) {
        let api: Api<VirtualMachineStorage> = Api::namespaced(client.clone(), ns);
        futures::stream::iter(self.names.iter())
            .map(|name| {
                let api = api.clone();
                let obj = self.object(name);
                async move {
                    api.create(&PostParams::default(), &obj)
                        .await
                        .unwrap_or_else(|e| panic!("create {}: {e}", obj.name_any()));
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<()>>()
            .await;
    }

    /// Creates every object in `ns` ([`Fleet::create`]) and waits up to `timeout` until all of
    /// them are Ready and Bound.
    pub async fn create_settled(&self, client: &Client, ns: &str, timeout: Duration) {
        self.create(client, ns).await;
        wait_all(
            client,
            ns,
            self.names.len(),
            "Ready and Bound",
            timeout,
            |o| settled(o, "Bound"),
        )
        .await;
    }

    /// Deletes every object in `ns` (not waiting for them to go).
    pub async fn delete(&self, client: &Client, ns: &str) {
        let api: Api<VirtualMachineStorage> = Api::namespaced(client.clone(), ns);
        futures::stream::iter(self.names.iter())
            .map(|name| {
                let api = api.clone();
                async move {
                    let _ = api.delete(name, &DeleteParams::default()).await;
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<()>>()
            .await;
    }

    /// Whether no domain definition holds a disk of this fleet any more.
    pub fn definitions_clean(&self) -> bool {
        let dir = self.pool.path.to_string_lossy().into_owned();
        self.domains
            .iter()
            .all(|d| !config_xml(&d.name).contains(&dir))
    }
}

/// Every object of `ns`.
pub async fn list(client: &Client, ns: &str) -> Vec<VirtualMachineStorage> {
    let api: Api<VirtualMachineStorage> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default()).await.unwrap().items
}

fn condition(o: &VirtualMachineStorage, type_: &str) -> Option<(String, String, String)> {
    condition_of(&o.status.as_ref()?.conditions, type_)
}

/// Whether the object is Ready and Scheduled=True with `scheduled` as reason.
pub fn settled(o: &VirtualMachineStorage, scheduled: &str) -> bool {
    condition(o, "Ready").is_some_and(|(s, _, _)| s == "True")
        && condition(o, "Scheduled").is_some_and(|(s, r, _)| s == "True" && r == scheduled)
}

/// The Scheduled reason of the object, if any.
pub fn scheduled_reason(o: &VirtualMachineStorage) -> Option<String> {
    condition(o, "Scheduled").map(|(_, r, _)| r)
}

/// Waits until `n` objects of `ns` satisfy `check`; returns how long it took.
pub async fn wait_all(
    client: &Client,
    ns: &str,
    n: usize,
    what: &str,
    timeout: Duration,
    check: impl Fn(&VirtualMachineStorage) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let items = list(client, ns).await;
        let ok = items.iter().filter(|o| check(o)).count();
        if ok == n {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "{what}: only {ok} of {n} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every object's resourceVersion and managedFields, by name.
pub type Snapshot = BTreeMap<String, (String, VirtualMachineStorage)>;

/// Reads every object of `ns`.
pub async fn snapshot(client: &Client, ns: &str) -> Snapshot {
    list(client, ns)
        .await
        .into_iter()
        .map(|o| (o.name_any(), (o.resource_version().unwrap_or_default(), o)))
        .collect()
}

/// The objects written between two snapshots, each with the field managers whose entries in
/// managedFields changed (what wrote them).
pub fn writes(before: &Snapshot, after: &Snapshot) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for (name, (rv, obj)) in after {
        let Some((rv0, obj0)) = before.get(name) else {
            out.push((name.clone(), vec!["(created)".into()]));
            continue;
        };
        if rv == rv0 {
            continue;
        }
        let entries = |o: &VirtualMachineStorage| {
            o.managed_fields()
                .iter()
                .map(|m| {
                    (
                        format!(
                            "{}{}",
                            m.manager.clone().unwrap_or_default(),
                            m.subresource
                                .as_deref()
                                .map(|s| format!("/{s}"))
                                .unwrap_or_default()
                        ),
                        m.time.as_ref().map(|t| t.0.to_string()),
                    )
                })
                .collect::<BTreeMap<_, _>>()
        };
        let (e0, e1) = (entries(obj0), entries(obj));
        let mut managers: Vec<String> = e1
            .iter()
            .filter(|(m, t)| e0.get(*m) != Some(t))
            .map(|(m, _)| m.clone())
            .collect();
        managers.push(format!("changed: {}", changed_fields(obj0, obj).join(",")));
        out.push((name.clone(), managers));
    }
    for name in before.keys() {
        if !after.contains_key(name) {
            out.push((name.clone(), vec!["(deleted)".into()]));
        }
    }
    out
}

/// Which parts of the object differ: metadata fields, spec, status fields, condition types.
fn changed_fields(a: &VirtualMachineStorage, b: &VirtualMachineStorage) -> Vec<String> {
    let (a, b) = (
        serde_json::to_value(a).unwrap(),
        serde_json::to_value(b).unwrap(),
    );
    let mut out = Vec::new();
    for part in ["metadata", "spec", "status"] {
        let (pa, pb) = (&a[part], &b[part]);
        let keys: std::collections::BTreeSet<&String> = pa
            .as_object()
            .into_iter()
            .chain(pb.as_object())
            .flat_map(|o| o.keys())
            .collect();
        for k in keys {
            if matches!(k.as_str(), "resourceVersion" | "managedFields") || pa[k] == pb[k] {
                continue;
            }
            if k == "conditions" {
                let types = |v: &serde_json::Value| {
                    v.as_array()
                        .into_iter()
                        .flatten()
                        .map(|c| (c["type"].to_string(), c.to_string()))
                        .collect::<BTreeMap<_, _>>()
                };
                let (ca, cb) = (types(&pa[k]), types(&pb[k]));
                for (t, c) in &cb {
                    if ca.get(t) != Some(c) {
                        out.push(format!("{part}.conditions[{t}]: {c}"));
                    }
                }
            } else {
                out.push(format!("{part}.{k}: {} -> {}", pa[k], pb[k]));
            }
        }
    }
    out
}

/// Strips the finalizers of every object left in the namespace when dropped (declare it after
/// the TestNamespace, so it runs first): a failed run leaves nothing stuck, quickly.
pub struct Leftovers(pub String);

impl Drop for Leftovers {
    fn drop(&mut self) {
        let ns = &self.0;
        let _ = std::process::Command::new("sh")
            .args([
                "-c",
                &format!(
                    "kubectl get virtualmachinestorages -n {ns} -o name | xargs -r -P 16 -I{{}} \
                     kubectl patch -n {ns} {{}} --type=merge -p '{{\"metadata\":{{\"finalizers\":null}}}}' >/dev/null 2>&1; \
                     kubectl delete virtualmachinestorages --all -n {ns} --wait=false >/dev/null 2>&1"
                ),
            ])
            .status();
    }
}

/// Waits until two reads of every object `gap` apart are the same (at most `timeout`);
/// returns how long that took and the writes seen in the last pair when it gave up.
pub async fn wait_quiet(
    client: &Client,
    ns: &str,
    gap: Duration,
    timeout: Duration,
) -> (Duration, Vec<(String, Vec<String>)>) {
    let start = Instant::now();
    let mut prev = snapshot(client, ns).await;
    loop {
        tokio::time::sleep(gap).await;
        let next = snapshot(client, ns).await;
        let w = writes(&prev, &next);
        if w.is_empty() || start.elapsed() > timeout {
            return (start.elapsed(), w);
        }
        prev = next;
    }
}

/// Every Apply event of the objects of `ns` from now until `stop` fires: (name, resourceVersion,
/// Scheduled reason), in order.
pub async fn record_writes(
    client: Client,
    ns: String,
    started: tokio::sync::oneshot::Sender<()>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<(String, String, Option<String>)> {
    let mut started = Some(started);
    use kube::runtime::watcher;
    let api: Api<VirtualMachineStorage> = Api::namespaced(client, &ns);
    let mut seen = Vec::new();
    let stream = watcher(api, watcher::Config::default());
    let mut stream = std::pin::pin!(stream);
    loop {
        tokio::select! {
            ev = stream.try_next() => match ev {
                Ok(Some(watcher::Event::Apply(o))) => seen.push((
                    o.name_any(),
                    o.resource_version().unwrap_or_default(),
                    scheduled_reason(&o),
                )),
                Ok(Some(watcher::Event::Delete(o))) => seen.push((o.name_any(), "deleted".into(), None)),
                Ok(Some(watcher::Event::InitDone)) => {
                    if let Some(tx) = started.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("watch of the fleet failed: {e}"),
            },
            _ = stop.changed() => return seen,
        }
    }
}
