//! Merging a qcow2 overlay and its whole backing chain into one standalone qcow2 image, with no
//! backing file: `qemu-img convert` reads each cluster through the chain (the overlay's own
//! clusters first, the rest from the nearest backing image that has it) and writes only the
//! clusters that hold data. This is what libvirt does too when it creates a volume from an
//! overlay (`virsh vol-create-from` on a dir pool runs `qemu-img convert`, which flattens unless
//! the new volume names a backing store); running it here keeps the destination a file the
//! caller created and recorded beforehand.
//!
//! Nothing of the chain is written. The formats are given (`-f qcow2` for the overlay; each
//! link's format comes from the header of the image above it), so nothing is probed. The chain
//! itself is checked beforehand by the caller ([`crate::image::chain`]). Progress is the
//! percentage `qemu-img -p` prints, scaled to the caller's total. Cancelling kills `qemu-img`
//! within one progress poll.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use super::convert::{self, Ended, RemoveOnDrop};

/// The `qemu-img` binary.
const QEMU_IMG: &str = "qemu-img";

/// Errors of [`flatten`].
#[derive(Debug, thiserror::Error)]
pub enum FlattenError {
    /// `qemu-img` could not be run.
    #[error("failed to run {QEMU_IMG}: {0}")]
    Spawn(#[source] io::Error),
    /// A new destination exists; it was left untouched.
    #[error("failed to merge into {0}: the file already exists and is never overwritten")]
    AlreadyExists(PathBuf),
    /// A reserved destination is not a regular file (a symlink put there, say).
    #[error("failed to merge into {0}: it is not the regular file reserved for the copy")]
    NotReserved(PathBuf),
    /// The destination could not be created or read.
    #[error("failed to create the destination {path}: {source}")]
    Destination {
        /// The destination path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `qemu-img convert` failed.
    #[error("failed to merge the backing chain of {source_path} into {path}: {message}")]
    Convert {
        /// The overlay.
        source_path: PathBuf,
        /// The destination.
        path: PathBuf,
        /// qemu-img's message.
        message: String,
    },
    /// The merge was cancelled.
    #[error("the merge into {0} was cancelled")]
    Cancelled(PathBuf),
    /// A copy's backing file name could not be made absolute.
    #[error("failed to point the copy {path} at its base {base} by absolute path: {message}")]
    Rebase {
        /// The copy.
        path: PathBuf,
        /// The base, as the source's header names it, joined to the source's directory.
        base: PathBuf,
        /// What failed.
        message: String,
    },
}

/// Merges the qcow2 overlay `src` and its backing chain into `dst`, a standalone qcow2 image.
///
/// With `reserved`, `dst` is a regular file the caller created exclusively beforehand (its
/// content is replaced, and it is kept on failure: its creator removes it); otherwise `dst` is
/// created exclusively here (an existing file is never touched) and removed on failure.
/// `progress(done, total)` gets `(0, total)` right after the destination is ours, then the
/// share of `total` `qemu-img` reports done, and `(total, total)` last. Returns the space the
/// result occupies. Blocking: run it on a blocking thread.
pub fn flatten(
    src: &Path,
    dst: &Path,
    reserved: bool,
    total: u64,
    mut progress: impl FnMut(u64, u64),
    cancel: &AtomicBool,
) -> Result<u64, FlattenError> {
    let dest_error = |source| FlattenError::Destination {
        path: dst.to_path_buf(),
        source,
    };
    if reserved {
        let meta = std::fs::symlink_metadata(dst).map_err(dest_error)?;
        if !meta.file_type().is_file() {
            return Err(FlattenError::NotReserved(dst.to_path_buf()));
        }
    } else {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dst)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => FlattenError::AlreadyExists(dst.to_path_buf()),
                _ => dest_error(e),
            })?;
    }
    // From here on the destination is ours: a new one is removed on any early return.
    let mut guard = RemoveOnDrop((!reserved).then_some(dst));
    progress(0, total);
    let mut cmd = Command::new(QEMU_IMG);
    cmd.args(["convert", "-p", "-f", "qcow2", "-O", "qcow2"])
        .arg(src)
        .arg(dst);
    match convert::run(&mut cmd, total, &mut progress, cancel).map_err(FlattenError::Spawn)? {
        Ended::Done => {}
        Ended::Cancelled => return Err(FlattenError::Cancelled(dst.to_path_buf())),
        Ended::Failed(message) => {
            return Err(FlattenError::Convert {
                source_path: src.to_path_buf(),
                path: dst.to_path_buf(),
                message,
            });
        }
    }
    let allocated = std::fs::metadata(dst)
        .map(|m| m.blocks().saturating_mul(512))
        .map_err(dest_error)?;
    progress(total, total);
    guard.0 = None;
    Ok(allocated)
}

