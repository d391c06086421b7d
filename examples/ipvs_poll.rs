//! The sighting poller of `scripts/bench/event-latency.sh`: when does each sandbox first
//! hold an address as a destination of one fwmark service?
//!
//! ```text
//! ipvs_poll WORKDIR FWMARK
//! ```
//!
//! Every round it reads `WORKDIR/pids` (one pid a line: the sandboxes) and `WORKDIR/target`
//! (one IPv4 address in hex, as `/proc/net/ip_vs` writes it, or nothing); for each pid not
//! yet seen holding the target it asks that pid's network namespace for the destinations
//! of service `FWMARK` over netlink (one socket per namespace, opened once and kept), and
//! appends `HEX PID T T_PREV` to `WORKDIR/seen` when the target is there (`T`: just after
//! the read, `T_PREV`: just after the previous read of that pid, empty if none; seconds
//! since the epoch).
//!
//! Why not `/proc/PID/net/ip_vs`: with many services in many namespaces, a read of it
//! stops after its first page (about 50 fwmark services), so a destination listed later
//! is never seen. `ipvsadm -Ln`, netlink like this, shows them all.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vipd::core::ipvs::{AddrFamily, ServiceKey};
use vipd::core::model::FwMark;
use vipd::ipvs::netlink::NetlinkIpvs;
use vipd::ipvs::IpvsTable;
use vipd::netns::{run_in, NetnsPath};

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs_f64()
}

/// An address as `/proc/net/ip_vs` writes it: `10.211.200.1` is `0AD3C801`.
fn hex(addr: IpAddr) -> Option<String> {
    match addr {
        IpAddr::V4(v4) => Some(v4.octets().iter().map(|b| format!("{b:02X}")).collect()),
        IpAddr::V6(_) => None,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, mark] = &args[..] else {
        eprintln!("usage: ipvs_poll WORKDIR FWMARK");
        std::process::exit(2);
    };
    let dir = PathBuf::from(dir);
    let mark = mark
        .parse()
        .ok()
        .and_then(FwMark::new)
        .unwrap_or_else(|| panic!("not a firewall mark: {mark}"));
    let key = ServiceKey::FwMark {
        af: AddrFamily::Inet,
        mark,
    };
    let mut seen_file = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join("seen"))
        .expect("open WORKDIR/seen");
    let read = |name: &str| fs::read_to_string(Path::new(&dir).join(name)).unwrap_or_default();

    let mut sockets: HashMap<u32, NetlinkIpvs> = HashMap::new();
    let mut last: HashMap<(String, u32), f64> = HashMap::new();
    let mut seen: HashSet<(String, u32)> = HashSet::new();
    loop {
        let target = read("target").trim().to_owned();
        if target.is_empty() {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let pids: Vec<u32> = read("pids")
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        for pid in pids {
            if seen.contains(&(target.clone(), pid)) {
                continue;
            }
            let socket = match sockets.entry(pid) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    let ns = NetnsPath::from_arg(&format!("/proc/{pid}/ns/net"));
                    match run_in(&ns, NetlinkIpvs::open) {
                        Ok(Ok(socket)) => e.insert(socket),
                        // Not started yet, or gone: asked again next round.
                        _ => continue,
                    }
                }
            };
            let holds = socket
                .destinations(&key)
                .map(|dests| dests.iter().any(|d| hex(d.key.addr).as_deref() == Some(&target)))
                .unwrap_or(false);
            let t = now();
            let k = (target.clone(), pid);
            if holds {
                let prev = last.get(&k).map(|p| format!("{p:.6}")).unwrap_or_default();
                writeln!(seen_file, "{target} {pid} {t:.6} {prev}").expect("write WORKDIR/seen");
                seen.insert(k.clone());
            }
            last.insert(k, t);
        }
    }
}
