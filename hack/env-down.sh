#!/usr/bin/env bash
# Stop the virtplane local environment started by hack/env-up.sh.
#
#   hack/env-down.sh [--keep] [--libvirt]
#     --keep     keep the state dir (certs, etcd data, logs, kubeconfig)
#     --libvirt  also stop libvirtd/virtlogd, if env-up.sh started them
#     --control-plane-only  (used by env-up.sh) stop only etcd and the kube-*
#                daemons, keep the state dir
#
# Stops whatever else left a pid file in $STATE/run (e.g. hack/run-local.sh's
# operator), then kube-controller-manager, kube-apiserver and etcd, and waits
# for them to exit. Env: VIRTPLANE_ENV_DIR (default /tmp/virtplane-env).
set -euo pipefail

STATE="${VIRTPLANE_ENV_DIR:-/tmp/virtplane-env}"
RUN="$STATE/run"
KEEP=0
LIBVIRT=0
CP_ONLY=0

log() { printf '[env-down] %s\n' "$*" >&2; }
die() { printf '[env-down] ERROR: %s\n' "$*" >&2; exit 1; }

for arg in "$@"; do
  case $arg in
    --keep) KEEP=1 ;;
    --libvirt) LIBVIRT=1 ;;
    --control-plane-only) CP_ONLY=1 KEEP=1 ;;
    -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
    *) die "unknown argument: $arg (usage: $0 [--keep] [--libvirt])" ;;
  esac
done

if [[ ! -d $STATE ]]; then
  log "no state dir $STATE: nothing to stop"
  exit 0
fi
[[ -f $STATE/.virtplane-env ]] || die "$STATE is not a virtplane env dir (no .virtplane-env marker)"

# stop_pid NAME PID: SIGTERM, wait up to 30s, then SIGKILL.
stop_pid() {
  local name=$1 pid=$2 i
  [[ $pid =~ ^[0-9]+$ && -d /proc/$pid ]] || return 0
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 60; i++)); do
    [[ -d /proc/$pid ]] || return 0
    # A zombie (exited, parent gone/not reaping) counts as stopped.
    [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]] || return 0
    sleep 0.5
  done
  log "$name (pid $pid) did not exit after 30s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 20; i++)); do
    [[ -d /proc/$pid ]] || return 0
    sleep 0.25
  done
}

# Stop a component from its pid file, only if the pid still runs that binary.
stop_component() {
  local name=$1 exe=$2 pidfile="$RUN/$1.pid" pid
  [[ -f $pidfile ]] || return 0
  pid=$(<"$pidfile")
  if [[ $pid =~ ^[0-9]+$ && "$(basename "$(readlink "/proc/$pid/exe" 2>/dev/null)")" == "$exe" ]]; then
    stop_pid "$name" "$pid"
  fi
  rm -f "$pidfile"
}

# started_with_pidfile PID FILE: the process started within 10s of FILE's
# mtime (the pid file is written right after the start: guards against a
# recycled pid).
started_with_pidfile() {
  local pid=$1 file=$2 btime ticks start
  btime=$(awk '/^btime/ {print $2}' /proc/stat)
  # Field 22 of /proc/PID/stat (counted after the "(comm)" field).
  ticks=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $20}') || return 1
  [[ -n $ticks ]] || return 1
  start=$((btime + ticks / $(getconf CLK_TCK)))
  (( start - $(stat -c %Y "$file") <= 10 && $(stat -c %Y "$file") - start <= 10 ))
}

# Other daemons that put pid files in $RUN (e.g. hack/run-local.sh's
# operator) go first: they use the apiserver.
for pidfile in "$RUN"/*.pid; do
  [[ -f $pidfile && $CP_ONLY -eq 0 ]] || continue
  name=$(basename "$pidfile" .pid)
  case $name in etcd | kube-apiserver | kube-controller-manager) continue ;; esac
  pid=$(<"$pidfile")
  if [[ $pid =~ ^[0-9]+$ && -d /proc/$pid ]] && started_with_pidfile "$pid" "$pidfile"; then
    stop_pid "$name" "$pid"
  fi
  rm -f "$pidfile"
done

# The control plane, in reverse start order.
stop_component kube-controller-manager kube-controller-manager
stop_component kube-apiserver kube-apiserver
stop_component etcd etcd

if [[ $LIBVIRT -eq 1 ]]; then
  if [[ -f $STATE/libvirt-started ]]; then
    # libvirtd first: it talks to virtlogd.
    for d in libvirtd virtlogd; do
      grep -qx "$d" "$STATE/libvirt-started" || continue
      for pid in $(pgrep -x "$d" || true); do
        stop_pid "$d" "$pid"
      done
      sed -i "/^$d\$/d" "$STATE/libvirt-started"
    done
  else
    log "libvirtd/virtlogd were not started by env-up.sh: leaving them running"
  fi
fi

if [[ $KEEP -eq 1 ]]; then
  log "stopped; state kept in $STATE"
else
  rm -rf "$STATE"
  log "stopped; removed $STATE"
fi
