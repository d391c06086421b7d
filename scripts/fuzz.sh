#!/usr/bin/env bash
# Fuzz vipd's parsers of untrusted bytes with cargo-fuzz (libFuzzer), each for a bounded time:
#   ipvs_decode   IPVS generic netlink messages (src/ipvs/codec.rs)
#   dns_request   DNS queries over UDP: the fast path and the catalog's answers (src/dns/)
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]      (default 600; CI runs fewer, e.g. 60)
#
# Builds the targets (installing cargo-fuzz if missing), runs them one after the other, one
# process each, under nice, and prints per target the runs executed, the seconds, the corpus
# size and whether a crash was found. Exits non-zero when a target crashed (the artifact's
# path is printed; reproduce with `cargo fuzz run TARGET ARTIFACT` from fuzz/ as below) or
# anything could not be built or run.
#
# The stable toolchain builds the targets: cargo-fuzz's nightly flags (-Zsanitizer, ...) are
# allowed with RUSTC_BOOTSTRAP=1. Everything it writes goes under .cache/fuzz/ (seeds,
# corpus, artifacts, logs, and the build unless CARGO_TARGET_DIR says otherwise), plus
# fuzz/Cargo.lock when dependencies change.
#
# Environment: FUZZ_TARGETS (default "ipvs_decode dns_request"), FUZZ_SANITIZER (default
# none: the project forbids unsafe code, and no sanitizer doubles the executions per second;
# "address" for ASan), FUZZ_FRESH=1 to start from the seeds alone instead of the corpus
# kept from earlier runs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

seconds=${1:-600}
[[ "$seconds" =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [SECONDS_PER_TARGET]" >&2; exit 2; }
targets=${FUZZ_TARGETS:-ipvs_decode dns_request}
sanitizer=${FUZZ_SANITIZER:-none}

work=$root/.cache/fuzz
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$work/target}
export RUSTC_BOOTSTRAP=1
mkdir -p "$work"

die() { echo "fuzz: $*" >&2; exit 1; }

# --- cargo-fuzz ----------------------------------------------------------------------------
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  nice -n 10 cargo install cargo-fuzz --locked || die "cannot install cargo-fuzz"
fi
cargo fuzz --version >/dev/null 2>&1 || die "cargo fuzz does not run after installing it (is ~/.cargo/bin on PATH?)"

# --- seeds: one binary file per captured message / query, from the hex files ---------------
hex_to_seeds() { # DIR PATTERN...: every line of every matching file, as one binary seed each
  local dir=$1; shift
  rm -rf "$dir"; mkdir -p "$dir"
  local f
  for f in "$@"; do
    [[ -f "$f" ]] || die "no seed files match $f"
    SEED_DIR=$dir perl -ne '
      chomp; next unless length;
      /^[0-9a-fA-F]+$/ && length() % 2 == 0 or die "$ARGV:$.: not hex\n";
      (my $base = $ARGV) =~ s{.*/}{}; $base =~ s{\.hex$}{};
      open my $out, ">", "$ENV{SEED_DIR}/$base-$.bin" or die "$!\n";
      binmode $out; print $out pack("H*", $_); close $out;
      close ARGV if eof;' "$f" || die "cannot convert $f"
  done
  local n; n=$(find "$dir" -type f | wc -l)
  [[ "$n" -gt 0 ]] || die "no seeds in $dir"
}

seeds_for() {
  case $1 in
    ipvs_decode) hex_to_seeds "$work/seeds/$1" src/ipvs/testdata/*.hex ;;
    dns_request) hex_to_seeds "$work/seeds/$1" fuzz/seeds/dns_request/*.hex ;;
    *) die "unknown target $1" ;;
  esac
}

extra_args() {
  case $1 in
    dns_request) echo "-dict=$root/fuzz/dns_request.dict" ;;
    *) ;;
  esac
}

# --- build ---------------------------------------------------------------------------------
echo "fuzz: building ($targets; sanitizer $sanitizer; target dir $CARGO_TARGET_DIR)"
build_start=$SECONDS
for t in $targets; do
  (cd fuzz && nice -n 10 cargo fuzz build --sanitizer "$sanitizer" "$t") || die "cannot build the fuzz target $t"
done
echo "fuzz: built in $((SECONDS - build_start)) s"

# --- run -----------------------------------------------------------------------------------
summary=()
crashed=0
for t in $targets; do
  seeds_for "$t"
  corpus=$work/corpus/$t
  artifacts=$work/artifacts/$t
  log=$work/logs/$t.log
  [[ "${FUZZ_FRESH:-0}" == 1 ]] && rm -rf "$corpus"
  mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
  before=$(find "$corpus" -type f | wc -l)
  known_artifacts=$(find "$artifacts" -type f | sort)
  nseeds=$(find "$work/seeds/$t" -type f | wc -l)
  echo
  echo "=== $t: $seconds s, $nseeds seeds, corpus of $before ==="
  start=$SECONDS
  status=0
  # One process (no -jobs/-fork), libFuzzer's own output in the log and on stderr.
  # shellcheck disable=SC2046
  (cd fuzz && nice -n 10 cargo fuzz run --sanitizer "$sanitizer" "$t" "$corpus" "$work/seeds/$t" -- \
    -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$artifacts/" $(extra_args "$t")) 2>&1 | tee "$log" || status=$?
  elapsed=$((SECONDS - start))
  after=$(find "$corpus" -type f | wc -l)
  new_artifacts=$(comm -13 <(echo "$known_artifacts") <(find "$artifacts" -type f | sort) | sed '/^$/d')
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -n1)
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" | tail -n1 || true)
  if [[ -n "$new_artifacts" ]]; then
    result="CRASH: $(echo "$new_artifacts" | tr '\n' ' ')"
    crashed=1
  elif [[ "$status" != 0 ]]; then
    die "$t: the fuzzer failed (exit status $status) without an artifact; see $log"
  elif [[ -z "$runs" || "$runs" == 0 ]]; then
    die "$t: no executions reported; see $log"
  else
    result="no crash"
  fi
  line="$t: ${runs:-?} runs in $elapsed s (${rate:-?} exec/s, peak RSS ${rss:-?} MB), corpus $before -> $after inputs, $cov, $result"
  summary+=("$line")
done

echo
echo "=== fuzz summary ($seconds s per target, sanitizer $sanitizer) ==="
printf '%s\n' "${summary[@]}"
if [[ "$crashed" == 1 ]]; then
  echo "reproduce: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer $sanitizer TARGET ARTIFACT)" >&2
  exit 1
fi
