//! The UDP fast path: the common query for a name vipd owns, answered from pre-encoded
//! records in the loop that receives it, without decoding it into a message, a task or a
//! channel; every other datagram goes to the [`RequestHandler`] as hickory-server would
//! pass it.
//!
//! A [`Table`] is built once per catalog snapshot (when it is stored): for every name the
//! catalog answers (services, `tasks.<svc>`, task hosts, SRV names, containers, aliases,
//! PTR names, each also under the search domain), and for the types A, AAAA, SRV and PTR,
//! what [`catalog::answer`] says, with its records already in wire format. Only records and
//! NODATA are kept: NXDOMAIN, forwarded names and everything else take the slow path.
//!
//! [`serve_udp`] owns a UDP socket. A datagram takes the fast path when it comes from an
//! allowed source and is one standard query (QR=0, opcode QUERY, no TC, RCODE 0), one
//! question of class IN whose name (labels of letters, digits, `-` and `_`, any case, no
//! compression) and type are in the table, no answer or authority records, and at most an
//! EDNS(0) OPT record without options the decoder could reject (NSID, client subnet). The
//! response is what the slow path sends: the ID, RD and CD bits and question copied, QR, AA
//! and RA set, the answer records (owner: a pointer to the question, so the name as asked),
//! the SRV targets' addresses as additionals, and an OPT advertising the client's payload
//! size (512 at least) when the query had one. Several records are shuffled per answer, as
//! the catalog shuffles every answer of several records (DNSRR services, `tasks.<svc>`,
//! shared aliases, SRV with their additionals in the same order). When the response could
//! exceed 512 bytes (the EDNS payload size) even uncompressed, the slow path answers, as it
//! is the one that truncates.
//!
//! The slow path mirrors hickory-server's UDP loop: sources it cannot answer are dropped,
//! datagrams shorter than a header are dropped, ones that do not decode get FORMERR,
//! responses are dropped, and each query runs in a task of its own, its response encoded
//! within the size the client accepts (SERVFAIL when that fails).

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::net::NetError;
use hickory_server::proto::op::{Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::Record as WireRecord;
use hickory_server::proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder, Queries};
use tokio::net::UdpSocket;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::catalog::{self, Answer, Catalog, EndpointMode, Query, QueryType, RecordData, CLASS_IN};
use super::server::{Acl, CatalogHandle};
use crate::metrics::{DnsPath, Metrics};

const TYPE_A: u16 = 1;
const TYPE_PTR: u16 = 12;
const TYPE_AAAA: u16 = 28;
const TYPE_SRV: u16 = 33;
const TYPE_OPT: u16 = 41;
/// The query types the table holds.
const FAST_TYPES: [u16; 4] = [TYPE_A, TYPE_AAAA, TYPE_SRV, TYPE_PTR];
/// EDNS options the decoder parses and may reject: NSID, client subnet.
const CHECKED_OPTIONS: [u16; 2] = [3, 8];
/// A name on the wire: 255 bytes at most.
const MAX_NAME: usize = 255;
/// The largest datagram read, as hickory-server reads them.
const RECEIVE_BUFFER: usize = 4096;
/// The UDP response size without EDNS, and the least one with it.
const MIN_PAYLOAD: u16 = 512;
/// The header of a DNS message.
const HEADER_LEN: usize = 12;
/// An OPT record without options.
const OPT_LEN: usize = 11;

/// The pre-encoded answers of one catalog snapshot, by lowercase wire name and type.
#[derive(Debug, Default)]
pub struct Table {
    entries: HashMap<Box<[u8]>, Entry>,
}

/// The answer to one name and type.
#[derive(Debug, Default)]
struct Entry {
    /// Each answer record from its type on: the owner is the question's name.
    answers: Vec<Box<[u8]>>,
    /// Empty, or for each answer (SRV) the address record of its target, with its name.
    additionals: Vec<Box<[u8]>>,
    /// The bytes of `answers` and `additionals`.
    len: usize,
}

