//! `VMClone`: a task cloning a shut-off domain: new name, UUID and MACs, copies of its writable
//! disks (reflink or sparse copy, per pool), progress, and nothing left half-made.
//!
//! Quick checks run in the reconcile; the copy and the definition run in a background job per
//! task, so a deletion (cancel) is seen while a copy runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use super::context::{Context, ReconcileError};
use super::{finalizer, status};
use crate::api::{
    CloneDisk, ClonePhase, CopyStrategy, NODE_LABEL, VMClone, VMCloneStatus, condition,
};
use crate::conditions::Desired;
use crate::copy::{self, Strategy, StrategyUsed};
use crate::libvirt::clone_xml::{self, CloneEdits};
use crate::libvirt::domain::{self, DiskXml, DomainXml};
use crate::libvirt::facade::{Domains, Storage};
use crate::libvirt::volume;

/// Reasons of the `Ready` and `Progressing` conditions.
pub mod reason {
    /// The source does not exist on this node.
    pub const SOURCE_NOT_FOUND: &str = "SourceNotFound";
    /// The source runs; the task waits for it to shut off.
    pub const SOURCE_RUNNING: &str = "SourceRunning";
    /// The target name is taken.
    pub const NAME_CONFLICT: &str = "NameConflict";
    /// No pool has room for the copies.
    pub const INSUFFICIENT_SPACE: &str = "InsufficientSpace";
    /// A disk lies outside the agent's allowed directories, or a pool is missing or cannot hold
    /// file copies.
    pub const STORAGE_NOT_USABLE: &str = "StorageNotUsable";
    /// A writable disk is not a file (a block device, a network disk, a volume of a pool that is
    /// not a directory): a clone would write to the same storage as the source.
    pub const UNSUPPORTED_DISK: &str = "UnsupportedDisk";
    /// Copying.
    pub const COPYING: &str = "Copying";
    /// Defining the clone.
    pub const DEFINING: &str = "Defining";
    /// A copy failed.
    pub const COPY_FAILED: &str = "CopyFailed";
    /// libvirt refused the clone's definition.
    pub const DEFINE_FAILED: &str = "DefineFailed";
    /// The clone exists.
    pub const COMPLETED: &str = "Completed";
}

/// Clone jobs in flight, by task UID.
#[derive(Default)]
pub struct CloneJobs(Mutex<HashMap<String, Job>>);

struct Job {
    cancel: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<()>,
}

impl CloneJobs {
    fn running(&self, uid: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(uid)
            .is_some_and(|j| !j.handle.is_finished())
    }

    fn take(&self, uid: &str) -> Option<Job> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(uid)
    }

    /// Stops every copy (the agent is shutting down; a new agent resumes the tasks).
    pub fn cancel_all(&self) {
        for job in self.0.lock().unwrap_or_else(|p| p.into_inner()).values() {
            job.cancel.store(true, Ordering::SeqCst);
        }
    }

    fn insert(&self, uid: String, job: Job) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid, job);
    }
}

fn strategy_of(s: CopyStrategy) -> Strategy {
    match s {
        CopyStrategy::Auto => Strategy::Auto,
        CopyStrategy::Copy => Strategy::Copy,
        CopyStrategy::Reflink => Strategy::Reflink,
    }
}

const SHARED: &str = "Shared";

/// Writes the agent's part of the status with its Ready and Progressing conditions.
async fn write(
    api: &Api<VMClone>,
    obj: &VMClone,
    status: &VMCloneStatus,
    ready: Desired<'_>,
    progressing: Desired<'_>,
) -> Result<(), ReconcileError> {
    let prev = obj.status.clone().unwrap_or_default();
    status::write_status(api, obj, &prev, status.clone(), &[ready, progressing]).await
}

fn idle(type_: &'static str, reason: &'static str, message: impl Into<String>) -> Desired<'static> {
    Desired::falsy(type_, reason, message)
}

