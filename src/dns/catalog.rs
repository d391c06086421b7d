//! What the embedded DNS server knows, and how it answers: pure, no I/O.
//!
//! A [`Catalog`] is an immutable snapshot of the services, their tasks and named ports, and
//! the containers (with their aliases) that one DNS view serves. The daemon builds a new
//! catalog whenever something changes and swaps it in; [`answer`] turns one question into
//! an [`Answer`] against a snapshot.
//!
//! Names served (all case-insensitive, trailing dot optional, each also under the search
//! domain when one is configured, e.g. `web.vipd.local`):
//!
//! | name | A answer |
//! |---|---|
//! | `<svc>` | the VIP (VIP mode) or every task address, shuffled per answer (DNSRR mode) |
//! | `tasks.<svc>` | every task address, shuffled |
//! | `<a-b-c-d>.<svc>` | the task `a.b.c.d` (the SRV targets) |
//! | `_<port>._<proto>.<svc>` | SRV only: one record per task, target `<a-b-c-d>.<svc>`, the addresses as additionals |
//! | `<container>`, `<alias>` | the container's address (every address when several share an alias) |
//! | `d.c.b.a.in-addr.arpa` | PTR only: a VIP → `<svc>`, a container's address → its name, another task → `<a-b-c-d>.<svc>` |
//!
//! A name vipd owns never goes to the upstream resolvers: a name at or below a service or
//! container name, `tasks.<label>`, and anything under the search domain is answered here,
//! with NXDOMAIN when it does not exist and NODATA (no records, no error) when it exists
//! without records of the asked type — AAAA in particular, as vipd serves IPv4 only.
//! Everything else is [`Answer::NotOurs`], for the server to forward.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use super::names;
use crate::core::labels::NamedPort;
use crate::core::model::EndpointMode;
use crate::core::model::{BackendAddr, ServiceName, Vip};

/// The TTL of every record when none is configured. Short on purpose: Swarm's fixed 600 s
/// keeps clients on dead task addresses for ten minutes.
pub const DEFAULT_TTL: u32 = 5;

/// The weight of every SRV record: all tasks are equal.
pub const SRV_WEIGHT: u16 = 10;

/// One service as DNS sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRecord {
    pub name: ServiceName,
    /// [`EndpointMode::Vip`]: `<svc>` answers `vip`, load-balanced by IPVS.
    /// [`EndpointMode::Dnsrr`]: `<svc>` answers every task address, in a new order each time.
    pub mode: EndpointMode,
    /// The service's virtual IP: set in VIP mode, and only then.
    pub vip: Option<Vip>,
    /// The addresses of its running tasks (IPv6 ones are ignored for now).
    pub tasks: Vec<BackendAddr>,
    /// Named ports for SRV answers.
    pub ports: Vec<NamedPort>,
}

/// One container as DNS sees it: its name and its aliases on the served network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRecord {
    pub name: String,
    /// Its address on the served network (an IPv6 address answers no A record).
    pub addr: IpAddr,
    /// Network aliases; several containers may share one (each answer then lists them all).
    pub aliases: Vec<String>,
}

/// Why a catalog could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    /// Two services with one name.
    #[error("service {0:?} appears twice")]
    DuplicateService(String),
    /// A VIP service without its VIP, or a DNSRR service with one.
    #[error("service {0:?}: a VIP-mode service needs its VIP, a DNSRR one has none")]
    EndpointMismatch(String),
    /// A service with two named ports of the same name and protocol.
    #[error("service {service:?} has the port _{port}._{protocol} twice")]
    DuplicatePort {
        service: String,
        port: String,
        protocol: &'static str,
    },
    /// A name that is not a valid DNS name (labels of 1-63 characters from a-z, 0-9, '-'
    /// and '_', at most 253 characters in all).
    #[error("invalid {what} {name:?}: use dot-separated labels of 1-63 characters from a-z, A-Z, 0-9, '-' and '_', not starting or ending with '-'")]
    InvalidName { what: &'static str, name: String },
}

/// The query type, as far as the catalog cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueryType {
    A,
    Aaaa,
    Srv,
    Ptr,
    Any,
    /// Any other type, by number: NODATA for an owned name.
    Other(u16),
}

impl From<u16> for QueryType {
    fn from(code: u16) -> Self {
        match code {
            1 => QueryType::A,
            28 => QueryType::Aaaa,
            33 => QueryType::Srv,
            12 => QueryType::Ptr,
            255 => QueryType::Any,
            other => QueryType::Other(other),
        }
    }
}

