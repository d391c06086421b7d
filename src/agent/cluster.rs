//! The agent's link to the cluster store (`vipd run --etcd`).
//!
//! The link runs beside the agent, never in its way: the agent tells it what this node
//! has ([`Wanted`]: its tasks on the cluster network, the VIP services it needs claims
//! for) and reads what the cluster has ([`ClusterView`]: nodes, every node's tasks, the
//! VIP claims, whether the store answers). The link turns one into the other through
//! the store: a lease (kept in the state dir, so a restart within its TTL changes
//! nothing on other nodes), the node's record and subnet, the node's tasks on its lease,
//! and the claims. A [`Reflector`] keeps the snapshot. etcd is never on the data path:
//! while it is unreachable the last view stays and the agent keeps serving it.
//!
//! A node name or address another live node holds is refused by the store; the link
//! keeps trying (the other node's lease may end) and says why in the view, so `vipd
//! status` and the log show it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::core::containers::{Attachment, Container, ContainerId, Drain, NetworkId};
use crate::core::labels::{self, ServiceDef, ServiceDefinition};
use crate::core::model::{EndpointMode, Ipv4Net, NodeName, PortKey, ServiceName, TaskId};
use crate::core::status::{ClusterStatus, NodeStatus};
use crate::store::{
    Backoff, Cluster, ClusterState, KvError, LeaseId, NodeRecord, Reflector, Revision, StoreError,
    TaskRecord, VipClaim,
};

/// The file in the state dir that keeps the node's lease id across restarts.
pub const LEASE_FILE: &str = "cluster-lease";

/// The prefix length of a node's slice of the cluster subnet.
pub const NODE_PREFIX: u8 = crate::core::overlay::NODE_PREFIX;

/// How the link runs.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub node: NodeName,
    /// The address other nodes reach this one at (the VXLAN underlay).
    pub address: IpAddr,
    /// The cluster subnet every node takes a /24 of.
    pub range: Ipv4Net,
    /// The VIP pool (the same on every node: claims are made in it).
    pub pool: Ipv4Net,
    /// The lease's TTL; it is kept alive every third of it.
    pub ttl: Duration,
    /// Where the lease id is kept.
    pub state_dir: PathBuf,
    /// How the reflector and the link retry while the store is unreachable.
    pub backoff: Backoff,
}

/// What this node has, as the agent last said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    /// This node's tasks on the cluster network.
    pub tasks: BTreeMap<TaskId, TaskRecord>,
    /// The VIP services this node needs a cluster-wide VIP and fwmark for.
    pub services: BTreeSet<ServiceName>,
    /// The published ports of the services it knows, each with the service asking for
    /// it (two services may ask for one: the store's claim decides, on every node).
    pub ports: BTreeSet<(PortKey, ServiceName)>,
}

/// Whether the store answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreHealth {
    /// Whether the store answers: the reflector has a snapshot and its watch is open,
    /// and the link's own calls succeed.
    pub connected: bool,
    /// Since when (unix seconds) it has not answered; `None` while it does.
    pub unreachable_since: Option<u64>,
    /// The last error, while unreachable.
    pub error: Option<String>,
}

/// What the agent sees of the cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// This node, once registered with its subnet.
    pub me: Option<NodeRecord>,
    /// The last snapshot of the store.
    pub state: Arc<ClusterState>,
    /// Every VIP claim known: the snapshot's, and those this link made since.
    pub claims: BTreeMap<ServiceName, VipClaim>,
    pub store: StoreHealth,
    /// Why this node is not (or no longer) part of the cluster, while it is not.
    pub problem: Option<String>,
    /// How many times the store was listed (a new list after a compaction or an outage).
    pub lists: u64,
    /// When (unix seconds) each node last renewed its lease, as far as this node knows.
    pub seen: BTreeMap<NodeName, u64>,
    /// How far the snapshot trails the store: the time from a revision read in the store
    /// to the snapshot having it (measured once per TTL).
    pub watch_lag: Option<Duration>,
}

impl ClusterView {
    /// The other live nodes.
    pub fn peers<'a>(&'a self, me: &'a NodeName) -> impl Iterator<Item = &'a NodeRecord> + 'a {
        self.state.nodes.values().filter(move |n| n.name != *me)
    }
}

