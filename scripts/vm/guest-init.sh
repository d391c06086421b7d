#!/bin/busybox sh
# shellcheck shell=dash
# Stage 2 of the vipd test VM: PID 1 inside the guest, after the initramfs has
# switch_root'ed into the host's root filesystem (read-only 9p). Started by run.sh via
# the kernel command line (VIPD_VM_INIT=<this file>); never run it on the host.
#
# It makes the writable places a test needs, loads IPVS and netfilter modules, runs the
# command that run.sh left in the control share, writes the command's exit status back
# into that share and powers the VM off.
#
# Why busybox sh and not bash: under software emulation every exec of a dynamically
# linked program costs about 0.3-0.5 s (loader, libraries over 9p). The static busybox
# runs mount, mkdir, hostname, ip, stty... as built-in applets, which cut the mounts
# step from about 5 s to well under one.
#
# Everything is in functions and the last line calls main: the shell parses the whole
# file before running any of it, so editing this file in the work tree cannot disturb a
# VM that is still running it.
#
# Channels:
#   /dev/console (ttyS0, or ttyS1 with run.sh --verbose)  harness messages, kernel log
#   /dev/ttyS1                                            the command's stdout/stderr
#   9p tag vipdctl -> /run/vipd-vm/ctl   config, cmd.sh; we write started, status and
#                                        timings
#   9p tag vipdout -> /run/vipd-vm/out   results of the command (VIPD_VM_OUT)

# Not `set -e`: PID 1 must not just exit on an error (the kernel panics and no status is
# written); each step that matters reports and powers off instead.
set -u

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN_DIR=/run/vipd-vm
CTL=$RUN_DIR/ctl
OUT=$RUN_DIR/out
# Options for the writable shares: no cache, so every write reaches the host at once.
RW_9P=trans=virtio,version=9p2000.L,msize=262144
ctl_mounted=0

# Modules live in the unpacked Debian kernel tree, not in /lib/modules (the host has
# none), so they are loaded with kmod's modprobe -d, not busybox's.
#   ip_vs + every scheduler, xt_ipvs    IPVS itself and `-m ipvs` matches
#   veth bridge dummy                   links for namespaces and test topologies
#   nf_tables nft_compat nfnetlink      iptables here is the nft variant (xt via compat)
#   nft_chain_nat nft_nat nft_ct        nat chains, conntrack expressions
#   nf_nat nf_conntrack                 NAT for IPVS masquerading and DNAT rules
#   xt_mark                             fwmark match and MARK target (no xt_MARK module:
#                                       the kernel asks for "ipt_MARK", an alias of it)
#   xt_conntrack xt_addrtype xt_MASQUERADE xt_nat xt_tcpudp xt_comment xt_multiport
#   xt_REDIRECT                         the matches/targets Docker's rules use
#   nlmon                               netlink monitor device, for debugging captures
#   virtio_rng                          entropy from the host (virtio-rng-pci)
# br_netfilter is not loaded on purpose: bridged traffic must not traverse iptables.
# No iptable_* module is needed: iptables-nft builds its tables from nf_tables.
MODULES="ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_wlc ip_vs_lblc ip_vs_lblcr ip_vs_dh
  ip_vs_sh ip_vs_sed ip_vs_nq ip_vs_fo ip_vs_ovf ip_vs_mh xt_ipvs
  veth bridge dummy
  nfnetlink nf_tables nft_compat nft_chain_nat nft_nat nft_ct nf_nat nf_conntrack
  xt_mark xt_conntrack xt_addrtype xt_MASQUERADE xt_nat xt_tcpudp xt_comment
  xt_multiport xt_REDIRECT
  nlmon virtio_rng"

log() { echo "vipd-vm guest: $*" >/dev/console; }

uptime_s() {
  read -r up _ </proc/uptime
  echo "$up"
}

since() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

power_off() {
  sync
  # sysrq 'o' powers off without needing any init system; it only schedules the work,
  # so wait here rather than return (PID 1 exiting would panic the kernel).
  echo o >/proc/sysrq-trigger
  sleep 30
  poweroff -f
}

# The status file is what run.sh exits with: a number, "timeout", or "error: ...".
# Written through a rename so run.sh never reads half a line.
write_status() {
  printf '%s\n' "$1" >"$CTL/status.tmp" && mv -f "$CTL/status.tmp" "$CTL/status"
}

die() {
  log "$*"
  [ "$ctl_mounted" = 1 ] && write_status "error: $*"
  power_off
}

# /run and the two shares: the first things needed to report anything.
mount_control() {
  # /proc, /sys and /dev were moved here by the initramfs; mount them if that changes.
  [ -e /proc/self ] || mount -t proc proc /proc
  [ -d /sys/kernel ] || mount -t sysfs sysfs /sys
  [ -e /dev/null ] || mount -t devtmpfs devtmpfs /dev

  # /run is a tmpfs: the shares are mounted in it, and `ip netns add` keeps its bind
  # mounts in /run/netns.
  mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run || die "cannot mount /run"
  mkdir -p /run/netns /run/lock "$CTL" "$OUT"
  mount -t 9p -o "$RW_9P" vipdctl "$CTL" || die "cannot mount the control share (9p tag vipdctl)"
  ctl_mounted=1
  # Tells run.sh the VM booted (it gives up on a VM that has not said so in time).
  : >"$CTL/started"
  mount -t 9p -o "$RW_9P" vipdout "$OUT" || die "cannot mount the output share (9p tag vipdout)"
}

