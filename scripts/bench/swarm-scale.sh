#!/usr/bin/env bash
# Benchmark, end to end, vipd against Docker Swarm on the same dockerd: from the command
# that adds a task to a service of N tasks until the first request through the service VIP
# is answered by the new task.
#   vipd:  a service of N busybox httpd tasks labelled vipd.service=web on a bridge
#          network, a client container, `vipd run`; t0 = just before `docker run -d` of
#          one more task.
#   swarm: `docker swarm init` (advertise address on a dummy link in dockerd's network
#          namespace), `docker service create` of N busybox httpd tasks on an attachable
#          overlay network, a client container on it; t0 = just before
#          `docker service scale --detach web=N+1`. (Docker 20.10's Swarm balances in one
#          load-balancer sandbox per network, lb_<net>, that owns the VIP, not in each
#          container as Swarm 1.12 did; "the client's IPVS table" below is that sandbox's.)
# The VM's root namespace gets net.ipv4.ip_forward=1 (restored on exit), as any host
# running dockerd has: new namespaces inherit IPv4 settings from the root one, and
# Swarm's lb_ sandbox forwards the replies (un-NAT) only with forwarding on. Our dockerd
# runs in a namespace of its own (scripts/docker/dockerd-start.sh), so without this the
# lb_ sandbox has forwarding off and no request through a Swarm VIP is ever answered.
# Every task's httpd answers its hostname (= its container id's first 12 characters, the
# default). The requests come from the client's network namespace (nsenter, then bash
# /dev/tcp: no process per request, REQUEST_GAP seconds between requests); the run ends
# at the first answer that names no task known before t0 (checked to be the new task).
# After each repetition the new task is removed again (vipd: docker rm -f; swarm: scale
# back to N) and the client's IPVS table is back to N destinations before the next one.
# vipd and swarm repetitions alternate, so both see the same background load. Prints
# each time, the medians and the ratio vipd / swarm; and apart, the part after the new
# task container's start event (`docker events`, .TimeNano): what is left once the
# container runs, i.e. the load balancer's own delay (plus the requests' resolution).
# Last, the floor: vipd's time until its container's start event over Swarm's whole time,
# the ratio vipd would reach if its own part took no time at all.
#
# Needs a kernel with IPVS; on a host without, in the VM (emulated: compare ratios):
#   scripts/vm/run.sh --timeout 5400 --mem 3072 --env VIPD=.cache/target-bench2/release/vipd \
#       -- scripts/bench/swarm-scale.sh [N]
# Environment: REPEAT (default 3), VIPD (default target/release/vipd), REQUEST_GAP
# (0.05), STEP_TIMEOUT (seconds for one step to finish, default 600).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
N=${1:-3}
REPEAT=${REPEAT:-3}
VIPD=${VIPD:-target/release/vipd}
REQUEST_GAP=${REQUEST_GAP:-0.05}
STEP_TIMEOUT=${STEP_TIMEOUT:-600}
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
[[ -x "$VIPD" ]] || { echo "build first: cargo build --release (or set VIPD)" >&2; exit 1; }
VIPD=$(cd "$(dirname "$VIPD")" && pwd)/$(basename "$VIPD")
[[ -e /proc/net/ip_vs ]] || { echo "this kernel has no IPVS: run it in scripts/vm/run.sh" >&2; exit 1; }
# shellcheck source=scripts/docker/lib.sh
. scripts/docker/lib.sh
docker=$(docker_cli)
IMAGE=vipd-test/busybox:latest
HTTPD='hostname >/www/index.html && exec httpd -f -p 80 -h /www'
SWARM_ADDR=10.212.0.1/24    # on a dummy link in dockerd's namespace: swarm's advertise address

