//! The capabilities `vipd run` keeps, and dropping all the others.
//!
//! vipd runs as root, but needs only part of what root may do:
//! - `CAP_NET_ADMIN`: IPVS over generic netlink, addresses, routes and links over
//!   rtnetlink, and `iptables-restore`;
//! - `CAP_NET_RAW`: `iptables-restore` and `iptables-save` open raw sockets;
//! - `CAP_SYS_ADMIN`: entering a sandbox's network namespace (`setns`), and creating the
//!   ingress namespace (`unshare` and the bind mount under `/run/netns`);
//! - `CAP_NET_BIND_SERVICE`: the DNS server on port 53.
//!
//! Everything else goes from the effective, permitted and inheritable sets, the ambient
//! set is cleared, and the bounding set is cut to the same four, so the `iptables`
//! processes vipd starts (as root, which would otherwise regain every capability on
//! exec) get no more either. Capabilities are per thread: this runs first, on the main
//! thread, before any other thread exists, and every thread started later inherits it.

use std::collections::BTreeSet;

use caps::{CapSet, Capability, CapsHashSet};
use thiserror::Error;

/// The capabilities `vipd run` needs, and the reason for each.
pub const NEEDED: [(Capability, &str); 4] = [
    (Capability::CAP_NET_ADMIN, "IPVS, rtnetlink, iptables"),
    (Capability::CAP_NET_RAW, "iptables"),
    (
        Capability::CAP_SYS_ADMIN,
        "entering and creating network namespaces",
    ),
    (Capability::CAP_NET_BIND_SERVICE, "DNS on port 53"),
];

/// Dropping capabilities failed.
#[derive(Debug, Error)]
#[error("cannot drop capabilities ({step}): {source}")]
pub struct PrivilegesError {
    step: &'static str,
    #[source]
    source: caps::errors::CapsError,
}

/// What [`drop_unneeded`] left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    /// The effective (and permitted) capabilities now, by name.
    pub effective: BTreeSet<String>,
    /// Needed capabilities this process did not have to begin with, by name.
    pub missing: BTreeSet<String>,
    /// Whether the bounding set was cut too (it takes `CAP_SETPCAP`, which a process
    /// started with only the needed capabilities does not have).
    pub bounding_cut: bool,
}

fn needed() -> CapsHashSet {
    NEEDED.iter().map(|(c, _)| *c).collect()
}

fn names(set: &CapsHashSet) -> BTreeSet<String> {
    set.iter().map(ToString::to_string).collect()
}

fn step<T>(step: &'static str, r: Result<T, caps::errors::CapsError>) -> Result<T, PrivilegesError> {
    r.map_err(|source| PrivilegesError { step, source })
}

/// Keep only [`NEEDED`] (those of them the thread has) in every set of the calling
/// thread, and in the bounding set when allowed to change it. Call it before starting
/// any thread.
pub fn drop_unneeded() -> Result<Kept, PrivilegesError> {
    let keep = needed();
    let permitted = step("read the permitted set", caps::read(None, CapSet::Permitted))?;
    let mut bounding_cut = false;
    if permitted.contains(&Capability::CAP_SETPCAP) {
        let supported = caps::runtime::thread_all_supported();
        for cap in supported.iter().filter(|c| !keep.contains(c)) {
            step("cut the bounding set", caps::drop(None, CapSet::Bounding, *cap))?;
        }
        bounding_cut = true;
    }
    step("clear the ambient set", caps::clear(None, CapSet::Ambient))?;
    step(
        "clear the inheritable set",
        caps::clear(None, CapSet::Inheritable),
    )?;
    let kept: CapsHashSet = permitted.intersection(&keep).copied().collect();
    // Effective must stay within permitted: lower it first.
    step("set the effective set", caps::set(None, CapSet::Effective, &kept))?;
    step("set the permitted set", caps::set(None, CapSet::Permitted, &kept))?;
    Ok(Kept {
        effective: names(&kept),
        missing: names(&keep.difference(&permitted).copied().collect()),
        bounding_cut,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_needed_set_is_four_distinct_capabilities_each_with_a_reason() {
        assert_eq!(needed().len(), NEEDED.len());
        assert!(NEEDED.iter().all(|(_, why)| !why.is_empty()));
        assert_eq!(
            names(&needed()),
            [
                "CAP_NET_ADMIN",
                "CAP_NET_BIND_SERVICE",
                "CAP_NET_RAW",
                "CAP_SYS_ADMIN"
            ]
            .map(str::to_owned)
            .into()
        );
    }

    /// In a thread of its own (capabilities are per thread), so the test process keeps
    /// its own.
    #[test]
    fn dropping_leaves_only_the_needed_ones_in_every_set() {
        let kept = std::thread::spawn(|| {
            let before = caps::read(None, CapSet::Permitted).unwrap();
            let kept = drop_unneeded().unwrap();
            let sets = [CapSet::Effective, CapSet::Permitted].map(|s| caps::read(None, s).unwrap());
            let bounding = caps::read(None, CapSet::Bounding).unwrap();
            let inheritable = caps::read(None, CapSet::Inheritable).unwrap();
            (before, kept, sets, bounding, inheritable)
        })
        .join()
        .unwrap();
        let (before, kept, [effective, permitted], bounding, inheritable) = kept;
        let expected: CapsHashSet = before.intersection(&needed()).copied().collect();
        assert_eq!(effective, expected);
        assert_eq!(permitted, expected);
        assert!(inheritable.is_empty());
        assert_eq!(kept.effective, names(&expected));
        if kept.bounding_cut {
            assert_eq!(bounding, needed());
        }
    }
}
