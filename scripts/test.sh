#!/usr/bin/env bash
# The whole test suite, as CI runs it (as root):
#   1. formatting, lints, and dependency licences and sources (cargo deny, deny.toml)
#   2. unit tests (pure core, codec against captured bytes, fakes), then a short fuzzing
#      run of the IPVS decoder and the DNS request path (VIPD_FUZZ_SECONDS, default 60)
#   3. host namespace tests (real iptables in fresh namespaces; this kernel has no IPVS)
#   4. the container image, built from the Dockerfile on bases made here
#   5. VM tests: one boot of a kernel with IPVS runs the whole VM suite (the image's test too)
# Any stage that cannot run its environment fails; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

log=$(mktemp -d)/test.log
trap 'echo "test log: $log"' EXIT
stage() { echo; echo "=== $* ==="; }

stage "dependencies"
scripts/setup.sh --deps
# The VM shares this root read-only: what its tests run (dockerd, docker-compose) must be
# installed here first.
scripts/docker/ensure-docker.sh
# Licences and sources of every dependency are checked with cargo-deny (deny.toml).
if ! cargo deny --version >/dev/null 2>&1; then
  echo "installing cargo-deny"
  cargo install cargo-deny --locked
fi

stage "fmt + clippy"
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
# The host and vm suites are `test = false` targets, which --all-targets leaves out.
cargo clippy --test host --test vm --locked -- -D warnings

stage "dependency licences and sources (cargo deny)"
cargo deny --locked check licenses bans sources
if [[ "${VIPD_DENY_ADVISORIES:-0}" == 1 ]]; then
  cargo deny --locked check advisories
fi

stage "unit tests"
cargo test --locked 2>&1 | tee -a "$log"

# The long run is by hand: scripts/fuzz.sh 600 (see README, Tests).
fuzz_s=${VIPD_FUZZ_SECONDS:-60}
stage "fuzzing, short ($fuzz_s s per target)"
scripts/fuzz.sh "$fuzz_s"

stage "host namespace tests"
cargo test --locked --test host -- --test-threads=2 2>&1 | tee -a "$log"

stage "container image (Dockerfile; bases made locally, no registry)"
image_tar=$(realpath -m "${VIPD_CACHE_DIR:-.cache}/image/vipd-image.tar")
scripts/docker/vipd-image.sh "$image_tar"

stage "VM tests (IPVS kernel under qemu)"
# nginx and wrk for the cluster benchmark's test (the VM runs the host's binaries).
scripts/bench/ensure-mesh-deps.sh
cargo build --locked --bin vipd
vm_bin=$(cargo test --locked --test vm --no-run --message-format=json 2>/dev/null |
  jq -r 'select(.reason=="compiler-artifact" and .target.name=="vm" and .executable!=null) | .executable' | tail -n1)
[[ -x "$vm_bin" ]] || { echo "cannot find the vm test binary" >&2; exit 1; }
# VM tests set up topologies with many short processes; two at a time suits 2 vCPUs. The
# cluster tests start three dockerds and etcd members each: the suite takes about 30 min.
scripts/vm/run.sh --timeout "${VIPD_VM_TIMEOUT:-3000}" --env VIPD_IMAGE_TAR="$image_tar" -- \
  "$vm_bin" --test-threads=2 2>&1 | tr -d '\r' | tee -a "$log"

# One closing line for the whole suite.
passed=$(grep -oE 'test result: ok\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -oE '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
echo
echo "suite: $passed passed, $failed failed"
[[ "$failed" == 0 && "$passed" -gt 0 ]]
