//! The VXLAN overlay between hosts against the real kernel. Three "hosts" are network
//! namespaces: A and B share one L2 segment (a bridge in the router namespace), C sits
//! behind that router on a subnet of its own. Each host has a bridge with its /24 of
//! 10.230.0.0/16 and a "container" namespace on it at .10. `overlay::sync` runs inside
//! each host namespace with the other two as peers; real pings between the containers
//! show that the overlay carries traffic, and `ip`/`bridge` show what is on the device.

use std::net::Ipv4Addr;

use vipd::core::model::NodeName;
use vipd::core::overlay::{DeviceName, Node, OverlayConfig, OverlayOp};
use vipd::netns::{run_in, NetnsPath};
use vipd::overlay::{self, OverlayKernelError};

use crate::common::*;

const UPLINK: &str = "up0";
const BRIDGE: &str = "vbr0";

/// One host: its namespace, its node in the cluster and its container.
struct Host {
    ns: Netns,
    node: Node,
    container: Netns,
}

impl Host {
    fn container_ip(&self) -> String {
        let [a, b, c, _] = self.node.subnet.network().octets();
        format!("{a}.{b}.{c}.10")
    }

    /// A command in the host namespace.
    fn exec(&self, args: &[&str]) -> String {
        self.ns.exec(args)
    }
}

/// The three hosts and the router; every namespace is deleted when this is dropped,
/// whether the test passed or not (the veths go with them).
struct World {
    hosts: Vec<Host>,
    // Kept for its Drop.
    _router: Netns,
    config: OverlayConfig,
}

impl World {
    const A: usize = 0;
    const B: usize = 1;
    const C: usize = 2;

    fn new() -> Self {
        require_root();
        let router = Netns::new("vovr");
        router.exec(&["ip", "link", "add", "seg", "type", "bridge"]);
        router.exec(&["ip", "addr", "add", "192.168.77.254/24", "dev", "seg"]);
        router.exec(&["ip", "link", "set", "seg", "up"]);
        router.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);

        let specs: [(&str, [u8; 4], u8); 3] = [
            ("a", [192, 168, 77, 1], 1),
            ("b", [192, 168, 77, 2], 2),
            ("c", [172, 16, 77, 3], 3),
        ];
        let mut hosts = Vec::new();
        for (name, underlay, third) in specs {
            let ns = Netns::new(&format!("vov{name}"));
            let underlay = Ipv4Addr::from(underlay);
            let addr = format!("{underlay}/24");
            let router_end = format!("r{name}");
            veth(&ns, UPLINK, Some(&addr), &router, &router_end);
            if name == "c" {
                // C's own underlay subnet: reached from A and B only through the router.
                router.exec(&["ip", "addr", "add", "172.16.77.1/24", "dev", &router_end]);
                ns.exec(&["ip", "route", "add", "default", "via", "172.16.77.1"]);
            } else {
                router.exec(&["ip", "link", "set", &router_end, "master", "seg"]);
                ns.exec(&["ip", "route", "add", "default", "via", "192.168.77.254"]);
            }

            let gateway = format!("10.230.{third}.1");
            ns.exec(&["ip", "link", "add", BRIDGE, "type", "bridge"]);
            ns.exec(&["ip", "addr", "add", &format!("{gateway}/24"), "dev", BRIDGE]);
            ns.exec(&["ip", "link", "set", BRIDGE, "up"]);
            ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);

            let container = Netns::new(&format!("vovk{name}"));
            let container_addr = format!("10.230.{third}.10/24");
            veth(&container, "eth0", Some(&container_addr), &ns, "vk0");
            ns.exec(&["ip", "link", "set", "vk0", "master", BRIDGE]);
            container.exec(&["ip", "route", "add", "default", "via", &gateway]);

