//! The DNS records of the Docker host: its services with their VIP (or their tasks, for
//! dnsrr) and its containers by name, built into a [`Catalog`] from what vipd knows.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::catalog::{Catalog, ContainerRecord, ServiceRecord};
use super::names;
use crate::core::alloc::Allocations;
use crate::core::containers::Container;
use crate::core::labels::ServiceDef;
use crate::core::model::EndpointMode;
use crate::core::model::{BackendAddr, ServiceName};

/// Build the catalog; names DNS cannot carry are left out and reported, one line each.
pub fn catalog(
    containers: &[Container],
    defs: &BTreeMap<ServiceName, ServiceDef>,
    allocs: &Allocations,
    domain: Option<&str>,
    ttl: u32,
) -> (Catalog, Vec<String>) {
    let mut warnings = Vec::new();
    let by_id: BTreeMap<_, _> = containers.iter().map(|c| (&c.id, c)).collect();
    let mut builder = Catalog::builder().ttl(ttl);
    if let Some(d) = domain {
        builder = builder.domain(d);
    }
    let mut taken = BTreeSet::new();
    for def in defs.values() {
        let lower = names::key(def.name.as_str());
        if !names::valid(&lower) {
            warnings.push(format!("service {}: not a DNS name, not served by DNS", def.name));
            continue;
        }
        let vip = match def.mode {
            EndpointMode::Dnsrr => None,
            EndpointMode::Vip => match allocs.get(&def.name) {
                Some((vip, _)) => Some(vip),
                None => {
                    warnings.push(format!(
                        "service {}: no VIP allocated, not served by DNS",
                        def.name
                    ));
                    continue;
                }
            },
        };
        let mut tasks: Vec<BackendAddr> = def
            .tasks
            .keys()
            .filter_map(|id| by_id.get(id))
            .filter(|c| c.serving())
            .filter_map(|c| first_address(c))
            .map(BackendAddr::new)
            .collect();
        tasks.sort();
        taken.insert(lower);
        builder = builder.service(ServiceRecord {
            name: def.name.clone(),
            mode: def.mode,
            vip,
            tasks,
            ports: def.ports.clone(),
        });
    }
    for c in containers.iter().filter(|c| c.running) {
        let Some(addr) = first_address(c) else { continue };
        let name = names::key(c.name.trim_start_matches('/'));
        if !names::valid(&name) {
            warnings.push(format!(
                "container {} ({}): not a DNS name, not served by DNS",
                c.id, c.name
            ));
            continue;
        }
        if taken.contains(&name) {
            continue;
        }
        builder = builder.container(ContainerRecord {
            name,
            addr,
            aliases: Vec::new(),
        });
    }
    match builder.build() {
        Ok(catalog) => (catalog, warnings),
        Err(e) => {
            warnings.push(format!("DNS catalog not built: {e}"));
            (Catalog::empty(), warnings)
        }
    }
}

/// A container's address on its first network (by network id), as topology uses it.
fn first_address(c: &Container) -> Option<IpAddr> {
    c.attachments
        .iter()
        .min_by(|a, b| a.network.cmp(&b.network))
        .map(|a| IpAddr::V4(a.ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::containers::fixture;
    use crate::core::labels;
    use crate::core::model::Ipv4Net;
    use crate::dns::catalog::{answer, Answer, Query, QueryType, RecordData, CLASS_IN};

    fn c(id: &str, name: &str, labels: &[(&str, &str)], ip: &str) -> Container {
        Container {
            name: name.to_owned(),
            sandbox: None,
            ..fixture::container(id, labels, &[("n", ip)])
        }
    }

    fn a_records(cat: &Catalog, name: &str) -> Vec<String> {
        let q = Query {
            name,
            qtype: QueryType::A,
            qclass: CLASS_IN,
        };
        match answer(cat, &q, 1) {
            Answer::Records { answers, .. } => {
                let mut v: Vec<String> = answers
                    .iter()
                    .filter_map(|r| match &r.data {
                        RecordData::A(ip) => Some(ip.to_string()),
                        _ => None,
                    })
                    .collect();
                v.sort();
                v
            }
            other => panic!("{name}: {other:?}"),
        }
    }

    #[test]
    fn services_containers_and_bad_names() {
        let cs = vec![
            c("1", "/shop-web-1", &[(labels::SERVICE, "web")], "10.1.0.3"),
            c("2", "/shop-web-2", &[(labels::SERVICE, "web")], "10.1.0.4"),
            c(
                "3",
                "/db-1",
                &[(labels::SERVICE, "db"), (labels::ENDPOINT_MODE, "dnsrr")],
                "10.1.0.5",
            ),
            c("4", "/Bad_Name!", &[], "10.1.0.6"),
            c("5", "/client", &[], "10.1.0.9"),
        ];
        let (defs, errors) = labels::services(&cs);
        assert!(errors.is_empty());
        let mut allocs = Allocations::default();
        allocs
            .ensure(
                &ServiceName::new("web").unwrap(),
                Ipv4Net::new("10.253.0.0".parse().unwrap(), 16).unwrap(),
            )
            .unwrap();
        let (cat, warnings) = catalog(&cs, &defs, &allocs, Some("vipd.local"), 5);
        assert_eq!(a_records(&cat, "web"), ["10.253.0.1"]);
        assert_eq!(a_records(&cat, "web.vipd.local"), ["10.253.0.1"]);
        assert_eq!(a_records(&cat, "tasks.web"), ["10.1.0.3", "10.1.0.4"]);
        assert_eq!(a_records(&cat, "db"), ["10.1.0.5"]);
        assert_eq!(a_records(&cat, "client"), ["10.1.0.9"]);
        assert_eq!(a_records(&cat, "shop-web-2"), ["10.1.0.4"]);
        assert_eq!(
            warnings,
            ["container 4 (/Bad_Name!): not a DNS name, not served by DNS"]
        );
    }
}
