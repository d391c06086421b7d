//! The cluster store: what several vipd nodes share through etcd.
//!
//! Nodes register on a lease and their tasks ride it; a service's VIP and fwmark, a
//! published port and a node's subnet are cluster-wide claims made in transactions
//! ([`claims`]). A [`reflector::Reflector`] keeps a snapshot of it all (list + watch,
//! list again on compaction or a broken stream). etcd is never on the data path: when it
//! is unreachable the last snapshot stays, and new claims wait.
//!
//! - [`kv`]: the narrow port (prefix get, transactions, leases, watch);
//! - [`memory`]: an in-memory store with etcd's semantics, for tests;
//! - [`etcd`]: the real one, over `etcd-client`;
//! - [`layout`]: the key layout and the JSON records (pure);
//! - [`claims`]: the claim logic, over the port.

pub mod claims;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod kv;
pub mod layout;
pub mod memory;
pub mod reflector;
pub mod scenarios;

#[cfg(test)]
mod tests;

pub use claims::{Cluster, StoreError};
pub use kv::{Kv, KvError, LeaseId, LeaseTtl, Revision};
pub use layout::{Changes, ClusterState, Diff, Keys, NodeName, NodeRecord, TaskId, TaskRecord, VipClaim};
pub use reflector::{Backoff, Reflector, View};
