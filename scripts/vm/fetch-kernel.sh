#!/usr/bin/env bash
# Download and unpack the Debian kernel the IPVS test VM boots, once.
#
# The build machine's kernel has no IPVS and no loadable modules, so the tests that need
# IPVS boot Debian's generic amd64 kernel in qemu. The generic flavour is required: the
# -cloud- flavour lacks 9p, which the VM needs for its root filesystem.
#
# Result, under ${VIPD_CACHE_DIR:-<repo>/.cache}/vm/kernel/:
#   <release>/boot/vmlinuz-<release>
#   <release>/boot/vmlinux-<release>      (uncompressed, see extract_vmlinux)
#   <release>/lib/modules/<release>/...   (depmod'ed, so `modprobe -d <release dir>` works)
#   current                                (the release the VM uses)
#
# Cached: once a kernel is unpacked this script does nothing but print its directory
# (no apt, no network). Set VIPD_VM_KERNEL_REFRESH=1 to look for a newer Debian kernel.
#
# Prints the kernel directory (the `-d` base for modprobe) on stdout.
set -euo pipefail

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd -- "$script_dir/../.." && pwd)
cache_dir="${VIPD_CACHE_DIR:-$repo_dir/.cache}/vm"
kernels_dir="$cache_dir/kernel"

log() { echo "vipd-vm: $*" >&2; }

# A kernel directory is usable once the .complete marker is there (written last).
complete() { [[ -f "$kernels_dir/$1/.complete" ]]; }

# Unpack the ELF kernel from the bzImage: qemu boots an ELF vmlinux through its PVH
# entry point (Debian builds CONFIG_PVH=y), which skips the real-mode setup and the
# in-guest decompression. Under software emulation that decompression alone took about
# 5 s of a 12 s run. Debian compresses the payload with xz; if that ever changes this
# finds no xz stream, and run.sh falls back to the (slower) vmlinuz.
extract_vmlinux() {
  local dir=$1 rel=$2 offset
  local vmlinuz="$dir/boot/vmlinuz-$rel" vmlinux="$dir/boot/vmlinux-$rel"
  offset=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' -- "$vmlinuz" | head -n 1 | cut -d: -f1 || true)
  if [[ -z "$offset" ]]; then
    log "no xz payload in $vmlinuz: the VM will boot the compressed kernel (slower)"
    return 0
  fi
  # --single-stream: stop at the end of the payload, ignore the bytes after it (tail then
  # dies of SIGPIPE, which is expected: only xz's status counts).
  if { tail -c "+$((offset + 1))" -- "$vmlinuz" || true; } | xz -dc --single-stream >"$vmlinux.tmp" &&
    [[ "$(head -c 4 -- "$vmlinux.tmp" | od -An -tx1 | tr -d ' \n')" == 7f454c46 ]]; then
    mv -f -- "$vmlinux.tmp" "$vmlinux"
  else
    rm -f -- "$vmlinux.tmp"
    log "could not unpack vmlinux from $vmlinuz: the VM will boot the compressed kernel (slower)"
  fi
}

if [[ "${VIPD_VM_KERNEL_REFRESH:-0}" != 1 && -f "$kernels_dir/current" ]]; then
  release=$(<"$kernels_dir/current")
  if [[ -n "$release" ]] && complete "$release"; then
    echo "$kernels_dir/$release"
    exit 0
  fi
fi

# Which concrete kernel package the generic metapackage points at (linux-image-6.1.0-NN-amd64).
resolve_package() {
  apt-cache depends linux-image-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ && $2 !~ /cloud|rt-|dbg/ { print $2; exit }'
}

package=$(resolve_package || true)
if [[ -z "$package" ]]; then
  # Fresh machine: apt-cache knows nothing until the lists are downloaded.
  log "refreshing apt package lists to find the kernel package"
  apt-get update -qq >&2
  package=$(resolve_package || true)
fi
if [[ -z "$package" ]]; then
  log "cannot find the kernel package: 'apt-cache depends linux-image-amd64' names no linux-image-*-amd64"
  exit 1
fi
release=${package#linux-image-}

if ! complete "$release"; then
  log "fetching $package (about 70 MB, once)"
  mkdir -p "$kernels_dir"
  work=$(mktemp -d "$kernels_dir/.fetch.XXXXXX")
  trap 'rm -rf -- "$work"' EXIT
  # apt-get download writes into the current directory. The sandbox user is ours, as
  # the _apt user may not write into this directory.
  download() { (cd "$work" && apt-get download -q -o APT::Sandbox::User="$(id -un)" "$package" >&2); }
  if ! download; then
    # Stale package lists name a version the mirror no longer has: refresh once.
    log "apt-get download $package failed; refreshing the package lists and retrying"
    apt-get update -qq >&2
    new_package=$(resolve_package || true)
    if [[ -n "$new_package" && "$new_package" != "$package" ]]; then
      log "the current kernel package is now $new_package"
      package=$new_package
      release=${package#linux-image-}
    fi
    download || { log "apt-get download $package failed"; exit 1; }
  fi
  deb=$(find "$work" -maxdepth 1 -name "${package}_*.deb" -print -quit)
  [[ -n "$deb" ]] || { log "no .deb for $package after download"; exit 1; }
  dpkg -x "$deb" "$work/root"
  rm -f -- "$deb"
  [[ -f "$work/root/boot/vmlinuz-$release" ]] || { log "$package has no boot/vmlinuz-$release"; exit 1; }
  # Debian's kmod: builds modules.dep etc. for the unpacked tree, so the guest can
  # resolve dependencies with `modprobe -d`.
  depmod -b "$work/root" "$release"
  extract_vmlinux "$work/root" "$release"
  touch "$work/root/.complete"
  rm -rf -- "${kernels_dir:?}/$release"
  mv -- "$work/root" "$kernels_dir/$release"
fi

# Written via a temporary file so a concurrent reader never sees it half written.
echo "$release" >"$kernels_dir/current.tmp.$$"
mv -f -- "$kernels_dir/current.tmp.$$" "$kernels_dir/current"
echo "$kernels_dir/$release"
