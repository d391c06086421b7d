//! The one DNS address of the cluster: a link-local address on the cluster bridge, the
//! same on every node, so one compose file (`dns: [169.254.53.53]`) works everywhere
//! (as Kubernetes' node-local DNS cache does). Containers reach it as an address of
//! their gateway's host; the agent's DNS server listens on it.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::LinkAttribute;

/// The default DNS address: link-local (never routed off the link), easy to read.
pub const DEFAULT_DNS_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 53, 53);

/// Why the address could not be managed.
#[derive(Debug, thiserror::Error)]
pub enum DnsAddressError {
    #[error("cannot start a runtime for the netlink socket: {0}")]
    Runtime(std::io::Error),
    #[error("cannot open a netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("cannot {action}: {source}")]
    Netlink {
        action: String,
        source: rtnetlink::Error,
    },
    #[error("the cluster bridge {0} does not exist (is the cluster network created?)")]
    NoBridge(String),
}

/// Put `address`/32 on the bridge `bridge` (in the calling thread's namespace); returns
/// whether it was added (false: it was there already).
pub fn ensure(bridge: &str, address: Ipv4Addr) -> Result<bool, DnsAddressError> {
    let span = tracing::info_span!("dns_address", bridge, %address);
    let _entered = span.enter();
    on_bridge(bridge, address, |handle, index, found| async move {
        if !found.is_empty() {
            return Ok(false);
        }
        handle
            .address()
            .add(index, IpAddr::V4(address), 32)
            .execute()
            .await
            .map_err(|source| DnsAddressError::Netlink {
                action: format!("add {address}/32 to {bridge}"),
                source,
            })?;
        tracing::info!("DNS address added");
        Ok(true)
    })
}

/// Take `address` off the bridge `bridge`; returns whether it was there. A missing
/// bridge has no address to remove.
pub fn remove(bridge: &str, address: Ipv4Addr) -> Result<bool, DnsAddressError> {
    let span = tracing::info_span!("dns_address_remove", bridge, %address);
    let _entered = span.enter();
    let result = on_bridge(bridge, address, |handle, _, found| async move {
        let present = !found.is_empty();
        for msg in found {
            handle
                .address()
                .del(msg)
                .execute()
                .await
                .map_err(|source| DnsAddressError::Netlink {
                    action: format!("remove {address} from {bridge}"),
                    source,
                })?;
        }
        Ok(present)
    });
    match result {
        Err(DnsAddressError::NoBridge(_)) => Ok(false),
        other => other,
    }
}

/// Whether the address is on the bridge.
pub fn present(bridge: &str, address: Ipv4Addr) -> Result<bool, DnsAddressError> {
    on_bridge(
        bridge,
        address,
        |_, _, found| async move { Ok(!found.is_empty()) },
    )
}

fn has_local(attributes: &[AddressAttribute], address: Ipv4Addr) -> bool {
    attributes
        .iter()
        .any(|a| matches!(a, AddressAttribute::Local(IpAddr::V4(x)) | AddressAttribute::Address(IpAddr::V4(x)) if *x == address))
}

/// Run `work` with a netlink handle on the calling thread (the socket must belong to
/// the thread's namespace), the bridge's index and the bridge's addresses that are
/// `address` (none when it is not on it).
fn on_bridge<R, F, Fut>(bridge: &str, address: Ipv4Addr, work: F) -> Result<R, DnsAddressError>
where
    F: FnOnce(rtnetlink::Handle, u32, Vec<AddressMessage>) -> Fut,
    Fut: std::future::Future<Output = Result<R, DnsAddressError>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(DnsAddressError::Runtime)?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(DnsAddressError::Socket)?;
        let task = tokio::spawn(conn);
        let result = async {
            let index = bridge_index(&handle, bridge).await?;
            let mut addrs = handle.address().get().set_link_index_filter(index).execute();
            let mut found = Vec::new();
            while let Some(msg) = addrs
                .try_next()
                .await
                .map_err(|source| DnsAddressError::Netlink {
                    action: format!("list the addresses of {bridge}"),
                    source,
                })?
            {
                if has_local(&msg.attributes, address) {
                    found.push(msg);
                }
            }
            work(handle.clone(), index, found).await
        }
        .await;
        task.abort();
        result
    })
}

async fn bridge_index(handle: &rtnetlink::Handle, bridge: &str) -> Result<u32, DnsAddressError> {
    let mut links = handle.link().get().match_name(bridge.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(link))
            if link
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::IfName(n) if n == bridge)) =>
        {
            Ok(link.header.index)
        }
        Ok(_) => Err(DnsAddressError::NoBridge(bridge.to_owned())),
        Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc_enodev() => {
            Err(DnsAddressError::NoBridge(bridge.to_owned()))
        }
        Err(source) => Err(DnsAddressError::Netlink {
            action: format!("find the link {bridge}"),
            source,
        }),
    }
}

/// The kernel's answer to a link name it does not know.
fn libc_enodev() -> i32 {
    nix::errno::Errno::ENODEV as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_is_recognised_as_local_or_peer_attribute_only_for_itself() {
        let mine = DEFAULT_DNS_ADDRESS;
        assert!(has_local(&[AddressAttribute::Local(IpAddr::V4(mine))], mine));
        assert!(has_local(&[AddressAttribute::Address(IpAddr::V4(mine))], mine));
        assert!(!has_local(
            &[AddressAttribute::Local(IpAddr::V4(Ipv4Addr::new(10, 230, 1, 1)))],
            mine
        ));
        assert!(DEFAULT_DNS_ADDRESS.is_link_local());
    }
}
