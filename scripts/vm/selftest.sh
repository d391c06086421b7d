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
step() { echo "selftest: $*"; }

namespaces=(st-br st-client st-be1 st-be2)
www=$(mktemp -d)
cleanup() {
  local ns
  for ns in "${namespaces[@]}"; do
    # Killing the namespace's processes first: httpd would keep it alive.
    ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf -- "$www"
}
trap cleanup EXIT
cleanup
www=$(mktemp -d)

step "kernel $(uname -r); IPVS: $(head -n 1 /proc/net/ip_vs 2>/dev/null || echo missing)"
[[ -e /proc/net/ip_vs ]] || fail "no IPVS in this kernel (ip_vs not loaded)"

step "topology: bridge, client and 2 backend namespaces"
for ns in "${namespaces[@]}"; do
  ip netns add "$ns"
  ip -n "$ns" link set lo up
done
ip -n st-br link add br0 type bridge
ip -n st-br link set br0 up

# attach NS IFNAME ADDR: a veth from the namespace to the bridge.
attach() {
  local ns=$1 addr=$2 port="p-$1"
  ip -n st-br link add "$port" type veth peer name eth0 netns "$ns"
  ip -n st-br link set "$port" master br0 up
  ip -n "$ns" addr add "$addr/24" dev eth0
  ip -n "$ns" link set eth0 up
}
attach st-client "$CLIENT"
attach st-be1 "${BACKENDS[0]}"
attach st-be2 "${BACKENDS[1]}"

step "backends: busybox httpd on port 80"
for i in 1 2; do
  mkdir -p "$www/be$i"
  echo "be$i" >"$www/be$i/index.html"
  ip netns exec "st-be$i" busybox httpd -p "${BACKENDS[$((i - 1))]}:80" -h "$www/be$i"
done

# Wait until both answer directly (not through IPVS) so a failure below is IPVS's.
for i in 1 2; do
  addr=${BACKENDS[$((i - 1))]}
  for _ in $(seq 50); do
    if body=$(ip netns exec st-client curl -sf --max-time 2 "http://$addr/" 2>/dev/null); then
      break
    fi
    sleep 0.2
  done
  [[ "${body:-}" == "be$i" ]] || fail "backend be$i at $addr does not answer directly (got '${body:-}')"
done

step "IPVS: fwmark $MARK service with 2 masquerading destinations in the client namespace"
ip netns exec st-client iptables -t mangle -A OUTPUT -d "$VIP/32" -j MARK --set-mark "$MARK"
ip netns exec st-client ipvsadm -A -f "$MARK" -s rr
for addr in "${BACKENDS[@]}"; do
  ip netns exec st-client ipvsadm -a -f "$MARK" -r "$addr" -m
done
ip netns exec st-client ipvsadm -Ln

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
for _ in $(seq 10); do
  stats=$(ip netns exec st-client ipvsadm -Ln --stats)
  conns=$(awk '$1 == "->" && $2 ~ /^10\.99\./ { print $3 }' <<<"$stats")
  total=$(awk '{ n += $1 } END { print n + 0 }' <<<"$conns")
  ((total < REQUESTS)) || break
  sleep 1
done
echo "$stats"
[[ "$(wc -l <<<"$conns")" == 2 ]] || fail "expected 2 destinations in the stats, got: $conns"
while read -r n; do
  ((n == REQUESTS / 2)) || fail "expected $((REQUESTS / 2)) connections per destination, got: $(echo "$conns" | tr '\n' ' ')"
done <<<"$conns"

step "PASS"
