//! Real block and network storage for the block-storage tests: an iSCSI target served by the
//! userspace `tgtd` on loopback (`hack/tgt.sh`) behind a libvirt `iscsi-direct` pool, and a
//! libvirt `disk` pool on a loop device. Each fixture sets up its own target, pool or loop
//! device and removes it when dropped.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::common::{unique, virsh};

/// The IQN the iscsi-direct pools log in with.
pub const INITIATOR: &str = "iqn.2026-11.io.virtplane:agent";

fn hack(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("hack")
        .join(script)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn quiet(cmd: &mut Command) {
    let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// A directory for the fixtures' backing files, removed when dropped.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from("/var/tmp/virtplane-block").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An iSCSI target with file-backed LUNs (LUN 1, 2, …) and a libvirt `iscsi-direct` pool on
/// it, whose volumes are `unit:0:0:N`.
pub struct IscsiPool {
    /// The pool's name.
    pub name: String,
    /// The target's IQN.
    pub iqn: String,
    /// The LUNs' backing files, LUN 1 first.
    pub luns: Vec<PathBuf>,
    tid: u32,
    dir: PathBuf,
}

static NEXT_TID: AtomicU32 = AtomicU32::new(0);

impl IscsiPool {
    /// Serves LUNs of `sizes` bytes (sparse files; `fill` writes their contents) and starts the
    /// pool.
    pub fn create(prefix: &str, sizes: &[u64], fill: impl Fn(usize, &Path)) -> Self {
        run(Command::new(hack("tgt.sh")).arg("start"));
        let name = unique(prefix);
        let dir = scratch(&name);
        let iqn = format!("iqn.2026-11.io.virtplane:{name}");
        let luns: Vec<PathBuf> = sizes
            .iter()
            .enumerate()
            .map(|(i, size)| {
                let path = dir.join(format!("lun{}.img", i + 1));
                std::fs::File::create(&path)
                    .unwrap()
                    .set_len(*size)
                    .unwrap();
                fill(i + 1, &path);
                path
            })
            .collect();
        // A free target id: tgtadm refuses one in use.
        let base = 1000 + (std::process::id() % 500) * 20;
        let tid = (0..20)
            .map(|_| base + NEXT_TID.fetch_add(1, Ordering::SeqCst) % 20)
            .find(|tid| {
                Command::new(hack("tgt.sh"))
                    .args(["add", &tid.to_string(), &iqn])
                    .args(&luns)
                    .stderr(Stdio::null())
                    .status()
                    .unwrap()
                    .success()
            })
            .expect("a free tgt target id");
        let xml = format!(
            "<pool type='iscsi-direct'><name>{name}</name><source><host name='127.0.0.1' port='3260'/>\
             <device path='{iqn}'/><initiator><iqn name='{INITIATOR}'/></initiator></source></pool>"
        );
        let file = dir.join("pool.xml");
        std::fs::write(&file, xml).unwrap();
        virsh(&["pool-create", file.to_str().unwrap()]);
        Self {
            name,
            iqn,
            luns,
            tid,
            dir,
        }
    }

    /// The volume of LUN `n`.
    pub fn volume(n: usize) -> String {
        format!("unit:0:0:{n}")
    }
}

impl Drop for IscsiPool {
    fn drop(&mut self) {
        quiet(
            Command::new("virsh")
                .args(["-c", &crate::common::libvirt_uri()])
                .args(["pool-destroy", &self.name]),
        );
        quiet(Command::new(hack("tgt.sh")).args(["del", &self.tid.to_string()]));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A libvirt `disk` pool on a loop device backed by a sparse file: libvirt creates partitions
/// as its volumes.
pub struct DiskPool {
    /// The pool's name.
    pub name: String,
    /// The loop device (`/dev/loopN`).
    pub device: String,
    dir: PathBuf,
}

impl DiskPool {
    /// A pool on a fresh GPT-labelled loop device of `size` bytes.
    pub fn create(prefix: &str, size: u64) -> Self {
        let name = unique(prefix);
        let dir = scratch(&name);
        let backing = dir.join("disk.img");
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(size)
            .unwrap();
        let device = run(Command::new("losetup")
            .args(["-fP", "--show"])
            .arg(&backing))
        .trim()
        .to_string();
        let pool = Self { name, device, dir };
        run(Command::new("parted").args(["-s", &pool.device, "mklabel", "gpt"]));
        let xml = format!(
            "<pool type='disk'><name>{}</name><source><device path='{}'/><format type='gpt'/></source>\
             <target><path>/dev</path></target></pool>",
            pool.name, pool.device
        );
        let file = pool.dir.join("pool.xml");
        std::fs::write(&file, xml).unwrap();
        virsh(&["pool-create", file.to_str().unwrap()]);
        pool
    }

    /// Creates a partition volume of `bytes` and returns its name and device path.
    pub fn volume(&self, bytes: u64) -> (String, String) {
        let before = self.volumes();
        // libvirt insists on the next partition's own name (`loop0p1`, `loop0p2`, …).
        let base = self.device.trim_start_matches("/dev/");
        let part = format!("{base}p{}", before.len() + 1);
        virsh(&[
            "vol-create-as",
            &self.name,
            &part,
            &bytes.to_string(),
            "--format",
            "none",
        ]);
        let name = self
            .volumes()
            .into_iter()
            .find(|v| !before.contains(v))
            .expect("the new partition");
        let path = virsh(&["vol-path", "--pool", &self.name, &name])
            .trim()
            .to_string();
        (name, path)
    }

    /// The pool's volume names.
    pub fn volumes(&self) -> Vec<String> {
        // `vol-list` prints a header, a rule, then `NAME PATH` lines.
        virsh(&["pool-refresh", &self.name]);
        virsh(&["vol-list", &self.name])
            .lines()
            .skip(2)
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }
}

impl Drop for DiskPool {
    fn drop(&mut self) {
        quiet(
            Command::new("virsh")
                .args(["-c", &crate::common::libvirt_uri()])
                .args(["pool-destroy", &self.name]),
        );
        quiet(Command::new("losetup").args(["-d", &self.device]));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes `len` bytes of a repeatable non-zero pattern at `offset` of `path`.
pub fn write_pattern(path: &Path, offset: u64, len: usize, seed: u8) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
}

/// The SHA-256 of a file or device (`sha256sum`).
pub fn sha256(path: &Path) -> String {
    run(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}