/// Makes `dst`, a plain copy of the qcow2 overlay `src` in another directory (a copy into a
/// fallback pool, say), name its backing file by absolute path when `src` names it relative to
/// its own directory: the copy's relative name would resolve against the copy's directory and
/// miss the base (or find another file). Only the header's name changes (`qemu-img rebase -u`
/// with the format the header declares); no data is read or written. Returns whether the header
/// changed. The source's directory is taken with symlinks resolved, as the chain was checked
/// ([`crate::image::chain`]). Blocking: run it on a blocking thread.
pub fn anchor_backing(src: &Path, dst: &Path) -> Result<bool, FlattenError> {
    // The directory the chain was checked from: the source's own, symlinks resolved.
    let src = std::fs::canonicalize(src).unwrap_or_else(|_| src.to_path_buf());
    let (Some(from), Some(to)) = (src.parent(), dst.parent()) else {
        return Ok(false);
    };
    let header = crate::image::qcow2::read_header(dst).map_err(|e| FlattenError::Destination {
        path: dst.to_path_buf(),
        source: e,
    })?;
    let Ok(Some(h)) = crate::image::qcow2::parse(&header) else {
        return Ok(false);
    };
    let Some(name) = h.backing_file.and_then(|n| String::from_utf8(n).ok()) else {
        return Ok(false);
    };
    if Path::new(&name).is_absolute() || from == to {
        return Ok(false);
    }
    let base = from.join(&name);
    let rebase_error = |message: String| FlattenError::Rebase {
        path: dst.to_path_buf(),
        base: base.clone(),
        message,
    };
    let mut cmd = Command::new(QEMU_IMG);
    cmd.args(["rebase", "-u", "-f", "qcow2"]);
    if let Some(format) = &h.backing_format {
        cmd.args(["-F", format]);
    }
    let out = cmd
        .arg("-b")
        .arg(&base)
        .arg(dst)
        .output()
        .map_err(FlattenError::Spawn)?;
    if !out.status.success() {
        return Err(rebase_error(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(true)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn run(args: &[&str]) {
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    }

    /// `p` as a command argument.
    pub(crate) fn s(p: &Path) -> String {
        p.display().to_string()
    }

    /// A golden image `base.qcow2` (0x33 in its first MiB) and its overlay `ovl.qcow2` (0x44 in
    /// the second MiB, its base named by absolute path) in a temporary directory.
    pub(crate) fn chain() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let (base, ovl) = (dir.path().join("base.qcow2"), dir.path().join("ovl.qcow2"));
        run(&["qemu-img", "create", "-q", "-f", "qcow2", &s(&base), "8M"]);
        run(&[
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x33 0 1M",
            &s(&base),
        ]);
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
            &s(&ovl),
        ]);
        run(&[
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x44 1M 1M",
            &s(&ovl),
        ]);
        (dir, base, ovl)
    }

    /// Whether `img` reads `pattern` in the MiB at `offset`.
    pub(crate) fn reads(img: &Path, pattern: &str, offset: &str) -> bool {
        let out = Command::new("qemu-io")
            .args(["-U", "-r", "-f", "qcow2", "-c"])
            .arg(format!("read -P {pattern} {offset} 1M"))
            .arg(img)
            .output()
            .unwrap();
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed")
    }

    #[test]
    fn merges_a_chain_into_a_standalone_image_and_keeps_what_is_not_its_own() {
        let (dir, base, over) = chain();
        let cancel = AtomicBool::new(false);
        let mut seen = Vec::new();
        let dst = dir.path().join("flat");
        flatten(
            Path::new(&over),
            &dst,
            false,
            100,
            |n, t| seen.push((n, t)),
            &cancel,
        )
        .unwrap();
        assert_eq!(seen.first(), Some(&(0, 100)));
        assert_eq!(seen.last(), Some(&(100, 100)));
        let info = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&dst)
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert!(info.get("backing-filename").is_none(), "{info}");
        assert!(reads(&dst, "0x33", "0") && reads(&dst, "0x44", "1M"));
        // An existing file is never touched; a reserved one is filled.
        let err = flatten(Path::new(&over), &dst, false, 1, |_, _| {}, &cancel).unwrap_err();
        assert!(matches!(err, FlattenError::AlreadyExists(_)), "{err}");
        let reserved = dir.path().join("reserved");
        std::fs::write(&reserved, b"").unwrap();
        flatten(Path::new(&over), &reserved, true, 1, |_, _| {}, &cancel).unwrap();
        assert!(reads(&reserved, "0x33", "0") && reads(&reserved, "0x44", "1M"));
        // A failed merge removes a new destination and keeps a reserved one.
        let bad = dir.path().join("bad");
        let err = flatten(
            &dir.path().join("nothing"),
            &bad,
            false,
            1,
            |_, _| {},
            &cancel,
        )
        .unwrap_err();
        assert!(matches!(err, FlattenError::Convert { .. }), "{err}");
        assert!(!bad.exists());
        std::fs::write(&bad, b"").unwrap();
        assert!(
            flatten(
                &dir.path().join("nothing"),
                &bad,
                true,
                1,
                |_, _| {},
                &cancel
            )
            .is_err()
        );
        assert!(bad.exists());
        // A symlink where the reserved file was is refused.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&base, &link).unwrap();
        let err = flatten(Path::new(&over), &link, true, 1, |_, _| {}, &cancel).unwrap_err();
        assert!(matches!(err, FlattenError::NotReserved(_)), "{err}");
    }

    /// The backing file name `qemu-img info` reads from the image's header.
    pub(crate) fn backing_of(img: &Path) -> Option<String> {
        let out = Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(img)
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        info["backing-filename"].as_str().map(str::to_string)
    }

    #[test]
    fn a_copy_elsewhere_names_a_relative_base_by_absolute_path() {
        let (a, base, over) = chain();
        // Its base named relative to its own directory, as `qemu-img create -b base.qcow2` does.
        run(&[
            "qemu-img",
            "rebase",
            "-u",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
            &s(&over),
        ]);
        let b = tempfile::tempdir().unwrap();
        let (near, far) = (a.path().join("near"), b.path().join("far"));
        for copy in [&near, &far] {
            std::fs::copy(&over, copy).unwrap();
        }
        // In the same directory the relative name still finds the base: left as it is.
        assert!(!anchor_backing(&over, &near).unwrap());
        assert_eq!(backing_of(&near).as_deref(), Some("base.qcow2"));
        // Elsewhere it would not; it now names the base itself, and the base's data reads.
        assert!(anchor_backing(&over, &far).unwrap());
        assert_eq!(backing_of(&far), base.to_str().map(str::to_string));
        assert!(reads(&far, "0x33", "0"));
        // An absolute name is left alone, and so is a standalone image.
        assert!(!anchor_backing(&far, &b.path().join("far")).unwrap());
        assert!(!anchor_backing(&base, &base).unwrap());
    }
}
