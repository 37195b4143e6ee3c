#!/usr/bin/env bash
# Bring up the virtplane local environment:
#   libvirtd (qemu:///system; use <domain type='qemu'>), etcd, kube-apiserver and
#   kube-controller-manager 1.20.2 on 127.0.0.1.
#
# Idempotent: when everything is already up and healthy it only prints the
# environment again. Progress goes to stderr; stdout carries only the
# `export ...` lines of $STATE/env.sh, so `eval "$(hack/env-up.sh)"` works.
#
# Env: VIRTPLANE_ENV_DIR (state dir, default /tmp/virtplane-env),
#      VIRTPLANE_CACHE (default /var/cache/virtplane),
#      VIRTPLANE_SKIP_INSTALL=1 to skip hack/install-deps.sh.
set -euo pipefail

HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE="${VIRTPLANE_ENV_DIR:-/tmp/virtplane-env}"
CACHE_DIR="${VIRTPLANE_CACHE:-/var/cache/virtplane}"
KUBE_VERSION=1.20.2
KUBE_BIN_DIR="$CACHE_DIR/kube-$KUBE_VERSION/bin"
ETCD_BIN=/usr/bin/etcd
APISERVER_BIN="$KUBE_BIN_DIR/kube-apiserver"
KCM_BIN="$KUBE_BIN_DIR/kube-controller-manager"

PKI="$STATE/pki"
LOGS="$STATE/logs"
RUN="$STATE/run"
KUBECONFIG_FILE="$STATE/kubeconfig"
KCM_KUBECONFIG="$STATE/kube-controller-manager.kubeconfig"
ENV_FILE="$STATE/env.sh"
PORTS_FILE="$STATE/ports.env"
SERVICE_CIDR=10.0.0.0/24
SERVICE_IP=10.0.0.1   # first IP of SERVICE_CIDR: the `kubernetes` service
SA_ISSUER=https://kubernetes.default.svc

export LIBVIRT_DEFAULT_URI=qemu:///system
VIRSH=(virsh -q -c qemu:///system)
LIBVIRT_IMAGES=/var/lib/libvirt/images

log() { printf '[env-up] %s\n' "$*" >&2; }
warn() { printf '[env-up] WARNING: %s\n' "$*" >&2; }
die() { printf '[env-up] ERROR: %s\n' "$*" >&2; exit 1; }

# Close every descriptor above stderr in the current (sub)shell, so that a daemon started
# from it holds none of the caller's (the test lock above all).
close_inherited_fds() {
  local fd
  for fd in /proc/$BASHPID/fd/*; do
    fd=${fd##*/}
    ((fd > 2)) && eval "exec $fd>&-"
  done
  return 0
}

[[ $(id -u) -eq 0 ]] || die "must run as root"

if [[ ${VIRTPLANE_SKIP_INSTALL:-0} != 1 ]]; then
  "$HACK_DIR/install-deps.sh" >&2
fi
for b in "$ETCD_BIN" "$APISERVER_BIN" "$KCM_BIN"; do
  [[ -x $b ]] || die "$b missing: run hack/install-deps.sh"
done

mkdir -p "$STATE" "$PKI" "$LOGS" "$RUN"
# Marker that lets env-down.sh know this dir is ours before removing it.
touch "$STATE/.virtplane-env"
# One env-up at a time (fd 9 is closed for every daemon started below).
exec 9>"$STATE/.lock"
flock -w 300 9 || die "another env-up.sh holds $STATE/.lock"

# ------------------------------------------------------------------ helpers
# pid_of NAME: pid from $RUN/NAME.pid if that process is alive and runs BIN.
pid_of() {
  local name=$1 bin=$2 pid
  [[ -f $RUN/$name.pid ]] || return 1
  pid=$(<"$RUN/$name.pid")
  [[ $pid =~ ^[0-9]+$ && -d /proc/$pid ]] || return 1
  [[ "$(readlink -f "/proc/$pid/exe" 2>/dev/null)" == "$(readlink -f "$bin")" ]] || return 1
  printf '%s\n' "$pid"
}

