//! The copy of a disk that is no file (planned in [`super::block`]), run by the clone job:
//! a new volume of the same pool made by libvirt's create-from-volume, or the data streamed
//! with `qemu-img` (libiscsi for an iscsi-direct LUN, the device node otherwise) into a new
//! sparse file. Each destination is created exclusively and recorded in the agent's ledger
//! before anything is written, so a failure, a deletion or a restart removes only what this
//! task made; after an agent restart a disk not finished is started over.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::apply::{Halt, Job, Progress, copy_reporting, fail, taken};
use super::block::into_pool;
use super::ledger::Ledger;
use super::plan::{DiskUse, disk_use};
use super::reason::CloneReason;
use crate::agent::jobs::JobCtx;
use crate::api::{CloneDisk, VMCloneStatus};
use crate::copy::lun::{self, LunCopyError};
use crate::libvirt::LibvirtError;
use crate::libvirt::block_clone::{BlockClones, BlockRef, in_pool_name};
use crate::libvirt::clone_xml::CloneEdits;
use crate::libvirt::domain::DomainXml;
use crate::libvirt::facade::Storage;

/// The block disk of the source that status disk `d` copies; `None` for a file copy.
pub fn block_ref_of(config: &DomainXml, source: &str, d: &CloneDisk) -> Option<BlockRef> {
    config.disks.iter().find_map(|x| match disk_use(x, source) {
        DiskUse::Block(dev) if dev == d.source => Some(BlockRef::Device(dev)),
        DiskUse::Volume { pool, volume } if x.source_label().as_deref() == Some(&d.source) => {
            Some(BlockRef::Volume { pool, volume })
        }
        _ => None,
    })
}

fn failed(d: &CloneDisk) -> impl Fn(LibvirtError) -> Halt + '_ {
    move |e| {
        fail(
            CloneReason::CopyFailed,
            format!("Copying {} failed: {e}.", d.source),
        )
    }
}

fn ledger_failed(e: std::io::Error) -> Halt {
    fail(
        CloneReason::CopyFailed,
        format!("Recording the copy in the agent's state directory failed: {e}."),
    )
}

/// Copies status disk `i` (a block disk `r` of the source).
pub async fn copy<V: BlockClones + Storage>(
    v: &V,
    job: &Job,
    status: &mut VMCloneStatus,
    i: usize,
    r: &BlockRef,
    ctx: &JobCtx<Progress>,
    stop: &Arc<AtomicBool>,
) -> Result<(), Halt> {
    if into_pool(&status.disks[i]) {
        copy_in_pool(v, job, status, i, r, ctx, stop).await?;
    } else {
        copy_to_file(v, job, status, i, r, ctx, stop).await?;
    }
    ctx.report(Some(status.clone()));
    ctx.wake_now();
    Ok(())
}

async fn copy_in_pool<V: BlockClones + Storage>(
    v: &V,
    job: &Job,
    status: &mut VMCloneStatus,
    i: usize,
    r: &BlockRef,
    ctx: &JobCtx<Progress>,
    stop: &Arc<AtomicBool>,
) -> Result<(), Halt> {
    let d = status.disks[i].clone();
    let target = d.target.clone().unwrap_or_default();
    let vols = job.ledger.volumes();
    let gone = || {
        fail(
            CloneReason::CopyFailed,
            format!(
                "The volume of {} is no longer in an active pool; start its pool, or delete this VMClone.",
                d.source
            ),
        )
    };
    let pool = d.pool.clone().unwrap_or_default();
    if vols.owns(&pool, &target) {
        let exists = v
            .pool_volume_path(&pool, &target)
            .await
            .map_err(failed(&d))?
            .is_some();
        if d.strategy.is_some() && exists {
            return Ok(()); // Copied before an agent restart.
        }
        // A copy of this task cut short by a restart: started over.
        v.delete_volume(&pool, &target).await.map_err(failed(&d))?;
        vols.drop_one(&pool, &target).map_err(ledger_failed)?;
    }
    if stop.load(Ordering::SeqCst) {
        return Err(Halt::Stopped);
    }
    let src = v
        .block_volume(r)
        .await
        .map_err(failed(&d))?
        .ok_or_else(gone)?;
    // A disk pool names the partition itself: the next one now.
    let name = in_pool_name(&target, src.disk_device.as_deref(), &src.pool_volumes);
    vols.record(&pool, &name).map_err(ledger_failed)?;
    // The name in the status too, so that a restart finds the volume this task records.
    status.disks[i].target = Some(name.clone());
    ctx.report(Some(status.clone()));
    let made = match v.copy_in_pool(&pool, &src.volume, &name).await {
        Ok(m) => m,
        Err(e) => {
            // libvirt refuses a taken name and removes what a failed copy made.
            vols.drop_one(&pool, &name).map_err(ledger_failed)?;
            return Err(failed(&d)(e));
        }
    };
    let disk = &mut status.disks[i];
    disk.target = Some(made.name);
    disk.strategy = Some("Copy".into());
    disk.total_bytes = Some(made.capacity);
    disk.copied_bytes = Some(made.capacity);
    crate::metrics::get()
        .clone_copied_bytes
        .inc_by(made.capacity);
    Ok(())
}

/// What a stream reads.
enum Reader {
    Lun(crate::libvirt::iscsi_direct::IscsiLun),
    Device(PathBuf),
}

