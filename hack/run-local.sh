#!/usr/bin/env bash
# Brings up the local environment and runs the virtplane operator against it:
# installs the CRDs, then starts one agent (node name: this host) and the
# controller in the background. Logs and pid files live in the environment's
# state dir; `hack/run-local.sh --stop` stops the operator, `hack/env-down.sh`
# the whole environment.
#
# Prints the environment to use (`eval "$(hack/run-local.sh)"`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

STATE="${VIRTPLANE_ENV_DIR:-/tmp/virtplane-env}"
RUN="$STATE/run"
LOGS="$STATE/logs"
log() { printf '[run-local] %s\n' "$*" >&2; }

stop() {
  local name pid
  for name in virtplane-agent virtplane-controller; do
    [[ -f $RUN/$name.pid ]] || continue
    pid=$(<"$RUN/$name.pid")
    if [[ $pid =~ ^[0-9]+$ ]] && kill -TERM "$pid" 2>/dev/null; then
      log "stopping $name (pid $pid)"
      for _ in $(seq 1 60); do [[ -d /proc/$pid ]] || break; sleep 0.25; done
    fi
    rm -f "$RUN/$name.pid"
  done
}

if [[ ${1:-} == --stop ]]; then
  stop
  exit 0
fi

eval "$(hack/env-up.sh)"
log "building virtplane"
cargo build --locked --bin virtplane >&2
BIN=$PWD/target/debug/virtplane

log "installing the CRDs"
"$BIN" crds | kubectl apply --server-side --force-conflicts -f - >&2
kubectl wait --for=condition=Established --timeout=60s crd \
  virtualmachinestorages.virtplane.io vminterfaces.virtplane.io vmclones.virtplane.io \
  isodownloads.virtplane.io hypervisors.virtplane.io >&2

stop
mkdir -p "$RUN" "$LOGS"
node=$(hostname | tr '[:upper:]' '[:lower:]')
log "starting the agent for node $node (log: $LOGS/virtplane-agent.log)"
setsid "$BIN" agent --node-name "$node" --http-addr 127.0.0.1:8081 \
  >"$LOGS/virtplane-agent.log" 2>&1 </dev/null &
echo $! >"$RUN/virtplane-agent.pid"
log "starting the controller (log: $LOGS/virtplane-controller.log)"
setsid "$BIN" controller --http-addr 127.0.0.1:8080 \
  >"$LOGS/virtplane-controller.log" 2>&1 </dev/null &
echo $! >"$RUN/virtplane-controller.pid"

for _ in $(seq 1 120); do
  if kubectl get hypervisor "$node" >/dev/null 2>&1; then
    kubectl get hypervisors >&2
    log "virtplane is running; try: kubectl get hypervisors, kubectl describe hypervisor $node"
    cat "$STATE/env.sh"
    exit 0
  fi
  sleep 0.5
done
log "the agent did not register Hypervisor $node within 60s; see $LOGS/virtplane-agent.log"
exit 1
