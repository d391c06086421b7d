//! The VXLAN overlay between nodes, as data: what one node's kernel should hold so that
//! its containers reach every peer's, and the operations from what it holds to that.
//!
//! The layout is flannel's vxlan design (see the multi-node notes): every node leases a
//! /24 of the cluster range and has one VXLAN device with a MAC derived from its subnet
//! and the subnet's `.0` as a /32. Per peer it holds three objects, all on that device:
//! a permanent neighbour (`peer.0 lladdr MAC_peer`), an FDB entry (`MAC_peer dst
//! peer_underlay`) and a route (`peer_subnet via peer.0 onlink`). Kernel state grows with
//! the nodes, never with the containers. No I/O here: `crate::overlay` observes and applies.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;

use super::model::{Ipv4Net, NodeName};

/// The longest interface name the kernel takes (`IFNAMSIZ` less the terminating NUL).
pub const MAX_DEVICE_NAME: usize = 15;

/// The prefix length of every node's subnet.
pub const NODE_PREFIX: u8 = 24;

/// Bytes VXLAN adds to every packet over an IPv4 underlay: outer IPv4 (20), UDP (8),
/// VXLAN (8) and the inner Ethernet header (14).
pub const VXLAN_OVERHEAD: u32 = 50;

/// One node of the cluster: where its VXLAN packets go (`underlay`) and the /24 its
/// containers live in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: NodeName,
    pub underlay: Ipv4Addr,
    pub subnet: Ipv4Net,
}

impl Node {
    /// The node's subnet's `.0`: the address of its VXLAN device, and the gateway peers
    /// route its subnet through.
    pub fn tunnel_address(&self) -> Ipv4Addr {
        self.subnet.network()
    }

    /// The MAC of the node's VXLAN device.
    pub fn mac(&self) -> MacAddr {
        MacAddr::for_subnet(self.subnet)
    }
}

/// A VXLAN network identifier: 24 bits, 0 excluded (some switches treat it as "none").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Vni(u32);

impl Vni {
    pub const MAX: u32 = (1 << 24) - 1;