            let node = Node {
                name: NodeName::new(name).unwrap(),
                underlay,
                subnet: format!("10.230.{third}.0/24").parse().unwrap(),
            };
            hosts.push(Host { ns, node, container });
        }
        World {
            hosts,
            _router: router,
            config: OverlayConfig::default(),
        }
    }

    fn device(&self) -> &str {
        self.config.device.as_str()
    }

    fn netns(&self, host: usize) -> NetnsPath {
        NetnsPath::from_arg(&self.hosts[host].ns.name)
    }

    fn try_sync(&self, host: usize, peers: &[usize]) -> Result<Vec<OverlayOp>, OverlayKernelError> {
        let me = &self.hosts[host].node;
        let peers: Vec<Node> = peers.iter().map(|&p| self.hosts[p].node.clone()).collect();
        run_in(&self.netns(host), || overlay::sync(&self.config, me, &peers))
            .expect("enter the host namespace")
    }

    fn sync(&self, host: usize, peers: &[usize]) -> Vec<OverlayOp> {
        self.try_sync(host, peers)
            .unwrap_or_else(|e| panic!("sync of {} failed: {e}", self.hosts[host].node.name))
    }

    /// Every host with the other two as peers.
    fn sync_all(&self) {
        self.sync(Self::A, &[Self::B, Self::C]);
        self.sync(Self::B, &[Self::A, Self::C]);
        self.sync(Self::C, &[Self::A, Self::B]);
    }

    fn remove(&self, host: usize) -> bool {
        let device = self.config.device.clone();
        run_in(&self.netns(host), || overlay::remove(&device))
            .expect("enter the host namespace")
            .unwrap_or_else(|e| panic!("remove failed: {e}"))
    }

    /// Whether `from`'s container gets an answer from `to`'s. A few tries: the first
    /// packets wait for the containers' ARP.
    fn pings(&self, from: usize, to: usize) -> bool {
        let target = self.hosts[to].container_ip();
        (0..3).any(|_| {
            self.hosts[from]
                .container
                .exec_output(&["ping", "-c1", "-W2", &target])
                .status
                .success()
        })
    }

    fn assert_pings(&self, from: usize, to: usize) {
        assert!(
            self.pings(from, to),
            "container {} cannot reach container {} ({})",
            self.hosts[from].node.name,
            self.hosts[to].node.name,
            self.hosts[to].container_ip()
        );
    }

    /// `ip neigh`, `bridge fdb` and `ip route` of the device in `host`.
    fn on_device(&self, host: usize) -> (String, String, String) {
        let h = &self.hosts[host];
        let dev = self.device();
        (
            h.exec(&["ip", "neigh", "show", "dev", dev]),
            h.exec(&["bridge", "fdb", "show", "dev", dev]),
            h.exec(&["ip", "route", "show", "dev", dev]),
        )
    }
}

#[test]
fn containers_on_three_hosts_reach_each_other_over_the_overlay_and_a_second_sync_changes_nothing() {
    let w = World::new();
    // Before the overlay, nothing crosses hosts.
    assert!(!w.pings(World::A, World::B), "A reached B without an overlay");
    w.sync_all();

    // The device is what the plan says: VNI, local address, port, no learning, MAC, MTU.
    let dev = w.hosts[World::A].exec(&["ip", "-d", "link", "show", w.device()]);
    for want in [
        "vxlan id 4242 ",
        "local 192.168.77.1 ",
        "dstport 4799 ",
        "nolearning",
        "link/ether 06:76:0a:e6:01:00 ",
        "mtu 1450 ",
    ] {
        assert!(dev.contains(want), "no {want:?} in:\n{dev}");
    }
    let addr = w.hosts[World::A].exec(&["ip", "-o", "-4", "addr", "show", "dev", w.device()]);
    assert!(addr.contains("inet 10.230.1.0/32 "), "{addr}");

    // Per peer: a permanent neighbour, an FDB entry to its underlay, an on-link route.
    let (neigh, fdb, routes) = w.on_device(World::A);
    assert!(
        neigh.contains("10.230.3.0 lladdr 06:76:0a:e6:03:00 PERMANENT"),
        "{neigh}"
    );
    assert!(
        fdb.contains("06:76:0a:e6:03:00 dst 172.16.77.3 self permanent"),
        "{fdb}"
    );
    assert!(
        routes.contains("10.230.3.0/24 via 10.230.3.0 proto static onlink"),
        "{routes}"
    );
    assert_eq!(routes.lines().count(), 2, "{routes}");

    for (from, to) in [
        (World::A, World::B),
        (World::B, World::A),
        (World::A, World::C),
        (World::C, World::A),
        (World::B, World::C),
    ] {
        w.assert_pings(from, to);
    }

    assert_eq!(w.sync(World::A, &[World::B, World::C]), vec![]);
    assert_eq!(w.sync(World::C, &[World::A, World::B]), vec![]);
}

