//! The host side of cluster mode: the Docker network the cluster's containers live on
//! (this node's /24 of the cluster subnet, made by [`crate::cluster::network::ensure`]),
//! the one DNS address on its bridge ([`crate::cluster::dns_address::ensure`]) and the
//! VXLAN overlay to the other nodes. All follow the cluster link's view: on every change
//! of the set of nodes, and on a timer (each is idempotent, and re-creates what was
//! deleted by hand).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, info_span, warn, Instrument};

use super::cluster::ClusterView;
use crate::cluster::network::{self, NetworkSpec};
use crate::cluster::subnet::NodeSubnet;
use crate::core::model::{Ipv4Net, NodeName};
use crate::core::overlay::{Node, OverlayConfig};
use crate::docker::Engine;

/// What [`follow`] keeps on this host.
#[derive(Clone)]
pub struct Underlay {
    /// The engine the cluster network is made in.
    pub engine: Arc<dyn Engine>,
    /// The cluster network's name in Docker (`--cluster-network`).
    pub network: String,
    /// Its bridge's name (fixed, so the host's rules can name it).
    pub bridge: String,
    pub overlay: OverlayConfig,
    /// The one DNS address put on the bridge; `None`: none.
    pub dns_address: Option<Ipv4Addr>,
    /// How often everything is made sure of again, changes or not.
    pub every: Duration,
}

impl Underlay {
    /// The cluster network of this node's slice `subnet`: the overlay's MTU, and its
    /// VXLAN device trusted to reach the containers.
    pub fn spec(&self, subnet: Ipv4Net) -> Result<NetworkSpec, crate::cluster::subnet::SubnetError> {
        Ok(NetworkSpec {
            name: self.network.clone(),
            subnet: NodeSubnet::new(subnet)?,
            bridge: self.bridge.clone(),
            mtu: self.overlay.mtu,
            vxlan: self.overlay.device.as_str().to_owned(),
        })
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

/// Keep the cluster network, its DNS address and the overlay as the view says, until
/// the link stops. The address and the overlay are programmed on a blocking thread
/// (netlink, in the host's namespace).
pub async fn follow(mut view: watch::Receiver<ClusterView>, me: NodeName, underlay: Underlay) {
    let mut last: Option<(Node, Vec<Node>)> = None;
    loop {
        let nodes = overlay_nodes(&view.borrow_and_update(), &me);
        if let Some((mine, peers)) = nodes {
            let timer = last.as_ref() == Some(&(mine.clone(), peers.clone()));
            let span = info_span!("underlay", peers = peers.len(), timer);
            ensure_once(&underlay, &mine, &peers).instrument(span).await;
            last = Some((mine, peers));
        }
        tokio::select! {
            changed = view.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(underlay.every) => {}
        }
    }
}

/// One pass of [`follow`]: the network, then the address on its bridge, then the
/// overlay. Each failure is logged and tried again on the next pass.
async fn ensure_once(underlay: &Underlay, mine: &Node, peers: &[Node]) {
    let made = match underlay.spec(mine.subnet) {
        Ok(spec) => network::ensure(underlay.engine.as_ref(), &spec)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match made {
        Ok(outcome) => {
            if let Some(address) = underlay.dns_address {
                let bridge = underlay.bridge.clone();
                let added = tokio::task::spawn_blocking(move || {
                    crate::cluster::dns_address::ensure(&bridge, address)
                })
                .await;
                match added {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => warn!(error = %e, "cluster DNS address not set"),
                    Err(e) => warn!(error = %e, "cluster DNS address task failed"),
                }
            }
            tracing::debug!(?outcome, "cluster network ready");
        }
        Err(e) => warn!(error = %e, "cluster network not ready"),
    }
    let (cfg, m, p) = (underlay.overlay.clone(), mine.clone(), peers.to_vec());
    match tokio::task::spawn_blocking(move || crate::overlay::sync(&cfg, &m, &p)).await {
        Ok(Ok(ops)) if !ops.is_empty() => info!(operations = ops.len(), "overlay programmed"),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => warn!(error = %e, "overlay not programmed"),
        Err(e) => warn!(error = %e, "overlay task failed"),
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
    fn the_cluster_network_has_the_nodes_slice_the_overlays_mtu_and_trusts_its_device() {
        let underlay = Underlay {
            engine: Arc::new(crate::docker::fake::FakeEngine::new()),
            network: "vipd".into(),
            bridge: "vipd0".into(),
            overlay: OverlayConfig::default(),
            dns_address: None,
            every: Duration::from_secs(30),
        };
        let spec = underlay.spec("10.230.4.0/24".parse().unwrap()).unwrap();
        assert_eq!(spec.subnet.net().to_string(), "10.230.4.0/24");
        assert_eq!((spec.name.as_str(), spec.bridge.as_str()), ("vipd", "vipd0"));
        assert_eq!(spec.mtu, OverlayConfig::default().mtu);
        assert_eq!(spec.vxlan, OverlayConfig::DEFAULT_DEVICE);
        assert!(
            underlay.spec("10.230.4.0/23".parse().unwrap()).is_err(),
            "not a node's slice"
        );
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
