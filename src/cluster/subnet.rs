//! The cluster range and a node's slice of it, as data: the checks the range must pass
//! before vipd leases a slice of it, and the addresses each slice reserves. No I/O.

use std::net::Ipv4Addr;

use crate::core::alloc::check_pool;
use crate::core::model::Ipv4Net;
use crate::core::overlay::NODE_PREFIX;

/// The default cluster range: clear of Docker's default address pools (172.17.0.0/16 to
/// 172.31.0.0/16, 192.168.0.0/16 in /20s) and of vipd's VIP pool.
pub const DEFAULT_CLUSTER_SUBNET: &str = "10.230.0.0/16";

/// A route of the host, by its destination and the interface it leaves through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoute {
    pub destination: Ipv4Net,
    pub device: String,
}

/// A Docker network with an IPv4 subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerSubnet {
    pub network: String,
    pub subnet: Ipv4Net,
}

/// What vipd itself puts in the host's routes and in Docker: routes through these
/// devices, and the network of this name, are the cluster's own, not in its way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnObjects<'a> {
    /// The VXLAN device (routes to peers' slices).
    pub vxlan: &'a str,
    /// The cluster network's bridge (the route to this node's slice).
    pub bridge: &'a str,
    /// The cluster network's name in Docker.
    pub network: &'a str,
}

/// Why the cluster range cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    /// It shares addresses with something of the host's or Docker's.
    #[error("the cluster subnet {range} overlaps {what} {net}; choose a cluster subnet that does not (--cluster-subnet)")]
    Overlap {
        range: Ipv4Net,
        what: String,
        net: Ipv4Net,
    },
    /// It is too small to hold even one node's slice.
    #[error("the cluster subnet {0} is smaller than one node's /{NODE_PREFIX}; choose a shorter prefix (--cluster-subnet)")]
    TooSmall(Ipv4Net),
    /// A node's slice is not a /24.
    #[error("a node's subnet must be a /{NODE_PREFIX}, not {0}")]
    NotANodeSlice(Ipv4Net),
}

/// Check the cluster range `range` against the host's routes and Docker's networks,
/// leaving out vipd's own (`own`): the first overlap found, named.
pub fn check_range(
    range: Ipv4Net,
    routes: &[HostRoute],
    networks: &[DockerSubnet],
    own: &OwnObjects<'_>,
) -> Result<(), SubnetError> {
    if range.prefix_len() > NODE_PREFIX {
        return Err(SubnetError::TooSmall(range));
    }
    let others: Vec<(String, Ipv4Net)> = routes
        .iter()
        .filter(|r| r.device != own.vxlan && r.device != own.bridge)
        .map(|r| (format!("the host route via {}", r.device), r.destination))
        .chain(
            networks
                .iter()
                .filter(|n| n.network != own.network)
                .map(|n| (format!("the Docker network {}", n.network), n.subnet)),
        )
        .collect();
    check_pool(range, &others).map_err(|o| SubnetError::Overlap {
        range,
        what: o.what,
        net: o.net,
    })
}

/// One node's /24 of the cluster range, and the addresses it reserves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeSubnet(Ipv4Net);

impl NodeSubnet {
    /// The slice holding `net`, which must be a /24 (any host address of it is taken
    /// as its network).
    pub fn new(net: Ipv4Net) -> Result<Self, SubnetError> {
        if net.prefix_len() == NODE_PREFIX {
            Ok(NodeSubnet(net.trunc()))
        } else {
            Err(SubnetError::NotANodeSlice(net))
        }
    }

    pub fn net(self) -> Ipv4Net {
        self.0
    }

    /// `.0`: the VXLAN device's address, the gateway peers route this slice through
    /// (see [`crate::core::overlay::Node::tunnel_address`]).
    pub fn tunnel(self) -> Ipv4Addr {
        self.nth(0)
    }

    /// `.1`: the bridge's address, the containers' gateway.
    pub fn gateway(self) -> Ipv4Addr {
        self.nth(1)
    }

    /// `.2`: reserved in Docker's IPAM (an aux address) for the node's ingress
    /// namespace, so no container is given it.
    pub fn ingress(self) -> Ipv4Addr {
        self.nth(2)
    }

    fn nth(self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.0.network()) + n)
    }
}

impl std::fmt::Display for NodeSubnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    const OWN: OwnObjects<'static> = OwnObjects {
        vxlan: "vipd-vx",
        bridge: "vipd0",
        network: "vipd",
    };

    fn route(dest: &str, device: &str) -> HostRoute {
        HostRoute {
            destination: net(dest),
            device: device.into(),
        }
    }

    fn docker(name: &str, subnet: &str) -> DockerSubnet {
        DockerSubnet {
            network: name.into(),
            subnet: net(subnet),
        }
    }

    #[test]
    fn a_range_clear_of_routes_and_networks_passes() {
        let routes = [route("192.168.1.0/24", "eth0"), route("172.17.0.0/16", "docker0")];
        let networks = [docker("bridge", "172.17.0.0/16")];
        assert_eq!(
            check_range(net("10.230.0.0/16"), &routes, &networks, &OWN),
            Ok(())
        );
    }

    #[test]
    fn an_overlapping_route_or_network_is_named_in_the_error() {
        let err = check_range(net("10.230.0.0/16"), &[route("10.0.0.0/8", "eth1")], &[], &OWN).unwrap_err();
        assert_eq!(
            err,
            SubnetError::Overlap {
                range: net("10.230.0.0/16"),
                what: "the host route via eth1".into(),
                net: net("10.0.0.0/8")
            }
        );
        assert!(err.to_string().contains("--cluster-subnet"), "{err}");
        let err =
            check_range(net("10.230.0.0/16"), &[], &[docker("app", "10.230.8.0/24")], &OWN).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "the cluster subnet 10.230.0.0/16 overlaps the Docker network app 10.230.8.0/24"
            ),
            "{err}"
        );
    }

    #[test]
    fn vipds_own_routes_and_network_are_not_in_the_way() {
        let routes = [
            route("10.230.1.0/24", "vipd0"),
            route("10.230.2.0/24", "vipd-vx"),
            route("10.230.3.0/24", "vipd-vx"),
        ];
        let networks = [docker("vipd", "10.230.1.0/24")];
        assert_eq!(
            check_range(net("10.230.0.0/16"), &routes, &networks, &OWN),
            Ok(())
        );
    }

    #[test]
    fn a_range_smaller_than_a_slice_is_refused() {
        assert_eq!(
            check_range(net("10.230.0.0/25"), &[], &[], &OWN),
            Err(SubnetError::TooSmall(net("10.230.0.0/25")))
        );
    }

    #[test]
    fn a_slice_reserves_tunnel_gateway_and_ingress_addresses() {
        let s = NodeSubnet::new(net("10.230.7.9/24")).unwrap();
        assert_eq!(s.net(), net("10.230.7.0/24"));
        assert_eq!(s.tunnel(), "10.230.7.0".parse::<Ipv4Addr>().unwrap());
        assert_eq!(s.gateway(), "10.230.7.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!(s.ingress(), "10.230.7.2".parse::<Ipv4Addr>().unwrap());
        assert_eq!(s.to_string(), "10.230.7.0/24");
        assert_eq!(
            NodeSubnet::new(net("10.230.0.0/23")),
            Err(SubnetError::NotANodeSlice(net("10.230.0.0/23")))
        );
    }
}
