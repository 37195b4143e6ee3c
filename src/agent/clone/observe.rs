//! The only step of a clone task's reconcile that reads: the task's latest status from the API,
//! the source domain, and (for a task about to be planned) the pools, volumes, files and free
//! space the plan weighs.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use kube::ResourceExt;
use kube::api::Api;

use super::plan::{self, Chain, FileFacts, Observed, Source};
use crate::agent::context::{Context, ReconcileError, object_name};
use crate::agent::roots;
use crate::api::{VMClone, VMCloneStatus};
use crate::copy;
use crate::image::chain as qcow2_chain;
use crate::image::qcow2;
use crate::libvirt::block_clone::BlockClones;
use crate::libvirt::clones::Clones;
use crate::libvirt::facade::{Domains, Storage, VolumeLookup};

/// The task's status as the API server has it now: the cache may not hold the last write yet,
/// and a task must never be started twice.
pub async fn fresh_status(
    api: &Api<VMClone>,
    obj: &VMClone,
) -> Result<VMCloneStatus, ReconcileError> {
    let fresh = api
        .get_opt(&obj.name_any())
        .await
        .map_err(|source| ReconcileError::Api {
            action: "read",
            object: object_name(obj),
            source,
        })?;
    Ok(fresh
        .and_then(|o| o.status)
        .or_else(|| obj.status.clone())
        .unwrap_or_default())
}

/// Reads what the plan of `obj` needs, with what its namespace is granted; a task that resumes
/// needs only its source.
pub async fn observe(
    obj: &VMClone,
    ctx: &Context,
    status: &VMCloneStatus,
) -> Result<Observed, ReconcileError> {
    let v = &ctx.libvirt;
    let spec = &obj.spec;
    let mut obs = Observed {
        grants: ctx.grants.grants(&obj.namespace().unwrap_or_default()),
        ..Default::default()
    };
    // Nothing of an ungranted source is read for a new task: the plan refuses it.
    if !plan::resumes(status) && !obs.grants.domain(&spec.source) {
        return Ok(obs);
    }
    obs.source = match v.domain(&spec.source).await? {
        None => Source::Missing,
        Some(view) if view.active => Source::Running,
        Some(view) => Source::ShutOff(view.config),
    };
    let Source::ShutOff(config) = &obs.source else {
        return Ok(obs);
    };
    if plan::resumes(status) {
        return Ok(obs);
    }
    let config = config.clone();
    let mut paths = plan::file_disks(&config, &spec.source);
    for (pool, volume) in plan::volume_disks(&config, &spec.source) {
        let found = v.volume(&pool, &volume).await?;
        // Volumes that are no files take the block routes (see `block`).
        if let VolumeLookup::Found(f) = &found
            && f.is_file
            && crate::libvirt::volume::holds_files(&f.pool_type)
        {
            paths.push(f.path.clone());
        }
        obs.volumes.insert((pool, volume), found);
    }
    for r in super::block::block_refs(&config, &spec.source, &obs.volumes) {
        if let Some(b) = v.block_volume(&r).await? {
            obs.block.insert(r, b);
        }
    }
    obs.names = v.domain_names().await?;
    if let Some(t) = &spec.target_name {
        obs.target_task = v.clone_domain(t).await?.and_then(|d| d.task);
    }
    obs.pools = v.storage_pools().await?;
    obs.allowed = ctx.allowed_dirs().await?;
    // Canonicalising, extent maps, image headers and directory listings can block (a hung NFS
    // pool): off the async runtime.
    let spec = spec.clone();
    obs = tokio::task::spawn_blocking(move || inspect_files(obs, &spec, paths))
        .await
        .map_err(crate::libvirt::LibvirtError::from)?;
    Ok(obs)
}

/// The filesystem part of [`observe`]: the pools' directories (a pool on a system directory is
/// left out, see `roots`), each source file's facts and image header, the free space, and the
/// files in the destination directories. Blocking.
fn inspect_files(
    mut obs: Observed,
    spec: &crate::api::VMCloneSpec,
    paths: Vec<String>,
) -> Observed {
    let dirs: Vec<(String, PathBuf)> = obs
        .pools
        .iter()
        .filter_map(|p| {
            let dir = std::fs::canonicalize(p.path.as_ref()?).ok()?;
            Some((p.name.clone(), dir))
        })
        .collect();
    let bad = roots::unsafe_pools(&dirs);
    obs.pools
        .retain(|p| !bad.iter().any(|(name, _)| *name == p.name));
    obs.pool_dirs = roots::usable(dirs).into_iter().collect();
    for p in paths {
        let path = PathBuf::from(&p);
        let dir = path
            .parent()
            .and_then(|d| std::fs::canonicalize(d).ok())
            .unwrap_or_default();
        let allocated = copy::allocated_bytes(&path).unwrap_or(0);
        let data = copy::data_bytes(&path).unwrap_or(allocated);
        // Read only inside the allowed directories; what lies outside is refused by the plan.
        let (unsafe_image, overlay) = std::fs::canonicalize(&path)
            .ok()
            .filter(|real| obs.allowed.iter().any(|a| real.starts_with(a)))
            .map_or((None, None), |real| judge(&real, &chain_dirs(&obs)));
        obs.free
            .entry(dir.clone())
            .or_insert_with(|| available(&dir));
        obs.files.insert(
            p,
            FileFacts {
                dir,
                allocated,
                data,
                unsafe_image,
                overlay,
            },
        );
    }
    obs.existing = plan::destination_dirs(spec, &obs)
        .iter()
        .flat_map(|d| files_in(d))
        .collect();
    obs
}

