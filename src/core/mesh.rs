//! The routing mesh: which service publishes which port, what the ingress namespace
//! should have, and the host's rules that lead published ports there.
//!
//! A port published by a service (`vipd.publish=8080:80`) is DNAT'ed by the host to the
//! ingress namespace's address; there a mark rule gives it the port's fwmark and an IPVS
//! fwmark service spreads it over every serving task's address, on the target port. Both
//! endpoint modes publish. The fwmark of a published port follows from the port itself
//! ([`ingress_mark`]), so it needs no allocation and no state.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use super::containers::{Container, ContainerId};
use super::labels::{Publish, ServiceDef};
use super::model::{BackendAddr, FwMark, PortKey, Protocol, ServiceName, Vip};
use super::rules::{Direction, Intent, IpFamily, Origin};
use super::spec::{Backend, SandboxSpec, ServiceSpec};

/// The ingress namespace's fwmark for a published port: `0x10000 + port` for TCP,
/// `0x20000 + port` for UDP. Stable across restarts, distinct per port and protocol.
pub fn ingress_mark(protocol: Protocol, port: u16) -> FwMark {
    let base: u32 = match protocol {
        Protocol::Tcp => 0x1_0000,
        Protocol::Udp => 0x2_0000,
        Protocol::Sctp => 0x3_0000,
    };
    FwMark::new(base + u32::from(port)).expect("a mark above 0x10000 is never zero")
}

/// Where the mesh leads: the ingress namespace's address and the host end of its link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressLink {
    /// The ingress namespace's address, which published ports are DNAT'ed to.
    pub addr: Ipv4Addr,
    /// The host's end of the link (a veth), for the host's forwarding and NAT rules.
    pub host_iface: String,
}

/// What the mesh should be.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MeshPlan {
    /// The ingress namespace's services, one per published port.
    pub ingress: SandboxSpec,
    /// The host's rules, as intents; empty when nothing is published.
    pub host_rules: Vec<Intent>,
    /// Which service holds each published port.
    pub holders: BTreeMap<PortKey, ServiceName>,
    /// Ports a service asked for and did not get, with the reason.
    pub errors: BTreeMap<ServiceName, Vec<String>>,
}

