#!/usr/bin/env bash
# Build a minimal busybox image and import it into the Docker daemon at DOCKER_HOST.
#
# Usage: DOCKER_HOST=unix://DIR/docker.sock scripts/docker/busybox-image.sh [NAME]
#   NAME defaults to vipd-test/busybox:latest. Idempotent: nothing is done when the
#   daemon already has NAME.
#
# Why: no registry can be reached from the test machines or the VM, so images cannot be
# pulled. Debian's busybox-static is one static binary with every applet (sh, sleep,
# httpd, nc, ip, ...), so a tree of it plus symlinks is a complete container userland
# and needs no libraries. `docker import` of that tree, with a default CMD, makes the
# image.
#
# The tree: /bin/busybox and one symlink per applet (`busybox --install -s`); /sbin,
# /usr/bin and /usr/sbin as links to /bin so any applet path resolves; /etc/passwd and
# /etc/group with root and nobody (httpd and `su` look them up); /tmp (1777); /www with
# an index.html, so `httpd -f -p 80 -h /www` serves something that names its container
# (index.html says "vipd-test busybox", tests add their own pages).
set -euo pipefail

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/docker/lib.sh
. "$script_dir/lib.sh"

readonly NAME=${1:-vipd-test/busybox:latest}
readonly BUSYBOX=/bin/busybox

log() { echo "busybox-image: $*" >&2; }

[[ -n "${DOCKER_HOST:-}" ]] || { log "DOCKER_HOST is not set (see dockerd-start.sh)"; exit 2; }
docker=$(docker_cli)

# Every client call has a timeout: a hung daemon must fail this script, not hang it.
if timeout 30 "$docker" image inspect --format '{{.Id}}' "$NAME" >/dev/null 2>&1; then
  exit 0
fi

[[ -x "$BUSYBOX" ]] || { log "$BUSYBOX not found: apt-get install busybox-static"; exit 1; }
# A dynamically linked busybox would need its libraries in the image too.
if ! "$BUSYBOX" --list | grep -x sh >/dev/null; then
  log "$BUSYBOX has no sh applet"
  exit 1
fi

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
mkdir -p "$rootfs"/{bin,etc,tmp,www,root,proc,sys,dev,var/run,usr}
cp "$BUSYBOX" "$rootfs/bin/busybox"
# Symlinks to /bin/busybox. Run inside the tree (chroot): --install links to the path of
# the running binary, which must be /bin/busybox as the container will see it.
chroot "$rootfs" /bin/busybox --install -s /bin
ln -s bin "$rootfs/sbin"
ln -s ../bin "$rootfs/usr/bin"
ln -s ../bin "$rootfs/usr/sbin"
chmod 1777 "$rootfs/tmp"
cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
echo "vipd-test busybox" >"$rootfs/www/index.html"

t0=$(date +%s.%N)
# Owner root in the archive whoever runs this; a fixed mtime is not needed (import makes
# a new image id anyway).
tar -C "$rootfs" --numeric-owner --owner=0 --group=0 -c . |
  timeout 120 "$docker" import --change 'CMD ["/bin/sh"]' - "$NAME" >/dev/null
t1=$(date +%s.%N)
log "imported $NAME in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s"
