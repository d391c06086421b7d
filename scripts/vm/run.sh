#!/usr/bin/env bash
# Run one command inside a throwaway qemu VM whose kernel has IPVS.
#
# The build machine's kernel has no IPVS and cannot load modules, so tests that program
# IPVS run here: Debian's generic kernel boots under software emulation with the host's
# own root filesystem shared read-only over 9p, so the guest runs the very binaries the
# host just built. scripts/vm/README.md has the layout, timings and kernel facts.
#
# Usage: scripts/vm/run.sh [OPTIONS] -- COMMAND [ARGS...]
#   --timeout SECONDS  guest watchdog: power off after this long (default 600); the host
#                      kills qemu if the guest has not stopped 90 s later
#   --mem MB           guest memory (default 2048)
#   --out DIR          host directory shared writable with the guest; the command sees
#                      it as $VIPD_VM_OUT (default: a temporary directory, removed after)
#   --env NAME=VALUE   extra environment for the command (repeatable)
#   --verbose          show the kernel console and boot messages live (also
#                      VIPD_VM_VERBOSE=1)
#
# Environment: VIPD_CACHE_DIR (default <repo>/.cache) holds the kernel and initramfs;
# VIPD_VM_BOOT_TIMEOUT: seconds the guest may take to start its init (default 120);
# VIPD_VM_CPU overrides qemu's -cpu (default max); VIPD_VM_APPEND adds kernel parameters.
#
# In the guest, COMMAND runs as root with cwd = the host's current directory (same
# path), PATH like the host's (plus cargo's bin directory), HOME as on the host, VIPD_IN_VM=1,
# VIPD_VM_OUT, RUST_BACKTRACE=1, and CI / RUST_LOG passed through when set. Its stdout and
# stderr appear on this script's stdout, live; the harness's own messages (one timing
# line, failures) go to stderr.
#
# Exit status: COMMAND's own; 124 if it timed out; 125 if the VM failed (did not boot,
# died, or reported no status). Never 0 without the guest's report of a 0 status.
#
# Prepares what it needs on first use (cached afterwards): ensure-deps.sh,
# fetch-kernel.sh, mkinitramfs.sh.
set -euo pipefail

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd -- "$script_dir/../.." && pwd)
cache_dir="${VIPD_CACHE_DIR:-$repo_dir/.cache}/vm"

# Seconds the host allows on top of --timeout for boot, module loading and power off
# (measured: about 10 s together), before it kills qemu itself.
readonly BOOT_GRACE=90
# Seconds until the guest's init must have started (booting takes 5-10 s; far more
# means a hang, reported now rather than after --timeout). VIPD_VM_BOOT_TIMEOUT
# overrides it.
readonly BOOT_DEADLINE=${VIPD_VM_BOOT_TIMEOUT:-120}
readonly EXIT_TIMEOUT=124
readonly EXIT_VM_FAILED=125

log() { echo "vipd-vm: $*" >&2; }

usage() {
  sed -n '/^# Usage:/,/^# fetch-kernel.sh/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit "${1:-2}"
}

timeout_s=600
mem_mb=2048
out_dir=
verbose=${VIPD_VM_VERBOSE:-0}
extra_env=()
while (($# > 0)); do
  case "$1" in
    --timeout) timeout_s=${2:?--timeout needs SECONDS}; shift 2 ;;
    --timeout=*) timeout_s=${1#*=}; shift ;;
    --mem) mem_mb=${2:?--mem needs MB}; shift 2 ;;
    --mem=*) mem_mb=${1#*=}; shift ;;
    --out) out_dir=${2:?--out needs DIR}; shift 2 ;;
    --out=*) out_dir=${1#*=}; shift ;;
    --env) extra_env+=("${2:?--env needs NAME=VALUE}"); shift 2 ;;
    --env=*) extra_env+=("${1#*=}"); shift ;;
    --verbose) verbose=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    -*) log "unknown option: $1"; usage ;;
    *) break ;;
  esac