# The watchdog powers off before run.sh's own timeout kills qemu, so a hung command is
# reported as a timeout with its output so far, not as a VM that vanished.
start_watchdog() {
  (
    sleep "$VIPD_VM_TIMEOUT"
    echo "vipd-vm: command still running after ${VIPD_VM_TIMEOUT}s: guest watchdog powers off" >/dev/ttyS1
    write_status timeout
    power_off
  ) &
}

# One modprobe call for all modules, in the background: it takes seconds under
# emulation (mostly the modules' own loading and init, not 9p), and the mounts can
# proceed meanwhile on the second CPU. Sets modprobe_pid; the end time goes to a file.
start_modprobe() {
  t_modprobe=$(uptime_s)
  (
    # shellcheck disable=SC2086 # word splitting of the list is intended
    /sbin/modprobe -a -d "$VIPD_VM_KDIR" $MODULES
    rc=$?
    uptime_s >"$RUN_DIR/modprobe.done"
    exit "$rc"
  ) &
  modprobe_pid=$!
}

# Writable places over the read-only root, and what udev would otherwise provide.
mount_rest() {
  mkdir -p /dev/pts /dev/shm
  # devtmpfs lacks these links; bash's process substitution needs /dev/fd.
  ln -sfn /proc/self/fd /dev/fd
  ln -sfn /proc/self/fd/0 /dev/stdin
  ln -sfn /proc/self/fd/1 /dev/stdout
  ln -sfn /proc/self/fd/2 /dev/stderr
  mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts || die "cannot mount /dev/pts"
  mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm || die "cannot mount /dev/shm"
  mount -t cgroup2 cgroup2 /sys/fs/cgroup || die "cannot mount cgroup2"
  # /tmp: an overlay, the host's /tmp (read-only) below a tmpfs. A plain tmpfs would hide
  # whatever the command needs from the host's /tmp: a work tree or cache dir cloned
  # there, the current directory. Writes stay in the guest. (The overlay module was
  # loaded by the initramfs.)
  mkdir -p "$RUN_DIR/tmp-upper" "$RUN_DIR/tmp-work"
  chmod 1777 "$RUN_DIR/tmp-upper"
  if ! mount -t overlay -o "lowerdir=/tmp,upperdir=$RUN_DIR/tmp-upper,workdir=$RUN_DIR/tmp-work" overlay /tmp; then
    log "overlay on /tmp failed; a plain tmpfs hides the host's /tmp"
    mount -t tmpfs -o mode=1777 tmpfs /tmp || die "cannot mount tmpfs on /tmp"
  fi
  # The rest: plain tmpfs. Not overlays: the host's /var/lib (a docker there, say) must
  # not leak into the guest.
  for dir in /var/tmp /var/lib /var/log /var/cache; do
    mount -t tmpfs -o mode=1777 tmpfs "$dir" || die "cannot mount tmpfs on $dir"
  done
  chmod 0755 /var/lib /var/log /var/cache
  # On Debian /var/run is a symlink to /run; mount only where it is a real directory.
  if [ -d /var/run ] && [ ! -L /var/run ]; then
    mount -t tmpfs -o mode=0755 tmpfs /var/run || die "cannot mount tmpfs on /var/run"
  fi

  hostname "$VIPD_VM_HOSTNAME" || die "cannot set the hostname"
  ip link set lo up || die "cannot bring lo up"
  # The command's output goes to a serial port of its own, which run.sh connects to its
  # stdout. Raw mode: no "\n" -> "\r\n" translation, so the host sees plain lines.
  stty -F /dev/ttyS1 raw -echo || log "stty on /dev/ttyS1 failed; output may have CRLF"
}

finish_modprobe() {
  wait "$modprobe_pid" || die "modprobe -a -d $VIPD_VM_KDIR (the IPVS and netfilter modules) failed"
  # Anything else the kernel asks for (request_module) also comes from that tree: the
  # kernel runs this wrapper instead of /sbin/modprobe, which would look in /lib/modules.
  cat >"$RUN_DIR/modprobe" <<EOF
#!/bin/busybox sh
echo "<5>vipd-vm: autoload \$*" >/dev/kmsg
exec /sbin/modprobe -d '$VIPD_VM_KDIR' "\$@"
EOF
  chmod 0755 "$RUN_DIR/modprobe"
  echo "$RUN_DIR/modprobe" >/proc/sys/kernel/modprobe
}

main() {
  t_boot=$(uptime_s)
  mount_control
  # Written by run.sh: VIPD_VM_KDIR (the unpacked kernel), VIPD_VM_TIMEOUT (seconds),
  # VIPD_VM_HOSTNAME.
  # shellcheck source=/dev/null
  . "$CTL/config" || die "cannot read $CTL/config"
  start_watchdog
  start_modprobe
  mount_rest
  finish_modprobe
  t_ready=$(uptime_s)

  # A clean environment: cmd.sh (from run.sh) exports exactly what the command gets.
  env -i /bin/bash "$CTL/cmd.sh" </dev/null >/dev/ttyS1 2>&1
  rc=$?
  t_done=$(uptime_s)

  # boot: kernel start to this script; setup: this script to the command (mounts and
  # modules, overlapped); modules: modprobe alone; command: the command.
  printf 'boot=%s setup=%s modules=%s command=%s\n' "$t_boot" "$(since "$t_boot" "$t_ready")" \
    "$(since "$t_modprobe" "$(cat "$RUN_DIR/modprobe.done")")" "$(since "$t_ready" "$t_done")" \
    >"$CTL/timings"
  write_status "$rc"
  power_off
}

main "$@"
exit
