//! Newtypes for the things vipd talks about, and their validation.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::Serialize;

/// A firewall mark that steers a VIP's packets to one IPVS virtual service.
///
/// Serialized as the bare number; reading one refuses 0, as [`FwMark::new`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct FwMark(u32);

/// A mark of 0, which means "no mark" to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("fwmark 0 is no mark")]
pub struct ZeroFwMark;

impl From<FwMark> for u32 {
    fn from(mark: FwMark) -> u32 {
        mark.0
    }
}

impl TryFrom<u32> for FwMark {
    type Error = ZeroFwMark;

    fn try_from(raw: u32) -> Result<Self, ZeroFwMark> {
        FwMark::new(raw).ok_or(ZeroFwMark)
    }
}

impl FwMark {
    /// A mark; 0 is "no mark" to the kernel and is refused.
    pub fn new(raw: u32) -> Option<Self> {
        (raw != 0).then_some(FwMark(raw))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for FwMark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// An IPVS scheduler, by its kernel name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Scheduler {
    #[default]
    RoundRobin,
    WeightedRoundRobin,
    LeastConn,
    WeightedLeastConn,
    LocalityLeastConn,
    LocalityLeastConnReplicated,
    DestinationHash,
    SourceHash,
    ShortestExpectedDelay,
    NeverQueue,
    WeightedFailover,
    WeightedOverflow,
    Maglev,
    /// A scheduler vipd does not know, as reported by the kernel for a foreign service.
    Other(String),
}

impl Scheduler {
    /// Every scheduler vipd accepts in its input: the ones Debian's kernel ships.
    pub const KNOWN: [&'static str; 13] = [
        "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh",
    ];

    pub fn name(&self) -> &str {
        match self {
            Scheduler::RoundRobin => "rr",
            Scheduler::WeightedRoundRobin => "wrr",
            Scheduler::LeastConn => "lc",
            Scheduler::WeightedLeastConn => "wlc",
            Scheduler::LocalityLeastConn => "lblc",
            Scheduler::LocalityLeastConnReplicated => "lblcr",
            Scheduler::DestinationHash => "dh",
            Scheduler::SourceHash => "sh",
            Scheduler::ShortestExpectedDelay => "sed",
            Scheduler::NeverQueue => "nq",
            Scheduler::WeightedFailover => "fo",
            Scheduler::WeightedOverflow => "ovf",
            Scheduler::Maglev => "mh",
            Scheduler::Other(s) => s,
        }
    }

    /// The scheduler the kernel names `name`; unknown names become `Other`.
    pub fn from_kernel(name: &str) -> Self {
        name.parse().unwrap_or_else(|_| Scheduler::Other(name.to_owned()))
    }
}

/// The scheduler name is not one vipd knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scheduler {0:?} (known: rr, wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq, fo, ovf, mh)")]
pub struct UnknownScheduler(pub String);

impl FromStr for Scheduler {
    type Err = UnknownScheduler;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "rr" => Scheduler::RoundRobin,
            "wrr" => Scheduler::WeightedRoundRobin,
            "lc" => Scheduler::LeastConn,
            "wlc" => Scheduler::WeightedLeastConn,
            "lblc" => Scheduler::LocalityLeastConn,
            "lblcr" => Scheduler::LocalityLeastConnReplicated,
            "dh" => Scheduler::DestinationHash,
            "sh" => Scheduler::SourceHash,
            "sed" => Scheduler::ShortestExpectedDelay,
            "nq" => Scheduler::NeverQueue,
            "fo" => Scheduler::WeightedFailover,
            "ovf" => Scheduler::WeightedOverflow,
            "mh" => Scheduler::Maglev,
            other => return Err(UnknownScheduler(other.to_owned())),
        })
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Scheduler {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// The name of a service: what DNS answers and what vipd's rule comments carry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServiceName(String);

impl TryFrom<String> for ServiceName {
    type Error = InvalidServiceName;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        ServiceName::new(&s)
    }
}

impl From<ServiceName> for String {
    fn from(n: ServiceName) -> String {
        n.0
    }
}

/// Why a service name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid service name {0:?}: use 1-63 characters from a-z, A-Z, 0-9, '-', '_' and '.', starting with a letter or digit")]
pub struct InvalidServiceName(pub String);

