#!/usr/bin/env bash
# Regenerate the chart's CRDs (charts/virtplane/crds/, copied from crds/virtplane.io.yaml, which
# `virtplane crds` generates) and the plain manifests in deploy/ (the chart rendered with its
# default values by the Helm 4 engine). tests/chart fails when these files are stale.
#
#   hack/render-manifests.sh            write the files
#   hack/render-manifests.sh --check    only report drift (exit 1)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export PYTHONDONTWRITEBYTECODE=1  # no __pycache__ in the work tree
PY="${VIRTPLANE_CHART_PYTHON:-${VIRTPLANE_CACHE:-/var/cache/virtplane}/venv-chart/bin/python}"
if [[ ! -x $PY ]]; then
  echo "[render-manifests] ERROR: $PY missing: run hack/install-deps.sh (as root)" >&2
  exit 1
fi
case "${1:-}" in
  --check) exec "$PY" tests/chart/manifests.py --check ;;
  "") exec "$PY" tests/chart/manifests.py --write ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac
