#!/usr/bin/env bash
# Install what vipd and its test suite need on a fresh Debian host (as root), then build.
# Idempotent: what is already there is not installed again.
#
#   scripts/setup.sh            install runtime + test dependencies and build vipd
#   scripts/setup.sh --deps     only install the packages
#   scripts/setup.sh --start    all of the first, then install vipd and start it, with a
#                               Docker engine (installed and started when none answers)
#
# --start installs /usr/local/bin/vipd, /etc/vipd/vipd.toml (when there is none: every
# setting, at its default, commented) and, on a host run by systemd, the unit
# (scripts/vipd.service), then starts vipd: `systemctl enable --now` with systemd, else in
# the background with its log in /var/log/vipd.log and its pid in /run/vipd.pid. A vipd
# this script started before is stopped first, so running it again starts the new build.
# It waits until `vipd status` answers and prints it.
# Environment: DOCKER_HOST (the engine vipd follows; default: the system socket), VIPD_BIN
# (a vipd binary built before, installed instead of building one; the VM test of this
# script uses the one the test suite built).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

mode=${1:-}
case "$mode" in
  "" | --deps | --start) ;;
  *) echo "usage: $0 [--deps | --start]" >&2; exit 2 ;;
esac
log() { echo "setup: $*" >&2; }
die() { log "$*"; exit 1; }

# Runtime: iptables-restore/-save, ip. Inspection: ipvsadm. Tests: curl, ping, busybox
# (httpd backends), dig, jq (scripts/test.sh), the VM (qemu, kmod for depmod/modprobe, cpio for the initramfs),
# systemd-analyze (the unit in scripts/ is verified), debootstrap (the container image's
# bases, made locally: scripts/docker/vipd-image.sh). The cluster: protoc and the
# well-known .proto files (building the etcd client), an etcd server and etcdctl (tests).
# PACKAGE:COMMAND, a package counting as there when its command is (or, for a package
# with no command, when the absolute path after the colon exists): that needs no dpkg
# database (the test VM hides it) and no root.
PACKAGES=(iptables:iptables-restore iproute2:ip ipvsadm:ipvsadm curl:curl iputils-ping:ping
  busybox-static:busybox dnsutils:dig procps:pgrep qemu-system-x86:qemu-system-x86_64
  kmod:depmod cpio:cpio strace:strace systemd:systemd-analyze debootstrap:debootstrap jq:jq
  protobuf-compiler:protoc libprotobuf-dev:/usr/include/google/protobuf/descriptor.proto
  etcd-server:etcd etcd-client:etcdctl)

# etcd-server's postinst starts an etcd on 127.0.0.1:2379, systemd or not; the tests run
# their own on ports of their own. As scripts/docker/ensure-docker.sh does for Docker: a
# /usr/sbin/policy-rc.d that exits 101 ("action forbidden") for the install, which
# invoke-rc.d and deb-systemd-invoke honour, unless the one there already denies; a
# different one is kept aside and put back.
POLICY=/usr/sbin/policy-rc.d
policy_backup=
policy_ours=0
deny_service_starts() {
  local rc=0
  [[ -x $POLICY ]] && { "$POLICY" etcd start >/dev/null 2>&1 || rc=$?; }
  ((rc == 101)) && return 0
  if [[ -e $POLICY ]]; then
    policy_backup=$(mktemp "$POLICY.vipd-XXXXXX")
    mv -f "$POLICY" "$policy_backup"
  fi
  policy_ours=1
  printf '#!/bin/sh\n# Temporary, from vipd scripts/setup.sh: start no services.\nexit 101\n' >"$POLICY"
  chmod 0755 "$POLICY"
}
allow_service_starts() {
  ((policy_ours)) || return 0
  rm -f "$POLICY"
  [[ -z $policy_backup ]] || mv -f "$policy_backup" "$POLICY"
  policy_ours=0
}

