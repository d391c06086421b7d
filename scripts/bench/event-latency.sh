#!/usr/bin/env bash
# Benchmark: how long after a task container starts is it a backend in EVERY sandbox on
# its network, with S services present (S = 10 and 100 by default, in the same run)?
#
# Setup (private dockerd, busybox image, one user bridge network "vbench"):
#   S services, each one task container (`sleep`) labelled vipd.service=svcN, plus
#   CLIENTS plain containers; `vipd run` follows the dockerd. The services are created
#   with vipd stopped and vipd is (re)started for each S, so both sizes are measured
#   against a vipd that did one full resync and then only follows events.
#   With PAD=1 (the default) the number of sandboxes is the same at every S: plain "pad"
#   containers stand in for the services the largest S has and a smaller one lacks (at
#   S=10 of 10 100: 90 pads), so only the number of services changes between sizes.
#   PAD=0 measures without them: then a larger S also means more sandboxes.
# Measured, K times per S, one at a time: `docker run` of one more task of svc1, with a
#   fixed address (--ip), then
#     start  = the container's start event (`docker events`, .TimeNano, dockerd's clock)
#     done   = the last moment at which a sandbox of the network was first seen holding
#              the new address as an IPVS destination
#     latency = done - start, over every sandbox that existed before the task (tasks and
#              clients); the new task's own sandbox must hold it too, but is not timed
#              (its pid is known only after `docker run` returns).
#   A poller (examples/ipvs_poll.rs: one process, one netlink socket per sandbox, kept)
#   asks every sandbox in a loop for the destinations of svc1's fwmark service, as
#   `ipvsadm -Ln` does. A sighting at time t is bracketed by that sandbox's previous read
#   at t_prev: the printed resolution is the median and the maximum of t - t_prev. (The
#   poller busy-loops on one of the VM's 2 vCPUs during each measurement, at every S.)
#   Not /proc/PID/net/ip_vs: with ~100 services in ~100 namespaces a read of it stops
#   after its first page (about 50 services), so it can never show some destinations.
# With scripts/vm/run.sh --out DIR, vipd's log, the start events and the sightings are
# kept in DIR/event-latency/.
# Prints p50 and p99 (nearest rank: with K < 100 samples, p99 is the maximum) per S and
# the ratio of the p99s.
#
# Needs a kernel with IPVS; on a host without, in the VM (emulated: compare ratios):
#   cargo build --release --bin vipd --example ipvs_poll
#   scripts/vm/run.sh --timeout 7200 --mem 4096 -- scripts/bench/event-latency.sh [S...]
# Environment: K (default 10), CLIENTS (3), PAD (1), PARALLEL (container starts at once, 4),
# VIPD (default target/release/vipd), POLLER (default target/release/examples/ipvs_poll:
# cargo build --release --example ipvs_poll), VIPD_RUN_ARGS (extra `vipd run` arguments),
# SETTLE_TIMEOUT (seconds for vipd to program everything, 900), TASK_TIMEOUT (seconds
# for one new task to reach every sandbox, 300).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
SIZES=("${@:-10 100}")
read -r -a SIZES <<<"${SIZES[*]}"
K=${K:-10}
CLIENTS=${CLIENTS:-3}
PAD=${PAD:-1}
PARALLEL=${PARALLEL:-4}
VIPD=${VIPD:-target/release/vipd}
POLLER=${POLLER:-target/release/examples/ipvs_poll}
VIPD_RUN_ARGS=${VIPD_RUN_ARGS:-}
SETTLE_TIMEOUT=${SETTLE_TIMEOUT:-900}
TASK_TIMEOUT=${TASK_TIMEOUT:-300}
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
[[ -x "$VIPD" ]] || { echo "build first: cargo build --release (or set VIPD)" >&2; exit 1; }
VIPD=$(cd "$(dirname "$VIPD")" && pwd)/$(basename "$VIPD")
[[ -x "$POLLER" ]] || { echo "build first: cargo build --release --example ipvs_poll (or set POLLER)" >&2; exit 1; }
[[ -e /proc/net/ip_vs ]] || { echo "this kernel has no IPVS: run it in scripts/vm/run.sh" >&2; exit 1; }
# shellcheck source=scripts/docker/lib.sh
. scripts/docker/lib.sh
docker=$(docker_cli)
IMAGE=vipd-test/busybox:latest
NET=vbench
SUBNET=10.211.0.0/16    # automatic addresses from 10.211.0.0/17, the measured tasks 10.211.200.x
RANGE=10.211.0.0/17

