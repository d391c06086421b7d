//! vipd's packet rules as intent: what each rule is for, in vipd's own types, with no
//! backend's syntax in it.
//!
//! The planner ([`super::plan`], [`super::mesh`]) says which intents a namespace should
//! hold; a backend renders them (iptables today: [`super::firewall::render`]). Another
//! backend (nftables) renders the same intents, so planning does not change with it.

use std::net::{IpAddr, Ipv4Addr};

use serde::Serialize;

use super::labels::Publish;
use super::model::{FwMark, Ipv4Net, ServiceName, Vip};

/// The IP family a rule is for: a backend keeps one rule set per family (iptables and
/// ip6tables; nftables' `ip` and `ip6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    /// The family of an address.
    pub fn of(addr: IpAddr) -> IpFamily {
        match addr {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    /// The prefix length of one host's address in this family.
    pub fn host_prefix(self) -> u8 {
        match self {
            IpFamily::V4 => 32,
            IpFamily::V6 => 128,
        }
    }
}

/// One thing vipd wants the packet path of a namespace to do.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(tag = "intent", rename_all = "snake_case")]
pub enum Intent {
    /// In a sandbox: packets the sandbox sends to a service's VIP carry the service's
    /// fwmark, so its IPVS fwmark service balances them.
    MarkVip {
        service: ServiceName,
        vip: Vip,
        mark: FwMark,
    },
    /// In a sandbox: `ping VIP` is answered by the sandbox itself (IPVS does not answer
    /// ICMP echo). `mark` is the service's, for the operator reading the rules.
    PingVip {
        service: ServiceName,
        vip: Vip,
        mark: FwMark,
    },
    /// In a sandbox: IPVS-forwarded packets to `dest_net` (a network of the sandbox's own
    /// that holds backends) leave with `source`, the sandbox's address there, so replies
    /// come back through the sandbox's IPVS.
    SnatIpvs { dest_net: Ipv4Net, source: Ipv4Addr },
    /// In the ingress namespace: every IPVS-forwarded packet leaves with `source`, the
    /// namespace's one address.
    SnatAllIpvs { source: Ipv4Addr },
    /// In the ingress namespace: packets to a published port on its address `addr` carry
    /// the port's fwmark.
    IngressMark {
        service: ServiceName,
        addr: Vip,
        publish: Publish,
        mark: FwMark,
    },
    /// On the host: a published port, arriving for a local address or opened by the host
    /// itself (`origin`), is DNAT'ed to the same port on the ingress namespace's address
    /// `ingress`.
    DnatToIngress {
        service: ServiceName,
        publish: Publish,
        ingress: Ipv4Addr,
        origin: Origin,
    },
    /// On the host: the host's own connections leave through `iface` (its end of the link
    /// to the ingress namespace) with its address on that link, never 127.0.0.1.
    MasqueradeToIngress { iface: String, family: IpFamily },
    /// On the host: traffic to (`Out` of `iface`) or from (`In`) the ingress namespace
    /// through `iface` is forwarded, whatever Docker's own chains drop.
    ForwardIngress {
        iface: String,
        direction: Direction,
        family: IpFamily,
    },
    /// On the host, for the cluster overlay: traffic between the VXLAN device `vxlan` and
    /// the cluster bridge `bridge` is forwarded (`In`: arriving from peers, towards the
    /// bridge; `Out`: from the bridge towards peers), whatever Docker's FORWARD drops.
    ForwardOverlay {
        vxlan: String,
        bridge: String,
        direction: Direction,
        family: IpFamily,
    },
    /// On the host, for the cluster overlay: traffic from the cluster range to the cluster
    /// range is not masqueraded (a task sees its client's own address).
    KeepClusterSource { range: Ipv4Net },
    /// On the host, for the cluster overlay: traffic from the node's own slice `subnet`
    /// leaving anywhere but through `bridge` (and not to the cluster range, which
    /// [`Intent::KeepClusterSource`] keeps) is masqueraded, as Docker would do for it.
    MasqueradeNodeSubnet { subnet: Ipv4Net, bridge: String },
    /// On the host, for the cluster overlay: traffic from outside the cluster range that
    /// leaves through the VXLAN device `vxlan` (the routing mesh's, from the ingress
    /// namespace, to a task on another node) takes the device's address, in this node's
    /// slice, so the task's reply comes back to this node (every node's ingress namespace
    /// has the same address).
    MasqueradeIntoOverlay { range: Ipv4Net, vxlan: String },
    /// On the host: VXLAN packets (UDP to `port`) from a peer's underlay address `peer`
    /// are accepted.
    AcceptVxlanPeer { peer: IpAddr, port: u16 },
    /// On the host: every other VXLAN packet (UDP to `port`) is dropped; VXLAN carries no
    /// authentication, so only peers may inject frames onto the cluster bridge.
    DropVxlan { port: u16, family: IpFamily },
}

/// Where the packets a host rule takes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Arriving from elsewhere, for one of the host's addresses.
    Arriving,
    /// Opened by the host itself (`127.0.0.1:<published>`).
    Local,
}