/// Sleep until `at`; never wake without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The lease id saved in `dir`, if there is a readable one.
pub fn load_lease(dir: &Path) -> Option<LeaseId> {
    let text = std::fs::read_to_string(dir.join(LEASE_FILE)).ok()?;
    text.trim().parse().ok().map(LeaseId)
}

/// Save the lease id in `dir` (written aside, then renamed: never half a file).
pub fn save_lease(dir: &Path, lease: LeaseId) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{LEASE_FILE}.tmp"));
    std::fs::write(&tmp, format!("{}\n", lease.0))?;
    std::fs::rename(tmp, dir.join(LEASE_FILE))
}

/// A running link; dropping it stops it (the lease then ends after its TTL).
pub struct ClusterLink {
    view: watch::Receiver<ClusterView>,
    snapshots: watch::Receiver<crate::store::View>,
    /// `None` until the agent first says what it has (after its first Docker listing).
    wanted: watch::Sender<Option<Wanted>>,
    node: NodeName,
    task: JoinHandle<()>,
}

impl Drop for ClusterLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ClusterLink {
    /// Join the cluster through `cluster` and follow it.
    pub fn spawn(cluster: Cluster, cfg: LinkConfig) -> Self {
        let (view_tx, view) = watch::channel(ClusterView::default());
        let (wanted, wanted_rx) = watch::channel(None);
        let node = cfg.node.clone();
        let span = info_span!("cluster_link", node = %cfg.node);
        let reflector = Reflector::spawn(Arc::clone(cluster.kv()), cluster.keys().clone(), cfg.backoff);
        let snapshots = reflector.subscribe();
        let task = tokio::spawn(
            Link {
                reflector,
                cluster,
                cfg,
                view: view_tx,
                lease: None,
                me: None,
                put: BTreeMap::new(),
                claims: BTreeMap::new(),
                held: BTreeSet::new(),
                held_ports: BTreeSet::new(),
                problem: None,
                failing_since: None,
                last_error: None,
                seen: BTreeMap::new(),
                lag_probe: None,
                watch_lag: None,
            }
            .run(wanted_rx)
            .instrument(span),
        );
        ClusterLink {
            view,
            snapshots,
            wanted,
            node,
            task,
        }
    }

    pub fn node(&self) -> &NodeName {
        &self.node
    }

    /// The current view.
    pub fn view(&self) -> ClusterView {
        self.view.borrow().clone()
    }

    /// A receiver that wakes on every new view.
    pub fn subscribe(&self) -> watch::Receiver<ClusterView> {
        self.view.clone()
    }

    /// The store's snapshots as the link's reflector has them (what
    /// [`crate::services::SnapshotDefinitions`] reads the cluster's definitions from).
    pub fn snapshots(&self) -> watch::Receiver<crate::store::View> {
        self.snapshots.clone()
    }

    /// Say what this node has now (nothing is written when it is what was said before).
    /// Until it is first said, the link writes no task and withdraws none: a restarted
    /// vipd that has not listed Docker yet does not know its tasks, and the ones its
    /// lease still holds stay as they are.
    pub fn want(&self, wanted: Wanted) {
        self.wanted.send_if_modified(|w| {
            let changed = w.as_ref() != Some(&wanted);
            *w = Some(wanted);
            changed
        });
    }
}

struct Link {
    cluster: Cluster,
    cfg: LinkConfig,
    reflector: Reflector,
    view: watch::Sender<ClusterView>,
    lease: Option<LeaseId>,
    /// This node's record, once registered on `lease` with its subnet.
    me: Option<NodeRecord>,
    /// The tasks written on the current lease (by this process, or by the one before it
    /// when the lease was resumed).
    put: BTreeMap<TaskId, TaskRecord>,
    /// The claims this link made that its snapshot does not show yet.
    claims: BTreeMap<ServiceName, VipClaim>,
    /// The services this node wanted VIPs for: one it no longer wants is given back.
    held: BTreeSet<ServiceName>,
    /// The published ports this node asked for, likewise.
    held_ports: BTreeSet<(PortKey, ServiceName)>,
    /// A refusal that trying again as it is will not fix soon (a name taken, ...).
    problem: Option<String>,
    /// Since when the link's own calls fail because the store does not answer.
    failing_since: Option<u64>,
    last_error: Option<String>,
    /// When (unix seconds) each live node last renewed its lease, as far as this link
    /// knows: its own keep-alives, and the peers' leases read once per TTL.
    seen: BTreeMap<NodeName, u64>,
    /// The store's revision as read once per TTL, and when: the watch's lag is how long
    /// the snapshot takes to reach it.
    lag_probe: Option<(Revision, Instant)>,
    /// The last lag measured that way.
    watch_lag: Option<Duration>,
}

