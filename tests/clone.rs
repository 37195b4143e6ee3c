//! VMClone against a real libvirtd: new identity, copied disks per pool, shared media, sparse
//! copies, waiting for a running source, refusals, cancellation and agent restarts.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kube::Client;
use virtplane::api::{ClonePhase, VMClone};

use common::*;

const T: Duration = Duration::from_secs(120);

fn manifest(name: &str, source: &str, extra: &str) -> String {
    format!(
        "apiVersion: virtplane.io/v1alpha1\nkind: VMClone\nmetadata:\n  name: {name}\nspec:\n  source: {source}\n{extra}"
    )
}

fn phase(o: &VMClone) -> Option<ClonePhase> {
    o.status.as_ref()?.phase
}

fn reason(o: &VMClone) -> Option<String> {
    condition_of(&o.status.as_ref()?.conditions, "Ready").map(|c| c.1)
}

async fn finished(client: &Client, ns: &str, name: &str) -> VMClone {
    wait_obj::<VMClone>(client, ns, name, "Completed or Failed", T, |o| {
        matches!(phase(o), Some(ClonePhase::Completed | ClonePhase::Failed))
    })
    .await
}

fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `mib` MiB of non-zero data at `offset_mib` into a file.
fn write_data(path: &Path, offset_mib: u64, mib: u64) {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset_mib << 20)).unwrap();
    let block = vec![0xabu8; 1 << 20];
    for _ in 0..mib {
        f.write_all(&block).unwrap();
    }
    f.sync_all().unwrap();
}

fn sparse_file(path: &Path, mib: u64) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
}

/// A domain that a clone test made, removed at the end.
fn adopt(name: &str) -> TestDomain {
    TestDomain {
        name: name.to_string(),
    }
}

/// The guest template plus a qcow2 disk, a raw disk, a CD-ROM and two NICs, all in `pool`.
fn rich_source(pool: &TestPool) -> (TestGuest, PathBuf, PathBuf, PathBuf) {
    let guest = TestGuest::define("vp-cl-src", false);
    let qcow = pool.path.join("root.qcow2");
    let raw = pool.path.join("data.img");
    let iso = pool.path.join("media.iso");
    qemu_img(&["create", "-q", "-f", "qcow2", qcow.to_str().unwrap(), "64M"]);
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 2M",
            qcow.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    sparse_file(&raw, 32);
    write_data(&raw, 4, 2);
    sparse_file(&iso, 1);
    virsh(&["pool-refresh", &pool.name]);
    let devices = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>\
         <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vdb' bus='virtio'/></disk>\
         <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='{}'/><target dev='sda' bus='scsi'/><readonly/></disk>\
         <interface type='user'><mac address='52:54:00:c1:00:01'/><model type='virtio'/></interface>\
         <interface type='network'><mac address='52:54:00:c1:00:02'/><source network='default'/><model type='virtio'/></interface>",
        qcow.display(),
        raw.display(),
        iso.display()
    );
    let xml = config_xml(&guest.name).replace("</devices>", &format!("{devices}</devices>"));
    let path = log_dir().join(format!("{}-rich.xml", guest.name));
    std::fs::write(&path, xml).unwrap();
    virsh(&["define", path.to_str().unwrap()]);
    (guest, qcow, raw, iso)
}

