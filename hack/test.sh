#!/usr/bin/env bash
# Runs the whole virtplane test suite, as root on Debian 12, from a clean clone:
# installs what is missing, starts the local environment (libvirtd, etcd,
# kube-apiserver, kube-controller-manager), checks formatting and lints, and
# runs every unit and integration test against the real environment.
#
# An environment that was already up is reused and left up; one this script
# started is torn down at the end (set VIRTPLANE_KEEP_ENV=1 to keep it).
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
if [[ $was_up -eq 0 && ${VIRTPLANE_KEEP_ENV:-0} != 1 ]]; then
  # --libvirt stops libvirtd/virtlogd only if env-up.sh started them.
  trap 'hack/env-down.sh --libvirt >&2 || true' EXIT
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
