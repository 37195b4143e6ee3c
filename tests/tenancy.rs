//! Tenancy, controller side: in namespaced mode an object is bound only to a domain or pool
//! granted to its namespace (annotations on the Namespace), the refusal says nothing of other
//! tenants, a grant made later binds the waiting object without a restart, and a tenant bound
//! to the built-in `edit` role uses the kinds but cannot change its own grants.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Resource, ResourceExt};
use serde::Deserialize as _;
use serde_json::json;
use virtplane::api::{IsoDownload, NODE_LABEL, VMClone, VMInterface, VirtualMachineStorage};
use virtplane::controller::binding::Bindable;

use common::*;

/// Grants `domains`, `pools` and `networks` to namespace `ns`, as a cluster admin would.
async fn grant(client: &Client, ns: &str, domains: &str, pools: &str, networks: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let patch = json!({"metadata": {"annotations": {
        "virtplane.io/domains": domains,
        "virtplane.io/pools": pools,
        "virtplane.io/networks": networks,
    }}});
    api.patch(ns, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotate the namespace");
}

/// Waits until object `name` of kind `K` has `Scheduled` with `status` and `reason`; returns it
/// and the condition's message.
async fn scheduled<K>(
    client: &Client,
    ns: &str,
    name: &str,
    status: &str,
    reason: &str,
) -> (K, String)
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Bindable
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let obj: K = wait_obj(
        client,
        ns,
        name,
        &format!("Scheduled={status} {reason}"),
        Duration::from_secs(60),
        |o: &K| {
            // The binding's label and status are written together, in either order: a bound
            // object is one with both.
            let labelled = status != "True"
                || o.labels().get(NODE_LABEL).map(String::as_str) == o.status_node();
            labelled
                && condition_of(o.conditions(), "Scheduled")
                    .is_some_and(|(s, r, _)| s == status && r == reason)
        },
    )
    .await;
    let message = condition_of(obj.conditions(), "Scheduled").unwrap().2;
    (obj, message)
}

fn manifest(kind: &str, name: &str, spec: serde_json::Value) -> String {
    json!({
        "apiVersion": "virtplane.io/v1alpha1", "kind": kind,
        "metadata": {"name": name}, "spec": spec,
    })
    .to_string()
}

