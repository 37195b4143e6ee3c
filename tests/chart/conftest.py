"""Shared fixtures and helpers of the chart tests (run by hack/test-chart.sh).

The tests render the chart with the real Helm 4 engine (helm-python-sdk), install it into the
local kube-apiserver of hack/env-up.sh, and run the real virtplane binaries with the chart's
ServiceAccount tokens. Nothing is skipped: a missing environment, binary or package fails the run.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import manifests  # noqa: E402

REPO = manifests.REPO
CHART = manifests.CHART

# Flags the chart passes that the binary does not have yet, each with what brings it. A flag here
# is left out when the tests run the binary; once the binary accepts it the tests fail until it
# is removed from this list, so the list cannot go stale.
PENDING_FLAGS: dict[str, dict[str, str]] = {"agent": {}, "controller": {}}

T = TypeVar("T")


# ------------------------------------------------------------------ no skips, ever
_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped:
        print(f"\nERROR: skipped tests are failures here: {_skipped}", file=sys.stderr)
        session.exitstatus = 1


# ------------------------------------------------------------------------ helpers
def unique(prefix: str) -> str:
    """A name no other test run uses: the apiserver and libvirtd are shared."""
    return f"{prefix}-{secrets.token_hex(4)}"


def kubectl(
    *args: str,
    kubeconfig: str | None = None,
    check: bool = True,
    input: str | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if kubeconfig:
        env["KUBECONFIG"] = kubeconfig
    proc = subprocess.run(
        ["kubectl", *args],
        capture_output=True,
        text=True,
        input=input,
        env=env,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc


def kget(kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
    """The object as the admin sees it, or None when it does not exist."""
    args = ["get", kind, name, "-o", "json"]
    if namespace:
        args += ["-n", namespace]
    proc = kubectl(*args, check=False)
    if proc.returncode != 0:
        if "NotFound" in proc.stderr:
            return None
        raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr}")
    obj: dict[str, Any] = json.loads(proc.stdout)
    return obj


def eventually(what: str, timeout: float, check: Callable[[], T | None], every: float = 0.5) -> T:
    """Polls `check` until it returns something truthy; fails with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = check()
            if result:
                return result
            last = result
        except AssertionError as err:
            last = err
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last})")
        time.sleep(every)


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c  # type: ignore[no-any-return]
    return None


def binary_flags(binary: str, command: str) -> set[str]:
    """The long flags `virtplane COMMAND --help` lists."""
    out = subprocess.run(
        [binary, command, "--help"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out))


def flag_name(arg: str) -> str | None:
    return arg.split("=", 1)[0] if arg.startswith("--") else None


# ----------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def virtplane_bin() -> str:
    path = os.environ.get("VIRTPLANE_BIN", "")
    if not path or not os.access(path, os.X_OK):
        pytest.fail(
            f"VIRTPLANE_BIN={path!r} is not an executable virtplane binary: run the chart tests "
            "with hack/test-chart.sh, which builds it"
        )
    return path


@pytest.fixture(scope="session")
def admin_kubeconfig() -> str:
    path = os.environ.get("KUBECONFIG", "")
    hint = "start the environment: eval \"$(hack/env-up.sh)\" (hack/test-chart.sh does)"
    if not path or not Path(path).is_file():
        pytest.fail(f"KUBECONFIG={path!r} is not a file: {hint}")
    proc = kubectl("get", "--raw", "/readyz", check=False, timeout=15)
    if proc.returncode != 0 or proc.stdout.strip() != "ok":
        pytest.fail(f"the kube-apiserver of {path} is not ready ({proc.stderr.strip()}): {hint}")
    return path


@pytest.fixture(scope="session")
def crds_present(admin_kubeconfig: str, virtplane_bin: str) -> None:
    """The virtplane CRDs exist. Created from `virtplane crds` only when absent, like Helm does
    with a chart's crds/: other worktrees' tests share this apiserver and may hold newer ones."""
    out = subprocess.run(
        [virtplane_bin, "crds"], capture_output=True, text=True, check=True
    ).stdout
    for crd in yaml.safe_load_all(out):
        if not crd:
            continue
        name = crd["metadata"]["name"]
        if kget("crd", name) is None:
            created = kubectl("create", "-f", "-", input=yaml.safe_dump(crd), check=False)
            if created.returncode != 0 and "AlreadyExists" not in created.stderr:
                raise AssertionError(f"creating CRD {name}: {created.stderr}")
        kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{name}")


@pytest.fixture
def namespace(admin_kubeconfig: str) -> Any:
    """A fresh namespace, deleted afterwards."""
    name = unique("vp-chart")
    kubectl("create", "namespace", name)
    kubectl("label", "namespace", name, "virtplane.io/test=chart")
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)
