//! Prometheus metrics of `vipd run`, served over HTTP (`GET /metrics`, OpenMetrics text).
//!
//! The rest of the daemon holds a [`Metrics`] handle (cheap to clone; a disabled handle
//! counts nothing) and calls small methods on it: [`Metrics::reconcile_done`],
//! [`Metrics::error`], [`Metrics::dns_answered`]. What `vipd status` shows (services,
//! tasks, sandboxes, the engine) is read from the agent's status at scrape time
//! ([`Metrics::follow`]), and so are the kernel's per-backend IPVS counters: each
//! namespace vipd programs is read through [`IpvsCounters`], at most [`NAMESPACE_READS`]
//! at once and within [`BACKEND_READ_TIMEOUT`]; a namespace that vanished is left out,
//! one that cannot be read (or not in time) keeps its last values. docs/METRICS.md lists
//! every metric.
//!
//! By concern: [`registry`] what is counted, [`scrape`] the kernel's counters (through a
//! port: this module opens no netlink socket; `vipd run` passes
//! [`crate::kernel::stats::KernelIpvsCounters`]), [`server`] the HTTP endpoint.

pub mod registry;
pub mod scrape;
pub mod server;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

pub use registry::{qtype_label, rcode_label, DnsPath, ErrorKind, Metrics, ReconcileKind};
pub use scrape::{IpvsCounters, ReadError};
pub use server::MetricsServer;

/// Where `vipd run` serves metrics unless told otherwise: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9469";

/// The `Content-Type` of a scrape.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How many namespaces a scrape reads at once.
pub const NAMESPACE_READS: usize = 8;

/// How long a scrape may read namespaces; those not read by then keep their last values.
pub const BACKEND_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the metrics cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics on {addr}: {error}; choose another address with --metrics-listen, or --no-metrics")]
    Bind { addr: SocketAddr, error: io::Error },
    #[error("cannot encode the metrics")]
    Encode,
}

#[cfg(test)]
mod tests;
