//! What `vipd status` reports: the agent's view of services, tasks and sandboxes, and
//! its rendering as text. Pure.
//!
//! The agent publishes a typed [`Report`] (metrics read it as it is); only the admin
//! socket turns it into the wire form [`Status`] (`Report::to_status`), the JSON that
//! `vipd status` reads and prints (docs/STATUS.md: stable field names).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::core::alloc::Allocations;
use crate::core::containers::{Container, ContainerId, Drain, Health};
pub use crate::core::labels::Conflict;
use crate::core::labels::Publish;
use crate::core::labels::{LabelError, ServiceDef};
use crate::core::model::{EndpointMode, FwMark, NodeName, PortKey, Scheduler, ServiceName};

/// What the agent knows, typed: the source of `vipd status` and of the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub docker: EngineState,
    /// Unix time of the last sync (0: none yet).
    pub last_sync: u64,
    /// Unix time of the last full resync (0: none yet).
    pub last_resync: u64,
    pub services: Vec<ServiceReport>,
    pub sandboxes: Vec<SandboxStatus>,
    pub label_errors: Vec<LabelProblem>,
    pub conflicts: Vec<Conflict>,
    /// This node's part in the cluster, in cluster mode.
    pub cluster: Option<ClusterStatus>,
}

/// One service, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceReport {
    pub name: ServiceName,
    pub mode: EndpointMode,
    pub vip: Option<Ipv4Addr>,
    pub fwmark: Option<FwMark>,
    pub scheduler: Scheduler,
    /// The ports it holds on the host (a port refused for it is in `errors` instead).
    pub published: Vec<Publish>,
    pub tasks: Vec<TaskReport>,
    pub errors: Vec<String>,
}

/// One task of a service, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskReport {
    pub container: ContainerId,
    pub name: String,
    pub addresses: Vec<Ipv4Addr>,
    pub state: TaskState,
    /// Whether it takes new connections (running, not leaving, not unhealthy or starting).
    pub serving: bool,
    pub weight: u32,
    /// The node it runs on, when another (a peer's task in cluster mode).
    pub node: Option<NodeName>,
}

/// Where a task is in its life, as `vipd status` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaskState {
    Running,
    Healthy,
    Starting,
    Unhealthy,
    /// Being stopped or turned unhealthy: a backend at weight 0.
    Draining,
    /// Its drain grace is over: it still runs and is no longer a backend.
    Drained,
    Stopped,
}

impl TaskState {
    pub const ALL: [TaskState; 7] = [
        TaskState::Running,
        TaskState::Healthy,
        TaskState::Starting,
        TaskState::Unhealthy,
        TaskState::Draining,
        TaskState::Drained,
        TaskState::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Running => "running",
            TaskState::Healthy => "healthy",
            TaskState::Starting => "starting",
            TaskState::Unhealthy => "unhealthy",
            TaskState::Draining => "draining",
            TaskState::Drained => "drained",
            TaskState::Stopped => "stopped",
        }
    }

    /// The state of a container that is a task.
    pub fn of(c: &Container) -> TaskState {
        match (c.running, c.drain, c.health) {
            (false, _, _) => TaskState::Stopped,
            (true, Drain::Draining, _) => TaskState::Draining,
            (true, Drain::Drained, Some(Health::Unhealthy)) => TaskState::Unhealthy,
            (true, Drain::Drained, _) => TaskState::Drained,
            (true, Drain::No, None) => TaskState::Running,
            (true, Drain::No, Some(Health::Healthy)) => TaskState::Healthy,
            (true, Drain::No, Some(Health::Starting)) => TaskState::Starting,
            (true, Drain::No, Some(Health::Unhealthy)) => TaskState::Unhealthy,
        }
    }
}

impl Report {
    /// The wire form, for the admin socket.
    pub fn to_status(&self) -> Status {
        Status {
            docker: self.docker.clone(),
            last_sync: self.last_sync,
            last_resync: self.last_resync,
            services: self
                .services
                .iter()
                .map(|s| s.to_status(self.cluster.as_ref().map(|c| c.node.as_str())))
                .collect(),
            sandboxes: self.sandboxes.clone(),
            label_errors: self.label_errors.clone(),
            conflicts: self.conflicts.clone(),
            cluster: self.cluster.clone(),
        }
    }
}