/// The class IN.
pub const CLASS_IN: u16 = 1;
/// The query class ANY (`*`).
pub const CLASS_ANY: u16 = 255;

/// One question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query<'a> {
    /// The name as asked, any case, with or without its trailing dot.
    pub name: &'a str,
    pub qtype: QueryType,
    /// The class by number: [`CLASS_IN`] or [`CLASS_ANY`] get records, others NODATA.
    pub qclass: u16,
}

/// The data of one record.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RecordData {
    A(Ipv4Addr),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        /// Absolute, with its trailing dot.
        target: String,
    },
    /// Absolute, with its trailing dot.
    Ptr(String),
}

/// One record of an answer, in class IN.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Record {
    /// The owner name, absolute (trailing dot). Answers carry the name as asked.
    pub name: String,
    pub ttl: u32,
    pub data: RecordData,
}

/// What to reply to one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The name exists and has records of the asked type.
    Records {
        answers: Vec<Record>,
        /// The addresses of SRV targets.
        additionals: Vec<Record>,
    },
    /// The name is vipd's and does not exist.
    NxDomain,
    /// The name is vipd's and exists, without records of the asked type or class.
    NoData,
    /// Not a name vipd owns: forward it upstream.
    NotOurs,
}

/// What a name (relative to the search domain) is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    /// `<svc>`: index into the services.
    Service(usize),
    /// `tasks.<svc>`.
    Tasks(usize),
    /// `<a-b-c-d>.<svc>`: one task.
    TaskHost(Ipv4Addr),
    /// `_<port>._<proto>.<svc>`: (service, port) indexes.
    Srv(usize, usize),
    /// `_<proto>.<svc>`: exists only because names below it do.
    Empty,
    /// A container name or alias: its IPv4 addresses.
    Hosts(Vec<Ipv4Addr>),
}

/// An immutable snapshot of everything one DNS view serves; see the module documentation.
/// Two catalogs are equal when built from equal parts: the indexes follow from them.
#[derive(Debug, Clone)]
pub struct Catalog {
    services: Vec<ServiceRecord>,
    containers: Vec<ContainerRecord>,
    /// Lowercase, no leading or trailing dot.
    domain: Option<String>,
    ttl: u32,
    /// Lowercase relative name → what it is.
    names: HashMap<String, Node>,
    /// Names everything below which is vipd's: services, containers, aliases.
    roots: HashSet<String>,
    /// Address → relative name for PTR.
    reverse: HashMap<Ipv4Addr, String>,
}

impl PartialEq for Catalog {
    fn eq(&self, other: &Self) -> bool {
        self.services == other.services
            && self.containers == other.containers
            && self.domain == other.domain
            && self.ttl == other.ttl
    }
}

impl Eq for Catalog {}

impl Default for Catalog {
    fn default() -> Self {
        Catalog::empty()
    }
}

/// Collects the parts of a [`Catalog`]; [`CatalogBuilder::build`] checks them.
#[derive(Debug, Clone)]
pub struct CatalogBuilder {
    services: Vec<ServiceRecord>,
    containers: Vec<ContainerRecord>,
    domain: Option<String>,
    ttl: u32,
}

impl CatalogBuilder {
    /// Add a service.
    pub fn service(mut self, service: ServiceRecord) -> Self {
        self.services.push(service);
        self
    }

    /// Add a container.
    pub fn container(mut self, container: ContainerRecord) -> Self {
        self.containers.push(container);
        self
    }

    /// Also answer every name under `domain` (e.g. `vipd.local`: `web.vipd.local`), and own
    /// the whole domain. Default: none.
    pub fn domain(mut self, domain: &str) -> Self {
        self.domain = Some(domain.to_owned());
        self
    }

    /// The TTL of every record, in seconds. Default [`DEFAULT_TTL`].
    pub fn ttl(mut self, ttl: u32) -> Self {
        self.ttl = ttl;
        self
    }

