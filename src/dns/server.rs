//! The DNS server: UDP loops of vipd's own ([`udp`]) and hickory-server's TCP listeners
//! around [`catalog::answer`].
//!
//! Every query the fast path does not answer goes through one [`RequestHandler`]:
//!
//! 1. a question section with a compression pointer gets FORMERR without the question
//!    (see [`question_is_echoable`]); then a source outside the allowed networks
//!    ([`DnsConfig::allowed`]) gets REFUSED: this is not an open resolver;
//! 2. a query whose OPT record asks for an EDNS version above 0 gets BADVERS, with an OPT
//!    of version 0 (RFC 6891 6.1.3), whatever its name: it is neither answered nor relayed;
//! 3. anything but one standard query gets NOTIMP or FORMERR;
//! 4. the current [`Catalog`](catalog::Catalog) (read lock-free from a [`CatalogHandle`]) answers names vipd
//!    owns, authoritatively, with its TTL;
//! 5. other names are relayed, as the client's own bytes under a fresh message ID, to the
//!    upstream resolvers: over UDP (TCP when the upstream truncates a query that came over
//!    TCP), at most [`DnsConfig::max_upstreams`] of them in turn, each within
//!    [`DnsConfig::upstream_timeout`]; SERVFAIL when none answers. At most
//!    [`DnsConfig::max_in_flight`] relayed queries at once: beyond, REFUSED.
//!
//! UDP queries for names vipd owns usually take the fast path of [`fast`] instead: the same
//! answer, from records encoded once per catalog snapshot, without a task per query.
//!
//! Each query the handler answers runs in a `dns_query` tracing span at debug level, and is
//! counted (type, response code, time to answer) in the metrics its [`CatalogHandle`]
//! carries, as the fast path counts its own.
//! hickory-server itself logs one line per TCP query at info level (target
//! `hickory_server`).

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::BuildHasher;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::net::NetError;
use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, LowerQuery, Message, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::{rdata, LowerName, Name, RData, Record as WireRecord};
use hickory_server::proto::serialize::binary::BinDecoder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponseBuilder, Queries};
use hickory_server::Server;
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, debug_span, Instrument};

pub use super::acl::{loopback_networks, Acl, AclView};
use super::catalog::{self, Answer, Query, QueryType, RecordData};
pub use super::handle::CatalogHandle;
use super::udp;
use crate::metrics::DnsPath;

/// Where the system's resolvers are listed; the default upstreams.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// How long one upstream has to answer (Swarm: 4 s).
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How many upstreams one query tries, in order.
pub const DEFAULT_MAX_UPSTREAMS: usize = 3;
/// How many relayed queries may wait for upstreams at once; beyond, REFUSED.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;
/// How long an idle client TCP connection is kept.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Responses queued per client TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;
/// The largest UDP reply accepted from an upstream.
const MAX_UDP_REPLY: usize = 65_535;
/// Attempts to find one free port for UDP and TCP when a listen port is 0.
const PORT_ATTEMPTS: usize = 16;
/// The EDNS version vipd implements: a query of a later one gets BADVERS.
const EDNS_VERSION: u8 = 0;

/// How to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Where to listen, UDP and TCP each. A port of 0 picks one free port for both.
    pub listen: Vec<SocketAddr>,
    /// Sources allowed to query (the served networks, the host's addresses, loopback);
    /// others get REFUSED. Empty: nobody.
    pub allowed: Vec<IpNet>,
    /// Upstream resolvers, tried in order. `None`: the nameservers of [`RESOLV_CONF`],
    /// read when the server starts. An upstream equal to a listen address is dropped.
    pub upstreams: Option<Vec<SocketAddr>>,
    /// How long each upstream has to answer.
    pub upstream_timeout: Duration,
    /// How many upstreams one query tries.
    pub max_upstreams: usize,
    /// How many relayed queries may be in flight; beyond, REFUSED.
    pub max_in_flight: usize,
    /// How long an idle client TCP connection is kept.
    pub tcp_idle_timeout: Duration,
}

