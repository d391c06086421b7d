//! The IPVS table of one network namespace, as plain data.
//!
//! These types say what a virtual service and a destination *are*; they carry no I/O.
//! The netlink adapter (`crate::ipvs`) turns them into messages and back, the planner
//! (`crate::core::plan`) compares two sets of them.

use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

use super::model::{FwMark, Scheduler};

/// Address family of a virtual service or destination (`AF_INET` / `AF_INET6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AddrFamily {
    Inet,
    Inet6,
}

impl AddrFamily {
    /// Linux `AF_INET`.
    pub const AF_INET: u16 = 2;
    /// Linux `AF_INET6`.
    pub const AF_INET6: u16 = 10;

    pub fn raw(self) -> u16 {
        match self {
            AddrFamily::Inet => Self::AF_INET,
            AddrFamily::Inet6 => Self::AF_INET6,
        }
    }

    pub fn from_raw(raw: u16) -> Option<Self> {
        match raw {
            Self::AF_INET => Some(AddrFamily::Inet),
            Self::AF_INET6 => Some(AddrFamily::Inet6),
            _ => None,
        }
    }

    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => AddrFamily::Inet,
            IpAddr::V6(_) => AddrFamily::Inet6,
        }
    }
}

/// IP protocol number of an address-keyed virtual service (6 = TCP, 17 = UDP, 132 = SCTP),
/// as the kernel carries it: any number may come back from a dump. vipd's own protocols are
/// [`crate::core::model::Protocol`], which converts into this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct IpProto(pub u16);

impl IpProto {
    pub const TCP: IpProto = IpProto(6);
    pub const UDP: IpProto = IpProto(17);
    pub const SCTP: IpProto = IpProto(132);
}

impl From<crate::core::model::Protocol> for IpProto {
    fn from(p: crate::core::model::Protocol) -> Self {
        IpProto(p.number())
    }
}

impl fmt::Display for IpProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            IpProto::TCP => f.write_str("TCP"),
            IpProto::UDP => f.write_str("UDP"),
            IpProto::SCTP => f.write_str("SCTP"),
            IpProto(n) => write!(f, "proto{n}"),
        }
    }
}

/// What identifies a virtual service in the kernel.
///
/// vipd only ever creates `FwMark` services; `Addr` services are read so that a dump of a
/// namespace with foreign services still decodes, and are never touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ServiceKey {
    FwMark {
        af: AddrFamily,
        mark: FwMark,
    },
    Addr {
        protocol: IpProto,
        addr: IpAddr,
        port: u16,
    },
}

impl ServiceKey {
    pub fn fwmark(mark: FwMark) -> Self {
        ServiceKey::FwMark {
            af: AddrFamily::Inet,
            mark,
        }
    }

    pub fn af(&self) -> AddrFamily {
        match self {
            ServiceKey::FwMark { af, .. } => *af,
            ServiceKey::Addr { addr, .. } => AddrFamily::of(addr),
        }
    }

    pub fn mark(&self) -> Option<FwMark> {
        match self {
            ServiceKey::FwMark { mark, .. } => Some(*mark),
            ServiceKey::Addr { .. } => None,
        }
    }
}

impl fmt::Display for ServiceKey {
    /// The way `ipvsadm -Ln` names a service: `FWM  256` or `TCP  10.0.0.1:80`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceKey::FwMark {
                af: AddrFamily::Inet,
                mark,
            } => write!(f, "FWM  {}", mark.get()),
            ServiceKey::FwMark {
                af: AddrFamily::Inet6,
                mark,
            } => write!(f, "FWM  {} IPv6", mark.get()),
            ServiceKey::Addr {
                protocol,
                addr: IpAddr::V6(a),
                port,
            } => write!(f, "{protocol}  [{a}]:{port}"),
            ServiceKey::Addr { protocol, addr, port } => write!(f, "{protocol}  {addr}:{port}"),
        }
    }
}

