//! The routing mesh's ingress namespace against the real kernel. Each test runs
//! `ingress::ensure` from inside a fresh namespace that plays the host, with an ingress
//! namespace of its own name, and checks the result from outside with `ip`, `sysctl` and
//! `ping`.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;

use vipd::core::model::Ipv4Net;
use vipd::core::model::{PortKey, Protocol as Proto};
use vipd::ingress::{self, Ingress, IngressConfig, IngressError};
use vipd::netns::{run_in, NetnsPath};

use crate::common::*;

const HOST_IF: &str = ingress::DEFAULT_HOST_IFACE;
const PEER_IF: &str = ingress::DEFAULT_INGRESS_IFACE;

/// A throwaway host namespace and the configuration of an ingress namespace whose name
/// no other test uses. Dropping it deletes both namespaces.
struct Mesh {
    host: Netns,
    cfg: IngressConfig,
}

impl Mesh {
    fn new() -> Self {
        require_root();
        let host = Netns::new("vih");
        let subnet = Ipv4Net::new(Ipv4Addr::new(10, 252, 7, 4), 30).unwrap();
        let cfg = IngressConfig::new(unique("ving"), subnet);
        Mesh { host, cfg }
    }

    fn name(&self) -> &str {
        &self.cfg.netns_name
    }

    fn host_ns(&self) -> NetnsPath {
        NetnsPath::from_arg(&self.host.name)
    }

    fn try_ensure(&self) -> Result<(Ingress, Vec<String>), IngressError> {
        run_in(&self.host_ns(), || ingress::ensure(&self.cfg)).expect("enter the host namespace")
    }

    fn ensure(&self) -> (Ingress, Vec<String>) {
        self.try_ensure().unwrap_or_else(|e| panic!("ensure failed: {e}"))
    }

    fn remove(&self) {
        run_in(&self.host_ns(), || ingress::remove(&self.cfg))
            .expect("enter the host namespace")
            .unwrap_or_else(|e| panic!("remove failed: {e}"));
    }

    /// A command inside the ingress namespace.
    fn inside(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", self.name()];
        full.extend_from_slice(args);
        run(&full)
    }

    /// The ifindex of the host end, from `ip -o link`.
    fn host_ifindex(&self) -> String {
        let line = self.host.exec(&["ip", "-o", "link", "show", HOST_IF]);
        line.split(':').next().unwrap().trim().to_owned()
    }

    /// Everything `ensure` promises, checked with the real tools.
    fn assert_wired(&self, ing: &Ingress) {
        let (h, i) = (ing.host_addr.to_string(), ing.ingress_addr.to_string());
        assert_eq!(ing.netns.to_string(), format!("/run/netns/{}", self.name()));
        assert!(ing.netns.path().exists(), "{} is missing", ing.netns);

        // Inside: the peer with its address, up; lo up; the default route via the host.
        let addr = self.inside(&["ip", "-o", "-4", "addr", "show", "dev", PEER_IF]);
        assert!(addr.contains(&format!("inet {i}/30 ")), "{addr}");
        assert_eq!(addr.lines().count(), 1, "one IPv4 address: {addr}");
        assert_up(&self.inside(&["ip", "-o", "link", "show", PEER_IF]));
        assert_up(&self.inside(&["ip", "-o", "link", "show", "lo"]));
        let route = self.inside(&["ip", "route", "show", "default"]);
        assert!(
            route.starts_with(&format!("default via {h} dev {PEER_IF}")),
            "default route: {route:?}"
        );
        assert_eq!(route.lines().count(), 1, "{route}");

        // The host end: a veth whose peer is in the ingress namespace, with its address.
        let link = self.host.exec(&["ip", "-d", "-o", "link", "show", HOST_IF]);
        assert!(link.contains(" veth "), "{link}");
        assert!(
            link.contains(&format!("link-netns {} ", self.name())),
            "the peer is not in {}: {link}",
            self.name()
        );
        assert_up(&link);
        let addr = self
            .host
            .exec(&["ip", "-o", "-4", "addr", "show", "dev", HOST_IF]);
        assert!(addr.contains(&format!("inet {h}/30 ")), "{addr}");

        // Sysctls: forwarding inside, route_localnet on the host end.
        assert_eq!(self.inside(&["sysctl", "-n", "net.ipv4.ip_forward"]).trim(), "1");
        let localnet = format!("net.ipv4.conf.{HOST_IF}.route_localnet");
        assert_eq!(self.host.exec(&["sysctl", "-n", &localnet]).trim(), "1");
        let forwarding = self.host.exec(&["sysctl", "-n", "net.ipv4.ip_forward"]);
        assert_eq!(ing.host_forwarding, forwarding.trim() == "1");

        // Traffic both ways.
        self.host.exec(&["ping", "-c1", "-W2", &i]);
        self.inside(&["ping", "-c1", "-W2", &h]);
    }

    /// A second `ensure` right after must find nothing to do and report the same thing.
    fn assert_settled(&self, ing: &Ingress) {
        let (again, changes) = self.ensure();
        assert_eq!(changes, Vec::<String>::new(), "a second ensure changed things");
        assert_eq!(&again, ing);
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = output(&["ip", "netns", "del", &self.cfg.netns_name]);
    }
}

