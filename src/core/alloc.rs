//! Stable VIPs and fwmarks per service.
//!
//! A service keeps its VIP and fwmark for as long as it has tasks, and for a grace period
//! after its last task leaves, so a service scaled to zero and back keeps its address.
//! The table is plain data, saved and loaded by the daemon (atomic writes) so allocations
//! survive a restart of vipd.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::model::{FwMark, Ipv4Net, ServiceName, Vip};

/// The default VIP pool: inside 10/8, away from Docker's default pools (172.17-31/16 and
/// 192.168/16) and from the ranges vipd's tests use.
pub const DEFAULT_POOL: &str = "10.253.0.0/16";
/// The first fwmark vipd hands out (Swarm also started at 256).
pub const FIRST_FWMARK: u32 = 256;

/// [`FIRST_FWMARK`] as a mark.
fn first_fwmark() -> FwMark {
    FwMark::new(FIRST_FWMARK).expect("256 is not 0")
}

/// One service's allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub vip: Ipv4Addr,
    /// Saved as its number; a file with mark 0 is refused when read.
    pub fwmark: FwMark,
    /// When (unix seconds) the service last had no task; `None` while it has tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since: Option<u64>,
}

/// Why a VIP could not be given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("service {service}: the VIP pool {pool} is exhausted ({size} addresses, all allocated)")]
    PoolExhausted {
        service: String,
        pool: Ipv4Net,
        size: u32,
    },
    #[error("service {service}: no fwmark left")]
    MarksExhausted { service: String },
}

/// A pool that overlaps something it must not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the VIP pool {pool} overlaps {what} {net}; choose a pool that does not (--vip-pool)")]
pub struct PoolOverlap {
    pub pool: Ipv4Net,
    pub what: String,
    pub net: Ipv4Net,
}

/// Do two networks share any address?
pub fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    let shorter = a.prefix_len().min(b.prefix_len());
    let mask = if shorter == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(shorter))
    };
    u32::from(a.addr()) & mask == u32::from(b.addr()) & mask
}

/// Check the pool against named networks (Docker networks, host routes).
pub fn check_pool(pool: Ipv4Net, others: &[(String, Ipv4Net)]) -> Result<(), PoolOverlap> {
    match others.iter().find(|(_, net)| overlaps(pool, *net)) {
        Some((what, net)) => Err(PoolOverlap {
            pool,
            what: what.clone(),
            net: *net,
        }),
        None => Ok(()),
    }
}

/// Every service's allocation, and the next fwmark to hand out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocations {
    pub services: BTreeMap<ServiceName, Allocation>,
    /// Marks are never reused while vipd runs with this table, so a stale rule somewhere
    /// can never steer traffic to a new service. A counter rather than a [`FwMark`]: it
    /// is the next number to hand out, not a mark anything carries yet.
    pub next_fwmark: u32,
}

impl Default for Allocations {
    fn default() -> Self {
        Allocations {
            services: BTreeMap::new(),
            next_fwmark: FIRST_FWMARK,
        }
    }
}

impl Allocations {
    /// The allocation of `service`, making one if needed; marks the service active.
    pub fn ensure(&mut self, service: &ServiceName, pool: Ipv4Net) -> Result<&Allocation, AllocError> {
        if !self.services.contains_key(service) {
            let vip = self.free_vip(pool).ok_or_else(|| AllocError::PoolExhausted {
                service: service.to_string(),
                pool,
                size: pool_size(pool),
            })?;
            let exhausted = || AllocError::MarksExhausted {
                service: service.to_string(),
            };
            // A table read from disk may hold any number here: 0 is no mark.
            let fwmark = FwMark::new(self.next_fwmark).ok_or_else(exhausted)?;
            self.next_fwmark = fwmark.get().checked_add(1).ok_or_else(exhausted)?;
            self.services.insert(
                service.clone(),
                Allocation {
                    vip,
                    fwmark,
                    idle_since: None,
                },
            );
        }
        let a = self.services.get_mut(service).expect("inserted above");
        a.idle_since = None;
        Ok(a)
    }

    /// Note that `service` has no task since `now`; its allocation is kept until [`Self::expire`].
    pub fn idle(&mut self, service: &ServiceName, now: u64) {
        if let Some(a) = self.services.get_mut(service) {
            a.idle_since.get_or_insert(now);
        }
    }

    /// Drop allocations idle for longer than `grace` seconds; returns the services dropped.
    pub fn expire(&mut self, now: u64, grace: u64) -> Vec<ServiceName> {
        let gone: Vec<ServiceName> = self
            .services
            .iter()
            .filter(|(_, a)| a.idle_since.is_some_and(|t| now.saturating_sub(t) > grace))
            .map(|(s, _)| s.clone())
            .collect();
        for s in &gone {
            self.services.remove(s);
        }
        gone
    }

