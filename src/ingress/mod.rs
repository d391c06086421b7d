//! The kernel side of the routing mesh's ingress namespace.
//!
//! The host DNATs a published port to an address inside a network namespace vipd owns, the
//! *ingress namespace*, where IPVS spreads connections over the tasks. This module creates
//! and repairs that namespace and its link to the host:
//!
//! - the named namespace, a bind mount under `/run/netns` made the way `ip netns add`
//!   makes it (so `ip netns exec` and `ip -n` see it);
//! - a veth pair: one end in the host namespace, its peer inside the ingress namespace,
//!   each with an address of a small subnet, both up, `lo` up inside;
//! - inside, a default route back through the host end, and `net.ipv4.ip_forward=1`;
//! - on the host, `route_localnet` on the host end, so `127.0.0.1:PORT` can be DNATed in.
//!
//! The iptables rules and IPVS services inside belong to the reconciler, not to this
//! module.
//!
//! "The host namespace" is always the calling thread's. The ingress side is reached with a
//! netlink socket opened on a thread that entered it ([`crate::netns::run_in`]); a netlink
//! socket keeps the namespace it was opened in, so both sockets then serve one small
//! runtime. Nothing here ever enters a namespace on the caller's thread.
//!
//! By concern: `netns_file` the namespace's bind mount and its removal, `link` the
//! runtime plumbing (the veth pair, addresses, routes, the threads and runtimes that
//! reach both sides), `sysctl` the sysctls, `ports` the host ports already held
//! ([`bound_ports`]).

mod link;
mod netns_file;
mod ports;
mod sysctl;

use std::fmt;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::core::model::Ipv4Net;
use crate::netns::{NetnsError, NetnsPath};
use crate::sysctl::SysctlError;

pub use ports::bound_ports;

/// The ingress namespace's default name (`/run/netns/vipd_ingress`).
pub const DEFAULT_NETNS_NAME: &str = "vipd_ingress";
/// The default name of the veth end in the host namespace.
pub const DEFAULT_HOST_IFACE: &str = "vipd-ingress";
/// The default name of the veth end inside the ingress namespace.
pub const DEFAULT_INGRESS_IFACE: &str = "vipd-host";

/// The longest interface name the kernel takes (`IFNAMSIZ` less the NUL).
const MAX_IFACE_LEN: usize = 15;

/// What the ingress namespace and its link to the host should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressConfig {
    /// The namespace's name: the bind mount `/run/netns/<name>`, as `ip netns add` makes.
    pub netns_name: String,
    /// The veth pair's subnet, a /30 or larger: the host end gets its first usable
    /// address, the ingress end the second.
    pub subnet: Ipv4Net,
    /// The veth end in the host namespace.
    pub host_iface: String,
    /// The veth end inside the ingress namespace.
    pub ingress_iface: String,
}

impl IngressConfig {
    /// A configuration with the default interface names.
    pub fn new(netns_name: impl Into<String>, subnet: Ipv4Net) -> Self {
        IngressConfig {
            netns_name: netns_name.into(),
            subnet,
            host_iface: DEFAULT_HOST_IFACE.to_owned(),
            ingress_iface: DEFAULT_INGRESS_IFACE.to_owned(),
        }
    }

    /// Check the names and the subnet, and work out the addresses.
    fn plan(&self) -> Result<Ingress, IngressError> {
        check_netns_name(&self.netns_name)?;
        check_iface("host_iface", &self.host_iface)?;
        check_iface("ingress_iface", &self.ingress_iface)?;
        let prefix = self.subnet.prefix_len();
        if prefix > 30 {
            return Err(IngressError::Config {
                field: "subnet",
                value: self.subnet.to_string(),
                reason: "must be a /30 or larger (two usable addresses)",
            });
        }
        let network = u32::from(self.subnet.network());
        Ok(Ingress {
            netns: NetnsPath::from_arg(&self.netns_name),
            host_addr: Ipv4Addr::from(network + 1),
            ingress_addr: Ipv4Addr::from(network + 2),
            host_iface: self.host_iface.clone(),
            ingress_iface: self.ingress_iface.clone(),
            prefix,
            host_forwarding: false,
        })
    }
}

