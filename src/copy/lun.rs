//! Copying an iSCSI LUN that has no device node on this node (a volume of a libvirt
//! `iscsi-direct` pool) into a new sparse raw file, through QEMU's libiscsi driver:
//! `qemu-img convert` from package `qemu-block-extra`. libiscsi speaks the protocol; nothing of
//! it is written here.
//!
//! The destination is created exclusively (an existing file is never overwritten) at the LUN's
//! size, and `qemu-img` writes into it only the blocks that are not all zero (`-S 64k`,
//! `--target-is-zero`), so the copy is sparse. Progress counts the LUN's bytes as `qemu-img`
//! walks them (`-p`). Cancelling kills `qemu-img` within one progress poll. On any error or
//! cancellation the partial destination is removed.
//!
//! What this does not know ahead: how much of the LUN holds data. Most targets (tgt among
//! them) answer no LBA-status query, so a space check before the copy can only count the LUN's
//! size; the copy itself allocates only the non-zero blocks.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;

use super::convert::{self, Ended, RemoveOnDrop};

use crate::libvirt::iscsi_direct::IscsiLun;

/// The `qemu-img` binary.
const QEMU_IMG: &str = "qemu-img";

/// The outcome of a successful [`copy_lun`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LunCopyReport {
    /// The LUN's size, which the copy has too.
    pub logical_bytes: u64,
    /// Space the copy occupies on disk (`st_blocks * 512`).
    pub allocated_bytes_dst: u64,
}

