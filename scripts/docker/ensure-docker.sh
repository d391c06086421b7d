#!/usr/bin/env bash
# Make sure Debian's Docker engine (`docker.io`, which brings containerd, runc and tini)
# is installed, WITHOUT leaving a system dockerd running.
#
# vipd's tests start their own private dockerd (dockerd-start.sh) whose state lives in a
# directory of their own; a system dockerd on /var/lib/docker and /run/docker.sock would
# only get in the way (its bridge and iptables chains, its containers).
#
# Idempotent and fast: when the commands are there it only looks them up in PATH (no
# apt-get, no network, no root needed, nothing written), so it also runs on the
# read-only root of the test VM. When something is missing it asks dpkg which packages
# are not installed, runs `apt-get update` once and installs them, which needs root.
#
# Why the policy-rc.d dance: docker.io's postinst ends with
#   invoke-rc.d --skip-systemd-native docker start || exit 1
# On a machine without systemd (a container, CI) that runs /etc/init.d/docker start,
# i.e. a system dockerd on /var/lib/docker, and if that start fails the whole install
# fails. A /usr/sbin/policy-rc.d that exits 101 ("action forbidden") makes invoke-rc.d
# skip the start and return 0. With systemd, the postinst starts docker.service through
# deb-systemd-invoke, which also honours policy-rc.d. Ours is removed again afterwards
# (and an existing, non-denying one is put back).
#
# Usage: scripts/docker/ensure-docker.sh
set -euo pipefail

readonly PACKAGES=(docker.io containerd runc tini iptables docker-compose)
# What a private dockerd runs: the daemon, its containerd and shim, runc, the init for
# `docker run --init` (tini), iptables, a client, and docker-compose (the README's
# compose quick start, tested in the VM).
readonly COMMANDS=(dockerd containerd containerd-shim-runc-v2 runc docker-init iptables docker docker-compose)
readonly POLICY=/usr/sbin/policy-rc.d

log() { echo "ensure-docker: $*" >&2; }

# First the commands themselves: in the test VM /var/lib is an empty tmpfs, so dpkg's
# database is hidden there while the host's binaries are all present.
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
have_all=1
for cmd in "${COMMANDS[@]}"; do
  command -v "$cmd" >/dev/null || have_all=0
done
((have_all)) && exit 0

# One dpkg-query for all; `installed` excludes removed-but-configured packages.
declare -A installed=()
while read -r pkg status; do
  [[ "$status" == installed ]] && installed[$pkg]=1
done < <(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${PACKAGES[@]}" 2>/dev/null || true)
missing=()
for pkg in "${PACKAGES[@]}"; do
  [[ -n "${installed[$pkg]:-}" ]] || missing+=("$pkg")
done
((${#missing[@]} == 0)) && exit 0

if [[ $EUID -ne 0 ]]; then
  log "need root to install ${missing[*]} (apt-get install ${missing[*]})"
  exit 1
fi
log "installing ${missing[*]}"

# The pid of a system dockerd running before we started, so that we only stop one that
# the install itself started.
system_dockerd_pid() {
  local pid
  [[ -r /run/docker.pid ]] || return 0
  pid=$(<"/run/docker.pid")
  [[ -n "$pid" && -d /proc/$pid ]] && echo "$pid"
  return 0
}
before_pid=$(system_dockerd_pid)

# Install our denying policy-rc.d unless the one there already denies `docker start`
# (Docker-built images ship one that exits 101). A different one is kept aside and put
# back on exit, whatever happens.
policy_backup=
policy_ours=0
restore_policy() {
  if ((policy_ours)); then
    rm -f "$POLICY"
    [[ -n "$policy_backup" ]] && mv -f "$policy_backup" "$POLICY"
  fi
  return 0
}
trap restore_policy EXIT
policy_rc=0
if [[ -x "$POLICY" ]]; then
  "$POLICY" docker start >/dev/null 2>&1 || policy_rc=$?
fi
if [[ $policy_rc -ne 101 ]]; then
  if [[ -e "$POLICY" ]]; then
    policy_backup=$(mktemp "$POLICY.vipd-XXXXXX")
    mv -f "$POLICY" "$policy_backup"
  fi
  policy_ours=1
  printf '#!/bin/sh\n# Temporary, from vipd scripts/docker/ensure-docker.sh: start no services.\nexit 101\n' >"$POLICY"
  chmod 0755 "$POLICY"
fi

export DEBIAN_FRONTEND=noninteractive
# Package lists may be absent or stale on a fresh machine: refresh them once.
apt-get update -qq >&2
# No recommends: they would pull in git, apparmor, needrestart and cgroupfs-mount, none
# of which a private dockerd needs.
apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2

# Belt and braces: if a system dockerd appeared anyway (a policy-rc.d that was ignored,
# an init system that starts units on its own), stop it. Only one the install started.
after_pid=$(system_dockerd_pid)
if [[ -n "$after_pid" && "$after_pid" != "$before_pid" ]]; then
  log "the package started a system dockerd (pid $after_pid): stopping it"
  if [[ -d /run/systemd/system ]]; then
    systemctl stop docker.service docker.socket containerd.service >/dev/null 2>&1 || true
  fi
  kill "$after_pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    [[ -d /proc/$after_pid ]] || break
    sleep 0.1
  done
fi

command -v dockerd >/dev/null || { log "dockerd not found after installing docker.io"; exit 1; }
log "installed: $(dockerd --version)"
