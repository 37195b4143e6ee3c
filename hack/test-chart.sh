#!/usr/bin/env bash
# Tests the Helm chart, the plain manifests in deploy/ and the examples, as root on Debian 12:
# installs what is missing (the Python packages of tests/chart go into a venv), brings up the
# local environment (hack/env-up.sh), builds the virtplane binary, and runs tests/chart with
# pytest: lint and render with the Helm 4 engine (helm-python-sdk), schema checks, drift of the
# generated files, a real install into the kube-apiserver, RBAC checks with the ServiceAccount
# tokens, and the real binaries run for ~20 s with those tokens.
#
# Like the integration tests of hack/test.sh, run it alone on an environment: its agent sees
# every domain of the shared libvirtd, and other tests' controllers bind objects cluster-wide.
# For the same reason it stops the operator of hack/run-local.sh (`hack/run-local.sh --stop`).
#
# An environment that was already up is reused and left up; one this script started is torn
# down at the end (VIRTPLANE_KEEP_ENV=1 keeps it). Binary logs: $VIRTPLANE_CHART_LOGS (default
# $STATE/logs/chart). Extra arguments go to pytest (e.g. -k render).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

STATE="${VIRTPLANE_ENV_DIR:-/tmp/virtplane-env}"
CACHE_DIR="${VIRTPLANE_CACHE:-/var/cache/virtplane}"
PY="$CACHE_DIR/venv-chart/bin/python"
export PYTHONDONTWRITEBYTECODE=1  # no __pycache__ in the work tree
log() { printf '[test-chart] %s\n' "$*" >&2; }

hack/install-deps.sh
[[ -x $PY ]] || { log "ERROR: $PY missing after hack/install-deps.sh"; exit 1; }

was_up=0
if [[ -f $STATE/env.sh ]] && (. "$STATE/env.sh" && kubectl get --raw /readyz >/dev/null 2>&1); then
  was_up=1
fi
eval "$(VIRTPLANE_SKIP_INSTALL=1 hack/env-up.sh)"
if [[ $was_up -eq 0 && ${VIRTPLANE_KEEP_ENV:-0} != 1 ]]; then
  trap 'hack/env-down.sh >&2 || true' EXIT
fi
# The operator of hack/run-local.sh would bind the release's objects and see its domains.
if hack/run-local.sh --status >/dev/null; then
  log "stopping the local operator started by hack/run-local.sh and deleting its Hypervisor and Lease;"
  log "restart it afterwards with: eval \"\$(hack/run-local.sh)\""
  hack/run-local.sh --stop
fi

log "cargo build --bin virtplane"
cargo build --locked --bin virtplane
target_dir=$(cargo metadata --locked --format-version 1 --no-deps |
  "$PY" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
export VIRTPLANE_BIN="$target_dir/debug/virtplane"
export VIRTPLANE_CHART_LOGS="${VIRTPLANE_CHART_LOGS:-$STATE/logs/chart}"

log "pytest tests/chart (binary: $VIRTPLANE_BIN; logs: $VIRTPLANE_CHART_LOGS)"
start=$SECONDS
set +e
"$PY" -m pytest tests/chart -v -p no:cacheprovider --durations=8 "$@"
rc=$?
set -e
log "pytest exited $rc after $((SECONDS - start))s"
exit "$rc"
