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
//! ```
//! The `node-addrs`, `subnets`, `vips` and `fwmarks` keys are indexes: create-only keys
//! that make a value unique cluster-wide inside the claim's transaction.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

use super::kv::{KeyValue, Revision};
use crate::core::labels::PortProtocol;
use crate::core::model::{FwMark, Ipv4Net, ServiceName, Vip};

/// The default prefix of every vipd key in the cluster store.
pub const DEFAULT_PREFIX: &str = "/vipd/v1/";

/// A name unfit for a key segment (a node name or a task id).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {name:?}: use 1-253 characters from a-z, A-Z, 0-9, '-', '_' and '.', starting with a letter or digit")]
pub struct InvalidName {
    pub what: &'static str,
    pub name: String,
}

fn check_segment(what: &'static str, name: &str) -> Result<(), InvalidName> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(InvalidName {
            what,
            name: name.to_owned(),
        })
    }
}

/// A node's name in the cluster (unique among live nodes).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeName(String);

impl NodeName {
    pub fn new(name: &str) -> Result<Self, InvalidName> {
        check_segment("node name", name).map(|()| NodeName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeName {
    type Error = InvalidName;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        NodeName::new(&s)
    }
}

impl From<NodeName> for String {
    fn from(n: NodeName) -> String {
        n.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A task's id (its container id), unique within its node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TaskId(String);

impl TaskId {
    pub fn new(id: &str) -> Result<Self, InvalidName> {
        check_segment("task id", id).map(|()| TaskId(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TaskId {
    type Error = InvalidName;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        TaskId::new(&s)
    }
}

impl From<TaskId> for String {
    fn from(n: TaskId) -> String {
        n.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `A.B.C.D/N` as text in JSON and keys (the core type has no parser of its own).
pub(crate) mod net_text {
    use super::Ipv4Net;

    pub fn parse(s: &str) -> Option<Ipv4Net> {
        let (addr, len) = s.split_once('/')?;
        Ipv4Net::new(addr.parse().ok()?, len.parse().ok()?)
    }

    pub fn serialize<S: serde::Serializer>(net: &Ipv4Net, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(net)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Ipv4Net, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        parse(&s).ok_or_else(|| serde::de::Error::custom(format!("not an IPv4 network: {s:?}")))
    }

    pub mod opt {
        use super::Ipv4Net;

        pub fn serialize<S: serde::Serializer>(net: &Option<Ipv4Net>, s: S) -> Result<S::Ok, S::Error> {
            match net {
                Some(n) => super::serialize(n, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Ipv4Net>, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}

/// A registered node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: NodeName,
    /// The address other nodes reach it at (the VXLAN underlay).
    pub address: IpAddr,
    /// The node's slice of the cluster range, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "net_text::opt")]
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
        self.key(&["subnets", &format!("{}-{}", net.addr, net.prefix)])
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

    pub fn port(&self, proto: PortProtocol, port: u16) -> String {
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
    pub subnets: BTreeMap<NodeName, Ipv4Net>,
    pub services: BTreeMap<ServiceName, VipClaim>,
    pub ports: BTreeMap<(PortProtocol, u16), ServiceName>,
    pub tasks: BTreeMap<(ServiceName, NodeName, TaskId), TaskRecord>,
    /// Keys under the prefix that could not be read (another version's, or damaged):
    /// named so they are seen, never silently used.
    pub unreadable: Vec<String>,
}

fn port_proto(label: &str) -> Option<PortProtocol> {
    [PortProtocol::Tcp, PortProtocol::Udp, PortProtocol::Sctp]
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
                self.nodes.insert(rec.name.clone(), rec);
            }
            ["node-subnets", name] => {
                self.subnets
                    .insert(NodeName::new(name).ok()?, net_text::parse(text?)?);
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
