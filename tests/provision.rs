//! `spec.source.volume.create` against a real libvirtd: a blank qcow2 created, hot-plugged into
//! the small real guest and seen by its kernel, grown live (the guest sees the new size) and
//! removed with `reclaimPolicy: Delete`; a kept volume with `Retain`; a name taken by a volume
//! this object did not create (`NameConflict`, the volume untouched); and two qcow2 overlays of
//! one golden image written independently, the golden image's checksum unchanged.

#![allow(clippy::unwrap_used)]

mod common;
mod volumes;

use std::path::Path;
use std::process::Command;

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use common::*;
use volumes::*;

#[tokio::test]
async fn blank_qcow2_is_created_hot_plugged_grown_live_and_deleted() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-prov-blank").await;
    let _op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-prov-blank");
    let guest = TestGuest::boot("vp-prov-blank", true).await;
    let api: Api<Vms> = Api::namespaced(client.clone(), &ns.name);

    kubectl_apply(
        &ns.name,
        &manifest(
            "data",
            &guest.name,
            &pool.name,
            "data.qcow2",
            json!({"capacity": "64Mi", "format": "qcow2", "reclaimPolicy": "Delete"}),
        ),
    );
    let obj = wait_ready(&client, &ns.name, "data").await;
    let file = pool.path.join("data.qcow2");
    let info = img_info(&file);
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 64 * MIB);
    assert!(info.get("backing-filename").is_none(), "{info}");
    let st = obj.status.clone().unwrap();
    assert_eq!(st.live, Some(true));
    assert_eq!(
        st.current_source.as_deref(),
        Some(std::fs::canonicalize(&file).unwrap().to_str().unwrap())
    );
    let target = st.target.unwrap();
    // The guest's kernel sees a 64 MiB disk.
    eventually("the guest sees the 64 MiB disk", T, || async {
        guest_disk_sizes(&guest.name)
            .contains(&(64 * MIB))
            .then_some(())
    })
    .await;
    assert!(
        event_reasons(&client, &ns.name, "data")
            .await
            .contains(&"VolumeCreated".into())
    );

    // Growing the capacity resizes the disk under the running guest.
    patch_capacity(&api, "data", "96Mi").await;
    eventually("libvirt's block info shows 96 MiB", T, || async {
        (block_capacity(&guest.name, &target) == 96 * MIB).then_some(())
    })
    .await;
    eventually("the guest sees 96 MiB", T, || async {
        guest_disk_sizes(&guest.name)
            .contains(&(96 * MIB))
            .then_some(())
    })
    .await;
    wait_ready(&client, &ns.name, "data").await;
    assert_eq!(img_info(&file)["virtual-size"], 96 * MIB);

    // Shrinking is refused; nothing changes.
    patch_capacity(&api, "data", "32Mi").await;
    let o = wait_reason(&client, &ns.name, "data", "InvalidSpec").await;
    let (_, _, msg) = ready(&o).unwrap();
    assert!(msg.contains("never shrunk"), "{msg}");
    assert_eq!(block_capacity(&guest.name, &target), 96 * MIB);
    assert_eq!(img_info(&file)["virtual-size"], 96 * MIB);

    // Delete with reclaimPolicy Delete: detached, then the volume is removed.
    kubectl_delete(&ns.name, "vmstorage", "data");
    wait_gone::<Vms>(&client, &ns.name, "data", T).await;
    assert!(!file.exists(), "the created volume is removed");
    assert!(
        !live_xml(&guest.name).contains("data.qcow2"),
        "the guest no longer has the disk"
    );
}

