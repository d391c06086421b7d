//! DNS on the gateway address of each Docker bridge network, the default when no
//! `--dns-listen` is given: containers use it with `--dns <gateway>`, or daemon-wide with
//! `"dns": [...]` in daemon.json. The listeners follow the networks as they come and go.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnet::IpNet;
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::acl::{loopback_networks, Acl};
use super::handle::CatalogHandle;
use super::server::{DnsConfig, DnsServer};
use crate::docker::NetworkInfo;

/// Where to listen and whom to answer, for a set of networks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GatewayPlan {
    pub listen: BTreeSet<SocketAddr>,
    pub allowed: Vec<IpNet>,
}

impl GatewayPlan {
    /// This plan, also serving `addr` to clients of `clients` (the cluster's one DNS
    /// address, asked by the containers of every node's slice of the cluster range).
    pub fn also(mut self, addr: SocketAddr, clients: IpNet) -> Self {
        self.listen.insert(addr);
        if !self.allowed.contains(&clients) {
            self.allowed.push(clients);
            self.allowed.sort();
        }
        self
    }
}

/// The plan for `networks`: port `port` on the IPv4 gateway of each bridge network (the
/// subnet's first address when Docker records none, as for its default `bridge`); clients
/// from any Docker network and the host itself.
pub fn plan(networks: &[NetworkInfo], port: u16) -> GatewayPlan {
    let mut listen = BTreeSet::new();
    let mut allowed = loopback_networks();
    for n in networks {
        for (addr, prefix) in &n.subnets {
            if let Ok(net) = ipnet::Ipv4Net::new(*addr, *prefix) {
                allowed.push(IpNet::V4(net.trunc()));
            }
        }
        if n.driver != "bridge" {
            continue;
        }
        let gateways: Vec<Ipv4Addr> = if n.gateways.is_empty() {
            n.subnets
                .iter()
                .filter(|(_, prefix)| *prefix < 31)
                .map(|(addr, prefix)| {
                    let net = ipnet::Ipv4Net::new(*addr, *prefix)
                        .map(|n| n.network())
                        .unwrap_or(*addr);
                    Ipv4Addr::from(u32::from(net) + 1)
                })
                .collect()
        } else {
            n.gateways.clone()
        };
        listen.extend(gateways.into_iter().map(|g| SocketAddr::new(IpAddr::V4(g), port)));
    }
    allowed.sort();
    allowed.dedup();
    GatewayPlan { listen, allowed }
}

/// The running listeners, one server per address, so that one address that cannot be
/// bound does not keep the others from serving.
pub struct GatewayDns {
    catalog: CatalogHandle,
    upstreams: Option<Vec<SocketAddr>>,
    current: GatewayPlan,
    running: Vec<Listener>,
    /// How many listeners were started (bound) so far.
    started: usize,
}

