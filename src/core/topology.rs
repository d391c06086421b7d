//! From containers and services to what every sandbox should have.
//!
//! Every running container that shares a Docker network with a service's tasks gets that
//! service (its VIP, its fwmark) in its namespace, with the tasks' addresses on a shared
//! network as backends. A container that shares no network with a service gets nothing
//! for it. Tasks get their own service too, so a task can call its peers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::alloc::Allocations;
use super::containers::{Container, ContainerId, NetworkId};
use super::ipvs::Timeouts;
use super::labels::ServiceDef;
use super::model::EndpointMode;
use super::model::{BackendAddr, SandboxKey, ServiceName};
use super::spec::{Backend, SandboxSpec, ServiceSpec};

/// The desired state of every sandbox, keyed by its namespace path, each with the IPVS
/// `timeouts` to set.
///
/// A sandbox's services depend only on the networks it is attached to, so they are
/// worked out once per set of networks and shared by every sandbox with that set: one
/// event on a host with many sandboxes on one network costs one pass over the services,
/// not one per sandbox.
pub fn desired(
    containers: &[Container],
    defs: &BTreeMap<ServiceName, ServiceDef>,
    allocs: &Allocations,
    timeouts: Option<Timeouts>,
) -> BTreeMap<SandboxKey, Arc<SandboxSpec>> {
    let by_id: BTreeMap<&ContainerId, &Container> = containers.iter().map(|c| (&c.id, c)).collect();
    let mut by_networks: BTreeMap<BTreeSet<&NetworkId>, Arc<SandboxSpec>> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for c in containers.iter().filter(|c| c.running) {
        let Some(sandbox) = &c.sandbox else { continue };
        let mine: BTreeSet<&NetworkId> = c.attachments.iter().map(|a| &a.network).collect();
        let spec = by_networks.entry(mine).or_insert_with_key(|mine| {
            Arc::new(SandboxSpec {
                services: services_on(mine, &by_id, defs, allocs),
                timeouts,
            })
        });
        out.insert(sandbox.clone(), Arc::clone(spec));
    }
    out
}

