//! The disk copier on real files: sparse raw images, qcow2 images checked by `qemu-img`,
//! reflinks on a real XFS filesystem when one can be mounted, cleanup and cancellation.

#![allow(clippy::unwrap_used)]

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use virtplane::copy::{CopyError, CopyReport, Strategy, StrategyUsed, allocated_bytes, copy_file};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

const XFS_SUPER_MAGIC: i64 = 0x5846_5342;
const BTRFS_SUPER_MAGIC: i64 = 0x9123_683E;

/// Random-looking bytes (never a long zero run), reproducible from `seed`.
fn noise(len: u64, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len as usize);
    while (out.len() as u64) < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&(x | 1).to_le_bytes());
    }
    out.truncate(len as usize);
    out
}

/// A sparse file of `size` bytes with `writes` (offset, bytes) written into it, synced.
fn sparse_file(path: &Path, size: u64, writes: &[(u64, Vec<u8>)]) {
    let f = File::create_new(path).unwrap();
    f.set_len(size).unwrap();
    for (offset, bytes) in writes {
        f.write_all_at(bytes, *offset).unwrap();
    }
    f.sync_all().unwrap();
}

/// Asserts that two files have the same size and bytes, reading both in full.
fn assert_same_content(a: &Path, b: &Path) {
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    assert_eq!(fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let mut offset = 0u64;
    loop {
        let n = fa.read(&mut ba).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        assert!(
            ba[..n] == bb[..n],
            "{} and {} differ in the 4 MiB from {offset}",
            a.display(),
            b.display()
        );
        if n == 0 {
            break;
        }
        offset += n as u64;
    }
}

fn copy(src: &Path, dst: &Path, strategy: Strategy) -> Result<CopyReport, CopyError> {
    copy_file(src, dst, strategy, |_, _| {}, &AtomicBool::new(false))
}

fn fs_type(path: &Path) -> i64 {
    #[allow(clippy::unnecessary_cast)]
    let t = rustix::fs::statfs(path).unwrap().f_type as i64;
    t
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn sparse_raw_image_copies_identically_and_stays_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("disk.raw"), dir.path().join("clone.raw"));
    let zeros_at = 3 * GIB;
    let zeros_len = 16 * MIB;
    sparse_file(
        &src,
        4 * GIB,
        &[
            (0, noise(MIB, 1)),
            // Not block-aligned, crossing 64 KiB and 1 MiB boundaries.
            (GIB + 12_345, noise(3 * MIB + 777, 2)),
            (5 * GIB / 2, noise(2 * MIB, 3)),
            // Zero-filled but allocated: the copy should make this a hole.
            (zeros_at, vec![0; zeros_len as usize]),
            // Data right after the zeros, and at the very end of the file.
            (zeros_at + zeros_len, noise(64 * KIB, 4)),
            (4 * GIB - 512 * KIB, noise(512 * KIB, 5)),
        ],
    );
    fs::set_permissions(&src, fs::Permissions::from_mode(0o640)).unwrap();
    let src_allocated = allocated_bytes(&src).unwrap();
    assert!(src_allocated >= zeros_len, "the zeros were not allocated");

    let report = copy(&src, &dst, Strategy::Copy).unwrap();

    assert_same_content(&src, &dst);
    assert_eq!(report.strategy_used, StrategyUsed::Copy);
    assert_eq!(report.logical_bytes, 4 * GIB);
    assert_eq!(fs::metadata(&dst).unwrap().len(), 4 * GIB);
    assert_eq!(report.allocated_bytes_src, src_allocated);
    assert_eq!(report.allocated_bytes_dst, allocated_bytes(&dst).unwrap());
    // Holes were not counted, the allocated zeros were but not written.
    assert!(report.data_bytes >= src_allocated - zeros_len && report.data_bytes < 64 * MIB);
    assert!(report.written_bytes <= report.data_bytes - zeros_len);
    // The copy takes no more space than the source, and the zero region became a hole.
    assert!(
        report.allocated_bytes_dst <= src_allocated - zeros_len,
        "copy allocates {} bytes, source {src_allocated} of which {zeros_len} zeros",
        report.allocated_bytes_dst
    );
    assert_eq!(
        fs::metadata(&dst).unwrap().permissions().mode() & 0o777,
        0o640
    );
}

