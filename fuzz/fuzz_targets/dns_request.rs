//! Arbitrary bytes as a DNS query over UDP, through vipd's request handling:
//!
//! - the UDP fast path, `vipd::dns::fast::respond`, over the table of a small catalog
//!   (a VIP service, DNSRR services, one with no tasks and one with many, SRV ports,
//!   containers with shared aliases, a search domain);
//! - the slow path as `src/dns/udp.rs` and `src/dns/server.rs` run it: the datagram
//!   decoded by hickory (`Request::from_bytes`; FORMERR when it does not decode), checked
//!   (a question it can repeat, EDNS version 0 or BADVERS, a query, opcode QUERY, one
//!   question), answered by
//!   `vipd::dns::catalog::answer`, and the response built with hickory's
//!   `MessageResponseBuilder` and encoded within the client's payload size, as
//!   `src/dns/udp.rs`'s `UdpResponse` does. Names that are not vipd's would be forwarded
//!   upstream; there is no upstream here, so they stop at the answer.
//!
//! Nothing may panic. Asserted on top:
//! - a fast response decodes, with the query's ID;
//! - a query the fast path answers is one the slow path decodes and answers, with the
//!   same header, question, records (in any order) and EDNS;
//! - every response the slow path encodes decodes, with the query's ID.

#![no_main]

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, Message, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::{rdata, Name, RData, Record as WireRecord};
use hickory_server::proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};
use hickory_server::server::Request;
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder, Queries};
use libfuzzer_sys::fuzz_target;
use vipd::core::labels::NamedPort;
use vipd::core::model::{self, EndpointMode};
use vipd::core::model::{BackendAddr, ServiceName, Vip};
use vipd::dns::catalog::{
    self, Answer, Catalog, ContainerRecord, Query, QueryType, RecordData, ServiceRecord,
};
use vipd::dns::fast::{respond, Shuffler, Table};
use vipd::dns::server::question_is_echoable;

/// The UDP response size without EDNS, and the least one with it.
const MIN_PAYLOAD: u16 = 512;

struct Fixture {
    catalog: Catalog,
    table: Table,
}

fn tasks(ips: &[&str]) -> Vec<BackendAddr> {
    ips.iter().map(|s| BackendAddr::new(s.parse().unwrap())).collect()
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let catalog = Catalog::builder()
            .ttl(9)
            .domain("vipd.local")
            .service(ServiceRecord {
                name: ServiceName::new("web").unwrap(),
                mode: EndpointMode::Vip,
                vip: Some(Vip::new("10.0.0.100".parse().unwrap())),
                tasks: tasks(&["10.0.0.5", "10.0.0.6"]),
                ports: vec![NamedPort::new("http", model::Protocol::Tcp, 80)],
            })
            .service(ServiceRecord {
                name: ServiceName::new("db").unwrap(),
                mode: EndpointMode::Dnsrr,
                vip: None,
                tasks: tasks(&["10.0.0.7", "10.0.0.8", "10.0.0.9", "fd00::9"]),
                ports: vec![
                    NamedPort::new("pg", model::Protocol::Tcp, 5432),
                    NamedPort::new("Stats", model::Protocol::Udp, 9125),
                ],
            })
            .service(ServiceRecord {
                name: ServiceName::new("idle").unwrap(),
                mode: EndpointMode::Dnsrr,
                vip: None,
                tasks: Vec::new(),
                ports: vec![NamedPort::new("http", model::Protocol::Tcp, 80)],
            })
            .service(ServiceRecord {
                name: ServiceName::new("big").unwrap(),
                mode: EndpointMode::Dnsrr,
                vip: None,
                tasks: (1..=60).map(|i| BackendAddr::new([10, 1, 0, i].into())).collect(),
                ports: vec![NamedPort::new("http", model::Protocol::Tcp, 80)],
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
            .container(ContainerRecord {
                name: "v6only".into(),
                addr: "fd00::21".parse().unwrap(),
                aliases: vec![],
            })
            .build()
            .expect("the fuzz catalog builds");
        let table = Table::build(&catalog);
        assert!(!table.is_empty());
        Fixture { catalog, table }
    })
}

