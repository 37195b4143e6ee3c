//! Copying VM disk image files, fast and sparse, with progress: the engine behind VMClone.
//!
//! [`copy_file`] clones one image file (raw or qcow2 alike: it copies bytes) either by
//! **reflink** (`ioctl(FICLONE)`: the copy shares the source's extents copy-on-write, instant and
//! using no space, on XFS with `reflink=1` and btrfs) or by a **sparse copy**:
//!
//! * only the source's data extents are read, found with `lseek(SEEK_DATA/SEEK_HOLE)`; holes are
//!   never read;
//! * inside data extents, all-zero 64 KiB blocks (aligned in the file) are skipped instead of
//!   written, so zero-filled but allocated regions become holes in the copy;
//! * the copy is then extended to the source's size with `set_len`.
//!
//! The copy therefore allocates no more than the source (`st_blocks` of the copy ≤ the source's,
//! up to filesystem metadata), and often less. Memory is bounded: one 1 MiB buffer.
//!
//! # Progress
//! The `progress(done, total)` callback counts over the source's **data extents**, not its
//! logical size: `total` is [`CopyReport::data_bytes`], measured before copying, and `done`
//! advances as each data extent is read (written, or skipped as zero). A sparse 8 GiB disk holding
//! 512 MiB of data thus goes from 0 to 512 MiB evenly instead of jumping over the holes. It is
//! called once with `(0, total)` before any data moves, after every 1 MiB, and last with
//! `(total, total)`; `done` never decreases. A reflink reports `(0, total)` then `(total, total)`.
//! Calls are frequent; a caller that publishes progress should throttle.
//!
//! # Destination
//! The destination is created exclusively (`O_CREAT|O_EXCL`): an existing file is never
//! overwritten ([`CopyError::AlreadyExists`], the existing file untouched). It gets the source's
//! permission bits (subject to the umask) but not its owner: libvirt's dynamic ownership, or the
//! caller, sets that. On success it is fsynced, and so is its directory. On any error or
//! cancellation the partial destination is removed.
//!
//! # What is not done
//! A qcow2 image is copied as it is: **backing chains are not flattened**. A copy of an overlay
//! still names the same backing file (often by relative path, which then resolves against the
//! copy's directory), so cloning an overlay needs its backing file reachable from the copy, or a
//! `qemu-img convert` instead of a copy ([`flatten`]). The source must not be written while it is copied (the
//! VM is shut off); the copier does not lock it. Block devices are refused.

mod convert;
mod extents;
pub mod flatten;
pub mod lun;
mod sparse;
mod zero;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{Advice, fadvise, ioctl_ficlone};
use rustix::io::Errno;

use sparse::Side;

/// How to copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Reflink where the filesystem supports it, otherwise a sparse copy.
    #[default]
    Auto,
    /// Always a sparse byte copy, even where a reflink would work.
    Copy,
    /// Reflink only; fails with [`CopyError::ReflinkUnsupported`] where that is not possible.
    Reflink,
}

/// How a copy was actually made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StrategyUsed {
    /// The copy shares the source's extents copy-on-write.
    Reflink,
    /// The data extents were copied, zero blocks skipped.
    Copy,
}

/// The outcome of a successful [`copy_file`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyReport {
    /// How the copy was made.
    pub strategy_used: StrategyUsed,
    /// The source's logical size (`st_size`), which the copy has too.
    pub logical_bytes: u64,
    /// Bytes in the source's data extents: the `total` that progress was reported against.
    pub data_bytes: u64,
    /// Bytes actually written to the copy (0 for a reflink): `data_bytes` minus skipped zeros.
    pub written_bytes: u64,
    /// Space the source occupies on disk (`st_blocks * 512`).
    pub allocated_bytes_src: u64,
    /// Space the copy occupies on disk (`st_blocks * 512`), after fsync. For a reflink this
    /// counts the shared extents, which use no new space.
    pub allocated_bytes_dst: u64,
}

