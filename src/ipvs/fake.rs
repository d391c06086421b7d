//! An in-memory IPVS table that behaves like the kernel's.
//!
//! [`FakeIpvs`] keeps services and destinations and refuses what the kernel refuses, with
//! the kernel's errno (checked against a real kernel by the VM test suite, which runs the
//! same cases against both):
//!
//! | operation | refused when | errno |
//! |---|---|---|
//! | add service | it exists | `EEXIST` |
//! | add / edit service | the scheduler is one the kernel lacks ([`Scheduler::Other`]) | `ENOENT` |
//! | add / edit service | IPv6 with a netmask (prefix length) outside 1..=128 | `EINVAL` |
//! | edit / delete service | it does not exist | `ESRCH` |
//! | add / edit / delete destination | its service does not exist | `ESRCH` |
//! | add / edit destination | its family differs from the service's, unless tunnelled | `EINVAL` |
//! | add / edit destination | weight above `i32::MAX`, or lower threshold above upper | `ERANGE` |
//! | add destination | it exists | `EEXIST` |
//! | edit / delete destination | it does not exist | `ENOENT` |
//!
//! What it cannot know: the kernel also refuses a destination whose address is not unicast
//! in the namespace (`EINVAL`), which depends on the namespace's routes.
//!
//! Listing the destinations of a service that does not exist gives an empty list, as the
//! kernel's dump does.

use std::collections::BTreeMap;

use nix::errno::Errno;

use super::{IpvsError, IpvsTable};
use crate::core::ipvs::{
    AddrFamily, DestConfig, DestKey, Destination, FwdMethod, IpvsOp, ServiceConfig, ServiceFlags, ServiceKey,
    Stats, Timeouts, VirtualService,
};
use crate::core::model::Scheduler;

/// The kernel's default timeouts (`ipvsadm -L --timeout` on a fresh namespace).
pub const KERNEL_DEFAULT_TIMEOUTS: Timeouts = Timeouts {
    tcp: 900,
    tcp_fin: 120,
    udp: 300,
};

#[derive(Debug, Clone)]
struct Entry {
    service: VirtualService,
    dests: BTreeMap<DestKey, Destination>,
}

/// A stateful in-memory IPVS table. See the module documentation for what it refuses.
#[derive(Debug, Clone)]
pub struct FakeIpvs {
    services: BTreeMap<ServiceKey, Entry>,
    timeouts: Timeouts,
    applied: usize,
    refused: usize,
    fail_next: Vec<i32>,
}

impl Default for FakeIpvs {
    fn default() -> Self {
        FakeIpvs {
            services: BTreeMap::new(),
            timeouts: KERNEL_DEFAULT_TIMEOUTS,
            applied: 0,
            refused: 0,
            fail_next: Vec::new(),
        }
    }
}

fn refuse(op: &IpvsOp, errno: Errno) -> IpvsError {
    IpvsError::kernel(op.to_string(), errno as i32)
}

/// The flags the kernel reports for a service configured with `config`.
fn as_kernel_reports(config: &ServiceConfig) -> ServiceConfig {
    let mut c = config.clone();
    c.flags = ServiceFlags(config.flags.requested().0 | ServiceFlags::HASHED);
    c
}

fn check_service_config(op: &IpvsOp, key: &ServiceKey, c: &ServiceConfig) -> Result<(), IpvsError> {
    if matches!(c.scheduler, Scheduler::Other(_)) {
        return Err(refuse(op, Errno::ENOENT));
    }
    if key.af() == AddrFamily::Inet6 && !(1..=128).contains(&c.netmask) {
        return Err(refuse(op, Errno::EINVAL));
    }
    Ok(())
}

fn check_dest_config(
    op: &IpvsOp,
    service: &ServiceKey,
    dest: &DestKey,
    c: &DestConfig,
) -> Result<(), IpvsError> {
    if AddrFamily::of(&dest.addr) != service.af() && c.fwd != FwdMethod::Tunnel {
        return Err(refuse(op, Errno::EINVAL));
    }
    if i32::try_from(c.weight).is_err() || c.lower_threshold > c.upper_threshold {
        return Err(refuse(op, Errno::ERANGE));
    }
    Ok(())
}

impl FakeIpvs {
    /// An empty table with the kernel's default timeouts.
    pub fn new() -> Self {
        Self::default()
    }

    /// Put a service (and its destinations) in the table as if another program had
    /// created it. Replaces a service with the same key. Not counted as an applied op.
    pub fn insert_foreign(&mut self, service: VirtualService, dests: impl IntoIterator<Item = Destination>) {
        let dests = dests.into_iter().map(|d| (d.key, d)).collect();
        self.services.insert(service.key, Entry { service, dests });
    }

