#!/usr/bin/env bash
# Benchmark: vipd's routing mesh (a published port) against the same path programmed by
# hand the way Docker Swarm does it, HAProxy, and one backend directly; new connections
# per second and keep-alive requests per second, in one run, with wrk.
#
# Setup (a private dockerd, scripts/docker/dockerd-start.sh, whose network namespace is
# "the host" here: vipd, HAProxy and the DNATs live in it):
#   - 3 backend tasks: busybox-image containers on a user bridge network (BACKEND_NET),
#     labelled vipd.service=web and vipd.publish=8080:80, each running Debian's nginx
#     (the host's /usr/sbin/nginx and libraries bind-mounted read-only; one worker,
#     access log off) that serves a 13-byte index.html holding its hostname (= the
#     container id's first 12 characters), so every answer names its backend;
#   - an "outside" namespace, where wrk and curl run, joined to dockerd's namespace by a
#     veth pair on OUTSIDE_NET (dockerd's side is HOST_ADDR, the address every published
#     port is reached on); its routes go through dockerd's namespace.
# Targets, all from the outside namespace:
#   mesh     HOST_ADDR:8080 through the routing mesh of `vipd run --ingress-netns NAME`
#            (NAME unique to the run; --state-dir and --admin-socket in the work
#            directory), run in dockerd's namespace: its nat DNAT there to its ingress
#            namespace, a mangle MARK and an IPVS fwmark service (masq) over the tasks'
#            :80 in it, SNAT to the ingress address.
#   hand     HOST_ADDR:8081 through the same path programmed here with iptables and
#            ipvsadm, as Swarm programs its ingress sandbox: a namespace of its own joined
#            to dockerd's by a veth pair on HAND_NET; in dockerd's namespace a nat chain
#            (PREROUTING and OUTPUT, local destinations) DNATs :8081 to it and filter
#            FORWARD accepts it (Swarm's DOCKER-INGRESS chains); in it mangle PREROUTING
#            MARKs :8081, `ipvsadm -A -f MARK -s rr` with the 3 tasks' :80 (-m), nat
#            POSTROUTING `-m ipvs --ipvs -j SNAT` to its address, ip_forward=1 and
#            net.ipv4.vs.conntrack=1.
#   haproxy  HOST_ADDR:8082: Debian's HAProxy in dockerd's namespace, mode tcp,
#            balance roundrobin over the 3 tasks' :80 (threads: HAProxy's default, one
#            per CPU, unless HAPROXY_NBTHREAD).
#   direct   the first task's address:80, routed through dockerd's namespace (filter
#            FORWARD accepts exactly that).
# Before anything is measured every target must answer, and mesh, hand and haproxy must
# spread CHECK_REQUESTS new connections (curl) over all 3 backends; direct must name the
# first task. Otherwise the run stops with a message (and, for the mesh, what vipd
# programmed and its log).
# Measured: for each round (ROUNDS) and each mode — close (`-H 'Connection: close'`: one
# new connection per request) and keep-alive — each target in turn (the order rotates
# every round, so all see the same background load): wrk -t THREADS -c CONNECTIONS for
# WARMUP seconds (discarded), then DURATION seconds (kept). Prints a table of the medians
# and each round's figures, wrk's socket errors and non-2xx answers, and the whole
# machine's CPU time per connection / request (from /proc/stat around each wrk run:
# client, kernel, proxy and backends together; a figure load on the machine moves less
# than the rates); then the ratios mesh / hand (target >= 0.9) and mesh / haproxy (target
# >= 1.5), of the medians and of each round's pair, and each target / direct.
#
# Kernel settings for the run, restored on exit: in the outside namespace
# ip_local_port_range 1024-65535 and tcp_tw_reuse=1 (so the client never runs out of
# ports at several thousand connections per second); nf_conntrack_max raised to at least
# CONNTRACK_MAX (global, from the initial namespace: dockerd's, the ingress and the
# tasks' namespaces all track connections, 120 s in TIME_WAIT). A conntrack "table full"
# in the kernel log meanwhile is reported.
#
# Needs a kernel with IPVS; on a host without, in the VM (emulated and slow: compare the
# ratios, not the figures; install the packages on the host first, the VM runs its
# binaries):
#   scripts/bench/ensure-mesh-deps.sh
#   CARGO_TARGET_DIR=.cache/target-mesh cargo build --release
#   scripts/vm/run.sh --timeout 3600 --mem 3072 --env VIPD=.cache/target-mesh/release/vipd \
#       -- scripts/bench/mesh.sh
# Environment: VIPD (default target/release/vipd), TARGETS (default "mesh hand haproxy
# direct"; without mesh, vipd is not started), ROUNDS (3), DURATION (s, 10), WARMUP (s,
# 3), THREADS (wrk -t, 1), CONNECTIONS (wrk -c, 32), HAPROXY_NBTHREAD (default: HAProxy's
# own), CHECK_REQUESTS (9), STEP_TIMEOUT (seconds for a setup step, 300), CONNTRACK_MAX
# (262144), VIPD_RUN_ARGS (extra `vipd run` arguments), KEEP_WORK (set: keep the work
# directory under /tmp). With scripts/vm/run.sh --out DIR, vipd's and HAProxy's logs,
# the configurations and wrk's outputs are kept in DIR/mesh/.
# Time in the VM: 3-8 minutes of setup (dockerd, 3 docker runs, checks), then
# ROUNDS x 2 x 4 x (WARMUP + DURATION + 2-5) s; 10-25 minutes in all with the defaults,
# depending on the machine's other load. The IPVS targets vary the most from round to
# round there (2 emulated vCPUs shared by wrk, 3 nginx and the kernel): ROUNDS=5 or more
# for a steadier median.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
VIPD=${VIPD:-target/release/vipd}
read -r -a TARGETS <<<"${TARGETS:-mesh hand haproxy direct}"
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-3}
THREADS=${THREADS:-1}
CONNECTIONS=${CONNECTIONS:-32}
HAPROXY_NBTHREAD=${HAPROXY_NBTHREAD:-}
CHECK_REQUESTS=${CHECK_REQUESTS:-9}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
CONNTRACK_MAX=${CONNTRACK_MAX:-262144}
VIPD_RUN_ARGS=${VIPD_RUN_ARGS:-}
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

