//! The narrow key-value port the cluster claims are written against: what etcd's v3 API
//! offers, cut down to what the claim logic and the reflector use.
//!
//! Two implementations: [`super::memory::MemoryKv`] (a stateful fake with etcd's
//! transaction, lease and watch semantics) and [`super::etcd::EtcdKv`].

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

/// A store revision: etcd's logical clock, bumped once per write transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Revision(pub i64);

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A lease id, as etcd hands it out; the caller keeps it in its state dir to resume it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A live lease's time to live: what it has left, and the TTL it was granted (the time
/// it gets at each keep-alive). `granted - left` is how long ago it was last renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTtl {
    pub left: Duration,
    pub granted: Duration,
}

impl LeaseTtl {
    /// How long ago the lease was last renewed (or granted).
    pub fn since_renewed(&self) -> Duration {
        self.granted.saturating_sub(self.left)
    }
}

/// One key as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision that created the key (0 never appears: 0 means "absent" in compares).
    pub create_revision: Revision,
    /// The revision of the last write to the key.
    pub mod_revision: Revision,
    /// The lease the key is attached to, if any (it vanishes when the lease ends).
    pub lease: Option<LeaseId>,
}

/// Every key under a prefix, and the store revision they were read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub kvs: Vec<KeyValue>,
    pub revision: Revision,
}

/// A condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist (etcd: `create_revision == 0`).
    Absent(String),
    /// No key starts with this prefix (etcd: `create_revision == 0` over the range).
    NoneUnder(String),
    /// The key exists with exactly this value.
    ValueIs(String, Vec<u8>),
    /// The key was last written at this revision (etcd: `mod_revision ==`).
    ModRevisionIs(String, Revision),
}

/// A write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Put a key, attached to a lease or not (a put with an unknown lease fails the txn).
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    /// Delete a key (nothing happens if it is absent).
    Delete(String),
}

/// An atomic compare-and-write: `then` if every compare holds, else `otherwise`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub when: Vec<Compare>,
    pub then: Vec<Op>,
    pub otherwise: Vec<Op>,
}

/// What a transaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether the compares held (so `then` ran).
    pub succeeded: bool,
    /// The store revision after the transaction.
    pub revision: Revision,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    Delete { key: String, revision: Revision },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }
}

/// One message of a watch stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMessage {
    /// The changes of one or more whole revisions, in order.
    Events(Vec<Event>),
    /// The start revision was compacted away (or the watcher fell behind a compaction):
    /// the stream ends; list again.
    Compacted { compact_revision: Revision },
}

/// A watch: messages until it ends with `Compacted`, an error, or the end of the stream
/// (all three mean "list again").
pub type WatchStream = BoxStream<'static, Result<WatchMessage, KvError>>;

/// Why a store call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("the cluster store cannot be reached: {0}")]
    Unavailable(String),
    #[error("the cluster store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    #[error("the cluster store refused the request: {0}")]
    Rejected(String),
}

impl KvError {
    /// Whether trying again later can help (the store was unreachable or slow).
    pub fn is_transient(&self) -> bool {
        matches!(self, KvError::Unavailable(_) | KvError::Timeout(_))
    }
}

/// The port. Every call may fail with [`KvError::Unavailable`]; none retries.
#[async_trait]
pub trait Kv: Send + Sync {
    /// Every key under `prefix`, and the revision of the read.
    async fn get_prefix(&self, prefix: &str) -> Result<Listing, KvError>;
    /// One atomic transaction.
    async fn txn(&self, txn: Txn) -> Result<TxnResult, KvError>;
    /// A new lease that ends `ttl` after its last keep-alive.
    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, KvError>;
    /// Renew a lease once; returns its TTL ([`KvError::LeaseNotFound`] if it has ended).
    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, KvError>;
    /// End a lease now, deleting its keys ([`KvError::LeaseNotFound`] if it had ended).
    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), KvError>;
    /// The time a lease has left and the TTL it was granted, or `None` if it has ended.
    async fn lease_time_to_live(&self, lease: LeaseId) -> Result<Option<LeaseTtl>, KvError>;
    /// Changes under `prefix` from revision `from` on.
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, KvError>;
}
