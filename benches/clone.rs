//! Clone benchmark: an 8 GiB sparse raw disk holding 512 MiB of random data, cloned by
//! virtplane's copier, by `cp --sparse=always` and by `virsh vol-clone`, in one run.
//!
//! Run with `cargo bench --bench clone` (as root, with libvirtd running: the `virsh` clone uses a
//! temporary transient dir pool on `qemu:///system`). `cargo test` does not run it.
//!
//! Environment:
//! * `VIRTPLANE_BENCH_DIR`: where to put the files (default: the temporary directory); use a
//!   directory on XFS or btrfs to see reflinks.
//! * `VIRTPLANE_BENCH_ROUNDS`: how many times to run the three clones (default 1).
//!
//! Each clone is timed until its data is on disk: the copier fsyncs itself, `cp` and `virsh` are
//! followed by an fsync of the clone inside the timing. Before each clone the page cache is
//! dropped (`/proc/sys/vm/drop_caches`) where permitted; otherwise the source's cached pages are
//! evicted with `posix_fadvise(DONTNEED)`, which any process may do for its own files. The output
//! says which happened.

use std::error::Error;
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use rustix::fs::{Advice, fadvise};
use virtplane::copy::{Strategy, copy_file};

type Result<T, E = Box<dyn Error>> = std::result::Result<T, E>;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const DISK_SIZE: u64 = 8 * GIB;
/// 8 regions of 64 MiB: 512 MiB of data.
const REGIONS: u64 = 8;
const REGION_SIZE: u64 = 64 * MIB;
const URI: &str = "qemu:///system";

fn main() -> Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        println!("clone benchmark: run it with `cargo bench --bench clone`");
        return Ok(());
    }
    let base = std::env::var_os("VIRTPLANE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let rounds: u32 = match std::env::var("VIRTPLANE_BENCH_ROUNDS") {
        Ok(v) => v.parse()?,
        Err(_) => 1,
    };
    let scratch = tempfile::tempdir_in(&base)?;
    let pool_dir = scratch.path().join("pool");
    fs::create_dir(&pool_dir)?;
    let src = pool_dir.join("disk.raw");

    println!(
        "source: {} GiB sparse raw disk, {} MiB of random data in {REGIONS} regions, in {}",
        DISK_SIZE / GIB,
        REGIONS * REGION_SIZE / MIB,
        base.display()
    );
    make_source(&src)?;
    println!(
        "source allocated: {:.1} MiB",
        fs::metadata(&src)?.blocks() as f64 * 512.0 / MIB as f64
    );
    let pool = Pool::create(&format!("vp-bench-{}", std::process::id()), &pool_dir)?;

    let mut results = Vec::new();
    for round in 0..rounds {
        // Rotate the order each round so that no method always runs first.
        let mut methods = [Method::Virtplane, Method::Cp, Method::VirshVolClone];
        methods.rotate_left(round as usize % 3);
        for method in methods {
            let dst = pool_dir.join(format!("clone-{}-{round}.raw", method.slug()));
            let cache = drop_caches(&src)?;
            let start = Instant::now();
            method.clone_disk(&src, &dst, &pool)?;
            File::open(&dst)?.sync_all()?;
            let elapsed = start.elapsed();
            let allocated = fs::metadata(&dst)?.blocks() * 512;
            let identical = Command::new("cmp")
                .arg("--quiet")
                .arg(&src)
                .arg(&dst)
                .status()?
                .success();
            results.push((method, elapsed, allocated, identical, cache));
            fs::remove_file(&dst)?;
            pool.refresh()?;
        }
    }

    println!(
        "\n{:<28} {:>9} {:>13} {:>14} {:>10}  cache before the run",
        "method", "wall s", "MiB/s (data)", "allocated MiB", "identical"
    );
    for (method, elapsed, allocated, identical, cache) in &results {
        println!(
            "{:<28} {:>9.2} {:>13.0} {:>14.1} {:>10}  {cache}",
            method.name(),
            elapsed.as_secs_f64(),
            throughput(elapsed),
            *allocated as f64 / MIB as f64,
            if *identical { "yes" } else { "NO" },
        );
    }
    drop(pool);
    Ok(())
}

fn throughput(elapsed: &Duration) -> f64 {
    (REGIONS * REGION_SIZE) as f64 / MIB as f64 / elapsed.as_secs_f64()
}

/// Writes the sparse source: 64 MiB of xorshift noise at spread, unaligned-to-GiB offsets.
fn make_source(path: &Path) -> Result<()> {
    let f = File::create_new(path)?;
    f.set_len(DISK_SIZE)?;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut chunk = vec![0u8; 4 * MIB as usize];
    for region in 0..REGIONS {
        let start = region * (DISK_SIZE / REGIONS) + region * 37 * MIB;
        let mut offset = start;
        while offset < start + REGION_SIZE {
            for word in chunk.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                word.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all_at(&chunk, offset)?;
            offset += chunk.len() as u64;
        }
    }
    f.sync_all()?;
    Ok(())
}

/// Drops the page cache if permitted, otherwise evicts the source's pages; says which.
fn drop_caches(src: &Path) -> Result<&'static str> {
    rustix::fs::sync();
    if fs::write("/proc/sys/vm/drop_caches", "3").is_ok() {
        return Ok("dropped (drop_caches)");
    }
    let f = File::open(src)?;
    fadvise(&f, 0, None, Advice::DontNeed)?;
    Ok("drop_caches denied; source evicted (fadvise)")
}

#[derive(Clone, Copy)]
enum Method {
    Virtplane,
    Cp,
    VirshVolClone,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Virtplane => "virtplane copy_file (Auto)",
            Method::Cp => "cp --sparse=always",
            Method::VirshVolClone => "virsh vol-clone",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Method::Virtplane => "virtplane",
            Method::Cp => "cp",
            Method::VirshVolClone => "virsh",
        }
    }

    fn clone_disk(self, src: &Path, dst: &Path, pool: &Pool) -> Result<()> {
        match self {
            Method::Virtplane => {
                let report =
                    copy_file(src, dst, Strategy::Auto, |_, _| {}, &AtomicBool::new(false))?;
                eprintln!("virtplane: {report:?}");
            }
            Method::Cp => run(Command::new("cp").arg("--sparse=always").arg(src).arg(dst))?,
            Method::VirshVolClone => {
                let (Some(vol), Some(new)) = (src.file_name(), dst.file_name()) else {
                    return Err("volume paths without file names".into());
                };
                run(Command::new("virsh")
                    .args(["-q", "-c", URI, "vol-clone", "--pool", &pool.name])
                    .arg(vol)
                    .arg(new))?;
            }
        }
        Ok(())
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

/// A transient libvirt dir pool, destroyed (which for a transient pool also undefines it, leaving
/// the files) when dropped.
struct Pool {
    name: String,
}

impl Pool {
    fn create(name: &str, dir: &Path) -> Result<Pool> {
        let target = dir.to_str().ok_or("non-UTF-8 pool directory")?;
        run(Command::new("virsh").args([
            "-q",
            "-c",
            URI,
            "pool-create-as",
            name,
            "dir",
            "--target",
            target,
        ]))?;
        Ok(Pool {
            name: name.to_string(),
        })
    }

    fn refresh(&self) -> Result<()> {
        run(Command::new("virsh").args(["-q", "-c", URI, "pool-refresh", &self.name]))
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = Command::new("virsh")
            .args(["-q", "-c", URI, "pool-destroy", &self.name])
            .status();
    }
}