    /// A service, as a dump would report it.
    pub fn service(&self, key: &ServiceKey) -> Option<&VirtualService> {
        self.services.get(key).map(|e| &e.service)
    }

    /// A service, to change its counters in a test.
    pub fn service_mut(&mut self, key: &ServiceKey) -> Option<&mut VirtualService> {
        self.services.get_mut(key).map(|e| &mut e.service)
    }

    /// A destination of a service.
    pub fn destination(&self, service: &ServiceKey, dest: &DestKey) -> Option<&Destination> {
        self.services.get(service).and_then(|e| e.dests.get(dest))
    }

    /// A destination, to change its counters in a test.
    pub fn destination_mut(&mut self, service: &ServiceKey, dest: &DestKey) -> Option<&mut Destination> {
        self.services.get_mut(service).and_then(|e| e.dests.get_mut(dest))
    }

    /// The keys of every service, in order.
    pub fn service_keys(&self) -> Vec<ServiceKey> {
        self.services.keys().copied().collect()
    }

    /// How many operations succeeded (foreign inserts not counted).
    pub fn ops_applied(&self) -> usize {
        self.applied
    }

    /// How many operations were refused.
    pub fn ops_refused(&self) -> usize {
        self.refused
    }

    /// Make the next operation fail with `errno` (without changing the table), as a
    /// kernel or a racing program might. Several calls queue several failures.
    pub fn fail_next(&mut self, errno: i32) {
        self.fail_next.push(errno);
    }

    fn entry(&mut self, op: &IpvsOp, key: &ServiceKey) -> Result<&mut Entry, IpvsError> {
        self.services.get_mut(key).ok_or_else(|| refuse(op, Errno::ESRCH))
    }

    fn apply_inner(&mut self, op: &IpvsOp) -> Result<(), IpvsError> {
        if !self.fail_next.is_empty() {
            let errno = self.fail_next.remove(0);
            return Err(IpvsError::kernel(op.to_string(), errno));
        }
        match op {
            IpvsOp::AddService { key, config } => {
                if self.services.contains_key(key) {
                    return Err(refuse(op, Errno::EEXIST));
                }
                check_service_config(op, key, config)?;
                self.services.insert(
                    *key,
                    Entry {
                        service: VirtualService {
                            key: *key,
                            config: as_kernel_reports(config),
                            stats: Stats::default(),
                        },
                        dests: BTreeMap::new(),
                    },
                );
            }
            IpvsOp::EditService { key, config } => {
                let entry = self.entry(op, key)?;
                check_service_config(op, key, config)?;
                entry.service.config = as_kernel_reports(config);
            }
            IpvsOp::DelService { key } => {
                self.entry(op, key)?;
                self.services.remove(key);
            }
            IpvsOp::AddDest {
                service,
                dest,
                config,
            } => {
                let entry = self.entry(op, service)?;
                check_dest_config(op, service, dest, config)?;
                if entry.dests.contains_key(dest) {
                    return Err(refuse(op, Errno::EEXIST));
                }
                entry.dests.insert(
                    *dest,
                    Destination {
                        key: *dest,
                        config: *config,
                        active_conns: 0,
                        inactive_conns: 0,
                        persist_conns: 0,
                        stats: Stats::default(),
                    },
                );
            }
            IpvsOp::EditDest {
                service,
                dest,
                config,
            } => {
                let entry = self.entry(op, service)?;
                check_dest_config(op, service, dest, config)?;
                let d = entry
                    .dests
                    .get_mut(dest)
                    .ok_or_else(|| refuse(op, Errno::ENOENT))?;
                d.config = *config;
            }
            IpvsOp::DelDest { service, dest } => {
                let entry = self.entry(op, service)?;
                entry
                    .dests
                    .remove(dest)
                    .ok_or_else(|| refuse(op, Errno::ENOENT))?;
            }
            IpvsOp::SetTimeouts(t) => {
                // 0 leaves a timeout unchanged, as in the kernel.
                for (have, want) in [
                    (&mut self.timeouts.tcp, t.tcp),
                    (&mut self.timeouts.tcp_fin, t.tcp_fin),
                    (&mut self.timeouts.udp, t.udp),
                ] {
                    if want != 0 {
                        *have = want;
                    }
                }
            }
        }
        Ok(())
    }
}

impl IpvsTable for FakeIpvs {
    fn services(&mut self) -> Result<Vec<VirtualService>, IpvsError> {
        Ok(self.services.values().map(|e| e.service.clone()).collect())
    }

    fn get_service(&mut self, key: &ServiceKey) -> Result<Option<VirtualService>, IpvsError> {
        Ok(self.services.get(key).map(|e| e.service.clone()))
    }