/// One address served: who may ask it, and how to stop it.
struct Listener {
    addr: SocketAddr,
    acl: Acl,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl GatewayDns {
    /// Nothing served yet; `upstreams` as in [`DnsConfig::upstreams`].
    pub fn new(catalog: CatalogHandle, upstreams: Option<Vec<SocketAddr>>) -> Self {
        GatewayDns {
            catalog,
            upstreams,
            current: GatewayPlan::default(),
            running: Vec::new(),
            started: 0,
        }
    }

    /// The addresses being served.
    pub fn serving(&self) -> Vec<SocketAddr> {
        self.running.iter().map(|l| l.addr).collect()
    }

    /// How many listeners were started (bound) so far.
    pub fn started(&self) -> usize {
        self.started
    }

    /// Whether every address of the plan is served.
    pub fn all_served(&self) -> bool {
        self.running.len() == self.current.listen.len()
    }

    /// Serve `plan`. A listener whose address stays keeps its sockets, and answers the
    /// plan's sources from now on: a network created or removed does not interrupt the
    /// others' DNS. Addresses that left are stopped, new ones bound; one that cannot be
    /// bound is reported and left out, and tried again at each update (the same plan
    /// again, every 10 s), which says so only when it works.
    pub async fn update(&mut self, plan: GatewayPlan) {
        if plan.allowed != self.current.allowed {
            for l in &self.running {
                l.acl.set(plan.allowed.iter().copied());
            }
        }
        let (kept, gone): (Vec<Listener>, Vec<Listener>) = self
            .running
            .drain(..)
            .partition(|l| plan.listen.contains(&l.addr));
        self.running = kept;
        for l in gone {
            let _ = l.stop.send(());
            let _ = l.task.await;
            info!(addr = %l.addr, "DNS listener stopped: its network is gone");
        }
        let serving: BTreeSet<SocketAddr> = self.serving().into_iter().collect();
        let missing: Vec<SocketAddr> = plan.listen.difference(&serving).copied().collect();
        let mut started = false;
        for addr in missing {
            let first = !self.current.listen.contains(&addr);
            started |= self.start(addr, &plan.allowed, first).await;
        }
        if started {
            info!(listen = ?self.serving(), "DNS serving on the Docker networks' gateways");
        }
        self.current = plan;
    }

    /// Serve `addr`; whether it could be bound. A failure is a warning the first time
    /// (`first`), debug on a retry.
    async fn start(&mut self, addr: SocketAddr, allowed: &[IpNet], first: bool) -> bool {
        let mut config = DnsConfig::new(vec![addr], allowed.to_vec());
        config.upstreams = self.upstreams.clone();
        match DnsServer::bind(config, self.catalog.clone()).await {
            Ok(server) => {
                self.started += 1;
                let acl = server.acl();
                let (stop, stopped) = oneshot::channel();
                let task = tokio::spawn(async move {
                    if let Err(e) = server
                        .run(async {
                            let _ = stopped.await;
                        })
                        .await
                    {
                        warn!(%addr, error = %e, "DNS listener failed");
                    }
                });
                self.running.push(Listener {
                    addr,
                    acl,
                    stop,
                    task,
                });
                true
            }
            Err(e) if first => {
                warn!(error = %e, "DNS not served on this address; trying again every 10 s");
                false
            }
            Err(e) => {
                tracing::debug!(error = %e, "DNS still not served on this address");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::containers::NetworkId;

    fn net(name: &str, driver: &str, subnet: &str, gateway: Option<&str>) -> NetworkInfo {
        let (a, p) = subnet.split_once('/').unwrap();
        NetworkInfo {
            id: NetworkId(name.into()),
            name: name.into(),
            driver: driver.into(),
            subnets: vec![(a.parse().unwrap(), p.parse().unwrap())],
            gateways: gateway.map(|g| vec![g.parse().unwrap()]).unwrap_or_default(),
        }
    }

    #[test]
    fn the_cluster_address_is_served_too_and_the_cluster_range_may_ask() {
        let base = plan(&[net("vipd", "bridge", "10.230.1.0/24", Some("10.230.1.1"))], 53);
        let dns: SocketAddr = "169.254.53.53:53".parse().unwrap();
        let range: IpNet = "10.230.0.0/16".parse().unwrap();
        let p = base.clone().also(dns, range);
        assert_eq!(
            p.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            ["10.230.1.1:53", "169.254.53.53:53"]
        );
        assert!(p.allowed.contains(&range), "{:?}", p.allowed);
        assert!(base.allowed.iter().all(|n| p.allowed.contains(n)));
        assert_eq!(p.clone().also(dns, range), p, "adding it twice changes nothing");
    }

    #[test]
    fn each_bridge_gateway_is_served_and_every_docker_network_may_ask() {
        let p = plan(
            &[
                net("bridge", "bridge", "172.17.0.0/16", None),
                net("front", "bridge", "10.1.0.0/24", Some("10.1.0.254")),
                net("over", "overlay", "10.9.0.0/24", Some("10.9.0.1")),
            ],
            53,
        );
        let listen: Vec<String> = p.listen.iter().map(|a| a.to_string()).collect();
        assert_eq!(listen, ["10.1.0.254:53", "172.17.0.1:53"]);
        let allowed: Vec<String> = p.allowed.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            allowed,
            [
                "10.1.0.0/24",
                "10.9.0.0/24",
                "127.0.0.0/8",
                "172.17.0.0/16",
                "::1/128"
            ]
        );
    }

    #[test]
    fn no_networks_no_listeners_but_the_host_may_ask() {
        let p = plan(&[], 53);
        assert!(p.listen.is_empty());
        assert_eq!(p.allowed, loopback_networks());
    }

    #[tokio::test]
    async fn listeners_follow_the_plan_and_a_bad_address_does_not_stop_the_others() {
        let mut dns = GatewayDns::new(CatalogHandle::default(), Some(vec![]));
        let mut plan = GatewayPlan {
            listen: BTreeSet::from(["127.0.0.1:0".parse().unwrap()]),
            allowed: loopback_networks(),
        };
        dns.update(plan.clone()).await;
        assert_eq!(dns.serving().len(), 1);
        // 192.0.2.1 (TEST-NET-1) is no address of this host: it cannot be bound.
        plan.listen.insert("192.0.2.1:0".parse().unwrap());
        dns.update(plan.clone()).await;
        assert_eq!(dns.serving(), vec!["127.0.0.1:0".parse::<SocketAddr>().unwrap()]);
        dns.update(GatewayPlan::default()).await;
        assert!(dns.serving().is_empty());
    }

    /// The response code of a query for `web.` A sent to `addr` over UDP.
    async fn rcode(addr: SocketAddr) -> u8 {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        query.extend_from_slice(b"\x03web\x00\x00\x01\x00\x01");
        socket.send_to(&query, addr).await.unwrap();
        let mut buf = [0u8; 512];
        let (n, _) = tokio::time::timeout(std::time::Duration::from_secs(5), socket.recv_from(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(n >= 12 && buf[..2] == [0x12, 0x34]);
        buf[3] & 0x0f
    }

    #[tokio::test]
    async fn a_listener_whose_address_stays_keeps_serving_and_takes_the_new_sources() {
        const REFUSED: u8 = 5;
        let free = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut dns = GatewayDns::new(CatalogHandle::default(), Some(vec![]));
        let mut plan = GatewayPlan {
            listen: BTreeSet::from([free]),
            allowed: loopback_networks(),
        };
        dns.update(plan.clone()).await;
        assert_eq!((dns.serving(), dns.started()), (vec![free], 1));
        assert_ne!(rcode(free).await, REFUSED);
        // A network comes (a new gateway, a new source network) and the host is no
        // longer among the sources: the listener is not bound again, and refuses.
        plan.listen.insert("127.0.0.1:0".parse().unwrap());
        plan.allowed = vec!["10.1.0.0/24".parse().unwrap()];
        dns.update(plan.clone()).await;
        assert_eq!(dns.serving().len(), 2);
        assert_eq!(dns.started(), 2, "only the new address was bound");
        assert_eq!(rcode(free).await, REFUSED);
        // The new address goes again: the first one still serves, as it was.
        plan.listen.remove(&"127.0.0.1:0".parse().unwrap());
        plan.allowed = loopback_networks();
        dns.update(plan).await;
        assert_eq!((dns.serving(), dns.started()), (vec![free], 2));
        assert_ne!(rcode(free).await, REFUSED);
    }

    #[tokio::test]
    async fn an_address_held_by_another_socket_is_served_once_it_is_free() {
        let blocker = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = blocker.local_addr().unwrap();
        let mut dns = GatewayDns::new(CatalogHandle::default(), Some(vec![]));
        let plan = GatewayPlan {
            listen: BTreeSet::from([addr]),
            allowed: loopback_networks(),
        };
        dns.update(plan.clone()).await;
        assert!(dns.serving().is_empty() && !dns.all_served());
        dns.update(plan.clone()).await;
        assert!(dns.serving().is_empty(), "still held");
        drop(blocker);
        dns.update(plan).await;
        assert_eq!(dns.serving(), vec![addr]);
        assert!(dns.all_served());
    }
}
