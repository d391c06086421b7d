# shellcheck shell=bash
# Shared by the scripts in scripts/docker/: where a private dockerd keeps its things, and
# which docker client talks to it. Sourced, never run.
#
# Layout of a private dockerd's directory DIR (everything it has lives there, except its
# network namespace, which `ip netns` keeps in /run/netns, and its containers' cgroups,
# under /sys/fs/cgroup[/CONTROLLER]/vipd-docker-<hash>):
#   DIR/docker.sock     the API socket (DOCKER_HOST=unix://DIR/docker.sock)
#   DIR/dockerd.pid     dockerd's pidfile
#   DIR/dockerd.log     dockerd's (and its managed containerd's) output
#   DIR/daemon.json     its configuration file (so the host's /etc/docker is never read)
#   DIR/data/           --data-root: images, containers, volumes, network database
#   DIR/exec/           --exec-root: runtime state, containerd's socket, netns/ (the
#                       containers' SandboxKeys)

# Debian's client (/usr/bin/docker) comes with the daemon and speaks its API version; a
# different `docker` earlier in PATH (a newer static build, say) would also negotiate,
# but using the package's own removes a variable. VIPD_DOCKER_CLI overrides.
docker_cli() {
  if [[ -n "${VIPD_DOCKER_CLI:-}" ]]; then
    echo "$VIPD_DOCKER_CLI"
  elif [[ -x /usr/bin/docker ]]; then
    echo /usr/bin/docker
  else
    command -v docker || { echo "docker client not found (run scripts/docker/ensure-docker.sh)" >&2; return 1; }
  fi
}

# Set the path variables for DIR (made absolute: dockerd and the socket URL need it).
docker_dir_layout() {
  local dir=$1
  [[ -n "$dir" ]] || { echo "usage: $0 DIR" >&2; exit 2; }
  mkdir -p "$dir"
  DOCKER_DIR=$(cd -- "$dir" && pwd -P)
  DOCKER_SOCK=$DOCKER_DIR/docker.sock
  DOCKER_PIDFILE=$DOCKER_DIR/dockerd.pid
  DOCKER_LOG=$DOCKER_DIR/dockerd.log
  DOCKER_CONF=$DOCKER_DIR/daemon.json
  DOCKER_DATA=$DOCKER_DIR/data
  DOCKER_EXEC=$DOCKER_DIR/exec
  # The instance name, from DIR: so two private dockerds (two test runs at once) never
  # share bridges, iptables chains or cgroups, and the same DIR always finds its own
  # again. It names the network namespace dockerd runs in and the cgroup parent of its
  # containers.
  DOCKER_INSTANCE=vipd-docker-$(printf '%s' "$DOCKER_DIR" | sha256sum | cut -c1-10)
  # A namespace the caller gave dockerd-start.sh (VIPD_DOCKER_NETNS_NAME) is recorded in
  # DIR, so every script finds it again; it is the caller's (a test's "node"), so
  # dockerd-stop.sh leaves it for the caller to delete (DOCKER_NETNS_OWNED=0).
  if [[ -r "$DOCKER_DIR/netns-name" ]]; then
    DOCKER_NETNS_NAME=$(<"$DOCKER_DIR/netns-name")
    DOCKER_NETNS_OWNED=0
  else
    DOCKER_NETNS_NAME=$DOCKER_INSTANCE
    DOCKER_NETNS_OWNED=1
  fi
  DOCKER_NETNS=/run/netns/$DOCKER_NETNS_NAME
  export DOCKER_DIR DOCKER_SOCK DOCKER_PIDFILE DOCKER_LOG DOCKER_CONF DOCKER_DATA DOCKER_EXEC \
    DOCKER_INSTANCE DOCKER_NETNS_NAME DOCKER_NETNS DOCKER_NETNS_OWNED
}

# True when process $1 exists and is not a zombie (a killed daemon whose parent has not
# reaped it yet still has a /proc entry).
pid_alive() {
  local stat
  stat=$({ cat "/proc/$1/stat"; } 2>/dev/null) || return 1
  # The state is the first field after "(comm)"; comm may contain spaces.
  stat=${stat##*) }
  [[ "${stat%% *}" != Z ]]
}

# The pid in DIR's pidfile if that process is alive and is a dockerd, else nothing.
dockerd_pid() {
  local pid
  [[ -r "$DOCKER_PIDFILE" ]] || return 0
  pid=$(<"$DOCKER_PIDFILE")
  [[ "$pid" =~ ^[0-9]+$ ]] && pid_alive "$pid" || return 0
  if [[ "$({ cat "/proc/$pid/comm"; } 2>/dev/null)" == dockerd ]]; then echo "$pid"; fi
  return 0
}

# True when the daemon at DOCKER_SOCK answers within a few seconds. Always with a
# timeout: a client call on a socket whose daemon hangs would otherwise hang us too.
dockerd_answers() {
  [[ -S "$DOCKER_SOCK" ]] || return 1
  timeout 10 "$(docker_cli)" -H "unix://$DOCKER_SOCK" info --format '{{.ID}}' >/dev/null 2>&1
}
