//! Planning for one sandbox: what it has, what it should have, and the operations between.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

use super::firewall::{self, FwOp, ObservedFirewall};
use super::ipvs::{
    DestConfig, DestKey, Destination, IpvsOp, ServiceConfig, ServiceFlags, ServiceKey, Stats, Timeouts,
    VirtualService,
};
use super::model::{BackendAddr, FwMark, Ipv4Net};
use super::rules::Intent;
use super::spec::{SandboxSpec, ServiceSpec};

/// The `net.ipv4.vs.*` settings vipd keeps in a sandbox that has its services, by name
/// under `/proc/sys/net/ipv4/vs/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SysctlSettings(pub BTreeMap<String, i64>);

impl SysctlSettings {
    /// What vipd sets, and why:
    /// - `conntrack=1`: IPVS keeps conntrack entries, which the `-m ipvs` SNAT rule needs;
    /// - `conn_reuse_mode=0`: no 1 s stall when a client port is reused under load;
    /// - `expire_nodest_conn=1`: connections to a removed backend fail fast instead of hanging;
    /// - `expire_quiescent_template=1`: persistence templates of a weight-0 backend expire.
    pub const DEFAULTS: [(&'static str, i64); 4] = [
        ("conntrack", 1),
        ("conn_reuse_mode", 0),
        ("expire_nodest_conn", 1),
        ("expire_quiescent_template", 1),
    ];

    /// The kernel's own values, restored when vipd's last service leaves a namespace.
    pub const KERNEL_DEFAULTS: [(&'static str, i64); 4] = [
        ("conntrack", 0),
        ("conn_reuse_mode", 1),
        ("expire_nodest_conn", 0),
        ("expire_quiescent_template", 0),
    ];

    /// Is `name` a plausible sysctl name under net.ipv4.vs?
    pub fn valid_name(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    }

    /// Change or add one setting.
    pub fn set(&mut self, name: &str, value: i64) {
        self.0.insert(name.to_owned(), value);
    }

    fn kernel_default(name: &str) -> Option<i64> {
        Self::KERNEL_DEFAULTS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }
}

impl Default for SysctlSettings {
    fn default() -> Self {
        SysctlSettings(
            Self::DEFAULTS
                .iter()
                .map(|(n, v)| ((*n).to_owned(), *v))
                .collect(),
        )
    }
}

/// Set `/proc/sys/net/ipv4/vs/<name>` to `value`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SysctlOp {
    pub name: String,
    pub value: i64,
}

impl fmt::Display for SysctlOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sysctl -w net.ipv4.vs.{}={}", self.name, self.value)
    }
}

/// What a sandbox has now, as far as vipd is concerned.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedSandbox {
    /// Every IPVS service in the namespace.
    pub services: Vec<VirtualService>,
    /// Destinations of the services vipd owns or wants (see [`services_to_read`]).
    pub dests: BTreeMap<ServiceKey, Vec<Destination>>,
    pub firewall: ObservedFirewall,
    /// Current values of the sysctls vipd manages (missing ones are left out).
    pub sysctls: BTreeMap<String, i64>,
    pub timeouts: Timeouts,
    /// The namespace's own IPv4 addresses with their prefix, loopback excluded.
    pub addrs: Vec<Ipv4Net>,
}

impl ObservedSandbox {
    /// What the kernel holds after `plan` was applied to what `self` describes: lets a
    /// long-lived sandbox keep its view current without reading the kernel again (the
    /// periodic resync reads it). New services and destinations start with zero counters.
    pub fn after(&self, plan: &Plan) -> ObservedSandbox {
        let mut next = self.clone();
        next.apply(plan);
        next
    }