    /// Check the names and index them.
    pub fn build(self) -> Result<Catalog, CatalogError> {
        let domain = match self.domain {
            None => None,
            Some(d) => {
                let d = names::domain(&d);
                check_name("domain", &d)?;
                Some(d)
            }
        };
        let mut names = HashMap::new();
        let mut roots = HashSet::new();
        let mut reverse = HashMap::new();

        // Services first: their names win over a container or alias that collides.
        for (i, svc) in self.services.iter().enumerate() {
            let name = names::key(svc.name.as_str());
            check_name("service name", &name)?;
            if !roots.insert(name.clone()) {
                return Err(CatalogError::DuplicateService(svc.name.to_string()));
            }
            if (svc.mode == EndpointMode::Vip) != svc.vip.is_some() {
                return Err(CatalogError::EndpointMismatch(svc.name.to_string()));
            }
            names.insert(name.clone(), Node::Service(i));
            names.insert(names::tasks(&name), Node::Tasks(i));
            for ip in v4_tasks(svc) {
                names.insert(names::task_host(ip, &name), Node::TaskHost(ip));
            }
            for (p, port) in svc.ports.iter().enumerate() {
                let label = names::key(&port.name);
                check_name("port name", &label)?;
                if label.contains('.') {
                    return Err(CatalogError::InvalidName {
                        what: "port name",
                        name: port.name.clone(),
                    });
                }
                let srv = names::srv(&label, port.protocol, &name);
                if names.insert(srv, Node::Srv(i, p)).is_some() {
                    return Err(CatalogError::DuplicatePort {
                        service: svc.name.to_string(),
                        port: port.name.clone(),
                        protocol: port.protocol.label(),
                    });
                }
                names.insert(names::protocol_node(port.protocol, &name), Node::Empty);
            }
            if let Some(IpAddr::V4(ip)) = svc.vip.map(|vip| vip.addr()) {
                reverse.insert(ip, name.clone());
            }
        }

        for c in &self.containers {
            let cname = names::key(&c.name);
            check_name("container name", &cname)?;
            if let IpAddr::V4(ip) = c.addr {
                reverse.entry(ip).or_insert_with(|| cname.clone());
            }
            let mut aliases = vec![cname];
            for alias in &c.aliases {
                let alias = names::key(alias);
                check_name("alias", &alias)?;
                aliases.push(alias);
            }
            for n in aliases {
                if roots.contains(&n) && !matches!(names.get(&n), Some(Node::Hosts(_))) {
                    continue; // a service of that name wins
                }
                roots.insert(n.clone());
                // A derived name (tasks.x, a-b-c-d.x, ...) wins over a container.
                let entry = names.entry(n).or_insert_with(|| Node::Hosts(Vec::new()));
                if let (Node::Hosts(addrs), IpAddr::V4(ip)) = (entry, c.addr) {
                    if !addrs.contains(&ip) {
                        addrs.push(ip);
                    }
                }
            }
        }

        // Tasks without a container of their own get their per-task name.
        for svc in &self.services {
            let name = names::key(svc.name.as_str());
            for ip in v4_tasks(svc) {
                reverse.entry(ip).or_insert_with(|| names::task_host(ip, &name));
            }
        }

        Ok(Catalog {
            services: self.services,
            containers: self.containers,
            domain,
            ttl: self.ttl,
            names,
            roots,
            reverse,
        })
    }
}

impl Catalog {
    /// Start a catalog: no services, no containers, no domain, TTL [`DEFAULT_TTL`].
    pub fn builder() -> CatalogBuilder {
        CatalogBuilder {
            services: Vec::new(),
            containers: Vec::new(),
            domain: None,
            ttl: DEFAULT_TTL,
        }
    }

    /// A catalog that owns nothing: every question is forwarded.
    pub fn empty() -> Catalog {
        Catalog {
            services: Vec::new(),
            containers: Vec::new(),
            domain: None,
            ttl: DEFAULT_TTL,
            names: HashMap::new(),
            roots: HashSet::new(),
            reverse: HashMap::new(),
        }
    }

    pub fn services(&self) -> &[ServiceRecord] {
        &self.services
    }

    pub fn containers(&self) -> &[ContainerRecord] {
        &self.containers
    }