#[test]
fn qcow2_image_copy_passes_qemu_img_compare() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (
        dir.path().join("disk.qcow2"),
        dir.path().join("clone.qcow2"),
    );
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&src)
        .arg("1G"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .args(["-c", "write -P 0xab 0 4M"])
        .args(["-c", "write -P 0x5c 300M 2M"])
        .args(["-c", "write -P 0x17 1023M 1M"])
        .args(["-c", "write -z 600M 1M"])
        .arg(&src));

    let report = copy(&src, &dst, Strategy::Auto).unwrap();

    run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "qcow2"])
        .arg(&src)
        .arg(&dst));
    run(Command::new("qemu-img").args(["check", "-q"]).arg(&dst));
    assert_same_content(&src, &dst);
    assert!(report.allocated_bytes_dst <= report.allocated_bytes_src);

    // Make sure the comparison can fail: change the copy's guest data and compare again.
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x01 300M 4k"])
        .arg(&dst));
    let differs = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"])
        .arg(&src)
        .arg(&dst)
        .status()
        .unwrap();
    assert_eq!(differs.code(), Some(1));
}

#[test]
fn qcow2_overlay_copy_keeps_its_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let overlay = dir.path().join("overlay.qcow2");
    let dst = dir.path().join("overlay-clone.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("64M"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x42 0 1M"])
        .arg(&base));
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&overlay));

    copy(&overlay, &dst, Strategy::Copy).unwrap();

    // Not flattened: the copy is still an overlay of the same base, and reads the same.
    let info = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&dst));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["backing-filename"], base.to_str().unwrap());
    run(Command::new("qemu-img")
        .arg("compare")
        .arg(&overlay)
        .arg(&dst));
}

#[test]
fn reflink_on_a_filesystem_without_reflinks_is_a_distinct_error() {
    let dir = tempfile::tempdir().unwrap();
    let fs = fs_type(dir.path());
    if fs == XFS_SUPER_MAGIC || fs == BTRFS_SUPER_MAGIC {
        eprintln!("SKIPPED: {} may support reflinks", dir.path().display());
        return;
    }
    let (src, dst) = (dir.path().join("disk.raw"), dir.path().join("clone.raw"));
    sparse_file(&src, 8 * MIB, &[(MIB, noise(MIB, 9))]);

    let err = copy(&src, &dst, Strategy::Reflink).unwrap_err();
    assert!(
        matches!(err, CopyError::ReflinkUnsupported { .. }),
        "{err:?}"
    );
    assert!(!dst.exists(), "the failed reflink left {}", dst.display());

    let report = copy(&src, &dst, Strategy::Auto).unwrap();
    assert_eq!(report.strategy_used, StrategyUsed::Copy);
    assert_same_content(&src, &dst);
}

#[test]
fn existing_destination_is_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("disk.raw"), dir.path().join("clone.raw"));
    sparse_file(&src, 4 * MIB, &[(0, noise(MIB, 5))]);
    fs::write(&dst, b"someone else's disk").unwrap();

    for strategy in [Strategy::Auto, Strategy::Copy, Strategy::Reflink] {
        let mut calls = 0;
        let err = copy_file(
            &src,
            &dst,
            strategy,
            |_, _| calls += 1,
            &AtomicBool::new(false),
        )
        .unwrap_err();
        assert!(
            matches!(&err, CopyError::AlreadyExists { path } if path == &dst),
            "{err:?}"
        );
        assert_eq!(calls, 0);
        assert_eq!(fs::read(&dst).unwrap(), b"someone else's disk");
    }
    // The source itself as destination is refused too.
    assert!(matches!(
        copy(&src, &src, Strategy::Auto),
        Err(CopyError::AlreadyExists { .. })
    ));
    assert_eq!(fs::metadata(&src).unwrap().len(), 4 * MIB);
}

#[test]
fn cancellation_mid_copy_removes_the_partial_destination() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("disk.raw"), dir.path().join("clone.raw"));
    sparse_file(
        &src,
        GIB,
        &[(0, noise(32 * MIB, 6)), (GIB / 2, noise(32 * MIB, 7))],
    );
    let cancel = AtomicBool::new(false);
    let mut last = 0;
    let err = copy_file(
        &src,
        &dst,
        Strategy::Copy,
        |done, _| {
            last = done;
            if done >= 8 * MIB {
                // By now the copy has written data to the destination.
                assert!(dst.exists());
                cancel.store(true, Ordering::Relaxed);
            }
        },
        &cancel,
    )
    .unwrap_err();
    assert!(
        matches!(&err, CopyError::Cancelled { path } if path == &dst),
        "{err:?}"
    );
    assert_eq!(last, 8 * MIB, "the copy went on after the cancellation");
    assert!(!dst.exists(), "the partial copy was left behind");

    // Cancelled before it starts: nothing is created.
    let err = copy_file(
        &src,
        &dst,
        Strategy::Auto,
        |_, _| {},
        &AtomicBool::new(true),
    );
    assert!(matches!(err, Err(CopyError::Cancelled { .. })));
    assert!(!dst.exists());
}

