//! What vipd knows of the Docker host, as plain data: containers, their networks, and
//! the services their labels make them tasks of. The Docker adapter fills these in; the
//! core turns them into a desired state per sandbox.

use super::model::{NodeName, SandboxKey};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// A container's full id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ContainerId(pub String);

impl ContainerId {
    /// The 12-character form `docker ps` shows.
    pub fn short(&self) -> &str {
        &self.0[..self.0.len().min(12)]
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short())
    }
}

/// A Docker network's id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NetworkId(pub String);

impl fmt::Display for NetworkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0[..self.0.len().min(12)])
    }
}

/// A container's health, when it has a HEALTHCHECK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Starting,
    Healthy,
    Unhealthy,
}

/// A container's address on one network.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Attachment {
    pub network: NetworkId,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
}

/// A container as vipd sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub id: ContainerId,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub running: bool,
    pub health: Option<Health>,
    /// The network namespace (Docker's `SandboxKey`).
    pub sandbox: Option<SandboxKey>,
    pub attachments: Vec<Attachment>,
    /// Whether it is leaving its services. Not Docker's: the agent sets it from the
    /// engine's kill events and from health changes.
    pub drain: Drain,
    /// The node it runs on, when that is another node (a peer's task in cluster mode);
    /// `None` for this host's own containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeName>,
}

/// A task on its way out of its services.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Drain {
    /// Not leaving.
    #[default]
    No,
    /// Being stopped, or turned unhealthy: still a backend, at weight 0, so its open
    /// connections finish while new ones go to the other tasks.
    Draining,
    /// Its drain grace is over and it still runs: no longer a backend.
    Drained,
}

impl Container {
    /// Whether this container may receive new traffic as a task: running, not leaving,
    /// and healthy if it has a health check.
    pub fn serving(&self) -> bool {
        self.running && self.drain == Drain::No && matches!(self.health, None | Some(Health::Healthy))
    }

    /// Its weight as a backend of a service that gives its tasks `weight`, or `None` when
    /// it is not a backend: a serving task has `weight`, a draining one 0.
    pub fn backend_weight(&self, weight: u32) -> Option<u32> {
        match self.drain {
            _ if !self.running => None,
            Drain::Draining => Some(0),
            Drain::Drained => None,
            Drain::No => self.serving().then_some(weight),
        }
    }

    /// The one address a client reaches it at: the one on the first network (by id)
    /// among `networks`, or among all of its networks when `networks` is `None`.
    pub fn address_on(&self, networks: Option<&BTreeSet<&NetworkId>>) -> Option<&Attachment> {
        self.attachments
            .iter()
            .filter(|a| networks.is_none_or(|n| n.contains(&a.network)))
            .min_by(|a, b| a.network.cmp(&b.network))
    }
}

/// Containers for the core's tests.
#[cfg(test)]
pub mod fixture {
    use super::*;

    /// A running container named `id`, with `labels`, its sandbox under
    /// `/run/docker/netns/`, and one address per (network, address) of `nets`.
    pub fn container(id: &str, labels: &[(&str, &str)], nets: &[(&str, &str)]) -> Container {
        Container {
            id: ContainerId(id.to_owned()),
            name: id.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            running: true,
            health: None,
            sandbox: Some(SandboxKey::new(format!("/run/docker/netns/{id}"))),
            attachments: nets
                .iter()
                .map(|(n, ip)| Attachment {
                    network: NetworkId((*n).to_owned()),
                    ip: ip.parse().unwrap(),
                    prefix_len: 24,
                })
                .collect(),
            drain: Drain::No,
            node: None,
        }
    }
}