/// Reconciles one VMClone.
#[tracing::instrument(skip_all, fields(object = %format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())))]
pub(super) async fn reconcile(
    obj: Arc<VMClone>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    if obj.labels().get(NODE_LABEL) != Some(&ctx.node) {
        return Ok(Action::await_change());
    }
    tracing::debug!("reconciling");
    let api: Api<VMClone> =
        Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let uid = obj.uid().unwrap_or_default();
    let status = obj.status.clone().unwrap_or_default();

    if obj.meta().deletion_timestamp.is_some() {
        if let Some(job) = ctx.clones.take(&uid) {
            job.cancel.store(true, Ordering::SeqCst);
            let _ = job.handle.await;
        }
        let fresh = api.get_opt(&obj.name_any()).await.ok().flatten();
        let status = fresh.and_then(|o| o.status).unwrap_or(status);
        if status.phase != Some(ClonePhase::Completed) {
            // A task that did not complete leaves nothing behind.
            remove_leftovers(&ctx, &uid, &status).await?;
        }
        finalizer::remove(&api, &*obj).await?;
        return Ok(Action::await_change());
    }
    finalizer::add(&api, &*obj).await?;
    if matches!(
        status.phase,
        Some(ClonePhase::Completed | ClonePhase::Failed)
    ) || ctx.clones.running(&uid)
    {
        return Ok(Action::await_change());
    }

    let source = obj.spec.source.clone();
    let Some(view) = ctx.libvirt.domain(&source).await? else {
        let st = VMCloneStatus {
            phase: Some(ClonePhase::Pending),
            ..status
        };
        let msg = format!(
            "Domain {source} is not defined on node {}; the task starts once it is.",
            ctx.node
        );
        write(
            &api,
            &obj,
            &st,
            idle(condition::READY, reason::SOURCE_NOT_FOUND, msg.clone()),
            idle(condition::PROGRESSING, reason::SOURCE_NOT_FOUND, msg),
        )
        .await?;
        return Ok(Action::requeue(Duration::from_secs(300)));
    };
    if view.active {
        let st = VMCloneStatus {
            phase: Some(ClonePhase::Pending),
            ..status
        };
        let msg = format!("{source} is running; the clone starts by itself once it is shut off.");
        write(
            &api,
            &obj,
            &st,
            idle(condition::READY, reason::SOURCE_RUNNING, msg.clone()),
            idle(condition::PROGRESSING, reason::SOURCE_RUNNING, msg),
        )
        .await?;
        // The domain's stop event wakes the task.
        return Ok(Action::requeue(Duration::from_secs(600)));
    }

    let started = matches!(
        status.phase,
        Some(ClonePhase::Copying | ClonePhase::Defining)
    );
    let planned = if started && status.target_name.is_some() {
        // The task started before (the agent restarted): the plan is in the status, even when
        // it copies nothing.
        Ok(status.clone())
    } else {
        plan(&obj, &ctx, &view.config, status.clone()).await?
    };
    let status = match planned {
        Ok(s) => s,
        Err((reason, message)) => {
            let st = VMCloneStatus {
                phase: Some(ClonePhase::Failed),
                completion_time: Some(Time(Timestamp::now())),
                ..status
            };
            write(
                &api,
                &obj,
                &st,
                idle(condition::READY, reason, message.clone()),
                idle(condition::PROGRESSING, reason, message.clone()),
            )
            .await?;
            crate::metrics::get().error("VMClone", reason);
            status::publish(&ctx.recorder, &*obj, EventType::Warning, reason, message).await;
            return Ok(Action::await_change());
        }
    };
    let target = status.target_name.clone().unwrap_or_default();
    let msg = format!("Copying the disks of {source} for {target}.");
    write(
        &api,
        &obj,
        &status,
        idle(condition::READY, reason::COPYING, msg.clone()),
        Desired::truthy(condition::PROGRESSING, reason::COPYING, msg),
    )
    .await?;
    if obj
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .is_none()
    {
        status::publish(
            &ctx.recorder,
            &*obj,
            EventType::Normal,
            "Started",
            format!("Cloning {source} to {target}."),
        )
        .await;
    }

    let cancel = Arc::new(AtomicBool::new(false));
    let handle = tokio::spawn(run_job(
        api,
        obj.clone(),
        ctx.clone(),
        status,
        view.config.clone(),
        cancel.clone(),
    ));
    ctx.clones.insert(uid, Job { cancel, handle });
    Ok(Action::await_change())
}

/// What a clone does with one disk of the source.
#[derive(Clone, Debug, PartialEq, Eq)]
enum DiskUse {
    /// No medium (an empty CD-ROM tray): nothing to do.
    Empty,
    /// Read-only or shareable: the clone refers to the same source, labelled so.
    Shared(String),
    /// A writable file, copied.
    File(String),
    /// A writable `type='volume'` disk: copied when it is a file in a directory pool.
    Volume {
        /// The pool.
        pool: String,
        /// The volume.
        volume: String,
    },
    /// A writable disk that is no file: the task is refused with this message.
    Unsupported(String),
}

/// Decides from the XML alone what the clone does with disk `d` of domain `source`.
fn disk_use(d: &DiskXml, source: &str) -> DiskUse {
    let Some(label) = d.source_label() else {
        return DiskUse::Empty;
    };
    if d.readonly || d.shareable || d.device == "cdrom" {
        return DiskUse::Shared(label);
    }
    match (d.kind.as_str(), &d.source, &d.pool, &d.volume) {
        ("file", Some(path), _, _) => DiskUse::File(path.clone()),
        ("volume", _, Some(pool), Some(volume)) => DiskUse::Volume {
            pool: pool.clone(),
            volume: volume.clone(),
        },
        (kind, _, _, _) => {
            let what = match kind {
                "block" => "block device",
                "network" => "network disk",
                _ => kind,
            };
            DiskUse::Unsupported(unsupported(d, &format!("{what} {label}"), source))
        }
    }
}

/// The refusal message of a writable disk the clone cannot copy.
fn unsupported(d: &DiskXml, what: &str, source: &str) -> String {
    format!(
        "Disk {} ({what}) of {source} is writable and not a file that can be copied, so the clone \
         would write to the same storage as {source}: mark it <readonly/> or <shareable/> in \
         {source} to share it with the clone, or convert it to a file in a dir, fs or netfs pool.",
        d.target.as_deref().unwrap_or("without target"),
    )
}

/// A disk as planned: shared, or copied from a file (of a known pool, for a volume disk).
enum Step {
    Shared(String),
    Copy { path: String, pool: Option<String> },
}

