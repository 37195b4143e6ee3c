"""The chart, offline: lint, what it renders with default and other values, and which values the
schema and the templates refuse. Rendering uses the Helm 4 engine of helm-python-sdk."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from conftest import CHART
from manifests import objects, render


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [o for o in by_kind(objs, kind) if o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def rules(role: dict[str, Any]) -> set[tuple[str, str, str, str]]:
    """A role's rules as (apiGroup, resource, verb, resourceName) tuples."""
    out = set()
    for r in role["rules"]:
        for g in r["apiGroups"]:
            for res in r["resources"]:
                for v in r["verbs"]:
                    for n in r.get("resourceNames") or ["*"]:
                        out.add((g, res, v, n))
    return out


def expand(groups: list[str], resources: list[str], verbs: list[str], names: list[str] | None = None):
    return {(g, r, v, n) for g in groups for r in resources for v in verbs for n in names or ["*"]}


KINDS = ["virtualmachinestorages", "vminterfaces", "vmclones", "isodownloads"]
EVENTS = expand(["", "events.k8s.io"], ["events"], ["create", "patch"])
# Tenancy: both components read the Namespaces' grant annotations; neither writes them.
NAMESPACES = expand([""], ["namespaces"], ["get", "list", "watch"])

CONTROLLER_RULES = (
    expand(["virtplane.io"], KINDS, ["get", "list", "watch", "patch"])
    | expand(["virtplane.io"], [f"{k}/status" for k in KINDS], ["get", "patch"])
    | expand(["virtplane.io"], ["hypervisors"], ["get", "list", "watch"])
    | expand(["virtplane.io"], ["hypervisors/status"], ["get", "patch"])
    | NAMESPACES
    | EVENTS
)
AGENT_RULES = (
    expand(["virtplane.io"], KINDS, ["get", "list", "watch", "patch"])
    | expand(["virtplane.io"], [f"{k}/status" for k in KINDS], ["get", "patch"])
    | expand(["virtplane.io"], [f"{k}/finalizers" for k in KINDS], ["update", "patch"])
    | expand(["virtplane.io"], ["hypervisors"], ["get", "list", "watch", "create", "patch"])
    | expand(["virtplane.io"], ["hypervisors/status"], ["get", "patch"])
    | NAMESPACES
    # The cluster's pod ranges, refused to downloads.
    | expand([""], ["nodes"], ["get", "list", "watch"])
    | EVENTS
)
CREDENTIALS = expand([""], ["secrets", "configmaps"], ["get"])
TENANT_EDIT = expand(["virtplane.io"], KINDS, ["get", "list", "watch", "create", "update", "patch",
                                               "delete", "deletecollection"])
TENANT_VIEW = expand(["virtplane.io"], KINDS, ["get", "list", "watch"])


# ----------------------------------------------------------------------------- lint
@pytest.mark.parametrize(
    "values",
    [None, {"tenancy": "open", "agent": {"allowedPaths": ["/srv/iso"], "secretNamespaces": ["vms"]},
            "rbac": {"tenantsCanReadHypervisors": True},
            "metrics": {"serviceMonitor": {"enabled": True}}}],
    ids=["defaults", "custom"],
)
def test_lint_is_clean(values: dict[str, Any] | None) -> None:
    report = helm.lint(CHART, values, strict=True, kube_version="v1.20.2")
    assert report["errors"] == [], report
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], report


