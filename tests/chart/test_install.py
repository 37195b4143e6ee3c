"""The chart installed for real into the test kube-apiserver (1.20) with the Helm 4 engine, and
the real virtplane binaries run with the chart's ServiceAccount tokens.

Pods cannot run here (no kubelet), so the binaries run as local processes with what the pod would
give them: the ServiceAccount token (from the Secret 1.20's token controller creates), the
container's arguments as rendered in the release, its downward-API environment, and its
securityContext, applied with setpriv: the agent as uid 0 with only the chart's capabilities, the
controller as the chart's non-root uid with none, both with no_new_privs.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import helm_python as helm
import pytest
import yaml

from conftest import (
    CHART,
    PENDING_FLAGS,
    binary_flags,
    condition,
    eventually,
    flag_name,
    kget,
    kubectl,
    unique,
)

# Short heartbeats keep the live run short; the grace stays well above them.
LIVE_VALUES = {"agent": {"heartbeatSeconds": 2}, "logFormat": "json"}


class Release:
    def __init__(self, namespace: str, name: str, kubeconfig: str) -> None:
        self.namespace = namespace
        self.name = name
        self.kubeconfig = kubeconfig
        self.fullname = f"{name}-virtplane"
        self.controller_sa = f"{self.fullname}-controller"
        self.agent_sa = f"{self.fullname}-agent"
        self.manifest: list[dict[str, Any]] = []
        self.tokens: dict[str, str] = {}
        self.sa_kubeconfigs: dict[str, str] = {}

    def config(self) -> helm.Config:
        return helm.Config(kubeconfig_path=self.kubeconfig, namespace=self.namespace)

    def workload(self, kind: str) -> dict[str, Any]:
        (w,) = [o for o in self.manifest if o["kind"] == kind]
        return w


@pytest.fixture(scope="module")
def release(admin_kubeconfig: str, crds_present: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    """The chart installed as a fresh release into a fresh namespace; uninstalled afterwards."""
    ns = unique("vp-chart")
    kubectl("create", "namespace", ns)
    kubectl("label", "namespace", ns, "virtplane.io/test=chart")
    rel = Release(ns, unique("vpc"), admin_kubeconfig)
    try:
        with rel.config() as cfg:
            result = cfg.install(CHART, rel.name, LIVE_VALUES, namespace=ns, timeout=120)
        assert result["status"] == "deployed", result
        assert "kubectl get hypervisors" in result["notes"]
        rel.manifest = [d for d in yaml.safe_load_all(result["manifest"]) if d]
        write_sa_kubeconfigs(rel, tmp_path_factory.mktemp("sa"))
        yield rel
    finally:
        with rel.config() as cfg:
            try:
                cfg.uninstall(rel.name, timeout=60, ignore_not_found=True)
            finally:
                kubectl("delete", "namespace", ns, "--wait=false", check=False)
        for kind in ("clusterrole", "clusterrolebinding"):
            for component in ("controller", "agent"):
                assert kget(kind, f"{rel.fullname}-{component}") is None, f"uninstall left {kind}"
        for role in ("edit", "view", "hypervisor-viewer"):
            assert kget("clusterrole", f"{rel.fullname}-{role}") is None, f"uninstall left {role}"


def sa_token(namespace: str, sa: str) -> str:
    """The token of ServiceAccount `sa`, from the token Secret the 1.20 token controller creates."""
    def token_secret() -> str | None:
        obj = kget("serviceaccount", sa, namespace) or {}
        for ref in obj.get("secrets") or []:
            if ref["name"].startswith(f"{sa}-token-"):
                return str(ref["name"])
        return None

    secret_name = eventually(f"the token Secret of ServiceAccount {sa}", 60, token_secret)
    secret = eventually(
        f"Secret {secret_name} to hold a token",
        30,
        lambda: (kget("secret", secret_name, namespace) or {}).get("data", {}).get("token") and kget("secret", secret_name, namespace),
    )
    return base64.b64decode(secret["data"]["token"]).decode()


def token_kubeconfig(namespace: str, sa: str, token: str, path: Path) -> str:
    """Writes a kubeconfig that authenticates with `token` only; returns its path."""
    admin = json.loads(kubectl("config", "view", "--raw", "--minify", "-o", "json").stdout)
    cluster = admin["clusters"][0]["cluster"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {
            "server": cluster["server"],
            "certificate-authority-data": cluster["certificate-authority-data"],
        }}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": "test", "user": sa, "namespace": namespace}}],
        "current-context": sa,
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return str(path)


def write_sa_kubeconfigs(rel: Release, directory: Path) -> None:
    """A kubeconfig per component with its ServiceAccount's token."""
    for component, sa in (("controller", rel.controller_sa), ("agent", rel.agent_sa)):
        token = sa_token(rel.namespace, sa)
        rel.tokens[component] = token
        rel.sa_kubeconfigs[component] = token_kubeconfig(
            rel.namespace, sa, token, directory / f"{component}.kubeconfig")


