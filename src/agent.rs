//! `vipd run`: follow the Docker engine and keep every sandbox's VIPs in step.
//!
//! Level-triggered, like the per-namespace reconciler: events only say *which container*
//! to look at again; one `sync` computes from all known containers what every sandbox
//! should have and programs the sandboxes whose desired state changed, concurrently. A
//! periodic resync re-lists every container and re-reads every sandbox from the kernel,
//! so a missed event or a hand-made change never lasts longer than one interval. When
//! the event stream fails, vipd reconnects with backoff and re-lists.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use tracing::{info, info_span, warn, Instrument};

use crate::core::alloc::Allocations;
use crate::core::cluster::{Attachment, Container, ContainerId, Drain, Health};
use crate::core::firewall::{MarkedService, Rule};
use crate::core::ipvs::Timeouts;
use crate::core::labels::{self, EndpointMode};
use crate::core::mesh::{self, IngressLink, PortKey};
use crate::core::model::{Ipv4Net, ServiceName};
use crate::core::plan::SysctlSettings;
use crate::core::spec::SandboxSpec;
use crate::core::status::{self, EngineState, SandboxStatus, Status};
use crate::core::topology;
use crate::dns::server::CatalogHandle;
use crate::docker::{ContainerInfo, Engine, EngineError, EngineEvent, NetworkInfo};
use crate::metrics::{ErrorKind, Metrics, ReconcileKind};

/// Container inspects of one batch of events that may be in flight at once.
const INSPECTS_IN_FLIGHT: usize = 16;

/// How soon a listing that failed (while the event stream still runs) is tried again.
const RELIST_RETRY: Duration = Duration::from_secs(5);
use crate::netns::NetnsPath;
use crate::reconcile;
use crate::state::{StateError, StateStore};

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub pool: Ipv4Net,
    pub state_dir: PathBuf,
    /// How long a service with no task keeps its VIP.
    pub grace: Duration,
    /// How often everything is re-listed and re-read.
    pub resync: Duration,
    /// How long to gather more events before syncing.
    pub debounce: Duration,
    pub sysctls: SysctlSettings,
    pub dns_domain: Option<String>,
    pub dns_ttl: u32,
    /// The routing mesh's ingress namespace; `None`: no port is published.
    pub ingress: Option<IngressTarget>,
    /// How long a task that is being stopped, or turned unhealthy, stays a backend at
    /// weight 0 while it still runs (its open connections finish); then it is removed.
    /// A task that dies first is removed at once.
    pub drain_grace: Duration,
    /// The IPVS connection timeouts of every namespace vipd programs; `None`: the
    /// kernel's (tcp 900 s, tcpfin 120 s, udp 300 s).
    pub timeouts: Option<Timeouts>,
    /// Where reconcile passes and errors are counted (a disabled handle counts nothing).
    pub metrics: Metrics,
}

/// Why a task is leaving its services.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Leaving {
    /// The engine sent it this signal (`docker stop`, `docker kill`).
    Signal(String),
    /// Its health check failed.
    Unhealthy,
}

/// Whether a kill event's signal (a number, as Docker 20.10 sends it, or a name) asks the
/// task to stop. SIGHUP, SIGUSR1 and SIGUSR2 are taken to ask for a reload, a log rotation
/// or a report, not an exit; a task sent one of them stays a backend.
pub fn signal_stops(signal: &str) -> bool {
    let name = signal.trim().to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    !matches!(name, "1" | "10" | "12" | "HUP" | "USR1" | "USR2")
}

/// The ingress namespace the routing mesh programs, and its link to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressTarget {
    /// The namespace (`/run/netns/NAME`).
    pub netns: PathBuf,
    pub link: IngressLink,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    State(#[from] StateError),
}

/// Why a sandbox was not programmed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgramError {
    /// Its namespace is gone, or going: no such file, or no longer a namespace (Docker
    /// tears a sandbox down when its container stops, maybe while vipd programs it).
    #[error("the namespace is gone: {0}")]
    Gone(String),
    #[error("{0}")]
    Failed(String),
}

impl From<&str> for ProgramError {
    fn from(e: &str) -> Self {
        ProgramError::Failed(e.to_owned())
    }
}

/// Programs one sandbox; the real one enters the namespace, tests use a recorder.
pub trait SandboxProgrammer: Send + Sync {
    /// Bring `sandbox` to `spec`; returns how many operations were applied. With `full`,
    /// the sandbox is read from the kernel first; without, the programmer may work from
    /// what it knows of the sandbox since the last call. (`spec` is shared: sandboxes on
    /// the same networks get the same one.)
    fn program(
        &self,
        sandbox: &Path,
        spec: &Arc<SandboxSpec>,
        sysctls: &SysctlSettings,
        full: bool,
    ) -> Result<usize, ProgramError>;

    /// The sandbox is gone (its container stopped): forget what is kept of it.
    fn forget(&self, _sandbox: &Path) {}

    /// Bring vipd's chains in the host's own namespace (the routing mesh's DNAT,
    /// masquerade and forward rules) to `rules`; returns how many operations were applied.
    fn program_host(&self, rules: &[Rule]) -> Result<usize, String>;

    /// The ports with a socket bound on the host (they cannot be published).
    fn bound_ports(&self) -> Result<BTreeSet<PortKey>, String>;

    /// The services vipd's rules in `sandbox` describe (name, VIP, fwmark): what the
    /// kernel says was allocated, when the saved allocations are lost.
    fn marked_services(&self, sandbox: &Path) -> Result<Vec<MarkedService>, String>;
}

/// The real kernel. A full program reads the namespace and reconciles it
/// ([`reconcile::reconcile_netns_kept`]); otherwise the change from the spec last applied
/// is planned against the view kept since ([`reconcile::update_netns`]), so a backend
/// change is a few IPVS messages, and as cheap with many services as with few: no
/// process, no dump.
#[derive(Debug, Default)]
pub struct KernelProgrammer {
    kept: std::sync::Mutex<BTreeMap<PathBuf, KeptSandbox>>,
}

/// What [`KernelProgrammer`] knows of a sandbox: what the kernel holds, and the spec that
/// brought it there.
#[derive(Debug)]
struct KeptSandbox {
    seen: crate::core::plan::ObservedSandbox,
    spec: Arc<SandboxSpec>,
}

impl SandboxProgrammer for KernelProgrammer {
    fn program(
        &self,
        sandbox: &Path,
        spec: &Arc<SandboxSpec>,
        sysctls: &SysctlSettings,
        full: bool,
    ) -> Result<usize, ProgramError> {
        let ns = NetnsPath::from_arg(&sandbox.display().to_string());
        let kept = if full {
            None
        } else {
            self.kept.lock().ok().and_then(|mut k| k.remove(sandbox))
        };
        let result = match kept {
            Some(KeptSandbox { mut seen, spec: prev }) => {
                reconcile::update_netns(&ns, &mut seen, Some(&prev), spec, sysctls).map(|o| (o, seen))
            }
            None => reconcile::reconcile_netns_kept(&ns, spec, sysctls),
        };
        match result {
            Ok((outcome, seen)) => {
                if let Ok(mut k) = self.kept.lock() {
                    let spec = Arc::clone(spec);
                    k.insert(sandbox.to_owned(), KeptSandbox { seen, spec });
                }
                Ok(outcome.applied)
            }
            // Nothing is kept after an error: the next call reads the kernel again.
            Err(e) => Err(match &e {
                reconcile::ReconcileError::Netns(n) if n.is_absent() || n.is_not_netns() => {
                    ProgramError::Gone(e.to_string())
                }
                _ => ProgramError::Failed(e.to_string()),
            }),
        }
    }

    fn marked_services(&self, sandbox: &Path) -> Result<Vec<MarkedService>, String> {
        use crate::firewall::Firewall as _;
        let ns = NetnsPath::from_arg(&sandbox.display().to_string());
        let text = crate::netns::run_in(&ns, || crate::firewall::Iptables::default().save())
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        Ok(crate::core::firewall::parse_save(&text).marked_services())
    }

    fn forget(&self, sandbox: &Path) {
        if let Ok(mut k) = self.kept.lock() {
            k.remove(sandbox);
        }
    }

    fn program_host(&self, rules: &[Rule]) -> Result<usize, String> {
        let ops = reconcile::host_firewall(&mut crate::firewall::Iptables::default(), rules)
            .map_err(|e| e.to_string())?;
        for op in &ops {
            info!(op = %op, "host rule changed");
        }
        Ok(ops.len())
    }

    fn bound_ports(&self) -> Result<BTreeSet<PortKey>, String> {
        let ports = crate::ingress::bound_ports().map_err(|e| e.to_string())?;
        Ok(ports.into_iter().collect())
    }
}

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub sandboxes_programmed: usize,
    pub operations: usize,
    pub errors: Vec<String>,
}

