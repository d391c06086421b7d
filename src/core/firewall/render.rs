//! The iptables backend's rendering: each [`Intent`] as the rule lines it takes in vipd's
//! chains, in exactly the form `iptables-save` prints them, and the structural reading
//! back of the lines vipd's ownership rests on. The only place rule text is made.

use std::net::IpAddr;

use super::{
    ChainRule, OwnedChain, COMMENT_PREFIX, HOST_FILTER_FORWARD, HOST_NAT_OUTPUT, HOST_NAT_POSTROUTING,
    HOST_NAT_PREROUTING, HOST_OVERLAY_FORWARD, HOST_OVERLAY_NAT, HOST_VXLAN_INPUT, MANGLE_OUTPUT,
    MANGLE_PREROUTING, NAT_OUTPUT, NAT_POSTROUTING,
};
use crate::core::model::{FwMark, ServiceName, Vip};
use crate::core::rules::{Direction, Intent, IpFamily, Origin};

/// The line `intent` takes, in its chain.
pub fn render(intent: &Intent) -> ChainRule {
    let rule = |chain: OwnedChain, spec: String| ChainRule { chain, spec };
    match intent {
        Intent::MarkVip { service, vip, mark } => rule(
            MANGLE_OUTPUT,
            format!(
                "-d {} -m comment --comment {} -j MARK --set-xmark {}",
                host(*vip),
                service_comment(service, *mark),
                set_xmark(*mark)
            ),
        ),
        Intent::PingVip { service, vip, mark } => rule(
            NAT_OUTPUT,
            format!(
                "-d {} -p icmp -m icmp --icmp-type 8 -m comment --comment {} -j DNAT --to-destination 127.0.0.1",
                host(*vip),
                service_comment(service, *mark)
            ),
        ),
        Intent::SnatIpvs { dest_net, source } => rule(
            NAT_POSTROUTING,
            format!(
                "-d {} -m ipvs --ipvs -m comment --comment {COMMENT_PREFIX}snat -j SNAT --to-source {source}",
                dest_net.trunc()
            ),
        ),
        Intent::SnatAllIpvs { source } => rule(
            NAT_POSTROUTING,
            format!("-m ipvs --ipvs -m comment --comment {COMMENT_PREFIX}snat -j SNAT --to-source {source}"),
        ),
        Intent::IngressMark {
            service,
            addr,
            publish,
            mark,
        } => {
            let proto = publish.protocol.label();
            rule(
                MANGLE_PREROUTING,
                format!(
                    "-d {} -p {proto} -m {proto} --dport {} -m comment --comment {} -j MARK --set-xmark {}",
                    host(*addr),
                    publish.published,
                    service_comment(service, *mark),
                    set_xmark(*mark)
                ),
            )
        }
        Intent::DnatToIngress {
            service,
            publish,
            ingress,
            origin,
        } => {
            let proto = publish.protocol.label();
            let chain = match origin {
                Origin::Arriving => HOST_NAT_PREROUTING,
                Origin::Local => HOST_NAT_OUTPUT,
            };
            rule(
                chain,
                format!(
                    "-p {proto} -m {proto} --dport {port} -m comment --comment {COMMENT_PREFIX}{service} -j DNAT --to-destination {ingress}:{port}",
                    port = publish.published
                ),
            )
        }
        Intent::MasqueradeToIngress { iface, family: _ } => rule(
            HOST_NAT_POSTROUTING,
            format!("-o {iface} -m addrtype --src-type LOCAL -m comment --comment {COMMENT_PREFIX}mesh -j MASQUERADE"),
        ),
        Intent::ForwardIngress {
            iface,
            direction,
            family: _,
        } => {
            let flag = match direction {
                Direction::Out => "-o",
                Direction::In => "-i",
            };
            rule(
                HOST_FILTER_FORWARD,
                format!("{flag} {iface} -m comment --comment {COMMENT_PREFIX}mesh -j ACCEPT"),
            )
        }
        Intent::ForwardOverlay {
            vxlan,
            bridge,
            direction,
            family: _,
        } => {
            let (from, to) = match direction {
                Direction::In => (vxlan, bridge),
                Direction::Out => (bridge, vxlan),
            };
            rule(
                HOST_OVERLAY_FORWARD,
                format!("-i {from} -o {to} -m comment --comment {COMMENT_PREFIX}overlay -j ACCEPT"),
            )
        }
        Intent::KeepClusterSource { range } => rule(
            HOST_OVERLAY_NAT,
            format!(
                "-s {range} -d {range} -m comment --comment {COMMENT_PREFIX}overlay -j RETURN",
                range = range.trunc()
            ),
        ),
        Intent::MasqueradeNodeSubnet { subnet, bridge } => rule(
            HOST_OVERLAY_NAT,
            format!(
                "-s {} ! -o {bridge} -m comment --comment {COMMENT_PREFIX}overlay -j MASQUERADE",
                subnet.trunc()
            ),
        ),
        Intent::MasqueradeIntoOverlay { range, vxlan } => rule(
            HOST_OVERLAY_NAT,
            format!(
                "! -s {} -o {vxlan} -m comment --comment {COMMENT_PREFIX}overlay -j MASQUERADE",
                range.trunc()
            ),
        ),
        Intent::AcceptVxlanPeer { peer, port } => rule(
            HOST_VXLAN_INPUT,
            format!(
                "-s {peer}/{} -p udp -m udp --dport {port} -m comment --comment {COMMENT_PREFIX}vxlan -j ACCEPT",
                IpFamily::of(*peer).host_prefix()
            ),
        ),
        Intent::DropVxlan { port, family: _ } => rule(
            HOST_VXLAN_INPUT,
            format!("-p udp -m udp --dport {port} -m comment --comment {COMMENT_PREFIX}vxlan -j DROP"),
        ),
    }
}