    /// The search domain, lowercase, without trailing dot.
    pub fn domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }

    pub fn ttl(&self) -> u32 {
        self.ttl
    }

    /// Every relative name the catalog answers (services and what derives from them,
    /// containers, aliases), lowercase; each is also served under the domain.
    pub fn relative_names(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }

    /// Every IPv4 address whose PTR name ([`names::reverse`]) the catalog answers.
    pub fn reverse_addrs(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.reverse.keys().copied()
    }

    /// True when the relative name is at or below a service or container name, or is
    /// `tasks.<one label>`.
    fn owns_below(&self, rel: &str) -> bool {
        if names::is_tasks_of_a_label(rel) {
            return true;
        }
        let mut rest = rel;
        loop {
            if self.roots.contains(rest) {
                return true;
            }
            match rest.split_once('.') {
                Some((_, tail)) => rest = tail,
                None => return false,
            }
        }
    }

    /// An absolute name for a relative one, in the domain when `in_domain` (unless it is
    /// there already).
    fn absolute(&self, rel: &str, in_domain: bool) -> String {
        names::absolute(rel, self.domain.as_deref().filter(|_| in_domain))
    }
}

/// Answer one question from `catalog`. `shuffle_seed` orders the addresses of a DNSRR
/// service, `tasks.<svc>`, an alias and SRV records: pass a different value for each
/// query (any value is fine; equal seeds give equal orders).
pub fn answer(catalog: &Catalog, query: &Query<'_>, shuffle_seed: u64) -> Answer {
    let asked = query.name.strip_suffix('.').unwrap_or(query.name);
    if asked.is_empty() {
        return Answer::NotOurs;
    }
    let lower = names::key(asked);
    let owner = format!("{asked}.");
    let class_ok = matches!(query.qclass, CLASS_IN | CLASS_ANY);
    let wants = |t: QueryType| class_ok && (query.qtype == t || query.qtype == QueryType::Any);

    if let Some(ip) = names::parse_reverse(&lower) {
        let Some(target) = catalog.reverse.get(&ip) else {
            return Answer::NotOurs;
        };
        if !wants(QueryType::Ptr) {
            return Answer::NoData;
        }
        let in_domain = catalog.domain.is_some();
        let record = Record {
            name: owner,
            ttl: catalog.ttl,
            data: RecordData::Ptr(catalog.absolute(target, in_domain)),
        };
        return records(vec![record], Vec::new());
    }

    // The name as is first (a container may be called `a.vipd.local`), then without the
    // search domain.
    let (rel, in_domain) = match &catalog.domain {
        _ if catalog.names.contains_key(&lower) => (lower.as_str(), false),
        Some(d) if lower == *d => return Answer::NoData,
        Some(d) => match names::strip_domain(&lower, d) {
            Some(rel) => (rel, true),
            None => (lower.as_str(), false),
        },
        None => (lower.as_str(), false),
    };

    let Some(node) = catalog.names.get(rel) else {
        return if in_domain || catalog.owns_below(rel) {
            Answer::NxDomain
        } else {
            Answer::NotOurs
        };
    };
    let ttl = catalog.ttl;
    let a = |ip: Ipv4Addr| Record {
        name: owner.clone(),
        ttl,
        data: RecordData::A(ip),
    };
    let mut rng = SplitMix64(shuffle_seed);

    let found = match node {
        Node::Service(i) if wants(QueryType::A) => {
            let svc = &catalog.services[*i];
            match svc.mode {
                EndpointMode::Vip => match svc.vip.map(|vip| vip.addr()) {
                    Some(IpAddr::V4(ip)) => vec![a(ip)],
                    Some(IpAddr::V6(_)) | None => Vec::new(),
                },
                EndpointMode::Dnsrr => {
                    let mut ips: Vec<Ipv4Addr> = v4_tasks(svc).collect();
                    shuffle(&mut ips, &mut rng);
                    ips.into_iter().map(a).collect()
                }
            }
        }
        Node::Tasks(i) if wants(QueryType::A) => {
            let mut ips: Vec<Ipv4Addr> = v4_tasks(&catalog.services[*i]).collect();
            shuffle(&mut ips, &mut rng);
            ips.into_iter().map(a).collect()
        }
        Node::TaskHost(ip) if wants(QueryType::A) => vec![a(*ip)],
        Node::Hosts(ips) if wants(QueryType::A) => {
            let mut ips = ips.clone();
            shuffle(&mut ips, &mut rng);
            ips.into_iter().map(a).collect()
        }
        Node::Srv(i, p) if wants(QueryType::Srv) => {
            let svc = &catalog.services[*i];
            let port = svc.ports[*p].port;
            let svc_name = names::key(svc.name.as_str());
            let mut ips: Vec<Ipv4Addr> = v4_tasks(svc).collect();
            shuffle(&mut ips, &mut rng);
            let mut answers = Vec::with_capacity(ips.len());
            let mut additionals = Vec::with_capacity(ips.len());
            for ip in ips {
                let target = catalog.absolute(&names::task_host(ip, &svc_name), in_domain);
                answers.push(Record {
                    name: owner.clone(),
                    ttl,
                    data: RecordData::Srv {
                        priority: 0,
                        weight: SRV_WEIGHT,
                        port,
                        target: target.clone(),
                    },
                });
                additionals.push(Record {
                    name: target,
                    ttl,
                    data: RecordData::A(ip),
                });
            }
            return if answers.is_empty() {
                Answer::NoData
            } else {
                records(answers, additionals)
            };
        }
        _ => Vec::new(),
    };
    if found.is_empty() {
        Answer::NoData
    } else {
        records(found, Vec::new())
    }
}