done
(($# > 0)) || { log "no command given"; usage; }
[[ "$timeout_s" =~ ^[1-9][0-9]*$ ]] || { log "--timeout must be a positive number of seconds"; exit 2; }
[[ "$mem_mb" =~ ^[1-9][0-9]*$ ]] || { log "--mem must be a number of megabytes"; exit 2; }
for kv in "${extra_env[@]}"; do
  [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || { log "--env wants NAME=VALUE, got: $kv"; exit 2; }
done
# The guest finds its init through the kernel command line, which splits on spaces.
[[ "$script_dir" != *[[:space:]\"]* ]] || { log "the repository path must not contain spaces or quotes: $script_dir"; exit 2; }

# --- Prepare (cached after the first run) -----------------------------------------
"$script_dir/ensure-deps.sh"
mkdir -p "$cache_dir"
# Serialise concurrent first runs on the same cache (download, initramfs build).
exec {lock_fd}>"$cache_dir/.prepare.lock"
flock "$lock_fd"
kernel_dir=$("$script_dir/fetch-kernel.sh")
initrd=$("$script_dir/mkinitramfs.sh" "$kernel_dir")
flock -u "$lock_fd"
exec {lock_fd}>&-
release=$(basename -- "$kernel_dir")
# The uncompressed ELF kernel boots through PVH, about 5 s faster than the bzImage
# under emulation (see fetch-kernel.sh); the bzImage is the fallback.
kernel_image="$kernel_dir/boot/vmlinux-$release"
[[ -f "$kernel_image" ]] || kernel_image="$kernel_dir/boot/vmlinuz-$release"

# --- Per-run directories ------------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/vipd-vm.XXXXXX")
ctl="$work/ctl"          # shared with the guest: config, cmd.sh, status, timings
console_log="$work/console.log"
mkdir -p "$ctl"
if [[ -n "$out_dir" ]]; then
  mkdir -p -- "$out_dir"
  out_dir=$(cd -- "$out_dir" && pwd)
else
  out_dir="$work/out"
  mkdir -p "$out_dir"
fi

qemu_pid=
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  if [[ -n "$qemu_pid" ]] && kill -0 "$qemu_pid" 2>/dev/null; then
    kill "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
  fi
  rm -rf -- "$work"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM HUP

# What the guest's init reads (sourced by its shell: values quoted with %q).
{
  printf 'VIPD_VM_KDIR=%q\n' "$kernel_dir"
  printf 'VIPD_VM_TIMEOUT=%q\n' "$timeout_s"
  printf 'VIPD_VM_HOSTNAME=%q\n' "vipd-vm"
} >"$ctl/config"

# The command, as a script in the share rather than on the kernel command line, so any
# argument survives quoting. The guest runs it under `env -i`: this is its whole
# environment.
guest_path=$PATH
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
[[ ":$guest_path:" == *:"$cargo_bin":* ]] || guest_path="$cargo_bin:$guest_path"
{
  echo '# Written by scripts/vm/run.sh; run by scripts/vm/guest-init.sh in the VM.'
  printf 'cd -- %q || { echo "vipd-vm: cannot cd to %q in the guest (a tmpfs such as /var/tmp hides it there)" >&2; exit %d; }\n' \
    "$PWD" "$PWD" "$EXIT_VM_FAILED"
  printf 'export PATH=%q\n' "$guest_path"
  printf 'export HOME=%q LANG=C.UTF-8 TERM=dumb\n' "$HOME"
  echo 'export VIPD_IN_VM=1 VIPD_VM_OUT=/run/vipd-vm/out RUST_BACKTRACE=1'
  for name in CI RUST_LOG; do
    if [[ -n "${!name+set}" ]]; then
      printf 'export %s=%q\n' "$name" "${!name}"
    fi
  done
  for kv in "${extra_env[@]}"; do
    printf 'export %s=%q\n' "${kv%%=*}" "${kv#*=}"
  done
  printf 'exec'
  printf ' %q' "$@"
  printf '\n'
} >"$ctl/cmd.sh"

# qemu's -virtfs takes comma-separated options: a comma in a path is written ",,".
virtfs_path() { printf '%s' "${1//,/,,}"; }

if [[ "$verbose" == 1 ]]; then
  # Kernel console on the same port as the command's output, so both show live.
  kernel_console="console=ttyS1 loglevel=6"
else
  kernel_console="console=ttyS0 quiet"
fi
# Kernel words that speed up boot under emulation or silence irrelevant probing:
#   mitigations=off   no speculative-execution workarounds (pure overhead under TCG)
#   cryptomgr.notests no crypto self-tests at boot (about 0.5 s under emulation)
#   i8042.*           no PS/2 controller probing (there is none, and it waits)
#   panic=-1          reboot at once on panic; with -no-reboot qemu then exits
cmdline="$kernel_console panic=-1 mitigations=off cryptomgr.notests i8042.noaux i8042.nokbd i8042.nopnp"
cmdline+=" VIPD_VM_INIT=$script_dir/guest-init.sh"
# Extra kernel parameters for debugging (e.g. initcall_debug).
[[ -z "${VIPD_VM_APPEND:-}" ]] || cmdline+=" $VIPD_VM_APPEND"

# shellcheck disable=SC2054 # the commas are qemu's option syntax, not array separators
qemu=(
  qemu-system-x86_64
  -nodefaults -no-user-config -no-reboot
  # KVM exists here but is nested and far slower than software emulation. -cpu max:
  # every instruction set extension qemu emulates, so host binaries built for newer
  # CPUs still run (VIPD_VM_CPU overrides it, e.g. qemu64, for experiments).
  -accel tcg,thread=multi -cpu "${VIPD_VM_CPU:-max}" -smp 2 -m "$mem_mb"
  # q35, not the default pc: on pc, probing the virtio PCI devices took 1.4-2.3 s of
  # boot; on q35 (PCI Express, MMCONFIG) 0.03-0.1 s.
  -machine q35
  -display none -monitor none
  -nic none
  -device virtio-rng-pci
  -kernel "$kernel_image" -initrd "$initrd" -append "$cmdline"
  # ttyS0: kernel console, kept in a file and shown only when something goes wrong.
  -serial "file:$console_log"
  # ttyS1: the command's stdout/stderr, live.
  -serial stdio
  # The host's root, read-only; multidevs=remap keeps inode numbers of different host
  # filesystems from colliding in the guest.
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap
  -virtfs "local,path=$(virtfs_path "$ctl"),mount_tag=vipdctl,security_model=none"
  -virtfs "local,path=$(virtfs_path "$out_dir"),mount_tag=vipdout,security_model=none"
)

host_timeout=$((timeout_s + BOOT_GRACE))
start=$SECONDS
# In the background so a trapped signal interrupts `wait` and cleanup kills qemu.
# stdin is /dev/null: qemu must not put a terminal into raw mode or read from it.
timeout --kill-after=10 "$host_timeout" "${qemu[@]}" </dev/null &
qemu_pid=$!
# Boot watchdog: stop qemu if the guest's init has not announced itself in time.
(
  for ((i = 0; i < BOOT_DEADLINE; i++)); do
    [[ -e "$ctl/started" ]] && exit 0
    kill -0 "$qemu_pid" 2>/dev/null || exit 0
    sleep 1
  done
  : >"$work/boot-timeout"
  kill "$qemu_pid" 2>/dev/null
) &
watcher_pid=$!
qemu_rc=0
wait "$qemu_pid" || qemu_rc=$?
qemu_pid=
kill "$watcher_pid" 2>/dev/null || true
wait "$watcher_pid" 2>/dev/null || true
elapsed=$((SECONDS - start))

show_console() {
  if [[ -s "$console_log" ]]; then
    log "last kernel console lines:"
    tail -n 40 -- "$console_log" | tr -d '\r' | sed 's/^/  | /' >&2
  fi
}

status=
[[ -f "$ctl/status" ]] && status=$(<"$ctl/status")

if [[ -f "$ctl/timings" ]]; then
  # Guest clock: kernel start to guest init; guest init to the command (mounts and
  # modprobe overlapped); modprobe alone; the command.
  read -r t_boot t_setup t_modules t_command <"$ctl/timings" || true
  log "boot ${t_boot#*=} s, setup ${t_setup#*=} s (modules ${t_modules#*=} s), command ${t_command#*=} s; wall ${elapsed} s from qemu start to exit"
fi

case "$status" in
  '')
    if [[ -e "$work/boot-timeout" ]]; then
      log "the VM did not boot within ${BOOT_DEADLINE}s (its init never started): killed"
      show_console
      exit "$EXIT_VM_FAILED"
    fi
    if ((qemu_rc == 124 || qemu_rc == 137)); then
      log "the VM did not stop within ${host_timeout}s (--timeout $timeout_s + ${BOOT_GRACE}s for boot): killed"
      show_console
      exit "$EXIT_TIMEOUT"
    fi
    log "the VM stopped without reporting the command's exit status (qemu exit $qemu_rc after ${elapsed}s): it did not boot or the guest init failed"
    show_console
    exit "$EXIT_VM_FAILED"
    ;;
  timeout)
    log "the command did not finish within --timeout ${timeout_s}s (stopped by the guest watchdog)"
    exit "$EXIT_TIMEOUT"
    ;;
  error:*)
    log "guest setup failed: ${status#error: }"
    show_console
    exit "$EXIT_VM_FAILED"
    ;;
  *)
    if [[ "$status" =~ ^[0-9]+$ ]]; then
      exit "$status"
    fi
    log "unreadable status from the guest: $status"
    exit "$EXIT_VM_FAILED"
    ;;
esac
