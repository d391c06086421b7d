//! One sandbox namespace, from what it has to what it should have.
//!
//! Level-triggered: read the kernel (IPVS dump, vipd's chains, sysctls, addresses), plan
//! the difference in the pure core, apply it. The kernel is the truth; nothing is cached
//! between runs, so a second run with nothing changed finds nothing to do.

use std::collections::BTreeMap;

use serde::Serialize;
use tracing::{debug, info};

use crate::addrs::{Addresses, AddrsError};
use crate::core::firewall::{self, MarkedService};
use crate::core::ipvs::{Destination, ServiceKey, VirtualService};
use crate::core::plan::{self, ObservedSandbox, Plan, PlanError, SysctlSettings};
use crate::core::spec::SandboxSpec;
use crate::firewall::{Firewall, FirewallError};
use crate::ipvs::{IpvsError, IpvsTable};
use crate::netns::NetnsError;
use crate::sysctl::{SysctlError, Sysctls};

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("IPVS: {0}")]
    Ipvs(#[from] IpvsError),
    #[error("iptables: {0}")]
    Firewall(#[from] FirewallError),
    #[error("sysctl: {0}")]
    Sysctl(#[from] SysctlError),
    #[error("addresses: {0}")]
    Addrs(#[from] AddrsError),
    #[error("refused: {0}")]
    Plan(#[from] PlanError),
    /// Part of the plan was applied before an error; a new run completes it.
    #[error("{done} of {total} operations applied, then: {source}")]
    Partial {
        done: usize,
        total: usize,
        source: Box<ReconcileError>,
    },
}

/// The kernel interfaces of one namespace.
pub struct Sandbox<'a> {
    pub ipvs: &'a mut dyn IpvsTable,
    pub firewall: &'a mut dyn Firewall,
    pub sysctls: &'a mut dyn Sysctls,
    pub addrs: &'a mut dyn Addresses,
}

/// What a reconcile did (or, in a dry run, would do).
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub plan: Plan,
    pub applied: usize,
}

/// Read what the namespace has.
pub fn observe(
    sb: &mut Sandbox<'_>,
    spec: &SandboxSpec,
    sysctls: &SysctlSettings,
) -> Result<ObservedSandbox, ReconcileError> {
    let firewall = firewall::parse_save(&sb.firewall.save()?);
    let services = sb
        .ipvs
        .services_including(&plan::keys_to_confirm(spec, &firewall))?;
    let mut dests = BTreeMap::new();
    for key in plan::services_to_read(spec, &services, &firewall) {
        dests.insert(key, sb.ipvs.destinations(&key)?);
    }
    let mut values = BTreeMap::new();
    for name in sysctls.0.keys() {
        if let Some(v) = sb.sysctls.read(name)? {
            values.insert(name.clone(), v);
        }
    }
    Ok(ObservedSandbox {
        services,
        dests,
        firewall,
        sysctls: values,
        timeouts: if spec.timeouts.is_some() {
            sb.ipvs.timeouts()?
        } else {
            Default::default()
        },
        addrs: sb.addrs.ipv4()?,
    })
}

/// Apply a plan in its order; on error, say how far it got.
pub fn apply(sb: &mut Sandbox<'_>, plan: &Plan) -> Result<usize, ReconcileError> {
    let total = plan.len();
    let mut done = 0;
    let partial = |done: usize, e: ReconcileError| {
        if done == 0 {
            e
        } else {
            ReconcileError::Partial {
                done,
                total,
                source: Box::new(e),
            }
        }
    };
    for op in &plan.sysctls_before {
        sb.sysctls
            .write(&op.name, op.value)
            .map_err(|e| partial(done, e.into()))?;
        done += 1;
    }
    match sb.ipvs.apply_all(&plan.ipvs_remove) {
        Ok(n) => done += n,
        Err((n, e)) => return Err(partial(done + n, e.into())),
    }
    if !plan.firewall.is_empty() {
        sb.firewall
            .restore(&firewall::render_restore(&plan.firewall))
            .map_err(|e| partial(done, e.into()))?;
        done += plan.firewall.len();
    }
    match sb.ipvs.apply_all(&plan.ipvs_add) {
        Ok(n) => done += n,
        Err((n, e)) => return Err(partial(done + n, e.into())),
    }
    for op in &plan.sysctls_after {
        sb.sysctls
            .write(&op.name, op.value)
            .map_err(|e| partial(done, e.into()))?;
        done += 1;
    }
    Ok(done)
}

/// Observe, plan and (unless `dry_run`) apply.
pub fn reconcile(
    sb: &mut Sandbox<'_>,
    spec: &SandboxSpec,
    sysctls: &SysctlSettings,
    dry_run: bool,
) -> Result<Outcome, ReconcileError> {
    let mut seen = observe(sb, spec, sysctls)?;
    let outcome = if dry_run {
        let plan = plan::plan(spec, &seen, sysctls)?;
        Outcome { plan, applied: 0 }
    } else {
        update(sb, &mut seen, None, spec, sysctls)?
    };
    info!(
        services = spec.services.len(),
        planned = outcome.plan.len(),
        applied = outcome.applied,
        dry_run,
        "reconciled"
    );
    Ok(outcome)
}

/// Bring a sandbox to `spec` from a view of it (kept since the last run, or just read),
/// without reading the kernel again: the cheap path for a long-lived sandbox, where a
/// backend change is a few IPVS messages and nothing else (no process, no dump). `prev`:
/// the spec `seen` was last brought to, if it was; then only what changed since is
/// planned ([`plan::plan_change`]). `seen` is updated to what the kernel holds
/// afterwards; on error it is left as it was, and the caller should [`observe`] again
/// (the periodic resync does).
pub fn update(
    sb: &mut Sandbox<'_>,
    seen: &mut ObservedSandbox,
    prev: Option<&SandboxSpec>,
    spec: &SandboxSpec,
    sysctls: &SysctlSettings,
) -> Result<Outcome, ReconcileError> {
    let plan = match prev {
        Some(prev) => plan::plan_change(prev, spec, seen, sysctls)?,
        None => plan::plan(spec, seen, sysctls)?,
    };
    if tracing::enabled!(tracing::Level::DEBUG) {
        for line in plan.lines() {
            debug!(op = %line, "planned");
        }
    }
    let applied = if plan.is_empty() { 0 } else { apply(sb, &plan)? };
    seen.apply(&plan);
    Ok(Outcome { plan, applied })
}

/// Bring vipd's chains in the host's namespace ([`firewall::HOST_CHAINS`]: the routing
/// mesh) to `want`, with `fw` (the calling thread's namespace): one `iptables-save`, and
/// one `iptables-restore --noflush` only if something differs. Rules and chains of
/// others are never touched. Returns the operations applied.
pub fn host_firewall(
    fw: &mut dyn Firewall,
    want: &[crate::core::rules::Intent],
) -> Result<Vec<firewall::FwOp>, ReconcileError> {
    let seen = firewall::parse_save(&fw.save()?);
    let ops = firewall::plan_chains(&firewall::HOST_CHAINS, want, &seen);
    if !ops.is_empty() {
        fw.restore(&firewall::render_restore(&ops))?;
    }
    Ok(ops)
}

/// Why vipd's host chains need programming again though their rules are there (a jump
/// displaced or gone, Docker's `DOCKER-USER` re-made): empty when nothing does.
pub fn host_reassert(fw: &mut dyn Firewall) -> Result<Vec<firewall::Reassert>, ReconcileError> {
    Ok(firewall::parse_save(&fw.save()?).needs_reassert())
}

/// One of vipd's services in a namespace, as the kernel has it.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceView {
    #[serde(flatten)]
    pub marked: MarkedService,
    /// The IPVS service, or `None` if the mark rule has no service (a half-done apply).
    pub ipvs: Option<VirtualService>,
    pub destinations: Vec<Destination>,
}

/// vipd's state in one namespace.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxView {
    pub services: Vec<ServiceView>,
    /// IPVS services in the namespace that are not vipd's.
    pub foreign_services: usize,
}