impl ServiceName {
    pub fn new(name: &str) -> Result<Self, InvalidServiceName> {
        let ok = !name.is_empty()
            && name.len() <= 63
            && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if ok {
            Ok(ServiceName(name.to_owned()))
        } else {
            Err(InvalidServiceName(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A service's virtual IP: the address clients connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Vip(IpAddr);

impl Vip {
    pub fn new(addr: IpAddr) -> Self {
        Vip(addr)
    }

    pub fn addr(self) -> IpAddr {
        self.0
    }
}

impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The address of one task (an IPVS destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct BackendAddr(IpAddr);

impl BackendAddr {
    pub fn new(addr: IpAddr) -> Self {
        BackendAddr(addr)
    }

    pub fn addr(self) -> IpAddr {
        self.0
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An IPv4 network: the `ipnet` type, the one CIDR type of vipd.
pub use ipnet::Ipv4Net;

/// A container's network namespace, as the engine names it (Docker's `SandboxKey`, a path
/// such as `/run/docker/netns/0123456789ab`), or the ingress namespace: what the agent and
/// the kernel facade key a sandbox by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct SandboxKey(std::path::PathBuf);

impl SandboxKey {
    pub fn new(path: impl Into<std::path::PathBuf>) -> Self {
        SandboxKey(path.into())
    }

    /// The namespace file.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl From<std::path::PathBuf> for SandboxKey {
    fn from(p: std::path::PathBuf) -> Self {
        SandboxKey(p)
    }
}

impl From<&str> for SandboxKey {
    fn from(p: &str) -> Self {
        SandboxKey(p.into())
    }
}

impl fmt::Display for SandboxKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.display().fmt(f)
    }
}

/// How a service's name resolves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    /// The name resolves to the service's VIP, balanced by IPVS.
    #[default]
    Vip,
    /// The name resolves to every task's address (DNS round robin); no VIP.
    Dnsrr,
}

/// A transport protocol: of a published port, of a named port (the `_<proto>` label of an
/// SRV name), of a port bound on the host. The one protocol type of vipd; IPVS's wire form
/// is its IP protocol number ([`Protocol::number`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The IP protocol number (`/etc/protocols`), as IPVS and conntrack carry it.
    pub fn number(self) -> u16 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// The protocol label without its underscore: `tcp`, `udp`, `sctp`.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A port on the host, as a published port claims it: its protocol and number. At most one
/// service holds each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PortKey {
    pub protocol: Protocol,
    pub port: u16,
}

impl PortKey {
    pub fn new(protocol: Protocol, port: u16) -> Self {
        PortKey { protocol, port }
    }
}

impl fmt::Display for PortKey {
    /// `8080/tcp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

/// A name unfit for a key segment (a node name or a task id).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {name:?}: use 1-253 characters from a-z, A-Z, 0-9, '-', '_' and '.', starting with a letter or digit")]
pub struct InvalidName {
    pub what: &'static str,
    pub name: String,
}

fn check_segment(what: &'static str, name: &str) -> Result<(), InvalidName> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(InvalidName {
            what,
            name: name.to_owned(),
        })
    }
}

/// A validated name that is one segment of a key: built with `new`, read back from JSON
/// through the same check.
macro_rules! key_segment {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(name: &str) -> Result<Self, InvalidName> {
                check_segment($what, name).map(|()| $name(name.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidName;

            fn try_from(s: String) -> Result<Self, Self::Error> {
                $name::new(&s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

key_segment!(
    /// A node's name in the cluster (unique among live nodes).
    NodeName,
    "node name"
);
key_segment!(
    /// A task's id (its container id), unique within its node.
    TaskId,
    "task id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_protocol_type_names_itself_numbers_itself_and_keys_host_ports() {
        let all = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];
        let labels: Vec<String> = all.iter().map(|p| p.to_string()).collect();
        assert_eq!(labels, ["tcp", "udp", "sctp"]);
        assert_eq!(all.map(Protocol::number), [6, 17, 132]);
        assert_eq!(
            crate::core::ipvs::IpProto::from(Protocol::Udp),
            crate::core::ipvs::IpProto::UDP
        );
        let key = PortKey::new(Protocol::Udp, 53);
        assert_eq!(key.to_string(), "53/udp");
        // Ordered by protocol, then port, as the mesh hands out ports.
        assert!(PortKey::new(Protocol::Tcp, 9090) < PortKey::new(Protocol::Udp, 53));
        assert!(PortKey::new(Protocol::Tcp, 80) < PortKey::new(Protocol::Tcp, 8080));
    }

    #[test]
    fn a_sandbox_key_shows_and_serializes_as_its_path() {
        let key = SandboxKey::from("/run/docker/netns/0123456789ab");
        assert_eq!(key.to_string(), "/run/docker/netns/0123456789ab");
        assert_eq!(key.path(), std::path::Path::new("/run/docker/netns/0123456789ab"));
        assert_eq!(
            serde_json::to_string(&key).unwrap(),
            "\"/run/docker/netns/0123456789ab\""
        );
    }

    #[test]
    fn schedulers_round_trip_their_kernel_names() {
        for name in Scheduler::KNOWN {
            let s: Scheduler = name.parse().unwrap();
            assert_eq!(s.name(), name);
        }
        assert!("roundrobin".parse::<Scheduler>().is_err());
        assert_eq!(Scheduler::from_kernel("twos"), Scheduler::Other("twos".into()));
    }

    #[test]
    fn fwmark_zero_is_refused() {
        assert!(FwMark::new(0).is_none());
        assert_eq!(FwMark::new(256).unwrap().to_string(), "0x100");
    }

    #[test]
    fn service_names_are_checked() {
        assert!(ServiceName::new("web").is_ok());
        assert!(ServiceName::new("my_app.web-1").is_ok());
        for bad in ["", "-web", "a b", "web\"", &"x".repeat(64)] {
            assert!(ServiceName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ipv4_networks_contain_their_hosts() {
        let n = Ipv4Net::new("10.0.0.2".parse().unwrap(), 24).unwrap();
        assert!(n.contains(&"10.0.0.200".parse::<std::net::Ipv4Addr>().unwrap()));
        assert!(!n.contains(&"10.0.1.2".parse::<std::net::Ipv4Addr>().unwrap()));
        assert_eq!(n.trunc().to_string(), "10.0.0.0/24");
        let all = Ipv4Net::new("1.2.3.4".parse().unwrap(), 0).unwrap();
        assert!(all.contains(&"8.8.8.8".parse::<std::net::Ipv4Addr>().unwrap()));
    }
}
