//! The key layout under the cluster prefix, the JSON records stored there, and the
//! snapshot parsed from a listing. Pure: no I/O.
//!
//! ```text
//! PREFIX nodes/NODE                  NodeRecord       on the node's lease
//! PREFIX node-addrs/ADDR             NODE             on the node's lease
//! PREFIX node-subnets/NODE           A.B.C.D/N        long lease or none
//! PREFIX subnets/A.B.C.D-N           NODE             same lease as node-subnets/NODE
//! PREFIX services/SERVICE            VipClaim         no lease
//! PREFIX vips/ADDR                   SERVICE          no lease
//! PREFIX fwmarks/MARK                SERVICE          no lease
//! PREFIX ports/PROTO/PORT            SERVICE          no lease
//! PREFIX tasks/SERVICE/NODE/TASK     TaskRecord       on the node's lease
//! PREFIX services-defs/SERVICE       ServiceDefinition no lease (`vipd service`)
//! ```
//! The `node-addrs`, `subnets`, `vips` and `fwmarks` keys are indexes: create-only keys
//! that make a value unique cluster-wide inside the claim's transaction.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

use super::kv::{KeyValue, LeaseId, Revision};
use crate::core::labels::ServiceDefinition;
use crate::core::model::Protocol;
use crate::core::model::{FwMark, Ipv4Net, ServiceName, Vip};

/// The default prefix of every vipd key in the cluster store.
pub const DEFAULT_PREFIX: &str = "/vipd/v1/";

pub use crate::core::model::{InvalidName, NodeName, TaskId};

/// A registered node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: NodeName,
    /// The address other nodes reach it at (the VXLAN underlay).
    pub address: IpAddr,
    /// The node's slice of the cluster range, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<Ipv4Net>,
}

/// A service's cluster-wide VIP and fwmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipClaim {
    pub vip: Ipv4Addr,
    pub fwmark: u32,
}

impl VipClaim {
    pub fn vip(self) -> Vip {
        Vip::new(self.vip.into())
    }

    /// The mark (claims never hold 0: marks start at [`crate::core::alloc::FIRST_FWMARK`]).
    pub fn fwmark(self) -> Option<FwMark> {
        FwMark::new(self.fwmark)
    }
}

/// One task of a service on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: TaskId,
    pub service: ServiceName,
    pub node: NodeName,
    pub address: IpAddr,
    /// The service as the task's node plans it (endpoint mode, scheduler, named and
    /// published ports), so a node with no task of its own plans it the same: a dnsrr
    /// service gets no VIP there. `None` in records written before it was carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<ServiceDefinition>,
    /// The task's weight; `None` in records written before it was carried (weight 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// Every key of vipd's, under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Default for Keys {
    fn default() -> Self {
        Keys::new(DEFAULT_PREFIX)
    }
}

impl Keys {
    /// Keys under `prefix` (a `/` is added if it does not end with one).
    pub fn new(prefix: &str) -> Self {
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Keys { prefix }
    }

    pub fn root(&self) -> &str {
        &self.prefix
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        k.push_str(&parts.join("/"));
        k
    }

    pub fn node(&self, node: &NodeName) -> String {
        self.key(&["nodes", node.as_str()])
    }

    pub fn node_addr(&self, addr: IpAddr) -> String {
        self.key(&["node-addrs", &addr.to_string()])
    }

    pub fn node_subnet(&self, node: &NodeName) -> String {
        self.key(&["node-subnets", node.as_str()])
    }

    pub fn subnet(&self, net: Ipv4Net) -> String {
        self.key(&["subnets", &format!("{}-{}", net.addr(), net.prefix_len())])
    }

    pub fn service(&self, service: &ServiceName) -> String {
        self.key(&["services", service.as_str()])
    }

    pub fn vip(&self, vip: Ipv4Addr) -> String {
        self.key(&["vips", &vip.to_string()])
    }

    pub fn fwmark(&self, mark: u32) -> String {
        self.key(&["fwmarks", &mark.to_string()])
    }

    pub fn port(&self, proto: Protocol, port: u16) -> String {
        self.key(&["ports", proto.label(), &port.to_string()])
    }

    pub fn task(&self, task: &TaskRecord) -> String {
        self.key(&[
            "tasks",
            task.service.as_str(),
            task.node.as_str(),
            task.id.as_str(),
        ])
    }

    /// The directory of one kind of key (`vips/`, `fwmarks/`, ...).
    pub fn dir(&self, kind: &str) -> String {
        self.key(&[kind, ""])
    }

    /// A service's stored definition (`vipd service create`).
    pub fn definition(&self, service: &ServiceName) -> String {
        self.key(&["services-defs", service.as_str()])
    }

