//! What the agent knows of the world: containers and networks, as typed data. Engine
//! listings, inspects and events are applied to it; planning reads it. Tasks of other
//! hosts can later be merged in here without touching planning.

use std::collections::BTreeMap;

use crate::core::containers::{Container, ContainerId};
use crate::docker::NetworkInfo;

/// Containers by id, and the networks.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    containers: BTreeMap<ContainerId, Container>,
    networks: Vec<NetworkInfo>,
    /// Other nodes' tasks (cluster mode), as containers with no sandbox here.
    peers: Vec<Container>,
}

impl Inventory {
    pub fn containers(&self) -> &BTreeMap<ContainerId, Container> {
        &self.containers
    }

    pub fn container(&self, id: &ContainerId) -> Option<&Container> {
        self.containers.get(id)
    }

    /// A full listing replaces every container.
    pub fn replace_containers(&mut self, fresh: BTreeMap<ContainerId, Container>) {
        self.containers = fresh;
    }

    /// An inspect's answer: the container as it is now, or gone (`None`).
    pub fn apply(&mut self, id: ContainerId, now: Option<Container>) {
        match now {
            Some(c) => {
                self.containers.insert(id, c);
            }
            None => {
                self.containers.remove(&id);
            }
        }
    }

    /// Other nodes' tasks, as the cluster link last said.
    pub fn peers(&self) -> &[Container] {
        &self.peers
    }

    /// Replace the other nodes' tasks; true when they changed.
    pub fn set_peers(&mut self, peers: Vec<Container>) -> bool {
        let changed = self.peers != peers;
        if changed {
            self.peers = peers;
        }
        changed
    }

    /// The id of the network called `name`, if there is one.
    pub fn network_named(&self, name: &str) -> Option<&crate::core::containers::NetworkId> {
        self.networks.iter().find(|n| n.name == name).map(|n| &n.id)
    }

    pub fn networks(&self) -> &[NetworkInfo] {
        &self.networks
    }

    /// A network listing (sorted by id here); true when it differs from the last.
    pub fn set_networks(&mut self, mut list: Vec<NetworkInfo>) -> bool {
        list.sort_by(|a, b| a.id.cmp(&b.id));
        let changed = self.networks != list;
        if changed {
            self.networks = list;
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::containers::NetworkId;

    fn net(id: &str) -> NetworkInfo {
        NetworkInfo {
            id: NetworkId(id.into()),
            name: id.into(),
            driver: "bridge".into(),
            subnets: vec![],
            gateways: vec![],
        }
    }

    #[test]
    fn inspects_update_or_remove_one_container_and_network_listings_say_when_they_change() {
        let mut inv = Inventory::default();
        let a = crate::core::containers::fixture::container("a1aaaaaaaaaa", &[], &[("front", "10.1.0.5")]);
        inv.replace_containers([(a.id.clone(), a.clone())].into());
        let mut stopped = a.clone();
        stopped.running = false;
        inv.apply(a.id.clone(), Some(stopped));
        assert!(!inv.container(&a.id).unwrap().running);
        inv.apply(a.id.clone(), None);
        assert!(inv.containers().is_empty());

        assert!(inv.set_networks(vec![net("b"), net("a")]));
        assert_eq!(inv.networks()[0].id, NetworkId("a".into()));
        assert!(!inv.set_networks(vec![net("a"), net("b")]), "same networks");
        assert!(inv.set_networks(vec![net("a")]));
    }
}
