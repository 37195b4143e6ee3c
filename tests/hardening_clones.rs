//! Hardening of VMClone: two clones of the same two-disk source at once reserve distinct names
//! when planned, both complete and never destroy each other's disks, and a clone whose UEFI
//! variable store name is another domain's fails with `NameConflict`, leaving that domain's
//! variables untouched and nothing of its own behind.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::Client;
use virtplane::api::{ClonePhase, VMClone};

use common::*;

const T: Duration = Duration::from_secs(180);

fn manifest(name: &str, source: &str, extra: &str) -> String {
    format!(
        "apiVersion: virtplane.io/v1alpha1\nkind: VMClone\nmetadata:\n  name: {name}\nspec:\n  source: {source}\n{extra}"
    )
}

async fn finished(client: &Client, ns: &str, name: &str) -> VMClone {
    wait_obj::<VMClone>(client, ns, name, "Completed or Failed", T, |o| {
        matches!(
            o.status.as_ref().and_then(|s| s.phase),
            Some(ClonePhase::Completed | ClonePhase::Failed)
        )
    })
    .await
}

fn files(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

/// A file of `mib` MiB with a pattern of its own.
fn data_file(path: &Path, mib: usize, seed: u8) {
    let data: Vec<u8> = (0..mib << 20).map(|i| (i % 253) as u8 ^ seed).collect();
    std::fs::write(path, data).unwrap();
}

/// A shut-off domain named `name` with the given disk files and, optionally, a UEFI variable
/// store at `nvram`.
fn define(name: &str, disks: &[&Path], nvram: Option<&Path>) -> TestDomain {
    let os = match nvram {
        Some(n) => format!(
            "<os><type arch='x86_64' machine='q35'>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader><nvram>{}</nvram></os><features><acpi/></features>",
            n.display()
        ),
        None => "<os><type arch='x86_64' machine='q35'>hvm</type></os>".to_string(),
    };
    let devs: String = disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            format!(
                "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vd{}' bus='virtio'/></disk>",
                d.display(),
                (b'a' + i as u8) as char
            )
        })
        .collect();
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>{os}\
         <devices>{devs}<controller type='usb' model='none'/><memballoon model='none'/></devices></domain>"
    );
    let path = log_dir().join(format!("{name}.xml"));
    std::fs::write(&path, xml).unwrap();
    virsh(&["define", path.to_str().unwrap()]);
    TestDomain {
        name: name.to_string(),
    }
}

#[tokio::test]
async fn two_concurrent_clones_of_a_two_disk_source_keep_each_others_disks() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-hc-two").await;
    let _op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-hc-two");
    let a = pool.path.join("a.img");
    let b = pool.path.join("b.img");
    data_file(&a, 8, 1);
    data_file(&b, 8, 2);
    virsh(&["pool-refresh", &pool.name]);
    let src = define(&unique("vp-hc-src"), &[&a, &b], None);
    let before = files(&pool.path);

    // Both at once, in one apply.
    kubectl_apply(
        &ns.name,
        &format!(
            "{}\n---\n{}",
            manifest("one", &src.name, ""),
            manifest("two", &src.name, "")
        ),
    );
    // Each reserved its own names when it was planned: both complete, on distinct copies.
    let mut expected = before.clone();
    let mut domains = Vec::new();
    let mut copies = Vec::new();
    for name in ["one", "two"] {
        let o = finished(&client, &ns.name, name).await;
        let st = o.status.unwrap();
        let (_, reason, message) = condition_of(&st.conditions, "Ready").unwrap();
        assert_eq!(
            st.phase,
            Some(ClonePhase::Completed),
            "{name}: {reason}: {message}"
        );
        domains.push(TestDomain {
            name: st.target_name.clone().unwrap(),
        });
        let mut mine = Vec::new();
        for d in &st.disks {
            let t = PathBuf::from(d.target.as_ref().unwrap());
            assert_eq!(
                std::fs::read(&t).unwrap(),
                std::fs::read(&d.source).unwrap(),
                "{name}: {t:?} holds its source's data"
            );
            assert!(
                expected.insert(t.clone()),
                "{name}: {t:?} is no other clone's"
            );
            mine.push(t);
        }
        assert_eq!(mine.len(), 2, "{name}: {:?}", st.disks);
        copies.push(mine);
    }
    assert_ne!(domains[0].name, domains[1].name);
    assert_eq!(files(&pool.path), expected);
    assert_eq!(expected.len(), before.len() + 4);
    let listed = virsh(&["list", "--all", "--name"]);
    for d in &domains {
        assert!(listed.lines().any(|l| l.trim() == d.name), "{listed}");
    }

    // Deleting one task leaves the other clone's disks (and its own completed ones) alone.
    kubectl_delete(&ns.name, "vmclone", "one");
    wait_gone::<VMClone>(&client, &ns.name, "one", T).await;
    assert_eq!(files(&pool.path), expected);
    let sources = [&a, &b];
    for (t, src) in copies[1].iter().zip(sources) {
        assert_eq!(std::fs::read(t).unwrap(), std::fs::read(src).unwrap());
    }
    drop(domains);
}

#[tokio::test]
async fn a_colliding_uefi_variable_store_is_a_name_conflict_and_untouched() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-hc-nv").await;
    let _op = Operator::start(&ns.name, &[]);
    let pool = TestPool::create("vp-hc-nv");
    let prefix = unique("vp-hc");
    // Source `P-db` with `P-db_VARS.fd`; the clone `P-stg` would get `P-stg-P-db_VARS.fd`,
    // which is the variable store of the existing domain `P-stg-P-db`.
    let disk = pool.path.join("db.img");
    data_file(&disk, 4, 3);
    let src_vars = pool.path.join(format!("{prefix}-db_VARS.fd"));
    std::fs::write(&src_vars, b"source variables").unwrap();
    let src = define(&format!("{prefix}-db"), &[&disk], Some(&src_vars));
    let clone = format!("{prefix}-stg");
    let victim_name = format!("{clone}-{prefix}-db");
    let victim_vars = pool.path.join(format!("{victim_name}_VARS.fd"));
    std::fs::write(&victim_vars, b"the other domain's variables").unwrap();
    let victim_disk = pool.path.join("victim.img");
    data_file(&victim_disk, 1, 4);
    let _victim = define(&victim_name, &[&victim_disk], Some(&victim_vars));
    virsh(&["pool-refresh", &pool.name]);
    let before = files(&pool.path);

    kubectl_apply(
        &ns.name,
        &manifest("nv", &src.name, &format!("  targetName: {clone}\n")),
    );
    let o = finished(&client, &ns.name, "nv").await;
    let st = o.status.unwrap();
    let (_, reason, message) = condition_of(&st.conditions, "Ready").unwrap();
    assert_eq!(st.phase, Some(ClonePhase::Failed), "{message}");
    assert_eq!(reason, "NameConflict", "{message}");
    assert!(message.contains("UEFI variable store"), "{message}");
    assert_eq!(
        std::fs::read(&victim_vars).unwrap(),
        b"the other domain's variables"
    );
    assert_eq!(std::fs::read(&src_vars).unwrap(), b"source variables");
    // Nothing of the task is left: no copy, no domain.
    assert_eq!(files(&pool.path), before);
    let listed = virsh(&["list", "--all", "--name"]);
    assert!(!listed.lines().any(|l| l.trim() == clone), "{listed}");
}