/// The agent's state.
pub struct Agent {
    engine: Arc<dyn Engine>,
    programmer: Arc<dyn SandboxProgrammer>,
    cfg: AgentConfig,
    store: StateStore,
    allocs: Allocations,
    containers: BTreeMap<ContainerId, Container>,
    /// What each sandbox was last brought to successfully, and its container's own
    /// addresses then (when they change, the sandbox is read again: SNAT rules follow them).
    applied: BTreeMap<PathBuf, (Arc<SandboxSpec>, Vec<Attachment>)>,
    reported: BTreeSet<String>,
    dns: Option<CatalogHandle>,
    /// Each sandbox's last outcome, for `vipd status`.
    sandboxes: BTreeMap<PathBuf, SandboxStatus>,
    /// Sandboxes last found gone while still wanted: their container's stop is on its
    /// way. Gone again at the next sync, it is an error.
    vanishing: BTreeSet<PathBuf>,
    engine_state: EngineState,
    last_resync: u64,
    status: tokio::sync::watch::Sender<Status>,
    networks: tokio::sync::watch::Sender<Vec<NetworkInfo>>,
    /// Which service holds each published port.
    holders: BTreeMap<PortKey, ServiceName>,
    /// The host rules last applied; `None` until they are (or after an error).
    host_applied: Option<Vec<Rule>>,
    /// Tasks on their way out: since when, and why (see [`AgentConfig::drain_grace`]).
    leaving: BTreeMap<ContainerId, (tokio::time::Instant, Leaving)>,
    /// The saved allocations were missing or unreadable: the first full sync takes the
    /// VIPs and fwmarks vipd's rules show in the sandboxes before allocating new ones.
    recover: bool,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The core's view of a container.
pub fn container_from(info: &ContainerInfo) -> Container {
    Container {
        id: info.id.clone(),
        name: info.name.clone(),
        labels: info.labels.clone(),
        running: info.running,
        health: info.health,
        sandbox: info.sandbox_key.clone(),
        attachments: info
            .networks
            .iter()
            .filter_map(|n| {
                n.ip.map(|ip| Attachment {
                    network: n.network_id.clone(),
                    ip,
                    prefix_len: n.prefix_len,
                })
            })
            .collect(),
        drain: Drain::No,
    }
}

/// The engine's event stream.
type Events = futures::stream::BoxStream<'static, Result<EngineEvent, EngineError>>;

/// A stream that never yields: for a call made with no event stream to read meanwhile.
fn no_events() -> Events {
    futures::stream::pending().boxed()
}

/// One container's inspect: what the engine said of it.
type Inspected = (ContainerId, Result<Option<ContainerInfo>, EngineError>);

/// What the event stream gave while the agent waited on the engine.
#[derive(Default)]
struct Kept {
    /// Events to look at once the wait is over.
    events: Vec<EngineEvent>,
    /// Why the stream failed, if it did (the agent reconnects after the wait).
    lost: Option<String>,
}

/// The containers a batch of events asks to inspect (each once), and whether the
/// networks changed. A kill event changes nothing Docker would show (the task still runs):
/// its drain is noted apart, without waiting for an inspect, which a busy engine answers
/// slowly.
fn to_inspect(events: &[EngineEvent]) -> (Vec<ContainerId>, bool) {
    let mut ids: Vec<ContainerId> = Vec::new();
    let mut networks_changed = false;
    for event in events {
        match event {
            EngineEvent::Container { id, action, .. } if !action.starts_with("exec_") && action != "kill" => {
                ids.push(id.clone())
            }
            EngineEvent::Network {
                container: Some(id), ..
            } => ids.push(id.clone()),
            EngineEvent::Network { action, .. }
                if matches!(action.as_str(), "create" | "destroy" | "remove") =>
            {
                networks_changed = true
            }
            _ => {}
        }
    }
    let mut seen = BTreeSet::new();
    ids.retain(|id| seen.insert(id.clone()));
    (ids, networks_changed)
}

/// Inspect `ids`, at most [`INSPECTS_IN_FLIGHT`] at once.
async fn inspect_all(engine: Arc<dyn Engine>, ids: Vec<ContainerId>) -> Vec<Inspected> {
    futures::stream::iter(ids)
        .map(|id| {
            let engine = Arc::clone(&engine);
            async move {
                let answer = engine.inspect(&id).await;
                (id, answer)
            }
        })
        .buffer_unordered(INSPECTS_IN_FLIGHT)
        .collect()
        .await
}

impl Agent {
    /// An agent with its saved allocations (a corrupt state file is reported and set
    /// aside: allocations start again from what Docker says).
    pub fn new(
        engine: Arc<dyn Engine>,
        programmer: Arc<dyn SandboxProgrammer>,
        cfg: AgentConfig,
        dns: Option<CatalogHandle>,
    ) -> Result<Self, AgentError> {
        let store = StateStore::open(&cfg.state_dir)?;
        let (mut allocs, recover) = match store.load() {
            Ok(Some(a)) => (a, false),
            Ok(None) => (Allocations::default(), true),
            Err(e @ StateError::Corrupt { .. }) => {
                warn!(error = %e, "starting with no saved allocations: the VIPs in use are read back from the sandboxes");
                (Allocations::default(), true)
            }
            Err(e) => return Err(e.into()),
        };
        for gone in allocs.retain_pool(cfg.pool) {
            warn!(service = %gone, pool = %cfg.pool, "saved VIP is outside the pool: the service gets a new one");
        }
        Ok(Agent {
            engine,
            programmer,
            cfg,
            store,
            allocs,
            containers: BTreeMap::new(),
            applied: BTreeMap::new(),
            reported: BTreeSet::new(),
            dns,
            sandboxes: BTreeMap::new(),
            vanishing: BTreeSet::new(),
            engine_state: EngineState::default(),
            last_resync: 0,
            status: tokio::sync::watch::Sender::new(Status::default()),
            networks: tokio::sync::watch::Sender::new(Vec::new()),
            holders: BTreeMap::new(),
            host_applied: None,
            leaving: BTreeMap::new(),
            recover,
        })
    }

    /// The current allocations.
    pub fn allocations(&self) -> &Allocations {
        &self.allocs
    }

    /// What `vipd status` shows, updated after every sync.
    pub fn status(&self) -> tokio::sync::watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// The Docker networks, updated on every listing and when one is created or removed
    /// (the DNS listeners on their gateways follow it).
    pub fn networks(&self) -> tokio::sync::watch::Receiver<Vec<NetworkInfo>> {
        self.networks.subscribe()
    }

    async fn refresh_networks(&mut self) -> Result<(), EngineError> {
        let mut list = self
            .engine
            .networks()
            .await
            .inspect_err(|_| self.cfg.metrics.error(ErrorKind::Engine))?;
        list.sort_by(|a, b| a.id.cmp(&b.id));
        self.networks.send_if_modified(|old| {
            let changed = *old != list;
            if changed {
                *old = list;
            }
            changed
        });
        Ok(())
    }

    /// Replace what vipd knows with a full listing ([`Agent::relist_meanwhile`] with no
    /// event stream).
    pub async fn relist(&mut self) -> Result<(), EngineError> {
        self.relist_meanwhile(&mut no_events(), &mut Kept::default())
            .await
    }

    /// Replace what vipd knows with a full listing, reading the event stream while the
    /// engine answers (see [`Agent::meanwhile`]).
    async fn relist_meanwhile(&mut self, events: &mut Events, kept: &mut Kept) -> Result<(), EngineError> {
        let engine = Arc::clone(&self.engine);
        let listing = self.meanwhile(engine.containers(), events, kept).await;
        self.take_listing(listing)?;
        self.refresh_networks().await
    }

    fn take_listing(&mut self, listing: Result<Vec<ContainerInfo>, EngineError>) -> Result<(), EngineError> {
        let all = match listing {
            Ok(all) => all,
            Err(e) => {
                self.cfg.metrics.error(ErrorKind::Engine);
                self.engine_state = EngineState {
                    connected: false,
                    error: Some(e.to_string()),
                };
                self.status.send_modify(|s| s.docker = self.engine_state.clone());
                return Err(e);
            }
        };
        self.engine_state = EngineState {
            connected: true,
            error: None,
        };
        let fresh: BTreeMap<ContainerId, Container> =
            all.iter().map(|i| (i.id.clone(), container_from(i))).collect();
        for (id, c) in &fresh {
            self.forget_drain_if_restarted(id, c);
        }
        self.containers = fresh;
        info!(containers = self.containers.len(), "listed containers");
        Ok(())
    }

