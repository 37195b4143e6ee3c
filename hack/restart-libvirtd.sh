#!/usr/bin/env bash
# Restart a libvirtd that runs without systemd (as hack/env-up.sh starts it), so that it
# loads storage drivers installed since it started. Running guests keep running: QEMU
# processes outlive libvirtd, which reconnects to them.
#
# Restarting libvirtd disturbs every test that uses it: run this while holding the test
# lock, e.g. `flock /tmp/virtplane-itest.lock hack/restart-libvirtd.sh`.
set -euo pipefail

log() { printf '[restart-libvirtd] %s\n' "$*" >&2; }
die() { printf '[restart-libvirtd] ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root"

for pid in $(pgrep -x libvirtd || true); do
  log "stopping libvirtd (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || continue
  # A zombie (exited; its parent, gone or not reaping, never collects it) has stopped.
  for ((i = 0; ; i++)); do
    [[ -d /proc/$pid && "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]] || break
    ((i < 120)) || die "libvirtd (pid $pid) did not exit after 30s"
    sleep 0.25
  done
done

log "starting libvirtd -d (log: /var/log/libvirt/libvirtd.log)"
# The daemon gets no descriptor but stdin/stdout/stderr: one inherited from a caller (the test
# lock that `flock FILE CMD` holds open for CMD) would stay held for the daemon's life.
(
  for fd in /proc/$BASHPID/fd/*; do
    fd=${fd##*/}
    ((fd > 2)) && eval "exec $fd>&-"
  done
  LIBVIRT_LOG_OUTPUTS="3:file:/var/log/libvirt/libvirtd.log" exec libvirtd -d
)
for ((i = 0; i < 120; i++)); do
  if virsh -q -c qemu:///system version >/dev/null 2>&1; then
    log "libvirtd is up"
    exit 0
  fi
  sleep 0.5
done
die "libvirtd did not answer within 60s (see /var/log/libvirt/libvirtd.log)"