/// `IP_VS_SVC_F_*` service flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub struct ServiceFlags(pub u32);

impl ServiceFlags {
    /// Persistent service (`-p`): the kernel keeps a client on one destination for `timeout` s.
    pub const PERSISTENT: u32 = 0x0001;
    /// Set by the kernel on every hashed service; never requested, ignored when comparing.
    pub const HASHED: u32 = 0x0002;
    pub const ONEPACKET: u32 = 0x0004;
    pub const SCHED_SH_FALLBACK: u32 = 0x0008;
    pub const SCHED_SH_PORT: u32 = 0x0010;

    /// The flags a user can ask for (everything but `HASHED`).
    pub fn requested(self) -> ServiceFlags {
        ServiceFlags(self.0 & !Self::HASHED)
    }
}

/// The settable part of a virtual service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ServiceConfig {
    pub scheduler: Scheduler,
    pub flags: ServiceFlags,
    /// Persistence timeout in seconds (only meaningful with `ServiceFlags::PERSISTENT`).
    pub timeout: u32,
    /// Persistence netmask: `0xffff_ffff` for IPv4, a prefix length (128) for IPv6.
    pub netmask: u32,
}

impl ServiceConfig {
    /// A plain IPv4 service with the given scheduler and no persistence.
    pub fn new(scheduler: Scheduler) -> Self {
        ServiceConfig {
            scheduler,
            flags: ServiceFlags::default(),
            timeout: 0,
            netmask: 0xffff_ffff,
        }
    }

    /// True when `self` (what the kernel reports) already is what `want` asks for.
    pub fn satisfies(&self, want: &ServiceConfig) -> bool {
        self.scheduler == want.scheduler
            && self.flags.requested() == want.flags.requested()
            && self.netmask == want.netmask
            && (want.flags.0 & ServiceFlags::PERSISTENT == 0 || self.timeout == want.timeout)
    }
}

/// Kernel counters of a service or destination (`IPVS_STATS_ATTR_*`, 64-bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub struct Stats {
    pub conns: u64,
    pub inpkts: u64,
    pub outpkts: u64,
    pub inbytes: u64,
    pub outbytes: u64,
    pub cps: u64,
    pub inpps: u64,
    pub outpps: u64,
    pub inbps: u64,
    pub outbps: u64,
}

/// A virtual service as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VirtualService {
    pub key: ServiceKey,
    pub config: ServiceConfig,
    pub stats: Stats,
}

/// IPVS forwarding method (`IP_VS_CONN_F_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FwdMethod {
    /// NAT (`-m`), the only method vipd uses.
    Masq,
    Local,
    Tunnel,
    Route,
    Bypass,
}

impl FwdMethod {
    pub fn raw(self) -> u32 {
        match self {
            FwdMethod::Masq => 0,
            FwdMethod::Local => 1,
            FwdMethod::Tunnel => 2,
            FwdMethod::Route => 3,
            FwdMethod::Bypass => 4,
        }
    }

    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw & 0x7 {
            0 => FwdMethod::Masq,
            1 => FwdMethod::Local,
            2 => FwdMethod::Tunnel,
            3 => FwdMethod::Route,
            4 => FwdMethod::Bypass,
            _ => return None,
        })
    }

    /// The word `ipvsadm -Ln` prints in its Forward column.
    pub fn ipvsadm_word(self) -> &'static str {
        match self {
            FwdMethod::Masq => "Masq",
            FwdMethod::Local => "Local",
            FwdMethod::Tunnel => "Tunnel",
            FwdMethod::Route => "Route",
            FwdMethod::Bypass => "Bypass",
        }
    }
}

/// What identifies a destination within its service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct DestKey {
    pub addr: IpAddr,
    /// 0 for fwmark services: the packet keeps its destination port.
    pub port: u16,
}

impl fmt::Display for DestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

