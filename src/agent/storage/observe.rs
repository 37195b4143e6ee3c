//! The reads of a VirtualMachineStorage reconcile: the namespace's grants, the domain, the source
//! (the file on the node, the volume through libvirt, the IsoDownload through the API) and the
//! directories a source may lie in. Filesystem work runs off the async runtime.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kube::ResourceExt;
use kube::api::Api;

use super::source::{self, FileKind, Found, IsoFacts, PathFacts, SourceFacts};
use crate::agent::context::{Context, ReconcileError};
use crate::agent::roots;
use crate::api::{IsoDownload, NODE_LABEL, StorageSource, VirtualMachineStorage};
use crate::libvirt::LibvirtError;
use crate::libvirt::domain::DomainView;
use crate::libvirt::facade::{Domains, Storage, VolumeLookup};
use crate::libvirt::pool_index::PoolDir;
use crate::libvirt::volume::{DiskRoute, disk_route};
use crate::tenancy::Grants;

/// Everything a plan is made from, besides the spec and the previous status.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// This node's name.
    pub node: String,
    /// `spec.vm`'s view; `None` when it is not defined on this node.
    pub domain: Option<DomainView>,
    /// What `spec.source` names ([`SourceFacts::None`] when the domain does not exist: a plan
    /// stops there).
    pub source: SourceFacts,
    /// What the object's namespace is granted (everything in open mode).
    pub grants: Grants,
    /// The active storage pools' directories, symlinks resolved, by pool name (read only when a
    /// path is checked).
    pub pools: Vec<(String, PathBuf)>,
    /// The agent's `--allowed-path` directories, resolved (open mode only; read with `pools`).
    pub allowed_paths: Vec<PathBuf>,
    /// The golden image of `source.volume.create.backingVolume` and its chain (read by
    /// [`super::volume::observe_backing`]).
    pub backing: Option<super::volume_plan::BackingFacts>,
}

impl Observed {
    /// The directories whose files this object may use: see [`source::usable_dirs`].
    pub fn usable_dirs(&self) -> Vec<PathBuf> {
        source::usable_dirs(&self.grants, &self.pools, &self.allowed_paths)
    }
}

/// Reads what the plan of `obj` needs.
pub async fn observe(
    obj: &VirtualMachineStorage,
    ctx: &Context,
) -> Result<Observed, ReconcileError> {
    // An early, empty view of the grants would refuse everything.
    ctx.grants.ready().await;
    let grants = ctx.grants.grants(&obj.namespace().unwrap_or_default());
    if !grants.domain(&obj.spec.vm) {
        // Plan refuses; nothing of the domain is read.
        return Ok(Observed {
            node: ctx.node.clone(),
            grants,
            ..Observed::default()
        });
    }
    let mut observed = Observed {
        node: ctx.node.clone(),
        domain: ctx.libvirt.domain(&obj.spec.vm).await?,
        grants,
        ..Observed::default()
    };
    if observed.domain.is_none() {
        return Ok(observed);
    }
    let Some(source) = &obj.spec.source else {
        return Ok(observed);
    };
    let source = match source {
        StorageSource {
            path: Some(p),
            volume: None,
            iso_download: None,
        } => SourceFacts::Path(look(ctx, p, &mut observed).await?),
        StorageSource {
            path: None,
            volume: Some(v),
            iso_download: None,
        } => {
            let lookup = ctx.libvirt.volume(&v.pool, &v.name).await?;
            // A volume that is a block device or no node path is resolved by libvirt alone
            // (source::resolve); only a file's path is looked at.
            let file = match &lookup {
                VolumeLookup::Found(found)
                    if !matches!(
                        disk_route(&found.pool_type),
                        Some(DiskRoute::Block | DiskRoute::Volume)
                    ) =>
                {
                    Some(look(ctx, &found.path, &mut observed).await?)
                }
                _ => None,
            };
            SourceFacts::Volume {
                pool: v.pool.clone(),
                name: v.name.clone(),
                lookup,
                file,
            }
        }
        StorageSource {
            path: None,
            volume: None,
            iso_download: Some(name),
        } => {
            let isos: Api<IsoDownload> =
                Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
            let iso = isos
                .get_opt(name)
                .await
                .map_err(|source| ReconcileError::Api {
                    action: "read",
                    object: format!("IsoDownload/{name}"),
                    source,
                })?;
            let iso = match iso {
                None => None,
                Some(iso) => {
                    let node = iso.labels().get(NODE_LABEL).cloned();
                    let status = iso.status.unwrap_or_default();
                    // The pool the file is in, else the one it goes to.
                    let pool = status
                        .volume
                        .as_ref()
                        .map_or_else(|| iso.spec.pool.clone(), |v| v.pool.clone());
                    let file = match (status.phase, status.volume) {
                        (Some(crate::api::DownloadPhase::Completed), Some(vol)) => {
                            Some(look(ctx, &vol.path, &mut observed).await?)
                        }
                        _ => None,
                    };
                    Some(IsoFacts {
                        phase: status.phase,
                        node,
                        pool,
                        file,
                    })
                }
            };
            SourceFacts::Iso {
                name: name.clone(),
                iso,
            }
        }
        StorageSource {
            path: None,
            volume: None,
            iso_download: None,
        } => SourceFacts::Empty,
        _ => SourceFacts::Ambiguous,
    };
    observed.source = source;
    Ok(observed)
}

