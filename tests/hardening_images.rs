//! Hostile images against a real libvirtd: qcow2 images made with `qemu-img` that carry an
//! external data file, a backing file or an incompatible feature bit the agent does not know,
//! a declared format the image contradicts, an empty source, and a pool defined on a system
//! directory. Each is refused with a reason that names what was found, and nothing is created,
//! changed or deleted: not the domain, not the file the image points at, not the pool.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use virtplane::api::{ClonePhase, VMClone, VirtualMachineStorage};
use virtplane::image::qcow2::{self, Finding, Verdict};

use common::*;

type Vms = VirtualMachineStorage;
const T: Duration = Duration::from_secs(60);

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn storage(name: &str, vm: &str, body: &str) -> String {
    format!(
        "apiVersion: virtplane.io/v1alpha1\nkind: VirtualMachineStorage\nmetadata:\n  name: {name}\nspec:\n  vm: {vm}\n  type: disk\n{body}"
    )
}

fn ready(o: &Vms) -> Option<(String, String, String)> {
    condition_of(&o.status.as_ref()?.conditions, "Ready")
}

fn refused(reason: &'static str) -> impl Fn(&Vms) -> bool {
    move |o| ready(o).is_some_and(|(s, r, _)| s == "False" && r == reason)
}

/// Every file in `dir` with its bytes' digest and modification time.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (String, std::time::SystemTime)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let sum = Command::new("sha256sum").arg(&p).output().unwrap();
            let sum = String::from_utf8_lossy(&sum.stdout)
                .split(' ')
                .next()
                .unwrap()
                .to_string();
            let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
            (p, (sum, mtime))
        })
        .collect()
}

/// Sets incompatible feature bit `bit` in the header of the qcow2 image at `path` (bytes
/// 72..80, big-endian), as a hostile tool would.
fn set_incompatible_bit(path: &Path, bit: u32) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut field = [0u8; 8];
    f.seek(SeekFrom::Start(72)).unwrap();
    f.read_exact(&mut field).unwrap();
    let value = u64::from_be_bytes(field) | (1 << bit);
    f.seek(SeekFrom::Start(72)).unwrap();
    f.write_all(&value.to_be_bytes()).unwrap();
}

/// The images of the tests, in `pool`: `victim.raw` (another object's data) and qcow2 images
/// that point at it as data file and as backing file, one with an unknown feature bit, and a
/// plain one.
struct Images {
    victim: PathBuf,
    data_file: PathBuf,
    backing: PathBuf,
    feature: PathBuf,
    plain: PathBuf,
}

fn images(pool: &TestPool) -> Images {
    let p = |n: &str| pool.path.join(n);
    let victim = p("victim.raw");
    std::fs::write(&victim, vec![0x5au8; 1 << 20]).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={},data_file_raw=on", s(&victim)),
        &s(&p("datafile.qcow2")),
        "1M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &s(&victim),
        "-F",
        "raw",
        &s(&p("overlay.qcow2")),
    ]);
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&p("feature.qcow2")), "8M"]);
    set_incompatible_bit(&p("feature.qcow2"), 23);
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&p("plain.qcow2")), "8M"]);
    virsh(&["pool-refresh", &pool.name]);
    Images {
        victim,
        data_file: p("datafile.qcow2"),
        backing: p("overlay.qcow2"),
        feature: p("feature.qcow2"),
        plain: p("plain.qcow2"),
    }
}

