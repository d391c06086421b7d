#!/usr/bin/env bash
# Make sure the Debian packages scripts/bench/mesh.sh needs are installed, WITHOUT leaving
# their system services running.
#
#   nginx    the 3 backends (its binary runs inside busybox containers, bind-mounted)
#   haproxy  the user-space proxy the routing mesh is compared with (mode tcp)
#   wrk      the load generator
#   curl     the checks that every target answers and spreads over every backend
#   ipvsadm, iptables, iproute2  the hand-programmed Swarm-style path
#
# Idempotent and fast: when every command is there it only looks them up in PATH (no
# apt-get, no network, no root needed, nothing written), so it also runs on the read-only
# root of the test VM, where /var/lib (dpkg's database) is an empty tmpfs. When something
# is missing it runs `apt-get update` once and installs the missing packages, which needs
# root. The VM runs the host's binaries over 9p: install on the host, before booting it.
#
# nginx's and haproxy's postinst start their service (invoke-rc.d). On a machine without
# systemd that is /etc/init.d/nginx start, i.e. an nginx on the host's port 80. A
# /usr/sbin/policy-rc.d that exits 101 ("action forbidden") makes invoke-rc.d skip it;
# ours is removed again afterwards (an existing, different one is put back). A service
# that started all the same (systemd, an ignored policy) is stopped again.
#
# Usage: scripts/bench/ensure-mesh-deps.sh
set -euo pipefail

# command -> package
declare -A WANT=(
  [nginx]=nginx
  [haproxy]=haproxy
  [wrk]=wrk
  [curl]=curl
  [ipvsadm]=ipvsadm
  [iptables]=iptables
  [ip]=iproute2
  [nsenter]=util-linux
)
readonly POLICY=/usr/sbin/policy-rc.d

log() { echo "ensure-mesh-deps: $*" >&2; }

export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
missing=()
for cmd in "${!WANT[@]}"; do
  command -v "$cmd" >/dev/null || missing+=("${WANT[$cmd]}")
done
((${#missing[@]} == 0)) && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)

if [[ $EUID -ne 0 ]]; then
  log "need root to install ${missing[*]} (apt-get install ${missing[*]})"
  exit 1
fi
if [[ "${VIPD_IN_VM:-}" == 1 ]]; then
  log "missing ${missing[*]}: install them on the host first (scripts/bench/ensure-mesh-deps.sh), the VM's root is the host's, read-only"
  exit 1
fi
log "installing ${missing[*]}"

policy_backup='' policy_ours=0
restore_policy() {
  if ((policy_ours)); then
    rm -f "$POLICY"
    if [[ -n "$policy_backup" ]]; then mv -f "$policy_backup" "$POLICY"; fi
  fi
  return 0
}
trap restore_policy EXIT
policy_rc=0
if [[ -x "$POLICY" ]]; then
  "$POLICY" nginx start >/dev/null 2>&1 || policy_rc=$?
fi
if [[ $policy_rc -ne 101 ]]; then
  if [[ -e "$POLICY" ]]; then
    policy_backup=$(mktemp "$POLICY.vipd-XXXXXX")
    mv -f "$POLICY" "$policy_backup"
  fi
  policy_ours=1
  printf '#!/bin/sh\n# Temporary, from vipd scripts/bench/ensure-mesh-deps.sh: start no services.\nexit 101\n' >"$POLICY"
  chmod 0755 "$POLICY"
fi

# Pids of a running nginx / haproxy before the install, so that only what the install
# started is stopped.
pids_of() { pgrep -x "$1" 2>/dev/null | sort || true; }
declare -A before=([nginx]="$(pids_of nginx)" [haproxy]="$(pids_of haproxy)")

export DEBIAN_FRONTEND=noninteractive
# Package lists may be absent or stale on a fresh machine: refresh them once.
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2

for svc in nginx haproxy; do
  new=$(comm -13 <(printf '%s\n' "${before[$svc]}") <(pids_of "$svc") | grep . || true)
  if [[ -n "$new" ]]; then
    log "the package started a system $svc: stopping it"
    if [[ -d /run/systemd/system ]]; then
      systemctl stop "$svc.service" >/dev/null 2>&1 || true
      systemctl disable "$svc.service" >/dev/null 2>&1 || true
    fi
    # shellcheck disable=SC2086 # one pid per word
    kill $new 2>/dev/null || true
  fi
done

for cmd in "${!WANT[@]}"; do
  command -v "$cmd" >/dev/null || { log "$cmd not found after installing ${missing[*]}"; exit 1; }
done
log "installed ${missing[*]}"
