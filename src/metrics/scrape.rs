//! The kernel scrape: each namespace vipd programs, read for the per-backend IPVS
//! counters of vipd's fwmark services, through the narrow [`IpvsCounters`] port (the
//! kernel side implements it outside this module; tests use a fake). At most
//! [`NAMESPACE_READS`] namespaces are read at once, within the scrape's timeout; a
//! namespace that vanished is left out, one that cannot be read (or not in time) keeps
//! its last values.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use tracing::{debug, warn};

use super::NAMESPACE_READS;
use crate::core::ipvs::Destination;
use crate::core::mesh;
use crate::core::model::FwMark;
use crate::core::status::Report;
use crate::ipvs::IpvsError;
use crate::netns::NetnsError;

/// Why one namespace's IPVS table was not read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The namespace is gone (its container stopped): it is left out, not an error.
    #[error("the namespace is gone")]
    Vanished,
    /// The namespace is there but could not be entered.
    #[error(transparent)]
    Netns(NetnsError),
    /// The kernel's IPVS table could not be read (or the kernel has no IPVS).
    #[error(transparent)]
    Ipvs(#[from] IpvsError),
    /// The blocking read panicked or was cancelled.
    #[error("the read failed: {0}")]
    Worker(#[from] tokio::task::JoinError),
}

/// The kernel's per-destination IPVS counters, one namespace at a time.
pub trait IpvsCounters: Send + Sync {
    /// The destinations of the fwmark services `marks` that the namespace `netns` has,
    /// each with its service's mark. Blocking: it may enter the namespace.
    fn read(&self, netns: &Path, marks: &[FwMark]) -> Result<Vec<(FwMark, Destination)>, ReadError>;
}

/// The scrape's state: where counters come from, and the last ones read.
pub(super) struct Scraper {
    /// `None`: no kernel counters are read (the backend series stay empty).
    counters: Option<Arc<dyn IpvsCounters>>,
    timeout: Duration,
    backends: Arc<Mutex<Backends>>,
}

impl Scraper {
    pub(super) fn new(counters: Option<Arc<dyn IpvsCounters>>, timeout: Duration) -> Self {
        Scraper {
            counters,
            timeout,
            backends: Arc::new(Mutex::new(Backends::default())),
        }
    }

    /// The collector that encodes the counters last read, for the registry.
    pub(super) fn collector(&self) -> BackendCollector {
        BackendCollector(Arc::clone(&self.backends))
    }

    /// Read the IPVS counters of every sandbox of `status` (and of the ingress), at most
    /// [`NAMESPACE_READS`] at once, within the timeout.
    pub(super) async fn refresh(&self, status: &Report, ingress: Option<&Path>) {
        let Some(counters) = &self.counters else {
            return;
        };
        let targets = targets(status, ingress);
        let wanted: Vec<PathBuf> = targets.iter().map(|t| t.netns.clone()).collect();
        let results = read_all(Arc::clone(counters), targets, NAMESPACE_READS, self.timeout).await;
        let mut backends = self.backends.lock().unwrap_or_else(PoisonError::into_inner);
        let outcome = backends.update(&wanted, results);
        if let Some(e) = &outcome.first_error {
            warn!(
                failed = outcome.failed,
                timed_out = outcome.timed_out,
                error = %e,
                "metrics scrape: some namespaces' IPVS counters could not be read; their last values are shown"
            );
        } else if outcome.timed_out > 0 {
            warn!(timed_out = outcome.timed_out, timeout = ?self.timeout,
                "metrics scrape: some namespaces' IPVS counters were not read in time; their last values are shown");
        }
    }
}

/// One namespace to read, and vipd's fwmark services in it with their service's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    pub(super) netns: PathBuf,
    pub(super) marks: Vec<(FwMark, String)>,
}

/// The namespaces a scrape reads: every sandbox of the status with the fwmarks of its
/// VIP services, and the ingress namespace with the fwmarks of the published ports.
pub(super) fn targets(status: &Report, ingress: Option<&Path>) -> Vec<Target> {
    let vip_marks: BTreeMap<&str, FwMark> = status
        .services
        .iter()
        .filter_map(|s| Some((s.name.as_str(), s.fwmark?)))
        .collect();
    status
        .sandboxes
        .iter()
        .map(|sb| {
            let marks = if Some(sb.path.as_path()) == ingress {
                ingress_marks(status)
            } else {
                sb.services
                    .iter()
                    .filter_map(|name| Some((*vip_marks.get(name.as_str())?, name.clone())))
                    .collect()
            };
            Target {
                netns: sb.path.clone(),
                marks,
            }
        })
        .filter(|t| !t.marks.is_empty())
        .collect()
}

/// The ingress namespace's fwmark of every published port, with its service.
fn ingress_marks(status: &Report) -> Vec<(FwMark, String)> {
    status
        .services
        .iter()
        .flat_map(|s| {
            s.published
                .iter()
                .map(|p| (mesh::ingress_mark(p.protocol, p.published), s.name.to_string()))
        })
        .collect()
}

/// One destination's counters in one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sample {
    service: String,
    backend: IpAddr,
    conns: u64,
    in_bytes: u64,
    out_bytes: u64,
    active: u64,
}

/// What reading one namespace gave.
type Read = (PathBuf, Result<Vec<Sample>, ReadError>);

