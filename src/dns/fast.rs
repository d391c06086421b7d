//! The fast path's wire codec: the common query for a name vipd owns, answered from
//! pre-encoded records without decoding it into a message. Pure: bytes in, bytes out, no
//! socket and no runtime; [`super::udp`] runs it in its receive loop.
//!
//! A [`Table`] is built once per catalog snapshot (when it is stored): for every name the
//! catalog answers (services, `tasks.<svc>`, task hosts, SRV names, containers, aliases,
//! PTR names, each also under the search domain, as [`super::names`] spells them), and for
//! the types A, AAAA, SRV and PTR, what [`catalog::answer`] says, with its records already
//! in wire format. Only records and NODATA are kept: NXDOMAIN, forwarded names and
//! everything else take the slow path.
//!
//! [`respond`] answers a datagram that is one standard query (QR=0, opcode QUERY, no TC,
//! RCODE 0), one question of class IN whose name (labels of letters, digits, `-` and `_`,
//! any case, no compression) and type are in the table, no answer or authority records,
//! and at most an EDNS(0) OPT record without options the decoder could reject (NSID,
//! client subnet). The response is what the slow path sends: the ID, RD and CD bits and
//! question copied, QR, AA and RA set, the answer records (owner: a pointer to the
//! question, so the name as asked), the SRV targets' addresses as additionals, and an OPT
//! advertising the client's payload size (512 at least) when the query had one. Several
//! records are shuffled per answer, as the catalog shuffles every answer of several
//! records (DNSRR services, `tasks.<svc>`, shared aliases, SRV with their additionals in
//! the same order). When the response could exceed 512 bytes (the EDNS payload size) even
//! uncompressed, the slow path answers, as it is the one that truncates.
//!
//! Such a query whose OPT record asks for an EDNS version above 0 gets BADVERS whatever its
//! name (RFC 6891 6.1.3), as from the slow path: the question, no records, and an OPT of
//! version 0 carrying the upper bits of the response code.

use std::collections::{HashMap, HashSet};

use super::catalog::{self, Answer, Catalog, Query, QueryType, RecordData, CLASS_IN};
use super::names;

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
/// The UDP response size without EDNS, and the least one with it.
pub(super) const MIN_PAYLOAD: u16 = 512;
/// BADVERS (16): the response code of a query of an EDNS version vipd does not implement.
pub const RCODE_BADVERS: u16 = 16;
/// The EDNS version vipd implements.
const EDNS_VERSION: u8 = 0;
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
    let mut candidates: HashSet<String> = catalog.relative_names().map(str::to_owned).collect();
    if let Some(domain) = catalog.domain() {
        let within: Vec<String> = candidates.iter().map(|n| names::within(n, domain)).collect();
        candidates.extend(within);
        candidates.insert(domain.to_owned());
    }
    candidates.extend(catalog.reverse_addrs().map(names::reverse));
    candidates
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
    /// The OPT record's EDNS version; 0 without one.
    version: u8,
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
    let (payload, version) = if count(10) == 0 {
        (None, 0)
    } else {
        let (payload, version) = parse_opt(packet.get(question_end..)?)?;
        (Some(payload), version)
    };
    if payload.is_none() && packet.len() != question_end {
        return None;
    }
    Some(Parsed {
        question_end,
        name_len,
        key_len: k + 2,
        payload,
        version,
        qtype: u16::from_be_bytes([fixed[0], fixed[1]]),
    })
}

/// An OPT record that is the whole rest of a query: root owner, no extended RCODE,
/// well-formed options the decoder cannot reject. Its payload size and EDNS version.
fn parse_opt(opt: &[u8]) -> Option<(u16, u8)> {
    let fixed = opt.get(..OPT_LEN)?;
    let be = |i: usize| u16::from_be_bytes([fixed[i], fixed[i + 1]]);
    if fixed[0] != 0 || be(1) != TYPE_OPT || fixed[5] != 0 {
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
    Some((be(3), fixed[6]))
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

/// What [`respond`] answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Responded {
    /// The question's type.
    pub qtype: u16,
    /// The response code, extended bits included (0 NOERROR, [`RCODE_BADVERS`]).
    pub rcode: u16,
}

/// The response to `packet` from `table` into `out`, and what it answers; `None` (and
/// `out` unspecified) when it is not a query for the fast path.
pub fn respond(
    table: &Table,
    packet: &[u8],
    out: &mut Vec<u8>,
    shuffler: &mut Shuffler,
) -> Option<Responded> {
    let mut key = [0u8; MAX_NAME + 2];
    let q = parse(packet, &mut key)?;
    if q.version > EDNS_VERSION {
        return Some(respond_badvers(packet, &q, out));
    }
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

    // QR, opcode QUERY, AA, RD as asked; RA, CD as asked, RCODE NOERROR.
    put_header(out, packet, 0x84, answers, additionals);
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
        put_opt(out, payload, 0);
    }
    Some(Responded {
        qtype: q.qtype,
        rcode: 0,
    })
}

