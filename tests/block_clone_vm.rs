//! VMClone of domains whose disks are no files, against real storage: an iSCSI LUN of a libvirt
//! `iscsi-direct` pool (tgtd on loopback) streamed into a new file of `spec.storage.pool`, a
//! partition of a libvirt `disk` pool (a loop device) copied into a new partition of its pool,
//! mixed sources, no space, and deletion or an agent restart in the middle of a stream.

#![allow(clippy::unwrap_used)]

mod block;
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kube::Client;
use virtplane::api::{ClonePhase, VMClone};

use block::{DiskPool, IscsiPool, sha256, write_pattern};
use common::*;

const T: Duration = Duration::from_secs(180);

fn manifest(name: &str, source: &str, pool: &str) -> String {
    format!(
        "apiVersion: virtplane.io/v1alpha1\nkind: VMClone\nmetadata:\n  name: {name}\nspec:\n  source: {source}\n  storage:\n    pool: {pool}\n"
    )
}

fn phase(o: &VMClone) -> Option<ClonePhase> {
    o.status.as_ref()?.phase
}

fn reason(o: &VMClone) -> Option<String> {
    condition_of(&o.status.as_ref()?.conditions, "Ready").map(|c| c.1)
}

fn message(o: &VMClone) -> String {
    condition_of(&o.status.as_ref().unwrap().conditions, "Ready")
        .map(|c| c.2)
        .unwrap_or_default()
}

async fn finished(client: &Client, ns: &str, name: &str) -> VMClone {
    wait_obj::<VMClone>(client, ns, name, "Completed or Failed", T, |o| {
        matches!(phase(o), Some(ClonePhase::Completed | ClonePhase::Failed))
    })
    .await
}

/// A domain that a clone test made, removed at the end.
fn adopt(name: &str) -> TestDomain {
    TestDomain {
        name: name.to_string(),
    }
}

/// Redefines `domain` with `devices` added.
fn add_devices(domain: &str, devices: &str) {
    let xml = config_xml(domain).replace("</devices>", &format!("{devices}</devices>"));
    let path = log_dir().join(format!("{domain}-devices.xml"));
    std::fs::write(&path, xml).unwrap();
    virsh(&["define", path.to_str().unwrap()]);
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn lun_disk(pool: &str, dev: &str) -> String {
    format!(
        "<disk type='volume' device='disk'><driver name='qemu' type='raw'/><source pool='{pool}' volume='{}'/><target dev='{dev}' bus='virtio'/></disk>",
        IscsiPool::volume(1)
    )
}

fn file_disk(path: &Path, dev: &str) -> String {
    format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='{dev}' bus='virtio'/></disk>",
        path.display()
    )
}

