#!/usr/bin/env bash
# Capture the exact IPVS generic-netlink messages ipvsadm sends and receives, as test
# vectors for vipd's IPVS codec (src/ipvs/testdata/).
#
# Run it inside the test VM (the build machine's kernel has no IPVS):
#   scripts/vm/run.sh --out /tmp/ipvs-cap -- scripts/vm/capture-ipvs.sh
#   cp /tmp/ipvs-cap/ipvs-captures/{*.hex,README.txt} src/ipvs/testdata/
#
# Usage: capture-ipvs.sh [OUT_DIR]   (default: $VIPD_VM_OUT/ipvs-captures)
#
# Each ipvsadm command runs under strace in a fresh network namespace; strace's hex dumps
# of sendmsg/recvmsg are cut into netlink messages by their nlmsg_len. Output, per
# capture NAME:
#   NAME.send.hex   messages ipvsadm sent to the IPVS family, one per line, lowercase hex
#   NAME.recv.hex   messages the kernel answered to them (replies, dump parts, NLMSG_DONE,
#                   acks and errors), one per line
#   genl-ctrl-getfamily-ipvs.{send,recv}.hex   the family lookup every ipvsadm run
#                   starts with (CTRL_CMD_GETFAMILY "IPVS"), kept once, apart
#   README.txt      which command produced each file, and a decoded line per message
#   strace/NAME.strace, NAME.stdout  raw strace log and ipvsadm's output (debugging)
# recvmsg calls with MSG_PEEK (libnl peeks at each message's size first) are skipped, so
# every received message appears once. Each datagram's dumped size is checked against the
# syscall's return value and must split exactly into whole netlink messages.
set -euo pipefail

out_dir=${1:-${VIPD_VM_OUT:?not in the VM: pass OUT_DIR or run via scripts/vm/run.sh}/ipvs-captures}
readonly NS=cap

log() { echo "capture-ipvs: $*" >&2; }

for tool in ipvsadm strace ip perl curl; do
  command -v "$tool" >/dev/null || { log "$tool is not installed (scripts/vm/ensure-deps.sh)"; exit 1; }
done

cleanup() { ip netns del "$NS" 2>/dev/null || true; }
trap cleanup EXIT
cleanup

# A namespace of our own, with a route that makes 10.0.0.3 unicast: IPVS refuses a
# destination whose address is not unicast in the namespace.
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link add cap0 type dummy
ip -n "$NS" addr add 10.0.0.2/24 dev cap0
ip -n "$NS" link set cap0 up

if ! ip netns exec "$NS" ipvsadm -Ln >/dev/null 2>&1; then
  log "IPVS is not available in this kernel: run this inside the VM (scripts/vm/run.sh -- $0)"
  exit 1
fi

rm -rf -- "$out_dir"
mkdir -p -- "$out_dir/strace"

readme="$out_dir/README.txt"
cat >"$readme" <<EOF
IPVS generic-netlink messages captured from ipvsadm, for the codec's unit tests.

Produced by scripts/vm/capture-ipvs.sh inside the test VM (scripts/vm/run.sh):
kernel $(uname -r), $(ipvsadm --version 2>&1 | head -n 1), $(strace -V | head -n 1).
Every command ran in a fresh network namespace whose only route is 10.0.0.0/24 (a dummy
link with 10.0.0.2/24), in the order listed below, so each capture sees the table the
earlier ones left.

Format: one netlink message per line, lowercase hex, exactly nlmsg_len bytes (header
included). NAME.send.hex holds what ipvsadm sent to the IPVS family, NAME.recv.hex what
the kernel answered to those requests, in order: replies, dump parts, NLMSG_DONE, acks
and errors. The generic-netlink family lookup that starts every ipvsadm run is left out
of these and kept once in genl-ctrl-getfamily-ipvs.{send,recv}.hex.

The IPVS family id is assigned at run time (see the ctrl reply, attribute
CTRL_ATTR_FAMILY_ID); in these captures it is IPVS_FAMILY_ID_PLACEHOLDER. nlmsg_seq and
nlmsg_pid vary from run to run (libnl derives them from the time and the process): tests
should ignore or rewrite them. Integers in attributes are host order (little endian)
except addresses, ports and the persistence netmask, which IPVS keeps in network order.
"list" ran before any traffic (all counters zero); "list-stats" after one connection
attempt to 10.0.0.1:80, so the tcp service and its destination count 1 connection.