/// Where an intent's line goes in an ordered chain ([`super::ORDERED_CHAINS`]): the
/// specific rules (a peer's ACCEPT, the cluster's RETURN) before the catch-alls they
/// make exceptions to (the DROP of every other VXLAN packet, the masquerade of the rest).
pub fn rank(intent: &Intent) -> u8 {
    match intent {
        Intent::DropVxlan { .. }
        | Intent::MasqueradeNodeSubnet { .. }
        | Intent::MasqueradeIntoOverlay { .. } => 1,
        _ => 0,
    }
}

/// The lines of every intent, in order.
pub fn render_all(intents: &[Intent]) -> Vec<ChainRule> {
    intents.iter().map(render).collect()
}

/// One host's address as a destination match: `10.0.0.100/32`.
fn host(vip: Vip) -> String {
    let addr = vip.addr();
    format!("{addr}/{}", IpFamily::of(addr).host_prefix())
}

/// The MARK target's argument: the whole mark, under a full mask.
fn set_xmark(mark: FwMark) -> String {
    format!("{mark}/0xffffffff")
}

/// The comment on a service's rules: `vipd:NAME:MARK`, for the operator reading
/// `iptables -S`, and the one record of the service's name in the kernel.
fn service_comment(name: &ServiceName, mark: FwMark) -> String {
    format!("{COMMENT_PREFIX}{name}:{}", mark.get())
}

/// The word after `flag` in a rule.
fn after<'a>(words: &[&'a str], flag: &str) -> Option<&'a str> {
    words
        .iter()
        .position(|w| *w == flag)
        .and_then(|i| words.get(i + 1).copied())
}

/// The single host a rule matches as destination (`-d ADDR/32`, `/128` for IPv6).
fn destination_host(words: &[&str]) -> Option<IpAddr> {
    let (addr, prefix) = after(words, "-d")?.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    (prefix.parse::<u8>().ok()? == IpFamily::of(addr).host_prefix()).then_some(addr)
}

/// Read a rule that marks packets to one host with a whole mark (`-d VIP/32 … -j MARK
/// --set-xmark 0x100/0xffffffff`, whatever else it matches on), from its match and
/// target: the host and the mark. `None` for any other rule.
pub fn read_mark(spec: &str) -> Option<(IpAddr, FwMark)> {
    let words: Vec<&str> = spec.split_whitespace().collect();
    if after(&words, "-j")? != "MARK" {
        return None;
    }
    let (value, mask) = after(&words, "--set-xmark")?.split_once('/')?;
    if mask != "0xffffffff" {
        return None;
    }
    let mark = u32::from_str_radix(value.strip_prefix("0x")?, 16).ok()?;
    Some((destination_host(&words)?, FwMark::new(mark)?))
}