    /// Where every task of a service lives.
    pub fn tasks_of(&self, service: &ServiceName) -> String {
        self.key(&["tasks", service.as_str(), ""])
    }
}

/// Everything vipd keeps in the cluster store, as of one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterState {
    pub revision: Revision,
    pub nodes: BTreeMap<NodeName, NodeRecord>,
    /// The lease each node's record rides on (what a peer's last keep-alive is read from).
    pub node_leases: BTreeMap<NodeName, LeaseId>,
    pub subnets: BTreeMap<NodeName, Ipv4Net>,
    pub services: BTreeMap<ServiceName, VipClaim>,
    pub ports: BTreeMap<(Protocol, u16), ServiceName>,
    pub tasks: BTreeMap<(ServiceName, NodeName, TaskId), TaskRecord>,
    /// The services defined with `vipd service`.
    pub definitions: BTreeMap<ServiceName, ServiceDefinition>,
    /// Keys under the prefix that could not be read (another version's, or damaged):
    /// named so they are seen, never silently used.
    pub unreadable: Vec<String>,
}

fn port_proto(label: &str) -> Option<Protocol> {
    [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
        .into_iter()
        .find(|p| p.label() == label)
}

impl ClusterState {
    /// Parse every key of a listing (or a reflector's cache) under `keys`' prefix.
    pub fn from_kvs<'a>(
        keys: &Keys,
        kvs: impl IntoIterator<Item = &'a KeyValue>,
        revision: Revision,
    ) -> Self {
        let mut st = ClusterState {
            revision,
            ..ClusterState::default()
        };
        for kv in kvs {
            if st.add(keys, kv).is_none() {
                st.unreadable.push(kv.key.clone());
            }
        }
        st
    }

    /// Add one key; `None` if it is not a key of this layout or its value does not parse.
    fn add(&mut self, keys: &Keys, kv: &KeyValue) -> Option<()> {
        let rest = kv.key.strip_prefix(keys.root())?;
        let parts: Vec<&str> = rest.split('/').collect();
        let text = std::str::from_utf8(&kv.value).ok();
        match parts.as_slice() {
            ["nodes", name] => {
                let rec: NodeRecord = serde_json::from_slice(&kv.value).ok()?;
                (rec.name.as_str() == *name).then_some(())?;
                if let Some(lease) = kv.lease {
                    self.node_leases.insert(rec.name.clone(), lease);
                }
                self.nodes.insert(rec.name.clone(), rec);
            }
            ["node-subnets", name] => {
                self.subnets
                    .insert(NodeName::new(name).ok()?, text?.parse().ok()?);
            }
            ["services", name] => {
                let claim: VipClaim = serde_json::from_slice(&kv.value).ok()?;
                self.services.insert(ServiceName::new(name).ok()?, claim);
            }
            ["ports", proto, port] => {
                let service = ServiceName::new(text?).ok()?;
                self.ports
                    .insert((port_proto(proto)?, port.parse().ok()?), service);
            }
            ["tasks", _, _, _] => {
                let rec: TaskRecord = serde_json::from_slice(&kv.value).ok()?;
                (keys.task(&rec) == kv.key).then_some(())?;
                self.tasks
                    .insert((rec.service.clone(), rec.node.clone(), rec.id.clone()), rec);
            }
            ["services-defs", name] => {
                let def: ServiceDefinition = serde_json::from_slice(&kv.value).ok()?;
                (def.name.as_str() == *name).then_some(())?;
                self.definitions.insert(def.name.clone(), def);
            }
            // Indexes: their content is in the records above.
            ["node-addrs" | "subnets" | "vips" | "fwmarks", _] => {}
            _ => return None,
        }
        Some(())
    }

    /// The tasks of one service, on every node.
    pub fn tasks_of<'a>(&'a self, service: &'a ServiceName) -> impl Iterator<Item = &'a TaskRecord> + 'a {
        self.tasks.values().filter(move |t| &t.service == service)
    }
}

/// The keys of one map that differ between two snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes<K> {
    pub added: Vec<K>,
    pub removed: Vec<K>,
    /// Present in both, with another value.
    pub changed: Vec<K>,
}

impl<K> Default for Changes<K> {
    fn default() -> Self {
        Changes {
            added: Vec::new(),
            removed: Vec::new(),
            changed: Vec::new(),
        }
    }
}

