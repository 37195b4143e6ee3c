//! The sparse byte copy: data extents only, all-zero blocks skipped, positional I/O.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{CopyError, extents, zero};

/// Bytes read per I/O: large enough that syscalls are not the cost, small enough to bound memory.
pub(super) const BUFFER_SIZE: usize = 1 << 20;

/// All-zero blocks of this size (aligned in the file) are skipped rather than written.
/// 64 KiB is the default qcow2 cluster size and a multiple of every common filesystem block size.
pub(super) const ZERO_BLOCK: usize = 64 << 10;

/// An open file and its path, for error messages.
#[derive(Clone, Copy)]
pub(super) struct Side<'a> {
    pub(super) file: &'a File,
    pub(super) path: &'a Path,
}

/// What [`copy_sparse`] did.
pub(super) struct Copied {
    /// Bytes written to the destination.
    pub(super) written: u64,
    /// The last progress reported.
    pub(super) done: u64,
}

/// Copies the data extents of `src` below `len` into `dst` at the same offsets, skipping
/// all-zero blocks. `dst` must be empty; the caller sets its length afterwards.
///
/// `progress` gets `(done, total)` after each buffer, `done` counting data-extent bytes read
/// (written or skipped as zero), clamped to `total` in case the source grew since `total` was
/// measured. `cancel` is checked before each buffer.
pub(super) fn copy_sparse(
    src: Side<'_>,
    dst: Side<'_>,
    len: u64,
    total: u64,
    progress: &mut dyn FnMut(u64, u64),
    cancel: &AtomicBool,
) -> Result<Copied, CopyError> {
    let (src, src_path, dst, dst_path) = (src.file, src.path, dst.file, dst.path);
    let mut buf = vec![0u8; BUFFER_SIZE];
    let mut done = 0u64;
    let mut written = 0u64;
    for extent in extents::data_extents(src, src_path, len) {
        let extent = extent?;
        let mut offset = extent.start;
        while offset < extent.end {
            if cancel.load(Ordering::Relaxed) {
                return Err(CopyError::Cancelled {
                    path: dst_path.to_path_buf(),
                });
            }
            // Bounded by BUFFER_SIZE, so the cast cannot truncate.
            let n = (extent.end - offset).min(BUFFER_SIZE as u64) as usize;
            let chunk = &mut buf[..n];
            src.read_exact_at(chunk, offset)
                .map_err(|source| CopyError::Read {
                    path: src_path.to_path_buf(),
                    offset,
                    source,
                })?;
            for run in zero::nonzero_runs(chunk, offset, ZERO_BLOCK) {
                let at = offset + run.start as u64;
                dst.write_all_at(&chunk[run.clone()], at)
                    .map_err(|source| CopyError::Write {
                        path: dst_path.to_path_buf(),
                        offset: at,
                        source,
                    })?;
                written += run.len() as u64;
            }
            offset += n as u64;
            done += n as u64;
            progress(done.min(total), total);
        }
    }
    Ok(Copied {
        written,
        done: done.min(total),
    })
}
