//! The embedded DNS server asked by the real `dig`: servers run in this test process on
//! 127.0.0.x with a port of their own; every answer kind over UDP and TCP, the TTL,
//! forwarding to a second server acting as upstream, a silent upstream, catalog updates,
//! and a client outside the ACL in its own network namespace.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use vipd::core::labels::NamedPort;
use vipd::core::model::{BackendAddr, ServiceName, Vip};
use vipd::core::model::{EndpointMode, Protocol};
use vipd::dns::catalog::{Catalog, ContainerRecord, ServiceRecord};
use vipd::dns::server::{loopback_networks, CatalogHandle, DnsConfig, DnsServer};
use vipd::netns::{run_in, NetnsPath};

use crate::common::*;

const TTL: u32 = 7;

/// A DNS server on a thread of its own (its own runtime, optionally inside a network
/// namespace), stopped when dropped.
struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    fn start(config: DnsConfig, catalog: CatalogHandle, netns: Option<NetnsPath>) -> Running {
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let serve = move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                match DnsServer::bind(config, catalog).await {
                    Ok(server) => {
                        bound_tx.send(Ok(server.local_addrs()[0])).unwrap();
                        let shutdown = async {
                            let _ = stopped.await;
                        };
                        server.run(shutdown).await.expect("the DNS server failed");
                    }
                    Err(e) => bound_tx.send(Err(e.to_string())).unwrap(),
                }
            });
        };
        let thread = std::thread::spawn(move || match netns {
            Some(ns) => run_in(&ns, serve).expect("enter the namespace"),
            None => serve(),
        });
        let addr = bound_rx
            .recv()
            .expect("the server thread ended")
            .unwrap_or_else(|e| panic!("cannot start the DNS server: {e}"));
        Running {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A service reached through `vip`, or by DNS round robin when None.
fn svc(name: &str, vip: Option<Vip>, tasks: &[&str], ports: Vec<NamedPort>) -> ServiceRecord {
    ServiceRecord {
        name: ServiceName::new(name).unwrap(),
        mode: if vip.is_some() {
            EndpointMode::Vip
        } else {
            EndpointMode::Dnsrr
        },
        vip,
        tasks: tasks
            .iter()
            .map(|t| BackendAddr::new(t.parse().unwrap()))
            .collect(),
        ports,
    }
}

fn container(name: &str, addr: &str, aliases: &[&str]) -> ContainerRecord {
    ContainerRecord {
        name: name.into(),
        addr: addr.parse().unwrap(),
        aliases: aliases.iter().map(|a| a.to_string()).collect(),
    }
}

fn vip(addr: &str) -> Option<Vip> {
    Some(Vip::new(addr.parse().unwrap()))
}

/// The catalog under test: a VIP service, a DNSRR service with 3 tasks, named ports,
/// containers with aliases, the domain `vipd.test`.
fn main_catalog() -> Catalog {
    Catalog::builder()
        .ttl(TTL)
        .domain("vipd.test")
        .service(svc(
            "web",
            vip("10.10.0.100"),
            &["10.10.0.5", "10.10.0.6"],
            vec![NamedPort::new("http", Protocol::Tcp, 80)],
        ))
        .service(svc(
            "db",
            None,
            &["10.10.0.7", "10.10.0.8", "10.10.0.9"],
            vec![
                NamedPort::new("pg", Protocol::Tcp, 5432),
                NamedPort::new("metrics", Protocol::Udp, 9100),
            ],
        ))
        .container(container("web.1.abc", "10.10.0.5", &[]))
        .container(container("cache", "10.10.0.20", &["redis"]))
        .build()
        .unwrap()
}

/// What the upstream knows: names the main server does not own (all of `example`), and
/// names the main server owns (which must never reach it).
fn upstream_catalog() -> Catalog {
    Catalog::builder()
        .ttl(300)
        .domain("example")
        .service(svc("x", vip("203.0.113.9"), &["203.0.113.10"], vec![]))
        .container(container("ext.example", "203.0.113.7", &[]))
        .container(container("nope.web", "203.0.113.8", &[]))
        .build()
        .unwrap()
}

fn loopback_config(ip: &str, upstreams: Vec<SocketAddr>) -> DnsConfig {
    let mut c = DnsConfig::new(vec![format!("{ip}:0").parse().unwrap()], loopback_networks());
    c.upstreams = Some(upstreams);
    c
}

/// The upstream (on 127.0.0.22) and the main server (on 127.0.0.21) forwarding to it.
fn pair() -> (Running, Running) {
    let upstream = Running::start(
        loopback_config("127.0.0.22", vec![]),
        CatalogHandle::new(upstream_catalog()),
        None,
    );
    let main = Running::start(
        loopback_config("127.0.0.21", vec![upstream.addr]),
        CatalogHandle::new(main_catalog()),
        None,
    );
    (main, upstream)
}

/// One resource record as dig prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rr {
    name: String,
    ttl: u32,
    rtype: String,
    data: String,
}