/// Read a rule that answers ICMP echo to one host locally (`-d VIP/32 -p icmp … -j DNAT
/// --to-destination 127.0.0.1`): the host. `None` for any other rule.
pub fn read_ping(spec: &str) -> Option<IpAddr> {
    let words: Vec<&str> = spec.split_whitespace().collect();
    let local = after(&words, "-j")? == "DNAT"
        && after(&words, "-p")? == "icmp"
        && after(&words, "--to-destination")? == "127.0.0.1";
    local.then(|| destination_host(&words)).flatten()
}

/// The service name a service rule's comment records (`vipd:NAME:MARK`), the one thing
/// of a rule that only its comment holds. `None` without such a comment.
pub fn read_service_name(spec: &str) -> Option<ServiceName> {
    let words: Vec<&str> = spec.split_whitespace().collect();
    let (name, _mark) = after(&words, "--comment")?
        .strip_prefix(COMMENT_PREFIX)?
        .rsplit_once(':')?;
    ServiceName::new(name).ok()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::core::labels::Publish;
    use crate::core::model::Ipv4Net;
    use crate::core::model::Protocol;

    pub(in crate::core::firewall) fn name(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }

    pub(in crate::core::firewall) fn vip(s: &str) -> Vip {
        Vip::new(s.parse().unwrap())
    }

    pub(in crate::core::firewall) fn mark(n: u32) -> FwMark {
        FwMark::new(n).unwrap()
    }

    /// An intent's line as `CHAIN SPEC`.
    fn line(intent: Intent) -> String {
        let r = render(&intent);
        format!("{} {}", r.chain.name, r.spec)
    }

    #[test]
    fn sandbox_intents_render_in_iptables_save_form() {
        let web = || name("web");
        assert_eq!(
            line(Intent::MarkVip {
                service: web(),
                vip: vip("10.0.0.100"),
                mark: mark(256)
            }),
            "VIPD-OUTPUT -d 10.0.0.100/32 -m comment --comment vipd:web:256 -j MARK --set-xmark 0x100/0xffffffff"
        );
        assert_eq!(
            line(Intent::PingVip {
                service: web(),
                vip: vip("10.0.0.100"),
                mark: mark(256)
            }),
            "VIPD-OUTPUT -d 10.0.0.100/32 -p icmp -m icmp --icmp-type 8 -m comment --comment vipd:web:256 -j DNAT --to-destination 127.0.0.1"
        );
        assert_eq!(
            line(Intent::SnatIpvs {
                dest_net: Ipv4Net::new("10.0.0.2".parse().unwrap(), 24).unwrap(),
                source: "10.0.0.2".parse().unwrap()
            }),
            "VIPD-POSTROUTING -d 10.0.0.0/24 -m ipvs --ipvs -m comment --comment vipd:snat -j SNAT --to-source 10.0.0.2"
        );
        // The network is printed as its network address, whatever host it was given by.
        assert_eq!(
            line(Intent::SnatIpvs {
                dest_net: Ipv4Net::new("172.20.0.7".parse().unwrap(), 16).unwrap(),
                source: "172.20.0.7".parse().unwrap()
            }),
            "VIPD-POSTROUTING -d 172.20.0.0/16 -m ipvs --ipvs -m comment --comment vipd:snat -j SNAT --to-source 172.20.0.7"
        );
        // The mark and ping rules are in the mangle and nat tables' chains.
        let r = render(&Intent::MarkVip {
            service: web(),
            vip: vip("10.0.0.100"),
            mark: mark(256),
        });
        assert_eq!(r.chain, MANGLE_OUTPUT);
    }

    #[test]
    fn mesh_intents_render_in_iptables_save_form() {
        let http = Publish {
            protocol: Protocol::Tcp,
            published: 8080,
            target: 80,
        };
        let dns = Publish {
            protocol: Protocol::Udp,
            published: 53,
            target: 5353,
        };
        assert_eq!(
            line(Intent::IngressMark {
                service: name("web"),
                addr: vip("10.254.255.2"),
                publish: http,
                mark: mark(0x1_0000 + 8080)
            }),
            "VIPD-PREROUTING -d 10.254.255.2/32 -p tcp -m tcp --dport 8080 -m comment --comment vipd:web:73616 -j MARK --set-xmark 0x11f90/0xffffffff"
        );
        assert_eq!(
            line(Intent::IngressMark {
                service: name("web"),
                addr: vip("10.254.255.2"),
                publish: dns,
                mark: mark(0x2_0000 + 53)
            }),
            "VIPD-PREROUTING -d 10.254.255.2/32 -p udp -m udp --dport 53 -m comment --comment vipd:web:131125 -j MARK --set-xmark 0x20035/0xffffffff"
        );
        assert_eq!(
            line(Intent::SnatAllIpvs {
                source: "10.254.255.2".parse().unwrap()
            }),
            "VIPD-POSTROUTING -m ipvs --ipvs -m comment --comment vipd:snat -j SNAT --to-source 10.254.255.2"
        );
        let dnat = |publish, origin| {
            line(Intent::DnatToIngress {
                service: name("web"),
                publish,
                ingress: "10.254.255.2".parse().unwrap(),
                origin,
            })
        };
        assert_eq!(
            dnat(http, Origin::Arriving),
            "VIPD-INGRESS -p tcp -m tcp --dport 8080 -m comment --comment vipd:web -j DNAT --to-destination 10.254.255.2:8080"
        );
        assert_eq!(
            dnat(http, Origin::Local),
            "VIPD-INGRESS-OUT -p tcp -m tcp --dport 8080 -m comment --comment vipd:web -j DNAT --to-destination 10.254.255.2:8080"
        );
        assert_eq!(
            dnat(dns, Origin::Local),
            "VIPD-INGRESS-OUT -p udp -m udp --dport 53 -m comment --comment vipd:web -j DNAT --to-destination 10.254.255.2:53"
        );
        assert_eq!(
            line(Intent::MasqueradeToIngress {
                iface: "vipd-ingress".into(),
                family: IpFamily::V4
            }),
            "VIPD-INGRESS-POST -o vipd-ingress -m addrtype --src-type LOCAL -m comment --comment vipd:mesh -j MASQUERADE"
        );
        let forward = |direction| {
            line(Intent::ForwardIngress {
                iface: "vipd-ingress".into(),
                direction,
                family: IpFamily::V4,
            })
        };
        assert_eq!(
            forward(Direction::Out),
            "VIPD-FORWARD -o vipd-ingress -m comment --comment vipd:mesh -j ACCEPT"
        );
        assert_eq!(
            forward(Direction::In),
            "VIPD-FORWARD -i vipd-ingress -m comment --comment vipd:mesh -j ACCEPT"
        );
    }

    #[test]
    fn overlay_intents_render_in_iptables_save_form() {
        let forward = |direction| {
            line(Intent::ForwardOverlay {
                vxlan: "vipd-vx".into(),
                bridge: "vipd0".into(),
                direction,
                family: IpFamily::V4,
            })
        };
        assert_eq!(
            forward(Direction::In),
            "VIPD-OVERLAY -i vipd-vx -o vipd0 -m comment --comment vipd:overlay -j ACCEPT"
        );
        assert_eq!(
            forward(Direction::Out),
            "VIPD-OVERLAY -i vipd0 -o vipd-vx -m comment --comment vipd:overlay -j ACCEPT"
        );
        // Networks print as their network address, whatever host they were given by.
        assert_eq!(
            line(Intent::KeepClusterSource {
                range: Ipv4Net::new("10.230.7.1".parse().unwrap(), 16).unwrap()
            }),
            "VIPD-OVERLAY-NAT -s 10.230.0.0/16 -d 10.230.0.0/16 -m comment --comment vipd:overlay -j RETURN"
        );
        assert_eq!(
            line(Intent::MasqueradeNodeSubnet {
                subnet: Ipv4Net::new("10.230.1.1".parse().unwrap(), 24).unwrap(),
                bridge: "vipd0".into()
            }),
            "VIPD-OVERLAY-NAT -s 10.230.1.0/24 ! -o vipd0 -m comment --comment vipd:overlay -j MASQUERADE"
        );
        assert_eq!(
            line(Intent::AcceptVxlanPeer {
                peer: "192.168.1.2".parse().unwrap(),
                port: 4799
            }),
            "VIPD-VXLAN-IN -s 192.168.1.2/32 -p udp -m udp --dport 4799 -m comment --comment vipd:vxlan -j ACCEPT"
        );
        assert_eq!(
            line(Intent::DropVxlan {
                port: 4799,
                family: IpFamily::V4
            }),
            "VIPD-VXLAN-IN -p udp -m udp --dport 4799 -m comment --comment vipd:vxlan -j DROP"
        );
        // The catch-alls rank after the exceptions; everything else ranks first.
        assert_eq!(
            rank(&Intent::DropVxlan {
                port: 1,
                family: IpFamily::V4
            }),
            1
        );
        assert_eq!(
            rank(&Intent::AcceptVxlanPeer {
                peer: "192.168.1.2".parse().unwrap(),
                port: 1
            }),
            0
        );
    }

    #[test]
    fn mark_and_ping_rules_read_back_from_their_match_and_target_not_their_comment() {
        let r = render(&Intent::MarkVip {
            service: name("api.v2"),
            vip: vip("10.1.2.3"),
            mark: mark(0x1234),
        });
        assert_eq!(
            read_mark(&r.spec),
            Some(("10.1.2.3".parse().unwrap(), mark(0x1234)))
        );
        assert_eq!(read_service_name(&r.spec), Some(name("api.v2")));
        let p = render(&Intent::PingVip {
            service: name("api.v2"),
            vip: vip("10.1.2.3"),
            mark: mark(7),
        });
        assert_eq!(read_ping(&p.spec), Some("10.1.2.3".parse().unwrap()));
        assert_eq!(read_mark(&p.spec), None);
        let ingress = &render(&Intent::IngressMark {
            service: name("web"),
            addr: vip("10.254.255.2"),
            publish: Publish {
                protocol: Protocol::Tcp,
                published: 8080,
                target: 80,
            },
            mark: mark(0x11f90),
        });
        assert_eq!(
            read_mark(&ingress.spec),
            Some(("10.254.255.2".parse().unwrap(), mark(0x11f90)))
        );
        // No comment needed, and a comment alone proves nothing.
        assert_eq!(
            read_mark("-d 10.9.9.9/32 -j MARK --set-xmark 0x5/0xffffffff"),
            Some(("10.9.9.9".parse().unwrap(), mark(5)))
        );
        assert_eq!(
            read_service_name("-d 10.9.9.9/32 -j MARK --set-xmark 0x5/0xffffffff"),
            None
        );
        assert_eq!(
            read_mark("-d 10.9.9.9/32 -m comment --comment vipd:x:5 -j RETURN"),
            None
        );
        assert_eq!(
            read_service_name("-d 10.9.9.9/32 -m comment --comment vipd:x -j RETURN"),
            None
        );
        // Not a whole mark, not one host, mark 0: not a service's mark rule.
        assert_eq!(read_mark("-d 10.9.9.9/32 -j MARK --set-xmark 0x5/0xff"), None);
        assert_eq!(
            read_mark("-d 10.9.0.0/16 -j MARK --set-xmark 0x5/0xffffffff"),
            None
        );
        assert_eq!(
            read_mark("-d 10.9.9.9/32 -j MARK --set-xmark 0x0/0xffffffff"),
            None
        );
        assert_eq!(
            read_ping("-d 10.9.9.9/32 -p tcp -j DNAT --to-destination 127.0.0.1"),
            None
        );
    }

    #[test]
    fn an_ipv6_vip_is_matched_as_one_host_of_its_family() {
        let r = render(&Intent::MarkVip {
            service: name("web"),
            vip: vip("fd00::64"),
            mark: mark(256),
        });
        assert!(r.spec.starts_with("-d fd00::64/128 "), "{}", r.spec);
        assert_eq!(read_mark(&r.spec), Some(("fd00::64".parse().unwrap(), mark(256))));
    }
}