# start_bg NAME CMD...: run CMD detached (own session), log to $LOGS/NAME.log.
start_bg() {
  local name=$1; shift
  printf '\n=== %s: starting %s\n' "$(date -Is)" "$*" >>"$LOGS/$name.log"
  # Without job control a background job is no process-group leader, so
  # setsid(1) calls setsid() itself without forking: $! is the daemon's pid.
  # The daemon gets no inherited descriptor (a caller's lock, e.g. `flock FILE CMD`,
  # would stay held for the daemon's life).
  (close_inherited_fds; exec setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null) &
  printf '%s\n' "$!" >"$RUN/$name.pid"
}

# wait_for DESC TIMEOUT_S LOGNAME CMD...: poll CMD until it succeeds.
wait_for() {
  local desc=$1 timeout=$2 logname=$3; shift 3
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      if [[ -n $logname && -f $LOGS/$logname.log ]]; then
        warn "last lines of $LOGS/$logname.log:"
        tail -n 25 "$LOGS/$logname.log" >&2
      fi
      die "timed out after ${timeout}s waiting for $desc"
    fi
    sleep 0.5
  done
}

# free_ports N [PREFERRED...]: N distinct free loopback TCP ports, reusing the
# preferred ones (position by position) while they are still free.
free_ports() {
  python3 - "$@" <<'EOF'
import socket, sys
n, pref = int(sys.argv[1]), [int(p or 0) for p in sys.argv[2:]]
held, out = [], []
def grab(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    held.append(s)  # keep bound until all are chosen: no duplicates
    return s.getsockname()[1]
for i in range(n):
    p = grab(pref[i]) if i < len(pref) and pref[i] else None
    out.append(p or grab(0))
print(" ".join(map(str, out)))
EOF
}

# ------------------------------------------------------------------ libvirt
# daemon_running NAME: a live process NAME exists (pgrep also lists zombies).
daemon_running() {
  local pid
  for pid in $(pgrep -x "$1"); do
    [[ "$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)" == [^ZX] ]] && return 0
  done
  return 1
}

# Start virtlogd/libvirtd unless running; remember which ones we started.
start_libvirt() {
  local d
  for d in virtlogd libvirtd; do
    if daemon_running "$d"; then
      continue
    fi
    log "starting $d -d (log: /var/log/libvirt/$d.log)"
    # LIBVIRT_LOG_OUTPUTS: log to a file (there is no journald here).
    (close_inherited_fds; LIBVIRT_LOG_OUTPUTS="3:file:/var/log/libvirt/$d.log" exec "$d" -d)
    grep -qx "$d" "$STATE/libvirt-started" 2>/dev/null || echo "$d" >>"$STATE/libvirt-started"
  done
  wait_for "libvirtd (virsh version)" 60 "" "${VIRSH[@]}" version
}

# The qemu driver must offer TCG for x86_64. KVM is only reported: libvirt
# may advertise it (e.g. nested /dev/kvm) while guests never boot under it,
# so domains should use type='qemu'.
check_qemu_driver() {
  "${VIRSH[@]}" domcapabilities --virttype qemu --arch x86_64 >/dev/null 2>&1 ||
    die "qemu:///system offers no 'qemu' (TCG) domain type for x86_64 (see /var/log/libvirt/libvirtd.log)"
  if "${VIRSH[@]}" domcapabilities --virttype kvm --arch x86_64 >/dev/null 2>&1; then
    echo "kvm: advertised by libvirt but not verified to boot guests; use type='qemu'" >"$STATE/kvm.status"
  else
    echo "kvm: not available; use type='qemu'" >"$STATE/kvm.status"
  fi
  log "qemu:///system: TCG (type='qemu') ok; $(<"$STATE/kvm.status")"
}

# Dir pool `default` at /var/lib/libvirt/images, active and autostarted.
ensure_pool() {
  if ! "${VIRSH[@]}" pool-info default >/dev/null 2>&1; then
    log "defining storage pool default ($LIBVIRT_IMAGES)"
    mkdir -p "$LIBVIRT_IMAGES"
    "${VIRSH[@]}" pool-define-as default dir --target "$LIBVIRT_IMAGES" >/dev/null
  fi
  local info
  info=$("${VIRSH[@]}" pool-info default)
  if ! grep -Eq '^State:[[:space:]]+running' <<<"$info"; then
    log "starting storage pool default"
    "${VIRSH[@]}" pool-build default >/dev/null 2>&1 || true  # mkdir if needed
    "${VIRSH[@]}" pool-start default >/dev/null
  fi
  if ! grep -Eq '^Autostart:[[:space:]]+yes' <<<"$info"; then
    "${VIRSH[@]}" pool-autostart default >/dev/null
  fi
}

# Try to activate network `default`; failure is only a warning, recorded in
# $STATE/libvirt-network.status.
ensure_network() {
  local status=$STATE/libvirt-network.status out
  if ! "${VIRSH[@]}" net-info default >/dev/null 2>&1; then
    if ! out=$("${VIRSH[@]}" net-define /usr/share/libvirt/networks/default.xml 2>&1); then
      printf 'inactive: net-define failed: %s\n' "$out" >"$status"
      warn "libvirt network default: $(<"$status")"
      return 0
    fi
  fi
  # (grep on a captured string: `cmd | grep -q` fails under pipefail on SIGPIPE)
  if grep -Eq '^Active:[[:space:]]+yes' <<<"$("${VIRSH[@]}" net-info default)"; then
    echo "active" >"$status"
    return 0
  fi
  log "starting libvirt network default"
  if out=$("${VIRSH[@]}" net-start default 2>&1); then
    "${VIRSH[@]}" net-autostart default >/dev/null 2>&1 || true
    echo "active" >"$status"
  else
    printf 'inactive: net-start failed: %s\n' "$(tr '\n' ' ' <<<"$out")" >"$status"
    warn "libvirt network default: $(<"$status")"
  fi
}

# ---------------------------------------------------------------------- PKI
# new_ca NAME CN: self-signed CA NAME.crt/NAME.key (in $PKI).
new_ca() {
  openssl genrsa -out "$1.key" 2048 2>/dev/null
  openssl req -x509 -new -key "$1.key" -sha256 -days 3650 -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
    -out "$1.crt"
}

# new_cert NAME CN CA EXTENDED_KEY_USAGE [SAN]: NAME.crt/NAME.key signed by CA.
new_cert() {
  local name=$1 cn=$2 ca=$3 eku=$4 san=${5:-}
  openssl genrsa -out "$name.key" 2048 2>/dev/null
  openssl req -new -key "$name.key" -subj "/CN=$cn" -out "$name.csr"
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    echo "subjectKeyIdentifier=hash"
    echo "authorityKeyIdentifier=keyid,issuer"
    [[ -z $san ]] || echo "subjectAltName=$san"
  } >"$name.ext"
  openssl x509 -req -in "$name.csr" -CA "$ca.crt" -CAkey "$ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}

# CA + apiserver serving cert, front-proxy (aggregation/requestheader) CA +
# client cert, service-account key pair and the admin token. Only missing
# pieces are generated (everything when the CA itself is missing).
ensure_pki() {
  (
    cd "$PKI"
    umask 077
    if [[ ! -s ca.crt || ! -s ca.key ]]; then
      log "generating CA, certs, service-account key and admin token in $PKI"
      rm -f ./*.crt ./*.key ./*.pub ./*.srl token tokens.csv
      new_ca ca virtplane-ca
    fi
    [[ -s apiserver.crt ]] || new_cert apiserver kube-apiserver ca serverAuth \
      "IP:127.0.0.1,DNS:localhost,IP:$SERVICE_IP,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    if [[ ! -s front-proxy-ca.crt || ! -s front-proxy-client.crt ]]; then
      new_ca front-proxy-ca virtplane-front-proxy-ca
      new_cert front-proxy-client front-proxy-client front-proxy-ca clientAuth
    fi
    if [[ ! -s sa.key || ! -s sa.pub ]]; then
      openssl genrsa -out sa.key 2048 2>/dev/null
      openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    fi
    if [[ ! -s token || ! -s tokens.csv ]]; then
      openssl rand -hex 32 >token
      # Static token file: token,user,uid,"groups"
      printf '%s,admin,admin,"system:masters"\n' "$(<token)" >tokens.csv
    fi
  )
}

write_kubeconfig() {
  local file=$1 ca
  ca=$(base64 -w0 <"$PKI/ca.crt")
  (umask 077 && cat >"$file.tmp") <<EOF
apiVersion: v1
kind: Config
clusters:
- name: virtplane
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $ca
users:
- name: admin
  user:
    token: $TOKEN
contexts:
- name: virtplane
  context:
    cluster: virtplane
    user: admin
    namespace: default
current-context: virtplane
EOF
  mv -f "$file.tmp" "$file"
}

# ------------------------------------------------------------ health checks
api() { # api PATH: GET against the apiserver as admin
  curl -sf --max-time 5 --cacert "$PKI/ca.crt" -H "Authorization: Bearer $TOKEN" \
    "https://127.0.0.1:$APISERVER_PORT$1"
}
etcd_healthy() {
  local out
  out=$(curl -sf --max-time 5 "http://127.0.0.1:$ETCD_PORT/health") && [[ $out == *'"health":"true"'* ]]
}
apiserver_ready() { [[ "$(api /readyz)" == ok ]]; }
kcm_healthy() { [[ "$(curl -sk --max-time 5 "https://127.0.0.1:$KCM_PORT/healthz")" == ok ]]; }
# The default SA exists and its token secret was created (token controller).
default_sa_ready() {
  local out
  out=$(api /api/v1/namespaces/default/serviceaccounts/default) && [[ $out == *'"secrets"'* ]]
}

all_healthy() {
  [[ -f $PORTS_FILE ]] || return 1
  pid_of etcd "$ETCD_BIN" >/dev/null && etcd_healthy &&
    pid_of kube-apiserver "$APISERVER_BIN" >/dev/null && apiserver_ready &&
    pid_of kube-controller-manager "$KCM_BIN" >/dev/null && kcm_healthy
}

print_env() {
  log "environment is up (state: $STATE, logs: $LOGS)"
  log "  apiserver: https://127.0.0.1:$APISERVER_PORT  etcd: http://127.0.0.1:$ETCD_PORT"
  log "  libvirt network default: $(cat "$STATE/libvirt-network.status" 2>/dev/null || echo unknown)"
  log "  $(cat "$STATE/kvm.status" 2>/dev/null || echo "kvm: unknown")"
  log "  source $ENV_FILE   (or: eval \"\$(hack/env-up.sh)\")"
  cat "$ENV_FILE"
}

# ===================================================================== main
start_libvirt
check_qemu_driver
ensure_pool
ensure_network

ensure_pki
TOKEN=$(<"$PKI/token")
ETCD_PORT="" ETCD_PEER_PORT="" APISERVER_PORT="" KCM_PORT=""
if [[ -f $PORTS_FILE ]]; then
  # shellcheck source=/dev/null
  . "$PORTS_FILE"
fi

if all_healthy && [[ -f $ENV_FILE ]]; then
  log "already up and healthy"
  print_env
  exit 0
fi

# Something is missing or unhealthy: stop what is left (state kept) and start
# all three again on the same data, preferring the previous ports.
if compgen -G "$RUN/*.pid" >/dev/null; then
  log "restarting control plane (stopping leftovers)"
  "$HACK_DIR/env-down.sh" --control-plane-only >&2 9>&-
fi
read -r ETCD_PORT ETCD_PEER_PORT APISERVER_PORT KCM_PORT < <(
  free_ports 4 "$ETCD_PORT" "$ETCD_PEER_PORT" "$APISERVER_PORT" "$KCM_PORT")
cat >"$PORTS_FILE" <<EOF
ETCD_PORT=$ETCD_PORT
ETCD_PEER_PORT=$ETCD_PEER_PORT
APISERVER_PORT=$APISERVER_PORT
KCM_PORT=$KCM_PORT
EOF

# --- etcd
log "starting etcd on 127.0.0.1:$ETCD_PORT (data: $STATE/etcd)"
start_bg etcd "$ETCD_BIN" \
  --name virtplane \
  --data-dir "$STATE/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "virtplane=http://127.0.0.1:$ETCD_PEER_PORT" \
  --logger zap \
  --log-level warn
wait_for "etcd health" 60 etcd etcd_healthy

# --- kube-apiserver
# --endpoint-reconciler-type=none: Endpoints may not hold loopback IPs, so the
# default reconciler would fail for --advertise-address=127.0.0.1 (the
# `kubernetes` service exists, without endpoints). The requestheader/proxy
# flags enable the aggregation layer (and quiet the controller-manager).
log "starting kube-apiserver $KUBE_VERSION on https://127.0.0.1:$APISERVER_PORT"
start_bg kube-apiserver "$APISERVER_BIN" \
  --bind-address=127.0.0.1 \
  --advertise-address=127.0.0.1 \
  --secure-port="$APISERVER_PORT" \
  --insecure-port=0 \
  --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --cert-dir="$STATE/apiserver-certs" \
  --tls-cert-file="$PKI/apiserver.crt" \
  --tls-private-key-file="$PKI/apiserver.key" \
  --client-ca-file="$PKI/ca.crt" \
  --token-auth-file="$PKI/tokens.csv" \
  --authorization-mode=Node,RBAC \
  --service-account-key-file="$PKI/sa.pub" \
  --service-account-signing-key-file="$PKI/sa.key" \
  --service-account-issuer="$SA_ISSUER" \
  --api-audiences="$SA_ISSUER" \
  --service-cluster-ip-range="$SERVICE_CIDR" \
  --allow-privileged=true \
  --enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultStorageClass,DefaultTolerationSeconds,ResourceQuota,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,NodeRestriction \
  --requestheader-client-ca-file="$PKI/front-proxy-ca.crt" \
  --requestheader-allowed-names=front-proxy-client \
  --requestheader-username-headers=X-Remote-User \
  --requestheader-group-headers=X-Remote-Group \
  --requestheader-extra-headers-prefix=X-Remote-Extra- \
  --proxy-client-cert-file="$PKI/front-proxy-client.crt" \
  --proxy-client-key-file="$PKI/front-proxy-client.key" \
  --enable-aggregator-routing=true \
  --endpoint-reconciler-type=none \
  --profiling=false
wait_for "kube-apiserver /readyz" 120 kube-apiserver apiserver_ready

write_kubeconfig "$KUBECONFIG_FILE"
write_kubeconfig "$KCM_KUBECONFIG"

# --- kube-controller-manager
# Disabled: controllers that need a cloud provider, node CIDRs or kubelets.
log "starting kube-controller-manager $KUBE_VERSION (healthz https://127.0.0.1:$KCM_PORT)"
start_bg kube-controller-manager "$KCM_BIN" \
  --kubeconfig="$KCM_KUBECONFIG" \
  --authentication-kubeconfig="$KCM_KUBECONFIG" \
  --authorization-kubeconfig="$KCM_KUBECONFIG" \
  --bind-address=127.0.0.1 \
  --secure-port="$KCM_PORT" \
  --port=0 \
  --cert-dir="$STATE/kcm-certs" \
  --leader-elect=false \
  --use-service-account-credentials=true \
  --service-account-private-key-file="$PKI/sa.key" \
  --root-ca-file="$PKI/ca.crt" \
  --cluster-signing-cert-file="$PKI/ca.crt" \
  --cluster-signing-key-file="$PKI/ca.key" \
  --controllers='*,-cloud-node-lifecycle,-route,-service,-nodeipam,-attachdetach' \
  --profiling=false
wait_for "kube-controller-manager /healthz" 60 kube-controller-manager kcm_healthy
wait_for "namespace default" 60 kube-apiserver api /api/v1/namespaces/default
wait_for "serviceaccount default (with token secret)" 90 kube-controller-manager default_sa_ready

cat >"$ENV_FILE" <<EOF
export KUBECONFIG=$KUBECONFIG_FILE
export LIBVIRT_DEFAULT_URI=qemu:///system
EOF
print_env
