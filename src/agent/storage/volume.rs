//! `spec.source.volume.create` on the node: reads the golden image's chain, creates or grows
//! the volume before the device is attached, and on deletion removes a volume this object
//! created when its `reclaimPolicy` is `Delete`.
//!
//! Which object created which volume is the agent's own record on the node,
//! `<state-dir>/volumes/<uid>.json` (next to the clone records), written before libvirt creates
//! the volume and removed with the object. Nothing a tenant can edit (labels, annotations,
//! status) decides that a volume is theirs to grow or delete; and libvirt never creates over an
//! existing volume, so a record never covers a volume that was there before.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::events::EventType;
use serde::{Deserialize, Serialize};

use super::observe::{Observed, inspect_blocking, pool_dirs, within};
use super::reason::StorageReason;
use super::source::{Found, PathFacts, usable_dirs};
use super::volume_plan::{self, BackingFacts, MAX_CHAIN, VolumeStep};
use crate::agent::context::{Context, ReconcileError};
use crate::agent::refusal::Refusal;
use crate::agent::status;
use crate::api::{BackingVolume, ReclaimPolicy, VirtualMachineStorage, VolumeCreate, VolumeRef};
use crate::libvirt::facade::{Storage, VolumeLookup};
use crate::libvirt::provision::Provision;
use crate::libvirt::{ErrorKind, LibvirtError};
use crate::tenancy::Grants;

type Refused = Refusal<StorageReason>;

/// The record of the volume an object created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Its pool.
    pub pool: String,
    /// Its name.
    pub name: String,
}

/// The agent's records of the volumes objects created, one file per object UID.
#[derive(Clone, Debug)]
pub struct Created {
    dir: PathBuf,
}

impl Created {
    /// Records in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The records of the agent of `ctx`: `<state-dir>/volumes`.
    pub fn of(ctx: &Context) -> Self {
        let state = ctx.clone_side.dir.parent().unwrap_or(Path::new("/"));
        Self::new(state.join("volumes"))
    }

    fn path(&self, uid: &str) -> PathBuf {
        let safe: String = uid
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join(format!("{safe}.json"))
    }