    /// Await `work`, a call to the engine that leaves the agent's state alone, while
    /// reading the event stream: a kill event that stops a serving task drains it at once
    /// (a sync of its own), so a slow listing or inspect never holds a drain back. Every
    /// event read is kept for when `work` is done; a failed stream is noted, not read again.
    async fn meanwhile<T>(
        &mut self,
        work: impl Future<Output = T>,
        events: &mut Events,
        kept: &mut Kept,
    ) -> T {
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                out = &mut work => return out,
                next = events.next(), if kept.lost.is_none() => match next {
                    Some(Ok(event)) => {
                        if self.note_drains(std::slice::from_ref(&event)) {
                            self.sync_pass(ReconcileKind::Drain).instrument(info_span!("drain")).await;
                        }
                        kept.events.push(event);
                    }
                    Some(Err(e)) => kept.lost = Some(e.to_string()),
                    None => kept.lost = Some("the event stream ended".to_owned()),
                },
            }
        }
    }

    /// Look at the container an event is about again.
    pub async fn on_event(&mut self, event: &EngineEvent) -> Result<(), EngineError> {
        self.on_events(std::slice::from_ref(event)).await
    }

    /// Look again at every container a batch of events is about, each once and all at
    /// the same time (at most [`INSPECTS_IN_FLIGHT`]), so one slow answer delays the
    /// batch by its own time, not by the sum. Every inspect that succeeded is kept; the
    /// first failure is returned (the caller then re-lists).
    /// ([`Agent::on_events_meanwhile`] with no event stream.)
    pub async fn on_events(&mut self, events: &[EngineEvent]) -> Result<(), EngineError> {
        self.on_events_meanwhile(events, &mut no_events(), &mut Kept::default())
            .await
    }

    /// [`Agent::on_events`], with a drain a kill event starts programmed before the
    /// inspects, and the event stream read while the engine answers (see
    /// [`Agent::meanwhile`]).
    async fn on_events_meanwhile(
        &mut self,
        batch: &[EngineEvent],
        events: &mut Events,
        kept: &mut Kept,
    ) -> Result<(), EngineError> {
        if self.note_drains(batch) {
            self.sync_pass(ReconcileKind::Drain)
                .instrument(info_span!("drain"))
                .await;
        }
        let (ids, networks_changed) = to_inspect(batch);
        let answers = self
            .meanwhile(inspect_all(Arc::clone(&self.engine), ids), events, kept)
            .await;
        self.take_answers(answers, networks_changed).await
    }

    /// Note the drains a batch of events starts or ends; true when one started.
    fn note_drains(&mut self, events: &[EngineEvent]) -> bool {
        let mut started = false;
        for event in events {
            if let EngineEvent::Container {
                id,
                action,
                attributes,
            } = event
            {
                let was = self.leaving.contains_key(id);
                self.note_leaving(id, action, attributes);
                started |= !was && self.leaving.contains_key(id);
            }
        }
        started
    }

    async fn take_answers(
        &mut self,
        answers: Vec<Inspected>,
        networks_changed: bool,
    ) -> Result<(), EngineError> {
        let mut first_error = None;
        for (id, answer) in answers {
            match answer {
                Ok(Some(info)) => {
                    let c = container_from(&info);
                    let was_serving = self
                        .containers
                        .get(&id)
                        .is_some_and(|old| old.serving() && !self.leaving.contains_key(&old.id));
                    if was_serving && c.running && c.health == Some(Health::Unhealthy) {
                        info!(container = %c.name, grace = ?self.cfg.drain_grace, "task unhealthy: draining (weight 0 everywhere)");
                        self.leaving
                            .insert(id.clone(), (tokio::time::Instant::now(), Leaving::Unhealthy));
                    }
                    self.forget_drain_if_restarted(&id, &c);
                    self.containers.insert(id, c);
                }
                Ok(None) => {
                    self.containers.remove(&id);
                }
                Err(e) => {
                    self.cfg.metrics.error(ErrorKind::Engine);
                    first_error.get_or_insert(e);
                }
            }
        }
        if networks_changed {
            if let Err(e) = self.refresh_networks().await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// A task draining since a kill that now runs in another sandbox than vipd knew was
    /// started again (its start event missed, as across a dockerd restart): its drain is over.
    fn forget_drain_if_restarted(&mut self, id: &ContainerId, now: &Container) {
        let known = self.containers.get(id).and_then(|c| c.sandbox.as_ref());
        if let (Some(known), Some(new)) = (known, now.sandbox.as_ref()) {
            if known != new && self.leaving.remove(id).is_some() {
                info!(container = %now.name, "task started again: no longer draining");
            }
        }
    }

    /// A kill event whose signal asks a running task to stop starts its drain; a start
    /// event ends it (`docker restart`, or a task that came back).
    fn note_leaving(&mut self, id: &ContainerId, action: &str, attributes: &BTreeMap<String, String>) {
        match action {
            "kill" => {
                let signal = attributes.get("signal").map(String::as_str).unwrap_or("");
                let serving = self.containers.get(id).is_some_and(Container::serving);
                if serving && signal_stops(signal) && !self.leaving.contains_key(id) {
                    let name = self.containers.get(id).map(|c| c.name.as_str()).unwrap_or("");
                    info!(container = %name, signal, grace = ?self.cfg.drain_grace, "task being stopped: draining (weight 0 everywhere)");
                    self.leaving.insert(
                        id.clone(),
                        (tokio::time::Instant::now(), Leaving::Signal(signal.to_owned())),
                    );
                }
            }
            "start" => {
                self.leaving.remove(id);
            }
            _ => {}
        }
    }

    /// Each known container, with where it stands in its drain. A drain ends when the
    /// task stops running, comes back healthy (if it was unhealthy), or is over.
    fn containers_now(&mut self) -> Vec<Container> {
        let now = tokio::time::Instant::now();
        let grace = self.cfg.drain_grace;
        let containers = &self.containers;
        self.leaving.retain(|id, (_, why)| {
            containers.get(id).is_some_and(|c| {
                c.running && (*why != Leaving::Unhealthy || c.health == Some(Health::Unhealthy))
            })
        });
        containers
            .values()
            .map(|c| {
                let mut c = c.clone();
                if let Some((since, why)) = self.leaving.get(&c.id) {
                    c.drain = if now < *since + grace {
                        Drain::Draining
                    } else {
                        if self.reported.insert(format!("drained {} {:?}", c.id, since)) {
                            info!(container = %c.name, reason = ?why, grace = ?grace, "task still running after its drain grace: no longer a backend");
                        }
                        Drain::Drained
                    };
                }
                c
            })
            .collect()
    }

    /// Take back the VIPs and fwmarks vipd's rules show in the running containers'
    /// sandboxes, for the VIP services that have none, reading sandboxes (tasks first)
    /// until every such service is found or none is left to read.
    async fn recover_allocations(
        &mut self,
        containers: &[Container],
        defs: &BTreeMap<ServiceName, labels::ServiceDef>,
    ) {
        self.recover = false;
        let mut missing: BTreeSet<ServiceName> = defs
            .values()
            .filter(|d| d.mode == EndpointMode::Vip && self.allocs.get(&d.name).is_none())
            .map(|d| d.name.clone())
            .collect();
        let is_task = |c: &Container| defs.values().any(|d| d.tasks.contains_key(&c.id));
        let mut sandboxes: Vec<(bool, PathBuf)> = containers
            .iter()
            .filter(|c| c.running)
            .filter_map(|c| c.sandbox.clone().map(|sb| (!is_task(c), sb)))
            .collect();
        sandboxes.sort();
        let mut adopted = 0;
        for (_, sandbox) in sandboxes {
            if missing.is_empty() {
                break;
            }
            let programmer = Arc::clone(&self.programmer);
            let read = sandbox.clone();
            let found = match tokio::task::spawn_blocking(move || programmer.marked_services(&read)).await {
                Ok(Ok(found)) => found,
                Ok(Err(e)) => {
                    warn!(sandbox = %sandbox.display(), error = %e, "cannot read the VIPs in use");
                    continue;
                }
                Err(_) => continue,
            };
            for m in found {
                let std::net::IpAddr::V4(vip) = m.vip.addr() else {
                    continue;
                };
                if missing.contains(&m.name) && self.allocs.adopt(&m.name, vip, m.fwmark.get(), self.cfg.pool)
                {
                    info!(service = %m.name, vip = %vip, fwmark = m.fwmark.get(), sandbox = %sandbox.display(), "VIP recovered from the kernel");
                    missing.remove(&m.name);
                    adopted += 1;
                }
            }
        }
        if adopted > 0 {
            info!(services = adopted, "allocations recovered from the sandboxes");
        }
    }

    /// When the next drain grace ends (a sync then removes that task), if any.
    pub fn next_drain_deadline(&self) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        self.leaving
            .values()
            .map(|(since, _)| *since + self.cfg.drain_grace)
            .filter(|end| *end > now)
            .min()
    }

    /// Bring every sandbox to what the known containers call for. With `full`, every
    /// sandbox is re-read from the kernel, changed or not.
    pub async fn sync(&mut self, full: bool) -> SyncReport {
        let containers: Vec<Container> = self.containers_now();
        let (defs, label_errors) = labels::services(&containers);
        for e in &label_errors {
            if self.reported.insert(e.to_string()) {
                warn!(error = %e, "label refused");
            }
        }
        let mut report = SyncReport::default();
        let before = self.allocs.clone();
        if full && self.recover {
            self.recover_allocations(&containers, &defs).await;
        }
        let now = now_secs();
        let mut service_errors: BTreeMap<ServiceName, Vec<String>> = BTreeMap::new();
        for def in defs.values().filter(|d| d.mode == EndpointMode::Vip) {
            if let Err(e) = self.allocs.ensure(&def.name, self.cfg.pool) {
                self.cfg.metrics.error(ErrorKind::Allocation);
                if self.reported.insert(e.to_string()) {
                    warn!(error = %e, "no VIP");
                }
                report.errors.push(e.to_string());
                service_errors
                    .entry(def.name.clone())
                    .or_default()
                    .push(e.to_string());
            }
        }
        let idle: Vec<_> = self
            .allocs
            .services
            .keys()
            .filter(|s| defs.get(*s).is_none_or(|d| d.mode != EndpointMode::Vip))
            .cloned()
            .collect();
        for s in &idle {
            self.allocs.idle(s, now);
        }
        for s in self.allocs.expire(now, self.cfg.grace.as_secs()) {
            info!(service = %s, "VIP released after the grace period");
        }
        if self.allocs != before {
            if let Err(e) = self.store.save(&self.allocs) {
                self.cfg.metrics.error(ErrorKind::State);
                warn!(error = %e, "allocations not saved");
                report.errors.push(e.to_string());
            }
        }

        if let Some(dns) = &self.dns {
            let (catalog, warnings) = crate::dns::records::catalog(
                &containers,
                &defs,
                &self.allocs,
                self.cfg.dns_domain.as_deref(),
                self.cfg.dns_ttl,
            );
            for w in warnings {
                if self.reported.insert(w.clone()) {
                    warn!("{w}");
                }
            }
            dns.store(catalog);
        }

        let mut desired = topology::desired(&containers, &defs, &self.allocs, self.cfg.timeouts);
        let mut host_rules = Vec::new();
        if let Some(ingress) = &self.cfg.ingress {
            // The host's bound ports matter only for a port not published yet.
            let new_claim = defs.values().any(|d| {
                d.publish
                    .iter()
                    .any(|p| self.holders.get(&(p.protocol, p.published)) != Some(&d.name))
            });
            let bound = if new_claim {
                self.programmer.bound_ports().unwrap_or_else(|e| {
                    self.cfg.metrics.error(ErrorKind::Host);
                    warn!(error = %e, "cannot tell which ports are bound on the host");
                    report.errors.push(e);
                    BTreeSet::new()
                })
            } else {
                BTreeSet::new()
            };
            let m = mesh::plan(&containers, &defs, &self.holders, &bound, &ingress.link);
            for (key, name) in &m.holders {
                if self.holders.get(key) != Some(name) {
                    info!(service = %name, port = %format!("{}/{}", key.1, key.0), "port published");
                }
            }
            for (key, name) in &self.holders {
                if !m.holders.contains_key(key) {
                    info!(service = %name, port = %format!("{}/{}", key.1, key.0), "port no longer published");
                }
            }
            for (name, errors) in m.errors {
                for e in errors {
                    if self.reported.insert(format!("{name}: {e}")) {
                        warn!(service = %name, error = %e, "port not published");
                    }
                    report.errors.push(format!("service {name}: {e}"));
                    service_errors.entry(name.clone()).or_default().push(e);
                }
            }
            self.holders = m.holders;
            host_rules = m.host_rules;
            let mut spec = m.ingress;
            spec.timeouts = self.cfg.timeouts;
            desired.insert(ingress.netns.clone(), Arc::new(spec));
        }
        let gone: Vec<PathBuf> = self
            .applied
            .keys()
            .filter(|sb| !desired.contains_key(*sb))
            .cloned()
            .collect();
        for sb in gone {
            self.programmer.forget(&sb);
            self.applied.remove(&sb);
        }
        self.sandboxes.retain(|sb, _| desired.contains_key(sb));
        self.vanishing.retain(|sb| desired.contains_key(sb));
        let names: BTreeMap<&PathBuf, &str> = containers
            .iter()
            .filter_map(|c| c.sandbox.as_ref().map(|sb| (sb, c.name.as_str())))
            .collect();
        for (sandbox, spec) in &desired {
            let entry = self
                .sandboxes
                .entry(sandbox.clone())
                .or_insert_with(|| SandboxStatus {
                    path: sandbox.clone(),
                    container: String::new(),
                    services: Arc::from([]),
                    in_sync: false,
                    error: None,
                    last_operations: 0,
                    last_change: 0,
                });
            entry.container = match names.get(sandbox) {
                Some(n) => n.to_string(),
                None if self.cfg.ingress.as_ref().is_some_and(|i| i.netns == *sandbox) => {
                    "(ingress)".to_owned()
                }
                None => String::new(),
            };
            let names = spec.services.iter().map(|s| s.name.as_str());
            if !entry.services.iter().map(String::as_str).eq(names) {
                entry.services = spec.services.iter().map(|s| s.name.to_string()).collect();
            }
        }
        let own: BTreeMap<&PathBuf, &Vec<Attachment>> = containers
            .iter()
            .filter_map(|c| c.sandbox.as_ref().map(|sb| (sb, &c.attachments)))
            .collect();
        let mut jobs = Vec::new();
        // Sandboxes share specs: compare each pair of shared specs once.
        let mut same: BTreeMap<(usize, usize), bool> = BTreeMap::new();
        for (sandbox, spec) in desired {
            let attachments = own.get(&sandbox).map(|a| (*a).clone()).unwrap_or_default();
            let read_again = match self.applied.get(&sandbox) {
                _ if full => true,
                None => true,
                Some((_, had)) if *had != attachments => true,
                Some((was, _))
                    if *same
                        .entry((Arc::as_ptr(was) as usize, Arc::as_ptr(&spec) as usize))
                        .or_insert_with(|| was == &spec) =>
                {
                    continue
                }
                Some(_) => false,
            };
            let programmer = Arc::clone(&self.programmer);
            let sysctls = self.cfg.sysctls.clone();
            let span = info_span!("program", sandbox = %sandbox.display());
            jobs.push(tokio::task::spawn_blocking(move || {
                let _enter = span.enter();
                let result = programmer.program(&sandbox, &spec, &sysctls, read_again);
                (sandbox, spec, attachments, result)
            }));
        }
        for job in futures::future::join_all(jobs).await {
            let Ok((sandbox, spec, attachments, result)) = job else {
                continue;
            };
            match result {
                Ok(ops) => {
                    report.sandboxes_programmed += 1;
                    report.operations += ops;
                    if ops > 0 {
                        info!(sandbox = %sandbox.display(), operations = ops, "sandbox programmed");
                    }
                    if let Some(st) = self.sandboxes.get_mut(&sandbox) {
                        st.in_sync = true;
                        st.error = None;
                        if ops > 0 {
                            st.last_operations = ops;
                            st.last_change = now;
                        }
                    }
                    self.vanishing.remove(&sandbox);
                    self.applied.insert(sandbox, (spec, attachments));
                }
                Err(ProgramError::Gone(e)) if self.vanishing.insert(sandbox.clone()) => {
                    // A container that stops takes its namespace with it, maybe while
                    // vipd programs it: its stop event is on its way and settles it.
                    info!(sandbox = %sandbox.display(), reason = %e, "sandbox gone while it was programmed");
                    if let Some(st) = self.sandboxes.get_mut(&sandbox) {
                        st.in_sync = false;
                        st.error = Some(e);
                    }
                    self.applied.remove(&sandbox);
                }
                Err(e) => {
                    // Gone a second time while its container still runs, or any other
                    // error: the next event or resync tries again; nothing piles up.
                    let e = e.to_string();
                    warn!(sandbox = %sandbox.display(), error = %e, "sandbox not programmed");
                    self.cfg.metrics.error(ErrorKind::Sandbox);
                    if let Some(st) = self.sandboxes.get_mut(&sandbox) {
                        st.in_sync = false;
                        st.error = Some(e.clone());
                    }
                    self.applied.remove(&sandbox);
                    report.errors.push(format!("{}: {e}", sandbox.display()));
                }
            }
        }
        if self.cfg.ingress.is_some() && (full || self.host_applied.as_ref() != Some(&host_rules)) {
            let programmer = Arc::clone(&self.programmer);
            let span = info_span!("program_host");
            let rules = host_rules.clone();
            let result = tokio::task::spawn_blocking(move || {
                let _enter = span.enter();
                programmer.program_host(&rules)
            })
            .await
            .unwrap_or_else(|e| Err(format!("host rules task failed: {e}")));
            match result {
                Ok(ops) => {
                    report.operations += ops;
                    self.host_applied = Some(host_rules);
                }
                Err(e) => {
                    warn!(error = %e, "host rules not programmed");
                    self.cfg.metrics.error(ErrorKind::Host);
                    report.errors.push(format!("host rules: {e}"));
                    self.host_applied = None;
                }
            }
        }
        if full {
            self.last_resync = now;
        }
        let status = Status {
            docker: self.engine_state.clone(),
            last_sync: now,
            last_resync: self.last_resync,
            services: status::services(&containers, &defs, &self.allocs, &self.holders, &service_errors),
            sandboxes: self.sandboxes.values().cloned().collect(),
            label_errors: status::label_problems(&label_errors),
        };
        self.status.send_replace(status);
        report
    }

    /// [`Agent::sync`] (full for a resync), counted in the metrics as a pass of `kind`.
    async fn sync_pass(&mut self, kind: ReconcileKind) -> SyncReport {
        let started = std::time::Instant::now();
        let report = self.sync(kind == ReconcileKind::Resync).await;
        self.cfg
            .metrics
            .reconcile_done(kind, started.elapsed(), report.operations);
        report
    }

    /// Follow the engine until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(250);
        loop {
            // Subscribe first, then list: nothing falls between the two.
            let mut events = self.engine.events();
            let mut kept = Kept::default();
            if let Err(e) = self.relist_meanwhile(&mut events, &mut kept).await {
                warn!(error = %e, retry_in = ?backoff, "Docker engine not reachable; retrying");
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
            backoff = Duration::from_millis(250);
            let report = self
                .sync_pass(ReconcileKind::Resync)
                .instrument(info_span!("resync"))
                .await;
            info!(
                sandboxes = report.sandboxes_programmed,
                operations = report.operations,
                errors = report.errors.len(),
                "resynced"
            );
            let mut tick = tokio::time::interval(self.cfg.resync);
            // After a stall, one resync, not one per interval missed in a burst.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                // What came while the agent waited on the engine goes first.
                let next = if !kept.events.is_empty() {
                    Next::Batch(std::mem::take(&mut kept.events))
                } else if let Some(why) = kept.lost.take() {
                    Next::Lost(why)
                } else {
                    let drain_end = self.next_drain_deadline();
                    tokio::select! {
                        _ = &mut shutdown => return Ok(()),
                        _ = tokio::time::sleep_until(drain_end.unwrap_or_else(tokio::time::Instant::now)), if drain_end.is_some() => Next::DrainOver,
                        next = events.next() => match next {
                            Some(Ok(event)) => {
                                let mut batch = vec![event];
                                // Gather what arrives together (a scale-up is many events).
                                loop {
                                    match tokio::time::timeout(self.cfg.debounce, events.next()).await {
                                        Ok(Some(Ok(more))) => batch.push(more),
                                        Ok(Some(Err(e))) => {
                                            kept.lost = Some(e.to_string());
                                            break;
                                        }
                                        Ok(None) => {
                                            kept.lost = Some("the event stream ended".to_owned());
                                            break;
                                        }
                                        Err(_) => break,
                                    }
                                }
                                Next::Batch(batch)
                            }
                            Some(Err(e)) => Next::Lost(e.to_string()),
                            None => Next::Lost("the event stream ended".to_owned()),
                        },
                        _ = tick.tick() => Next::Resync,
                    }
                };
                match next {
                    Next::DrainOver => {
                        self.sync_pass(ReconcileKind::Drain)
                            .instrument(info_span!("drain_over"))
                            .await;
                    }
                    Next::Batch(batch) => {
                        let looked = self.on_events_meanwhile(&batch, &mut events, &mut kept).await;
                        if let Err(e) = looked {
                            // What answered is kept; the stream stays open, so no event
                            // is lost while the rest is listed again.
                            warn!(error = %e, "inspect failed; re-listing");
                            if let Err(e) = self.relist_meanwhile(&mut events, &mut kept).await {
                                warn!(error = %e, retry_in = ?RELIST_RETRY, "re-list failed; keeping what is known");
                                tick.reset_after(RELIST_RETRY.min(self.cfg.resync));
                                continue;
                            }
                            self.sync_pass(ReconcileKind::Resync)
                                .instrument(info_span!("resync"))
                                .await;
                        } else {
                            self.sync_pass(ReconcileKind::Event)
                                .instrument(info_span!("sync", events = batch.len()))
                                .await;
                        }
                    }
                    Next::Lost(why) => {
                        self.cfg.metrics.error(ErrorKind::Engine);
                        warn!(error = %why, "event stream lost; reconnecting and re-listing");
                        break;
                    }
                    Next::Resync => {
                        // A failed listing (a slow engine) keeps what is known and the
                        // event stream; only a lost stream reconnects.
                        if let Err(e) = self.relist_meanwhile(&mut events, &mut kept).await {
                            warn!(error = %e, retry_in = ?RELIST_RETRY, "periodic re-list failed; keeping what is known");
                            tick.reset_after(RELIST_RETRY.min(self.cfg.resync));
                            continue;
                        }
                        self.sync_pass(ReconcileKind::Resync)
                            .instrument(info_span!("resync"))
                            .await;
                    }
                }
            }
        }
    }
}