fn assert_up(link_line: &str) {
    let flags = link_line
        .split_once('<')
        .and_then(|(_, r)| r.split_once('>'))
        .map(|(f, _)| f)
        .unwrap_or_else(|| panic!("no flags in {link_line:?}"));
    assert!(flags.split(',').any(|f| f == "UP"), "not up: {link_line}");
}

fn mentions(changes: &[String], what: &str) -> bool {
    changes.iter().any(|c| c.contains(what))
}

#[test]
fn ensure_builds_everything_and_a_second_run_changes_nothing() {
    let mesh = Mesh::new();
    let (ing, changes) = mesh.ensure();
    assert_eq!(ing.host_addr, Ipv4Addr::new(10, 252, 7, 5));
    assert_eq!(ing.ingress_addr, Ipv4Addr::new(10, 252, 7, 6));
    assert_eq!(ing.prefix, 30);
    assert_eq!(
        (ing.host_iface.as_str(), ing.ingress_iface.as_str()),
        (HOST_IF, PEER_IF)
    );
    // A fresh namespace does not forward; ensure reports it and leaves it alone.
    assert!(!ing.host_forwarding);
    for what in [
        "created network namespace",
        "created veth pair",
        "added 10.252.7.5/30",
        "added 10.252.7.6/30",
        "set lo up",
        "added default route via 10.252.7.5",
        "net.ipv4.ip_forward=1",
        "route_localnet=1",
    ] {
        assert!(mentions(&changes, what), "no {what:?} in {changes:#?}");
    }
    mesh.assert_wired(&ing);
    assert_eq!(
        mesh.host.exec(&["sysctl", "-n", "net.ipv4.ip_forward"]).trim(),
        "0",
        "the host's forwarding must not be changed"
    );

    // Past the subnet: the ingress namespace reaches another host address through its
    // default route.
    mesh.host
        .exec(&["ip", "addr", "add", "10.252.99.1/32", "dev", "lo"]);
    mesh.inside(&["ping", "-c1", "-W2", "10.252.99.1"]);

    mesh.assert_settled(&ing);

    // The host's forwarding is reported as it is.
    mesh.host.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let (ing, changes) = mesh.ensure();
    assert!(ing.host_forwarding);
    assert!(changes.is_empty(), "{changes:#?}");
}

#[test]
fn ensure_recreates_a_veth_deleted_by_hand() {
    let mesh = Mesh::new();
    mesh.ensure();
    mesh.host.exec(&["ip", "link", "del", HOST_IF]);
    let (ing, changes) = mesh.ensure();
    assert!(mentions(&changes, "created veth pair"), "{changes:#?}");
    assert!(!mentions(&changes, "network namespace"), "{changes:#?}");
    // The new host end starts with the kernel's default.
    assert!(mentions(&changes, "route_localnet=1"), "{changes:#?}");
    mesh.assert_wired(&ing);
    mesh.assert_settled(&ing);
}