#[tokio::test]
async fn namespaces_reach_only_what_is_granted_to_them() {
    let client = client().await;
    install_crds(&client).await;
    let ta = TestNamespace::new(&client, "vp-ta").await;
    let tb = TestNamespace::new(&client, "vp-tb").await;
    // Each tenant's domains share a prefix its grant names.
    let (pa, pb) = (unique("vpta"), unique("vptb"));
    let dom_a = TestDomain::define(&format!("{pa}-web"));
    let dom_b = TestDomain::define(&format!("{pb}-web"));
    let pool_a = TestPool::create("vp-ta");
    let pool_b = TestPool::create("vp-tb");
    grant(&client, &ta.name, &format!("{pa}-*"), &pool_a.name, "user").await;
    // tb starts with its pool only; its domains are granted later.
    grant(&client, &tb.name, "", &pool_b.name, "").await;

    let _agent = Agent::start(
        &unique("vp-node"),
        &["--heartbeat-seconds", "2", NAMESPACED[0], NAMESPACED[1]],
    );
    let _controller = start_controller(
        &unique("vp-ctl"),
        &ta.name,
        "virtplane-controller",
        &NAMESPACED,
    );

    // Inside the grant: bound.
    kubectl_apply(
        &ta.name,
        &manifest(
            "VirtualMachineStorage",
            "own",
            json!({"vm": dom_a.name, "type": "cdrom"}),
        ),
    );
    kubectl_apply(
        &ta.name,
        &manifest(
            "IsoDownload",
            "own-pool",
            json!({"url": "https://example.invalid/x.iso", "pool": pool_a.name}),
        ),
    );
    scheduled::<VirtualMachineStorage>(&client, &ta.name, "own", "True", "Bound").await;
    scheduled::<IsoDownload>(&client, &ta.name, "own-pool", "True", "Bound").await;

    // Every kind aimed at the other tenant's domain or pool: NotGranted, never bound.
    let other = dom_b.name.as_str();
    kubectl_apply(
        &ta.name,
        &manifest(
            "VirtualMachineStorage",
            "x-storage",
            json!({"vm": other, "type": "cdrom"}),
        ),
    );
    kubectl_apply(
        &ta.name,
        &manifest("VMInterface", "x-nic", json!({"vm": other, "type": "user"})),
    );
    kubectl_apply(
        &ta.name,
        &manifest("VMClone", "x-clone", json!({"source": other})),
    );
    kubectl_apply(
        &ta.name,
        &manifest(
            "IsoDownload",
            "x-iso",
            json!({"url": "https://example.invalid/x.iso", "pool": pool_b.name}),
        ),
    );
    // A domain of the other tenant's prefix that does not exist.
    let ghost = format!("{pb}-ghost");
    kubectl_apply(
        &ta.name,
        &manifest(
            "VirtualMachineStorage",
            "x-ghost",
            json!({"vm": ghost, "type": "cdrom"}),
        ),
    );

    let mut messages = vec![
        scheduled::<VirtualMachineStorage>(&client, &ta.name, "x-storage", "False", "NotGranted")
            .await
            .1,
        scheduled::<VMInterface>(&client, &ta.name, "x-nic", "False", "NotGranted")
            .await
            .1,
        scheduled::<VMClone>(&client, &ta.name, "x-clone", "False", "NotGranted")
            .await
            .1,
    ];
    let (iso, iso_msg) =
        scheduled::<IsoDownload>(&client, &ta.name, "x-iso", "False", "NotGranted").await;
    assert!(!iso.labels().contains_key(NODE_LABEL));
    assert!(
        iso_msg.contains(&format!(
            "storage pools {}; {} is not one of them",
            pool_a.name, pool_b.name
        )),
        "{iso_msg}"
    );
    let (_, ghost_msg) =
        scheduled::<VirtualMachineStorage>(&client, &ta.name, "x-ghost", "False", "NotGranted")
            .await;
    // Whether the domain exists makes no difference to the answer.
    assert_eq!(
        ghost_msg.replace(&ghost, "D"),
        messages[0].replace(other, "D"),
        "a refusal must not tell whether the domain exists"
    );
    messages.push(iso_msg);
    for m in &messages {
        assert!(
            m.starts_with(&format!("namespace {} may use ", ta.name)),
            "{m}"
        );
        assert!(!m.contains(&tb.name), "names the other namespace: {m}");
        assert!(
            !m.contains(&format!("{pb}-*")),
            "names the other's grant: {m}"
        );
        assert!(!m.contains("node"), "says something of nodes: {m}");
    }
    assert!(
        messages[0].contains(&format!("domains {pa}-*; {other} is not one of them")),
        "{}",
        messages[0]
    );
    let storage: Api<VirtualMachineStorage> = Api::namespaced(client.clone(), &ta.name);
    let x = storage.get("x-storage").await.unwrap();
    assert!(
        !x.labels().contains_key(NODE_LABEL),
        "an ungranted object is never bound"
    );
    assert!(
        !live_xml(other).contains("device='cdrom'"),
        "nothing changed on the other tenant's domain"
    );

    // Granting later: tb's waiting object is bound without restarting anything.
    kubectl_apply(
        &tb.name,
        &manifest(
            "VirtualMachineStorage",
            "waiting",
            json!({"vm": other, "type": "cdrom"}),
        ),
    );
    let (_, waiting_msg) =
        scheduled::<VirtualMachineStorage>(&client, &tb.name, "waiting", "False", "NotGranted")
            .await;
    assert!(
        waiting_msg.contains("may use domains none;"),
        "{waiting_msg}"
    );
    grant(&client, &tb.name, &format!("{pb}-*"), &pool_b.name, "").await;
    let (obj, _) =
        scheduled::<VirtualMachineStorage>(&client, &tb.name, "waiting", "True", "Bound").await;
    assert!(obj.labels().contains_key(NODE_LABEL));
    // ...and ta's grant did not grow with it.
    let (_, still) =
        scheduled::<VirtualMachineStorage>(&client, &ta.name, "x-storage", "False", "NotGranted")
            .await;
    assert_eq!(still, messages[0]);
}

/// The tenant ClusterRoles of the chart (from the plain manifests, which the chart tests keep
/// a fresh render), under names of this test's own; deleted when dropped.
struct TenantRoles {
    names: Vec<String>,
}

impl TenantRoles {
    async fn apply(client: &Client) -> Self {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/virtplane.yaml"
        ))
        .unwrap();
        let api: Api<ClusterRole> = Api::all(client.clone());
        let suffix = unique("t");
        let mut names = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).unwrap();
            if value.get("kind").and_then(|k| k.as_str()) != Some("ClusterRole") {
                continue;
            }
            let mut role: ClusterRole = serde_yaml::from_value(value).unwrap();
            let aggregated = role
                .labels()
                .keys()
                .any(|k| k.starts_with("rbac.authorization.k8s.io/aggregate-to-"));
            if !aggregated {
                continue;
            }
            let name = format!("{}-{suffix}", role.name_any());
            role.metadata.name = Some(name.clone());
            api.create(&PostParams::default(), &role).await.unwrap();
            names.push(name);
        }
        assert_eq!(
            names.len(),
            2,
            "deploy/ should hold an edit and a view role"
        );
        Self { names }
    }
}

