//! `VMClone.spec.storage.flatten` against a real libvirtd: a VM whose disk is a qcow2 overlay of
//! a golden image (made by a `VirtualMachineStorage` with `backingVolume`) is cloned into a
//! standalone copy: no backing file, no `<backingStore>` in the clone's definition, the data of
//! the golden image and of the overlay both in it, the golden image unchanged, and the clone
//! still readable and startable once the golden image is deleted. A chain the namespace may not
//! read refuses a flatten with nothing created. (Without flatten the golden image stays shared:
//! tests/provision.rs.)

#![allow(clippy::unwrap_used)]

mod common;
mod volumes;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kube::api::{Api, PostParams};
use serde_json::json;
use virtplane::api::{ClonePhase, OverlayCopy, VMClone};

use common::*;
use volumes::*;

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Whether `img` holds the byte `pattern` in the MiB at `offset`.
fn reads(img: &Path, pattern: &str, offset: &str) -> bool {
    let out = Command::new("qemu-io")
        .args(["-U", "-r", "-f", "qcow2", "-c"])
        .arg(format!("read -P {pattern} {offset} 1M"))
        .arg(img)
        .output()
        .unwrap();
    out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("verification failed")
}

/// Creates VMClone `name` of `source` with `flatten: true`. The CRDs were just replaced, and the
/// API server takes a moment to serve a new field (before, it would prune it, or kubectl would
/// reject it against the old OpenAPI): dry runs first, until the field survives one.
async fn create_flatten_clone(client: &kube::Client, ns: &str, name: &str, source: &str) {
    let api: Api<VMClone> = Api::namespaced(client.clone(), ns);
    let obj: VMClone = serde_json::from_value(json!({
        "apiVersion": "virtplane.io/v1alpha1",
        "kind": "VMClone",
        "metadata": {"name": name},
        "spec": {"source": source, "storage": {"flatten": true}}
    }))
    .unwrap();
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    eventually(
        "the API server keeps spec.storage.flatten",
        Duration::from_secs(60),
        || async {
            let kept = api.create(&dry, &obj).await.ok()?;
            kept.spec.storage.flatten.then_some(())
        },
    )
    .await;
    api.create(&PostParams::default(), &obj).await.unwrap();
}

async fn settled(client: &kube::Client, ns: &str, name: &str) -> VMClone {
    wait_obj::<VMClone>(client, ns, name, "Completed or Failed", T, |o| {
        matches!(
            o.status.as_ref().and_then(|s| s.phase),
            Some(ClonePhase::Completed | ClonePhase::Failed)
        )
    })
    .await
}

/// The file and the `<backingStore>` of the domain's only file disk.
fn file_disk_of(domain: &str) -> (PathBuf, Option<String>) {
    let xml = config_xml(domain);
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let disk = doc
        .descendants()
        .filter(|n| n.has_tag_name("disk"))
        .find(|d| {
            d.children()
                .any(|s| s.has_tag_name("source") && s.attribute("file").is_some())
        })
        .unwrap_or_else(|| panic!("{xml}"));
    let file = disk
        .children()
        .find(|n| n.has_tag_name("source"))
        .and_then(|s| s.attribute("file"))
        .map(PathBuf::from)
        .unwrap();
    let backing = disk
        .children()
        .find(|n| n.has_tag_name("backingStore"))
        .and_then(|b| b.descendants().find(|n| n.has_tag_name("source")))
        .and_then(|s| s.attribute("file"))
        .map(str::to_string);
    (file, backing)
}