    /// [`ObservedSandbox::after`] in place: the cost is that of the plan's operations,
    /// not of everything the sandbox holds.
    pub fn apply(&mut self, plan: &Plan) {
        for op in plan.ipvs_remove.iter().chain(&plan.ipvs_add) {
            match op {
                IpvsOp::AddService { key, config } | IpvsOp::EditService { key, config } => {
                    self.services.retain(|s| s.key != *key);
                    self.services.push(VirtualService {
                        key: *key,
                        config: config.clone(),
                        stats: Stats::default(),
                    });
                    self.dests.entry(*key).or_default();
                }
                IpvsOp::DelService { key } => {
                    self.services.retain(|s| s.key != *key);
                    self.dests.remove(key);
                }
                IpvsOp::AddDest {
                    service,
                    dest,
                    config,
                }
                | IpvsOp::EditDest {
                    service,
                    dest,
                    config,
                } => {
                    let d = self.dests.entry(*service).or_default();
                    d.retain(|x| x.key != *dest);
                    d.push(Destination {
                        key: *dest,
                        config: *config,
                        active_conns: 0,
                        inactive_conns: 0,
                        persist_conns: 0,
                        stats: Stats::default(),
                    });
                }
                IpvsOp::DelDest { service, dest } => {
                    self.dests.entry(*service).or_default().retain(|x| x.key != *dest)
                }
                IpvsOp::SetTimeouts(t) => self.timeouts = *t,
            }
        }
        for op in &plan.firewall {
            match op {
                FwOp::NewChain(c) => {
                    self.firewall.chains.entry(*c).or_default();
                }
                FwOp::AddJump(c) => *self.firewall.jumps.entry(*c).or_default() += 1,
                FwOp::DelJump(c) => {
                    let n = self.firewall.jumps.entry(*c).or_default();
                    *n = n.saturating_sub(1);
                }
                FwOp::AddRule(r) => self
                    .firewall
                    .chains
                    .entry(r.chain)
                    .or_default()
                    .push(r.spec.clone()),
                FwOp::DelRule(r) => {
                    let rules = self.firewall.chains.entry(r.chain).or_default();
                    if let Some(i) = rules.iter().position(|x| *x == r.spec) {
                        rules.remove(i);
                    }
                }
                FwOp::DelChain(c) => {
                    self.firewall.chains.remove(c);
                }
            }
        }
        self.firewall.jumps.retain(|_, n| *n > 0);
        for op in plan.sysctls_before.iter().chain(&plan.sysctls_after) {
            self.sysctls.insert(op.name.clone(), op.value);
        }
    }
}

/// The fwmarks whose IPVS services are vipd's in a sandbox, from vipd's own records and
/// not from any comment: the marks its MARK rules set in the chains it owns (of the kernel
/// just read, or of the view kept of what vipd programmed there), and the mark the spec
/// gives a VIP that vipd's ping rule answers for (a service whose mark rule was deleted by
/// hand is still vipd's).
pub fn owned_marks(spec: &SandboxSpec, fw: &ObservedFirewall) -> BTreeSet<FwMark> {
    let mut owned = fw.marks();
    let pinged = fw.pinged();
    owned.extend(
        spec.services
            .iter()
            .filter(|s| s.publish.is_none() && pinged.contains(&s.vip.addr()))
            .map(|s| s.fwmark),
    );
    owned
}

/// The services the planner decides about: vipd's own ([`owned_marks`]) and the wanted
/// ones.
pub fn keys_to_confirm(spec: &SandboxSpec, fw: &ObservedFirewall) -> Vec<ServiceKey> {
    let mut keys: BTreeSet<FwMark> = owned_marks(spec, fw);
    keys.extend(spec.services.iter().map(|s| s.fwmark));
    keys.into_iter().map(ServiceKey::fwmark).collect()
}

/// The services whose destinations the planner needs: those of [`keys_to_confirm`] that
/// exist.
pub fn services_to_read(
    spec: &SandboxSpec,
    services: &[VirtualService],
    fw: &ObservedFirewall,
) -> Vec<ServiceKey> {
    let present: BTreeSet<ServiceKey> = services.iter().map(|s| s.key).collect();
    keys_to_confirm(spec, fw)
        .into_iter()
        .filter(|k| present.contains(k))
        .collect()
}

/// A plan cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The wanted fwmark belongs to an IPVS service that vipd did not create.
    #[error("service {service}: fwmark {mark} ({hex}) is already used by an IPVS service vipd does not own in this namespace; choose another fwmark", mark = .mark.get(), hex = .mark)]
    ForeignFwMark { service: String, mark: FwMark },
}

/// The operations that take a sandbox from what it has to what it should have, in the
/// order they are applied.
///
/// The order keeps the kernel in a state vipd recognises as its own even if it stops
/// half-way: IPVS services are removed before the mark rules that claim them, and created
/// after.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Plan {
    pub sysctls_before: Vec<SysctlOp>,
    pub ipvs_remove: Vec<IpvsOp>,
    pub firewall: Vec<FwOp>,
    pub ipvs_add: Vec<IpvsOp>,
    pub sysctls_after: Vec<SysctlOp>,
}