/// Resolves a volume disk through libvirt: `Ok(Err(message))` when libvirt does not know the
/// pool or volume, or the pool is not running (permanent until someone fixes it).
async fn resolve_volume(
    ctx: &Context,
    pool: &str,
    vol: &str,
) -> Result<Result<volume::VolumeSource, String>, ReconcileError> {
    let (p, v) = (pool.to_string(), vol.to_string());
    Ok(ctx
        .libvirt
        .call(
            "resolve a storage volume",
            move |c| match volume::resolve_volume(c, &p, &v) {
                Ok(found) => Ok(Ok(found)),
                Err(e)
                    if matches!(
                        e.code(),
                        virt::enumutil::Enum::Known(
                            virt::error::ErrorNumber::NoStoragePool
                                | virt::error::ErrorNumber::NoStorageVolume
                                | virt::error::ErrorNumber::OperationInvalid
                        )
                    ) =>
                {
                    Ok(Err(e.message().to_string()))
                }
                Err(e) => Err(e),
            },
        )
        .await?)
}

/// Chooses the clone's name and where each disk goes; checks that every writable disk can be
/// copied and that there is space. `Err` is a permanent refusal (reason, message) with nothing
/// created.
async fn plan(
    obj: &VMClone,
    ctx: &Context,
    source_xml: &DomainXml,
    prev: VMCloneStatus,
) -> Result<Result<VMCloneStatus, (&'static str, String)>, ReconcileError> {
    let source = &obj.spec.source;

    // Every disk first: a disk that cannot be copied refuses the whole task.
    let mut steps = Vec::new();
    let mut refused = Vec::new();
    for d in &source_xml.disks {
        match disk_use(d, source) {
            DiskUse::Empty => {}
            DiskUse::Shared(label) => steps.push(Step::Shared(label)),
            DiskUse::File(path) => steps.push(Step::Copy { path, pool: None }),
            DiskUse::Unsupported(message) => refused.push(message),
            DiskUse::Volume { pool, volume } => match resolve_volume(ctx, &pool, &volume).await? {
                Ok(v) if v.is_file && volume::holds_files(&v.pool_type) => steps.push(Step::Copy {
                    path: v.path,
                    pool: Some(pool),
                }),
                Ok(v) => refused.push(unsupported(
                    d,
                    &format!(
                        "volume {volume} of the {} pool {pool}, at {}",
                        v.pool_type, v.path
                    ),
                    source,
                )),
                Err(e) => {
                    return Ok(Err((
                        reason::STORAGE_NOT_USABLE,
                        format!(
                            "Disk {} of {source} is volume {volume} of pool {pool}, which libvirt cannot resolve ({e}); start the pool or fix the disk.",
                            d.target.as_deref().unwrap_or("without target")
                        ),
                    )));
                }
            },
        }
    }
    if !refused.is_empty() {
        return Ok(Err((reason::UNSUPPORTED_DISK, refused.join(" "))));
    }

    let names: Vec<String> = ctx
        .libvirt
        .call("list domains", |c| {
            Ok(c.list_all_domains(0)?
                .iter()
                .filter_map(|d| d.name().ok())
                .collect::<Vec<String>>())
        })
        .await?;
    let uid = obj.uid().unwrap_or_default();
    let (target, number) = match &obj.spec.target_name {
        Some(t) => {
            if names.contains(t) && owner_of(ctx, t).await?.as_deref() != Some(uid.as_str()) {
                return Ok(Err((
                    reason::NAME_CONFLICT,
                    format!(
                        "A domain named {t} already exists on node {}; choose another spec.targetName.",
                        ctx.node
                    ),
                )));
            }
            (t.clone(), 1)
        }
        None => {
            let n = (1u32..)
                .find(|n| !names.contains(&format!("{source}-clone{n}")))
                .unwrap_or(1);
            (format!("{source}-clone{n}"), n)
        }
    };

    let pools = ctx
        .libvirt
        .call("list storage pools", crate::libvirt::collect_storage_pools)
        .await?;
    // The fallback pool, or why it cannot take copies.
    let fallback = match pools
        .iter()
        .find(|p| p.name == obj.spec.storage.pool && p.active)
    {
        Some(f) if volume::holds_files(&f.type_) && f.path.is_some() => Ok(Some(f)),
        Some(f) => Err(format!(
            "the fallback pool {} is a {} pool, which cannot hold file copies; set spec.storage.pool to an active dir, fs or netfs pool",
            f.name, f.type_
        )),
        None => Ok(None),
    };
    let allowed = ctx.allowed_dirs().await?;
    let mut disks = Vec::new();
    // Bytes each destination directory must hold, with its available bytes.
    let mut need: HashMap<PathBuf, (u64, u64, String)> = HashMap::new();
    for step in steps {
        let (src, vol_pool) = match step {
            Step::Shared(label) => {
                disks.push(CloneDisk {
                    source: label.clone(),
                    target: Some(label),
                    strategy: Some(SHARED.into()),
                    ..Default::default()
                });
                continue;
            }
            Step::Copy { path, pool } => (path, pool),
        };
        let src_path = PathBuf::from(&src);
        let dir = src_path
            .parent()
            .and_then(|p| std::fs::canonicalize(p).ok())
            .unwrap_or_default();
        let pool = pools.iter().find(|p| {
            p.active
                && match &vol_pool {
                    // A volume's own pool, even when another pool shares its directory.
                    Some(name) => &p.name == name,
                    None => {
                        p.path
                            .as_deref()
                            .and_then(|x| std::fs::canonicalize(x).ok())
                            .as_ref()
                            == Some(&dir)
                    }
                }
        });
        // What the space check counts: the space the source occupies.
        let allocated = copy::allocated_bytes(&src_path).unwrap_or(0);
        // What progress counts: the source's data extents (see `copy::copy_file`).
        let data = copy::data_bytes(&src_path).unwrap_or(allocated);
        let (mut dest_dir, mut pool_name, mut message, mut available) = match pool {
            Some(p) if volume::holds_files(&p.type_) => {
                (dir.clone(), Some(p.name.clone()), None, p.available)
            }
            Some(p) => match &fallback {
                Ok(Some(f)) => (
                    PathBuf::from(f.path.clone().unwrap_or_default()),
                    Some(f.name.clone()),
                    Some(format!(
                        "Pool {} ({}) cannot take a file copy; the copy went to the fallback pool {}.",
                        p.name, p.type_, f.name
                    )),
                    f.available,
                ),
                Ok(None) => {
                    return Ok(Err((
                        reason::STORAGE_NOT_USABLE,
                        format!(
                            "Pool {} ({}) cannot take a file copy and the fallback pool {} is not an active pool on this node.",
                            p.name, p.type_, obj.spec.storage.pool
                        ),
                    )));
                }
                Err(why) => {
                    return Ok(Err((
                        reason::STORAGE_NOT_USABLE,
                        format!(
                            "Pool {} ({}) cannot take a file copy of {src}, and {why}.",
                            p.name, p.type_
                        ),
                    )));
                }
            },
            None if allowed.iter().any(|a| dir.starts_with(a)) => {
                (dir.clone(), None, None, statvfs_available(&dir))
            }
            None => {
                return Ok(Err((
                    reason::STORAGE_NOT_USABLE,
                    format!(
                        "{src} lies outside the storage pools and allowed directories of this agent; it cannot be copied."
                    ),
                )));
            }
        };
        let already = need.get(&dest_dir).map_or(0, |n| n.0);
        if already + allocated > available {
            let here = pool_name
                .clone()
                .unwrap_or_else(|| dir.display().to_string());
            match &fallback {
                Ok(Some(f)) if Some(&f.name) != pool_name.as_ref() => {
                    let f_dir = PathBuf::from(f.path.clone().unwrap_or_default());
                    let f_already = need.get(&f_dir).map_or(0, |n| n.0);
                    if f_already + allocated <= f.available {
                        message = Some(format!(
                            "{here} lacks room for {allocated} bytes; the copy went to the fallback pool {}.",
                            f.name
                        ));
                        dest_dir = f_dir;
                        pool_name = Some(f.name.clone());
                        available = f.available;
                    }
                }
                Err(why) => {
                    return Ok(Err((
                        reason::STORAGE_NOT_USABLE,
                        format!(
                            "{here} lacks room for a copy of {src} ({allocated} bytes), and {why}."
                        ),
                    )));
                }
                _ => {}
            }
        }
        let entry = need.entry(dest_dir.clone()).or_insert((
            0,
            available,
            pool_name
                .clone()
                .unwrap_or_else(|| dest_dir.display().to_string()),
        ));
        entry.0 += allocated;
        let dest = free_copy_name(&dest_dir, &src_path, number, &disks);
        disks.push(CloneDisk {
            source: src,
            target: Some(dest.display().to_string()),
            pool: pool_name,
            strategy: None,
            total_bytes: Some(data),
            copied_bytes: Some(0),
            message,
        });
    }
    for (dir, (bytes, available, name)) in &need {
        if bytes > available {
            return Ok(Err((
                reason::INSUFFICIENT_SPACE,
                format!(
                    "The copies need {bytes} bytes (the sources' allocated size) in {name} ({}), which has {available} available, and no fallback pool has room. Free space or set spec.storage.pool.",
                    dir.display()
                ),
            )));
        }
    }
    Ok(Ok(VMCloneStatus {
        phase: Some(ClonePhase::Copying),
        target_name: Some(target),
        disks,
        progress: Some("0%".into()),
        start_time: Some(Time(Timestamp::now())),
        ..prev
    }))
}