#[tokio::test]
async fn clones_get_new_identities_copied_disks_and_shared_media() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-cl").await;
    let op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-cl");
    let (src, qcow, raw, iso) = rich_source(&pool);
    let before = config_xml(&src.name);
    let src_uuid = virsh(&["domuuid", &src.name]).trim().to_string();

    kubectl_apply(&ns.name, &manifest("first", &src.name, "  start: true\n"));
    let first = finished(&client, &ns.name, "first").await;
    let st = first.status.clone().unwrap();
    assert_eq!(
        phase(&first),
        Some(ClonePhase::Completed),
        "{:?}",
        first.status
    );
    let clone1 = st.target_name.clone().unwrap();
    assert_eq!(clone1, format!("{}-clone1", src.name));
    let _c1 = adopt(&clone1);
    assert_eq!(st.progress.as_deref(), Some("100%"));
    assert!(st.start_time.is_some() && st.completion_time.is_some());

    kubectl_apply(&ns.name, &manifest("second", &src.name, ""));
    let second = finished(&client, &ns.name, "second").await;
    let clone2 = second.status.clone().unwrap().target_name.unwrap();
    assert_eq!(clone2, format!("{}-clone2", src.name));
    let _c2 = adopt(&clone2);

    let metrics = op.agent.process.http_get("/metrics");
    assert!(
        metric(&metrics, "virtplane_clone_copied_bytes_total").unwrap_or(0.0) > 0.0,
        "{metrics}"
    );

    // Identity: new UUID (also in status) and new MACs.
    let uuid1 = virsh(&["domuuid", &clone1]).trim().to_string();
    assert_ne!(uuid1, src_uuid);
    assert_eq!(st.target_uuid.as_deref(), Some(uuid1.as_str()));
    let xml1 = config_xml(&clone1);
    assert!(
        !xml1.contains("52:54:00:c1:00:01") && !xml1.contains("52:54:00:c1:00:02"),
        "{xml1}"
    );
    assert_eq!(xml1.matches("<interface").count(), 2);

    // Disks: copies beside the originals, named after them; the CD-ROM is shared.
    let q1 = pool.path.join("root-clone1.qcow2");
    let r1 = pool.path.join("data-clone1.img");
    assert!(
        xml1.contains(q1.to_str().unwrap()) && xml1.contains(r1.to_str().unwrap()),
        "{xml1}"
    );
    assert!(
        xml1.contains(iso.to_str().unwrap()),
        "the CD-ROM is referenced, not copied"
    );
    assert!(!pool.path.join("media-clone1.iso").exists());
    assert!(
        pool.path.join("root-clone2.qcow2").exists() && pool.path.join("data-clone2.img").exists()
    );
    qemu_img(&[
        "compare",
        "-q",
        "-U",
        qcow.to_str().unwrap(),
        q1.to_str().unwrap(),
    ]);
    qemu_img(&[
        "compare",
        "-q",
        "-U",
        "-f",
        "raw",
        "-F",
        "raw",
        raw.to_str().unwrap(),
        r1.to_str().unwrap(),
    ]);
    let vols = virsh(&["vol-list", &pool.name]);
    assert!(
        vols.contains("root-clone1.qcow2"),
        "the pool lists the copy: {vols}"
    );
    let shared = st
        .disks
        .iter()
        .find(|d| d.source == iso.to_str().unwrap())
        .unwrap();
    assert_eq!(shared.strategy.as_deref(), Some("Shared"));
    assert!(
        st.disks
            .iter()
            .any(|d| d.strategy.as_deref() == Some("Copy")
                || d.strategy.as_deref() == Some("Reflink"))
    );

    // The source is untouched, and the clone that was asked to start runs.
    assert_eq!(config_xml(&src.name), before);
    assert_eq!(virsh(&["domstate", &clone1]).trim(), "running");
    assert_eq!(virsh(&["domstate", &clone2]).trim(), "shut off");
}

#[tokio::test]
async fn a_sparse_disk_stays_sparse() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-cl-sparse").await;
    let _op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-cl-sparse");
    let domain = TestDomain::define("vp-cl-sparse");
    let disk = pool.path.join("big.img");
    sparse_file(&disk, 4096);
    for at in [0, 1000, 2500, 4000] {
        write_data(&disk, at, 2);
    }
    virsh(&["pool-refresh", &pool.name]);
    let xml = config_xml(&domain.name).replace(
        "</devices>",
        &format!("<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='sdb' bus='scsi'/></disk></devices>", disk.display()),
    );
    let path = log_dir().join(format!("{}-sparse.xml", domain.name));
    std::fs::write(&path, xml).unwrap();
    virsh(&["define", path.to_str().unwrap()]);

    kubectl_apply(
        &ns.name,
        &manifest("sparse", &domain.name, "  storage:\n    strategy: Copy\n"),
    );
    let done = finished(&client, &ns.name, "sparse").await;
    assert_eq!(
        phase(&done),
        Some(ClonePhase::Completed),
        "{:?}",
        done.status
    );
    let _c = adopt(done.status.as_ref().unwrap().target_name.as_ref().unwrap());
    let copy = pool.path.join("big-clone1.img");
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), 4096 << 20);
    assert!(
        allocated(&copy) <= allocated(&disk),
        "copy {} > source {}",
        allocated(&copy),
        allocated(&disk)
    );
    assert!(
        allocated(&copy) < 64 << 20,
        "a 4 GiB sparse disk with 8 MiB of data stays small"
    );
}