    /// The record of object `uid`, if any.
    pub async fn read(&self, uid: &str) -> std::io::Result<Option<Record>> {
        match tokio::fs::read(self.path(uid)).await {
            Ok(data) => serde_json::from_slice(&data)
                .map(Some)
                .map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Records that object `uid` creates `record` (atomically: a new file renamed in place).
    pub async fn write(&self, uid: &str, record: &Record) -> std::io::Result<()> {
        tokio::fs::create_dir_all(&self.dir).await?;
        let path = self.path(uid);
        let tmp = path.with_extension("json.tmp");
        tokio::fs::write(
            &tmp,
            serde_json::to_vec(record).map_err(std::io::Error::other)?,
        )
        .await?;
        tokio::fs::rename(&tmp, &path).await
    }

    /// Drops the record of object `uid` (none is fine).
    pub async fn remove(&self, uid: &str) -> std::io::Result<()> {
        match tokio::fs::remove_file(self.path(uid)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// The volume and its `create` block, when the spec asks to create one.
pub fn create_of(obj: &VirtualMachineStorage) -> Option<(&VolumeRef, &VolumeCreate)> {
    let v = obj.spec.source.as_ref()?.volume.as_ref()?;
    Some((v, v.create.as_ref()?))
}

/// [`super::observe::observe`], plus the golden image of `create.backingVolume`.
pub async fn observe(
    obj: &VirtualMachineStorage,
    ctx: &Context,
) -> Result<Observed, ReconcileError> {
    let mut observed = super::observe::observe(obj, ctx).await?;
    if observed.domain.is_some()
        && let Some(b) = create_of(obj).and_then(|(_, c)| c.backing_volume.as_ref())
    {
        observed.backing = Some(observe_backing(ctx, &observed.grants, b).await?);
    }
    Ok(observed)
}

/// Reads the golden image of `create.backingVolume` and its chain: libvirt's lookup, then
/// each file's header, following backing names while they lie in the granted pools'
/// directories (nothing outside them is opened).
pub async fn observe_backing(
    ctx: &Context,
    grants: &Grants,
    b: &BackingVolume,
) -> Result<BackingFacts, LibvirtError> {
    let lookup = if grants.pool(&b.pool) {
        ctx.libvirt.volume(&b.pool, &b.name).await?
    } else {
        VolumeLookup::NoVolume
    };
    let first = match &lookup {
        VolumeLookup::Found(found) if found.is_file => Some(PathBuf::from(&found.path)),
        _ => None,
    };
    // The kept copy of the pools; read afresh when a link of the chain then lies outside
    // them (as `observe::look` does), so a stale copy never refuses a chain.
    let (pools, kept) = ctx.pools.get(&ctx.libvirt).await?;
    let (mut dirs, mut links) = chain(pools, grants, first.clone()).await?;
    if kept && !links.iter().all(|l| within(l, &dirs)) {
        let pools = ctx.pools.fresh(&ctx.libvirt).await?;
        (dirs, links) = chain(pools, grants, first).await?;
    }
    Ok(BackingFacts {
        volume: b.clone(),
        lookup,
        links,
        dirs,
    })
}

/// The granted pools' directories and the chain from `first` in them; filesystem work off the
/// async runtime.
async fn chain(
    pools: std::sync::Arc<Vec<crate::libvirt::pool_index::PoolDir>>,
    grants: &Grants,
    first: Option<PathBuf>,
) -> Result<(Vec<PathBuf>, Vec<PathFacts>), LibvirtError> {
    let grants = grants.clone();
    Ok(tokio::task::spawn_blocking(move || {
        let dirs = usable_dirs(&grants, &pool_dirs(&pools), &[]);
        let links = first.map(|f| follow(f, &dirs)).unwrap_or_default();
        (dirs, links)
    })
    .await?)
}

/// The file at `first` and the files of its backing chain, as far as they may be opened.
/// Blocking.
fn follow(first: PathBuf, dirs: &[PathBuf]) -> Vec<PathFacts> {
    let mut links = Vec::new();
    let mut next = Some(first);
    while let Some(path) = next.take() {
        if links.len() >= MAX_CHAIN {
            break;
        }
        let facts = inspect_blocking(path, dirs);
        next = match &facts.found {
            Found::Present {
                real,
                header: Some(h),
                ..
            } => volume_plan::backing_path(real, h),
            _ => None,
        };
        links.push(facts);
    }
    links
}

/// What [`ensure`] did.
#[derive(Debug)]
pub enum Ensured {
    /// Nothing to do (or left to the plan to refuse: domain or pool not granted or missing).
    Unchanged,
    /// The volume was created or grown: observe again.
    Changed,
    /// Refused; nothing was changed.
    Refused(Refused),
}

/// Creates or grows the volume `create` asks for, before the plan attaches it.
pub async fn ensure(
    obj: &VirtualMachineStorage,
    ctx: &Context,
    observed: &Observed,
    alias: &str,
) -> Result<Ensured, ReconcileError> {
    let Some((v, create)) = create_of(obj) else {
        return Ok(Ensured::Unchanged);
    };
    let grants = &observed.grants;
    // What is not granted, or a domain that is not there, the plan refuses first, saying
    // nothing about which volumes exist.
    if observed.domain.is_none() || !grants.domain(&obj.spec.vm) || !grants.pool(&v.pool) {
        return Ok(Ensured::Unchanged);
    }
    let chain = match &observed.backing {
        Some(b) => match volume_plan::judge_chain(b, grants, &b.dirs) {
            Ok(chain) => chain,
            Err(r) => return Ok(Ensured::Refused(r)),
        },
        None => Vec::new(),
    };
    let uid = obj.uid().unwrap_or_default();
    let records = Created::of(ctx);
    let record = match records.read(&uid).await {
        Ok(r) => r,
        Err(e) => return Ok(Ensured::Refused(record_failed(&e))),
    };
    let recorded = record.as_ref().map(|r| (r.pool.as_str(), r.name.as_str()));
    let existing = ctx.libvirt.volume_capacity(&v.pool, &v.name).await?;
    let step = match volume_plan::decide(create, &v.pool, &v.name, existing, recorded, &chain) {
        Ok(step) => step,
        Err(r) => return Ok(Ensured::Refused(r)),
    };
    let live = observed.domain.as_ref().and_then(|d| {
        let disk = d.live.as_ref()?.disk(alias)?;
        Some((obj.spec.vm.clone(), disk.target.clone()?))
    });
    let live = live.as_ref().map(|(vm, t)| (vm.as_str(), t.as_str()));
    match apply_step(&ctx.libvirt, &records, &uid, &v.pool, &v.name, &step, live).await? {
        Ok(None) => Ok(Ensured::Unchanged),
        Ok(Some((reason, note))) => {
            status::publish(&ctx.recorder, obj, EventType::Normal, reason, note).await;
            Ok(Ensured::Changed)
        }
        Err(r) => Ok(Ensured::Refused(r)),
    }
}

/// The refusal when the node-side record cannot be read or written.
fn record_failed(e: &std::io::Error) -> Refused {
    Refusal::wait(
        StorageReason::ProvisionFailed,
        format!(
            "The agent could not read or write its record of the volumes it creates ({e}); nothing was changed. Check the agent's --state-dir; it retries."
        ),
        Duration::from_secs(30),
    )
}

/// Runs `step` for volume `name` of pool `pool` (object `uid`); `live` is the running domain
/// and target that have the volume, for a live resize. `Ok(Ok(Some(event)))` when something
/// changed, with the Event's reason and note.
pub async fn apply_step<P: Provision>(
    virt: &P,
    records: &Created,
    uid: &str,
    pool: &str,
    name: &str,
    step: &VolumeStep,
    live: Option<(&str, &str)>,
) -> Result<Result<Option<(&'static str, String)>, Refused>, LibvirtError> {
    match step {
        VolumeStep::Keep => Ok(Ok(None)),
        VolumeStep::Create(new) => {
            let record = Record {
                pool: pool.to_string(),
                name: name.to_string(),
            };
            if let Err(e) = records.write(uid, &record).await {
                return Ok(Err(record_failed(&e)));
            }
            match virt.create_volume(pool, new).await {
                Ok(()) => {
                    let what = match &new.backing {
                        Some(_) => "overlay",
                        None => "blank volume",
                    };
                    Ok(Ok(Some((
                        "VolumeCreated",
                        format!(
                            "Created {what} {name} in pool {pool} ({} bytes, {}).",
                            new.capacity, new.format
                        ),
                    ))))
                }
                Err(e) if matches!(e.kind(), ErrorKind::Refused | ErrorKind::Unsupported) => {
                    // Not created: the record goes. A volume there now is someone else's.
                    if let Err(e) = records.remove(uid).await {
                        return Ok(Err(record_failed(&e)));
                    }
                    if virt.volume_capacity(pool, name).await?.is_some() {
                        return Ok(Err(Refusal::wait(
                            StorageReason::NameConflict,
                            format!(
                                "Volume {name} was created in pool {pool} by someone else meanwhile; nothing was changed. Choose another spec.source.volume.name."
                            ),
                            Duration::from_secs(60),
                        )));
                    }
                    Ok(Err(Refusal::wait(
                        StorageReason::ProvisionFailed,
                        format!(
                            "libvirt could not create volume {name} in pool {pool}: {e}. Fix spec.source.volume.create or the pool; the agent retries."
                        ),
                        Duration::from_secs(60),
                    )))
                }
                Err(e) => Err(e),
            }
        }
        VolumeStep::Grow { from, to } => {
            let result = match live {
                Some((vm, target)) => virt.block_resize(vm, target, *to).await,
                None => virt.resize_volume(pool, name, *to).await,
            };
            match result {
                Ok(()) => Ok(Ok(Some((
                    "VolumeResized",
                    format!(
                        "Grew volume {name} of pool {pool} from {from} to {to} bytes{}.",
                        if live.is_some() {
                            " in the running guest"
                        } else {
                            ""
                        }
                    ),
                )))),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Refused | ErrorKind::Unsupported | ErrorKind::Inactive
                    ) =>
                {
                    Ok(Err(Refusal::wait(
                        StorageReason::ProvisionFailed,
                        format!(
                            "libvirt could not grow volume {name} of pool {pool} to {to} bytes: {e}. The agent retries."
                        ),
                        Duration::from_secs(60),
                    )))
                }
                Err(e) => Err(e),
            }
        }
    }
}

/// On deletion, once the device is detached: removes the volume this object created when
/// its `reclaimPolicy` is `Delete` (an overlay only: its golden image is never touched), and
/// drops the record either way.
pub async fn reclaim(obj: &VirtualMachineStorage, ctx: &Context) -> Result<(), ReconcileError> {
    let uid = obj.uid().unwrap_or_default();
    let records = Created::of(ctx);
    let record = match records.read(&uid).await {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(()),
        Err(e) => {
            tracing::warn!(error = %e, "failed to read the record of the volume this object created; the volume is kept");
            return Ok(());
        }
    };
    let policy = create_of(obj).map_or(ReclaimPolicy::Retain, |(_, c)| c.reclaim_policy);
    if policy == ReclaimPolicy::Delete {
        ctx.libvirt
            .delete_volume(&record.pool, &record.name)
            .await?;
        status::publish(
            &ctx.recorder,
            obj,
            EventType::Normal,
            "VolumeDeleted",
            format!(
                "Deleted volume {} of pool {} (reclaimPolicy Delete).",
                record.name, record.pool
            ),
        )
        .await;
    }
    if let Err(e) = records.remove(&uid).await {
        tracing::warn!(error = %e, "failed to drop the record of the volume this object created");
    }
    Ok(())
}

#[cfg(test)]
#[path = "volume_tests.rs"]
mod tests;
