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

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::nsid::{NsidAttribute, NsidMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::core::model::Ipv4Net;
use crate::netns::{NetnsError, NetnsPath, NETNS_RUN_DIR};
use crate::sysctl::SysctlError;

/// The ingress namespace's default name (`/run/netns/vipd_ingress`).
pub const DEFAULT_NETNS_NAME: &str = "vipd_ingress";
/// The default name of the veth end in the host namespace.
pub const DEFAULT_HOST_IFACE: &str = "vipd-ingress";
/// The default name of the veth end inside the ingress namespace.
pub const DEFAULT_INGRESS_IFACE: &str = "vipd-host";

/// The longest interface name the kernel takes (`IFNAMSIZ` less the NUL).
const MAX_IFACE_LEN: usize = 15;
/// TCP state `LISTEN` as `/proc/net/tcp` prints it (`st` column).
const TCP_LISTEN: u8 = 0x0A;

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
        let prefix = self.subnet.prefix;
        if prefix > 30 {
            return Err(IngressError::Config {
                field: "subnet",
                value: self.subnet.to_string(),
                reason: "must be a /30 or larger (two usable addresses)",
            });
        }
        let network = u32::from(self.subnet.network().addr);
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

/// A transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
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

    ensure_netns(&ingress.netns, &mut changes)?;
    let ns_file = File::open(ingress.netns.path()).map_err(|source| NetnsError::Open {
        path: ingress.netns.clone(),
        source,
    })?;
    ingress.host_forwarding = on_host_thread(&ingress.netns, || converge(&ingress, &ns_file, &mut changes))??;
    if !ingress.host_forwarding {
        tracing::debug!("net.ipv4.ip_forward is 0 in the host namespace");
    }
    Ok((ingress, changes.0))
}

/// Delete the veth pair (both ends go with the host end) and the namespace's bind mount.
/// What is already gone is fine. A host interface of that name that is not a veth is left
/// alone and reported.
pub fn remove(cfg: &IngressConfig) -> Result<(), IngressError> {
    let plan = cfg.plan()?;
    let span = tracing::info_span!("ingress", netns = %plan.netns);
    let _entered = span.enter();

    on_host_thread(&plan.netns, || {
        with_runtime(&plan.netns, |rt| {
            let (conn, host, _) = {
                let _ctx = rt.enter();
                rtnetlink::new_connection().map_err(|source| IngressError::Socket {
                    netns: Side::Host.to_string(),
                    source,
                })?
            };
            rt.block_on(async {
                let task = tokio::spawn(conn);
                let result = remove_host_veth(&host, &plan).await;
                task.abort();
                result
            })
        })
    })??;

    let path = plan.netns.path();
    if unmount_all(path)? {
        tracing::info!("unmounted {}", plan.netns);
    }
    match fs::remove_file(path) {
        Ok(()) => tracing::info!("removed {}", plan.netns),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(IngressError::File {
                action: "remove",
                path: path.to_owned(),
                source,
            })
        }
    }
    Ok(())
}

async fn remove_host_veth(host: &Handle, plan: &Ingress) -> Result<(), IngressError> {
    let iface = &plan.host_iface;
    let Some(link) = link_by_name(host, iface, Side::Host).await? else {
        return Ok(());
    };
    check_veth(&link, iface, Side::Host)?;
    if delete_link(host, link.header.index, iface, Side::Host).await? {
        tracing::info!("deleted veth {iface} and its peer");
    }
    Ok(())
}

