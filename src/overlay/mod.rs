//! The kernel side of the VXLAN overlay (rtnetlink): observe vipd's VXLAN device and what
//! is on it, apply a [`plan`](crate::core::overlay::plan), tear it all down.
//!
//! Everything runs in the network namespace of the calling thread (a host's, or a test's
//! via [`crate::netns::run_in`]), over a socket opened on that thread with a small
//! runtime of its own. Only objects on vipd's device are read or changed: neighbours,
//! FDB entries and routes of other interfaces are never touched.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use netlink_packet_route::AddressFamily;
use nix::errno::Errno;
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};

use crate::core::overlay::{
    desired, plan, DeviceName, DeviceSpec, FdbEntry, MacAddr, Neighbour, Node, ObservedDevice,
    ObservedOverlay, OverlayConfig, OverlayError, OverlayOp, OverlayRoute, Vni,
};

/// Errors observing or programming the overlay.
#[derive(Debug, thiserror::Error)]
pub enum OverlayKernelError {
    /// The input was refused before anything was touched (a peer clashing with another).
    #[error(transparent)]
    Plan(#[from] OverlayError),
    /// The small runtime for the netlink socket could not be built.
    #[error("cannot start a runtime for the netlink socket: {0}")]
    Runtime(io::Error),
    /// The netlink socket could not be opened.
    #[error("cannot open a netlink socket: {0}")]
    Socket(io::Error),
    /// A netlink request failed; `action` names what it was for.
    #[error("cannot {action}: {source}")]
    Netlink {
        action: String,
        source: rtnetlink::Error,
    },
    /// The device's name is taken by a link that is not a VXLAN device: someone else's,
    /// which vipd will not delete.
    #[error("{device} is a {kind} link, not a VXLAN device; vipd will not replace it")]
    ForeignDevice { device: DeviceName, kind: String },
    /// The device is missing when an operation on it runs (deleted meanwhile).
    #[error("{0} is missing")]
    Missing(DeviceName),
}

fn netlink(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> OverlayKernelError {
    let action = action.into();
    move |source| OverlayKernelError::Netlink { action, source }
}

fn is_errno(e: &rtnetlink::Error, errno: Errno) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -(errno as i32))
}

/// Run `work` with a netlink handle opened on the calling thread, on a current-thread
/// runtime of its own: the socket must belong to the thread's namespace.
fn with_netlink<R, F, Fut>(work: F) -> Result<R, OverlayKernelError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<R, OverlayKernelError>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(OverlayKernelError::Runtime)?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(OverlayKernelError::Socket)?;
        let task = tokio::spawn(conn);
        let result = work(handle).await;
        task.abort();
        result
    })
}

/// Bring the overlay of `me` in the calling thread's namespace to what reaching `peers`
/// needs, and return the operations that took. A second call with the same input
/// returns none.
pub fn sync(config: &OverlayConfig, me: &Node, peers: &[Node]) -> Result<Vec<OverlayOp>, OverlayKernelError> {
    let span = tracing::info_span!("overlay", device = %config.device, node = %me.name, peers = peers.len());
    let _entered = span.enter();
    let want = desired(config, me, peers)?;
    with_netlink(|handle| async move {
        let kernel = Kernel::new(handle, config.device.clone());
        let observed = kernel.observe().await?;
        let ops = plan(&want, &observed.overlay);
        kernel.apply(observed.index, &ops).await?;
        Ok(ops)
    })
}

/// What the calling thread's namespace holds on the device `device`.
pub fn observe(device: &DeviceName) -> Result<ObservedOverlay, OverlayKernelError> {
    with_netlink(|handle| async move { Ok(Kernel::new(handle, device.clone()).observe().await?.overlay) })
}

/// Apply `ops` to the device `device` in the calling thread's namespace.
pub fn apply(device: &DeviceName, ops: &[OverlayOp]) -> Result<(), OverlayKernelError> {
    let span = tracing::info_span!("overlay_apply", device = %device, ops = ops.len());
    let _entered = span.enter();
    with_netlink(|handle| async move {
        let kernel = Kernel::new(handle, device.clone());
        let index = kernel.link().await?.map(|l| l.header.index);
        kernel.apply(index, ops).await
    })
}

