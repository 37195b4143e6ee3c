#!/usr/bin/env bash
# Builds the small real test guest used by virtplane's libvirt tests: a
# direct-kernel-boot pair (Debian cloud kernel + busybox initramfs with the
# virtio modules and qemu-ga) in $VIRTPLANE_CACHE/guest/ (default
# /var/cache/virtplane/guest): vmlinuz, initrd.img, stamp.
#
# The guest's /init loads the virtio modules, brings up lo and every ethN (and
# keeps bringing up hot-plugged NICs), starts qemu-ga on the
# org.qemu.guest_agent.0 virtio port when the domain has that channel, then
# prints VIRTPLANE-GUEST-READY on the serial console (ttyS0) and idles forever.
# Pair it with hack/test-guest.xml.
#
# Idempotent and cached: when vmlinuz, initrd.img and a stamp matching this
# script's contents are present it returns at once. Nothing is installed:
# the .deb files are fetched with `apt-get download` and unpacked with dpkg -x.
# Progress goes to stderr; stdout carries only the guest directory's path.
#
# Env: VIRTPLANE_CACHE (default /var/cache/virtplane),
#      VIRTPLANE_GUEST_REBUILD=1 to rebuild even when the cache is valid.
set -euo pipefail
umask 022

CACHE_DIR="${VIRTPLANE_CACHE:-/var/cache/virtplane}"
GUEST_DIR="$CACHE_DIR/guest"
STAMP="$GUEST_DIR/stamp"
SCRIPT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
# Any change to this file changes the stamp and so rebuilds the cache.
WANT_STAMP="build-test-guest $(sha256sum "$SCRIPT" | cut -d' ' -f1)"

# Loaded in this order; a module the kernel has built in (or lacks) is skipped.
MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
failover net_failover virtio_net virtio_blk scsi_common scsi_mod cdrom sd_mod sr_mod
virtio_scsi virtio_console"

log() { printf '[build-test-guest] %s\n' "$*" >&2; }
die() { printf '[build-test-guest] ERROR: %s\n' "$*" >&2; exit 1; }

cache_ok() {
  [[ -s $GUEST_DIR/vmlinuz && -s $GUEST_DIR/initrd.img && -f $STAMP ]] &&
    [[ $(cat "$STAMP") == "$WANT_STAMP" ]]
}

if [[ ${VIRTPLANE_GUEST_REBUILD:-0} != 1 ]] && cache_ok; then
  printf '%s\n' "$GUEST_DIR"
  exit 0
fi

[[ $(id -u) -eq 0 ]] || die "must run as root (writes $CACHE_DIR)"

# The cache and the guest files must be reachable by libvirt's qemu user.
mkdir -p "$GUEST_DIR"
chmod 0755 "$CACHE_DIR" "$GUEST_DIR"

# One builder at a time; a second one waits and then finds the cache valid.
exec 9>"$CACHE_DIR/guest.lock"
flock 9
if [[ ${VIRTPLANE_GUEST_REBUILD:-0} != 1 ]] && cache_ok; then
  printf '%s\n' "$GUEST_DIR"
  exit 0
fi

for tool in apt-get apt-cache dpkg ldd gzip sha256sum; do
  command -v "$tool" >/dev/null || die "missing $tool"
done

WORK=$(mktemp -d /tmp/virtplane-guest.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
chmod 0755 "$WORK"
DEBS="$WORK/debs"
PKG="$WORK/pkg"
ROOT="$WORK/root"
mkdir -p "$DEBS" "$PKG" "$ROOT"
# apt-get download drops privileges to _apt: let it write there.
if id _apt >/dev/null 2>&1; then chown _apt "$DEBS"; fi

kernel_pkg() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1
}

KPKG=$(kernel_pkg)
if [[ -z $KPKG ]]; then
  log "apt-get update (no package lists)"
  apt-get update -qq >&2
  KPKG=$(kernel_pkg)
fi
[[ -n $KPKG ]] || die "cannot resolve the kernel package behind linux-image-cloud-amd64"
PKGS=("$KPKG" busybox-static qemu-guest-agent)

log "apt-get download ${PKGS[*]}"
if ! (cd "$DEBS" && apt-get download -qq "${PKGS[@]}" >&2); then
  log "download failed: apt-get update and retry"
  apt-get update -qq >&2
  (cd "$DEBS" && apt-get download -qq "${PKGS[@]}" >&2) || die "apt-get download failed"
fi
for deb in "$DEBS"/*.deb; do
  dpkg -x "$deb" "$PKG"
done

# --- kernel ---------------------------------------------------------------
KVER=$(basename "$(ls -d "$PKG"/lib/modules/*/ | head -n1)")
[[ -n $KVER && -f $PKG/boot/vmlinuz-$KVER ]] || die "no kernel found in $KPKG"
log "kernel $KVER"

# --- initramfs tree -------------------------------------------------------
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,lib/modules,dev,proc,sys,run,tmp,etc,var/lib}
ln -s ../run "$ROOT/var/run"
chmod 1777 "$ROOT/tmp"

BUSYBOX="$PKG/bin/busybox"
[[ -x $BUSYBOX ]] || die "busybox-static has no bin/busybox"
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list); do
  [[ $applet == busybox ]] && continue
  [[ -e $ROOT/bin/$applet ]] || ln -s busybox "$ROOT/bin/$applet"