readonly IMAGE=vipd-test/busybox:latest TASKS=3
readonly BACKEND_NET=10.215.0.0/24
readonly OUTSIDE_NET=10.216.0.0/24 HOST_ADDR=10.216.0.1 CLIENT_ADDR=10.216.0.2
readonly HAND_NET=10.216.1.0/24 HAND_GW=10.216.1.1 HAND_ADDR=10.216.1.2
readonly MESH_PORT=8080 HAND_PORT=8081 HAPROXY_PORT=8082 TARGET_PORT=80
readonly HAND_MARK=$HAND_PORT
# Our namespaces, and vipd's ingress one, under /run/netns: unique per run.
readonly OUT_NS=vipd-mesh-out-$$ HAND_NS=vipd-mesh-hand-$$ INGRESS_NS=vipd-mesh-ingress-$$
readonly OUT_PATH=/run/netns/$OUT_NS HAND_PATH=/run/netns/$HAND_NS INGRESS_PATH=/run/netns/$INGRESS_NS
# Our chains in dockerd's namespace.
readonly NAT_CHAIN=VIPD-BENCH-HAND FILTER_CHAIN=VIPD-BENCH

T0=$EPOCHREALTIME
log() { printf '[%6.1f s] %s\n' "$(awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN {print b - a}')" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
has_target() { [[ " ${TARGETS[*]} " == *" $1 "* ]]; }

[[ $EUID -eq 0 ]] || die "must run as root"
for t in "${TARGETS[@]}"; do
  [[ " mesh hand haproxy direct " == *" $t "* ]] || die "unknown target $t in TARGETS (mesh hand haproxy direct)"
done
((${#TARGETS[@]})) || die "TARGETS is empty"
for v in ROUNDS DURATION THREADS CONNECTIONS CHECK_REQUESTS STEP_TIMEOUT; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, not '${!v}'"
done
[[ "$WARMUP" =~ ^[0-9]+$ ]] || die "WARMUP must be a number of seconds"
if has_target mesh || has_target hand; then
  [[ -e /proc/net/ip_vs ]] || die "this kernel has no IPVS: run it in scripts/vm/run.sh (see the header)"
fi
if has_target mesh; then
  [[ -x "$VIPD" ]] || die "$VIPD not found: build first (cargo build --release) or set VIPD"
  VIPD=$(cd "$(dirname "$VIPD")" && pwd)/$(basename "$VIPD")
  "$VIPD" run --help 2>/dev/null | grep -q -- --ingress-netns ||
    die "$VIPD has no routing mesh (vipd run --ingress-netns): build a newer one, or leave mesh out of TARGETS"
fi
scripts/bench/ensure-mesh-deps.sh || die "missing packages: run scripts/bench/ensure-mesh-deps.sh (on the host, as root)"
scripts/docker/ensure-docker.sh
# shellcheck source=scripts/docker/lib.sh
. scripts/docker/lib.sh
docker=$(docker_cli)
NGINX=$(command -v nginx)
[[ -x /usr/lib64/ld-linux-x86-64.so.2 || -e /lib64/ld-linux-x86-64.so.2 ]] ||
  die "no /lib64/ld-linux-x86-64.so.2: the nginx bind mounts assume Debian amd64 (merged /usr)"

work=$(mktemp -d /tmp/vipd-mesh-bench.XXXXXX)
keep=${VIPD_VM_OUT:+$VIPD_VM_OUT/mesh}
dockerd_dir=$work/d
vipd_pid='' haproxy_pid='' docker_started=0 conntrack_max_before=''
cleanup() {
  local rc=$?
  set +e
  for pid in $vipd_pid $haproxy_pid; do
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  done
  if [[ -n "$keep" ]]; then
    mkdir -p "$keep" && cp -r "$work"/*.log "$work"/wrk "$work"/haproxy.cfg "$work"/nginx.conf "$keep"/ 2>/dev/null
  fi
  for ns in "$OUT_NS" "$HAND_NS" "$INGRESS_NS"; do
    [[ -e /run/netns/$ns ]] && ip netns del "$ns"
  done
  # Our chains live in dockerd's namespace, which goes with it.
  ((docker_started)) && "$repo/scripts/docker/dockerd-stop.sh" --purge "$dockerd_dir" >/dev/null 2>&1
  [[ -n "$conntrack_max_before" ]] && echo "$conntrack_max_before" >/proc/sys/net/netfilter/nf_conntrack_max
  [[ -n "${KEEP_WORK:-}" ]] || rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

d() { timeout "$STEP_TIMEOUT" "$docker" "$@"; }
# Run in dockerd's / the outside / the hand namespace (nsenter, not `ip netns exec`,
# which would also make a mount namespace and hide the sandboxes' netns mounts).
in_d() { nsenter --net="$VIPD_DOCKER_NETNS" -- "$@"; }
in_out() { nsenter --net="$OUT_PATH" -- "$@"; }
in_hand() { nsenter --net="$HAND_PATH" -- "$@"; }
# One request, a new connection, from the outside namespace: prints the body (the
# backend's name).
get() { in_out curl -s --max-time 5 "http://$1/" 2>/dev/null; }
# Until `get $1` answers, at most $2 seconds.
wait_answer() {
  local start=$SECONDS
  until get "$1" >/dev/null; do
    ((SECONDS - start < $2)) || return 1
    sleep 0.5
  done
}
# IPVS destinations (any service) in network namespace $1 (a path).
dests() { nsenter --net="$1" awk '/ -> [0-9A-F]+:/ {n++} END {print n + 0}' /proc/net/ip_vs; }

# --- dockerd, backends ----------------------------------------------------------------------
docker_started=1
eval "$(scripts/docker/dockerd-start.sh "$dockerd_dir")"
export DOCKER_HOST
docker_dir_layout "$dockerd_dir" # DOCKER_NETNS_NAME
scripts/docker/busybox-image.sh "$IMAGE"

# dockerd loaded nf_conntrack (its nat rules): now the limit can be raised.
if [[ -w /proc/sys/net/netfilter/nf_conntrack_max ]]; then
  cur=$(</proc/sys/net/netfilter/nf_conntrack_max)
  if ((cur < CONNTRACK_MAX)); then
    conntrack_max_before=$cur
    echo "$CONNTRACK_MAX" >/proc/sys/net/netfilter/nf_conntrack_max
  fi
fi
full_before=$(dmesg 2>/dev/null | grep -c 'table full' || true)

cp "$repo/scripts/bench/nginx-task.conf" "$work/nginx.conf"
d network create --subnet "$BACKEND_NET" vipd-mesh >/dev/null
BRIDGE=br-$(d network inspect -f '{{.Id}}' vipd-mesh | cut -c1-12)
in_d ip link show "$BRIDGE" >/dev/null 2>&1 || die "no bridge $BRIDGE in dockerd's namespace"

log "starting $TASKS nginx tasks"
# Debian's nginx in the busybox image: the binary, its libraries and the ELF interpreter
# (/lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/...) from the host, read-only.
pids=()
for ((i = 1; i <= TASKS; i++)); do
  d run -d --name "vipd-mesh-web$i" --network vipd-mesh \
    --label vipd.service=web --label "vipd.publish=$MESH_PORT:$TARGET_PORT" \
    -v /usr/lib:/usr/lib:ro -v /usr/lib:/lib:ro -v /usr/lib64:/lib64:ro \
    -v "$NGINX:/opt/nginx:ro" -v "$work/nginx.conf:/etc/nginx.conf:ro" \
    "$IMAGE" sh -c 'hostname >/www/index.html && exec /opt/nginx -e stderr -c /etc/nginx.conf' \
    >/dev/null &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || die "docker run of an nginx task failed"; done
TASK_IPS=() TASK_NAMES=()
for ((i = 1; i <= TASKS; i++)); do
  read -r name ip < <(d inspect -f '{{.Config.Hostname}} {{(index .NetworkSettings.Networks "vipd-mesh").IPAddress}}' "vipd-mesh-web$i")
  [[ -n "$ip" ]] || die "task vipd-mesh-web$i has no address on vipd-mesh"
  TASK_IPS+=("$ip") TASK_NAMES+=("$name")
  start=$SECONDS
  until [[ "$(in_d curl -s --max-time 5 "http://$ip/" 2>/dev/null)" == "$name" ]]; do
    if ((SECONDS - start >= 60)); then
      d logs "vipd-mesh-web$i" 2>&1 | tail -n 20 >&2
      die "nginx in vipd-mesh-web$i ($ip) does not answer its name"
    fi
    sleep 0.5
  done
done
log "tasks ${TASK_NAMES[*]} at ${TASK_IPS[*]} answer"

# --- the outside namespace --------------------------------------------------------------------
ip netns add "$OUT_NS"
ip -n "$DOCKER_NETNS_NAME" link add mesh-out type veth peer name eth0 netns "$OUT_NS"
ip -n "$DOCKER_NETNS_NAME" addr add "$HOST_ADDR/${OUTSIDE_NET#*/}" dev mesh-out
ip -n "$DOCKER_NETNS_NAME" link set mesh-out up
ip -n "$OUT_NS" addr add "$CLIENT_ADDR/${OUTSIDE_NET#*/}" dev eth0
ip -n "$OUT_NS" link set lo up
ip -n "$OUT_NS" link set eth0 up
ip -n "$OUT_NS" route add default via "$HOST_ADDR"
in_out sysctl -q -w net.ipv4.ip_local_port_range="1024 65535" net.ipv4.tcp_tw_reuse=1

# Filter FORWARD in dockerd's namespace (policy DROP, Docker's): what our targets need,
# and nothing the mesh could lean on. Our chains are appended (here and in nat), so the
# mesh's packets never pass our rules before vipd's.
in_d iptables -N "$FILTER_CHAIN"
in_d iptables -A FORWARD -j "$FILTER_CHAIN"
in_d iptables -A "$FILTER_CHAIN" -i mesh-out -o "$BRIDGE" -d "${TASK_IPS[0]}" -p tcp --dport "$TARGET_PORT" -j ACCEPT

# --- hand: Swarm's ingress path, by hand --------------------------------------------------------
if has_target hand; then
  ip netns add "$HAND_NS"
  ip -n "$DOCKER_NETNS_NAME" link add mesh-hand type veth peer name eth0 netns "$HAND_NS"
  ip -n "$DOCKER_NETNS_NAME" addr add "$HAND_GW/${HAND_NET#*/}" dev mesh-hand
  ip -n "$DOCKER_NETNS_NAME" link set mesh-hand up
  ip -n "$HAND_NS" addr add "$HAND_ADDR/${HAND_NET#*/}" dev eth0
  ip -n "$HAND_NS" link set lo up
  ip -n "$HAND_NS" link set eth0 up
  ip -n "$HAND_NS" route add default via "$HAND_GW"
  # dockerd's namespace: DNAT the published port (as Swarm's nat DOCKER-INGRESS) and let
  # it through (as Swarm's filter DOCKER-INGRESS), and the ingress to the tasks.
  in_d iptables -t nat -N "$NAT_CHAIN"
  in_d iptables -t nat -A "$NAT_CHAIN" -p tcp --dport "$HAND_PORT" -j DNAT --to-destination "$HAND_ADDR:$HAND_PORT"
  in_d iptables -t nat -A PREROUTING -m addrtype --dst-type LOCAL -j "$NAT_CHAIN"
  in_d iptables -t nat -A OUTPUT -m addrtype --dst-type LOCAL -j "$NAT_CHAIN"
  in_d iptables -A "$FILTER_CHAIN" -o mesh-hand -p tcp --dport "$HAND_PORT" -j ACCEPT
  in_d iptables -A "$FILTER_CHAIN" -i mesh-hand -p tcp --sport "$HAND_PORT" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
  in_d iptables -A "$FILTER_CHAIN" -i mesh-hand -o "$BRIDGE" -p tcp --dport "$TARGET_PORT" -j ACCEPT
  # The ingress namespace: as Swarm's ingress_sbox.
  in_hand sysctl -q -w net.ipv4.ip_forward=1 net.ipv4.vs.conntrack=1
  in_hand iptables -t mangle -A PREROUTING -p tcp --dport "$HAND_PORT" -j MARK --set-mark "$HAND_MARK"
  in_hand iptables -t nat -A POSTROUTING -d "$BACKEND_NET" -m ipvs --ipvs -j SNAT --to-source "$HAND_ADDR"
  in_hand ipvsadm -A -f "$HAND_MARK" -s rr
  for ip in "${TASK_IPS[@]}"; do
    in_hand ipvsadm -a -f "$HAND_MARK" -r "$ip:$TARGET_PORT" -m -w 1
  done
  log "hand: $HOST_ADDR:$HAND_PORT -> $HAND_ADDR:$HAND_PORT, fwmark $HAND_MARK over ${TASK_IPS[*]}"
fi

# --- haproxy ---------------------------------------------------------------------------------
if has_target haproxy; then
  {
    echo "global"
    echo "    maxconn 4096"
    [[ -z "$HAPROXY_NBTHREAD" ]] || echo "    nbthread $HAPROXY_NBTHREAD"
    echo "defaults"
    echo "    mode tcp"
    echo "    timeout connect 5s"
    echo "    timeout client 60s"
    echo "    timeout server 60s"
    echo "listen web"
    echo "    bind $HOST_ADDR:$HAPROXY_PORT"
    echo "    balance roundrobin"
    for ((i = 0; i < TASKS; i++)); do echo "    server web$((i + 1)) ${TASK_IPS[i]}:$TARGET_PORT"; done
  } >"$work/haproxy.cfg"
  haproxy -c -q -f "$work/haproxy.cfg" || die "haproxy refuses its configuration"
  # nsenter execs haproxy: $! is its own pid.
  nsenter --net="$VIPD_DOCKER_NETNS" -- haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
  haproxy_pid=$!
  start=$SECONDS
  until in_d ss -Htln "sport = :$HAPROXY_PORT" | grep -q .; do
    kill -0 "$haproxy_pid" 2>/dev/null || { cat "$work/haproxy.log" >&2; die "haproxy exited"; }
    ((SECONDS - start < 30)) || { cat "$work/haproxy.log" >&2; die "haproxy does not listen on :$HAPROXY_PORT"; }
    sleep 0.3
  done
  log "haproxy: $HOST_ADDR:$HAPROXY_PORT over ${TASK_IPS[*]} (pid $haproxy_pid)"
fi

# --- mesh: vipd --------------------------------------------------------------------------------
if has_target mesh; then
  # shellcheck disable=SC2086 # VIPD_RUN_ARGS: words
  nsenter --net="$VIPD_DOCKER_NETNS" -- "$VIPD" run --state-dir "$work/state" \
    --admin-socket "$work/vipd.sock" --ingress-netns "$INGRESS_NS" $VIPD_RUN_ARGS \
    >"$work/vipd.log" 2>&1 &
  vipd_pid=$!
  log "vipd run (pid $vipd_pid), ingress namespace $INGRESS_NS"
  start=$SECONDS
  until [[ -e "$INGRESS_PATH" ]] && [[ "$(dests "$INGRESS_PATH")" == "$TASKS" ]] &&
    get "$HOST_ADDR:$MESH_PORT" >/dev/null; do
    if ! kill -0 "$vipd_pid" 2>/dev/null || ((SECONDS - start >= STEP_TIMEOUT)); then
      {
        echo "--- vipd log (tail) ---"
        tail -n 40 "$work/vipd.log"
        echo "--- dockerd's namespace: nat, filter FORWARD ---"
        in_d iptables -t nat -S
        in_d iptables -S FORWARD
        if [[ -e "$INGRESS_PATH" ]]; then
          echo "--- $INGRESS_NS: addresses, IPVS, mangle, nat ---"
          nsenter --net="$INGRESS_PATH" ip -br addr
          nsenter --net="$INGRESS_PATH" ipvsadm -Ln
          nsenter --net="$INGRESS_PATH" iptables -t mangle -S
          nsenter --net="$INGRESS_PATH" iptables -t nat -S
        else
          echo "--- no $INGRESS_PATH ---"
        fi
      } >&2 2>&1
      kill -0 "$vipd_pid" 2>/dev/null || die "vipd exited"
      die "mesh: $HOST_ADDR:$MESH_PORT does not answer through $TASKS IPVS destinations in $INGRESS_NS after ${STEP_TIMEOUT}s"
    fi
    sleep 1
  done
  log "mesh: $HOST_ADDR:$MESH_PORT answers, $TASKS destinations in $INGRESS_NS after $((SECONDS - start)) s"
fi

# --- checks ------------------------------------------------------------------------------------
declare -A ADDR=(
  [mesh]=$HOST_ADDR:$MESH_PORT
  [hand]=$HOST_ADDR:$HAND_PORT
  [haproxy]=$HOST_ADDR:$HAPROXY_PORT
  [direct]=${TASK_IPS[0]}:$TARGET_PORT
)
declare -A WHAT=(
  [mesh]="vipd routing mesh (DNAT, ingress netns, IPVS fwmark)"
  [hand]="by hand, as Swarm (DNAT, netns, IPVS fwmark)"
  [haproxy]="HAProxy mode tcp, roundrobin"
  [direct]="one task, routed"
)
for t in "${TARGETS[@]}"; do
  wait_answer "${ADDR[$t]}" 30 || die "$t: no answer from ${ADDR[$t]} (from the outside namespace)"
  declare -A hits=()
  for ((k = 0; k < CHECK_REQUESTS; k++)); do
    who=$(get "${ADDR[$t]}") || die "$t: request $((k + 1)) to ${ADDR[$t]} failed"
    [[ " ${TASK_NAMES[*]} " == *" $who "* ]] || die "$t: answer '$who' from ${ADDR[$t]} names no task (${TASK_NAMES[*]})"
    hits[$who]=$((${hits[$who]:-0} + 1))
  done
  spread=$(for n in "${TASK_NAMES[@]}"; do printf '%s=%s ' "$n" "${hits[$n]:-0}"; done)
  if [[ "$t" == direct ]]; then
    ((${hits[${TASK_NAMES[0]}]:-0} == CHECK_REQUESTS)) || die "direct: not every answer from ${TASK_NAMES[0]}: $spread"
  elif ((${#hits[@]} != TASKS)); then
    die "$t: $CHECK_REQUESTS new connections to ${ADDR[$t]} reached only ${#hits[@]} of $TASKS backends: $spread"
  fi
  log "$t: ${ADDR[$t]} answers; $CHECK_REQUESTS connections: $spread"
  unset hits
done

# --- measurements --------------------------------------------------------------------------------
mkdir -p "$work/wrk"
declare -A RATE ERR CPU BUSY
HZ=$(getconf CLK_TCK)
# Busy and total jiffies of all CPUs so far (/proc/stat: user nice system idle iowait ...).
cpu_jiffies() {
  local _cpu u n s i w q sq st
  read -r _cpu u n s i w q sq st _ </proc/stat
  echo "$((u + n + s + q + sq + st)) $((u + n + s + i + w + q + sq + st))"
}
# wrk against target $1 in mode $2 (close|keepalive), round $3: RATE and ERR.
run_wrk() {
  local t=$1 mode=$2 r=$3 hdr=() out f
  [[ "$mode" == close ]] && hdr=(-H 'Connection: close')
  if ((WARMUP > 0)); then
    in_out wrk -t "$THREADS" -c "$CONNECTIONS" -d "${WARMUP}s" --timeout 10s "${hdr[@]}" \
      "http://${ADDR[$t]}/" >/dev/null 2>&1 || die "$t: wrk (warm-up, $mode) failed"
  fi
  f=$work/wrk/$t.$mode.$r
  local b0 t0 b1 t1
  read -r b0 t0 < <(cpu_jiffies)
  in_out wrk -t "$THREADS" -c "$CONNECTIONS" -d "${DURATION}s" --timeout 10s "${hdr[@]}" \
    "http://${ADDR[$t]}/" >"$f" 2>&1 || { cat "$f" >&2; die "$t: wrk ($mode) failed"; }
  read -r b1 t1 < <(cpu_jiffies)
  out=$(<"$f")
  local k=$t.$mode.$r reqs
  RATE[$k]=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' <<<"$out")
  reqs=$(awk '/ requests in / {print $1}' <<<"$out")
  [[ -n "${RATE[$k]}" && "${reqs:-0}" -gt 0 ]] || { cat "$f" >&2; die "$t: wrk ($mode) got no answer"; }
  # Socket errors: connect A, read B, write C, timeout D; Non-2xx or 3xx responses: N
  ERR[$k]=$(awk '/Socket errors:/ {gsub(/,/, ""); n += $4 + $6 + $8 + $10}
    /Non-2xx or 3xx responses:/ {n += $5} END {print n + 0}' <<<"$out")
  # The whole machine's CPU time per request (client, kernel, proxies, backends), in us,
  # and how busy its CPUs were (%) while wrk ran.
  read -r "CPU[$k]" "BUSY[$k]" < <(awk -v b=$((b1 - b0)) -v t=$((t1 - t0)) -v hz="$HZ" -v n="$reqs" \
    'BEGIN {printf "%.0f %.0f\n", b * 1e6 / hz / n, t ? b * 100 / t : 0}')
  log "round $r, $mode, $t: ${RATE[$k]}/s, $reqs requests, ${ERR[$k]} errors, CPU ${CPU[$k]} us/request, ${BUSY[$k]}% busy"
}

log "wrk -t $THREADS -c $CONNECTIONS: ${WARMUP}s warm-up + ${DURATION}s, $ROUNDS round(s), targets ${TARGETS[*]}"
n=${#TARGETS[@]}
for ((r = 1; r <= ROUNDS; r++)); do
  for mode in close keepalive; do
    for ((j = 0; j < n; j++)); do
      run_wrk "${TARGETS[(j + r - 1) % n]}" "$mode" "$r"
    done
  done
done

# --- results ---------------------------------------------------------------------------------------
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
declare -A MED SUMERR ALL MEDCPU
for t in "${TARGETS[@]}"; do
  for mode in close keepalive; do
    vals=() cpus=() e=0
    for ((r = 1; r <= ROUNDS; r++)); do
      vals+=("${RATE[$t.$mode.$r]}")
      cpus+=("${CPU[$t.$mode.$r]}")
      e=$((e + ERR[$t.$mode.$r]))
    done
    MED[$t.$mode]=$(median "${vals[@]}")
    MEDCPU[$t.$mode]=$(median "${cpus[@]}")
    ALL[$t.$mode]="${vals[*]}"
    SUMERR[$t.$mode]=$e
  done
done
full_after=$(dmesg 2>/dev/null | grep -c 'table full' || true)

echo
echo "Routing mesh: $TASKS nginx tasks, from an outside namespace; wrk -t $THREADS -c $CONNECTIONS," \
  "${DURATION}s after ${WARMUP}s warm-up; median of $ROUNDS round(s) [each round]"
# The [rounds] columns: as wide as ROUNDS figures of 4-5 digits need.
rw=$((ROUNDS * 5 + 1))
((rw >= 8)) || rw=8
row="| %-8s | %-15s | %7s | %-${rw}s | %8s | %7s | %-${rw}s | %8s | %6s |\n"
dash=$(printf "%$((rw + 2))s" '' | tr ' ' -)
# shellcheck disable=SC2059 # the format is ours
printf "$row" target address "conn/s" "[rounds]" "CPU us" "req/s" "[rounds]" "CPU us" errors
# shellcheck disable=SC2059
printf "$row" "" "" "(close)" "" "per conn" "(KA)" "" "per req" ""
printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' ---------- ----------------- --------- "$dash" ---------- \
  --------- "$dash" ---------- --------
for t in "${TARGETS[@]}"; do
  # shellcheck disable=SC2059
  printf "$row" "$t" "${ADDR[$t]}" "${MED[$t.close]}" "[${ALL[$t.close]}]" "${MEDCPU[$t.close]}" \
    "${MED[$t.keepalive]}" "[${ALL[$t.keepalive]}]" "${MEDCPU[$t.keepalive]}" \
    "$((SUMERR[$t.close] + SUMERR[$t.keepalive]))"
done
for t in "${TARGETS[@]}"; do printf '  %-8s %s\n' "$t" "${WHAT[$t]}"; done
echo "conn/s: -H 'Connection: close', one new connection per request; req/s: keep-alive."
echo "CPU us: the whole machine's CPU time (client, kernel, proxy, backends) per connection or"
echo "request, median; errors: wrk's socket errors + non-2xx answers, all rounds and modes."
# Medians' ratio a / b, and each round's (the rounds are paired: same background load).
ratio() {
  local a=$1 b=$2 target=$3 mode per pr
  has_target "$a" && has_target "$b" || return 0
  for mode in close keepalive; do
    pr=()
    for ((r = 1; r <= ROUNDS; r++)); do
      pr+=("$(awk -v x="${RATE[$a.$mode.$r]}" -v y="${RATE[$b.$mode.$r]}" 'BEGIN {printf "%.2f", x / y}')")
    done
    per=" ${pr[*]}"
    awk -v a="$a" -v b="$b" -v t="$target" -v m="$mode" -v x="${MED[$a.$mode]}" -v y="${MED[$b.$mode]}" \
      -v per="$per" -v pm="$(median "${pr[@]}")" 'BEGIN {
        what = (m == "close") ? "new connections" : "keep-alive     "
        q = x / y
        printf "%-16s %s: %.2f (rounds:%s; their median %s)", a " / " b, what, q, per, pm
        if (t != "") printf "  target >= %s%s", t, (q >= t + 0) ? "" : ": BELOW"
        printf "\n" }'
  done
}
# How the connections spread over the backends during the whole run (IPVS's counters).
for t in mesh hand; do
  has_target "$t" || continue
  ns=$INGRESS_PATH
  [[ "$t" == hand ]] && ns=$HAND_PATH
  echo "$t: connections per backend (IPVS): $(nsenter --net="$ns" ipvsadm -Ln --stats |
    awk '$1 == "->" && $2 ~ /^[0-9]/ {printf "%s=%s ", $2, $3}')"
done
ratio mesh hand 0.9
ratio mesh haproxy 1.5
ratio hand haproxy ''
for t in mesh hand haproxy; do ratio "$t" direct ''; done
if ((full_after > full_before)); then
  echo "WARNING: the kernel logged $((full_after - full_before)) conntrack 'table full' line(s) during the run"
fi
if has_target mesh; then
  grep -E 'WARN|ERROR' "$work/vipd.log" | tail -n 20 | sed 's/^/vipd: /' || true
fi
