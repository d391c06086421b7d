//! Who may query: the source networks every listener answers, shared so that a change
//! reaches the listeners without a rebind.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use ipnet::IpNet;

/// The source networks allowed to query. An empty list allows nobody. Clones share the
/// list: [`Acl::set`] changes it for every listener that holds one, with no rebind.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    networks: Arc<ArcSwap<Vec<IpNet>>>,
    /// Bumped by each [`Acl::set`], after the new list is in place.
    generation: Arc<AtomicU64>,
}

impl Acl {
    pub fn new(networks: impl IntoIterator<Item = IpNet>) -> Self {
        Acl {
            networks: Arc::new(ArcSwap::from_pointee(networks.into_iter().collect())),
            generation: Arc::default(),
        }
    }

    /// True when `ip` (an IPv4-mapped IPv6 address counts as IPv4) is in a network.
    pub fn allows(&self, ip: IpAddr) -> bool {
        contains(&self.networks.load(), ip)
    }

    /// Allow `networks` from now on, in every clone of this list.
    pub fn set(&self, networks: impl IntoIterator<Item = IpNet>) {
        self.networks.store(Arc::new(networks.into_iter().collect()));
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// A copy for one receive loop, which reads the shared list again only after a
    /// [`Acl::set`]: a query costs one atomic load, not a shared-pointer load.
    pub fn view(&self) -> AclView {
        AclView {
            generation: self.generation.load(Ordering::Acquire),
            networks: self.networks.load_full(),
            acl: self.clone(),
        }
    }
}

/// See [`Acl::view`].
#[derive(Debug)]
pub struct AclView {
    acl: Acl,
    generation: u64,
    networks: Arc<Vec<IpNet>>,
}

impl AclView {
    /// [`Acl::allows`], from the copy, taken again if the list changed.
    pub fn allows(&mut self, ip: IpAddr) -> bool {
        let now = self.acl.generation.load(Ordering::Acquire);
        if now != self.generation {
            self.generation = now;
            self.networks = self.acl.networks.load_full();
        }
        contains(&self.networks, ip)
    }
}

fn contains(networks: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    networks.iter().any(|n| n.contains(&ip))
}

/// `127.0.0.0/8` and `::1/128`: the host itself.
pub fn loopback_networks() -> Vec<IpNet> {
    ["127.0.0.0/8", "::1/128"]
        .iter()
        .map(|n| n.parse().expect("a valid network"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_matches_networks() {
        let acl = Acl::new(["10.0.0.0/24".parse().unwrap()]);
        assert!(acl.allows("10.0.0.200".parse().unwrap()));
        assert!(acl.allows("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!acl.allows("10.0.1.1".parse().unwrap()));
        assert!(!Acl::default().allows("127.0.0.1".parse().unwrap()));
        let lo = Acl::new(loopback_networks());
        assert!(lo.allows("127.1.2.3".parse().unwrap()));
        assert!(lo.allows("::1".parse().unwrap()));
        assert!(!lo.allows("::2".parse().unwrap()));
    }

    #[test]
    fn a_changed_acl_reaches_its_clones_and_their_views() {
        let acl = Acl::new(loopback_networks());
        let (clone, mut view) = (acl.clone(), acl.view());
        let ten: IpAddr = "10.0.0.7".parse().unwrap();
        assert!(!view.allows(ten) && view.allows("127.0.0.1".parse().unwrap()));
        acl.set(["10.0.0.0/24".parse().unwrap()]);
        assert!(clone.allows(ten) && view.allows(ten));
        assert!(!view.allows("127.0.0.1".parse().unwrap()));
    }
}
