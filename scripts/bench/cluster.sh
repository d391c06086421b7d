#!/usr/bin/env bash
# Benchmark: the cluster (vipd run --etcd) on 3 nodes of the VM harness
# (netns-tests/tests/common/cluster.rs: one network namespace per node with its own
# dockerd, etcd member and vipd, node 3 behind a router). The measurements are the
# test `cluster_bench::cluster_benchmark` (netns-tests/tests/vm/cluster_bench.rs), which this
# script runs with longer rounds than the suite does; each figure is printed on a `bench:` line:
#   (a) data path, client on node1 to 2 nginx tasks on node2 (Debian's nginx, the host's
#       binary bind-mounted into the busybox image: it keeps connections alive, which
#       busybox httpd does not): wrk from the client's sandbox, new connections
#       (`Connection: close`) and keep-alive requests, through the VIP against the same
#       wrk to the two tasks directly; ROUNDS rounds in alternating order, each WARMUP s
#       (discarded) then DURATION s with CONNECTIONS connections (two wrk processes, half
#       each); every round's rate and latency, the ratio of the medians, target >= 0.9.
#       The VIP's connections and the direct ones use disjoint client port ranges: a task
#       keeps a TIME_WAIT for each connection it closed, and a SYN that reuses its 4-tuple
#       from the other target carries another sequence and timestamp base, so the task
#       drops it and the client waits 1 s (over one range, new connections through the VIP
#       fell to 30/s after the first direct round: the benchmark's artifact, not the path).
#   (b) convergence: from `docker run` of a task until it is an IPVS destination in every
#       cluster sandbox of node1 (read from /proc/net/ip_vs, no process per read), a task
#       on node2 against a task on node1, K times each: p50, p99 (nearest rank: with K <
#       100 the maximum) and the ratio of the p99s, target <= 1.5.
#   (c) store load: etcd puts + deletes (etcd_mvcc_put_total, etcd_mvcc_delete_total of a
#       member) for one task start and one stop, with 2 nodes and 1 client sandbox, then
#       with 3 nodes and 5: the same figures mean it does not grow with nodes or sandboxes.
#
# Needs a kernel with IPVS, so it runs in the VM (emulated: compare ratios, not
# absolutes). Run on the host, it installs nginx and wrk there
# (scripts/bench/ensure-mesh-deps.sh), builds, and boots the VM to run itself:
#   scripts/bench/cluster.sh
# Environment: K (5), ROUNDS (3), CONNECTIONS (8), DURATION (5), WARMUP (1), VM_TEST (the
# vm test binary; default the newest target/debug/deps/vm-*), VIPD_TEST_BIN (the vipd
# the nodes run; default the one cargo built with the tests). About 8 minutes with the
# defaults.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
if [[ "${VIPD_IN_VM:-}" != 1 ]]; then
  scripts/bench/ensure-mesh-deps.sh
  cargo build --locked --bin vipd
  cargo test --locked --test vm --no-run
  envs=()
  for v in K ROUNDS CONNECTIONS DURATION WARMUP VM_TEST VIPD_TEST_BIN; do
    [[ -z "${!v:-}" ]] || envs+=(--env "$v=${!v}")
  done
  exec scripts/vm/run.sh --timeout 1800 "${envs[@]}" -- "$0"
fi
[[ -e /proc/net/ip_vs ]] || { echo "this kernel has no IPVS" >&2; exit 1; }
VM_TEST=${VM_TEST:-$(ls -t target/debug/deps/vm-* 2>/dev/null | grep -v '\.d$' | head -n1 || true)}
[[ -x "$VM_TEST" ]] || { echo "build first: cargo test --locked --test vm --no-run (or set VM_TEST)" >&2; exit 1; }
export K=${K:-5} ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-5}
echo "cluster bench: K=$K ROUNDS=$ROUNDS CONNECTIONS=${CONNECTIONS:-8} DURATION=$DURATION, $VM_TEST" >&2
"$VM_TEST" --exact cluster_bench::cluster_benchmark --nocapture --test-threads=1 2>&1 |
  tee /dev/stderr | grep '^bench:' || { echo "cluster bench failed" >&2; exit 1; }