impl Table {
    /// The table of everything `catalog` answers with records or NODATA.
    pub fn build(catalog: &Catalog) -> Table {
        let mut entries = HashMap::new();
        let mut key = Vec::with_capacity(MAX_NAME + 2);
        for name in candidate_names(catalog) {
            for qtype in FAST_TYPES {
                let question = Query {
                    name: &name,
                    qtype: QueryType::from(qtype),
                    qclass: CLASS_IN,
                };
                let entry = match catalog::answer(catalog, &question, 0) {
                    Answer::Records { answers, additionals } => {
                        match encode_entry(&name, &answers, &additionals) {
                            Some(entry) => entry,
                            None => continue,
                        }
                    }
                    Answer::NoData => Entry::default(),
                    Answer::NxDomain | Answer::NotOurs => continue,
                };
                key.clear();
                if encode_name(&name, &mut key).is_none() {
                    continue;
                }
                key.extend_from_slice(&qtype.to_be_bytes());
                entries.insert(key.as_slice().into(), entry);
            }
        }
        Table { entries }
    }

    /// How many names and types are served on the fast path.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Every name the catalog may answer, lowercase, without trailing dot: what it answers
/// decides what the table keeps.
fn candidate_names(catalog: &Catalog) -> HashSet<String> {
    let mut names = HashSet::new();
    let mut reverse = Vec::new();
    for svc in catalog.services() {
        let name = svc.name.as_str().to_ascii_lowercase();
        names.insert(format!("tasks.{name}"));
        for task in &svc.tasks {
            if let IpAddr::V4(ip) = task.addr() {
                let [a, b, c, d] = ip.octets();
                names.insert(format!("{a}-{b}-{c}-{d}.{name}"));
                reverse.push(ip);
            }
        }
        for port in &svc.ports {
            let proto = port.protocol.label();
            names.insert(format!("_{}._{proto}.{name}", port.name.to_ascii_lowercase()));
            names.insert(format!("_{proto}.{name}"));
        }
        if let EndpointMode::Vip(vip) = svc.endpoint {
            if let IpAddr::V4(ip) = vip.addr() {
                reverse.push(ip);
            }
        }
        names.insert(name);
    }
    for c in catalog.containers() {
        names.insert(c.name.to_ascii_lowercase());
        names.extend(c.aliases.iter().map(|a| a.to_ascii_lowercase()));
        if let IpAddr::V4(ip) = c.addr {
            reverse.push(ip);
        }
    }
    if let Some(domain) = catalog.domain() {
        let within: Vec<String> = names.iter().map(|n| format!("{n}.{domain}")).collect();
        names.extend(within);
        names.insert(domain.to_owned());
    }
    names.extend(reverse.into_iter().map(|ip| {
        let [a, b, c, d] = ip.octets();
        format!("{d}.{c}.{b}.{a}.in-addr.arpa")
    }));
    names
}

/// The wire form of the records of an answer to `name`; None when they are not what the
/// fast path can send (answers owned by another name, additionals not one per SRV target).
fn encode_entry(name: &str, answers: &[catalog::Record], additionals: &[catalog::Record]) -> Option<Entry> {
    let owner = format!("{name}.");
    let paired = additionals.is_empty()
        || (additionals.len() == answers.len()
            && answers.iter().zip(additionals).all(|(answer, additional)| {
                matches!(&answer.data, RecordData::Srv { target, .. } if *target == additional.name)
            }));
    if !paired || answers.iter().any(|r| r.name != owner) {
        return None;
    }
    let mut entry = Entry::default();
    for record in answers {
        let mut bytes = Vec::new();
        encode_record_data(record, &mut bytes)?;
        entry.len += bytes.len();
        entry.answers.push(bytes.into());
    }
    for record in additionals {
        let mut bytes = Vec::new();
        encode_name(&record.name, &mut bytes)?;
        encode_record_data(record, &mut bytes)?;
        entry.len += bytes.len();
        entry.additionals.push(bytes.into());
    }
    Some(entry)
}

/// A record from its type on: type, class IN, TTL, data length, data.
fn encode_record_data(record: &catalog::Record, out: &mut Vec<u8>) -> Option<()> {
    let mut data = Vec::new();
    let rtype = match &record.data {
        RecordData::A(ip) => {
            data.extend_from_slice(&ip.octets());
            TYPE_A
        }
        RecordData::Srv {
            priority,
            weight,
            port,
            target,
        } => {
            data.extend_from_slice(&priority.to_be_bytes());
            data.extend_from_slice(&weight.to_be_bytes());
            data.extend_from_slice(&port.to_be_bytes());
            encode_name(target, &mut data)?;
            TYPE_SRV
        }
        RecordData::Ptr(target) => {
            encode_name(target, &mut data)?;
            TYPE_PTR
        }
    };
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&record.ttl.to_be_bytes());
    out.extend_from_slice(&u16::try_from(data.len()).ok()?.to_be_bytes());
    out.extend_from_slice(&data);
    Some(())
}