#[tokio::test]
async fn a_running_source_waits_and_bad_requests_create_nothing() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-cl-wait").await;
    let op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-cl-wait");
    let guest = TestGuest::define_with("vp-cl-wait", false, false);
    let disk = pool.path.join("d.img");
    sparse_file(&disk, 16);
    write_data(&disk, 1, 1);
    let xml = config_xml(&guest.name).replace(
        "</devices>",
        &format!("<disk type='file' device='disk'><source file='{}'/><target dev='vda' bus='virtio'/></disk></devices>", disk.display()),
    );
    let path = log_dir().join(format!("{}-wait.xml", guest.name));
    std::fs::write(&path, xml).unwrap();
    virsh(&["define", path.to_str().unwrap()]);
    virsh(&["start", &guest.name]);

    kubectl_apply(&ns.name, &manifest("waits", &guest.name, ""));
    let w = wait_obj::<VMClone>(&client, &ns.name, "waits", "SourceRunning", T, |o| {
        reason(o).as_deref() == Some("SourceRunning")
    })
    .await;
    assert_eq!(phase(&w), Some(ClonePhase::Pending));
    assert!(!pool.path.join("d-clone1.img").exists());
    virsh(&["destroy", &guest.name]);
    let done = finished(&client, &ns.name, "waits").await;
    assert_eq!(
        phase(&done),
        Some(ClonePhase::Completed),
        "{:?}",
        done.status
    );
    let _c = adopt(&format!("{}-clone1", guest.name));

    // A taken name.
    let taken = TestDomain::define("vp-cl-taken");
    kubectl_apply(
        &ns.name,
        &manifest(
            "conflict",
            &guest.name,
            &format!("  targetName: {}\n", taken.name),
        ),
    );
    let c = finished(&client, &ns.name, "conflict").await;
    assert_eq!(
        (phase(&c), reason(&c).as_deref()),
        (Some(ClonePhase::Failed), Some("NameConflict"))
    );

    // An unknown source.
    kubectl_apply(
        &ns.name,
        &manifest(
            "unknown",
            "no-such-vm",
            &format!("  nodeName: {}\n", op.agent.node),
        ),
    );
    let u = wait_obj::<VMClone>(&client, &ns.name, "unknown", "SourceNotFound", T, |o| {
        reason(o).as_deref() == Some("SourceNotFound")
    })
    .await;
    assert_eq!(phase(&u), Some(ClonePhase::Pending));

    // No room anywhere: the source's pool and the fallback pool are small tmpfs mounts.
    let small = Tmpfs::mount("vp-cl-small", 8);
    let small_pool = pool_at("vp-cl-small", &small.0);
    let fallback = Tmpfs::mount("vp-cl-fb", 4);
    let fb_pool = pool_at("vp-cl-fb", &fallback.0);
    let big = small.0.join("big.img");
    sparse_file(&big, 64);
    write_data(&big, 0, 6);
    virsh(&["pool-refresh", &small_pool.name]);
    let nospace = TestDomain::define("vp-cl-nospace");
    let xml = config_xml(&nospace.name).replace(
        "</devices>",
        &format!("<disk type='file' device='disk'><source file='{}'/><target dev='sdb' bus='scsi'/></disk></devices>", big.display()),
    );
    let path = log_dir().join(format!("{}-nospace.xml", nospace.name));
    std::fs::write(&path, xml).unwrap();
    virsh(&["define", path.to_str().unwrap()]);
    kubectl_apply(
        &ns.name,
        &manifest(
            "nospace",
            &nospace.name,
            &format!("  storage:\n    pool: {}\n", fb_pool.name),
        ),
    );
    let n = finished(&client, &ns.name, "nospace").await;
    assert_eq!(
        (phase(&n), reason(&n).as_deref()),
        (Some(ClonePhase::Failed), Some("InsufficientSpace")),
        "{:?}",
        n.status
    );
    assert!(
        !small.0.join("big-clone1.img").exists()
            && std::fs::read_dir(&fallback.0).unwrap().count() == 0
    );
    assert!(!virsh(&["list", "--all", "--name"]).contains(&format!("{}-clone1", nospace.name)));
    drop((small_pool, fb_pool));
}