/// The disks of a domain's definition: (target, type, source file/dev, pool, volume).
fn disks(domain: &str) -> Vec<(String, String, Option<String>)> {
    let xml = config_xml(domain);
    let d = virtplane::libvirt::domain::parse_domain(&xml).unwrap();
    d.disks
        .iter()
        .map(|d| {
            (
                d.target.clone().unwrap_or_default(),
                d.kind.clone(),
                d.source.clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn an_iscsi_lun_a_file_and_a_cdrom_are_cloned_the_lun_into_a_file_of_the_pool() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-bcv-mixed").await;
    let _op = Operator::start(&ns.name, &[]);
    let files = TestPool::create("vp-bcv-mixed");
    let lun = IscsiPool::create("vp-bcv-mixed", &[64 << 20], |_, f| {
        write_pattern(f, 0, 1 << 20, 3);
        write_pattern(f, 16 << 20, 2 << 20, 7);
    });
    let lun_before = sha256(&lun.luns[0]);
    let data = files.path.join("data.img");
    std::fs::File::create(&data)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    write_pattern(&data, 1 << 20, 1 << 20, 5);
    let iso = files.path.join("media.iso");
    std::fs::File::create(&iso)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    virsh(&["pool-refresh", &files.name]);
    let domain = TestDomain::define("vp-bcv-mixed");
    add_devices(
        &domain.name,
        &format!(
            "{}{}<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='{}'/><target dev='sda' bus='scsi'/><readonly/></disk>",
            file_disk(&data, "vda"),
            lun_disk(&lun.name, "vdb"),
            iso.display()
        ),
    );
    let before = config_xml(&domain.name);

    kubectl_apply(&ns.name, &manifest("mixed", &domain.name, &files.name));
    let done = finished(&client, &ns.name, "mixed").await;
    assert_eq!(
        phase(&done),
        Some(ClonePhase::Completed),
        "{:?}",
        done.status
    );
    let st = done.status.unwrap();
    let target = st.target_name.clone().unwrap();
    let _c = adopt(&target);
    let copy = files.path.join("unit-0-0-1-clone1.img");
    let lun_copy = st
        .disks
        .iter()
        .find(|d| d.source.contains("unit:0:0:1"))
        .unwrap();
    assert_eq!(
        lun_copy.target.as_deref(),
        Some(copy.to_str().unwrap()),
        "{st:?}"
    );
    assert_eq!(lun_copy.pool.as_deref(), Some(files.name.as_str()));
    assert_eq!(lun_copy.copied_bytes, lun_copy.total_bytes);
    assert_eq!(lun_copy.total_bytes, Some(64 << 20));
    // The clone's disks: its own file copy, the LUN's copy as a file disk, the shared CD-ROM.
    let got = disks(&target);
    assert_eq!(
        got,
        vec![
            (
                "vda".into(),
                "file".into(),
                Some(files.path.join("data-clone1.img").display().to_string())
            ),
            (
                "vdb".into(),
                "file".into(),
                Some(copy.display().to_string())
            ),
            ("sda".into(), "file".into(), Some(iso.display().to_string())),
        ]
    );
    assert!(
        !config_xml(&target).contains(&lun.name),
        "the LUN is not shared"
    );
    // Same bytes as the LUN, sparse; the LUN and the source are unchanged.
    assert_eq!(sha256(&copy), lun_before);
    let allocated = std::fs::metadata(&copy).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    });
    assert!(allocated.unwrap() < 8 << 20, "the copy is sparse");
    assert_eq!(sha256(&lun.luns[0]), lun_before);
    assert_eq!(config_xml(&domain.name), before);
    assert_eq!(
        files_in(&files.path),
        vec![
            "data-clone1.img",
            "data.img",
            "media.iso",
            "unit-0-0-1-clone1.img"
        ]
    );
}

#[tokio::test]
async fn a_disk_pool_partition_is_cloned_into_a_new_partition_of_its_pool() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-bcv-part").await;
    let _op = Operator::start(&ns.name, &[]);
    let pool = DiskPool::create("vp-bcv-part", 64 << 20);
    let (name, dev) = pool.volume(8 << 20);
    write_pattern(Path::new(&dev), 0, 2 << 20, 11);
    let before = sha256(Path::new(&dev));
    let domain = TestDomain::define("vp-bcv-part");
    add_devices(
        &domain.name,
        &format!(
            "<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='{dev}'/><target dev='vda' bus='virtio'/></disk>"
        ),
    );

    kubectl_apply(&ns.name, &manifest("part", &domain.name, "default"));
    let done = finished(&client, &ns.name, "part").await;
    assert_eq!(
        phase(&done),
        Some(ClonePhase::Completed),
        "{:?}",
        done.status
    );
    let st = done.status.unwrap();
    let target = st.target_name.clone().unwrap();
    let _c = adopt(&target);
    let d = &st.disks[0];
    assert_eq!(d.pool.as_deref(), Some(pool.name.as_str()));
    let new = d.target.clone().unwrap();
    assert_ne!(new, name);
    assert!(
        pool.volumes().contains(&new),
        "a partition of the same pool"
    );
    let new_dev = virsh(&["vol-path", "--pool", &pool.name, &new])
        .trim()
        .to_string();
    assert_eq!(
        disks(&target),
        vec![("vda".into(), "block".into(), Some(new_dev.clone()))]
    );
    let head = |p: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("head -c {} {p} | sha256sum", 8 << 20))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(head(&new_dev), head(&dev));
    assert_eq!(sha256(Path::new(&dev)), before, "the source is unchanged");
}

/// A dir pool on a small tmpfs, unmounted when dropped.
struct SmallPool {
    name: String,
    dir: PathBuf,
}

impl SmallPool {
    fn create(prefix: &str, mib: u64) -> Self {
        let name = unique(prefix);
        let dir = PathBuf::from("/var/lib/libvirt/images").join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(ok.success(), "mount tmpfs");
        virsh(&[
            "pool-create-as",
            &name,
            "dir",
            "--target",
            dir.to_str().unwrap(),
        ]);
        Self { name, dir }
    }
}