#[test]
fn ensure_repairs_drift_and_keeps_what_is_right() {
    let mesh = Mesh::new();
    let (ing, _) = mesh.ensure();
    let index = mesh.host_ifindex();

    // The peer down (its default route goes with it), its address gone, a stray address
    // on the host end, both sysctls back to 0.
    mesh.inside(&["ip", "link", "set", PEER_IF, "down"]);
    mesh.inside(&["ip", "addr", "flush", "dev", PEER_IF]);
    mesh.host
        .exec(&["ip", "addr", "add", "10.252.8.1/24", "dev", HOST_IF]);
    mesh.inside(&["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
    let localnet = format!("net.ipv4.conf.{HOST_IF}.route_localnet");
    mesh.host.exec(&["sysctl", "-qw", &format!("{localnet}=0")]);

    let (again, changes) = mesh.ensure();
    assert_eq!(again, ing);
    for what in [
        &format!("set {PEER_IF} up"),
        "added 10.252.7.6/30",
        "removed stray address 10.252.8.1/24",
        "added default route",
        "net.ipv4.ip_forward=1",
        "route_localnet=1",
    ] {
        assert!(mentions(&changes, what), "no {what:?} in {changes:#?}");
    }
    for what in ["veth", "network namespace", "added 10.252.7.5", "lo up"] {
        assert!(!mentions(&changes, what), "{what:?} in {changes:#?}");
    }
    assert_eq!(mesh.host_ifindex(), index, "the veth was recreated");
    mesh.assert_wired(&ing);
    mesh.assert_settled(&ing);
}

#[test]
fn ensure_recreates_a_deleted_namespace_and_its_pair() {
    let mesh = Mesh::new();
    mesh.ensure();
    run(&["ip", "netns", "del", mesh.name()]);
    let (ing, changes) = mesh.ensure();
    assert!(mentions(&changes, "created network namespace"), "{changes:#?}");
    assert!(mentions(&changes, "created veth pair"), "{changes:#?}");
    mesh.assert_wired(&ing);
    mesh.assert_settled(&ing);
}

#[test]
fn a_leftover_empty_file_becomes_the_namespace() {
    let mesh = Mesh::new();
    let path = format!("/run/netns/{}", mesh.name());
    std::fs::create_dir_all("/run/netns").unwrap();
    std::fs::write(&path, b"").unwrap();
    let (ing, changes) = mesh.ensure();
    assert!(mentions(&changes, "reusing a file"), "{changes:#?}");
    mesh.assert_wired(&ing);
    mesh.assert_settled(&ing);
}

#[test]
fn a_veth_whose_peer_is_elsewhere_is_replaced() {
    let mesh = Mesh::new();
    // Both ends in the host namespace, as a crash between creating and moving would leave.
    mesh.host.exec(&[
        "ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", PEER_IF,
    ]);
    let (ing, changes) = mesh.ensure();
    assert!(
        mentions(&changes, &format!("deleted veth {HOST_IF}")),
        "{changes:#?}"
    );
    assert!(mentions(&changes, "created veth pair"), "{changes:#?}");
    let host_links = mesh.host.exec(&["ip", "-o", "link"]);
    assert!(!host_links.contains(PEER_IF), "{host_links}");
    mesh.assert_wired(&ing);
    mesh.assert_settled(&ing);
}

#[test]
fn a_host_interface_that_is_not_a_veth_is_left_alone() {
    let mesh = Mesh::new();
    // A bridge: Docker needs them, so every kernel vipd runs on has them.
    mesh.host.exec(&["ip", "link", "add", HOST_IF, "type", "bridge"]);
    match mesh.try_ensure() {
        Err(IngressError::ForeignInterface { iface, kind, .. }) => {
            assert_eq!(iface, HOST_IF);
            assert_eq!(kind, "bridge");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let link = mesh.host.exec(&["ip", "-d", "-o", "link", "show", HOST_IF]);
    assert!(link.contains(" bridge "), "{link}");
}

#[test]
fn a_name_bound_to_the_host_namespace_is_refused() {
    let mesh = Mesh::new();
    let path = format!("/run/netns/{}", mesh.name());
    std::fs::write(&path, b"").unwrap();
    run(&["mount", "--bind", &mesh.host.path(), &path]);
    match mesh.try_ensure() {
        Err(IngressError::NetnsIsHost { path: p }) => assert_eq!(p.to_string(), path),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let links = mesh.host.exec(&["ip", "-o", "link"]);
    assert!(!links.contains(HOST_IF), "{links}");
}

#[test]
fn remove_leaves_no_trace() {
    let mesh = Mesh::new();
    mesh.ensure();
    mesh.remove();
    let path = format!("/run/netns/{}", mesh.name());
    assert!(!Path::new(&path).exists(), "{path} is still there");
    assert!(
        !run(&["ip", "netns", "list"])
            .lines()
            .any(|l| l.split_whitespace().next() == Some(mesh.name())),
        "ip netns list still shows {}",
        mesh.name()
    );
    assert!(
        !mesh
            .host
            .exec_output(&["ip", "link", "show", HOST_IF])
            .status
            .success(),
        "{HOST_IF} is still in the host namespace"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&path), "{path} is still mounted:\n{mounts}");
    // What is already gone is fine.
    mesh.remove();
}

#[test]
fn bound_ports_sees_listeners_and_bound_udp_of_its_own_namespace_only() {
    require_root();
    let ns = Netns::new("vbp");
    let path = NetnsPath::from_arg(&ns.name);
    let (ports, tcp6, tcp4, udp, client, closed) = run_in(&path, || {
        let tcp6 = TcpListener::bind("[::]:0").expect("bind tcp6");
        let tcp4 = TcpListener::bind("127.0.0.1:0").expect("bind tcp4");
        let udp = UdpSocket::bind("0.0.0.0:0").expect("bind udp");
        let client = TcpStream::connect(tcp4.local_addr().unwrap()).expect("connect");
        let closed = TcpListener::bind("127.0.0.1:0").expect("bind");
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        let ports = ingress::bound_ports().expect("bound_ports");
        (
            ports,
            tcp6.local_addr().unwrap().port(),
            tcp4.local_addr().unwrap().port(),
            udp.local_addr().unwrap().port(),
            client.local_addr().unwrap().port(),
            closed_port,
        )
    })
    .expect("enter the namespace");
    for held in [
        PortKey::new(Proto::Tcp, tcp6),
        PortKey::new(Proto::Tcp, tcp4),
        PortKey::new(Proto::Udp, udp),
    ] {
        assert!(ports.contains(&held), "{held:?} missing from {ports:?}");
    }
    // The client end of a connection is ESTABLISHED, not LISTEN.
    assert!(!ports.contains(&PortKey::new(Proto::Tcp, client)), "{ports:?}");
    assert!(!ports.contains(&PortKey::new(Proto::Tcp, closed)), "{ports:?}");
    assert_eq!(ports.len(), 3, "{ports:?}");

    // Another namespace does not see them.
    let other = Netns::new("vbp");
    let there = run_in(&NetnsPath::from_arg(&other.name), ingress::bound_ports)
        .expect("enter the namespace")
        .expect("bound_ports");
    assert_eq!(there, BTreeSet::new());
}
