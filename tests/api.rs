//! The virtplane.io API against the real apiserver: generated CRDs, installation, `kubectl
//! explain`, and schema validation.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

use common::*;

#[test]
fn crds_directory_matches_generated_crds() {
    let out = Command::new(env!("CARGO_BIN_EXE_virtplane"))
        .arg("crds")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "virtplane crds failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = String::from_utf8(out.stdout).unwrap();
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/virtplane.io.yaml"
    ))
    .unwrap();
    assert!(
        generated == committed,
        "crds/virtplane.io.yaml is out of date: run `cargo run -- crds > crds/virtplane.io.yaml`"
    );
    for kind in [
        "VirtualMachineStorage",
        "VMInterface",
        "VMClone",
        "IsoDownload",
        "Hypervisor",
    ] {
        assert!(
            generated.contains(&format!("kind: {kind}\n")),
            "{kind} missing from `virtplane crds`"
        );
    }
}

#[tokio::test]
async fn crds_install_and_explain_shows_field_docs() {
    let client = client().await;
    install_crds(&client).await;

    // `kubectl explain` reads the published OpenAPI; it can lag the CRD by a few seconds.
    let text = eventually(
        "kubectl explain shows the source docs",
        Duration::from_secs(60),
        || async {
            let out = Command::new("kubectl")
                .args(["explain", "virtualmachinestorage.spec.source"])
                .output()
                .ok()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            (out.status.success() && text.contains("isoDownload")).then_some(text)
        },
    )
    .await;
    assert!(
        text.contains("at most one of"),
        "explain lacks the field description:\n{text}"
    );
    assert!(
        text.contains("path"),
        "explain lacks the path field:\n{text}"
    );

    let out = Command::new("kubectl")
        .args(["explain", "isodownload.spec.url"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ftps"),
        "explain isodownload.spec.url lacks its docs:\n{text}"
    );
}

fn dynamic(client: &kube::Client, ns: &str, kind: &str, plural: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("virtplane.io", "v1alpha1", kind);
    Api::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::from_gvk_with_plural(&gvk, plural),
    )
}

async fn create(
    api: &Api<DynamicObject>,
    body: serde_json::Value,
) -> Result<DynamicObject, kube::Error> {
    let obj: DynamicObject = serde_json::from_value(body).unwrap();
    api.create(&PostParams::default(), &obj).await
}

fn assert_invalid(result: Result<DynamicObject, kube::Error>, field: &str) {
    match result {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "expected 422 Invalid, got {status:?}");
            assert!(
                status.message.contains(field),
                "rejection does not name {field}: {}",
                status.message
            );
        }
        other => panic!("expected the apiserver to reject the object, got {other:?}"),
    }
}

#[tokio::test]
async fn apiserver_rejects_invalid_objects() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::new(&client, "vp-api").await;

    let storage = dynamic(
        &client,
        &ns.name,
        "VirtualMachineStorage",
        "virtualmachinestorages",
    );
    let ok = create(&storage, json!({
        "apiVersion": "virtplane.io/v1alpha1", "kind": "VirtualMachineStorage",
        "metadata": {"name": "good"},
        "spec": {"vm": "web-1", "type": "cdrom", "source": {"path": "/var/lib/libvirt/images/a.iso"}}
    }))
    .await
    .expect("a valid VirtualMachineStorage is accepted");
    // Defaults from the schema are applied by the apiserver.
    assert_eq!(ok.data["spec"]["bus"], "scsi");
    assert_eq!(ok.data["spec"]["attach"], "LiveAndPersistent");

    assert_invalid(
        create(
            &storage,
            json!({
                "apiVersion": "virtplane.io/v1alpha1", "kind": "VirtualMachineStorage",
                "metadata": {"name": "floppy"}, "spec": {"vm": "web-1", "type": "floppy"}
            }),
        )
        .await,
        "spec.type",
    );
    assert_invalid(
        create(&storage, json!({
            "apiVersion": "virtplane.io/v1alpha1", "kind": "VirtualMachineStorage",
            "metadata": {"name": "two-sources"},
            "spec": {"vm": "web-1", "type": "disk",
                     "source": {"path": "/a.img", "volume": {"pool": "default", "name": "a.img"}}}
        }))
        .await,
        "spec.source",
    );
    assert_invalid(
        create(
            &storage,
            json!({
                "apiVersion": "virtplane.io/v1alpha1", "kind": "VirtualMachineStorage",
                "metadata": {"name": "no-vm"}, "spec": {"type": "disk"}
            }),
        )
        .await,
        "spec.vm",
    );

    let iso = dynamic(&client, &ns.name, "IsoDownload", "isodownloads");
    create(
        &iso,
        json!({
            "apiVersion": "virtplane.io/v1alpha1", "kind": "IsoDownload",
            "metadata": {"name": "good"}, "spec": {"url": "ftps://mirror.example/debian.iso"}
        }),
    )
    .await
    .expect("a valid IsoDownload is accepted");
    for (name, url) in [
        ("file", "file:///etc/shadow"),
        ("gopher", "gopher://example/x.iso"),
        ("bare", "example.com/x.iso"),
    ] {
        assert_invalid(
            create(
                &iso,
                json!({
                    "apiVersion": "virtplane.io/v1alpha1", "kind": "IsoDownload",
                    "metadata": {"name": name}, "spec": {"url": url}
                }),
            )
            .await,
            "spec.url",
        );
    }
    assert_invalid(
        create(&iso, json!({
            "apiVersion": "virtplane.io/v1alpha1", "kind": "IsoDownload",
            "metadata": {"name": "hidden"}, "spec": {"url": "https://example/x.iso", "name": ".hidden"}
        }))
        .await,
        "spec.name",
    );

    let nic = dynamic(&client, &ns.name, "VMInterface", "vminterfaces");
    assert_invalid(
        create(
            &nic,
            json!({
                "apiVersion": "virtplane.io/v1alpha1", "kind": "VMInterface",
                "metadata": {"name": "bad-mac"}, "spec": {"vm": "web-1", "mac": "52:54:00:zz:00:01"}
            }),
        )
        .await,
        "spec.mac",
    );
}