fn statvfs_available(dir: &Path) -> u64 {
    rustix::fs::statvfs(dir)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .unwrap_or(0)
}

/// `disk.img` -> `disk-clone<N>.img` in `dir`, with the lowest N from `from` that is free on disk
/// and among the copies planned so far.
fn free_copy_name(dir: &Path, src: &Path, from: u32, planned: &[CloneDisk]) -> PathBuf {
    let file = src
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (stem, ext) = match file.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s.to_string(), format!(".{e}")),
        _ => (file.clone(), String::new()),
    };
    (from..)
        .map(|n| dir.join(format!("{stem}-clone{n}{ext}")))
        .find(|p| !p.exists() && !planned.iter().any(|d| d.target.as_deref() == p.to_str()))
        .unwrap_or_else(|| dir.join(format!("{stem}-clone{ext}")))
}

/// The task UID recorded in a domain's metadata, if virtplane made it.
async fn owner_of(ctx: &Context, name: &str) -> Result<Option<String>, ReconcileError> {
    let name = name.to_string();
    Ok(ctx
        .libvirt
        .call("read the domain", move |c| {
            let dom = c.lookup_domain_by_name(&name)?;
            Ok(clone_xml::clone_task_of(
                &dom.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)?,
            ))
        })
        .await
        .ok()
        .flatten())
}

