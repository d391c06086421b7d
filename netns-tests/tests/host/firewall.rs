//! The reconciler with the real iptables of a fresh namespace (and the stateful IPVS fake):
//! rules round-trip exactly, a second run does nothing, foreign rules survive, an empty
//! desired set leaves nothing behind.

use vipd::addrs::{Addresses, RtnetlinkAddrs};
use vipd::core::firewall::{self as fw, MANGLE_OUTPUT, NAT_OUTPUT};
use vipd::core::ipvs::IpvsOp;
use vipd::core::plan::SysctlSettings;
use vipd::core::spec::{self, SandboxSpec};
use vipd::firewall::{Firewall, Iptables};
use vipd::ipvs::fake::FakeIpvs;
use vipd::ipvs::IpvsTable;
use vipd::netns::{run_in, NetnsPath};
use vipd::reconcile::{reconcile, Outcome, Sandbox};
use vipd::sysctl::FakeSysctls;

use crate::common::*;

/// Backends on a network the namespace is not on: no SNAT rule, which needs the
/// kernel's `ipvs` match (absent on this host; the VM suite covers it).
fn web(backends: &[&str]) -> SandboxSpec {
    let b: Vec<String> = backends.iter().map(|ip| format!(r#"{{"ip":"{ip}"}}"#)).collect();
    spec::parse(&format!(
        r#"{{"services":[
            {{"name":"web","vip":"10.200.0.100","fwmark":256,"backends":[{}]}},
            {{"name":"api","vip":"10.200.0.101","fwmark":257,"scheduler":"wlc","backends":[{{"ip":"10.200.0.9"}}]}}
        ]}}"#,
        b.join(",")
    ))
    .unwrap()
}

struct World {
    ipvs: FakeIpvs,
    sysctls: FakeSysctls,
}

impl World {
    fn new() -> Self {
        World {
            ipvs: FakeIpvs::default(),
            sysctls: FakeSysctls::default(),
        }
    }

    fn reconcile(&mut self, ns: &Netns, want: &SandboxSpec) -> Outcome {
        run_in(&NetnsPath::from_arg(&ns.name), || {
            let mut sb = Sandbox {
                ipvs: &mut self.ipvs,
                firewall: &mut Iptables::default(),
                sysctls: &mut self.sysctls,
                addrs: &mut RtnetlinkAddrs,
            };
            reconcile(&mut sb, want, &SysctlSettings::default(), false)
        })
        .expect("enter namespace")
        .expect("reconcile")
    }
}

#[test]
fn rendered_rules_are_exactly_what_iptables_save_prints() {
    require_root();
    let ns = Netns::new("vfw");
    let mut world = World::new();
    let want = web(&["10.200.0.3", "10.200.0.4"]);
    let first = world.reconcile(&ns, &want);
    assert_eq!(first.applied, first.plan.len());

    let mangle = ns.iptables_save("mangle");
    let nat = ns.iptables_save("nat");
    let seen = fw::parse_save(&(mangle.clone() + &nat));
    let expected_mark: Vec<String> = want
        .services
        .iter()
        .map(|s| {
            fw::render(&vipd::core::rules::Intent::MarkVip {
                service: s.name.clone(),
                vip: s.vip,
                mark: s.fwmark,
            })
            .spec
        })
        .collect();
    let mut got_mark = seen.chains[&MANGLE_OUTPUT].clone();
    got_mark.sort();
    let mut expected_sorted = expected_mark.clone();
    expected_sorted.sort();
    assert_eq!(
        got_mark, expected_sorted,
        "iptables-save printed other text than vipd rendered:\n{mangle}"
    );
    assert_eq!(seen.chains[&NAT_OUTPUT].len(), 2, "{nat}");
    assert!(mangle.contains("-A OUTPUT -j VIPD-OUTPUT\n"), "{mangle}");
    assert!(
        mangle.contains("-A VIPD-OUTPUT -d 10.200.0.100/32 -m comment --comment \"vipd:web:256\" -j MARK --set-xmark 0x100/0xffffffff"),
        "{mangle}"
    );
    assert!(nat.contains("-A OUTPUT -j VIPD-OUTPUT\n"), "{nat}");

    // Nothing changed: nothing to do, and the kernel is untouched.
    let again = world.reconcile(&ns, &want);
    assert_eq!(again.plan.len(), 0, "{:#?}", again.plan);
    assert_eq!(mangle, ns.iptables_save("mangle"));
    assert_eq!(nat, ns.iptables_save("nat"));
}