impl DnsConfig {
    /// Listen on `listen`, allow `allowed`, forward to the system's resolvers, defaults
    /// for the rest.
    pub fn new(listen: Vec<SocketAddr>, allowed: Vec<IpNet>) -> Self {
        DnsConfig {
            listen,
            allowed,
            upstreams: None,
            upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
            max_upstreams: DEFAULT_MAX_UPSTREAMS,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            tcp_idle_timeout: DEFAULT_TCP_IDLE_TIMEOUT,
        }
    }
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("no DNS listen address configured")]
    NoListenAddress,
    #[error("cannot listen for DNS over {proto} on {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("cannot read the upstream resolvers from {path}: {source}")]
    ResolvConf { path: &'static str, source: io::Error },
    #[error("the DNS server failed: {0}")]
    Serve(#[source] NetError),
}

/// The nameservers of a resolv.conf text, on port 53, in order. Lines that do not parse
/// (e.g. a link-local address with a zone) are skipped.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next()?;
            let mut words = line.split_whitespace();
            if words.next()? != "nameserver" {
                return None;
            }
            let ip: IpAddr = words.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

/// The nameservers of [`RESOLV_CONF`].
pub fn system_upstreams() -> Result<Vec<SocketAddr>, DnsError> {
    std::fs::read_to_string(RESOLV_CONF)
        .map(|text| parse_resolv_conf(&text))
        .map_err(|source| DnsError::ResolvConf {
            path: RESOLV_CONF,
            source,
        })
}

/// A bound DNS server, not yet serving: [`DnsServer::run`] serves until shut down.
pub struct DnsServer {
    /// hickory-server: the TCP listeners.
    server: Server<SharedHandler>,
    /// The UDP loops ([`udp::serve_udp`]), one per listen address.
    udp: JoinSet<Result<(), NetError>>,
    local: Vec<SocketAddr>,
    upstreams: Vec<SocketAddr>,
    acl: Acl,
}

impl DnsServer {
    /// Bind every listen address (UDP and TCP) and read the upstreams.
    pub async fn bind(config: DnsConfig, catalog: CatalogHandle) -> Result<Self, DnsError> {
        if config.listen.is_empty() {
            return Err(DnsError::NoListenAddress);
        }
        let upstreams = match config.upstreams.clone() {
            Some(u) => u,
            None => system_upstreams()?,
        };
        let mut sockets = Vec::with_capacity(config.listen.len());
        for addr in &config.listen {
            sockets.push(bind_pair(*addr).await?);
        }
        let local: Vec<SocketAddr> = sockets.iter().map(|(_, _, addr)| *addr).collect();
        let upstreams: Vec<SocketAddr> = upstreams.into_iter().filter(|u| !local.contains(u)).collect();
        let handler = Arc::new(Handler::new(&config, catalog.clone(), upstreams.clone()));
        let mut server = Server::new(SharedHandler(handler.clone()));
        let mut udp_loops = JoinSet::new();
        for (udp, tcp, _) in sockets {
            let acl = handler.acl.clone();
            udp_loops.spawn(udp::serve_udp(udp, catalog.clone(), acl, handler.clone()));
            server.register_listener(tcp, config.tcp_idle_timeout, TCP_RESPONSE_BUFFER);
        }
        debug!(?local, ?upstreams, "DNS server bound");
        Ok(DnsServer {
            server,
            udp: udp_loops,
            local,
            upstreams,
            acl: handler.acl.clone(),
        })
    }

    /// The sources it answers, shared with it: [`Acl::set`] changes them while it serves.
    pub fn acl(&self) -> Acl {
        self.acl.clone()
    }

    /// The addresses actually bound (UDP and TCP share each), in the order configured.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local
    }

    /// The upstreams queries are relayed to.
    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// Serve until `shutdown` completes (then stop gracefully) or a listener fails.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), DnsError> {
        let DnsServer {
            mut server, mut udp, ..
        } = self;
        let token = server.shutdown_token().clone();
        let done = server.block_until_done();
        tokio::pin!(done);
        tokio::pin!(shutdown);
        tokio::select! {
            result = &mut done => return result.map_err(DnsError::Serve),
            Some(ended) = udp.join_next() => {
                let error = match ended {
                    Ok(Err(error)) => error,
                    Ok(Ok(())) => NetError::from("the UDP listener stopped"),
                    Err(error) => NetError::from(format!("the UDP listener failed: {error}")),
                };
                return Err(DnsError::Serve(error));
            }
            () = &mut shutdown => token.cancel(),
        }
        // Queries being answered over UDP end with their loop, as in hickory-server.
        udp.shutdown().await;
        done.await.map_err(DnsError::Serve)
    }
}

/// Bind and serve until `shutdown` completes: [`DnsServer::bind`] then [`DnsServer::run`].
pub async fn serve(
    config: DnsConfig,
    catalog: CatalogHandle,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DnsError> {
    DnsServer::bind(config, catalog).await?.run(shutdown).await
}

/// A UDP socket and a TCP listener on one address (one free port for both when the port
/// is 0), and that address.
async fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener, SocketAddr), DnsError> {
    let bind_err = |proto, addr| move |source| DnsError::Bind { proto, addr, source };
    for attempt in 1..=PORT_ATTEMPTS {
        let udp = UdpSocket::bind(addr).await.map_err(bind_err("UDP", addr))?;
        let bound = udp.local_addr().map_err(bind_err("UDP", addr))?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp, bound)),
            Err(e) if addr.port() == 0 && e.kind() == io::ErrorKind::AddrInUse && attempt < PORT_ATTEMPTS => {
                continue
            }
            Err(e) => return Err(bind_err("TCP", bound)(e)),
        }
    }
    unreachable!("the last attempt returns")
}

/// Answers from the catalog, relays the rest.
pub(super) struct Handler {
    catalog: CatalogHandle,
    acl: Acl,
    forwarder: Forwarder,
    in_flight: Semaphore,
    counter: AtomicU64,
    seed_base: u64,
}

impl Handler {
    pub(super) fn new(config: &DnsConfig, catalog: CatalogHandle, upstreams: Vec<SocketAddr>) -> Self {
        Handler {
            catalog,
            acl: Acl::new(config.allowed.iter().copied()),
            forwarder: Forwarder {
                upstreams,
                timeout: config.upstream_timeout,
                max_tries: config.max_upstreams,
            },
            in_flight: Semaphore::new(config.max_in_flight.min(Semaphore::MAX_PERMITS)),
            counter: AtomicU64::new(0),
            seed_base: RandomState::new().hash_one(0x7669_7064_u64),
        }
    }

    /// A fresh, unpredictable-enough number per call: shuffle seeds and upstream IDs.
    fn next_random(&self) -> u64 {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        catalog::seed_from(self.seed_base.wrapping_add(n))
    }

