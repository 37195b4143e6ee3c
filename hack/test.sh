#!/usr/bin/env bash
# Runs the whole virtplane test suite, as root on Debian 12, from a clean clone:
# installs what is missing, starts the local environment (libvirtd, etcd,
# kube-apiserver, kube-controller-manager), checks formatting and lints, and
# runs every unit and integration test against the real environment.
#
# An environment that was already up is reused and left up; one this script
# started is torn down at the end (set VIRTPLANE_KEEP_ENV=1 to keep it).
# The operator `hack/run-local.sh` runs is stopped first, and its Hypervisor
# and Lease deleted (`hack/run-local.sh --stop`): its controller would bind the
# tests' objects and its agent, which sees every domain of the one libvirtd,
# would make their domains ambiguous. It stays stopped; start it again with
# `eval "$(hack/run-local.sh)"`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

STATE="${VIRTPLANE_ENV_DIR:-/tmp/virtplane-env}"
log() { printf '[test] %s\n' "$*" >&2; }

hack/install-deps.sh
# The small real guest the hot-plug tests boot (cached after the first build).
hack/build-test-guest.sh >/dev/null

was_up=0
if [[ -f $STATE/env.sh ]] && (. "$STATE/env.sh" && kubectl get --raw /readyz >/dev/null 2>&1); then
  was_up=1
fi
eval "$(VIRTPLANE_SKIP_INSTALL=1 hack/env-up.sh)"
stopped_local=0
on_exit() {
  if [[ $was_up -eq 0 && ${VIRTPLANE_KEEP_ENV:-0} != 1 ]]; then
    # --libvirt stops libvirtd/virtlogd only if env-up.sh started them.
    hack/env-down.sh --libvirt >&2 || true
  fi
  if [[ $stopped_local -eq 1 ]]; then
    log "the local operator of hack/run-local.sh stays stopped; restart it with: eval \"\$(hack/run-local.sh)\""
  fi
}
trap on_exit EXIT

if hack/run-local.sh --status >/dev/null; then
  log "stopping the local operator started by hack/run-local.sh and deleting its Hypervisor and Lease"
  log "(its controller would bind the tests' objects, its agent make their domains ambiguous);"
  log "restart it afterwards with: eval \"\$(hack/run-local.sh)\""
  stopped_local=1
  hack/run-local.sh --stop
fi

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings
# One test at a time: every agent sees every domain of the one libvirtd, so concurrent tests
# would make each other's domains ambiguous.
log "cargo test"
cargo test --locked --no-fail-fast -- --test-threads=1
# The Helm chart and plain manifests, installed into the same apiserver (after the Rust tests:
# its agent sees every domain of the shared libvirtd).
log "hack/test-chart.sh"
hack/test-chart.sh