/// Read one target with `counters` (blocking: it enters the namespace).
fn read_target(counters: &dyn IpvsCounters, target: &Target) -> Result<Vec<Sample>, ReadError> {
    let marks: Vec<FwMark> = target.marks.iter().map(|(m, _)| *m).collect();
    let names: BTreeMap<FwMark, &str> = target.marks.iter().map(|(m, n)| (*m, n.as_str())).collect();
    let read = counters.read(&target.netns, &marks)?;
    Ok(read
        .into_iter()
        .filter_map(|(mark, d)| {
            Some(Sample {
                service: (*names.get(&mark)?).to_owned(),
                backend: d.key.addr,
                conns: d.stats.conns,
                in_bytes: d.stats.inbytes,
                out_bytes: d.stats.outbytes,
                active: u64::from(d.active_conns),
            })
        })
        .collect())
}

/// Read `targets`, `limit` at once; what is read within `timeout`.
async fn read_all(
    counters: Arc<dyn IpvsCounters>,
    targets: Vec<Target>,
    limit: usize,
    timeout: Duration,
) -> Vec<Read> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut reads = futures::stream::iter(targets)
        .map(|target| {
            let counters = Arc::clone(&counters);
            async move {
                let netns = target.netns.clone();
                let read = tokio::task::spawn_blocking(move || read_target(counters.as_ref(), &target))
                    .await
                    .unwrap_or_else(|e| Err(ReadError::from(e)));
                (netns, read)
            }
        })
        .buffer_unordered(limit.max(1));
    let mut out = Vec::new();
    while let Ok(Some(read)) = tokio::time::timeout_at(deadline, reads.next()).await {
        out.push(read);
    }
    out
}

/// The last counters read of each namespace, and how the last scrape went.
#[derive(Debug, Default)]
struct Backends {
    by_netns: BTreeMap<PathBuf, Vec<Sample>>,
    last: Outcome,
}

/// How one scrape's reads went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Outcome {
    read: usize,
    vanished: usize,
    failed: usize,
    timed_out: usize,
    first_error: Option<String>,
}

impl Backends {
    /// Take a scrape's `results` of the namespaces `wanted`: others are forgotten, a
    /// vanished one too; one that failed or was not read in time keeps its last values.
    fn update(&mut self, wanted: &[PathBuf], results: Vec<Read>) -> Outcome {
        self.by_netns.retain(|netns, _| wanted.contains(netns));
        let mut outcome = Outcome {
            timed_out: wanted.len().saturating_sub(results.len()),
            ..Outcome::default()
        };
        for (netns, result) in results {
            match result {
                Ok(samples) => {
                    outcome.read += 1;
                    self.by_netns.insert(netns, samples);
                }
                Err(ReadError::Vanished) => {
                    outcome.vanished += 1;
                    debug!(netns = %netns.display(), "metrics scrape: the namespace is gone");
                    self.by_netns.remove(&netns);
                }
                Err(e) => {
                    outcome.failed += 1;
                    outcome
                        .first_error
                        .get_or_insert_with(|| format!("{}: {e}", netns.display()));
                }
            }
        }
        self.last = outcome.clone();
        outcome
    }

    /// Every backend's counters, summed over the namespaces, by service and address.
    fn totals(&self) -> BTreeMap<(String, String), Totals> {
        let mut totals: BTreeMap<(String, String), Totals> = BTreeMap::new();
        for s in self.by_netns.values().flatten() {
            let t = totals
                .entry((s.service.clone(), s.backend.to_string()))
                .or_default();
            t.conns += s.conns;
            t.in_bytes += s.in_bytes;
            t.out_bytes += s.out_bytes;
            t.active += s.active;
        }
        totals
    }
}

/// One backend's counters, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    conns: u64,
    in_bytes: u64,
    out_bytes: u64,
    active: u64,
}

/// A per-backend counter: its name, its help, and its value in the totals.
type BackendCounter = (&'static str, &'static str, fn(&Totals) -> u64);

/// The per-backend counters.
const BACKEND_COUNTERS: [BackendCounter; 3] = [
    (
        "backend_connections",
        "Connections IPVS scheduled to a backend, summed over the namespaces vipd programs.",
        |t| t.conns,
    ),
    (
        "backend_incoming_bytes",
        "Bytes IPVS forwarded from clients to a backend, summed over the namespaces vipd programs.",
        |t| t.in_bytes,
    ),
    (
        "backend_outgoing_bytes",
        "Bytes IPVS forwarded from a backend to its clients, summed over the namespaces vipd programs.",
        |t| t.out_bytes,
    ),
];

/// Encodes the per-backend counters last read, at each scrape.
#[derive(Debug)]
pub(super) struct BackendCollector(Arc<Mutex<Backends>>);

impl Collector for BackendCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let backends = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let totals = backends.totals();
        for (name, help, value) in BACKEND_COUNTERS {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for ((service, backend), t) in &totals {
                let labels = [("service", service.as_str()), ("backend", backend.as_str())];
                ConstCounter::new(value(t)).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "backend_connections_active",
            "Established connections to a backend, summed over the namespaces vipd programs.",
            None,
            MetricType::Gauge,
        )?;
        for ((service, backend), t) in &totals {
            let labels = [("service", service.as_str()), ("backend", backend.as_str())];
            ConstGauge::new(i64::try_from(t.active).unwrap_or(i64::MAX))
                .encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "backend_scrape_namespaces",
            "Namespaces the last scrape read IPVS counters from, by outcome.",
            None,
            MetricType::Gauge,
        )?;
        let last = &backends.last;
        for (outcome, n) in [
            ("read", last.read),
            ("vanished", last.vanished),
            ("failed", last.failed),
            ("timed_out", last.timed_out),
        ] {
            ConstGauge::new(n as i64).encode(family.encode_family(&[("outcome", outcome)])?)?;
        }
        Ok(())
    }
}
