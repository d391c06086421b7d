//! Services defined on the command line (`vipd service create|update|rm|ls`).
//!
//! A [`ServiceDefinition`] (pure, in [`crate::core::labels`], parsed exactly as the labels
//! are) is kept in one of two stores:
//! - one host: `services.json` in the state directory ([`FileDefinitions`]), written
//!   atomically under a lock;
//! - a cluster: the key `services-defs/NAME` under the cluster prefix
//!   ([`crate::store::Cluster`]), so every node sees it.
//!
//! The agent reads them through a [`DefinitionSource`]: the file (read again only when it
//! changed), or a snapshot of the cluster store ([`SnapshotDefinitions`]).

mod file;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

pub use crate::core::labels::{BadSetting, Conflict, ServiceDefinition};
use crate::core::model::ServiceName;
use crate::store::{Cluster, StoreError};
pub use file::{FileDefinitions, DEFINITIONS_FILE};

/// Every stored definition, by service name.
pub type Definitions = BTreeMap<ServiceName, ServiceDefinition>;

/// Lost races before an update gives up (each loss is another writer's update).
const ATTEMPTS: usize = 16;

/// Why a definition could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    #[error("service {0} is already defined (change it with `vipd service update`)")]
    Exists(ServiceName),
    #[error("service {0} is not defined (see `vipd service ls`)")]
    Missing(ServiceName),
    #[error(transparent)]
    Bad(#[from] BadSetting),
    #[error("cannot read {file}: {source}")]
    Read {
        file: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The file is there but not what vipd wrote.
    #[error("{file} is not a valid services file ({reason}); fix it or move it away")]
    Corrupt {
        file: std::path::PathBuf,
        reason: String,
    },
    #[error("cannot write {file}: {source}")]
    Write {
        file: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("service {0}: its definition changed {ATTEMPTS} times while it was updated; try again")]
    Contended(ServiceName),
}

impl DefinitionError {
    /// Whether running the command again as it is cannot succeed (exit code 2): a name
    /// taken or missing, a bad setting.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            DefinitionError::Exists(_) | DefinitionError::Missing(_) | DefinitionError::Bad(_)
        )
    }
}

/// Where definitions are kept, as `vipd service` changes them: a compare-and-swap per
/// service, so two writers never undo each other.
#[async_trait]
pub trait DefinitionStore: Send + Sync {
    async fn get(&self, name: &ServiceName) -> Result<Option<ServiceDefinition>, DefinitionError>;

    /// Store `def` if its service's definition is still `expected` (`None`: there is
    /// none); false, and nothing written, if it is not.
    async fn put(
        &self,
        def: &ServiceDefinition,
        expected: Option<&ServiceDefinition>,
    ) -> Result<bool, DefinitionError>;

    /// Delete a definition; false if there was none.
    async fn delete(&self, name: &ServiceName) -> Result<bool, DefinitionError>;

    async fn list(&self) -> Result<Definitions, DefinitionError>;
}

#[async_trait]
impl DefinitionStore for Cluster {
    async fn get(&self, name: &ServiceName) -> Result<Option<ServiceDefinition>, DefinitionError> {
        Ok(self.definition(name).await?)
    }

    async fn put(
        &self,
        def: &ServiceDefinition,
        expected: Option<&ServiceDefinition>,
    ) -> Result<bool, DefinitionError> {
        Ok(self.put_definition(def, expected).await?)
    }

    async fn delete(&self, name: &ServiceName) -> Result<bool, DefinitionError> {
        Ok(self.delete_definition(name).await?)
    }

    async fn list(&self) -> Result<Definitions, DefinitionError> {
        Ok(self.definitions().await?)
    }
}

/// The settings `vipd service create|update` was given; a `None` keeps the definition's
/// value (for `create`: the labels' default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    pub endpoint_mode: Option<String>,
    pub scheduler: Option<String>,
    /// Replaces the published ports (each `PUBLISHED:TARGET[/tcp|/udp]`).
    pub publish: Option<Vec<String>>,
    /// Replaces the named ports (each `NAME=PORT[/PROTO]`).
    pub ports: Option<Vec<String>>,
}

