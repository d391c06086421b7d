//! The pure steps of a sync, each taking and returning data: services and allocations →
//! DNS catalog → desired state per sandbox → mesh → what to program → status. The
//! [`Agent`](super::Agent) runs them in that order and does the I/O between them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use crate::core::alloc::{Allocation, Allocations};
use crate::core::containers::{Attachment, Container};
use crate::core::ipvs::Timeouts;
use crate::core::labels::{self, Conflict, LabelError, ServiceDef, ServiceDefinition};
use crate::core::mesh::{self, IngressLink};
use crate::core::model::EndpointMode;
use crate::core::model::PortKey;
use crate::core::model::{Ipv4Net, SandboxKey, ServiceName};
use crate::core::rules::Intent;
use crate::core::spec::SandboxSpec;
use crate::core::status::{self, EngineState, Report};
use crate::store::VipClaim;

use super::records::Records;

/// The services the containers' labels define, and the labels refused.
pub type Services = (BTreeMap<ServiceName, ServiceDef>, Vec<LabelError>);

/// Step 1: the services.
pub fn services(containers: &[Container]) -> Services {
    labels::services(containers)
}

/// Step 1 with the stored definitions (`vipd service`): they win over the labels, and
/// each label they overrule is a conflict.
pub fn merged_services(
    containers: &[Container],
    stored: &BTreeMap<ServiceName, ServiceDefinition>,
) -> labels::Merged {
    labels::merge(containers, stored)
}

/// What allocating did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocated {
    /// The allocations after this pass.
    pub allocs: Allocations,
    /// The VIP services that got no VIP, and why.
    pub errors: Vec<(ServiceName, String)>,
    /// The services whose VIP was released after the grace period.
    pub released: Vec<ServiceName>,
}

/// Step 2: a VIP and fwmark for every VIP service; the others' idle from `now` (unix
/// seconds), and released once idle for `grace`.
pub fn allocate(
    before: &Allocations,
    defs: &BTreeMap<ServiceName, ServiceDef>,
    pool: Ipv4Net,
    grace: Duration,
    now: u64,
) -> Allocated {
    allocate_with(before, defs, grace, now, |allocs, name| {
        allocs.ensure(name, pool).map(|_| ()).map_err(|e| e.to_string())
    })
}

/// Give every VIP service its VIP with `give` (an error: none, and why), then idle and
/// release the others.
fn allocate_with(
    before: &Allocations,
    defs: &BTreeMap<ServiceName, ServiceDef>,
    grace: Duration,
    now: u64,
    mut give: impl FnMut(&mut Allocations, &ServiceName) -> Result<(), String>,
) -> Allocated {
    let mut allocs = before.clone();
    let mut errors = Vec::new();
    for def in defs.values().filter(|d| d.mode == EndpointMode::Vip) {
        if let Err(e) = give(&mut allocs, &def.name) {
            errors.push((def.name.clone(), e));
        }
    }
    let released = idle_and_expire(&mut allocs, defs, grace, now);
    Allocated {
        allocs,
        errors,
        released,
    }
}

/// Services with no VIP service left idle from `now`; those idle for `grace` released.
fn idle_and_expire(
    allocs: &mut Allocations,
    defs: &BTreeMap<ServiceName, ServiceDef>,
    grace: Duration,
    now: u64,
) -> Vec<ServiceName> {
    let idle: Vec<_> = allocs
        .services
        .keys()
        .filter(|s| defs.get(*s).is_none_or(|d| d.mode != EndpointMode::Vip))
        .cloned()
        .collect();
    for s in &idle {
        allocs.idle(s, now);
    }
    allocs.expire(now, grace.as_secs())
}

/// Step 2, in cluster mode: every VIP service takes the cluster's claim (the same VIP
/// and fwmark on every node); a service with no claim yet has no VIP until the link has
/// made one (a later sync), never a local one that could clash with another node's.
/// Idle and released as in [`allocate`].
pub fn allocate_claimed(
    before: &Allocations,
    defs: &BTreeMap<ServiceName, ServiceDef>,
    claims: &BTreeMap<ServiceName, VipClaim>,
    grace: Duration,
    now: u64,
) -> Allocated {
    allocate_with(before, defs, grace, now, |allocs, name| {
        let Some((vip, fwmark)) = claims.get(name).and_then(|c| Some((c.vip, c.fwmark()?))) else {
            allocs.services.remove(name);
            return Err(format!(
                "service {name}: waiting for its VIP from the cluster store"
            ));
        };
        let idle_since = None;
        allocs.services.insert(
            name.clone(),
            Allocation {
                vip,
                fwmark,
                idle_since,
            },
        );
        allocs.next_fwmark = allocs.next_fwmark.max(fwmark.get().saturating_add(1));
        Ok(())
    })
}