/// Delete the device, and with it every neighbour, FDB entry and route on it. Returns
/// whether there was one. A link of that name that is no VXLAN device is left alone.
pub fn remove(device: &DeviceName) -> Result<bool, OverlayKernelError> {
    let span = tracing::info_span!("overlay_remove", device = %device);
    let _entered = span.enter();
    with_netlink(|handle| async move {
        let kernel = Kernel::new(handle, device.clone());
        let Some(link) = kernel.link().await? else {
            return Ok(false);
        };
        check_vxlan(device, &link)?;
        kernel.delete_device(link.header.index).await
    })
}

/// The device's kind, as the kernel names it (`vxlan`, `dummy`...), if it reports one.
fn link_kind(link: &LinkMessage) -> Option<&InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(kind) => Some(kind),
            _ => None,
        }),
        _ => None,
    })
}

fn check_vxlan(device: &DeviceName, link: &LinkMessage) -> Result<(), OverlayKernelError> {
    match link_kind(link) {
        Some(InfoKind::Vxlan) => Ok(()),
        other => Err(OverlayKernelError::ForeignDevice {
            device: device.clone(),
            kind: other.map_or_else(|| "kindless".to_owned(), |k| k.to_string()),
        }),
    }
}

/// The device as a plan sees it.
fn observed_device(link: &LinkMessage, addresses: std::collections::BTreeSet<Ipv4Net>) -> ObservedDevice {
    let mut dev = ObservedDevice {
        vni: None,
        local: None,
        port: None,
        // The kernel's default: a device that does not say it does not learn, learns.
        learning: true,
        mac: None,
        mtu: 0,
        up: link.header.flags.contains(LinkFlags::Up),
        addresses,
    };
    for attr in &link.attributes {
        match attr {
            LinkAttribute::Address(mac) => dev.mac = MacAddr::from_slice(mac),
            LinkAttribute::Mtu(mtu) => dev.mtu = *mtu,
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Data(InfoData::Vxlan(vx)) = info {
                        for v in vx {
                            match v {
                                InfoVxlan::Id(id) => dev.vni = Vni::new(*id).ok(),
                                InfoVxlan::Local(ip) => dev.local = Some(*ip),
                                InfoVxlan::Port(port) => dev.port = Some(*port),
                                InfoVxlan::Learning(on) => dev.learning = *on,
                                _ => {}
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    dev
}

fn neighbour_parts(msg: &NeighbourMessage) -> (Option<Ipv4Addr>, Option<MacAddr>) {
    let mut ip = None;
    let mut mac = None;
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(*a),
            // In an FDB entry (family AF_BRIDGE) the parser leaves the remote as bytes.
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                ip = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
            }
            NeighbourAttribute::LinkLayerAddress(l) => mac = MacAddr::from_slice(l),
            _ => {}
        }
    }
    (ip, mac)
}

/// A route of ours: main table, unicast, out of the device, to a prefix via a gateway.
/// The kernel's own routes (for an address with a prefix) are not.
fn overlay_route(r: &RouteMessage, index: u32) -> Option<OverlayRoute> {
    // The header names tables below 256, the main one among them; a table of a larger
    // id has RT_TABLE_COMPAT there and is not ours either.
    if r.header.table != RouteHeader::RT_TABLE_MAIN
        || r.header.kind != RouteType::Unicast
        || r.header.protocol == RouteProtocol::Kernel
    {
        return None;
    }
    let mut oif = None;
    let mut destination = None;
    let mut gateway = None;
    for attr in &r.attributes {
        match attr {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Destination(RouteAddress::Inet(a)) => destination = Some(*a),
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(*a),
            _ => {}
        }
    }
    if oif != Some(index) {
        return None;
    }
    Some(OverlayRoute {
        destination: Ipv4Net::new(destination?, r.header.destination_prefix_length).ok()?,
        gateway: gateway?,
    })
}

fn route_message(route: &OverlayRoute, index: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(route.destination.network(), route.destination.prefix_len())
        .gateway(route.gateway)
        .output_interface(index)
        .onlink()
        .build()
}

fn neighbour_message(n: &Neighbour, index: u32) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.ifindex = index;
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(n.ip)));
    msg
}