# ------------------------------------------------------------------- default values
def test_default_render() -> None:
    rendered = render(release="vp", namespace="virtplane-system")
    objs = objects(rendered)
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == sorted(
        ["ServiceAccount"] * 2 + ["ClusterRole"] * 5 + ["ClusterRoleBinding"] * 2
        + ["Role"] * 3 + ["RoleBinding"] * 3
        + ["Service", "Service", "Deployment", "DaemonSet"]
    )
    for o in objs:
        if o["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            # The node Leases' Roles live where the Leases are (agent.leaseNamespace).
            want = "kube-node-lease" if "node-lease" in o["metadata"]["name"] else "virtplane-system"
            assert o["metadata"]["namespace"] == want, o["metadata"]

    # Controller: 2 replicas, non-root, read-only root, no capabilities, probes, downward API.
    deploy = one(objs, "Deployment")
    assert deploy["metadata"]["name"] == "vp-virtplane-controller"
    assert deploy["spec"]["replicas"] == 2
    pod = deploy["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "vp-virtplane-controller"
    assert pod["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["affinity"]["podAntiAffinity"], "replicas should spread over nodes"
    c = container(deploy)
    assert c["image"] == "virtplane:0.1.0"
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "privileged": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert c["args"] == [
        "controller", "--log-format=json", "--http-addr=0.0.0.0:8080",
        "--lease-name=virtplane-controller", "--lease-seconds=15", "--node-grace-seconds=40",
        "--tenancy=namespaced",
    ]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
    assert env == {"POD_NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert set(c["resources"]) == {"requests", "limits"}

    # Agent: root without privileged mode, DAC_OVERRIDE only, exactly three host directories.
    ds = one(objs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "vp-virtplane-agent"
    for host_ns in ("hostNetwork", "hostPID", "hostIPC"):
        assert host_ns not in pod
    assert pod["securityContext"]["runAsUser"] == 0
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "virtplane.io/hypervisor": "true"}
    c = container(ds)
    assert c["securityContext"] == {
        "privileged": False, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"], "add": ["DAC_OVERRIDE"]},
    }
    assert c["args"] == [
        "agent", "--log-format=json", "--http-addr=0.0.0.0:8081", "--libvirt-uri=qemu:///system",
        "--libvirt-call-timeout=120", "--heartbeat-seconds=10", "--max-downloads=2", "--tenancy=namespaced",
        "--max-clones=2", "--state-dir=/var/lib/virtplane", "--download-max-bytes=68719476736",
        "--download-min-free-bytes=1073741824", "--download-min-rate-bytes=1024",
        "--download-rate-window-seconds=120", "--download-deadline-seconds=86400",
    ]
    assert c["env"] == [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
    host = {v["name"]: v["hostPath"] for v in pod["volumes"] if "hostPath" in v}
    assert host == {
        "libvirt-run": {"path": "/run/libvirt", "type": "Directory"},
        "host-0": {"path": "/var/lib/libvirt/images", "type": "Directory"},
        # VMClone copies a UEFI guest's variable store there.
        "host-1": {"path": "/var/lib/libvirt/qemu/nvram", "type": "Directory"},
        # The agent's record of what each clone created (--state-dir).
        "state": {"path": "/var/lib/virtplane", "type": "DirectoryOrCreate"},
    }
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["libvirt-run"] == {"name": "libvirt-run", "mountPath": "/run/libvirt", "readOnly": True}
    assert mounts["host-0"]["mountPath"] == "/var/lib/libvirt/images"
    assert mounts["host-1"]["mountPath"] == "/var/lib/libvirt/qemu/nvram"

    # RBAC: exactly the rules each component needs.
    assert rules(one(objs, "ClusterRole", "-controller")) == CONTROLLER_RULES
    assert rules(one(objs, "ClusterRole", "-agent")) == AGENT_RULES | CREDENTIALS
    assert_tenant_roles(objs, "vp-virtplane")
    lease_role = one(objs, "Role", "-leader-election")
    assert lease_role["metadata"]["namespace"] == "virtplane-system"
    assert rules(lease_role) == expand(["coordination.k8s.io"], ["leases"], ["create"]) | expand(
        ["coordination.k8s.io"], ["leases"], ["get", "update", "patch"], ["virtplane-controller"]
    )
    for binding in by_kind(objs, "ClusterRoleBinding") + by_kind(objs, "RoleBinding"):
        (subject,) = binding["subjects"]
        component = binding["metadata"]["labels"]["app.kubernetes.io/component"]
        assert subject == {
            "kind": "ServiceAccount", "name": f"vp-virtplane-{component}",
            "namespace": "virtplane-system",
        }

    # Metrics: one Service per component on its pods' port; no ServiceMonitor by default.
    services = {s["metadata"]["name"]: s for s in by_kind(objs, "Service")}
    assert services["vp-virtplane-controller-metrics"]["spec"]["ports"][0]["port"] == 8080
    assert services["vp-virtplane-agent-metrics"]["spec"]["ports"][0]["port"] == 8081
    for s in services.values():
        assert s["spec"]["selector"]["app.kubernetes.io/component"] in ("controller", "agent")

    notes = rendered["virtplane/templates/NOTES.txt"]
    for hint in ("kubectl get hypervisors", "kubectl label node NODE virtplane.io/hypervisor=true",
                 "kubectl wait --for=condition=Ready", "kubectl apply -f examples/"):
        assert hint in notes, hint


def assert_tenant_roles(objs: list[dict[str, Any]], fullname: str) -> None:
    """The four kinds join the built-in edit (and admin) and view roles; tenants get nothing
    else: no status writes, no Namespaces, no Hypervisors."""
    edit = one(objs, "ClusterRole", "-edit")
    assert edit["metadata"]["name"] == f"{fullname}-edit"
    labels = edit["metadata"]["labels"]
    assert labels["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert labels["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert rules(edit) == TENANT_EDIT
    view = one(objs, "ClusterRole", "-view")
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert rules(view) == TENANT_VIEW
    # Hypervisors (every tenant's domains and pools) are in a role of their own, aggregated to
    # nothing.
    viewer = one(objs, "ClusterRole", "-hypervisor-viewer")
    assert rules(viewer) == expand(["virtplane.io"], ["hypervisors"], ["get", "list", "watch"])
    assert not [k for k in viewer["metadata"]["labels"] if k.startswith("rbac.authorization.k8s.io/aggregate")]
    for role in by_kind(objs, "ClusterRole"):
        aggregated = any(k.startswith("rbac.authorization.k8s.io/aggregate-to")
                         for k in role["metadata"]["labels"])
        if aggregated:
            assert role["metadata"]["name"] in (f"{fullname}-edit", f"{fullname}-view")
            assert not [r for r in rules(role) if r[1] in ("namespaces", "hypervisors") or "/" in r[1]]


def test_tenant_roles_and_hypervisor_access() -> None:
    objs = objects(render())
    assert not [b for b in by_kind(objs, "ClusterRoleBinding") if b["metadata"]["name"].endswith("-hypervisor-viewer")]
    objs = objects(render({"rbac": {"tenantsCanReadHypervisors": True}}, release="vp"))
    assert_tenant_roles(objs, "vp-virtplane")
    binding = one(objs, "ClusterRoleBinding", "-hypervisor-viewer")
    assert binding["roleRef"]["name"] == "vp-virtplane-hypervisor-viewer"
    assert binding["subjects"] == [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group",
                                    "name": "system:authenticated"}]


def test_tenancy_reaches_both_binaries() -> None:
    objs = objects(render({"tenancy": "open"}))
    for kind in ("Deployment", "DaemonSet"):
        assert "--tenancy=open" in container(one(objs, kind))["args"]


# ---------------------------------------------------------------- non-default values
CUSTOM = {
    "image": {"repository": "registry.example.com/virtplane", "digest": "sha256:" + "ab" * 32,
              "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "logFormat": "plain",
    "tenancy": "open",
    "commonLabels": {"team": "virt"},
    "controller": {
        "replicas": 3,
        "leaderElection": {"leaseName": "vp-lease", "leaseSeconds": 20},
        "nodeGraceSeconds": 90,
        "port": 9090,
        "runAsUser": 1234,
        "tolerations": [{"key": "control", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "agent": {
        "libvirtUri": "qemu+unix:///system",
        "heartbeatSeconds": 5,
        "maxDownloads": 5,
        "downloadDenyCidrs": ["169.254.0.0/16", "fe80::/10", "10.0.0.0/8"],
        "serviceCidrs": ["172.30.0.0/16", "fd00:30::/108"],
        "libvirtCallTimeoutSeconds": 30,
        "allowedPaths": ["/srv/iso", "/data/images/"],
        "hostPaths": ["/var/lib/libvirt/images", "/srv/iso", "/data/pool"],
        "capabilities": [],
        "secretNamespaces": ["vms", "lab"],
        "port": 9091,
        # null drops a default key (Helm merges maps).
        "nodeSelector": {"hv": "yes", "virtplane.io/hypervisor": None},
        "tolerations": [{"key": "hypervisor", "operator": "Exists"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
    },
    "metrics": {"serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}}},
}


def test_custom_values_render() -> None:
    objs = objects(render(CUSTOM, release="lab", namespace="virt"))

    deploy = one(objs, "Deployment")
    assert deploy["spec"]["replicas"] == 3
    assert deploy["metadata"]["labels"]["team"] == "virt"
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 1234
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["tolerations"] == CUSTOM["controller"]["tolerations"]
    c = container(deploy)
    assert c["image"] == "registry.example.com/virtplane@sha256:" + "ab" * 32
    assert c["imagePullPolicy"] == "Always"
    assert c["args"] == [
        "controller", "--log-format=plain", "--http-addr=0.0.0.0:9090", "--lease-name=vp-lease",
        "--lease-seconds=20", "--node-grace-seconds=90", "--tenancy=open",
    ]
    assert c["ports"][0]["containerPort"] == 9090

    ds = one(objs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "hv": "yes"}
    assert pod["tolerations"] == CUSTOM["agent"]["tolerations"]
    assert pod["affinity"] == CUSTOM["agent"]["affinity"]
    c = container(ds)
    assert c["args"] == [
        "agent", "--log-format=plain", "--http-addr=0.0.0.0:9091",
        "--libvirt-uri=qemu+unix:///system", "--libvirt-call-timeout=30", "--heartbeat-seconds=5",
        "--max-downloads=5",
        "--tenancy=open",
        "--max-clones=2", "--state-dir=/var/lib/virtplane", "--download-max-bytes=68719476736",
        "--download-min-free-bytes=1073741824", "--download-min-rate-bytes=1024",
        "--download-rate-window-seconds=120", "--download-deadline-seconds=86400",
        "--download-deny-cidr=169.254.0.0/16", "--download-deny-cidr=fe80::/10",
        "--download-deny-cidr=10.0.0.0/8",
        "--service-cidr=172.30.0.0/16", "--service-cidr=fd00:30::/108",
        "--allowed-path=/srv/iso", "--allowed-path=/data/images",
    ]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}, "capabilities: [] adds none"
    # allowedPaths and hostPaths, each mounted once, at the same path as on the host.
    host_dirs = sorted(v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v)
    assert host_dirs == sorted(["/run/libvirt", "/srv/iso", "/data/images",
                                "/var/lib/libvirt/images", "/data/pool", "/var/lib/virtplane"])
    by_name = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    for m in c["volumeMounts"]:
        if m["name"] in by_name:
            assert m["mountPath"] == by_name[m["name"]]

    # Secrets and ConfigMaps: read only in the listed namespaces, nowhere else.
    assert rules(one(objs, "ClusterRole", "-agent")) == AGENT_RULES
    creds = [r for r in by_kind(objs, "Role") if r["metadata"]["name"].endswith("-credentials")]
    assert sorted(r["metadata"]["namespace"] for r in creds) == ["lab", "vms"]
    for r in creds:
        assert rules(r) == CREDENTIALS
    lease_role = one(objs, "Role", "-leader-election")
    assert ("coordination.k8s.io", "leases", "patch", "vp-lease") in rules(lease_role)

    monitors = by_kind(objs, "ServiceMonitor")
    assert len(monitors) == 2
    for m in monitors:
        assert m["apiVersion"] == "monitoring.coreos.com/v1"
        assert m["metadata"]["labels"]["release"] == "prom"
        (endpoint,) = m["spec"]["endpoints"]
        assert endpoint == {"port": "http-metrics", "path": "/metrics", "interval": "15s",
                            "scrapeTimeout": "10s"}
    services = {s["metadata"]["name"]: s for s in by_kind(objs, "Service")}
    assert services["lab-virtplane-agent-metrics"]["spec"]["ports"][0]["port"] == 9091


def test_rbac_create_false_renders_no_rbac() -> None:
    objs = objects(render({"rbac": {"create": False}}))
    assert not [o for o in objs if "Role" in o["kind"]]


# ------------------------------------------------------------------- refused values
@pytest.mark.parametrize(
    "values, where",
    [
        ({"logFormat": "xml"}, "/logFormat"),
        ({"agent": {"maxDownloads": -1}}, "/agent/maxDownloads"),
        ({"agent": {"maxDownloads": 1000}}, "/agent/maxDownloads"),
        ({"controller": {"replicas": "two"}}, "/controller/replicas"),
        ({"controller": {"replicas": 0}}, "/controller/replicas"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"image": {"digest": "latest"}}, "/image/digest"),
        ({"agent": {"heartbeatSeconds": 0}}, "/agent/heartbeatSeconds"),
        ({"agent": {"libvirtCallTimeoutSeconds": 0}}, "/agent/libvirtCallTimeoutSeconds"),
        ({"agent": {"serviceCidrs": ["a service range"]}}, "/agent/serviceCidrs"),
        ({"controller": {"leaderElection": {"leaseSeconds": 1}}}, "/controller/leaderElection/leaseSeconds"),
        ({"controller": {"port": 80}}, "/controller/port"),
        ({"controller": {"runAsUser": 0}}, "/controller/runAsUser"),
        ({"agent": {"hostPaths": ["/"]}}, "/agent/hostPaths/0"),
        ({"agent": {"hostPaths": ["/etc"]}}, "/agent/hostPaths/0"),
        ({"agent": {"hostPaths": ["/var/lib/kubelet"]}}, "/agent/hostPaths/0"),
        ({"agent": {"allowedPaths": ["isos"]}}, "/agent/allowedPaths/0"),
        ({"agent": {"allowedPaths": ["/srv/../etc"]}}, "/agent/allowedPaths/0"),
        ({"agent": {"capabilities": ["SYS_ADMIN"]}}, "/agent/capabilities/0"),
        ({"agent": {"secretNamespaces": ["Not_A_Namespace"]}}, "/agent/secretNamespaces/0"),
        ({"agent": {"libvirtUri": "system"}}, "/agent/libvirtUri"),
        ({"agent": {"downloadDenyCidrs": ["10.0.0.0"]}}, "/agent/downloadDenyCidrs/0"),
        ({"agnet": {"maxDownloads": 2}}, "agnet"),
        ({"metrics": {"serviceMonitor": {"enabled": "yes"}}}, "/metrics/serviceMonitor/enabled"),
        ({"tenancy": "shared"}, "/tenancy"),
        ({"rbac": {"tenantsCanReadHypervisors": "yes"}}, "/rbac/tenantsCanReadHypervisors"),
    ],
)
def test_schema_rejects(values: dict[str, Any], where: str) -> None:
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError) as err:
            chart.validate_schema(values)
        assert where in str(err.value), str(err.value)
        # Rendering (what install does first) refuses them the same way.
        with pytest.raises(helm.HelmValuesError):
            chart.render(values, name="bad", namespace="bad")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"controller": {"nodeGraceSeconds": 10}}, "must exceed agent.heartbeatSeconds"),
        ({"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}},
         "needs metrics.service.enabled"),
        ({"agent": {"serviceAccount": {"create": False, "name": ""}}}, "agent.serviceAccount.name is required"),
        ({"agent": {"allowedPaths": ["/srv/iso"]}}, "agent.allowedPaths applies only with tenancy: open"),
    ],
)
def test_templates_reject_inconsistent_values(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError) as err:
        render(values)
    assert message in str(err.value)