impl Drop for TenantRoles {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = std::process::Command::new("kubectl")
                .args(["delete", "clusterrole", name, "--ignore-not-found"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// A client that authenticates as ServiceAccount `sa` of `ns` with its token (the Secret the
/// 1.20 token controller creates), and nothing else.
async fn client_as(admin: &Client, ns: &str, sa: &str) -> Client {
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
    let token = eventually(
        &format!("the token Secret of ServiceAccount {sa}"),
        Duration::from_secs(60),
        || {
            let (sas, secrets) = (sas.clone(), secrets.clone());
            async move {
                let refs = sas.get(sa).await.ok()?.secrets?;
                let name = refs
                    .iter()
                    .filter_map(|r| r.name.clone())
                    .find(|n| n.starts_with(&format!("{sa}-token-")))?;
                let data = secrets.get(&name).await.ok()?.data?;
                String::from_utf8(data.get("token")?.0.clone()).ok()
            }
        },
    )
    .await;
    let out = std::process::Command::new("kubectl")
        .args(["config", "view", "--raw", "--minify", "-o", "json"])
        .output()
        .unwrap();
    let admin_config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cluster = &admin_config["clusters"][0]["cluster"];
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "test", "cluster": {
            "server": cluster["server"],
            "certificate-authority-data": cluster["certificate-authority-data"],
        }}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": "test", "user": sa, "namespace": ns}}],
        "current-context": sa,
    });
    let kubeconfig = Kubeconfig::from_yaml(&kubeconfig.to_string()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

#[tokio::test]
async fn a_tenant_bound_to_edit_uses_the_kinds_but_cannot_grant_itself_more() {
    let client = client().await;
    install_crds(&client).await;
    let _roles = TenantRoles::apply(&client).await;
    let ns = TestNamespace::new(&client, "vp-tenant").await;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns.name);
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "alice"}})).unwrap();
    sas.create(&PostParams::default(), &sa).await.unwrap();
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), &ns.name);
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "alice-edit"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"kind": "ServiceAccount", "name": "alice", "namespace": ns.name}],
    }))
    .unwrap();
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let alice = client_as(&client, &ns.name, "alice").await;

    // The clusterrole-aggregation controller adds the chart's rules to `edit`.
    let storage: Api<VirtualMachineStorage> = Api::namespaced(alice.clone(), &ns.name);
    let obj: VirtualMachineStorage = serde_json::from_value(json!({
        "apiVersion": "virtplane.io/v1alpha1", "kind": "VirtualMachineStorage",
        "metadata": {"name": "alices"}, "spec": {"vm": "anything", "type": "cdrom"},
    }))
    .unwrap();
    eventually(
        "alice may create a VirtualMachineStorage (edit aggregated)",
        Duration::from_secs(60),
        || {
            let (storage, obj) = (storage.clone(), obj.clone());
            async move {
                storage
                    .create(&PostParams::default(), &obj)
                    .await
                    .map_err(|e| eprintln!("alice create: {e}"))
                    .ok()
            }
        },
    )
    .await;
    assert!(storage.get("alices").await.is_ok());

    // Her own Namespace's annotations are the grants: she cannot touch them.
    let namespaces: Api<Namespace> = Api::all(alice.clone());
    let grab = json!({"metadata": {"annotations": {"virtplane.io/domains": "*"}}});
    match namespaces
        .patch(&ns.name, &PatchParams::default(), &Patch::Merge(&grab))
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("alice patched her Namespace's grants: {other:?}"),
    }
    let admin_view = Api::<Namespace>::all(client.clone())
        .get(&ns.name)
        .await
        .unwrap();
    assert!(
        !admin_view
            .annotations()
            .contains_key("virtplane.io/domains")
    );
    // Nor can she read the inventory of every tenant, or write status.
    let hvs: Api<virtplane::api::Hypervisor> = Api::all(alice.clone());
    assert!(
        matches!(hvs.list(&Default::default()).await, Err(kube::Error::Api(s)) if s.code == 403)
    );
    let status = json!({"status": {"nodeName": "x"}});
    assert!(matches!(
        storage
            .patch_status("alices", &PatchParams::default(), &Patch::Merge(&status))
            .await,
        Err(kube::Error::Api(s)) if s.code == 403
    ));
    storage
        .delete("alices", &DeleteParams::default())
        .await
        .unwrap();
}