fn fdb_message(e: &FdbEntry, index: u32) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.flags = NeighbourFlags::Own;
    msg.header.state = NeighbourState::Permanent;
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(e.mac.octets().to_vec()));
    // With a destination the kernel deletes only that remote of the MAC's entry.
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(e.dst)));
    msg
}

/// The device as observed, with its interface index when it exists.
struct Observed {
    index: Option<u32>,
    overlay: ObservedOverlay,
}

/// One netlink handle, and the device it works on.
struct Kernel {
    handle: Handle,
    device: DeviceName,
}

impl Kernel {
    fn new(handle: Handle, device: DeviceName) -> Self {
        Kernel { handle, device }
    }

    /// The link called like the device, or `None`.
    async fn link(&self) -> Result<Option<LinkMessage>, OverlayKernelError> {
        let name = self.device.as_str();
        let mut links = self.handle.link().get().match_name(name.to_owned()).execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            Err(e) if is_errno(&e, Errno::ENODEV) => Ok(None),
            Err(e) => Err(netlink(format!("look up {name}"))(e)),
        }
    }

    async fn observe(&self) -> Result<Observed, OverlayKernelError> {
        let Some(link) = self.link().await? else {
            return Ok(Observed {
                index: None,
                overlay: ObservedOverlay::default(),
            });
        };
        check_vxlan(&self.device, &link)?;
        let index = link.header.index;
        let name = &self.device;

        let mut addresses = std::collections::BTreeSet::new();
        let mut addrs = self.handle.address().get().set_link_index_filter(index).execute();
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(netlink(format!("list the addresses of {name}")))?
        {
            for attr in &msg.attributes {
                if let AddressAttribute::Local(IpAddr::V4(a)) = attr {
                    addresses.extend(Ipv4Net::new(*a, msg.header.prefix_len).ok());
                }
            }
        }
        let device = observed_device(&link, addresses);

        let mut overlay = ObservedOverlay {
            device: Some(device),
            ..ObservedOverlay::default()
        };
        for msg in self.permanent_neighbours(AddressFamily::Inet, index).await? {
            if let (Some(ip), Some(mac)) = neighbour_parts(&msg) {
                overlay.neighbours.insert(Neighbour { ip, mac });
            }
        }
        // The FDB: AF_BRIDGE entries the device holds itself (NTF_SELF).
        for msg in self.permanent_neighbours(AddressFamily::Bridge, index).await? {
            if !msg.header.flags.contains(NeighbourFlags::Own) {
                continue;
            }
            if let (Some(dst), Some(mac)) = neighbour_parts(&msg) {
                overlay.fdb.insert(FdbEntry { mac, dst });
            }
        }

        let query = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let mut routes = self.handle.route().get(query).execute();
        while let Some(msg) = routes
            .try_next()
            .await
            .map_err(netlink(format!("list the routes of {name}")))?
        {
            overlay.routes.extend(overlay_route(&msg, index));
        }
        Ok(Observed {
            index: Some(index),
            overlay,
        })
    }

    /// The permanent entries of one neighbour table (`family`) on the device: the others
    /// are the kernel's cache, never vipd's.
    async fn permanent_neighbours(
        &self,
        family: AddressFamily,
        index: u32,
    ) -> Result<Vec<NeighbourMessage>, OverlayKernelError> {
        let mut dump = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute();
        let mut out = Vec::new();
        while let Some(msg) = dump.try_next().await.map_err(netlink(format!(
            "list the {family:?} neighbours of {}",
            self.device
        )))? {
            if msg.header.ifindex == index && msg.header.state == NeighbourState::Permanent {
                out.push(msg);
            }
        }
        Ok(out)
    }

    async fn apply(&self, mut index: Option<u32>, ops: &[OverlayOp]) -> Result<(), OverlayKernelError> {
        for op in ops {
            tracing::info!(%op, "overlay");
            index = self.apply_one(index, op).await?;
        }
        Ok(())
    }

    /// Apply one operation; returns the device's index afterwards.
    async fn apply_one(&self, index: Option<u32>, op: &OverlayOp) -> Result<Option<u32>, OverlayKernelError> {
        let name = &self.device;
        match op {
            OverlayOp::CreateDevice(spec) => return self.create_device(spec).await.map(Some),
            OverlayOp::DeleteDevice(_) => {
                if let Some(i) = index {
                    self.delete_device(i).await?;
                }
                return Ok(None);
            }
            _ => {}
        }
        let index = index.ok_or_else(|| OverlayKernelError::Missing(name.clone()))?;
        let what = format!("{op} on {name}");
        let neighbours = self.handle.neighbours();
        let result = match op {
            OverlayOp::CreateDevice(_) | OverlayOp::DeleteDevice(_) => Ok(()),
            OverlayOp::SetMtu(mtu) => {
                let msg = LinkUnspec::new_with_index(index).mtu(*mtu).build();
                self.handle.link().set(msg).execute().await
            }
            OverlayOp::SetUp => {
                let msg = LinkUnspec::new_with_index(index).up().build();
                self.handle.link().set(msg).execute().await
            }
            OverlayOp::AddAddress(a) => self.add_address(index, *a).await,
            OverlayOp::AddNeighbour(n) => {
                // Replace: a cached (non-permanent) entry for the address may be there.
                neighbours
                    .add(index, IpAddr::V4(n.ip))
                    .link_layer_address(&n.mac.octets())
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await
            }
            OverlayOp::DelNeighbour(n) => neighbours.del(neighbour_message(n, index)).execute().await,
            OverlayOp::AddFdb(e) => {
                neighbours
                    .add_bridge(index, &e.mac.octets())
                    .destination(IpAddr::V4(e.dst))
                    .flags(NeighbourFlags::Own)
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await
            }
            OverlayOp::DelFdb(e) => neighbours.del(fdb_message(e, index)).execute().await,
            OverlayOp::AddRoute(r) => {
                self.handle
                    .route()
                    .add(route_message(r, index))
                    .replace()
                    .execute()
                    .await
            }
            OverlayOp::DelRoute(r) => {
                let mut msg = route_message(r, index);
                // Any protocol: a route of this shape someone re-added by hand goes too.
                msg.header.protocol = RouteProtocol::Unspec;
                match self.handle.route().del(msg).execute().await {
                    // Gone meanwhile: what the operation wanted.
                    Err(e) if is_errno(&e, Errno::ESRCH) => Ok(()),
                    other => other,
                }
            }
        };
        result.map_err(netlink(what))?;
        Ok(Some(index))
    }

    async fn add_address(&self, index: u32, address: Ipv4Net) -> Result<(), rtnetlink::Error> {
        let request = self
            .handle
            .address()
            .add(index, IpAddr::V4(address.addr()), address.prefix_len());
        match request.execute().await {
            Err(e) if is_errno(&e, Errno::EEXIST) => Ok(()),
            other => other,
        }
    }

    /// Create the device, set up, and give it its address; returns its index.
    async fn create_device(&self, spec: &DeviceSpec) -> Result<u32, OverlayKernelError> {
        let name = &spec.name;
        // No lower device: the kernel routes the VXLAN packets by `local` and the peers'
        // addresses, so the overlay works on any L3 network, across routers.
        let msg = LinkVxlan::new(name.as_str(), spec.vni.get())
            .local(spec.local)
            .port(spec.port)
            .learning(false)
            .address(spec.mac.octets().to_vec())
            .mtu(spec.mtu)
            .up()
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(netlink(format!("create {name}")))?;
        let index = self
            .link()
            .await?
            .ok_or_else(|| OverlayKernelError::Missing(name.clone()))?
            .header
            .index;
        self.add_address(index, spec.address)
            .await
            .map_err(netlink(format!("add {} to {name}", spec.address)))?;
        Ok(index)
    }

    async fn delete_device(&self, index: u32) -> Result<bool, OverlayKernelError> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, Errno::ENODEV) => Ok(false),
            Err(e) => Err(netlink(format!("delete {}", self.device))(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::link::LinkHeader;

    fn vxlan_link(infos: Vec<InfoVxlan>, up: bool) -> LinkMessage {
        let mut link = LinkMessage::default();
        link.header = LinkHeader {
            index: 7,
            flags: if up { LinkFlags::Up } else { LinkFlags::empty() },
            ..LinkHeader::default()
        };
        link.attributes = vec![
            LinkAttribute::Address(vec![6, 0x76, 10, 230, 1, 0]),
            LinkAttribute::Mtu(1450),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Vxlan),
                LinkInfo::Data(InfoData::Vxlan(infos)),
            ]),
        ];
        link
    }

    #[test]
    fn a_vxlan_link_is_read_into_what_the_plan_compares() {
        let link = vxlan_link(
            vec![
                InfoVxlan::Id(4242),
                InfoVxlan::Local(Ipv4Addr::new(192, 168, 1, 1)),
                InfoVxlan::Port(4799),
                InfoVxlan::Learning(false),
            ],
            true,
        );
        let addr: Ipv4Net = "10.230.1.0/32".parse().unwrap();
        let dev = observed_device(&link, [addr].into());
        assert_eq!(
            dev,
            ObservedDevice {
                vni: Some(Vni::new(4242).unwrap()),
                local: Some(Ipv4Addr::new(192, 168, 1, 1)),
                port: Some(4799),
                learning: false,
                mac: Some(MacAddr([6, 0x76, 10, 230, 1, 0])),
                mtu: 1450,
                up: true,
                addresses: [addr].into(),
            }
        );
        assert!(check_vxlan(&DeviceName::new("vx").unwrap(), &link).is_ok());
    }

    #[test]
    fn a_device_that_does_not_say_it_does_not_learn_counts_as_learning() {
        let dev = observed_device(&vxlan_link(vec![InfoVxlan::Id(1)], false), Default::default());
        assert!(dev.learning);
        assert!(!dev.up);
    }

    #[test]
    fn an_fdb_entry_gives_its_mac_and_remote_whichever_way_the_remote_was_parsed() {
        let entry = FdbEntry {
            mac: MacAddr([6, 0x76, 10, 230, 2, 0]),
            dst: Ipv4Addr::new(192, 168, 1, 2),
        };
        let mut msg = fdb_message(&entry, 7);
        assert_eq!(neighbour_parts(&msg), (Some(entry.dst), Some(entry.mac)));
        // What a dump of AF_BRIDGE gives back.
        msg.attributes[1] = NeighbourAttribute::Destination(NeighbourAddress::Other(vec![192, 168, 1, 2]));
        assert_eq!(neighbour_parts(&msg), (Some(entry.dst), Some(entry.mac)));
    }

    #[test]
    fn a_link_of_another_kind_is_foreign() {
        let mut link = LinkMessage::default();
        link.attributes = vec![LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Dummy)])];
        let err = check_vxlan(&DeviceName::new("vx").unwrap(), &link).unwrap_err();
        assert!(
            matches!(&err, OverlayKernelError::ForeignDevice { kind, .. } if kind == "dummy"),
            "{err}"
        );
    }

    #[test]
    fn only_gateway_routes_out_of_the_device_in_the_main_table_are_ours() {
        let ours = OverlayRoute {
            destination: "10.230.2.0/24".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 230, 2, 0),
        };
        let msg = route_message(&ours, 7);
        assert_eq!(overlay_route(&msg, 7), Some(ours));
        assert_eq!(overlay_route(&msg, 8), None, "another device's");
        let mut kernel = msg.clone();
        kernel.header.protocol = RouteProtocol::Kernel;
        assert_eq!(overlay_route(&kernel, 7), None, "the kernel's own");
        let mut other_table = msg.clone();
        other_table.header.table = 100;
        assert_eq!(overlay_route(&other_table, 7), None, "another table's");
        let direct = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::new(10, 230, 2, 0), 24)
            .output_interface(7)
            .build();
        assert_eq!(overlay_route(&direct, 7), None, "no gateway");
    }
}