async fn copy_to_file<V: BlockClones>(
    v: &V,
    job: &Job,
    status: &mut VMCloneStatus,
    i: usize,
    r: &BlockRef,
    ctx: &JobCtx<Progress>,
    stop: &Arc<AtomicBool>,
) -> Result<(), Halt> {
    let d = status.disks[i].clone();
    let dst = PathBuf::from(d.target.clone().unwrap_or_default());
    if d.strategy.is_some() && job.ledger.owns(&dst) && dst.exists() {
        return Ok(()); // Copied before an agent restart.
    }
    // A partial copy of this task from before a restart is started over.
    job.ledger.remove_own(&dst).map_err(|e| {
        fail(
            CloneReason::CopyFailed,
            format!("Removing the partial copy {} failed: {e}.", dst.display()),
        )
    })?;
    if stop.load(Ordering::SeqCst) {
        return Err(Halt::Stopped);
    }
    let src = v.block_volume(r).await.map_err(failed(&d))?.ok_or_else(|| {
        fail(
            CloneReason::CopyFailed,
            format!(
                "The volume of {} is no longer in an active pool; start its pool, or delete this VMClone.",
                d.source
            ),
        )
    })?;
    let reader = if src.pool_type == "iscsi-direct" {
        match v.lun(&src.pool, &src.volume).await.map_err(failed(&d))? {
            Ok(l) => Reader::Lun(l),
            Err(e) => {
                return Err(fail(
                    CloneReason::StorageNotUsable,
                    format!("{} cannot be read: {e}.", d.source),
                ));
            }
        }
    } else {
        Reader::Device(PathBuf::from(&src.path))
    };
    let dst2 = dst.clone();
    let copy = move |progress: &mut dyn FnMut(u64, u64), stop: &AtomicBool| match &reader {
        Reader::Lun(l) => lun::copy_lun(l, &dst2, progress, stop),
        Reader::Device(p) => lun::copy_device(p, &dst2, progress, stop),
    };
    let (copied, last) = copy_reporting(job, status, i, ctx, stop, copy).await?;
    let copied = match copied {
        Ok(Ok(r)) => r,
        Ok(Err(LunCopyError::AlreadyExists(_))) => {
            return Err(taken(&dst.display().to_string()));
        }
        Ok(Err(LunCopyError::Cancelled(_))) => return Err(Halt::Stopped),
        Ok(Err(e)) => {
            return Err(fail(
                CloneReason::CopyFailed,
                format!("Copying {} failed: {e}.", d.source),
            ));
        }
        Err(e) => {
            return Err(fail(
                CloneReason::CopyFailed,
                format!("Copying {} failed: {e}.", d.source),
            ));
        }
    };
    crate::metrics::get()
        .clone_copied_bytes
        .inc_by(copied.logical_bytes.saturating_sub(last));
    let disk = &mut status.disks[i];
    disk.strategy = Some("Copy".into());
    disk.total_bytes = Some(copied.logical_bytes);
    disk.copied_bytes = Some(copied.logical_bytes);
    Ok(())
}

/// Points the clone's block disks at their copies in `edits`; returns the disks covered.
pub async fn edits<V: BlockClones>(
    v: &V,
    job: &Job,
    status: &VMCloneStatus,
    edits: &mut CloneEdits,
) -> Result<HashSet<BlockRef>, Halt> {
    let mut covered = HashSet::new();
    for d in &status.disks {
        let Some(r) = block_ref_of(&job.config, &job.source, d) else {
            continue;
        };
        let (Some(target), Some(pool)) = (d.target.clone(), d.pool.clone()) else {
            continue;
        };
        if d.strategy.is_none() {
            continue;
        }
        edits.disk_paths.remove(&d.source);
        match (&r, into_pool(d)) {
            (BlockRef::Device(dev), true) => {
                let Some(path) = v
                    .pool_volume_path(&pool, &target)
                    .await
                    .map_err(failed(d))?
                else {
                    continue;
                };
                edits.disk_paths.insert(dev.clone(), path);
            }
            (BlockRef::Volume { pool: p, volume }, true) => {
                edits
                    .volumes
                    .insert((p.clone(), volume.clone()), (pool, target));
            }
            (BlockRef::Device(dev), false) => {
                edits.block_to_file.insert(dev.clone(), target);
            }
            (BlockRef::Volume { pool: p, volume }, false) => {
                edits
                    .volume_to_file
                    .insert((p.clone(), volume.clone()), target);
            }
        }
        covered.insert(r);
    }
    Ok(covered)
}

/// Deletes the volumes the task created in pools (its record says which), then the record.
pub async fn remove_volumes<V: Storage>(v: &V, ledger: &Ledger) -> Result<(), LibvirtError> {
    let vols = ledger.volumes();
    for (pool, name) in vols.list() {
        v.delete_volume(&pool, &name).await?;
        if let Err(error) = vols.drop_one(&pool, &name) {
            tracing::warn!(%error, "failed to update the record of the task's volumes");
        }
    }
    Ok(())
}

/// Drops the record of the task's volumes: they are the clone's now.
pub fn forget_volumes(ledger: &Ledger) {
    if let Err(error) = ledger.volumes().forget() {
        tracing::warn!(%error, "failed to drop the record of the task's volumes");
    }
}

#[cfg(test)]
#[path = "block_apply_tests.rs"]
mod tests;
