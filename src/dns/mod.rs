//! The embedded DNS server: containers resolve service names to VIPs (or task addresses),
//! `tasks.<svc>`, SRV records of named ports, container names and aliases, and PTR; other
//! names go to the upstream resolvers.
//!
//! - [`catalog`]: the pure part — what vipd knows and how one question is answered.
//! - [`fast`]: the UDP fast path — owned names answered from pre-encoded records.
//! - [`gateways`]: by default, a listener on each Docker bridge network's gateway.
//! - [`server`]: the hickory-server adapter — UDP and TCP listeners, the client ACL,
//!   forwarding to upstreams with bounded time and concurrency.

pub mod catalog;
pub mod cluster;
pub mod fast;
pub mod gateways;
pub mod server;