    fn destinations(&mut self, service: &ServiceKey) -> Result<Vec<Destination>, IpvsError> {
        Ok(self
            .services
            .get(service)
            .map(|e| e.dests.values().cloned().collect())
            .unwrap_or_default())
    }

    fn timeouts(&mut self) -> Result<Timeouts, IpvsError> {
        Ok(self.timeouts)
    }

    fn apply(&mut self, op: &IpvsOp) -> Result<(), IpvsError> {
        let r = self.apply_inner(op);
        match r {
            Ok(()) => self.applied += 1,
            Err(_) => self.refused += 1,
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ipvs::IpProto;
    use crate::core::model::FwMark;

    fn fwm(mark: u32) -> ServiceKey {
        ServiceKey::fwmark(FwMark::new(mark).unwrap())
    }

    fn dk(addr: &str) -> DestKey {
        DestKey {
            addr: addr.parse().unwrap(),
            port: 0,
        }
    }

    fn add_svc(mark: u32) -> IpvsOp {
        IpvsOp::AddService {
            key: fwm(mark),
            config: ServiceConfig::new(Scheduler::RoundRobin),
        }
    }

    fn add_dest(mark: u32, addr: &str) -> IpvsOp {
        IpvsOp::AddDest {
            service: fwm(mark),
            dest: dk(addr),
            config: DestConfig::masq(1),
        }
    }

    fn errno(r: Result<(), IpvsError>) -> Option<i32> {
        r.err().and_then(|e| e.errno())
    }

    const EEXIST: Option<i32> = Some(Errno::EEXIST as i32);
    const ENOENT: Option<i32> = Some(Errno::ENOENT as i32);
    const ESRCH: Option<i32> = Some(Errno::ESRCH as i32);
    const EINVAL: Option<i32> = Some(Errno::EINVAL as i32);
    const ERANGE: Option<i32> = Some(Errno::ERANGE as i32);

    #[test]
    fn services_are_added_edited_and_deleted() {
        let mut t = FakeIpvs::new();
        t.apply(&add_svc(1)).unwrap();
        let s = t.service(&fwm(1)).unwrap();
        assert_eq!(s.config.flags, ServiceFlags(ServiceFlags::HASHED));
        assert!(s.config.satisfies(&ServiceConfig::new(Scheduler::RoundRobin)));
        t.apply(&IpvsOp::EditService {
            key: fwm(1),
            config: ServiceConfig::new(Scheduler::WeightedLeastConn),
        })
        .unwrap();
        assert_eq!(
            t.services().unwrap()[0].config.scheduler,
            Scheduler::WeightedLeastConn
        );
        t.apply(&IpvsOp::DelService { key: fwm(1) }).unwrap();
        assert!(t.services().unwrap().is_empty());
        assert_eq!(t.ops_applied(), 3);
    }

    #[test]
    fn service_refusals_carry_the_kernels_errno() {
        let mut t = FakeIpvs::new();
        t.apply(&add_svc(1)).unwrap();
        assert_eq!(errno(t.apply(&add_svc(1))), EEXIST);
        assert_eq!(
            errno(t.apply(&IpvsOp::AddService {
                key: fwm(2),
                config: ServiceConfig::new(Scheduler::Other("nope".into())),
            })),
            ENOENT
        );
        assert_eq!(
            errno(t.apply(&IpvsOp::EditService {
                key: fwm(1),
                config: ServiceConfig::new(Scheduler::Other("nope".into())),
            })),
            ENOENT
        );
        assert_eq!(
            errno(t.apply(&IpvsOp::EditService {
                key: fwm(2),
                config: ServiceConfig::new(Scheduler::RoundRobin),
            })),
            ESRCH
        );
        assert_eq!(errno(t.apply(&IpvsOp::DelService { key: fwm(2) })), ESRCH);
        let v6 = ServiceKey::FwMark {
            af: AddrFamily::Inet6,
            mark: FwMark::new(1).unwrap(),
        };
        assert_eq!(
            errno(t.apply(&IpvsOp::AddService {
                key: v6,
                config: ServiceConfig::new(Scheduler::RoundRobin),
            })),
            EINVAL
        );
        let mut c6 = ServiceConfig::new(Scheduler::RoundRobin);
        c6.netmask = 128;
        t.apply(&IpvsOp::AddService { key: v6, config: c6 }).unwrap();
        assert_eq!(t.ops_applied(), 2);
        assert_eq!(t.ops_refused(), 6);
        // Refusals leave the table unchanged.
        assert_eq!(t.service_keys(), vec![fwm(1), v6]);
    }

    #[test]
    fn destination_refusals_carry_the_kernels_errno() {
        let mut t = FakeIpvs::new();
        assert_eq!(errno(t.apply(&add_dest(1, "10.0.0.2"))), ESRCH);
        t.apply(&add_svc(1)).unwrap();
        t.apply(&add_dest(1, "10.0.0.2")).unwrap();
        assert_eq!(errno(t.apply(&add_dest(1, "10.0.0.2"))), EEXIST);
        let edit = |addr: &str| IpvsOp::EditDest {
            service: fwm(1),
            dest: dk(addr),
            config: DestConfig::masq(5),
        };
        assert_eq!(errno(t.apply(&edit("10.0.0.3"))), ENOENT);
        assert_eq!(
            errno(t.apply(&IpvsOp::DelDest {
                service: fwm(1),
                dest: dk("10.0.0.3")
            })),
            ENOENT
        );
        assert_eq!(
            errno(t.apply(&IpvsOp::DelDest {
                service: fwm(9),
                dest: dk("10.0.0.2")
            })),
            ESRCH
        );
        assert_eq!(errno(t.apply(&add_dest(1, "fd00::2"))), EINVAL);
        let mut bad = DestConfig::masq(1);
        bad.lower_threshold = 5;
        assert_eq!(
            errno(t.apply(&IpvsOp::AddDest {
                service: fwm(1),
                dest: dk("10.0.0.4"),
                config: bad
            })),
            ERANGE
        );
        t.apply(&edit("10.0.0.2")).unwrap();
        assert_eq!(t.destination(&fwm(1), &dk("10.0.0.2")).unwrap().config.weight, 5);
        t.apply(&IpvsOp::DelDest {
            service: fwm(1),
            dest: dk("10.0.0.2"),
        })
        .unwrap();
        assert!(t.destinations(&fwm(1)).unwrap().is_empty());
    }

    #[test]
    fn deleting_a_service_deletes_its_destinations() {
        let mut t = FakeIpvs::new();
        t.apply_all(&[add_svc(1), add_dest(1, "10.0.0.2"), add_dest(1, "10.0.0.3")])
            .unwrap();
        assert_eq!(t.destinations(&fwm(1)).unwrap().len(), 2);
        t.apply(&IpvsOp::DelService { key: fwm(1) }).unwrap();
        t.apply(&add_svc(1)).unwrap();
        assert!(t.destinations(&fwm(1)).unwrap().is_empty());
        assert!(t.destinations(&fwm(7)).unwrap().is_empty());
    }

    #[test]
    fn apply_all_stops_at_the_first_refusal() {
        let mut t = FakeIpvs::new();
        let ops = [add_svc(1), add_dest(2, "10.0.0.2"), add_svc(3)];
        let (i, e) = t.apply_all(&ops).unwrap_err();
        assert_eq!((i, e.errno()), (1, ESRCH));
        assert_eq!(t.service_keys(), vec![fwm(1)]);
    }

    #[test]
    fn timeouts_start_at_the_kernels_defaults_and_zero_keeps_a_value() {
        let mut t = FakeIpvs::new();
        assert_eq!(t.timeouts().unwrap(), KERNEL_DEFAULT_TIMEOUTS);
        t.apply(&IpvsOp::SetTimeouts(Timeouts {
            tcp: 100,
            tcp_fin: 0,
            udp: 20,
        }))
        .unwrap();
        assert_eq!(
            t.timeouts().unwrap(),
            Timeouts {
                tcp: 100,
                tcp_fin: 120,
                udp: 20
            }
        );
    }

    #[test]
    fn foreign_services_can_be_seeded_and_inspected() {
        let mut t = FakeIpvs::new();
        let key = ServiceKey::Addr {
            protocol: IpProto::TCP,
            addr: "10.9.9.9".parse().unwrap(),
            port: 80,
        };
        t.insert_foreign(
            VirtualService {
                key,
                config: ServiceConfig::new(Scheduler::Other("twos".into())),
                stats: Stats::default(),
            },
            [Destination {
                key: DestKey {
                    addr: "10.0.0.8".parse().unwrap(),
                    port: 8080,
                },
                config: DestConfig::masq(1),
                active_conns: 3,
                inactive_conns: 0,
                persist_conns: 0,
                stats: Stats::default(),
            }],
        );
        assert_eq!(t.ops_applied(), 0);
        t.service_mut(&key).unwrap().stats.conns = 42;
        assert_eq!(t.services().unwrap()[0].stats.conns, 42);
        assert_eq!(t.destinations(&key).unwrap()[0].active_conns, 3);
        t.fail_next(Errno::EPERM as i32);
        assert_eq!(errno(t.apply(&add_svc(5))), Some(Errno::EPERM as i32));
        t.apply(&add_svc(5)).unwrap();
    }
}