#[tokio::test]
async fn a_flattened_clone_of_an_overlay_vm_stands_alone() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-flat").await;
    let _op = Operator::start(&ns.name, &[]);
    let golden = TestPool::create("vp-flat-gold");
    let pool = TestPool::create("vp-flat");
    let dom = TestDomain::define("vp-flat");
    let base = golden.path.join("base.qcow2");
    run(&["qemu-img", "create", "-q", "-f", "qcow2", s(&base), "16M"]);
    run(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0x33 0 1M",
        s(&base),
    ]);
    virsh(&["pool-refresh", &golden.name]);
    let sum = sha256(&base);
    kubectl_apply(
        &ns.name,
        &manifest(
            "ovl",
            &dom.name,
            &pool.name,
            "ovl.qcow2",
            json!({"capacity": "16Mi", "backingVolume": {"pool": golden.name, "name": "base.qcow2"}}),
        ),
    );
    wait_ready(&client, &ns.name, "ovl").await;
    let overlay = pool.path.join("ovl.qcow2");
    run(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0x44 1M 1M",
        s(&overlay),
    ]);

    create_flatten_clone(&client, &ns.name, "flat", &dom.name).await;
    let done = settled(&client, &ns.name, "flat").await;
    let st = done.status.clone().unwrap();
    assert_eq!(st.phase, Some(ClonePhase::Completed), "{st:?}");
    let clone = TestDomain {
        name: st.target_name.clone().unwrap(),
    };
    // The status says the disk was flattened, and so does Ready.
    let disk = st
        .disks
        .iter()
        .find(|d| d.overlay.is_some())
        .unwrap_or_else(|| panic!("{st:?}"));
    assert_eq!(disk.overlay, Some(OverlayCopy::Flattened), "{st:?}");
    let (_, reason, msg) = condition_of(&st.conditions, "Ready").unwrap();
    assert_eq!(reason, "Completed");
    assert!(msg.contains("standalone copies"), "{msg}");

    // The copy: no backing file, and no <backingStore> in the clone's definition.
    let (copy, backing) = file_disk_of(&clone.name);
    assert_eq!(disk.target.as_deref(), copy.to_str());
    assert_ne!(
        std::fs::canonicalize(&copy).unwrap(),
        std::fs::canonicalize(&overlay).unwrap()
    );
    let chain = Command::new("qemu-img")
        .args(["info", "-U", "--backing-chain", "--output=json"])
        .arg(&copy)
        .output()
        .unwrap();
    let chain: serde_json::Value = serde_json::from_slice(&chain.stdout).unwrap();
    let chain = chain.as_array().unwrap();
    assert_eq!(chain.len(), 1, "one image, no backing chain: {chain:?}");
    assert!(chain[0].get("backing-filename").is_none(), "{chain:?}");
    assert_eq!(chain[0]["format"], "qcow2");
    assert_eq!(backing, None, "{}", config_xml(&clone.name));
    // The golden image's data and the overlay's, both in the copy; the golden image unchanged.
    assert!(reads(&copy, "0x33", "0"), "the golden image's data");
    assert!(reads(&copy, "0x44", "1M"), "the overlay's data");
    assert_eq!(sha256(&base), sum);
    // The source still shares the golden image.
    let (_, source_backing) = file_disk_of(&dom.name);
    assert!(source_backing.is_some(), "{}", config_xml(&dom.name));

    // Without the golden image the clone is still whole, and QEMU opens it.
    std::fs::remove_file(&base).unwrap();
    virsh(&["pool-refresh", &golden.name]);
    assert!(reads(&copy, "0x33", "0") && reads(&copy, "0x44", "1M"));
    virsh(&["start", &clone.name]);
    virsh(&["destroy", &clone.name]);
}

#[tokio::test]
async fn a_flatten_whose_chain_leaves_the_pools_is_refused_and_makes_nothing() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-flat-out").await;
    let _op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-flat-out");
    let dom = TestDomain::define("vp-flat-out");
    // A golden image outside every pool and allowed directory.
    let outside = log_dir().join(unique("vp-flat-outside"));
    std::fs::create_dir_all(&outside).unwrap();
    let base = outside.join("secret-base.qcow2");
    let overlay = pool.path.join("ovl.qcow2");
    run(&["qemu-img", "create", "-q", "-f", "qcow2", s(&base), "16M"]);
    run(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        s(&base),
        s(&overlay),
    ]);
    virsh(&[
        "attach-disk",
        &dom.name,
        s(&overlay),
        "vda",
        "--config",
        "--driver",
        "qemu",
        "--subdriver",
        "qcow2",
    ]);
    let before: Vec<_> = std::fs::read_dir(&pool.path).unwrap().collect();

    create_flatten_clone(&client, &ns.name, "flat", &dom.name).await;
    let done = settled(&client, &ns.name, "flat").await;
    let st = done.status.clone().unwrap();
    assert_eq!(st.phase, Some(ClonePhase::Failed), "{st:?}");
    let (_, reason, msg) = condition_of(&st.conditions, "Ready").unwrap();
    assert_eq!(reason, "UnsafeImage");
    assert!(msg.contains("spec.storage.flatten"), "{msg}");
    assert!(msg.contains("leaves the directories"), "{msg}");
    assert!(!msg.contains("secret-base"), "{msg}");
    // Nothing was made: no clone, no file.
    assert!(st.target_name.is_none(), "{st:?}");
    assert_eq!(std::fs::read_dir(&pool.path).unwrap().count(), before.len());
    let names = virsh(&["list", "--all", "--name"]);
    assert!(
        !names
            .lines()
            .any(|n| n.starts_with(&format!("{}-clone", dom.name))),
        "{names}"
    );
    let _ = std::fs::remove_dir_all(&outside);
}