/// Undoes a task that did not complete: undefines the clone if this task defined it (the
/// domain's metadata names the task), then removes the copies. What is already gone is fine.
async fn remove_leftovers(
    ctx: &Context,
    uid: &str,
    status: &VMCloneStatus,
) -> Result<(), ReconcileError> {
    if let Some(target) = status.target_name.clone()
        && !uid.is_empty()
    {
        let uid = uid.to_string();
        ctx.libvirt
            .call("remove the unfinished clone", move |c| {
                let dom = match c.lookup_domain_by_name(&target) {
                    Ok(d) => d,
                    Err(e) if domain::is_no_domain(&e) => return Ok(()),
                    Err(e) => return Err(e),
                };
                let xml = dom.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)?;
                if clone_xml::clone_task_of(&xml).as_deref() != Some(uid.as_str()) {
                    return Ok(()); // Not made by this task: never touched.
                }
                if dom.is_active()?
                    && let Err(e) = dom.destroy()
                    && dom.is_active().unwrap_or(true)
                {
                    return Err(e);
                }
                match dom.undefine_flags(
                    virt::sys::VIR_DOMAIN_UNDEFINE_NVRAM
                        | virt::sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE,
                ) {
                    Err(e) if !domain::is_no_domain(&e) => Err(e),
                    _ => Ok(()),
                }
            })
            .await?;
    }
    remove_copies(ctx, &status.disks).await;
    Ok(())
}

/// Removes the copies a task made (never shared media, never the sources).
async fn remove_copies(ctx: &Context, disks: &[CloneDisk]) {
    for d in disks {
        if d.strategy.as_deref() == Some(SHARED) {
            continue;
        }
        if let Some(t) = &d.target
            && t != &d.source
        {
            let _ = tokio::fs::remove_file(t).await;
        }
    }
    refresh_pools(ctx).await;
}

async fn refresh_pools(ctx: &Context) {
    let _ = ctx
        .libvirt
        .call("refresh storage pools", |c| {
            for p in c.list_all_storage_pools(virt::sys::VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)? {
                let _ = p.refresh(0);
            }
            Ok(())
        })
        .await;
}

fn progress(disks: &[CloneDisk]) -> String {
    let (done, total) = disks
        .iter()
        .filter(|d| d.strategy.as_deref() != Some(SHARED))
        .fold((0u64, 0u64), |(a, b), d| {
            (
                a + d.copied_bytes.unwrap_or(0),
                b + d.total_bytes.unwrap_or(0),
            )
        });
    match done.saturating_mul(100).checked_div(total) {
        Some(pct) => format!("{}%", pct.min(100)),
        None => "100%".into(),
    }
}

/// Copies the disks, defines the clone, starts it if asked; on failure removes every copy.
async fn run_job(
    api: Api<VMClone>,
    obj: Arc<VMClone>,
    ctx: Arc<Context>,
    mut status: VMCloneStatus,
    source_xml: DomainXml,
    cancel: Arc<AtomicBool>,
) {
    let target = status.target_name.clone().unwrap_or_default();
    let source = obj.spec.source.clone();
    let copying = format!("Copying the disks of {source} for {target}.");
    let result = copy_all(&api, &obj, &ctx, &mut status, &cancel, &copying).await;
    let outcome = match result {
        Ok(()) => define(&ctx, &obj, &mut status, &source_xml, &api, &cancel).await,
        Err(e) => Err(e),
    };
    if cancel.load(Ordering::SeqCst) {
        // Deleted (the reconcile removes the copies and a clone this task defined) or the
        // agent is stopping (the next agent resumes the task from its status).
        return;
    }
    match outcome {
        Ok(note) => {
            status.phase = Some(ClonePhase::Completed);
            status.completion_time = Some(Time(Timestamp::now()));
            status.progress = Some("100%".into());
            let msg = format!("{target} was cloned from {source}{note}");
            let _ = write(
                &api,
                &obj,
                &status,
                Desired::truthy(condition::READY, reason::COMPLETED, msg.clone()),
                idle(
                    condition::PROGRESSING,
                    reason::COMPLETED,
                    "The task is done.",
                ),
            )
            .await;
            status::publish(&ctx.recorder, &*obj, EventType::Normal, "Completed", msg).await;
        }
        Err((reason, message)) => {
            let uid = obj.uid().unwrap_or_default();
            if let Err(error) = remove_leftovers(&ctx, &uid, &status).await {
                tracing::warn!(%error, "failed to remove what the failed task made");
            }
            crate::metrics::get().error("VMClone", reason);
            status.phase = Some(ClonePhase::Failed);
            status.completion_time = Some(Time(Timestamp::now()));
            let _ = write(
                &api,
                &obj,
                &status,
                idle(condition::READY, reason, message.clone()),
                idle(condition::PROGRESSING, reason, message.clone()),
            )
            .await;
            status::publish(&ctx.recorder, &*obj, EventType::Warning, reason, message).await;
        }
    }
}