def beat(hv: dict[str, Any] | None) -> datetime | None:
    """A Hypervisor's last heartbeat."""
    t = ((hv or {}).get("status") or {}).get("lastHeartbeatTime")
    return datetime.fromisoformat(t) if t else None


# ------------------------------------------------------------------------ objects
def test_release_objects_exist(release: Release) -> None:
    ns, full = release.namespace, release.fullname
    for kind, name, namespace in [
        ("serviceaccount", release.controller_sa, ns),
        ("serviceaccount", release.agent_sa, ns),
        ("clusterrole", f"{full}-controller", None),
        ("clusterrole", f"{full}-agent", None),
        ("clusterrolebinding", f"{full}-controller", None),
        ("clusterrolebinding", f"{full}-agent", None),
        ("role", f"{full}-controller-leader-election", ns),
        ("rolebinding", f"{full}-controller-leader-election", ns),
        ("service", f"{full}-controller-metrics", ns),
        ("service", f"{full}-agent-metrics", ns),
    ]:
        assert kget(kind, name, namespace) is not None, f"{kind}/{name} missing"

    deploy = kget("deployment", f"{full}-controller", ns)
    assert deploy and deploy["spec"]["replicas"] == 2
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert deploy["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    ds = kget("daemonset", f"{full}-agent", ns)
    assert ds and ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] is False
    # The controller-manager made the Deployment's pods: the API server admitted the pod spec
    # (they stay Pending: there is no scheduler or kubelet here).
    pods = eventually(
        "the controller's 2 pods",
        60,
        lambda: (lambda items: items if len(items) == 2 else None)(json.loads(kubectl(
            "get", "pods", "-n", ns, "-l", "app.kubernetes.io/component=controller", "-o", "json",
        ).stdout)["items"]),
    )
    for pod in pods:
        assert pod["spec"]["serviceAccountName"] == release.controller_sa
    # Helm skips crds/ when the CRDs exist and never deletes them.
    assert kget("crd", "hypervisors.virtplane.io") is not None


def test_invalid_values_fail_at_install(release: Release) -> None:
    name = unique("vpbad")
    with release.config() as cfg:
        with pytest.raises(helm.HelmError) as err:
            cfg.install(CHART, name, {"logFormat": "xml", "agent": {"maxDownloads": -1}},
                        namespace=release.namespace, timeout=30)
        assert "/logFormat" in str(err.value) and "/agent/maxDownloads" in str(err.value)
        assert [r for r in cfg.list(all_states=True) if r["name"] == name] == []
    assert kget("clusterrole", f"{name}-virtplane-controller") is None


# ---------------------------------------------------------------------- can-i
def can_i(release: Release, component: str, verb: str, resource: str, *flags: str) -> bool:
    proc = kubectl("auth", "can-i", verb, resource, *flags,
                   kubeconfig=release.sa_kubeconfigs[component], check=False)
    answer = proc.stdout.strip()
    assert answer in ("yes", "no"), f"can-i {verb} {resource} {flags}: {proc.stdout}{proc.stderr}"
    return answer == "yes"


KINDS = ["virtualmachinestorages", "vminterfaces", "vmclones", "isodownloads"]