/// Errors of [`lun_size`] and [`copy_lun`].
#[derive(Debug, thiserror::Error)]
pub enum LunCopyError {
    /// `qemu-img` could not be run.
    #[error("failed to run {QEMU_IMG} (package qemu-block-extra provides its iSCSI driver): {0}")]
    Spawn(#[source] io::Error),
    /// `qemu-img info` failed or said something unexpected.
    #[error("failed to read the size of {source_name}: {message}")]
    Info {
        /// What was read (`LUN N of IQN`, or a device path).
        source_name: String,
        /// What went wrong (qemu-img's own message).
        message: String,
    },
    /// The destination exists; it was left untouched.
    #[error("failed to copy to {0}: the file already exists and is never overwritten")]
    AlreadyExists(PathBuf),
    /// The destination could not be created or sized.
    #[error("failed to create the destination {path}: {source}")]
    CreateDestination {
        /// The destination path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `qemu-img convert` failed.
    #[error("failed to copy {source_name} to {path}: {message}")]
    Convert {
        /// What was read (`LUN N of IQN`, or a device path).
        source_name: String,
        /// The destination path.
        path: PathBuf,
        /// qemu-img's message.
        message: String,
    },
    /// The copy was cancelled; the partial copy was removed.
    #[error("the copy to {0} was cancelled; the partial copy was removed")]
    Cancelled(PathBuf),
}

/// QEMU's `--image-opts` string for the LUN (a comma inside a value doubled, as QEMU's option
/// syntax wants).
pub fn image_opts(lun: &IscsiLun) -> String {
    let esc = |v: &str| v.replace(',', ",,");
    format!(
        "driver=iscsi,transport=tcp,portal={},target={},lun={},initiator-name={}",
        esc(&lun.portal),
        esc(&lun.target),
        lun.lun,
        esc(&lun.initiator)
    )
}

/// QEMU's `--image-opts` string for a raw block device (a comma doubled).
pub fn device_opts(path: &Path) -> String {
    format!(
        "driver=raw,file.driver=host_device,file.filename={}",
        path.display().to_string().replace(',', ",,")
    )
}

fn lun_name(lun: &IscsiLun) -> String {
    format!("LUN {} of {}", lun.lun, lun.target)
}

/// The LUN's size in bytes, as the target reports it (`qemu-img info`).
pub fn lun_size(lun: &IscsiLun) -> Result<u64, LunCopyError> {
    image_size(&image_opts(lun), &lun_name(lun))
}

fn image_size(opts: &str, name: &str) -> Result<u64, LunCopyError> {
    let out = Command::new(QEMU_IMG)
        .args(["info", "--output=json", "--image-opts"])
        .arg(opts)
        .stdin(Stdio::null())
        .output()
        .map_err(LunCopyError::Spawn)?;
    let info_error = |message: String| LunCopyError::Info {
        source_name: name.to_string(),
        message,
    };
    if !out.status.success() {
        return Err(info_error(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let info: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| info_error(e.to_string()))?;
    info.get("virtual-size")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| info_error("qemu-img info reported no virtual-size".into()))
}

/// Copies the LUN into the new file `dst`; see the [module documentation](self). Blocking:
/// run it on a blocking thread. `progress(done, total)` gets `(0, size)` first and
/// `(size, size)` last.
pub fn copy_lun(
    lun: &IscsiLun,
    dst: &Path,
    progress: impl FnMut(u64, u64),
    cancel: &AtomicBool,
) -> Result<LunCopyReport, LunCopyError> {
    convert(&image_opts(lun), &lun_name(lun), dst, progress, cancel)
}

/// Copies the raw block device `device` (a volume of a pool whose volumes are device nodes)
/// into the new file `dst` the same way as [`copy_lun`]: created exclusively, only non-zero
/// blocks written, removed on error or cancellation. Blocking.
pub fn copy_device(
    device: &Path,
    dst: &Path,
    progress: impl FnMut(u64, u64),
    cancel: &AtomicBool,
) -> Result<LunCopyReport, LunCopyError> {
    convert(
        &device_opts(device),
        &device.display().to_string(),
        dst,
        progress,
        cancel,
    )
}

fn convert(
    opts: &str,
    name: &str,
    dst: &Path,
    mut progress: impl FnMut(u64, u64),
    cancel: &AtomicBool,
) -> Result<LunCopyReport, LunCopyError> {
    let size = image_size(opts, name)?;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => LunCopyError::AlreadyExists(dst.to_path_buf()),
            _ => LunCopyError::CreateDestination {
                path: dst.to_path_buf(),
                source,
            },
        })?;
    // From here on the destination is ours: any early return removes it.
    let mut guard = RemoveOnDrop(Some(dst));
    file.set_len(size)
        .map_err(|source| LunCopyError::CreateDestination {
            path: dst.to_path_buf(),
            source,
        })?;
    drop(file);
    progress(0, size);
    let mut cmd = Command::new(QEMU_IMG);
    cmd.args([
        "convert",
        "-p",
        "-n",
        "--target-is-zero",
        "-S",
        "64k",
        "-O",
        "raw",
    ])
    .arg("--image-opts")
    .arg(opts)
    .arg(dst);
    match convert::run(&mut cmd, size, &mut progress, cancel).map_err(LunCopyError::Spawn)? {
        Ended::Done => {}
        Ended::Cancelled => return Err(LunCopyError::Cancelled(dst.to_path_buf())),
        Ended::Failed(message) => {
            return Err(LunCopyError::Convert {
                source_name: name.to_string(),
                path: dst.to_path_buf(),
                message,
            });
        }
    }
    let allocated = std::fs::metadata(dst)
        .map(|m| m.blocks().saturating_mul(512))
        .map_err(|source| LunCopyError::CreateDestination {
            path: dst.to_path_buf(),
            source,
        })?;
    progress(size, size);
    guard.0 = None;
    Ok(LunCopyReport {
        logical_bytes: size,
        allocated_bytes_dst: allocated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_image_opts_with_commas_doubled() {
        let lun = IscsiLun {
            portal: "127.0.0.1:3260".into(),
            target: "iqn.2026-11.x:a,b".into(),
            lun: 2,
            initiator: "iqn.2026-11.x:agent".into(),
        };
        assert_eq!(
            image_opts(&lun),
            "driver=iscsi,transport=tcp,portal=127.0.0.1:3260,target=iqn.2026-11.x:a,,b,lun=2,initiator-name=iqn.2026-11.x:agent"
        );
    }
}