/// Reads the pools' directories and the configured ones into `observed` (the usable ones bound
/// which files are opened), then looks at `path`; filesystem work off the async runtime.
///
/// The pools come from the agent's kept copy ([`PoolIndex`]); when the path then lies in none
/// of the usable directories, they are read afresh and the path looked at again, so a copy that
/// lacks a pool just started or defined never refuses a path.
///
/// [`PoolIndex`]: crate::libvirt::pool_index::PoolIndex
async fn look(
    ctx: &Context,
    path: &str,
    observed: &mut Observed,
) -> Result<PathFacts, LibvirtError> {
    let (pools, kept) = ctx.pools.get(&ctx.libvirt).await?;
    let mut facts = look_in(ctx, pools, path, observed).await?;
    if kept && !within(&facts, &observed.usable_dirs()) {
        let pools = ctx.pools.fresh(&ctx.libvirt).await?;
        facts = look_in(ctx, pools, path, observed).await?;
    }
    Ok(facts)
}

/// Whether what `facts` found lies in one of `dirs` (a missing file: its parent). A relative
/// path lies nowhere, and no other read of the pools changes that.
pub(super) fn within(facts: &PathFacts, dirs: &[PathBuf]) -> bool {
    let inside = |p: &Path| dirs.iter().any(|d| p.starts_with(d));
    match &facts.found {
        Found::Relative => true,
        Found::Missing { parent } => parent.as_deref().is_some_and(inside),
        Found::Present { real, .. } => inside(real),
    }
}

/// The active pools' directories, symlinks resolved, none a system directory. Blocking.
pub(super) fn pool_dirs(pools: &[PoolDir]) -> Vec<(String, PathBuf)> {
    roots::usable(
        pools
            .iter()
            .filter(|p| p.active)
            .filter_map(|p| {
                Some((
                    p.name.clone(),
                    std::fs::canonicalize(p.path.as_deref()?).ok()?,
                ))
            })
            .collect(),
    )
}

/// [`look`] with the pools `pools`.
async fn look_in(
    ctx: &Context,
    pools: Arc<Vec<PoolDir>>,
    path: &str,
    observed: &mut Observed,
) -> Result<PathFacts, LibvirtError> {
    let (path, extra, grants) = (
        PathBuf::from(path),
        ctx.allowed_paths.clone(),
        observed.grants.clone(),
    );
    let (pools, allowed_paths, facts) = tokio::task::spawn_blocking(move || {
        let pools = pool_dirs(&pools);
        let extra = roots::usable_dirs(
            extra
                .into_iter()
                .filter_map(|d| std::fs::canonicalize(d).ok())
                .collect(),
        );
        let dirs = source::usable_dirs(&grants, &pools, &extra);
        let facts = inspect_blocking(path, &dirs);
        (pools, extra, facts)
    })
    .await?;
    observed.pools = pools;
    observed.allowed_paths = allowed_paths;
    Ok(facts)
}

