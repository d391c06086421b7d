//! Prometheus metrics of `vipd run`, served over HTTP (`GET /metrics`, OpenMetrics text).
//!
//! This module owns the registry and the server. The rest of the daemon holds a
//! [`Metrics`] handle (cheap to clone; a disabled handle counts nothing) and calls small
//! methods on it: [`Metrics::reconcile_done`], [`Metrics::error`],
//! [`Metrics::dns_answered`]. What `vipd status` shows (services, tasks, sandboxes, the
//! engine) is read from the agent's status at scrape time ([`Metrics::follow`]), and so
//! are the kernel's per-backend IPVS counters: each namespace vipd programs is read,
//! at most [`NAMESPACE_READS`] at once and within [`BACKEND_READ_TIMEOUT`]; a namespace
//! that vanished is left out, one that cannot be read (or not in time) keeps its last
//! values. docs/METRICS.md lists every metric.
//!
//! The server is a small HTTP/1.1 responder: one request per connection, answered and
//! closed.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info, warn};

use crate::core::ipvs::{Destination, ServiceKey};
use crate::core::labels;
use crate::core::mesh;
use crate::core::model::FwMark;
use crate::core::status::Status;
use crate::ipvs::IpvsTable as _;

/// Where `vipd run` serves metrics unless told otherwise: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9469";

/// The `Content-Type` of a scrape.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How many namespaces a scrape reads at once.
pub const NAMESPACE_READS: usize = 8;

/// How long a scrape may read namespaces; those not read by then keep their last values.
pub const BACKEND_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest request head accepted.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// How long a client has to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections answered at once; more are closed at once.
const CONNECTIONS: usize = 8;

/// Buckets of the reconcile pass durations, in seconds.
const RECONCILE_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Buckets of the DNS answer durations, in seconds: microseconds on the fast path,
/// upstream round trips when relayed.
const DNS_BUCKETS: [f64; 16] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    1.0, 5.0,
];

/// The states a task is counted in (`vipd_tasks`).
const TASK_STATES: [&str; 7] = [
    "serving",
    "starting",
    "unhealthy",
    "draining",
    "drained",
    "stopped",
    "other",
];

/// Why the metrics cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics on {addr}: {error}; choose another address with --metrics-listen, or --no-metrics")]
    Bind { addr: SocketAddr, error: io::Error },
    #[error("cannot encode the metrics")]
    Encode,
}

/// Why one namespace's IPVS table was not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The namespace is gone (its container stopped): it is left out, not an error.
    #[error("the namespace is gone")]
    Vanished,
    #[error("{0}")]
    Failed(String),
}

/// Reads the destinations of the given fwmark services in one namespace (each with its
/// service's mark); the real one enters the namespace, tests use a fake.
pub type NamespaceReader =
    Arc<dyn Fn(&Path, &[FwMark]) -> Result<Vec<(FwMark, Destination)>, ReadError> + Send + Sync>;

/// The kind of a reconcile pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconcileKind {
    /// After engine events.
    Event,
    /// A full resync: every sandbox read again from the kernel.
    Resync,
    /// A task starts draining, or its drain grace is over.
    Drain,
}

impl ReconcileKind {
    const ALL: [ReconcileKind; 3] = [ReconcileKind::Event, ReconcileKind::Resync, ReconcileKind::Drain];

    fn label(self) -> &'static str {
        match self {
            ReconcileKind::Event => "event",
            ReconcileKind::Resync => "resync",
            ReconcileKind::Drain => "drain",
        }
    }
}

/// What failed (`vipd_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A sandbox (or the ingress namespace) could not be programmed.
    Sandbox,
    /// The host's own rules could not be programmed or read.
    Host,
    /// The Docker engine did not answer, or its event stream was lost.
    Engine,
    /// The allocations could not be saved.
    State,
    /// A service got no VIP (the pool is exhausted).
    Allocation,
}

impl ErrorKind {
    const ALL: [ErrorKind; 5] = [
        ErrorKind::Sandbox,
        ErrorKind::Host,
        ErrorKind::Engine,
        ErrorKind::State,
        ErrorKind::Allocation,
    ];

    fn label(self) -> &'static str {
        match self {
            ErrorKind::Sandbox => "sandbox",
            ErrorKind::Host => "host",
            ErrorKind::Engine => "engine",
            ErrorKind::State => "state",
            ErrorKind::Allocation => "allocation",
        }
    }
}

