//! `vipd run`: follow the Docker engine and keep every sandbox's VIPs in step.
//!
//! Level-triggered, like the per-namespace reconciler: events only say *which container*
//! to look at again; one `sync` computes from all known containers what every sandbox
//! should have and programs the sandboxes whose desired state changed, concurrently. A
//! periodic resync re-lists every container and re-reads every sandbox from the kernel,
//! so a missed event or a hand-made change never lasts longer than one interval. When
//! the event stream fails, vipd reconnects with backoff and re-lists.
//!
//! A sync is a chain of pure steps ([`pipeline`]); when things happen is decided by
//! [`schedule`]; what is kept of each sandbox is one [`records::SandboxRecord`]; what the
//! agent knows of the world is one [`inventory::Inventory`].

pub mod cluster;
pub mod inventory;
pub mod pipeline;
pub mod problems;
pub mod records;
pub mod schedule;
pub mod underlay;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use tracing::{info, info_span, warn, Instrument};

use crate::core::alloc::Allocations;
use crate::core::containers::{Attachment, Container, ContainerId, Drain, Health};
use crate::core::ipvs::Timeouts;
use crate::core::labels;
use crate::core::mesh::IngressLink;
use crate::core::model::EndpointMode;
use crate::core::model::PortKey;
use crate::core::model::{Ipv4Net, SandboxKey, ServiceName};
use crate::core::plan::SysctlSettings;
use crate::core::rules::Intent;
use crate::core::status::{EngineState, Report};
use crate::dns::server::CatalogHandle;
use crate::docker::{ContainerInfo, Engine, EngineAction, EngineError, EngineEvent, NetworkInfo};
use crate::kernel::{HostError, HostFirewall, HostPorts, IptablesHostFirewall, ProcHostPorts};
use crate::metrics::{ErrorKind, Metrics, ReconcileKind};
use crate::services::{DefinitionSource, Definitions, FileDefinitions};
use crate::state::{AllocationStore, StateError, StateStore};

pub use crate::kernel::{KernelProgrammer, KernelView, ProgramError, Programmed, SandboxProgrammer};
use inventory::Inventory;
use problems::Problems;
use records::{Records, Settled};
pub use schedule::Leaving;
use schedule::{Drains, Schedule, Wake, RELIST_RETRY};

/// Container inspects of one batch of events that may be in flight at once.
const INSPECTS_IN_FLIGHT: usize = 16;

/// How often, in cluster mode, the host's rules are read to see whether Docker displaced
/// vipd's jumps (it rewrites its own chains when it starts and on network changes).
pub const HOST_CHECK: Duration = Duration::from_secs(5);

/// How long a cluster agent leaves its sandboxes as they are while the store has given
/// no snapshot yet (a restarted vipd's sandboxes serve peers' tasks and VIPs it does not
/// know yet); past it, with the store still out of reach, it serves what is local.
pub const FIRST_SNAPSHOT_WAIT: Duration = Duration::from_secs(10);

/// The overlay's part of the host's rules in cluster mode (see
/// [`crate::cluster::rules::host_rules`]): programmed with the routing mesh's, in one
/// rule set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayRules {
    pub config: crate::core::overlay::OverlayConfig,
    /// The cluster range.
    pub range: Ipv4Net,
    /// The cluster network's bridge.
    pub bridge: String,
}

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

/// The kernel as the agent uses it: the sandboxes, the host's firewall, the host's bound
/// ports. Three narrow ports.
#[derive(Clone)]
pub struct KernelPorts {
    pub sandboxes: Arc<dyn SandboxProgrammer>,
    pub host_firewall: Arc<dyn HostFirewall>,
    pub host_ports: Arc<dyn HostPorts>,
}

impl KernelPorts {
    /// The real kernel.
    pub fn real() -> Self {
        KernelPorts {
            sandboxes: Arc::new(KernelProgrammer::default()),
            host_firewall: Arc::new(IptablesHostFirewall),
            host_ports: Arc::new(ProcHostPorts),
        }
    }
}

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub sandboxes_programmed: usize,
    pub operations: usize,
    pub errors: Vec<String>,
}