done

# Modules, decompressed (busybox insmod may not read .ko.xz / .ko.zst).
: >"$ROOT/lib/modules/order"
for mod in $MODULES; do
  src=$(find "$PKG/lib/modules/$KVER/kernel" -name "$mod.ko" -o -name "$mod.ko.xz" \
    -o -name "$mod.ko.zst" -o -name "$mod.ko.gz" | head -n1)
  if [[ -z $src ]]; then
    log "module $mod: not a module in $KVER (built in or absent), skipped"
    continue
  fi
  dst="$ROOT/lib/modules/$mod.ko"
  case $src in
    *.xz) xz -dc "$src" >"$dst" ;;
    *.zst) zstd -qdc "$src" >"$dst" ;;
    *.gz) gzip -dc "$src" >"$dst" ;;
    *) cp "$src" "$dst" ;;
  esac
  echo "$mod" >>"$ROOT/lib/modules/order"
done

# qemu-ga with every shared library it links and the ELF loader (the host is
# the same Debian release, so the host's libraries fit).
QGA=""
for p in usr/sbin/qemu-ga usr/bin/qemu-ga; do
  [[ -x $PKG/$p ]] && QGA="$PKG/$p" && break
done
[[ -n $QGA ]] || die "qemu-guest-agent has no qemu-ga binary"
cp "$QGA" "$ROOT/usr/bin/qemu-ga"
if ldd "$QGA" | grep -q 'not found'; then
  ldd "$QGA" >&2
  die "qemu-ga needs libraries missing on this host"
fi
for lib in $(ldd "$QGA" | grep -o '/[^ ]*'); do
  # Keep the path ldd gives (and its target under the same name): the
  # loader path is compiled into the binary, libraries are found by name.
  mkdir -p "$ROOT$(dirname "$lib")"
  cp -L "$lib" "$ROOT$lib"
done
# The loader is /lib64/ld-linux-x86-64.so.2; Debian's libs live in
# /lib/x86_64-linux-gnu, reachable without any ld.so.cache by default paths.
mkdir -p "$ROOT/etc/qemu"

cat >"$ROOT/init" <<'EOF'
#!/bin/busybox sh
# virtplane test guest init (PID 1): never exits.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
export PATH=/bin:/usr/bin:/sbin:/usr/sbin
exec </dev/console >/dev/console 2>&1

while read -r mod; do
  insmod "/lib/modules/$mod.ko" 2>/dev/null || echo "virtplane-guest: insmod $mod failed"
done </lib/modules/order

ifup_all() {
  for n in /sys/class/net/*; do
    [ -e "$n" ] || continue
    flags=$(cat "$n/flags" 2>/dev/null) || continue
    # IFF_UP is bit 0: only touch interfaces that are administratively down.
    [ $((flags & 1)) -eq 0 ] && ip link set "${n##*/}" up 2>/dev/null
  done
}
ip link set lo up
ifup_all
# Hot-plugged NICs come up within a second.
( while :; do sleep 1; ifup_all; done ) &

port=""
for p in /sys/class/virtio-ports/*; do
  [ -f "$p/name" ] || continue
  if [ "$(cat "$p/name")" = org.qemu.guest_agent.0 ]; then port=${p##*/}; break; fi
done
if [ -n "$port" ]; then
  # devtmpfs creates the node asynchronously: give it a moment.
  i=0
  while [ ! -e "/dev/$port" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
  qemu-ga -m virtio-serial -p "/dev/$port" -d -f /run/qemu-ga.pid -t /run \
    || echo "virtplane-guest: qemu-ga failed to start"
  echo "virtplane-guest: qemu-ga on /dev/$port"
else
  echo "virtplane-guest: no org.qemu.guest_agent.0 channel, no agent"
fi

echo VIRTPLANE-GUEST-READY >/dev/ttyS0 2>/dev/null || echo VIRTPLANE-GUEST-READY
while :; do sleep 3600; done
EOF
chmod 0755 "$ROOT/init"

log "packing initramfs"
(cd "$ROOT" && find . | "$BUSYBOX" cpio -o -H newc -R 0:0 2>/dev/null) | gzip -6 >"$WORK/initrd.img"
[[ -s $WORK/initrd.img ]] || die "empty initramfs"

# Install: files first, stamp last, each replaced atomically.
rm -f "$STAMP"
install -m 0644 "$PKG/boot/vmlinuz-$KVER" "$GUEST_DIR/vmlinuz.tmp"
install -m 0644 "$WORK/initrd.img" "$GUEST_DIR/initrd.img.tmp"
mv -f "$GUEST_DIR/vmlinuz.tmp" "$GUEST_DIR/vmlinuz"
mv -f "$GUEST_DIR/initrd.img.tmp" "$GUEST_DIR/initrd.img"
printf '%s\n' "$KVER" >"$GUEST_DIR/kernel-version"
chmod 0644 "$GUEST_DIR/kernel-version"
printf '%s\n' "$WANT_STAMP" >"$STAMP.tmp"
chmod 0644 "$STAMP.tmp"
mv -f "$STAMP.tmp" "$STAMP"
log "guest ready in $GUEST_DIR ($(du -sh "$GUEST_DIR" | cut -f1))"
printf '%s\n' "$GUEST_DIR"
