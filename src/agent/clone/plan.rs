//! The pure part of a clone task: what to do with each disk of the source, the clone's name,
//! where each copy goes and whether there is room. No client, no libvirt, no filesystem.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::block;
use super::reason::CloneReason;
use super::steps::{self, Step};
pub use super::steps::{DiskUse, disk_use};
use crate::agent::refusal::Refusal;
use crate::api::{
    CloneDisk, ClonePhase, CopyKind, OverlayCopy, StoragePoolSummary, VMCloneSpec, VMCloneStatus,
};
use crate::libvirt::block_clone::{BlockRef, BlockVolume};
use crate::libvirt::domain::DomainXml;
use crate::libvirt::facade::VolumeLookup;
use crate::libvirt::volume;
use crate::tenancy::Grants;

/// `strategy` of a disk the clone shares with its source.
pub const SHARED: &str = "Shared";

/// The source domain as observed.
#[derive(Clone, Debug, Default)]
pub enum Source {
    /// Not defined on this node.
    #[default]
    Missing,
    /// Running.
    Running,
    /// Shut off, with its persistent definition.
    ShutOff(DomainXml),
}

/// What the agent knows of a file a copy is made from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileFacts {
    /// Its directory, symlinks resolved (empty when it does not exist).
    pub dir: PathBuf,
    /// The space it occupies (what the space check counts).
    pub allocated: u64,
    /// Its data extents (what progress counts).
    pub data: u64,
    /// Why its image is refused ([`crate::image::qcow2::Verdict::refusal`]); `None` when it
    /// may be copied.
    pub unsafe_image: Option<String>,
    /// Its backing chain, when it is a qcow2 overlay whose chain may be read.
    pub overlay: Option<Chain>,
}

/// The backing chain of an overlay to copy, as merging it into a standalone copy
/// (`spec.storage.flatten`) needs it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    /// How many backing images it has.
    pub links: usize,
    /// The space a merged copy may take: the allocation of every image of the chain (the
    /// overlay's too), at most the virtual size and its qcow2 metadata.
    pub allocated: u64,
    /// The data extents of every image of the chain, at most the virtual size (what the
    /// progress of a merge counts).
    pub data: u64,
}

/// Everything the plan reads, gathered by `observe`.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The source domain.
    pub source: Source,
    /// Names of every domain on the node.
    pub names: Vec<String>,
    /// The task that made the domain named `spec.targetName`, if one exists and a task made it.
    pub target_task: Option<String>,
    /// Every storage pool of the node.
    pub pools: Vec<StoragePoolSummary>,
    /// Each pool's target directory, symlinks resolved.
    pub pool_dirs: HashMap<String, PathBuf>,
    /// The agent's allowed directories (configured ones and active pools'), symlinks resolved.
    pub allowed: Vec<PathBuf>,
    /// The `type='volume'` disks' volumes, by (pool, volume).
    pub volumes: HashMap<(String, String), VolumeLookup>,
    /// The files to copy, by path.
    pub files: HashMap<String, FileFacts>,
    /// Available bytes of directories outside pools, by directory.
    pub free: HashMap<PathBuf, u64>,
    /// Files that exist in the directories copies may go to.
    pub existing: HashSet<PathBuf>,
    /// What the task's namespace is granted (everything in open mode).
    pub grants: Grants,
    /// The volumes behind writable block disks and volume disks of pools that hold no files
    /// (absent: no active pool holds it).
    pub block: HashMap<BlockRef, BlockVolume>,
}

/// The task's plan: the clone's name and one entry per disk of the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Name of the clone.
    pub target: String,
    /// Shared disks and planned copies.
    pub disks: Vec<CloneDisk>,
}

/// What the reconcile does with a task that is not running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Wait (phase Pending) for the source to appear or to shut off.
    Wait(Refusal<CloneReason>),
    /// Fail the task before anything is made.
    Refuse(Refusal<CloneReason>),
    /// The task started before (the agent restarted): its plan is in the status.
    Resume,
    /// Start the task with this plan.
    Start(Plan),
}

/// Whether the task is over (Completed or Failed): nothing more to do.
pub fn settled(status: &VMCloneStatus) -> bool {
    matches!(
        status.phase,
        Some(ClonePhase::Completed | ClonePhase::Failed)
    )
}

/// Whether the task started before, its plan recorded in the status (even when it copies
/// nothing).
pub fn resumes(status: &VMCloneStatus) -> bool {
    matches!(
        status.phase,
        Some(ClonePhase::Copying | ClonePhase::Defining)
    ) && status.target_name.is_some()
}

pub(super) fn storage(message: String) -> Refusal<CloneReason> {
    Refusal::fix(CloneReason::StorageNotUsable, message)
}