#[tokio::test]
async fn retain_keeps_the_volume_and_a_taken_name_is_a_conflict_left_untouched() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-prov-keep").await;
    let _op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-prov-keep");
    let dom = TestDomain::define("vp-prov-keep");
    let api: Api<Vms> = Api::namespaced(client.clone(), &ns.name);

    // Someone else's volume, with data in it.
    virsh(&[
        "vol-create-as",
        &pool.name,
        "theirs.qcow2",
        "16M",
        "--format",
        "qcow2",
    ]);
    let theirs = pool.path.join("theirs.qcow2");
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 1M"])
        .arg(&theirs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sum = sha256(&theirs);
    kubectl_apply(
        &ns.name,
        &manifest(
            "clash",
            &dom.name,
            &pool.name,
            "theirs.qcow2",
            json!({"capacity": "32Mi", "reclaimPolicy": "Delete"}),
        ),
    );
    let o = wait_reason(&client, &ns.name, "clash", "NameConflict").await;
    let (_, _, msg) = ready(&o).unwrap();
    assert!(msg.contains("not created by this object"), "{msg}");
    assert_eq!(sha256(&theirs), sum, "untouched");
    assert_eq!(img_info(&theirs)["virtual-size"], 16 * MIB, "not grown");
    assert!(
        !config_xml(&dom.name).contains("theirs.qcow2"),
        "not attached"
    );
    // Deleting the object (reclaimPolicy Delete) leaves it alone too.
    kubectl_delete(&ns.name, "vmstorage", "clash");
    wait_gone::<Vms>(&client, &ns.name, "clash", T).await;
    assert_eq!(sha256(&theirs), sum, "still untouched");

    // Retain (the default) on a shut-off domain: created, written to the definition, grown
    // offline (vol-resize), and kept when the object goes.
    kubectl_apply(
        &ns.name,
        &manifest(
            "kept",
            &dom.name,
            &pool.name,
            "kept.raw",
            json!({"capacity": "8Mi", "format": "raw", "preallocation": "full"}),
        ),
    );
    wait_ready(&client, &ns.name, "kept").await;
    let kept = pool.path.join("kept.raw");
    assert_eq!(img_info(&kept)["format"], "raw");
    assert_eq!(std::fs::metadata(&kept).unwrap().len(), 8 * MIB);
    assert!(config_xml(&dom.name).contains("kept.raw"));
    patch_capacity(&api, "kept", "12Mi").await;
    eventually("the volume grew offline", T, || async {
        (std::fs::metadata(&kept).unwrap().len() == 12 * MIB).then_some(())
    })
    .await;
    kubectl_delete(&ns.name, "vmstorage", "kept");
    wait_gone::<Vms>(&client, &ns.name, "kept", T).await;
    assert!(kept.exists(), "Retain keeps the volume");
    assert!(!config_xml(&dom.name).contains("kept.raw"), "detached");
}

#[tokio::test]
async fn overlays_of_one_golden_image_are_written_independently() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-prov-ovl").await;
    let _op = Operator::start(&ns.name, &[]);
    let golden = TestPool::create("vp-prov-gold");
    let pool = TestPool::create("vp-prov-ovl");
    let guest = TestGuest::boot("vp-prov-ovl", true).await;
    let dom = TestDomain::define("vp-prov-ovl");

    // The golden image: qcow2 with a known pattern.
    let base = golden.path.join("base.qcow2");
    let run = |args: &[&str]| {
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        base.to_str().unwrap(),
        "32M",
    ]);
    run(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0x33 0 4M",
        base.to_str().unwrap(),
    ]);
    virsh(&["pool-refresh", &golden.name]);
    let sum = sha256(&base);
    let create = json!({"capacity": "32Mi", "reclaimPolicy": "Delete",
        "backingVolume": {"pool": golden.name, "name": "base.qcow2"}});

    // Overlay A in the running guest, overlay B on a shut-off domain.
    kubectl_apply(
        &ns.name,
        &manifest("a", &guest.name, &pool.name, "a.qcow2", create.clone()),
    );
    kubectl_apply(
        &ns.name,
        &manifest("b", &dom.name, &pool.name, "b.qcow2", create),
    );
    let a = wait_ready(&client, &ns.name, "a").await;
    wait_ready(&client, &ns.name, "b").await;
    let real_base = std::fs::canonicalize(&base).unwrap();
    for (file, xml) in [
        (pool.path.join("a.qcow2"), live_xml(&guest.name)),
        (pool.path.join("b.qcow2"), config_xml(&dom.name)),
    ] {
        let info = img_info(&file);
        assert_eq!(
            info["backing-filename"],
            real_base.to_str().unwrap(),
            "{info}"
        );
        assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
        // The disk carries the chain: the overlay, then the golden image.
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let disk = doc
            .descendants()
            .filter(|n| n.has_tag_name("disk"))
            .find(|d| {
                d.children().any(|s| {
                    s.has_tag_name("source")
                        && s.attribute("file").is_some_and(|f| {
                            f.ends_with(file.file_name().unwrap().to_str().unwrap())
                        })
                })
            })
            .unwrap_or_else(|| panic!("{xml}"));
        let backing = disk
            .children()
            .find(|n| n.has_tag_name("backingStore"))
            .and_then(|b| b.children().find(|n| n.has_tag_name("source")))
            .and_then(|s| s.attribute("file"));
        assert_eq!(backing, real_base.to_str(), "{xml}");
    }

    // The guest reads the golden image's data through overlay A, then writes its own.
    let target = a.status.unwrap().target.unwrap();
    let dev = eventually("the guest sees the overlay", T, || async {
        guest_sh(
            &guest.name,
            "for d in /sys/block/vd*; do [ $(cat $d/size) = 65536 ] && basename $d; done",
        )
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
    })
    .await;
    let read = guest_sh(
        &guest.name,
        &format!("dd if=/dev/{dev} bs=1 count=4 2>/dev/null | od -An -tx1"),
    )
    .unwrap();
    assert_eq!(
        read.split_whitespace().collect::<Vec<_>>(),
        ["33"; 4],
        "{read}"
    );
    guest_sh(
        &guest.name,
        &format!(
            "dd if=/dev/zero bs=1M count=2 2>/dev/null | tr '\\000' '\\252' | dd of=/dev/{dev} bs=1M conv=fsync 2>/dev/null; sync"
        ),
    )
    .unwrap();
    // Overlay B written from the host (its domain is shut off).
    run(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0x77 0 1M",
        pool.path.join("b.qcow2").to_str().unwrap(),
    ]);
    let _ = target;
    let pattern_at = |img: &Path, pat: &str, off: &str| {
        Command::new("qemu-io")
            .args([
                "-U",
                "-r",
                "-f",
                "qcow2",
                "-c",
                &format!("read -P {pat} {off} 1M"),
            ])
            .arg(img)
            .output()
            .unwrap()
            .stdout
    };
    let a_out =
        String::from_utf8_lossy(&pattern_at(&pool.path.join("a.qcow2"), "0xaa", "0")).into_owned();
    assert!(
        a_out.contains("read 1048576/1048576") && !a_out.contains("Pattern verification failed"),
        "the guest's write is in overlay A: {a_out}"
    );
    let b_out =
        String::from_utf8_lossy(&pattern_at(&pool.path.join("b.qcow2"), "0x77", "0")).into_owned();
    assert!(!b_out.contains("Pattern verification failed"), "{b_out}");
    let b_rest =
        String::from_utf8_lossy(&pattern_at(&pool.path.join("b.qcow2"), "0x33", "1M")).into_owned();
    assert!(
        !b_rest.contains("Pattern verification failed"),
        "B reads the golden image past its own write: {b_rest}"
    );
    assert_eq!(sha256(&base), sum, "the golden image is never written");

    // Deleting the overlays (reclaimPolicy Delete) removes them, never the golden image.
    kubectl_delete(&ns.name, "vmstorage", "a");
    kubectl_delete(&ns.name, "vmstorage", "b");
    wait_gone::<Vms>(&client, &ns.name, "a", T).await;
    wait_gone::<Vms>(&client, &ns.name, "b", T).await;
    assert!(!pool.path.join("a.qcow2").exists());
    assert!(!pool.path.join("b.qcow2").exists());
    assert!(base.exists());
    assert_eq!(sha256(&base), sum);
}