/// A catalog record on the wire, as `server.rs`'s `to_wire`.
fn to_wire(record: &catalog::Record) -> Option<WireRecord> {
    let name = Name::from_ascii(&record.name).ok()?;
    let data = match &record.data {
        RecordData::A(ip) => RData::A(rdata::A(*ip)),
        RecordData::Srv {
            priority,
            weight,
            port,
            target,
        } => RData::SRV(rdata::SRV::new(
            *priority,
            *weight,
            *port,
            Name::from_ascii(target).ok()?,
        )),
        RecordData::Ptr(target) => RData::PTR(rdata::PTR(Name::from_ascii(target).ok()?)),
    };
    Some(WireRecord::from_rdata(name, record.ttl, data))
}

/// A response encoded as `src/dns/udp.rs`'s `UdpResponse` sends it: within the client's
/// payload size, a SERVFAIL header when that fails.
fn encode_udp<'a, A, N, S, D>(response: MessageResponse<'_, 'a, A, N, S, D>) -> Vec<u8>
where
    A: Iterator<Item = &'a WireRecord> + Send + 'a,
    N: Iterator<Item = &'a WireRecord> + Send + 'a,
    S: Iterator<Item = &'a WireRecord> + Send + 'a,
    D: Iterator<Item = &'a WireRecord> + Send + 'a,
{
    let id = response.metadata().id;
    let max = response.edns().map_or(MIN_PAYLOAD, |e| e.max_payload());
    let mut bytes = Vec::with_capacity(usize::from(MIN_PAYLOAD));
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_max_size(max);
    if response.destructive_emit(&mut encoder).is_err() {
        bytes.clear();
        let mut metadata = Metadata::new(id, MessageType::Response, OpCode::Query);
        metadata.response_code = ResponseCode::ServFail;
        let header = Header {
            metadata,
            counts: HeaderCounts::default(),
        };
        header
            .emit(&mut BinEncoder::new(&mut bytes))
            .expect("a header encodes");
    }
    bytes
}

/// The slow path's response to `packet`, encoded as the UDP loop sends it; None when it
/// sends none (shorter than a header, or a response) or would forward the query upstream.
fn slow(catalog: &Catalog, packet: &[u8], seed: u64) -> Option<Vec<u8>> {
    // udp.rs's slow_path: what hickory does not decode gets FORMERR.
    let header = Header::read(&mut BinDecoder::new(packet)).ok()?;
    let src: SocketAddr = (IpAddr::from([127, 0, 0, 1]), 40_000).into();
    let request = match Request::from_bytes(packet.to_vec(), src, Protocol::Udp) {
        Ok(request) => request,
        Err(_) => {
            let queries = Queries::read(&mut BinDecoder::new(&[]), 0).expect("no questions decode");
            let response = MessageResponseBuilder::new(&queries, None)
                .error_msg(&header.metadata, ResponseCode::FormErr);
            return Some(encode_udp(response));
        }
    };
    if request.metadata.message_type == MessageType::Response {
        return None;
    }
    let edns = request.edns.as_ref().map(|req| {
        let mut edns = Edns::default();
        edns.set_max_payload(req.max_payload().max(MIN_PAYLOAD));
        edns
    });
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.recursion_available = true;
    // server.rs's Handler::respond: a question that cannot be repeated gets FORMERR without it.
    if !question_is_echoable(request.queries.as_bytes()) {
        let no_questions = Queries::read(&mut BinDecoder::new(&[]), 0).expect("no questions decode");
        let mut builder = MessageResponseBuilder::new(&no_questions, None);
        if let Some(edns) = &edns {
            builder.edns(edns);
        }
        metadata.response_code = ResponseCode::FormErr;
        return Some(encode_udp(builder.build_no_records(metadata)));
    }
    // Then what to answer: BADVERS to a later EDNS version, whatever the question.
    let (code, authoritative, answers, additionals) = if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
        (ResponseCode::BADVERS, false, Vec::new(), Vec::new())
    } else if request.metadata.message_type != MessageType::Query
        || request.metadata.op_code != OpCode::Query
    {
        (ResponseCode::NotImp, false, Vec::new(), Vec::new())
    } else if let [query] = request.queries.queries() {
        let name = query.original().name().to_string();
        let question = Query {
            name: &name,
            qtype: QueryType::from(u16::from(query.query_type())),
            qclass: u16::from(query.query_class()),
        };
        match catalog::answer(catalog, &question, seed) {
            Answer::Records { answers, additionals } => {
                let convert =
                    |records: &[catalog::Record]| records.iter().map(to_wire).collect::<Option<Vec<_>>>();
                match (convert(&answers), convert(&additionals)) {
                    (Some(answers), Some(additionals)) => (ResponseCode::NoError, true, answers, additionals),
                    _ => (ResponseCode::ServFail, false, Vec::new(), Vec::new()),
                }
            }
            Answer::NxDomain => (ResponseCode::NXDomain, true, Vec::new(), Vec::new()),
            Answer::NoData => (ResponseCode::NoError, true, Vec::new(), Vec::new()),
            Answer::NotOurs => return None,
        }
    } else {
        (ResponseCode::FormErr, false, Vec::new(), Vec::new())
    };

    // server.rs's send_records / send_code: the response, with EDNS when the query had it.
    let mut builder = MessageResponseBuilder::from_message_request(&request);
    if let Some(edns) = &edns {
        builder.edns(edns);
    }
    metadata.authoritative = authoritative;
    metadata.response_code = code;
    Some(encode_udp(builder.build(
        metadata,
        answers.iter(),
        [],
        [],
        additionals.iter(),
    )))
}

