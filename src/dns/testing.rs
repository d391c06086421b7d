//! Fixtures of the DNS unit tests: a catalog with every kind of name, and queries as stub
//! resolvers send them.

use hickory_server::proto::op::{Edns, Message, Query as WireQuery};
use hickory_server::proto::rr::{Name, RecordType};

use super::catalog::{Catalog, ContainerRecord, ServiceRecord};
use super::fast::{respond, Shuffler, Table};
use crate::core::labels::NamedPort;
use crate::core::model::{BackendAddr, ServiceName, Vip};
use crate::core::model::{EndpointMode, Protocol};

pub(super) fn tasks(ips: &[&str]) -> Vec<BackendAddr> {
    ips.iter().map(|s| BackendAddr::new(s.parse().unwrap())).collect()
}

/// Services of both modes (one without tasks, one with too many for 512 bytes), named
/// ports, containers with a shared alias, the domain `vipd.local`, TTL 9.
pub(super) fn test_catalog() -> Catalog {
    Catalog::builder()
        .ttl(9)
        .domain("vipd.local")
        .service(ServiceRecord {
            name: ServiceName::new("web").unwrap(),
            mode: EndpointMode::Vip,
            vip: Some(Vip::new("10.0.0.100".parse().unwrap())),
            tasks: tasks(&["10.0.0.5", "10.0.0.6"]),
            ports: vec![NamedPort::new("http", Protocol::Tcp, 80)],
        })
        .service(ServiceRecord {
            name: ServiceName::new("db").unwrap(),
            mode: EndpointMode::Dnsrr,
            vip: None,
            tasks: tasks(&["10.0.0.7", "10.0.0.8", "10.0.0.9", "fd00::9"]),
            ports: vec![
                NamedPort::new("pg", Protocol::Tcp, 5432),
                NamedPort::new("Stats", Protocol::Udp, 9125),
            ],
        })
        .service(ServiceRecord {
            name: ServiceName::new("idle").unwrap(),
            mode: EndpointMode::Dnsrr,
            vip: None,
            tasks: Vec::new(),
            ports: vec![NamedPort::new("http", Protocol::Tcp, 80)],
        })
        .service(ServiceRecord {
            name: ServiceName::new("big").unwrap(),
            mode: EndpointMode::Dnsrr,
            vip: None,
            tasks: (1..=60).map(|i| BackendAddr::new([10, 1, 0, i].into())).collect(),
            ports: vec![NamedPort::new("http", Protocol::Tcp, 80)],
        })
        .container(ContainerRecord {
            name: "web.1.abc".into(),
            addr: "10.0.0.5".parse().unwrap(),
            aliases: vec!["frontend".into()],
        })
        .container(ContainerRecord {
            name: "cache".into(),
            addr: "10.0.0.20".parse().unwrap(),
            aliases: vec!["shared".into()],
        })
        .container(ContainerRecord {
            name: "cache2".into(),
            addr: "10.0.0.21".parse().unwrap(),
            aliases: vec!["Shared".into()],
        })
        .build()
        .unwrap()
}

/// A query as a stub resolver sends it: RD, and an OPT record when `payload` is some.
pub(super) fn query(id: u16, name: &str, qtype: RecordType, payload: Option<u16>) -> Vec<u8> {
    query_edns(id, name, qtype, payload.map(|p| (p, 0)))
}

/// A query with RD, and an OPT record of that payload size and EDNS version when some.
pub(super) fn query_edns(id: u16, name: &str, qtype: RecordType, edns: Option<(u16, u8)>) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(WireQuery::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some((payload, version)) = edns {
        let mut e = Edns::new();
        e.set_max_payload(payload);
        e.set_version(version);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

/// The fast path's response to `packet`, decoded; None when it leaves it to the slow path.
pub(super) fn fast(table: &Table, packet: &[u8]) -> Option<Message> {
    let mut out = Vec::new();
    respond(table, packet, &mut out, &mut Shuffler::new(7)).map(|_| Message::from_vec(&out).unwrap())
}