#[test]
fn progress_counts_the_data_extents_monotonically_to_the_total() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("disk.raw"), dir.path().join("clone.raw"));
    sparse_file(
        &src,
        8 * GIB,
        &[
            (0, noise(5 * MIB + 4 * KIB, 8)),
            (3 * GIB, noise(2 * MIB, 9)),
            (7 * GIB, vec![0; 3 * MIB as usize]),
        ],
    );
    let measured = virtplane::copy::data_bytes(&src).unwrap();
    let mut calls = Vec::new();
    let report = copy_file(
        &src,
        &dst,
        Strategy::Auto,
        |done, total| calls.push((done, total)),
        &AtomicBool::new(false),
    )
    .unwrap();

    let total = report.data_bytes;
    assert!((10 * MIB + 4 * KIB..11 * MIB).contains(&total), "{total}");
    assert_eq!(measured, total, "data_bytes measures what progress counts");
    assert_eq!(calls.first(), Some(&(0, total)));
    assert_eq!(calls.last(), Some(&(total, total)));
    assert!(calls.iter().all(|&(_, t)| t == total));
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0), "{calls:?}");
    // Smooth: about one call per MiB of data, none for the 8 GiB of holes.
    assert!(
        calls.len() >= 10 && calls.len() < 20,
        "{} calls",
        calls.len()
    );
    assert_same_content(&src, &dst);
}

#[test]
fn empty_and_all_hole_images_copy() {
    let dir = tempfile::tempdir().unwrap();
    for (name, size) in [("empty", 0), ("holes", 2 * GIB)] {
        let src = dir.path().join(name);
        let dst = dir.path().join(format!("{name}-clone"));
        sparse_file(&src, size, &[]);
        let mut calls = Vec::new();
        let report = copy_file(
            &src,
            &dst,
            Strategy::Copy,
            |d, t| calls.push((d, t)),
            &AtomicBool::new(false),
        )
        .unwrap();
        assert_eq!(fs::metadata(&dst).unwrap().len(), size);
        assert_eq!((report.data_bytes, report.written_bytes), (0, 0));
        assert_eq!(report.allocated_bytes_dst, 0);
        assert_eq!(calls.last(), Some(&(0, 0)));
    }
}

#[test]
fn bad_sources_and_destinations_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("disk.raw");
    sparse_file(&src, MIB, &[(0, noise(4 * KIB, 1))]);

    let missing = dir.path().join("missing.raw");
    let err = copy(&missing, &dir.path().join("a"), Strategy::Auto).unwrap_err();
    assert!(
        matches!(&err, CopyError::OpenSource { path, .. } if path == &missing),
        "{err:?}"
    );
    assert!(err.to_string().contains("missing.raw"));

    let err = copy(dir.path(), &dir.path().join("b"), Strategy::Auto).unwrap_err();
    assert!(matches!(err, CopyError::NotRegularFile { .. }), "{err:?}");
    assert!(!dir.path().join("b").exists());

    let nowhere = dir.path().join("no-such-dir/clone.raw");
    let err = copy(&src, &nowhere, Strategy::Auto).unwrap_err();
    assert!(
        matches!(err, CopyError::CreateDestination { .. }),
        "{err:?}"
    );

    let err = allocated_bytes(&missing).unwrap_err();
    assert!(matches!(err, CopyError::Metadata { .. }), "{err:?}");
}

/// A filesystem mounted for one test, unmounted when dropped. Needs root, `mount` and (for XFS)
/// `mkfs.xfs` with a free loop device; `None` with the reason when it cannot be had.
struct Mount {
    dir: PathBuf,
}

