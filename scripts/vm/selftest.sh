#!/usr/bin/env bash
# Prove the test VM can do what vipd needs: an IPVS fwmark service in one network
# namespace that load-balances real TCP connections to two backends in others.
#
# Usage: scripts/vm/selftest.sh            (boots the VM via run.sh and runs itself there)
#        scripts/vm/run.sh -- scripts/vm/selftest.sh
#
# Topology, all in namespaces of their own (nothing touches the VM's root namespace):
#
#   st-client 10.99.0.2 --+                      IPVS in st-client:
#   st-be1    10.99.0.11 -+-- bridge br0 in st-br  mangle OUTPUT -d VIP -j MARK 0x117
#   st-be2    10.99.0.12 -+                        ipvsadm -A -f 279 -s rr
#                                                  ipvsadm -a -f 279 -r be1|be2 -m
#   VIP 10.99.0.100 (owned by no one: only IPVS answers for it)
#
# Each backend serves its own name with busybox httpd. curl to the VIP from the client
# must alternate between the two, and ipvsadm's stats must show the connections.
# Exits non-zero, with the reason, on any failure.
set -euo pipefail

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)

if [[ "${VIPD_IN_VM:-}" != 1 ]]; then
  exec "$script_dir/run.sh" --timeout 300 -- "$script_dir/selftest.sh" "$@"
fi

readonly VIP=10.99.0.100
readonly MARK=279 # 0x117
readonly CLIENT=10.99.0.2
readonly -a BACKENDS=(10.99.0.11 10.99.0.12)
readonly REQUESTS=4

fail() {
  echo "selftest: FAIL: $*" >&2
  exit 1
}
step() { echo "selftest [${SECONDS}s]: $*"; }

namespaces=(st-br st-client st-be1 st-be2)
httpd_pids=()
www=
# Cheap on purpose (no process per namespace): kill our own httpds, delete the
# namespaces that exist with one `ip -batch`.
cleanup() {
  local ns existing=()
  ((${#httpd_pids[@]} == 0)) || kill "${httpd_pids[@]}" 2>/dev/null || true
  for ns in "${namespaces[@]}"; do
    [[ -e "/run/netns/$ns" ]] && existing+=("$ns")
  done
  ((${#existing[@]} == 0)) || printf 'netns del %s\n' "${existing[@]}" | ip -force -batch - 2>/dev/null || true
  [[ -z "$www" ]] || rm -rf -- "$www"
}
trap cleanup EXIT
cleanup
www=$(mktemp -d)

step "kernel $(uname -r); IPVS: $(head -n 1 /proc/net/ip_vs 2>/dev/null || echo missing)"
[[ -e /proc/net/ip_vs ]] || fail "no IPVS in this kernel (ip_vs not loaded)"

# Under software emulation each process start costs about half a second, so commands
# are grouped: one `ip -batch` per namespace, one shell per namespace for the rest.
step "topology: bridge, client and 2 backend namespaces"
printf 'netns add %s\n' "${namespaces[@]}" | ip -batch -
{
  echo "link set lo up"
  echo "link add br0 type bridge"
  echo "link set br0 up"
  for ns in st-client st-be1 st-be2; do
    echo "link add p-$ns type veth peer name eth0 netns $ns"
    echo "link set p-$ns master br0 up"
  done
} | ip -n st-br -batch -
# configure NS ADDR: loopback and the bridge-side address of one namespace.
configure() {
  printf '%s\n' "link set lo up" "addr add $2/24 dev eth0" "link set eth0 up" | ip -n "$1" -batch -
}
configure st-client "$CLIENT"
configure st-be1 "${BACKENDS[0]}"
configure st-be2 "${BACKENDS[1]}"

step "backends: busybox httpd on port 80"
for i in 1 2; do
  mkdir -p "$www/be$i"
  echo "be$i" >"$www/be$i/index.html"
  # -f: in the foreground, so $! is httpd itself (ip netns exec execs it) and cleanup
  # can stop it.
  ip netns exec "st-be$i" busybox httpd -f -p "${BACKENDS[$((i - 1))]}:80" -h "$www/be$i" &
  httpd_pids+=("$!")
done

# Wait until both answer directly (not through IPVS), so a failure below is IPVS's.
# shellcheck disable=SC2016 # expanded by the inner bash
ip netns exec st-client bash -c '
  for i in 1 2; do
    addr=${!i}
    for _ in $(seq 50); do
      body=$(curl -sf --max-time 2 "http://$addr/") && break
      sleep 0.2
    done
    [[ "${body:-}" == "be$i" ]] || { echo "backend be$i at $addr does not answer directly (got: ${body:-nothing})"; exit 1; }
  done' _ "${BACKENDS[@]}" || fail "backends not reachable"

step "IPVS: fwmark $MARK service with 2 masquerading destinations in the client namespace"
# shellcheck disable=SC2016 # expanded by the inner bash
ip netns exec st-client bash -c '
  set -e
  vip=$1 mark=$2
  shift 2
  iptables -t mangle -A OUTPUT -d "$vip/32" -j MARK --set-mark "$mark"
  ipvsadm -A -f "$mark" -s rr
  for addr in "$@"; do
    ipvsadm -a -f "$mark" -r "$addr" -m
  done
  ipvsadm -Ln' _ "$VIP" "$MARK" "${BACKENDS[@]}" || fail "cannot program the fwmark service"

step "curl to the VIP $VIP, $REQUESTS times"
# One process for all requests: each `ip netns exec` costs about half a second here.
# shellcheck disable=SC2016 # $1 and $2 are expanded by the inner bash
mapfile -t answers < <(
  ip netns exec st-client bash -c '
    for _ in $(seq "$2"); do
      curl -s --max-time 5 "http://$1/" || echo "(no answer)"
    done' _ "$VIP" "$REQUESTS"
)
step "answers: ${answers[*]}"
((${#answers[@]} == REQUESTS)) || fail "expected $REQUESTS answers, got ${#answers[@]}"
for ((i = 0; i < REQUESTS; i++)); do
  [[ "${answers[$i]}" == be1 || "${answers[$i]}" == be2 ]] || fail "request $((i + 1)) got '${answers[$i]}'"
  if ((i > 0)) && [[ "${answers[$i]}" == "${answers[$((i - 1))]}" ]]; then
    fail "round robin did not alternate: ${answers[*]}"
  fi
done

# Every destination must have taken its share of the connections. IPVS refreshes the
# counters it reports from a timer (about every 2 s), so wait for them to catch up.
# shellcheck disable=SC2016 # expanded by the inner bash
stats=$(ip netns exec st-client bash -c '
  for _ in $(seq 10); do
    stats=$(ipvsadm -Ln --stats)
    total=$(awk "\$1 == \"->\" { n += \$3 } END { print n + 0 }" <<<"$stats")
    ((total < $1)) || break
    sleep 1
  done
  echo "$stats"' _ "$REQUESTS")
echo "$stats"
conns=$(awk '$1 == "->" && $2 ~ /^10\.99\./ { print $3 }' <<<"$stats")
[[ "$(wc -l <<<"$conns")" == 2 ]] || fail "expected 2 destinations in the stats, got: $conns"
while read -r n; do
  ((n == REQUESTS / 2)) || fail "expected $((REQUESTS / 2)) connections per destination, got: $(echo "$conns" | tr '\n' ' ')"
done <<<"$conns"

step "PASS"