def check_matrix(release: Release, component: str, allowed: list[tuple], denied: list[tuple]) -> None:
    """Asks the API server (SelfSubjectAccessReview, with the component's own token) about every
    case; reports all the wrong answers at once."""
    cases = [(True, c) for c in allowed] + [(False, c) for c in denied]

    def ask(case: tuple[bool, tuple]) -> str | None:
        expected, (verb, resource, *flags) = case
        flags = [f.replace("RELNS", release.namespace) for f in flags]
        if can_i(release, component, verb, resource, *flags) != expected:
            return f"{'cannot' if expected else 'CAN'} {verb} {resource} {' '.join(flags)}"
        return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        wrong = [w for w in pool.map(ask, cases) if w]
    assert not wrong, f"{component} RBAC: " + "; ".join(wrong)


def test_controller_permissions(release: Release) -> None:
    lease = "virtplane-controller"
    allowed = []
    for k in KINDS:
        r = f"{k}.virtplane.io"
        allowed += [("list", r, "-A"), ("watch", r, "-A"), ("get", r, "-n", "default"),
                    ("patch", r, "-n", "default"), ("patch", r, "--subresource=status", "-n", "default")]
    allowed += [
        ("list", "hypervisors.virtplane.io"), ("watch", "hypervisors.virtplane.io"),
        ("patch", "hypervisors.virtplane.io", "--subresource=status"),
        ("create", "leases.coordination.k8s.io", "-n", "RELNS"),
        ("get", f"leases.coordination.k8s.io/{lease}", "-n", "RELNS"),
        ("update", f"leases.coordination.k8s.io/{lease}", "-n", "RELNS"),
        ("patch", f"leases.coordination.k8s.io/{lease}", "-n", "RELNS"),
        ("create", "events", "-n", "default"), ("create", "events.events.k8s.io", "-n", "default"),
        # Tenancy: the grant annotations of every namespace.
        ("list", "namespaces"), ("watch", "namespaces"), ("get", "namespaces/default"),
        # Node health: the agents' Leases, read only.
        ("list", "leases.coordination.k8s.io", "-n", "kube-node-lease"),
        ("watch", "leases.coordination.k8s.io", "-n", "kube-node-lease"),
    ]
    denied = [
        ("patch", "namespaces/default"), ("update", "namespaces/default"), ("create", "namespaces"),
        ("patch", "leases.coordination.k8s.io", "-n", "kube-node-lease"),
        ("create", "secrets", "-n", "RELNS"), ("get", "secrets", "-n", "RELNS"),
        ("list", "secrets", "-A"), ("get", "configmaps", "-n", "default"),
        ("delete", "hypervisors.virtplane.io"), ("create", "hypervisors.virtplane.io"),
        ("patch", "hypervisors.virtplane.io"),
        ("create", "virtualmachinestorages.virtplane.io", "-n", "default"),
        ("delete", "virtualmachinestorages.virtplane.io", "-n", "default"),
        ("update", "virtualmachinestorages.virtplane.io", "-n", "default"),
        ("patch", "vminterfaces.virtplane.io", "--subresource=finalizers", "-n", "default"),
        ("get", "leases.coordination.k8s.io/someone-elses-lease", "-n", "RELNS"),
        ("update", "leases.coordination.k8s.io/someone-elses-lease", "-n", "RELNS"),
        ("create", "leases.coordination.k8s.io", "-n", "default"),
        ("list", "leases.coordination.k8s.io", "-n", "RELNS"),
        ("delete", "leases.coordination.k8s.io/virtplane-controller", "-n", "RELNS"),
        ("create", "pods", "-n", "RELNS"), ("list", "nodes"),
        ("delete", "events", "-n", "default"),
        ("patch", "customresourcedefinitions.apiextensions.k8s.io"),
    ]
    check_matrix(release, "controller", allowed, denied)


