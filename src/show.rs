//! `vipd show`: a namespace's vipd services, the way `ipvsadm -Ln` prints them.

use std::fmt::Write;

use crate::core::ipvs::ServiceFlags;
use crate::reconcile::SandboxView;

/// Render like `ipvsadm -Ln`, with each service's name and VIP at the end of its line.
pub fn render(view: &SandboxView) -> String {
    let mut out = String::new();
    out.push_str("Prot LocalAddress:Port Scheduler Flags\n");
    out.push_str("  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n");
    for svc in &view.services {
        let m = &svc.marked;
        let head = match &svc.ipvs {
            Some(s) => {
                let mut head = format!("{} {}", s.key, s.config.scheduler);
                if s.config.flags.0 & ServiceFlags::PERSISTENT != 0 {
                    let _ = write!(head, " persistent {}", s.config.timeout);
                }
                head
            }
            None => format!("FWM  {} (no IPVS service: run vipd apply)", m.fwmark.get()),
        };
        let _ = writeln!(out, "{head:<38} # {} vip {}", m.name, m.vip);
        for d in &svc.destinations {
            let _ = writeln!(
                out,
                "  -> {:<28} {:<7} {:<6} {:<10} {:<10}",
                d.key.to_string(),
                d.config.fwd.ipvsadm_word(),
                d.config.weight,
                d.active_conns,
                d.inactive_conns
            );
        }
    }
    if view.foreign_services > 0 {
        let _ = writeln!(
            out,
            "({} other IPVS service(s) in this namespace are not vipd's)",
            view.foreign_services
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::firewall::MarkedService;
    use crate::core::ipvs::{
        DestConfig, DestKey, Destination, ServiceConfig, ServiceKey, Stats, VirtualService,
    };
    use crate::core::model::{FwMark, Scheduler, ServiceName, Vip};
    use crate::reconcile::ServiceView;

    #[test]
    fn renders_like_ipvsadm() {
        let mark = FwMark::new(256).unwrap();
        let view = SandboxView {
            services: vec![
                ServiceView {
                    marked: MarkedService {
                        name: ServiceName::new("web").unwrap(),
                        vip: Vip::new("10.0.0.100".parse().unwrap()),
                        fwmark: mark,
                    },
                    ipvs: Some(VirtualService {
                        key: ServiceKey::fwmark(mark),
                        config: ServiceConfig::new(Scheduler::RoundRobin),
                        stats: Stats::default(),
                    }),
                    destinations: vec![Destination {
                        key: DestKey {
                            addr: "10.0.0.3".parse().unwrap(),
                            port: 0,
                        },
                        config: DestConfig::masq(1),
                        active_conns: 2,
                        inactive_conns: 7,
                        persist_conns: 0,
                        stats: Stats::default(),
                    }],
                },
                ServiceView {
                    marked: MarkedService {
                        name: ServiceName::new("api").unwrap(),
                        vip: Vip::new("10.0.0.101".parse().unwrap()),
                        fwmark: FwMark::new(257).unwrap(),
                    },
                    ipvs: None,
                    destinations: vec![],
                },
            ],
            foreign_services: 1,
        };
        let text = render(&view);
        let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        assert_eq!(
            lines,
            [
                "Prot LocalAddress:Port Scheduler Flags",
                "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn",
                "FWM  256 rr                            # web vip 10.0.0.100",
                "  -> 10.0.0.3:0                   Masq    1      2          7",
                "FWM  257 (no IPVS service: run vipd apply) # api vip 10.0.0.101",
                "(1 other IPVS service(s) in this namespace are not vipd's)",
            ]
        );
    }
}
