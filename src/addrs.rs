//! The IPv4 addresses of one network namespace (rtnetlink), behind a narrow trait.
//!
//! vipd needs them to know, per backend network, which of the sandbox's own addresses
//! IPVS-forwarded packets must leave with.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressScope};

pub use crate::cluster::subnet::HostRoute;
use crate::core::model::Ipv4Net;

/// Errors listing addresses.
#[derive(Debug, thiserror::Error)]
pub enum AddrsError {
    #[error("rtnetlink: {0}")]
    Netlink(String),
}

/// A namespace's own addresses.
pub trait Addresses {
    /// IPv4 addresses with their prefix length, host-scoped (loopback) ones excluded.
    fn ipv4(&mut self) -> Result<Vec<Ipv4Net>, AddrsError>;
}

/// The addresses of the calling thread's namespace, over rtnetlink.
#[derive(Debug, Default)]
pub struct RtnetlinkAddrs;

impl Addresses for RtnetlinkAddrs {
    fn ipv4(&mut self) -> Result<Vec<Ipv4Net>, AddrsError> {
        // This runs on the namespace's dedicated thread, where the socket must be opened.
        with_netlink(|handle| async move {
            let mut stream = handle.address().get().execute();
            let mut out = Vec::new();
            while let Some(msg) = stream.try_next().await.map_err(|e| netlink_error(&e))? {
                if msg.header.scope == AddressScope::Host {
                    continue;
                }
                for attr in &msg.attributes {
                    if let AddressAttribute::Local(IpAddr::V4(a)) = attr {
                        out.extend(Ipv4Net::new(*a, msg.header.prefix_len));
                    }
                }
            }
            out.sort();
            out.dedup();
            Ok(out)
        })
    }
}

/// A fixed list of addresses, for tests.
#[derive(Debug, Clone, Default)]
pub struct FakeAddrs(pub Vec<Ipv4Net>);

impl Addresses for FakeAddrs {
    fn ipv4(&mut self) -> Result<Vec<Ipv4Net>, AddrsError> {
        Ok(self.0.clone())
    }
}

/// The destinations of the calling thread's namespace's IPv4 routes, every table, the
/// default route left out: a VIP pool must not overlap any of them.
pub fn ipv4_routes() -> Result<Vec<Ipv4Net>, AddrsError> {
    let mut out: Vec<Ipv4Net> = route_table()?.into_iter().map(|(net, _)| net).collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// [`ipv4_routes`] with the device each leaves through (empty for a route without one,
/// such as a blackhole): the cluster range is checked against the routes that are not
/// vipd's own, which are told apart by their device.
pub fn ipv4_routes_by_device() -> Result<Vec<HostRoute>, AddrsError> {
    let names = link_names()?;
    let mut out: Vec<HostRoute> = route_table()?
        .into_iter()
        .map(|(destination, oif)| HostRoute {
            destination,
            device: oif.and_then(|i| names.get(&i).cloned()).unwrap_or_default(),
        })
        .collect();
    out.sort_by(|a, b| (a.destination, &a.device).cmp(&(b.destination, &b.device)));
    out.dedup();
    Ok(out)
}

/// Run `work` on a netlink handle of the calling thread's namespace, in a small runtime
/// of its own (the socket must be opened on the thread of the namespace).
fn with_netlink<R, F, Fut>(work: F) -> Result<R, AddrsError>
where
    F: FnOnce(rtnetlink::Handle) -> Fut,
    Fut: std::future::Future<Output = Result<R, AddrsError>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| netlink_error(&e))?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| netlink_error(&e))?;
        let task = tokio::spawn(conn);
        let result = work(handle).await;
        task.abort();
        result
    })
}

fn netlink_error(e: &dyn std::fmt::Display) -> AddrsError {
    AddrsError::Netlink(e.to_string())
}

/// Every IPv4 route but the default ones: destination, and output interface index.
fn route_table() -> Result<Vec<(Ipv4Net, Option<u32>)>, AddrsError> {
    use netlink_packet_route::route::{RouteAddress, RouteAttribute};
    with_netlink(|handle| async move {
        let query = rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new().build();
        let mut stream = handle.route().get(query).execute();
        let mut out = Vec::new();
        while let Some(msg) = stream.try_next().await.map_err(|e| netlink_error(&e))? {
            let prefix = msg.header.destination_prefix_length;
            if prefix == 0 {
                continue;
            }
            let oif = msg.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            for attr in &msg.attributes {
                if let RouteAttribute::Destination(RouteAddress::Inet(a)) = attr {
                    out.extend(Ipv4Net::new(*a, prefix).map(|net| (net, oif)));
                }
            }
        }
        Ok(out)
    })
}

/// The namespace's interfaces' names, by index.
fn link_names() -> Result<std::collections::BTreeMap<u32, String>, AddrsError> {
    use netlink_packet_route::link::LinkAttribute;
    with_netlink(|handle| async move {
        let mut stream = handle.link().get().execute();
        let mut out = std::collections::BTreeMap::new();
        while let Some(msg) = stream.try_next().await.map_err(|e| netlink_error(&e))? {
            let name = msg.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            });
            if let Some(name) = name {
                out.insert(msg.header.index, name);
            }
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_by_device_leaves_through_a_named_interface_of_this_namespace() {
        // Any namespace has its loopback's local routes (table local).
        let routes = ipv4_routes_by_device().expect("routes readable");
        let loopback: Vec<&HostRoute> = routes.iter().filter(|r| r.device == "lo").collect();
        assert!(!loopback.is_empty(), "{routes:?}");
        assert!(loopback
            .iter()
            .any(|r| r.destination.contains(&std::net::Ipv4Addr::LOCALHOST)));
        let plain = ipv4_routes().unwrap();
        for r in &routes {
            assert!(plain.contains(&r.destination), "{r:?} not in {plain:?}");
        }
    }
}