fn records(answers: Vec<Record>, additionals: Vec<Record>) -> Answer {
    Answer::Records { answers, additionals }
}

/// The IPv4 task addresses of a service, without duplicates, in input order.
fn v4_tasks(svc: &ServiceRecord) -> impl Iterator<Item = Ipv4Addr> + '_ {
    let mut seen = HashSet::new();
    svc.tasks.iter().filter_map(move |t| match t.addr() {
        IpAddr::V4(ip) if seen.insert(ip) => Some(ip),
        _ => None,
    })
}

fn check_name(what: &'static str, name: &str) -> Result<(), CatalogError> {
    if names::valid(name) {
        Ok(())
    } else {
        Err(CatalogError::InvalidName {
            what,
            name: name.to_owned(),
        })
    }
}

/// A small, fast generator for shuffling answers (not for anything secret).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..=bound`.
    fn below_or_eq(&mut self, bound: usize) -> usize {
        // The modulo bias is negligible for answer sizes.
        (self.next() % (bound as u64 + 1)) as usize
    }
}

/// Fisher-Yates.
fn shuffle<T>(items: &mut [T], rng: &mut SplitMix64) {
    for i in (1..items.len()).rev() {
        let j = rng.below_or_eq(i);
        items.swap(i, j);
    }
}

/// A seed for [`answer`] derived from `n` (e.g. a per-query counter): well spread, so
/// consecutive counters give unrelated orders.
pub fn seed_from(n: u64) -> u64 {
    SplitMix64(n).next()
}

