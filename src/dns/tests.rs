//! The assembled server's UDP side: the fast path against the slow one (the handler
//! through [`udp::slow_path`]), and the loop on a socket.

use std::sync::Arc;
use std::time::Duration;

use hickory_server::proto::op::{Edns, Message, Query as WireQuery, ResponseCode};
use hickory_server::proto::rr::{Name, Record as WireRecord, RecordType};
use tokio::net::UdpSocket;

use super::acl::{loopback_networks, Acl};
use super::catalog::Catalog;
use super::fast::{Table, RCODE_BADVERS};
use super::handle::CatalogHandle;
use super::server::{DnsConfig, Handler};
use super::testing::{fast, query, query_edns, test_catalog};
use super::udp::{self, serve_udp};
use crate::metrics::Metrics;

/// The slow path's response, through a real socket.
struct Slow {
    handler: Arc<Handler>,
    server: Arc<UdpSocket>,
    client: UdpSocket,
}

impl Slow {
    async fn new(catalog: CatalogHandle) -> Slow {
        let config = DnsConfig::new(vec![], loopback_networks());
        Slow {
            handler: Arc::new(Handler::new(&config, catalog, vec![])),
            server: Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()),
            client: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    async fn ask(&self, packet: &[u8]) -> Message {
        let src = self.client.local_addr().unwrap();
        udp::slow_path(
            self.handler.clone(),
            self.server.clone(),
            packet.to_vec(),
            src,
            Metrics::disabled(),
        )
        .await;
        let mut buf = vec![0u8; 65_536];
        let n = tokio::time::timeout(Duration::from_secs(5), self.client.recv(&mut buf))
            .await
            .expect("a response")
            .unwrap();
        Message::from_vec(&buf[..n]).unwrap()
    }
}

/// Records as text (owner names in the case sent), sorted: the order is random.
fn sorted(records: &[WireRecord]) -> Vec<String> {
    let mut v: Vec<String> = records.iter().map(|r| r.to_string()).collect();
    v.sort();
    v
}

fn assert_same(fast: &Message, slow: &Message, what: &str) {
    assert_eq!(fast.metadata, slow.metadata, "{what}");
    assert_eq!(fast.queries, slow.queries, "{what}");
    let names = |m: &Message| m.queries.iter().map(|q| q.name().to_string()).collect::<Vec<_>>();
    assert_eq!(names(fast), names(slow), "{what}");
    assert_eq!(sorted(&fast.answers), sorted(&slow.answers), "{what}");
    assert_eq!(sorted(&fast.authorities), sorted(&slow.authorities), "{what}");
    assert_eq!(sorted(&fast.additionals), sorted(&slow.additionals), "{what}");
    assert_eq!(fast.edns, slow.edns, "{what}");
}

/// Every kind of owned name, in every case, with and without EDNS: the fast path
/// answers, with what the slow path answers.
#[tokio::test]
async fn fast_answers_equal_the_slow_paths() {
    let handle = CatalogHandle::new(test_catalog());
    let table = Table::build(&test_catalog());
    let slow = Slow::new(handle).await;
    let cases = [
        ("web.", RecordType::A),
        ("WeB.ViPd.LoCaL.", RecordType::A),
        ("db.", RecordType::A),
        ("db.vipd.local.", RecordType::A),
        ("tasks.web.", RecordType::A),
        ("TASKS.db.vipd.local.", RecordType::A),
        ("10-0-0-6.web.", RecordType::A),
        ("10-0-0-8.DB.vipd.local.", RecordType::A),
        ("_http._tcp.web.", RecordType::SRV),
        ("_PG._tcp.db.vipd.local.", RecordType::SRV),
        ("_stats._udp.db.", RecordType::SRV),
        ("web.1.abc.", RecordType::A),
        ("frontend.vipd.local.", RecordType::A),
        ("Shared.", RecordType::A),
        ("100.0.0.10.in-addr.arpa.", RecordType::PTR),
        ("5.0.0.10.IN-ADDR.arpa.", RecordType::PTR),
        ("9.0.0.10.in-addr.arpa.", RecordType::PTR),
        ("21.0.0.10.in-addr.arpa.", RecordType::PTR),
        // NODATA: other types, names without addresses.
        ("web.", RecordType::AAAA),
        ("cache.vipd.local.", RecordType::AAAA),
        ("web.", RecordType::SRV),
        ("web.", RecordType::PTR),
        ("_http._tcp.web.", RecordType::A),
        ("_tcp.db.", RecordType::SRV),
        ("idle.", RecordType::A),
        ("tasks.idle.", RecordType::A),
        ("_http._tcp.idle.", RecordType::SRV),
        ("vipd.local.", RecordType::A),
        ("100.0.0.10.in-addr.arpa.", RecordType::A),
        ("big.", RecordType::A),
    ];
    for (name, qtype) in cases {
        for payload in [None, Some(1232), Some(100), Some(4096)] {
            let what = format!("{name} {qtype} {payload:?}");
            let packet = query(0x1234, name, qtype, payload);
            let slow = slow.ask(&packet).await;
            if name == "big." && payload.is_none_or(|p| p < 1024) {
                // 60 addresses: truncated by the slow path.
                assert!(fast(&table, &packet).is_none(), "{what}");
                assert!(slow.metadata.truncation, "{what}");
                continue;
            }
            let fast = fast(&table, &packet).unwrap_or_else(|| panic!("no fast answer: {what}"));
            assert_same(&fast, &slow, &what);
            if qtype == RecordType::AAAA || name.starts_with("idle") {
                assert!(fast.answers.is_empty(), "{what}");
            }
        }
    }
}

/// The header bits the slow path copies (RD, CD) or drops (AD), the DO bit and EDNS
/// options, the ID: all as the slow path.
#[tokio::test]
async fn header_bits_and_edns_options_as_the_slow_path() {
    let table = Table::build(&test_catalog());
    let slow = Slow::new(CatalogHandle::new(test_catalog())).await;
    for (rd, ad, cd, dnssec_ok) in [
        (false, false, false, false),
        (true, true, true, true),
        (false, true, false, true),
        (true, false, true, false),
    ] {
        let mut m = Message::query();
        m.metadata.id = 0xbeef;
        m.metadata.recursion_desired = rd;
        m.metadata.authentic_data = ad;
        m.metadata.checking_disabled = cd;
        m.add_query(WireQuery::query(
            Name::from_ascii("Tasks.Web.").unwrap(),
            RecordType::A,
        ));
        let mut e = Edns::new();
        e.set_max_payload(1400);
        e.set_dnssec_ok(dnssec_ok);
        m.set_edns(e);
        let mut packet = m.to_vec().unwrap();
        // A cookie option, as dig sends: rewrite the OPT record's data.
        let opt_data_len = packet.len() - 2;
        packet[opt_data_len..].copy_from_slice(&12u16.to_be_bytes());
        packet.extend_from_slice(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        let what = format!("rd {rd} ad {ad} cd {cd} do {dnssec_ok}");
        let fast = fast(&table, &packet).unwrap_or_else(|| panic!("no fast answer: {what}"));
        assert_same(&fast, &slow.ask(&packet).await, &what);
        assert_eq!(fast.metadata.id, 0xbeef);
        assert_eq!(fast.answers[0].name.to_string(), "Tasks.Web.");
    }
}

/// Each path counts the queries it answers in the catalog's metrics.
#[tokio::test]
async fn the_udp_loop_counts_what_each_path_answers() {
    let metrics = Metrics::new();
    let catalog = CatalogHandle::new(test_catalog()).with_metrics(metrics.clone());
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let config = DnsConfig::new(vec![], loopback_networks());
    let handler = Arc::new(Handler::new(&config, catalog.clone(), vec![]));
    let acl = Acl::new(loopback_networks());
    let server = tokio::spawn(serve_udp(socket, catalog, acl, handler));
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut bad = query(4, "web.", RecordType::A, None);
    bad[5] = 2;
    for packet in [
        query(1, "web.", RecordType::A, None),
        query(2, "_http._tcp.web.", RecordType::SRV, Some(1232)),
        query(3, "example.com.", RecordType::A, None),
        bad,
    ] {
        client.send_to(&packet, addr).await.unwrap();
        let mut buf = vec![0u8; 4096];
        tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
            .await
            .expect("a response")
            .unwrap();
    }
    let want = [
        "vipd_dns_queries_total{path=\"fast\",qtype=\"A\",rcode=\"NOERROR\"} 1",
        "vipd_dns_queries_total{path=\"fast\",qtype=\"SRV\",rcode=\"NOERROR\"} 1",
        "vipd_dns_queries_total{path=\"slow\",qtype=\"A\",rcode=\"SERVFAIL\"} 1",
        "vipd_dns_queries_total{path=\"slow\",qtype=\"other\",rcode=\"FORMERR\"} 1",
        "vipd_dns_answer_duration_seconds_count{path=\"fast\"} 2",
        "vipd_dns_answer_duration_seconds_count{path=\"slow\"} 2",
    ];
    let mut text = String::new();
    for _ in 0..50 {
        text = metrics.render().await.unwrap();
        if want.iter().all(|w| text.lines().any(|l| l == *w)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for w in want {
        assert!(text.lines().any(|l| l == w), "no {w:?} in:\n{text}");
    }
    server.abort();
}

/// The whole loop on a socket: owned names, a catalog update, a foreign name (no
/// upstream: SERVFAIL), an undecodable query (FORMERR), a source outside the ACL.
#[tokio::test]
async fn the_udp_loop_answers_fast_and_slow() {
    let catalog = CatalogHandle::new(Catalog::empty());
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let config = DnsConfig::new(vec![], loopback_networks());
    let handler = Arc::new(Handler::new(&config, catalog.clone(), vec![]));
    let acl = Acl::new(loopback_networks());
    let server = tokio::spawn(serve_udp(socket, catalog.clone(), acl, handler));
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let ask = |packet: Vec<u8>| {
        let client = &client;
        async move {
            client.send_to(&packet, addr).await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
                .await
                .expect("a response")
                .unwrap();
            Message::from_vec(&buf[..n]).unwrap()
        }
    };
    let m = ask(query(1, "tasks.web.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    catalog.store(test_catalog());
    let m = ask(query(2, "WEB.", RecordType::A, None)).await;
    assert_eq!(
        (m.metadata.id, m.answers[0].data.to_string()),
        (2, "10.0.0.100".into())
    );
    let m = ask(query(3, "example.com.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    let mut bad = query(4, "web.", RecordType::A, None);
    bad[5] = 2;
    let m = ask(bad).await;
    assert_eq!(
        (m.metadata.id, m.metadata.response_code),
        (4, ResponseCode::FormErr)
    );
    server.abort();

    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let config = DnsConfig::new(vec![], vec![]);
    let handler = Arc::new(Handler::new(&config, catalog.clone(), vec![]));
    let server = tokio::spawn(serve_udp(socket, catalog.clone(), Acl::default(), handler));
    client
        .send_to(&query(5, "web.", RecordType::A, None), addr)
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = client.recv(&mut buf).await.unwrap();
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(
        (m.metadata.id, m.metadata.response_code),
        (5, ResponseCode::Refused)
    );
    server.abort();
}

/// BADVERS from both paths, the same: the fast path for the queries it parses, the
/// handler for the others (a name the fast path does not parse, a class it leaves).
#[tokio::test]
async fn badvers_from_the_fast_path_equals_the_slow_paths() {
    let table = Table::build(&test_catalog());
    let slow = Slow::new(CatalogHandle::new(test_catalog())).await;
    for (name, qtype) in [
        ("web.", RecordType::A),
        ("example.com.", RecordType::A),
        ("nope.web.", RecordType::SRV),
    ] {
        for payload in [100, 1232] {
            let what = format!("{name} {qtype} {payload}");
            let packet = query_edns(7, name, qtype, Some((payload, 1)));
            let fast = fast(&table, &packet).unwrap_or_else(|| panic!("no fast answer: {what}"));
            let slow = slow.ask(&packet).await;
            assert_same(&fast, &slow, &what);
            // 16 decodes as BADSIG, its TSIG twin: compare the number.
            assert_eq!(u16::from(slow.metadata.response_code), RCODE_BADVERS, "{what}");
        }
    }
    // Left to the slow path, still BADVERS, never forwarded.
    let mut chaos = query_edns(8, "web.", RecordType::A, Some((1232, 2)));
    chaos[20] = 3;
    let mut odd = query_edns(9, "web.", RecordType::A, Some((1232, 2)));
    odd[13] = b'*';
    for packet in [chaos, odd] {
        assert!(fast(&table, &packet).is_none());
        let m = slow.ask(&packet).await;
        assert_eq!(u16::from(m.metadata.response_code), RCODE_BADVERS);
        assert_eq!(m.edns.map(|e| e.version()), Some(0));
    }
}
