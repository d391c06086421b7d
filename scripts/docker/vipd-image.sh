#!/usr/bin/env bash
# Build vipd's container image from the Dockerfile where no registry can be reached, and
# save it as a tarball (`docker load -i` it anywhere).
#
# Usage: scripts/docker/vipd-image.sh OUT.tar [TAG]      (as root; TAG: vipd:test)
#
# The Dockerfile's two bases are arguments; this script makes both itself, cached under
# $VIPD_CACHE_DIR/image (default .cache/image):
#   - runtime: Debian bookworm (debootstrap, minbase) with iptables, ipvsadm, conntrack
#     and iproute2;
#   - builder: the same with gcc, libc6-dev and protoc with the well-known .proto files
#     (the etcd client's build needs them), plus this machine's Rust toolchain (the
#     sysroot of `rustc`) under /usr/local/rust.
# The build context is the working tree (tracked and untracked files, not ignored ones)
# with every crate vendored (`cargo vendor`), so the build needs no network. It runs on a
# private dockerd (scripts/docker/dockerd-start.sh), stopped and purged at the end.
#
# Environment: VIPD_CACHE_DIR, VIPD_DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd -- "$script_dir/../.." && pwd)
# shellcheck source=scripts/docker/lib.sh
. "$script_dir/lib.sh"

log() { echo "vipd-image: $*" >&2; }
die() { log "$*"; exit 1; }

(($# >= 1 && $# <= 2)) || { echo "usage: $0 OUT.tar [TAG]" >&2; exit 2; }
out=$1
tag=${2:-vipd:test}
[[ $EUID -eq 0 ]] || die "must run as root (debootstrap, dockerd)"
command -v debootstrap >/dev/null || die "debootstrap not found (scripts/setup.sh --deps installs it)"

cache=${VIPD_CACHE_DIR:-$repo_dir/.cache}/image
mirror=${VIPD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$cache"
t0=$SECONDS

# A Debian tree as a tarball, made once: NAME, then the packages to include.
debian_tree() {
  local name=$1 include=$2 tarball=$cache/$1.tar tmp
  if [[ -s "$tarball" ]]; then return; fi
  log "debootstrap $name ($include)"
  tmp=$(mktemp -d)
  if ! debootstrap --variant=minbase --include="$include" bookworm "$tmp/root" "$mirror" \
    >"$cache/$name.debootstrap.log" 2>&1; then
    tail -n 20 "$cache/$name.debootstrap.log" >&2
    rm -rf "$tmp"
    die "debootstrap of $name failed (log: $cache/$name.debootstrap.log)"
  fi
  rm -rf "$tmp/root/var/cache/apt/archives/"*.deb "$tmp/root/var/lib/apt/lists/"*
  tar -C "$tmp/root" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
  rm -rf "$tmp"
}

debian_tree runtime iptables,ipvsadm,conntrack,iproute2
# The cached tree's name says what it holds: a new package list makes a new tree.
builder_packages=gcc,libc6-dev,ca-certificates,protobuf-compiler,libprotobuf-dev
builder_debian=builder-debian-$(printf '%s' "$builder_packages" | sha256sum | head -c 8)
debian_tree "$builder_debian" "$builder_packages"

# The builder: the Debian tree plus this machine's toolchain, per toolchain version.
sysroot=$(rustc --print sysroot)
rust_version=$(rustc -V | tr -c 'A-Za-z0-9.\n' '-' | head -c 60)
builder_tar=$cache/$builder_debian-$rust_version.tar
if [[ ! -s "$builder_tar" ]]; then
  log "adding $(rustc -V) to the builder"
  cp "$cache/$builder_debian.tar" "$builder_tar.part"
  tar -C "$sysroot" --transform 's,^,usr/local/rust/,' -rf "$builder_tar.part" bin lib
  mv "$builder_tar.part" "$builder_tar"
fi

# The build context: the working tree and the vendored crates.
work=$(mktemp -d)
dir=$work/dockerd
cleanup() {
  "$script_dir/dockerd-stop.sh" --purge "$dir" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
ctx=$work/context
mkdir -p "$ctx"
(cd "$repo_dir" && git ls-files -z -co --exclude-standard | tar --null -T - -cf -) | tar -C "$ctx" -xf -
(cd "$repo_dir" && cargo vendor --locked --versioned-dirs "$ctx/vendor" >"$work/vendor.log" 2>&1) || {
  tail -n 20 "$work/vendor.log" >&2
  die "cargo vendor failed"
}

# A private dockerd, the bases imported into it, and the build.
started=$("$script_dir/dockerd-start.sh" "$dir") || die "the private dockerd did not start"
host=$(sed -n 's/^DOCKER_HOST=//p' <<<"$started")
docker=$(docker_cli)
dk() { timeout 1800 "$docker" -H "$host" "$@"; }
path=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
dk import --change "ENV PATH=$path" "$builder_tar" vipd-build/rust:local >/dev/null
dk import --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  "$cache/runtime.tar" vipd-build/runtime:local >/dev/null
log "building $tag"
DOCKER_BUILDKIT=0 dk build \
  --build-arg BUILDER_IMAGE=vipd-build/rust:local \
  --build-arg RUNTIME_IMAGE=vipd-build/runtime:local \
  -t "$tag" "$ctx" >"$work/build.log" 2>&1 || {
  tail -n 40 "$work/build.log" >&2
  die "docker build failed"
}
mkdir -p "$(dirname "$out")"
dk save -o "$out.part" "$tag" && mv "$out.part" "$out"
log "$tag saved to $out ($(du -h "$out" | cut -f1)) in $((SECONDS - t0)) s"
