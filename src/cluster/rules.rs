//! The host's firewall rules for the cluster overlay, as intents: a pure function of the
//! overlay's configuration, this node and its peers. The agent programs them through the
//! host-firewall port together with the routing mesh's rules (one owned-chain set,
//! [`crate::core::firewall::HOST_CHAINS`], so a second run changes nothing and rules of
//! others survive); after Docker rewrites its rules it checks
//! [`crate::core::firewall::ObservedFirewall::needs_reassert`] and programs again.

use std::net::IpAddr;

use crate::core::model::Ipv4Net;
use crate::core::overlay::{Node, OverlayConfig};
use crate::core::rules::{Direction, Intent, IpFamily};

/// The host's rules for the overlay of `me` with `peers`: forward between the VXLAN
/// device and the cluster bridge `bridge` (both ways), keep client addresses inside the
/// cluster range `range` and masquerade the node's slice to the world, and accept VXLAN
/// packets from the peers' underlay addresses only.
pub fn host_rules(
    config: &OverlayConfig,
    range: Ipv4Net,
    bridge: &str,
    me: &Node,
    peers: &[Node],
) -> Vec<Intent> {
    let vxlan = config.device.as_str();
    let mut out: Vec<Intent> = [Direction::In, Direction::Out]
        .into_iter()
        .map(|direction| Intent::ForwardOverlay {
            vxlan: vxlan.to_owned(),
            bridge: bridge.to_owned(),
            direction,
            family: IpFamily::V4,
        })
        .collect();
    out.push(Intent::KeepClusterSource { range });
    out.push(Intent::MasqueradeNodeSubnet {
        subnet: me.subnet,
        bridge: bridge.to_owned(),
    });
    out.push(Intent::MasqueradeIntoOverlay {
        range,
        vxlan: vxlan.to_owned(),
    });
    let mut underlays: Vec<IpAddr> = peers
        .iter()
        .filter(|p| p.name != me.name)
        .map(|p| IpAddr::V4(p.underlay))
        .collect();
    underlays.sort_unstable();
    underlays.dedup();
    out.extend(underlays.into_iter().map(|peer| Intent::AcceptVxlanPeer {
        peer,
        port: config.port,
    }));
    out.push(Intent::DropVxlan {
        port: config.port,
        family: IpFamily::V4,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::firewall::{
        parse_save, plan_chains, render_restore, HOST_CHAINS, HOST_OVERLAY_FORWARD, HOST_OVERLAY_NAT,
        HOST_VXLAN_INPUT,
    };
    use crate::core::model::NodeName;

    fn node(name: &str, underlay: &str, subnet: &str) -> Node {
        Node {
            name: NodeName::new(name).unwrap(),
            underlay: underlay.parse().unwrap(),
            subnet: subnet.parse().unwrap(),
        }
    }

    fn rules(peers: &[Node]) -> Vec<Intent> {
        let me = node("node1", "192.168.1.1", "10.230.1.0/24");
        host_rules(
            &OverlayConfig::default(),
            "10.230.0.0/16".parse().unwrap(),
            "vipd0",
            &me,
            peers,
        )
    }

    #[test]
    fn the_chain_set_is_forwarding_nat_and_one_accept_per_peer_before_the_drop() {
        let peers = [
            node("node3", "192.168.1.3", "10.230.3.0/24"),
            node("node2", "192.168.1.2", "10.230.2.0/24"),
        ];
        let ops = plan_chains(&HOST_CHAINS, &rules(&peers), &parse_save(""));
        let script = render_restore(&ops);
        assert_eq!(
            script,
            "*nat\n\
             :VIPD-OVERLAY-NAT - [0:0]\n\
             -A VIPD-OVERLAY-NAT -s 10.230.0.0/16 -d 10.230.0.0/16 -m comment --comment vipd:overlay -j RETURN\n\
             -A VIPD-OVERLAY-NAT ! -s 10.230.0.0/16 -o vipd-vx -m comment --comment vipd:overlay -j MASQUERADE\n\
             -A VIPD-OVERLAY-NAT -s 10.230.1.0/24 ! -o vipd0 -m comment --comment vipd:overlay -j MASQUERADE\n\
             -I POSTROUTING 1 -j VIPD-OVERLAY-NAT\n\
             COMMIT\n\
             *filter\n\
             :DOCKER-USER - [0:0]\n\
             :VIPD-OVERLAY - [0:0]\n\
             :VIPD-VXLAN-IN - [0:0]\n\
             -I FORWARD 1 -j DOCKER-USER\n\
             -A VIPD-OVERLAY -i vipd-vx -o vipd0 -m comment --comment vipd:overlay -j ACCEPT\n\
             -A VIPD-OVERLAY -i vipd0 -o vipd-vx -m comment --comment vipd:overlay -j ACCEPT\n\
             -I DOCKER-USER 1 -j VIPD-OVERLAY\n\
             -A VIPD-VXLAN-IN -s 192.168.1.2/32 -p udp -m udp --dport 4799 -m comment --comment vipd:vxlan -j ACCEPT\n\
             -A VIPD-VXLAN-IN -s 192.168.1.3/32 -p udp -m udp --dport 4799 -m comment --comment vipd:vxlan -j ACCEPT\n\
             -A VIPD-VXLAN-IN -p udp -m udp --dport 4799 -m comment --comment vipd:vxlan -j DROP\n\
             -I INPUT 1 -j VIPD-VXLAN-IN\n\
             COMMIT\n"
        );
        for chain in [HOST_OVERLAY_FORWARD, HOST_OVERLAY_NAT, HOST_VXLAN_INPUT] {
            assert!(HOST_CHAINS.contains(&chain));
        }
    }

    #[test]
    fn me_among_the_peers_and_a_repeated_address_give_one_rule() {
        let me = node("node1", "192.168.1.1", "10.230.1.0/24");
        let twice = [
            me.clone(),
            node("node2", "192.168.1.2", "10.230.2.0/24"),
            node("node2b", "192.168.1.2", "10.230.4.0/24"),
        ];
        let accepts: Vec<Intent> = rules(&twice)
            .into_iter()
            .filter(|i| matches!(i, Intent::AcceptVxlanPeer { .. }))
            .collect();
        assert_eq!(
            accepts,
            [Intent::AcceptVxlanPeer {
                peer: "192.168.1.2".parse().unwrap(),
                port: OverlayConfig::DEFAULT_PORT
            }]
        );
    }

    #[test]
    fn alone_a_node_drops_every_vxlan_packet() {
        let r = rules(&[]);
        assert_eq!(r.len(), 6, "{r:#?}");
        assert!(r.contains(&Intent::DropVxlan {
            port: OverlayConfig::DEFAULT_PORT,
            family: IpFamily::V4
        }));
    }
}