/// The ports held in the calling thread's network namespace: TCP sockets in state
/// LISTEN and every UDP socket (the kernel lists only bound ones), IPv4 and IPv6, from
/// `/proc/thread-self/net/{tcp,tcp6,udp,udp6}`. A missing IPv6 listing (IPv6 disabled)
/// counts as empty.
pub fn bound_ports() -> Result<BTreeSet<(Proto, u16)>, IngressError> {
    let mut out = BTreeSet::new();
    for (file, proto, optional) in [
        ("tcp", Proto::Tcp, false),
        ("tcp6", Proto::Tcp, true),
        ("udp", Proto::Udp, false),
        ("udp6", Proto::Udp, true),
    ] {
        let path = format!("/proc/thread-self/net/{file}");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if optional && e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(IngressError::ProcNet { path, source }),
        };
        let ports = parse_proc_net(&text, proto).map_err(|(line, text)| IngressError::ProcNetParse {
            path: path.clone(),
            line,
            text,
        })?;
        out.extend(ports.into_iter().map(|p| (proto, p)));
    }
    Ok(out)
}

/// The local ports of one `/proc/net/{tcp,udp}[6]` listing that are held: TCP sockets in
/// state LISTEN, every UDP socket. On a line it cannot read, its number (from 1) and text.
fn parse_proc_net(text: &str, proto: Proto) -> Result<Vec<u16>, (usize, String)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else {
            continue;
        };
        if first == "sl" {
            continue;
        }
        let local = fields.next();
        let _remote = fields.next();
        let state = fields.next();
        let parsed = local
            .and_then(|l| l.rsplit_once(':'))
            .and_then(|(_, port)| u16::from_str_radix(port, 16).ok())
            .zip(state.and_then(|s| u8::from_str_radix(s, 16).ok()));
        let Some((port, state)) = parsed else {
            return Err((n + 1, line.to_owned()));
        };
        if port == 0 || (proto == Proto::Tcp && state != TCP_LISTEN) {
            continue;
        }
        out.push(port);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// The namespace file.

/// What `/run/netns/<name>` is.
#[derive(Debug, PartialEq, Eq)]
enum NetnsFile {
    Absent,
    /// There, but not a network namespace (an empty file left by a crash halfway).
    NotNetns,
    Netns,
}

/// Whether `ns` is a mounted network namespace. The test is the kernel's own: `setns`
/// with `CLONE_NEWNET` on a throwaway thread succeeds only on a network namespace file
/// (an empty regular file, or another namespace type, gives `EINVAL`).
fn netns_file(ns: &NetnsPath) -> Result<NetnsFile, IngressError> {
    match crate::netns::run_in(ns, || ()) {
        Ok(()) => Ok(NetnsFile::Netns),
        Err(e) if e.is_absent() => Ok(NetnsFile::Absent),
        Err(e) if e.is_not_netns() => Ok(NetnsFile::NotNetns),
        Err(e) => Err(e.into()),
    }
}

/// Make sure `/run/netns/<name>` is a network namespace other than the caller's.
fn ensure_netns(ns: &NetnsPath, changes: &mut Changes) -> Result<(), IngressError> {
    match netns_file(ns)? {
        NetnsFile::Netns => {
            // A bind mount of the host's own namespace would have vipd rewire the host.
            let own = "/proc/thread-self/ns/net";
            let meta = |p: &Path| {
                fs::metadata(p)
                    .map(|m| (m.dev(), m.ino()))
                    .map_err(|source| IngressError::File {
                        action: "stat",
                        path: p.to_owned(),
                        source,
                    })
            };
            if meta(ns.path())? == meta(Path::new(own))? {
                return Err(IngressError::NetnsIsHost { path: ns.clone() });
            }
            Ok(())
        }
        state => {
            create_netns(ns)?;
            changes.push(if state == NetnsFile::Absent {
                format!("created network namespace {ns}")
            } else {
                format!("created network namespace {ns} (reusing a file that was not one)")
            });
            Ok(())
        }
    }
}