missing=()
for pc in "${PACKAGES[@]}"; do
  what=${pc#*:}
  if [[ $what == /* ]]; then
    [[ -e $what ]] || missing+=("${pc%%:*}")
  else
    command -v "$what" >/dev/null || missing+=("${pc%%:*}")
  fi
done
if ((${#missing[@]})); then
  [[ $EUID -eq 0 ]] || die "need root to install ${missing[*]}"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  etcd_before=$(pgrep -x etcd || true)
  trap allow_service_starts EXIT
  deny_service_starts
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  allow_service_starts
  trap - EXIT
  # Belt and braces: an etcd the install started anyway (an init system that ignores
  # policy-rc.d) is stopped; one that ran before is not ours to stop.
  for pid in $(pgrep -x etcd || true); do
    grep -qxF "$pid" <<<"$etcd_before" && continue
    log "the etcd-server package started an etcd (pid $pid): stopping it"
    [[ -d /run/systemd/system ]] && systemctl disable --now etcd.service >/dev/null 2>&1 || true
    kill "$pid" 2>/dev/null || true
  done
fi

command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain (rustup)"
[[ "$mode" == --deps ]] && exit 0
if [[ -n "${VIPD_BIN:-}" ]]; then
  [[ -x "$VIPD_BIN" ]] || die "VIPD_BIN=$VIPD_BIN is not an executable"
  log "using $VIPD_BIN (not building)"
else
  cargo build --release --locked --bin vipd
  VIPD_BIN=target/release/vipd
  log "built $VIPD_BIN"
fi
[[ "$mode" == --start ]] || exit 0

# --- --start ------------------------------------------------------------------------------
[[ $EUID -eq 0 ]] || die "--start needs root"
systemd=0
[[ -d /run/systemd/system ]] && systemd=1
# IPVS: built in, or a module to load. Without it vipd cannot balance anything.
[[ -e /proc/net/ip_vs ]] || modprobe ip_vs 2>/dev/null || true
[[ -e /proc/net/ip_vs ]] || die "this kernel has no IPVS (no /proc/net/ip_vs, and 'modprobe ip_vs' failed): vipd needs it. On a host whose kernel lacks it, try vipd in the project's VM: scripts/vm/run.sh -- scripts/demo.sh"

# A Docker engine: the one DOCKER_HOST names, or the system one. ensure-docker.sh installs
# the engine, its client and docker-compose when missing (it starts nothing); an engine
# that does not answer is started here.
scripts/docker/ensure-docker.sh
engine_up() { timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }
if ! engine_up; then
  [[ -z "${DOCKER_HOST:-}" ]] || die "DOCKER_HOST=$DOCKER_HOST does not answer"
  if ((systemd)); then
    log "starting docker.service"
    systemctl enable --now docker
  else
    log "starting dockerd (no systemd: in the background, log in /var/log/dockerd.log)"
    setsid dockerd >>/var/log/dockerd.log 2>&1 </dev/null &
  fi
  for _ in $(seq 120); do engine_up && break; sleep 1; done
  engine_up || die "dockerd did not answer within 120 s: see /var/log/dockerd.log or 'journalctl -u docker'"
fi
log "Docker engine $(docker version --format '{{.Server.Version}}') answers"

install -m 0755 "$VIPD_BIN" /usr/local/bin/vipd
if [[ ! -e /etc/vipd/vipd.toml ]]; then
  install -D -m 0644 scripts/vipd.toml /etc/vipd/vipd.toml
  log "installed /etc/vipd/vipd.toml (every setting at its default)"
fi

pidfile=/run/vipd.pid
if ((systemd)); then
  install -m 0644 scripts/vipd.service /etc/systemd/system/vipd.service
  systemctl daemon-reload
  systemctl enable vipd
  systemctl restart vipd
  log "vipd.service started: journalctl -u vipd"
else
  if [[ -r $pidfile ]] && kill -0 "$(<$pidfile)" 2>/dev/null; then
    old=$(<$pidfile)
    log "stopping the vipd this script started before (pid $old)"
    kill -TERM "$old"
    for _ in $(seq 100); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
    ! kill -0 "$old" 2>/dev/null || die "vipd (pid $old) did not stop within 10 s of SIGTERM"
  fi
  setsid /usr/local/bin/vipd run >>/var/log/vipd.log 2>&1 </dev/null &
  echo $! >$pidfile
  log "vipd run started (pid $!, log /var/log/vipd.log)"
fi

for _ in $(seq 60); do
  /usr/local/bin/vipd status >/dev/null 2>&1 && break
  if ((!systemd)) && ! kill -0 "$(<$pidfile)" 2>/dev/null; then
    die "vipd exited: $(tail -n 5 /var/log/vipd.log)"
  fi
  sleep 1
done
/usr/local/bin/vipd status || die "vipd status did not answer within 60 s"
log "vipd is running. Next: the compose example in README.md (Quick start)."