impl fmt::Display for RecordData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordData::A(ip) => write!(f, "A {ip}"),
            RecordData::Srv {
                priority,
                weight,
                port,
                target,
            } => write!(f, "SRV {priority} {weight} {port} {target}"),
            RecordData::Ptr(target) => write!(f, "PTR {target}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::Protocol;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn tasks(ips: &[&str]) -> Vec<BackendAddr> {
        ips.iter().map(|s| BackendAddr::new(s.parse().unwrap())).collect()
    }

    fn catalog(domain: Option<&str>) -> Catalog {
        let mut b = Catalog::builder()
            .ttl(7)
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
                    NamedPort::new("stats", Protocol::Udp, 9125),
                ],
            })
            .service(ServiceRecord {
                name: ServiceName::new("idle").unwrap(),
                mode: EndpointMode::Dnsrr,
                vip: None,
                tasks: Vec::new(),
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
                aliases: vec!["shared".into(), "web".into()],
            })
            .container(ContainerRecord {
                name: "cache2".into(),
                addr: "10.0.0.21".parse().unwrap(),
                aliases: vec!["Shared".into()],
            });
        if let Some(d) = domain {
            b = b.domain(d);
        }
        b.build().unwrap()
    }

    fn ask(c: &Catalog, name: &str, qtype: QueryType) -> Answer {
        answer(
            c,
            &Query {
                name,
                qtype,
                qclass: CLASS_IN,
            },
            42,
        )
    }

    /// The data of the answers, sorted; panics unless records.
    fn data(a: &Answer) -> Vec<String> {
        let Answer::Records { answers, .. } = a else {
            panic!("expected records, got {a:?}")
        };
        let mut v: Vec<String> = answers.iter().map(|r| r.data.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn vip_service_answers_its_vip_with_the_ttl_and_the_name_as_asked() {
        let c = catalog(None);
        let a = ask(&c, "WeB.", QueryType::A);
        assert_eq!(
            a,
            Answer::Records {
                answers: vec![Record {
                    name: "WeB.".into(),
                    ttl: 7,
                    data: RecordData::A(ip("10.0.0.100"))
                }],
                additionals: vec![]
            }
        );
        assert_eq!(ask(&c, "web", QueryType::A), ask(&c, "web.", QueryType::A));
        assert_eq!(data(&ask(&c, "web", QueryType::Any)), ["A 10.0.0.100"]);
    }

    #[test]
    fn dnsrr_answers_every_ipv4_task_in_an_order_that_varies() {
        let c = catalog(None);
        let q = Query {
            name: "db",
            qtype: QueryType::A,
            qclass: CLASS_IN,
        };
        let mut orders = HashSet::new();
        for seed in 0..50 {
            let a = answer(&c, &q, seed_from(seed));
            assert_eq!(data(&a), ["A 10.0.0.7", "A 10.0.0.8", "A 10.0.0.9"]);
            let Answer::Records { answers, .. } = a else {
                unreachable!()
            };
            orders.insert(answers.iter().map(|r| r.data.to_string()).collect::<Vec<_>>());
        }
        assert_eq!(orders.len(), 6, "all 6 orders of 3 tasks appear in 50 answers");
        // Equal seeds, equal orders.
        assert_eq!(answer(&c, &q, 9), answer(&c, &q, 9));
    }

    #[test]
    fn tasks_names_answer_task_addresses_in_both_modes() {
        let c = catalog(None);
        assert_eq!(
            data(&ask(&c, "tasks.web", QueryType::A)),
            ["A 10.0.0.5", "A 10.0.0.6"]
        );
        assert_eq!(
            data(&ask(&c, "TASKS.db.", QueryType::A)),
            ["A 10.0.0.7", "A 10.0.0.8", "A 10.0.0.9"]
        );
        assert_eq!(data(&ask(&c, "10-0-0-6.web", QueryType::A)), ["A 10.0.0.6"]);
        // No tasks: the name exists, without addresses.
        assert_eq!(ask(&c, "tasks.idle", QueryType::A), Answer::NoData);
        assert_eq!(ask(&c, "idle", QueryType::A), Answer::NoData);
    }

    #[test]
    fn srv_lists_every_task_with_the_named_port_and_addresses_as_additionals() {
        let c = catalog(None);
        let a = ask(&c, "_pg._tcp.db", QueryType::Srv);
        let Answer::Records { answers, additionals } = &a else {
            panic!("{a:?}")
        };
        assert_eq!(answers.len(), 3);
        for r in answers {
            assert_eq!(r.name, "_pg._tcp.db.");
            assert_eq!(r.ttl, 7);
            let RecordData::Srv { port, target, .. } = &r.data else {
                panic!("{r:?}")
            };
            assert_eq!(*port, 5432);
            let glue = additionals.iter().find(|g| &g.name == target).expect("glue");
            let RecordData::A(addr) = glue.data else { panic!() };
            assert_eq!(target, &format!("{}.db.", names::task_label(addr)));
            // The target resolves too.
            assert_eq!(data(&ask(&c, target, QueryType::A)), [format!("A {addr}")]);
        }
        assert_eq!(data(&ask(&c, "_stats._udp.db", QueryType::Srv)).len(), 3);
        // The SRV name exists: A is NODATA; the wrong protocol or port does not exist.
        assert_eq!(ask(&c, "_pg._tcp.db", QueryType::A), Answer::NoData);
        assert_eq!(ask(&c, "_tcp.db", QueryType::Srv), Answer::NoData);
        assert_eq!(ask(&c, "_pg._udp.db", QueryType::Srv), Answer::NxDomain);
        assert_eq!(ask(&c, "_ssh._tcp.web", QueryType::Srv), Answer::NxDomain);
        assert_eq!(ask(&c, "_http._tcp.idle", QueryType::Srv), Answer::NoData);
        assert_eq!(ask(&c, "web", QueryType::Srv), Answer::NoData);
    }

    #[test]
    fn containers_and_aliases_answer_their_addresses() {
        let c = catalog(None);
        assert_eq!(data(&ask(&c, "web.1.abc", QueryType::A)), ["A 10.0.0.5"]);
        assert_eq!(data(&ask(&c, "frontend", QueryType::A)), ["A 10.0.0.5"]);
        assert_eq!(data(&ask(&c, "CACHE", QueryType::A)), ["A 10.0.0.20"]);
        // An alias two containers share answers both.
        assert_eq!(
            data(&ask(&c, "shared", QueryType::A)),
            ["A 10.0.0.20", "A 10.0.0.21"]
        );
        // The service wins over an alias of its name.
        assert_eq!(data(&ask(&c, "web", QueryType::A)), ["A 10.0.0.100"]);
    }

    #[test]
    fn ptr_names_vips_containers_and_tasks() {
        let c = catalog(None);
        let ptr = |name| data(&ask(&c, name, QueryType::Ptr));
        assert_eq!(ptr("100.0.0.10.in-addr.arpa."), ["PTR web."]);
        assert_eq!(ptr("5.0.0.10.IN-ADDR.ARPA"), ["PTR web.1.abc."]);
        assert_eq!(ptr("6.0.0.10.in-addr.arpa"), ["PTR 10-0-0-6.web."]);
        assert_eq!(ptr("20.0.0.10.in-addr.arpa"), ["PTR cache."]);
        assert_eq!(ask(&c, "100.0.0.10.in-addr.arpa", QueryType::A), Answer::NoData);
        for other in [
            "8.8.8.8.in-addr.arpa",
            "0.10.in-addr.arpa",
            "1.100.0.0.10.in-addr.arpa",
            "x.0.0.10.in-addr.arpa",
            "256.0.0.10.in-addr.arpa",
            "in-addr.arpa",
        ] {
            assert_eq!(ask(&c, other, QueryType::Ptr), Answer::NotOurs, "{other}");
        }
        let d = catalog(Some("vipd.local"));
        assert_eq!(
            data(&ask(&d, "100.0.0.10.in-addr.arpa.", QueryType::Ptr)),
            ["PTR web.vipd.local."]
        );
    }

    #[test]
    fn owned_names_are_nxdomain_or_nodata_never_forwarded() {
        let c = catalog(None);
        assert_eq!(ask(&c, "tasks.x", QueryType::A), Answer::NxDomain);
        assert_eq!(ask(&c, "nope.web", QueryType::A), Answer::NxDomain);
        assert_eq!(ask(&c, "a.b.cache", QueryType::A), Answer::NxDomain);
        assert_eq!(ask(&c, "x.web.1.abc", QueryType::A), Answer::NxDomain);
        for t in [QueryType::Aaaa, QueryType::Other(15), QueryType::Ptr] {
            assert_eq!(ask(&c, "web", t), Answer::NoData);
            assert_eq!(ask(&c, "cache", t), Answer::NoData);
        }
        assert_eq!(ask(&c, "tasks.web", QueryType::Aaaa), Answer::NoData);
        // Another class: the name is still ours, without records.
        let chaos = Query {
            name: "web",
            qtype: QueryType::A,
            qclass: 3,
        };
        assert_eq!(answer(&c, &chaos, 0), Answer::NoData);
        for other in [
            "example.com",
            "webx",
            "tasks.a.b",
            "x",
            ".",
            "",
            "com.web.example",
        ] {
            assert_eq!(ask(&c, other, QueryType::A), Answer::NotOurs, "{other:?}");
        }
    }

    #[test]
    fn the_search_domain_is_owned_and_answers_like_the_short_names() {
        let c = catalog(Some("VIPD.local."));
        assert_eq!(c.domain(), Some("vipd.local"));
        assert_eq!(data(&ask(&c, "web.vipd.local.", QueryType::A)), ["A 10.0.0.100"]);
        assert_eq!(data(&ask(&c, "web", QueryType::A)), ["A 10.0.0.100"]);
        assert_eq!(data(&ask(&c, "Tasks.Web.Vipd.Local", QueryType::A)).len(), 2);
        assert_eq!(data(&ask(&c, "cache.vipd.local", QueryType::A)), ["A 10.0.0.20"]);
        assert_eq!(ask(&c, "vipd.local", QueryType::A), Answer::NoData);
        assert_eq!(ask(&c, "unknown.vipd.local", QueryType::A), Answer::NxDomain);
        assert_eq!(ask(&c, "a.b.vipd.local", QueryType::A), Answer::NxDomain);
        assert_eq!(ask(&c, "local", QueryType::A), Answer::NotOurs);
        assert_eq!(ask(&c, "xvipd.local", QueryType::A), Answer::NotOurs);
        // A container whose own name ends in the domain.
        let full = Catalog::builder()
            .domain("example")
            .container(ContainerRecord {
                name: "ext.example".into(),
                addr: "10.0.0.1".parse().unwrap(),
                aliases: vec![],
            })
            .build()
            .unwrap();
        assert_eq!(data(&ask(&full, "ext.example", QueryType::A)), ["A 10.0.0.1"]);
        assert_eq!(
            data(&ask(&full, "ext.example.example", QueryType::A)),
            ["A 10.0.0.1"]
        );
        assert_eq!(ask(&full, "other.example", QueryType::A), Answer::NxDomain);
        assert_eq!(
            data(&ask(&full, "1.0.0.10.in-addr.arpa", QueryType::Ptr)),
            ["PTR ext.example."]
        );
        // SRV targets stay in the domain the question used.
        let a = ask(&c, "_http._tcp.web.vipd.local", QueryType::Srv);
        let Answer::Records { additionals, .. } = &a else {
            panic!("{a:?}")
        };
        let mut names: Vec<&str> = additionals.iter().map(|r| r.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["10-0-0-5.web.vipd.local.", "10-0-0-6.web.vipd.local."]);
    }

    #[test]
    fn building_checks_names() {
        let svc = |name: &str| ServiceRecord {
            name: ServiceName::new(name).unwrap(),
            mode: EndpointMode::Dnsrr,
            vip: None,
            tasks: vec![],
            ports: vec![],
        };
        assert_eq!(
            Catalog::builder().service(svc("a")).service(svc("A")).build(),
            Err(CatalogError::DuplicateService("A".into()))
        );
        let mut no_vip = svc("v");
        no_vip.mode = EndpointMode::Vip;
        let mut dnsrr_vip = svc("d");
        dnsrr_vip.vip = Some(Vip::new("10.0.0.1".parse().unwrap()));
        for wrong in [no_vip, dnsrr_vip] {
            let name = wrong.name.to_string();
            assert_eq!(
                Catalog::builder().service(wrong).build(),
                Err(CatalogError::EndpointMismatch(name))
            );
        }
        let mut two_ports = svc("b");
        two_ports.ports = vec![
            NamedPort::new("http", Protocol::Tcp, 80),
            NamedPort::new("HTTP", Protocol::Tcp, 8080),
        ];
        assert!(matches!(
            Catalog::builder().service(two_ports).build(),
            Err(CatalogError::DuplicatePort { .. })
        ));
        let mut both = svc("b");
        both.ports = vec![
            NamedPort::new("dns", Protocol::Tcp, 53),
            NamedPort::new("dns", Protocol::Udp, 53),
        ];
        assert!(Catalog::builder().service(both).build().is_ok());
        assert!(Catalog::builder().service(svc("a..b")).build().is_err());
        for bad in ["", "a b", "-", "x.", "ü"] {
            let c = ContainerRecord {
                name: "ok".into(),
                addr: "10.0.0.1".parse().unwrap(),
                aliases: vec![bad.into()],
            };
            assert!(Catalog::builder().container(c).build().is_err(), "{bad:?}");
        }
        assert!(Catalog::builder().domain("a..b").build().is_err());
        let mut dotted = svc("c");
        dotted.ports = vec![NamedPort::new("a.b", Protocol::Tcp, 1)];
        assert!(Catalog::builder().service(dotted).build().is_err());
    }

    #[test]
    fn an_empty_catalog_forwards_everything() {
        let c = Catalog::empty();
        assert_eq!(c.ttl(), DEFAULT_TTL);
        for name in ["web", "tasks.web.x", "1.0.0.10.in-addr.arpa"] {
            assert_eq!(ask(&c, name, QueryType::A), Answer::NotOurs);
        }
        // Still: tasks.<label> is ours.
        assert_eq!(ask(&c, "tasks.web", QueryType::A), Answer::NxDomain);
    }

    #[test]
    fn arbitrary_names_never_panic() {
        let c = catalog(Some("vipd.local"));
        let mut rng = SplitMix64(1);
        let alphabet = b"aZ0.-_\\\x00\xff.in-addr.arpatasks.web";
        for _ in 0..20_000 {
            let len = rng.below_or_eq(40);
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.below_or_eq(alphabet.len() - 1)])
                .collect();
            let name = String::from_utf8_lossy(&bytes);
            let qtype = QueryType::from(rng.below_or_eq(300) as u16);
            let _ = answer(
                &c,
                &Query {
                    name: &name,
                    qtype,
                    qclass: rng.below_or_eq(300) as u16,
                },
                rng.next(),
            );
        }
    }
}