impl Link {
    async fn run(mut self, mut wanted: watch::Receiver<Option<Wanted>>) {
        let mut snapshots = self.reflector.subscribe();
        let keep_alive = (self.cfg.ttl / 3).max(Duration::from_millis(10));
        // The lease is renewed on its own clock: neither the store's changes nor the
        // agent's (each wakes a step) nor a failing step may put a keep-alive off. One
        // that did not renew is tried again soon (at most a quarter of the interval
        // later), so an outage shorter than the TTL never costs the lease.
        let renew_max = (keep_alive / 4).max(Duration::from_millis(10));
        let mut renew_at = Instant::now() + keep_alive;
        let mut renew_retry = self.cfg.backoff.initial.min(renew_max);
        let mut retry = self.cfg.backoff.initial;
        // The peers' leases are read once per TTL (N-1 reads per node, no writes): enough
        // to say how long ago each was last seen.
        let mut probe_at = Instant::now();
        loop {
            let now = wanted.borrow_and_update().clone();
            let ok = self.step(now.as_ref()).await;
            self.check_lag();
            self.publish();
            let step_again = if ok {
                retry = self.cfg.backoff.initial;
                None
            } else {
                let wait = retry.min(keep_alive);
                retry = (retry * 2).min(self.cfg.backoff.max);
                Some(Instant::now() + wait)
            };
            tokio::select! {
                _ = tokio::time::sleep_until(renew_at), if self.lease.is_some() => {
                    if self.keep_alive().await {
                        renew_retry = self.cfg.backoff.initial.min(renew_max);
                        renew_at = Instant::now() + keep_alive;
                        if Instant::now() >= probe_at {
                            self.probe_peers().await;
                            probe_at = Instant::now() + self.cfg.ttl;
                        }
                    } else {
                        renew_at = Instant::now() + renew_retry;
                        renew_retry = (renew_retry * 2).min(renew_max);
                    }
                }
                _ = sleep_until_some(step_again) => {}
                changed = wanted.changed() => if changed.is_err() { return },
                changed = snapshots.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Join if not joined, then bring the node's tasks and claims to `wanted` (once the
    /// agent has said it); false when something failed (tried again soon).
    async fn step(&mut self, wanted: Option<&Wanted>) -> bool {
        if self.me.is_none() {
            if let Err(e) = self.join().await {
                self.failed(&e);
                return false;
            }
        }
        let Some(wanted) = wanted else {
            self.answered();
            return true;
        };
        let mut ok = true;
        if let Err(e) = self.put_tasks(wanted).await {
            self.failed(&e);
            ok = false;
        }
        if let Err(e) = self.claim(wanted).await {
            self.failed(&e);
            ok = false;
        }
        if ok {
            self.answered();
        }
        ok
    }

    /// Lease (resumed if the saved one lives), register, take a subnet, register with it.
    /// A resumed lease whose record is already right is written nothing: a restart
    /// within the TTL changes nothing on other nodes.
    async fn join(&mut self) -> Result<(), StoreError> {
        let resume = self.lease.or_else(|| load_lease(&self.cfg.state_dir));
        let lease = self.cluster.lease(self.cfg.ttl, resume).await?;
        let held = if Some(lease) == resume {
            self.cluster.on_lease(lease).await?
        } else {
            // Whatever was written on the old lease is gone with it.
            self.put.clear();
            ClusterState::default()
        };
        self.lease = Some(lease);
        if let Err(e) = save_lease(&self.cfg.state_dir, lease) {
            warn!(error = %e, "cannot save the lease id: a restart will register anew");
        }
        // The tasks the lease still holds are this node's: they stay until the agent says
        // what it has, then those it no longer has are withdrawn.
        for t in held.tasks.values().filter(|t| t.node == self.cfg.node) {
            self.put.entry(t.id.clone()).or_insert_with(|| t.clone());
        }
        let kept = match held.nodes.get(&self.cfg.node) {
            Some(r) if r.address == self.cfg.address && r.subnet.is_some() => {
                let subnet = self
                    .cluster
                    .claim_subnet(&self.cfg.node, self.cfg.range, NODE_PREFIX, None)
                    .await?;
                (r.subnet == Some(subnet)).then(|| r.clone())
            }
            _ => None,
        };
        let resumed = kept.is_some();
        let record = match kept {
            Some(record) => record,
            None => {
                let mut record = NodeRecord {
                    name: self.cfg.node.clone(),
                    address: self.cfg.address,
                    subnet: None,
                };
                self.cluster.register_node(&record, lease).await?;
                let subnet = self
                    .cluster
                    .claim_subnet(&record.name, self.cfg.range, NODE_PREFIX, None)
                    .await?;
                record.subnet = Some(subnet);
                self.cluster.register_node(&record, lease).await?;
                record
            }
        };
        let subnet = record.subnet.map(|s| s.to_string()).unwrap_or_default();
        info!(lease = %lease, subnet = %subnet, resumed, "joined the cluster");
        self.me = Some(record);
        self.seen.insert(self.cfg.node.clone(), unix_now());
        self.problem = None;
        Ok(())
    }

    /// Renew the lease; a lease that ended means joining again (and writing the tasks
    /// again, on the new lease). A keep-alive that fails or times out ends nothing (etcd
    /// refreshes every lease when its leader changes), and one that says "not found" is
    /// believed only once the lease's time to live says so too: etcd can answer a TTL of
    /// 0 for a live lease around a leader change.
    ///
    /// True when the lease was renewed (or there is none to renew).
    async fn keep_alive(&mut self) -> bool {
        let Some(lease) = self.lease else { return true };
        let kv = Arc::clone(self.cluster.kv());
        match kv.lease_keep_alive(lease).await {
            Ok(_) => {
                self.answered();
                self.seen.insert(self.cfg.node.clone(), unix_now());
                true
            }
            Err(KvError::LeaseNotFound(_)) => match kv.lease_time_to_live(lease).await {
                Ok(None) => {
                    warn!(lease = %lease, "the lease ended (the store was out of reach too long?): joining again");
                    self.lease = None;
                    self.me = None;
                    self.put.clear();
                    true
                }
                Ok(Some(ttl)) => {
                    warn!(lease = %lease, left = ?ttl.left, "a keep-alive said the lease was not found, but it lives: keeping it");
                    self.answered();
                    false
                }
                Err(e) => {
                    self.failed(&e.into());
                    false
                }
            },
            Err(e) => {
                self.failed(&e.into());
                false
            }
        }
    }

    async fn put_tasks(&mut self, wanted: &Wanted) -> Result<(), StoreError> {
        let Some(lease) = self.lease else { return Ok(()) };
        // Only a task no longer here, or whose key changes (its service), is deleted: a
        // changed record is written over, so other nodes never see it leave.
        let keys = self.cluster.keys();
        let gone: Vec<TaskRecord> = self
            .put
            .iter()
            .filter(|(id, t)| wanted.tasks.get(*id).is_none_or(|w| keys.task(w) != keys.task(t)))
            .map(|(_, t)| t.clone())
            .collect();
        for t in gone {
            self.cluster.delete_task(&t).await?;
            info!(task = %t.id, service = %t.service, "task withdrawn from the cluster");
            self.put.remove(&t.id);
        }
        for (id, t) in &wanted.tasks {
            if self.put.get(id) != Some(t) {
                self.cluster.put_task(t, lease).await?;
                info!(task = %t.id, service = %t.service, address = %t.address, "task announced to the cluster");
                self.put.insert(id.clone(), t.clone());
            }
        }
        Ok(())
    }

    /// Claim a VIP for each wanted service the store has none for, and give back those
    /// this node no longer wants (their grace is over here) when no task of theirs is
    /// left anywhere and they have no stored definition.
    async fn claim(&mut self, wanted: &Wanted) -> Result<(), StoreError> {
        let view = self.reflector.view();
        for service in &wanted.services {
            if view.state.services.contains_key(service) {
                // The snapshot has it: the store is the truth from now on.
                self.claims.remove(service);
                continue;
            }
            // Not (or no longer) in the snapshot: claimed a moment ago and not seen yet,
            // or given back by another node. Claiming is idempotent: it reads first.
            let claim = self.cluster.claim_vip(service, self.cfg.pool).await?;
            if self.claims.insert(service.clone(), claim) != Some(claim) {
                info!(service = %service, vip = %claim.vip, fwmark = claim.fwmark, "VIP claimed in the cluster");
            }
        }
        let dropped: Vec<ServiceName> = self.held.difference(&wanted.services).cloned().collect();
        for service in dropped {
            self.claims.remove(&service);
            match self.cluster.release_vip(&service).await {
                Ok(true) => {
                    info!(service = %service, "VIP given back to the cluster (no task left anywhere)")
                }
                Ok(false) => {}
                Err(StoreError::InUse { tasks, .. }) => {
                    info!(service = %service, tasks, "VIP kept: the service still has tasks on other nodes");
                }
                Err(e) => return Err(e),
            }
        }
        // Everything dropped was given back (or found still in use): what is held now is
        // what is wanted. An error above returned first, so the rest is tried again.
        self.held.clone_from(&wanted.services);
        self.claim_ports(wanted).await
    }

    /// Claim each wanted published port the store has no claim for (the first service to
    /// claim it holds it cluster-wide; the others are refused it on every node, by the
    /// mesh), and give back the ports this node asked for and no longer wants. A port
    /// another node still wants is claimed again by it on its next step.
    async fn claim_ports(&mut self, wanted: &Wanted) -> Result<(), StoreError> {
        let view = self.reflector.view();
        for (key, service) in &wanted.ports {
            if view.state.ports.contains_key(&(key.protocol, key.port)) {
                continue;
            }
            match self.cluster.claim_port(key.protocol, key.port, service).await {
                Ok(()) => info!(service = %service, port = %key, "published port claimed in the cluster"),
                Err(StoreError::PortTaken { by, .. }) => {
                    debug!(service = %service, port = %key, by = %by, "published port held by another service");
                }
                Err(e) => return Err(e),
            }
        }
        let dropped: Vec<(PortKey, ServiceName)> =
            self.held_ports.difference(&wanted.ports).cloned().collect();
        for (key, service) in dropped {
            if self
                .cluster
                .release_port(key.protocol, key.port, &service)
                .await?
            {
                info!(service = %service, port = %key, "published port given back to the cluster");
            }
        }
        self.held_ports.clone_from(&wanted.ports);
        Ok(())
    }

    fn answered(&mut self) {
        self.failing_since = None;
        self.last_error = None;
    }

    fn failed(&mut self, e: &StoreError) {
        match e {
            StoreError::Kv(k) if k.is_transient() => {
                if self.failing_since.is_none() {
                    warn!(error = %e, "cluster store unreachable; serving what is known, trying again");
                }
                self.failing_since.get_or_insert_with(unix_now);
                self.last_error = Some(e.to_string());
            }
            _ => {
                let text = e.to_string();
                if self.problem.as_deref() != Some(text.as_str()) {
                    warn!(error = %text, "not part of the cluster; trying again");
                }
                self.problem = Some(text);
            }
        }
    }

    /// Read each live peer's lease: how long ago it was last renewed. A peer whose lease
    /// cannot be read keeps what was seen before; nodes no longer live are forgotten.
    async fn probe_peers(&mut self) {
        let kv = Arc::clone(self.cluster.kv());
        // One read of this node's own key gives the store's revision now.
        if self.lag_probe.is_none() {
            if let Ok(listing) = kv.get_prefix(&self.cluster.keys().node(&self.cfg.node)).await {
                self.lag_probe = Some((listing.revision, Instant::now()));
                self.check_lag();
            }
        }
        let state = self.reflector.view().state;
        for (name, lease) in &state.node_leases {
            if *name == self.cfg.node {
                continue;
            }
            match kv.lease_time_to_live(*lease).await {
                Ok(Some(ttl)) => {
                    let ago = ttl.since_renewed().as_secs();
                    self.seen.insert(name.clone(), unix_now().saturating_sub(ago));
                }
                Ok(None) => {
                    self.seen.remove(name);
                }
                Err(e) => {
                    debug!(node = %name, error = %e, "a peer's lease could not be read");
                    break;
                }
            }
        }
        let me = &self.cfg.node;
        self.seen.retain(|n, _| n == me || state.nodes.contains_key(n));
    }

    /// Once the snapshot has the revision read by the last probe, the watch's lag is
    /// how long that took.
    fn check_lag(&mut self) {
        if let Some((revision, at)) = self.lag_probe {
            if self.reflector.view().state.revision >= revision {
                self.watch_lag = Some(at.elapsed());
                self.lag_probe = None;
            }
        }
    }

    fn publish(&self) {
        let snapshot = self.reflector.view();
        let mut claims = snapshot.state.services.clone();
        for (s, c) in &self.claims {
            claims.entry(s.clone()).or_insert(*c);
        }
        let since = match (snapshot.unreachable_since, self.failing_since) {
            (Some(at), mine) => {
                let ago = at.elapsed().as_secs();
                Some(mine.unwrap_or(u64::MAX).min(unix_now().saturating_sub(ago)))
            }
            (None, mine) => mine,
        };
        let error = snapshot
            .last_error
            .map(|e| e.to_string())
            .or_else(|| self.last_error.clone());
        let view = ClusterView {
            me: self.me.clone(),
            state: snapshot.state,
            claims,
            store: StoreHealth {
                connected: snapshot.connected && self.failing_since.is_none(),
                unreachable_since: since,
                error: since.and(error),
            },
            problem: self.problem.clone(),
            lists: snapshot.lists,
            seen: self.seen.clone(),
            // A probe still waiting counts as lag already: a stuck watch shows it growing.
            watch_lag: match (self.watch_lag, self.lag_probe) {
                (last, Some((_, at))) => Some(at.elapsed().max(last.unwrap_or_default())),
                (last, None) => last,
            },
        };
        self.view.send_replace(view);
    }
}

/// What `vipd status` shows of the cluster.
pub fn status(view: &ClusterView, me: &NodeName) -> ClusterStatus {
    let mut tasks: BTreeMap<&NodeName, usize> = BTreeMap::new();
    for t in view.state.tasks.values() {
        *tasks.entry(&t.node).or_default() += 1;
    }
    ClusterStatus {
        node: me.to_string(),
        joined: view.me.is_some(),
        problem: view.problem.clone(),
        store_connected: view.store.connected,
        store_lists: view.lists,
        store_unreachable_since: view.store.unreachable_since,
        store_error: view.store.error.clone(),
        store_watch_lag_ms: view
            .watch_lag
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        nodes: view
            .state
            .nodes
            .values()
            .map(|n| NodeStatus {
                name: n.name.to_string(),
                address: n.address.to_string(),
                subnet: n
                    .subnet
                    .or_else(|| view.state.subnets.get(&n.name).copied())
                    .map(|s| s.to_string()),
                tasks: tasks.get(&n.name).copied().unwrap_or(0),
                last_seen: view.seen.get(&n.name).copied(),
            })
            .collect(),
    }
}

/// The labels that define a service (not a task's own, like its weight): a peer's task
/// takes them from a local task of its service, so the two agree.
fn defining(labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    labels
        .iter()
        .filter(|(k, _)| {
            k.as_str() == labels::ENDPOINT_MODE
                || k.as_str() == labels::SCHEDULER
                || k.as_str() == labels::PUBLISH
                || k.starts_with(labels::PORT_PREFIX)
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The labels that define a service as `def` says (what [`defining`] keeps of a local
/// task's), for a peer's task whose service has no task here.
fn definition_labels(def: &ServiceDefinition) -> BTreeMap<String, String> {
    let mut out = BTreeMap::from([
        (
            labels::ENDPOINT_MODE.to_owned(),
            labels::endpoint_mode_name(def.mode).to_owned(),
        ),
        (labels::SCHEDULER.to_owned(), def.scheduler.to_string()),
    ]);
    if !def.publish.is_empty() {
        let publish: Vec<String> = def.publish.iter().map(ToString::to_string).collect();
        out.insert(labels::PUBLISH.to_owned(), publish.join(","));
    }
    for p in &def.ports {
        out.insert(
            format!("{}{}", labels::PORT_PREFIX, p.name),
            format!("{}/{}", p.port, p.protocol),
        );
    }
    out
}

/// Other nodes' tasks as the containers planning knows: running, no sandbox here (none
/// is programmed for them), attached to the local cluster network `network` at their
/// address (reached over the overlay). A service also defined here takes its local
/// tasks' definition; one that is not takes the definition the task's record carries
/// (its node's), and each task its own weight.
pub fn peer_containers(
    state: &ClusterState,
    me: &NodeName,
    network: &NetworkId,
    local: &[Container],
) -> Vec<Container> {
    let mut defined: BTreeMap<&str, BTreeMap<String, String>> = BTreeMap::new();
    for c in local {
        if let Some(s) = c.labels.get(labels::SERVICE) {
            defined.entry(s.as_str()).or_insert_with(|| defining(&c.labels));
        }
    }
    state
        .tasks
        .values()
        .filter(|t| t.node != *me)
        .filter_map(|t| {
            let IpAddr::V4(ip) = t.address else { return None };
            let mut labels = match (defined.get(t.service.as_str()), &t.definition) {
                (Some(here), _) => here.clone(),
                (None, Some(there)) => definition_labels(there),
                (None, None) => BTreeMap::new(),
            };
            labels.insert(labels::SERVICE.to_owned(), t.service.as_str().to_owned());
            if let Some(weight) = t.weight {
                labels.insert(labels::WEIGHT.to_owned(), weight.to_string());
            }
            Some(Container {
                id: ContainerId(t.id.as_str().to_owned()),
                name: format!(
                    "{}.{}",
                    t.service,
                    t.id.as_str().get(..12).unwrap_or(t.id.as_str())
                ),
                labels,
                running: true,
                health: None,
                sandbox: None,
                attachments: vec![Attachment {
                    network: network.clone(),
                    ip,
                    prefix_len: NODE_PREFIX,
                }],
                drain: Drain::No,
                node: Some(t.node.clone()),
            })
        })
        .collect()
}

/// What this node has for the cluster: its serving tasks on the cluster network
/// `network` (peers' tasks, which have no sandbox here, left out), and its VIP services:
/// those defined now, and those `held` (allocations idle here, within their grace).
pub fn wanted(
    containers: &[Container],
    defs: &BTreeMap<ServiceName, ServiceDef>,
    held: &BTreeSet<ServiceName>,
    network: Option<&NetworkId>,
    me: &NodeName,
) -> Wanted {
    let by_id: BTreeMap<&ContainerId, &Container> = containers.iter().map(|c| (&c.id, c)).collect();
    let mut tasks = BTreeMap::new();
    for def in defs.values() {
        for id in def.tasks.keys() {
            let Some(c) = by_id.get(id).filter(|c| c.serving() && c.sandbox.is_some()) else {
                continue;
            };
            let Some(a) = network.and_then(|n| c.attachments.iter().find(|a| a.network == *n)) else {
                continue;
            };
            let Ok(task) = TaskId::new(id.0.as_str()) else {
                continue;
            };
            let mut ports = def.ports.clone();
            ports.sort();
            let mut publish = def.publish.clone();
            publish.sort();
            tasks.insert(
                task.clone(),
                TaskRecord {
                    id: task,
                    service: def.name.clone(),
                    node: me.clone(),
                    address: IpAddr::V4(a.ip),
                    definition: Some(ServiceDefinition {
                        name: def.name.clone(),
                        mode: def.mode,
                        scheduler: def.scheduler.clone(),
                        publish,
                        ports,
                    }),
                    weight: def.tasks.get(id).copied(),
                },
            );
        }
    }
    let services = defs
        .values()
        .filter(|d| d.mode == EndpointMode::Vip)
        .map(|d| d.name.clone())
        .chain(held.iter().cloned())
        .collect();
    // Only services of the cluster (a task on the cluster network here, or a peer's) claim
    // their ports cluster-wide: a service local to this host publishes on it alone.
    let in_cluster: BTreeSet<&ServiceName> = tasks
        .values()
        .map(|t: &TaskRecord| &t.service)
        .chain(defs.values().filter_map(|d| {
            d.tasks
                .keys()
                .any(|id| by_id.get(id).is_some_and(|c| c.node.is_some()))
                .then_some(&d.name)
        }))
        .collect();
    let ports = defs
        .values()
        .filter(|d| in_cluster.contains(&d.name))
        .flat_map(|d| d.publish.iter().map(|p| (p.key(), d.name.clone())))
        .collect();
    Wanted {
        tasks,
        services,
        ports,
    }
}

#[cfg(test)]
mod tests;