/// What the event loop does next.
enum Next {
    /// A drain's grace is over.
    DrainOver,
    /// Events to look at.
    Batch(Vec<EngineEvent>),
    /// The event stream failed or ended.
    Lost(String),
    /// The periodic full resync.
    Resync,
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::core::cluster::NetworkId;
    use crate::docker::fake::{running_container, FakeEngine};
    use crate::docker::ContainerNetwork;

    /// Records what each sandbox was last brought to, how many calls, and whether the
    /// last call for each sandbox asked for a full read.
    #[derive(Default)]
    struct Recorder(
        Mutex<BTreeMap<PathBuf, Arc<SandboxSpec>>>,
        Mutex<usize>,
        Mutex<BTreeMap<PathBuf, bool>>,
        /// The host rules last programmed.
        Mutex<Option<Vec<Rule>>>,
        /// The ports it says are bound on the host.
        Mutex<BTreeSet<PortKey>>,
    );

    impl SandboxProgrammer for Recorder {
        fn program(
            &self,
            sandbox: &Path,
            spec: &Arc<SandboxSpec>,
            _: &SysctlSettings,
            full: bool,
        ) -> Result<usize, ProgramError> {
            *self.1.lock().unwrap() += 1;
            self.2.lock().unwrap().insert(sandbox.to_owned(), full);
            self.0
                .lock()
                .unwrap()
                .insert(sandbox.to_owned(), Arc::clone(spec));
            Ok(1)
        }

