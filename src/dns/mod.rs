//! The embedded DNS server: containers resolve service names to VIPs (or task addresses),
//! `tasks.<svc>`, SRV records of named ports, container names and aliases, and PTR; other
//! names go to the upstream resolvers.
//!
//! The modules, each depending only on those above it:
//!
//! - [`names`]: the naming scheme — how every served name is spelled, in one place.
//! - [`catalog`]: the pure part — what vipd knows and how one question is answered.
//! - [`records`]: the catalog of the Docker host's services and containers.
//! - [`fast`]: the fast path's pure wire codec — owned names answered from pre-encoded
//!   records, BADVERS to a later EDNS version.
//! - [`acl`]: the source networks allowed to query, shared by every listener.
//! - [`handle`]: the current catalog and its fast path table, swapped when it changes.
//! - [`udp`]: the UDP loop — the fast path first, the handler for the rest.
//! - [`server`]: the hickory-server adapter — the handler (ACL, catalog answers,
//!   forwarding to upstreams with bounded time and concurrency), TCP listeners, binding.
//! - [`gateways`]: by default, a listener on each Docker bridge network's gateway.

pub mod acl;
pub mod catalog;
pub mod fast;
pub mod gateways;
pub mod handle;
pub mod names;
pub mod records;
pub mod server;
pub mod udp;

#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