impl Drop for SmallPool {
    fn drop(&mut self) {
        let _ = Command::new("virsh")
            .args(["-c", &libvirt_uri(), "pool-destroy", &self.name])
            .status();
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[tokio::test]
async fn no_space_refuses_and_deletion_or_restart_mid_stream_leave_nothing_stray() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-bcv-fail").await;
    let mut op = Operator::start(&ns.name, &[]);
    // 1 GiB LUN holding 384 MiB, so a stream lasts long enough to be interrupted.
    let lun = IscsiPool::create("vp-bcv-fail", &[1 << 30], |_, f| {
        for i in 0..3 {
            write_pattern(f, i * (256 << 20), 128 << 20, 1 + i as u8);
        }
    });
    let lun_before = sha256(&lun.luns[0]);
    let domain = TestDomain::define("vp-bcv-fail");
    add_devices(&domain.name, &lun_disk(&lun.name, "vda"));

    // No room in the pool the stream goes to: refused before anything is made.
    let small = SmallPool::create("vp-bcv-small", 16);
    kubectl_apply(&ns.name, &manifest("nospace", &domain.name, &small.name));
    let done = finished(&client, &ns.name, "nospace").await;
    assert_eq!(
        (phase(&done), reason(&done).as_deref()),
        (Some(ClonePhase::Failed), Some("InsufficientSpace")),
        "{:?}",
        done.status
    );
    assert!(message(&done).contains(&small.name), "{}", message(&done));
    assert!(files_in(&small.dir).is_empty());
    assert!(!virsh(&["list", "--all", "--name"]).contains(&format!("{}-clone", domain.name)));

    // Deleted while streaming: no file left, no clone defined.
    let files = TestPool::create("vp-bcv-fail");
    kubectl_apply(&ns.name, &manifest("deleted", &domain.name, &files.name));
    wait_obj::<VMClone>(&client, &ns.name, "deleted", "Copying", T, |o| {
        phase(o) == Some(ClonePhase::Copying)
    })
    .await;
    kubectl_delete(&ns.name, "vmclone", "deleted");
    wait_gone::<VMClone>(&client, &ns.name, "deleted", T).await;
    assert!(
        files_in(&files.path).is_empty(),
        "{:?}",
        files_in(&files.path)
    );
    assert!(!virsh(&["list", "--all", "--name"]).contains(&format!("{}-clone", domain.name)));

    // The agent restarts mid-stream: the disk is streamed again, exactly one clone and one
    // copy result.
    kubectl_apply(&ns.name, &manifest("restarted", &domain.name, &files.name));
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
    assert!(!virsh(&["list", "--all", "--name"]).contains(&format!("{}-clone2", domain.name)));
    assert_eq!(files_in(&files.path), vec!["unit-0-0-1-clone1.img"]);
    assert_eq!(
        sha256(&files.path.join("unit-0-0-1-clone1.img")),
        lun_before
    );
    assert_eq!(sha256(&lun.luns[0]), lun_before, "the LUN is unchanged");
}

#[tokio::test]
async fn a_disk_pool_without_room_streams_the_partition_into_a_file_of_the_pool() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-bcv-full").await;
    let _op = Operator::start(&ns.name, &[]);
    // A 24 MiB device with a 14 MiB partition: no room for a second one.
    let pool = DiskPool::create("vp-bcv-full", 24 << 20);
    let (name, dev) = pool.volume(14 << 20);
    write_pattern(Path::new(&dev), 1 << 20, 3 << 20, 13);
    let before = sha256(Path::new(&dev));
    let files = TestPool::create("vp-bcv-full");
    let domain = TestDomain::define("vp-bcv-full");
    add_devices(
        &domain.name,
        &format!(
            "<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='{dev}'/><target dev='vda' bus='virtio'/></disk>"
        ),
    );

    kubectl_apply(&ns.name, &manifest("full", &domain.name, &files.name));
    let done = finished(&client, &ns.name, "full").await;
    assert_eq!(
        phase(&done),
        Some(ClonePhase::Completed),
        "{:?}",
        done.status
    );
    let st = done.status.unwrap();
    let target = st.target_name.clone().unwrap();
    let _c = adopt(&target);
    let copy = files.path.join(format!("{name}-clone1.img"));
    let d = &st.disks[0];
    assert_eq!(d.target.as_deref(), Some(copy.to_str().unwrap()), "{d:?}");
    assert!(
        d.message.as_deref().unwrap_or("").contains("lacks room"),
        "{d:?}"
    );
    assert_eq!(
        disks(&target),
        vec![(
            "vda".into(),
            "file".into(),
            Some(copy.display().to_string())
        )]
    );
    assert_eq!(sha256(&copy), before, "same bytes as the partition");
    assert_eq!(pool.volumes(), vec![name], "no partition was added");
    assert_eq!(sha256(Path::new(&dev)), before, "the source is unchanged");
}
