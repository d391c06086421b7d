//! The host side of cluster mode: the Docker network the cluster's containers live on
//! (this node's /24 of the cluster subnet) and the VXLAN overlay to the other nodes.
//! Both follow the cluster link's view: on every change of the set of nodes, and on a
//! timer (each is idempotent, and re-creates what was deleted by hand).
//!
//! The network is behind [`ClusterNetwork`] so another implementation (a fuller
//! create-or-adopt with checks) can take the place of [`DockerClusterNetwork`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tracing::{info, info_span, warn, Instrument};

use super::cluster::ClusterView;
use crate::core::model::{Ipv4Net, NodeName};
use crate::core::overlay::{Node, OverlayConfig};

/// The label vipd puts on the network it creates: a network of that name without it is
/// someone else's, and is not used.
pub const NETWORK_LABEL: &str = "vipd.cluster";

/// Why the cluster network could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    #[error("Docker network {name} exists but vipd did not make it (no {NETWORK_LABEL} label): remove it or choose another --cluster-network")]
    NotOurs { name: String },
    #[error("Docker network {name} has subnet {has:?}, this node's slice of the cluster is {want}: remove the network (vipd makes it again)")]
    OtherSubnet {
        name: String,
        has: Vec<String>,
        want: Ipv4Net,
    },
    #[error("Docker engine: {0}")]
    Engine(String),
}

/// The Docker network of the cluster's containers on this node.
#[async_trait]
pub trait ClusterNetwork: Send + Sync {
    /// Make sure the network `name` exists with `subnet` (create it, or adopt the one
    /// vipd made before).
    async fn ensure(&self, name: &str, subnet: Ipv4Net) -> Result<(), NetworkError>;
}

/// [`ClusterNetwork`] over the Docker API: a bridge network with the node's subnet.
pub struct DockerClusterNetwork {
    docker: bollard::Docker,
    /// The containers' MTU: the overlay's, so packets to other nodes fit the tunnel.
    mtu: u32,
}

impl DockerClusterNetwork {
    /// The engine at `DOCKER_HOST`, or the default socket; networks made with `mtu`.
    pub fn connect(mtu: u32) -> Result<Self, NetworkError> {
        let docker =
            bollard::Docker::connect_with_defaults().map_err(|e| NetworkError::Engine(e.to_string()))?;
        Ok(DockerClusterNetwork { docker, mtu })
    }
}

