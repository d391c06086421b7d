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
use crate::core::cluster::{Attachment, Container, ContainerId};
use crate::core::labels::{self, EndpointMode};
use crate::core::model::{Ipv4Net, ServiceName};
use crate::core::plan::SysctlSettings;
use crate::core::spec::SandboxSpec;
use crate::core::status::{self, EngineState, SandboxStatus, Status};
use crate::core::topology;
use crate::dns::server::CatalogHandle;
use crate::docker::{ContainerInfo, Engine, EngineError, EngineEvent, NetworkInfo};
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
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    State(#[from] StateError),
}

/// Programs one sandbox; the real one enters the namespace, tests use a recorder.
pub trait SandboxProgrammer: Send + Sync {
    /// Bring `sandbox` to `spec`; returns how many operations were applied. With `full`,
    /// the sandbox is read from the kernel first; without, the programmer may work from
    /// what it knows of the sandbox since the last call.
    fn program(
        &self,
        sandbox: &Path,
        spec: &SandboxSpec,
        sysctls: &SysctlSettings,
        full: bool,
    ) -> Result<usize, String>;

    /// The sandbox is gone (its container stopped): forget what is kept of it.
    fn forget(&self, _sandbox: &Path) {}
}

/// The real kernel. A full program reads the namespace and reconciles it
/// ([`reconcile::reconcile_netns_kept`]); otherwise the change is planned against the view
/// kept since ([`reconcile::update_netns`]), so a backend change is a few IPVS messages:
/// no process, no dump.
#[derive(Debug, Default)]
pub struct KernelProgrammer {
    kept: std::sync::Mutex<BTreeMap<PathBuf, crate::core::plan::ObservedSandbox>>,
}

impl SandboxProgrammer for KernelProgrammer {
    fn program(
        &self,
        sandbox: &Path,
        spec: &SandboxSpec,
        sysctls: &SysctlSettings,
        full: bool,
    ) -> Result<usize, String> {
        let ns = NetnsPath::from_arg(&sandbox.display().to_string());
        let kept = if full {
            None
        } else {
            self.kept.lock().ok().and_then(|mut k| k.remove(sandbox))
        };
        let result = match kept {
            Some(mut seen) => reconcile::update_netns(&ns, &mut seen, spec, sysctls).map(|o| (o, seen)),
            None => reconcile::reconcile_netns_kept(&ns, spec, sysctls),
        };
        match result {
            Ok((outcome, seen)) => {
                if let Ok(mut k) = self.kept.lock() {
                    k.insert(sandbox.to_owned(), seen);
                }
                Ok(outcome.applied)
            }
            // Nothing is kept after an error: the next call reads the kernel again.
            Err(e) => Err(e.to_string()),
        }
    }

