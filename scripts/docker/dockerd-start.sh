#!/usr/bin/env bash
# Start a private dockerd whose everything lives under DIR, and wait until it answers.
#
# Usage: scripts/docker/dockerd-start.sh DIR
#
# Prints, on stdout, exactly two lines for the caller to use (or `eval`):
#   DOCKER_HOST=unix://DIR/docker.sock
#   VIPD_DOCKER_NETNS=/run/netns/vipd-docker-<hash of DIR>
# Progress and errors go to stderr. Idempotent: when DIR's dockerd is already running it
# only waits for it to answer and prints the same lines. Stop it with dockerd-stop.sh DIR.
#
# Why it looks the way it does:
# - Everything under DIR (data-root, exec-root, socket, pidfile, log, config file, the
#   managed containerd's state) so that tests never touch a system Docker, never share
#   state with another test run, and dockerd-stop.sh can remove every trace. The config
#   file is DIR/daemon.json, so the host's /etc/docker/daemon.json is never read, and it
#   moves the daemon's trust key (/etc/docker/key.json in 20.10) into DIR: /etc is
#   read-only in the test VM.
# - Its own network namespace (`ip netns add`, entered with `nsenter --net`, NOT
#   `ip netns exec`, which would also make a mount namespace and hide the containers'
#   netns bind mounts in DIR/exec/netns from everyone else). docker0, the user bridges,
#   the DOCKER* iptables chains and the ip_forward sysctl then live there: the host's
#   network is left as it was, and two private dockerds (two test runs) cannot fight over
#   docker0 or flush each other's chains (dockerd flushes its chains when it starts).
#   Containers' own namespaces are unaffected: each container still gets a sandbox netns
#   at DIR/exec/netns/<12 hex> (its SandboxKey), reachable from the host by that path.
#   To reach containers by address, enter the printed namespace (nsenter --net=...).
# - --iptables=true: bridge networks need Docker's NAT/filter rules. The `iptables` here is
#   the nft variant (iptables-nft); Docker 20.10 just runs whatever `iptables` is in PATH,
#   which is fine as long as nothing else in that namespace uses iptables-legacy.
# - --userland-proxy=false: published ports by iptables only, no docker-proxy processes.
# - --default-address-pool 10.210.0.0/16 in /24s: clear of 10.77.0.0/16, 10.80.0.0/15,
#   10.88.0.0/16 and 10.200.0.0/16, which the namespace tests use. The default bridge
#   takes the first /24 of it.
# - Storage driver: overlay2 when an overlay mount works on DIR's filesystem (ext4 on the
#   build host, tmpfs in the VM), else vfs (always works; it copies the image per
#   container, which for a 2 MB busybox image costs nothing). An overlayfs DIR (the VM's
#   /tmp is one) cannot be an overlay upper layer, so it gets vfs. A DIR that already has
#   images keeps the driver it was made with. VIPD_DOCKER_STORAGE_DRIVER overrides.
# - cgroupfs cgroup driver: there is no systemd on the host or in the VM. Docker 20.10
#   handles both the host's cgroup v1 hierarchy and the VM's pure cgroup2. Containers'
#   cgroups go under /vipd-docker-<hash> (not the shared /docker), so dockerd-stop.sh can
#   remove what a killed daemon leaves there without touching any other Docker's.
#
# Environment: VIPD_DOCKERD_START_TIMEOUT (seconds to wait for the daemon, default 120:
# about 3 s on the build host, about 14 s in the emulated VM), VIPD_DOCKER_STORAGE_DRIVER,
# VIPD_DOCKER_CLI (see lib.sh), VIPD_DOCKERD_LIVE_RESTORE=1 (containers keep running while
# dockerd is down: `live-restore` in its daemon.json), VIPD_DOCKER_NETNS_NAME (run dockerd
# in this existing namespace, which stays the caller's: several dockerds as the "nodes" of
# a test cluster, each in its node's namespace), VIPD_DOCKER_ADDRESS_POOL (instead of
# base=10.210.0.0/16,size=24, so that nodes' default bridges differ).
set -euo pipefail

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/docker/lib.sh
. "$script_dir/lib.sh"

readonly ADDRESS_POOL=${VIPD_DOCKER_ADDRESS_POOL:-base=10.210.0.0/16,size=24}
readonly START_TIMEOUT=${VIPD_DOCKERD_START_TIMEOUT:-120}
# dockerd and its containerd live in /usr/sbin and /usr/bin; iptables in /usr/sbin.
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

log() { echo "dockerd-start: $*" >&2; }

