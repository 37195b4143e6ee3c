//! The task's work, run by the job runner: copy the disks, define the clone, start it if asked;
//! and undo an unfinished task. It reports progress and its end and never writes status.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;

use super::block_apply;
use super::ledger::Ledger;
use super::plan::{DiskUse, SHARED, disk_use};
use super::reason::CloneReason;
use crate::agent::jobs::{JobCtx, Stop};
use crate::agent::refusal::Refusal;
use crate::api::{CloneDisk, ClonePhase, CopyKind, CopyStrategy, OverlayCopy, VMCloneStatus};
use crate::copy::{self, Strategy, StrategyUsed, flatten};
use crate::libvirt::block_clone::{BlockClones, BlockRef};
use crate::libvirt::clone_xml::{self, CloneEdits, DiskKey};
use crate::libvirt::clones::{Clones, Copies, Defined};
use crate::libvirt::domain::{self, DomainXml};
use crate::libvirt::facade::{Domains, Storage};
use crate::libvirt::networks::Networks;

/// What a job gets: the task as planned and recorded in its status.
#[derive(Clone, Debug)]
pub struct Job {
    /// UID of the VMClone: recorded in the clone's metadata.
    pub uid: String,
    /// Namespace of the VMClone: recorded in the clone's metadata too.
    pub namespace: String,
    /// The source domain.
    pub source: String,
    /// Start the clone once defined.
    pub start: bool,
    /// How disks are copied.
    pub strategy: CopyStrategy,
    /// The source's definition as observed (its interfaces and UEFI variable store).
    pub config: DomainXml,
    /// The status with the plan (target name and disks).
    pub status: VMCloneStatus,
    /// The agent's record of the files this task created; the only list a removal uses.
    pub ledger: Ledger,
    /// The node's clone slots (`--max-clones`).
    pub slots: Arc<Semaphore>,
}

/// How a job ended.
#[derive(Debug)]
pub enum JobEnd {
    /// The clone is defined (`started`: whether starting it, when asked, worked).
    Completed {
        /// The job's view of the status.
        status: VMCloneStatus,
        /// The start, when asked.
        started: Option<Result<(), String>>,
    },
    /// The task failed; what it made is removed.
    Failed {
        /// The job's view of the status.
        status: VMCloneStatus,
        /// Why.
        why: Refusal<CloneReason>,
    },
    /// Stopped on request (shutdown: the next agent resumes; deletion: cleanup follows).
    Stopped,
}

/// The progress a job reports: its view of the status.
pub type Progress = Option<VMCloneStatus>;

fn strategy_of(s: CopyStrategy) -> Strategy {
    match s {
        CopyStrategy::Auto => Strategy::Auto,
        CopyStrategy::Copy => Strategy::Copy,
        CopyStrategy::Reflink => Strategy::Reflink,
    }
}

/// How the copy of one file ended, whichever copier made it (a byte copy, or the merge of an
/// overlay's chain): done with how and the bytes counted, the destination taken by someone
/// else, or failed with why.
enum FileCopy {
    Done(StrategyUsed, u64),
    Taken,
    Failed(String),
}

/// How a step of the job failed.
pub(super) enum Halt {
    Stopped,
    Failed(Refusal<CloneReason>),
}

pub(super) fn fail(reason: CloneReason, message: String) -> Halt {
    Halt::Failed(Refusal::fix(reason, message))
}

