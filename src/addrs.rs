//! The IPv4 addresses of one network namespace (rtnetlink), behind a narrow trait.
//!
//! vipd needs them to know, per backend network, which of the sandbox's own addresses
//! IPVS-forwarded packets must leave with.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressScope};

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
        let err = |e: &dyn std::fmt::Display| AddrsError::Netlink(e.to_string());
        // A small runtime of its own: this runs on the namespace's dedicated thread, and
        // the socket must be opened there.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| err(&e))?;
        rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| err(&e))?;
            let task = tokio::spawn(conn);
            let mut stream = handle.address().get().execute();
            let mut out = Vec::new();
            while let Some(msg) = stream.try_next().await.map_err(|e| err(&e))? {
                if msg.header.scope == AddressScope::Host {
                    continue;
                }
                for attr in &msg.attributes {
                    if let AddressAttribute::Local(IpAddr::V4(a)) = attr {
                        out.extend(Ipv4Net::new(*a, msg.header.prefix_len));
                    }
                }
            }
            task.abort();
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
    use netlink_packet_route::route::{RouteAddress, RouteAttribute};
    let err = |e: &dyn std::fmt::Display| AddrsError::Netlink(e.to_string());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| err(&e))?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| err(&e))?;
        let task = tokio::spawn(conn);
        let query = rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new().build();
        let mut stream = handle.route().get(query).execute();
        let mut out = Vec::new();
        while let Some(msg) = stream.try_next().await.map_err(|e| err(&e))? {
            let prefix = msg.header.destination_prefix_length;
            if prefix == 0 {
                continue;
            }
            for attr in &msg.attributes {
                if let RouteAttribute::Destination(RouteAddress::Inet(a)) = attr {
                    out.extend(Ipv4Net::new(*a, prefix));
                }
            }
        }
        task.abort();
        out.sort();
        out.dedup();
        Ok(out)
    })
}