    fn forget(&self, sandbox: &Path) {
        if let Ok(mut k) = self.kept.lock() {
            k.remove(sandbox);
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
    applied: BTreeMap<PathBuf, (SandboxSpec, Vec<Attachment>)>,
    reported: BTreeSet<String>,
    dns: Option<CatalogHandle>,
    /// Each sandbox's last outcome, for `vipd status`.
    sandboxes: BTreeMap<PathBuf, SandboxStatus>,
    engine_state: EngineState,
    last_resync: u64,
    status: tokio::sync::watch::Sender<Status>,
    networks: tokio::sync::watch::Sender<Vec<NetworkInfo>>,
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
    }
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
        let mut allocs = match store.load() {
            Ok(a) => a.unwrap_or_default(),
            Err(e @ StateError::Corrupt { .. }) => {
                warn!(error = %e, "starting with no saved allocations");
                Allocations::default()
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
            engine_state: EngineState::default(),
            last_resync: 0,
            status: tokio::sync::watch::Sender::new(Status::default()),
            networks: tokio::sync::watch::Sender::new(Vec::new()),
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
        let mut list = self.engine.networks().await?;
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

    /// Replace what vipd knows with a full listing.
    pub async fn relist(&mut self) -> Result<(), EngineError> {
        let all = match self.engine.containers().await {
            Ok(all) => all,
            Err(e) => {
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
        self.containers = all.iter().map(|i| (i.id.clone(), container_from(i))).collect();
        info!(containers = self.containers.len(), "listed containers");
        self.refresh_networks().await
    }

    /// Look at the container an event is about again.
    pub async fn on_event(&mut self, event: &EngineEvent) -> Result<(), EngineError> {
        let id = match event {
            EngineEvent::Container { id, action, .. } if !action.starts_with("exec_") => id,
            EngineEvent::Network {
                container: Some(id), ..
            } => id,
            EngineEvent::Network { action, .. }
                if matches!(action.as_str(), "create" | "destroy" | "remove") =>
            {
                return self.refresh_networks().await;
            }
            _ => return Ok(()),
        };
        match self.engine.inspect(id).await? {
            Some(info) => {
                self.containers.insert(id.clone(), container_from(&info));
            }
            None => {
                self.containers.remove(id);
            }
        }
        Ok(())
    }

    /// Bring every sandbox to what the known containers call for. With `full`, every
    /// sandbox is re-read from the kernel, changed or not.
    pub async fn sync(&mut self, full: bool) -> SyncReport {
        let containers: Vec<Container> = self.containers.values().cloned().collect();
        let (defs, label_errors) = labels::services(&containers);
        for e in &label_errors {
            if self.reported.insert(e.to_string()) {
                warn!(error = %e, "label refused");
            }
        }
        let mut report = SyncReport::default();
        let before = self.allocs.clone();
        let now = now_secs();
        let mut service_errors: BTreeMap<ServiceName, Vec<String>> = BTreeMap::new();
        for def in defs.values().filter(|d| d.mode == EndpointMode::Vip) {
            if let Err(e) = self.allocs.ensure(&def.name, self.cfg.pool) {
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
                warn!(error = %e, "allocations not saved");
                report.errors.push(e.to_string());
            }
        }

        if let Some(dns) = &self.dns {
            let (catalog, warnings) = crate::dns::cluster::catalog(
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

        let desired = topology::desired(&containers, &defs, &self.allocs);
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
                    services: Vec::new(),
                    in_sync: false,
                    error: None,
                    last_operations: 0,
                    last_change: 0,
                });
            entry.container = names.get(sandbox).map(|n| n.to_string()).unwrap_or_default();
            entry.services = spec.services.iter().map(|s| s.name.to_string()).collect();
        }
        let own: BTreeMap<&PathBuf, &Vec<Attachment>> = containers
            .iter()
            .filter_map(|c| c.sandbox.as_ref().map(|sb| (sb, &c.attachments)))
            .collect();
        let mut jobs = Vec::new();
        for (sandbox, spec) in desired {
            let attachments = own.get(&sandbox).map(|a| (*a).clone()).unwrap_or_default();
            let read_again = match self.applied.get(&sandbox) {
                _ if full => true,
                None => true,
                Some((_, had)) if *had != attachments => true,
                Some((was, _)) if *was == spec => continue,
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
                    self.applied.insert(sandbox, (spec, attachments));
                }
                Err(e) => {
                    // A container that died mid-programming takes its namespace with it:
                    // the next event or resync settles it; nothing piles up.
                    warn!(sandbox = %sandbox.display(), error = %e, "sandbox not programmed");
                    if let Some(st) = self.sandboxes.get_mut(&sandbox) {
                        st.in_sync = false;
                        st.error = Some(e.clone());
                    }
                    self.applied.remove(&sandbox);
                    report.errors.push(format!("{}: {e}", sandbox.display()));
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
            services: status::services(&containers, &defs, &self.allocs, &service_errors),
            sandboxes: self.sandboxes.values().cloned().collect(),
            label_errors: status::label_problems(&label_errors),
        };
        self.status.send_replace(status);
        report
    }

    /// Follow the engine until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(250);
        loop {
            // Subscribe first, then list: nothing falls between the two.
            let mut events = self.engine.events();
            if let Err(e) = self.relist().await {
                warn!(error = %e, retry_in = ?backoff, "Docker engine not reachable; retrying");
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
            backoff = Duration::from_millis(250);
            let report = self.sync(true).instrument(info_span!("resync")).await;
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
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    next = events.next() => match next {
                        Some(Ok(event)) => {
                            let mut batch = vec![event];
                            // Gather what arrives together (a scale-up is many events).
                            while let Ok(Some(Ok(more))) = tokio::time::timeout(self.cfg.debounce, events.next()).await {
                                batch.push(more);
                            }
                            let mut failed = false;
                            for event in &batch {
                                if let Err(e) = self.on_event(event).await {
                                    warn!(error = %e, "inspect failed; re-listing");
                                    failed = true;
                                }
                            }
                            if failed {
                                break;
                            }
                            self.sync(false).instrument(info_span!("sync", events = batch.len())).await;
                        }
                        Some(Err(e)) => {
                            warn!(error = %e, "event stream failed; reconnecting and re-listing");
                            break;
                        }
                        None => {
                            warn!("event stream ended; reconnecting and re-listing");
                            break;
                        }
                    },
                    _ = tick.tick() => {
                        if let Err(e) = self.relist().await {
                            warn!(error = %e, "periodic re-list failed");
                            break;
                        }
                        self.sync(true).instrument(info_span!("resync")).await;
                    }
                }
            }
        }
    }
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
        Mutex<BTreeMap<PathBuf, SandboxSpec>>,
        Mutex<usize>,
        Mutex<BTreeMap<PathBuf, bool>>,
    );

    impl SandboxProgrammer for Recorder {
        fn program(
            &self,
            sandbox: &Path,
            spec: &SandboxSpec,
            _: &SysctlSettings,
            full: bool,
        ) -> Result<usize, String> {
            *self.1.lock().unwrap() += 1;
            self.2.lock().unwrap().insert(sandbox.to_owned(), full);
            self.0.lock().unwrap().insert(sandbox.to_owned(), spec.clone());
            Ok(1)
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
        }
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vipd-agent-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[tokio::test(flavor = "current_thread")]
    async fn tasks_become_backends_everywhere_and_leave_on_their_die_event() {
        let engine = FakeEngine::new();
        let web = [(labels::SERVICE, "web")];
        engine.upsert_container(on_net("w1aaaaaaaaaa", "w1", "10.1.0.3", &web));
        engine.upsert_container(on_net("w2aaaaaaaaaa", "w2", "10.1.0.4", &web));
        engine.upsert_container(on_net("claaaaaaaaaa", "client", "10.1.0.9", &[]));
        let rec = Arc::new(Recorder::default());
        let dir = tempdir("die");
        let mut agent = Agent::new(Arc::new(engine.clone()), rec.clone(), config(&dir), None).unwrap();
        agent.relist().await.unwrap();
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
        std::fs::remove_dir_all(&dir).unwrap();
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
    struct FailFor(PathBuf, Recorder);

    impl SandboxProgrammer for FailFor {
        fn program(
            &self,
            sb: &Path,
            spec: &SandboxSpec,
            sys: &SysctlSettings,
            full: bool,
        ) -> Result<usize, String> {
            if sb == self.0 {
                return Err("this kernel has no IPVS".into());
            }
            self.1.program(sb, spec, sys, full)
        }
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
        let prog = Arc::new(FailFor(client.clone(), Recorder::default()));
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
        assert!(w1.in_sync && w1.error.is_none() && w1.services == ["web"]);

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