impl<K> Changes<K> {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

fn changes<K: Ord + Clone, V: PartialEq>(old: &BTreeMap<K, V>, new: &BTreeMap<K, V>) -> Changes<K> {
    let mut c = Changes::default();
    for (k, v) in new {
        match old.get(k) {
            None => c.added.push(k.clone()),
            Some(o) if o != v => c.changed.push(k.clone()),
            Some(_) => {}
        }
    }
    c.removed = old.keys().filter(|k| !new.contains_key(*k)).cloned().collect();
    c
}

/// What changed between two snapshots (after a re-list too, so nothing is missed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    pub nodes: Changes<NodeName>,
    pub subnets: Changes<NodeName>,
    pub services: Changes<ServiceName>,
    pub ports: Changes<(Protocol, u16)>,
    pub tasks: Changes<(ServiceName, NodeName, TaskId)>,
    pub definitions: Changes<ServiceName>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
            && self.subnets.is_empty()
            && self.services.is_empty()
            && self.ports.is_empty()
            && self.tasks.is_empty()
            && self.definitions.is_empty()
    }
}

impl ClusterState {
    /// What `newer` has that this snapshot has not, and the other way round.
    pub fn diff(&self, newer: &ClusterState) -> Diff {
        Diff {
            nodes: changes(&self.nodes, &newer.nodes),
            subnets: changes(&self.subnets, &newer.subnets),
            services: changes(&self.services, &newer.services),
            ports: changes(&self.ports, &newer.ports),
            tasks: changes(&self.tasks, &newer.tasks),
            definitions: changes(&self.definitions, &newer.definitions),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            create_revision: Revision(2),
            mod_revision: Revision(2),
            lease: None,
        }
    }

    #[test]
    fn a_snapshot_parses_every_record_and_names_the_keys_it_cannot_read() {
        let keys = Keys::new("/vipd/v1");
        let kvs = [
            kv(
                "/vipd/v1/nodes/n1",
                r#"{"name":"n1","address":"192.0.2.1","subnet":"10.230.3.0/24"}"#,
            ),
            kv("/vipd/v1/node-subnets/n1", "10.230.3.0/24"),
            kv("/vipd/v1/services/web", r#"{"vip":"10.253.0.1","fwmark":256}"#),
            kv("/vipd/v1/vips/10.253.0.1", "web"),
            kv("/vipd/v1/ports/udp/53", "web"),
            kv(
                "/vipd/v1/tasks/web/n1/t1",
                r#"{"id":"t1","service":"web","node":"n1","address":"10.230.3.5"}"#,
            ),
            // A record filed under another name, a bad value, a key of no known kind.
            kv("/vipd/v1/nodes/n2", r#"{"name":"n1","address":"192.0.2.1"}"#),
            kv("/vipd/v1/services/db", "not json"),
            kv("/vipd/v1/future/x", ""),
        ];
        let st = ClusterState::from_kvs(&keys, &kvs, Revision(9));
        let n1 = NodeName::new("n1").unwrap();
        assert_eq!(st.nodes[&n1].subnet.unwrap().to_string(), "10.230.3.0/24");
        assert_eq!(st.subnets[&n1].to_string(), "10.230.3.0/24");
        assert_eq!(st.services.len(), 1);
        assert_eq!(st.ports[&(Protocol::Udp, 53)].as_str(), "web");
        assert_eq!(st.tasks.len(), 1);
        assert_eq!(
            st.unreadable,
            ["/vipd/v1/nodes/n2", "/vipd/v1/services/db", "/vipd/v1/future/x"]
        );
        // Records round-trip through their JSON.
        let rec = &st.nodes[&n1];
        assert_eq!(
            &serde_json::from_slice::<NodeRecord>(&serde_json::to_vec(rec).unwrap()).unwrap(),
            rec
        );
    }

    #[test]
    fn a_diff_names_what_was_added_removed_and_changed() {
        let keys = Keys::default();
        let old = ClusterState::from_kvs(
            &keys,
            &[
                kv("/vipd/v1/ports/tcp/80", "web"),
                kv("/vipd/v1/ports/tcp/81", "web"),
            ],
            Revision(2),
        );
        let new = ClusterState::from_kvs(
            &keys,
            &[
                kv("/vipd/v1/ports/tcp/80", "api"),
                kv("/vipd/v1/ports/tcp/82", "web"),
            ],
            Revision(3),
        );
        let d = old.diff(&new);
        assert_eq!(d.ports.changed, [(Protocol::Tcp, 80)]);
        assert_eq!(d.ports.added, [(Protocol::Tcp, 82)]);
        assert_eq!(d.ports.removed, [(Protocol::Tcp, 81)]);
        assert!(d.nodes.is_empty() && !d.is_empty());
        assert!(new.diff(&new).is_empty());
    }

    #[test]
    fn names_that_would_break_a_key_are_refused() {
        assert!(NodeName::new("node-1.example").is_ok());
        for bad in ["", "a/b", "-a", "a b", &"x".repeat(254)] {
            assert!(NodeName::new(bad).is_err(), "{bad:?}");
        }
        assert!(serde_json::from_str::<TaskId>(r#""../x""#).is_err());
    }
}