    pub fn new(raw: u32) -> Result<Self, OverlayError> {
        if (1..=Self::MAX).contains(&raw) {
            Ok(Vni(raw))
        } else {
            Err(OverlayError::BadVni(raw))
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The name of vipd's VXLAN device: a valid interface name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceName(String);

impl DeviceName {
    /// Refuses what the kernel's `dev_valid_name` refuses: empty, longer than 15 bytes,
    /// `.`/`..`, or with `/`, `:` or white space.
    pub fn new(name: impl Into<String>) -> Result<Self, OverlayError> {
        let name = name.into();
        let valid = !name.is_empty()
            && name.len() <= MAX_DEVICE_NAME
            && name != "."
            && name != ".."
            && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace());
        if valid {
            Ok(DeviceName(name))
        } else {
            Err(OverlayError::BadDeviceName(name))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The first octet of every overlay MAC: locally administered (bit 1 set), unicast
    /// (bit 0 clear). 0x06 rather than Docker's 0x02 (`02:42:` + the container's IPv4),
    /// so an overlay MAC can never equal a container's.
    const FIRST_OCTET: u8 = 0x06;
    /// A fixed second octet ('v'), for a prefix recognisable in `bridge fdb`.
    const SECOND_OCTET: u8 = 0x76;

    /// The MAC of the VXLAN device of the node owning `subnet`: the prefix, then the four
    /// octets of the subnet's network address. Every node derives every peer's MAC the
    /// same way, so none has to be exchanged, and it survives restarts and re-creation.
    pub fn for_subnet(subnet: Ipv4Net) -> Self {
        let [a, b, c, d] = subnet.network().octets();
        MacAddr([Self::FIRST_OCTET, Self::SECOND_OCTET, a, b, c, d])
    }

    pub fn octets(self) -> [u8; 6] {
        self.0
    }

    /// The address as the kernel reports it, if it is 6 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 6]>::try_from(bytes).ok().map(MacAddr)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// How this node's overlay is set up; every node of a cluster must agree on `vni` and
/// `port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayConfig {
    pub device: DeviceName,
    pub vni: Vni,
    /// The UDP port VXLAN packets are sent to and received on.
    pub port: u16,
    /// The device's MTU: the underlay's less [`VXLAN_OVERHEAD`].
    pub mtu: u32,
}

impl OverlayConfig {
    pub const DEFAULT_DEVICE: &'static str = "vipd-vx";
    /// UDP 4799 shares its port with nobody else's VXLAN on the same host: 4789 is the
    /// IANA port that Docker Swarm's overlay (VNIs from 4096) and most others use, 4790
    /// is VXLAN-GPE, 8472 is the Linux kernel's historic default that flannel (VNI 1) and
    /// Cilium use. The kernel demultiplexes by port first, so a port of its own is what
    /// keeps vipd's overlay apart from theirs; the VNI just has to be the cluster's.
    pub const DEFAULT_PORT: u16 = 4799;
    /// Any VNI would do on a port of its own; 4242 is easy to spot in a capture.
    pub const DEFAULT_VNI: u32 = 4242;
    /// A 1500-byte underlay less the VXLAN overhead.
    pub const DEFAULT_MTU: u32 = 1500 - VXLAN_OVERHEAD;
    /// The smallest MTU IPv4 allows.
    pub const MIN_MTU: u32 = 68;

    /// A checked configuration.
    pub fn new(device: &str, vni: u32, port: u16, mtu: u32) -> Result<Self, OverlayError> {
        if port == 0 {
            return Err(OverlayError::BadPort);
        }
        if !(Self::MIN_MTU..=65535).contains(&mtu) {
            return Err(OverlayError::BadMtu(mtu));
        }
        Ok(OverlayConfig {
            device: DeviceName::new(device)?,
            vni: Vni::new(vni)?,
            port,
            mtu,
        })
    }
}

impl Default for OverlayConfig {
    fn default() -> Self {
        OverlayConfig::new(
            Self::DEFAULT_DEVICE,
            Self::DEFAULT_VNI,
            Self::DEFAULT_PORT,
            Self::DEFAULT_MTU,
        )
        .expect("the defaults are valid")
    }
}

/// Errors in the overlay's input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverlayError {
    #[error("invalid VXLAN device name {0:?}: 1 to 15 characters, no '/', ':' or white space")]
    BadDeviceName(String),
    #[error("invalid VNI {0}: 1 to 16777215")]
    BadVni(u32),
    #[error("invalid VXLAN port 0")]
    BadPort,
    #[error("invalid overlay MTU {0}: 68 to 65535")]
    BadMtu(u32),
    /// A node's subnet is not a /24 on its network address.
    #[error("node {node}: subnet {subnet} is not a /24 network address")]
    BadSubnet { node: NodeName, subnet: Ipv4Net },
    /// Two nodes share an underlay address: VXLAN packets could not tell them apart.
    #[error("node {node} has the underlay address {underlay} of node {other}")]
    DuplicateUnderlay {
        node: NodeName,
        other: NodeName,
        underlay: Ipv4Addr,
    },
    /// Two nodes claim one subnet: the route to it would have two gateways.
    #[error("node {node} has the subnet {subnet} of node {other}")]
    DuplicateSubnet {
        node: NodeName,
        other: NodeName,
        subnet: Ipv4Net,
    },
    /// Two nodes go by one name.
    #[error("two nodes are called {0}")]
    DuplicateName(NodeName),
}

/// The VXLAN device as it should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub name: DeviceName,
    pub vni: Vni,
    /// The source address of the node's VXLAN packets: its underlay address.
    pub local: Ipv4Addr,
    pub port: u16,
    pub mac: MacAddr,
    pub mtu: u32,
    /// The subnet's `.0` as a /32: the source of the node's own packets to peers.
    pub address: Ipv4Net,
}

/// A permanent neighbour on the VXLAN device: a peer's `.0` and its device's MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Neighbour {
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
}

/// A permanent FDB entry on the VXLAN device: frames to `mac` go to `dst` over UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FdbEntry {
    pub mac: MacAddr,
    pub dst: Ipv4Addr,
}

/// A route over the VXLAN device: a peer's subnet via its `.0`, on-link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OverlayRoute {
    pub destination: Ipv4Net,
    pub gateway: Ipv4Addr,
}

/// What one node's kernel should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredOverlay {
    pub device: DeviceSpec,
    pub neighbours: BTreeSet<Neighbour>,
    pub fdb: BTreeSet<FdbEntry>,
    pub routes: BTreeSet<OverlayRoute>,
}