#[test]
fn the_parser_reads_real_qemu_img_headers() {
    let pool = TestPool::create("vp-hi-parse");
    let i = images(&pool);
    let judge = |p: &Path| qcow2::judge_file(p).unwrap();
    assert_eq!(judge(&i.victim), Verdict::NotQcow2);
    let Verdict::Safe(h) = judge(&i.plain) else {
        panic!("plain: {:?}", judge(&i.plain))
    };
    assert_eq!((h.version, h.size, h.cluster_bits), (3, 8 << 20, 16));
    let Verdict::Unsafe(found) = judge(&i.data_file) else {
        panic!("data file: {:?}", judge(&i.data_file))
    };
    assert_eq!(found, [Finding::DataFile]);
    assert_eq!(
        qcow2::parse(&qcow2::read_header(&i.data_file).unwrap())
            .unwrap()
            .unwrap()
            .data_file
            .as_deref(),
        Some(i.victim.to_str().unwrap().as_bytes())
    );
    assert_eq!(
        judge(&i.backing),
        Verdict::Unsafe(vec![Finding::BackingFile])
    );
    assert_eq!(
        judge(&i.feature),
        Verdict::Unsafe(vec![Finding::UnknownFeatures(1 << 23)])
    );
    // qemu-img agrees the patched image is one QEMU cannot open safely.
    let info = Command::new("qemu-img")
        .args(["info", i.feature.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        !info.status.success(),
        "qemu-img opened an image with an unknown incompatible feature"
    );
}

#[tokio::test]
async fn hostile_images_are_refused_and_nothing_is_touched() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-hi").await;
    let _op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-hi");
    let domain = TestDomain::define("vp-hi");
    let i = images(&pool);
    let files_before = snapshot(&pool.path);
    let config_before = config_xml(&domain.name);
    let path = |p: &Path| format!("  source:\n    path: {}\n", p.display());
    let volume = |p: &Path| {
        format!(
            "  source:\n    volume:\n      pool: {}\n      name: {}\n",
            pool.name,
            p.file_name().unwrap().to_str().unwrap()
        )
    };
    let rows: Vec<(&str, String, &str, &str)> = vec![
        (
            "datafile",
            path(&i.data_file),
            "UnsafeImage",
            "an external data file",
        ),
        (
            "datafile-vol",
            volume(&i.data_file),
            "UnsafeImage",
            "an external data file",
        ),
        (
            "datafile-raw",
            format!("  format: raw\n{}", path(&i.data_file)),
            "UnsafeImage",
            "an external data file",
        ),
        ("backing", path(&i.backing), "UnsafeImage", "a backing file"),
        (
            "feature",
            volume(&i.feature),
            "UnsafeImage",
            "incompatible feature bit(s) 23 ",
        ),
        (
            "mismatch",
            format!("  format: raw\n{}", path(&i.plain)),
            "InvalidSpec",
            "is a qcow2 image, but spec.format says raw",
        ),
        (
            "empty",
            "  source: {}\n".into(),
            "InvalidSpec",
            "spec.source is empty",
        ),
    ];
    for (name, body, _, _) in &rows {
        kubectl_apply(&ns.name, &storage(name, &domain.name, body));
    }
    for (name, _, reason, found) in &rows {
        let o = wait_obj::<Vms>(&client, &ns.name, name, reason, T, refused(reason)).await;
        let (_, _, message) = ready(&o).unwrap();
        assert!(message.contains(found), "{name}: {message}");
        assert!(
            !message.contains("victim.raw"),
            "{name}: the message names the file the image points at: {message}"
        );
    }
    // A qcow2 image given without format: the format comes from the header and is written
    // into the definition, never left to QEMU's probing.
    kubectl_apply(&ns.name, &storage("plain", &domain.name, &path(&i.plain)));
    wait_obj::<Vms>(&client, &ns.name, "plain", "Ready=True", T, |o| {
        ready(o).is_some_and(|(s, _, _)| s == "True")
    })
    .await;
    let config = config_xml(&domain.name);
    let disk = roxmltree::Document::parse(&config).unwrap();
    let plain = disk
        .descendants()
        .find(|n| {
            n.has_tag_name("disk")
                && n.children()
                    .any(|c| c.has_tag_name("source") && c.attribute("file") == i.plain.to_str())
        })
        .expect("the plain image is in the definition");
    let driver = plain.children().find(|c| c.has_tag_name("driver")).unwrap();
    assert_eq!(driver.attribute("type"), Some("qcow2"), "{config}");
    // Only the plain image was added; every file is as it was, and no file was made.
    assert_eq!(
        config.matches("<disk").count(),
        config_before.matches("<disk").count() + 1,
        "{config}"
    );
    assert_eq!(snapshot(&pool.path), files_before);
    assert!(!config.contains("victim.raw"), "{config}");
}