/// A grant is missing: the task waits (phase Pending) until a cluster admin grants it, or the
/// spec changes; nothing is created meanwhile.
pub(super) fn not_granted(message: String) -> Refusal<CloneReason> {
    Refusal::fix(CloneReason::NotGranted, message)
}

/// Decides what happens to a task that is neither settled nor running.
pub fn decide(
    spec: &VMCloneSpec,
    uid: &str,
    node: &str,
    status: &VMCloneStatus,
    observed: &Observed,
) -> Decision {
    let source = &spec.source;
    // A task that started was judged then: it resumes after an agent restart as a running one
    // goes on. Before anything about the source is said, so whether it exists stays unknown.
    if !resumes(status) && !observed.grants.domain(source) {
        return Decision::Wait(not_granted(observed.grants.domain_refusal(source)));
    }
    let config = match &observed.source {
        Source::Missing => {
            return Decision::Wait(Refusal::wait(
                CloneReason::SourceNotFound,
                format!(
                    "Domain {source} is not defined on node {node}; the task starts once it is."
                ),
                Duration::from_secs(300),
            ));
        }
        // The domain's stop event wakes the task.
        Source::Running => {
            return Decision::Wait(Refusal::wait(
                CloneReason::SourceRunning,
                format!("{source} is running; the clone starts by itself once it is shut off."),
                Duration::from_secs(600),
            ));
        }
        Source::ShutOff(config) => config,
    };
    if resumes(status) {
        return Decision::Resume;
    }
    match plan(spec, uid, node, config, observed) {
        Ok(p) => Decision::Start(p),
        // A grant may come later: the task waits for it rather than fail.
        Err(r) if r.reason == CloneReason::NotGranted => Decision::Wait(r),
        Err(r) => Decision::Refuse(r),
    }
}