/// The VXLAN device as the kernel reports it. A link of that name that is no VXLAN has
/// `vni`, `local` and `port` at `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedDevice {
    pub vni: Option<Vni>,
    pub local: Option<Ipv4Addr>,
    pub port: Option<u16>,
    pub learning: bool,
    pub mac: Option<MacAddr>,
    pub mtu: u32,
    pub up: bool,
    pub addresses: BTreeSet<Ipv4Net>,
}

/// What one node's kernel holds on the VXLAN device (and nothing off it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedOverlay {
    pub device: Option<ObservedDevice>,
    /// Permanent neighbours only: the others are the kernel's own cache.
    pub neighbours: BTreeSet<Neighbour>,
    pub fdb: BTreeSet<FdbEntry>,
    pub routes: BTreeSet<OverlayRoute>,
}

/// One change to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverlayOp {
    /// Create the device with its MAC, MTU and address, and set it up.
    CreateDevice(DeviceSpec),
    /// Delete the device and, with it, everything on it.
    DeleteDevice(DeviceName),
    SetMtu(u32),
    SetUp,
    AddAddress(Ipv4Net),
    AddNeighbour(Neighbour),
    DelNeighbour(Neighbour),
    AddFdb(FdbEntry),
    DelFdb(FdbEntry),
    AddRoute(OverlayRoute),
    DelRoute(OverlayRoute),
}

impl fmt::Display for OverlayOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OverlayOp::CreateDevice(d) => write!(
                f,
                "create {} (vni {} local {} port {} mac {} mtu {} address {})",
                d.name, d.vni, d.local, d.port, d.mac, d.mtu, d.address
            ),
            OverlayOp::DeleteDevice(name) => write!(f, "delete {name}"),
            OverlayOp::SetMtu(mtu) => write!(f, "set mtu {mtu}"),
            OverlayOp::SetUp => f.write_str("set up"),
            OverlayOp::AddAddress(a) => write!(f, "add address {a}"),
            OverlayOp::AddNeighbour(n) => write!(f, "add neighbour {} lladdr {}", n.ip, n.mac),
            OverlayOp::DelNeighbour(n) => write!(f, "delete neighbour {} lladdr {}", n.ip, n.mac),
            OverlayOp::AddFdb(e) => write!(f, "add fdb {} dst {}", e.mac, e.dst),
            OverlayOp::DelFdb(e) => write!(f, "delete fdb {} dst {}", e.mac, e.dst),
            OverlayOp::AddRoute(r) => write!(f, "add route {} via {}", r.destination, r.gateway),
            OverlayOp::DelRoute(r) => write!(f, "delete route {} via {}", r.destination, r.gateway),
        }
    }
}

/// Check a node on its own: its subnet is a /24 on its network address.
fn check_node(node: &Node) -> Result<(), OverlayError> {
    if node.subnet.prefix_len() != NODE_PREFIX || node.subnet.network() != node.subnet.addr() {
        return Err(OverlayError::BadSubnet {
            node: node.name.clone(),
            subnet: node.subnet,
        });
    }
    Ok(())
}

/// What the kernel of `me` should hold to reach `peers`. A peer that shares a name, an
/// underlay address or a subnet with `me` or an earlier peer is refused: the caller
/// reports it rather than route one subnet two ways.
pub fn desired(config: &OverlayConfig, me: &Node, peers: &[Node]) -> Result<DesiredOverlay, OverlayError> {
    check_node(me)?;
    let mut seen: Vec<&Node> = vec![me];
    for peer in peers {
        check_node(peer)?;
        for other in &seen {
            if other.name == peer.name {
                return Err(OverlayError::DuplicateName(peer.name.clone()));
            }
            if other.underlay == peer.underlay {
                return Err(OverlayError::DuplicateUnderlay {
                    node: peer.name.clone(),
                    other: other.name.clone(),
                    underlay: peer.underlay,
                });
            }
            if other.subnet == peer.subnet {
                return Err(OverlayError::DuplicateSubnet {
                    node: peer.name.clone(),
                    other: other.name.clone(),
                    subnet: peer.subnet,
                });
            }
        }
        seen.push(peer);
    }
    let device = DeviceSpec {
        name: config.device.clone(),
        vni: config.vni,
        local: me.underlay,
        port: config.port,
        mac: me.mac(),
        mtu: config.mtu,
        address: Ipv4Net::from(me.tunnel_address()),
    };
    Ok(DesiredOverlay {
        device,
        neighbours: peers
            .iter()
            .map(|p| Neighbour {
                ip: p.tunnel_address(),
                mac: p.mac(),
            })
            .collect(),
        fdb: peers
            .iter()
            .map(|p| FdbEntry {
                mac: p.mac(),
                dst: p.underlay,
            })
            .collect(),
        routes: peers
            .iter()
            .map(|p| OverlayRoute {
                destination: p.subnet,
                gateway: p.tunnel_address(),
            })
            .collect(),
    })
}