#[test]
fn a_peer_that_leaves_loses_its_neighbour_fdb_entry_and_route_while_foreign_ones_survive() {
    let w = World::new();
    w.sync_all();
    w.assert_pings(World::A, World::C);
    let a = &w.hosts[World::A];
    // Someone else's route and neighbour on the uplink, and a route on the bridge.
    a.exec(&["ip", "route", "add", "10.99.0.0/24", "via", "192.168.77.254"]);
    a.exec(&[
        "ip",
        "neigh",
        "add",
        "192.168.77.50",
        "lladdr",
        "02:00:00:00:00:50",
        "dev",
        UPLINK,
        "nud",
        "permanent",
    ]);
    a.exec(&[
        "ip",
        "route",
        "add",
        "10.98.0.0/24",
        "via",
        "10.230.1.20",
        "dev",
        BRIDGE,
    ]);

    let ops = w.sync(World::A, &[World::B]);
    assert_eq!(ops.len(), 3, "{ops:?}");
    assert!(matches!(ops[0], OverlayOp::DelRoute(_)), "route first: {ops:?}");

    let (neigh, fdb, routes) = w.on_device(World::A);
    assert!(!neigh.contains("10.230.3.0"), "{neigh}");
    assert!(
        neigh.contains("10.230.2.0 lladdr 06:76:0a:e6:02:00 PERMANENT"),
        "{neigh}"
    );
    assert!(!fdb.contains("06:76:0a:e6:03:00"), "{fdb}");
    assert!(fdb.contains("06:76:0a:e6:02:00 dst 192.168.77.2"), "{fdb}");
    assert!(!routes.contains("10.230.3.0/24"), "{routes}");
    assert!(routes.contains("10.230.2.0/24"), "{routes}");

    let all_routes = a.exec(&["ip", "route", "show"]);
    assert!(
        all_routes.contains("10.99.0.0/24 via 192.168.77.254"),
        "{all_routes}"
    );
    assert!(
        all_routes.contains("10.98.0.0/24 via 10.230.1.20"),
        "{all_routes}"
    );
    let uplink_neigh = a.exec(&["ip", "neigh", "show", "dev", UPLINK]);
    assert!(
        uplink_neigh.contains("192.168.77.50 lladdr 02:00:00:00:00:50 PERMANENT"),
        "{uplink_neigh}"
    );

    w.assert_pings(World::A, World::B);
    assert!(!w.pings(World::A, World::C), "A still reaches C after C left");
}

#[test]
fn a_device_deleted_by_hand_is_created_again_and_traffic_flows_again() {
    let w = World::new();
    w.sync_all();
    w.hosts[World::A].exec(&["ip", "link", "del", w.device()]);
    assert!(!w.pings(World::A, World::B), "A reached B without its device");

    let ops = w.sync(World::A, &[World::B, World::C]);
    assert!(matches!(ops[0], OverlayOp::CreateDevice(_)), "{ops:?}");
    assert_eq!(
        ops.len(),
        1 + 2 * 3,
        "the device, then three objects per peer: {ops:?}"
    );
    w.assert_pings(World::A, World::B);
    w.assert_pings(World::C, World::A);
    assert_eq!(w.sync(World::A, &[World::B, World::C]), vec![]);
}

#[test]
fn a_device_with_another_vni_is_recreated_and_one_set_down_is_set_up_again() {
    let mut w = World::new();
    w.sync_all();
    w.hosts[World::A].exec(&["ip", "link", "set", w.device(), "down"]);
    let ops = w.sync(World::A, &[World::B, World::C]);
    // Down, the kernel dropped the device's routes: they come back with it.
    assert_eq!(ops[0], OverlayOp::SetUp, "{ops:?}");
    let routes = ops.iter().filter(|o| matches!(o, OverlayOp::AddRoute(_))).count();
    assert_eq!(routes, 2, "{ops:?}");
    w.assert_pings(World::A, World::C);

    w.config.vni = vipd::core::overlay::Vni::new(4343).unwrap();
    let ops = w.sync(World::A, &[World::B, World::C]);
    assert!(matches!(ops[0], OverlayOp::DeleteDevice(_)), "{ops:?}");
    let dev = w.hosts[World::A].exec(&["ip", "-d", "link", "show", w.device()]);
    assert!(dev.contains("vxlan id 4343 "), "{dev}");
    // B and C still use the old VNI: nothing gets through until they move too.
    assert!(!w.pings(World::A, World::B), "A reached B across VNIs");
    w.sync(World::B, &[World::A, World::C]);
    w.assert_pings(World::A, World::B);
}

#[test]
fn remove_leaves_no_device_and_a_foreign_link_of_that_name_is_left_alone() {
    let w = World::new();
    w.sync_all();
    assert!(w.remove(World::A));
    let a = &w.hosts[World::A];
    let shown = a.ns.exec_output(&["ip", "link", "show", w.device()]);
    assert!(!shown.status.success(), "the device is still there");
    let routes = a.exec(&["ip", "route", "show"]);
    assert!(!routes.contains("10.230.2.0/24"), "{routes}");
    assert!(!w.remove(World::A), "a second remove finds nothing");

    a.exec(&["ip", "link", "add", w.device(), "type", "bridge"]);
    let err = w.try_sync(World::A, &[World::B]).unwrap_err();
    assert!(matches!(err, OverlayKernelError::ForeignDevice { .. }), "{err}");
    let device = DeviceName::new(w.device()).unwrap();
    let removed = run_in(&w.netns(World::A), || overlay::remove(&device)).expect("enter the host namespace");
    assert!(
        matches!(removed, Err(OverlayKernelError::ForeignDevice { .. })),
        "{removed:?}"
    );
    let foreign = a.exec(&["ip", "-d", "link", "show", w.device()]);
    assert!(foreign.contains("bridge"), "{foreign}");
}