/// Create a named network namespace the way `ip netns add` does: `/run/netns` a shared
/// mount point (so other mount namespaces see the new mount), an empty file, and a new
/// namespace, made on a thread of its own, bind-mounted onto it.
fn create_netns(ns: &NetnsPath) -> Result<(), IngressError> {
    let path = ns.path();
    let dir = path.parent().unwrap_or(Path::new(NETNS_RUN_DIR));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|source| IngressError::File {
            action: "create directory",
            path: dir.to_owned(),
            source,
        })?;
    make_shared(dir)?;
    // Whatever is mounted there is not a network namespace: take it off.
    unmount_all(path)?;
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o000)
        .open(path)
        .map_err(|source| IngressError::File {
            action: "create",
            path: path.to_owned(),
            source,
        })?;
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("vipd-netns-new".into())
            .spawn_scoped(scope, || {
                // Only this thread moves; it ends right after the bind mount, which then
                // holds the namespace.
                unshare(CloneFlags::CLONE_NEWNET).map_err(|source| IngressError::Unshare {
                    path: ns.clone(),
                    source,
                })?;
                mount(
                    Some("/proc/thread-self/ns/net"),
                    path,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|source| IngressError::Mount {
                    action: "bind-mount a new network namespace onto",
                    path: path.to_owned(),
                    source,
                })
            })
            .map_err(|e| IngressError::Thread {
                path: ns.clone(),
                reason: e.to_string(),
            })?
            .join()
            .map_err(|_| IngressError::Thread {
                path: ns.clone(),
                reason: "panicked".into(),
            })?
    })
}

