//! The reads of a VirtualMachineStorage reconcile: the domain, the source (the file on the node,
//! the volume through libvirt, the IsoDownload through the API) and the allowed directories.
//! Filesystem work runs off the async runtime.

use std::path::{Path, PathBuf};

use kube::ResourceExt;
use kube::api::Api;

use super::source::{FileKind, Found, IsoFacts, PathFacts, SourceFacts};
use crate::agent::context::{Context, ReconcileError};
use crate::api::{IsoDownload, NODE_LABEL, StorageSource, VirtualMachineStorage};
use crate::libvirt::LibvirtError;
use crate::libvirt::domain::DomainView;
use crate::libvirt::facade::{Domains, Storage, VolumeLookup};

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
    /// Directories whose files may back devices, resolved (read only when a path is checked).
    pub allowed: Vec<PathBuf>,
}

/// Reads what the plan of `obj` needs.
pub async fn observe(
    obj: &VirtualMachineStorage,
    ctx: &Context,
) -> Result<Observed, ReconcileError> {
    let mut observed = Observed {
        node: ctx.node.clone(),
        domain: ctx.libvirt.domain(&obj.spec.vm).await?,
        ..Observed::default()
    };
    if observed.domain.is_none() {
        return Ok(observed);
    }
    let Some(source) = &obj.spec.source else {
        return Ok(observed);
    };
    let allowed = &mut observed.allowed;
    let source = match source {
        StorageSource {
            path: Some(p),
            volume: None,
            iso_download: None,
        } => SourceFacts::Path(look(ctx, p, allowed).await?),
        StorageSource {
            path: None,
            volume: Some(v),
            iso_download: None,
        } => {
            let lookup = ctx.libvirt.volume(&v.pool, &v.name).await?;
            let file = match &lookup {
                VolumeLookup::Found(found) => Some(look(ctx, &found.path, allowed).await?),
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
                    let file = match (status.phase, status.volume) {
                        (Some(crate::api::DownloadPhase::Completed), Some(vol)) => {
                            Some(look(ctx, &vol.path, allowed).await?)
                        }
                        _ => None,
                    };
                    Some(IsoFacts {
                        phase: status.phase,
                        node,
                        file,
                    })
                }
            };
            SourceFacts::Iso {
                name: name.clone(),
                iso,
            }
        }
        _ => SourceFacts::Ambiguous,
    };
    observed.source = source;
    Ok(observed)
}

/// Reads the allowed directories into `allowed` (they bound which files are opened), then looks
/// at `path` off the async runtime.
async fn look(
    ctx: &Context,
    path: &str,
    allowed: &mut Vec<PathBuf>,
) -> Result<PathFacts, LibvirtError> {
    *allowed = ctx.allowed_dirs().await?;
    let (path, dirs) = (PathBuf::from(path), allowed.clone());
    Ok(tokio::task::spawn_blocking(move || inspect_blocking(path, &dirs)).await?)
}

/// Resolves symlinks and `..`, reads the file type, and the header of a file or block device
/// inside the allowed directories (nothing outside them is opened).
fn inspect_blocking(path: PathBuf, allowed: &[PathBuf]) -> PathFacts {
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

fn read_header(path: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut buf = Vec::with_capacity(16);
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(16).read_to_end(&mut buf);
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

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