/// Records as text, sorted: the order is random.
fn sorted(records: &[WireRecord]) -> Vec<String> {
    let mut v: Vec<String> = records.iter().map(|r| r.to_string()).collect();
    v.sort();
    v
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    // The shuffles depend on the input only: a crash reproduces.
    let seed = data.len() as u64;
    let mut shuffler = Shuffler::new(seed);
    let mut out = Vec::new();
    let fast = respond(&f.table, data, &mut out, &mut shuffler).is_some();
    let slow = slow(&f.catalog, data, seed);

    let query_id = data.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    if let Some(bytes) = &slow {
        let m = Message::from_vec(bytes)
            .unwrap_or_else(|e| panic!("the slow path's response does not decode: {e}: {bytes:02x?}"));
        assert_eq!(
            Some(m.metadata.id),
            query_id,
            "the slow path's response has another ID"
        );
    }
    if !fast {
        return;
    }
    let fast = Message::from_vec(&out)
        .unwrap_or_else(|e| panic!("the fast response does not decode: {e}: {out:02x?}"));
    assert_eq!(
        Some(fast.metadata.id),
        query_id,
        "the fast response has another ID"
    );
    let slow = slow.expect("the fast path answered what the slow path does not answer itself");
    let slow = Message::from_vec(&slow).expect("decoded above");
    assert_eq!(fast.metadata, slow.metadata, "fast and slow headers differ");
    assert_eq!(fast.queries, slow.queries, "fast and slow questions differ");
    let names = |m: &Message| m.queries.iter().map(|q| q.name().to_string()).collect::<Vec<_>>();
    assert_eq!(names(&fast), names(&slow), "fast and slow question names differ");
    assert_eq!(
        sorted(&fast.answers),
        sorted(&slow.answers),
        "fast and slow answers differ"
    );
    assert_eq!(
        sorted(&fast.authorities),
        sorted(&slow.authorities),
        "fast and slow authorities differ"
    );
    assert_eq!(
        sorted(&fast.additionals),
        sorted(&slow.additionals),
        "fast and slow additionals differ"
    );
    assert_eq!(fast.edns, slow.edns, "fast and slow EDNS differ");
});