/// Runs a task: copies, definition, start; on failure (or when the task is abandoned) removes
/// everything it made.
pub async fn run<V: Clones + Domains + Networks + BlockClones + Storage>(
    v: &V,
    job: Job,
    ctx: &JobCtx<Progress>,
) -> JobEnd {
    let stop = Arc::new(AtomicBool::new(false));
    let watch = {
        let (stop, cancel) = (stop.clone(), ctx.cancel.clone());
        tokio::spawn(async move {
            cancel.cancelled().await;
            stop.store(true, Ordering::SeqCst);
        })
    };
    let mut status = job.status.clone();
    // One of the node's clone slots for the copies and the definition.
    let slots = job.slots.clone();
    let permit = tokio::select! {
        p = slots.acquire_owned() => p.ok(),
        () = ctx.cancel.cancelled() => None,
    };
    if permit.is_none() {
        watch.abort();
        if ctx.stop_reason() == Some(Stop::Abandon) {
            let _ = remove_leftovers(v, &job.uid, "", &job.ledger).await;
        }
        return JobEnd::Stopped;
    }
    let result = match copy_all(v, &job, &mut status, ctx, &stop).await {
        Ok(()) => {
            let _ = v.refresh_active_pools().await;
            define(v, &job, &mut status, ctx, &stop).await
        }
        Err(h) => Err(h),
    };
    watch.abort();
    drop(permit);
    let target = status.target_name.clone().unwrap_or_default();
    match result {
        Ok(started) => {
            // The files are the clone's now: a later deletion of the task keeps them.
            if let Err(error) = job.ledger.forget() {
                tracing::warn!(%error, "failed to drop the record of the task's files");
            }
            block_apply::forget_volumes(&job.ledger);
            JobEnd::Completed { status, started }
        }
        Err(Halt::Stopped) => {
            if ctx.stop_reason() == Some(Stop::Abandon) {
                // Deleted: what this run made goes (the cleanup removes the rest).
                if let Err(error) = remove_leftovers(v, &job.uid, &target, &job.ledger).await {
                    tracing::warn!(%error, "failed to remove what the stopped task made");
                }
            }
            JobEnd::Stopped
        }
        Err(Halt::Failed(why)) => {
            if let Err(error) = remove_leftovers(v, &job.uid, &target, &job.ledger).await {
                tracing::warn!(%error, "failed to remove what the failed task made");
            }
            JobEnd::Failed { status, why }
        }
    }
}

/// Copies every disk not copied yet.
async fn copy_all<V: BlockClones + Storage>(
    v: &V,
    job: &Job,
    status: &mut VMCloneStatus,
    ctx: &JobCtx<Progress>,
    stop: &Arc<AtomicBool>,
) -> Result<(), Halt> {
    let strategy = strategy_of(job.strategy);
    ctx.report(Some(status.clone()));
    for i in 0..status.disks.len() {
        let d = status.disks[i].clone();
        if d.strategy.as_deref() == Some(SHARED) {
            continue;
        }
        // A disk that is no file takes its own route.
        if let Some(r) = block_apply::block_ref_of(&job.config, &job.source, &d) {
            block_apply::copy(v, job, status, i, &r, ctx, stop).await?;
            continue;
        }
        let (Some(dst), total) = (d.target.clone(), d.total_bytes.unwrap_or(0)) else {
            continue;
        };
        let ours = job.ledger.owns(Path::new(&dst));
        if d.strategy.is_some() && ours && Path::new(&dst).exists() {
            continue; // Copied before an agent restart.
        }
        if stop.load(Ordering::SeqCst) {
            return Err(Halt::Stopped);
        }
        // The destination was reserved (created empty) when the task was planned: the copy
        // fills it, starting a partial copy from before a restart over. One not reserved (a
        // task planned by an older agent) is created exclusively: a file this task did not
        // create is never written or removed.
        let reserved = ours && Path::new(&dst).is_file();
        let (src, dst2) = (PathBuf::from(&d.source), PathBuf::from(&dst));
        let flatten = d.overlay == Some(OverlayCopy::Flattened);
        let shared = d.overlay == Some(OverlayCopy::SharedBase);
        let (copied, last) = copy_reporting(job, status, i, ctx, stop, move |progress, stop| {
            if flatten {
                return match flatten::flatten(&src, &dst2, reserved, total, progress, stop) {
                    Ok(_) => FileCopy::Done(StrategyUsed::Copy, total),
                    Err(flatten::FlattenError::AlreadyExists(_)) => FileCopy::Taken,
                    Err(e) => FileCopy::Failed(e.to_string()),
                };
            }
            let copy_file = if reserved {
                copy::copy_into_reserved
            } else {
                copy::copy_file
            };
            let copied = match copy_file(&src, &dst2, strategy, progress, stop) {
                Ok(r) => FileCopy::Done(r.strategy_used, r.data_bytes),
                Err(copy::CopyError::AlreadyExists { .. }) => return FileCopy::Taken,
                Err(e) => return FileCopy::Failed(e.to_string()),
            };
            // A shared overlay's copy keeps finding its base from another directory.
            match shared.then(|| flatten::anchor_backing(&src, &dst2)) {
                Some(Err(e)) => FileCopy::Failed(e.to_string()),
                _ => copied,
            }
        })
        .await?;
        let (used, data) = match copied.unwrap_or_else(|e| FileCopy::Failed(e.to_string())) {
            FileCopy::Done(used, data) => (used, data),
            FileCopy::Taken => return Err(taken(&dst)),
            FileCopy::Failed(e) => {
                return Err(fail(
                    CloneReason::CopyFailed,
                    format!("Copying {} failed: {e}.", d.source),
                ));
            }
        };
        crate::metrics::get()
            .clone_copied_bytes
            .inc_by(data.saturating_sub(last));
        let disk = &mut status.disks[i];
        disk.strategy = Some(match used {
            StrategyUsed::Reflink => "Reflink".into(),
            StrategyUsed::Copy => "Copy".into(),
        });
        disk.total_bytes = Some(data);
        disk.copied_bytes = Some(data);
        ctx.report(Some(status.clone()));
        ctx.wake_now();
    }
    Ok(())
}