/// Which DNS path answered a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsPath {
    /// The UDP fast path: pre-encoded answers of names vipd owns.
    Fast,
    /// Everything else: hickory-server's TCP listeners and the UDP slow path.
    Slow,
}

impl DnsPath {
    fn label(self) -> &'static str {
        match self {
            DnsPath::Fast => "fast",
            DnsPath::Slow => "slow",
        }
    }
}

/// The name of a DNS query type, for a label; a small fixed set, `other` for the rest.
pub fn qtype_label(qtype: u16) -> &'static str {
    match qtype {
        1 => "A",
        2 => "NS",
        5 => "CNAME",
        6 => "SOA",
        12 => "PTR",
        15 => "MX",
        16 => "TXT",
        28 => "AAAA",
        33 => "SRV",
        64 => "SVCB",
        65 => "HTTPS",
        255 => "ANY",
        _ => "other",
    }
}

/// The name of a DNS response code, for a label; `other` beyond the common six.
pub fn rcode_label(rcode: u16) -> &'static str {
    match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        _ => "other",
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DnsLabels {
    path: &'static str,
    qtype: &'static str,
    rcode: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabels {
    path: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn reconcile_histogram() -> Histogram {
    Histogram::new(RECONCILE_BUCKETS.iter().copied())
}

fn dns_histogram() -> Histogram {
    Histogram::new(DNS_BUCKETS.iter().copied())
}

/// A handle on vipd's metrics: cheap to clone, shared by every part of the daemon. The
/// default handle is disabled: its methods do nothing.
#[derive(Clone, Default)]
pub struct Metrics(Option<Arc<Inner>>);

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("enabled", &self.is_enabled())
            .finish()
    }
}

struct Inner {
    registry: Registry,
    services: Family<ModeLabels, Gauge>,
    tasks: Family<StateLabels, Gauge>,
    sandboxes: Family<StateLabels, Gauge>,
    engine_connected: Gauge,
    passes: Family<KindLabels, Counter>,
    durations: Histograms<KindLabels>,
    operations: Counter,
    errors: Family<KindLabels, Counter>,
    dns_queries: Family<DnsLabels, Counter>,
    dns_durations: Histograms<PathLabels>,
    backends: Arc<Mutex<Backends>>,
    reader: NamespaceReader,
    read_timeout: Duration,
    source: Mutex<Option<Source>>,
    /// One scrape at a time: each reads the kernel, then encodes what it read.
    scrape: tokio::sync::Mutex<()>,
}

/// What a scrape reads: the agent's status, and which namespace is the ingress.
struct Source {
    status: watch::Receiver<Status>,
    ingress: Option<PathBuf>,
}

impl Metrics {
    /// Metrics that read the kernel's IPVS counters.
    pub fn new() -> Self {
        Self::with_reader(Arc::new(read_kernel), BACKEND_READ_TIMEOUT)
    }

    /// Metrics that read namespaces with `reader`, each scrape within `timeout`.
    pub fn with_reader(reader: NamespaceReader, timeout: Duration) -> Self {
        Metrics(Some(Arc::new(Inner::new(reader, timeout))))
    }

    /// A handle that counts nothing.
    pub fn disabled() -> Self {
        Metrics(None)
    }

    /// Whether this handle counts.
    pub fn is_enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Read the services, tasks, sandboxes and engine state from `status` at each scrape,
    /// and the IPVS counters of its sandboxes; `ingress` is the routing mesh's namespace.
    pub fn follow(&self, status: watch::Receiver<Status>, ingress: Option<PathBuf>) {
        if let Some(inner) = &self.0 {
            *inner.source.lock().unwrap_or_else(PoisonError::into_inner) = Some(Source { status, ingress });
        }
    }

    /// A reconcile pass of `kind` took `took` and applied `operations` operations.
    pub fn reconcile_done(&self, kind: ReconcileKind, took: Duration, operations: usize) {
        if let Some(inner) = &self.0 {
            let labels = KindLabels { kind: kind.label() };
            inner.passes.get_or_create(&labels).inc();
            inner.durations.get_or_create(&labels).observe(took.as_secs_f64());
            inner.operations.inc_by(operations as u64);
        }
    }

    /// Something of `kind` failed.
    pub fn error(&self, kind: ErrorKind) {
        if let Some(inner) = &self.0 {
            inner
                .errors
                .get_or_create(&KindLabels { kind: kind.label() })
                .inc();
        }
    }