#[test]
fn foreign_rules_survive_and_an_empty_set_leaves_nothing() {
    require_root();
    let ns = Netns::new("vfw");
    ns.exec(&[
        "iptables",
        "-t",
        "mangle",
        "-A",
        "OUTPUT",
        "-d",
        "10.9.9.9/32",
        "-j",
        "MARK",
        "--set-mark",
        "5",
    ]);
    ns.exec(&["iptables", "-t", "nat", "-N", "OPERATOR"]);
    ns.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OPERATOR",
        "-d",
        "10.9.9.9/32",
        "-j",
        "RETURN",
    ]);
    ns.exec(&["iptables", "-t", "nat", "-A", "OUTPUT", "-j", "OPERATOR"]);
    let foreign_mangle = "-A OUTPUT -d 10.9.9.9/32 -j MARK --set-xmark 0x5/0xffffffff";
    let pristine_mangle = ns.iptables_save("mangle");
    let pristine_nat = ns.iptables_save("nat");

    let mut world = World::new();
    // A foreign IPVS service that vipd must leave alone.
    world
        .ipvs
        .apply(&IpvsOp::AddService {
            key: vipd::core::ipvs::ServiceKey::fwmark(vipd::core::model::FwMark::new(999).unwrap()),
            config: vipd::core::ipvs::ServiceConfig::new(vipd::core::model::Scheduler::RoundRobin),
        })
        .unwrap();

    world.reconcile(&ns, &web(&["10.200.0.3"]));
    let mangle = ns.iptables_save("mangle");
    assert!(mangle.contains(foreign_mangle), "{mangle}");
    assert!(ns
        .iptables_save("nat")
        .contains("-A OPERATOR -d 10.9.9.9/32 -j RETURN"));
    assert_eq!(world.ipvs.services().unwrap().len(), 3);

    // Someone deletes one of vipd's rules: the next run puts back exactly that one.
    ns.exec(&[
        "iptables",
        "-t",
        "mangle",
        "-D",
        "VIPD-OUTPUT",
        "-d",
        "10.200.0.101/32",
        "-m",
        "comment",
        "--comment",
        "vipd:api:257",
        "-j",
        "MARK",
        "--set-xmark",
        "0x101/0xffffffff",
    ]);
    let repair = world.reconcile(&ns, &web(&["10.200.0.3"]));
    assert_eq!(repair.plan.lines(), ["iptables -t mangle -A VIPD-OUTPUT -d 10.200.0.101/32 -m comment --comment vipd:api:257 -j MARK --set-xmark 0x101/0xffffffff"]);
    assert_eq!(
        ns.iptables_save("mangle")
            .matches("-A OUTPUT -j VIPD-OUTPUT")
            .count(),
        1,
        "jump duplicated"
    );

    let gone = world.reconcile(&ns, &SandboxSpec::default());
    assert!(gone.applied > 0);
    assert_eq!(
        ns.iptables_save("mangle"),
        pristine_mangle,
        "vipd left something in mangle"
    );
    assert_eq!(
        ns.iptables_save("nat"),
        pristine_nat,
        "vipd left something in nat"
    );
    let left: Vec<_> = world.ipvs.services().unwrap();
    assert_eq!(
        left.len(),
        1,
        "only the foreign IPVS service may remain: {left:#?}"
    );
    assert_eq!(world.sysctls, FakeSysctls::default(), "sysctls not restored");
    assert_eq!(world.reconcile(&ns, &SandboxSpec::default()).plan.len(), 0);
}