        fn program_host(&self, rules: &[Rule]) -> Result<usize, String> {
            *self.3.lock().unwrap() = Some(rules.to_vec());
            Ok(rules.len())
        }

        fn bound_ports(&self) -> Result<BTreeSet<PortKey>, String> {
            Ok(self.4.lock().unwrap().clone())
        }

        /// As the kernel would show them: the services last programmed in `sandbox`.
        fn marked_services(&self, sandbox: &Path) -> Result<Vec<MarkedService>, String> {
            let map = self.0.lock().unwrap();
            Ok(map
                .get(sandbox)
                .map(|spec| {
                    spec.services
                        .iter()
                        .map(|s| MarkedService {
                            name: s.name.clone(),
                            vip: s.vip,
                            fwmark: s.fwmark,
                        })
                        .collect()
                })
                .unwrap_or_default())
        }
    }

    impl Recorder {
        fn backends(&self, sandbox: &str, service: &str) -> Vec<String> {
            let map = self.0.lock().unwrap();
            let spec = map
                .get(Path::new(sandbox))
                .unwrap_or_else(|| panic!("{sandbox} never programmed"));
            spec.services
                .iter()
                .find(|s| s.name.as_str() == service)
                .map(|s| s.backends.iter().map(|b| b.addr.to_string()).collect())
                .unwrap_or_default()
        }

        fn calls(&self) -> usize {
            *self.1.lock().unwrap()
        }

        /// Each backend of `service` in `sandbox` with its weight.
        fn weights(&self, sandbox: &str, service: &str) -> Vec<(String, u32)> {
            let map = self.0.lock().unwrap();
            map.get(Path::new(sandbox))
                .and_then(|spec| spec.services.iter().find(|s| s.name.as_str() == service))
                .map(|s| {
                    s.backends
                        .iter()
                        .map(|b| (b.addr.to_string(), b.weight))
                        .collect()
                })
                .unwrap_or_default()
        }
    }

    /// Tasks w1 (10.1.0.3) and w2 (10.1.0.4) of service web and a client (10.1.0.9) on
    /// one network, listed by an agent that has not synced yet.
    async fn two_tasks_and_a_client(tag: &str) -> (FakeEngine, Arc<Recorder>, Agent) {
        let engine = FakeEngine::new();
        let web = [(labels::SERVICE, "web")];
        engine.upsert_container(on_net("w1aaaaaaaaaa", "w1", "10.1.0.3", &web));
        engine.upsert_container(on_net("w2aaaaaaaaaa", "w2", "10.1.0.4", &web));
        engine.upsert_container(on_net("claaaaaaaaaa", "client", "10.1.0.9", &[]));
        let rec = Arc::new(Recorder::default());
        let mut agent =
            Agent::new(Arc::new(engine.clone()), rec.clone(), config(&tempdir(tag)), None).unwrap();
        agent.relist().await.unwrap();
        (engine, rec, agent)
    }

