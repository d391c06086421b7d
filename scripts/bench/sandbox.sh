#!/usr/bin/env bash
# Benchmark: program a fresh sandbox namespace with S services x 3 backends, three ways,
# in one run, and print a table with the ratios:
#   vipd      - `vipd apply` (one netlink socket, one iptables-restore)
#   swarm     - the way Swarm 1.12 did it: one `iptables` process per rule and one
#               `ipvsadm` process per service and per destination
#   oneshot   - the best the standard tools do: one `ipvsadm -R` + one `iptables-restore`
#               of the same state
# Then, with the largest S present, change one backend and show that vipd issues exactly
# the operations for that backend.
#
# Needs a kernel with IPVS; on a host without, run it in the VM:
#   scripts/vm/run.sh --timeout 3000 -- scripts/bench/sandbox.sh [S...]
# (the VM is emulated and ~15-20x slower than the host: compare ratios, not seconds).
# SWARM_MAX caps the S for which the (slow) Swarm way is measured (default: all).
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZES=("${@:-10 100 1000}")
read -r -a SIZES <<<"${SIZES[*]}"
SWARM_MAX=${SWARM_MAX:-1000000}
REPEAT=${REPEAT:-3}
VIPD=${VIPD:-target/release/vipd}
[[ -x "$VIPD" ]] || { echo "build first: cargo build --release" >&2; exit 1; }
[[ -e /proc/net/ip_vs ]] || { echo "this kernel has no IPVS: run it in scripts/vm/run.sh" >&2; exit 1; }

work=$(mktemp -d)
ns=vipd-bench
trap 'ip netns del $ns 2>/dev/null || true; rm -rf "$work"' EXIT

fresh_ns() {
  ip netns del $ns 2>/dev/null || true
  ip netns add $ns
  ip -n $ns link set lo up
  ip -n $ns link add eth0 type dummy
  ip -n $ns addr add 10.80.0.2/15 dev eth0 # VIPs in 10.80/16, backends in 10.81/16
  ip -n $ns link set eth0 up
}

vip() { echo "10.80.$(($1 / 250 + 1)).$(($1 % 250 + 1))"; }
backend() { local k=$((3 * $1 + $2 + 1)); echo "10.81.$((k / 250)).$((k % 250 + 1))"; }

gen() { # S -> services.json, swarm.sh, ipvsadm.rules, iptables.rules
  local s=$1 d=$work/$1 i j
  mkdir -p "$d"
  {
    echo '{"services":['
    for ((i = 0; i < s; i++)); do
      ((i)) && echo ','
      printf '{"name":"svc%d","vip":"%s","fwmark":%d,"backends":[' "$i" "$(vip $i)" $((256 + i))
      printf '{"ip":"%s"},{"ip":"%s"},{"ip":"%s"}]}' "$(backend $i 0)" "$(backend $i 1)" "$(backend $i 2)"
    done
    echo ']}'
  } >"$d/services.json"
  {
    echo 'set -e'
    echo 'iptables -t nat -A POSTROUTING -m ipvs --ipvs -d 10.80.0.0/15 -j SNAT --to-source 10.80.0.2'
    for ((i = 0; i < s; i++)); do
      echo "iptables -t mangle -A OUTPUT -d $(vip $i)/32 -j MARK --set-mark $((256 + i))"
      echo "iptables -t nat -A OUTPUT -p icmp --icmp-type echo-request -d $(vip $i)/32 -j DNAT --to-destination 127.0.0.1"
      echo "ipvsadm -A -f $((256 + i)) -s rr"
      for j in 0 1 2; do echo "ipvsadm -a -f $((256 + i)) -r $(backend $i $j):0 -m -w 1"; done
    done
  } >"$d/swarm.sh"
  {
    for ((i = 0; i < s; i++)); do
      echo "-A -f $((256 + i)) -s rr"
      for j in 0 1 2; do echo "-a -f $((256 + i)) -r $(backend $i $j):0 -m -w 1"; done
    done
  } >"$d/ipvsadm.rules"
  {
    echo '*mangle'
    for ((i = 0; i < s; i++)); do echo "-A OUTPUT -d $(vip $i)/32 -j MARK --set-xmark $((256 + i))/0xffffffff"; done
    echo 'COMMIT'
    echo '*nat'
    echo '-A POSTROUTING -d 10.80.0.0/15 -m ipvs --ipvs -j SNAT --to-source 10.80.0.2'
    for ((i = 0; i < s; i++)); do
      echo "-A OUTPUT -d $(vip $i)/32 -p icmp -m icmp --icmp-type 8 -j DNAT --to-destination 127.0.0.1"
    done
    echo 'COMMIT'
  } >"$d/iptables.rules"
}