/// Make `dir` a shared mount point, bind-mounting it onto itself first if it is not a
/// mount point at all.
fn make_shared(dir: &Path) -> Result<(), IngressError> {
    let shared = || {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    let err = |action| {
        move |source| IngressError::Mount {
            action,
            path: dir.to_owned(),
            source,
        }
    };
    match shared() {
        Ok(()) => Ok(()),
        // Not a mount point.
        Err(Errno::EINVAL) => {
            mount(
                Some(dir),
                dir,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(err("bind-mount onto itself"))?;
            shared().map_err(err("make a shared mount point of"))
        }
        Err(source) => Err(err("make a shared mount point of")(source)),
    }
}

/// Unmount everything mounted on `path` (lazily, as `ip netns del` does). True if
/// something was.
fn unmount_all(path: &Path) -> Result<bool, IngressError> {
    // Mounts can be stacked; a bound keeps a kernel surprise from looping forever.
    for n in 0..16 {
        match umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) => {}
            Err(Errno::EINVAL | Errno::ENOENT) => return Ok(n > 0),
            Err(source) => {
                return Err(IngressError::Mount {
                    action: "unmount",
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
    Ok(true)
}

// ---------------------------------------------------------------------------------------
// Threads and runtimes.

/// Run `work` on a new thread, which starts in the calling thread's network namespace:
/// the runtime it builds never nests in one of the caller's.
fn on_host_thread<R, F>(ns: &NetnsPath, work: F) -> Result<R, IngressError>
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    let span = tracing::Span::current();
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("vipd-ingress".into())
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

fn with_runtime<R>(
    ns: &NetnsPath,
    work: impl FnOnce(&tokio::runtime::Runtime) -> Result<R, IngressError>,
) -> Result<R, IngressError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|source| IngressError::Runtime {
            path: ns.clone(),
            source,
        })?;
    work(&rt)
}

/// Everything after the namespace file, on a thread in the host namespace: links,
/// addresses, routes, sysctls. Returns whether the host forwards IPv4.
fn converge(plan: &Ingress, ns_file: &File, changes: &mut Changes) -> Result<bool, IngressError> {
    let ns = &plan.netns;
    with_runtime(ns, |rt| {
        let (host_conn, host, _) = {
            let _ctx = rt.enter();
            rtnetlink::new_connection().map_err(|source| IngressError::Socket {
                netns: Side::Host.to_string(),
                source,
            })?
        };
        let handle = rt.handle().clone();
        let (ingress_conn, ingress, _) = crate::netns::run_in(ns, move || {
            let _ctx = handle.enter();
            rtnetlink::new_connection()
        })?
        .map_err(|source| IngressError::Socket {
            netns: ns.to_string(),
            source,
        })?;
        rt.block_on(async {
            let tasks = [tokio::spawn(host_conn), tokio::spawn(ingress_conn)];
            let result = converge_links(plan, &host, &ingress, ns_file, changes).await;
            for t in tasks {
                t.abort();
            }
            result
        })
    })?;

    // /proc/sys/net shows the namespace of the thread that opens the file.
    let span = tracing::Span::current();
    crate::netns::run_in(ns, || {
        span.in_scope(|| ensure_sysctl("net.ipv4.ip_forward", 1, Side::Ingress(ns), &mut *changes))
    })??;
    ensure_sysctl(
        &format!("net.ipv4.conf.{}.route_localnet", plan.host_iface),
        1,
        Side::Host,
        changes,
    )?;
    Ok(read_sysctl("net.ipv4.ip_forward")? == 1)
}

// ---------------------------------------------------------------------------------------
// Links, addresses, routes.

async fn converge_links(
    plan: &Ingress,
    host: &Handle,
    ingress: &Handle,
    ns_file: &File,
    changes: &mut Changes,
) -> Result<(), IngressError> {
    let ns = &plan.netns;
    let inside = Side::Ingress(ns);
    let (host_if, peer_if) = (&plan.host_iface, &plan.ingress_iface);

    // The pair: keep it only if the host end's peer is `peer_if` in the ingress
    // namespace. The host's id for the ingress namespace is asked after the link
    // listing, which assigns ids to the namespaces of peers it reports.
    let mut host_link = link_by_name(host, host_if, Side::Host).await?;
    if let Some(link) = &host_link {
        check_veth(link, host_if, Side::Host)?;
        let reported = link.attributes.iter().fold((None, None), |acc, a| match a {
            LinkAttribute::LinkNetNsId(id) => (Some(*id), acc.1),
            LinkAttribute::Link(index) => (acc.0, Some(*index)),
            _ => acc,
        });
        let ours = match reported {
            (Some(nsid), Some(peer_index)) => {
                let want = nsid_of(host, ns_file, ns).await?;
                let peer = link_by_name(ingress, peer_if, inside).await?;
                want == Some(nsid) && peer.map(|p| p.header.index) == Some(peer_index)
            }
            _ => false,
        };
        if !ours {
            delete_link(host, link.header.index, host_if, Side::Host).await?;
            changes.push(format!(
                "deleted veth {host_if}: its peer is not {peer_if} in {ns}"
            ));
            host_link = None;
        }
    }
    if host_link.is_none() {
        if let Some(stale) = link_by_name(ingress, peer_if, inside).await? {
            delete_link(ingress, stale.header.index, peer_if, inside).await?;
            changes.push(format!(
                "deleted {peer_if} in {ns}: it was in the way of the veth peer"
            ));
        }
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer_if.clone())
            .setns_by_fd(ns_file.as_raw_fd())
            .build();
        let pair = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host_if.clone())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        host.link()
            .add(pair)
            .execute()
            .await
            .map_err(|source| IngressError::Netlink {
                action: format!("create veth {host_if} with its peer {peer_if} in {ns}"),
                source,
            })?;
        changes.push(format!("created veth pair {host_if} <-> {peer_if} (in {ns})"));
        host_link = link_by_name(host, host_if, Side::Host).await?;
    }
    let vanished = |iface: &str, side: Side<'_>| IngressError::Vanished {
        iface: iface.to_owned(),
        netns: side.to_string(),
    };
    let host_link = host_link.ok_or_else(|| vanished(host_if, Side::Host))?;
    let peer_link = link_by_name(ingress, peer_if, inside)
        .await?
        .ok_or_else(|| vanished(peer_if, inside))?;

    // Addresses first: a link that comes up with its address gets its subnet route.
    let (host_index, peer_index) = (host_link.header.index, peer_link.header.index);
    let want_host = Ipv4Net::new(plan.host_addr, plan.prefix);
    let want_peer = Ipv4Net::new(plan.ingress_addr, plan.prefix);
    for (handle, index, iface, want, side) in [
        (host, host_index, host_if, want_host, Side::Host),
        (ingress, peer_index, peer_if, want_peer, inside),
    ] {
        if let Some(want) = want {
            ensure_addr(handle, index, iface, want, side, changes).await?;
        }
    }

    ensure_up(host, &host_link, Side::Host, changes).await?;
    ensure_up(ingress, &peer_link, inside, changes).await?;
    let lo = link_by_name(ingress, "lo", inside)
        .await?
        .ok_or_else(|| vanished("lo", inside))?;
    ensure_up(ingress, &lo, inside, changes).await?;

    ensure_default_route(ingress, peer_index, peer_if, plan.host_addr, ns, changes).await
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn link_kind(link: &LinkMessage) -> Option<&InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

fn check_veth(link: &LinkMessage, iface: &str, side: Side<'_>) -> Result<(), IngressError> {
    match link_kind(link) {
        Some(InfoKind::Veth) => Ok(()),
        other => Err(IngressError::ForeignInterface {
            iface: iface.to_owned(),
            netns: side.to_string(),
            kind: other.map_or_else(|| "plain".to_owned(), ToString::to_string),
        }),
    }
}

fn is_errno(e: &rtnetlink::Error, errno: Errno) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -(errno as i32))
}