/// Runs `copy`, a blocking copy into disk `i`'s target, off the runtime, and puts its progress
/// (bytes done, of their total, as the copier counts them) into `status.disks[i]` and the
/// copied-bytes metric every second. The copier's first progress call comes right after it
/// created the destination exclusively, so that call records the file in the task's ledger.
/// Gives the copy's result (a copy that panicked is an error) and the bytes already counted in
/// the metric; a task stopped meanwhile is [`Halt::Stopped`], whatever the copy gave.
pub(super) async fn copy_reporting<T: Send + 'static>(
    job: &Job,
    status: &mut VMCloneStatus,
    i: usize,
    ctx: &JobCtx<Progress>,
    stop: &Arc<AtomicBool>,
    copy: impl FnOnce(&mut dyn FnMut(u64, u64), &AtomicBool) -> T + Send + 'static,
) -> Result<(Result<T, tokio::task::JoinError>, u64), Halt> {
    let dst = PathBuf::from(status.disks[i].target.clone().unwrap_or_default());
    let done = Arc::new(AtomicU64::new(0));
    let of = Arc::new(AtomicU64::new(status.disks[i].total_bytes.unwrap_or(0)));
    let (done2, of2, stop2, ledger) = (done.clone(), of.clone(), stop.clone(), job.ledger.clone());
    let mut task = tokio::task::spawn_blocking(move || {
        let mut recorded = false;
        let mut progress = |n, t| {
            if !recorded {
                recorded = true;
                record(&ledger, &dst);
            }
            of2.store(t, Ordering::Relaxed);
            done2.store(n, Ordering::Relaxed);
        };
        copy(&mut progress, &stop2)
    });
    let mut last = 0;
    let copied = loop {
        tokio::select! {
            r = &mut task => break r,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                let (n, t) = (done.load(Ordering::Relaxed), of.load(Ordering::Relaxed));
                crate::metrics::get().clone_copied_bytes.inc_by(n.saturating_sub(last));
                last = n;
                status.disks[i].total_bytes = Some(t);
                status.disks[i].copied_bytes = Some(n.min(t));
                ctx.report(Some(status.clone()));
            }
        }
    };
    if stop.load(Ordering::SeqCst) {
        return Err(Halt::Stopped);
    }
    Ok((copied, last))
}

/// MAC addresses of every interface of every domain on the node, live and persistent.
async fn macs_in_use<V: Networks>(v: &V) -> Result<Vec<String>, crate::libvirt::LibvirtError> {
    Ok(v.node_macs().await?.into_iter().map(|n| n.mac).collect())
}

/// Defines the clone (and starts it when asked); returns how the start went, when asked.
///
/// Checks `stop` before each step that makes something (the UEFI variable store, the
/// definition, the start): a task deleted meanwhile stops there, and its cleanup removes what
/// was made, including a domain this task defined.
async fn define<V: Clones + Domains + Networks + BlockClones>(
    v: &V,
    job: &Job,
    status: &mut VMCloneStatus,
    ctx: &JobCtx<Progress>,
    stop: &Arc<AtomicBool>,
) -> Result<Option<Result<(), String>>, Halt> {
    let target = status.target_name.clone().unwrap_or_default();
    let libvirt = |e: crate::libvirt::LibvirtError| fail(CloneReason::DefineFailed, e.to_string());
    if stop.load(Ordering::SeqCst) {
        return Err(Halt::Stopped);
    }
    status.phase = Some(ClonePhase::Defining);
    ctx.report(Some(status.clone()));
    ctx.wake_now();

    let uuid = match v.clone_domain(&target).await.map_err(libvirt)? {
        // After an agent restart the clone may already be defined by this very task.
        Some(d) if d.task.as_deref() == Some(job.uid.as_str()) => d.uuid,
        Some(_) => {
            return Err(fail(
                CloneReason::NameConflict,
                format!("A domain named {target} appeared while the disks were copied."),
            ));
        }
        None => {
            let xml = clone_definition(v, job, status, ctx, stop).await?;
            if stop.load(Ordering::SeqCst) {
                return Err(Halt::Stopped);
            }
            match v
                .define_clone(&target, &job.uid, &xml)
                .await
                .map_err(libvirt)?
            {
                Defined::Clone(uuid) => uuid,
                Defined::NameConflict => {
                    return Err(fail(
                        CloneReason::NameConflict,
                        format!("A domain named {target} appeared while the disks were copied."),
                    ));
                }
            }
        }
    };
    status.target_uuid = Some(uuid);
    ctx.report(Some(status.clone()));
    // Deleted just now: the cleanup undefines the clone; never start it.
    if !job.start || stop.load(Ordering::SeqCst) {
        return Ok(None);
    }
    Ok(Some(
        v.start_domain(&target).await.map_err(|e| e.to_string()),
    ))
}