    async fn respond<R: ResponseHandler>(&self, request: &Request, response: R) -> ResponseInfo {
        if !question_is_echoable(request.queries.as_bytes()) {
            debug!("a question name has a compression pointer");
            return send_formerr_without_question(request, response).await;
        }
        if !self.acl.allows(request.src().ip()) {
            debug!("refused: the source is outside the allowed networks");
            return send_code(request, ResponseCode::Refused, false, response).await;
        }
        if let Some(version) = request
            .edns
            .as_ref()
            .map(Edns::version)
            .filter(|v| *v > EDNS_VERSION)
        {
            debug!(version, "answered BADVERS: a later EDNS version");
            return send_code(request, ResponseCode::BADVERS, false, response).await;
        }
        if request.metadata.message_type != MessageType::Query || request.metadata.op_code != OpCode::Query {
            debug!(op = %request.metadata.op_code, "not a standard query");
            return send_code(request, ResponseCode::NotImp, false, response).await;
        }
        let [query] = request.queries.queries() else {
            debug!(count = request.queries.len(), "not exactly one question");
            return send_code(request, ResponseCode::FormErr, false, response).await;
        };
        let name = query.original().name().to_string();
        let question = Query {
            name: &name,
            qtype: QueryType::from(u16::from(query.query_type())),
            qclass: u16::from(query.query_class()),
        };
        let seed = self.next_random();
        let answer = self
            .catalog
            .with_catalog(|catalog| catalog::answer(catalog, &question, seed));
        let qtype = query.query_type();
        match answer {
            Answer::Records { answers, additionals } => {
                debug!(%name, %qtype, answers = answers.len(), additionals = additionals.len(), "answered");
                send_records(request, &answers, &additionals, response).await
            }
            Answer::NxDomain => {
                debug!(%name, %qtype, "answered NXDOMAIN");
                send_code(request, ResponseCode::NXDomain, true, response).await
            }
            Answer::NoData => {
                debug!(%name, %qtype, "answered NODATA");
                send_code(request, ResponseCode::NoError, true, response).await
            }
            Answer::NotOurs => self.forward(request, query, response).await,
        }
    }

    async fn forward<R: ResponseHandler>(
        &self,
        request: &Request,
        query: &LowerQuery,
        response: R,
    ) -> ResponseInfo {
        let Ok(_permit) = self.in_flight.try_acquire() else {
            debug!("refused: too many queries in flight to the upstreams");
            return send_code(request, ResponseCode::Refused, false, response).await;
        };
        let id = (self.next_random() >> 48) as u16;
        let tcp = request.protocol() == Protocol::Tcp;
        match self.forwarder.forward(request.as_slice(), id, query, tcp).await {
            Ok(reply) => {
                debug!(rcode = %reply.metadata.response_code, answers = reply.answers.len(), "relayed");
                send_relayed(request, &reply, response).await
            }
            Err(error) => {
                debug!(%error, "forwarding failed");
                send_code(request, ResponseCode::ServFail, false, response).await
            }
        }
    }
}

/// The handler shared by hickory-server's TCP listeners and the UDP loops.
struct SharedHandler(Arc<Handler>);

#[async_trait::async_trait]
impl RequestHandler for SharedHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
        self.0.handle_request::<R, T>(request, response).await
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
        let span = debug_span!(
            "dns_query",
            id = request.metadata.id,
            src = %request.src(),
            proto = %request.protocol()
        );
        let metrics = self.catalog.metrics();
        let received = metrics.is_enabled().then(std::time::Instant::now);
        let info = self.respond(request, response).instrument(span).await;
        if let Some(received) = received {
            let qtype = request
                .queries
                .queries()
                .first()
                .map_or(0, |q| u16::from(q.query_type()));
            let rcode = u16::from(info.response_code);
            metrics.dns_answered(DnsPath::Slow, qtype, rcode, received.elapsed());
        }
        info
    }
}

/// The header of an answer vipd gives itself.
fn metadata(request: &Request, code: ResponseCode, authoritative: bool) -> Metadata {
    let mut m = Metadata::response_from_request(&request.metadata);
    m.authoritative = authoritative;
    m.recursion_available = true;
    m.response_code = code;
    m
}

/// EDNS for a response when the request had it, advertising the client's payload size so
/// that UDP answers are truncated to what it accepts.
fn response_edns(request: &Request, upstream: Option<&Edns>) -> Option<Edns> {
    request.edns.as_ref().map(|req| {
        let mut edns = upstream.cloned().unwrap_or_default();
        edns.set_max_payload(req.max_payload().max(512));
        edns
    })
}

/// What to report when the response could not be sent.
fn finish(request: &Request, sent: Result<ResponseInfo, NetError>) -> ResponseInfo {
    sent.unwrap_or_else(|error| {
        debug!(%error, "cannot send the response");
        let mut m = Metadata::response_from_request(&request.metadata);
        m.response_code = ResponseCode::ServFail;
        ResponseInfo::from(Header {
            metadata: m,
            counts: HeaderCounts::default(),
        })
    })
}

/// Whether a request's question section (`Queries::as_bytes`) can be sent back as it came.
///
/// hickory-server's responses repeat the question section byte for byte, right after their
/// own header. The decoder accepts a compression pointer in a question name when it points
/// before that name, so in the first question only into the header: the response's header
/// has other bytes there, and the client could not decode the response (a pointer of a
/// later question could point into an earlier one, which the response repeats, but a
/// query of several questions is refused anyway). Only names written out label by label
/// are echoed; anything else is false.
pub fn question_is_echoable(section: &[u8]) -> bool {
    let mut at = 0;
    while at < section.len() {
        loop {
            let Some(&len) = section.get(at) else {
                return false;
            };
            if len == 0 {
                at += 1;
                break;
            }
            // 0b11: a pointer; 0b01 and 0b10: label types the decoder refuses.
            if len > 63 {
                return false;
            }
            at += 1 + usize::from(len);
        }
        // The type and the class.
        at += 4;
    }
    at == section.len()
}