async fn copy_all(
    api: &Api<VMClone>,
    obj: &VMClone,
    ctx: &Context,
    status: &mut VMCloneStatus,
    cancel: &Arc<AtomicBool>,
    copying: &str,
) -> Result<(), (&'static str, String)> {
    let strategy = strategy_of(obj.spec.storage.strategy);
    for i in 0..status.disks.len() {
        let d = status.disks[i].clone();
        if d.strategy.as_deref() == Some(SHARED) {
            continue;
        }
        let (Some(dst), total) = (d.target.clone(), d.total_bytes.unwrap_or(0)) else {
            continue;
        };
        if d.strategy.is_some() && Path::new(&dst).exists() {
            continue; // Copied before an agent restart.
        }
        // A partial copy from before a restart is started over.
        let _ = tokio::fs::remove_file(&dst).await;
        // Progress as the copier counts it: bytes of data extents done, of their total.
        let done = Arc::new(AtomicU64::new(0));
        let of = Arc::new(AtomicU64::new(total));
        let (src, dst2, done2, of2, cancel2) = (
            PathBuf::from(&d.source),
            PathBuf::from(&dst),
            done.clone(),
            of.clone(),
            cancel.clone(),
        );
        let mut task = tokio::task::spawn_blocking(move || {
            copy::copy_file(
                &src,
                &dst2,
                strategy,
                |n, t| {
                    of2.store(t, Ordering::Relaxed);
                    done2.store(n, Ordering::Relaxed);
                },
                &cancel2,
            )
        });
        let mut last = 0;
        let report = loop {
            tokio::select! {
                r = &mut task => break r,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    let n = done.load(Ordering::Relaxed);
                    let t = of.load(Ordering::Relaxed);
                    crate::metrics::get().clone_copied_bytes.inc_by(n.saturating_sub(last));
                    last = n;
                    status.disks[i].total_bytes = Some(t);
                    status.disks[i].copied_bytes = Some(n.min(t));
                    status.progress = Some(progress(&status.disks));
                    let _ = write(api, obj, status, idle(condition::READY, reason::COPYING, copying.to_string()), Desired::truthy(condition::PROGRESSING, reason::COPYING, copying.to_string())).await;
                }
            }
        };
        let report = match report {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return Err((
                    reason::COPY_FAILED,
                    format!("Copying {} failed: {e}.", d.source),
                ));
            }
            Err(e) => {
                return Err((
                    reason::COPY_FAILED,
                    format!("Copying {} failed: {e}.", d.source),
                ));
            }
        };
        crate::metrics::get()
            .clone_copied_bytes
            .inc_by(report.data_bytes.saturating_sub(last));
        let disk = &mut status.disks[i];
        disk.strategy = Some(match report.strategy_used {
            StrategyUsed::Reflink => "Reflink".into(),
            StrategyUsed::Copy => "Copy".into(),
        });
        disk.total_bytes = Some(report.data_bytes);
        disk.copied_bytes = Some(report.data_bytes);
        status.progress = Some(progress(&status.disks));
        let _ = write(
            api,
            obj,
            status,
            idle(condition::READY, reason::COPYING, copying.to_string()),
            Desired::truthy(condition::PROGRESSING, reason::COPYING, copying.to_string()),
        )
        .await;
    }
    refresh_pools(ctx).await;
    Ok(())
}