fn check_netns_name(name: &str) -> Result<(), IngressError> {
    let bad = |reason| {
        Err(IngressError::Config {
            field: "netns_name",
            value: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name == "." || name == ".." {
        return bad("must be a file name");
    }
    if name.contains('/') || name.contains('\0') {
        return bad("must be a name under /run/netns, not a path");
    }
    Ok(())
}

fn check_iface(field: &'static str, name: &str) -> Result<(), IngressError> {
    let bad = |reason| {
        Err(IngressError::Config {
            field,
            value: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.len() > MAX_IFACE_LEN {
        return bad("an interface name has 1 to 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("not a valid interface name");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return bad("an interface name has no '/', ':', spaces or control characters");
    }
    Ok(())
}

/// The ingress namespace and its link to the host, as [`ensure`] left them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Ingress {
    /// The namespace's bind mount.
    pub netns: NetnsPath,
    /// The address of the host end; the ingress namespace's default gateway.
    pub host_addr: Ipv4Addr,
    /// The address of the ingress end: where the host DNATs published ports.
    pub ingress_addr: Ipv4Addr,
    /// The veth end in the host namespace.
    pub host_iface: String,
    /// The veth end inside the ingress namespace.
    pub ingress_iface: String,
    /// The prefix length of both addresses.
    pub prefix: u8,
    /// Whether the host namespace forwards IPv4 (`net.ipv4.ip_forward` is 1). vipd does
    /// not change it; without it, published ports reach the ingress only from the host
    /// itself, so the caller should warn.
    pub host_forwarding: bool,
}

/// Errors creating, repairing or removing the ingress namespace.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    /// A field of [`IngressConfig`] is not usable.
    #[error("invalid ingress {field} {value:?}: {reason}")]
    Config {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    /// A file or directory operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    File {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A mount operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Mount {
        action: &'static str,
        path: PathBuf,
        source: nix::Error,
    },
    /// `unshare(CLONE_NEWNET)` failed.
    #[error("cannot create a network namespace for {path}: {source}")]
    Unshare { path: NetnsPath, source: nix::Error },
    /// The named namespace is the caller's own: using it would rewire the host.
    #[error("{path} is the calling thread's own network namespace, not a separate one")]
    NetnsIsHost { path: NetnsPath },
    /// The namespace could not be opened or entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A worker thread could not be started or panicked.
    #[error("ingress worker thread for {path} failed: {reason}")]
    Thread { path: NetnsPath, reason: String },
    /// The small runtime for the netlink sockets could not be built.
    #[error("cannot start a runtime for the netlink sockets of {path}: {source}")]
    Runtime { path: NetnsPath, source: io::Error },
    /// A netlink socket could not be opened.
    #[error("cannot open a netlink socket in {netns}: {source}")]
    Socket { netns: String, source: io::Error },
    /// A netlink request failed; `action` names the interface, address or route.
    #[error("cannot {action}: {source}")]
    Netlink {
        action: String,
        source: rtnetlink::Error,
    },
    /// The host end's name is taken by something that is not a veth.
    #[error("{iface} in {netns} is a {kind} link, not a veth; vipd will not replace it")]
    ForeignInterface {
        iface: String,
        netns: String,
        kind: String,
    },
    /// An interface just created cannot be found.
    #[error("{iface} cannot be found in {netns} right after it was created")]
    Vanished { iface: String, netns: String },
    /// A sysctl could not be read or written.
    #[error(transparent)]
    Sysctl(#[from] SysctlError),
    /// A socket listing could not be read.
    #[error("cannot read {path}: {source}")]
    ProcNet { path: String, source: io::Error },
    /// A socket listing has a line this parser does not understand.
    #[error("{path} line {line}: cannot parse {text:?}")]
    ProcNetParse { path: String, line: usize, text: String },
}

/// What [`ensure`] changed, logged as it happens.
#[derive(Debug, Default)]
struct Changes(Vec<String>);

impl Changes {
    fn push(&mut self, change: String) {
        tracing::info!("{change}");
        self.0.push(change);
    }
}

/// Where a netlink socket or a link is, for messages.
#[derive(Debug, Clone, Copy)]
enum Side<'a> {
    Host,
    Ingress(&'a NetnsPath),
}

impl fmt::Display for Side<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Side::Host => f.write_str("the host namespace"),
            Side::Ingress(ns) => ns.fmt(f),
        }
    }
}

/// Create or repair the ingress namespace and its link to the host, from the calling
/// thread's network namespace (the host). Returns what it is now and what was changed
/// (empty when everything was already right).
///
/// Idempotent: what is right is left alone (an existing veth pair whose peer is the right
/// interface in the ingress namespace is kept, addresses and routes are only added or
/// removed when they differ, sysctls only written when they differ).
///
/// Refuses a namespace file that is a bind mount of the caller's own namespace, and a
/// host interface of the configured name that is not a veth. Blocking: the work runs on
/// threads of its own (each with its own small runtime), so it may be called from
/// `spawn_blocking` or any plain thread.
pub fn ensure(cfg: &IngressConfig) -> Result<(Ingress, Vec<String>), IngressError> {
    let mut ingress = cfg.plan()?;
    let span = tracing::info_span!("ingress", netns = %ingress.netns);
    let _entered = span.enter();
    let mut changes = Changes::default();

    netns_file::ensure_netns(&ingress.netns, &mut changes)?;
    let ns_file = File::open(ingress.netns.path()).map_err(|source| NetnsError::Open {
        path: ingress.netns.clone(),
        source,
    })?;
    ingress.host_forwarding = link::on_host_thread(&ingress.netns, || {
        link::converge(&ingress, &ns_file, &mut changes)
    })??;
    if !ingress.host_forwarding {
        tracing::debug!("net.ipv4.ip_forward is 0 in the host namespace");
    }
    Ok((ingress, changes.0))
}

/// Run `work` on a new thread called `name` and wait for it; a thread that cannot start
/// or panics is an error about `ns`. The thread starts in the calling thread's network
/// namespace and in its tracing span.
fn on_thread<R, F>(name: &str, ns: &NetnsPath, work: F) -> Result<R, IngressError>
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    let span = tracing::Span::current();
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn_scoped(scope, move || span.in_scope(work))
            .map_err(|e| IngressError::Thread {
                path: ns.clone(),
                reason: e.to_string(),
            })?
            .join()
            .map_err(|_| IngressError::Thread {
                path: ns.clone(),
                reason: "panicked".into(),
            })
    })
}