impl Settings {
    /// `def` with these settings.
    pub fn apply(&self, def: &ServiceDefinition) -> Result<ServiceDefinition, BadSetting> {
        let mut def = def.clone();
        if let Some(m) = &self.endpoint_mode {
            def.set_endpoint_mode(m)?;
        }
        if let Some(s) = &self.scheduler {
            def.set_scheduler(s)?;
        }
        if let Some(p) = &self.publish {
            def.set_publish(p)?;
        }
        if let Some(p) = &self.ports {
            def.set_ports(p)?;
        }
        Ok(def)
    }
}

/// Define `name` with `settings` (the labels' defaults for the rest); refused if it is
/// defined already.
#[tracing::instrument(skip_all, fields(service = %name))]
pub async fn create(
    store: &dyn DefinitionStore,
    name: ServiceName,
    settings: &Settings,
) -> Result<ServiceDefinition, DefinitionError> {
    let def = settings.apply(&ServiceDefinition::new(name.clone()))?;
    if !store.put(&def, None).await? {
        return Err(DefinitionError::Exists(name));
    }
    Ok(def)
}

/// Change the settings given of `name`'s definition; refused if it has none.
#[tracing::instrument(skip_all, fields(service = %name))]
pub async fn update(
    store: &dyn DefinitionStore,
    name: &ServiceName,
    settings: &Settings,
) -> Result<ServiceDefinition, DefinitionError> {
    for _ in 0..ATTEMPTS {
        let Some(old) = store.get(name).await? else {
            return Err(DefinitionError::Missing(name.clone()));
        };
        let new = settings.apply(&old)?;
        if new == old || store.put(&new, Some(&old)).await? {
            return Ok(new);
        }
    }
    Err(DefinitionError::Contended(name.clone()))
}

/// Delete `name`'s definition; refused if it has none.
#[tracing::instrument(skip_all, fields(service = %name))]
pub async fn remove(store: &dyn DefinitionStore, name: &ServiceName) -> Result<(), DefinitionError> {
    if !store.delete(name).await? {
        return Err(DefinitionError::Missing(name.clone()));
    }
    Ok(())
}

/// The definitions as `vipd service ls` prints them.
pub fn render(defs: &Definitions) -> String {
    use std::fmt::Write as _;
    if defs.is_empty() {
        return "no services defined\n".to_owned();
    }
    let mut out = format!(
        "{:<24} {:<6} {:<6} {:<24} PORTS\n",
        "SERVICE", "MODE", "SCHED", "PUBLISHED"
    );
    let list = |items: Vec<String>| {
        if items.is_empty() {
            "-".to_owned()
        } else {
            items.join(",")
        }
    };
    for d in defs.values() {
        let _ = writeln!(
            out,
            "{:<24} {:<6} {:<6} {:<24} {}",
            d.name.as_str(),
            crate::core::labels::endpoint_mode_name(d.mode),
            d.scheduler.name(),
            list(d.publish.iter().map(ToString::to_string).collect()),
            list(d.ports.iter().map(ToString::to_string).collect()),
        );
    }
    out
}

/// Where the agent reads the stored definitions from, on every sync.
pub trait DefinitionSource: Send + Sync {
    /// The definitions now. Should be cheap when nothing changed: it is asked every sync.
    fn definitions(&self) -> Result<Arc<Definitions>, DefinitionError>;
}

/// The definitions of the last cluster snapshot a reflector holds (the agent's hook for
/// cluster mode: build it from [`crate::store::Reflector::subscribe`]).
pub struct SnapshotDefinitions {
    view: tokio::sync::watch::Receiver<crate::store::View>,
}

impl SnapshotDefinitions {
    pub fn new(view: tokio::sync::watch::Receiver<crate::store::View>) -> Self {
        SnapshotDefinitions { view }
    }
}

impl DefinitionSource for SnapshotDefinitions {
    /// Never fails: an unreachable store keeps its last snapshot.
    fn definitions(&self) -> Result<Arc<Definitions>, DefinitionError> {
        Ok(Arc::new(self.view.borrow().state.definitions.clone()))
    }
}

/// No definitions (labels alone), for tests and embedders.
pub struct NoDefinitions;

impl DefinitionSource for NoDefinitions {
    fn definitions(&self) -> Result<Arc<Definitions>, DefinitionError> {
        Ok(Arc::new(Definitions::new()))
    }
}

#[cfg(test)]
mod tests;