    /// The VIP and fwmark of a service, if allocated.
    pub fn get(&self, service: &ServiceName) -> Option<(Vip, FwMark)> {
        let a = self.services.get(service)?;
        Some((Vip::new(a.vip.into()), a.fwmark))
    }

    /// Take the VIP and fwmark the kernel shows for `service` (its rules in a sandbox, when
    /// the saved allocations were lost), if the service has none yet, the VIP is in the
    /// pool and neither is another service's. Returns whether it was taken.
    ///
    /// `fwmark` is a [`FwMark`], or the kernel's raw number (0, no mark, is refused).
    pub fn adopt<M: TryInto<FwMark>>(
        &mut self,
        service: &ServiceName,
        vip: Ipv4Addr,
        fwmark: M,
        pool: Ipv4Net,
    ) -> bool {
        let Ok(fwmark) = fwmark.try_into() else {
            return false;
        };
        let (first, last) = pool_range(pool);
        let taken = self.services.values().any(|a| a.vip == vip || a.fwmark == fwmark);
        if self.services.contains_key(service)
            || taken
            || !(first..=last).contains(&u32::from(vip))
            || fwmark < first_fwmark()
        {
            return false;
        }
        self.services.insert(
            service.clone(),
            Allocation {
                vip,
                fwmark,
                idle_since: None,
            },
        );
        self.next_fwmark = self.next_fwmark.max(fwmark.get().saturating_add(1));
        true
    }

    /// Allocations read from disk may be outside the pool now (the pool was changed):
    /// those are dropped so the services get new VIPs from the current pool.
    pub fn retain_pool(&mut self, pool: Ipv4Net) -> Vec<ServiceName> {
        let out: Vec<ServiceName> = self
            .services
            .iter()
            .filter(|(_, a)| !pool.contains(&a.vip))
            .map(|(s, _)| s.clone())
            .collect();
        for s in &out {
            self.services.remove(s);
        }
        out
    }

    fn free_vip(&self, pool: Ipv4Net) -> Option<Ipv4Addr> {
        let used: BTreeSet<Ipv4Addr> = self.services.values().map(|a| a.vip).collect();
        let (first, last) = pool_range(pool);
        (first..=last).map(Ipv4Addr::from).find(|ip| !used.contains(ip))
    }
}

/// The first and last usable address of a pool, as numbers: not the network or broadcast
/// address when the pool is a /30 or larger.
fn pool_range(pool: Ipv4Net) -> (u32, u32) {
    let base = u32::from(pool.network());
    let size: u64 = 1u64 << (32 - u32::from(pool.prefix_len()));
    let (first, last) = if size >= 4 { (1, size - 2) } else { (0, size - 1) };
    (base + first as u32, base + last as u32)
}