/// Step 3: the DNS catalog, and what could not be put in it.
pub use crate::dns::records::catalog as dns_catalog;

/// Step 4: what every sandbox should have (sandboxes on the same networks share a spec).
pub use crate::core::topology::desired;

/// Whether a service claims a port it does not hold yet: only then do the host's bound
/// ports matter (and are they read).
pub fn claims_new_port(
    defs: &BTreeMap<ServiceName, ServiceDef>,
    holders: &BTreeMap<PortKey, ServiceName>,
) -> bool {
    defs.values()
        .any(|d| d.publish.iter().any(|p| holders.get(&p.key()) != Some(&d.name)))
}

/// The routing mesh of one pass.
#[derive(Debug, Clone)]
pub struct Mesh {
    /// The ingress namespace's spec.
    pub ingress: SandboxSpec,
    pub host_rules: Vec<Intent>,
    /// Which service holds each published port now.
    pub holders: BTreeMap<PortKey, ServiceName>,
    /// Ports published since the last pass, and no longer published.
    pub published: Vec<(PortKey, ServiceName)>,
    pub unpublished: Vec<(PortKey, ServiceName)>,
    /// Ports a service asked for and did not get, with the reason.
    pub errors: BTreeMap<ServiceName, Vec<String>>,
}

/// Step 5: the mesh, from who held each port before and the host's bound ports.
pub fn mesh(
    containers: &[Container],
    defs: &BTreeMap<ServiceName, ServiceDef>,
    before: &BTreeMap<PortKey, ServiceName>,
    bound: &BTreeSet<PortKey>,
    claimed: &BTreeMap<PortKey, ServiceName>,
    link: &IngressLink,
    timeouts: Option<Timeouts>,
) -> Mesh {
    let m = mesh::plan(containers, defs, before, bound, claimed, link);
    let published = m
        .holders
        .iter()
        .filter(|(key, name)| before.get(*key) != Some(*name))
        .map(|(k, n)| (*k, n.clone()))
        .collect();
    let unpublished = before
        .iter()
        .filter(|(key, _)| !m.holders.contains_key(*key))
        .map(|(k, n)| (*k, n.clone()))
        .collect();
    let mut ingress = m.ingress;
    ingress.timeouts = timeouts;
    Mesh {
        ingress,
        host_rules: m.host_rules,
        holders: m.holders,
        published,
        unpublished,
        errors: m.errors,
    }
}

/// One sandbox to program.
#[derive(Debug, Clone)]
pub struct Job {
    pub sandbox: SandboxKey,
    pub spec: Arc<SandboxSpec>,
    /// Its container's own addresses.
    pub attachments: Vec<Attachment>,
    /// Read the kernel first (a full pass, a sandbox new or in error, or its own
    /// addresses changed); otherwise the change is planned against the kept view.
    pub read_again: bool,
}

/// Step 6: the sandboxes whose desired state differs from what was applied (all of
/// them with `full`), with `own`: each container sandbox's own addresses.
pub fn to_program(
    desired: BTreeMap<SandboxKey, Arc<SandboxSpec>>,
    records: &Records,
    own: &BTreeMap<&SandboxKey, &Vec<Attachment>>,
    full: bool,
) -> Vec<Job> {
    let mut jobs = Vec::new();
    // Sandboxes share specs: compare each pair of shared specs once.
    let mut same: BTreeMap<(usize, usize), bool> = BTreeMap::new();
    for (sandbox, spec) in desired {
        let attachments = own.get(&sandbox).map(|a| (*a).clone()).unwrap_or_default();
        let applied = records.get(&sandbox).and_then(|r| r.applied.as_ref());
        let read_again = match applied {
            _ if full => true,
            None => true,
            Some(a) if a.attachments != attachments => true,
            Some(a)
                if *same
                    .entry((Arc::as_ptr(&a.view.spec) as usize, Arc::as_ptr(&spec) as usize))
                    .or_insert_with(|| a.view.spec == spec) =>
            {
                continue
            }
            Some(_) => false,
        };
        jobs.push(Job {
            sandbox,
            spec,
            attachments,
            read_again,
        });
    }
    jobs
}