/// FORMERR for a request whose question cannot be repeated: no question in the response.
async fn send_formerr_without_question<R: ResponseHandler>(
    request: &Request,
    mut response: R,
) -> ResponseInfo {
    let Ok(no_questions) = Queries::read(&mut BinDecoder::new(&[]), 0) else {
        return finish(
            request,
            Err(NetError::from("cannot build an empty question section")),
        );
    };
    let edns = response_edns(request, None);
    let mut builder = MessageResponseBuilder::new(&no_questions, None);
    if let Some(edns) = &edns {
        builder.edns(edns);
    }
    let message = builder.build_no_records(metadata(request, ResponseCode::FormErr, false));
    finish(request, response.send_response(message).await)
}

/// A response without records.
async fn send_code<R: ResponseHandler>(
    request: &Request,
    code: ResponseCode,
    authoritative: bool,
    mut response: R,
) -> ResponseInfo {
    let edns = response_edns(request, None);
    let mut builder = MessageResponseBuilder::from_message_request(request);
    if let Some(edns) = &edns {
        builder.edns(edns);
    }
    let message = builder.build_no_records(metadata(request, code, authoritative));
    finish(request, response.send_response(message).await)
}

/// An authoritative answer from the catalog.
async fn send_records<R: ResponseHandler>(
    request: &Request,
    answers: &[catalog::Record],
    additionals: &[catalog::Record],
    mut response: R,
) -> ResponseInfo {
    let convert = |records: &[catalog::Record]| records.iter().map(to_wire).collect::<Option<Vec<_>>>();
    let (Some(answers), Some(additionals)) = (convert(answers), convert(additionals)) else {
        debug!("a catalog name does not convert to a DNS name");
        return send_code(request, ResponseCode::ServFail, false, response).await;
    };
    let edns = response_edns(request, None);
    let mut builder = MessageResponseBuilder::from_message_request(request);
    if let Some(edns) = &edns {
        builder.edns(edns);
    }
    let message = builder.build(
        metadata(request, ResponseCode::NoError, true),
        answers.iter(),
        [],
        [],
        additionals.iter(),
    );
    finish(request, response.send_response(message).await)
}

/// An upstream's reply, under the client's message ID.
async fn send_relayed<R: ResponseHandler>(
    request: &Request,
    reply: &Message,
    mut response: R,
) -> ResponseInfo {
    let mut meta = reply.metadata;
    meta.id = request.metadata.id;
    let edns = response_edns(request, reply.edns.as_ref());
    let mut builder = MessageResponseBuilder::from_message_request(request);
    if let Some(edns) = &edns {
        builder.edns(edns);
    }
    let message = builder.build(
        meta,
        reply.answers.iter(),
        reply.authorities.iter(),
        [],
        reply.additionals.iter(),
    );
    finish(request, response.send_response(message).await)
}

/// A catalog record on the wire; None if a name does not parse (never for a built catalog).
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

/// Why no upstream reply could be relayed.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("no upstream resolver is configured")]
    NoUpstream,
    #[error("the query is too short to relay")]
    ShortQuery,
    #[error("no upstream resolver answered ({tried} tried)")]
    NoAnswer { tried: usize },
}

/// Relays raw queries to the upstreams.
#[derive(Debug, Clone)]
struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    max_tries: usize,
}

impl Forwarder {
    /// Relay `raw` (a query, `query` its question) under message ID `id`; the first good
    /// reply. A SERVFAIL, REFUSED or NOTIMP reply moves on to the next upstream and is
    /// relayed only when no other answers.
    async fn forward(
        &self,
        raw: &[u8],
        id: u16,
        query: &LowerQuery,
        tcp: bool,
    ) -> Result<Message, ForwardError> {
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstream);
        }
        let mut wire = raw.to_vec();
        match wire.get_mut(..2) {
            Some(head) if raw.len() >= 12 => head.copy_from_slice(&id.to_be_bytes()),
            _ => return Err(ForwardError::ShortQuery),
        }
        let mut fallback = None;
        let mut tried = 0;
        for &upstream in self.upstreams.iter().take(self.max_tries) {
            tried += 1;
            match tokio::time::timeout(self.timeout, exchange(upstream, &wire, id, query, tcp)).await {
                Ok(Ok(reply)) => {
                    let code = reply.metadata.response_code;
                    if !matches!(
                        code,
                        ResponseCode::ServFail | ResponseCode::Refused | ResponseCode::NotImp
                    ) {
                        return Ok(reply);
                    }
                    debug!(%upstream, rcode = %code, "upstream failed the query");
                    fallback = Some(reply);
                }
                Ok(Err(error)) => debug!(%upstream, %error, "upstream exchange failed"),
                Err(_) => debug!(%upstream, timeout = ?self.timeout, "upstream timed out"),
            }
        }
        fallback.ok_or(ForwardError::NoAnswer { tried })
    }
}

