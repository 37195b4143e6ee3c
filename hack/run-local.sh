#!/usr/bin/env bash
# Brings up the local environment and runs the virtplane operator against it:
# installs the CRDs, then starts one agent (node name: this host) and the
# controller in the background. Logs and pid files live in the environment's
# state dir; `hack/env-down.sh` stops the whole environment.
#
#   eval "$(hack/run-local.sh)"   start (or restart) it; prints the environment to use
#   hack/run-local.sh --stop      stop it and delete its Hypervisor and controller Lease
#   hack/run-local.sh --status    exit 0 when it runs or left its objects behind (as --stop
#                                 would clean up), 1 otherwise
#
# Both run with --tenancy namespaced (VIRTPLANE_TENANCY=open for today's single-tenant
# behaviour). The examples' namespace (`default`) is granted what examples/ uses, unless it
# already has grants of its own: domains demo-vm* (demo-vm and its clone demo-vm-copy), pool
# default, network default.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

STATE="${VIRTPLANE_ENV_DIR:-/tmp/virtplane-env}"
RUN="$STATE/run"
LOGS="$STATE/logs"
# Written before the operator starts, removed once --stop deleted its objects: NODE=, LEASE=.
MARKER="$RUN/run-local.env"
LEASE_NAMESPACE=default
LEASE_NAME=virtplane-controller
TENANCY="${VIRTPLANE_TENANCY:-namespaced}"
DEMO_NAMESPACE=default
DEMO_GRANTS=("virtplane.io/domains=demo-vm*" "virtplane.io/pools=default" "virtplane.io/networks=default")
NAMES=(virtplane-agent virtplane-controller)
log() { printf '[run-local] %s\n' "$*" >&2; }

# pid_of NAME: the pid in $RUN/NAME.pid if that process is alive and runs a virtplane binary
# (not some later process that reused the pid).
pid_of() {
  local pid exe
  [[ -f $RUN/$1.pid ]] || return 1
  pid=$(<"$RUN/$1.pid")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  exe=${exe% (deleted)}  # rebuilt since it started
  [[ ${exe##*/} == virtplane ]] || return 1
  printf '%s\n' "$pid"
}

# The processes end with SIGTERM (the controller releases its Lease), else SIGKILL after 15 s;
# then the agent's Hypervisor and the controller's Lease are deleted: a stopped agent's
# Hypervisor still counts as a live node for --node-grace-seconds, and nothing else removes it.
stop() {
  local name pid
  for name in "${NAMES[@]}"; do
    if pid=$(pid_of "$name"); then
      log "stopping $name (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 60); do [[ -d /proc/$pid ]] || break; sleep 0.25; done
      if [[ -d /proc/$pid ]]; then
        log "$name (pid $pid) did not stop within 15s: killing it"
        kill -KILL "$pid" 2>/dev/null || true
        for _ in $(seq 1 20); do [[ -d /proc/$pid ]] || break; sleep 0.25; done
      fi
    fi
    rm -f "$RUN/$name.pid"
  done
  [[ -f $MARKER ]] || return 0
  local NODE="" LEASE=""
  # shellcheck source=/dev/null
  . "$MARKER"
  if [[ -f $STATE/env.sh ]]; then
    # shellcheck source=/dev/null
    . "$STATE/env.sh"
  fi
  log "deleting Hypervisor $NODE and Lease $LEASE"
  if kubectl delete hypervisors.virtplane.io "$NODE" --ignore-not-found --timeout=30s >&2 &&
    kubectl delete lease -n "${LEASE%%/*}" "${LEASE#*/}" --ignore-not-found --timeout=30s >&2 &&
    kubectl delete lease -n kube-node-lease "virtplane-node-$NODE" --ignore-not-found --timeout=30s >&2; then
    rm -f "$MARKER"
  else
    log "could not delete them (is the apiserver up? eval \"\$(hack/env-up.sh)\"); run --stop again"
    return 1
  fi
}

case "${1:-}" in
  --stop) stop; exit ;;
  --status)
    for name in "${NAMES[@]}"; do
      if pid=$(pid_of "$name"); then echo "$name running (pid $pid)"; exit 0; fi
    done
    if [[ -f $MARKER ]]; then echo "stopped, its Hypervisor and Lease not yet deleted"; exit 0; fi
    echo "not running"
    exit 1
    ;;
  "") ;;
  *) echo "usage: $0 [--stop|--status]" >&2; exit 2 ;;
esac

eval "$(hack/env-up.sh)"
log "building virtplane"
cargo build --locked --bin virtplane >&2
BIN=$PWD/target/debug/virtplane

log "installing the CRDs"
"$BIN" crds | kubectl apply --server-side --force-conflicts -f - >&2
kubectl wait --for=condition=Established --timeout=60s crd \
  virtualmachinestorages.virtplane.io vminterfaces.virtplane.io vmclones.virtplane.io \
  isodownloads.virtplane.io hypervisors.virtplane.io >&2

# The examples' grants, each only where the namespace has none: an admin's own grants stay.
for grant in "${DEMO_GRANTS[@]}"; do
  key=${grant%%=*}
  if [[ -z $(kubectl get namespace "$DEMO_NAMESPACE" -o jsonpath="{.metadata.annotations.${key//./\\.}}") ]]; then
    kubectl annotate namespace "$DEMO_NAMESPACE" "$grant" >&2
  fi
done
log "namespace $DEMO_NAMESPACE is granted (tenancy $TENANCY):"
kubectl get namespace "$DEMO_NAMESPACE" -o custom-columns='NAME:.metadata.name,DOMAINS:.metadata.annotations.virtplane\.io/domains,POOLS:.metadata.annotations.virtplane\.io/pools,NETWORKS:.metadata.annotations.virtplane\.io/networks' >&2

stop
mkdir -p "$RUN" "$LOGS"
node=$(hostname | tr '[:upper:]' '[:lower:]')
printf 'NODE=%q\nLEASE=%q\n' "$node" "$LEASE_NAMESPACE/$LEASE_NAME" >"$MARKER"
log "starting the agent for node $node (log: $LOGS/virtplane-agent.log)"
setsid "$BIN" agent --node-name "$node" --http-addr 127.0.0.1:8081 --tenancy "$TENANCY" \
  >"$LOGS/virtplane-agent.log" 2>&1 </dev/null &
echo $! >"$RUN/virtplane-agent.pid"
log "starting the controller (log: $LOGS/virtplane-controller.log)"
setsid "$BIN" controller --http-addr 127.0.0.1:8080 --tenancy "$TENANCY" \
  --lease-namespace "$LEASE_NAMESPACE" --lease-name "$LEASE_NAME" \
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
