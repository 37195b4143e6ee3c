#!/usr/bin/env bash
# The userspace iSCSI target (Debian's tgt) the block-storage tests use, on loopback only.
#
#   hack/tgt.sh start              start tgtd on 127.0.0.1:3260 unless it runs (idempotent)
#   hack/tgt.sh stop               stop the tgtd this script started (its targets go with it)
#   hack/tgt.sh status             exit 0 when tgtd answers
#   hack/tgt.sh add TID IQN FILE…  target TID named IQN, FILE… as LUN 1, 2, … (plain files,
#                                  sparse is fine), open to every initiator
#   hack/tgt.sh del TID            remove target TID and its LUNs (the files stay)
#
# tgtd needs no kernel module. Its pid file is $STATE/run/tgtd.pid, so hack/env-down.sh
# stops it too. Logs go to $STATE/logs/tgtd.log. Env: VIRTPLANE_ENV_DIR (default
# /tmp/virtplane-env).
set -euo pipefail

STATE="${VIRTPLANE_ENV_DIR:-/tmp/virtplane-env}"
RUN="$STATE/run"
LOGS="$STATE/logs"
PORTAL=127.0.0.1:3260

log() { printf '[tgt] %s\n' "$*" >&2; }
die() { printf '[tgt] ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root"
command -v tgtd >/dev/null || die "tgtd missing: run hack/install-deps.sh"

answers() { tgtadm --lld iscsi --op show --mode sys >/dev/null 2>&1; }

# Serialise starts and stops (two tests may start it at once).
mkdir -p "$RUN" "$LOGS"
exec 8>"$RUN/tgtd.lock"
flock -w 60 8 || die "another hack/tgt.sh holds $RUN/tgtd.lock"

case ${1:-} in
  start)
    if answers; then
      exit 0
    fi
    log "starting tgtd on $PORTAL (log: $LOGS/tgtd.log)"
    # Foreground in its own session, so the pid is the daemon's.
    # No descriptor but stdin/stdout/stderr: an inherited lock (ours, or the test lock a
    # caller's `flock FILE CMD` holds) would stay held for the daemon's life.
    (
      for fd in /proc/$BASHPID/fd/*; do
        fd=${fd##*/}
        ((fd > 2)) && eval "exec $fd>&-"
      done
      exec setsid tgtd -f --iscsi "portal=$PORTAL" >>"$LOGS/tgtd.log" 2>&1 </dev/null
    ) &
    echo "$!" >"$RUN/tgtd.pid"
    for ((i = 0; i < 100; i++)); do
      answers && exit 0
      sleep 0.1
    done
    die "tgtd did not answer within 10s (see $LOGS/tgtd.log)"
    ;;
  stop)
    [[ -f $RUN/tgtd.pid ]] || { log "no $RUN/tgtd.pid: tgtd was not started here"; exit 0; }
    pid=$(<"$RUN/tgtd.pid")
    if [[ $pid =~ ^[0-9]+$ && "$(readlink -f "/proc/$pid/exe" 2>/dev/null)" == "$(readlink -f "$(command -v tgtd)")" ]]; then
      log "stopping tgtd (pid $pid)"
      # tgtd refuses to exit while targets exist unless the shutdown is forced.
      tgtadm --op update --mode sys --name State -v offline >/dev/null 2>&1 || true
      tgtadm --op delete --mode system --force >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
      for ((i = 0; i < 100; i++)); do
        [[ -d /proc/$pid && "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]] || break
        sleep 0.1
      done
      [[ ! -d /proc/$pid || "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" == Z ]] ||
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$RUN/tgtd.pid"
    ;;
  status)
    answers
    ;;
  add)
    [[ $# -ge 4 ]] || die "usage: $0 add TID IQN FILE..."
    tid=$2 iqn=$3
    shift 3
    answers || die "tgtd is not running: $0 start"
    tgtadm --lld iscsi --op new --mode target --tid "$tid" -T "$iqn"
    lun=1
    for f in "$@"; do
      [[ -f $f ]] || { tgtadm --lld iscsi --op delete --force --mode target --tid "$tid"; die "$f is not a file"; }
      tgtadm --lld iscsi --op new --mode logicalunit --tid "$tid" --lun "$lun" -b "$f"
      lun=$((lun + 1))
    done
    tgtadm --lld iscsi --op bind --mode target --tid "$tid" -I ALL
    ;;
  del)
    [[ $# -eq 2 ]] || die "usage: $0 del TID"
    if answers; then
      tgtadm --lld iscsi --op delete --force --mode target --tid "$2" 2>/dev/null || true
    fi
    ;;
  *)
    sed -n '2,13p' "$0" >&2
    exit 2
    ;;
esac