/// A dotted name (trailing dot optional) in wire form, uncompressed; None when a label is
/// empty or longer than 63 bytes, or the name longer than 255.
fn encode_name(name: &str, out: &mut Vec<u8>) -> Option<()> {
    let start = out.len();
    let name = name.strip_suffix('.').unwrap_or(name);
    if !name.is_empty() {
        for label in name.split('.') {
            if label.is_empty() || label.len() > 63 {
                return None;
            }
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
    }
    out.push(0);
    (out.len() - start <= MAX_NAME).then_some(())
}

/// A query the fast path may answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Parsed {
    /// Where the question ends in the query.
    question_end: usize,
    /// The bytes of the question name.
    name_len: usize,
    /// The bytes of the lookup key: lowercase name and type.
    key_len: usize,
    /// The OPT record's payload size, when there is one.
    payload: Option<u16>,
    /// The question's type.
    qtype: u16,
}

/// Check that `packet` is a query the fast path may answer; its lookup key into `key`.
fn parse(packet: &[u8], key: &mut [u8; MAX_NAME + 2]) -> Option<Parsed> {
    let header = packet.get(..HEADER_LEN)?;
    let count = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
    // Byte 2: QR, opcode, AA, TC must be 0 (RD may be set). Byte 3: only AD and CD.
    if header[2] & 0xfe != 0 || header[3] & !0x30 != 0 {
        return None;
    }
    if count(4) != 1 || count(6) != 0 || count(8) != 0 || count(10) > 1 {
        return None;
    }
    let mut at = HEADER_LEN;
    let mut k = 0;
    loop {
        let len = usize::from(*packet.get(at)?);
        if len == 0 {
            key[k] = 0;
            k += 1;
            at += 1;
            break;
        }
        // Labels of 63 bytes at most (no compression), 255 bytes in all with the root.
        if len > 63 || k + len + 2 > MAX_NAME {
            return None;
        }
        let label = packet.get(at + 1..at + 1 + len)?;
        key[k] = len as u8;
        for (slot, &b) in key[k + 1..k + 1 + len].iter_mut().zip(label) {
            if !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return None;
            }
            *slot = b.to_ascii_lowercase();
        }
        k += len + 1;
        at += len + 1;
    }
    let name_len = k;
    let fixed = packet.get(at..at + 4)?;
    if u16::from_be_bytes([fixed[2], fixed[3]]) != CLASS_IN {
        return None;
    }
    key[k..k + 2].copy_from_slice(&fixed[..2]);
    let question_end = at + 4;
    let payload = if count(10) == 0 {
        None
    } else {
        Some(parse_opt(packet.get(question_end..)?)?)
    };
    if payload.is_none() && packet.len() != question_end {
        return None;
    }
    Some(Parsed {
        question_end,
        name_len,
        key_len: k + 2,
        payload,
        qtype: u16::from_be_bytes([fixed[0], fixed[1]]),
    })
}