(($# == 1)) || { echo "usage: $0 DIR" >&2; exit 2; }
[[ $EUID -eq 0 ]] || { log "must run as root"; exit 1; }
command -v dockerd >/dev/null || { log "dockerd not found: run scripts/docker/ensure-docker.sh"; exit 1; }
docker_dir_layout "$1"
if [[ -n "${VIPD_DOCKER_NETNS_NAME:-}" ]]; then
  [[ -e "/run/netns/$VIPD_DOCKER_NETNS_NAME" ]] || {
    log "VIPD_DOCKER_NETNS_NAME: no namespace /run/netns/$VIPD_DOCKER_NETNS_NAME"
    exit 1
  }
  echo "$VIPD_DOCKER_NETNS_NAME" >"$DOCKER_DIR/netns-name"
  docker_dir_layout "$1"
fi

print_env() {
  echo "DOCKER_HOST=unix://$DOCKER_SOCK"
  echo "VIPD_DOCKER_NETNS=$DOCKER_NETNS"
}

# A Unix socket path holds at most 107 bytes; the longest one here is containerd's
# ttrpc socket under the exec-root.
longest="$DOCKER_EXEC/containerd/containerd.sock.ttrpc"
if ((${#longest} > 107)); then
  log "DIR is too long for Unix socket paths (${#longest} > 107 bytes: $longest); use a shorter DIR"
  exit 1
fi

log_tail() {
  echo "--- last lines of $DOCKER_LOG ---" >&2
  tail -n 40 "$DOCKER_LOG" >&2 2>/dev/null || true
  echo "---" >&2
}

choose_storage_driver() {
  if [[ -n "${VIPD_DOCKER_STORAGE_DRIVER:-}" ]]; then
    echo "$VIPD_DOCKER_STORAGE_DRIVER"
    return
  fi
  # Keep the driver a previous start of this DIR used: its images live under it.
  local d
  for d in overlay2 vfs; do
    if [[ -d "$DOCKER_DATA/$d" ]]; then
      echo "$d"
      return
    fi
  done
  # Try a throwaway overlay mount on DIR's filesystem.
  local probe ok=0
  probe=$(mktemp -d "$DOCKER_DIR/.overlay-probe.XXXXXX")
  mkdir -p "$probe/lower" "$probe/upper" "$probe/work" "$probe/merged"
  : >"$probe/lower/file"
  if mount -t overlay overlay \
    -o "lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work" "$probe/merged" 2>/dev/null; then
    # A write through the overlay is what overlay2 needs (copy-up into upper).
    if echo x >"$probe/merged/file" 2>/dev/null; then ok=1; fi
    umount "$probe/merged" || umount -l "$probe/merged"
  fi
  rm -rf "$probe"
  if ((ok)); then echo overlay2; else echo vfs; fi
}

# Wait until the daemon answers, or fail with its log tail. $1: the pid to watch (the
# dockerd we started or found).
wait_ready() {
  local pid=$1 start=$SECONDS
  while :; do
    if ! pid_alive "$pid"; then
      log "dockerd (pid $pid) exited during startup"
      log_tail
      return 1
    fi
    if dockerd_answers; then
      return 0
    fi
    if ((SECONDS - start >= START_TIMEOUT)); then
      log "dockerd (pid $pid) did not answer on $DOCKER_SOCK within ${START_TIMEOUT}s"
      log_tail
      return 1
    fi
    sleep 0.3
  done
}

t0=$(date +%s.%N)
pid=$(dockerd_pid)
if [[ -n "$pid" ]]; then
  # Already running (or being started by someone else): just wait for it.
  wait_ready "$pid"
  print_env
  exit 0
fi

# A pidfile left by a dockerd that died would make the new one refuse to start.
rm -f "$DOCKER_PIDFILE"
mkdir -p "$DOCKER_DATA" "$DOCKER_EXEC"
# The trust key moves into DIR (the default, /etc/docker/key.json, is read-only in the
# VM and would be shared with a system dockerd).
live_restore=false
if [[ "${VIPD_DOCKERD_LIVE_RESTORE:-0}" == 1 ]]; then live_restore=true; fi
printf '{\n  "deprecated-key-path": "%s/key.json",\n  "live-restore": %s\n}\n' \
  "$DOCKER_DIR" "$live_restore" >"$DOCKER_CONF"

if [[ ! -e "$DOCKER_NETNS" ]]; then
  ip netns add "$DOCKER_NETNS_NAME"
fi
ip -n "$DOCKER_NETNS_NAME" link set lo up

driver=$(choose_storage_driver)
log "starting dockerd in $DOCKER_DIR (storage driver $driver, netns $DOCKER_NETNS_NAME)"
{
  echo "=== $(date -u +%FT%TZ) dockerd-start.sh ==="
} >>"$DOCKER_LOG"

# setsid: its own session, so a Ctrl-C or a test harness killing our process group does
# not take the daemon down half-way; stdin/stdout/stderr away from the caller's pipes, so
# a caller that reads our output to EOF is not kept waiting by the daemon.
start_dockerd() {
  setsid nsenter --net="$DOCKER_NETNS" -- dockerd \
    --config-file "$DOCKER_CONF" \
    --data-root "$DOCKER_DATA" \
    --exec-root "$DOCKER_EXEC" \
    --host "unix://$DOCKER_SOCK" \
    --pidfile "$DOCKER_PIDFILE" \
    --storage-driver "$driver" \
    --exec-opt native.cgroupdriver=cgroupfs \
    --cgroup-parent "/$DOCKER_INSTANCE" \
    --iptables=true \
    --ip-forward=true \
    --userland-proxy=false \
    --default-address-pool "$ADDRESS_POOL" \
    --shutdown-timeout 5 \
    </dev/null >>"$DOCKER_LOG" 2>&1 &
  pid=$!
}

# dockerd gives the containerd it starts a fixed time to come up and exits when that
# runs out, which happens on a loaded machine (the emulated VM next to other work):
# that case is retried, with the half-started containerd stopped first.
for attempt in 1 2 3; do
  start_dockerd
  if wait_ready "$pid"; then
    break
  fi
  # Do not leave a half-started daemon behind: we started it, so we stop it.
  kill "$pid" 2>/dev/null || true
  if ((attempt < 3)) && ! pid_alive "$pid" &&
    tail -n 5 "$DOCKER_LOG" | grep "timeout waiting for containerd" >/dev/null; then
    cpid=$(cat "$DOCKER_EXEC/containerd/containerd.pid" 2>/dev/null || true)
    if [[ -n "$cpid" ]]; then kill "$cpid" 2>/dev/null || true; fi
    sleep 1
    rm -f "$DOCKER_PIDFILE"
    log "containerd was too slow to start (attempt $attempt of 3); starting dockerd again"
    continue
  fi
  exit 1
done
t1=$(date +%s.%N)
log "dockerd (pid $pid) ready in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s"
print_env