/// The clone's XML: new MACs, its own UEFI variable store, every writable disk on its copy.
async fn clone_definition<V: Clones + Domains + Networks + BlockClones>(
    v: &V,
    job: &Job,
    status: &mut VMCloneStatus,
    ctx: &JobCtx<Progress>,
    stop: &Arc<AtomicBool>,
) -> Result<String, Halt> {
    let target = status.target_name.clone().unwrap_or_default();
    let source = &job.source;
    let libvirt = |e: crate::libvirt::LibvirtError| fail(CloneReason::DefineFailed, e.to_string());
    // New MACs, unique on the node.
    let mut used = macs_in_use(v).await.map_err(libvirt)?;
    let mut macs = Vec::new();
    for _ in &job.config.interfaces {
        let mac = crate::agent::interface::mac::allocate_mac(&used);
        used.push(mac.clone());
        macs.push(mac);
    }
    // A UEFI variable store of its own, recorded in the progress before the definition so that
    // a cleanup finds it.
    let nvram = match &job.config.nvram {
        Some(src) => {
            let dst = clone_xml::per_guest_path(src, &target);
            let (s, d, stop) = (PathBuf::from(src), PathBuf::from(&dst), stop.clone());
            // This task's own store from before a restart goes; another domain's never does.
            job.ledger.remove_own(&d).map_err(|e| {
                fail(
                    CloneReason::DefineFailed,
                    format!("Removing the partial UEFI variable store failed: {e}."),
                )
            })?;
            let ledger = job.ledger.clone();
            let copied = tokio::task::spawn_blocking(move || {
                let mut recorded = false;
                copy::copy_file(
                    &s,
                    &d,
                    Strategy::Copy,
                    |_, _| {
                        if !recorded {
                            recorded = true;
                            record(&ledger, &d);
                        }
                    },
                    &stop,
                )
            })
            .await
            .map_err(|e| fail(CloneReason::DefineFailed, e.to_string()))?;
            match copied {
                Ok(_) => {}
                Err(copy::CopyError::AlreadyExists { .. }) => {
                    return Err(fail(
                        CloneReason::NameConflict,
                        format!(
                            "The UEFI variable store {dst} of the clone's name belongs to another domain; it was left untouched. Choose another spec.target.name."
                        ),
                    ));
                }
                Err(e) => {
                    return Err(fail(
                        CloneReason::DefineFailed,
                        format!("Copying the UEFI variable store failed: {e}."),
                    ));
                }
            }
            if !status.disks.iter().any(|d| d.target.as_ref() == Some(&dst)) {
                status.disks.push(CloneDisk {
                    source: src.clone(),
                    target: Some(dst.clone()),
                    kind: Some(CopyKind::File),
                    strategy: Some("Copy".into()),
                    message: Some("UEFI variable store".into()),
                    ..Default::default()
                });
            }
            ctx.report(Some(status.clone()));
            ctx.wake_now();
            Some(dst)
        }
        None => None,
    };
    // Copies by source path, with the pool each went to.
    let copies: Copies = status
        .disks
        .iter()
        .filter(|d| d.strategy.as_deref() != Some(SHARED))
        .filter_map(|d| {
            d.target
                .clone()
                .map(|t| (d.source.clone(), (t, d.pool.clone())))
        })
        .collect();
    // The copies that merged their chain: by source path, and as `(pool, volume)` of the copy.
    let merged = status
        .disks
        .iter()
        .filter(|d| d.overlay == Some(OverlayCopy::Flattened));
    let flattened = merged
        .clone()
        .map(|d| DiskKey::File(d.source.clone()))
        .collect();
    let merged_volumes: Vec<(String, String)> = merged
        .filter_map(|d| {
            let name = Path::new(d.target.as_deref()?).file_name()?;
            Some((d.pool.clone()?, name.to_string_lossy().into_owned()))
        })
        .collect();
    let mut edits = CloneEdits {
        flattened,
        name: target.clone(),
        task_uid: job.uid.clone(),
        namespace: job.namespace.clone(),
        disk_paths: copies
            .iter()
            .map(|(s, (t, _))| (s.clone(), t.clone()))
            .collect::<HashMap<_, _>>(),
        macs,
        nvram,
        ..Default::default()
    };
    let xml = v.source_xml(source).await.map_err(libvirt)?;
    let unreadable = |e: roxmltree::Error| {
        fail(
            CloneReason::DefineFailed,
            format!("The source's XML could not be read: {e}."),
        )
    };
    let parsed = domain::parse_domain(&xml).map_err(unreadable)?;
    let blocks = block_apply::edits(v, job, status, &mut edits).await?;
    // Every writable disk must point at its copy: never share one by mistake.
    for d in &parsed.disks {
        let missing = match disk_use(d, source) {
            DiskUse::File(path) => !copies.contains_key(&path),
            DiskUse::Block(dev) => !blocks.contains(&BlockRef::Device(dev)),
            DiskUse::Volume { pool, volume }
                if blocks.contains(&BlockRef::Volume {
                    pool: pool.clone(),
                    volume: volume.clone(),
                }) =>
            {
                false
            }
            DiskUse::Volume { pool, volume } => {
                match v
                    .copy_volume(&pool, &volume, &copies)
                    .await
                    .map_err(libvirt)?
                {
                    Some(new) => {
                        if merged_volumes.contains(&new) {
                            edits
                                .flattened
                                .insert(DiskKey::Volume(pool.clone(), volume.clone()));
                        }
                        edits.volumes.insert((pool, volume), new);
                        false
                    }
                    None => true,
                }
            }
            DiskUse::Unsupported(m) => return Err(fail(CloneReason::UnsupportedDisk, m)),
            DiskUse::Empty | DiskUse::Shared(_) => false,
        };
        if missing {
            return Err(fail(
                CloneReason::DefineFailed,
                format!(
                    "Disk {} ({}) of {source} has no copy: the source changed while it was cloned. Delete this VMClone and create it again.",
                    d.target.as_deref().unwrap_or("without target"),
                    d.source_label().unwrap_or_default()
                ),
            ));
        }
    }
    clone_xml::clone_xml(&xml, &edits).map_err(unreadable)
}