def test_agent_permissions(release: Release) -> None:
    allowed = []
    for k in KINDS:
        r = f"{k}.virtplane.io"
        allowed += [("list", r, "-A"), ("watch", r, "-A"), ("get", r, "-n", "default"),
                    ("patch", r, "-n", "default"),
                    ("patch", r, "--subresource=status", "-n", "default"),
                    ("update", r, "--subresource=finalizers", "-n", "default")]
    allowed += [
        ("create", "hypervisors.virtplane.io"), ("patch", "hypervisors.virtplane.io"),
        ("get", "hypervisors.virtplane.io"), ("list", "hypervisors.virtplane.io"),
        ("watch", "hypervisors.virtplane.io"),
        ("patch", "hypervisors.virtplane.io", "--subresource=status"),
        ("create", "events", "-n", "default"), ("patch", "events.events.k8s.io", "-n", "default"),
        # IsoDownload credentials and CA bundles, by name, in any namespace (default values).
        ("get", "secrets", "-n", "default"), ("get", "configmaps", "-n", "default"),
        # Tenancy: the grant annotations of every namespace.
        ("list", "namespaces"), ("watch", "namespaces"), ("get", "namespaces/default"),
        # The cluster's pod ranges, refused to downloads.
        ("list", "nodes"), ("watch", "nodes"),
        # The heartbeat: its node Lease.
        ("create", "leases.coordination.k8s.io", "-n", "kube-node-lease"),
        ("patch", "leases.coordination.k8s.io/virtplane-node-x", "-n", "kube-node-lease"),
    ]
    denied = [
        ("patch", "namespaces/default"), ("update", "namespaces/default"), ("create", "namespaces"),
        ("delete", "leases.coordination.k8s.io/virtplane-node-x", "-n", "kube-node-lease"),
        ("list", "secrets", "-A"), ("watch", "secrets", "-n", "default"),
        ("list", "configmaps", "-n", "default"), ("create", "secrets", "-n", "default"),
        ("create", "leases.coordination.k8s.io", "-n", "RELNS"),
        ("update", "leases.coordination.k8s.io/virtplane-controller", "-n", "RELNS"),
        ("patch", "leases.coordination.k8s.io/virtplane-controller", "-n", "RELNS"),
        ("delete", "hypervisors.virtplane.io"), ("update", "hypervisors.virtplane.io"),
        ("delete", "virtualmachinestorages.virtplane.io", "-n", "default"),
        ("create", "virtualmachinestorages.virtplane.io", "-n", "default"),
        ("create", "vmclones.virtplane.io", "-n", "default"),
        ("create", "pods", "-n", "default"), ("patch", "nodes"),
        ("patch", "deployments.apps", "-n", "RELNS"),
    ]
    check_matrix(release, "agent", allowed, denied)


def test_tenants_use_the_kinds_through_the_builtin_roles(release: Release, tmp_path: Path) -> None:
    """A ServiceAccount bound (RoleBinding) to the built-in `edit` role in its namespace uses the
    four kinds there, since the chart's roles aggregate into `edit`, but cannot change its
    Namespace's grants or read Hypervisors; one bound to `view` only reads."""
    ns = release.namespace
    kc = {}
    for role in ("edit", "view"):
        sa = f"tenant-{role}"
        kubectl("create", "serviceaccount", sa, "-n", ns)
        kubectl("create", "rolebinding", sa, "-n", ns, f"--clusterrole={role}",
                f"--serviceaccount={ns}:{sa}")
        release.sa_kubeconfigs[sa] = kc[role] = token_kubeconfig(
            ns, sa, sa_token(ns, sa), tmp_path / f"{sa}.kubeconfig")
    # The clusterrole-aggregation controller copies the chart's rules into edit and view.
    eventually("the chart's rules aggregated into the built-in edit role", 60,
               lambda: can_i(release, "tenant-edit", "create", "vmclones.virtplane.io", "-n", ns))
    allowed, denied = [], []
    for k in KINDS:
        r = f"{k}.virtplane.io"
        allowed += [("create", r, "-n", "RELNS"), ("delete", r, "-n", "RELNS"),
                    ("update", r, "-n", "RELNS"), ("list", r, "-n", "RELNS")]
        denied += [("create", r, "-n", "default"), ("list", r, "-A"),
                   ("patch", r, "--subresource=status", "-n", "RELNS")]
    denied += [("patch", f"namespaces/{ns}"), ("update", f"namespaces/{ns}"),
               ("list", "hypervisors.virtplane.io"), ("get", "hypervisors.virtplane.io/any")]
    check_matrix(release, "tenant-edit", allowed, denied)
    eventually("the chart's rules aggregated into the built-in view role", 60,
               lambda: can_i(release, "tenant-view", "list", "isodownloads.virtplane.io", "-n", ns))
    check_matrix(release, "tenant-view",
                 allowed=[("get", f"{k}.virtplane.io", "-n", "RELNS") for k in KINDS],
                 denied=[("create", f"{k}.virtplane.io", "-n", "RELNS") for k in KINDS]
                 + [("list", "hypervisors.virtplane.io")])

    # The same, for real, with the tenant's own token.
    vms = yaml.safe_dump({"apiVersion": "virtplane.io/v1alpha1", "kind": "VirtualMachineStorage",
                          "metadata": {"name": "tenant-made"}, "spec": {"vm": "x", "type": "cdrom"}})
    kubectl("create", "-n", ns, "-f", "-", input=vms, kubeconfig=kc["edit"])
    kubectl("delete", "-n", ns, "virtualmachinestorage.virtplane.io", "tenant-made", "--wait=false",
            kubeconfig=kc["edit"])
    grab = kubectl("annotate", "namespace", ns, "virtplane.io/domains=*", kubeconfig=kc["edit"],
                   check=False)
    assert grab.returncode != 0 and "forbidden" in grab.stderr, grab.stderr
    assert "virtplane.io/domains" not in ((kget("namespace", ns) or {}).get("metadata", {})
                                          .get("annotations") or {})
    peek = kubectl("get", "hypervisors.virtplane.io", kubeconfig=kc["edit"], check=False)
    assert peek.returncode != 0 and "forbidden" in peek.stderr, peek.stderr
    denied_create = kubectl("create", "-n", ns, "-f", "-", input=vms, kubeconfig=kc["view"],
                            check=False)
    assert denied_create.returncode != 0 and "forbidden" in denied_create.stderr


