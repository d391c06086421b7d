//! The [`Kv`] port over etcd's v3 API (`etcd-client`). The client retries nothing and
//! reconnects nothing: every call here has a timeout, and the caller (the claims'
//! callers, the reflector) owns every retry.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions,
    Txn as EtcdTxn, TxnOp, WatchOptions,
};
use tracing::debug;

use super::kv::{
    Compare, Event, KeyValue, Kv, KvError, LeaseId, LeaseTtl, Listing, Op, Revision, Txn, TxnResult,
    WatchMessage, WatchStream,
};

/// Client certificate files for an etcd that requires TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA that signed the servers' certificates (PEM).
    pub ca: PathBuf,
    /// This client's certificate and key (PEM), for servers that check clients.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Where and how to reach etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `http://host:port` (or `https://` with TLS) of one or more members.
    pub endpoints: Vec<String>,
    /// The most any one call may take.
    pub timeout: Duration,
    /// TLS; needs vipd built with its `tls` feature.
    pub tls: Option<TlsFiles>,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig {
            endpoints,
            timeout: Duration::from_secs(5),
            tls: None,
        }
    }
}

/// An etcd cluster, as a [`Kv`].
#[derive(Clone)]
pub struct EtcdKv {
    client: Client,
    timeout: Duration,
    /// Said with a transport failure: TLS with no client certificate.
    hint: Option<&'static str>,
}

/// A member that checks clients drops a TLS handshake without a certificate, which the
/// client reports as a bare "transport error" or "operation was canceled".
const NO_CLIENT_CERT: &str =
    "TLS without a client certificate: if etcd checks its clients, give --etcd-cert and --etcd-key";

/// `e`, with `hint` added when it is a failure of the connection itself.
fn hinted(e: KvError, hint: Option<&'static str>) -> KvError {
    let Some(hint) = hint else { return e };
    let add = |msg: String| {
        if msg.contains("transport error") || msg.contains("canceled") {
            format!("{msg} ({hint})")
        } else {
            msg
        }
    };
    match e {
        KvError::Unavailable(msg) => KvError::Unavailable(add(msg)),
        KvError::Rejected(msg) => KvError::Rejected(add(msg)),
        other => other,
    }
}

/// etcd's errors in the port's terms.
fn convert(e: etcd_client::Error) -> KvError {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            let msg = status.message().to_owned();
            match i32::from(status.code()) {
                grpc_code::UNAVAILABLE | grpc_code::DEADLINE_EXCEEDED | grpc_code::CANCELLED => {
                    KvError::Unavailable(msg)
                }
                _ => KvError::Rejected(msg),
            }
        }
        etcd_client::Error::TransportError(e) => KvError::Unavailable(e.to_string()),
        etcd_client::Error::IoError(e) => KvError::Unavailable(e.to_string()),
        etcd_client::Error::WatchError(e) | etcd_client::Error::LeaseKeepAliveError(e) => {
            KvError::Unavailable(e)
        }
        other => KvError::Rejected(other.to_string()),
    }
}

/// The gRPC codes that mean "not reachable now", by their stable numbers (tonic is not a
/// direct dependency).
mod grpc_code {
    pub const CANCELLED: i32 = 1;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const UNAVAILABLE: i32 = 14;
}

/// A lease error names the lease it is about (etcd says "lease not found" in a gRPC
/// status, the client in a keep-alive error).
fn lease_error(e: etcd_client::Error, lease: LeaseId) -> KvError {
    match convert(e) {
        KvError::Rejected(msg) | KvError::Unavailable(msg) if msg.contains("lease not found") => {
            KvError::LeaseNotFound(lease)
        }
        other => other,
    }
}

fn key_value(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: Revision(kv.create_revision()),
        mod_revision: Revision(kv.mod_revision()),
        lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
    }
}