/// An OPT record that is the whole rest of a query: root owner, no extended RCODE,
/// version 0, well-formed options the decoder cannot reject. Its payload size.
fn parse_opt(opt: &[u8]) -> Option<u16> {
    let fixed = opt.get(..OPT_LEN)?;
    let be = |i: usize| u16::from_be_bytes([fixed[i], fixed[i + 1]]);
    if fixed[0] != 0 || be(1) != TYPE_OPT || fixed[5] != 0 || fixed[6] != 0 {
        return None;
    }
    let mut options = &opt[OPT_LEN..];
    if options.len() != usize::from(be(9)) {
        return None;
    }
    while !options.is_empty() {
        let head = options.get(..4)?;
        let code = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        if CHECKED_OPTIONS.contains(&code) {
            return None;
        }
        options = options.get(4 + len..)?;
    }
    Some(be(3))
}

/// A small, fast generator for shuffling answers (not for anything secret).
#[derive(Debug, Clone)]
pub struct Shuffler {
    state: u64,
    order: Vec<usize>,
}

impl Shuffler {
    pub fn new(seed: u64) -> Self {
        Shuffler {
            state: seed,
            order: Vec::new(),
        }
    }

    /// SplitMix64.
    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `0..n` in a random order (Fisher-Yates), in `self.order`.
    fn shuffle(&mut self, n: usize) {
        self.order.clear();
        self.order.extend(0..n);
        for i in (1..n).rev() {
            // The modulo bias is negligible for answer sizes.
            let j = (self.next() % (i as u64 + 1)) as usize;
            self.order.swap(i, j);
        }
    }
}

/// The response to `packet` from `table` into `out`, and the type of the question it
/// answers; `None` (and `out` unspecified) when it is not a query for the fast path.
pub fn respond(table: &Table, packet: &[u8], out: &mut Vec<u8>, shuffler: &mut Shuffler) -> Option<u16> {
    let mut key = [0u8; MAX_NAME + 2];
    let q = parse(packet, &mut key)?;
    let entry = table.entries.get(&key[..q.key_len])?;
    let n = entry.answers.len();
    let edns_len = if q.payload.is_some() { OPT_LEN } else { 0 };
    // Owner names uncompressed: an upper bound of what the slow path would encode.
    let uncompressed = q.question_end + entry.len + n * q.name_len + edns_len;
    let limit = q.payload.map_or(MIN_PAYLOAD, |p| p.max(MIN_PAYLOAD));
    let (Ok(answers), Ok(additionals)) = (
        u16::try_from(n),
        u16::try_from(entry.additionals.len() + usize::from(q.payload.is_some())),
    ) else {
        return None;
    };
    if uncompressed > usize::from(limit) {
        return None;
    }

    out.clear();
    out.extend_from_slice(&packet[..2]);
    // QR, opcode QUERY, AA, RD as asked; RA, CD as asked, RCODE NOERROR.
    out.push(0x84 | (packet[2] & 0x01));
    out.push(0x80 | (packet[3] & 0x10));
    out.extend_from_slice(&[0, 1]);
    out.extend_from_slice(&answers.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&additionals.to_be_bytes());
    out.extend_from_slice(&packet[HEADER_LEN..q.question_end]);
    shuffler.shuffle(n);
    for &i in &shuffler.order {
        // A pointer to the question's name, at offset 12.
        out.extend_from_slice(&[0xc0, 0x0c]);
        out.extend_from_slice(&entry.answers[i]);
    }
    if !entry.additionals.is_empty() {
        for &i in &shuffler.order {
            out.extend_from_slice(&entry.additionals[i]);
        }
    }
    if let Some(payload) = q.payload {
        let [hi, lo] = payload.max(MIN_PAYLOAD).to_be_bytes();
        out.extend_from_slice(&[0, 0, TYPE_OPT as u8, hi, lo, 0, 0, 0, 0, 0, 0]);
    }
    Some(q.qtype)
}