/// Why the image at `real` may not be copied, or (when it may) its backing chain if it is an
/// overlay whose every link lies in `dirs`: the copy then keeps the shared base, or merges the
/// chain (`spec.storage.flatten`). Blocking: reads headers and extent maps.
fn judge(real: &Path, dirs: &[PathBuf]) -> (Option<String>, Option<Chain>) {
    let header = match qcow2::read_header(real) {
        Ok(h) => h,
        Err(e) => {
            return (
                Some(format!("an image whose header cannot be read ({e})")),
                None,
            );
        }
    };
    match qcow2_chain::allowed(real, qcow2::judge(&header), dirs) {
        Ok(links) if links.is_empty() => (None, None),
        Ok(links) => {
            let size = qcow2::parse(&header).ok().flatten().map_or(0, |h| h.size);
            (None, Some(chain_facts(real, &links, size)))
        }
        Err(why) => (Some(why), None),
    }
}

/// What merging the chain of the overlay `top` (backed by `links`, virtual size `size`) takes:
/// every image's allocation, and its data extents, capped at what an image of that size can
/// hold (data, plus qcow2 metadata for the allocation).
fn chain_facts(top: &Path, links: &[PathBuf], size: u64) -> Chain {
    let images = || std::iter::once(top).chain(links.iter().map(PathBuf::as_path));
    let allocated: u64 = images()
        .map(|p| copy::allocated_bytes(p).unwrap_or(0))
        .sum();
    let data: u64 = images().map(|p| copy::data_bytes(p).unwrap_or(0)).sum();
    let most = size.saturating_add(size / 1024).saturating_add(1 << 20);
    Chain {
        links: links.len(),
        allocated: allocated.min(most),
        data: data.min(size),
    }
}

/// Where an overlay's backing chain may lie: the granted pools' directories, and in open mode
/// the agent's allowed ones.
fn chain_dirs(obs: &Observed) -> Vec<PathBuf> {
    let pools = obs
        .pool_dirs
        .iter()
        .filter(|(name, _)| obs.grants.pool(name))
        .map(|(_, dir)| dir.clone());
    if obs.grants.is_open() {
        obs.allowed.iter().cloned().chain(pools).collect()
    } else {
        pools.collect()
    }
}

fn available(dir: &Path) -> u64 {
    rustix::fs::statvfs(dir)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .unwrap_or(0)
}

fn files_in(dir: &Path) -> HashSet<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| dir.join(e.file_name()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::flatten::tests::run;

    #[test]
    fn an_overlay_counts_its_whole_chain_when_every_link_may_be_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let (a, b) = (root.join("a"), root.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let (base, over) = (b.join("base.qcow2"), a.join("over.qcow2"));
        let s = |p: &Path| p.to_str().unwrap().to_string();
        run(&["qemu-img", "create", "-q", "-f", "qcow2", &s(&base), "64M"]);
        run(&["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 4M", &s(&base)]);
        run(&[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            &s(&base),
            &s(&over),
        ]);
        run(&[
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 2 8M 2M",
            &s(&over),
        ]);
        let (why, chain) = judge(&over, &[a.clone(), b.clone()]);
        assert_eq!(why, None);
        let chain = chain.unwrap();
        assert_eq!(chain.links, 1);
        let both = copy::allocated_bytes(&base).unwrap() + copy::allocated_bytes(&over).unwrap();
        assert_eq!(chain.allocated, both);
        assert!(chain.data >= 6 << 20 && chain.data <= 64 << 20, "{chain:?}");
        // The base outside the directories: refused, no chain.
        let (why, chain) = judge(&over, std::slice::from_ref(&a));
        assert!(why.unwrap().contains("leaves the directories"));
        assert_eq!(chain, None);
        // A standalone image is no overlay.
        assert_eq!(judge(&base, &[b]), (None, None));
    }
}
