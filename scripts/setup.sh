#!/usr/bin/env bash
# Install what vipd and its test suite need on a fresh Debian host (as root), then build.
# Idempotent: packages already present are not reinstalled.
#
#   scripts/setup.sh            install runtime + test dependencies and build vipd
#   scripts/setup.sh --deps     only install the packages
set -euo pipefail
cd "$(dirname "$0")/.."

# Runtime: iptables-restore/-save, ip. Inspection: ipvsadm. Tests: curl, ping, busybox
# (httpd backends), the VM (qemu, kmod for depmod/modprobe, cpio for the initramfs),
# systemd-analyze (the unit in scripts/ is verified), debootstrap (the container image's
# bases, made locally: scripts/docker/vipd-image.sh).
PACKAGES=(iptables iproute2 ipvsadm curl iputils-ping busybox-static dnsutils procps
  qemu-system-x86 kmod cpio strace systemd debootstrap)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep "install ok installed" >/dev/null || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "setup: cargo not found: install a Rust toolchain (rustup)" >&2; exit 1; }
[[ "${1:-}" == "--deps" ]] && exit 0
cargo build --release --bin vipd
echo "setup: built target/release/vipd"