/// Defines the clone (and starts it when asked). Returns a note for the Ready message.
///
/// Checks `cancel` before each step that makes something (the UEFI variable store, the
/// definition, the start): a task deleted meanwhile stops there, and its cleanup removes what
/// was made, including a domain this task defined.
async fn define(
    ctx: &Context,
    obj: &VMClone,
    status: &mut VMCloneStatus,
    source_xml: &DomainXml,
    api: &Api<VMClone>,
    cancel: &Arc<AtomicBool>,
) -> Result<String, (&'static str, String)> {
    let target = status.target_name.clone().unwrap_or_default();
    let cancelled = || {
        (
            reason::DEFINE_FAILED,
            format!("The task was stopped before {target} was defined."),
        )
    };
    if cancel.load(Ordering::SeqCst) {
        return Err(cancelled());
    }
    status.phase = Some(ClonePhase::Defining);
    let msg = format!("Defining {target}.");
    let _ = write(
        api,
        obj,
        status,
        idle(condition::READY, reason::DEFINING, msg.clone()),
        Desired::truthy(condition::PROGRESSING, reason::DEFINING, msg.clone()),
    )
    .await;
    let fail = |e: String| (reason::DEFINE_FAILED, e);
    let uid = obj.uid().unwrap_or_default();

    // New MACs, unique on the node and among VMInterfaces.
    let mut used: Vec<String> = super::interface::node_macs(ctx)
        .await
        .map_err(|e| fail(e.to_string()))?
        .into_iter()
        .map(|(m, _)| m)
        .collect();
    let mut macs = Vec::new();
    for _ in &source_xml.interfaces {
        let mac = super::interface::allocate_mac(&used);
        used.push(mac.clone());
        macs.push(mac);
    }
    // A UEFI variable store of its own, recorded in the status before the definition so that a
    // cleanup finds it.
    let nvram = match &source_xml.nvram {
        Some(src) => {
            let dst = clone_xml::per_guest_path(src, &target);
            let (s, d, stop) = (PathBuf::from(src), PathBuf::from(&dst), cancel.clone());
            let _ = std::fs::remove_file(&d);
            tokio::task::spawn_blocking(move || {
                copy::copy_file(&s, &d, Strategy::Copy, |_, _| {}, &stop)
            })
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(|e| fail(format!("Copying the UEFI variable store failed: {e}.")))?;
            if !status.disks.iter().any(|d| d.target.as_ref() == Some(&dst)) {
                status.disks.push(CloneDisk {
                    source: src.clone(),
                    target: Some(dst.clone()),
                    strategy: Some("Copy".into()),
                    message: Some("UEFI variable store".into()),
                    ..Default::default()
                });
            }
            let _ = write(
                api,
                obj,
                status,
                idle(condition::READY, reason::DEFINING, msg.clone()),
                Desired::truthy(condition::PROGRESSING, reason::DEFINING, msg),
            )
            .await;
            Some(dst)
        }
        None => None,
    };
    // Copies by source path, with the pool each went to.
    let copies: HashMap<String, (String, Option<String>)> = status
        .disks
        .iter()
        .filter(|d| d.strategy.as_deref() != Some(SHARED))
        .filter_map(|d| {
            d.target
                .clone()
                .map(|t| (d.source.clone(), (t, d.pool.clone())))
        })
        .collect();
    let mut edits = CloneEdits {
        name: target.clone(),
        task_uid: uid.clone(),
        disk_paths: copies
            .iter()
            .map(|(s, (t, _))| (s.clone(), t.clone()))
            .collect(),
        macs,
        nvram,
        ..Default::default()
    };
    let (source, start) = (obj.spec.source.clone(), obj.spec.start);
    let (tgt, uid2, stop) = (target.clone(), uid.clone(), cancel.clone());
    let defined = ctx
        .libvirt
        .call("define the clone", move |c| {
            // After an agent restart the clone may already be defined by this very task.
            if let Ok(dom) = c.lookup_domain_by_name(&tgt) {
                let xml = dom.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)?;
                if clone_xml::clone_task_of(&xml).as_deref() == Some(uid2.as_str()) {
                    return Ok(Ok(dom.uuid_string()?));
                }
                return Ok(Err((
                    reason::NAME_CONFLICT,
                    format!("A domain named {tgt} appeared while the disks were copied."),
                )));
            }
            let src = c.lookup_domain_by_name(&source)?;
            let xml = src
                .xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE | virt::sys::VIR_DOMAIN_XML_SECURE)?;
            let parsed = match domain::parse_domain(&xml) {
                Ok(p) => p,
                Err(e) => {
                    return Ok(Err((
                        reason::DEFINE_FAILED,
                        format!("The source's XML could not be read: {e}."),
                    )));
                }
            };
            // Every writable disk must point at its copy: never share one by mistake.
            for d in &parsed.disks {
                let missing = match disk_use(d, &source) {
                    DiskUse::File(path) => !copies.contains_key(&path),
                    DiskUse::Volume { pool, volume } => {
                        match copy_volume(c, &pool, &volume, &copies)? {
                            Some(new) => {
                                edits.volumes.insert((pool, volume), new);
                                false
                            }
                            None => true,
                        }
                    }
                    DiskUse::Unsupported(m) => return Ok(Err((reason::UNSUPPORTED_DISK, m))),
                    DiskUse::Empty | DiskUse::Shared(_) => false,
                };
                if missing {
                    return Ok(Err((
                        reason::DEFINE_FAILED,
                        format!(
                            "Disk {} ({}) of {source} has no copy: the source changed while it was cloned. Delete this VMClone and create it again.",
                            d.target.as_deref().unwrap_or("without target"),
                            d.source_label().unwrap_or_default()
                        ),
                    )));
                }
            }
            let new_xml = match clone_xml::clone_xml(&xml, &edits) {
                Ok(x) => x,
                Err(e) => {
                    return Ok(Err((
                        reason::DEFINE_FAILED,
                        format!("The source's XML could not be read: {e}."),
                    )));
                }
            };
            if stop.load(Ordering::SeqCst) {
                return Ok(Err((
                    reason::DEFINE_FAILED,
                    format!("The task was stopped before {tgt} was defined."),
                )));
            }
            let dom = c.define_domain_xml(&new_xml)?;
            Ok(Ok(dom.uuid_string()?))
        })
        .await
        .map_err(|e| fail(format!("{e}")))??;
    status.target_uuid = Some(defined);
    if !start {
        return Ok(".".into());
    }
    if cancel.load(Ordering::SeqCst) {
        // Deleted just now: the cleanup undefines the clone; never start it.
        return Ok(".".into());
    }
    let tgt = target.clone();
    match ctx
        .libvirt
        .call("start the clone", move |c| {
            c.lookup_domain_by_name(&tgt)?.create().map(|_| ())
        })
        .await
    {
        Ok(()) => Ok(" and started.".into()),
        Err(e) => Ok(format!(", but starting it failed: {e}.")),
    }
}