    fn event(id: &str, action: &str, attributes: &[(&str, &str)]) -> EngineEvent {
        EngineEvent::Container {
            id: ContainerId(id.into()),
            action: action.into(),
            attributes: attributes
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    fn task_state(agent: &Agent, name: &str) -> String {
        let status = agent.status().borrow().clone();
        status.services[0]
            .tasks
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.state.clone())
            .unwrap_or_else(|| panic!("no task {name} in {status:?}"))
    }

    fn w(pairs: &[(&str, u32)]) -> Vec<(String, u32)> {
        pairs.iter().map(|(a, w)| ((*a).to_owned(), *w)).collect()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn configured_ipvs_timeouts_go_to_every_sandbox() {
        let engine = FakeEngine::new();
        engine.upsert_container(on_net(
            "w1aaaaaaaaaa",
            "w1",
            "10.1.0.3",
            &[(labels::SERVICE, "web")],
        ));
        engine.upsert_container(on_net("claaaaaaaaaa", "client", "10.1.0.9", &[]));
        let rec = Arc::new(Recorder::default());
        let dir = tempdir("timeouts");
        let mut cfg = config(&dir);
        let t = Timeouts {
            tcp: 3600,
            tcp_fin: 30,
            udp: 60,
        };
        cfg.timeouts = Some(t);
        let mut agent = Agent::new(Arc::new(engine), rec.clone(), cfg, None).unwrap();
        agent.relist().await.unwrap();
        agent.sync(true).await;
        let specs = rec.0.lock().unwrap();
        assert_eq!(specs.len(), 2);
        assert!(specs.values().all(|s| s.timeouts == Some(t)), "{specs:?}");
    }

    #[test]
    fn reload_signals_do_not_stop_a_task_and_the_others_do() {
        for s in ["1", "10", "12", "SIGHUP", "hup", "USR1", "SIGUSR2"] {
            assert!(!signal_stops(s), "{s}");
        }
        for s in ["15", "9", "2", "3", "28", "SIGTERM", "KILL", "SIGWINCH", ""] {
            assert!(signal_stops(s), "{s}");
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_task_being_stopped_drains_at_weight_0_and_leaves_when_it_dies_or_its_grace_ends() {
        let web = [(labels::SERVICE, "web")];
        let (engine, rec, mut agent) = two_tasks_and_a_client("drain").await;
        agent.sync(true).await;
        let client = "/run/docker/netns/claaaaaaaaaa";
        let both = w(&[("10.1.0.3", 1), ("10.1.0.4", 1)]);
        assert_eq!(rec.weights(client, "web"), both);

        // A reload signal changes nothing.
        agent
            .on_event(&event("w2aaaaaaaaaa", "kill", &[("signal", "1")]))
            .await
            .unwrap();
        agent.sync(false).await;
        assert_eq!(
            (rec.weights(client, "web"), agent.next_drain_deadline()),
            (both.clone(), None)
        );

        // `docker stop`: SIGTERM, and w2 still runs: weight 0 in every sandbox, with no
        // inspect asked of the engine.
        let inspects = engine.calls();
        agent
            .on_event(&event("w2aaaaaaaaaa", "kill", &[("signal", "15")]))
            .await
            .unwrap();
        assert_eq!(engine.calls(), inspects, "a kill event needs no inspect");
        agent.sync(false).await;
        let draining = w(&[("10.1.0.3", 1), ("10.1.0.4", 0)]);
        assert_eq!(rec.weights(client, "web"), draining);
        assert_eq!(rec.weights("/run/docker/netns/w1aaaaaaaaaa", "web"), draining);
        assert_eq!(task_state(&agent, "w2"), "draining");
        let end = tokio::time::Instant::now() + Duration::from_secs(30);
        assert_eq!(agent.next_drain_deadline(), Some(end));

        // It dies: gone at once.
        let mut dead = on_net("w2aaaaaaaaaa", "w2", "10.1.0.4", &web);
        dead.running = false;
        engine.upsert_container(dead);
        agent
            .on_event(&event("w2aaaaaaaaaa", "die", &[("exitCode", "0")]))
            .await
            .unwrap();
        agent.sync(false).await;
        assert_eq!(rec.weights(client, "web"), w(&[("10.1.0.3", 1)]));
        assert_eq!(agent.next_drain_deadline(), None);

        // Started again: a backend again, at its weight.
        engine.upsert_container(on_net("w2aaaaaaaaaa", "w2", "10.1.0.4", &web));
        agent
            .on_event(&event("w2aaaaaaaaaa", "start", &[]))
            .await
            .unwrap();
        agent.sync(false).await;
        assert_eq!(rec.weights(client, "web"), both);

        // A task that does not exit when told: at weight 0 for the grace, then removed
        // though it still runs.
        agent
            .on_event(&event("w2aaaaaaaaaa", "kill", &[("signal", "SIGTERM")]))
            .await
            .unwrap();
        agent.sync(false).await;
        tokio::time::advance(Duration::from_secs(29)).await;
        agent.sync(false).await;
        assert_eq!(rec.weights(client, "web"), draining);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(agent.next_drain_deadline(), None, "the grace is over");
        agent.sync(false).await;
        assert_eq!(rec.weights(client, "web"), w(&[("10.1.0.3", 1)]));
        assert_eq!(task_state(&agent, "w2"), "drained");
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn an_unhealthy_task_drains_then_leaves_and_is_back_when_healthy() {
        let engine = FakeEngine::new();
        let web = [(labels::SERVICE, "web")];
        let health = |id: &str, ip: &str, h: Health| {
            let mut c = on_net(id, id, ip, &web);
            c.health = Some(h);
            c
        };
        engine.upsert_container(health("w1aaaaaaaaaa", "10.1.0.3", Health::Healthy));
        engine.upsert_container(health("w2aaaaaaaaaa", "10.1.0.4", Health::Healthy));
        engine.upsert_container(on_net("claaaaaaaaaa", "client", "10.1.0.9", &[]));
        let rec = Arc::new(Recorder::default());
        let dir = tempdir("unhealthy");
        let mut agent = Agent::new(Arc::new(engine.clone()), rec.clone(), config(&dir), None).unwrap();
        agent.relist().await.unwrap();
        agent.sync(true).await;
        let client = "/run/docker/netns/claaaaaaaaaa";
        let both = w(&[("10.1.0.3", 1), ("10.1.0.4", 1)]);
        assert_eq!(rec.weights(client, "web"), both);

        engine.upsert_container(health("w2aaaaaaaaaa", "10.1.0.4", Health::Unhealthy));
        agent
            .on_event(&event("w2aaaaaaaaaa", "health_status: unhealthy", &[]))
            .await
            .unwrap();
        agent.sync(false).await;
        assert_eq!(rec.weights(client, "web"), w(&[("10.1.0.3", 1), ("10.1.0.4", 0)]));
        assert_eq!(task_state(&agent, "w2aaaaaaaaaa"), "draining");
        tokio::time::advance(Duration::from_secs(30)).await;
        agent.sync(false).await;
        assert_eq!(rec.weights(client, "web"), w(&[("10.1.0.3", 1)]));

        engine.upsert_container(health("w2aaaaaaaaaa", "10.1.0.4", Health::Healthy));
        agent
            .on_event(&event("w2aaaaaaaaaa", "health_status: healthy", &[]))
            .await
            .unwrap();
        agent.sync(false).await;
        assert_eq!(rec.weights(client, "web"), both);
        assert_eq!(task_state(&agent, "w2aaaaaaaaaa"), "healthy");

        // A task never healthy yet (starting, then unhealthy) was never a backend: it
        // does not come in at weight 0.
        engine.upsert_container(health("w3aaaaaaaaaa", "10.1.0.5", Health::Starting));
        agent
            .on_event(&event("w3aaaaaaaaaa", "start", &[]))
            .await
            .unwrap();
        engine.upsert_container(health("w3aaaaaaaaaa", "10.1.0.5", Health::Unhealthy));
        agent
            .on_event(&event("w3aaaaaaaaaa", "health_status: unhealthy", &[]))
            .await
            .unwrap();
        agent.sync(false).await;
        assert_eq!(rec.weights(client, "web"), both);
    }

    fn on_net(id: &str, name: &str, ip: &str, labels: &[(&str, &str)]) -> ContainerInfo {
        let mut c = running_container(id, name).with_network(ContainerNetwork {
            network_id: NetworkId("front".into()),
            name: "front".into(),
            ip: Some(ip.parse().unwrap()),
            prefix_len: 24,
            gateway: Some("10.1.0.1".parse().unwrap()),
            aliases: vec![],
        });
        for (k, v) in labels {
            c = c.with_label(k, v);
        }
        c
    }

    fn config(dir: &Path) -> AgentConfig {
        AgentConfig {
            pool: Ipv4Net::new("10.253.0.0".parse().unwrap(), 16).unwrap(),
            state_dir: dir.to_owned(),
            grace: Duration::from_secs(60),
            resync: Duration::from_secs(3600),
            debounce: Duration::from_millis(5),
            sysctls: SysctlSettings::default(),
            dns_domain: None,
            dns_ttl: 5,
            ingress: None,
            drain_grace: Duration::from_secs(30),
            timeouts: None,
            metrics: Metrics::disabled(),
        }
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vipd-agent-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[tokio::test(flavor = "current_thread")]
    async fn published_ports_program_the_ingress_and_the_host_and_a_bound_port_is_refused() {
        let engine = FakeEngine::new();
        let web = [(labels::SERVICE, "web"), (labels::PUBLISH, "8080:80")];
        engine.upsert_container(on_net("w1aaaaaaaaaa", "w1", "10.1.0.3", &web));
        engine.upsert_container(on_net("w2aaaaaaaaaa", "w2", "10.1.0.4", &web));
        let api = [(labels::SERVICE, "api"), (labels::PUBLISH, "9090:90")];
        engine.upsert_container(on_net("a1aaaaaaaaaa", "a1", "10.1.0.5", &api));
        let rec = Arc::new(Recorder::default());
        rec.4.lock().unwrap().insert((labels::PortProtocol::Tcp, 9090));
        let dir = tempdir("mesh");
        let mut cfg = config(&dir);
        let ingress = PathBuf::from("/run/netns/vipd_ingress_test");
        cfg.ingress = Some(IngressTarget {
            netns: ingress.clone(),
            link: IngressLink {
                addr: "10.254.255.2".parse().unwrap(),
                host_iface: "vipd-ingress".into(),
            },
        });
        let mut agent = Agent::new(Arc::new(engine.clone()), rec.clone(), cfg, None).unwrap();
        agent.relist().await.unwrap();
        let r = agent.sync(true).await;
        assert_eq!(
            r.errors,
            ["service api: port 9090/tcp not published: it is already in use on the host (a socket is bound to it)"]
        );
        assert_eq!(
            rec.backends(ingress.to_str().unwrap(), "web"),
            ["10.1.0.3", "10.1.0.4"]
        );
        assert_eq!(
            rec.backends(ingress.to_str().unwrap(), "api"),
            Vec::<String>::new()
        );
        let host = rec.3.lock().unwrap().clone().expect("host rules programmed");
        assert_eq!(host.len(), 5, "2 DNAT, 1 masquerade, 2 forward: {host:#?}");
        let status = agent.status().borrow().clone();
        let api_status = status.services.iter().find(|s| s.name == "api").unwrap();
        assert!(
            api_status.errors[0].contains("already in use on the host"),
            "{api_status:?}"
        );
        assert!(api_status.published.is_empty(), "{api_status:?}");
        let web_status = status.services.iter().find(|s| s.name == "web").unwrap();
        assert_eq!(web_status.published, ["8080:80/tcp"]);
        let ingress_sb = status.sandboxes.iter().find(|s| s.path == ingress).unwrap();
        assert_eq!(ingress_sb.container, "(ingress)");

        // Nothing changed: neither the ingress nor the host is programmed again.
        *rec.3.lock().unwrap() = None;
        let calls = rec.calls();
        agent.sync(false).await;
        assert_eq!((rec.calls(), rec.3.lock().unwrap().is_none()), (calls, true));

        // The tasks lose the label: the ingress and the host lose everything.
        for (id, name, ip) in [
            ("w1aaaaaaaaaa", "w1", "10.1.0.3"),
            ("w2aaaaaaaaaa", "w2", "10.1.0.4"),
        ] {
            engine.upsert_container(on_net(id, name, ip, &[(labels::SERVICE, "web")]));
        }
        engine.remove_container(&ContainerId("a1aaaaaaaaaa".into()));
        agent.relist().await.unwrap();
        agent.sync(false).await;
        assert!(rec.0.lock().unwrap()[&ingress].services.is_empty());
        assert_eq!(rec.3.lock().unwrap().as_deref(), Some(&[][..]));
    }

    /// An engine whose inspects each take `delay` and fail for one container; it counts
    /// the inspects in flight at once.
    struct SlowEngine {
        inner: FakeEngine,
        delay: Duration,
        /// How long a listing takes.
        list_delay: Duration,
        failing: ContainerId,
        in_flight: std::sync::atomic::AtomicUsize,
        most: std::sync::atomic::AtomicUsize,
    }

    impl Engine for SlowEngine {
        fn containers(&self) -> futures::future::BoxFuture<'_, Result<Vec<ContainerInfo>, EngineError>> {
            Box::pin(async move {
                tokio::time::sleep(self.list_delay).await;
                self.inner.containers().await
            })
        }
        fn inspect<'a>(
            &'a self,
            id: &'a ContainerId,
        ) -> futures::future::BoxFuture<'a, Result<Option<ContainerInfo>, EngineError>> {
            use std::sync::atomic::Ordering::SeqCst;
            Box::pin(async move {
                let now = self.in_flight.fetch_add(1, SeqCst) + 1;
                self.most.fetch_max(now, SeqCst);
                tokio::time::sleep(self.delay).await;
                self.in_flight.fetch_sub(1, SeqCst);
                if *id == self.failing {
                    return Err(EngineError::Timeout {
                        endpoint: "fake".into(),
                        operation: format!("inspect container {}", id.0),
                        after: self.delay,
                    });
                }
                self.inner.inspect(id).await
            })
        }
        fn networks(&self) -> futures::future::BoxFuture<'_, Result<Vec<NetworkInfo>, EngineError>> {
            self.inner.networks()
        }
        fn events(&self) -> futures::stream::BoxStream<'static, Result<EngineEvent, EngineError>> {
            self.inner.events()
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_batch_inspects_each_container_once_and_all_at_once_and_keeps_what_answered() {
        use std::sync::atomic::Ordering::SeqCst;
        let fake = FakeEngine::new();
        let web = [(labels::SERVICE, "web")];
        fake.upsert_container(on_net("w1aaaaaaaaaa", "w1", "10.1.0.3", &web));
        let engine = Arc::new(SlowEngine {
            inner: fake.clone(),
            delay: Duration::from_secs(10),
            list_delay: Duration::ZERO,
            failing: ContainerId("slowaaaaaaaa".into()),
            in_flight: Default::default(),
            most: Default::default(),
        });
        let rec = Arc::new(Recorder::default());
        let dir = tempdir("batch");
        let mut agent = Agent::new(engine.clone(), rec.clone(), config(&dir), None).unwrap();
        agent.relist().await.unwrap();
        agent.sync(true).await;

        // Three new tasks, each with a start and a health event, and one container whose
        // inspect times out.
        let mut batch = Vec::new();
        for (id, ip) in [
            ("w2aaaaaaaaaa", "10.1.0.4"),
            ("w3aaaaaaaaaa", "10.1.0.5"),
            ("w4aaaaaaaaaa", "10.1.0.6"),
        ] {
            fake.upsert_container(on_net(id, id, ip, &web));
            for action in ["start", "health_status: healthy"] {
                batch.push(EngineEvent::Container {
                    id: ContainerId(id.into()),
                    action: action.into(),
                    attributes: BTreeMap::new(),
                });
            }
        }
        batch.push(EngineEvent::Container {
            id: ContainerId("slowaaaaaaaa".into()),
            action: "start".into(),
            attributes: BTreeMap::new(),
        });
        let calls = fake.calls();
        let started = tokio::time::Instant::now();
        let err = agent.on_events(&batch).await.unwrap_err();
        assert!(err.to_string().contains("timed out after 10s"), "{err}");
        assert_eq!(started.elapsed(), Duration::from_secs(10), "one delay, not five");
        assert_eq!(engine.most.load(SeqCst), 4, "the four containers at once");
        assert_eq!(fake.calls() - calls, 3, "each answering container once");
        agent.sync(false).await;
        assert_eq!(
            rec.backends("/run/docker/netns/w1aaaaaaaaaa", "web"),
            ["10.1.0.3", "10.1.0.4", "10.1.0.5", "10.1.0.6"],
            "what answered is kept"
        );
    }

    /// A kill event while the engine is slow to answer a listing or an inspect drains the
    /// task at once, not when the engine has answered.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_task_being_stopped_drains_at_once_while_a_listing_or_an_inspect_is_slow() {
        let fake = FakeEngine::new();
        let web = [(labels::SERVICE, "web")];
        fake.upsert_container(on_net("w1aaaaaaaaaa", "w1", "10.1.0.3", &web));
        fake.upsert_container(on_net("w2aaaaaaaaaa", "w2", "10.1.0.4", &web));
        fake.upsert_container(on_net("w3aaaaaaaaaa", "w3", "10.1.0.5", &web));
        fake.upsert_container(on_net("claaaaaaaaaa", "client", "10.1.0.9", &[]));
        let engine = Arc::new(SlowEngine {
            inner: fake.clone(),
            delay: Duration::from_secs(20),
            list_delay: Duration::from_secs(20),
            failing: ContainerId("slowaaaaaaaa".into()),
            in_flight: Default::default(),
            most: Default::default(),
        });
        let rec = Arc::new(Recorder::default());
        let mut cfg = config(&tempdir("slow-drain"));
        cfg.resync = Duration::from_secs(60);
        let agent = Agent::new(engine, rec.clone(), cfg, None).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let t0 = tokio::time::Instant::now();
        let run = tokio::spawn(agent.run(async {
            let _ = stopped.await;
        }));
        let client = "/run/docker/netns/claaaaaaaaaa";
        let at = |secs: u64| tokio::time::sleep_until(t0 + Duration::from_secs(secs));

        // Listed in 20 s and synced; the periodic listing runs from 80 s to 100 s.
        at(30).await;
        let all = w(&[("10.1.0.3", 1), ("10.1.0.4", 1), ("10.1.0.5", 1)]);
        assert_eq!(rec.weights(client, "web"), all);
        at(85).await;
        fake.push_event(event("w2aaaaaaaaaa", "kill", &[("signal", "15")]));
        at(86).await;
        let w2_out = w(&[("10.1.0.3", 1), ("10.1.0.4", 0), ("10.1.0.5", 1)]);
        assert_eq!(rec.weights(client, "web"), w2_out, "drained during the listing");
        at(101).await;
        assert_eq!(rec.weights(client, "web"), w2_out, "still draining after it");

        // A start event whose inspect takes 20 s; a kill 5 s into it.
        fake.push_event(event("w1aaaaaaaaaa", "start", &[]));
        at(106).await;
        fake.push_event(event("w3aaaaaaaaaa", "kill", &[("signal", "15")]));
        at(107).await;
        let w3_out = w(&[("10.1.0.3", 1), ("10.1.0.4", 0), ("10.1.0.5", 0)]);
        assert_eq!(rec.weights(client, "web"), w3_out, "drained during the inspect");
        // w2's drain grace (30 s) ends at 115 s: out though it still runs.
        at(125).await;
        assert_eq!(rec.weights(client, "web"), w(&[("10.1.0.3", 1), ("10.1.0.5", 0)]));
        stop.send(()).unwrap();
        run.await.unwrap().unwrap();
    }

    /// A task stopped and started again while vipd missed the start event (a dockerd
    /// restart): the listing shows it in a new sandbox, and it serves again.
    #[tokio::test(flavor = "current_thread")]
    async fn a_task_drained_then_started_again_unseen_serves_again_after_a_listing() {
        let web = [(labels::SERVICE, "web")];
        let (engine, rec, mut agent) = two_tasks_and_a_client("restarted").await;
        agent.sync(true).await;
        let client = "/run/docker/netns/claaaaaaaaaa";
        agent
            .on_event(&event("w2aaaaaaaaaa", "kill", &[("signal", "15")]))
            .await
            .unwrap();
        agent.sync(false).await;
        assert_eq!(rec.weights(client, "web"), w(&[("10.1.0.3", 1), ("10.1.0.4", 0)]));
        // Same sandbox in a listing: still draining.
        agent.relist().await.unwrap();
        agent.sync(true).await;
        assert_eq!(rec.weights(client, "web"), w(&[("10.1.0.3", 1), ("10.1.0.4", 0)]));
        let mut again = on_net("w2aaaaaaaaaa", "w2", "10.1.0.4", &web);
        again.sandbox_key = Some("/run/docker/netns/0123456789ab".into());
        engine.upsert_container(again);
        agent.relist().await.unwrap();
        agent.sync(true).await;
        assert_eq!(rec.weights(client, "web"), w(&[("10.1.0.3", 1), ("10.1.0.4", 1)]));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn tasks_become_backends_everywhere_and_leave_on_their_die_event() {
        let web = [(labels::SERVICE, "web")];
        let (engine, rec, mut agent) = two_tasks_and_a_client("die").await;
        let r = agent.sync(true).await;
        assert_eq!((r.sandboxes_programmed, r.errors.len()), (3, 0));
        assert_eq!(
            rec.backends("/run/docker/netns/claaaaaaaaaa", "web"),
            ["10.1.0.3", "10.1.0.4"]
        );
        assert_eq!(
            rec.backends("/run/docker/netns/w1aaaaaaaaaa", "web"),
            ["10.1.0.3", "10.1.0.4"]
        );

        // Nothing changed: nothing programmed.
        let calls = rec.calls();
        assert_eq!(agent.sync(false).await.sandboxes_programmed, 0);
        assert_eq!(rec.calls(), calls);

        // w2 dies: every sandbox drops it (w2's own sandbox is gone with it).
        let mut dead = on_net("w2aaaaaaaaaa", "w2", "10.1.0.4", &web);
        dead.running = false;
        engine.upsert_container(dead);
        agent
            .on_event(&EngineEvent::Container {
                id: ContainerId("w2aaaaaaaaaa".into()),
                action: "die".into(),
                attributes: BTreeMap::new(),
            })
            .await
            .unwrap();
        let r = agent.sync(false).await;
        assert_eq!(r.sandboxes_programmed, 2);
        assert_eq!(
            rec.backends("/run/docker/netns/claaaaaaaaaa", "web"),
            ["10.1.0.3"]
        );
        let client = PathBuf::from("/run/docker/netns/claaaaaaaaaa");
        assert!(
            !rec.2.lock().unwrap()[&client],
            "a backend change works from the kept view"
        );

        // The client joins another network: its own addresses changed, so it is read again.
        let moved = on_net("claaaaaaaaaa", "client", "10.1.0.9", &[]).with_network(ContainerNetwork {
            network_id: NetworkId("back".into()),
            name: "back".into(),
            ip: Some("10.2.0.9".parse().unwrap()),
            prefix_len: 24,
            gateway: None,
            aliases: vec![],
        });
        engine.upsert_container(moved);
        agent
            .on_event(&EngineEvent::Network {
                id: NetworkId("back".into()),
                action: "connect".into(),
                container: Some(ContainerId("claaaaaaaaaa".into())),
            })
            .await
            .unwrap();
        agent.sync(false).await;
        assert!(
            rec.2.lock().unwrap()[&client],
            "changed own addresses: read again"
        );
        std::fs::remove_dir_all(tempdir("die")).ok();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn vips_survive_a_restart_of_vipd() {
        let engine = FakeEngine::new();
        engine.upsert_container(on_net(
            "w1aaaaaaaaaa",
            "w1",
            "10.1.0.3",
            &[(labels::SERVICE, "web")],
        ));
        engine.upsert_container(on_net(
            "a1aaaaaaaaaa",
            "a1",
            "10.1.0.5",
            &[(labels::SERVICE, "api")],
        ));
        let dir = tempdir("restart");
        let first = {
            let mut agent = Agent::new(
                Arc::new(engine.clone()),
                Arc::new(Recorder::default()),
                config(&dir),
                None,
            )
            .unwrap();
            agent.relist().await.unwrap();
            agent.sync(true).await;
            agent.allocations().clone()
        };
        assert_eq!(first.services.len(), 2);
        let mut again = Agent::new(
            Arc::new(engine.clone()),
            Arc::new(Recorder::default()),
            config(&dir),
            None,
        )
        .unwrap();
        again.relist().await.unwrap();
        again.sync(true).await;
        assert_eq!(again.allocations(), &first);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_bad_label_affects_only_its_container() {
        let engine = FakeEngine::new();
        engine.upsert_container(on_net(
            "w1aaaaaaaaaa",
            "w1",
            "10.1.0.3",
            &[(labels::SERVICE, "web")],
        ));
        engine.upsert_container(on_net(
            "x1aaaaaaaaaa",
            "x1",
            "10.1.0.4",
            &[(labels::SERVICE, "web"), (labels::WEIGHT, "lots")],
        ));
        engine.upsert_container(on_net("claaaaaaaaaa", "client", "10.1.0.9", &[]));
        let rec = Arc::new(Recorder::default());
        let dir = tempdir("label");
        let mut agent = Agent::new(Arc::new(engine.clone()), rec.clone(), config(&dir), None).unwrap();
        agent.relist().await.unwrap();
        agent.sync(true).await;
        assert_eq!(
            rec.backends("/run/docker/netns/claaaaaaaaaa", "web"),
            ["10.1.0.3"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
    /// Fails for one sandbox, as a kernel without IPVS or a vanished namespace would.
    /// Fails with its error for one sandbox while `.3` is set; records the others.
    struct FailFor(PathBuf, Recorder, ProgramError, std::sync::atomic::AtomicBool);

    impl FailFor {
        fn new(sandbox: &Path, error: ProgramError) -> Self {
            FailFor(sandbox.to_owned(), Recorder::default(), error, true.into())
        }
    }

    impl SandboxProgrammer for FailFor {
        fn program(
            &self,
            sb: &Path,
            spec: &Arc<SandboxSpec>,
            sys: &SysctlSettings,
            full: bool,
        ) -> Result<usize, ProgramError> {
            if sb == self.0 && self.3.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(self.2.clone());
            }
            self.1.program(sb, spec, sys, full)
        }

        fn program_host(&self, rules: &[Rule]) -> Result<usize, String> {
            self.1.program_host(rules)
        }

        fn bound_ports(&self) -> Result<BTreeSet<PortKey>, String> {
            self.1.bound_ports()
        }

        fn marked_services(&self, sb: &Path) -> Result<Vec<MarkedService>, String> {
            self.1.marked_services(sb)
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_sandbox_gone_while_programmed_is_no_error_once_and_an_error_if_it_stays_gone() {
        let (engine, _, _) = two_tasks_and_a_client("gone").await;
        let client = PathBuf::from("/run/docker/netns/claaaaaaaaaa");
        let gone = ProgramError::Gone("network namespace cannot be opened".into());
        let prog = Arc::new(FailFor::new(&client, gone));
        let mut agent = Agent::new(
            Arc::new(engine.clone()),
            prog.clone(),
            config(&tempdir("gone2")),
            None,
        )
        .unwrap();
        agent.relist().await.unwrap();
        let sandbox_error = |agent: &Agent| {
            let s = agent.status().borrow().clone();
            let sb = s
                .sandboxes
                .iter()
                .find(|x| x.path == client)
                .cloned()
                .expect("listed");
            (sb.in_sync, sb.error.is_some())
        };

        // Gone at the first try: the container is stopping; no error, not in sync.
        let r = agent.sync(true).await;
        assert_eq!((r.sandboxes_programmed, r.errors.len()), (2, 0), "{r:?}");
        assert_eq!(sandbox_error(&agent), (false, true));
        // Its stop arrives: the sandbox is simply no longer wanted.
        let mut stopped = on_net("claaaaaaaaaa", "client", "10.1.0.9", &[]);
        stopped.running = false;
        engine.upsert_container(stopped.clone());
        agent.on_event(&event("claaaaaaaaaa", "die", &[])).await.unwrap();
        let r = agent.sync(false).await;
        assert_eq!(r.errors.len(), 0, "{r:?}");
        assert!(agent.status().borrow().sandboxes.iter().all(|x| x.path != client));

        // Back, then gone at two syncs in a row while it still runs: an error.
        stopped.running = true;
        engine.upsert_container(stopped);
        agent
            .on_event(&event("claaaaaaaaaa", "start", &[]))
            .await
            .unwrap();
        assert_eq!(agent.sync(false).await.errors.len(), 0);
        let r = agent.sync(true).await;
        assert_eq!(r.errors.len(), 1, "{r:?}");
        assert!(r.errors[0].contains("the namespace is gone"), "{r:?}");
        // And once it can be programmed, it is in sync.
        prog.3.store(false, std::sync::atomic::Ordering::Relaxed);
        let r = agent.sync(false).await;
        assert_eq!((r.sandboxes_programmed, r.errors.len()), (1, 0), "{r:?}");
        assert_eq!(sandbox_error(&agent), (true, false));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn lost_allocations_are_read_back_from_the_sandboxes() {
        let engine = FakeEngine::new();
        for (id, svc, ip) in [
            ("w1aaaaaaaaaa", "web", "10.1.0.3"),
            ("a1aaaaaaaaaa", "api", "10.1.0.4"),
            ("d1aaaaaaaaaa", "db", "10.1.0.5"),
        ] {
            engine.upsert_container(on_net(id, id, ip, &[(labels::SERVICE, svc)]));
        }
        let rec = Arc::new(Recorder::default());
        let dir = tempdir("recover");
        let vips = |agent: &Agent| -> Vec<(String, std::net::Ipv4Addr, u32)> {
            agent
                .allocations()
                .services
                .iter()
                .map(|(n, a)| (n.to_string(), a.vip, a.fwmark))
                .collect()
        };
        // A first vipd allocates (api, db, web: .1 .2 .3), then db goes and comes back
        // with another VIP, so the allocations are not simply the first ones again.
        let mut first = Agent::new(Arc::new(engine.clone()), rec.clone(), config(&dir), None).unwrap();
        first.relist().await.unwrap();
        first.sync(true).await;
        first.allocs.services.clear();
        first.allocs.next_fwmark = 300;
        first
            .allocs
            .ensure(&ServiceName::new("zzz").unwrap(), first.cfg.pool)
            .unwrap();
        first.sync(true).await;
        let before = vips(&first);
        assert_eq!(before.len(), 4, "{before:?}");

        for lost in ["{\"services\": 3", ""] {
            let file = dir.join("allocations.json");
            if lost.is_empty() {
                std::fs::remove_file(&file).unwrap();
            } else {
                std::fs::write(&file, lost).unwrap();
            }
            let mut second = Agent::new(Arc::new(engine.clone()), rec.clone(), config(&dir), None).unwrap();
            second.relist().await.unwrap();
            second.sync(true).await;
            let after: Vec<_> = vips(&second).into_iter().filter(|(n, ..)| n != "zzz").collect();
            let want: Vec<_> = before.iter().filter(|(n, ..)| n != "zzz").cloned().collect();
            assert_eq!(after, want, "the VIPs in use are kept ({lost:?})");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn status_lists_services_tasks_sandboxes_and_what_went_wrong() {
        let engine = FakeEngine::new();
        let web = [(labels::SERVICE, "web")];
        engine.upsert_container(on_net("w1aaaaaaaaaa", "w1", "10.1.0.3", &web));
        let mut w2 = on_net("w2aaaaaaaaaa", "w2", "10.1.0.4", &web);
        w2.health = Some(crate::core::cluster::Health::Unhealthy);
        engine.upsert_container(w2);
        engine.upsert_container(on_net(
            "dbaaaaaaaaaa",
            "db1",
            "10.1.0.5",
            &[(labels::SERVICE, "db"), ("vipd.endpoint-mode", "dnsrr")],
        ));
        engine.upsert_container(on_net(
            "bdaaaaaaaaaa",
            "odd",
            "10.1.0.6",
            &[(labels::SERVICE, "Bad Name")],
        ));
        engine.upsert_container(on_net("claaaaaaaaaa", "client", "10.1.0.9", &[]));
        let client = PathBuf::from("/run/docker/netns/claaaaaaaaaa");
        let prog = Arc::new(FailFor::new(&client, "this kernel has no IPVS".into()));
        let dir = tempdir("status");
        let mut agent = Agent::new(Arc::new(engine.clone()), prog, config(&dir), None).unwrap();
        let status = agent.status();
        assert!(!status.borrow().docker.connected, "nothing listed yet");
        agent.relist().await.unwrap();
        agent.sync(true).await;

        let s = status.borrow().clone();
        assert!(s.docker.connected);
        assert!(s.last_sync > 0 && s.last_resync == s.last_sync);
        let web = s.services.iter().find(|x| x.name == "web").expect("web listed");
        assert_eq!((web.mode.as_str(), web.fwmark), ("vip", Some(256)));
        assert!(web.vip.is_some_and(|v| v.octets()[..2] == [10, 253]));
        let states: Vec<(&str, &str, bool)> = web
            .tasks
            .iter()
            .map(|t| (t.name.as_str(), t.state.as_str(), t.serving))
            .collect();
        assert_eq!(states, [("w1", "running", true), ("w2", "unhealthy", false)]);
        let db = s.services.iter().find(|x| x.name == "db").expect("db listed");
        assert_eq!((db.mode.as_str(), db.vip, db.fwmark), ("dnsrr", None, None));
        assert_eq!(s.label_errors.len(), 1, "{:?}", s.label_errors);
        assert_eq!(s.label_errors[0].label, labels::SERVICE);
        assert!(s.label_errors[0].container.starts_with("odd"));

        let sb = s
            .sandboxes
            .iter()
            .find(|x| x.path == client)
            .expect("client sandbox listed");
        assert_eq!(sb.container, "client");
        assert!(!sb.in_sync);
        assert_eq!(sb.error.as_deref(), Some("this kernel has no IPVS"));
        let w1 = s
            .sandboxes
            .iter()
            .find(|x| x.container == "w1")
            .expect("task sandbox listed");
        assert!(w1.in_sync && w1.error.is_none() && *w1.services == ["web"]);

        // The engine goes away: status says so on the next listing.
        engine.fail(EngineError::Unavailable {
            endpoint: "unix:///fake".into(),
            reason: "gone".into(),
        });
        assert!(agent.relist().await.is_err());
        assert!(!status.borrow().docker.connected);
        assert!(status.borrow().docker.error.is_some());
        let _ = std::fs::remove_dir_all(dir);
    }
}