impl ServiceReport {
    /// The wire form; a task with no node of its own runs on `here` (this node's name, in
    /// cluster mode).
    fn to_status(&self, here: Option<&str>) -> ServiceStatus {
        ServiceStatus {
            name: self.name.to_string(),
            mode: crate::core::labels::endpoint_mode_name(self.mode).to_owned(),
            vip: self.vip,
            fwmark: self.fwmark.map(FwMark::get),
            scheduler: self.scheduler.to_string(),
            published: self.published.iter().map(Publish::to_string).collect(),
            tasks: self
                .tasks
                .iter()
                .map(|t| TaskStatus {
                    container: t.container.short().to_owned(),
                    name: t.name.clone(),
                    addresses: t.addresses.clone(),
                    state: t.state.as_str().to_owned(),
                    serving: t.serving,
                    weight: t.weight,
                    node: t.node.as_ref().map(|n| n.as_str()).or(here).map(str::to_owned),
                })
                .collect(),
            errors: self.errors.clone(),
        }
    }
}

/// Everything `vipd status` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Whether the Docker engine answered the last listing, and if not, why.
    pub docker: EngineState,
    /// Unix time of the last sync (0: none yet).
    pub last_sync: u64,
    /// Unix time of the last full resync (0: none yet).
    pub last_resync: u64,
    pub services: Vec<ServiceStatus>,
    pub sandboxes: Vec<SandboxStatus>,
    /// Labels vipd refused, each with its container and reason.
    pub label_errors: Vec<LabelProblem>,
    /// Labels that disagree with their service's stored definition (`vipd service`),
    /// which is used instead.
    #[serde(default)]
    pub conflicts: Vec<Conflict>,
    /// The cluster, in cluster mode (`vipd run --etcd`); absent on a single host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
}

/// This node's part in the cluster, and the cluster's nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This node's name.
    pub node: String,
    /// Whether this node is registered (with its subnet).
    pub joined: bool,
    /// Why it is not, while it is not (a name or address another live node holds, ...).
    pub problem: Option<String>,
    /// Whether the cluster store answers.
    pub store_connected: bool,
    /// Since when (unix seconds) it has not answered.
    pub store_unreachable_since: Option<u64>,
    pub store_error: Option<String>,
    /// How long the snapshot took to reach a revision read in the store (the watch's lag,
    /// measured once per lease TTL), in milliseconds; a probe still waiting counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_watch_lag_ms: Option<u64>,
    /// How many times the store was listed (the first list, and each re-list after a
    /// compaction or an outage): for the metrics, not shown.
    #[serde(skip)]
    pub store_lists: u64,
    /// Every live node, this one included.
    pub nodes: Vec<NodeStatus>,
}

/// One live node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub address: String,
    pub subnet: Option<String>,
    /// Its tasks on the cluster network.
    pub tasks: usize,
    /// When (unix seconds) it last renewed its lease, as far as this node knows: this
    /// node's own last keep-alive, or a peer's read from its lease's time to live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<u64>,
}

/// The cluster part of `vipd status`.
pub fn render_cluster(c: &ClusterStatus, now: u64) -> String {
    let mut out = String::new();
    let _ = write!(out, "cluster: node {}", c.node);
    if !c.joined {
        let _ = write!(
            out,
            " (not joined: {})",
            c.problem.as_deref().unwrap_or("joining")
        );
    }
    match (c.store_connected, c.store_unreachable_since) {
        (true, _) => match c.store_watch_lag_ms {
            Some(ms) => {
                let _ = writeln!(out, ", store connected (watch lag {ms} ms)");
            }
            None => out.push_str(", store connected\n"),
        },
        (false, Some(since)) => {
            let _ = writeln!(
                out,
                ", store unreachable since {since} ({})",
                c.store_error.as_deref().unwrap_or("no answer")
            );
        }
        (false, None) => out.push_str(", store not reached yet\n"),
    }
    let _ = writeln!(
        out,
        "{:<24} {:<16} {:<18} {:<6} SEEN",
        "NODE", "ADDRESS", "SUBNET", "TASKS"
    );
    for n in &c.nodes {
        let seen = match n.last_seen {
            Some(t) => format!("{}s ago", now.saturating_sub(t)),
            None => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:<24} {:<16} {:<18} {:<6} {seen}",
            n.name,
            n.address,
            n.subnet.as_deref().unwrap_or("-"),
            n.tasks
        );
    }
    out.push('\n');
    out
}