/// Read vipd's services in a namespace: the mark rules say which are vipd's.
pub fn inspect(ipvs: &mut dyn IpvsTable, fw: &mut dyn Firewall) -> Result<SandboxView, ReconcileError> {
    let marked = firewall::parse_save(&fw.save()?).marked_services();
    let keys: Vec<ServiceKey> = marked.iter().map(|m| ServiceKey::fwmark(m.fwmark)).collect();
    let services = ipvs.services_including(&keys)?;
    let mut views = Vec::new();
    for m in marked {
        let key = ServiceKey::fwmark(m.fwmark);
        let svc = services.iter().find(|s| s.key == key).cloned();
        let mut destinations = if svc.is_some() {
            ipvs.destinations(&key)?
        } else {
            Vec::new()
        };
        destinations.sort_by_key(|d| d.key);
        views.push(ServiceView {
            marked: m,
            ipvs: svc,
            destinations,
        });
    }
    views.sort_by_key(|v| v.marked.fwmark);
    let ours = views.iter().filter(|v| v.ipvs.is_some()).count();
    Ok(SandboxView {
        foreign_services: services.len() - ours,
        services: views,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addrs::FakeAddrs;
    use crate::core::ipvs::{ServiceConfig, Stats};
    use crate::core::model::{FwMark, Ipv4Net, Scheduler};
    use crate::core::spec;
    use crate::firewall::fake::FakeFirewall;
    use crate::ipvs::fake::FakeIpvs;
    use crate::sysctl::FakeSysctls;

    #[derive(Default)]
    struct Kernel {
        ipvs: FakeIpvs,
        fw: FakeFirewall,
        sysctls: FakeSysctls,
        addrs: FakeAddrs,
    }

    impl Kernel {
        fn new() -> Self {
            Kernel {
                addrs: FakeAddrs(vec![Ipv4Net::new("10.0.0.2".parse().unwrap(), 24).unwrap()]),
                ..Default::default()
            }
        }

        fn run(&mut self, want: &SandboxSpec) -> Result<Outcome, ReconcileError> {
            let mut sb = Sandbox {
                ipvs: &mut self.ipvs,
                firewall: &mut self.fw,
                sysctls: &mut self.sysctls,
                addrs: &mut self.addrs,
            };
            reconcile(&mut sb, want, &SysctlSettings::default(), false)
        }

        fn view(&mut self) -> SandboxView {
            inspect(&mut self.ipvs, &mut self.fw).unwrap()
        }
    }

    fn services(n: usize, backends: usize) -> SandboxSpec {
        let svcs: Vec<String> = (0..n)
            .map(|i| {
                let b: Vec<String> = (0..backends)
                    .map(|j| format!(r#"{{"ip":"10.0.{}.{}"}}"#, i / 200, (i % 200) + j + 3))
                    .collect();
                format!(
                    r#"{{"name":"s{i}","vip":"10.1.{}.{}","fwmark":{},"backends":[{}]}}"#,
                    i / 250,
                    i % 250 + 1,
                    256 + i,
                    b.join(",")
                )
            })
            .collect();
        spec::parse(&format!(r#"{{"services":[{}]}}"#, svcs.join(","))).unwrap()
    }

    #[test]
    fn the_stateful_fakes_accept_the_plan_in_its_order_and_a_second_run_does_nothing() {
        let mut k = Kernel::new();
        let want = services(3, 3);
        let first = k.run(&want).unwrap();
        assert_eq!(first.applied, first.plan.len());
        assert_eq!(k.ipvs.service_keys().len(), 3);
        assert_eq!(k.fw.restores, 1, "one iptables-restore for the whole change");
        assert_eq!(k.sysctls.0["conntrack"], 1);
        let view = k.view();
        assert_eq!(view.services.len(), 3);
        assert!(view
            .services
            .iter()
            .all(|s| s.ipvs.is_some() && s.destinations.len() == 3));

        let second = k.run(&want).unwrap();
        assert_eq!((second.plan.len(), second.applied), (0, 0), "{:#?}", second.plan);
        assert_eq!(k.fw.restores, 1, "nothing changed: no iptables-restore");
    }

    #[test]
    fn with_a_thousand_services_one_backend_change_is_exactly_its_operations() {
        let mut k = Kernel::new();
        let mut want = services(1000, 3);
        k.run(&want).unwrap();
        let before = k.ipvs.ops_applied();
        let restores = k.fw.restores;
        let moved = &mut want.services[500].backends[1];
        let old = moved.addr;
        moved.addr = crate::core::model::BackendAddr::new("10.0.9.9".parse().unwrap());
        let out = k.run(&want).unwrap();
        let mark = want.services[500].fwmark.get();
        assert_eq!(
            out.plan.lines(),
            [
                format!("ipvsadm -d -f {mark} -r {old}:0"),
                format!("ipvsadm -a -f {mark} -r 10.0.9.9:0 -m -w 1")
            ]
        );
        assert_eq!(k.ipvs.ops_applied() - before, 2);
        assert_eq!(k.fw.restores, restores);
    }

    #[test]
    fn an_empty_spec_removes_everything_and_foreign_services_stay() {
        let mut k = Kernel::new();
        let foreign = VirtualService {
            key: ServiceKey::fwmark(FwMark::new(999).unwrap()),
            config: ServiceConfig::new(Scheduler::WeightedLeastConn),
            stats: Stats::default(),
        };
        k.ipvs.insert_foreign(foreign.clone(), []);
        k.fw.add_foreign(
            "mangle",
            "OUTPUT",
            "-d 10.9.9.9/32 -j MARK --set-xmark 0x3e7/0xffffffff",
        );
        k.run(&services(2, 2)).unwrap();
        k.run(&SandboxSpec::default()).unwrap();
        assert_eq!(k.ipvs.service_keys(), [foreign.key]);
        let save = k.fw.save().unwrap();
        assert!(!save.contains("VIPD"), "{save}");
        assert!(
            save.contains("-A OUTPUT -d 10.9.9.9/32 -j MARK --set-xmark 0x3e7/0xffffffff"),
            "{save}"
        );
        assert_eq!(k.sysctls, FakeSysctls::default());
        assert_eq!(k.run(&SandboxSpec::default()).unwrap().plan.len(), 0);
    }

    #[test]
    fn a_kernel_error_half_way_says_how_far_it_got_and_the_next_run_completes() {
        let mut k = Kernel::new();
        let want = services(2, 2);
        // The first IPVS addition is refused (as if the kernel ran out of memory).
        k.ipvs.fail_next(12);
        let err = k.run(&want).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ReconcileError::Partial { .. }), "{text}");
        assert!(text.contains("errno 12"), "{text}");
        // Mark rules went in first, so vipd still knows these services are its own.
        let done = k.run(&want).unwrap();
        assert_eq!(done.applied, done.plan.len());
        assert_eq!(done.plan.ipvs_add.len(), 6, "{:#?}", done.plan);
        assert_eq!(k.run(&want).unwrap().plan.len(), 0);
    }

    #[test]
    fn updates_from_a_kept_view_touch_only_ipvs_for_a_backend_change_and_match_a_full_read() {
        let mut k = Kernel::new();
        let mut want = services(20, 3);
        k.run(&want).unwrap();
        let mut seen = {
            let mut sb = Sandbox {
                ipvs: &mut k.ipvs,
                firewall: &mut k.fw,
                sysctls: &mut k.sysctls,
                addrs: &mut k.addrs,
            };
            observe(&mut sb, &want, &SysctlSettings::default()).unwrap()
        };
        let (saves, restores) = (k.fw.saves, k.fw.restores);
        let before = want.clone();
        want.services[3].backends.pop();
        want.services[4].backends[0].weight = 0;
        let mut sb = Sandbox {
            ipvs: &mut k.ipvs,
            firewall: &mut k.fw,
            sysctls: &mut k.sysctls,
            addrs: &mut k.addrs,
        };
        let out = update(
            &mut sb,
            &mut seen,
            Some(&before),
            &want,
            &SysctlSettings::default(),
        )
        .unwrap();
        assert_eq!(out.plan.len(), 2, "{:#?}", out.plan);
        assert_eq!(
            (k.fw.saves, k.fw.restores),
            (saves, restores),
            "no iptables process for a backend change"
        );
        // The kept view is what a full read says, and a full run finds nothing to do.
        let again = k.run(&want).unwrap();
        assert_eq!(again.plan.len(), 0, "{:#?}", again.plan);
        // A new service changes rules: one restore, still no read.
        let mut more = services(21, 3);
        more.services[3].backends.pop();
        more.services[4].backends[0].weight = 0;
        let saves = k.fw.saves;
        let mut sb = Sandbox {
            ipvs: &mut k.ipvs,
            firewall: &mut k.fw,
            sysctls: &mut k.sysctls,
            addrs: &mut k.addrs,
        };
        update(&mut sb, &mut seen, Some(&want), &more, &SysctlSettings::default()).unwrap();
        assert_eq!(k.fw.saves, saves);
        assert_eq!(k.run(&more).unwrap().plan.len(), 0);
    }

    #[test]
    fn a_foreign_fwmark_is_refused_before_anything_changes() {
        let mut k = Kernel::new();
        k.ipvs.insert_foreign(
            VirtualService {
                key: ServiceKey::fwmark(FwMark::new(256).unwrap()),
                config: ServiceConfig::new(Scheduler::RoundRobin),
                stats: Stats::default(),
            },
            [],
        );
        let err = k.run(&services(1, 1)).unwrap_err();
        assert!(matches!(err, ReconcileError::Plan(_)), "{err}");
        assert_eq!(k.fw.restores, 0);
        assert_eq!(k.sysctls, FakeSysctls::default());
        assert_eq!(k.ipvs.ops_applied(), 0);
    }
}