/// Whether an existing device must be deleted and created again: the kernel cannot
/// change a VXLAN device's VNI, port or local address in place, and a device that learns
/// or has another MAC is not the one peers' FDB entries and neighbours point at.
fn must_recreate(want: &DeviceSpec, have: &ObservedDevice) -> bool {
    have.vni != Some(want.vni)
        || have.port != Some(want.port)
        || have.local != Some(want.local)
        || have.learning
        || have.mac != Some(want.mac)
}

/// One operation for each element of `these` that `those` lacks, in order.
fn only_in<'a, T: Ord + Copy>(
    these: &'a BTreeSet<T>,
    those: &'a BTreeSet<T>,
    op: fn(T) -> OverlayOp,
) -> impl Iterator<Item = OverlayOp> + 'a {
    these.difference(those).map(move |x| op(*x))
}

/// The operations from `observed` to `desired`. Stale objects go first, route first (no
/// moment with a route whose neighbour or FDB entry is gone), then the device, then new
/// objects, route last (no moment with a route packets would be lost on).
pub fn plan(desired: &DesiredOverlay, observed: &ObservedOverlay) -> Vec<OverlayOp> {
    let want = &desired.device;
    let mut ops = Vec::new();
    let empty = ObservedOverlay::default();
    // What is on a device that is about to go counts as gone with it.
    let on_device = match &observed.device {
        None => {
            ops.push(OverlayOp::CreateDevice(want.clone()));
            &empty
        }
        Some(have) if must_recreate(want, have) => {
            ops.push(OverlayOp::DeleteDevice(want.name.clone()));
            ops.push(OverlayOp::CreateDevice(want.clone()));
            &empty
        }
        Some(have) => {
            ops.extend(only_in(&observed.routes, &desired.routes, OverlayOp::DelRoute));
            ops.extend(only_in(&observed.fdb, &desired.fdb, OverlayOp::DelFdb));
            ops.extend(only_in(
                &observed.neighbours,
                &desired.neighbours,
                OverlayOp::DelNeighbour,
            ));
            if have.mtu != want.mtu {
                ops.push(OverlayOp::SetMtu(want.mtu));
            }
            if !have.up {
                ops.push(OverlayOp::SetUp);
            }
            if !have.addresses.contains(&want.address) {
                ops.push(OverlayOp::AddAddress(want.address));
            }
            observed
        }
    };
    ops.extend(only_in(
        &desired.neighbours,
        &on_device.neighbours,
        OverlayOp::AddNeighbour,
    ));
    ops.extend(only_in(&desired.fdb, &on_device.fdb, OverlayOp::AddFdb));
    ops.extend(only_in(&desired.routes, &on_device.routes, OverlayOp::AddRoute));
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, underlay: [u8; 4], third: u8) -> Node {
        Node {
            name: NodeName::new(name).unwrap(),
            underlay: Ipv4Addr::from(underlay),
            subnet: Ipv4Net::new(Ipv4Addr::new(10, 230, third, 0), 24).unwrap(),
        }
    }

    fn a() -> Node {
        node("a", [192, 168, 1, 1], 1)
    }
    fn b() -> Node {
        node("b", [192, 168, 1, 2], 2)
    }
    fn c() -> Node {
        node("c", [172, 16, 0, 3], 3)
    }

    /// The kernel after `ops` were applied to nothing: what observing it gives.
    fn as_observed(desired: &DesiredOverlay) -> ObservedOverlay {
        let d = &desired.device;
        ObservedOverlay {
            device: Some(ObservedDevice {
                vni: Some(d.vni),
                local: Some(d.local),
                port: Some(d.port),
                learning: false,
                mac: Some(d.mac),
                mtu: d.mtu,
                up: true,
                addresses: [d.address].into(),
            }),
            neighbours: desired.neighbours.clone(),
            fdb: desired.fdb.clone(),
            routes: desired.routes.clone(),
        }
    }

    #[test]
    fn an_empty_kernel_gets_the_device_created_and_nothing_else_without_peers() {
        let want = desired(&OverlayConfig::default(), &a(), &[]).unwrap();
        let ops = plan(&want, &ObservedOverlay::default());
        assert_eq!(ops, vec![OverlayOp::CreateDevice(want.device.clone())]);
        let d = &want.device;
        assert_eq!(d.name.as_str(), "vipd-vx");
        assert_eq!((d.vni.get(), d.port, d.mtu), (4242, 4799, 1450));
        assert_eq!(d.local, Ipv4Addr::new(192, 168, 1, 1));
        assert_eq!(d.address.to_string(), "10.230.1.0/32");
    }

    #[test]
    fn one_peer_gives_its_neighbour_fdb_entry_and_route_after_the_device_route_last() {
        let want = desired(&OverlayConfig::default(), &a(), &[b()]).unwrap();
        let ops = plan(&want, &ObservedOverlay::default());
        let mac_b = MacAddr([0x06, 0x76, 10, 230, 2, 0]);
        assert_eq!(
            ops,
            vec![
                OverlayOp::CreateDevice(want.device.clone()),
                OverlayOp::AddNeighbour(Neighbour {
                    ip: Ipv4Addr::new(10, 230, 2, 0),
                    mac: mac_b
                }),
                OverlayOp::AddFdb(FdbEntry {
                    mac: mac_b,
                    dst: Ipv4Addr::new(192, 168, 1, 2)
                }),
                OverlayOp::AddRoute(OverlayRoute {
                    destination: "10.230.2.0/24".parse().unwrap(),
                    gateway: Ipv4Addr::new(10, 230, 2, 0)
                }),
            ]
        );
    }

    #[test]
    fn a_peer_that_leaves_gets_three_deletes_route_first() {
        let before = desired(&OverlayConfig::default(), &a(), &[b(), c()]).unwrap();
        let after = desired(&OverlayConfig::default(), &a(), &[b()]).unwrap();
        let ops = plan(&after, &as_observed(&before));
        let mac_c = MacAddr::for_subnet("10.230.3.0/24".parse().unwrap());
        assert_eq!(
            ops,
            vec![
                OverlayOp::DelRoute(OverlayRoute {
                    destination: "10.230.3.0/24".parse().unwrap(),
                    gateway: Ipv4Addr::new(10, 230, 3, 0)
                }),
                OverlayOp::DelFdb(FdbEntry {
                    mac: mac_c,
                    dst: Ipv4Addr::new(172, 16, 0, 3)
                }),
                OverlayOp::DelNeighbour(Neighbour {
                    ip: Ipv4Addr::new(10, 230, 3, 0),
                    mac: mac_c
                }),
            ]
        );
    }

    #[test]
    fn a_kernel_that_matches_gets_no_operations() {
        let want = desired(&OverlayConfig::default(), &a(), &[b(), c()]).unwrap();
        assert_eq!(plan(&want, &as_observed(&want)), vec![]);
    }

    #[test]
    fn a_changed_vni_port_local_address_or_learning_recreates_the_device_and_readds_every_peer() {
        let config = OverlayConfig::default();
        let want = desired(&config, &a(), &[b()]).unwrap();
        let tweaks: [fn(&mut ObservedDevice); 5] = [
            |d| d.vni = Some(Vni::new(1).unwrap()),
            |d| d.port = Some(4789),
            |d| d.local = Some(Ipv4Addr::new(192, 168, 9, 9)),
            |d| d.learning = true,
            |d| d.vni = None,
        ];
        for tweak in tweaks {
            let mut observed = as_observed(&want);
            tweak(observed.device.as_mut().unwrap());
            let ops = plan(&want, &observed);
            assert_eq!(ops.len(), 5, "{ops:?}");
            assert_eq!(ops[0], OverlayOp::DeleteDevice(config.device.clone()));
            assert_eq!(ops[1], OverlayOp::CreateDevice(want.device.clone()));
            assert!(matches!(ops[4], OverlayOp::AddRoute(_)));
        }
    }

    #[test]
    fn a_device_down_with_another_mtu_and_no_address_is_repaired_in_place() {
        let want = desired(&OverlayConfig::default(), &a(), &[]).unwrap();
        let mut observed = as_observed(&want);
        let dev = observed.device.as_mut().unwrap();
        dev.mtu = 1500;
        dev.up = false;
        dev.addresses.clear();
        assert_eq!(
            plan(&want, &observed),
            vec![
                OverlayOp::SetMtu(1450),
                OverlayOp::SetUp,
                OverlayOp::AddAddress("10.230.1.0/32".parse().unwrap())
            ]
        );
    }

    #[test]
    fn a_peer_with_a_new_underlay_address_gets_its_fdb_entry_moved() {
        let before = desired(&OverlayConfig::default(), &a(), &[b()]).unwrap();
        let mut moved = b();
        moved.underlay = Ipv4Addr::new(192, 168, 1, 22);
        let after = desired(&OverlayConfig::default(), &a(), &[moved]).unwrap();
        let mac = b().mac();
        assert_eq!(
            plan(&after, &as_observed(&before)),
            vec![
                OverlayOp::DelFdb(FdbEntry {
                    mac,
                    dst: Ipv4Addr::new(192, 168, 1, 2)
                }),
                OverlayOp::AddFdb(FdbEntry {
                    mac,
                    dst: Ipv4Addr::new(192, 168, 1, 22)
                }),
            ]
        );
    }

    #[test]
    fn the_mac_depends_on_the_subnet_only_and_is_locally_administered_unicast() {
        let mac = a().mac();
        assert_eq!(mac.to_string(), "06:76:0a:e6:01:00");
        let mut elsewhere = a();
        elsewhere.underlay = Ipv4Addr::new(10, 0, 0, 1);
        elsewhere.name = NodeName::new("renamed").unwrap();
        assert_eq!(elsewhere.mac(), mac);
        assert_ne!(b().mac(), mac);
        let first = mac.octets()[0];
        assert_eq!(first & 0x02, 0x02, "locally administered");
        assert_eq!(first & 0x01, 0, "unicast");
        assert_eq!(MacAddr::from_slice(&mac.octets()), Some(mac));
        assert_eq!(MacAddr::from_slice(&[1, 2, 3]), None);
    }

    #[test]
    fn a_peer_sharing_an_underlay_address_or_subnet_or_name_is_refused() {
        let config = OverlayConfig::default();
        let mut same_underlay = b();
        same_underlay.underlay = a().underlay;
        assert!(matches!(
            desired(&config, &a(), &[same_underlay]),
            Err(OverlayError::DuplicateUnderlay { .. })
        ));
        let mut same_subnet = c();
        same_subnet.subnet = b().subnet;
        assert_eq!(
            desired(&config, &a(), &[b(), same_subnet]),
            Err(OverlayError::DuplicateSubnet {
                node: NodeName::new("c").unwrap(),
                other: NodeName::new("b").unwrap(),
                subnet: b().subnet
            })
        );
        let mut same_name = c();
        same_name.name = NodeName::new("b").unwrap();
        assert_eq!(
            desired(&config, &a(), &[b(), same_name]),
            Err(OverlayError::DuplicateName(NodeName::new("b").unwrap()))
        );
    }

    #[test]
    fn a_subnet_that_is_not_a_24_network_is_refused() {
        let config = OverlayConfig::default();
        for subnet in ["10.230.2.0/23", "10.230.2.5/24"] {
            let mut odd = b();
            odd.subnet = subnet.parse().unwrap();
            assert!(matches!(
                desired(&config, &a(), &[odd]),
                Err(OverlayError::BadSubnet { .. })
            ));
        }
    }

    #[test]
    fn the_config_refuses_bad_names_vnis_ports_and_mtus() {
        assert!(OverlayConfig::new("vipd-vx", 4242, 4799, 1450).is_ok());
        assert!(DeviceName::new("a-name-of-15chr").is_ok());
        for bad in ["", "a-name-of-16chrs", "a/b", "a:b", "a b", ".", ".."] {
            assert_eq!(DeviceName::new(bad), Err(OverlayError::BadDeviceName(bad.into())));
        }
        assert_eq!(Vni::new(0), Err(OverlayError::BadVni(0)));
        assert_eq!(Vni::new(1 << 24), Err(OverlayError::BadVni(1 << 24)));
        assert!(Vni::new((1 << 24) - 1).is_ok());
        assert_eq!(OverlayConfig::new("vx", 1, 0, 1450), Err(OverlayError::BadPort));
        assert_eq!(OverlayConfig::new("vx", 1, 1, 67), Err(OverlayError::BadMtu(67)));
    }
}
