#!/usr/bin/env bash
# Install the system dependencies of the virtplane local environment.
#
# Idempotent: when everything is present it only checks and exits quickly.
#  - adds Debian bookworm-backports and bookworm deb-src apt sources
#  - installs libvirt/qemu (from bookworm-backports), etcd, Go and build tools
#  - installs pyftpdlib and pyOpenSSL (PyPI) for the FTP test server
#  - builds kube-apiserver and kube-controller-manager 1.20.2 from Debian's
#    `kubernetes` source package, cached in
#    ${VIRTPLANE_CACHE:-/var/cache/virtplane}/kube-1.20.2/bin/
#
# Progress goes to stderr (one line per step); command output goes to
# $VIRTPLANE_CACHE/logs/install-deps.log.
set -euo pipefail

KUBE_VERSION=1.20.2
CACHE_DIR="${VIRTPLANE_CACHE:-/var/cache/virtplane}"
KUBE_BIN_DIR="$CACHE_DIR/kube-$KUBE_VERSION/bin"
KUBE_BINS=(kube-apiserver kube-controller-manager)
# The scripts and tests drive the apiserver with kubectl; a machine without one gets the
# kubectl of the same source build (linked into /usr/local/bin).
if ! command -v kubectl >/dev/null 2>&1; then
  KUBE_BINS+=(kubectl)
fi
LOG_DIR="$CACHE_DIR/logs"
LOG="$LOG_DIR/install-deps.log"

SOURCES_DIR=/etc/apt/sources.list.d
BACKPORTS_FILE="$SOURCES_DIR/virtplane-bookworm-backports.sources"
DEBSRC_FILE="$SOURCES_DIR/virtplane-bookworm-src.sources"
DEBIAN_URI=http://deb.debian.org/debian

# Installed with -t bookworm-backports (bookworm's qemu 7.2 conflicts with the
# newer qemu-utils from backports).
BPO_PKGS=(libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
  libvirt-dev qemu-system-x86)
# Block and network storage (tests/block_*.rs): libvirt's iscsi-direct and disk pool
# drivers, and QEMU's libiscsi block driver. A storage driver is loaded when libvirtd
# starts, so installing one restarts a running libvirtd (below).
STORAGE_BPO_PKGS=(libvirt-daemon-driver-storage-iscsi-direct libvirt-daemon-driver-storage-disk
  qemu-block-extra qemu-utils)
BPO_PKGS+=("${STORAGE_BPO_PKGS[@]}")
# Installed from bookworm itself.
# (python3: env-up's port picker; dnsmasq-base: libvirt's default network; xorriso, isolinux,
# syslinux-common: the bootable ISO of tests/install_from_iso.rs.)
PKGS=(etcd-server golang-go golang-github-modern-go-reflect2-dev dpkg-dev
  pkg-config openssl curl busybox-static python3 dnsmasq-base
  tgt parted xorriso isolinux syslinux-common)

REFLECT2_SRC=/usr/share/gocode/src/github.com/modern-go/reflect2

export DEBIAN_FRONTEND=noninteractive