/// Everything `vipd status` shows of one pass.
pub struct StatusInput<'a> {
    pub engine: &'a EngineState,
    pub now: u64,
    pub last_resync: u64,
    pub containers: &'a [Container],
    pub defs: &'a BTreeMap<ServiceName, ServiceDef>,
    pub label_errors: &'a [LabelError],
    pub conflicts: &'a [Conflict],
    pub allocs: &'a Allocations,
    pub holders: &'a BTreeMap<PortKey, ServiceName>,
    pub service_errors: &'a BTreeMap<ServiceName, Vec<String>>,
    pub records: &'a Records,
}

/// Step 7: the status, typed (the admin socket turns it into `vipd status`'s JSON).
pub fn status(i: StatusInput<'_>) -> Report {
    Report {
        docker: i.engine.clone(),
        last_sync: i.now,
        last_resync: i.last_resync,
        services: status::services(i.containers, i.defs, i.allocs, i.holders, i.service_errors),
        sandboxes: i.records.statuses(),
        label_errors: status::label_problems(i.label_errors),
        conflicts: i.conflicts.to_vec(),
        cluster: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::containers::fixture::container;
    use crate::core::plan::ObservedSandbox;
    use crate::kernel::{KernelView, Programmed};

    fn pool() -> Ipv4Net {
        Ipv4Net::new("10.253.0.0".parse().unwrap(), 30).unwrap()
    }

    fn web_and_client() -> Vec<Container> {
        vec![
            container(
                "w1aaaaaaaaaa",
                &[(labels::SERVICE, "web")],
                &[("front", "10.1.0.3")],
            ),
            container("claaaaaaaaaa", &[], &[("front", "10.1.0.9")]),
        ]
    }

    #[test]
    fn allocation_gives_vips_reports_an_exhausted_pool_and_releases_after_the_grace() {
        let cs: Vec<Container> = ["a", "b", "c"]
            .iter()
            .map(|s| {
                container(
                    &format!("{s}1aaaaaaaaaa"),
                    &[(labels::SERVICE, s)],
                    &[("front", "10.1.0.3")],
                )
            })
            .collect();
        let (defs, _) = services(&cs);
        let first = allocate(
            &Allocations::default(),
            &defs,
            pool(),
            Duration::from_secs(60),
            1000,
        );
        assert_eq!(first.allocs.services.len(), 2, "a /30 has two addresses");
        assert_eq!(first.errors.len(), 1, "{:?}", first.errors);
        assert_eq!(first.errors[0].0.as_str(), "c");
        // The services go: idle, then released after the grace.
        let none = BTreeMap::new();
        let idle = allocate(&first.allocs, &none, pool(), Duration::from_secs(60), 1000);
        assert!(idle.released.is_empty() && idle.allocs.services.len() == 2);
        let later = allocate(&idle.allocs, &none, pool(), Duration::from_secs(60), 1061);
        assert_eq!(later.released.len(), 2);
        assert!(later.allocs.services.is_empty());
    }

    #[test]
    fn a_sandbox_is_programmed_when_new_changed_or_its_addresses_moved_and_skipped_otherwise() {
        let cs = web_and_client();
        let (defs, _) = services(&cs);
        let allocs = allocate(&Allocations::default(), &defs, pool(), Duration::ZERO, 0).allocs;
        let want = desired(&cs, &defs, &allocs, None);
        let own: BTreeMap<&SandboxKey, &Vec<Attachment>> = cs
            .iter()
            .filter_map(|c| c.sandbox.as_ref().map(|sb| (sb, &c.attachments)))
            .collect();
        let mut records = Records::default();
        records.follow(&want, &BTreeMap::new(), None);
        let jobs = to_program(want.clone(), &records, &own, false);
        assert_eq!(jobs.len(), 2);
        assert!(jobs.iter().all(|j| j.read_again), "never applied: read");
        for j in jobs {
            let view = KernelView {
                seen: ObservedSandbox::default(),
                spec: j.spec.clone(),
            };
            let done = Programmed { operations: 1, view };
            records.settle(&j.sandbox, Ok(done), j.attachments, 0);
        }
        assert!(
            to_program(want.clone(), &records, &own, false).is_empty(),
            "nothing changed"
        );
        assert_eq!(
            to_program(want.clone(), &records, &own, true).len(),
            2,
            "full: all"
        );

        // The client's spec changes: planned from the kept view.
        let mut changed = want.clone();
        let client = SandboxKey::from("/run/docker/netns/claaaaaaaaaa");
        changed.insert(client.clone(), Arc::new(SandboxSpec::default()));
        let jobs = to_program(changed, &records, &own, false);
        assert_eq!(jobs.len(), 1);
        assert!(!jobs[0].read_again && jobs[0].sandbox == client);

        // Its own addresses move: read again.
        let moved = vec![];
        let mut own2 = own.clone();
        own2.insert(&client, &moved);
        let jobs = to_program(want, &records, &own2, false);
        assert_eq!((jobs.len(), jobs[0].read_again), (1, true));
    }

    #[test]
    fn the_mesh_says_which_ports_were_published_and_which_no_longer_are() {
        let mut cs = web_and_client();
        cs[0].labels.insert(labels::PUBLISH.into(), "8080:80".into());
        let (defs, _) = services(&cs);
        let link = IngressLink {
            addr: "10.254.255.2".parse().unwrap(),
            host_iface: "vipd-ingress".into(),
        };
        let none = BTreeMap::new();
        assert!(claims_new_port(&defs, &none));
        let t = Some(Timeouts {
            tcp: 1,
            tcp_fin: 2,
            udp: 3,
        });
        let m = mesh(&cs, &defs, &none, &BTreeSet::new(), &none, &link, t);
        assert_eq!(m.published.len(), 1);
        assert_eq!(m.ingress.timeouts, t);
        assert!(!m.host_rules.is_empty() && m.errors.is_empty());
        assert!(
            !claims_new_port(&defs, &m.holders),
            "held: no need to read the host"
        );

        let (nothing, _) = services(&web_and_client());
        let gone = mesh(&cs, &nothing, &m.holders, &BTreeSet::new(), &none, &link, None);
        assert_eq!(gone.unpublished, m.published);
        assert!(gone.host_rules.is_empty() && gone.holders.is_empty());
    }

    #[test]
    fn status_lists_the_services_and_every_recorded_sandbox() {
        let cs = web_and_client();
        let (defs, label_errors) = services(&cs);
        let allocs = allocate(&Allocations::default(), &defs, pool(), Duration::ZERO, 0).allocs;
        let mut records = Records::default();
        records.follow(&desired(&cs, &defs, &allocs, None), &BTreeMap::new(), None);
        let engine = EngineState {
            connected: true,
            error: None,
        };
        let s = status(StatusInput {
            engine: &engine,
            now: 7,
            last_resync: 5,
            containers: &cs,
            defs: &defs,
            label_errors: &label_errors,
            conflicts: &[],
            allocs: &allocs,
            holders: &BTreeMap::new(),
            service_errors: &BTreeMap::new(),
            records: &records,
        });
        assert_eq!((s.last_sync, s.last_resync, s.docker.connected), (7, 5, true));
        assert_eq!(s.services.len(), 1);
        assert_eq!(s.sandboxes.len(), 2);
    }

    #[test]
    fn a_defined_service_with_no_task_gets_a_vip_and_dns_and_no_backends() {
        let mut web = ServiceDefinition::new(ServiceName::new("web").unwrap());
        web.set_publish(&["8080:80"]).unwrap();
        let stored = BTreeMap::from([(web.name.clone(), web)]);
        let cs = vec![container("claaaaaaaaaa", &[], &[("front", "10.1.0.9")])];
        let merged = merged_services(&cs, &stored);
        let allocs = allocate(&Allocations::default(), &merged.defs, pool(), Duration::ZERO, 0).allocs;
        let vip = allocs.services[&ServiceName::new("web").unwrap()].vip;
        let (catalog, warnings) = dns_catalog(&cs, &merged.defs, &allocs, Some("vipd"), 5);
        assert!(warnings.is_empty(), "{warnings:?}");
        let q = crate::dns::catalog::Query {
            name: "web.vipd.",
            qtype: crate::dns::catalog::QueryType::A,
            qclass: crate::dns::catalog::CLASS_IN,
        };
        match crate::dns::catalog::answer(&catalog, &q, 1) {
            crate::dns::catalog::Answer::Records { answers, .. } => {
                let got: Vec<_> = answers.iter().map(|r| r.data.clone()).collect();
                assert_eq!(got, [crate::dns::catalog::RecordData::A(vip)]);
            }
            other => panic!("web.vipd: {other:?}"),
        }
        let web = &catalog.services()[0];
        assert!(web.tasks.is_empty(), "no backends");
        // No task: no sandbox shares a network with it, so none gets it.
        let want = desired(&cs, &merged.defs, &allocs, None);
        assert!(want.values().all(|s| s.services.is_empty()), "{want:?}");
    }
}
