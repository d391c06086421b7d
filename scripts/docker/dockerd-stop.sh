#!/usr/bin/env bash
# Stop the private dockerd that dockerd-start.sh started in DIR, and clean up after it.
#
# Usage: scripts/docker/dockerd-stop.sh [--purge] DIR
#   --purge  also delete DIR (images, the log); without it the data-root stays, so a
#            later dockerd-start.sh DIR finds its images again.
#
# In order, each step best-effort so that a half-dead daemon still gets cleaned up:
#   1. remove every container through the API (their shims, cgroups, sandboxes and
#      overlay mounts go with them, the clean way);
#   2. SIGTERM dockerd, which stops its managed containerd; SIGKILL after 30 s;
#   3. kill what a killed dockerd leaves behind: its containerd and container shims,
#      found by the socket path under DIR that is on their command line (never by
#      name: other dockerds, a system one or another test run's, must live on), and
#      remove the containers' cgroups under this instance's cgroup parent;
#   4. unmount everything still mounted under DIR, deepest first (the data-root bind
#      mount dockerd makes, overlay2 layers, the sandboxes' netns bind mounts);
#   5. delete the network namespace dockerd ran in, which takes docker0, the user
#      bridges, the veths and all of Docker's iptables chains with it; the host's own
#      network was never touched (see dockerd-start.sh); a namespace the caller gave
#      dockerd-start.sh (VIPD_DOCKER_NETNS_NAME) is left to the caller;
#   6. remove the runtime state (socket, pidfile, exec-root), or all of DIR with --purge.
# Exits 0 when nothing of it is left running or mounted, also when it was not running.
set -euo pipefail

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/docker/lib.sh
. "$script_dir/lib.sh"

log() { echo "dockerd-stop: $*" >&2; }

purge=0
if [[ "${1:-}" == --purge ]]; then
  purge=1
  shift
fi
(($# == 1)) || { echo "usage: $0 [--purge] DIR" >&2; exit 2; }
[[ $EUID -eq 0 ]] || { log "must run as root"; exit 1; }
if [[ ! -d "$1" ]]; then
  log "$1 does not exist: nothing to stop"
  exit 0
fi
docker_dir_layout "$1"

# Wait until none of the given pids is alive, at most $1 tenths of a second.
wait_gone() {
  local tenths=$1 pid alive
  shift
  for ((i = 0; i < tenths; i++)); do
    alive=0
    for pid in "$@"; do
      if pid_alive "$pid"; then alive=1; fi
    done
    ((alive)) || return 0
    sleep 0.1
  done
  return 1
}

# 1. Containers, through the API while the daemon still answers.
if dockerd_answers; then
  docker=$(docker_cli)
  mapfile -t ids < <(timeout 30 "$docker" -H "unix://$DOCKER_SOCK" ps -aq 2>/dev/null || true)
  if ((${#ids[@]})); then
    timeout 60 "$docker" -H "unix://$DOCKER_SOCK" rm -f "${ids[@]}" >/dev/null 2>&1 ||
      log "removing containers failed; continuing"
  fi
fi

# 2. dockerd itself.
pid=$(dockerd_pid)
if [[ -n "$pid" ]]; then
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_gone 300 "$pid"; then
    log "dockerd (pid $pid) still running after 30 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone 50 "$pid" || log "dockerd (pid $pid) survived SIGKILL"
  fi
fi

# 3. Leftovers, recognised by DIR's containerd socket or config on their command line.
# A shim's children are the containers' init processes: killing one ends its container
# (it is PID 1 of the container's pid namespace).
leftovers=()
for cmdline in /proc/[0-9]*/cmdline; do
  p=${cmdline#/proc/}
  p=${p%/cmdline}
  # Builtins only: one exec per process costs ~0.3 s in the emulated VM. A process may
  # be gone between the glob and the read.
  words=()
  { mapfile -d '' -t words <"$cmdline"; } 2>/dev/null || continue
  args="${words[*]}"
  if [[ "$args" == *"$DOCKER_EXEC/containerd/containerd.sock"* ||
    "$args" == *"--config $DOCKER_EXEC/containerd/"* ]]; then
    leftovers+=("$p")
  fi
done
if ((${#leftovers[@]})); then
  log "killing leftover containerd/shim processes: ${leftovers[*]}"
  for p in "${leftovers[@]}"; do
    children=()
    read -r -a children <"/proc/$p/task/$p/children" 2>/dev/null || true
    for child in "${children[@]}"; do
      kill -KILL "$child" 2>/dev/null || true
    done
    kill -KILL "$p" 2>/dev/null || true
  done
  wait_gone 50 "${leftovers[@]}" || log "some of ${leftovers[*]} survived SIGKILL"
fi

# Cgroups under the instance's parent (cgroupfs driver: /vipd-docker-<hash>/<id> in
# every v1 hierarchy, or in the cgroup2 tree): runc removes a container's when it is
# deleted, but not after a kill. Empty once the processes are gone, so rmdir (deepest
# first) removes them and the parent.
while read -r cg; do
  [[ -n "$cg" ]] || continue
  rmdir "$cg" 2>/dev/null || log "cannot remove cgroup $cg"
done < <(find /sys/fs/cgroup -maxdepth 3 -type d -name "$DOCKER_INSTANCE" -prune \
  -exec find {} -depth -type d \; 2>/dev/null)

# 4. Mounts under DIR, deepest first. mountinfo escapes spaces and the like as \ooo.
mounts_under_dir() {
  local mp
  while read -r _ _ _ _ mp _; do
    mp=$(printf '%b' "$mp")
    if [[ "$mp" == "$DOCKER_DIR" || "$mp" == "$DOCKER_DIR"/* ]]; then echo "$mp"; fi
  done </proc/self/mountinfo | awk '{ print length($0) "\t" $0 }' | sort -rn | cut -f2-
}
while read -r mp; do
  [[ -n "$mp" ]] || continue
  umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || log "cannot unmount $mp"
done < <(mounts_under_dir)

# 5. The network namespace (its bridges, veths and iptables chains go with it).
# A namespace the caller gave dockerd-start.sh is the caller's to delete.
if ((DOCKER_NETNS_OWNED)) && [[ -e "$DOCKER_NETNS" ]]; then
  ip netns del "$DOCKER_NETNS_NAME" || log "cannot delete netns $DOCKER_NETNS_NAME"
fi

# 6. Runtime state, or everything. Never delete through a mount that is still there.
remaining=$(mounts_under_dir)
if [[ -n "$remaining" ]]; then
  log "still mounted under $DOCKER_DIR, leaving files in place: $remaining"
  exit 1
fi
if ((purge)); then
  rm -rf --one-file-system "$DOCKER_DIR"
else
  rm -rf --one-file-system "$DOCKER_EXEC"
  rm -f "$DOCKER_SOCK" "$DOCKER_PIDFILE"
fi
if [[ -n "$pid" ]] && pid_alive "$pid"; then
  log "dockerd (pid $pid) is still running"
  exit 1
fi