/// One query to one upstream over UDP; over TCP again when truncated and `tcp`.
async fn exchange(
    upstream: SocketAddr,
    wire: &[u8],
    id: u16,
    query: &LowerQuery,
    tcp: bool,
) -> io::Result<Message> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(wire).await?;
    let mut buf = vec![0u8; MAX_UDP_REPLY];
    loop {
        let n = socket.recv(&mut buf).await?;
        match check_reply(buf.get(..n).unwrap_or_default(), id, query) {
            Reply::Accept(msg) if msg.metadata.truncation && tcp => {
                return exchange_tcp(upstream, wire, id, query).await
            }
            Reply::Accept(msg) => return Ok(msg),
            Reply::Stray => continue,
            Reply::Malformed(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}

/// One query to one upstream over TCP.
async fn exchange_tcp(upstream: SocketAddr, wire: &[u8], id: u16, query: &LowerQuery) -> io::Result<Message> {
    let len = u16::try_from(wire.len()).map_err(|_| io::Error::other("query too long for TCP"))?;
    let mut framed = Vec::with_capacity(wire.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(wire);
    let mut stream = TcpStream::connect(upstream).await?;
    stream.write_all(&framed).await?;
    loop {
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut buf).await?;
        match check_reply(&buf, id, query) {
            Reply::Accept(msg) => return Ok(msg),
            Reply::Stray => continue,
            Reply::Malformed(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}

/// What came back from an upstream.
#[derive(Debug)]
enum Reply {
    /// The reply to our query.
    Accept(Message),
    /// Not a reply to our query (another ID, not a response, another question): ignore.
    Stray,
    /// Our ID, but it does not decode.
    Malformed(String),
}

/// Check the bytes an upstream sent: never panics, whatever they are.
fn check_reply(bytes: &[u8], id: u16, query: &LowerQuery) -> Reply {
    let is_response = bytes.get(2).is_some_and(|flags| flags & 0x80 != 0);
    if bytes.len() < 12 || bytes.get(..2) != Some(&id.to_be_bytes()[..]) || !is_response {
        return Reply::Stray;
    }
    let msg = match Message::from_vec(bytes) {
        Ok(msg) => msg,
        Err(e) => return Reply::Malformed(e.to_string()),
    };
    let same_question = match msg.queries.as_slice() {
        [q] => {
            LowerName::from(q.name()) == *query.name()
                && q.query_type() == query.query_type()
                && q.query_class() == query.query_class()
        }
        // Some servers drop the question from an error.
        [] => msg.metadata.response_code != ResponseCode::NoError,
        _ => false,
    };
    if same_question {
        Reply::Accept(msg)
    } else {
        Reply::Stray
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;
    use std::sync::Mutex;

    use hickory_server::net::runtime::TokioTime;
    use hickory_server::proto::op::Query as WireQuery;
    use hickory_server::proto::rr::{DNSClass, RecordType};
    use hickory_server::proto::serialize::binary::BinEncoder;
    use hickory_server::zone_handler::MessageResponse;

    use super::*;
    use crate::core::labels::NamedPort;
    use crate::core::model::{self, EndpointMode};
    use crate::core::model::{BackendAddr, ServiceName, Vip};
    use crate::dns::catalog::{Catalog, ContainerRecord, ServiceRecord};
    use crate::dns::testing::query_edns;

    /// Collects the encoded responses.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<Vec<u8>>>>);

    #[async_trait::async_trait]
    impl ResponseHandler for Capture {
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
            let mut buf = Vec::new();
            let mut encoder = BinEncoder::new(&mut buf);
            let info = response
                .destructive_emit(&mut encoder)
                .map_err(|e| NetError::from(e.to_string()))?;
            self.0.lock().unwrap().push(buf);
            Ok(info)
        }
    }

    fn test_catalog() -> Catalog {
        Catalog::builder()
            .ttl(9)
            .service(ServiceRecord {
                name: ServiceName::new("web").unwrap(),
                mode: EndpointMode::Vip,
                vip: Some(Vip::new("10.0.0.100".parse().unwrap())),
                tasks: vec![BackendAddr::new("10.0.0.5".parse().unwrap())],
                ports: vec![NamedPort::new("http", model::Protocol::Tcp, 80)],
            })
            .container(ContainerRecord {
                name: "box".into(),
                addr: "10.0.0.30".parse().unwrap(),
                aliases: vec![],
            })
            .build()
            .unwrap()
    }

    fn config(upstreams: Vec<SocketAddr>) -> DnsConfig {
        let mut c = DnsConfig::new(vec![], loopback_networks());
        c.upstreams = Some(upstreams);
        c.upstream_timeout = Duration::from_millis(300);
        c
    }

    fn handler(config: &DnsConfig) -> Handler {
        let upstreams = config.upstreams.clone().unwrap_or_default();
        Handler::new(config, CatalogHandle::new(test_catalog()), upstreams)
    }

    fn query_bytes(id: u16, name: &str, qtype: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = true;
        m.add_query(WireQuery::query(Name::from_ascii(name).unwrap(), qtype));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(1232);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    /// Run one query through the handler as from `src`; the decoded response.
    async fn ask(h: &Handler, bytes: Vec<u8>, src: &str, protocol: Protocol) -> Option<Message> {
        let request = Request::from_bytes(bytes, src.parse().unwrap(), protocol).ok()?;
        let capture = Capture::default();
        h.handle_request::<_, TokioTime>(&request, capture.clone()).await;
        let sent = capture.0.lock().unwrap().clone();
        assert_eq!(sent.len(), 1, "exactly one response per request");
        Some(Message::from_vec(&sent[0]).expect("the response decodes"))
    }

    fn addresses(m: &Message) -> Vec<String> {
        m.answers.iter().map(|r| r.data.to_string()).collect()
    }

    #[tokio::test]
    async fn owned_names_are_answered_authoritatively() {
        let h = handler(&config(vec![]));
        let m = ask(
            &h,
            query_bytes(7, "WEB.", RecordType::A, true),
            "127.0.0.1:5000",
            Protocol::Udp,
        )
        .await
        .unwrap();
        assert_eq!(m.metadata.id, 7);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert!(m.metadata.recursion_available);
        assert_eq!(addresses(&m), ["10.0.0.100"]);
        assert_eq!(m.answers[0].ttl, 9);
        assert_eq!(m.answers[0].name.to_string(), "WEB.");
        assert_eq!(m.edns.as_ref().map(Edns::max_payload), Some(1232));

        let m = ask(
            &h,
            query_bytes(8, "_http._tcp.web.", RecordType::SRV, false),
            "127.0.0.1:5000",
            Protocol::Tcp,
        )
        .await
        .unwrap();
        assert_eq!(addresses(&m), ["0 10 80 10-0-0-5.web."]);
        assert_eq!(m.additionals.len(), 1);
        assert!(m.edns.is_none());

        let m = ask(
            &h,
            query_bytes(9, "tasks.nope.", RecordType::A, true),
            "[::1]:5000",
            Protocol::Udp,
        )
        .await
        .unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let m = ask(
            &h,
            query_bytes(10, "box.", RecordType::AAAA, true),
            "127.0.0.1:1",
            Protocol::Udp,
        )
        .await
        .unwrap();
        assert_eq!(
            (m.metadata.response_code, m.answers.len()),
            (ResponseCode::NoError, 0)
        );
        let m = ask(
            &h,
            query_bytes(11, "30.0.0.10.in-addr.arpa.", RecordType::PTR, true),
            "127.0.0.1:1",
            Protocol::Udp,
        )
        .await
        .unwrap();
        assert_eq!(addresses(&m), ["box."]);
    }

    #[tokio::test]
    async fn sources_outside_the_acl_are_refused() {
        let h = handler(&config(vec![]));
        for src in ["10.9.9.9:53000", "[fd00::1]:53000"] {
            let m = ask(
                &h,
                query_bytes(1, "web.", RecordType::A, true),
                src,
                Protocol::Udp,
            )
            .await
            .unwrap();
            assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{src}");
            assert!(m.answers.is_empty());
        }
        // An IPv4-mapped loopback source is loopback.
        let m = ask(
            &h,
            query_bytes(1, "web.", RecordType::A, true),
            "[::ffff:127.0.0.1]:5",
            Protocol::Udp,
        )
        .await
        .unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        // Nobody at all when the list is empty.
        let h = Handler::new(&DnsConfig::new(vec![], vec![]), CatalogHandle::default(), vec![]);
        let m = ask(
            &h,
            query_bytes(1, "web.", RecordType::A, true),
            "127.0.0.1:5",
            Protocol::Udp,
        )
        .await
        .unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    }

    #[tokio::test]
    async fn foreign_names_without_upstreams_fail_and_beyond_the_in_flight_limit_are_refused() {
        let h = handler(&config(vec![]));
        let m = ask(
            &h,
            query_bytes(1, "example.com.", RecordType::A, true),
            "127.0.0.1:5",
            Protocol::Udp,
        )
        .await
        .unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        let mut c = config(vec!["127.0.0.1:9".parse().unwrap()]);
        c.max_in_flight = 0;
        let h = handler(&c);
        let m = ask(
            &h,
            query_bytes(1, "example.com.", RecordType::A, true),
            "127.0.0.1:5",
            Protocol::Udp,
        )
        .await
        .unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    }

    /// Found by fuzzing (fuzz/fuzz_targets/dns_request.rs): a question name ending in a
    /// compression pointer into the header. hickory-server repeats the question's bytes
    /// after the response's header, where the pointer reads other bytes: the client could
    /// not decode the response. Such a request gets FORMERR without its question, also
    /// from a source outside the ACL (REFUSED would repeat the question too).
    #[tokio::test]
    async fn a_question_pointing_into_the_header_gets_formerr_without_it() {
        let h = handler(&config(vec![]));
        // The fuzzer's input: opcode 8, RCODE 1, a name whose last label is a pointer to
        // offset 3 (`01 00 01 00 00`: the labels "\000" and "\000").
        let found: Vec<u8> = vec![
            0x00, 0x03, 0x40, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x08, 0x06, 0x01, 0x30,
            0x01, 0x30, 0x02, 0x31, 0x30, 0x36, 0x6f, 0x6e, 0x00, 0x2a, 0x00, 0x10, 0x00, 0x94, 0x94, 0x94,
            0x94, 0x94, 0x94, 0x94, 0x94, 0x94, 0x94, 0x94, 0x94, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x6f, 0x6e, 0x00, 0x2a, 0x04, 0x10, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x40, 0x00, 0x00, 0x00, 0x00, 0x0d, 0x0c, 0x00, 0x2a, 0x00, 0xc0, 0x03, 0x01, 0x00,
            0x01, 0x00, 0x01,
        ];
        // A standard query, RD, for A IN of the name at offset 2: the flags `01 00` and the
        // high byte of QDCOUNT read as the label "\000" and the root.
        let crafted: Vec<u8> = vec![
            0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 0x02, 0, 1, 0, 1,
        ];
        for (bytes, id) in [(&found, 3), (&crafted, 0x1234)] {
            for src in ["127.0.0.1:4000", "192.0.2.1:4000"] {
                for proto in [Protocol::Udp, Protocol::Tcp] {
                    let what = format!("{id:#x} from {src} over {proto}");
                    // `ask` decodes the response.
                    let m = ask(&h, bytes.clone(), src, proto)
                        .await
                        .expect("the request decodes");
                    assert_eq!(m.metadata.id, id, "{what}");
                    assert_eq!(m.metadata.message_type, MessageType::Response, "{what}");
                    assert_eq!(m.metadata.response_code, ResponseCode::FormErr, "{what}");
                    assert!(m.queries.is_empty() && m.answers.is_empty(), "{what}");
                }
            }
        }
        assert!(!question_is_echoable(&crafted[12..]));
        assert!(!question_is_echoable(&found[12..]));
        // Names written out label by label are repeated, as before.
        assert!(question_is_echoable(
            &query_bytes(1, "web.", RecordType::A, false)[12..]
        ));
        assert!(question_is_echoable(&[0, 0, 1, 0, 1]));
        let m = ask(
            &h,
            query_bytes(9, "web.", RecordType::A, false),
            "127.0.0.1:4000",
            Protocol::Udp,
        )
        .await
        .unwrap();
        assert_eq!(m.queries.len(), 1);
        assert_eq!(m.answers.len(), 1);
        // Truncated or overlong sections are not.
        assert!(!question_is_echoable(&[3, b'w', b'e', b'b', 0, 0, 1, 0]));
        assert!(!question_is_echoable(&[3, b'w', b'e']));
    }

    #[tokio::test]
    async fn the_catalog_can_be_replaced_while_serving() {
        let c = config(vec![]);
        let catalog = CatalogHandle::new(Catalog::empty());
        let h = Handler::new(&c, catalog.clone(), vec![]);
        let q = || query_bytes(1, "tasks.web.", RecordType::A, false);
        let m = ask(&h, q(), "127.0.0.1:5", Protocol::Udp).await.unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        catalog.store(test_catalog());
        let m = ask(&h, q(), "127.0.0.1:5", Protocol::Udp).await.unwrap();
        assert_eq!(addresses(&m), ["10.0.0.5"]);
    }

    /// A fake upstream on UDP (and TCP on the same port): answers `answer` for every query,
    /// after a stray reply with another ID; over UDP with TC set when `truncate`.
    async fn fake_upstream(answer: Ipv4Addr, truncate: bool) -> SocketAddr {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = TcpListener::bind(addr).await.unwrap();
        let reply = move |bytes: &[u8], tc: bool| {
            let q = Message::from_vec(bytes).unwrap();
            let mut r = Message::response(q.metadata.id, OpCode::Query);
            r.metadata.truncation = tc;
            r.metadata.recursion_available = true;
            r.add_queries(q.queries.clone());
            if !tc {
                let name = q.queries[0].name().clone();
                r.add_answer(WireRecord::from_rdata(name, 60, RData::A(rdata::A(answer))));
            }
            r.to_vec().unwrap()
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let (n, from) = udp.recv_from(&mut buf).await.unwrap();
                let mut stray = reply(&buf[..n], false);
                stray[0] ^= 0xff;
                udp.send_to(&stray, from).await.unwrap();
                udp.send_to(&reply(&buf[..n], truncate), from).await.unwrap();
            }
        });
        tokio::spawn(async move {
            loop {
                let (mut s, _) = tcp.accept().await.unwrap();
                let mut len = [0u8; 2];
                s.read_exact(&mut len).await.unwrap();
                let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                s.read_exact(&mut q).await.unwrap();
                let r = reply(&q, false);
                s.write_all(&(r.len() as u16).to_be_bytes()).await.unwrap();
                s.write_all(&r).await.unwrap();
            }
        });
        addr
    }

    #[tokio::test]
    async fn foreign_names_are_relayed_under_the_client_id() {
        // A silent upstream first: the next one answers within its own timeout.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let up = fake_upstream(Ipv4Addr::new(192, 0, 2, 7), false).await;
        let h = handler(&config(vec![silent.local_addr().unwrap(), up]));
        let m = ask(
            &h,
            query_bytes(4242, "example.com.", RecordType::A, true),
            "127.0.0.1:5",
            Protocol::Udp,
        )
        .await
        .unwrap();
        assert_eq!(m.metadata.id, 4242);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(!m.metadata.authoritative);
        assert_eq!(addresses(&m), ["192.0.2.7"]);
        assert_eq!(m.answers[0].ttl, 60);
        // Only the silent one: SERVFAIL once its timeout expires.
        let h = handler(&config(vec![silent.local_addr().unwrap()]));
        let start = std::time::Instant::now();
        let m = ask(
            &h,
            query_bytes(1, "example.com.", RecordType::A, true),
            "127.0.0.1:5",
            Protocol::Udp,
        )
        .await
        .unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    /// RFC 6891 6.1.3 on the handler (the UDP slow path and TCP): BADVERS with an OPT of
    /// version 0, for owned and foreign names alike; a foreign one is not relayed.
    #[tokio::test]
    async fn a_later_edns_version_gets_badvers_and_is_never_relayed() {
        let up = fake_upstream(Ipv4Addr::new(192, 0, 2, 9), false).await;
        let h = handler(&config(vec![up]));
        for name in ["web.", "example.com."] {
            for proto in [Protocol::Udp, Protocol::Tcp] {
                let what = format!("{name} over {proto}");
                let bytes = query_edns(31, name, RecordType::A, Some((1232, 1)));
                let m = ask(&h, bytes, "127.0.0.1:5", proto).await.unwrap();
                // 16 decodes as BADSIG, its TSIG twin: compare the number.
                assert_eq!(u16::from(m.metadata.response_code), 16, "{what}");
                assert!(m.answers.is_empty() && !m.metadata.authoritative, "{what}");
                let edns = m.edns.expect("an OPT record");
                assert_eq!((edns.version(), edns.rcode_high()), (0, 1), "{what}");
            }
        }
        // Version 0 of the same foreign name is relayed.
        let m = ask(
            &h,
            query_bytes(32, "example.com.", RecordType::A, true),
            "127.0.0.1:5",
            Protocol::Udp,
        )
        .await
        .unwrap();
        assert_eq!(addresses(&m), ["192.0.2.9"]);
    }

    #[tokio::test]
    async fn truncated_upstream_replies_go_to_tcp_for_tcp_clients_only() {
        let up = fake_upstream(Ipv4Addr::new(192, 0, 2, 8), true).await;
        let h = handler(&config(vec![up]));
        let q = || query_bytes(5, "example.org.", RecordType::A, true);
        let m = ask(&h, q(), "127.0.0.1:5", Protocol::Tcp).await.unwrap();
        assert!(!m.metadata.truncation);
        assert_eq!(addresses(&m), ["192.0.2.8"]);
        let m = ask(&h, q(), "127.0.0.1:5", Protocol::Udp).await.unwrap();
        assert!(m.metadata.truncation);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn resolv_conf_nameservers_in_order() {
        let text = "# comment\nsearch example.com\nnameserver 10.0.0.2\nnameserver  ::1 # local\n\
                    nameserver fe80::1%eth0\nnameserver bogus\noptions ndots:2\n;nameserver 1.1.1.1\n\
                    nameserver 192.0.2.53";
        let want: Vec<SocketAddr> = ["10.0.0.2:53", "[::1]:53", "192.0.2.53:53"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(parse_resolv_conf(text), want);
    }

    /// Deterministic noise for the fuzz tests.
    struct Noise(u64);

    impl Noise {
        fn next(&mut self) -> u64 {
            self.0 = catalog::seed_from(self.0);
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Valid queries, truncated at every length, with bytes flipped and random garbage:
    /// whatever decodes as a request goes through the handler, which answers it once,
    /// with a response that decodes, and never panics.
    #[tokio::test]
    async fn malformed_requests_never_panic() {
        let h = handler(&config(vec![]));
        let mut corpus = Vec::new();
        let mut seeds = Vec::new();
        for (name, t) in [
            ("web.", RecordType::A),
            ("_http._tcp.web.", RecordType::SRV),
            ("100.0.0.10.in-addr.arpa.", RecordType::PTR),
            ("example.com.", RecordType::AAAA),
        ] {
            let q = query_bytes(3, name, t, true);
            for len in 0..=q.len() {
                corpus.push(q[..len].to_vec());
            }
            seeds.push(q);
        }
        corpus.extend(seeds.iter().cloned());
        let mut noise = Noise(99);
        for _ in 0..3000 {
            let mut q = seeds[noise.below(seeds.len())].clone();
            for _ in 0..=noise.below(4) {
                if !q.is_empty() {
                    let i = noise.below(q.len());
                    q[i] = noise.next() as u8;
                }
            }
            corpus.push(q);
        }
        for _ in 0..500 {
            let len = noise.below(64);
            corpus.push((0..len).map(|_| noise.next() as u8).collect());
        }
        // Header counts far beyond the data, a compression loop, a response message.
        corpus.push(vec![0, 1, 1, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        corpus.push(vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1]);
        let mut response = query_bytes(3, "web.", RecordType::A, false);
        response[2] |= 0x80;
        corpus.push(response);

        let mut handled = 0;
        for bytes in corpus {
            let proto = if noise.next() & 1 == 0 {
                Protocol::Udp
            } else {
                Protocol::Tcp
            };
            if let Some(m) = ask(&h, bytes, "127.0.0.1:4000", proto).await {
                assert_eq!(m.metadata.message_type, MessageType::Response);
                handled += 1;
            }
        }
        assert!(handled > 500, "only {handled} requests decoded");
    }

    #[test]
    fn upstream_replies_of_any_bytes_never_panic() {
        let query = LowerQuery::query(WireQuery::query(
            Name::from_str("example.com.").unwrap(),
            RecordType::A,
        ));
        let mut good = Message::response(77, OpCode::Query);
        good.add_query(query.original().clone());
        let good = good.to_vec().unwrap();
        assert!(matches!(check_reply(&good, 77, &query), Reply::Accept(_)));
        assert!(matches!(check_reply(&good, 78, &query), Reply::Stray));
        let mut other = Message::response(77, OpCode::Query);
        other.add_query(WireQuery::query(
            Name::from_str("example.net.").unwrap(),
            RecordType::A,
        ));
        assert!(matches!(
            check_reply(&other.to_vec().unwrap(), 77, &query),
            Reply::Stray
        ));
        let mut noise = Noise(5);
        for _ in 0..5000 {
            let mut bytes = good.clone();
            bytes.truncate(noise.below(bytes.len() + 1));
            for _ in 0..noise.below(3) {
                if bytes.len() > 2 {
                    let i = 2 + noise.below(bytes.len() - 2);
                    bytes[i] = noise.next() as u8;
                }
            }
            let _ = check_reply(&bytes, 77, &query);
        }
        assert_eq!(DNSClass::IN, query.query_class());
    }
}