/// Errors of [`copy_file`] and [`allocated_bytes`].
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The source could not be opened.
    #[error("failed to open the source image {path}: {source}")]
    OpenSource {
        /// The source path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A file's metadata could not be read.
    #[error("failed to read the metadata of {path}: {source}")]
    Metadata {
        /// The file's path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The source is a directory, block device or other non-regular file.
    #[error("failed to copy {path}: it is not a regular file (only disk image files are copied)")]
    NotRegularFile {
        /// The source path.
        path: PathBuf,
    },
    /// The destination exists; it was left untouched.
    #[error("failed to copy to {path}: the file already exists and is never overwritten")]
    AlreadyExists {
        /// The destination path.
        path: PathBuf,
    },
    /// The destination could not be created.
    #[error("failed to create the destination {path}: {source}")]
    CreateDestination {
        /// The destination path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// [`Strategy::Reflink`] was asked for but the filesystem cannot reflink these files (not
    /// XFS/btrfs, reflink disabled, or source and destination on different filesystems).
    #[error(
        "failed to reflink {src} to {dst}: the filesystem does not support reflinks between \
         them ({source}); use the Auto or Copy strategy"
    )]
    ReflinkUnsupported {
        /// The source path.
        src: PathBuf,
        /// The destination path.
        dst: PathBuf,
        /// The OS error (`EOPNOTSUPP`, `EXDEV`, `EINVAL`, …).
        #[source]
        source: io::Error,
    },
    /// A reflink was possible but failed (for example out of space for metadata).
    #[error("failed to reflink {src} to {dst}: {source}")]
    Reflink {
        /// The source path.
        src: PathBuf,
        /// The destination path.
        dst: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Looking for the source's data extents failed.
    #[error("failed to find the data extents of {path} at offset {offset}: {source}")]
    Seek {
        /// The source path.
        path: PathBuf,
        /// Where the search started.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading the source failed (including it shrinking during the copy).
    #[error("failed to read {path} at offset {offset}: {source}")]
    Read {
        /// The source path.
        path: PathBuf,
        /// The offset of the read.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing the destination failed (for example `ENOSPC`).
    #[error("failed to write {path} at offset {offset}: {source}")]
    Write {
        /// The destination path.
        path: PathBuf,
        /// The offset of the write.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Setting the destination's size failed.
    #[error("failed to set the size of {path} to {len} bytes: {source}")]
    SetLen {
        /// The destination path.
        path: PathBuf,
        /// The size asked for.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Flushing the destination (or its directory) to disk failed.
    #[error("failed to flush {path} to disk: {source}")]
    Sync {
        /// The path being flushed.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The copy was cancelled; the partial destination was removed.
    #[error("the copy to {path} was cancelled; the partial copy was removed")]
    Cancelled {
        /// The destination path.
        path: PathBuf,
    },
}

/// Space `path` occupies on disk: `st_blocks * 512`, which for a sparse file or a qcow2 image is
/// usually far below its size. Check free space against this before copying.
pub fn allocated_bytes(path: &Path) -> Result<u64, CopyError> {
    let meta = std::fs::metadata(path).map_err(|source| CopyError::Metadata {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(meta.blocks().saturating_mul(512))
}

/// Bytes in the data extents of the file at `path`: the `total` that [`copy_file`] reports
/// progress against (and [`CopyReport::data_bytes`]), measured without copying.
pub fn data_bytes(path: &Path) -> Result<u64, CopyError> {
    let file = File::open(path).map_err(|source| CopyError::OpenSource {
        path: path.to_path_buf(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| CopyError::Metadata {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    extents::data_bytes(&file, path, len)
}

/// Copies the image file `src` to the new file `dst`; see the [module documentation](self) for
/// what is copied, how progress counts and what happens to `dst` on failure.
///
/// Blocking: run it on a blocking thread. Setting `cancel` makes it stop within one buffer
/// (1 MiB) and return [`CopyError::Cancelled`]; a reflink, being one system call, is not
/// interrupted.
pub fn copy_file(
    src: &Path,
    dst: &Path,
    strategy: Strategy,
    progress: impl FnMut(u64, u64),
    cancel: &AtomicBool,
) -> Result<CopyReport, CopyError> {
    copy_to(src, dst, false, strategy, progress, cancel)
}

/// Copies `src` into `dst`, a regular file the caller created exclusively beforehand (a
/// destination reserved when the copy was planned), as [`copy_file`] does, except that `dst`
/// is truncated first (a partial copy of an earlier attempt is started over), a symlink there
/// is refused, and `dst` is kept on failure: its creator removes it.
pub fn copy_into_reserved(
    src: &Path,
    dst: &Path,
    strategy: Strategy,
    progress: impl FnMut(u64, u64),
    cancel: &AtomicBool,
) -> Result<CopyReport, CopyError> {
    copy_to(src, dst, true, strategy, progress, cancel)
}

fn copy_to(
    src: &Path,
    dst: &Path,
    reserved: bool,
    strategy: Strategy,
    mut progress: impl FnMut(u64, u64),
    cancel: &AtomicBool,
) -> Result<CopyReport, CopyError> {
    let src_file = File::open(src).map_err(|source| CopyError::OpenSource {
        path: src.to_path_buf(),
        source,
    })?;
    let src_meta = src_file.metadata().map_err(|source| CopyError::Metadata {
        path: src.to_path_buf(),
        source,
    })?;
    if !src_meta.file_type().is_file() {
        return Err(CopyError::NotRegularFile {
            path: src.to_path_buf(),
        });
    }
    let logical_bytes = src_meta.len();
    let data_bytes = extents::data_bytes(&src_file, src, logical_bytes)?;
    if cancel.load(Ordering::Relaxed) {
        return Err(CopyError::Cancelled {
            path: dst.to_path_buf(),
        });
    }

    let mode = src_meta.permissions().mode() & 0o777;
    let dst_file = if reserved {
        open_reserved(dst, mode)?
    } else {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(dst)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => CopyError::AlreadyExists {
                    path: dst.to_path_buf(),
                },
                _ => CopyError::CreateDestination {
                    path: dst.to_path_buf(),
                    source,
                },
            })?
    };
    // From here on the destination is ours: any early return removes a new one.
    let guard = RemoveOnDrop((!reserved).then_some(dst));
    progress(0, data_bytes);

    let reflink_error = |errno: Errno| {
        let (src, dst) = (src.to_path_buf(), dst.to_path_buf());
        if reflink_unsupported(errno) {
            CopyError::ReflinkUnsupported {
                src,
                dst,
                source: errno.into(),
            }
        } else {
            CopyError::Reflink {
                src,
                dst,
                source: errno.into(),
            }
        }
    };
    let reflinked = match strategy {
        Strategy::Copy => false,
        Strategy::Reflink => {
            ioctl_ficlone(&dst_file, &src_file).map_err(reflink_error)?;
            true
        }
        Strategy::Auto => match ioctl_ficlone(&dst_file, &src_file) {
            Ok(()) => true,
            Err(errno) if reflink_unsupported(errno) => {
                tracing::debug!(src = %src.display(), dst = %dst.display(), %errno,
                    "reflink not possible, copying");
                false
            }
            Err(errno) => return Err(reflink_error(errno)),
        },
    };

    let (strategy_used, written_bytes) = if reflinked {
        progress(data_bytes, data_bytes);
        (StrategyUsed::Reflink, 0)
    } else {
        let _ = fadvise(&src_file, 0, None, Advice::Sequential);
        let copied = sparse::copy_sparse(
            Side {
                file: &src_file,
                path: src,
            },
            Side {
                file: &dst_file,
                path: dst,
            },
            logical_bytes,
            data_bytes,
            &mut progress,
            cancel,
        )?;
        dst_file
            .set_len(logical_bytes)
            .map_err(|source| CopyError::SetLen {
                path: dst.to_path_buf(),
                len: logical_bytes,
                source,
            })?;
        if copied.done < data_bytes {
            // The source lost data extents since they were counted: still end at the total.
            progress(data_bytes, data_bytes);
        }
        (StrategyUsed::Copy, copied.written)
    };

    dst_file.sync_all().map_err(|source| CopyError::Sync {
        path: dst.to_path_buf(),
        source,
    })?;
    sync_parent_dir(dst)?;
    let dst_meta = dst_file.metadata().map_err(|source| CopyError::Metadata {
        path: dst.to_path_buf(),
        source,
    })?;
    // The node's page cache has better uses than a disk image the host will not read again.
    let _ = fadvise(&src_file, 0, None, Advice::DontNeed);
    let _ = fadvise(&dst_file, 0, None, Advice::DontNeed);
    guard.keep();

    Ok(CopyReport {
        strategy_used,
        logical_bytes,
        data_bytes,
        written_bytes,
        allocated_bytes_src: src_meta.blocks().saturating_mul(512),
        allocated_bytes_dst: dst_meta.blocks().saturating_mul(512),
    })
}

/// Opens the reserved destination `dst` (never through a symlink), emptied, with `mode`.
fn open_reserved(dst: &Path, mode: u32) -> Result<File, CopyError> {
    let create = |source| CopyError::CreateDestination {
        path: dst.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dst)
        .map_err(create)?;
    let meta = file.metadata().map_err(|source| CopyError::Metadata {
        path: dst.to_path_buf(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(CopyError::NotRegularFile {
            path: dst.to_path_buf(),
        });
    }
    file.set_len(0).map_err(|source| CopyError::SetLen {
        path: dst.to_path_buf(),
        len: 0,
        source,
    })?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(create)?;
    Ok(file)
}

/// Whether `FICLONE` failed because these files cannot be reflinked at all (so a copy is the
/// answer), as opposed to a reflink that was possible but failed.
fn reflink_unsupported(errno: Errno) -> bool {
    // EOPNOTSUPP: the filesystem has no reflink (ext4, tmpfs, XFS without reflink=1).
    // EXDEV: different filesystems. EINVAL: unaligned or otherwise unclonable files.
    // ENOTTY/ENOSYS: no such ioctl on this kind of file or kernel.
    matches!(
        errno,
        Errno::OPNOTSUPP | Errno::XDEV | Errno::INVAL | Errno::NOTTY | Errno::NOSYS
    )
}

/// Flushes the directory entry of `path` (its creation) to disk.
fn sync_parent_dir(path: &Path) -> Result<(), CopyError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| CopyError::Sync {
            path: dir.to_path_buf(),
            source,
        })
}

/// Removes the destination when dropped, unless [`RemoveOnDrop::keep`] was called.
struct RemoveOnDrop<'a>(Option<&'a Path>);

impl RemoveOnDrop<'_> {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(path) = self.0
            && let Err(error) = std::fs::remove_file(path)
        {
            tracing::warn!(path = %path.display(), %error, "failed to remove a partial copy");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserved_destination_is_filled_and_kept_a_symlink_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
        std::fs::write(&src, vec![7u8; 300_000]).unwrap();
        std::fs::write(&dst, b"an earlier partial copy").unwrap();
        let no = AtomicBool::new(false);
        copy_into_reserved(&src, &dst, Strategy::Copy, |_, _| {}, &no).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap());
        // Cancelled: the reserved file stays (its creator removes it).
        let yes = AtomicBool::new(true);
        assert!(copy_into_reserved(&src, &dst, Strategy::Copy, |_, _| {}, &yes).is_err());
        assert!(dst.exists());
        let link = dir.path().join("link.img");
        let victim = dir.path().join("victim.img");
        std::fs::write(&victim, b"victim").unwrap();
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(copy_into_reserved(&src, &link, Strategy::Copy, |_, _| {}, &no).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"victim");
    }

    #[test]
    fn unsupported_reflink_errors_fall_back_and_others_do_not() {
        for errno in [Errno::OPNOTSUPP, Errno::XDEV, Errno::INVAL, Errno::NOTTY] {
            assert!(reflink_unsupported(errno), "{errno}");
        }
        for errno in [Errno::NOSPC, Errno::IO, Errno::PERM, Errno::BADF] {
            assert!(!reflink_unsupported(errno), "{errno}");
        }
    }

    #[test]
    fn errors_name_the_files() {
        let e = CopyError::ReflinkUnsupported {
            src: "/a/src.img".into(),
            dst: "/b/dst.img".into(),
            source: Errno::XDEV.into(),
        };
        let msg = e.to_string();
        assert!(
            msg.starts_with("failed to reflink /a/src.img to /b/dst.img"),
            "{msg}"
        );
    }
}