#[tokio::test]
async fn a_clone_of_a_domain_with_a_hostile_image_is_refused() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-hic").await;
    let _op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-hic");
    let source = TestDomain::define("vp-hic");
    let i = images(&pool);
    let config = config_xml(&source.name).replace(
        "</devices>",
        &format!(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda' bus='virtio'/></disk></devices>",
            i.data_file.display()
        ),
    );
    let xml = log_dir().join(format!("{}-hostile.xml", source.name));
    std::fs::write(&xml, config).unwrap();
    virsh(&["define", xml.to_str().unwrap()]);
    let files_before = snapshot(&pool.path);
    let domains_before = virsh(&["list", "--all", "--name"]);

    kubectl_apply(
        &ns.name,
        &format!(
            "apiVersion: virtplane.io/v1alpha1\nkind: VMClone\nmetadata:\n  name: hostile\nspec:\n  source: {}\n",
            source.name
        ),
    );
    let o = wait_obj::<VMClone>(&client, &ns.name, "hostile", "Failed", T, |o| {
        o.status.as_ref().and_then(|s| s.phase) == Some(ClonePhase::Failed)
    })
    .await;
    let (_, reason, message) = condition_of(&o.status.unwrap().conditions, "Ready").unwrap();
    assert_eq!(reason, "UnsafeImage", "{message}");
    assert!(message.contains("an external data file"), "{message}");
    assert_eq!(snapshot(&pool.path), files_before, "no copy was made");
    assert_eq!(
        virsh(&["list", "--all", "--name"]),
        domains_before,
        "no clone was defined"
    );
}

/// A pool defined on `/var/lib/libvirt` itself, destroyed and undefined when dropped.
struct RootPool {
    name: String,
}

impl Drop for RootPool {
    fn drop(&mut self) {
        for args in [
            vec!["pool-destroy", &self.name],
            vec!["pool-undefine", &self.name],
        ] {
            let _ = Command::new("virsh")
                .arg("-c")
                .arg(libvirt_uri())
                .args(&args)
                .output();
        }
    }
}

/// A file removed when dropped.
struct Removed(PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn a_pool_on_a_system_directory_is_no_allowed_root() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-hir").await;
    let name = unique("vp-hir");
    virsh(&[
        "pool-define-as",
        &name,
        "dir",
        "--target",
        "/var/lib/libvirt",
    ]);
    let _root_pool = RootPool { name: name.clone() };
    virsh(&["pool-start", &name]);
    let file = Removed(PathBuf::from(format!("/var/lib/libvirt/{name}.img")));
    std::fs::File::create(&file.0)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    virsh(&["pool-refresh", &name]);
    let op = Operator::start(&ns.name, &[]);
    let domain = TestDomain::define("vp-hir");
    let config_before = config_xml(&domain.name);

    let bodies = [
        (
            "by-path",
            format!("  source:\n    path: {}\n", file.0.display()),
        ),
        (
            "by-volume",
            format!("  source:\n    volume:\n      pool: {name}\n      name: {name}.img\n"),
        ),
    ];
    for (n, body) in &bodies {
        kubectl_apply(&ns.name, &storage(n, &domain.name, body));
    }
    for (n, _) in &bodies {
        let o = wait_obj::<Vms>(
            &client,
            &ns.name,
            n,
            "PathNotAllowed",
            T,
            refused("PathNotAllowed"),
        )
        .await;
        let (_, _, message) = ready(&o).unwrap();
        assert!(
            message.contains("outside the directories"),
            "{n}: {message}"
        );
    }
    assert_eq!(config_xml(&domain.name), config_before);
    assert_eq!(std::fs::metadata(&file.0).unwrap().len(), 1 << 20);
    // Said once in the agent's log, however many reconciles met the pool.
    eventually(
        "the unsafe pool logged",
        Duration::from_secs(10),
        || async {
            op.agent
                .process
                .log_text()
                .contains("storage pool directory is a system directory")
                .then_some(())
        },
    )
    .await;
    let log = op.agent.process.log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("system directory") && l.contains(&name))
        .count();
    assert_eq!(lines, 1, "{log}");
}