    /// A DNS query of type `qtype` was answered with `rcode` by `path`, `took` after it
    /// was received.
    pub fn dns_answered(&self, path: DnsPath, qtype: u16, rcode: u16, took: Duration) {
        if let Some(inner) = &self.0 {
            let labels = DnsLabels {
                path: path.label(),
                qtype: qtype_label(qtype),
                rcode: rcode_label(rcode),
            };
            inner.dns_queries.get_or_create(&labels).inc();
            inner
                .dns_durations
                .get_or_create(&PathLabels { path: path.label() })
                .observe(took.as_secs_f64());
        }
    }

    /// A scrape: the status gauges and the kernel's counters brought up to date, then
    /// everything encoded as OpenMetrics text.
    pub async fn render(&self) -> Result<String, MetricsError> {
        let Some(inner) = &self.0 else {
            return Ok("# EOF\n".to_owned());
        };
        let _one = inner.scrape.lock().await;
        let source = inner.snapshot();
        if let Some((status, ingress)) = source {
            inner.set_gauges(&status);
            inner.refresh_backends(targets(&status, ingress.as_deref())).await;
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &inner.registry)
            .map_err(|_| MetricsError::Encode)?;
        Ok(out)
    }
}

impl Inner {
    fn new(reader: NamespaceReader, read_timeout: Duration) -> Self {
        let mut registry = Registry::with_prefix("vipd");
        let inner = Inner {
            services: Family::default(),
            tasks: Family::default(),
            sandboxes: Family::default(),
            engine_connected: Gauge::default(),
            passes: Family::default(),
            durations: Family::new_with_constructor(reconcile_histogram),
            operations: Counter::default(),
            errors: Family::default(),
            dns_queries: Family::default(),
            dns_durations: Family::new_with_constructor(dns_histogram),
            backends: Arc::new(Mutex::new(Backends::default())),
            reader,
            read_timeout,
            source: Mutex::new(None),
            scrape: tokio::sync::Mutex::new(()),
            registry: Registry::default(),
        };
        inner.register(&mut registry);
        inner.preset();
        Inner { registry, ..inner }
    }

    /// Every metric into `registry`.
    fn register(&self, r: &mut Registry) {
        r.register("services", "Services, by endpoint mode", self.services.clone());
        r.register("tasks", "Tasks of every service, by state", self.tasks.clone());
        r.register(
            "sandboxes",
            "Namespaces vipd programs (sandboxes and the ingress), in sync or not",
            self.sandboxes.clone(),
        );
        r.register(
            "engine_connected",
            "Whether the Docker engine answered the last listing (1) or not (0)",
            self.engine_connected.clone(),
        );
        r.register(
            "reconcile_passes",
            "Reconcile passes, by kind",
            self.passes.clone(),
        );
        r.register_with_unit(
            "reconcile_duration",
            "How long reconcile passes took, by kind",
            Unit::Seconds,
            self.durations.clone(),
        );
        r.register(
            "reconcile_operations",
            "Operations applied to namespaces and the host's rules",
            self.operations.clone(),
        );
        r.register("errors", "Errors, by what failed", self.errors.clone());
        r.register(
            "dns_queries",
            "DNS queries answered, by path, query type and response code",
            self.dns_queries.clone(),
        );
        r.register_with_unit(
            "dns_answer_duration",
            "How long DNS answers took from the query's arrival, by path",
            Unit::Seconds,
            self.dns_durations.clone(),
        );
        r.register_collector(Box::new(BackendCollector(Arc::clone(&self.backends))));
    }

    /// The series of every fixed label value, at 0, so that they exist before the first
    /// event.
    fn preset(&self) {
        for mode in ["vip", "dnsrr"] {
            self.services.get_or_create(&ModeLabels { mode }).set(0);
        }
        for state in TASK_STATES {
            self.tasks.get_or_create(&StateLabels { state }).set(0);
        }
        for state in ["in_sync", "out_of_sync"] {
            self.sandboxes.get_or_create(&StateLabels { state }).set(0);
        }
        for kind in ReconcileKind::ALL {
            self.passes
                .get_or_create(&KindLabels { kind: kind.label() })
                .inc_by(0);
        }
        for kind in ErrorKind::ALL {
            self.errors
                .get_or_create(&KindLabels { kind: kind.label() })
                .inc_by(0);
        }
    }