/// Plan the mesh.
///
/// - `previous`: who held each port before; a holder keeps its port against a newcomer,
///   and against a socket bound on the host since (vipd's DNAT is there first).
/// - `bound`: ports with a socket bound on the host; a port not held before that is bound
///   is refused ("already in use on the host").
/// - `claimed`: in cluster mode, who holds each port cluster-wide (the store's claims):
///   that service wins the port on every node.
///
/// Two services that ask for one port: the cluster's claimer, else the previous holder,
/// else the smallest name; the other is refused for that port only. A service's other
/// ports are published.
pub fn plan(
    containers: &[Container],
    defs: &BTreeMap<ServiceName, ServiceDef>,
    previous: &BTreeMap<PortKey, ServiceName>,
    bound: &BTreeSet<PortKey>,
    claimed: &BTreeMap<PortKey, ServiceName>,
    link: &IngressLink,
) -> MeshPlan {
    let mut out = MeshPlan::default();
    let mut claims: BTreeMap<PortKey, Vec<(&ServiceDef, Publish)>> = BTreeMap::new();
    for def in defs.values() {
        for p in &def.publish {
            claims.entry(p.key()).or_default().push((def, *p));
        }
    }
    let by_id: BTreeMap<&ContainerId, &Container> = containers.iter().map(|c| (&c.id, c)).collect();
    let ingress_vip = Vip::new(link.addr.into());
    for (key, mut claimants) in claims {
        // defs iterate by name, so claimants are in name order already.
        let holds = |by: &BTreeMap<PortKey, ServiceName>| {
            claimants.iter().position(|(d, _)| by.get(&key) == Some(&d.name))
        };
        let winner = holds(claimed).or_else(|| holds(previous)).unwrap_or(0);
        let (def, publish) = claimants.remove(winner);
        let port = key.to_string();
        for (loser, _) in claimants {
            out.errors.entry(loser.name.clone()).or_default().push(format!(
                "port {port} not published: service {} already publishes it",
                def.name
            ));
        }
        if previous.get(&key) != Some(&def.name) && bound.contains(&key) {
            out.errors.entry(def.name.clone()).or_default().push(format!(
                "port {port} not published: it is already in use on the host (a socket is bound to it)"
            ));
            continue;
        }
        out.holders.insert(key, def.name.clone());
        let mut backends: Vec<Backend> = def
            .tasks
            .iter()
            .filter_map(|(id, weight)| {
                let task = by_id.get(id)?;
                let weight = task.backend_weight(*weight)?;
                // The host routes to every Docker network, so any of them reaches the task.
                let att = task.address_on(None)?;
                Some(Backend {
                    addr: BackendAddr::new(att.ip.into()),
                    weight,
                    port: publish.target,
                })
            })
            .collect();
        backends.sort_by_key(|b| b.addr);
        backends.dedup_by_key(|b| b.addr);
        out.ingress.services.push(ServiceSpec {
            name: def.name.clone(),
            vip: ingress_vip,
            fwmark: ingress_mark(key.protocol, key.port),
            scheduler: def.scheduler.clone(),
            persistence: None,
            backends,
            publish: Some(publish),
        });
        for origin in [Origin::Arriving, Origin::Local] {
            out.host_rules.push(Intent::DnatToIngress {
                service: def.name.clone(),
                publish,
                ingress: link.addr,
                origin,
            });
        }
    }
    if !out.holders.is_empty() {
        out.host_rules.push(Intent::MasqueradeToIngress {
            iface: link.host_iface.clone(),
            family: IpFamily::V4,
        });
        for direction in [Direction::Out, Direction::In] {
            out.host_rules.push(Intent::ForwardIngress {
                iface: link.host_iface.clone(),
                direction,
                family: IpFamily::V4,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::containers::Health;
    use crate::core::labels::{self, PUBLISH, SERVICE};
    use crate::core::plan;

    use crate::core::containers::fixture::container as c;

    fn link() -> IngressLink {
        IngressLink {
            addr: "10.254.255.2".parse().unwrap(),
            host_iface: "vipd-ingress".into(),
        }
    }

    fn mesh(cs: &[Container], previous: &[(PortKey, &str)], bound: &[PortKey]) -> MeshPlan {
        let (defs, errors) = labels::services(cs);
        assert!(errors.is_empty(), "{errors:#?}");
        let previous = previous
            .iter()
            .map(|(k, n)| (*k, ServiceName::new(n).unwrap()))
            .collect();
        plan(
            cs,
            &defs,
            &previous,
            &bound.iter().copied().collect(),
            &BTreeMap::new(),
            &link(),
        )
    }

    fn dests(m: &MeshPlan, port: u16) -> Vec<String> {
        let svc = m
            .ingress
            .services
            .iter()
            .find(|s| s.publish.map(|p| p.published) == Some(port))
            .unwrap_or_else(|| panic!("port {port} not in {m:#?}"));
        svc.backends
            .iter()
            .map(|b| format!("{}:{}", b.addr, b.port))
            .collect()
    }

    const TCP: Protocol = Protocol::Tcp;
    const UDP: Protocol = Protocol::Udp;

    #[test]
    fn published_ports_lead_to_every_serving_task_on_the_target_port() {
        let web = [(SERVICE, "web"), (PUBLISH, "8080:80,53:5353/udp")];
        let mut cs = vec![
            c("w1", &web, &[("front", "10.1.0.3")]),
            c("w2", &web, &[("front", "10.1.0.4"), ("back", "10.2.0.4")]),
            c("w3", &web, &[("front", "10.1.0.5")]),
            c("client", &[], &[("front", "10.1.0.9")]),
        ];
        cs[2].health = Some(Health::Unhealthy);
        let m = mesh(&cs, &[], &[]);
        assert!(m.errors.is_empty(), "{:#?}", m.errors);
        assert_eq!(
            dests(&m, 8080),
            ["10.1.0.3:80", "10.2.0.4:80"],
            "first network by id, serving only"
        );
        assert_eq!(dests(&m, 53), ["10.1.0.3:5353", "10.2.0.4:5353"]);
        let marks: Vec<u32> = m.ingress.services.iter().map(|s| s.fwmark.get()).collect();
        assert_eq!(marks, [0x1_0000 + 8080, 0x2_0000 + 53]);
        assert!(m
            .ingress
            .services
            .iter()
            .all(|s| s.vip.to_string() == "10.254.255.2"));

        let web = || ServiceName::new("web").unwrap();
        let ingress: Ipv4Addr = "10.254.255.2".parse().unwrap();
        let http = Publish {
            protocol: TCP,
            published: 8080,
            target: 80,
        };
        let dns = Publish {
            protocol: UDP,
            published: 53,
            target: 5353,
        };
        let dnat = |publish, origin| Intent::DnatToIngress {
            service: web(),
            publish,
            ingress,
            origin,
        };
        let forward = |direction| Intent::ForwardIngress {
            iface: "vipd-ingress".into(),
            direction,
            family: IpFamily::V4,
        };
        // Two DNATs per published port (arriving, and the host's own connections; to the
        // same port on the ingress namespace), then the link's masquerade and forwarding.
        assert_eq!(
            m.host_rules,
            [
                dnat(http, Origin::Arriving),
                dnat(http, Origin::Local),
                dnat(dns, Origin::Arriving),
                dnat(dns, Origin::Local),
                Intent::MasqueradeToIngress {
                    iface: "vipd-ingress".into(),
                    family: IpFamily::V4
                },
                forward(Direction::Out),
                forward(Direction::In),
            ]
        );

        // The ingress namespace's rules: one mark per port, one SNAT to its address.
        let port_mark = |publish, mark| Intent::IngressMark {
            service: web(),
            addr: Vip::new(ingress.into()),
            publish,
            mark: FwMark::new(mark).unwrap(),
        };
        assert_eq!(
            plan::desired_rules(&m.ingress, &[]),
            [
                port_mark(http, 0x11f90),
                Intent::SnatAllIpvs { source: ingress },
                port_mark(dns, 0x20035),
                Intent::SnatAllIpvs { source: ingress },
            ]
        );
    }

    #[test]
    fn dnsrr_services_publish_too_and_nothing_published_means_no_rules() {
        let cs = [c(
            "d1",
            &[
                (SERVICE, "db"),
                (labels::ENDPOINT_MODE, "dnsrr"),
                (PUBLISH, "5432:5432"),
            ],
            &[("n", "10.1.0.6")],
        )];
        let m = mesh(&cs, &[], &[]);
        assert_eq!(dests(&m, 5432), ["10.1.0.6:5432"]);

        let none = mesh(&[c("w1", &[(SERVICE, "web")], &[("n", "10.1.0.3")])], &[], &[]);
        assert_eq!(none, MeshPlan::default());
    }

    #[test]
    fn a_port_goes_to_one_service_and_the_other_is_told_why() {
        let cs = [
            c(
                "a1",
                &[(SERVICE, "api"), (PUBLISH, "8080:80,9090:90")],
                &[("n", "10.1.0.3")],
            ),
            c(
                "w1",
                &[(SERVICE, "web"), (PUBLISH, "8080:8080")],
                &[("n", "10.1.0.4")],
            ),
        ];
        let m = mesh(&cs, &[], &[]);
        assert_eq!(
            m.holders[&PortKey::new(TCP, 8080)].as_str(),
            "api",
            "smallest name first"
        );
        assert_eq!(dests(&m, 9090), ["10.1.0.3:90"]);
        let web = ServiceName::new("web").unwrap();
        assert_eq!(
            m.errors[&web],
            ["port 8080/tcp not published: service api already publishes it"]
        );

        // web held it first: web keeps it.
        let m = mesh(&cs, &[(PortKey::new(TCP, 8080), "web")], &[]);
        assert_eq!(m.holders[&PortKey::new(TCP, 8080)].as_str(), "web");
        assert_eq!(dests(&m, 8080), ["10.1.0.4:8080"]);

        // In a cluster the store's claimer wins it on every node, whoever held it here.
        let (defs, _) = labels::services(&cs);
        let claimed = BTreeMap::from([(PortKey::new(TCP, 8080), web.clone())]);
        let none = BTreeMap::new();
        let api_before = BTreeMap::from([(PortKey::new(TCP, 8080), ServiceName::new("api").unwrap())]);
        for previous in [&none, &api_before] {
            let m = plan(&cs, &defs, previous, &BTreeSet::new(), &claimed, &link());
            assert_eq!(m.holders[&PortKey::new(TCP, 8080)], web);
            assert_eq!(dests(&m, 8080), ["10.1.0.4:8080"]);
        }
        assert_eq!(
            m.holders[&PortKey::new(TCP, 9090)].as_str(),
            "api",
            "api's other port is published"
        );
    }

    #[test]
    fn a_port_bound_on_the_host_is_refused_unless_the_service_held_it_already() {
        let cs = [c(
            "w1",
            &[(SERVICE, "web"), (PUBLISH, "8080:80,53:53/udp")],
            &[("n", "10.1.0.3")],
        )];
        let m = mesh(&cs, &[], &[PortKey::new(TCP, 8080)]);
        let web = ServiceName::new("web").unwrap();
        assert_eq!(
            m.errors[&web],
            ["port 8080/tcp not published: it is already in use on the host (a socket is bound to it)"]
        );
        assert_eq!(
            m.holders.keys().copied().collect::<Vec<_>>(),
            [PortKey::new(UDP, 53)]
        );

        let kept = mesh(
            &cs,
            &[(PortKey::new(TCP, 8080), "web")],
            &[PortKey::new(TCP, 8080)],
        );
        assert!(kept.errors.is_empty());
        assert_eq!(kept.holders.len(), 2);
    }
}