/// What dig printed, parsed.
#[derive(Debug)]
struct Dig {
    status: String,
    flags: Vec<String>,
    answers: Vec<Rr>,
    additionals: Vec<Rr>,
    raw: String,
}

impl Dig {
    fn data(&self) -> Vec<String> {
        self.answers.iter().map(|r| r.data.clone()).collect()
    }

    fn sorted_data(&self) -> Vec<String> {
        let mut v = self.data();
        v.sort();
        v
    }

    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

fn parse_dig(raw: String) -> Dig {
    let mut status = String::new();
    let mut flags = Vec::new();
    let mut answers = Vec::new();
    let mut additionals = Vec::new();
    let mut section = "";
    for line in raw.lines() {
        if let Some((_, rest)) = line.split_once("status: ") {
            status = rest.split(',').next().unwrap_or_default().to_owned();
        } else if let Some(rest) = line.strip_prefix(";; flags: ") {
            flags = rest
                .split(';')
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect();
        } else if line.starts_with(";; ANSWER SECTION") {
            section = "answer";
        } else if line.starts_with(";; ADDITIONAL SECTION") {
            section = "additional";
        } else if line.starts_with(';') || line.trim().is_empty() {
            if line.starts_with(";; ") && line.ends_with("SECTION:") {
                section = "";
            }
        } else {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.len() >= 5 {
                let rr = Rr {
                    name: words[0].to_owned(),
                    ttl: words[1].parse().unwrap_or(u32::MAX),
                    rtype: words[3].to_owned(),
                    data: words[4..].join(" "),
                };
                match section {
                    "answer" => answers.push(rr),
                    "additional" => additionals.push(rr),
                    _ => {}
                }
            }
        }
    }
    Dig {
        status,
        flags,
        answers,
        additionals,
        raw,
    }
}

fn dig_args(server: SocketAddr, args: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = vec![
        "dig".into(),
        format!("@{}", server.ip()),
        "-p".into(),
        server.port().to_string(),
        "+tries=1".into(),
        "+time=6".into(),
        "+noall".into(),
        "+comments".into(),
        "+answer".into(),
        "+additional".into(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    all
}

/// `dig @server ARGS`, parsed; panics when dig gets no reply.
fn dig(server: SocketAddr, args: &[&str]) -> Dig {
    let all = dig_args(server, args);
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    parse_dig(run(&refs))
}

/// `dig` inside a namespace.
fn dig_in(ns: &Netns, server: SocketAddr, args: &[&str]) -> Dig {
    let all = dig_args(server, args);
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    parse_dig(ns.exec(&refs))
}

#[test]
fn dns_vip_tasks_containers_and_the_configured_ttl() {
    require_root();
    let (main, _up) = pair();
    let a = dig(main.addr, &["web", "A"]);
    assert_eq!(a.status, "NOERROR", "{}", a.raw);
    assert!(a.has_flag("aa"), "{}", a.raw);
    assert_eq!(
        a.answers,
        [Rr {
            name: "web.".into(),
            ttl: TTL,
            rtype: "A".into(),
            data: "10.10.0.100".into()
        }]
    );
    assert_eq!(dig(main.addr, &["WEB.vipd.test.", "A"]).data(), ["10.10.0.100"]);
    let tasks = dig(main.addr, &["tasks.web", "A"]);
    assert_eq!(tasks.sorted_data(), ["10.10.0.5", "10.10.0.6"]);
    assert!(tasks.answers.iter().all(|r| r.ttl == TTL));
    assert_eq!(
        dig(main.addr, &["tasks.db.vipd.test", "A"]).sorted_data(),
        ["10.10.0.7", "10.10.0.8", "10.10.0.9"]
    );
    assert_eq!(dig(main.addr, &["web.1.abc", "A"]).data(), ["10.10.0.5"]);
    assert_eq!(dig(main.addr, &["cache", "A"]).data(), ["10.10.0.20"]);
    assert_eq!(dig(main.addr, &["Redis.vipd.test", "A"]).data(), ["10.10.0.20"]);
}

#[test]
fn dns_dnsrr_answers_all_tasks_in_an_order_that_varies() {
    require_root();
    let (main, _up) = pair();
    let mut orders = HashSet::new();
    for _ in 0..20 {
        let d = dig(main.addr, &["db", "A"]);
        assert_eq!(d.status, "NOERROR");
        assert_eq!(d.sorted_data(), ["10.10.0.7", "10.10.0.8", "10.10.0.9"]);
        assert!(d.answers.iter().all(|r| r.ttl == TTL));
        orders.insert(d.data());
    }
    assert!(
        orders.len() >= 3,
        "20 answers gave only {} orders: {orders:?}",
        orders.len()
    );
}

#[test]
fn dns_srv_one_record_per_task_with_the_addresses_as_additionals() {
    require_root();
    let (main, _up) = pair();
    let d = dig(main.addr, &["_pg._tcp.db", "SRV"]);
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert_eq!(d.answers.len(), 3, "{}", d.raw);
    let mut targets = Vec::new();
    for rr in &d.answers {
        assert_eq!(
            (rr.name.as_str(), rr.ttl, rr.rtype.as_str()),
            ("_pg._tcp.db.", TTL, "SRV")
        );
        let fields: Vec<&str> = rr.data.split_whitespace().collect();
        assert_eq!(fields[..3], ["0", "10", "5432"], "{}", rr.data);
        targets.push(fields[3].to_owned());
    }
    targets.sort();
    assert_eq!(targets, ["10-10-0-7.db.", "10-10-0-8.db.", "10-10-0-9.db."]);
    let mut glue: Vec<(String, String)> = d
        .additionals
        .iter()
        .filter(|r| r.rtype == "A")
        .map(|r| (r.name.clone(), r.data.clone()))
        .collect();
    glue.sort();
    assert_eq!(
        glue,
        [
            ("10-10-0-7.db.".to_owned(), "10.10.0.7".to_owned()),
            ("10-10-0-8.db.".to_owned(), "10.10.0.8".to_owned()),
            ("10-10-0-9.db.".to_owned(), "10.10.0.9".to_owned()),
        ]
    );
    // A target resolves; the UDP port; the domain form keeps targets in the domain.
    assert_eq!(dig(main.addr, &["10-10-0-8.db", "A"]).data(), ["10.10.0.8"]);
    let udp = dig(main.addr, &["_metrics._udp.db", "SRV"]);
    assert!(
        udp.data().iter().all(|s| s.starts_with("0 10 9100 ")),
        "{}",
        udp.raw
    );
    let web = dig(main.addr, &["_http._tcp.web.vipd.test", "SRV"]);
    assert_eq!(
        web.sorted_data(),
        [
            "0 10 80 10-10-0-5.web.vipd.test.",
            "0 10 80 10-10-0-6.web.vipd.test."
        ]
    );
}

#[test]
fn dns_ptr_for_vips_tasks_and_containers() {
    require_root();
    let (main, _up) = pair();
    let ptr = |ip| {
        let d = dig(main.addr, &["-x", ip]);
        assert_eq!(d.status, "NOERROR", "{}", d.raw);
        assert!(d.answers.iter().all(|r| r.rtype == "PTR" && r.ttl == TTL));
        d.data()
    };
    assert_eq!(ptr("10.10.0.100"), ["web.vipd.test."]);
    assert_eq!(ptr("10.10.0.5"), ["web.1.abc.vipd.test."]);
    assert_eq!(ptr("10.10.0.8"), ["10-10-0-8.db.vipd.test."]);
    assert_eq!(ptr("10.10.0.20"), ["cache.vipd.test."]);
}

#[test]
fn dns_owned_names_get_nxdomain_or_nodata_and_never_reach_the_upstream() {
    require_root();
    let (main, up) = pair();
    // The upstream knows these names; the main server owns them and must not ask.
    assert_eq!(dig(up.addr, &["tasks.x", "A"]).data(), ["203.0.113.10"]);
    assert_eq!(dig(up.addr, &["nope.web", "A"]).data(), ["203.0.113.8"]);
    for name in ["tasks.x", "nope.web", "tasks.nothing", "unknown.vipd.test"] {
        let d = dig(main.addr, &[name, "A"]);
        assert_eq!(d.status, "NXDOMAIN", "{name}: {}", d.raw);
        assert!(d.answers.is_empty());
        assert!(d.has_flag("aa"), "{name}: {}", d.raw);
    }
    for (name, qtype) in [
        ("web", "AAAA"),
        ("db", "AAAA"),
        ("cache", "AAAA"),
        ("tasks.web", "AAAA"),
        ("web", "MX"),
    ] {
        let d = dig(main.addr, &[name, qtype]);
        assert_eq!(d.status, "NOERROR", "{name} {qtype}: {}", d.raw);
        assert!(d.answers.is_empty(), "{name} {qtype}: {}", d.raw);
    }
}

#[test]
fn dns_tcp_answers_like_udp() {
    require_root();
    let (main, _up) = pair();
    assert_eq!(dig(main.addr, &["+tcp", "web", "A"]).data(), ["10.10.0.100"]);
    assert_eq!(
        dig(main.addr, &["+tcp", "db", "A"]).sorted_data(),
        ["10.10.0.7", "10.10.0.8", "10.10.0.9"]
    );
    let srv = dig(main.addr, &["+tcp", "_pg._tcp.db", "SRV"]);
    assert_eq!((srv.answers.len(), srv.additionals.len()), (3, 3), "{}", srv.raw);
    assert_eq!(dig(main.addr, &["+tcp", "tasks.x", "A"]).status, "NXDOMAIN");
    assert_eq!(
        dig(main.addr, &["+tcp", "-x", "10.10.0.100"]).data(),
        ["web.vipd.test."]
    );
    // Relayed too.
    assert_eq!(
        dig(main.addr, &["+tcp", "ext.example", "A"]).data(),
        ["203.0.113.7"]
    );
}

/// What must be equal between two answers to one question: status, header flags and
/// counts, the EDNS line, the records (sorted: DNSRR and SRV orders vary).
fn comparable(d: &Dig) -> (String, Vec<String>, Vec<String>, Vec<String>) {
    let header = d
        .raw
        .lines()
        .filter(|l| l.starts_with(";; flags:") || l.starts_with("; EDNS:"))
        .map(str::to_owned)
        .collect();
    let sorted = |rrs: &[Rr]| {
        let mut v: Vec<String> = rrs.iter().map(|r| format!("{r:?}")).collect();
        v.sort();
        v
    };
    (
        d.status.clone(),
        header,
        sorted(&d.answers),
        sorted(&d.additionals),
    )
}

/// UDP queries for owned names take vipd's fast path; TCP ones always hickory-server's:
/// the same answers, in any case, with and without EDNS, whatever the header bits.
#[test]
fn dns_udp_fast_path_answers_like_tcp() {
    require_root();
    let (main, _up) = pair();
    let questions: [&[&str]; 17] = [
        &["web", "A"],
        &["WeB.VipD.TeSt", "A"],
        &["db", "A"],
        &["TASKS.web", "A"],
        &["tasks.db.vipd.test", "A"],
        &["10-10-0-8.db", "A"],
        &["_pg._tcp.db", "SRV"],
        &["_METRICS._udp.db.vipd.test", "SRV"],
        &["web.1.abc", "A"],
        &["Redis", "A"],
        &["-x", "10.10.0.100"],
        &["-x", "10.10.0.7"],
        &["-x", "10.10.0.20"],
        &["web", "AAAA"],
        &["cache", "MX"],
        &["tasks.nothing", "A"],
        &["ext.example", "A"],
    ];
    let options: [&[&str]; 4] = [
        &[],
        &["+noedns"],
        &["+bufsize=1232", "+dnssec"],
        &["+cdflag", "+norecurse", "+noadflag", "+nocookie"],
    ];
    for question in questions {
        for opts in options {
            let udp_args: Vec<&str> = opts.iter().chain(question).copied().collect();
            let tcp_args: Vec<&str> = ["+tcp"].iter().chain(&udp_args).copied().collect();
            let udp = dig(main.addr, &udp_args);
            let tcp = dig(main.addr, &tcp_args);
            assert_eq!(
                comparable(&udp),
                comparable(&tcp),
                "{udp_args:?}\n{}\n{}",
                udp.raw,
                tcp.raw
            );
            let edns = !opts.contains(&"+noedns");
            assert_eq!(comparable(&udp).1.len(), 1 + usize::from(edns), "{}", udp.raw);
            if question[0] == "WeB.VipD.TeSt" {
                assert_eq!(udp.answers[0].name, "WeB.VipD.TeSt.", "{}", udp.raw);
            }
        }
    }
}

#[test]
fn dns_foreign_names_are_relayed_to_the_upstream() {
    require_root();
    let (main, _up) = pair();
    let d = dig(main.addr, &["ext.example", "A"]);
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert_eq!(d.data(), ["203.0.113.7"]);
    // The upstream's TTL, not ours: the record is relayed as it came.
    assert_eq!(d.answers[0].ttl, 300);
    // The upstream's NXDOMAIN is relayed as well.
    assert_eq!(dig(main.addr, &["missing.example", "A"]).status, "NXDOMAIN");
    assert_eq!(dig(main.addr, &["-x", "203.0.113.7"]).data(), ["ext.example."]);
}

/// RFC 6891 6.1.3: an EDNS version above 0 gets BADVERS with an OPT of version 0, over
/// UDP (the fast path for an owned name, the handler for the others) and TCP, and a
/// foreign name is not relayed; EDNS version 0 is answered as ever.
#[test]
fn dns_a_later_edns_version_gets_badvers() {
    require_root();
    let (main, _up) = pair();
    for name in ["web", "tasks.db", "nope.web", "ext.example"] {
        for transport in ["+notcp", "+tcp"] {
            let d = dig(
                main.addr,
                &["+edns=1", "+noednsnegotiation", transport, name, "A"],
            );
            let what = format!("{name} {transport}: {}", d.raw);
            assert_eq!(d.status, "BADVERS", "{what}");
            assert!(d.raw.contains("EDNS: version: 0"), "{what}");
            assert!(d.answers.is_empty(), "{what}");
        }
        let d = dig(main.addr, &["+edns=0", name, "A"]);
        assert!(d.raw.contains("EDNS: version: 0"), "{name}: {}", d.raw);
        let want = if name == "nope.web" { "NXDOMAIN" } else { "NOERROR" };
        assert_eq!(d.status, want, "{name}: {}", d.raw);
    }
}

#[test]
fn dns_a_silent_upstream_gives_servfail_within_the_timeout() {
    require_root();
    // Bound and never read: queries to it go unanswered.
    let silent = std::net::UdpSocket::bind("127.0.0.24:0").unwrap();
    let main = Running::start(
        loopback_config("127.0.0.23", vec![silent.local_addr().unwrap()]),
        CatalogHandle::new(main_catalog()),
        None,
    );
    let start = Instant::now();
    let d = dig(main.addr, &["ext.example", "A"]);
    let took = start.elapsed();
    assert_eq!(d.status, "SERVFAIL", "{}", d.raw);
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(3500),
        "SERVFAIL after {took:?}, expected the 2 s upstream timeout"
    );
    // Owned names do not wait for anything.
    let start = Instant::now();
    assert_eq!(dig(main.addr, &["web", "A"]).data(), ["10.10.0.100"]);
    assert!(start.elapsed() < Duration::from_secs(1));
}

#[test]
fn dns_catalog_updates_are_seen_by_the_next_query() {
    require_root();
    let catalog = CatalogHandle::new(main_catalog());
    let main = Running::start(loopback_config("127.0.0.25", vec![]), catalog.clone(), None);
    assert_eq!(dig(main.addr, &["web", "A"]).data(), ["10.10.0.100"]);
    let moved = Catalog::builder()
        .ttl(1)
        .service(svc("web", vip("10.10.0.200"), &["10.10.0.50"], vec![]))
        .build()
        .unwrap();
    catalog.store(moved);
    let d = dig(main.addr, &["web", "A"]);
    assert_eq!(d.data(), ["10.10.0.200"]);
    assert_eq!(d.answers[0].ttl, 1);
    assert_eq!(
        dig(main.addr, &["db", "A"]).status,
        "SERVFAIL",
        "db is gone: forwarded, no upstream"
    );
}

#[test]
fn dns_clients_outside_the_allowed_networks_are_refused() {
    require_root();
    let server_ns = Netns::new("vdnss");
    let client_ns = Netns::new("vdnsc");
    veth(&server_ns, "dns0", Some("192.0.2.1/24"), &client_ns, "eth0");
    client_ns.exec(&["ip", "addr", "add", "192.0.2.2/24", "dev", "eth0"]);
    client_ns.exec(&["ip", "addr", "add", "192.0.2.3/24", "dev", "eth0"]);

    let mut allowed = loopback_networks();
    allowed.push("192.0.2.2/32".parse().unwrap());
    let mut config = DnsConfig::new(vec!["192.0.2.1:53".parse().unwrap()], allowed);
    config.upstreams = Some(vec![]);
    let server = Running::start(
        config,
        CatalogHandle::new(main_catalog()),
        Some(NetnsPath::from_arg(&server_ns.name)),
    );

    let ok = dig_in(&client_ns, server.addr, &["-b", "192.0.2.2", "web", "A"]);
    assert_eq!(ok.data(), ["10.10.0.100"], "{}", ok.raw);
    for transport in ["+notcp", "+tcp"] {
        for name in ["web", "example.com"] {
            let d = dig_in(
                &client_ns,
                server.addr,
                &["-b", "192.0.2.3", transport, name, "A"],
            );
            assert_eq!(d.status, "REFUSED", "{transport} {name}: {}", d.raw);
            assert!(d.answers.is_empty());
        }
    }
}