    /// The latest status and the ingress namespace, if the agent is followed.
    fn snapshot(&self) -> Option<(Status, Option<PathBuf>)> {
        let source = self.source.lock().unwrap_or_else(PoisonError::into_inner);
        source
            .as_ref()
            .map(|s| (s.status.borrow().clone(), s.ingress.clone()))
    }

    fn set_gauges(&self, status: &Status) {
        for mode in ["vip", "dnsrr"] {
            let n = status.services.iter().filter(|s| s.mode == mode).count();
            self.services.get_or_create(&ModeLabels { mode }).set(n as i64);
        }
        let mut tasks: BTreeMap<&'static str, i64> = TASK_STATES.iter().map(|s| (*s, 0)).collect();
        for task in status.services.iter().flat_map(|s| &s.tasks) {
            *tasks.entry(task_state(task.serving, &task.state)).or_default() += 1;
        }
        for (state, n) in tasks {
            self.tasks.get_or_create(&StateLabels { state }).set(n);
        }
        let in_sync = status.sandboxes.iter().filter(|s| s.in_sync).count() as i64;
        let out = status.sandboxes.len() as i64 - in_sync;
        self.sandboxes
            .get_or_create(&StateLabels { state: "in_sync" })
            .set(in_sync);
        self.sandboxes
            .get_or_create(&StateLabels { state: "out_of_sync" })
            .set(out);
        self.engine_connected.set(i64::from(status.docker.connected));
    }

    /// Read every target's IPVS counters, at most [`NAMESPACE_READS`] at once, within
    /// the read timeout.
    async fn refresh_backends(&self, targets: Vec<Target>) {
        let wanted: Vec<PathBuf> = targets.iter().map(|t| t.netns.clone()).collect();
        let results = read_all(
            Arc::clone(&self.reader),
            targets,
            NAMESPACE_READS,
            self.read_timeout,
        )
        .await;
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
            warn!(timed_out = outcome.timed_out, timeout = ?self.read_timeout,
                "metrics scrape: some namespaces' IPVS counters were not read in time; their last values are shown");
        }
    }
}

/// The state a task is counted in: `serving` when it takes new connections, else its
/// status state.
fn task_state(serving: bool, state: &str) -> &'static str {
    if serving {
        return "serving";
    }
    TASK_STATES
        .iter()
        .find(|s| **s == state)
        .copied()
        .unwrap_or("other")
}

/// One namespace to read, and vipd's fwmark services in it with their service's name.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    netns: PathBuf,
    marks: Vec<(FwMark, String)>,
}

