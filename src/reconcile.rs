//! One sandbox namespace, from what it has to what it should have.
//!
//! Level-triggered: read the kernel (IPVS dump, vipd's chains, sysctls, addresses), plan
//! the difference in the pure core, apply it. The kernel is the truth; nothing is cached
//! between runs, so a second run with nothing changed finds nothing to do.

use std::collections::BTreeMap;

use serde::Serialize;
use tracing::{debug, info, info_span};

use crate::addrs::{Addresses, AddrsError, RtnetlinkAddrs};
use crate::core::firewall::{self, MarkedService};
use crate::core::ipvs::{Destination, ServiceKey, VirtualService};
use crate::core::plan::{self, ObservedSandbox, Plan, PlanError, SysctlSettings};
use crate::core::spec::SandboxSpec;
use crate::firewall::{Firewall, FirewallError, Iptables};
use crate::ipvs::netlink::NetlinkIpvs;
use crate::ipvs::{IpvsError, IpvsTable};
use crate::netns::{self, NetnsError, NetnsPath};
use crate::sysctl::{ProcSysctls, SysctlError, Sysctls};

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
    let services = sb.ipvs.services()?;
    let firewall = firewall::parse_save(&sb.firewall.save()?);
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
    let seen = observe(sb, spec, sysctls)?;
    let plan = plan::plan(spec, &seen, sysctls)?;
    for line in plan.lines() {
        debug!(op = %line, dry_run, "planned");
    }
    let applied = if dry_run || plan.is_empty() {
        0
    } else {
        apply(sb, &plan)?
    };
    info!(
        services = spec.services.len(),
        planned = plan.len(),
        applied,
        dry_run,
        "reconciled"
    );
    Ok(Outcome { plan, applied })
}

/// Reconcile the namespace `ns` with the real kernel interfaces.
pub fn reconcile_netns(
    ns: &NetnsPath,
    spec: &SandboxSpec,
    sysctls: &SysctlSettings,
    dry_run: bool,
) -> Result<Outcome, ReconcileError> {
    let span = info_span!("sandbox", netns = %ns);
    netns::run_in(ns, || {
        let _enter = span.enter();
        let mut ipvs = NetlinkIpvs::open()?;
        let mut sb = Sandbox {
            ipvs: &mut ipvs,
            firewall: &mut Iptables::default(),
            sysctls: &mut ProcSysctls::default(),
            addrs: &mut RtnetlinkAddrs,
        };
        reconcile(&mut sb, spec, sysctls, dry_run)
    })?
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
    let services = ipvs.services()?;
    let marked = firewall::parse_save(&fw.save()?).marked_services();
    let mut views = Vec::new();
    for m in marked {
        let key = ServiceKey::fwmark(m.fwmark);
        let svc = services.iter().find(|s| s.key == key).cloned();
        let destinations = if svc.is_some() {
            ipvs.destinations(&key)?
        } else {
            Vec::new()
        };
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

/// [`inspect`] the namespace `ns` with the real kernel interfaces.
pub fn inspect_netns(ns: &NetnsPath) -> Result<SandboxView, ReconcileError> {
    netns::run_in(ns, || {
        let mut ipvs = NetlinkIpvs::open()?;
        inspect(&mut ipvs, &mut Iptables::default())
    })?
}