impl Mount {
    fn try_new(dir: PathBuf, args: &[&str]) -> Result<Mount, String> {
        fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(args)
            .arg(&dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(Mount { dir })
    }

    fn xfs(scratch: &Path) -> Result<Mount, String> {
        let image = scratch.join("xfs.img");
        File::create_new(&image)
            .and_then(|f| f.set_len(512 * MIB))
            .map_err(|e| e.to_string())?;
        let out = Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&image)
            .output()
            .map_err(|e| format!("mkfs.xfs: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mkfs.xfs: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let image = image.to_str().ok_or("non-UTF-8 path")?;
        Mount::try_new(scratch.join("xfs"), &["-t", "xfs", "-o", "loop", image])
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Free bytes of the filesystem holding `path`.
fn free_bytes(path: &Path) -> u64 {
    let st = rustix::fs::statvfs(path).unwrap();
    st.f_bfree * st.f_frsize
}

#[test]
fn reflink_on_xfs_shares_extents_and_falls_back_across_filesystems() {
    let scratch = tempfile::tempdir().unwrap();
    let xfs = match Mount::xfs(scratch.path()) {
        Ok(m) => m,
        Err(why) => {
            eprintln!("SKIPPED: cannot mount a loop XFS filesystem: {why}");
            return;
        }
    };
    assert_eq!(fs_type(&xfs.dir), XFS_SUPER_MAGIC);
    let src = xfs.dir.join("disk.raw");
    sparse_file(
        &src,
        GIB,
        &[(0, noise(32 * MIB, 1)), (GIB / 2, noise(32 * MIB, 2))],
    );

    // Reflink: same bytes, (almost) no space used.
    let free_before = free_bytes(&xfs.dir);
    let dst = xfs.dir.join("reflink.raw");
    let mut calls = Vec::new();
    let report = copy_file(
        &src,
        &dst,
        Strategy::Reflink,
        |d, t| calls.push((d, t)),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(report.strategy_used, StrategyUsed::Reflink);
    assert_eq!(report.written_bytes, 0);
    assert_eq!(
        calls,
        vec![
            (0, report.data_bytes),
            (report.data_bytes, report.data_bytes)
        ]
    );
    let used = free_before - free_bytes(&xfs.dir);
    assert!(used < 4 * MIB, "a reflink of 64 MiB used {used} bytes");
    assert_same_content(&src, &dst);

    // Auto reflinks within XFS; Copy copies.
    let report = copy(&src, &xfs.dir.join("auto.raw"), Strategy::Auto).unwrap();
    assert_eq!(report.strategy_used, StrategyUsed::Reflink);
    let report = copy(&src, &xfs.dir.join("copy.raw"), Strategy::Copy).unwrap();
    assert_eq!(report.strategy_used, StrategyUsed::Copy);
    assert_eq!(report.written_bytes, 64 * MIB);
    assert_same_content(&src, &xfs.dir.join("copy.raw"));

    // Across filesystems (EXDEV): Reflink fails distinctly, Auto copies.
    let outside = scratch.path().join("outside.raw");
    let err = copy(&src, &outside, Strategy::Reflink).unwrap_err();
    assert!(
        matches!(err, CopyError::ReflinkUnsupported { .. }),
        "{err:?}"
    );
    assert!(!outside.exists());
    let report = copy(&src, &outside, Strategy::Auto).unwrap();
    assert_eq!(report.strategy_used, StrategyUsed::Copy);
    assert_same_content(&src, &outside);
}

#[test]
fn running_out_of_space_removes_the_partial_destination() {
    let scratch = tempfile::tempdir().unwrap();
    let small = match Mount::try_new(
        scratch.path().join("small"),
        &["-t", "tmpfs", "-o", "size=8m", "tmpfs"],
    ) {
        Ok(m) => m,
        Err(why) => {
            eprintln!("SKIPPED: cannot mount a small tmpfs: {why}");
            return;
        }
    };
    let src = scratch.path().join("disk.raw");
    sparse_file(
        &src,
        GIB,
        &[(0, noise(4 * MIB, 1)), (GIB / 2, noise(16 * MIB, 2))],
    );
    let dst = small.dir.join("clone.raw");

    let err = copy(&src, &dst, Strategy::Auto).unwrap_err();
    match &err {
        CopyError::Write { path, source, .. } => {
            assert_eq!(path, &dst);
            assert_eq!(source.raw_os_error(), Some(28), "not ENOSPC: {err:?}");
        }
        _ => panic!("expected a write error, got {err:?}"),
    }
    assert!(!dst.exists(), "the partial copy was left behind");
}
