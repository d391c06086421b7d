#!/usr/bin/env bash
# Make sure the Debian packages the IPVS test VM needs are installed.
#
# Idempotent and fast: when every package is already installed it only asks dpkg (no
# apt-get, no network, no root needed). When something is missing it runs
# `apt-get update` once and installs only the missing packages, which needs root.
#
# Why each package:
#   qemu-system-x86  the VM itself (software emulation; KVM is nested and slow here)
#   kmod             depmod on the host for the unpacked kernel; modprobe in the guest
#   cpio             packs the initramfs
#   xz-utils         unpacks the uncompressed kernel from Debian's vmlinuz
#   busybox-static   the initramfs userland (static, so it needs no libraries)
#   ipvsadm          the reference IPVS client (captures, selftest)
#   iptables         fwmark rules for the selftest and tests (the nft variant)
#   iproute2         `ip netns`, veth, bridge, dummy in the guest
#   curl             HTTP client inside namespaces (busybox wget misbehaves in netns)
#   strace           captures ipvsadm's netlink traffic
#   dnsutils         `dig` for DNS tests
set -euo pipefail

readonly PACKAGES=(
  qemu-system-x86
  kmod
  cpio
  xz-utils
  busybox-static
  ipvsadm
  iptables
  iproute2
  curl
  strace
  dnsutils
)

# One dpkg-query for all: it prints "name status" for the known ones and nothing for
# packages it has never heard of. `installed` excludes removed-but-configured ones.
declare -A installed=()
while read -r pkg status; do
  [[ "$status" == installed ]] && installed[$pkg]=1
done < <(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${PACKAGES[@]}" 2>/dev/null || true)

missing=()
for pkg in "${PACKAGES[@]}"; do
  [[ -n "${installed[$pkg]:-}" ]] || missing+=("$pkg")
done

if ((${#missing[@]} == 0)); then
  exit 0
fi

echo "vipd-vm: installing missing packages: ${missing[*]}" >&2
if [[ $EUID -ne 0 ]]; then
  echo "vipd-vm: need root to install packages (apt-get install ${missing[*]})" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Package lists may be absent or stale on a fresh machine: refresh them once.
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
