//! What vipd knows of the Docker host, as plain data: containers, their networks, and
//! the services their labels make them tasks of. The Docker adapter fills these in; the
//! core turns them into a desired state per sandbox.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;

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
    pub sandbox: Option<PathBuf>,
    pub attachments: Vec<Attachment>,
}

impl Container {
    /// Whether this container may receive traffic as a task: running, and healthy if it
    /// has a health check.
    pub fn serving(&self) -> bool {
        self.running && matches!(self.health, None | Some(Health::Healthy))
    }
}