impl Plan {
    pub fn len(&self) -> usize {
        self.sysctls_before.len()
            + self.ipvs_remove.len()
            + self.firewall.len()
            + self.ipvs_add.len()
            + self.sysctls_after.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every operation as the equivalent command line, in order.
    pub fn lines(&self) -> Vec<String> {
        let mut out: Vec<String> = self.sysctls_before.iter().map(ToString::to_string).collect();
        out.extend(self.ipvs_remove.iter().map(ToString::to_string));
        out.extend(self.firewall.iter().map(ToString::to_string));
        out.extend(self.ipvs_add.iter().map(ToString::to_string));
        out.extend(self.sysctls_after.iter().map(ToString::to_string));
        out
    }
}

/// The rules a sandbox should have for `spec`, given its own addresses, as intents.
pub fn desired_rules(spec: &SandboxSpec, addrs: &[Ipv4Net]) -> Vec<Intent> {
    let mut rules = Vec::new();
    for svc in &spec.services {
        if let Some(publish) = svc.publish {
            // The ingress namespace: the port on its own address, and every forwarded
            // packet leaves from that address.
            rules.push(Intent::IngressMark {
                service: svc.name.clone(),
                addr: svc.vip,
                publish,
                mark: svc.fwmark,
            });
            if let IpAddr::V4(source) = svc.vip.addr() {
                rules.push(Intent::SnatAllIpvs { source });
            }
            continue;
        }
        rules.push(Intent::MarkVip {
            service: svc.name.clone(),
            vip: svc.vip,
            mark: svc.fwmark,
        });
        rules.push(Intent::PingVip {
            service: svc.name.clone(),
            vip: svc.vip,
            mark: svc.fwmark,
        });
    }
    rules.extend(
        snat_sources(spec, addrs)
            .into_iter()
            .map(|(dest_net, source)| Intent::SnatIpvs { dest_net, source }),
    );
    rules
}

/// The sandbox's own networks that hold a backend of a VIP service, each with the
/// sandbox's address on it: a connection to such a backend leaves from that address
/// (one SNAT rule each), so the reply comes back through the sandbox's IPVS.
fn snat_sources(spec: &SandboxSpec, addrs: &[Ipv4Net]) -> BTreeSet<(Ipv4Net, std::net::Ipv4Addr)> {
    spec.services
        .iter()
        .filter(|s| s.publish.is_none())
        .flat_map(|s| &s.backends)
        .filter_map(|b| own_network(addrs, &b.addr))
        .map(|own| (own.trunc(), own.addr()))
        .collect()
}

fn service_config(svc: &ServiceSpec) -> ServiceConfig {
    let mut config = ServiceConfig::new(svc.scheduler.clone());
    if let Some(timeout) = svc.persistence {
        config.flags = ServiceFlags(ServiceFlags::PERSISTENT);
        config.timeout = timeout;
    }
    config
}

/// Compute the plan for one sandbox. Pure: reads nothing but its arguments.
pub fn plan(spec: &SandboxSpec, seen: &ObservedSandbox, sysctls: &SysctlSettings) -> Result<Plan, PlanError> {
    let owned = owned_marks(spec, &seen.firewall);
    let present: BTreeMap<ServiceKey, &VirtualService> = seen.services.iter().map(|s| (s.key, s)).collect();

    for svc in &spec.services {
        if present.contains_key(&ServiceKey::fwmark(svc.fwmark)) && !owned.contains(&svc.fwmark) {
            return Err(PlanError::ForeignFwMark {
                service: svc.name.to_string(),
                mark: svc.fwmark,
            });
        }
    }

    let mut plan = Plan::default();
    let wanted: BTreeSet<FwMark> = spec.services.iter().map(|s| s.fwmark).collect();

    if !spec.services.is_empty() {
        for (name, value) in &sysctls.0 {
            if seen.sysctls.get(name) != Some(value) {
                plan.sysctls_before.push(SysctlOp {
                    name: name.clone(),
                    value: *value,
                });
            }
        }
    } else if !seen.firewall.is_clean() {
        for (name, value) in &sysctls.0 {
            let default = SysctlSettings::kernel_default(name);
            if let (Some(default), Some(now)) = (default, seen.sysctls.get(name)) {
                if now == value && *now != default {
                    plan.sysctls_after.push(SysctlOp {
                        name: name.clone(),
                        value: default,
                    });
                }
            }
        }
    }

    // Services vipd owns but no longer wants: remove (destinations go with them).
    for mark in owned.difference(&wanted) {
        let key = ServiceKey::fwmark(*mark);
        if present.contains_key(&key) {
            plan.ipvs_remove.push(IpvsOp::DelService { key });
        }
    }

    for svc in &spec.services {
        plan_service(
            svc,
            present.get(&ServiceKey::fwmark(svc.fwmark)).copied(),
            seen,
            &mut plan,
        );
    }

    if let Some(t) = spec.timeouts {
        if t != seen.timeouts {
            plan.ipvs_add.push(IpvsOp::SetTimeouts(t));
        }
    }

    plan.firewall = firewall::plan(&desired_rules(spec, &seen.addrs), &seen.firewall);
    Ok(plan)
}

/// The plan from `prev` to `next` for a sandbox that `seen` describes right after `prev`
/// was applied in full. When only backends changed, and not which of the sandbox's own
/// networks need a SNAT rule, only the changed services are planned: a task's start or
/// die costs each sandbox the same however many services it has. Anything else is
/// planned in full, by [`plan`]; both give the same plan.
pub fn plan_change(
    prev: &SandboxSpec,
    next: &SandboxSpec,
    seen: &ObservedSandbox,
    sysctls: &SysctlSettings,
) -> Result<Plan, PlanError> {
    // Every field but the backends: a field added to `ServiceSpec` must be named here.
    let same_but_backends = |a: &ServiceSpec, b: &ServiceSpec| {
        let ServiceSpec {
            name,
            vip,
            fwmark,
            scheduler,
            persistence,
            backends: _,
            publish,
        } = a;
        *name == b.name
            && *vip == b.vip
            && *fwmark == b.fwmark
            && *scheduler == b.scheduler
            && *persistence == b.persistence
            && *publish == b.publish
    };
    if prev.timeouts != next.timeouts
        || prev.services.len() != next.services.len()
        || !prev
            .services
            .iter()
            .zip(&next.services)
            .all(|(a, b)| same_but_backends(a, b))
    {
        return plan(next, seen, sysctls);
    }
    let changed: Vec<(&ServiceSpec, &ServiceSpec)> = prev
        .services
        .iter()
        .zip(&next.services)
        .filter(|(was, svc)| was.backends != svc.backends)
        .collect();
    // A SNAT rule comes or goes only with the first backend on one of the sandbox's
    // networks, or its last: look at the networks of the backends that came or went.
    let snat_changes = changed.iter().any(|(was, svc)| {
        let before: BTreeSet<_> = was.backends.iter().map(|b| b.addr).collect();
        let after: BTreeSet<_> = svc.backends.iter().map(|b| b.addr).collect();
        svc.publish.is_none()
            && before.symmetric_difference(&after).any(|addr| {
                own_network(&seen.addrs, addr).is_some_and(|net| covers(prev, net) != covers(next, net))
            })
    });
    if snat_changes {
        return plan(next, seen, sysctls);
    }
    let mut plan = Plan::default();
    for (_, svc) in changed {
        let key = ServiceKey::fwmark(svc.fwmark);
        let present = seen.services.iter().find(|s| s.key == key);
        plan_service(svc, present, seen, &mut plan);
    }
    Ok(plan)
}

/// The sandbox's own network (of `addrs`) that holds the backend `addr`, if any.
fn own_network(addrs: &[Ipv4Net], addr: &BackendAddr) -> Option<Ipv4Net> {
    let IpAddr::V4(ip) = addr.addr() else {
        return None;
    };
    addrs.iter().find(|a| a.contains(&ip)).copied()
}

/// Whether a backend of one of `spec`'s VIP services is on the network `net`: then the
/// sandbox needs the SNAT rule of `net`.
fn covers(spec: &SandboxSpec, net: Ipv4Net) -> bool {
    spec.services
        .iter()
        .filter(|s| s.publish.is_none())
        .flat_map(|s| &s.backends)
        .any(|b| matches!(b.addr.addr(), IpAddr::V4(ip) if net.contains(&ip)))
}

/// Add to `plan` what brings one service, and its destinations, from `seen` to `svc`.
fn plan_service(
    svc: &ServiceSpec,
    present: Option<&VirtualService>,
    seen: &ObservedSandbox,
    plan: &mut Plan,
) {
    let key = ServiceKey::fwmark(svc.fwmark);
    let config = service_config(svc);
    let want: BTreeMap<DestKey, DestConfig> = svc
        .backends
        .iter()
        .map(|b| {
            (
                DestKey {
                    addr: b.addr.addr(),
                    port: b.port,
                },
                DestConfig::masq(b.weight),
            )
        })
        .collect();
    let have: BTreeMap<DestKey, DestConfig> = match present {
        None => {
            plan.ipvs_add.push(IpvsOp::AddService { key, config });
            BTreeMap::new()
        }
        Some(existing) => {
            if !existing.config.satisfies(&config) {
                plan.ipvs_add.push(IpvsOp::EditService { key, config });
            }
            seen.dests
                .get(&key)
                .into_iter()
                .flatten()
                .map(|d| (d.key, d.config))
                .collect()
        }
    };
    for dest in have.keys().filter(|d| !want.contains_key(d)) {
        plan.ipvs_remove.push(IpvsOp::DelDest {
            service: key,
            dest: *dest,
        });
    }
    for (dest, config) in &want {
        match have.get(dest) {
            None => plan.ipvs_add.push(IpvsOp::AddDest {
                service: key,
                dest: *dest,
                config: *config,
            }),
            Some(now) if now != config => plan.ipvs_add.push(IpvsOp::EditDest {
                service: key,
                dest: *dest,
                config: *config,
            }),
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::spec;

    fn spec(json: &str) -> SandboxSpec {
        spec::parse(json).unwrap()
    }

    fn web(backends: &[&str]) -> SandboxSpec {
        let b: Vec<String> = backends.iter().map(|ip| format!(r#"{{"ip":"{ip}"}}"#)).collect();
        spec(&format!(
            r#"{{"services":[{{"name":"web","vip":"10.0.0.100","fwmark":256,"backends":[{}]}}]}}"#,
            b.join(",")
        ))
    }

    fn addrs() -> Vec<Ipv4Net> {
        vec![Ipv4Net::new("10.0.0.2".parse().unwrap(), 24).unwrap()]
    }

    fn kernel_defaults() -> BTreeMap<String, i64> {
        SysctlSettings::KERNEL_DEFAULTS
            .iter()
            .map(|(n, v)| ((*n).to_owned(), *v))
            .collect()
    }

    /// A sandbox spec from `(name, fwmark, scheduler, backends as "ip" or "ip/weight")`,
    /// each service's VIP 10.9.0.<fwmark - 255>.
    fn sandbox(services: &[(&str, u32, &str, &[&str])], timeouts: bool) -> SandboxSpec {
        let svcs: Vec<String> = services
            .iter()
            .map(|(name, mark, sched, backends)| {
                let b: Vec<String> = backends
                    .iter()
                    .map(|b| match b.split_once('/') {
                        Some((ip, w)) => format!(r#"{{"ip":"{ip}","weight":{w}}}"#),
                        None => format!(r#"{{"ip":"{b}"}}"#),
                    })
                    .collect();
                format!(
                    r#"{{"name":"{name}","vip":"10.9.0.{}","fwmark":{mark},"scheduler":"{sched}","backends":[{}]}}"#,
                    mark - 255,
                    b.join(",")
                )
            })
            .collect();
        let t = if timeouts {
            r#","timeouts":{"tcp":900,"tcpfin":120,"udp":300}"#
        } else {
            ""
        };
        spec(&format!(r#"{{"services":[{}]{t}}}"#, svcs.join(",")))
    }

    #[test]
    fn planning_only_the_change_gives_the_whole_plan_and_touches_no_rule_for_a_backend_change() {
        // Two networks of its own; at first only 10.0.0.0/24 holds backends.
        let own = vec![
            Ipv4Net::new("10.0.0.2".parse().unwrap(), 24).unwrap(),
            Ipv4Net::new("10.1.0.2".parse().unwrap(), 24).unwrap(),
        ];
        let s = SysctlSettings::default();
        let base: &[(&str, u32, &str, &[&str])] = &[
            ("api", 257, "rr", &["10.0.0.7", "10.0.0.8"]),
            ("web", 256, "rr", &["10.0.0.3", "10.0.0.4"]),
        ];
        let prev = sandbox(base, false);
        let empty = ObservedSandbox {
            addrs: own,
            sysctls: kernel_defaults(),
            ..Default::default()
        };
        let seen = empty.after(&plan(&prev, &empty, &s).unwrap());
        // (what changes, the spec after it, whether it is a backend change only)
        let cases: Vec<(&str, SandboxSpec, bool)> = vec![
            (
                "a backend added",
                sandbox(
                    &[base[0], ("web", 256, "rr", &["10.0.0.3", "10.0.0.4", "10.0.0.5"])],
                    false,
                ),
                true,
            ),
            (
                "a backend gone",
                sandbox(&[base[0], ("web", 256, "rr", &["10.0.0.4"])], false),
                true,
            ),
            (
                "a weight changed, and a backend swapped",
                sandbox(&[("api", 257, "rr", &["10.0.0.7/0", "10.0.0.9"]), base[1]], false),
                true,
            ),
            (
                "the last backend gone",
                sandbox(&[("api", 257, "rr", &[]), base[1]], false),
                true,
            ),
            (
                "a backend on a network with none before (a new SNAT rule)",
                sandbox(&[base[0], ("web", 256, "rr", &["10.0.0.3", "10.1.0.3"])], false),
                false,
            ),
            (
                "a scheduler changed",
                sandbox(&[base[0], ("web", 256, "wrr", &["10.0.0.3", "10.0.0.4"])], false),
                false,
            ),
            ("a service gone", sandbox(&[base[1]], false), false),
            (
                "a service added",
                sandbox(&[base[0], ("db", 258, "rr", &["10.0.0.9"]), base[1]], false),
                false,
            ),
            ("timeouts set", sandbox(base, true), false),
            ("nothing", sandbox(base, false), true),
        ];
        for (what, next, backends_only) in cases {
            let whole = plan(&next, &seen, &s).unwrap();
            let change = plan_change(&prev, &next, &seen, &s).unwrap();
            assert_eq!(change.lines(), whole.lines(), "{what}");
            if backends_only {
                assert!(
                    change.firewall.is_empty() && change.sysctls_before.is_empty(),
                    "{what}"
                );
            } else {
                assert!(!change.is_empty(), "{what}");
            }
            // Applied, it leaves the sandbox where a full read would: nothing more to do.
            assert!(
                plan(&next, &seen.after(&change), &s).unwrap().is_empty(),
                "{what}"
            );
        }
        // A backend change is planned from `prev` alone, without looking at the rules:
        // with a view that has lost them, a whole plan takes the services for someone
        // else's, and this one is still the one IPVS operation.
        let added = sandbox(
            &[base[0], ("web", 256, "rr", &["10.0.0.3", "10.0.0.4", "10.0.0.5"])],
            false,
        );
        let bare = ObservedSandbox {
            firewall: ObservedFirewall::default(),
            ..seen.clone()
        };
        assert_eq!(
            plan_change(&prev, &added, &bare, &s).unwrap().lines(),
            ["ipvsadm -a -f 256 -r 10.0.0.5:0 -m -w 1"]
        );
        assert!(matches!(
            plan(&added, &bare, &s),
            Err(PlanError::ForeignFwMark { .. })
        ));
        // The last backend on a network goes: its SNAT rule goes too.
        let two = sandbox(&[base[0], ("web", 256, "rr", &["10.0.0.3", "10.1.0.3"])], false);
        let seen_two = empty.after(&plan(&two, &empty, &s).unwrap());
        let p = plan_change(&two, &prev, &seen_two, &s).unwrap();
        assert_eq!(p.lines(), plan(&prev, &seen_two, &s).unwrap().lines());
        assert!(
            p.lines()
                .iter()
                .any(|l| l.starts_with("iptables -t nat -D") && l.contains("10.1.0.0/24")),
            "{:#?}",
            p.lines()
        );
        // The SNAT case does add a rule: the new network's.
        let snat = sandbox(&[base[0], ("web", 256, "rr", &["10.0.0.3", "10.1.0.3"])], false);
        let p = plan_change(&prev, &snat, &seen, &s).unwrap();
        assert!(
            p.lines().iter().any(|l| l.contains("10.1.0.0/24")),
            "{:#?}",
            p.lines()
        );
    }

    #[test]
    fn a_fresh_sandbox_gets_everything_then_nothing() {
        let seen = ObservedSandbox {
            addrs: addrs(),
            sysctls: kernel_defaults(),
            ..Default::default()
        };
        let want = web(&["10.0.0.3", "10.0.0.4", "10.0.0.5"]);
        let p = plan(&want, &seen, &SysctlSettings::default()).unwrap();
        assert_eq!(p.sysctls_before.len(), 4);
        assert_eq!(p.ipvs_remove, []);
        assert_eq!(p.ipvs_add.len(), 4, "{:#?}", p.ipvs_add);
        // 3 chains, 3 jumps, mark + ping + snat rules.
        assert_eq!(p.firewall.len(), 9, "{:#?}", p.firewall);
        let lines = p.lines();
        assert!(
            lines.contains(&"ipvsadm -A -f 256 -s rr".to_owned()),
            "{lines:#?}"
        );
        assert!(lines.contains(&"ipvsadm -a -f 256 -r 10.0.0.3:0 -m -w 1".to_owned()));

        let after = seen.after(&p);
        let again = plan(&want, &after, &SysctlSettings::default()).unwrap();
        assert!(again.is_empty(), "{:#?}", again);
    }

    #[test]
    fn one_backend_change_is_one_operation() {
        let seen = ObservedSandbox {
            addrs: addrs(),
            ..Default::default()
        };
        let s = SysctlSettings::default();
        let mut now = seen.after(&plan(&web(&["10.0.0.3", "10.0.0.4"]), &seen, &s).unwrap());

        let p = plan(&web(&["10.0.0.3", "10.0.0.4", "10.0.0.5"]), &now, &s).unwrap();
        assert_eq!(p.lines(), ["ipvsadm -a -f 256 -r 10.0.0.5:0 -m -w 1"]);
        now = now.after(&p);

        let p = plan(&web(&["10.0.0.3", "10.0.0.5"]), &now, &s).unwrap();
        assert_eq!(p.lines(), ["ipvsadm -d -f 256 -r 10.0.0.4:0"]);
        now = now.after(&p);

        let w = spec(
            r#"{"services":[{"name":"web","vip":"10.0.0.100","fwmark":256,"backends":[{"ip":"10.0.0.3","weight":0},{"ip":"10.0.0.5"}]}]}"#,
        );
        let p = plan(&w, &now, &s).unwrap();
        assert_eq!(p.lines(), ["ipvsadm -e -f 256 -r 10.0.0.3:0 -m -w 0"]);
    }

    #[test]
    fn scheduler_and_persistence_changes_edit_the_service() {
        let seen = ObservedSandbox {
            addrs: addrs(),
            ..Default::default()
        };
        let s = SysctlSettings::default();
        let now = seen.after(&plan(&web(&["10.0.0.3"]), &seen, &s).unwrap());
        let w = spec(
            r#"{"services":[{"name":"web","vip":"10.0.0.100","fwmark":256,"scheduler":"wlc","persistence":300,"backends":[{"ip":"10.0.0.3"}]}]}"#,
        );
        let p = plan(&w, &now, &s).unwrap();
        assert_eq!(p.lines(), ["ipvsadm -E -f 256 -s wlc -p 300"]);
    }

    #[test]
    fn an_empty_spec_removes_everything_vipd_owns_and_restores_sysctls() {
        let seen = ObservedSandbox {
            addrs: addrs(),
            sysctls: kernel_defaults(),
            ..Default::default()
        };
        let s = SysctlSettings::default();
        let now = seen.after(&plan(&web(&["10.0.0.3"]), &seen, &s).unwrap());
        let p = plan(&SandboxSpec::default(), &now, &s).unwrap();
        assert_eq!(
            p.ipvs_remove,
            [IpvsOp::DelService {
                key: ServiceKey::fwmark(FwMark::new(256).unwrap())
            }]
        );
        let gone = now.after(&p);
        assert!(gone.firewall.is_clean(), "{:#?}", gone.firewall);
        assert!(gone.services.is_empty());
        assert_eq!(gone.sysctls, kernel_defaults());
        assert!(plan(&SandboxSpec::default(), &gone, &s).unwrap().is_empty());
    }

    #[test]
    fn ownership_comes_from_what_vipds_rules_do_not_from_their_comments() {
        let empty = ObservedSandbox {
            addrs: addrs(),
            ..Default::default()
        };
        let s = SysctlSettings::default();
        let want = web(&["10.0.0.3"]);
        let now = empty.after(&plan(&want, &empty, &s).unwrap());
        let mark = FwMark::new(256).unwrap();
        assert_eq!(owned_marks(&want, &now.firewall), [mark].into());

        // An operator rewrote the comments: the rules still do what vipd's do, so the
        // service is still vipd's; only the rules are put back as rendered.
        let mut relabelled = now.clone();
        for rules in relabelled.firewall.chains.values_mut() {
            for r in rules.iter_mut() {
                *r = r.replace("vipd:web:256", "hand-edited:999");
            }
        }
        assert_eq!(
            owned_marks(&SandboxSpec::default(), &relabelled.firewall),
            [mark].into()
        );
        let p = plan(&want, &relabelled, &s).unwrap();
        assert!(p.ipvs_remove.is_empty() && p.ipvs_add.is_empty(), "{p:#?}");
        assert!(!p.firewall.is_empty());
        assert!(plan(&want, &relabelled.after(&p), &s).unwrap().is_empty());

        // The mark rule deleted by hand: the ping rule for the VIP is still vipd's, and
        // the spec (vipd's record) says which mark that VIP has.
        let mut unmarked = now.clone();
        unmarked
            .firewall
            .chains
            .get_mut(&firewall::MANGLE_OUTPUT)
            .unwrap()
            .clear();
        assert!(unmarked.firewall.marks().is_empty());
        assert_eq!(owned_marks(&want, &unmarked.firewall), [mark].into());
        let p = plan(&want, &unmarked, &s).unwrap();
        let mark_rule = Intent::MarkVip {
            service: want.services[0].name.clone(),
            vip: want.services[0].vip,
            mark,
        };
        assert_eq!(p.firewall, [FwOp::AddRule(firewall::render(&mark_rule))]);
        // ... but it proves nothing about another VIP's mark.
        let elsewhere = spec(r#"{"services":[{"name":"web","vip":"10.0.0.200","fwmark":256}]}"#);
        assert!(owned_marks(&elsewhere, &unmarked.firewall).is_empty());
        assert!(matches!(
            plan(&elsewhere, &unmarked, &s),
            Err(PlanError::ForeignFwMark { .. })
        ));
    }

    #[test]
    fn a_comment_outside_vipds_chains_or_on_a_rule_that_marks_nothing_claims_nothing() {
        // What iptables-save shows: vipd's comment on a foreign rule in a built-in chain,
        // and on a rule in vipd's chain that does not mark.
        let fw = firewall::parse_save(
            "*mangle\n:OUTPUT ACCEPT [0:0]\n:VIPD-OUTPUT - [0:0]\n\
             -A OUTPUT -d 10.0.0.100/32 -m comment --comment \"vipd:web:256\" -j MARK --set-xmark 0x100/0xffffffff\n\
             -A VIPD-OUTPUT -d 10.0.0.100/32 -m comment --comment \"vipd:web:256\" -j RETURN\n\
             COMMIT\n",
        );
        let seen = ObservedSandbox {
            services: vec![VirtualService {
                key: ServiceKey::fwmark(FwMark::new(256).unwrap()),
                config: ServiceConfig::new(crate::core::model::Scheduler::RoundRobin),
                stats: Stats::default(),
            }],
            firewall: fw,
            addrs: addrs(),
            ..Default::default()
        };
        let want = web(&["10.0.0.3"]);
        assert!(owned_marks(&want, &seen.firewall).is_empty());
        assert!(matches!(
            plan(&want, &seen, &SysctlSettings::default()),
            Err(PlanError::ForeignFwMark { .. })
        ));
        // Unwanted, it is not removed either.
        let p = plan(&SandboxSpec::default(), &seen, &SysctlSettings::default()).unwrap();
        assert!(p.ipvs_remove.is_empty(), "{p:#?}");
    }

    #[test]
    fn foreign_services_are_left_alone_and_their_marks_refused() {
        let foreign = VirtualService {
            key: ServiceKey::fwmark(FwMark::new(256).unwrap()),
            config: ServiceConfig::new(crate::core::model::Scheduler::WeightedLeastConn),
            stats: Stats::default(),
        };
        let seen = ObservedSandbox {
            services: vec![foreign.clone()],
            addrs: addrs(),
            ..Default::default()
        };
        let err = plan(&web(&["10.0.0.3"]), &seen, &SysctlSettings::default()).unwrap_err();
        assert!(
            err.to_string()
                .contains("fwmark 256 (0x100) is already used by an IPVS service vipd does not own"),
            "{err}"
        );

        let other = spec(r#"{"services":[{"name":"web","vip":"10.0.0.100","fwmark":257}]}"#);
        let p = plan(&other, &seen, &SysctlSettings::default()).unwrap();
        assert!(p.ipvs_remove.is_empty());
        assert!(p
            .ipvs_add
            .iter()
            .all(|op| !matches!(op, IpvsOp::AddService { key, .. } if *key == foreign.key)));
        let p = plan(&SandboxSpec::default(), &seen, &SysctlSettings::default()).unwrap();
        assert!(p.is_empty(), "{p:#?}");
    }

    #[test]
    fn snat_follows_the_networks_the_backends_are_on() {
        let own = vec![
            Ipv4Net::new("10.0.0.2".parse().unwrap(), 24).unwrap(),
            Ipv4Net::new("172.20.0.7".parse().unwrap(), 16).unwrap(),
        ];
        let want = web(&["10.0.0.3", "172.20.5.5", "192.168.1.1"]);
        let rules = desired_rules(&want, &own);
        let snat: Vec<&Intent> = rules
            .iter()
            .filter(|r| matches!(r, Intent::SnatIpvs { .. }))
            .collect();
        assert_eq!(
            snat,
            [
                &Intent::SnatIpvs {
                    dest_net: Ipv4Net::new("10.0.0.0".parse().unwrap(), 24).unwrap(),
                    source: "10.0.0.2".parse().unwrap()
                },
                &Intent::SnatIpvs {
                    dest_net: Ipv4Net::new("172.20.0.0".parse().unwrap(), 16).unwrap(),
                    source: "172.20.0.7".parse().unwrap()
                },
            ]
        );
    }

    #[test]
    fn renaming_or_remarking_a_service_replaces_it() {
        let seen = ObservedSandbox {
            addrs: addrs(),
            ..Default::default()
        };
        let s = SysctlSettings::default();
        let now = seen.after(&plan(&web(&["10.0.0.3"]), &seen, &s).unwrap());
        let moved = spec(
            r#"{"services":[{"name":"web","vip":"10.0.0.100","fwmark":300,"backends":[{"ip":"10.0.0.3"}]}]}"#,
        );
        let p = plan(&moved, &now, &s).unwrap();
        assert_eq!(
            p.ipvs_remove,
            [IpvsOp::DelService {
                key: ServiceKey::fwmark(FwMark::new(256).unwrap())
            }]
        );
        assert_eq!(p.ipvs_add.len(), 2);
        let after = now.after(&p);
        assert!(plan(&moved, &after, &s).unwrap().is_empty());
    }

    #[test]
    fn timeouts_are_set_only_when_asked_and_different() {
        let seen = ObservedSandbox {
            timeouts: Timeouts {
                tcp: 900,
                tcp_fin: 120,
                udp: 300,
            },
            ..Default::default()
        };
        let s = SysctlSettings::default();
        let same = spec(r#"{"timeouts":{"tcp":900,"tcpfin":120,"udp":300}}"#);
        assert!(plan(&same, &seen, &s).unwrap().is_empty());
        let longer = spec(r#"{"timeouts":{"tcp":7200,"tcpfin":120,"udp":300}}"#);
        assert_eq!(
            plan(&longer, &seen, &s).unwrap().lines(),
            ["ipvsadm --set 7200 120 300"]
        );
    }
}