/// Which way through an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Leaving through it.
    Out,
    /// Coming in through it.
    In,
}

impl Intent {
    /// The IP family of the rule set the intent belongs to.
    pub fn family(&self) -> IpFamily {
        match self {
            Intent::MarkVip { vip, .. } | Intent::PingVip { vip, .. } => IpFamily::of(vip.addr()),
            Intent::IngressMark { addr, .. } => IpFamily::of(addr.addr()),
            Intent::SnatIpvs { .. } | Intent::SnatAllIpvs { .. } | Intent::DnatToIngress { .. } => {
                IpFamily::V4
            }
            Intent::MasqueradeToIngress { family, .. }
            | Intent::ForwardIngress { family, .. }
            | Intent::ForwardOverlay { family, .. }
            | Intent::DropVxlan { family, .. } => *family,
            Intent::KeepClusterSource { .. }
            | Intent::MasqueradeNodeSubnet { .. }
            | Intent::MasqueradeIntoOverlay { .. } => IpFamily::V4,
            Intent::AcceptVxlanPeer { peer, .. } => IpFamily::of(*peer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_intent_says_its_family() {
        let web = ServiceName::new("web").unwrap();
        let mark = FwMark::new(256).unwrap();
        let v4 = Vip::new("10.0.0.100".parse().unwrap());
        let v6 = Vip::new("fd00::64".parse().unwrap());
        let vip_rule = |vip| Intent::MarkVip {
            service: web.clone(),
            vip,
            mark,
        };
        assert_eq!(vip_rule(v4).family(), IpFamily::V4);
        assert_eq!(vip_rule(v6).family(), IpFamily::V6);
        let snat = Intent::SnatAllIpvs {
            source: "10.254.255.2".parse().unwrap(),
        };
        assert_eq!(snat.family(), IpFamily::V4);
        let fwd = Intent::ForwardIngress {
            iface: "vipd-ingress".into(),
            direction: Direction::In,
            family: IpFamily::V6,
        };
        assert_eq!(fwd.family(), IpFamily::V6);
        let peer = |addr: &str| Intent::AcceptVxlanPeer {
            peer: addr.parse().unwrap(),
            port: 4799,
        };
        assert_eq!(peer("192.168.1.2").family(), IpFamily::V4);
        assert_eq!(peer("fd00::2").family(), IpFamily::V6);
        let keep = Intent::KeepClusterSource {
            range: "10.230.0.0/16".parse().unwrap(),
        };
        assert_eq!(keep.family(), IpFamily::V4);
        assert_eq!(
            (IpFamily::V4.host_prefix(), IpFamily::V6.host_prefix()),
            (32, 128)
        );
    }
}