fn compare(c: Compare) -> EtcdCompare {
    match c {
        Compare::Absent(key) => EtcdCompare::create_revision(key, CompareOp::Equal, 0),
        // Over a range, etcd requires every key to match; an empty range has create
        // revision 0.
        Compare::NoneUnder(prefix) => EtcdCompare::create_revision(prefix, CompareOp::Equal, 0).with_prefix(),
        Compare::ValueIs(key, value) => EtcdCompare::value(key, CompareOp::Equal, value),
        Compare::ModRevisionIs(key, rev) => EtcdCompare::mod_revision(key, CompareOp::Equal, rev.0),
    }
}

fn op(o: Op) -> TxnOp {
    match o {
        Op::Put { key, value, lease } => {
            TxnOp::put(key, value, lease.map(|l| PutOptions::new().with_lease(l.0)))
        }
        Op::Delete(key) => TxnOp::delete(key, None),
    }
}

impl EtcdKv {
    /// Connect (lazily: an unreachable etcd is not an error here, calls fail later).
    pub async fn connect(config: &EtcdConfig) -> Result<Self, KvError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(config.timeout)
            // HTTP/2 pings find a dead connection under a quiet watch.
            .with_keep_alive(Duration::from_secs(10), config.timeout)
            .with_keep_alive_while_idle(true);
        let options = with_tls(options, config.tls.as_ref())?;
        let hint = config
            .tls
            .as_ref()
            .is_some_and(|t| t.cert.is_none())
            .then_some(NO_CLIENT_CERT);
        let client = tokio::time::timeout(config.timeout, Client::connect(&config.endpoints, Some(options)))
            .await
            .map_err(|_| KvError::Timeout(config.timeout))?
            .map_err(|e| hinted(convert(e), hint))?;
        Ok(EtcdKv {
            client,
            timeout: config.timeout,
            hint,
        })
    }

    async fn timed<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, KvError>>,
    ) -> Result<T, KvError> {
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| KvError::Timeout(self.timeout))?
            .map_err(|e| hinted(e, self.hint))
    }
}

#[cfg(feature = "tls")]
fn with_tls(options: ConnectOptions, tls: Option<&TlsFiles>) -> Result<ConnectOptions, KvError> {
    use etcd_client::{Certificate, Identity, TlsOptions};
    let Some(tls) = tls else {
        return Ok(options);
    };
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|e| KvError::Rejected(format!("cannot read {}: {e}", p.display())))
    };
    let mut config = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => config = config.identity(Identity::from_pem(read(cert)?, read(key)?)),
        (None, None) => {}
        _ => {
            return Err(KvError::Rejected(
                "a client certificate needs its key, and a key its certificate".into(),
            ))
        }
    }
    Ok(options.with_tls(config))
}

#[cfg(not(feature = "tls"))]
fn with_tls(options: ConnectOptions, tls: Option<&TlsFiles>) -> Result<ConnectOptions, KvError> {
    match tls {
        None => Ok(options),
        Some(_) => Err(KvError::Rejected(
            "TLS to etcd was asked for, but this vipd was built without its `tls` feature".into(),
        )),
    }
}