/// The link called `name`, or `None` if there is none.
async fn link_by_name(
    handle: &Handle,
    name: &str,
    side: Side<'_>,
) -> Result<Option<LinkMessage>, IngressError> {
    let mut links = handle.link().get().match_name(name).execute();
    match links.try_next().await {
        Ok(link) => Ok(link.filter(|l| link_name(l) == Some(name))),
        Err(e) if is_errno(&e, Errno::ENODEV) => Ok(None),
        Err(source) => Err(IngressError::Netlink {
            action: format!("look up {name} in {side}"),
            source,
        }),
    }
}

/// Delete a link; true if it was there to delete.
async fn delete_link(handle: &Handle, index: u32, name: &str, side: Side<'_>) -> Result<bool, IngressError> {
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(true),
        // Gone meanwhile: the kernel tears a veth down with its namespace's peer.
        Err(e) if is_errno(&e, Errno::ENODEV) => Ok(false),
        Err(source) => Err(IngressError::Netlink {
            action: format!("delete {name} in {side}"),
            source,
        }),
    }
}

/// The id the socket's namespace gives the namespace of `ns_file`, if it gave one.
async fn nsid_of(handle: &Handle, ns_file: &File, ns: &NetnsPath) -> Result<Option<i32>, IngressError> {
    let err = |source| IngressError::Netlink {
        action: format!("ask the host namespace's id for {ns}"),
        source,
    };
    // An open file's descriptor is never negative.
    let fd = ns_file.as_raw_fd().unsigned_abs();
    let mut msg = NsidMessage::default();
    msg.attributes.push(NsidAttribute::Fd(fd));
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNsId(msg));
    req.header.flags = NLM_F_REQUEST;
    let mut replies = handle.clone().request(req).map_err(err)?;
    let mut id = None;
    while let Some(reply) = replies.next().await {
        match reply.payload {
            NetlinkPayload::Error(e) if e.code.is_some() => {
                return Err(err(rtnetlink::Error::NetlinkError(e)))
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(m)) => {
                id = m.attributes.iter().find_map(|a| match a {
                    NsidAttribute::Id(id) if *id >= 0 => Some(*id),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    Ok(id)
}

/// Make `want` the only IPv4 address of the link (IPv6 link-local addresses are left).
async fn ensure_addr(
    handle: &Handle,
    index: u32,
    iface: &str,
    want: Ipv4Net,
    side: Side<'_>,
    changes: &mut Changes,
) -> Result<(), IngressError> {
    let mut have: Vec<(Ipv4Net, AddressMessage)> = Vec::new();
    let mut addrs = handle.address().get().set_link_index_filter(index).execute();
    loop {
        let msg = match addrs.try_next().await {
            Ok(Some(msg)) => msg,
            Ok(None) => break,
            Err(source) => {
                return Err(IngressError::Netlink {
                    action: format!("list the addresses of {iface} in {side}"),
                    source,
                })
            }
        };
        if msg.header.family != AddressFamily::Inet {
            continue;
        }
        let local = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(std::net::IpAddr::V4(a)) => Some(*a),
            _ => None,
        });
        if let Some(net) = local.and_then(|a| Ipv4Net::new(a, msg.header.prefix_len)) {
            have.push((net, msg));
        }
    }
    let mut present = false;
    for (net, msg) in have {
        if net == want {
            present = true;
            continue;
        }
        handle
            .address()
            .del(msg)
            .execute()
            .await
            .map_err(|source| IngressError::Netlink {
                action: format!("remove {net} from {iface} in {side}"),
                source,
            })?;
        changes.push(format!("removed stray address {net} from {iface} in {side}"));
    }
    if !present {
        handle
            .address()
            .add(index, want.addr.into(), want.prefix)
            .execute()
            .await
            .map_err(|source| IngressError::Netlink {
                action: format!("add {want} to {iface} in {side}"),
                source,
            })?;
        changes.push(format!("added {want} to {iface} in {side}"));
    }
    Ok(())
}

async fn ensure_up(
    handle: &Handle,
    link: &LinkMessage,
    side: Side<'_>,
    changes: &mut Changes,
) -> Result<(), IngressError> {
    if link.header.flags.contains(LinkFlags::Up) {
        return Ok(());
    }
    let name = link_name(link).unwrap_or("?");
    handle
        .link()
        .set(LinkUnspec::new_with_index(link.header.index).up().build())
        .execute()
        .await
        .map_err(|source| IngressError::Netlink {
            action: format!("set {name} up in {side}"),
            source,
        })?;
    changes.push(format!("set {name} up in {side}"));
    Ok(())
}

/// Make a default route via `gateway` on `index` the only default route of the main
/// table.
async fn ensure_default_route(
    handle: &Handle,
    index: u32,
    iface: &str,
    gateway: Ipv4Addr,
    ns: &NetnsPath,
    changes: &mut Changes,
) -> Result<(), IngressError> {
    let side = Side::Ingress(ns);
    let query = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let mut routes = handle.route().get(query).execute();
    let mut defaults: Vec<RouteMessage> = Vec::new();
    loop {
        match routes.try_next().await {
            Ok(Some(r)) => {
                if r.header.destination_prefix_length == 0 && route_table(&r) == MAIN_TABLE {
                    defaults.push(r);
                }
            }
            Ok(None) => break,
            Err(source) => {
                return Err(IngressError::Netlink {
                    action: format!("list the routes in {side}"),
                    source,
                })
            }
        }
    }
    let is_ours = |r: &RouteMessage| {
        let gw = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(*g),
            _ => None,
        });
        let oif = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        gw == Some(gateway) && oif == Some(index)
    };
    let mut present = false;
    for r in defaults {
        if is_ours(&r) && !present {
            present = true;
            continue;
        }
        handle
            .route()
            .del(r)
            .execute()
            .await
            .map_err(|source| IngressError::Netlink {
                action: format!("delete a stray default route in {side}"),
                source,
            })?;
        changes.push(format!("deleted a stray default route in {side}"));
    }
    if !present {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .output_interface(index)
            .build();
        handle
            .route()
            .add(route)
            .execute()
            .await
            .map_err(|source| IngressError::Netlink {
                action: format!("add a default route via {gateway} dev {iface} in {side}"),
                source,
            })?;
        changes.push(format!("added default route via {gateway} dev {iface} in {side}"));
    }
    Ok(())
}