/// The settable part of a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct DestConfig {
    pub fwd: FwdMethod,
    pub weight: u32,
    pub upper_threshold: u32,
    pub lower_threshold: u32,
}

impl DestConfig {
    /// A NAT destination with the given weight and no thresholds.
    pub fn masq(weight: u32) -> Self {
        DestConfig {
            fwd: FwdMethod::Masq,
            weight,
            upper_threshold: 0,
            lower_threshold: 0,
        }
    }
}

/// A destination as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Destination {
    pub key: DestKey,
    pub config: DestConfig,
    pub active_conns: u32,
    pub inactive_conns: u32,
    pub persist_conns: u32,
    pub stats: Stats,
}

/// Connection timeouts of the namespace's IPVS table, in seconds (0 = leave unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, serde::Deserialize)]
pub struct Timeouts {
    pub tcp: u32,
    pub tcp_fin: u32,
    pub udp: u32,
}

/// One change to an IPVS table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum IpvsOp {
    AddService {
        key: ServiceKey,
        config: ServiceConfig,
    },
    EditService {
        key: ServiceKey,
        config: ServiceConfig,
    },
    DelService {
        key: ServiceKey,
    },
    AddDest {
        service: ServiceKey,
        dest: DestKey,
        config: DestConfig,
    },
    EditDest {
        service: ServiceKey,
        dest: DestKey,
        config: DestConfig,
    },
    DelDest {
        service: ServiceKey,
        dest: DestKey,
    },
    SetTimeouts(Timeouts),
}

impl fmt::Display for IpvsOp {
    /// The operation as the equivalent `ipvsadm` command line, for logs and `--dry-run`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn svc(k: &ServiceKey) -> String {
            match k {
                ServiceKey::FwMark {
                    af: AddrFamily::Inet,
                    mark,
                } => format!("-f {}", mark.get()),
                ServiceKey::FwMark {
                    af: AddrFamily::Inet6,
                    mark,
                } => format!("-f {} -6", mark.get()),
                ServiceKey::Addr { protocol, addr, port } => {
                    let flag = if *protocol == IpProto::UDP { "-u" } else { "-t" };
                    format!(
                        "{flag} {}",
                        DestKey {
                            addr: *addr,
                            port: *port
                        }
                    )
                }
            }
        }
        fn sconf(c: &ServiceConfig) -> String {
            let mut s = format!("-s {}", c.scheduler);
            if c.flags.0 & ServiceFlags::PERSISTENT != 0 {
                s.push_str(&format!(" -p {}", c.timeout));
            }
            s
        }
        fn dconf(c: &DestConfig) -> String {
            let m = match c.fwd {
                FwdMethod::Masq => "-m",
                FwdMethod::Tunnel => "-i",
                FwdMethod::Route => "-g",
                FwdMethod::Local | FwdMethod::Bypass => "-g",
            };
            format!("{m} -w {}", c.weight)
        }
        match self {
            IpvsOp::AddService { key, config } => {
                write!(f, "ipvsadm -A {} {}", svc(key), sconf(config))
            }
            IpvsOp::EditService { key, config } => {
                write!(f, "ipvsadm -E {} {}", svc(key), sconf(config))
            }
            IpvsOp::DelService { key } => write!(f, "ipvsadm -D {}", svc(key)),
            IpvsOp::AddDest {
                service,
                dest,
                config,
            } => {
                write!(f, "ipvsadm -a {} -r {dest} {}", svc(service), dconf(config))
            }
            IpvsOp::EditDest {
                service,
                dest,
                config,
            } => {
                write!(f, "ipvsadm -e {} -r {dest} {}", svc(service), dconf(config))
            }
            IpvsOp::DelDest { service, dest } => write!(f, "ipvsadm -d {} -r {dest}", svc(service)),
            IpvsOp::SetTimeouts(t) => write!(f, "ipvsadm --set {} {} {}", t.tcp, t.tcp_fin, t.udp),
        }
    }
}