/// In namespaced mode: a volume or a golden image in a pool the namespace is not granted, and a
/// golden image whose own backing file lies in such a pool, are refused before anything is
/// created, and the messages never name the other pool's files.
#[tokio::test]
async fn overlays_stay_inside_the_granted_pools() {
    use k8s_openapi::api::core::v1::Namespace;
    use virtplane::api::NODE_LABEL;
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-prov-ten").await;
    let dom = TestDomain::define("vp-prov-ten");
    let mine = TestPool::create("vp-prov-mine");
    let gold = TestPool::create("vp-prov-gold");
    let hidden = TestPool::create("vp-prov-hidden");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            &ns.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                "virtplane.io/domains": dom.name,
                "virtplane.io/pools": format!("{},{}", mine.name, gold.name),
            }}})),
        )
        .await
        .unwrap();
    let node = unique("vp-node");
    let _agent = Agent::start(
        &node,
        &["--heartbeat-seconds", "2", NAMESPACED[0], NAMESPACED[1]],
    );
    let run = |args: &[&str]| {
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let secret = hidden.path.join("secret-base.qcow2");
    run(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        secret.to_str().unwrap(),
        "16M",
    ]);
    let mid = gold.path.join("mid.qcow2");
    run(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        secret.to_str().unwrap(),
        mid.to_str().unwrap(),
    ]);
    virsh(&["pool-refresh", &hidden.name]);
    virsh(&["pool-refresh", &gold.name]);
    let apply = |name: &str, pool: &str, create: serde_json::Value| {
        let mut m: serde_json::Value = serde_json::from_str(&manifest(
            name,
            &dom.name,
            pool,
            &format!("{name}.qcow2"),
            create,
        ))
        .unwrap();
        m["metadata"]["labels"] = json!({NODE_LABEL: node});
        kubectl_apply(&ns.name, &m.to_string());
    };
    // The overlay's own pool not granted.
    apply("own", &hidden.name, json!({"capacity": "16Mi"}));
    // The golden image in a pool not granted.
    apply(
        "base",
        &mine.name,
        json!({"capacity": "16Mi", "backingVolume": {"pool": hidden.name, "name": "secret-base.qcow2"}}),
    );
    // A granted golden image whose own backing file is in the pool not granted.
    apply(
        "chain",
        &mine.name,
        json!({"capacity": "16Mi", "backingVolume": {"pool": gold.name, "name": "mid.qcow2"}}),
    );
    let own = wait_reason(&client, &ns.name, "own", "NotGranted").await;
    let base = wait_reason(&client, &ns.name, "base", "NotGranted").await;
    let chain = wait_reason(&client, &ns.name, "chain", "UnsafeImage").await;
    let (_, _, msg) = ready(&chain).unwrap();
    assert!(msg.contains("outside the pools granted"), "{msg}");
    for o in [&own, &base, &chain] {
        let (_, _, msg) = ready(o).unwrap();
        assert!(!msg.contains("secret-base"), "{msg}");
        assert!(!msg.contains(hidden.path.to_str().unwrap()), "{msg}");
    }
    // Nothing was created anywhere, and the golden images are untouched.
    assert!(!hidden.path.join("own.qcow2").exists());
    assert!(!mine.path.join("base.qcow2").exists());
    assert!(!mine.path.join("chain.qcow2").exists());
    assert!(!config_xml(&dom.name).contains("qcow2"), "nothing attached");
}