/// A tmpfs mounted on a fresh directory, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(prefix: &str, mib: u64) -> Self {
        let dir = PathBuf::from("/var/lib/libvirt/images").join(unique(prefix));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m"),
                "tmpfs",
                dir.to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(ok.success(), "mount tmpfs");
        Self(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A dir pool on an existing directory (kept when the pool is dropped? no: TestPool removes it,
/// which is fine for a tmpfs that is unmounted after).
fn pool_at(prefix: &str, dir: &Path) -> TestPool {
    let name = unique(prefix);
    virsh(&[
        "pool-define-as",
        &name,
        "dir",
        "--target",
        dir.to_str().unwrap(),
    ]);
    virsh(&["pool-start", &name]);
    TestPool {
        name,
        path: dir.to_path_buf(),
    }
}

/// A source with 2 GiB of data, so a copy takes long enough to be interrupted.
fn big_source(pool: &TestPool) -> (TestDomain, PathBuf) {
    let domain = TestDomain::define("vp-cl-big");
    let disk = pool.path.join("big.img");
    sparse_file(&disk, 2048);
    write_data(&disk, 0, 2048);
    virsh(&["pool-refresh", &pool.name]);
    let xml = config_xml(&domain.name).replace(
        "</devices>",
        &format!("<disk type='file' device='disk'><source file='{}'/><target dev='sdb' bus='scsi'/></disk></devices>", disk.display()),
    );
    let path = log_dir().join(format!("{}-big.xml", domain.name));
    std::fs::write(&path, xml).unwrap();
    virsh(&["define", path.to_str().unwrap()]);
    (domain, disk)
}

#[tokio::test]
async fn deleting_a_running_task_leaves_nothing_and_a_restart_makes_exactly_one_clone() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-cl-cancel").await;
    let mut op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-cl-cancel");
    let (domain, _disk) = big_source(&pool);

    // Deleted while copying: no volume left, no clone defined.
    kubectl_apply(
        &ns.name,
        &manifest(
            "cancelled",
            &domain.name,
            "  storage:\n    strategy: Copy\n",
        ),
    );
    wait_obj::<VMClone>(&client, &ns.name, "cancelled", "Copying", T, |o| {
        phase(o) == Some(ClonePhase::Copying)
    })
    .await;
    kubectl_delete(&ns.name, "vmclone", "cancelled");
    wait_gone::<VMClone>(&client, &ns.name, "cancelled", T).await;
    assert!(
        !pool.path.join("big-clone1.img").exists(),
        "the partial copy is removed"
    );
    assert!(!virsh(&["list", "--all", "--name"]).contains(&format!("{}-clone1", domain.name)));

    // The agent restarts mid-copy: the task goes on and yields exactly one clone.
    kubectl_apply(
        &ns.name,
        &manifest(
            "restarted",
            &domain.name,
            "  storage:\n    strategy: Copy\n",
        ),
    );
    wait_obj::<VMClone>(&client, &ns.name, "restarted", "Copying", T, |o| {
        phase(o) == Some(ClonePhase::Copying)
    })
    .await;
    op.agent.restart();
    let done = finished(&client, &ns.name, "restarted").await;
    assert_eq!(
        phase(&done),
        Some(ClonePhase::Completed),
        "{:?}",
        done.status
    );
    let target = done.status.as_ref().unwrap().target_name.clone().unwrap();
    let _c = adopt(&target);
    assert_eq!(target, format!("{}-clone1", domain.name));
    let names = virsh(&["list", "--all", "--name"]);
    assert!(
        !names.contains(&format!("{}-clone2", domain.name)),
        "a second clone was made: {names}"
    );
    assert_eq!(
        std::fs::metadata(pool.path.join("big-clone1.img"))
            .unwrap()
            .len(),
        2048 << 20
    );
    assert!(!pool.path.join("big-clone2.img").exists());
}

/// A loop device over a sparse file, detached when dropped.
struct LoopDevice {
    dev: String,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    fn new(mib: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("backing.img");
        sparse_file(&file, mib);
        let out = Command::new("losetup")
            .args(["--find", "--show", file.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            dev: String::from_utf8(out.stdout).unwrap().trim().to_string(),
            _dir: dir,
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// Redefines `domain` with `devices` added.
fn add_devices(domain: &str, devices: &str) {
    let xml = config_xml(domain).replace("</devices>", &format!("{devices}</devices>"));
    let path = log_dir().join(format!("{domain}-devices.xml"));
    std::fs::write(&path, xml).unwrap();
    virsh(&["define", path.to_str().unwrap()]);
}

fn message(o: &VMClone) -> String {
    condition_of(&o.status.as_ref().unwrap().conditions, "Ready")
        .map(|c| c.2)
        .unwrap_or_default()
}

#[tokio::test]
async fn a_writable_block_disk_refuses_the_task_and_creates_nothing() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-cl-block").await;
    let op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-cl-block");
    let lo = LoopDevice::new(16);
    let domain = TestDomain::define("vp-cl-block");
    let file = pool.path.join("f.img");
    sparse_file(&file, 16);
    write_data(&file, 1, 1);
    add_devices(
        &domain.name,
        &format!(
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>\
             <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='{}'/><target dev='vdb' bus='virtio'/></disk>",
            file.display(),
            lo.dev
        ),
    );
    let before = config_xml(&domain.name);

    kubectl_apply(&ns.name, &manifest("block", &domain.name, ""));
    let done = finished(&client, &ns.name, "block").await;
    assert_eq!(
        (phase(&done), reason(&done).as_deref()),
        (Some(ClonePhase::Failed), Some("UnsupportedDisk")),
        "{:?}",
        done.status
    );
    let msg = message(&done);
    assert!(
        msg.contains("vdb") && msg.contains(&lo.dev) && msg.contains("<readonly/>"),
        "{msg}"
    );
    // Nothing was made: no domain, no copy of the file disk; the source is untouched.
    assert!(
        !virsh(&["list", "--all", "--name"]).contains(&format!("{}-clone", domain.name)),
        "a clone was defined"
    );
    let files: Vec<_> = std::fs::read_dir(&pool.path)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files, vec![std::ffi::OsString::from("f.img")]);
    assert_eq!(config_xml(&domain.name), before);
    let metrics = op.agent.process.http_get("/metrics");
    assert!(
        metric(
            &metrics,
            "virtplane_reconcile_errors_total{kind=\"VMClone\",reason=\"UnsupportedDisk\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{metrics}"
    );

    // Read-only, the same device is shared with the clone.
    let shared = TestDomain::define("vp-cl-block-ro");
    add_devices(
        &shared.name,
        &format!(
            "<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='{}'/><target dev='vdb' bus='virtio'/><readonly/></disk>",
            lo.dev
        ),
    );
    kubectl_apply(&ns.name, &manifest("readonly", &shared.name, ""));
    let done = finished(&client, &ns.name, "readonly").await;
    assert_eq!(
        phase(&done),
        Some(ClonePhase::Completed),
        "{:?}",
        done.status
    );
    let st = done.status.unwrap();
    let target = st.target_name.unwrap();
    let _c = adopt(&target);
    assert!(config_xml(&target).contains(&format!("dev='{}'", lo.dev)));
    assert_eq!(st.disks.len(), 1);
    assert_eq!(
        (st.disks[0].source.as_str(), st.disks[0].strategy.as_deref()),
        (lo.dev.as_str(), Some("Shared"))
    );
}

#[tokio::test]
async fn volume_disks_are_copied_into_volumes_of_their_own() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-cl-vol").await;
    let _op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-cl-vol");
    // A small pool whose volume does not fit twice: its copy goes to the fallback pool.
    let small = Tmpfs::mount("vp-cl-vsmall", 8);
    let small_pool = pool_at("vp-cl-vsmall", &small.0);
    let (a, b) = (pool.path.join("a.img"), small.0.join("b.img"));
    sparse_file(&a, 32);
    write_data(&a, 3, 2);
    sparse_file(&b, 16);
    write_data(&b, 0, 5);
    virsh(&["pool-refresh", &pool.name]);
    virsh(&["pool-refresh", &small_pool.name]);
    let domain = TestDomain::define("vp-cl-vol");
    add_devices(
        &domain.name,
        &format!(
            "<disk type='volume' device='disk'><driver name='qemu' type='raw'/><source pool='{}' volume='a.img'/><target dev='vda' bus='virtio'/></disk>\
             <disk type='volume' device='disk'><driver name='qemu' type='raw'/><source pool='{}' volume='b.img'/><target dev='vdb' bus='virtio'/></disk>",
            pool.name, small_pool.name
        ),
    );
    let before = config_xml(&domain.name);

    kubectl_apply(
        &ns.name,
        &manifest(
            "vol",
            &domain.name,
            &format!("  storage:\n    pool: {}\n", pool.name),
        ),
    );
    let done = finished(&client, &ns.name, "vol").await;
    assert_eq!(
        phase(&done),
        Some(ClonePhase::Completed),
        "{:?}",
        done.status
    );
    let st = done.status.unwrap();
    let target = st.target_name.unwrap();
    let _c = adopt(&target);

    // Both copies are volumes of the big pool, and the clone names them as such.
    let xml = config_xml(&target);
    for vol in ["a-clone1.img", "b-clone1.img"] {
        assert!(
            xml.contains(&format!("<source pool='{}' volume='{vol}'", pool.name)),
            "{vol}: {xml}"
        );
        assert!(virsh(&["vol-list", &pool.name]).contains(vol));
    }
    assert!(!small.0.join("b-clone1.img").exists());
    for (src, copy) in [
        (&a, pool.path.join("a-clone1.img")),
        (&b, pool.path.join("b-clone1.img")),
    ] {
        qemu_img(&[
            "compare",
            "-q",
            "-U",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            copy.to_str().unwrap(),
        ]);
    }
    let moved = st
        .disks
        .iter()
        .find(|d| d.source == b.to_str().unwrap())
        .unwrap();
    assert_eq!(moved.pool.as_deref(), Some(pool.name.as_str()));
    assert!(
        moved
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("fallback"),
        "{moved:?}"
    );
    // Progress counted the data, and ended at its total.
    for d in &st.disks {
        assert_eq!(d.copied_bytes, d.total_bytes, "{d:?}");
    }
    let total: u64 = st.disks.iter().map(|d| d.total_bytes.unwrap()).sum();
    assert!(
        (7 << 20..8 << 20).contains(&total),
        "7 MiB of data: {total}"
    );
    assert_eq!(config_xml(&domain.name), before);
    drop(small_pool);
}

/// Defines a bare domain `name` with `metadata` (inner XML of `<metadata>`, may be empty).
fn define_named(name: &str, metadata: &str) -> TestDomain {
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><metadata>{metadata}</metadata><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='q35'>hvm</type></os>\
         <devices><controller type='usb' model='none'/><memballoon model='none'/></devices></domain>"
    );
    let path = log_dir().join(format!("{name}.xml"));
    std::fs::write(&path, xml).unwrap();
    virsh(&["define", path.to_str().unwrap()]);
    adopt(name)
}

#[tokio::test]
async fn deleting_an_unfinished_task_undefines_only_a_clone_it_made() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-cl-left").await;
    let _op = Operator::start(&ns.name, &[]);
    // tmpfs has no reflinks: a Reflink task fails after planning, with its target name set.
    let fs = Tmpfs::mount("vp-cl-left", 64);
    let pool = pool_at("vp-cl-left", &fs.0);
    let disk = fs.0.join("d.img");
    sparse_file(&disk, 16);
    write_data(&disk, 1, 1);
    virsh(&["pool-refresh", &pool.name]);
    let domain = TestDomain::define("vp-cl-left");
    add_devices(
        &domain.name,
        &format!(
            "<disk type='file' device='disk'><source file='{}'/><target dev='vda' bus='virtio'/></disk>",
            disk.display()
        ),
    );

    let mut targets = Vec::new();
    for task in ["ours", "theirs"] {
        let target = format!("{}-{task}", domain.name);
        kubectl_apply(
            &ns.name,
            &manifest(
                task,
                &domain.name,
                &format!("  targetName: {target}\n  storage:\n    strategy: Reflink\n"),
            ),
        );
        let done = finished(&client, &ns.name, task).await;
        assert_eq!(
            (phase(&done), reason(&done).as_deref()),
            (Some(ClonePhase::Failed), Some("CopyFailed")),
            "{:?}",
            done.status
        );
        assert_eq!(
            done.status.as_ref().unwrap().target_name.as_deref(),
            Some(target.as_str())
        );
        targets.push((target, done.metadata.uid.clone().unwrap()));
    }
    // As if the first task had defined its clone before it was stopped; the second target name
    // was taken by someone else meanwhile.
    let (ours, uid) = &targets[0];
    let _ours = define_named(
        ours,
        &format!("<vp:clone xmlns:vp='https://virtplane.io/xmlns/clone/v1' task='{uid}'/>"),
    );
    let _theirs = define_named(&targets[1].0, "");

    for task in ["ours", "theirs"] {
        kubectl_delete(&ns.name, "vmclone", task);
        wait_gone::<VMClone>(&client, &ns.name, task, T).await;
    }
    let names = virsh(&["list", "--all", "--name"]);
    assert!(
        !names.lines().any(|n| n.trim() == ours.as_str()),
        "the clone the task made is undefined: {names}"
    );
    assert!(
        names.lines().any(|n| n.trim() == targets[1].0.as_str()),
        "a domain the task did not make is kept: {names}"
    );
    assert!(disk.exists() && !fs.0.join("d-clone1.img").exists());
    drop(pool);
}