/// Delete the veth pair (both ends go with the host end) and the namespace's bind mount.
/// What is already gone is fine. A host interface of that name that is not a veth is left
/// alone and reported.
pub fn remove(cfg: &IngressConfig) -> Result<(), IngressError> {
    let plan = cfg.plan()?;
    let span = tracing::info_span!("ingress", netns = %plan.netns);
    let _entered = span.enter();
    link::remove_veth(&plan)?;
    netns_file::remove_netns(&plan.netns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        let (a, p) = s.split_once('/').unwrap();
        Ipv4Net::new(a.parse().unwrap(), p.parse().unwrap()).unwrap()
    }

    #[test]
    fn addresses_are_the_first_two_of_the_subnet() {
        let cfg = IngressConfig::new("vipd_ingress", net("172.30.255.5/30"));
        let plan = cfg.plan().unwrap();
        assert_eq!(plan.host_addr, Ipv4Addr::new(172, 30, 255, 5));
        assert_eq!(plan.ingress_addr, Ipv4Addr::new(172, 30, 255, 6));
        assert_eq!(plan.prefix, 30);
        assert_eq!(plan.netns.to_string(), "/run/netns/vipd_ingress");
        assert_eq!(plan.host_iface, DEFAULT_HOST_IFACE);
        assert_eq!(plan.ingress_iface, DEFAULT_INGRESS_IFACE);

        let wide = IngressConfig::new("x", net("10.9.0.0/24")).plan().unwrap();
        assert_eq!(wide.host_addr, Ipv4Addr::new(10, 9, 0, 1));
        assert_eq!(wide.ingress_addr, Ipv4Addr::new(10, 9, 0, 2));
    }

    #[test]
    fn bad_configurations_are_refused_with_the_field() {
        let ok = IngressConfig::new("vipd_ingress", net("10.0.0.0/30"));
        let field = |cfg: IngressConfig| match cfg.plan() {
            Err(IngressError::Config { field, .. }) => field,
            other => panic!("{cfg:?} gave {other:?}"),
        };
        for bad in ["", ".", "..", "a/b", "/run/netns/x"] {
            let cfg = IngressConfig {
                netns_name: bad.into(),
                ..ok.clone()
            };
            assert_eq!(field(cfg), "netns_name");
        }
        for bad in ["", "sixteen-chars-xx", "a b", "a/b", "a:b"] {
            let cfg = IngressConfig {
                host_iface: bad.into(),
                ..ok.clone()
            };
            assert_eq!(field(cfg), "host_iface");
            let cfg = IngressConfig {
                ingress_iface: bad.into(),
                ..ok.clone()
            };
            assert_eq!(field(cfg), "ingress_iface");
        }
        for small in ["10.0.0.0/31", "10.0.0.1/32"] {
            let cfg = IngressConfig {
                subnet: net(small),
                ..ok.clone()
            };
            assert_eq!(field(cfg), "subnet");
        }
        let longest = IngressConfig {
            host_iface: "fifteen-chars-x".into(),
            ..ok
        };
        assert!(longest.plan().is_ok());
    }
}