/// The agent's link to the cluster, and the Docker network whose containers are the
/// cluster's.
struct Joined {
    link: cluster::ClusterLink,
    view: tokio::sync::watch::Receiver<cluster::ClusterView>,
    network: String,
    /// When the agent joined: it waits [`FIRST_SNAPSHOT_WAIT`] from then at most for the
    /// store's first snapshot.
    joined_at: tokio::time::Instant,
}

/// The next new cluster view; never, on a single host.
async fn cluster_changed(joined: Option<&mut Joined>) -> bool {
    match joined {
        Some(j) => j.view.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// The agent's state.
pub struct Agent {
    engine: Arc<dyn Engine>,
    kernel: KernelPorts,
    cfg: AgentConfig,
    store: Box<dyn AllocationStore>,
    allocs: Allocations,
    /// The allocations as last loaded or committed (what the next commit is based on).
    stored: Allocations,
    inventory: Inventory,
    records: Records,
    problems: Problems,
    dns: Option<CatalogHandle>,
    engine_state: EngineState,
    last_resync: u64,
    status: tokio::sync::watch::Sender<Report>,
    networks: tokio::sync::watch::Sender<Vec<NetworkInfo>>,
    /// Which service holds each published port.
    holders: BTreeMap<PortKey, ServiceName>,
    /// The host rules last applied; `None` until they are (or after an error).
    host_applied: Option<Vec<Intent>>,
    /// Tasks on their way out (see [`AgentConfig::drain_grace`]).
    drains: Drains,
    /// The cluster this node is part of (`vipd run --etcd`); `None`: a single host.
    cluster: Option<Joined>,
    /// The saved allocations were missing or unreadable: the first full sync takes the
    /// VIPs and fwmarks vipd's rules show in the sandboxes before allocating new ones.
    recover: bool,
    /// Where the services defined with `vipd service` come from (read every sync).
    definitions: Arc<dyn DefinitionSource>,
    /// The definitions last read (kept while the source cannot be read).
    stored_definitions: Arc<Definitions>,
    /// The overlay's host rules, in cluster mode.
    overlay: Option<OverlayRules>,
    /// A Docker network event came: the host's rules are checked for a re-assert.
    host_check_due: bool,
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
        sandbox: info.sandbox_key.clone().map(SandboxKey::from),
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
        node: None,
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
            EngineEvent::Container {
                action: EngineAction::Exec(_) | EngineAction::Kill,
                ..
            } => {}
            EngineEvent::Container { id, .. } => ids.push(id.clone()),
            EngineEvent::Network {
                container: Some(id), ..
            } => ids.push(id.clone()),
            EngineEvent::Network {
                action: EngineAction::Create | EngineAction::Destroy | EngineAction::Remove,
                ..
            } => networks_changed = true,
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
    /// An agent with the allocations saved in `cfg.state_dir` (a corrupt state file is
    /// reported and set aside: allocations start again from what Docker says).
    pub fn new(
        engine: Arc<dyn Engine>,
        kernel: KernelPorts,
        cfg: AgentConfig,
        dns: Option<CatalogHandle>,
    ) -> Result<Self, AgentError> {
        let store = StateStore::open(&cfg.state_dir)?;
        Self::with_store(engine, kernel, cfg, dns, Box::new(store))
    }

    /// An agent with the allocations of `store`.
    pub fn with_store(
        engine: Arc<dyn Engine>,
        kernel: KernelPorts,
        cfg: AgentConfig,
        dns: Option<CatalogHandle>,
        store: Box<dyn AllocationStore>,
    ) -> Result<Self, AgentError> {
        let (stored, recover) = match store.load() {
            Ok(Some(a)) => (a, false),
            Ok(None) => (Allocations::default(), true),
            Err(e @ StateError::Corrupt { .. }) => {
                warn!(error = %e, "starting with no saved allocations: the VIPs in use are read back from the sandboxes");
                (Allocations::default(), true)
            }
            Err(e) => return Err(e.into()),
        };
        let mut allocs = stored.clone();
        for gone in allocs.retain_pool(cfg.pool) {
            warn!(service = %gone, pool = %cfg.pool, "saved VIP is outside the pool: the service gets a new one");
        }
        Ok(Agent {
            engine,
            kernel,
            store,
            allocs,
            stored,
            inventory: Inventory::default(),
            records: Records::default(),
            problems: Problems::default(),
            dns,
            engine_state: EngineState::default(),
            last_resync: 0,
            status: tokio::sync::watch::Sender::new(Report::default()),
            networks: tokio::sync::watch::Sender::new(Vec::new()),
            holders: BTreeMap::new(),
            host_applied: None,
            drains: Drains::new(cfg.drain_grace),
            cluster: None,
            recover,
            definitions: Arc::new(FileDefinitions::new(&cfg.state_dir)),
            stored_definitions: Arc::default(),
            overlay: None,
            host_check_due: false,
            cfg,
        })
    }

    /// Read the services defined with `vipd service` from `source` instead of the state
    /// directory's file (the cluster store's snapshot in cluster mode).
    pub fn with_definitions(mut self, source: Arc<dyn DefinitionSource>) -> Self {
        self.definitions = source;
        self
    }

    /// Make this node part of a cluster through `link`: containers on the Docker network
    /// called `network` get every cluster service, with the other nodes' tasks as
    /// backends, and VIPs come from the cluster's claims.
    pub fn join(&mut self, link: cluster::ClusterLink, network: &str) {
        let view = link.subscribe();
        self.cluster = Some(Joined {
            link,
            view,
            network: network.to_owned(),
            joined_at: tokio::time::Instant::now(),
        });
    }

    /// Program the overlay's host rules (for this node and its peers, as the cluster
    /// view has them) with the routing mesh's, in cluster mode.
    pub fn overlay_rules(&mut self, rules: OverlayRules) {
        self.overlay = Some(rules);
    }

    /// The cluster link, in cluster mode.
    pub fn cluster_link(&self) -> Option<&cluster::ClusterLink> {
        self.cluster.as_ref().map(|j| &j.link)
    }

    /// Take the other nodes' tasks from the link's latest view into the inventory, and
    /// return that view.
    fn take_cluster_view(&mut self) -> Option<cluster::ClusterView> {
        let joined = self.cluster.as_mut()?;
        let view = joined.view.borrow_and_update().clone();
        let network = self.inventory.network_named(&joined.network).cloned();
        let me = joined.link.node().clone();
        let peers = match &network {
            Some(net) => {
                let local: Vec<Container> = self.inventory.containers().values().cloned().collect();
                cluster::peer_containers(&view.state, &me, net, &local)
            }
            None => Vec::new(),
        };
        if self.inventory.set_peers(peers) {
            info!(tasks = self.inventory.peers().len(), "other nodes' tasks changed");
        }
        Some(view)
    }

    /// The current allocations.
    pub fn allocations(&self) -> &Allocations {
        &self.allocs
    }

    /// What `vipd status` shows, updated after every sync.
    pub fn status(&self) -> tokio::sync::watch::Receiver<Report> {
        self.status.subscribe()
    }

    /// The Docker networks, updated on every listing and when one is created or removed
    /// (the DNS listeners on their gateways follow it).
    pub fn networks(&self) -> tokio::sync::watch::Receiver<Vec<NetworkInfo>> {
        self.networks.subscribe()
    }

    async fn refresh_networks(&mut self) -> Result<(), EngineError> {
        let list = self
            .engine
            .networks()
            .await
            .inspect_err(|_| self.cfg.metrics.error(ErrorKind::Engine))?;
        if self.inventory.set_networks(list) {
            self.networks.send_replace(self.inventory.networks().to_vec());
        }
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
        self.inventory.replace_containers(fresh);
        info!(
            containers = self.inventory.containers().len(),
            "listed containers"
        );
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
        self.host_check_due |= batch.iter().any(|e| matches!(e, EngineEvent::Network { .. }));
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
                started |= self.note_leaving(id, action, attributes);
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
                        .inventory
                        .container(&id)
                        .is_some_and(|old| old.serving() && !self.drains.contains(&old.id));
                    if was_serving
                        && c.running
                        && c.health == Some(Health::Unhealthy)
                        && self
                            .drains
                            .start(&id, Leaving::Unhealthy, tokio::time::Instant::now())
                    {
                        info!(container = %c.name, grace = ?self.cfg.drain_grace, "task unhealthy: draining (weight 0 everywhere)");
                    }
                    self.forget_drain_if_restarted(&id, &c);
                    self.inventory.apply(id, Some(c));
                }
                Ok(None) => self.inventory.apply(id, None),
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
        let known = self.inventory.container(id).and_then(|c| c.sandbox.as_ref());
        if let (Some(known), Some(new)) = (known, now.sandbox.as_ref()) {
            if known != new && self.drains.end(id) {
                info!(container = %now.name, "task started again: no longer draining");
            }
        }
    }

    /// A kill event whose signal asks a running task to stop starts its drain (true
    /// then); a start event ends it (`docker restart`, or a task that came back).
    fn note_leaving(
        &mut self,
        id: &ContainerId,
        action: &EngineAction,
        attributes: &BTreeMap<String, String>,
    ) -> bool {
        match action {
            EngineAction::Kill => {
                let signal = attributes.get("signal").map(String::as_str).unwrap_or("");
                let Some(c) = self.inventory.container(id).filter(|c| c.serving()) else {
                    return false;
                };
                let name = c.name.clone();
                let now = tokio::time::Instant::now();
                let started =
                    signal_stops(signal) && self.drains.start(id, Leaving::Signal(signal.to_owned()), now);
                if started {
                    info!(container = %name, signal, grace = ?self.cfg.drain_grace, "task being stopped: draining (weight 0 everywhere)");
                }
                started
            }
            EngineAction::Start => {
                self.drains.end(id);
                false
            }
            _ => false,
        }
    }

    /// Each known container, with where it stands in its drain. A drain ends when the
    /// task stops running, comes back healthy (if it was unhealthy), or is over.
    fn containers_now(&mut self) -> Vec<Container> {
        let now = tokio::time::Instant::now();
        let grace = self.drains.grace();
        let containers = self.inventory.containers();
        self.drains.retain(|id, why| {
            containers.get(id).is_some_and(|c| {
                c.running && (*why != Leaving::Unhealthy || c.health == Some(Health::Unhealthy))
            })
        });
        containers
            .values()
            .map(|c| {
                let mut c = c.clone();
                let (drain, over) = self.drains.state(&c.id, now);
                if let Some(why) = over {
                    info!(container = %c.name, reason = ?why, grace = ?grace, "task still running after its drain grace: no longer a backend");
                }
                c.drain = drain;
                c
            })
            .chain(
                self.inventory
                    .peers()
                    .iter()
                    .filter(|p| !containers.contains_key(&p.id))
                    .cloned(),
            )
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
        let mut sandboxes: Vec<(bool, SandboxKey)> = containers
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
            let programmer = Arc::clone(&self.kernel.sandboxes);
            let read = sandbox.clone();
            let found = match tokio::task::spawn_blocking(move || programmer.marked_services(&read)).await {
                Ok(Ok(found)) => found,
                Ok(Err(e)) => {
                    warn!(sandbox = %sandbox, error = %e, "cannot read the VIPs in use");
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
                    info!(service = %m.name, vip = %vip, fwmark = m.fwmark.get(), sandbox = %sandbox, "VIP recovered from the kernel");
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
        self.drains.next_deadline(tokio::time::Instant::now())
    }

    /// Bring every sandbox to what the known containers call for. With `full`, every
    /// sandbox is re-read from the kernel, changed or not.
    pub async fn sync(&mut self, full: bool) -> SyncReport {
        let mut report = SyncReport::default();
        let mut service_errors: BTreeMap<ServiceName, Vec<String>> = BTreeMap::new();
        let now = now_secs();

        // Services and allocations.
        let cluster_view = self.take_cluster_view();
        let waiting = self
            .cluster
            .as_ref()
            .is_some_and(|j| j.joined_at.elapsed() < FIRST_SNAPSHOT_WAIT);
        if waiting && cluster_view.as_ref().is_some_and(|v| v.lists == 0) {
            // Without the store's first snapshot, peers' tasks and the cluster's VIPs are
            // unknown: programming now would take them out of sandboxes that still serve
            // them (a restarted vipd). The snapshot's arrival wakes the next pass.
            let e =
                "waiting for the cluster store's first snapshot: sandboxes are left as they are".to_owned();
            if self.problems.note(e.clone()) {
                warn!("{e}");
            }
            report.errors.push(e);
            return report;
        }
        let containers: Vec<Container> = self.containers_now();
        match self.definitions.definitions() {
            Ok(defs) => self.stored_definitions = defs,
            Err(e) => {
                let e = format!("service definitions not read (the last ones read are used): {e}");
                if self.problems.note(e.clone()) {
                    warn!("{e}");
                }
                report.errors.push(e);
            }
        }
        let labels::Merged {
            defs,
            label_errors,
            conflicts,
        } = pipeline::merged_services(&containers, &self.stored_definitions);
        for e in &label_errors {
            if self.problems.note(e.to_string()) {
                warn!(error = %e, "label refused");
            }
        }
        for c in &conflicts {
            if self.problems.note(format!("{c:?}")) {
                warn!(service = %c.service, setting = %c.setting, label = %c.label_value, stored = %c.stored_value, "a label disagrees with the stored definition, which is used");
            }
        }
        if full && self.recover {
            self.recover_allocations(&containers, &defs).await;
        }
        let allocated = match &cluster_view {
            Some(view) => pipeline::allocate_claimed(&self.allocs, &defs, &view.claims, self.cfg.grace, now),
            None => pipeline::allocate(&self.allocs, &defs, self.cfg.pool, self.cfg.grace, now),
        };
        if let Some(joined) = &self.cluster {
            let network = self.inventory.network_named(&joined.network);
            // A service idle here keeps its claim until its grace is over here too.
            let held = allocated.allocs.services.keys().cloned().collect();
            joined.link.want(cluster::wanted(
                &containers,
                &defs,
                &held,
                network,
                joined.link.node(),
            ));
        }
        for (name, e) in allocated.errors {
            self.cfg.metrics.error(ErrorKind::Allocation);
            if self.problems.note(e.clone()) {
                warn!(error = %e, "no VIP");
            }
            report.errors.push(e.clone());
            service_errors.entry(name).or_default().push(e);
        }
        for s in &allocated.released {
            info!(service = %s, "VIP released after the grace period");
        }
        self.allocs = allocated.allocs;
        if self.allocs != self.stored {
            match self.store.commit(&self.stored, &self.allocs) {
                Ok(()) => self.stored = self.allocs.clone(),
                Err(e) => {
                    self.cfg.metrics.error(ErrorKind::State);
                    if self.problems.note(format!("allocations not saved: {e}")) {
                        warn!(error = %e, "allocations not saved");
                    }
                    report.errors.push(e.to_string());
                }
            }
        }

        // DNS.
        if let Some(dns) = &self.dns {
            let (catalog, warnings) = pipeline::dns_catalog(
                &containers,
                &defs,
                &self.allocs,
                self.cfg.dns_domain.as_deref(),
                self.cfg.dns_ttl,
            );
            for w in warnings {
                if self.problems.note(w.clone()) {
                    warn!("{w}");
                }
            }
            dns.store(catalog);
        }

        // Desired state per sandbox, and the mesh.
        let mut desired = pipeline::desired(&containers, &defs, &self.allocs, self.cfg.timeouts);
        let mut host_rules = Vec::new();
        let ingress_key = self
            .cfg
            .ingress
            .as_ref()
            .map(|i| SandboxKey::new(i.netns.clone()));
        if let (Some(ingress), Some(key)) = (self.cfg.ingress.clone(), &ingress_key) {
            let bound = if pipeline::claims_new_port(&defs, &self.holders) {
                self.bound_ports(&mut report).await
            } else {
                BTreeSet::new()
            };
            // In cluster mode a port's claimer (the store's) wins it on every node.
            let claimed: BTreeMap<PortKey, ServiceName> = cluster_view
                .as_ref()
                .map(|v| {
                    v.state
                        .ports
                        .iter()
                        .map(|((proto, port), s)| (PortKey::new(*proto, *port), s.clone()))
                        .collect()
                })
                .unwrap_or_default();
            let m = pipeline::mesh(
                &containers,
                &defs,
                &self.holders,
                &bound,
                &claimed,
                &ingress.link,
                self.cfg.timeouts,
            );
            for (port, name) in &m.published {
                info!(service = %name, port = %port, "port published");
            }
            for (port, name) in &m.unpublished {
                info!(service = %name, port = %port, "port no longer published");
            }
            for (name, errors) in m.errors {
                for e in errors {
                    if self.problems.note(format!("{name}: {e}")) {
                        warn!(service = %name, error = %e, "port not published");
                    }
                    report.errors.push(format!("service {name}: {e}"));
                    service_errors.entry(name.clone()).or_default().push(e);
                }
            }
            self.holders = m.holders;
            host_rules = m.host_rules;
            desired.insert(key.clone(), Arc::new(m.ingress));
        }

        // The overlay's rules, once this node has its subnet.
        let overlay_nodes = self
            .cluster
            .as_ref()
            .zip(cluster_view.as_ref())
            .and_then(|(j, view)| underlay::overlay_nodes(view, j.link.node()));
        if let (Some(o), Some((me, peers))) = (&self.overlay, &overlay_nodes) {
            host_rules.extend(crate::cluster::rules::host_rules(
                &o.config, o.range, &o.bridge, me, peers,
            ));
        }

        // What to program, and programming it.
        let names: BTreeMap<&SandboxKey, &str> = containers
            .iter()
            .filter_map(|c| c.sandbox.as_ref().map(|sb| (sb, c.name.as_str())))
            .collect();
        self.records.follow(&desired, &names, ingress_key.as_ref());
        let own: BTreeMap<&SandboxKey, &Vec<Attachment>> = containers
            .iter()
            .filter_map(|c| c.sandbox.as_ref().map(|sb| (sb, &c.attachments)))
            .collect();
        let jobs = pipeline::to_program(desired, &self.records, &own, full);
        self.program(jobs, now, &mut report).await;
        let host_managed = self.cfg.ingress.is_some() || (self.overlay.is_some() && self.cluster.is_some());
        if host_managed && (full || self.host_applied.as_ref() != Some(&host_rules)) {
            self.host_check_due = false;
            self.program_host(host_rules, &mut report).await;
        } else if std::mem::take(&mut self.host_check_due) {
            self.reassert_host(&mut report).await;
        }

        // Status.
        if full {
            self.last_resync = now;
        }
        for cleared in self.problems.settle() {
            info!(problem = %cleared, "no longer a problem");
        }
        let status = pipeline::status(pipeline::StatusInput {
            engine: &self.engine_state,
            now,
            last_resync: self.last_resync,
            containers: &containers,
            defs: &defs,
            label_errors: &label_errors,
            conflicts: &conflicts,
            allocs: &self.allocs,
            holders: &self.holders,
            service_errors: &service_errors,
            records: &self.records,
        });
        let status = Report {
            cluster: self
                .cluster
                .as_ref()
                .zip(cluster_view.as_ref())
                .map(|(j, view)| cluster::status(view, j.link.node())),
            ..status
        };
        self.status.send_replace(status);
        report
    }

    /// The host's bound ports; none if they cannot be read (said in `report`).
    async fn bound_ports(&mut self, report: &mut SyncReport) -> BTreeSet<PortKey> {
        let ports = Arc::clone(&self.kernel.host_ports);
        let span = info_span!("bound_ports");
        let result = tokio::task::spawn_blocking(move || span.in_scope(|| ports.bound()))
            .await
            .unwrap_or_else(|e| Err(HostError::Task(e)));
        result.unwrap_or_else(|e| {
            self.cfg.metrics.error(ErrorKind::Host);
            if self.problems.note(format!("bound ports: {e}")) {
                warn!(error = %e, "cannot tell which ports are bound on the host");
            }
            report.errors.push(e.to_string());
            BTreeSet::new()
        })
    }

    /// Program `jobs`, all at once, each on a blocking thread.
    async fn program(&mut self, jobs: Vec<pipeline::Job>, now: u64, report: &mut SyncReport) {
        let mut running = Vec::new();
        for job in jobs {
            let kept = self.records.take_view(&job.sandbox);
            let kept = if job.read_again { None } else { kept };
            let programmer = Arc::clone(&self.kernel.sandboxes);
            let sysctls = self.cfg.sysctls.clone();
            let span = info_span!("program", sandbox = %job.sandbox);
            running.push(tokio::task::spawn_blocking(move || {
                let _enter = span.enter();
                let result = programmer.program(&job.sandbox, &job.spec, &sysctls, kept);
                (job.sandbox, job.attachments, result)
            }));
        }
        for done in futures::future::join_all(running).await {
            let Ok((sandbox, attachments, result)) = done else {
                continue;
            };
            match self.records.settle(&sandbox, result, attachments, now) {
                Settled::Programmed(ops) => {
                    report.sandboxes_programmed += 1;
                    report.operations += ops;
                    if ops > 0 {
                        info!(sandbox = %sandbox, operations = ops, "sandbox programmed");
                    }
                }
                // A container that stops takes its namespace with it, maybe while vipd
                // programs it: its stop event is on its way and settles it.
                Settled::Vanishing(e) => {
                    info!(sandbox = %sandbox, reason = %e, "sandbox gone while it was programmed")
                }
                // Gone a second time while its container still runs, or any other
                // error: the next event or resync tries again; nothing piles up.
                Settled::Failed(e) => {
                    self.cfg.metrics.error(ErrorKind::Sandbox);
                    let e = format!("{sandbox}: {e}");
                    if self.problems.note(e.clone()) {
                        warn!(error = %e, "sandbox not programmed");
                    }
                    report.errors.push(e);
                }
            }
        }
    }

    /// Bring the host's chains to `rules`.
    async fn program_host(&mut self, rules: Vec<Intent>, report: &mut SyncReport) {
        let firewall = Arc::clone(&self.kernel.host_firewall);
        let span = info_span!("program_host");
        let wanted = rules.clone();
        let result = tokio::task::spawn_blocking(move || {
            let _enter = span.enter();
            firewall.program(&wanted)
        })
        .await
        .unwrap_or_else(|e| Err(HostError::Task(e)));
        match result {
            Ok(ops) => {
                report.operations += ops;
                self.host_applied = Some(rules);
            }
            Err(e) => {
                self.cfg.metrics.error(ErrorKind::Host);
                if self.problems.note(format!("host rules: {e}")) {
                    warn!(error = %e, "host rules not programmed");
                }
                report.errors.push(format!("host rules: {e}"));
                self.host_applied = None;
            }
        }
    }

    /// Read the host's rules and, when Docker displaced vipd's jumps (or re-made
    /// `DOCKER-USER`), program the rules last applied again, unchanged. Nothing happens
    /// when nothing needs it: a second check changes nothing.
    pub async fn check_host(&mut self) -> SyncReport {
        let mut report = SyncReport::default();
        self.reassert_host(&mut report).await;
        report
    }

    async fn reassert_host(&mut self, report: &mut SyncReport) {
        let Some(rules) = self.host_applied.clone() else {
            return;
        };
        let firewall = Arc::clone(&self.kernel.host_firewall);
        let span = info_span!("host_reassert");
        let needed = tokio::task::spawn_blocking(move || span.in_scope(|| firewall.reassert()))
            .await
            .unwrap_or_else(|e| Err(HostError::Task(e)));
        match needed {
            Ok(reasons) if reasons.is_empty() => {}
            Ok(reasons) => {
                info!(?reasons, "host rules displaced; programming them again");
                self.program_host(rules, report).await;
            }
            Err(e) => {
                self.cfg.metrics.error(ErrorKind::Host);
                if self.problems.note(format!("host rules: {e}")) {
                    warn!(error = %e, "host rules not read");
                }
                report.errors.push(format!("host rules: {e}"));
            }
        }
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

    /// Re-list, then resync; a failed listing (a slow engine) keeps what is known and the
    /// event stream, and is tried again soon. False when the listing failed.
    async fn relist_and_resync(
        &mut self,
        schedule: &mut Schedule,
        events: &mut Events,
        kept: &mut Kept,
    ) -> bool {
        if let Err(e) = self.relist_meanwhile(events, kept).await {
            warn!(error = %e, retry_in = ?RELIST_RETRY, "re-list failed; keeping what is known");
            schedule.relist_failed(tokio::time::Instant::now());
            return false;
        }
        self.sync_pass(ReconcileKind::Resync)
            .instrument(info_span!("resync"))
            .await;
        true
    }

    /// Follow the engine until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        let mut schedule = Schedule::new(self.cfg.resync, self.cfg.debounce);
        let mut host_check = tokio::time::interval(HOST_CHECK);
        host_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let check_host = self.cluster.is_some() && self.overlay.is_some();
        loop {
            // Subscribe first, then list: nothing falls between the two.
            let mut events = self.engine.events();
            let mut kept = Kept::default();
            if let Err(e) = self.relist_meanwhile(&mut events, &mut kept).await {
                let wait = schedule.connect_failed();
                warn!(error = %e, retry_in = ?wait, "Docker engine not reachable; retrying");
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            schedule.connected();
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
            schedule.resynced(tokio::time::Instant::now());
            loop {
                // What came while the agent waited on the engine goes first.
                let next = if !kept.events.is_empty() {
                    Next::Batch(std::mem::take(&mut kept.events))
                } else if let Some(why) = kept.lost.take() {
                    Next::Lost(why)
                } else {
                    let (at, wake) = schedule.next_wake(self.next_drain_deadline());
                    tokio::select! {
                        _ = &mut shutdown => return Ok(()),
                        _ = tokio::time::sleep_until(at) => Next::Wake(wake),
                        true = cluster_changed(self.cluster.as_mut()) => Next::Cluster,
                        _ = host_check.tick(), if check_host => Next::HostCheck,
                        next = events.next() => match next {
                            Some(Ok(event)) => {
                                let mut batch = vec![event];
                                // Gather what arrives together (a scale-up is many events).
                                loop {
                                    match tokio::time::timeout(schedule.debounce(), events.next()).await {
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
                    }
                };
                match next {
                    Next::HostCheck => {
                        self.check_host().instrument(info_span!("host_check")).await;
                    }
                    Next::Cluster => {
                        self.sync_pass(ReconcileKind::Event)
                            .instrument(info_span!("cluster_changed"))
                            .await;
                    }
                    Next::Wake(Wake::DrainOver) => {
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
                            self.relist_and_resync(&mut schedule, &mut events, &mut kept)
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
                    Next::Wake(Wake::Resync) => {
                        schedule.resynced(tokio::time::Instant::now());
                        self.relist_and_resync(&mut schedule, &mut events, &mut kept)
                            .await;
                    }
                }
            }
        }
    }
}

/// What the event loop does next.
enum Next {
    /// A timer: the periodic resync, or a drain's grace is over.
    Wake(Wake),
    /// Events to look at.
    Batch(Vec<EngineEvent>),
    /// The event stream failed or ended.
    Lost(String),
    /// The cluster changed (a node, a task, a claim, the store's reachability).
    Cluster,
    /// Time to see whether the host's rules need re-asserting.
    HostCheck,
}

#[cfg(test)]
mod tests;