#[async_trait]
impl ClusterNetwork for DockerClusterNetwork {
    async fn ensure(&self, name: &str, subnet: Ipv4Net) -> Result<(), NetworkError> {
        use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest};
        let engine = |e: bollard::errors::Error| NetworkError::Engine(e.to_string());
        match self.docker.inspect_network(name, None).await {
            Ok(n) => {
                let ours = n.labels.as_ref().is_some_and(|l| l.contains_key(NETWORK_LABEL));
                if !ours {
                    return Err(NetworkError::NotOurs {
                        name: name.to_owned(),
                    });
                }
                let has: Vec<String> = n
                    .ipam
                    .and_then(|i| i.config)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|c| c.subnet)
                    .collect();
                if has != [subnet.to_string()] {
                    return Err(NetworkError::OtherSubnet {
                        name: name.to_owned(),
                        has,
                        want: subnet,
                    });
                }
                Ok(())
            }
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {
                let request = NetworkCreateRequest {
                    name: name.to_owned(),
                    driver: Some("bridge".into()),
                    ipam: Some(Ipam {
                        config: Some(vec![IpamConfig {
                            subnet: Some(subnet.to_string()),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }),
                    labels: Some(HashMap::from([(NETWORK_LABEL.to_owned(), "1".to_owned())])),
                    options: Some(HashMap::from([(
                        "com.docker.network.driver.mtu".to_owned(),
                        self.mtu.to_string(),
                    )])),
                    ..Default::default()
                };
                self.docker.create_network(request).await.map_err(engine)?;
                info!(network = name, subnet = %subnet, "cluster network created");
                Ok(())
            }
            Err(e) => Err(engine(e)),
        }
    }
}

/// The overlay's nodes in a view: this one (once it has a subnet) and its peers with one.
pub fn overlay_nodes(view: &ClusterView, me: &NodeName) -> Option<(Node, Vec<Node>)> {
    let as_node = |name: &NodeName, address: IpAddr, subnet: Option<Ipv4Net>| -> Option<Node> {
        let IpAddr::V4(underlay) = address else {
            return None;
        };
        Some(Node {
            name: name.clone(),
            underlay,
            subnet: subnet?,
        })
    };
    let mine = view.me.as_ref()?;
    let me_node = as_node(&mine.name, mine.address, mine.subnet)?;
    let peers = view
        .peers(me)
        .filter_map(|n| {
            as_node(
                &n.name,
                n.address,
                n.subnet.or_else(|| view.state.subnets.get(&n.name).copied()),
            )
        })
        .collect();
    Some((me_node, peers))
}

/// Keep the cluster network and the overlay as the view says, until the link stops.
/// The overlay is programmed on a blocking thread (netlink, in the host's namespace).
pub async fn follow(
    mut view: watch::Receiver<ClusterView>,
    me: NodeName,
    network_name: String,
    network: Box<dyn ClusterNetwork>,
    overlay: OverlayConfig,
    every: Duration,
) {
    let mut last: Option<(Node, Vec<Node>)> = None;
    loop {
        let nodes = overlay_nodes(&view.borrow_and_update(), &me);
        if let Some((mine, peers)) = nodes {
            let timer = last.as_ref() == Some(&(mine.clone(), peers.clone()));
            let span = info_span!("underlay", peers = peers.len(), timer);
            async {
                if let Err(e) = network.ensure(&network_name, mine.subnet).await {
                    warn!(error = %e, "cluster network not ready");
                }
                let (cfg, m, p) = (overlay.clone(), mine.clone(), peers.clone());
                match tokio::task::spawn_blocking(move || crate::overlay::sync(&cfg, &m, &p)).await {
                    Ok(Ok(ops)) if !ops.is_empty() => info!(operations = ops.len(), "overlay programmed"),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => warn!(error = %e, "overlay not programmed"),
                    Err(e) => warn!(error = %e, "overlay task failed"),
                }
            }
            .instrument(span)
            .await;
            last = Some((mine, peers));
        }
        tokio::select! {
            changed = view.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// The source address of the route to the world: what other nodes most likely reach
/// this one at. No packet is sent (a UDP socket's connect only picks the route).
pub fn default_source_address() -> std::io::Result<Ipv4Addr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    socket.connect("192.0.2.1:9")?;
    match socket.local_addr()?.ip() {
        IpAddr::V4(a) if !a.is_unspecified() => Ok(a),
        other => Err(std::io::Error::other(format!("no IPv4 source address ({other})"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ClusterState, NodeRecord};
    use std::sync::Arc;

    fn rec(name: &str, addr: &str, subnet: Option<&str>) -> NodeRecord {
        NodeRecord {
            name: NodeName::new(name).unwrap(),
            address: addr.parse().unwrap(),
            subnet: subnet.map(|s| s.parse().unwrap()),
        }
    }

    #[test]
    fn the_overlay_takes_this_node_and_every_peer_with_a_subnet() {
        let me = NodeName::new("a").unwrap();
        let mut state = ClusterState::default();
        for r in [
            rec("a", "192.0.2.1", Some("10.230.0.0/24")),
            rec("b", "192.0.2.2", Some("10.230.1.0/24")),
            rec("c", "192.0.2.3", None),
        ] {
            state.nodes.insert(r.name.clone(), r);
        }
        let mut view = ClusterView {
            state: Arc::new(state),
            ..ClusterView::default()
        };
        assert!(overlay_nodes(&view, &me).is_none(), "not registered yet");
        view.me = Some(rec("a", "192.0.2.1", Some("10.230.0.0/24")));
        let (mine, peers) = overlay_nodes(&view, &me).unwrap();
        assert_eq!(mine.subnet.to_string(), "10.230.0.0/24");
        let names: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["b"], "c has no subnet yet");
    }
}