now() { date +%s%N; }
ms() { echo $((($2 - $1) / 1000000)); }
median() { tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
check() { # S: the namespace must hold S fwmark services and 3S destinations
  local svcs dests
  svcs=$(ip netns exec $ns ipvsadm -Ln | grep -c '^FWM' || true)
  dests=$(ip netns exec $ns ipvsadm -Ln | grep -c -- '->.*Masq' || true)
  [[ "$svcs" == "$1" && "$dests" == $((3 * $1)) ]] || { echo "bench: expected $1 services/$((3 * $1)) dests, got $svcs/$dests" >&2; exit 1; }
}

declare -A T_VIPD T_SWARM T_ONE
for s in "${SIZES[@]}"; do
  gen "$s"
  d=$work/$s
  runs=()
  for ((r = 0; r < REPEAT; r++)); do
    fresh_ns
    t0=$(now); "$VIPD" apply --netns $ns --file "$d/services.json" >/dev/null; t1=$(now)
    check "$s"; runs+=("$(ms "$t0" "$t1")")
  done
  T_VIPD[$s]=$(echo "${runs[*]}" | median)
  runs=()
  for ((r = 0; r < REPEAT; r++)); do
    fresh_ns
    t0=$(now)
    ip netns exec $ns sh -c "ipvsadm -R <'$d/ipvsadm.rules' && iptables-restore --noflush <'$d/iptables.rules'"
    t1=$(now)
    check "$s"; runs+=("$(ms "$t0" "$t1")")
  done
  T_ONE[$s]=$(echo "${runs[*]}" | median)
  if ((s <= SWARM_MAX)); then
    fresh_ns
    t0=$(now); ip netns exec $ns bash "$d/swarm.sh"; t1=$(now)
    check "$s"; T_SWARM[$s]=$(ms "$t0" "$t1")
  else
    T_SWARM[$s]=-
  fi
  echo "bench: S=$s vipd ${T_VIPD[$s]} ms, one-shot ${T_ONE[$s]} ms, swarm ${T_SWARM[$s]} ms" >&2
done

echo
echo "Programming a fresh sandbox: S services x 3 backends (ms; vipd and one-shot: median of $REPEAT)"
printf '| %5s | %10s | %12s | %10s | %12s | %14s |\n' S "vipd apply" "swarm way" "one-shot" "swarm / vipd" "vipd / one-shot"
printf '|%s|%s|%s|%s|%s|%s|\n' ------- ------------ -------------- ------------ -------------- ----------------
for s in "${SIZES[@]}"; do
  v=${T_VIPD[$s]} o=${T_ONE[$s]} w=${T_SWARM[$s]}
  ((v > 0)) || v=1
  ((o > 0)) || o=1
  if [[ "$w" == - ]]; then sw=-; else sw=$(awk -v a="$w" -v b="$v" 'BEGIN {printf "%.1fx", a / b}'); fi
  printf '| %5s | %10s | %12s | %10s | %12s | %14s |\n' "$s" "$v" "$w" "$o" "$sw" \
    "$(awk -v a="$v" -v b="$o" 'BEGIN {printf "%.2fx", a / b}')"
done

# With the largest S programmed by vipd, move one backend of one service.
s=${SIZES[-1]}
d=$work/$s
fresh_ns
"$VIPD" apply --netns $ns --file "$d/services.json" >/dev/null
sed "s/\"$(backend 7 1)\"/\"10.81.250.250\"/" "$d/services.json" >"$d/changed.json"
t0=$(now); out=$("$VIPD" apply --netns $ns --file "$d/changed.json"); t1=$(now)
echo
echo "With $s services present, one backend of svc7 replaced ($(ms "$t0" "$t1") ms):"
echo "$out" | sed 's/^/    /'
want="ipvsadm -d -f 263 -r $(backend 7 1):0
ipvsadm -a -f 263 -r 10.81.250.250:0 -m -w 1
applied 2 operations"
[[ "$out" == "$want" ]] || { echo "bench: expected exactly the operations for that backend" >&2; exit 1; }