/// Resolves symlinks and `..`, reads the file type, and the header of a file or block device
/// inside the allowed directories (nothing outside them is opened).
pub(super) fn inspect_blocking(path: PathBuf, allowed: &[PathBuf]) -> PathFacts {
    if !path.is_absolute() {
        return PathFacts {
            requested: path,
            found: Found::Relative,
        };
    }
    let found = match std::fs::canonicalize(&path) {
        Err(_) => Found::Missing {
            parent: path.parent().and_then(|p| std::fs::canonicalize(p).ok()),
        },
        Ok(real) => {
            let kind = std::fs::metadata(&real)
                .map(|meta| {
                    if std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
                        FileKind::Block
                    } else if meta.is_file() {
                        FileKind::File
                    } else {
                        FileKind::Other
                    }
                })
                .map_err(|e| e.to_string());
            let readable = matches!(kind, Ok(FileKind::File | FileKind::Block));
            let header = (readable && allowed.iter().any(|a| real.starts_with(a)))
                .then(|| read_header(&real));
            Found::Present { real, kind, header }
        }
    };
    PathFacts {
        requested: path,
        found,
    }
}

/// The image's header as [`crate::image::qcow2::judge`] reads it (empty when unreadable).
fn read_header(path: &Path) -> Vec<u8> {
    crate::image::qcow2::read_header(path).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_judges_what_was_found_or_its_parent() {
        let dirs = vec![PathBuf::from("/pool")];
        let facts = |found| PathFacts {
            requested: PathBuf::from("/x"),
            found,
        };
        let present = |real: &str| Found::Present {
            real: PathBuf::from(real),
            kind: Ok(FileKind::File),
            header: None,
        };
        assert!(within(&facts(present("/pool/a.img")), &dirs));
        assert!(!within(&facts(present("/elsewhere/a.img")), &dirs));
        assert!(
            !within(&facts(present("/pool2/a.img")), &dirs),
            "a prefix of a name is not a directory"
        );
        let missing = |parent: Option<&str>| Found::Missing {
            parent: parent.map(PathBuf::from),
        };
        assert!(within(&facts(missing(Some("/pool"))), &dirs));
        assert!(!within(&facts(missing(Some("/tmp"))), &dirs));
        assert!(!within(&facts(missing(None)), &dirs));
        assert!(
            within(&facts(Found::Relative), &dirs),
            "no pool makes it absolute"
        );
    }

    #[test]
    fn inspects_files_links_and_missing_paths() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let allowed = vec![root.clone()];
        let img = dir.path().join("a.img");
        std::fs::write(&img, b"QFI\xfbdata").unwrap();
        let facts = inspect_blocking(img.clone(), &allowed);
        assert_eq!(
            facts.found,
            Found::Present {
                real: root.join("a.img"),
                kind: Ok(FileKind::File),
                header: Some(b"QFI\xfbdata".to_vec()),
            }
        );
        // A symlink is followed; what it points to outside is never opened.
        let link = dir.path().join("link.img");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        let Found::Present { real, header, .. } = inspect_blocking(link, &allowed).found else {
            panic!("the link resolves")
        };
        assert_eq!(real, PathBuf::from("/etc/passwd"));
        assert_eq!(header, None, "outside the allowed directories");
        // A directory is present but not opened.
        let Found::Present { kind, header, .. } = inspect_blocking(root.clone(), &allowed).found
        else {
            panic!()
        };
        assert_eq!((kind, header), (Ok(FileKind::Other), None));
        assert_eq!(
            inspect_blocking(dir.path().join("missing.img"), &allowed).found,
            Found::Missing {
                parent: Some(root.clone())
            }
        );
        assert_eq!(
            inspect_blocking(PathBuf::from("rel/a.img"), &allowed).found,
            Found::Relative
        );
    }
}
