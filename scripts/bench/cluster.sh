#!/usr/bin/env bash
# Benchmark: the cluster (vipd run --etcd) on 3 nodes of the VM harness
# (netns-tests/tests/common/cluster.rs: one network namespace per node with its own
# dockerd, etcd member and vipd, node 3 behind a router). The measurements are the
# ignored test `cluster::cluster_benchmark` (netns-tests/tests/vm/cluster.rs), which this
# script runs; each figure is printed on a `bench:` line:
#   (a) data path, client on node1 to 2 busybox httpd tasks on node2: new connections/s
#       (Connection: close) and keep-alive requests/s through the VIP, against the same
#       client to the tasks directly, in the same run; one curl process each, N requests
#       (sequential: the rate is the inverse of a request's latency); ratio, target >= 0.9.
#   (b) convergence: from `docker run` of a task until it is an IPVS destination in every
#       cluster sandbox of node1 (read from /proc/net/ip_vs, no process per read), a task
#       on node2 against a task on node1, K times each: p50, p99 (nearest rank: with K <
#       100 the maximum) and the ratio of the p99s, target <= 1.5.
#   (c) store load: etcd puts + deletes (etcd_mvcc_put_total, etcd_mvcc_delete_total of a
#       member) for one task start and one stop, with 2 nodes and 1 client sandbox, then
#       with 3 nodes and 5: the same figures mean it does not grow with nodes or sandboxes.
#
# Needs a kernel with IPVS, so in the VM (emulated: compare ratios, not absolutes):
#   cargo build --locked --bin vipd && cargo test --locked --test vm --no-run
#   scripts/vm/run.sh --timeout 1800 -- scripts/bench/cluster.sh
# Environment: K (default 5), N (default 500), VM_TEST (the vm test binary; default the
# newest target/debug/deps/vm-*).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
[[ -e /proc/net/ip_vs ]] || { echo "this kernel has no IPVS: run it in scripts/vm/run.sh" >&2; exit 1; }
VM_TEST=${VM_TEST:-$(ls -t target/debug/deps/vm-* 2>/dev/null | grep -v '\.d$' | head -n1 || true)}
[[ -x "$VM_TEST" ]] || { echo "build first: cargo test --locked --test vm --no-run (or set VM_TEST)" >&2; exit 1; }
export K=${K:-5} N=${N:-500}
echo "cluster bench: K=$K N=$N, $VM_TEST" >&2
"$VM_TEST" --ignored --exact cluster::cluster_benchmark --nocapture --test-threads=1 2>&1 |
  tee /dev/stderr | grep '^bench:' || { echo "cluster bench failed" >&2; exit 1; }
