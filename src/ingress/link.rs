//! The runtime plumbing of the ingress namespace: the veth pair to the host, its
//! addresses, the default route inside, and the threads and small runtimes whose
//! netlink sockets reach both sides.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::nsid::{NsidAttribute, NsidMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use nix::errno::Errno;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::sysctl::{ensure_sysctl, read_sysctl};
use super::{Changes, Ingress, IngressError, Side};
use crate::core::model::Ipv4Net;
use crate::netns::NetnsPath;

/// Delete the host end of the veth pair (its peer goes with it), on a thread of the
/// host namespace.
pub(super) fn remove_veth(plan: &Ingress) -> Result<(), IngressError> {
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
                let result = remove_host_veth(&host, plan).await;
                task.abort();
                result
            })
        })
    })?
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

/// Run `work` on a new thread, which starts in the calling thread's network namespace:
/// the runtime it builds never nests in one of the caller's.
pub(super) fn on_host_thread<R, F>(ns: &NetnsPath, work: F) -> Result<R, IngressError>
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    super::on_thread("vipd-ingress", ns, work)
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
pub(super) fn converge(plan: &Ingress, ns_file: &File, changes: &mut Changes) -> Result<bool, IngressError> {
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
    let want_host = Ipv4Net::new(plan.host_addr, plan.prefix).ok();
    let want_peer = Ipv4Net::new(plan.ingress_addr, plan.prefix).ok();
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
        if let Some(net) = local.and_then(|a| Ipv4Net::new(a, msg.header.prefix_len).ok()) {
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
            .add(index, want.addr().into(), want.prefix_len())
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