#[test]
fn addresses_are_read_from_the_namespace() {
    require_root();
    let a = Netns::new("vad");
    let b = Netns::new("vad");
    veth(&a, "eth0", Some("10.201.3.7/24"), &b, "eth0");
    a.exec(&["ip", "addr", "add", "172.30.1.1/16", "dev", "eth0"]);
    let addrs = run_in(&NetnsPath::from_arg(&a.name), || RtnetlinkAddrs.ipv4())
        .unwrap()
        .unwrap();
    let text: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    assert_eq!(text, ["10.201.3.7/24", "172.30.1.1/16"]);
}

#[test]
fn a_firewall_error_names_the_failing_line() {
    require_root();
    let ns = Netns::new("vfw");
    let err = run_in(&NetnsPath::from_arg(&ns.name), || {
        Iptables::default().restore("*mangle\n-A NO-SUCH-CHAIN -j RETURN\nCOMMIT\n")
    })
    .unwrap()
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("iptables-restore failed"), "{text}");
    assert!(text.contains("[line 2: -A NO-SUCH-CHAIN -j RETURN]"), "{text}");
}

#[test]
fn the_meshs_host_intents_render_to_the_lines_iptables_save_prints_and_go_again() {
    use vipd::core::labels::Publish;
    use vipd::core::model::Protocol;
    use vipd::core::model::ServiceName;
    use vipd::core::rules::{Direction, Intent, IpFamily, Origin};
    use vipd::reconcile::host_firewall;

    require_root();
    let ns = Netns::new("vfw");
    let pristine = (ns.iptables_save("nat"), ns.iptables_save("filter"));
    let publish = Publish {
        protocol: Protocol::Udp,
        published: 5353,
        target: 53,
    };
    let mut want: Vec<Intent> = [Origin::Arriving, Origin::Local]
        .into_iter()
        .map(|origin| Intent::DnatToIngress {
            service: ServiceName::new("web").unwrap(),
            publish,
            ingress: "10.254.254.2".parse().unwrap(),
            origin,
        })
        .collect();
    want.push(Intent::MasqueradeToIngress {
        iface: "vipd-ingress".into(),
        family: IpFamily::V4,
    });
    want.extend(
        [Direction::Out, Direction::In].map(|direction| Intent::ForwardIngress {
            iface: "vipd-ingress".into(),
            direction,
            family: IpFamily::V4,
        }),
    );
    let program = |want: &[Intent]| {
        run_in(&NetnsPath::from_arg(&ns.name), || {
            host_firewall(&mut Iptables::default(), want)
        })
        .expect("enter namespace")
        .expect("host firewall")
    };

    assert!(!program(&want).is_empty());
    let (nat, filter) = (ns.iptables_save("nat"), ns.iptables_save("filter"));
    let seen = fw::parse_save(&(nat.clone() + &filter));
    for intent in &want {
        let line = fw::render(intent);
        assert_eq!(
            seen.chains[&line.chain]
                .iter()
                .filter(|r| **r == line.spec)
                .count(),
            1,
            "{line:?} not printed back as rendered:\n{nat}{filter}"
        );
    }
    assert!(
        nat.contains("-A PREROUTING -m addrtype --dst-type LOCAL -j VIPD-INGRESS\n"),
        "{nat}"
    );
    assert!(filter.contains("-A FORWARD -j VIPD-FORWARD\n"), "{filter}");

    // Nothing changed: nothing is written.
    assert_eq!(program(&want), []);
    assert_eq!(
        (ns.iptables_save("nat"), ns.iptables_save("filter")),
        (nat, filter)
    );

    // Nothing published: nothing of vipd's is left.
    assert!(!program(&[]).is_empty());
    assert_eq!((ns.iptables_save("nat"), ns.iptables_save("filter")), pristine);
}