/// A VMClone of a VM whose disk is an overlay copies the overlay and keeps the golden image
/// shared: the copy is backed by the same golden image, which is never written.
#[tokio::test]
async fn a_clone_of_an_overlay_vm_keeps_the_golden_image_shared() {
    use virtplane::api::{ClonePhase, VMClone};
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-prov-clone").await;
    let _op = Operator::start(&ns.name, &[]);
    let golden = TestPool::create("vp-prov-cgold");
    let pool = TestPool::create("vp-prov-cl");
    let dom = TestDomain::define("vp-prov-cl");
    let base = golden.path.join("base.qcow2");
    let run = |args: &[&str]| {
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        base.to_str().unwrap(),
        "16M",
    ]);
    run(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0x33 0 1M",
        base.to_str().unwrap(),
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
        overlay.to_str().unwrap(),
    ]);

    kubectl_apply(
        &ns.name,
        &format!(
            "apiVersion: virtplane.io/v1alpha1\nkind: VMClone\nmetadata:\n  name: cl\nspec:\n  source: {}\n  storage:\n    strategy: Copy\n",
            dom.name
        ),
    );
    let done = wait_obj::<VMClone>(&client, &ns.name, "cl", "Completed or Failed", T, |o| {
        matches!(
            o.status.as_ref().and_then(|s| s.phase),
            Some(ClonePhase::Completed | ClonePhase::Failed)
        )
    })
    .await;
    let st = done.status.clone().unwrap();
    assert_eq!(st.phase, Some(ClonePhase::Completed), "{st:?}");
    let shared = Some(virtplane::api::OverlayCopy::SharedBase);
    assert!(st.disks.iter().any(|d| d.overlay == shared), "{st:?}");
    let _clone = TestDomain {
        name: st.target_name.clone().unwrap(),
    };
    // The clone's disk: a copy of the overlay in the same pool, backed by the golden image.
    let xml = config_xml(&st.target_name.unwrap());
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let disk = doc
        .descendants()
        .filter(|n| n.has_tag_name("disk"))
        .find(|d| {
            d.children()
                .any(|s| s.has_tag_name("source") && s.attribute("file").is_some())
        })
        .unwrap_or_else(|| panic!("{xml}"));
    let copy = disk
        .children()
        .find(|n| n.has_tag_name("source"))
        .and_then(|s| s.attribute("file"))
        .map(std::path::PathBuf::from)
        .unwrap();
    assert_ne!(
        std::fs::canonicalize(&copy).unwrap(),
        std::fs::canonicalize(&overlay).unwrap()
    );
    let real_base = std::fs::canonicalize(&base).unwrap();
    let info = img_info(&copy);
    assert_eq!(
        info["backing-filename"],
        real_base.to_str().unwrap(),
        "{info}"
    );
    let backing = disk
        .children()
        .find(|n| n.has_tag_name("backingStore"))
        .and_then(|b| b.children().find(|n| n.has_tag_name("source")))
        .and_then(|s| s.attribute("file"));
    assert_eq!(backing, real_base.to_str(), "{xml}");
    // The copy has the overlay's own data and reads the rest from the shared golden image.
    let read = |img: &Path, pat: &str, off: &str| {
        let out = Command::new("qemu-io")
            .args([
                "-U",
                "-r",
                "-f",
                "qcow2",
                "-c",
                &format!("read -P {pat} {off} 1M"),
            ])
            .arg(img)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && !text.contains("Pattern verification failed"),
            "{} at {off} is not {pat}: {text}",
            img.display()
        );
    };
    read(&copy, "0x33", "0");
    read(&copy, "0x44", "1M");
    // Written independently of the original overlay; the golden image is never written.
    run(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0x55 0 1M",
        copy.to_str().unwrap(),
    ]);
    read(&overlay, "0x33", "0");
    read(&copy, "0x55", "0");
    assert_eq!(sha256(&base), sum);
}