/// The Docker engine as vipd last saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineState {
    pub connected: bool,
    pub error: Option<String>,
}

/// One service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    /// `vip` or `dnsrr`.
    pub mode: String,
    pub vip: Option<Ipv4Addr>,
    pub fwmark: Option<u32>,
    pub scheduler: String,
    /// The ports it publishes on the host through the routing mesh, as in the label
    /// (`8080:80/tcp`); a port refused for it is in `errors` instead.
    #[serde(default)]
    pub published: Vec<String>,
    pub tasks: Vec<TaskStatus>,
    pub errors: Vec<String>,
}

/// One task of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    /// The container's short id.
    pub container: String,
    pub name: String,
    pub addresses: Vec<Ipv4Addr>,
    /// `running`, `healthy`, `starting`, `unhealthy`, `draining` (being stopped or turned
    /// unhealthy: a backend at weight 0), `drained` (its drain grace is over, it still
    /// runs and is no longer a backend) or `stopped`.
    pub state: String,
    /// Whether it takes new connections (running, not leaving, not unhealthy or starting).
    pub serving: bool,
    pub weight: u32,
    /// The node it runs on (cluster mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// One sandbox vipd programs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxStatus {
    pub path: PathBuf,
    /// The name of the container it belongs to.
    pub container: String,
    /// The services it should have (shared: a sync copies every sandbox's status).
    pub services: Arc<[String]>,
    /// Whether its kernel state was last brought to what it should be.
    pub in_sync: bool,
    /// Why not, if it is not.
    pub error: Option<String>,
    /// Operations applied by the last change to it.
    pub last_operations: usize,
    /// Unix time of the last change to it (0: never).
    pub last_change: u64,
}

/// A label vipd refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelProblem {
    pub container: String,
    pub label: String,
    pub value: String,
    pub reason: String,
}

/// The services part of the status, from what the agent knows: the containers, the
/// services their labels define, the allocations, which service holds each published
/// port, and errors per service.
pub fn services(
    containers: &[Container],
    defs: &BTreeMap<ServiceName, ServiceDef>,
    allocs: &Allocations,
    holders: &BTreeMap<PortKey, ServiceName>,
    errors: &BTreeMap<ServiceName, Vec<String>>,
) -> Vec<ServiceReport> {
    let by_id: BTreeMap<&ContainerId, &Container> = containers.iter().map(|c| (&c.id, c)).collect();
    defs.values()
        .map(|def| {
            let (vip, fwmark) = match (def.mode, allocs.services.get(&def.name)) {
                (EndpointMode::Vip, Some(a)) => (Some(a.vip), Some(a.fwmark)),
                _ => (None, None),
            };
            let tasks = def
                .tasks
                .iter()
                .filter_map(|(id, weight)| by_id.get(id).map(|c| (c, *weight)))
                .map(|(c, weight)| TaskReport {
                    container: c.id.clone(),
                    name: c.name.clone(),
                    addresses: c.attachments.iter().map(|a| a.ip).collect(),
                    state: TaskState::of(c),
                    serving: c.serving(),
                    // A draining task's weight is 0, whatever its label says.
                    weight: c.backend_weight(weight).unwrap_or(weight),
                    node: c.node.clone(),
                })
                .collect();
            ServiceReport {
                name: def.name.clone(),
                mode: def.mode,
                vip,
                fwmark,
                scheduler: def.scheduler.clone(),
                published: def
                    .publish
                    .iter()
                    .filter(|p| holders.get(&p.key()) == Some(&def.name))
                    .cloned()
                    .collect(),
                tasks,
                errors: errors.get(&def.name).cloned().unwrap_or_default(),
            }
        })
        .collect()
}