Below, per capture: a decoded line per message (file:line direction type flags [genl
cmd] [errno]), then what ipvsadm printed.
EOF

# capture NAME ARGS...: run `ipvsadm ARGS` under strace in the namespace and cut its
# traffic into NAME.send.hex / NAME.recv.hex. ipvsadm's exit status is recorded, not
# fatal: some captures are of refusals on purpose.
capture() {
  local name=$1
  shift
  local trace="$out_dir/strace/$name.strace" rc=0
  ip netns exec "$NS" strace -f -xx -s 65535 -e trace=sendmsg,recvmsg -e write=all -e read=all \
    -o "$trace" ipvsadm "$@" >"$out_dir/strace/$name.stdout" 2>&1 || rc=$?
  {
    echo
    echo "== $name: ipvsadm $*   (exit status $rc)"
  } >>"$readme"
  perl - "$trace" "$out_dir" "$name" >>"$readme" <<'PERL' || { log "cannot decode $trace"; exit 1; }
use strict;
use warnings;

my ($trace, $out, $name) = @ARGV;
open my $in, '<', $trace or die "open $trace: $!\n";

# Syscalls with their dumped bytes.
my @calls;
my $cur;
while (my $line = <$in>) {
    chomp $line;
    if ($line =~ /^ \| [0-9a-f]{5}  (.*)$/) {
        next unless $cur;
        # 16 bytes as "xx xx ... xx  xx ... xx" in the first 48 columns, then ASCII.
        my $hex = substr($1, 0, 48);
        $cur->{data} .= pack('H2', $_) for $hex =~ /\b([0-9a-f]{2})\b/g;
        next;
    }
    next if $line =~ /^ \* \d+ bytes in buffer \d+/;
    $line =~ s/^\d+\s+//;    # strace -f prefixes the pid
    if ($line =~ /^(sendmsg|recvmsg)\(\d+, .*\) = (-?\d+)/) {
        my ($call, $ret) = ($1, $2);
        my ($flags) = $line =~ /\}, ([^(){},]*)\) = -?\d+/;
        $cur = { call => $call, ret => $ret, flags => $flags // '', data => '' };
        push @calls, $cur;
    } else {
        $cur = undef;
    }
}
close $in;

my (@send, @recv, @ctrl_send, @ctrl_recv);
my %kind;    # "pid:seq" of a request -> 'ctrl' or 'ipvs'
my $ipvs_type;
for my $c (@calls) {
    next if $c->{ret} < 0;
    next if $c->{call} eq 'recvmsg' && $c->{flags} =~ /MSG_PEEK/;
    my $d = $c->{data};
    die "$name: $c->{call} returned $c->{ret} bytes but strace dumped " . length($d) . "\n"
        unless length($d) == $c->{ret};
    my $off = 0;
    while ($off < length $d) {
        die "$name: truncated netlink header at $off\n" if $off + 16 > length $d;
        my ($len, $type, $flags, $seq, $pid) = unpack('V v v V V', substr($d, $off, 16));
        die "$name: bad nlmsg_len $len at $off\n" if $len < 16 || $off + $len > length $d;
        my $msg = substr($d, $off, $len);
        my $key = "$pid:$seq";
        if ($c->{call} eq 'sendmsg') {
            my $k = $type == 0x10 ? 'ctrl' : 'ipvs';
            $kind{$key} = $k;
            $ipvs_type = $type if $k eq 'ipvs';
            push @{ $k eq 'ctrl' ? \@ctrl_send : \@send }, $msg;
        } else {
            my $k = $kind{$key} // ($type == 0x10 ? 'ctrl' : 'ipvs');
            push @{ $k eq 'ctrl' ? \@ctrl_recv : \@recv }, $msg;
        }
        $off += ($len + 3) & ~3;
    }
    die "$name: datagram of " . length($d) . " bytes does not end on a message\n"
        if $off - length($d) > 3;
}
die "$name: no IPVS request captured\n" unless @send;

sub write_hex {
    my ($file, @msgs) = @_;
    open my $fh, '>', $file or die "write $file: $!\n";
    print {$fh} unpack('H*', $_), "\n" for @msgs;
    close $fh or die "write $file: $!\n";
}