#[async_trait]
impl Kv for EtcdKv {
    async fn get_prefix(&self, prefix: &str) -> Result<Listing, KvError> {
        let mut kv = self.client.kv_client();
        let resp = self
            .timed(async {
                kv.get(prefix, Some(GetOptions::new().with_prefix()))
                    .await
                    .map_err(convert)
            })
            .await?;
        Ok(Listing {
            kvs: resp.kvs().iter().map(key_value).collect(),
            revision: Revision(resp.header().map_or(0, |h| h.revision())),
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, KvError> {
        let lease = txn.then.iter().chain(&txn.otherwise).find_map(|o| match o {
            Op::Put { lease, .. } => *lease,
            Op::Delete(_) => None,
        });
        let t = EtcdTxn::new()
            .when(txn.when.into_iter().map(compare).collect::<Vec<_>>())
            .and_then(txn.then.into_iter().map(op).collect::<Vec<_>>())
            .or_else(txn.otherwise.into_iter().map(op).collect::<Vec<_>>());
        let mut kv = self.client.kv_client();
        let resp = self
            .timed(async {
                kv.txn(t).await.map_err(|e| match lease {
                    Some(l) => lease_error(e, l),
                    None => convert(e),
                })
            })
            .await?;
        Ok(TxnResult {
            succeeded: resp.succeeded(),
            revision: Revision(resp.header().map_or(0, |h| h.revision())),
        })
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, KvError> {
        let mut lease = self.client.lease_client();
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let resp = self
            .timed(async { lease.grant(secs, None).await.map_err(convert) })
            .await?;
        Ok(LeaseId(resp.id()))
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<Duration, KvError> {
        let mut lease = self.client.lease_client();
        self.timed(async {
            let (mut keeper, mut stream) = lease.keep_alive(id.0).await.map_err(|e| lease_error(e, id))?;
            keeper.keep_alive().await.map_err(|e| lease_error(e, id))?;
            let resp = stream
                .message()
                .await
                .map_err(|e| lease_error(e, id))?
                .ok_or_else(|| KvError::Unavailable("the keep-alive stream ended".into()))?;
            // etcd answers an ended lease with TTL 0 (not an error).
            match u64::try_from(resp.ttl()) {
                Ok(secs) if secs > 0 => Ok(Duration::from_secs(secs)),
                _ => Err(KvError::LeaseNotFound(id)),
            }
        })
        .await
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<(), KvError> {
        let mut lease = self.client.lease_client();
        self.timed(async { lease.revoke(id.0).await.map_err(|e| lease_error(e, id)) })
            .await?;
        Ok(())
    }

    async fn lease_time_to_live(&self, id: LeaseId) -> Result<Option<LeaseTtl>, KvError> {
        let mut lease = self.client.lease_client();
        let resp = self
            .timed(async {
                lease
                    .time_to_live(id.0, None)
                    .await
                    .map_err(|e| lease_error(e, id))
            })
            .await;
        match resp {
            // etcd answers an ended lease with TTL -1.
            Ok(r) => Ok(u64::try_from(r.ttl()).ok().map(|left| LeaseTtl {
                left: Duration::from_secs(left),
                granted: Duration::from_secs(u64::try_from(r.granted_ttl()).unwrap_or(0)),
            })),
            Err(KvError::LeaseNotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, KvError> {
        let mut watch = self.client.watch_client();
        let options = WatchOptions::new().with_prefix().with_start_revision(from.0);
        let stream = self
            .timed(async { watch.watch(prefix, Some(options)).await.map_err(convert) })
            .await?;
        debug!(prefix, from = %from, "watching");
        Ok(Box::pin(futures::stream::unfold(
            Some(stream),
            |state| async move {
                let mut stream = state?;
                loop {
                    let resp = match stream.message().await {
                        Ok(Some(resp)) => resp,
                        Ok(None) => {
                            return Some((Err(KvError::Unavailable("the watch stream ended".into())), None))
                        }
                        Err(e) => return Some((Err(convert(e)), None)),
                    };
                    if resp.canceled() {
                        let last = if resp.compact_revision() > 0 {
                            Ok(WatchMessage::Compacted {
                                compact_revision: Revision(resp.compact_revision()),
                            })
                        } else {
                            Err(KvError::Unavailable(format!(
                                "watch canceled: {}",
                                resp.cancel_reason()
                            )))
                        };
                        return Some((last, None));
                    }
                    let events: Vec<Event> = resp
                        .events()
                        .iter()
                        .filter_map(|e| {
                            let kv = e.kv()?;
                            Some(match e.event_type() {
                                EventType::Put => Event::Put(key_value(kv)),
                                EventType::Delete => Event::Delete {
                                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                                    revision: Revision(kv.mod_revision()),
                                },
                            })
                        })
                        .collect();
                    // The "created" answer and progress notifications carry no events.
                    if !events.is_empty() {
                        return Some((Ok(WatchMessage::Events(events)), Some(stream)));
                    }
                }
            },
        )))
    }
}
