#!/usr/bin/env bash
# Benchmark: DNS queries per second of vipd's embedded DNS server against dnsmasq serving
# the same names with the same answers, on this host, in one run, with dnsperf.
#
#   scripts/bench/dns.sh [SERVICES]        (as root; default 20 services)
#
# What it does:
#   1. starts a private dockerd (scripts/docker/dockerd-start.sh) and imports the busybox
#      image; creates a user network and SERVICES x TASKS containers running `sleep`,
#      labelled vipd.service=svcI (endpoint mode vip) and named svcI-J;
#   2. starts `vipd run --dns-listen 127.0.0.1:5301 --dns-domain bench.vipd` and waits
#      until it answers every name; the names are, per service, `svcI` and
#      `svcI.bench.vipd` (the VIP), `tasks.svcI` (TASKS addresses) and the TASKS container
#      names (one address each), all type A;
#   3. starts dnsmasq on 127.0.0.1:5302 with a hosts file of exactly those names and
#      answers (same TTL), and checks that both servers give identical answers;
#   4. runs the same dnsperf (DURATION s, CLIENTS clients, no rate limit) against each,
#      ROUNDS times, alternating, and prints qps, latency (dnsperf's avg, min, max and
#      stddev), lost queries, each server's CPU time per answered query (user + system,
#      from /proc/PID/stat) and the ratio vipd / dnsmasq (target: >= 1.0).
#
# vipd, dnsmasq and dnsperf all run in the private dockerd's network namespace and talk
# over its loopback: the same path for both servers, nothing listening on the host's
# network, and loopback is a source vipd's ACL allows. Both servers are single-threaded
# here (`vipd run` uses a current-thread tokio runtime; dnsmasq is one process), so on a
# 2-core machine each gets one core and dnsperf the other. Other load on the machine moves
# qps: compare the ratio, and the CPU time per query, which load affects less.
#
# Expected noise: on a kernel without IPVS (`ipvsadm -Ln`: "Protocol not available"),
# `vipd run` logs errors programming the containers' sandboxes. That is harmless here:
# DNS is answered from Docker's view whatever happens to the datapath.
#
# Installs what is missing (Debian: dnsperf, dnsmasq-base, dnsutils, busybox-static, and
# docker.io through scripts/docker/ensure-docker.sh). Everything it starts (dockerd and its
# containers, vipd, dnsmasq) is stopped and its temporary directory removed on exit.
#
# Environment: TASKS (per service, default 3), DURATION (s per dnsperf run, default 10),
# CLIENTS (dnsperf -c, default 4), THREADS (dnsperf -T, default 1), OUTSTANDING (dnsperf
# -q, default 100), ROUNDS (default 1), VIPD (default target/release/vipd), HOLD (seconds
# to keep both servers up after the table, e.g. to profile them by hand; default 0).
set -euo pipefail
cd "$(dirname "$0")/../.."
SERVICES=${1:-20}
TASKS=${TASKS:-3}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-4}
THREADS=${THREADS:-1}
OUTSTANDING=${OUTSTANDING:-100}
ROUNDS=${ROUNDS:-1}
VIPD=${VIPD:-target/release/vipd}
HOLD=${HOLD:-0}
readonly DOMAIN=bench.vipd TTL=5 ADDR=127.0.0.1 VIPD_PORT=5301 DNSMASQ_PORT=5302
readonly NETWORK=vipd-bench SUBNET=10.212.0.0/16 IMAGE=vipd-test/busybox:latest
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

log() { echo "bench: $*" >&2; }
die() { log "$*"; exit 1; }

[[ $EUID -eq 0 ]] || die "must run as root"
[[ "$SERVICES" =~ ^[1-9][0-9]*$ && "$TASKS" =~ ^[1-9][0-9]*$ ]] || die "usage: $0 [SERVICES] (TASKS=N)"
((SERVICES * TASKS <= 60000)) || die "too many containers for $SUBNET"
[[ -x "$VIPD" ]] || die "$VIPD not found: build first (cargo build --release) or set VIPD"
VIPD=$(realpath "$VIPD")