/// The `(pool, volume)` of the copy of volume `volume` of pool `pool`, from the copies by source
/// path: the copy's file name in the pool it went to, which libvirt must list after a refresh.
/// `None` when the volume has no copy.
fn copy_volume(
    c: &virt::connect::Connect,
    pool: &str,
    vol: &str,
    copies: &HashMap<String, (String, Option<String>)>,
) -> Result<Option<(String, String)>, virt::error::Error> {
    let Ok(found) = volume::resolve_volume(c, pool, vol) else {
        return Ok(None);
    };
    let Some((copy, Some(dest_pool))) = copies.get(&found.path) else {
        return Ok(None);
    };
    let Some(name) = Path::new(copy)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
    else {
        return Ok(None);
    };
    let p = c.lookup_storage_pool_by_name(dest_pool)?;
    p.refresh(0)?;
    let v = p.lookup_storage_vol_by_name(&name)?;
    if std::fs::canonicalize(v.path()?).ok() != std::fs::canonicalize(copy).ok() {
        // Another file of that name: the copy is not the volume the pool knows.
        return Ok(None);
    }
    Ok(Some((dest_pool.clone(), name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_named_after_the_original() {
        let dir = tempfile::tempdir().unwrap();
        let p = free_copy_name(dir.path(), Path::new("/x/disk.img"), 1, &[]);
        assert_eq!(p, dir.path().join("disk-clone1.img"));
        std::fs::write(&p, b"").unwrap();
        assert_eq!(
            free_copy_name(dir.path(), Path::new("/x/disk.img"), 1, &[]),
            dir.path().join("disk-clone2.img")
        );
        assert_eq!(
            free_copy_name(dir.path(), Path::new("/x/root"), 3, &[]),
            dir.path().join("root-clone3")
        );
    }

    #[test]
    fn progress_counts_copied_disks_only() {
        let disks = vec![
            CloneDisk {
                strategy: Some(SHARED.into()),
                ..Default::default()
            },
            CloneDisk {
                total_bytes: Some(200),
                copied_bytes: Some(50),
                ..Default::default()
            },
            CloneDisk {
                total_bytes: Some(200),
                copied_bytes: Some(200),
                ..Default::default()
            },
        ];
        assert_eq!(progress(&disks), "62%");
        assert_eq!(progress(&[]), "100%");
        let over = [CloneDisk {
            total_bytes: Some(100),
            copied_bytes: Some(150),
            ..Default::default()
        }];
        assert_eq!(progress(&over), "100%", "never above 100%");
    }

    fn disk(xml: &str) -> DiskXml {
        domain::parse_domain(&format!("<domain><devices>{xml}</devices></domain>"))
            .unwrap()
            .disks
            .remove(0)
    }

    #[test]
    fn writable_disks_that_are_no_files_are_refused() {
        let file = disk(
            "<disk type='file' device='disk'><source file='/p/a.img'/><target dev='vda'/></disk>",
        );
        assert_eq!(disk_use(&file, "web"), DiskUse::File("/p/a.img".into()));
        let floppy = disk(
            "<disk type='file' device='floppy'><source file='/p/f.img'/><target dev='fda'/></disk>",
        );
        assert_eq!(disk_use(&floppy, "web"), DiskUse::File("/p/f.img".into()));
        let vol = disk(
            "<disk type='volume' device='disk'><source pool='p' volume='v.img'/><target dev='vdb'/></disk>",
        );
        assert_eq!(
            disk_use(&vol, "web"),
            DiskUse::Volume {
                pool: "p".into(),
                volume: "v.img".into()
            }
        );
        let empty = disk("<disk type='file' device='cdrom'><target dev='sda'/><readonly/></disk>");
        assert_eq!(disk_use(&empty, "web"), DiskUse::Empty);

        for (xml, what) in [
            (
                "<disk type='block' device='disk'><source dev='/dev/vg/lv'/><target dev='vdc'/></disk>",
                "vdc (block device /dev/vg/lv)",
            ),
            (
                "<disk type='network' device='disk'><source protocol='iscsi' name='iqn.x/1'><host name='san'/></source><target dev='vdd'/></disk>",
                "vdd (network disk iscsi://san/iqn.x/1)",
            ),
            (
                "<disk type='block' device='lun'><source dev='/dev/sdx'/><target dev='sdb'/></disk>",
                "sdb (block device /dev/sdx)",
            ),
        ] {
            let DiskUse::Unsupported(m) = disk_use(&disk(xml), "web") else {
                panic!("{xml} is not refused");
            };
            assert!(
                m.starts_with(&format!("Disk {what} of web is writable")),
                "{m}"
            );
            assert!(
                m.contains("<readonly/> or <shareable/>") && m.contains("dir, fs or netfs pool"),
                "{m}"
            );
        }

        for xml in [
            "<disk type='block' device='disk'><source dev='/dev/vg/lv'/><target dev='vdc'/><readonly/></disk>",
            "<disk type='block' device='lun'><source dev='/dev/sdx'/><target dev='sdb'/><shareable/></disk>",
            "<disk type='network' device='cdrom'><source protocol='https' name='/d.iso'><host name='h'/></source><target dev='sdc'/></disk>",
            "<disk type='volume' device='disk'><source pool='p' volume='v.img'/><target dev='vdb'/><readonly/></disk>",
        ] {
            assert!(
                matches!(disk_use(&disk(xml), "web"), DiskUse::Shared(_)),
                "{xml}"
            );
        }
    }
}