log() { printf '[install-deps] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Run a command with its output appended to $LOG; on failure show the tail.
run() {
  printf '\n+ %s\n' "$*" >>"$LOG"
  if ! "$@" >>"$LOG" 2>&1; then
    log "FAILED: $* (last lines of $LOG follow)"
    tail -n 40 "$LOG" >&2
    exit 1
  fi
}

[[ $(id -u) -eq 0 ]] || die "must run as root"
mkdir -p "$LOG_DIR"

# Serialise concurrent runs (e.g. two env-up.sh at once).
exec 9>"$CACHE_DIR/install-deps.lock"
flock 9

# ---------------------------------------------------------------- apt sources
# Use the same keyring as the stock Debian sources.
signed_by=$(sed -n 's/^Signed-By:[[:space:]]*//p' "$SOURCES_DIR/debian.sources" 2>/dev/null | head -n1 || true)
signed_by=${signed_by:-/usr/share/keyrings/debian-archive-keyring.gpg}

need_update=0

# write_source FILE CONTENT: (re)write an apt source file if it differs.
write_source() {
  local file=$1 content=$2
  if [[ ! -f $file ]] || [[ "$(cat "$file")" != "$content" ]]; then
    log "writing apt source $file"
    printf '%s\n' "$content" >"$file"
    need_update=1
  fi
}

write_source "$BACKPORTS_FILE" "# Added by virtplane hack/install-deps.sh
Types: deb
URIs: $DEBIAN_URI
Suites: bookworm-backports
Components: main
Signed-By: $signed_by"

write_source "$DEBSRC_FILE" "# Added by virtplane hack/install-deps.sh
Types: deb-src
URIs: $DEBIAN_URI
Suites: bookworm bookworm-updates
Components: main
Signed-By: $signed_by"

# Lists never downloaded for the new sources also need an update.
lists=/var/lib/apt/lists
compgen -G "$lists/*_dists_bookworm-backports_InRelease" >/dev/null || need_update=1
compgen -G "$lists/*_dists_bookworm_main_source_Sources*" >/dev/null || need_update=1

apt_updated=0
apt_update() {
  if [[ $apt_updated -eq 0 ]]; then
    log "apt-get update"
    run apt-get update
    apt_updated=1
  fi
}
[[ $need_update -eq 0 ]] || apt_update

# ------------------------------------------------------------------- packages
# Print the packages of "$@" that are not fully installed.
missing_pkgs() {
  local p
  for p in "$@"; do
    if [[ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null)" != "ii " ]]; then
      printf '%s\n' "$p"
    fi
  done
}

# Keep postinst scripts from starting services (there is no init system);
# restore whatever policy-rc.d was there before.
POLICY=/usr/sbin/policy-rc.d
policy_backup=""
policy_installed=0
install_policy() {
  if [[ -e $POLICY ]]; then
    policy_backup=$(mktemp)
    cp -p "$POLICY" "$policy_backup"
  fi
  printf '#!/bin/sh\n# virtplane install-deps: do not start services\nexit 101\n' >"$POLICY"
  chmod 755 "$POLICY"
  policy_installed=1
}
restore_policy() {
  [[ $policy_installed -eq 1 ]] || return 0
  if [[ -n $policy_backup ]]; then
    mv -f "$policy_backup" "$POLICY"
  else
    rm -f "$POLICY"
  fi
  policy_installed=0
}

build_dir=""
cleanup() {
  restore_policy
  if [[ -n $build_dir && -d $build_dir ]]; then
    rm -rf "$build_dir"
    rm -f "$KUBE_BIN_DIR"/.kube-*  # half-written binaries
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP  # so that the EXIT trap runs on signals too

mapfile -t miss_bpo < <(missing_pkgs "${BPO_PKGS[@]}")
mapfile -t miss_storage < <(missing_pkgs "${STORAGE_BPO_PKGS[@]}")
mapfile -t miss < <(missing_pkgs "${PKGS[@]}")
if [[ ${#miss_bpo[@]} -gt 0 || ${#miss[@]} -gt 0 ]]; then
  apt_update
  install_policy
  apt_opts=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
  if [[ ${#miss[@]} -gt 0 ]]; then
    log "apt-get install ${miss[*]}"
    run apt-get install "${apt_opts[@]}" "${miss[@]}"
  fi
  if [[ ${#miss_bpo[@]} -gt 0 ]]; then
    log "apt-get install -t bookworm-backports ${miss_bpo[*]}"
    run apt-get install "${apt_opts[@]}" -t bookworm-backports "${miss_bpo[@]}"
  fi
  restore_policy
else
  log "system packages present"
fi

# A libvirtd that runs (hack/env-up.sh starts it without systemd) loaded its storage
# drivers at start: restart it so that the ones just installed are loaded. Whoever runs
# this while tests use libvirtd holds the test lock (see README).
if [[ ${#miss_storage[@]} -gt 0 ]] && pgrep -x libvirtd >/dev/null; then
  log "restarting libvirtd (new storage drivers: ${miss_storage[*]})"
  "$(dirname "${BASH_SOURCE[0]}")/restart-libvirtd.sh" >>"$LOG" 2>&1 ||
    die "libvirtd did not come back (see $LOG and /var/log/libvirt/libvirtd.log)"
fi

# ------------------------------------------------ FTP test server (pyftpdlib)
# tests/download.rs runs hack/ftp-server.py, which needs pyftpdlib and pyOpenSSL.
if python3 -c 'import pyftpdlib, OpenSSL' >/dev/null 2>&1; then
  log "pyftpdlib present"
else
  log "pip install pyftpdlib pyopenssl"
  PIP_BREAK_SYSTEM_PACKAGES=1 run python3 -m pip install --quiet pyftpdlib pyopenssl
fi

# ------------------------------------------------- kube-apiserver / -c-m build
have_kube_bins() {
  local b
  for b in "${KUBE_BINS[@]}"; do
    [[ -x $KUBE_BIN_DIR/$b ]] || return 1
  done
}

build_kube() {
  local start=$SECONDS
  # Trees of builds that were killed (we hold the lock: none is running).
  rm -rf "${TMPDIR:-/tmp}"/virtplane-kube-build.* "$KUBE_BIN_DIR"/.kube-*
  build_dir=$(mktemp -d "${TMPDIR:-/tmp}/virtplane-kube-build.XXXXXX")
  chmod 755 "$build_dir"  # lets apt's _apt user download into it
  local gopath="$build_dir/gopath"
  local src="$gopath/src/k8s.io/kubernetes"

  if ! compgen -G "/var/lib/apt/lists/*_dists_bookworm_main_source_Sources*" >/dev/null; then
    apt_update
  fi
  log "apt-get source kubernetes (into $build_dir)"
  (cd "$build_dir" && run apt-get source -q kubernetes)

  local tree
  tree=$(find "$build_dir" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
  [[ -n $tree ]] || die "apt-get source kubernetes produced no source tree"
  # Debian's version is 1.20.5+really1.20.2: the tree is kubernetes-*1.20.2.
  [[ $tree == *"$KUBE_VERSION" ]] || die "$tree is not kubernetes $KUBE_VERSION"
  mkdir -p "$gopath/src/k8s.io"
  mv "$tree" "$src"

  # Vendored reflect2 1.0.1 makes every PATCH panic with Go >= 1.18.
  log "replacing vendored modern-go/reflect2 with Debian's ($REFLECT2_SRC)"
  [[ -d $REFLECT2_SRC ]] || die "$REFLECT2_SRC missing"
  rm -rf "$src/vendor/github.com/modern-go/reflect2"
  cp -r "$REFLECT2_SRC" "$src/vendor/github.com/modern-go/reflect2"

  # GOPATH mode, build cache inside the build tree (removed afterwards).
  export GOPATH="$gopath" GO111MODULE=off GOFLAGS="" CGO_ENABLED=0
  export GOCACHE="$build_dir/gocache"
  export PATH="$gopath/bin:$PATH"

  log "building openapi-gen and generating pkg/generated/openapi"
  (cd "$src" && run go build -o "$gopath/bin/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen)
  # Input packages as in hack/update-codegen / make-rules: every package with a
  # +k8s:openapi-gen=true tag, plus the fixed ones from hack/lib/codegen.
  local inputs
  inputs=$(cd "$src" && openapi_inputs)
  (cd "$src" && run openapi-gen \
    --input-dirs "$inputs" \
    --output-package k8s.io/kubernetes/pkg/generated/openapi \
    -O zz_generated.openapi \
    --go-header-file hack/boilerplate/boilerplate.generatego.txt \
    --report-filename "$build_dir/openapi-violations.report" \
    --output-base "$gopath/src")
  [[ -s $src/pkg/generated/openapi/zz_generated.openapi.go ]] || die "openapi generation failed"

  # Version stamping as hack/lib/version.sh does (else it reports v0.0.0).
  local major minor pkg kv ldflags="-s -w"
  IFS=. read -r major minor _ <<<"$KUBE_VERSION"
  for pkg in client-go/pkg/version component-base/version; do
    for kv in "gitVersion=v$KUBE_VERSION" "gitMajor=$major" "gitMinor=$minor" \
      gitTreeState=clean "buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"; do
      ldflags+=" -X k8s.io/kubernetes/vendor/k8s.io/$pkg.$kv"
    done
  done

  mkdir -p "$KUBE_BIN_DIR"
  local b tmp
  for b in "${KUBE_BINS[@]}"; do
    log "go build $b (slow: a few minutes)"
    # Build next to the final path, then rename: never a half-written binary.
    tmp=$(mktemp "$KUBE_BIN_DIR/.$b.XXXXXX")
    (cd "$src" && run go build -tags notest -ldflags "$ldflags" -o "$tmp" "./cmd/$b")
    chmod 755 "$tmp"
    mv -f "$tmp" "$KUBE_BIN_DIR/$b"
  done

  log "removing build tree $build_dir"
  chmod -R u+w "$build_dir" 2>/dev/null || true
  rm -rf "$build_dir"
  build_dir=""
  log "kube $KUBE_VERSION binaries built in $((SECONDS - start))s"
}

# Comma-separated openapi-gen input packages (run inside the source tree):
# like Makefile.generated_files, every dir with a Go file carrying a
# +k8s:openapi-gen= tag (staging/src named as vendor/), minus the
# code-generator and sample-apiserver examples.
openapi_inputs() {
  local files
  files=$(mktemp)
  find -H . \( -path './_*' -o -path './.*' -o -path ./vendor -o -path ./debian \) -prune \
    -o -type f -name '*.go' -print0 |
    xargs -0 grep -l -E '^// *\+k8s:openapi-gen=' >"$files" || true
  sed -e 's|/[^/]*$||' -e 's|^\./||' -e 's|^staging/src/|vendor/|' "$files" |
    grep -v -e '^vendor/k8s.io/code-generator/' -e '^vendor/k8s.io/sample-apiserver/' |
    LC_ALL=C sort -u | sed 's|^|k8s.io/kubernetes/|' | paste -sd, -
  rm -f "$files"
}

if have_kube_bins; then
  log "kube $KUBE_VERSION binaries cached in $KUBE_BIN_DIR"
else
  build_kube
fi
if ! command -v kubectl >/dev/null 2>&1; then
  log "kubectl: linking $KUBE_BIN_DIR/kubectl into /usr/local/bin"
  ln -sf "$KUBE_BIN_DIR/kubectl" /usr/local/bin/kubectl
fi

# ------------------------------------------ Python packages of the chart tests
# A venv for tests/chart (hack/test-chart.sh, hack/render-manifests.sh): the Helm 4 engine
# (helm-python-sdk bundles it as a shared library), pytest and PyYAML, at exact versions.
CHART_VENV="$CACHE_DIR/venv-chart"
CHART_PY_PKGS=(helm-python-sdk==0.2.2 pytest==9.2.0 PyYAML==6.0.3 iniconfig==2.3.1
  packaging==26.3 pluggy==1.7.0 Pygments==2.21.0)
chart_venv_ok() {
  [[ -x $CHART_VENV/bin/python ]] &&
    "$CHART_VENV/bin/python" -m pip freeze 2>/dev/null | LC_ALL=C sort >"$LOG_DIR/venv-chart.freeze" &&
    [[ "$(printf '%s\n' "${CHART_PY_PKGS[@]}" | LC_ALL=C sort)" == "$(<"$LOG_DIR/venv-chart.freeze")" ]]
}
if chart_venv_ok; then
  log "chart test Python packages present ($CHART_VENV)"
else
  if [[ -n "$(missing_pkgs python3-venv)" ]]; then
    apt_update
    log "apt-get install python3-venv"
    run apt-get install -y -q python3-venv
  fi
  log "pip install ${CHART_PY_PKGS[*]} (into $CHART_VENV)"
  rm -rf "$CHART_VENV"
  run /usr/bin/python3 -m venv "$CHART_VENV"
  run "$CHART_VENV/bin/python" -m pip install -q --no-input --disable-pip-version-check \
    "${CHART_PY_PKGS[@]}"
  chart_venv_ok || die "the chart test venv $CHART_VENV does not hold exactly ${CHART_PY_PKGS[*]}"
fi

log "done"