work=$(mktemp -d)
dockerd_dir=$work/d
vipd_pid='' events_pid='' swarm=0 forward=''
cleanup() {
  local rc=$?
  [[ -z "$events_pid" ]] || { kill "$events_pid" 2>/dev/null; wait "$events_pid" 2>/dev/null; } || true
  [[ -z "$forward" ]] || echo "$forward" >/proc/sys/net/ipv4/ip_forward
  [[ -z "$vipd_pid" ]] || { kill "$vipd_pid" 2>/dev/null; wait "$vipd_pid" 2>/dev/null; } || true
  if ((swarm)); then
    timeout 120 "$docker" service rm web >/dev/null 2>&1 || true
    timeout 120 "$docker" swarm leave --force >/dev/null 2>&1 || true
  fi
  "$repo/scripts/docker/dockerd-stop.sh" --purge "$dockerd_dir" >/dev/null 2>&1 || true
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

T0=$EPOCHREALTIME
log() { printf '[%6.1f s] %s\n' "$(awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN {print b - a}')" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
d() { timeout "$STEP_TIMEOUT" "$docker" "$@"; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", b - a}'; }

# Destinations (IPVS, any service) in network namespace $1 (a path).
dests() {
  nsenter --net="$1" awk '/ -> [0-9A-F]+:/ {n++} END {print n + 0}' /proc/net/ip_vs
}
# Wait until `dests $1` is $2.
wait_dests() {
  local start=$SECONDS n
  while n=$(dests "$1"); [[ "$n" != "$2" ]]; do
    ((SECONDS - start < STEP_TIMEOUT)) || die "namespace $1 has $n IPVS destinations, not $2, after ${STEP_TIMEOUT}s"
    sleep 1
  done
}
netns_of() { echo "/proc/$(d inspect -f '{{.State.Pid}}' "$1")/ns/net"; }

# The requester: request http://VIP/ until the answer is none of the names in KNOWN
# (space separated); print "TIME REQUESTS ANSWER". Builtins only (runs in a client's
# namespace). Args: VIP KNOWN GAP FIFO (a fifo nobody writes: `read -t` on it sleeps).
request_loop() {
  local vip=$1 known=" $2 " gap=$3 g c n=0 line body
  exec {g}<>"$4"
  while :; do
    n=$((n + 1))
    if exec {c}<>"/dev/tcp/$vip/80"; then
      printf 'GET / HTTP/1.0\r\n\r\n' >&"$c"
      body=''
      while IFS= read -r -t 5 line <&"$c"; do body=${line%$'\r'}; done
      exec {c}<&-
      if [[ -n "$body" && "$known" != *" $body "* ]]; then
        echo "$EPOCHREALTIME $n $body"
        return 0
      fi
    fi 2>/dev/null
    read -r -t "$gap" -u "$g" || true
  done
}
# Run request_loop in network namespace $1: VIP $2, known names $3.
requester() {
  rm -f "$work/gap" && mkfifo "$work/gap"
  timeout "${REQ_TIMEOUT:-$STEP_TIMEOUT}" nsenter --net="$1" \
    bash -c "$(declare -f request_loop)"'; request_loop "$@"' _ "$2" "$3" "$REQUEST_GAP" "$work/gap"
}

forward=$(</proc/sys/net/ipv4/ip_forward)
echo 1 >/proc/sys/net/ipv4/ip_forward
eval "$(scripts/docker/dockerd-start.sh "$dockerd_dir")"
export DOCKER_HOST
docker_dir_layout "$dockerd_dir"   # DOCKER_EXEC, DOCKER_NETNS_NAME
scripts/docker/busybox-image.sh "$IMAGE"

# --- vipd ---------------------------------------------------------------------------------
d network create --subnet 10.213.0.0/24 vnet >/dev/null
# In dockerd's namespace, where a host's vipd runs (Docker's bridges are there).
nsenter --net="$VIPD_DOCKER_NETNS" -- "$VIPD" run --state-dir "$work/state" >"$work/vipd.log" 2>&1 &
vipd_pid=$!
for ((i = 1; i <= N; i++)); do
  d run -d --network vnet --label vipd.service=web "$IMAGE" sh -c "$HTTPD" >/dev/null
done
d run -d --network vnet --name vclient "$IMAGE" sleep 100000 >/dev/null
VNS=$(netns_of vclient)
wait_dests "$VNS" "$N"
VVIP=$(nsenter --net="$VNS" iptables -t mangle -S VIPD-OUTPUT |
  awk '$1 == "-A" { for (i = 1; i < NF; i++) if ($i == "-d") { sub("/32", "", $(i + 1)); print $(i + 1); exit } }')
[[ -n "$VVIP" ]] || die "no VIP rule in the vipd client's sandbox"
log "vipd: $N tasks, client, VIP $VVIP"

# --- swarm --------------------------------------------------------------------------------
ip -n "$DOCKER_NETNS_NAME" link add swarm0 type dummy
ip -n "$DOCKER_NETNS_NAME" addr add "$SWARM_ADDR" dev swarm0
ip -n "$DOCKER_NETNS_NAME" link set swarm0 up
d swarm init --advertise-addr "${SWARM_ADDR%/*}" >/dev/null || die "docker swarm init failed"
swarm=1
d network create -d overlay --attachable --subnet 10.214.0.0/24 snet >/dev/null
d service create --detach --quiet --no-resolve-image --name web --network snet --replicas "$N" \
  "$IMAGE" sh -c "$HTTPD" >/dev/null
d run -d --network snet --name sclient "$IMAGE" sleep 100000 >/dev/null
SNS=$(netns_of sclient)
start=$SECONDS
until LBNS=$(compgen -G "$DOCKER_EXEC/netns/lb_*" | head -n 1); do
  ((SECONDS - start < STEP_TIMEOUT)) || die "swarm made no lb_ sandbox in ${STEP_TIMEOUT}s"
  sleep 1
done
wait_dests "$LBNS" "$N"
SVIP=$(d service inspect -f '{{range .Endpoint.VirtualIPs}}{{.Addr}}{{end}}' web)
SVIP=${SVIP%/*}
log "swarm: $N tasks, client, VIP $SVIP"

# Both VIPs answer at all (any task), before anything is timed.
REQ_TIMEOUT=60 requester "$VNS" "$VVIP" "" >/dev/null || die "vipd: no answer through the VIP $VVIP"
REQ_TIMEOUT=60 requester "$SNS" "$SVIP" "" >/dev/null || die "swarm: no answer through the VIP $SVIP"

"$docker" events --filter type=container --filter event=start --format '{{.ID}} {{.TimeNano}}' \
  >"$work/events" 2>/dev/null &
events_pid=$!
# The start event's time (seconds) of the container whose id starts with $1.
started_at() {
  local start=$SECONDS t
  until t=$(awk -v id="$1" 'index($1, id) == 1 {printf "%.6f", $2 / 1e9; found = 1; exit} END {exit !found}' "$work/events"); do
    ((SECONDS - start < 30)) || die "no start event for $1"
    sleep 0.5
  done
  echo "$t"
}

# --- repetitions ----------------------------------------------------------------------------
T_VIPD=() T_SWARM=() E_VIPD=() E_SWARM=() S_VIPD=()
for ((r = 1; r <= REPEAT; r++)); do
  # vipd: docker run of one more task.
  known=$(d ps -q --filter label=vipd.service=web | tr '\n' ' ')
  requester "$VNS" "$VVIP" "$known" >"$work/answer" &
  req=$!
  t0=$EPOCHREALTIME
  id=$(d run -d --network vnet --label vipd.service=web "$IMAGE" sh -c "$HTTPD")
  t_ret=$EPOCHREALTIME
  wait "$req" || die "vipd: no answer from the new task within ${STEP_TIMEOUT}s; vipd log tail:
$(tail -n 20 "$work/vipd.log")"
  read -r t1 n who <"$work/answer"
  [[ "$who" == "${id:0:12}" ]] || die "vipd: answered by $who, not the new task ${id:0:12}"
  T_VIPD+=("$(secs "$t0" "$t1")")
  started=$(started_at "$id")
  E_VIPD+=("$(secs "$started" "$t1")")
  S_VIPD+=("$(secs "$t0" "$started")")
  log "vipd  $r/$REPEAT: ${T_VIPD[-1]} s, ${E_VIPD[-1]} s after the start event (docker run returned after $(secs "$t0" "$t_ret") s; $n requests)"
  d rm -f "$id" >/dev/null
  wait_dests "$VNS" "$N"

  # swarm: scale to N+1.
  known=$(d ps -q --filter label=com.docker.swarm.service.name=web | tr '\n' ' ')
  requester "$SNS" "$SVIP" "$known" >"$work/answer" &
  req=$!
  t0=$EPOCHREALTIME
  d service scale --detach web=$((N + 1)) >/dev/null 2>&1
  t_ret=$EPOCHREALTIME
  wait "$req" || die "swarm: no answer from the new task within ${STEP_TIMEOUT}s"
  read -r t1 n who <"$work/answer"
  now=$(d ps -q --filter label=com.docker.swarm.service.name=web | tr '\n' ' ')
  [[ " $now " == *" $who "* && " $known " != *" $who "* ]] || die "swarm: answered by $who, not a new task (before: $known; now: $now)"
  T_SWARM+=("$(secs "$t0" "$t1")")
  E_SWARM+=("$(secs "$(started_at "$who")" "$t1")")
  log "swarm $r/$REPEAT: ${T_SWARM[-1]} s, ${E_SWARM[-1]} s after the start event (docker service scale returned after $(secs "$t0" "$t_ret") s; $n requests)"
  d service scale --detach web="$N" >/dev/null 2>&1
  start=$SECONDS
  until [[ "$(d ps -q --filter label=com.docker.swarm.service.name=web | wc -l)" == "$N" ]]; do
    ((SECONDS - start < STEP_TIMEOUT)) || die "swarm: not back to $N tasks"
    sleep 1
  done
  wait_dests "$LBNS" "$N"
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
mv=$(median "${T_VIPD[@]}") ms=$(median "${T_SWARM[@]}")
ev=$(median "${E_VIPD[@]}") es=$(median "${E_SWARM[@]}")
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
echo
echo "New task -> first request through the VIP answered by it (N=$N tasks before; seconds)"
echo "vipd  (docker run):                 ${T_VIPD[*]}  median $mv"
echo "swarm (docker service scale N+1):   ${T_SWARM[*]}  median $ms"
echo "vipd / swarm: $(ratio "$mv" "$ms") (target <= 0.5)"
echo "of which after the new container's start event:"
echo "vipd:                               ${E_VIPD[*]}  median $ev"
echo "swarm:                              ${E_SWARM[*]}  median $es"
echo "vipd / swarm: $(ratio "$ev" "$es")"
sv=$(median "${S_VIPD[@]}")
echo "vipd until its container's start event:   ${S_VIPD[*]}  median $sv"
echo "floor, vipd's part taking no time at all: vipd / swarm $(ratio "$sv" "$ms")"
echo "resolution: one request every >= $REQUEST_GAP s + its own time, from the client's namespace"
grep -E 'WARN|ERROR' "$work/vipd.log" | tail -n 20 | sed 's/^/vipd: /' || true