/// Serve DNS over UDP on `socket` until it fails: the fast path for what [`respond`]
/// answers from the current catalog's table, `handler` for the rest.
pub async fn serve_udp<H: RequestHandler>(
    socket: UdpSocket,
    catalog: CatalogHandle,
    acl: Acl,
    handler: Arc<H>,
) -> Result<(), NetError> {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; RECEIVE_BUFFER];
    let mut out = Vec::with_capacity(RECEIVE_BUFFER);
    let mut shuffler = Shuffler::new(RandomState::new().hash_one(0x6661_7374_u64));
    let mut slow = JoinSet::new();
    let metrics = catalog.metrics().clone();
    let mut acl = acl.view();
    loop {
        let (len, src) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(error) if is_unrecoverable(&error) => return Err(error.into()),
            Err(error) => {
                warn!(%error, "error receiving a DNS query over UDP");
                continue;
            }
        };
        if !can_answer(src) {
            continue;
        }
        let received = metrics.is_enabled().then(Instant::now);
        let packet = &buf[..len];
        let fast = acl
            .allows(src.ip())
            .then(|| catalog.with_table(|table| respond(table, packet, &mut out, &mut shuffler)))
            .flatten();
        if let Some(qtype) = fast {
            if let Err(error) = socket.send_to(&out, src).await {
                debug!(%error, %src, "cannot send a DNS response");
            }
            if let Some(received) = received {
                metrics.dns_answered(DnsPath::Fast, qtype, 0, received.elapsed());
            }
            continue;
        }
        slow.spawn(slow_path(
            handler.clone(),
            socket.clone(),
            packet.to_vec(),
            src,
            metrics.clone(),
        ));
        while slow.try_join_next().is_some() {}
    }
}

/// As hickory-server: no response to port 0, an unspecified or a broadcast address.
fn can_answer(src: SocketAddr) -> bool {
    src.port() != 0
        && match src.ip() {
            IpAddr::V4(ip) => !ip.is_unspecified() && ip != Ipv4Addr::BROADCAST,
            IpAddr::V6(ip) => !ip.is_unspecified(),
        }
}

fn is_unrecoverable(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::NotConnected | io::ErrorKind::ConnectionAborted
    )
}

/// One datagram the fast path does not answer, as hickory-server handles it over UDP. The
/// handler counts the queries it answers in the metrics; one that does not decode (FORMERR)
/// is counted here.
async fn slow_path<H: RequestHandler>(
    handler: Arc<H>,
    socket: Arc<UdpSocket>,
    bytes: Vec<u8>,
    src: SocketAddr,
    metrics: Metrics,
) {
    let received = Instant::now();
    let Ok(header) = Header::read(&mut BinDecoder::new(&bytes)) else {
        return; // shorter than a header: not a query
    };
    let mut response = UdpResponse { socket, dst: src };
    match Request::from_bytes(bytes, src, Protocol::Udp) {
        Ok(request) if request.metadata.message_type == MessageType::Response => {}
        Ok(request) => {
            handler.handle_request::<_, TokioTime>(&request, response).await;
        }
        Err(error) => {
            debug!(%error, %src, "cannot decode a DNS query");
            let Ok(queries) = Queries::read(&mut BinDecoder::new(&[]), 0) else {
                return;
            };
            let message = MessageResponseBuilder::new(&queries, None)
                .error_msg(&header.metadata, ResponseCode::FormErr);
            if let Err(error) = response.send_response(message).await {
                debug!(%error, %src, "cannot send a DNS response");
            }
            let formerr = u16::from(ResponseCode::FormErr);
            metrics.dns_answered(DnsPath::Slow, 0, formerr, received.elapsed());
        }
    }
}

/// Sends a response to one UDP client, within the size it accepts.
#[derive(Clone)]
struct UdpResponse {
    socket: Arc<UdpSocket>,
    dst: SocketAddr,
}