const MAIN_TABLE: u32 = RouteHeader::RT_TABLE_MAIN as u32;

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

// ---------------------------------------------------------------------------------------
// Sysctls, as the calling thread's namespace shows them.

fn sysctl_path(name: &str) -> PathBuf {
    Path::new("/proc/sys").join(name.replace('.', "/"))
}

fn read_sysctl(name: &str) -> Result<i64, IngressError> {
    let path = sysctl_path(name);
    let text = fs::read_to_string(&path).map_err(|source| SysctlError::Read {
        path: path.display().to_string(),
        source,
    })?;
    text.trim().parse().map_err(|_| {
        SysctlError::Parse {
            path: path.display().to_string(),
            text,
        }
        .into()
    })
}

/// Set a sysctl of the calling thread's namespace unless it already has `value`. The
/// dots of `name` separate path parts (interface names here have none).
fn ensure_sysctl(name: &str, value: i64, side: Side<'_>, changes: &mut Changes) -> Result<(), IngressError> {
    if read_sysctl(name)? == value {
        return Ok(());
    }
    let path = sysctl_path(name);
    fs::write(&path, format!("{value}\n")).map_err(|source| SysctlError::Write {
        path: path.display().to_string(),
        value,
        source,
    })?;
    changes.push(format!("set {name}={value} in {side}"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        let (a, p) = s.split_once('/').unwrap();
        Ipv4Net::new(a.parse().unwrap(), p.parse().unwrap()).unwrap()
    }

    // Lines as this kernel printed them: a listener on 127.0.0.1:53 with one accepted
    // connection (both ends ESTABLISHED), a listener on [::]:8080, UDP bound on
    // 0.0.0.0:5353 and [::1]:161, and a connected UDP client socket.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0035 00000000:0000 0A 00000000:00000001 00:00000000 00000000     0        0 1099128 2 00000000565d7859 100 0 0 10 0
   1: 0100007F:0035 0100007F:83DA 01 00000000:00000000 00:00000000 00000000     0        0 0 1 000000000c042a11 20 0 0 10 -1
   2: 0100007F:83DA 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 1099129 2 00000000f1d5b1e7 20 0 0 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1099127 1 000000009066586b 100 0 0 10 0
";
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 1031: 0100007F:B79B 0100007F:14E9 01 00000000:00000000 00:00000000 00000000     0        0 1099132 2 000000001c340fd4 0
 8533: 00000000:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1099130 2 000000008d967220 0
";
    const UDP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 3341: 00000000000000000000000001000000:00A1 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1099131 2 00000000633cbef9 0
";

    #[test]
    fn tcp_counts_only_listening_sockets() {
        // 0x83DA (33754) is the ESTABLISHED client end: not a held port.
        assert_eq!(parse_proc_net(TCP, Proto::Tcp), Ok(vec![53]));
        assert_eq!(parse_proc_net(TCP6, Proto::Tcp), Ok(vec![8080]));
    }

    #[test]
    fn udp_counts_every_bound_socket() {
        assert_eq!(parse_proc_net(UDP, Proto::Udp), Ok(vec![5353, 0xB79B]));
        assert_eq!(parse_proc_net(UDP6, Proto::Udp), Ok(vec![161]));
    }

    #[test]
    fn an_empty_listing_has_no_ports() {
        let header = TCP.lines().next().unwrap();
        assert_eq!(parse_proc_net(header, Proto::Tcp), Ok(vec![]));
        assert_eq!(parse_proc_net("", Proto::Udp), Ok(vec![]));
    }

    #[test]
    fn a_line_it_cannot_read_is_reported_with_its_number() {
        let text = format!("{TCP}   3: garbage\n");
        let (line, text) = parse_proc_net(&text, Proto::Tcp).unwrap_err();
        assert_eq!(line, 5);
        assert!(text.contains("garbage"));
        assert!(parse_proc_net("   0: 0100007F:0035 00000000:0000 ZZ", Proto::Tcp).is_err());
    }

    #[test]
    fn protocols_print_as_iptables_writes_them() {
        assert_eq!(Proto::Tcp.to_string(), "tcp");
        assert_eq!(Proto::Udp.to_string(), "udp");
        assert!(Proto::Tcp < Proto::Udp);
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