/// Records a file the task just created; a failure is logged (the file is then left behind
/// rather than risked: nothing removes a file that is not recorded).
pub(super) fn record(ledger: &Ledger, path: &Path) {
    if let Err(error) = ledger.record(path) {
        tracing::warn!(%error, path = %path.display(), "failed to record a created file");
    }
}

/// The refusal when a copy's destination exists and this task did not create it.
pub(super) fn taken(dst: &str) -> Halt {
    fail(
        CloneReason::NameConflict,
        format!(
            "The copy's destination {dst} was created by someone else meanwhile (another clone of the same source, say); it was left untouched. Delete this VMClone and create it again, or set spec.target.name."
        ),
    )
}

/// Undoes a task that did not complete: undefines the clone if this task defined it (the
/// domain's metadata names the task), then removes the files the agent's record says this task
/// created (never a path from the status). What is already gone is fine.
pub async fn remove_leftovers<V: Clones + Storage>(
    v: &V,
    uid: &str,
    target: &str,
    ledger: &Ledger,
) -> Result<(), crate::libvirt::LibvirtError> {
    if !target.is_empty() && !uid.is_empty() {
        v.undefine_owned_clone(target, uid).await?;
    }
    block_apply::remove_volumes(v, ledger).await?;
    let ledger = ledger.clone();
    let removed = tokio::task::spawn_blocking(move || ledger.remove_all()).await;
    match removed {
        Ok(Err(error)) => tracing::warn!(%error, "failed to remove the task's files"),
        Err(error) => tracing::warn!(%error, "failed to remove the task's files"),
        Ok(Ok(())) => {}
    }
    let _ = v.refresh_active_pools().await;
    Ok(())
}

#[cfg(test)]
#[path = "apply_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "flatten_apply_tests.rs"]
mod flatten_tests;