/// The namespaces a scrape reads: every sandbox of the status with the fwmarks of its
/// VIP services, and the ingress namespace with the fwmarks of the published ports.
fn targets(status: &Status, ingress: Option<&Path>) -> Vec<Target> {
    let vip_marks: BTreeMap<&str, FwMark> = status
        .services
        .iter()
        .filter_map(|s| Some((s.name.as_str(), FwMark::new(s.fwmark?)?)))
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
fn ingress_marks(status: &Status) -> Vec<(FwMark, String)> {
    status
        .services
        .iter()
        .flat_map(|s| {
            s.published
                .iter()
                .filter_map(|p| labels::parse_publish(p).ok())
                .flatten()
                .map(|p| (mesh::ingress_mark(p.protocol, p.published), s.name.clone()))
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

/// Read one target with `reader` (blocking: it enters the namespace).
fn read_target(reader: &NamespaceReader, target: &Target) -> Result<Vec<Sample>, ReadError> {
    let marks: Vec<FwMark> = target.marks.iter().map(|(m, _)| *m).collect();
    let names: BTreeMap<FwMark, &str> = target.marks.iter().map(|(m, n)| (*m, n.as_str())).collect();
    let read = reader(&target.netns, &marks)?;
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
    reader: NamespaceReader,
    targets: Vec<Target>,
    limit: usize,
    timeout: Duration,
) -> Vec<Read> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut reads = futures::stream::iter(targets)
        .map(|target| {
            let reader = Arc::clone(&reader);
            async move {
                let netns = target.netns.clone();
                let read = tokio::task::spawn_blocking(move || read_target(&reader, &target))
                    .await
                    .unwrap_or_else(|e| Err(ReadError::Failed(format!("the read failed: {e}"))));
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

/// The IPVS table of the namespace `netns`: the destinations of the services of `marks`
/// that it has.
pub fn read_kernel(netns: &Path, marks: &[FwMark]) -> Result<Vec<(FwMark, Destination)>, ReadError> {
    let ns = crate::netns::NetnsPath::from_arg(&netns.display().to_string());
    let read = crate::netns::run_in(&ns, || -> Result<_, crate::ipvs::IpvsError> {
        let mut ipvs = crate::ipvs::netlink::NetlinkIpvs::open()?;
        let keys: Vec<ServiceKey> = marks.iter().map(|m| ServiceKey::fwmark(*m)).collect();
        let present = ipvs.services_including(&keys)?;
        let mut out = Vec::new();
        for mark in marks {
            let key = ServiceKey::fwmark(*mark);
            if present.iter().any(|s| s.key == key) {
                out.extend(ipvs.destinations(&key)?.into_iter().map(|d| (*mark, d)));
            }
        }
        Ok(out)
    });
    match read {
        Ok(Ok(read)) => Ok(read),
        Ok(Err(e)) => Err(ReadError::Failed(e.to_string())),
        Err(crate::netns::NetnsError::Open { .. }) => Err(ReadError::Vanished),
        Err(e) => Err(ReadError::Failed(e.to_string())),
    }
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
                Err(ReadError::Failed(e)) => {
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
struct BackendCollector(Arc<Mutex<Backends>>);

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

/// The metrics endpoint: bound, not serving yet.
pub struct MetricsServer {
    listener: TcpListener,
    addr: SocketAddr,
    metrics: Metrics,
}

impl MetricsServer {
    /// Listen on `addr`; a failure names the address.
    pub async fn bind(addr: SocketAddr, metrics: Metrics) -> Result<Self, MetricsError> {
        let bind_error = |error| MetricsError::Bind { addr, error };
        let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        Ok(MetricsServer {
            listener,
            addr,
            metrics,
        })
    }

    /// The address bound (its port chosen when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answer scrapes until `shutdown`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        info!(listen = %self.addr, "metrics served");
        let slots = Arc::new(Semaphore::new(CONNECTIONS));
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => return,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                        debug!(%peer, "metrics: too many connections; closed");
                        continue;
                    };
                    let metrics = self.metrics.clone();
                    tokio::spawn(async move {
                        if let Err(error) = answer(stream, &metrics).await {
                            debug!(%peer, %error, "metrics: connection failed");
                        }
                        drop(slot);
                    });
                }
                Err(error) => {
                    warn!(%error, "metrics: cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Answer the one request of a connection, then close it.
async fn answer(mut stream: TcpStream, metrics: &Metrics) -> io::Result<()> {
    let head = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request in time"))??;
    let response = respond(&head, metrics).await;
    stream.write_all(&response).await?;
    stream.shutdown().await
}

/// The request head: up to the blank line, at most [`MAX_REQUEST_HEAD`] bytes.
async fn read_head(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head_complete(&head) {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the request ended early",
            ));
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the request head is too large",
            ));
        }
    }
    Ok(head)
}

fn head_complete(head: &[u8]) -> bool {
    head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n")
}

/// The method and path of a request head's first line.
fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut words = line.split(' ');
    let (method, target, version) = (words.next()?, words.next()?, words.next()?);
    if words.next().is_some() || !version.starts_with("HTTP/1.") {
        return None;
    }
    Some((method, target.split('?').next().unwrap_or(target)))
}

/// The whole response to a request head.
async fn respond(head: &[u8], metrics: &Metrics) -> Vec<u8> {
    match request_line(head) {
        None => response("400 Bad Request", "text/plain", b"bad request\n", true),
        Some((_, path)) if path != "/metrics" => {
            response("404 Not Found", "text/plain", b"not found\n", true)
        }
        Some((method, _)) if method != "GET" && method != "HEAD" => {
            response("405 Method Not Allowed", "text/plain", b"GET only\n", true)
        }
        Some((method, _)) => match metrics.render().await {
            Ok(body) => response("200 OK", CONTENT_TYPE, body.as_bytes(), method == "GET"),
            Err(error) => {
                warn!(%error, "metrics scrape failed");
                response(
                    "500 Internal Server Error",
                    "text/plain",
                    b"scrape failed\n",
                    true,
                )
            }
        },
    }
}

/// An HTTP/1.1 response that closes the connection; the body only when `with_body`.
fn response(status: &str, content_type: &str, body: &[u8], with_body: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if with_body {
        out.extend_from_slice(body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ipvs::{DestConfig, DestKey, Stats};
    use crate::core::status::{EngineState, SandboxStatus, ServiceStatus, TaskStatus};

    fn task(name: &str, state: &str, serving: bool) -> TaskStatus {
        TaskStatus {
            container: format!("{name}000000"),
            name: name.to_owned(),
            addresses: vec![],
            state: state.to_owned(),
            serving,
            weight: 1,
        }
    }

    fn sandbox(path: &str, services: &[&str], in_sync: bool) -> SandboxStatus {
        SandboxStatus {
            path: path.into(),
            container: String::new(),
            services: services.iter().map(|s| s.to_string()).collect(),
            in_sync,
            error: None,
            last_operations: 0,
            last_change: 0,
        }
    }

    /// web (vip, fwmark 256, publishes 8080) with 3 tasks, db (dnsrr) with 1; two
    /// sandboxes, one gone, and the ingress.
    fn status() -> Status {
        Status {
            docker: EngineState {
                connected: true,
                error: None,
            },
            last_sync: 1,
            last_resync: 1,
            services: vec![
                ServiceStatus {
                    name: "web".into(),
                    mode: "vip".into(),
                    vip: Some("10.253.0.1".parse().unwrap()),
                    fwmark: Some(256),
                    scheduler: "rr".into(),
                    published: vec!["8080:80/tcp".into()],
                    tasks: vec![
                        task("w1", "running", true),
                        task("w2", "healthy", true),
                        task("w3", "draining", false),
                    ],
                    errors: vec![],
                },
                ServiceStatus {
                    name: "db".into(),
                    mode: "dnsrr".into(),
                    vip: None,
                    fwmark: None,
                    scheduler: "rr".into(),
                    published: vec![],
                    tasks: vec![task("d1", "starting", false)],
                    errors: vec![],
                },
            ],
            sandboxes: vec![
                sandbox("/ns/a", &["web", "db"], true),
                sandbox("/ns/b", &["web"], false),
                sandbox("/ns/gone", &["web"], true),
                sandbox("/ns/ingress", &["web"], true),
            ],
            label_errors: vec![],
        }
    }

    fn dest(ip: &str, conns: u64) -> Destination {
        Destination {
            key: DestKey {
                addr: ip.parse().unwrap(),
                port: 0,
            },
            config: DestConfig::masq(1),
            active_conns: 1,
            inactive_conns: 0,
            persist_conns: 0,
            stats: Stats {
                conns,
                inbytes: conns * 100,
                outbytes: conns * 1000,
                ..Stats::default()
            },
        }
    }

    /// Each namespace's table as the kernel would show it: 10.1.0.3 and 10.1.0.4 behind
    /// web in /ns/a and /ns/b (4 and 6 connections each), 10.1.0.3 behind port 8080 in
    /// the ingress (5); /ns/gone has vanished.
    fn fake_reader(netns: &Path, marks: &[FwMark]) -> Result<Vec<(FwMark, Destination)>, ReadError> {
        let web = FwMark::new(256).unwrap();
        let published = mesh::ingress_mark(labels::PortProtocol::Tcp, 8080);
        match netns.to_str().unwrap() {
            "/ns/a" | "/ns/b" => {
                assert_eq!(marks, [web]);
                let n = if netns.ends_with("a") { 4 } else { 6 };
                Ok(vec![(web, dest("10.1.0.3", n)), (web, dest("10.1.0.4", n))])
            }
            "/ns/ingress" => {
                assert_eq!(marks, [published]);
                Ok(vec![(published, dest("10.1.0.3", 5))])
            }
            _ => Err(ReadError::Vanished),
        }
    }

    fn followed(reader: NamespaceReader, timeout: Duration) -> (Metrics, watch::Sender<Status>) {
        let metrics = Metrics::with_reader(reader, timeout);
        let (tx, rx) = watch::channel(status());
        metrics.follow(rx, Some("/ns/ingress".into()));
        (metrics, tx)
    }

    fn assert_has(text: &str, lines: &[&str]) {
        for line in lines {
            assert!(text.lines().any(|l| l == *line), "no line {line:?} in:\n{text}");
        }
    }

    #[tokio::test]
    async fn a_scrape_shows_what_the_handle_was_told_and_what_the_status_says() {
        let (metrics, _tx) = followed(Arc::new(fake_reader), BACKEND_READ_TIMEOUT);
        metrics.reconcile_done(ReconcileKind::Resync, Duration::from_millis(20), 7);
        metrics.reconcile_done(ReconcileKind::Event, Duration::from_millis(2), 1);
        metrics.reconcile_done(ReconcileKind::Event, Duration::from_millis(3), 0);
        metrics.error(ErrorKind::Sandbox);
        metrics.error(ErrorKind::Sandbox);
        metrics.dns_answered(DnsPath::Fast, 1, 0, Duration::from_micros(20));
        metrics.dns_answered(DnsPath::Slow, 28, 3, Duration::from_millis(1));
        metrics.dns_answered(DnsPath::Slow, 999, 2, Duration::from_secs(2));
        let text = metrics.render().await.unwrap();
        assert_has(
            &text,
            &[
                "# TYPE vipd_services gauge",
                "vipd_services{mode=\"vip\"} 1",
                "vipd_services{mode=\"dnsrr\"} 1",
                "vipd_tasks{state=\"serving\"} 2",
                "vipd_tasks{state=\"draining\"} 1",
                "vipd_tasks{state=\"starting\"} 1",
                "vipd_tasks{state=\"stopped\"} 0",
                "vipd_sandboxes{state=\"in_sync\"} 3",
                "vipd_sandboxes{state=\"out_of_sync\"} 1",
                "vipd_engine_connected 1",
                "# TYPE vipd_reconcile_passes counter",
                "vipd_reconcile_passes_total{kind=\"event\"} 2",
                "vipd_reconcile_passes_total{kind=\"resync\"} 1",
                "vipd_reconcile_passes_total{kind=\"drain\"} 0",
                "# TYPE vipd_reconcile_duration_seconds histogram",
                "vipd_reconcile_duration_seconds_count{kind=\"event\"} 2",
                "vipd_reconcile_duration_seconds_bucket{le=\"0.025\",kind=\"resync\"} 1",
                "vipd_reconcile_operations_total 8",
                "vipd_errors_total{kind=\"sandbox\"} 2",
                "vipd_errors_total{kind=\"engine\"} 0",
                "vipd_dns_queries_total{path=\"fast\",qtype=\"A\",rcode=\"NOERROR\"} 1",
                "vipd_dns_queries_total{path=\"slow\",qtype=\"AAAA\",rcode=\"NXDOMAIN\"} 1",
                "vipd_dns_queries_total{path=\"slow\",qtype=\"other\",rcode=\"SERVFAIL\"} 1",
                "vipd_dns_answer_duration_seconds_count{path=\"slow\"} 2",
                "vipd_dns_answer_duration_seconds_bucket{le=\"0.0001\",path=\"fast\"} 1",
                // Summed over /ns/a, /ns/b and the ingress; /ns/gone is left out.
                "# TYPE vipd_backend_connections counter",
                "vipd_backend_connections_total{service=\"web\",backend=\"10.1.0.3\"} 15",
                "vipd_backend_connections_total{service=\"web\",backend=\"10.1.0.4\"} 10",
                "vipd_backend_incoming_bytes_total{service=\"web\",backend=\"10.1.0.3\"} 1500",
                "vipd_backend_outgoing_bytes_total{service=\"web\",backend=\"10.1.0.4\"} 10000",
                "vipd_backend_connections_active{service=\"web\",backend=\"10.1.0.3\"} 3",
                "vipd_backend_scrape_namespaces{outcome=\"read\"} 3",
                "vipd_backend_scrape_namespaces{outcome=\"vanished\"} 1",
                "# EOF",
            ],
        );
    }

    #[tokio::test]
    async fn a_disabled_handle_counts_nothing() {
        let metrics = Metrics::disabled();
        metrics.error(ErrorKind::Engine);
        metrics.reconcile_done(ReconcileKind::Drain, Duration::from_millis(1), 3);
        assert!(!metrics.is_enabled());
        assert_eq!(metrics.render().await.unwrap(), "# EOF\n");
    }

    #[test]
    fn the_ingress_reads_the_marks_of_the_published_ports_and_dnsrr_services_have_none() {
        let got = targets(&status(), Some(Path::new("/ns/ingress")));
        let web = FwMark::new(256).unwrap();
        let ingress = mesh::ingress_mark(labels::PortProtocol::Tcp, 8080);
        let want: Vec<(&str, Vec<FwMark>)> = vec![
            ("/ns/a", vec![web]),
            ("/ns/b", vec![web]),
            ("/ns/gone", vec![web]),
            ("/ns/ingress", vec![ingress]),
        ];
        let got: Vec<(&str, Vec<FwMark>)> = got
            .iter()
            .map(|t| {
                (
                    t.netns.to_str().unwrap(),
                    t.marks.iter().map(|(m, _)| *m).collect(),
                )
            })
            .collect();
        assert_eq!(got, want);
    }

    /// A namespace that fails, or is not read in time, keeps its last values; one that
    /// is no longer in the status is forgotten.
    #[tokio::test]
    async fn a_failed_or_slow_read_keeps_the_last_values() {
        let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&slow);
        let reader: NamespaceReader = Arc::new(move |netns: &Path, marks: &[FwMark]| {
            if flag.load(std::sync::atomic::Ordering::SeqCst) {
                if netns == Path::new("/ns/a") {
                    std::thread::sleep(Duration::from_millis(600));
                }
                if netns == Path::new("/ns/b") {
                    return Err(ReadError::Failed("this kernel has no IPVS".into()));
                }
            }
            fake_reader(netns, marks)
        });
        let (metrics, tx) = followed(reader, Duration::from_millis(300));
        let line = "vipd_backend_connections_total{service=\"web\",backend=\"10.1.0.4\"} 10";
        assert_has(&metrics.render().await.unwrap(), &[line]);

        slow.store(true, std::sync::atomic::Ordering::SeqCst);
        let started = std::time::Instant::now();
        let text = metrics.render().await.unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(550),
            "{:?}",
            started.elapsed()
        );
        assert_has(
            &text,
            &[
                line,
                "vipd_backend_scrape_namespaces{outcome=\"failed\"} 1",
                "vipd_backend_scrape_namespaces{outcome=\"timed_out\"} 1",
            ],
        );

        tx.send_modify(|s| s.sandboxes.retain(|sb| sb.path != Path::new("/ns/a")));
        let text = metrics.render().await.unwrap();
        assert_has(
            &text,
            &["vipd_backend_connections_total{service=\"web\",backend=\"10.1.0.4\"} 6"],
        );
    }

    #[test]
    fn labels_are_a_small_fixed_set() {
        assert_eq!(
            [1, 28, 33, 12, 4242].map(qtype_label),
            ["A", "AAAA", "SRV", "PTR", "other"]
        );
        assert_eq!(
            [0, 3, 5, 9].map(rcode_label),
            ["NOERROR", "NXDOMAIN", "REFUSED", "other"]
        );
        assert_eq!(task_state(true, "running"), "serving");
        assert_eq!(task_state(false, "unhealthy"), "unhealthy");
        assert_eq!(task_state(false, "odd"), "other");
    }

    /// `request` sent over a real loopback connection; the whole response.
    async fn ask(addr: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
            .await
            .expect("the server closes the connection")
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn the_server_answers_get_metrics_and_404_for_anything_else() {
        let (metrics, _tx) = followed(Arc::new(fake_reader), BACKEND_READ_TIMEOUT);
        metrics.error(ErrorKind::Host);
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap(), metrics)
            .await
            .unwrap();
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));

        let ok = ask(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
        )
        .await;
        let (head, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains(&format!("Content-Type: {CONTENT_TYPE}\r\n")),
            "{head}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{head}"
        );
        assert!(head.contains("Connection: close"), "{head}");
        assert_has(body, &["vipd_errors_total{kind=\"host\"} 1", "# EOF"]);
        let with_query = ask(addr, "GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(with_query.starts_with("HTTP/1.1 200 OK\r\n"), "{with_query}");

        for (request, status) in [
            ("GET / HTTP/1.1\r\nHost: x\r\n\r\n", "404 Not Found"),
            ("GET /metricsx HTTP/1.1\r\n\r\n", "404 Not Found"),
            (
                "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                "405 Method Not Allowed",
            ),
            ("hello\r\n\r\n", "400 Bad Request"),
        ] {
            let got = ask(addr, request).await;
            assert!(
                got.starts_with(&format!("HTTP/1.1 {status}\r\n")),
                "{request:?}: {got}"
            );
        }
        let head_only = ask(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(head_only.ends_with("\r\n\r\n"), "no body: {head_only}");

        stop.send(()).unwrap();
        serving.await.unwrap();
    }

    #[tokio::test]
    async fn a_bind_failure_names_the_address() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let Err(e) = MetricsServer::bind(addr, Metrics::new()).await else {
            panic!("bound {addr} twice");
        };
        assert!(
            e.to_string()
                .starts_with(&format!("cannot serve metrics on {addr}: ")),
            "{e}"
        );
    }
}