#[async_trait::async_trait]
impl ResponseHandler for UdpResponse {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a WireRecord> + Send + 'a,
            impl Iterator<Item = &'a WireRecord> + Send + 'a,
            impl Iterator<Item = &'a WireRecord> + Send + 'a,
            impl Iterator<Item = &'a WireRecord> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let id = response.metadata().id;
        let max = response.edns().map_or(MIN_PAYLOAD, |e| e.max_payload());
        let mut bytes = Vec::with_capacity(usize::from(MIN_PAYLOAD));
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(max);
        let info = match response.destructive_emit(&mut encoder) {
            Ok(info) => info,
            Err(error) => {
                warn!(%error, "cannot encode a DNS response");
                bytes.clear();
                let mut metadata = Metadata::new(id, MessageType::Response, OpCode::Query);
                metadata.response_code = ResponseCode::ServFail;
                let header = Header {
                    metadata,
                    counts: HeaderCounts::default(),
                };
                header.emit(&mut BinEncoder::new(&mut bytes))?;
                ResponseInfo::from(header)
            }
        };
        self.socket.send_to(&bytes, self.dst).await?;
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use hickory_server::proto::op::{Edns, Message, Query as WireQuery};
    use hickory_server::proto::rr::{DNSClass, Name, RData, RecordType};

    use super::*;
    use crate::core::model::{BackendAddr, ServiceName, Vip};
    use crate::dns::catalog::{ContainerRecord, NamedPort, PortProtocol, ServiceRecord};
    use crate::dns::server::{loopback_networks, DnsConfig, Handler};

    fn tasks(ips: &[&str]) -> Vec<BackendAddr> {
        ips.iter().map(|s| BackendAddr::new(s.parse().unwrap())).collect()
    }