/// The refused labels, for the status.
pub fn label_problems(errors: &[LabelError]) -> Vec<LabelProblem> {
    errors
        .iter()
        .map(|e| LabelProblem {
            container: format!("{} ({})", e.name, e.container.short()),
            label: e.label.clone(),
            value: e.value.clone(),
            reason: e.reason.clone(),
        })
        .collect()
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// The services as `vipd status` prints them.
pub fn render_services(s: &Status, now: u64) -> String {
    let mut out = s
        .cluster
        .as_ref()
        .map(|c| render_cluster(c, now))
        .unwrap_or_default();
    if !s.docker.connected {
        let _ = writeln!(
            out,
            "docker: not connected ({})",
            s.docker.error.as_deref().unwrap_or("not listed yet")
        );
    }
    if s.services.is_empty() {
        out.push_str("no services\n");
    } else {
        let _ = writeln!(
            out,
            "{:<24} {:<6} {:<16} {:<8} {:<6} {:<6} PUBLISHED",
            "SERVICE", "MODE", "VIP", "FWMARK", "SCHED", "TASKS"
        );
    }
    for svc in &s.services {
        let serving = svc.tasks.iter().filter(|t| t.serving).count();
        let tasks = format!("{serving}/{}", svc.tasks.len());
        let published = if svc.published.is_empty() {
            "-".to_owned()
        } else {
            svc.published.join(",")
        };
        let _ = writeln!(
            out,
            "{:<24} {:<6} {:<16} {:<8} {:<6} {tasks:<6} {published}",
            svc.name,
            svc.mode,
            or_dash(svc.vip),
            or_dash(svc.fwmark),
            svc.scheduler,
        );
        for t in &svc.tasks {
            let addrs: Vec<String> = t.addresses.iter().map(|a| a.to_string()).collect();
            let _ = write!(
                out,
                "  {} {:<22} {:<10} w={:<3} {}",
                t.container,
                t.name,
                t.state,
                t.weight,
                if addrs.is_empty() {
                    "-".into()
                } else {
                    addrs.join(",")
                }
            );
            match &t.node {
                Some(node) => {
                    let _ = writeln!(out, " on {node}");
                }
                None => out.push('\n'),
            }
        }
        for e in &svc.errors {
            let _ = writeln!(out, "  error: {e}");
        }
    }
    for p in &s.label_errors {
        let _ = writeln!(
            out,
            "label refused: container {} label {}={:?}: {}",
            p.container, p.label, p.value, p.reason
        );
    }
    for c in &s.conflicts {
        let _ = writeln!(
            out,
            "conflict: service {} {}: a label says {:?}, the stored definition {:?} (used)",
            c.service, c.setting, c.label_value, c.stored_value
        );
    }
    out
}

/// The sandboxes as `vipd status --sandboxes` prints them.
pub fn render_sandboxes(s: &Status) -> String {
    let mut out = String::new();
    if s.sandboxes.is_empty() {
        out.push_str("no sandboxes\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<24} {:<8} {:<9} SANDBOX",
        "CONTAINER", "IN SYNC", "SERVICES"
    );
    for sb in &s.sandboxes {
        let _ = writeln!(
            out,
            "{:<24} {:<8} {:<9} {}",
            sb.container,
            if sb.in_sync { "yes" } else { "no" },
            sb.services.len(),
            sb.path.display()
        );
        if let Some(e) = &sb.error {
            let _ = writeln!(out, "  error: {e}");
        }
    }
    let synced = s.sandboxes.iter().filter(|s| s.in_sync).count();
    let _ = writeln!(out, "{synced} of {} sandboxes in sync", s.sandboxes.len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_typed_report_becomes_the_wire_status_only_when_asked() {
        let report = Report {
            last_sync: 7,
            services: vec![ServiceReport {
                name: ServiceName::new("web").unwrap(),
                mode: EndpointMode::Vip,
                vip: Some(Ipv4Addr::new(10, 253, 0, 1)),
                fwmark: FwMark::new(256),
                scheduler: Scheduler::default(),
                published: vec![crate::core::labels::Publish {
                    protocol: crate::core::model::Protocol::Tcp,
                    published: 8080,
                    target: 80,
                }],
                tasks: vec![TaskReport {
                    container: ContainerId("0123456789abcdef".into()),
                    name: "web-1".into(),
                    addresses: vec![Ipv4Addr::new(172, 18, 0, 2)],
                    state: TaskState::Draining,
                    serving: false,
                    weight: 0,
                    node: None,
                }],
                errors: vec![],
            }],
            ..Default::default()
        };
        let wire = report.to_status();
        let web = &wire.services[0];
        assert_eq!(
            (
                web.name.as_str(),
                web.mode.as_str(),
                web.fwmark,
                web.scheduler.as_str()
            ),
            ("web", "vip", Some(256), "rr")
        );
        assert_eq!(web.published, ["8080:80/tcp"]);
        let t = &web.tasks[0];
        assert_eq!(
            (t.container.as_str(), t.state.as_str(), t.weight),
            ("0123456789ab", "draining", 0)
        );
        assert_eq!(wire.last_sync, 7);
        let names: Vec<&str> = TaskState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "running",
                "healthy",
                "starting",
                "unhealthy",
                "draining",
                "drained",
                "stopped"
            ]
        );
    }

    fn sample() -> Status {
        Status {
            cluster: None,
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
                    vip: Some(Ipv4Addr::new(10, 253, 0, 1)),
                    fwmark: Some(256),
                    scheduler: "rr".into(),
                    published: vec!["8080:80/tcp".into()],
                    tasks: vec![
                        TaskStatus {
                            container: "0123456789ab".into(),
                            name: "web-1".into(),
                            addresses: vec![Ipv4Addr::new(172, 18, 0, 2)],
                            state: "running".into(),
                            serving: true,
                            weight: 1,
                            node: None,
                        },
                        TaskStatus {
                            container: "ba9876543210".into(),
                            name: "web-2".into(),
                            addresses: vec![Ipv4Addr::new(172, 18, 0, 3)],
                            state: "unhealthy".into(),
                            serving: false,
                            weight: 1,
                            node: None,
                        },
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
                    tasks: vec![],
                    errors: vec!["no VIP: the pool is exhausted".into()],
                },
            ],
            sandboxes: vec![SandboxStatus {
                path: "/run/docker/netns/abc".into(),
                container: "client".into(),
                services: vec!["web".into()].into(),
                in_sync: false,
                error: Some("this kernel has no IPVS".into()),
                last_operations: 0,
                last_change: 0,
            }],
            label_errors: vec![LabelProblem {
                container: "bad".into(),
                label: "vipd.weight".into(),
                value: "heavy".into(),
                reason: "not a number".into(),
            }],
            conflicts: vec![Conflict {
                service: "web".into(),
                setting: "scheduler".into(),
                label_value: "wlc".into(),
                stored_value: "rr".into(),
            }],
        }
    }

    #[test]
    fn services_show_vip_mark_tasks_and_every_error() {
        let text = render_services(&sample(), 0);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("SERVICE"), "{text}");
        assert!(
            lines[1].starts_with("web ")
                && lines[1].contains("10.253.0.1")
                && lines[1].ends_with(" 1/2    8080:80/tcp"),
            "{text}"
        );
        assert!(
            lines[2].contains("web-1") && lines[2].contains("running") && lines[2].contains("172.18.0.2"),
            "{text}"
        );
        assert!(lines[3].contains("unhealthy"), "{text}");
        assert!(
            lines[4].starts_with("db ") && lines[4].contains(" - ") && lines[4].ends_with(" 0/0    -"),
            "{text}"
        );
        assert_eq!(lines[5], "  error: no VIP: the pool is exhausted");
        assert_eq!(
            lines[6],
            "label refused: container bad label vipd.weight=\"heavy\": not a number"
        );
        assert_eq!(
            lines[7],
            "conflict: service web scheduler: a label says \"wlc\", the stored definition \"rr\" (used)"
        );
    }

    #[test]
    fn sandboxes_say_whether_each_is_in_sync_and_why_not() {
        let text = render_sandboxes(&sample());
        assert!(text.contains("client") && text.contains(" no "), "{text}");
        assert!(text.contains("  error: this kernel has no IPVS"), "{text}");
        assert!(text.ends_with("0 of 1 sandboxes in sync\n"), "{text}");
    }

    #[test]
    fn the_cluster_part_is_absent_on_one_host_and_has_the_documented_fields_in_a_cluster() {
        let one = serde_json::to_value(sample()).unwrap();
        assert!(one.get("cluster").is_none(), "single-host JSON unchanged");
        let mut s = sample();
        s.cluster = Some(ClusterStatus {
            node: "a".into(),
            joined: true,
            problem: None,
            store_connected: false,
            store_unreachable_since: Some(1000),
            store_error: Some("no answer".into()),
            store_watch_lag_ms: Some(3),
            store_lists: 3,
            nodes: vec![
                NodeStatus {
                    name: "a".into(),
                    address: "192.0.2.1".into(),
                    subnet: Some("10.230.0.0/24".into()),
                    tasks: 2,
                    last_seen: Some(1003),
                },
                NodeStatus {
                    name: "b".into(),
                    address: "192.0.2.2".into(),
                    subnet: None,
                    tasks: 0,
                    last_seen: None,
                },
            ],
        });
        s.services[0].tasks[0].node = Some("a".into());
        s.services[0].tasks[1].node = Some("b".into());
        let v = serde_json::to_value(&s).unwrap();
        let mut keys: Vec<&String> = v["cluster"].as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "joined",
                "node",
                "nodes",
                "problem",
                "store_connected",
                "store_error",
                "store_unreachable_since",
                "store_watch_lag_ms"
            ]
        );
        let mut node: Vec<&String> = v["cluster"]["nodes"][0].as_object().unwrap().keys().collect();
        node.sort();
        assert_eq!(node, ["address", "last_seen", "name", "subnet", "tasks"]);
        assert_eq!(v["services"][0]["tasks"][1]["node"], "b");
        let text = render_services(&s, 1005);
        assert!(
            text.starts_with("cluster: node a, store unreachable since 1000 (no answer)\n"),
            "{text}"
        );
        assert!(
            text.contains("192.0.2.1        10.230.0.0/24      2      2s ago"),
            "{text}"
        );
        assert!(
            text.contains("192.0.2.2        -                  0      -"),
            "{text}"
        );
        assert!(text.contains("172.18.0.3 on b\n"), "{text}");
    }

    #[test]
    fn status_survives_json() {
        let s = sample();
        let back: Status = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    /// docs/STATUS.md promises these names, each with its type: a rename or a removal
    /// breaks the readers of `vipd status --json`, so it must fail here first.
    #[test]
    fn the_json_fields_are_the_documented_ones() {
        let v = serde_json::to_value(sample()).unwrap();
        let keys = |v: &serde_json::Value| -> Vec<String> {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        let expect = |got: Vec<String>, want: &[&str]| {
            let mut want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
            want.sort();
            assert_eq!(got, want);
        };
        expect(
            keys(&v),
            &[
                "docker",
                "last_sync",
                "last_resync",
                "services",
                "sandboxes",
                "label_errors",
                "conflicts",
            ],
        );
        expect(keys(&v["docker"]), &["connected", "error"]);
        let svc = &v["services"][0];
        expect(
            keys(svc),
            &[
                "name",
                "mode",
                "vip",
                "fwmark",
                "scheduler",
                "published",
                "tasks",
                "errors",
            ],
        );
        expect(
            keys(&svc["tasks"][0]),
            &["container", "name", "addresses", "state", "serving", "weight"],
        );
        expect(
            keys(&v["sandboxes"][0]),
            &[
                "path",
                "container",
                "services",
                "in_sync",
                "error",
                "last_operations",
                "last_change",
            ],
        );
        expect(
            keys(&v["label_errors"][0]),
            &["container", "label", "value", "reason"],
        );
        expect(
            keys(&v["conflicts"][0]),
            &["service", "setting", "label_value", "stored_value"],
        );
        // The types as documented.
        assert!(svc["vip"].is_string() && svc["fwmark"].is_u64() && svc["published"][0].is_string());
        assert!(v["services"][1]["vip"].is_null() && v["services"][1]["fwmark"].is_null());
        assert!(svc["tasks"][0]["addresses"][0].is_string() && svc["tasks"][0]["serving"].is_boolean());
        assert!(v["sandboxes"][0]["path"].is_string() && v["last_sync"].is_u64());
    }

    #[test]
    fn nothing_yet_is_said_plainly() {
        let s = Status::default();
        assert_eq!(
            render_services(&s, 0),
            "docker: not connected (not listed yet)\nno services\n"
        );
        assert_eq!(render_sandboxes(&s), "no sandboxes\n");
    }
}
