//! The registry: what is counted, and the [`Metrics`] handle the daemon counts with.
//! The status gauges are set from the agent's status at each scrape; the per-backend
//! counters come from the kernel scrape ([`super::scrape`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::watch;

use super::scrape::{IpvsCounters, Scraper};
use super::{MetricsError, BACKEND_READ_TIMEOUT};
use crate::core::model::EndpointMode;
use crate::core::status::{Report, TaskState};

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
    store_connected: Gauge,
    cluster_peers: Gauge,
    store_watch_lag: Gauge<f64, std::sync::atomic::AtomicU64>,
    store_lists: Counter,
    /// The store's list count as of the last scrape: the counter grows by what was
    /// listed since.
    store_lists_seen: std::sync::atomic::AtomicU64,
    dns_queries: Family<DnsLabels, Counter>,
    dns_durations: Histograms<PathLabels>,
    scraper: Scraper,
    source: Mutex<Option<Source>>,
    /// One scrape at a time: each reads the kernel, then encodes what it read.
    scrape: tokio::sync::Mutex<()>,
}

/// What a scrape reads: the agent's status, and which namespace is the ingress.
struct Source {
    status: watch::Receiver<Report>,
    ingress: Option<PathBuf>,
}

impl Metrics {
    /// Metrics that read no kernel counters: the per-backend series stay empty.
    pub fn new() -> Self {
        Metrics(Some(Arc::new(Inner::new(Scraper::new(
            None,
            BACKEND_READ_TIMEOUT,
        )))))
    }

    /// Metrics that read each namespace's per-backend IPVS counters with `counters`,
    /// each scrape within `timeout` ([`BACKEND_READ_TIMEOUT`] in `vipd run`).
    pub fn with_counters(counters: Arc<dyn IpvsCounters>, timeout: Duration) -> Self {
        Metrics(Some(Arc::new(Inner::new(Scraper::new(Some(counters), timeout)))))
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
    pub fn follow(&self, status: watch::Receiver<Report>, ingress: Option<PathBuf>) {
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
            inner.scraper.refresh(&status, ingress.as_deref()).await;
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &inner.registry)
            .map_err(|_| MetricsError::Encode)?;
        Ok(out)
    }
}

impl Inner {
    fn new(scraper: Scraper) -> Self {
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
            store_connected: Gauge::default(),
            cluster_peers: Gauge::default(),
            store_watch_lag: Gauge::default(),
            store_lists: Counter::default(),
            store_lists_seen: std::sync::atomic::AtomicU64::new(0),
            dns_queries: Family::default(),
            dns_durations: Family::new_with_constructor(dns_histogram),
            scraper,
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
            "store_connected",
            "Whether the cluster store answers (1) or not (0); 0 on one host",
            self.store_connected.clone(),
        );
        r.register(
            "cluster_peers",
            "The other live nodes of the cluster; 0 on one host",
            self.cluster_peers.clone(),
        );
        r.register(
            "store_watch_lag_seconds",
            "How long this node's snapshot of the cluster store took to reach a revision read in the store (measured once per lease TTL; a probe still waiting counts); 0 on one host",
            self.store_watch_lag.clone(),
        );
        r.register(
            "store_lists",
            "Lists of the cluster store: the first, and each re-list after a compaction or an outage (the watch's restarts)",
            self.store_lists.clone(),
        );
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
        r.register_collector(Box::new(self.scraper.collector()));
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
    fn snapshot(&self) -> Option<(Report, Option<PathBuf>)> {
        let source = self.source.lock().unwrap_or_else(PoisonError::into_inner);
        source
            .as_ref()
            .map(|s| (s.status.borrow().clone(), s.ingress.clone()))
    }

    fn set_gauges(&self, status: &Report) {
        for (mode, name) in [(EndpointMode::Vip, "vip"), (EndpointMode::Dnsrr, "dnsrr")] {
            let n = status.services.iter().filter(|s| s.mode == mode).count();
            self.services
                .get_or_create(&ModeLabels { mode: name })
                .set(n as i64);
        }
        let mut tasks: BTreeMap<&'static str, i64> = TASK_STATES.iter().map(|s| (*s, 0)).collect();
        for task in status.services.iter().flat_map(|s| &s.tasks) {
            *tasks.entry(task_state(task.serving, task.state)).or_default() += 1;
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
        let cluster = status.cluster.as_ref();
        self.store_connected
            .set(i64::from(cluster.is_some_and(|c| c.store_connected)));
        let peers = cluster.map_or(0, |c| c.nodes.iter().filter(|n| n.name != c.node).count());
        self.cluster_peers.set(peers as i64);
        self.store_watch_lag
            .set(cluster.and_then(|c| c.store_watch_lag_ms).unwrap_or(0) as f64 / 1000.0);
        if let Some(c) = cluster {
            let seen = self
                .store_lists_seen
                .fetch_max(c.store_lists, std::sync::atomic::Ordering::Relaxed);
            self.store_lists.inc_by(c.store_lists.saturating_sub(seen));
        }
    }
}

/// The state a task is counted in: `serving` when it takes new connections, else its
/// status state.
pub(super) fn task_state(serving: bool, state: TaskState) -> &'static str {
    if serving {
        return "serving";
    }
    match state {
        TaskState::Starting => "starting",
        TaskState::Unhealthy => "unhealthy",
        TaskState::Draining => "draining",
        TaskState::Drained => "drained",
        TaskState::Stopped => "stopped",
        // Running or healthy, yet not serving.
        TaskState::Running | TaskState::Healthy => "other",
    }
}