/// Chooses the clone's name and where each disk goes; checks that every writable disk can be
/// copied and that there is space. A refusal is permanent, with nothing created.
pub fn plan(
    spec: &VMCloneSpec,
    uid: &str,
    node: &str,
    config: &DomainXml,
    obs: &Observed,
) -> Result<Plan, Refusal<CloneReason>> {
    let source = &spec.source;
    let grants = &obs.grants;
    // A target name outside the grant, before saying whether such a domain exists.
    if let Some(t) = &spec.target_name
        && !grants.domain(t)
    {
        return Err(not_granted(format!(
            "spec.targetName: {}",
            grants.domain_refusal(t)
        )));
    }

    let steps = steps::steps(spec, config, obs)?;

    let names = &obs.names;
    let (target, number) = match &spec.target_name {
        Some(t) => {
            if names.contains(t) && obs.target_task.as_deref() != Some(uid) {
                return Err(Refusal::fix(
                    CloneReason::NameConflict,
                    format!(
                        "A domain named {t} already exists on node {node}; choose another spec.targetName."
                    ),
                ));
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
    if !grants.domain(&target) {
        return Err(not_granted(format!(
            "The clone would be named {target}: {} Set spec.targetName to a granted name.",
            grants.domain_refusal(&target)
        )));
    }

    // The fallback pool, or why it cannot take copies; an ungranted one takes none.
    let fallback_granted = grants.pool(&spec.storage.pool);
    let fallback = match obs
        .pools
        .iter()
        .filter(|_| fallback_granted)
        .find(|p| p.name == spec.storage.pool && p.active)
    {
        Some(f) if volume::holds_files(&f.type_) && f.path.is_some() => Ok(Some(f)),
        Some(f) => Err(format!(
            "the fallback pool {} is a {} pool, which cannot hold file copies; set spec.storage.pool to an active dir, fs or netfs pool",
            f.name, f.type_
        )),
        None => Ok(None),
    };
    let mut disks = Vec::new();
    // Bytes each destination directory must hold, with its available bytes.
    let mut need: HashMap<PathBuf, (u64, u64, String)> = HashMap::new();
    let mut pool_need: HashMap<String, u64> = HashMap::new();
    let bctx = block::Ctx {
        spec,
        obs,
        fallback: &fallback,
        fallback_granted,
        number,
    };
    for step in steps {
        let (src, vol_pool) = match step {
            Step::Block(b) => {
                disks.push(block::plan_block(
                    &bctx,
                    &b,
                    &disks,
                    &mut need,
                    &mut pool_need,
                )?);
                continue;
            }
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
        let facts = obs.files.get(&src).cloned().unwrap_or_default();
        let dir = facts.dir.clone();
        let pool = obs.pools.iter().find(|p| {
            p.active
                && match &vol_pool {
                    // A volume's own pool, even when another pool shares its directory.
                    Some(name) => &p.name == name,
                    // A granted pool of the file's directory (all are, in open mode).
                    None => obs.pool_dirs.get(&p.name) == Some(&dir) && grants.pool(&p.name),
                }
        });
        // An overlay stays one (sharing its base), or its chain is merged into the copy.
        let overlay = facts.overlay.map(|chain| {
            if spec.storage.flatten {
                (OverlayCopy::Flattened, chain.allocated, chain.data)
            } else {
                (OverlayCopy::SharedBase, facts.allocated, facts.data)
            }
        });
        let (allocated, data) = overlay.map_or((facts.allocated, facts.data), |o| (o.1, o.2));
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
                Ok(None) if !fallback_granted => {
                    return Err(not_granted(format!(
                        "Pool {} ({}) cannot take a file copy, and spec.storage.pool: {}",
                        p.name,
                        p.type_,
                        grants.pool_refusal(&spec.storage.pool)
                    )));
                }
                Ok(None) => {
                    return Err(storage(format!(
                        "Pool {} ({}) cannot take a file copy and the fallback pool {} is not an active pool on this node.",
                        p.name, p.type_, spec.storage.pool
                    )));
                }
                Err(why) => {
                    return Err(storage(format!(
                        "Pool {} ({}) cannot take a file copy of {src}, and {why}.",
                        p.name, p.type_
                    )));
                }
            },
            // The agent's allowed directories count in open mode only.
            None if grants.is_open() && obs.allowed.iter().any(|a| dir.starts_with(a)) => (
                dir.clone(),
                None,
                None,
                obs.free.get(&dir).copied().unwrap_or(0),
            ),
            None => {
                return Err(storage(format!(
                    "{src} lies outside the storage pools and allowed directories of this agent; it cannot be copied."
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
                    return Err(storage(format!(
                        "{here} lacks room for a copy of {src} ({allocated} bytes), and {why}."
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
        let dest = free_copy_name(&dest_dir, Path::new(&src), number, &disks, &obs.existing);
        disks.push(CloneDisk {
            source: src,
            target: Some(dest.display().to_string()),
            kind: Some(CopyKind::File),
            pool: pool_name,
            strategy: None,
            total_bytes: Some(data),
            copied_bytes: Some(0),
            message,
            overlay: overlay.map(|o| o.0),
        });
    }
    let mut over: Vec<_> = need.iter().filter(|(_, n)| n.0 > n.1).collect();
    over.sort_by(|a, b| a.0.cmp(b.0));
    if let Some((dir, (bytes, available, name))) = over.first() {
        let what = if spec.storage.flatten {
            "the sources' allocated size, for an overlay that of its whole backing chain"
        } else {
            "the sources' allocated size"
        };
        return Err(Refusal::fix(
            CloneReason::InsufficientSpace,
            format!(
                "The copies need {bytes} bytes ({what}) in {name} ({}), which has {available} available, and no fallback pool has room. Free space or set spec.storage.pool.",
                dir.display()
            ),
        ));
    }
    Ok(Plan { target, disks })
}

/// `disk.img` -> `disk-clone<N>.img` in `dir`, with the lowest N from `from` that names no
/// existing file and no copy planned so far.
pub fn free_copy_name(
    dir: &Path,
    src: &Path,
    from: u32,
    planned: &[CloneDisk],
    existing: &HashSet<PathBuf>,
) -> PathBuf {
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
        .find(|p| {
            !existing.contains(p) && !planned.iter().any(|d| d.target.as_deref() == p.to_str())
        })
        .unwrap_or_else(|| dir.join(format!("{stem}-clone{ext}")))
}

/// The copies' destination directories a plan may use: each file's own directory and the
/// fallback pool's (what `observe` lists for [`Observed::existing`]).
pub fn destination_dirs(spec: &VMCloneSpec, obs: &Observed) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = obs.files.values().map(|f| f.dir.clone()).collect();
    if let Some(p) = obs.pools.iter().find(|p| p.name == spec.storage.pool)
        && let Some(path) = &p.path
    {
        dirs.push(PathBuf::from(path));
    }
    dirs.sort();
    dirs.dedup();
    dirs
}

/// The paths of the files a source's disks copy from, before volumes are resolved.
pub fn file_disks(config: &DomainXml, source: &str) -> Vec<String> {
    config
        .disks
        .iter()
        .filter_map(|d| match disk_use(d, source) {
            DiskUse::File(p) => Some(p),
            _ => None,
        })
        .collect()
}

/// The `(pool, volume)` of each writable volume disk of a source.
pub fn volume_disks(config: &DomainXml, source: &str) -> Vec<(String, String)> {
    config
        .disks
        .iter()
        .filter_map(|d| match disk_use(d, source) {
            DiskUse::Volume { pool, volume } => Some((pool, volume)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "grants_tests.rs"]
mod grants_tests;

#[cfg(test)]
#[path = "flatten_tests.rs"]
mod flatten_tests;