    fn test_catalog() -> Catalog {
        Catalog::builder()
            .ttl(9)
            .domain("vipd.local")
            .service(ServiceRecord {
                name: ServiceName::new("web").unwrap(),
                endpoint: EndpointMode::Vip(Vip::new("10.0.0.100".parse().unwrap())),
                tasks: tasks(&["10.0.0.5", "10.0.0.6"]),
                ports: vec![NamedPort::new("http", PortProtocol::Tcp, 80)],
            })
            .service(ServiceRecord {
                name: ServiceName::new("db").unwrap(),
                endpoint: EndpointMode::Dnsrr,
                tasks: tasks(&["10.0.0.7", "10.0.0.8", "10.0.0.9", "fd00::9"]),
                ports: vec![
                    NamedPort::new("pg", PortProtocol::Tcp, 5432),
                    NamedPort::new("Stats", PortProtocol::Udp, 9125),
                ],
            })
            .service(ServiceRecord {
                name: ServiceName::new("idle").unwrap(),
                endpoint: EndpointMode::Dnsrr,
                tasks: Vec::new(),
                ports: vec![NamedPort::new("http", PortProtocol::Tcp, 80)],
            })
            .service(ServiceRecord {
                name: ServiceName::new("big").unwrap(),
                endpoint: EndpointMode::Dnsrr,
                tasks: (1..=60).map(|i| BackendAddr::new([10, 1, 0, i].into())).collect(),
                ports: vec![NamedPort::new("http", PortProtocol::Tcp, 80)],
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
    fn query(id: u16, name: &str, qtype: RecordType, payload: Option<u16>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = true;
        m.add_query(WireQuery::query(Name::from_ascii(name).unwrap(), qtype));
        if let Some(p) = payload {
            let mut e = Edns::new();
            e.set_max_payload(p);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn fast(table: &Table, packet: &[u8]) -> Option<Message> {
        let mut out = Vec::new();
        respond(table, packet, &mut out, &mut Shuffler::new(7)).map(|_| Message::from_vec(&out).unwrap())
    }

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
            slow_path(
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

    #[test]
    fn names_are_case_insensitive_and_answered_as_asked() {
        let table = Table::build(&test_catalog());
        for name in ["web.", "WEB.", "wEb.VIPD.local."] {
            let m = fast(&table, &query(1, name, RecordType::A, None)).unwrap();
            assert_eq!(m.answers.len(), 1);
            assert_eq!(m.answers[0].name.to_string(), name);
            assert_eq!(m.answers[0].data.to_string(), "10.0.0.100");
            assert_eq!(m.answers[0].ttl, 9);
            assert!(m.metadata.authoritative && m.metadata.recursion_available);
        }
    }

    #[test]
    fn several_addresses_come_in_an_order_that_varies() {
        let table = Table::build(&test_catalog());
        let mut shuffler = Shuffler::new(1);
        let mut orders = HashSet::new();
        for name in ["db.", "tasks.db.", "_pg._tcp.db."] {
            orders.clear();
            let qtype = if name.starts_with('_') {
                RecordType::SRV
            } else {
                RecordType::A
            };
            for _ in 0..50 {
                let mut out = Vec::new();
                assert!(respond(&table, &query(1, name, qtype, None), &mut out, &mut shuffler).is_some());
                let m = Message::from_vec(&out).unwrap();
                let order: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
                assert_eq!(order.len(), 3);
                assert_eq!(order.iter().collect::<HashSet<_>>().len(), 3);
                // SRV: the additionals in the order of their answers.
                if qtype == RecordType::SRV {
                    let targets: Vec<String> = m
                        .answers
                        .iter()
                        .map(|r| match &r.data {
                            RData::SRV(srv) => srv.target.to_string(),
                            other => panic!("{other:?}"),
                        })
                        .collect();
                    let glue: Vec<String> = m.additionals.iter().map(|r| r.name.to_string()).collect();
                    assert_eq!(targets, glue);
                }
                orders.insert(order);
            }
            assert_eq!(orders.len(), 6, "{name}: all 6 orders of 3 in 50 answers");
        }
    }

    /// What the fast path leaves to the slow path.
    #[test]
    fn anything_else_takes_the_slow_path() {
        let table = Table::build(&test_catalog());
        let base = query(1, "web.", RecordType::A, Some(1232));
        assert!(fast(&table, &base).is_some());
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("foreign", query(1, "example.com.", RecordType::A, None)),
            ("nxdomain", query(1, "nope.web.", RecordType::A, None)),
            ("nxdomain tasks", query(1, "tasks.nope.", RecordType::A, None)),
            (
                "foreign ptr",
                query(1, "8.8.8.8.in-addr.arpa.", RecordType::PTR, None),
            ),
            ("any", query(1, "web.", RecordType::ANY, None)),
            ("mx", query(1, "web.", RecordType::MX, None)),
            ("root", query(1, ".", RecordType::A, None)),
            ("big without edns", query(1, "big.", RecordType::A, None)),
            (
                "big srv",
                query(1, "_http._tcp.big.", RecordType::SRV, Some(4096)),
            ),
            ("empty", Vec::new()),
            ("short", base[..11].to_vec()),
            ("cut question", base[..20].to_vec()),
            ("cut opt", base[..base.len() - 1].to_vec()),
        ];
        let mut patch = |what: &'static str, f: &dyn Fn(&mut Vec<u8>)| {
            let mut p = base.clone();
            f(&mut p);
            cases.push((what, p));
        };
        patch("response", &|p| p[2] |= 0x80);
        patch("opcode", &|p| p[2] |= 0x10);
        patch("tc", &|p| p[2] |= 0x02);
        patch("rcode", &|p| p[3] |= 0x01);
        patch("two questions", &|p| p[5] = 2);
        patch("no question", &|p| p[5] = 0);
        patch("an answer", &|p| p[7] = 1);
        patch("an authority", &|p| p[9] = 1);
        patch("two additionals", &|p| p[11] = 2);
        patch("trailing bytes", &|p| p.push(0));
        // Question: "web" at 12..16, type at 17, class at 19.
        patch("class chaos", &|p| p[20] = 3);
        patch("class any", &|p| p[20] = 255);
        patch("odd byte", &|p| p[13] = b'*');
        patch("dot in a label", &|p| p[14] = b'.');
        patch("compressed", &|p| p[12] = 0xc0);
        let opt = base.len() - 11;
        patch("opt owner", &|p| p[opt] = 1);
        patch("not opt", &|p| p[opt + 2] = 1);
        patch("extended rcode", &|p| p[opt + 5] = 1);
        patch("edns version", &|p| p[opt + 6] = 1);
        patch("opt length", &|p| p[opt + 10] = 4);
        for (what, option) in [
            ("nsid", vec![0, 3, 0, 0]),
            ("subnet", vec![0, 8, 0, 4, 0, 1, 0, 0]),
            ("bad option", vec![0, 10, 0, 9, 1]),
        ] {
            let mut p = base.clone();
            p[opt + 10] = option.len() as u8;
            p.extend_from_slice(&option);
            cases.push((what, p));
        }
        for (what, packet) in cases {
            assert!(fast(&table, &packet).is_none(), "{what}");
        }
        // A name of 255 bytes parses; one byte more does not.
        let label = "a".repeat(63);
        let long = format!("{label}.{label}.{label}.{}.", "b".repeat(61));
        let mut buf = [0u8; MAX_NAME + 2];
        assert!(parse(&query(1, &long, RecordType::A, None), &mut buf).is_some());
        let mut p = query(1, &long, RecordType::A, None);
        p[12 + 64 * 3] = 62;
        p.insert(12 + 64 * 3 + 1, b'b');
        assert!(parse(&p, &mut buf).is_none());
    }

    #[test]
    fn the_table_holds_owned_names_and_types_only() {
        let table = Table::build(&test_catalog());
        assert!(!table.is_empty());
        assert!(Table::build(&Catalog::empty()).is_empty());
        assert_eq!(table.len(), Table::build(&test_catalog()).len());
        let mut key = Vec::new();
        encode_name("web", &mut key).unwrap();
        assert_eq!(key, b"\x03web\x00");
        assert!(encode_name("a..b", &mut Vec::new()).is_none());
        assert!(encode_name(&"x".repeat(64), &mut Vec::new()).is_none());
        assert_eq!(DNSClass::IN, DNSClass::from(CLASS_IN));
    }

    /// Malformed or random datagrams never panic the parser.
    #[test]
    fn arbitrary_datagrams_never_panic() {
        let table = Table::build(&test_catalog());
        let mut shuffler = Shuffler::new(3);
        let seeds = [
            query(1, "web.", RecordType::A, Some(1232)),
            query(1, "_pg._tcp.db.vipd.local.", RecordType::SRV, None),
        ];
        let mut out = Vec::new();
        for i in 0..20_000 {
            let mut p = seeds[i % 2].clone();
            for _ in 0..=(shuffler.next() % 4) {
                let at = (shuffler.next() % p.len() as u64) as usize;
                p[at] = shuffler.next() as u8;
            }
            p.truncate((shuffler.next() % (p.len() as u64 + 1)) as usize);
            if respond(&table, &p, &mut out, &mut shuffler).is_some() {
                Message::from_vec(&out).expect("a fast response decodes");
            }
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

    #[test]
    fn a_fast_response_says_the_question_type_it_answers() {
        let table = Table::build(&test_catalog());
        let mut out = Vec::new();
        for (qtype, code) in [(RecordType::A, 1), (RecordType::SRV, 33), (RecordType::PTR, 12)] {
            let name = if qtype == RecordType::PTR {
                "100.0.0.10.in-addr.arpa."
            } else if qtype == RecordType::SRV {
                "_http._tcp.web."
            } else {
                "web."
            };
            let packet = query(7, name, qtype, None);
            assert_eq!(
                respond(&table, &packet, &mut out, &mut Shuffler::new(1)),
                Some(code),
                "{name}"
            );
        }
        assert_eq!(respond(&table, &[0; 12], &mut out, &mut Shuffler::new(1)), None);
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
}
