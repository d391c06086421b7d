#!/usr/bin/env bash
# A two-minute tour of `vipd apply` / `vipd show` on a kernel with IPVS (as root).
# On a host without IPVS, run it in the test VM:  scripts/vm/run.sh -- scripts/demo.sh
#
# Builds a bridge with a client namespace and three busybox httpd backends, gives the
# client a VIP for them, sends requests through it, shows the kernel state, and removes
# everything again.
set -euo pipefail
cd "$(dirname "$0")/.."
VIPD=${VIPD:-target/release/vipd}
[[ -x "$VIPD" ]] || VIPD=target/debug/vipd
[[ -x "$VIPD" ]] || { echo "build vipd first: scripts/setup.sh" >&2; exit 1; }
[[ -e /proc/net/ip_vs ]] || { echo "this kernel has no IPVS: run scripts/vm/run.sh -- scripts/demo.sh" >&2; exit 1; }

tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for n in demo-sw demo-client demo-b1 demo-b2 demo-b3; do ip netns del "$n" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

ip netns add demo-sw
ip -n demo-sw link add br0 type bridge
ip -n demo-sw link set br0 up
attach() { # namespace address
  ip netns add "$1"
  ip link add "v-$1" type veth peer name eth0 netns "$1"
  ip link set "v-$1" netns demo-sw
  ip -n demo-sw link set "v-$1" master br0 up
  ip -n "$1" addr add "$2/24" dev eth0
  ip -n "$1" link set eth0 up
  ip -n "$1" link set lo up
}
attach demo-client 10.88.0.2
for i in 1 2 3; do
  attach "demo-b$i" "10.88.0.$((2 + i))"
  mkdir -p "$tmp/b$i" && echo "hello from b$i" >"$tmp/b$i/index.html"
  ip netns exec "demo-b$i" busybox httpd -f -p 80 -h "$tmp/b$i" &
  pids+=($!)
done
sleep 1

cat >"$tmp/services.json" <<JSON
{"services":[{"name":"web","vip":"10.88.0.100","fwmark":256,"scheduler":"rr",
  "backends":[{"ip":"10.88.0.3"},{"ip":"10.88.0.4"},{"ip":"10.88.0.5","weight":1}]}]}
JSON

echo "\$ vipd apply --netns demo-client --file services.json"
"$VIPD" apply --netns demo-client --file "$tmp/services.json"
echo
echo "\$ vipd apply ... (again: nothing to do)"
"$VIPD" apply --netns demo-client --file "$tmp/services.json"
echo
echo "\$ curl http://10.88.0.100/  (6 times, from the client namespace)"
for _ in 1 2 3 4 5 6; do ip netns exec demo-client curl -s --max-time 3 http://10.88.0.100/; done
echo
echo "\$ vipd show --netns demo-client"
"$VIPD" show --netns demo-client
echo
echo "\$ ip netns exec demo-client ipvsadm -Ln"
ip netns exec demo-client ipvsadm -Ln
echo
echo "\$ ip netns exec demo-client iptables -t mangle -S VIPD-OUTPUT"
ip netns exec demo-client iptables -t mangle -S VIPD-OUTPUT
echo
echo '$ echo {} | vipd apply --netns demo-client --file -   (remove everything)'
echo '{}' | "$VIPD" apply --netns demo-client --file -
