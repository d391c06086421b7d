//! Cluster mode's host pieces against the real kernel and a real dockerd: the overlay's
//! chains with real iptables in a fresh namespace (real UDP from a peer's and a
//! stranger's namespace over veth, judged by the rules' counters), the link-local DNS
//! address on a bridge, the cluster network created, adopted, and a foreign one refused.

use std::time::Duration;

use vipd::cluster::dns_address::{self, DEFAULT_DNS_ADDRESS};
use vipd::cluster::network::{ensure, NetworkError, NetworkSpec, Outcome};
use vipd::cluster::rules::host_rules;
use vipd::cluster::subnet::NodeSubnet;
use vipd::core::firewall::parse_save;
use vipd::core::model::NodeName;
use vipd::core::overlay::{Node, OverlayConfig};
use vipd::docker::{DockerEngine, Engine};
use vipd::firewall::{Firewall, Iptables};
use vipd::netns::{run_in, NetnsPath};
use vipd::reconcile::host_firewall;

use crate::common::docker::dockerd;
use crate::common::*;

fn node(name: &str, underlay: &str, subnet: &str) -> Node {
    Node {
        name: NodeName::new(name).unwrap(),
        underlay: underlay.parse().unwrap(),
        subnet: subnet.parse().unwrap(),
    }
}

/// Program the overlay's host rules in `ns`; the number of operations applied.
fn program(ns: &Netns, rules: &[vipd::core::rules::Intent]) -> usize {
    run_in(&NetnsPath::from_arg(&ns.name), || {
        host_firewall(&mut Iptables::default(), rules)
    })
    .expect("enter namespace")
    .expect("program")
    .len()
}

/// The packet counters of the VXLAN chain's rules, in order.
fn vxlan_counters(ns: &Netns) -> Vec<u64> {
    ns.exec(&["iptables", "-L", "VIPD-VXLAN-IN", "-v", "-x", "-n"])
        .lines()
        .skip(2)
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn overlay_rules_program_once_keep_foreign_rules_and_admit_vxlan_from_peers_only() {
    require_root();
    let host = Netns::new("cnh");
    let peer = Netns::new("cnp");
    let stranger = Netns::new("cns");
    veth(&host, "up0", Some("192.0.2.1/24"), &peer, "eth0");
    peer.exec(&["ip", "addr", "add", "192.0.2.2/24", "dev", "eth0"]);
    veth(&host, "up1", Some("198.51.100.1/24"), &stranger, "eth0");
    stranger.exec(&["ip", "addr", "add", "198.51.100.3/24", "dev", "eth0"]);
    // Docker's chain with an operator's rule in it, as a Docker host has it.
    host.exec(&["iptables", "-N", "DOCKER-USER"]);
    host.exec(&[
        "iptables",
        "-A",
        "DOCKER-USER",
        "-s",
        "203.0.113.9/32",
        "-j",
        "DROP",
    ]);
    host.exec(&["iptables", "-A", "FORWARD", "-j", "DOCKER-USER"]);

    let config = OverlayConfig::default();
    let me = node("node1", "192.0.2.1", "10.230.1.0/24");
    let peers = [node("node2", "192.0.2.2", "10.230.2.0/24")];
    let rules = host_rules(&config, "10.230.0.0/16".parse().unwrap(), "vipd0", &me, &peers);
    assert!(program(&host, &rules) > 0);
    assert_eq!(program(&host, &rules), 0, "a second run changes nothing");
    let filter = host.iptables_save("filter");
    assert!(
        filter.contains("-A DOCKER-USER -s 203.0.113.9/32 -j DROP"),
        "{filter}"
    );
    assert!(filter.contains("-A DOCKER-USER -j VIPD-OVERLAY"), "{filter}");
    assert_eq!(filter.matches("-A FORWARD -j DOCKER-USER").count(), 1, "{filter}");
    let nat = host.iptables_save("nat");
    assert!(nat.contains("-A POSTROUTING -j VIPD-OVERLAY-NAT"), "{nat}");

    // Docker re-inserts its rules at the top: the check sees it, a run puts vipd first.
    host.exec(&["iptables", "-I", "INPUT", "1", "-p", "udp", "-j", "ACCEPT"]);
    let seen = parse_save(
        &run_in(&NetnsPath::from_arg(&host.name), || Iptables::default().save())
            .unwrap()
            .unwrap(),
    );
    assert_eq!(seen.needs_reassert().len(), 1, "{:?}", seen.needs_reassert());
    assert_eq!(program(&host, &rules), 2);
    let input = host.exec(&["iptables", "-S", "INPUT"]);
    assert!(
        input.contains("-P INPUT ACCEPT\n-A INPUT -j VIPD-VXLAN-IN\n"),
        "{input}"
    );

    let port = config.port.to_string();
    let send = |from: &Netns| {
        from.exec(&[
            "bash",
            "-c",
            &format!("echo vxlan > /dev/udp/{}/{port}", "192.0.2.1"),
        ]);
    };
    // The stranger reaches the host through its other address.
    let send_stranger = || {
        stranger.exec(&[
            "bash",
            "-c",
            &format!("echo vxlan > /dev/udp/198.51.100.1/{port}"),
        ]);
    };
    assert_eq!(vxlan_counters(&host), [0, 0]);
    send(&peer);
    send(&peer);
    send_stranger();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        vxlan_counters(&host),
        [2, 1],
        "peer accepted twice, stranger dropped once"
    );

    // Without peers' rules (single host again) vipd's chains go, the operator's stay.
    assert!(program(&host, &[]) > 0);
    let filter = host.iptables_save("filter");
    assert!(!filter.contains("VIPD-"), "{filter}");
    assert!(
        filter.contains("-A DOCKER-USER -s 203.0.113.9/32 -j DROP"),
        "{filter}"
    );
}

