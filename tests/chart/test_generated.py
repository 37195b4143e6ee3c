"""Generated files and examples: the chart's CRDs are what `virtplane crds` prints, deploy/ is a
fresh render, the flags the chart passes exist in the binary, and every manifest is accepted by a
real kube-apiserver (server-side dry run)."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import yaml

import manifests
from conftest import PENDING_FLAGS, REPO, binary_flags, flag_name, kubectl
from manifests import objects, render

EXAMPLES = REPO / "examples"


def test_chart_crds_are_what_the_binary_prints(virtplane_bin: str) -> None:
    printed = subprocess.run(
        [virtplane_bin, "crds"], capture_output=True, text=True, check=True
    ).stdout
    assert manifests.CHART_CRDS.read_text() == printed, (
        "charts/virtplane/crds/ is stale: run `cargo run -- crds > crds/virtplane.io.yaml` "
        "and hack/render-manifests.sh"
    )
    kinds = {d["spec"]["names"]["kind"] for d in yaml.safe_load_all(printed) if d}
    assert kinds == {"VirtualMachineStorage", "VMInterface", "VMClone", "IsoDownload", "Hypervisor"}


def test_deploy_is_a_fresh_render() -> None:
    diffs = manifests.drift()
    assert not diffs, "deploy/ or the chart CRDs are stale: run hack/render-manifests.sh\n" + "\n".join(diffs)


def test_kustomization_builds_the_same_objects() -> None:
    built = kubectl("kustomize", str(manifests.DEPLOY)).stdout
    plain = manifests.DEPLOY_MANIFEST.read_text()
    key = lambda d: (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"])  # noqa: E731
    want = sorted((d for d in yaml.safe_load_all(plain) if d), key=key)
    got = sorted((d for d in yaml.safe_load_all(built) if d), key=key)
    assert got == want


def test_chart_flags_exist_in_the_binary(virtplane_bin: str) -> None:
    """Every flag the chart passes (with every optional flag turned on) is one the binary
    accepts, except the PENDING_FLAGS, which must still be missing."""
    values = {"tenancy": "open",
              "agent": {"allowedPaths": ["/srv/iso"], "downloadDenyCidrs": ["169.254.0.0/16"],
                        "serviceCidrs": ["172.30.0.0/16"]}}
    objs = objects(render(values))
    for kind, command in (("Deployment", "controller"), ("DaemonSet", "agent")):
        (workload,) = [o for o in objs if o["kind"] == kind]
        (c,) = workload["spec"]["template"]["spec"]["containers"]
        assert c["args"][0] == command
        known = binary_flags(virtplane_bin, command)
        passed = {flag_name(a) for a in c["args"][1:]}
        assert None not in passed, f"{command}: every chart argument is a --flag=value: {c['args']}"
        pending = set(PENDING_FLAGS[command])
        unknown = passed - known - pending
        assert not unknown, f"virtplane {command} has no {sorted(unknown)} (chart args {c['args']})"
        landed = pending & known
        assert not landed, (
            f"virtplane {command} now accepts {sorted(landed)}: remove them from PENDING_FLAGS "
            "in tests/chart/conftest.py"
        )
        assert pending <= passed, f"PENDING_FLAGS lists flags the chart no longer passes: {pending - passed}"
        # Flags the chart sets through the environment instead (downward API).
        env = {e["name"] for e in c.get("env", [])}
        if command == "agent":
            assert "NODE_NAME" in env and "--node-name" in known
        else:
            assert {"POD_NAME", "POD_NAMESPACE"} <= env
            assert {"--identity", "--lease-namespace"} <= known


def example_docs() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for d in yaml.safe_load_all(path.read_text()):
            if d:
                docs.append((path, d))
    return docs


def test_examples_cover_every_kind_and_pass_a_server_dry_run(crds_present: None, namespace: str) -> None:
    docs = example_docs()
    kinds = sorted(d["kind"] for _, d in docs)
    assert kinds == sorted(["IsoDownload", "VMClone", "VMInterface", "VirtualMachineStorage",
                            "VirtualMachineStorage"])
    storage_types = sorted(d["spec"]["type"] for _, d in docs if d["kind"] == "VirtualMachineStorage")
    assert storage_types == ["cdrom", "disk"]
    for path, d in docs:
        assert "namespace" not in d["metadata"], f"{path.name}: leave the namespace to `kubectl -n`"
        assert path.read_text().startswith("#"), f"{path.name}: explain the example in a comment"
    # The CD-ROM example inserts the ISO of the IsoDownload example.
    iso = next(d for _, d in docs if d["kind"] == "IsoDownload")
    cdrom = next(d for _, d in docs if d.get("spec", {}).get("type") == "cdrom")
    assert cdrom["spec"]["source"]["isoDownload"] == iso["metadata"]["name"]
    for path in sorted(EXAMPLES.glob("*.yaml")):
        out = kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path)).stdout
        assert "(server dry run)" in out, out


def test_deploy_manifest_passes_a_server_dry_run(crds_present: None, namespace: str) -> None:
    """deploy/virtplane.yaml, moved into a fresh namespace (its own does not exist here), is
    accepted by the 1.20 apiserver: no field or API version it does not know."""
    docs = [d for d in yaml.safe_load_all(manifests.DEPLOY_MANIFEST.read_text()) if d]
    moved = []
    for d in docs:
        if d["kind"] in ("CustomResourceDefinition", "Namespace"):
            continue
        d = copy.deepcopy(d)
        if "namespace" in d["metadata"]:
            d["metadata"]["namespace"] = namespace
        if d["kind"].endswith("Binding"):
            for s in d["subjects"]:
                s["namespace"] = namespace
        if d["kind"].startswith("Cluster"):
            d["metadata"]["name"] += "-" + namespace  # never collide with a real install
            if d["kind"] == "ClusterRoleBinding":
                d["roleRef"]["name"] += "-" + namespace
        moved.append(d)
    out = kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(moved)).stdout
    assert out.count("(server dry run)") == len(moved), out
