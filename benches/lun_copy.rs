//! iSCSI LUN copy benchmark: a 1 GiB LUN holding 256 MiB of random data, served by tgtd on
//! loopback behind a libvirt `iscsi-direct` pool, copied by virtplane's LUN copier
//! (`virtplane::copy::lun`, the clone route of pools that cannot create volumes) and, as the
//! reference, by a plain `qemu-img convert -O raw` of the same LUN to a sparse file, in one run.
//! Prints each one's time and allocated bytes.
//!
//! Run with `cargo bench --bench lun_copy` as root, with libvirtd running and tgt installed
//! (`hack/install-deps.sh`); it starts tgtd with `hack/tgt.sh start` and removes its target,
//! pool and files at the end. `cargo test` does not run it. `VIRTPLANE_BENCH_DIR` sets where
//! the files go (default: the temporary directory).

use std::error::Error;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use virtplane::copy::lun::{copy_lun, image_opts};
use virtplane::libvirt::Libvirt;

type Result<T, E = Box<dyn Error>> = std::result::Result<T, E>;

const MIB: u64 = 1 << 20;
const LUN_SIZE: u64 = 1 << 30;
/// 4 regions of 64 MiB: 256 MiB of data.
const REGIONS: u64 = 4;
const REGION_SIZE: u64 = 64 * MIB;
const URI: &str = "qemu:///system";
const TID: &str = "3917";

fn hack(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("hack")
        .join(script)
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn allocated(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// Cleans up the target and the pool however the benchmark ends.
struct Teardown(String);

impl Drop for Teardown {
    fn drop(&mut self) {
        let _ = Command::new("virsh")
            .args(["-c", URI, "pool-destroy", &self.0])
            .output();
        let _ = Command::new(hack("tgt.sh")).args(["del", TID]).output();
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        println!("LUN copy benchmark: run it with `cargo bench --bench lun_copy`");
        return Ok(());
    }
    let base = std::env::var_os("VIRTPLANE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let scratch = tempfile::tempdir_in(&base)?;
    let backing = scratch.path().join("lun1.img");
    {
        let f = File::create(&backing)?;
        f.set_len(LUN_SIZE)?;
        // Random data, spread over the LUN: regions at 0, 256, 512 and 768 MiB.
        let mut buf = vec![0u8; MIB as usize];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for r in 0..REGIONS {
            for m in 0..REGION_SIZE / MIB {
                for b in buf.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
                }
                f.write_all_at(&buf, r * (LUN_SIZE / REGIONS) + m * MIB)?;
            }
        }
        f.sync_all()?;
    }
    run(Command::new(hack("tgt.sh")).arg("start"))?;
    let iqn = "iqn.2026-11.io.virtplane:bench-lun";
    let _ = Command::new(hack("tgt.sh")).args(["del", TID]).output();
    run(Command::new(hack("tgt.sh"))
        .args(["add", TID, iqn])
        .arg(&backing))?;
    let pool = format!("vp-bench-lun-{}", std::process::id());
    let _teardown = Teardown(pool.clone());
    let xml = scratch.path().join("pool.xml");
    std::fs::write(
        &xml,
        format!(
            "<pool type='iscsi-direct'><name>{pool}</name><source><host name='127.0.0.1' port='3260'/>\
             <device path='{iqn}'/><initiator><iqn name='iqn.2026-11.io.virtplane:agent'/></initiator></source></pool>"
        ),
    )?;
    run(Command::new("virsh")
        .args(["-c", URI, "pool-create"])
        .arg(&xml))?;

    let libvirt = Libvirt::new(URI)?;
    libvirt.connect().await?;
    let lun = libvirt.iscsi_lun(&pool, "unit:0:0:1").await??;
    println!(
        "source: {} GiB LUN over iSCSI on loopback (tgtd), {} MiB of random data in {REGIONS} regions, backing file allocates {} MiB",
        LUN_SIZE >> 30,
        REGIONS * REGION_SIZE / MIB,
        allocated(&backing)? / MIB
    );

    let ours = scratch.path().join("virtplane.img");
    let start = Instant::now();
    let l = lun.clone();
    let o = ours.clone();
    tokio::task::spawn_blocking(move || copy_lun(&l, &o, |_, _| {}, &AtomicBool::new(false)))
        .await??;
    File::open(&ours)?.sync_all()?;
    let ours_time = start.elapsed();

    let reference = scratch.path().join("qemu-img.img");
    let start = Instant::now();
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw", "--image-opts"])
        .arg(image_opts(&lun))
        .arg(&reference))?;
    File::open(&reference)?.sync_all()?;
    let ref_time = start.elapsed();

    let same = run(Command::new("cmp").arg(&ours).arg(&backing)).is_ok();
    println!(
        "{:<32} {:>10} {:>16}",
        "copy", "time (s)", "allocated (MiB)"
    );
    println!(
        "{:<32} {:>10.2} {:>16}",
        "virtplane LUN copier",
        ours_time.as_secs_f64(),
        allocated(&ours)? / MIB
    );
    println!(
        "{:<32} {:>10.2} {:>16}",
        "qemu-img convert (reference)",
        ref_time.as_secs_f64(),
        allocated(&reference)? / MIB
    );
    println!("virtplane copy equals the LUN byte for byte: {same}");
    Ok(())
}