work=$(mktemp -d)
dockerd_dir=$work/d
vipd_pid='' poller_pid='' events_pid=''
cleanup() {
  local rc=$?
  for p in $poller_pid $events_pid $vipd_pid; do kill "$p" 2>/dev/null || true; done
  for p in $poller_pid $events_pid $vipd_pid; do wait "$p" 2>/dev/null || true; done
  if [[ -n "${VIPD_VM_OUT:-}" && -d "$VIPD_VM_OUT" ]]; then
    mkdir -p "$VIPD_VM_OUT/event-latency"
    cp "$work"/{vipd.log,events,seen} "$VIPD_VM_OUT/event-latency/" 2>/dev/null || true
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
d() { timeout 300 "$docker" "$@"; }

# --- dockerd, image, network ------------------------------------------------------------
eval "$(scripts/docker/dockerd-start.sh "$dockerd_dir")"
export DOCKER_HOST
scripts/docker/busybox-image.sh "$IMAGE"
d network create --subnet "$SUBNET" --ip-range "$RANGE" "$NET" >/dev/null

# Start containers, PARALLEL at a time. Args: NAME:LABEL... (LABEL may be empty).
start_containers() {
  local spec name label args running=()
  for spec in "$@"; do
    name=${spec%%:*} label=${spec#*:}
    args=(run -d --name "$name" --network "$NET")
    [[ -z "$label" ]] || args+=(--label "vipd.service=$label")
    d "${args[@]}" "$IMAGE" sleep 100000 >/dev/null &
    running+=($!)
    if ((${#running[@]} >= PARALLEL)); then
      wait "${running[0]}" || die "docker run failed"
      running=("${running[@]:1}")
    fi
  done
  for p in "${running[@]}"; do wait "$p" || die "docker run failed"; done
}

# Pids of the running containers on the network, one per line (their sandboxes).
sandbox_pids() {
  local ids
  mapfile -t ids < <(d ps -q --filter "network=$NET")
  ((${#ids[@]})) && d inspect -f '{{.State.Pid}}' "${ids[@]}"
}

hex_ip() { local a b c e; IFS=. read -r a b c e <<<"$1"; printf '%02X%02X%02X%02X' "$a" "$b" "$c" "$e"; }

# "SERVICES DESTINATIONS" of the IPVS table of PID's network namespace, over netlink.
ipvs_counts() {
  nsenter -t "$1" -n ipvsadm -Ln 2>/dev/null | awk '/^FWM/ {s++} / -> .*Masq/ {d++} END {print s + 0, d + 0}'
}

# Wait until every sandbox holds exactly $1 fwmark services and $2 destinations.
settle() {
  local want_svc=$1 want_dst=$2 start=$SECONDS last_note=$SECONDS pids bad
  while :; do
    mapfile -t pids < <(sandbox_pids)
    bad=$(for pid in "${pids[@]}"; do echo "$pid $(ipvs_counts "$pid")"; done | awk -v s="$want_svc" -v n="$want_dst" '$2 != s || $3 != n { b++; ex = $1 " " $2 "/" $3 } END { print b + 0, ex }')
    if [[ "$bad" == 0* ]]; then
      log "settled: ${#pids[@]} sandboxes with $want_svc services, $want_dst destinations ($(awk '/MemAvailable/ {printf "%d MB", $2 / 1024}' /proc/meminfo) available)"
      return
    fi
    if ((SECONDS - last_note >= 60)); then
      last_note=$SECONDS
      log "settling: ${bad%% *} of ${#pids[@]} sandboxes not there yet (e.g. ${bad#* })"
    fi
    ((SECONDS - start < SETTLE_TIMEOUT)) || { settle_report "$want_svc" "$want_dst" "${pids[@]}"; die "after ${SETTLE_TIMEOUT}s, sandboxes not at $want_svc services/$want_dst destinations (count, e.g.: $bad)"; }
    sleep 2
  done
}

# What a failed settle() saw: some sandboxes' counts, vipd's own view and its log.
settle_report() {
  local want_svc=$1 want_dst=$2 pid n=0
  shift 2
  log "settle: want $want_svc services/$want_dst destinations in each of $# sandboxes; containers running: $(d ps -q | wc -l)"
  for pid in "$@"; do
    echo "  pid $pid: $(ipvs_counts "$pid") (services, destinations)" >&2
    ((++n < 8)) || break
  done
  log "settle: vipd status (first 20 lines) and --sandboxes (first 10):"
  { "$VIPD" status 2>&1 | head -n 20; "$VIPD" status --sandboxes 2>&1 | head -n 10; } >&2
  log "settle: vipd log tail:"
  tail -n 40 "$work/vipd.log" >&2
}

start_vipd() {
  # shellcheck disable=SC2086 # VIPD_RUN_ARGS is a list of words
  # In dockerd's namespace, where a host's vipd runs (Docker's bridges are there).
  nsenter --net="$VIPD_DOCKER_NETNS" -- "$VIPD" run --state-dir "$work/state" $VIPD_RUN_ARGS >>"$work/vipd.log" 2>&1 &
  vipd_pid=$!
  log "vipd run started (pid $vipd_pid)"
}
stop_vipd() {
  kill "$vipd_pid" 2>/dev/null || true
  wait "$vipd_pid" 2>/dev/null || true
  vipd_pid=''
}

# --- the poller: examples/ipvs_poll.rs (see the header), started once svc1's fwmark is known.
start_poller() {
  local mark
  mark=$("$VIPD" status --json | jq -r '.services[] | select(.name == "svc1") | .fwmark')
  [[ "$mark" =~ ^[0-9]+$ ]] || die "no fwmark for svc1 in vipd status: '$mark'"
  "$POLLER" "$work" "$mark" 2>>"$work/poller.err" &
  poller_pid=$!
}

# --- events -----------------------------------------------------------------------------
"$docker" events --filter type=container --filter event=start --format '{{.ID}} {{.TimeNano}}' \
  >"$work/events" 2>"$work/events.err" &
events_pid=$!

: >"$work/pids"
: >"$work/target"
: >"$work/seen"

pads=0
((PAD)) && pads=$((SIZES[-1] - SIZES[0]))
mapfile -t specs < <(for ((c = 1; c <= CLIENTS; c++)); do echo "client$c:"; done
  for ((p = 1; p <= pads; p++)); do echo "pad$p:"; done)
start_containers "${specs[@]}"
log "$CLIENTS clients and $pads pads started"

have=0 round=0
declare -A SANDBOXES
for s in "${SIZES[@]}"; do
  ((s > have)) || die "sizes must grow: $s after $have"
  # The pads this size's services replace.
  keep=0
  ((PAD)) && keep=$((SIZES[-1] - s))
  if ((pads > keep)); then
    mapfile -t gone < <(for ((p = keep + 1; p <= pads; p++)); do echo "pad$p"; done)
    d rm -f "${gone[@]}" >/dev/null
    log "$((pads - keep)) pads removed"
    pads=$keep
  fi
  t=$EPOCHREALTIME
  mapfile -t specs < <(for ((i = have + 1; i <= s; i++)); do echo "svc$i-t:svc$i"; done)
  start_containers "${specs[@]}"
  log "services svc$((have + 1))..svc$s started ($(awk -v a="$t" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.0f", b - a}') s)"
  have=$s
  start_vipd
  settle "$s" "$s"
  [[ -n "$poller_pid" ]] || start_poller

  lat=()
  new_ids=()
  for ((k = 1; k <= K; k++)); do
    round=$((round + 1))
    ip=10.211.200.$round
    hex=$(hex_ip "$ip")
    mapfile -t pids < <(sandbox_pids)
    printf '%s\n' "${pids[@]}" >"$work/pids"
    echo "$hex" >"$work/target"
    id=$(d run -d --network "$NET" --ip "$ip" --label vipd.service=svc1 --name "new$round" "$IMAGE" sleep 100000)
    new_ids+=("$id")
    own_pid=$(d inspect -f '{{.State.Pid}}' "$id")
    echo "$own_pid" >>"$work/pids"
    # The start event, and every sandbox's sighting.
    want=$((${#pids[@]} + 1)) waited=$SECONDS
    while :; do
      ev=$(awk -v id="$id" '$1 == id {print $2; exit}' "$work/events")
      got=$(awk -v h="$hex" '$1 == h' "$work/seen" | wc -l)
      [[ -n "$ev" && "$got" -ge "$want" ]] && break
      ((SECONDS - waited < TASK_TIMEOUT)) || die "task new$round ($ip): start event '${ev}', seen in $got of $want sandboxes after ${TASK_TIMEOUT}s; vipd log tail:
$(tail -n 30 "$work/vipd.log")"
      sleep 0.5
    done
    read -r l r < <(awk -v h="$hex" -v ev="$ev" -v own="$own_pid" '
      $1 == h && $2 != own { t = $3 - ev / 1e9; if (t > m) m = t
                             if ($4 != "" && $3 - $4 > r) r = $3 - $4 }
      END { printf "%.3f %.3f\n", m, r }' "$work/seen")
    lat+=("$l")
    log "S=$s task $k/$K ($ip): in all ${#pids[@]} other sandboxes (and its own) $l s after its start event (resolution $r s)"
  done
  printf '%s\n' "${lat[@]}" >"$work/lat.$s"
  SANDBOXES[$s]=${#pids[@]}
  : >"$work/target"
  stop_vipd
  d rm -f "${new_ids[@]}" >/dev/null
done

pct() { sort -n "$1" | awk -v q="$2" '{a[NR] = $1} END {i = int(q * NR); if (i < q * NR) i++; if (i < 1) i = 1; print a[i]}'; }
# Sightings' brackets over the whole run: t - t_prev for every sighting with a previous read.
read -r res_med res_max < <(awk '$4 != "" {print $3 - $4}' "$work/seen" | sort -n |
  awk '{a[NR] = $1} END {printf "%.3f %.3f\n", a[int((NR + 1) / 2)], a[NR]}')

echo
echo "Start event -> new task's address an IPVS destination in every sandbox of the network"
echo "(K=$K new tasks of svc1 per S, one at a time; seconds; p99 = nearest rank, i.e. the max for K<100)"
echo "resolution: a sighting is bracketed by the sandbox's previous read: median $res_med s, max $res_max s"
printf '| %5s | %9s | %8s | %8s |\n' S sandboxes p50 p99
printf '|%s|%s|%s|%s|\n' ------- ----------- ---------- ----------
for s in "${SIZES[@]}"; do
  printf '| %5s | %9s | %8s | %8s |\n' "$s" "${SANDBOXES[$s]}" "$(pct "$work/lat.$s" 0.5)" "$(pct "$work/lat.$s" 0.99)"
done
lo=${SIZES[0]} hi=${SIZES[-1]}
echo "p99 ratio S=$hi / S=$lo: $(awk -v a="$(pct "$work/lat.$hi" 0.99)" -v b="$(pct "$work/lat.$lo" 0.99)" 'BEGIN {printf "%.2fx", a / b}') (target <= 2x)"
echo "samples (s):"
for s in "${SIZES[@]}"; do echo "  S=$s: $(tr '\n' ' ' <"$work/lat.$s")"; done
grep -E 'WARN|ERROR' "$work/vipd.log" | tail -n 20 | sed 's/^/vipd: /' || true
