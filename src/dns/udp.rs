//! The UDP loop: each datagram from an allowed source is first offered to the fast path
//! ([`fast::respond`], from the current catalog's pre-encoded table) in the loop that
//! receives it, without a message, a task or a channel; every other datagram goes to the
//! [`RequestHandler`] as hickory-server would pass it.
//!
//! The slow path mirrors hickory-server's UDP loop: sources it cannot answer are dropped,
//! datagrams shorter than a header are dropped, ones that do not decode get FORMERR,
//! responses are dropped, and each query runs in a task of its own, its response encoded
//! within the size the client accepts (SERVFAIL when that fails).

use std::collections::hash_map::RandomState;
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

use super::acl::Acl;
use super::fast::{self, Shuffler, MIN_PAYLOAD};
use super::handle::CatalogHandle;
use crate::metrics::{DnsPath, Metrics};

/// The largest datagram read, as hickory-server reads them.
const RECEIVE_BUFFER: usize = 4096;

/// Serve DNS over UDP on `socket` until it fails: the fast path for what [`fast::respond`]
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
            .then(|| catalog.with_table(|table| fast::respond(table, packet, &mut out, &mut shuffler)))
            .flatten();
        if let Some(answered) = fast {
            if let Err(error) = socket.send_to(&out, src).await {
                debug!(%error, %src, "cannot send a DNS response");
            }
            if let Some(received) = received {
                metrics.dns_answered(DnsPath::Fast, answered.qtype, answered.rcode, received.elapsed());
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
pub(super) async fn slow_path<H: RequestHandler>(
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
