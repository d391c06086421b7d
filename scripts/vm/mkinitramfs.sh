#!/usr/bin/env bash
# Build the initramfs of the IPVS test VM into the cache, when its inputs changed.
#
# The initramfs is deliberately tiny: busybox-static, the modules needed to mount the
# host's root filesystem over virtio-9p (and overlay), and an /init that mounts it read-only with
# cache=loose and switch_root's into it. Everything else (module loading for IPVS and
# netfilter, mounts, running the command) happens in scripts/vm/guest-init.sh on the
# host's root, so changing that script never needs a rebuild.
#
# Usage: mkinitramfs.sh [KERNEL_DIR]   (default: what fetch-kernel.sh prints)
# Prints the path of the gzip'ed cpio archive on stdout.
#
# Rebuilt only when one of its inputs changes: this script (which holds /init), the
# busybox binary, or the kernel modules it packs. A sha256 over those is kept next to
# the archive.
set -euo pipefail

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd -- "$script_dir/../.." && pwd)
cache_dir="${VIPD_CACHE_DIR:-$repo_dir/.cache}/vm"

log() { echo "vipd-vm: $*" >&2; }

kernel_dir=${1:-$("$script_dir/fetch-kernel.sh")}
release=$(basename -- "$kernel_dir")
modules_dir="$kernel_dir/lib/modules/$release"
[[ -f "$modules_dir/modules.dep" ]] || { log "no depmod'ed modules in $modules_dir"; exit 1; }

# The static busybox (package busybox-static, which ensure-deps.sh installs): the
# initramfs has no libraries.
busybox=/bin/busybox
[[ -x "$busybox" ]] || { log "$busybox is missing (install busybox-static)"; exit 1; }

# The modules needed to mount a virtio-9p filesystem, dependencies first, in the order
# modprobe would load them: virtio_ring virtio virtio_pci_modern_dev
# virtio_pci_legacy_dev virtio_pci 9pnet 9pnet_virtio netfs fscache 9p on 6.1.
# Asking modprobe keeps this right if Debian builds one of them in or splits one.
# Also overlay: guest-init.sh lays a writable tmpfs over the host's /tmp with it.
mapfile -t module_paths < <(
  modprobe -d "$kernel_dir" -S "$release" --show-depends -a virtio_pci 9pnet_virtio 9p overlay |
    awk '$1 == "insmod" && !seen[$2]++ { print $2 }'
)
((${#module_paths[@]} > 0)) || { log "modprobe found no 9p/virtio modules in $kernel_dir"; exit 1; }

# The archive's inputs; their hash decides whether to rebuild.
inputs_hash=$(
  {
    echo "$release"
    sha256sum "${BASH_SOURCE[0]}" "$busybox" "${module_paths[@]}" | awk '{ print $1 }'
  } | sha256sum | awk '{ print $1 }'
)
out="$cache_dir/initramfs-$release.cpio.gz"
stamp="$out.sha256"
if [[ -f "$out" && -f "$stamp" && "$(<"$stamp")" == "$inputs_hash" ]]; then
  echo "$out"
  exit 0
fi

log "building initramfs for $release"
mkdir -p "$cache_dir"
work=$(mktemp -d "$cache_dir/.initramfs.XXXXXX")
trap 'rm -rf -- "$work"' EXIT
root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,newroot,modules}
cp "$busybox" "$root/bin/busybox"

: >"$root/modules/order"
for path in "${module_paths[@]}"; do
  name=$(basename -- "$path")
  case "$name" in
    # busybox insmod reads plain .ko only; Debian 6.1 ships them uncompressed, newer
    # kernels may not.
    *.ko.xz) xz -dc -- "$path" >"$root/modules/${name%.xz}"; name=${name%.xz} ;;
    *.ko.zst) zstd -qdc -- "$path" >"$root/modules/${name%.zst}"; name=${name%.zst} ;;
    *.ko.gz) gzip -dc -- "$path" >"$root/modules/${name%.gz}"; name=${name%.gz} ;;
    *) cp -- "$path" "$root/modules/$name" ;;
  esac
  echo "$name" >>"$root/modules/order"
done

# /init: runs as PID 1 under busybox sh. Its output goes to the kernel console, which
# run.sh keeps in a log file and shows when the VM fails to start.
cat >"$root/init" <<'INIT'
#!/bin/busybox sh
# Stage 1 of the vipd test VM: mount the host's root over 9p and switch_root into it.
/bin/busybox --install -s /bin
export PATH=/bin

fail() {
  echo "vipd-vm initramfs: $*"
  # No status file is written: run.sh reports that the VM did not start the command.
  poweroff -f
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The archive has no /dev/console node (making one needs root), so the kernel could not
# give /init a console: take it from devtmpfs.
exec </dev/console >/dev/console 2>&1
echo "vipd-vm initramfs: start at $(cut -d' ' -f1 /proc/uptime) s"

for m in $(cat /modules/order); do
  insmod "/modules/$m" || fail "insmod $m failed"
done

# cache=loose: the share is read-only, and without it every exec re-reads the binary
# over 9p (modprobe took 50 s instead of 3). msize: fewer round trips for large reads.
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /newroot ||
  fail "cannot mount the host root (9p tag hostroot)"

[ -n "${VIPD_VM_INIT:-}" ] || fail "VIPD_VM_INIT is not set on the kernel command line"
[ -x "/newroot$VIPD_VM_INIT" ] || fail "$VIPD_VM_INIT is not executable on the host root"

echo "vipd-vm initramfs: switch_root at $(cut -d' ' -f1 /proc/uptime) s"
# Hand the already mounted pseudo filesystems over instead of leaving them hidden under
# the new root.
for d in dev proc sys; do
  mount --move "/$d" "/newroot/$d" || fail "cannot move /$d"
done

# switch_root, not chroot: with chroot, tools that look at the mount table (runc,
# docker exec) saw the initramfs as /.
exec switch_root /newroot "$VIPD_VM_INIT"
INIT
chmod 0755 "$root/init"

(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) | gzip -1 >"$work/initramfs.cpio.gz"
mv -f -- "$work/initramfs.cpio.gz" "$out"
echo "$inputs_hash" >"$stamp"
echo "$out"