/// BADVERS to a query of a later EDNS version, into `out`: not authoritative (nothing was
/// looked up), the question, and an OPT of version 0 whose extended RCODE completes the
/// header's 0 to 16.
fn respond_badvers(packet: &[u8], q: &Parsed, out: &mut Vec<u8>) -> Responded {
    put_header(out, packet, 0x80, 0, 1);
    out.extend_from_slice(&packet[HEADER_LEN..q.question_end]);
    // The upper 8 of the 12 bits of the response code; the header holds the lower 4.
    let [_, high] = (RCODE_BADVERS >> 4).to_be_bytes();
    put_opt(out, q.payload.unwrap_or(MIN_PAYLOAD), high);
    Responded {
        qtype: q.qtype,
        rcode: RCODE_BADVERS,
    }
}

/// A response's header into `out` (cleared first): the query's ID, `flags` (QR, AA) with
/// the query's RD and CD, RA, the lower bits of RCODE 0 or 16, one question.
fn put_header(out: &mut Vec<u8>, packet: &[u8], flags: u8, answers: u16, additionals: u16) {
    out.clear();
    out.extend_from_slice(&packet[..2]);
    out.push(flags | (packet[2] & 0x01));
    out.push(0x80 | (packet[3] & 0x10));
    out.extend_from_slice(&[0, 1]);
    out.extend_from_slice(&answers.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&additionals.to_be_bytes());
}

/// An OPT record of EDNS version 0 without options into `out`, advertising the client's
/// payload size (512 at least), with `rcode_high` as its extended RCODE.
fn put_opt(out: &mut Vec<u8>, payload: u16, rcode_high: u8) {
    let [hi, lo] = payload.max(MIN_PAYLOAD).to_be_bytes();
    // Owner root, type, class: the payload size, TTL: extended RCODE, version, flags 0,
    // no data.
    out.extend_from_slice(&[0, 0, TYPE_OPT as u8, hi, lo, rcode_high, EDNS_VERSION, 0, 0, 0, 0]);
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use hickory_server::proto::op::{Message, ResponseCode};
    use hickory_server::proto::rr::{DNSClass, RData, RecordType};

    use super::*;
    use crate::dns::testing::{fast, query, query_edns, test_catalog};

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
                Some(Responded {
                    qtype: code,
                    rcode: 0
                }),
                "{name}"
            );
        }
        assert_eq!(respond(&table, &[0; 12], &mut out, &mut Shuffler::new(1)), None);
    }

    /// RFC 6891 6.1.3: a version vipd does not implement gets BADVERS, whatever the name
    /// (owned, missing, foreign), never an answer.
    #[test]
    fn a_later_edns_version_gets_badvers_with_an_opt_of_version_0() {
        let table = Table::build(&test_catalog());
        for name in ["web.", "_http._tcp.web.", "nope.web.", "example.com.", "big."] {
            for version in [1, 255] {
                let what = format!("{name} version {version}");
                let packet = query_edns(0x4242, name, RecordType::A, Some((1232, version)));
                let mut out = Vec::new();
                let responded = respond(&table, &packet, &mut out, &mut Shuffler::new(1));
                assert_eq!(responded, Some(Responded { qtype: 1, rcode: 16 }), "{what}");
                // On the wire: RCODE 0 in the header, 1 in the OPT's extended RCODE, version 0.
                assert_eq!(out[3] & 0x0f, 0, "{what}");
                assert_eq!(
                    out[out.len() - 11..out.len() - 4],
                    [0, 0, 41, 0x04, 0xd0, 1, 0],
                    "{what}"
                );
                let m = Message::from_vec(&out).unwrap();
                // 16 decodes as BADSIG, its TSIG twin: compare the number.
                assert_eq!(u16::from(m.metadata.response_code), RCODE_BADVERS, "{what}");
                assert!(
                    !m.metadata.authoritative && m.metadata.recursion_available,
                    "{what}"
                );
                assert_eq!(m.metadata.id, 0x4242);
                assert_eq!(m.queries[0].name().to_string(), name, "{what}");
                assert!(m.answers.is_empty() && m.additionals.is_empty(), "{what}");
                let edns = m.edns.expect("an OPT record");
                assert_eq!((edns.version(), edns.max_payload()), (0, 1232), "{what}");
            }
        }
        // Version 0 is answered as before.
        let m = fast(&table, &query_edns(1, "web.", RecordType::A, Some((1232, 0)))).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.answers.len(), 1);
    }

    /// The whole BADVERS datagram, byte by byte, for a query with RD and CD set.
    #[test]
    fn badvers_bytes_copy_the_id_rd_cd_and_question() {
        let mut packet = query_edns(0x0102, "Web.", RecordType::AAAA, Some((100, 1)));
        packet[3] |= 0x10; // CD
        let mut out = Vec::new();
        let responded = respond(&Table::default(), &packet, &mut out, &mut Shuffler::new(1));
        assert_eq!(responded, Some(Responded { qtype: 28, rcode: 16 }));
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            0x01, 0x02, 0x81, 0x90, 0, 1, 0, 0, 0, 0, 0, 1,
            3, b'W', b'e', b'b', 0, 0, 28, 0, 1,
            0, 0, 41, 0x02, 0x00, 1, 0, 0, 0, 0, 0,
        ];
        assert_eq!(out, want);
    }
}