my @ipvs_cmds = qw(UNSPEC NEW_SERVICE SET_SERVICE DEL_SERVICE GET_SERVICE NEW_DEST SET_DEST
    DEL_DEST GET_DEST NEW_DAEMON DEL_DAEMON GET_DAEMON SET_CONFIG GET_CONFIG SET_INFO GET_INFO
    ZERO FLUSH);
my @ctrl_cmds = qw(UNSPEC NEWFAMILY DELFAMILY GETFAMILY);
sub describe {
    my ($msg) = @_;
    my ($len, $type, $flags) = unpack('V v v', $msg);
    my $s = sprintf 'len=%d flags=0x%03x', $len, $flags;
    if ($type == 2) {
        my ($err) = unpack('l<', substr($msg, 16, 4));
        return "NLMSG_ERROR $s " . ($err == 0 ? 'ack' : "errno=" . -$err);
    }
    return "NLMSG_DONE $s" if $type == 3;
    my $cmd = unpack('C', substr($msg, 16, 1));
    return "GENL_ID_CTRL $s CTRL_CMD_" . ($ctrl_cmds[$cmd] // $cmd) if $type == 0x10;
    return sprintf('IPVS(0x%x) %s IPVS_CMD_%s', $type, $s, $ipvs_cmds[$cmd] // $cmd);
}

write_hex("$out/$name.send.hex", @send);
write_hex("$out/$name.recv.hex", @recv);
my $n = 0;
printf "%s.send.hex:%d send %s\n", $name, ++$n, describe($_) for @send;
$n = 0;
printf "%s.recv.hex:%d recv %s\n", $name, ++$n, describe($_) for @recv;

# The family lookup is the same in every run: keep the first one.
my $ctrl = "$out/genl-ctrl-getfamily-ipvs";
if (!-e "$ctrl.send.hex" && @ctrl_send) {
    write_hex("$ctrl.send.hex", @ctrl_send);
    write_hex("$ctrl.recv.hex", @ctrl_recv);
    open my $fh, '>', "$out/.ipvs-family-id" or die;
    printf {$fh} "0x%x\n", $ipvs_type;
    close $fh;
}
PERL
  # What ipvsadm printed, to check decoded values against.
  if [[ -s "$out_dir/strace/$name.stdout" ]]; then
    echo "ipvsadm printed:"
    sed 's/^/  | /' -- "$out_dir/strace/$name.stdout"
  fi >>"$readme"
}

# Order matters: each capture sees what the earlier ones left in the table.
capture list-empty -Ln
capture add-service-fwm256-rr -A -f 256 -s rr
capture add-service-fwm256-rr-exists -A -f 256 -s rr
capture edit-service-fwm256-wrr-p300 -E -f 256 -s wrr -p 300
capture add-dest-fwm256-10.0.0.3-masq-w2 -a -f 256 -r 10.0.0.3:0 -m -w 2
capture edit-dest-fwm256-10.0.0.3-masq-w5 -e -f 256 -r 10.0.0.3:0 -m -w 5
capture add-service-tcp-10.0.0.1-80-rr -A -t 10.0.0.1:80 -s rr
capture add-dest-tcp-10.0.0.1-80-10.0.0.3-8080-masq -a -t 10.0.0.1:80 -r 10.0.0.3:8080 -m
capture list -Ln
# Some traffic, so the stats in the next listing are not all zero: one TCP connection
# attempt to the address-keyed service. IPVS schedules it (a connection to 10.0.0.3:8080,
# dropped by the dummy link) and counts it. The counters it reports are refreshed by a
# timer about every 2 s, hence the wait.
ip netns exec "$NS" curl -s --max-time 1 -o /dev/null http://10.0.0.1:80/ || true
sleep 3
capture list-stats -L -n --stats
capture set-timeouts-900-120-300 --set 900 120 300
capture list-timeouts -L --timeout
capture del-dest-fwm256-10.0.0.3 -d -f 256 -r 10.0.0.3:0
capture del-dest-fwm256-10.0.0.9-missing -d -f 256 -r 10.0.0.9:0
capture del-service-fwm256 -D -f 256
capture del-service-fwm256-missing -D -f 256
capture flush -C

family_id=$(<"$out_dir/.ipvs-family-id")
rm -f -- "$out_dir/.ipvs-family-id"
sed -i "s/IPVS_FAMILY_ID_PLACEHOLDER/$family_id/" "$readme"

log "wrote $(find "$out_dir" -maxdepth 1 -name '*.hex' | wc -l) files to $out_dir"