/// The VIP services a sandbox attached to the networks `mine` gets: each service with a
/// task on one of them, over those tasks' addresses there.
fn services_on(
    mine: &BTreeSet<&NetworkId>,
    by_id: &BTreeMap<&ContainerId, &Container>,
    defs: &BTreeMap<ServiceName, ServiceDef>,
    allocs: &Allocations,
) -> Vec<ServiceSpec> {
    let mut services = Vec::new();
    for def in defs.values().filter(|d| d.mode == EndpointMode::Vip) {
        let Some((vip, fwmark)) = allocs.get(&def.name) else {
            continue;
        };
        let mut shares = false;
        let mut backends = Vec::new();
        for (task_id, weight) in &def.tasks {
            let Some(task) = by_id.get(task_id) else { continue };
            let Some(att) = task.address_on(Some(mine)) else {
                continue;
            };
            shares = true;
            if let Some(weight) = task.backend_weight(*weight) {
                backends.push(Backend {
                    addr: BackendAddr::new(att.ip.into()),
                    weight,
                    port: 0,
                });
            }
        }
        if shares {
            backends.sort_by_key(|b| b.addr);
            backends.dedup_by_key(|b| b.addr);
            services.push(ServiceSpec {
                name: def.name.clone(),
                vip,
                fwmark,
                scheduler: def.scheduler.clone(),
                persistence: None,
                backends,
                publish: None,
            });
        }
    }
    services
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::containers::{Drain, Health};
    use crate::core::labels;
    use crate::core::model::Ipv4Net;

    use crate::core::containers::fixture::container as c;

    fn plan(cs: &[Container]) -> BTreeMap<SandboxKey, Arc<SandboxSpec>> {
        let (defs, errors) = labels::services(cs);
        assert!(errors.is_empty(), "{errors:#?}");
        let mut allocs = Allocations::default();
        let pool = Ipv4Net::new("10.253.0.0".parse().unwrap(), 16).unwrap();
        for name in defs.keys() {
            allocs.ensure(name, pool).unwrap();
        }
        desired(cs, &defs, &allocs, None)
    }

    fn backends(spec: &SandboxSpec, svc: &str) -> Vec<String> {
        spec.services
            .iter()
            .find(|s| s.name.as_str() == svc)
            .map(|s| s.backends.iter().map(|b| b.addr.to_string()).collect())
            .unwrap_or_default()
    }

    fn sb(id: &str) -> SandboxKey {
        SandboxKey::new(format!("/run/docker/netns/{id}"))
    }

    #[test]
    fn containers_sharing_a_network_get_the_service_and_others_do_not() {
        let web = [(labels::SERVICE, "web")];
        let cs = [
            c("w1", &web, &[("front", "10.1.0.3")]),
            c("w2", &web, &[("front", "10.1.0.4"), ("back", "10.2.0.4")]),
            c("client", &[], &[("front", "10.1.0.9")]),
            c("backonly", &[], &[("back", "10.2.0.9")]),
            c("elsewhere", &[], &[("other", "10.3.0.9")]),
        ];
        let d = plan(&cs);
        assert_eq!(backends(&d[&sb("client")], "web"), ["10.1.0.3", "10.1.0.4"]);
        assert_eq!(backends(&d[&sb("backonly")], "web"), ["10.2.0.4"]);
        assert!(d[&sb("elsewhere")].services.is_empty());
        // Tasks get their own service, to call their peers.
        assert_eq!(backends(&d[&sb("w1")], "web"), ["10.1.0.3", "10.1.0.4"]);
        let s = &d[&sb("client")].services[0];
        assert_eq!((s.vip.to_string().as_str(), s.fwmark.get()), ("10.253.0.1", 256));
    }

    #[test]
    fn only_serving_tasks_are_backends_and_dnsrr_gets_no_vip() {
        let mut cs = vec![
            c(
                "w1",
                &[(labels::SERVICE, "web"), (labels::WEIGHT, "4")],
                &[("n", "10.1.0.3")],
            ),
            c("w2", &[(labels::SERVICE, "web")], &[("n", "10.1.0.4")]),
            c("w3", &[(labels::SERVICE, "web")], &[("n", "10.1.0.5")]),
            c(
                "d1",
                &[(labels::SERVICE, "db"), (labels::ENDPOINT_MODE, "dnsrr")],
                &[("n", "10.1.0.6")],
            ),
            c("client", &[], &[("n", "10.1.0.9")]),
        ];
        cs[1].health = Some(Health::Unhealthy);
        cs[2].running = false;
        let d = plan(&cs);
        let client = &d[&sb("client")];
        assert_eq!(client.services.len(), 1, "dnsrr services have no VIP");
        assert_eq!(backends(client, "web"), ["10.1.0.3"]);
        assert_eq!(client.services[0].backends[0].weight, 4);
        assert!(
            !d.contains_key(&sb("w3")),
            "a stopped container has no sandbox to program"
        );
    }

    #[test]
    fn a_draining_task_is_a_backend_at_weight_0_and_a_drained_one_is_none() {
        let web = [(labels::SERVICE, "web"), (labels::WEIGHT, "4")];
        let mut cs = vec![
            c("w1", &web, &[("n", "10.1.0.3")]),
            c("w2", &web, &[("n", "10.1.0.4")]),
            c("w3", &web, &[("n", "10.1.0.5")]),
            c("client", &[], &[("n", "10.1.0.9")]),
        ];
        cs[1].drain = Drain::Draining;
        cs[1].health = Some(Health::Unhealthy);
        cs[2].drain = Drain::Drained;
        let d = plan(&cs);
        let weights: Vec<(String, u32)> = d[&sb("client")].services[0]
            .backends
            .iter()
            .map(|b| (b.addr.to_string(), b.weight))
            .collect();
        assert_eq!(weights, [("10.1.0.3".to_owned(), 4), ("10.1.0.4".to_owned(), 0)]);
        assert!(
            d.contains_key(&sb("w3")),
            "a drained task still runs: its sandbox is programmed"
        );
    }

    #[test]
    fn a_service_whose_tasks_are_all_down_stays_with_no_backends() {
        let mut cs = vec![
            c("w1", &[(labels::SERVICE, "web")], &[("n", "10.1.0.3")]),
            c("client", &[], &[("n", "10.1.0.9")]),
        ];
        cs[0].health = Some(Health::Starting);
        let d = plan(&cs);
        assert_eq!(d[&sb("client")].services.len(), 1);
        assert!(backends(&d[&sb("client")], "web").is_empty());
    }
}