# ------------------------------------------------------------- the real binaries
class Process:
    """A virtplane process with its log in a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL)

    def text(self) -> str:
        return self.log_path.read_text()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def denied(self) -> list[str]:
        """Log lines that report a refused API request."""
        return [line for line in self.text().splitlines() if re.search(r"forbidden|\b403\b", line, re.I)]

    def must_run(self) -> None:
        """Raises (not an AssertionError, which `eventually` retries) as soon as the process died
        or the API server refused it something: waiting longer would not help."""
        if not self.alive():
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {self.text()[-3000:]}")
        if self.denied():
            raise RuntimeError(f"{self.name} was refused by the API server with the chart's RBAC:\n"
                               + "\n".join(self.denied()))

    def http_addr(self) -> str:
        m = re.search(r'addr[=":\s]+"?(127\.0\.0\.1:\d+)', self.text())
        return m.group(1) if m else ""

    def get(self, path: str) -> tuple[int, str]:
        addr = self.http_addr()
        assert addr, f"{self.name} has not logged its address yet"
        try:
            with urllib.request.urlopen(f"http://{addr}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def stop(self) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def pod_command(binary: str, workload: dict[str, Any], http_addr: str) -> tuple[list[str], dict[str, str]]:
    """The container's command line and securityContext as a local command: setpriv applies the
    user and capabilities, the args are the rendered ones with --http-addr on loopback (and
    PENDING_FLAGS the binary does not accept yet left out)."""
    pod = workload["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    command = c["args"][0]
    known = binary_flags(binary, command)
    args = [command]
    for a in c["args"][1:]:
        name = flag_name(a)
        if name == "--http-addr":
            a = f"--http-addr={http_addr}"
        elif name not in known and name in PENDING_FLAGS[command]:
            continue
        args.append(a)
    sc = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
    assert sc.get("privileged") in (None, False) and sc.get("allowPrivilegeEscalation") is False
    caps = sc.get("capabilities", {})
    assert caps.get("drop") == ["ALL"]
    keep = "".join(f",+{cap.lower()}" for cap in caps.get("add", []))
    uid, gid = sc["runAsUser"], sc.get("runAsGroup", sc["runAsUser"])
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
               f"--bounding-set=-all{keep}", "--inh-caps=-all", "--no-new-privs", "--"]
    return setpriv + [binary, *args], {"uid": str(uid)}


def test_binaries_work_with_the_chart_rbac(release: Release, virtplane_bin: str, tmp_path: Path) -> None:
    ns = release.namespace
    node = unique("vp-chart-node")
    identity = unique("vp-chart-ctl")
    domain = unique("vp-chart-vm")
    vms = "chart-cdrom"
    nic = "chart-nic"
    clone_name = f"{domain}-c"
    lease = "virtplane-controller"
    log_dir = Path(os.environ.get("VIRTPLANE_CHART_LOGS") or tmp_path)
    log_dir.mkdir(parents=True, exist_ok=True)
    base_env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "RUST_LOG": "info"}

    xml = tmp_path / "domain.xml"
    xml.write_text(
        f"<domain type='qemu'><name>{domain}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='q35'>hvm</type></os></domain>"
    )
    subprocess.run(["virsh", "-q", "-c", "qemu:///system", "define", str(xml)], check=True,
                   capture_output=True)
    # Tenancy is namespaced (the chart's default): a cluster admin grants the release namespace
    # the domain, its clone and user-mode NICs.
    kubectl("annotate", "namespace", ns, "--overwrite",
            f"virtplane.io/domains={domain},{clone_name}", "virtplane.io/networks=user")

    agent = controller = None
    ctl_dir = None
    started = time.monotonic()
    try:
        # ---- agent: uid 0, the chart's capabilities only, its token and its pod's args/env.
        argv, info = pod_command(virtplane_bin, release.workload("DaemonSet"), "127.0.0.1:0")
        assert info["uid"] == "0"
        agent_kc = release.sa_kubeconfigs["agent"]
        agent = Process("agent", argv, {**base_env, "KUBECONFIG": agent_kc, "NODE_NAME": node}, log_dir)

        hv = eventually(
            f"the agent to create Hypervisor {node} with a heartbeat",
            60,
            lambda: agent.must_run() or (lambda o: o if beat(o) else None)(
                kget("hypervisor.virtplane.io", node)),
        )
        first_beat = beat(hv)
        assert (condition(hv, "Ready") or {}).get("status") == "True", hv["status"]
        eventually(f"Hypervisor {node} to list domain {domain}", 30, lambda: agent.must_run() or any(
            d["name"] == domain
            for d in (kget("hypervisor.virtplane.io", node) or {}).get("status", {}).get("domains", [])))
        eventually("the agent to be ready (watches synced)", 60,
                   lambda: agent.must_run() or agent.get("/readyz")[0] == 200)

        # ---- controller: non-root uid, no capabilities, its token; POD_* as the downward API.
        argv, info = pod_command(virtplane_bin, release.workload("Deployment"), "127.0.0.1:0")
        assert info["uid"] != "0"
        # Readable by the controller's uid only, in a directory it can enter (pytest's is 0700).
        ctl_dir = Path(tempfile.mkdtemp(prefix="vp-chart-"))
        ctl_dir.chmod(0o711)
        ctl_kc = ctl_dir / "controller.kubeconfig"
        ctl_kc.write_text(Path(release.sa_kubeconfigs["controller"]).read_text())
        os.chown(ctl_kc, int(info["uid"]), -1)
        ctl_kc.chmod(0o600)
        controller = Process("controller", argv, {
            **base_env, "KUBECONFIG": str(ctl_kc), "POD_NAMESPACE": ns, "POD_NAME": identity,
        }, log_dir)

        eventually(f"the controller to hold Lease {ns}/{lease}", 60, lambda: controller.must_run() or (
            (kget("lease.coordination.k8s.io", lease, ns) or {}).get("spec", {}).get("holderIdentity") == identity))
        eventually("the controller to be ready", 60,
                   lambda: controller.must_run() or controller.get("/readyz")[0] == 200)

        # ---- bind a CD-ROM drive of the domain to the agent's node.
        kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump({
            "apiVersion": "virtplane.io/v1alpha1",
            "kind": "VirtualMachineStorage",
            "metadata": {"name": vms},
            # spec.nodeName: the shared libvirtd may be seen by other tests' agents too, which
            # would make a binding by domain name ambiguous.
            "spec": {"vm": domain, "nodeName": node, "type": "cdrom"},
        }))

        def bound() -> dict[str, Any] | None:
            o = kget("virtualmachinestorage.virtplane.io", vms, ns)
            sched = condition(o, "Scheduled")
            if (o or {}).get("metadata", {}).get("labels", {}).get("virtplane.io/node") == node \
                    and sched and sched["status"] == "True" and o["status"].get("nodeName") == node:
                return o
            return None

        obj = eventually(f"VirtualMachineStorage {vms} bound to {node}, Scheduled=True", 60,
                         lambda: controller.must_run() or bound())
        assert condition(obj, "Scheduled")["reason"] == "Bound"
        assert re.search(rf'"bound".*{re.escape(vms)}|{re.escape(vms)}.*"bound"|bound.*{re.escape(vms)}',
                         controller.text()), (
            "the VirtualMachineStorage is bound, but not by this controller (another virtplane "
            "controller on this apiserver was faster?): " + controller.text()[-2000:])

        # The agent, with its token, takes it from there: finalizer, device, Ready, an Event.
        ready = eventually(f"the agent to make {vms} Ready", 90, lambda: agent.must_run() or (
            lambda o: o if (condition(o, "Ready") or {}).get("status") == "True" else None)(
            kget("virtualmachinestorage.virtplane.io", vms, ns)))
        assert ready["metadata"].get("finalizers"), "the agent should hold a finalizer"
        live_xml = subprocess.run(["virsh", "-c", "qemu:///system", "dumpxml", "--inactive", domain],
                                  capture_output=True, text=True, check=True).stdout
        assert "device='cdrom'" in live_xml, live_xml
        def agent_events() -> list[dict[str, Any]]:
            items = json.loads(kubectl("get", "events", "-n", ns, "--field-selector",
                                       f"involvedObject.name={vms}", "-o", "json").stdout)["items"]
            return [e for e in items if e.get("reportingInstance") == node]

        events = eventually("an Event from this agent", 30, lambda: agent.must_run() or agent_events())
        assert all(e["involvedObject"]["kind"] == "VirtualMachineStorage" for e in events), events

        # A NIC (the agent lists the VMInterfaces of every namespace to keep MACs unique) and a
        # clone of the domain (status, Events, the source's definition), with the same tokens.
        kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump({
            "apiVersion": "virtplane.io/v1alpha1",
            "kind": "VMInterface",
            "metadata": {"name": nic},
            "spec": {"vm": domain, "nodeName": node, "type": "user"},
        }))
        kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump({
            "apiVersion": "virtplane.io/v1alpha1",
            "kind": "VMClone",
            "metadata": {"name": "chart-clone"},
            "spec": {"source": domain, "nodeName": node, "targetName": clone_name},
        }))
        attached = eventually(f"the agent to make {nic} Ready", 90, lambda: agent.must_run() or (
            lambda o: o if (condition(o, "Ready") or {}).get("status") == "True" else None)(
            kget("vminterface.virtplane.io", nic, ns)))
        mac = attached["status"]["mac"]
        cloned = eventually("the clone to complete", 120, lambda: agent.must_run() or (
            lambda o: o if (o or {}).get("status", {}).get("phase") in ("Completed", "Failed") else None)(
            kget("vmclone.virtplane.io", "chart-clone", ns)))
        assert cloned["status"]["phase"] == "Completed", cloned["status"]
        clone_xml = subprocess.run(["virsh", "-c", "qemu:///system", "dumpxml", "--inactive", clone_name],
                                   capture_output=True, text=True, check=True).stdout
        assert f"<name>{clone_name}</name>" in clone_xml, clone_xml
        assert mac not in clone_xml, "the clone has a MAC of its own"
        kubectl("delete", "vminterface.virtplane.io", nic, "-n", ns, "--wait=false")
        eventually(f"{nic} to be gone", 90, lambda: agent.must_run() or
                   kget("vminterface.virtplane.io", nic, ns) is None)

        # The agent keeps its Hypervisor current.
        eventually(f"a newer heartbeat on Hypervisor {node}", 30,
                   lambda: agent.must_run() or (beat(kget("hypervisor.virtplane.io", node)) or first_beat) > first_beat)

        # Deleting it: the agent detaches the drive and releases its finalizer.
        kubectl("delete", "virtualmachinestorage.virtplane.io", vms, "-n", ns, "--wait=false")
        eventually(f"{vms} to be gone", 90, lambda: agent.must_run() or
                   kget("virtualmachinestorage.virtplane.io", vms, ns) is None)

        # Run for a while, as a pod would, then both must still be up and healthy.
        while time.monotonic() - started < 20:
            time.sleep(1)
        for p in (agent, controller):
            assert p.alive(), f"{p.name} exited: {p.text()[-3000:]}"
            assert p.get("/healthz")[0] == 200 and p.get("/readyz")[0] == 200
            status, metrics = p.get("/metrics")
            assert status == 200 and "virtplane" in metrics
        hv = kget("hypervisor.virtplane.io", node)
        assert (beat(hv) or first_beat) > first_beat
        assert (condition(hv, "Ready") or {}).get("status") == "True"
    finally:
        logs = {}
        for p in (agent, controller):
            if p is not None:
                code = p.stop()
                logs[p.name] = (code, p.text())
        for kind, name in (("virtualmachinestorage.virtplane.io", vms),
                           ("vminterface.virtplane.io", nic),
                           ("vmclone.virtplane.io", "chart-clone")):
            stuck = kget(kind, name, ns)
            if stuck and stuck["metadata"].get("finalizers"):
                kubectl("patch", kind, name, "-n", ns, "--type=merge",
                        "-p", '{"metadata":{"finalizers":null}}', check=False)
        subprocess.run(["virsh", "-q", "-c", "qemu:///system", "undefine", clone_name],
                       capture_output=True)
        kubectl("delete", "hypervisor.virtplane.io", node, "--ignore-not-found", check=False)
        if ctl_dir is not None:
            shutil.rmtree(ctl_dir, ignore_errors=True)
        subprocess.run(["virsh", "-q", "-c", "qemu:///system", "undefine", domain],
                       capture_output=True)

    for name, (code, text) in logs.items():
        assert code == 0, f"{name} did not stop cleanly on SIGTERM (exit {code}): {text[-3000:]}"
        denied = [line for line in text.splitlines() if re.search(r"forbidden|\b403\b", line, re.I)]
        assert not denied, f"{name} was denied something with the chart's RBAC:\n" + "\n".join(denied)
    lease_obj = kget("lease.coordination.k8s.io", lease, ns)
    assert lease_obj is not None and lease_obj["spec"].get("holderIdentity") in (None, ""), (
        "the controller should release its Lease on SIGTERM", lease_obj)


# ------------------------------------------------------------------- 403 for real
def api_request(release: Release, component: str, method: str, path: str, body: Any = None) -> int:
    admin = json.loads(kubectl("config", "view", "--raw", "--minify", "-o", "json").stdout)
    cluster = admin["clusters"][0]["cluster"]
    ctx = ssl.create_default_context(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(cluster["server"] + path, data=data, method=method, headers={
        "Authorization": f"Bearer {release.tokens[component]}",
        "Content-Type": "application/json",
    })
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_forbidden_requests_are_refused_with_403(release: Release) -> None:
    ns = release.namespace
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": unique("stolen")},
              "stringData": {"x": "y"}}
    assert api_request(release, "controller", "POST", f"/api/v1/namespaces/{ns}/secrets", secret) == 403
    assert api_request(release, "controller", "GET", "/api/v1/secrets") == 403
    assert api_request(release, "agent", "GET", "/api/v1/secrets") == 403
    assert api_request(release, "agent", "DELETE", "/apis/virtplane.io/v1alpha1/hypervisors/any-node") == 403
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
             "metadata": {"name": "virtplane-controller"}, "spec": {"holderIdentity": "agent"}}
    assert api_request(release, "agent", "POST",
                       f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases", lease) == 403
    # ...and the same tokens do get through where the chart allows them.
    assert api_request(release, "controller", "GET", "/apis/virtplane.io/v1alpha1/hypervisors") == 200
    assert api_request(release, "agent", "GET", "/apis/virtplane.io/v1alpha1/vminterfaces") == 200


# -------------------------------------------------- upgrade: scoped secret access
def test_upgrade_scopes_the_agents_secret_access(release: Release) -> None:
    ns = release.namespace
    with release.config() as cfg:
        result = cfg.upgrade(CHART, release.name, {**LIVE_VALUES, "agent": {
            **LIVE_VALUES["agent"], "secretNamespaces": [ns]}}, namespace=ns, timeout=120)
    assert result["status"] == "deployed" and result["revision"] == 2
    check_matrix(release, "agent",
                 allowed=[("get", "secrets", "-n", "RELNS"), ("get", "configmaps", "-n", "RELNS")],
                 denied=[("get", "secrets", "-n", "default"), ("get", "configmaps", "-n", "kube-system"),
                         ("list", "secrets", "-n", "RELNS")])
