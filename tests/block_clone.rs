//! The copy routes of volumes that are no files, against real storage: an iSCSI LUN of a
//! libvirt `iscsi-direct` pool (tgtd on loopback) read with libiscsi into a new sparse file, and
//! a partition of a libvirt `disk` pool on a loop device copied by libvirt's create-from-volume
//! into a new partition of the same pool.

#![allow(clippy::unwrap_used)]

mod block;
mod common;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use virtplane::copy::lun::{LunCopyError, copy_lun};
use virtplane::libvirt::Libvirt;
use virtplane::libvirt::iscsi_direct::IscsiLun;

use block::{DiskPool, IscsiPool, sha256, write_pattern};
use common::*;

async fn libvirt() -> Libvirt {
    let l = Libvirt::new(&libvirt_uri()).unwrap();
    l.connect().await.unwrap();
    l
}

/// A path for a copy in the `default` pool's directory, removed when dropped.
struct Dest(PathBuf);

impl Dest {
    fn new(prefix: &str) -> Self {
        Self(PathBuf::from("/var/lib/libvirt/images").join(format!("{}.img", unique(prefix))))
    }
}

impl Drop for Dest {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn an_iscsi_lun_is_copied_into_a_sparse_file_with_the_same_bytes() {
    // 64 MiB LUN: 1 MiB of data at 0, 4 MiB at 8 MiB, the rest never written.
    let pool = IscsiPool::create("vp-bc-lun", &[64 << 20], |_, f| {
        write_pattern(f, 0, 1 << 20, 3);
        write_pattern(f, 8 << 20, 4 << 20, 5);
    });
    let lun_file = pool.luns[0].clone();
    let before = sha256(&lun_file);
    let lun = libvirt()
        .await
        .iscsi_lun(&pool.name, &IscsiPool::volume(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lun.target, pool.iqn);
    assert_eq!(lun.lun, 1);

    let dst = Dest::new("vp-bc-lun");
    let (path, l) = (dst.0.clone(), lun.clone());
    let (report, seen) = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        let r = copy_lun(&l, &path, |d, t| seen.push((d, t)), &AtomicBool::new(false));
        (r, seen)
    })
    .await
    .unwrap();
    let report = report.unwrap();
    assert_eq!(report.logical_bytes, 64 << 20);
    assert_eq!(sha256(&dst.0), before, "same bytes as the LUN");
    // Only the 5 MiB of data were written (plus filesystem slack).
    let allocated = std::fs::metadata(&dst.0).unwrap().blocks() * 512;
    assert!(
        (5 << 20..=6 << 20).contains(&allocated),
        "allocated {allocated} bytes"
    );
    assert_eq!(report.allocated_bytes_dst, allocated);
    assert_eq!(seen.first(), Some(&(0, 64 << 20)));
    assert_eq!(seen.last(), Some(&(64 << 20, 64 << 20)));
    assert!(
        seen.windows(2).all(|w| w[0].0 <= w[1].0),
        "progress never goes back"
    );
    // The LUN is unchanged, and the copy is a file of its own, not the LUN.
    assert_eq!(sha256(&lun_file), before);
    write_pattern(&dst.0, 0, 4096, 99);
    assert_eq!(
        sha256(&lun_file),
        before,
        "writing the copy leaves the LUN alone"
    );
}

#[tokio::test]
async fn a_cancelled_or_failed_lun_copy_leaves_nothing_behind() {
    let pool = IscsiPool::create("vp-bc-fail", &[256 << 20], |_, f| {
        write_pattern(f, 0, 64 << 20, 9);
    });
    let lun = libvirt()
        .await
        .iscsi_lun(&pool.name, &IscsiPool::volume(1))
        .await
        .unwrap()
        .unwrap();

    // Cancelled as soon as it started: the partial copy is removed.
    let dst = Dest::new("vp-bc-cancel");
    let (path, l) = (dst.0.clone(), lun.clone());
    let r = tokio::task::spawn_blocking(move || {
        let cancel = AtomicBool::new(false);
        copy_lun(
            &l,
            &path,
            |_, _| cancel.store(true, Ordering::Relaxed),
            &cancel,
        )
    })
    .await
    .unwrap();
    assert!(matches!(r, Err(LunCopyError::Cancelled(_))), "{r:?}");
    assert!(!dst.0.exists(), "the partial copy was removed");

    // An existing destination is never overwritten.
    let taken = Dest::new("vp-bc-taken");
    std::fs::write(&taken.0, b"mine").unwrap();
    let (path, l) = (taken.0.clone(), lun.clone());
    let r = tokio::task::spawn_blocking(move || {
        copy_lun(&l, &path, |_, _| {}, &AtomicBool::new(false))
    })
    .await
    .unwrap();
    assert!(matches!(r, Err(LunCopyError::AlreadyExists(_))), "{r:?}");
    assert_eq!(std::fs::read(&taken.0).unwrap(), b"mine");

    // A LUN the target does not have: an error, and no file.
    let missing = IscsiLun { lun: 9, ..lun };
    let gone = Dest::new("vp-bc-missing");
    let path = gone.0.clone();
    let r = tokio::task::spawn_blocking(move || {
        copy_lun(&missing, &path, |_, _| {}, &AtomicBool::new(false))
    })
    .await
    .unwrap();
    assert!(r.is_err(), "{r:?}");
    assert!(!gone.0.exists());

    // No room at the destination (a 16 MiB tmpfs for 64 MiB of data): the copy fails and the
    // partial file is removed.
    let mnt = PathBuf::from("/var/tmp/virtplane-block").join(unique("vp-bc-full"));
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap()
        .success();
    assert!(mounted, "mount a small tmpfs");
    let full = mnt.join("copy.img");
    let (path, l) = (
        full.clone(),
        IscsiLun {
            lun: 1,
            ..missing_lun(&pool)
        },
    );
    let r = tokio::task::spawn_blocking(move || {
        copy_lun(&l, &path, |_, _| {}, &AtomicBool::new(false))
    })
    .await
    .unwrap();
    let left = full.exists();
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    let _ = std::fs::remove_dir(&mnt);
    assert!(matches!(r, Err(LunCopyError::Convert { .. })), "{r:?}");
    assert!(!left, "the partial copy was removed");
}

fn missing_lun(pool: &IscsiPool) -> IscsiLun {
    IscsiLun {
        portal: "127.0.0.1:3260".into(),
        target: pool.iqn.clone(),
        lun: 9,
        initiator: block::INITIATOR.into(),
    }
}

#[tokio::test]
async fn a_disk_pool_partition_is_copied_into_a_new_partition_of_its_pool() {
    let pool = DiskPool::create("vp-bc-disk", 64 << 20);
    let (name, dev) = pool.volume(8 << 20);
    write_pattern(std::path::Path::new(&dev), 0, 2 << 20, 11);
    let before = sha256(std::path::Path::new(&dev));
    let copy = libvirt()
        .await
        .copy_volume_in_pool(&pool.name, &name, &format!("{name}-clone1"))
        .await
        .unwrap();
    assert_ne!(copy.name, name);
    assert!(
        pool.volumes().contains(&copy.name),
        "a volume of the same pool"
    );
    assert!(copy.capacity >= 8 << 20);
    let copied = std::path::Path::new(&copy.path);
    // The new partition is at least as large; its first 8 MiB are the source's bytes.
    let head = |p: &std::path::Path| {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("head -c {} {} | sha256sum", 8 << 20, p.display()))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(head(copied), head(std::path::Path::new(&dev)));
    assert_eq!(
        sha256(std::path::Path::new(&dev)),
        before,
        "the source is unchanged"
    );
}
