//! Overlay benchmark: 50 qcow2 overlays of one golden image, created the way the agent does
//! (the libvirt facade's `Provision::create_volume`, `virStorageVolCreateXML` with a
//! `<backingStore>`, after judging the golden image's header), next to `qemu-img create -b` in a
//! loop, in one run, on the same directory.
//!
//! Run with `cargo bench --bench overlays` (as root, with libvirtd running: a temporary
//! transient dir pool on `qemu:///system`, or `LIBVIRT_DEFAULT_URI`). `cargo test` does not
//! run it.
//!
//! Environment: `VIRTPLANE_BENCH_DIR` (default: the temporary directory),
//! `VIRTPLANE_BENCH_OVERLAYS` (default 50), `VIRTPLANE_BENCH_ROUNDS` (default 3).

use std::error::Error;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use virtplane::image::qcow2;
use virtplane::libvirt::Libvirt;
use virtplane::libvirt::provision::{BackingLink, NewVolume, Provision};

type Result<T, E = Box<dyn Error>> = std::result::Result<T, E>;

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

fn virsh(uri: &str, args: &[&str]) -> Result<()> {
    run(Command::new("virsh").arg("-c").arg(uri).args(args))
}

fn per(total: Duration, n: usize) -> f64 {
    total.as_secs_f64() * 1000.0 / n as f64
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        println!("overlay benchmark: run it with `cargo bench --bench overlays`");
        return Ok(());
    }
    let uri = std::env::var("LIBVIRT_DEFAULT_URI").unwrap_or_else(|_| "qemu:///system".into());
    let base_dir = std::env::var_os("VIRTPLANE_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let n: usize = std::env::var("VIRTPLANE_BENCH_OVERLAYS").map_or(Ok(50), |v| v.parse())?;
    let rounds: usize = std::env::var("VIRTPLANE_BENCH_ROUNDS").map_or(Ok(3), |v| v.parse())?;
    let scratch = tempfile::tempdir_in(&base_dir)?;
    let dir = std::fs::canonicalize(scratch.path())?;
    let golden = dir.join("golden.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&golden)
        .arg("1G"))?;
    let pool = format!("vp-bench-ovl-{}", std::process::id());
    let pool_xml = format!(
        "<pool type='dir'><name>{pool}</name><target><path>{}</path></target></pool>",
        dir.display()
    );
    let xml_path = dir.join("pool.xml");
    std::fs::write(&xml_path, pool_xml)?;
    virsh(
        &uri,
        &["pool-create", xml_path.to_str().unwrap_or_default()],
    )?;
    let result = bench(&uri, &pool, &dir, &golden, n, rounds).await;
    let _ = virsh(&uri, &["pool-destroy", &pool]);
    result
}

async fn bench(
    uri: &str,
    pool: &str,
    dir: &Path,
    golden: &Path,
    n: usize,
    rounds: usize,
) -> Result<()> {
    let libvirt = Libvirt::new(uri)?;
    libvirt.connect().await?;
    println!(
        "{n} qcow2 overlays of one 1 GiB golden image, in {}",
        dir.display()
    );
    println!("round  virtplane (Provision::create_volume)  qemu-img create -b (loop)");
    for round in 1..=rounds {
        // virtplane: judge the golden image's header once, then create each overlay via libvirt.
        let start = Instant::now();
        let verdict = qcow2::judge_file(golden)?;
        if verdict.refusal().is_some() {
            return Err("the golden image is refused".into());
        }
        let backing = BackingLink {
            path: golden.to_string_lossy().into_owned(),
            format: "qcow2".into(),
        };
        for i in 0..n {
            let v = NewVolume {
                name: format!("vp-{round}-{i}.qcow2"),
                capacity: 1 << 30,
                format: "qcow2".into(),
                allocation: 0,
                prealloc_metadata: false,
                backing: Some(backing.clone()),
            };
            libvirt.create_volume(pool, &v).await?;
        }
        let ours = start.elapsed();

        let start = Instant::now();
        for i in 0..n {
            run(Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(golden)
                .arg(dir.join(format!("qi-{round}-{i}.qcow2"))))?;
        }
        let reference = start.elapsed();
        println!(
            "{round:>5}  {:>8.1} ms total, {:>6.2} ms each     {:>8.1} ms total, {:>6.2} ms each",
            ours.as_secs_f64() * 1000.0,
            per(ours, n),
            reference.as_secs_f64() * 1000.0,
            per(reference, n),
        );
        // Both made the same images.
        let a = qcow2::judge_file(&dir.join(format!("vp-{round}-0.qcow2")))?;
        let b = qcow2::judge_file(&dir.join(format!("qi-{round}-0.qcow2")))?;
        if a != b {
            return Err(format!("the overlays differ: {a:?} vs {b:?}").into());
        }
    }
    Ok(())
}