#[test]
fn the_dns_address_is_added_once_and_removed() {
    require_root();
    let ns = Netns::new("cnd");
    ns.exec(&["ip", "link", "add", "vipd0", "type", "bridge"]);
    let path = NetnsPath::from_arg(&ns.name);
    let call = |f: fn(&str, std::net::Ipv4Addr) -> Result<bool, dns_address::DnsAddressError>| {
        run_in(&path, || f("vipd0", DEFAULT_DNS_ADDRESS))
            .unwrap()
            .unwrap()
    };
    assert!(!call(dns_address::present));
    assert!(call(dns_address::ensure), "added");
    assert!(!call(dns_address::ensure), "second call: no change");
    let shown = ns.exec(&["ip", "-4", "addr", "show", "dev", "vipd0"]);
    assert_eq!(shown.matches("169.254.53.53/32").count(), 1, "{shown}");
    assert!(call(dns_address::remove), "removed");
    assert!(!call(dns_address::remove));
    assert!(!ns
        .exec(&["ip", "-4", "addr", "show", "dev", "vipd0"])
        .contains("169.254.53.53"));
    // No bridge: nothing to remove, and a clear error to add.
    let err = run_in(&path, || dns_address::ensure("nobridge0", DEFAULT_DNS_ADDRESS))
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("nobridge0 does not exist"), "{err}");
}

#[test]
fn the_cluster_network_is_created_adopted_and_a_foreign_one_refused() {
    require_root();
    let d = dockerd();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let engine = rt
        .block_on(DockerEngine::connect_to(&d.host, Duration::from_secs(30)))
        .unwrap();
    let name = unique("vipdc");
    let bridge = unique("vc");
    let spec = NetworkSpec {
        name: name.clone(),
        subnet: NodeSubnet::new("10.231.77.0/24".parse().unwrap()).unwrap(),
        bridge: bridge.clone(),
        mtu: 1450,
        vxlan: "vipd-vx".into(),
    };
    let created = rt.block_on(ensure(&engine, &spec)).unwrap();
    let Outcome::Created(id) = created else {
        panic!("{created:?}")
    };
    let inspected = d.docker(&["network", "inspect", &name, "--format",
        "{{range .IPAM.Config}}{{.Subnet}} {{.Gateway}} {{.AuxiliaryAddresses}}{{end}} {{index .Options \"com.docker.network.bridge.name\"}} {{index .Options \"com.docker.network.bridge.enable_ip_masquerade\"}}"]);
    assert_eq!(
        inspected.trim(),
        format!("10.231.77.0/24 10.231.77.1 map[vipd-ingress:10.231.77.2] {bridge} false")
    );
    assert_eq!(
        rt.block_on(ensure(&engine, &spec)).unwrap(),
        Outcome::Adopted(id.clone())
    );
    assert_eq!(rt.block_on(engine.network(&name)).unwrap().unwrap().id, id);
    rt.block_on(engine.remove_network(&name)).unwrap();

    let foreign = unique("vipdf");
    d.docker(&["network", "create", "--subnet", "10.231.78.0/24", &foreign]);
    let err = rt
        .block_on(ensure(
            &engine,
            &NetworkSpec {
                name: foreign.clone(),
                ..spec
            },
        ))
        .unwrap_err();
    assert!(matches!(err, NetworkError::Foreign { .. }), "{err:?}");
    assert!(err.to_string().contains("vipd did not create"), "{err}");
    assert!(
        rt.block_on(engine.network(&foreign)).unwrap().is_some(),
        "left alone"
    );
    d.docker(&["network", "rm", &foreign]);
}