# Packages, by the command they bring.
declare -A want=([dnsperf]=dnsperf [dnsmasq]=dnsmasq-base [dig]=dnsutils [busybox]=busybox-static)
missing=()
for cmd in "${!want[@]}"; do
  command -v "$cmd" >/dev/null || missing+=("${want[$cmd]}")
done
if [[ ! -x /bin/busybox ]] && [[ " ${missing[*]} " != *" busybox-static "* ]]; then
  missing+=(busybox-static)
fi
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
scripts/docker/ensure-docker.sh
# shellcheck source=scripts/docker/lib.sh
. scripts/docker/lib.sh
docker=$(docker_cli)

work=$(mktemp -d /tmp/vipd-dns-bench.XXXXXX)
vipd_pid='' dnsmasq_pid='' docker_started=0
cleanup() {
  set +e
  for pid in $vipd_pid $dnsmasq_pid; do
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  done
  ((docker_started)) && scripts/docker/dockerd-stop.sh --purge "$work/docker" >/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

docker_started=1
eval "$(scripts/docker/dockerd-start.sh "$work/docker")"
export DOCKER_HOST
netns=$VIPD_DOCKER_NETNS
in_netns() { nsenter --net="$netns" -- "$@"; }
# The servers are started by `nsenter ... &` directly (not through a function, which would
# put a subshell between): nsenter execs them, so $! is the server's own pid.
scripts/docker/busybox-image.sh "$IMAGE"

log "creating $SERVICES services x $TASKS tasks"
timeout 60 "$docker" network create --subnet "$SUBNET" "$NETWORK" >/dev/null
names=()
for ((i = 0; i < SERVICES; i++)); do
  for ((j = 1; j <= TASKS; j++)); do names+=("svc$i-$j"); done
done
# xargs runs `sh -c SCRIPT DOCKER NETWORK IMAGE SERVICE NAME` per container, 4 at a time.
# shellcheck disable=SC2016 # expanded by that sh
printf '%s\n' "${names[@]}" | sed -E 's/^(svc[0-9]+)-[0-9]+$/\1 &/' |
  xargs -P 4 -L 1 sh -c 'exec timeout 60 "$0" create --name "$4" --network "$1" \
    --label vipd.service="$3" "$2" sleep 1000000 >/dev/null' "$docker" "$NETWORK" "$IMAGE"
printf '%s\n' "${names[@]}" | xargs -P 4 -n 20 timeout 120 "$docker" start >/dev/null
# name service address, one line per container.
timeout 60 "$docker" inspect -f \
  "{{.Name}} {{index .Config.Labels \"vipd.service\"}} {{(index .NetworkSettings.Networks \"$NETWORK\").IPAddress}}" \
  "${names[@]}" | sed 's|^/||' >"$work/containers"
awk '$3 == "" {exit 1}' "$work/containers" || die "a container has no address on $NETWORK"

log "starting vipd (DNS on $ADDR:$VIPD_PORT)"
mkdir -p "$work/state"
nsenter --net="$netns" -- "$VIPD" run --state-dir "$work/state" --dns-listen "$ADDR:$VIPD_PORT" \
  --dns-domain "$DOMAIN" --dns-ttl "$TTL" >"$work/vipd.log" 2>&1 &
vipd_pid=$!

# The query file: every name vipd owns here, type A.
{
  for ((i = 0; i < SERVICES; i++)); do
    echo "svc$i A"
    echo "svc$i.$DOMAIN A"
    echo "tasks.svc$i A"
  done
  for n in "${names[@]}"; do echo "$n A"; done
} >"$work/queries"
nnames=$(wc -l <"$work/queries")

# Answers as (name ttl class type address) lines, sorted: what dig says for every name.
answers() { # PORT
  in_netns dig @"$ADDR" -p "$1" +noall +answer +tries=1 +time=2 -f "$work/queries" 2>/dev/null |
    awk '{print tolower($1), $2, $3, $4, $5}' | sort
}
# What vipd must answer, but the VIPs (which vipd picks): tasks.svcI and containers.
awk -v ttl=$TTL '{print "tasks." $2 ". " ttl " IN A " $3; print $1 ". " ttl " IN A " $3}' \
  "$work/containers" | sort >"$work/expected-no-vips"

start=$SECONDS
while :; do
  kill -0 "$vipd_pid" 2>/dev/null || { cat "$work/vipd.log" >&2; die "vipd exited"; }
  answers $VIPD_PORT >"$work/vipd.answers" || true
  grep -v -E "^svc[0-9]+\.( |$DOMAIN\. )" "$work/vipd.answers" >"$work/vipd.no-vips" || true
  # One VIP per service, the same under the domain.
  vips=$(awk -v d="$DOMAIN" '$1 ~ "^svc[0-9]+\\.(" d "\\.)?$" {sub("\\." d "\\.$", ".", $1); print $1, $5}' \
    "$work/vipd.answers" | sort -u | wc -l)
  if cmp -s "$work/vipd.no-vips" "$work/expected-no-vips" && ((vips == SERVICES)) &&
    (($(wc -l <"$work/vipd.answers") == nnames + (TASKS - 1) * SERVICES)); then
    break
  fi
  ((SECONDS - start < 120)) || { tail -n 20 "$work/vipd.log" >&2; die "vipd did not answer every name within 120 s"; }
  sleep 0.5
done
log "vipd answers all $nnames names after $((SECONDS - start)) s"

# The same names and answers for dnsmasq: one hosts line per (address, name).
awk '{n = $1; sub("\\.$", "", n); print $5, n}' "$work/vipd.answers" >"$work/hosts"
log "starting dnsmasq (on $ADDR:$DNSMASQ_PORT)"
nsenter --net="$netns" -- dnsmasq --keep-in-foreground --conf-file=/dev/null --pid-file= --user=root \
  --log-facility=- --no-resolv --no-hosts --addn-hosts="$work/hosts" --local-ttl=$TTL \
  --listen-address="$ADDR" --bind-interfaces --port=$DNSMASQ_PORT >"$work/dnsmasq.log" 2>&1 &
dnsmasq_pid=$!
start=$SECONDS
until answers $DNSMASQ_PORT >"$work/dnsmasq.answers" && cmp -s "$work/dnsmasq.answers" "$work/vipd.answers"; do
  kill -0 "$dnsmasq_pid" 2>/dev/null || { cat "$work/dnsmasq.log" >&2; die "dnsmasq exited"; }
  if ((SECONDS - start >= 20)); then
    diff "$work/vipd.answers" "$work/dnsmasq.answers" >&2 || true
    die "dnsmasq does not answer what vipd answers"
  fi
  sleep 0.3
done
log "dnsmasq gives the same $(wc -l <"$work/vipd.answers") records for the $nnames names"

cpu_ticks() { awk '{sub(/.*\) /, ""); print $12, $13}' "/proc/$1/stat"; } # utime stime
hz=$(getconf CLK_TCK)
declare -A QPS LAT MIN MAX SD LOST SENT CPU RC
run_dnsperf() { # LABEL PORT PID ROUND
  local out u0 s0 u1 s1
  read -r u0 s0 < <(cpu_ticks "$3")
  out=$(in_netns dnsperf -s "$ADDR" -p "$2" -d "$work/queries" -l "$DURATION" \
    -c "$CLIENTS" -T "$THREADS" -q "$OUTSTANDING" 2>&1) || { echo "$out" >&2; die "dnsperf failed"; }
  read -r u1 s1 < <(cpu_ticks "$3")
  echo "$out" >"$work/dnsperf.$1.$4"
  local k="$1.$4"
  SENT[$k]=$(awk '/Queries sent:/ {print $3}' <<<"$out")
  LOST[$k]=$(awk '/Queries lost:/ {print $3}' <<<"$out")
  QPS[$k]=$(awk '/Queries per second:/ {printf "%.0f", $4}' <<<"$out")
  # Average Latency (s):  0.000123 (min 0.000012, max 0.001234)
  local avg min max
  read -r avg min max < <(awk '/Average Latency/ {gsub(/[(),]/, "")
    printf "%.3f %.3f %.3f\n", $4 * 1000, $6 * 1000, $8 * 1000}' <<<"$out")
  LAT[$k]=$avg MIN[$k]=$min MAX[$k]=$max
  SD[$k]=$(awk '/Latency StdDev/ {printf "%.3f", $4 * 1000}' <<<"$out")
  RC[$k]=$(awk -F': *' '/Response codes:/ {print $2}' <<<"$out")
  local answered=$((SENT[$k] - LOST[$k]))
  # The server's CPU time per answered query (user + system, user, system, in us) and
  # its CPU use over the run (% of one core).
  CPU[$k]=$(awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$hz" -v n="$answered" -v d="$DURATION" \
    'BEGIN {q = n ? 1e6 / hz / n : 0
      printf "%.1f %.1f %.1f %.0f", (u + s) * q, u * q, s * q, (u + s) / hz / d * 100}')
  [[ "${RC[$k]}" =~ ^NOERROR\ [0-9]+\ \(100\.00%\)$ ]] || log "$1: not all NOERROR: ${RC[$k]}"
  log "$1 round $4: ${QPS[$k]} qps, avg ${LAT[$k]} ms, lost ${LOST[$k]}"
}

log "dnsperf: ${DURATION}s each, -c $CLIENTS -T $THREADS -q $OUTSTANDING, $ROUNDS round(s)"
for ((r = 1; r <= ROUNDS; r++)); do
  run_dnsperf vipd $VIPD_PORT "$vipd_pid" $r
  run_dnsperf dnsmasq $DNSMASQ_PORT "$dnsmasq_pid" $r
done
errors=$(grep -c -i -E ' (ERROR|WARN) ' "$work/vipd.log" || true)

echo
echo "DNS, $SERVICES services x $TASKS tasks: $nnames names (A), dnsperf -l $DURATION -c $CLIENTS -T $THREADS -q $OUTSTANDING, over loopback"
row='| %5s | %-7s | %9s | %8s | %8s | %8s | %8s | %8s | %6s | %8s | %7s | %7s | %5s |\n'
# shellcheck disable=SC2059 # the format is ours
printf "$row" round server queries qps "avg ms" "min ms" "max ms" "sdev ms" lost \
  "CPU us/q" "usr us" "sys us" "CPU%"
printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' ------- --------- ----------- ---------- \
  ---------- ---------- ---------- ---------- -------- ---------- --------- --------- -------
for ((r = 1; r <= ROUNDS; r++)); do
  for s in vipd dnsmasq; do
    k=$s.$r
    read -r us usr sys pct <<<"${CPU[$k]}"
    # shellcheck disable=SC2059
    printf "$row" "$r" "$s" "${SENT[$k]}" "${QPS[$k]}" "${LAT[$k]}" "${MIN[$k]}" "${MAX[$k]}" \
      "${SD[$k]}" "${LOST[$k]}" "$us" "$usr" "$sys" "$pct"
  done
done
echo
for ((r = 1; r <= ROUNDS; r++)); do
  read -r vus _ _ _ <<<"${CPU[vipd.$r]}"
  read -r dus _ _ _ <<<"${CPU[dnsmasq.$r]}"
  awk -v r="$r" -v a="${QPS[vipd.$r]}" -v b="${QPS[dnsmasq.$r]}" -v la="${LAT[vipd.$r]}" \
    -v lb="${LAT[dnsmasq.$r]}" -v ca="$vus" -v cb="$dus" 'BEGIN {
      printf "round %s: vipd / dnsmasq qps = %.2f (target >= 1.0); avg latency %.2fx; CPU per query %.2fx\n",
        r, a / b, la / lb, (cb > 0 ? ca / cb : 0) }'
done
echo "(vipd logged $errors warning/error lines meanwhile; without IPVS they are expected)"
if ((HOLD > 0)); then
  log "holding for $HOLD s: nsenter --net=$netns dnsperf -s $ADDR -p $VIPD_PORT (vipd, pid $vipd_pid)" \
    "or -p $DNSMASQ_PORT (dnsmasq, pid $dnsmasq_pid) -d $work/queries"
  sleep "$HOLD" || true
fi