/// How many VIPs a pool holds.
fn pool_size(pool: Ipv4Net) -> u32 {
    let (first, last) = pool_range(pool);
    last - first + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        let (a, p) = s.split_once('/').unwrap();
        Ipv4Net::new(a.parse().unwrap(), p.parse().unwrap()).unwrap()
    }

    fn name(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }

    #[test]
    fn services_get_distinct_stable_vips_and_marks() {
        let pool = net(DEFAULT_POOL);
        let mut t = Allocations::default();
        let web = t.ensure(&name("web"), pool).unwrap().clone();
        let api = t.ensure(&name("api"), pool).unwrap().clone();
        assert_eq!((web.vip, web.fwmark.get()), ("10.253.0.1".parse().unwrap(), 256));
        assert_eq!((api.vip, api.fwmark.get()), ("10.253.0.2".parse().unwrap(), 257));
        assert_eq!(t.ensure(&name("web"), pool).unwrap(), &web);
    }

    #[test]
    fn an_idle_service_keeps_its_vip_for_the_grace_period() {
        let pool = net(DEFAULT_POOL);
        let mut t = Allocations::default();
        let web = t.ensure(&name("web"), pool).unwrap().clone();
        t.idle(&name("web"), 1000);
        t.idle(&name("web"), 1010);
        assert!(t.expire(1060, 60).is_empty());
        assert_eq!(t.ensure(&name("web"), pool).unwrap().vip, web.vip);
        t.idle(&name("web"), 2000);
        assert_eq!(t.expire(2061, 60), [name("web")]);
        // A new service never reuses the old mark.
        assert_eq!(t.ensure(&name("web"), pool).unwrap().fwmark.get(), 257);
    }

    #[test]
    fn exhaustion_is_an_error_for_that_service() {
        let pool = net("10.9.0.0/30");
        let mut t = Allocations::default();
        t.ensure(&name("a"), pool).unwrap();
        t.ensure(&name("b"), pool).unwrap();
        let e = t.ensure(&name("c"), pool).unwrap_err();
        assert_eq!(
            e.to_string(),
            "service c: the VIP pool 10.9.0.0/30 is exhausted (2 addresses, all allocated)"
        );
        assert!(t.get(&name("a")).is_some());
    }

    #[test]
    fn what_the_kernel_shows_is_adopted_unless_it_clashes() {
        let pool = net("10.9.0.0/24");
        let mut t = Allocations::default();
        assert!(t.adopt(&name("web"), "10.9.0.7".parse().unwrap(), 300, pool));
        assert_eq!(t.next_fwmark, 301, "new marks come after adopted ones");
        assert!(
            !t.adopt(&name("web"), "10.9.0.8".parse().unwrap(), 302, pool),
            "has one"
        );
        assert!(
            !t.adopt(&name("db"), "10.9.0.7".parse().unwrap(), 302, pool),
            "VIP taken"
        );
        assert!(
            !t.adopt(&name("db"), "10.9.0.8".parse().unwrap(), 300, pool),
            "mark taken"
        );
        assert!(
            !t.adopt(&name("db"), "10.8.0.8".parse().unwrap(), 302, pool),
            "outside the pool"
        );
        assert!(
            !t.adopt(&name("db"), "10.9.0.0".parse().unwrap(), 302, pool),
            "the network address"
        );
        assert!(t.adopt(&name("db"), "10.9.0.1".parse().unwrap(), 256, pool));
        assert_eq!(t.next_fwmark, 301);
        let new = t.ensure(&name("api"), pool).unwrap();
        assert_eq!((new.vip, new.fwmark.get()), ("10.9.0.2".parse().unwrap(), 301));
    }

    #[test]
    fn overlapping_pools_are_named() {
        let pool = net(DEFAULT_POOL);
        let docker = [("Docker network bridge".to_owned(), net("172.17.0.0/16"))];
        assert!(check_pool(pool, &docker).is_ok());
        let e = check_pool(net("10.253.7.0/24"), &[("host route".into(), net("10.0.0.0/8"))]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the VIP pool 10.253.7.0/24 overlaps host route 10.0.0.0/8; choose a pool that does not (--vip-pool)"
        );
        assert!(overlaps(net("10.0.0.0/8"), net("10.253.0.0/16")));
        assert!(!overlaps(net("10.252.0.0/16"), net("10.253.0.0/16")));
    }

    #[test]
    fn a_state_file_written_by_a_running_vipd_still_loads() {
        // The exact text a vipd of this version saves (state.rs writes it pretty-printed).
        let saved = r#"{
  "services": {
    "api": {
      "vip": "10.253.0.2",
      "fwmark": 257,
      "idle_since": 1700000000
    },
    "web": {
      "vip": "10.253.0.1",
      "fwmark": 256
    }
  },
  "next_fwmark": 258
}"#;
        let t: Allocations = serde_json::from_str(saved).unwrap();
        let mark = |n| FwMark::new(n).unwrap();
        assert_eq!(
            t.get(&name("web")),
            Some((Vip::new("10.253.0.1".parse().unwrap()), mark(256)))
        );
        assert_eq!(t.services[&name("api")].fwmark, mark(257));
        assert_eq!(t.services[&name("api")].idle_since, Some(1_700_000_000));
        assert_eq!(t.next_fwmark, 258);
        assert_eq!(serde_json::to_string_pretty(&t).unwrap(), saved);
    }

    #[test]
    fn adopting_takes_a_mark_or_the_kernels_raw_number_but_never_zero() {
        let pool = net("10.9.0.0/24");
        let mut t = Allocations::default();
        assert!(!t.adopt(&name("web"), "10.9.0.7".parse().unwrap(), 0, pool));
        assert!(t.adopt(
            &name("web"),
            "10.9.0.7".parse().unwrap(),
            FwMark::new(300).unwrap(),
            pool
        ));
        assert!(
            !t.adopt(&name("db"), "10.9.0.8".parse().unwrap(), 300, pool),
            "mark taken"
        );
    }

    #[test]
    fn a_mark_of_zero_read_from_disk_is_refused_not_handed_out() {
        assert!(serde_json::from_str::<FwMark>("0").is_err());
        assert_eq!(serde_json::from_str::<FwMark>("256").unwrap().get(), 256);
        assert_eq!(serde_json::to_string(&FwMark::new(256).unwrap()).unwrap(), "256");
        let mut t: Allocations = serde_json::from_str(r#"{"services":{},"next_fwmark":0}"#).unwrap();
        assert!(matches!(
            t.ensure(&name("web"), net(DEFAULT_POOL)),
            Err(AllocError::MarksExhausted { .. })
        ));
    }

    #[test]
    fn the_table_round_trips_as_json_and_follows_a_changed_pool() {
        let mut t = Allocations::default();
        t.ensure(&name("web"), net(DEFAULT_POOL)).unwrap();
        t.idle(&name("web"), 5);
        let text = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<Allocations>(&text).unwrap(), t);
        assert_eq!(t.retain_pool(net("10.252.0.0/16")), [name("web")]);
        assert_eq!(t.next_fwmark, 257);
    }
}
