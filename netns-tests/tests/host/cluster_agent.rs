//! Two agents (the library, each with its own fake engine and fake kernels) joined
//! through one real etcd: a task on B is a backend in A's sandbox with the same VIP on
//! both; B gone and its lease revoked, the backend leaves A; a node name another live
//! node holds is refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vipd::agent::cluster::{load_lease, ClusterLink, LinkConfig};
use vipd::agent::{Agent, AgentConfig, KernelPorts};
use vipd::core::model::{Ipv4Net, NodeName, SandboxKey, ServiceName};
use vipd::docker::fake::{attached, bridge_network, running_container, FakeEngine};
use vipd::kernel::fake::FakeOpener;
use vipd::kernel::{FakeHost, Kernel};
use vipd::store::{Backoff, Cluster, Keys};

use crate::common::unique;
use crate::store::{runtime, Etcd};

const TTL: Duration = Duration::from_secs(3);
const CLIENT: &str = "claaaaaaaaaa";

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

/// One node: its fake engine with the `vipd` network, its fake kernels, its agent.
struct TestNode {
    engine: FakeEngine,
    kernel: Arc<Kernel<FakeOpener>>,
    agent: Agent,
    dir: PathBuf,
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn link_config(name: &str, address: &str, dir: &Path) -> LinkConfig {
    LinkConfig {
        node: NodeName::new(name).unwrap(),
        address: address.parse().unwrap(),
        range: net("10.230.0.0/16"),
        pool: net("10.253.0.0/16"),
        ttl: TTL,
        state_dir: dir.to_owned(),
        backoff: Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        },
    }
}

async fn cluster(etcd: &Etcd) -> Cluster {
    Cluster::new(etcd.kv().await, Keys::default())
}

async fn node(etcd: &Etcd, name: &str, address: &str) -> TestNode {
    let engine = FakeEngine::new();
    engine.set_networks(vec![bridge_network(&format!("vipd-{name}"), "vipd")]);
    let kernel = Arc::new(Kernel::new(FakeOpener::default()));
    let host = Arc::new(FakeHost::default());
    let ports = KernelPorts {
        sandboxes: kernel.clone(),
        host_firewall: host.clone(),
        host_ports: host,
    };
    let dir = std::env::temp_dir().join(unique(&format!("vipd-cluster-agent-{name}-")));
    let cfg = AgentConfig {
        pool: net("10.253.0.0/16"),
        state_dir: dir.clone(),
        grace: Duration::from_secs(60),
        resync: Duration::from_secs(3600),
        debounce: Duration::from_millis(5),
        sysctls: Default::default(),
        dns_domain: None,
        dns_ttl: 5,
        ingress: None,
        drain_grace: Duration::from_secs(30),
        timeouts: None,
        metrics: vipd::metrics::Metrics::disabled(),
    };
    let mut agent = Agent::new(Arc::new(engine.clone()), ports, cfg, None).unwrap();
    let link = ClusterLink::spawn(cluster(etcd).await, link_config(name, address, &dir));
    agent.join(link, "vipd");
    TestNode {
        engine,
        kernel,
        agent,
        dir,
    }
}

/// A running container of `node` on its `vipd` network at `ip`.
fn on_cluster(node: &str, id: &str, ip: &str, service: Option<&str>) -> vipd::docker::ContainerInfo {
    let c = running_container(id, id).with_network(attached(
        &format!("vipd-{node}"),
        "vipd",
        ip.parse().unwrap(),
    ));
    match service {
        Some(s) => c.with_label(vipd::core::labels::SERVICE, s),
        None => c,
    }
}

/// The backends of every IPVS service in A's client sandbox.
fn client_backends(a: &TestNode) -> Vec<String> {
    let key = SandboxKey::from(format!("/run/docker/netns/{CLIENT}").as_str());
    a.kernel.opener().inspect(&key, |k| k.backends(None))
}

/// Sync `nodes` again and again (their links work in between) until `done` holds.
async fn sync_until(nodes: &mut [&mut TestNode], what: &str, mut done: impl FnMut(&[&mut TestNode]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for n in nodes.iter_mut() {
            n.agent.relist().await.unwrap();
            n.agent.sync(false).await;
        }
        if done(nodes) {
            return;
        }
        assert!(Instant::now() < deadline, "not within 30 s: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn two_agents_through_a_real_etcd_share_a_vip_and_a_peers_task_until_its_lease_is_revoked() {
    let etcd = Etcd::start();
    runtime().block_on(async {
        let mut a = node(&etcd, "a", "192.0.2.1").await;
        let mut b = node(&etcd, "b", "192.0.2.2").await;
        a.engine
            .upsert_container(on_cluster("a", CLIENT, "10.230.0.9", None));
        b.engine
            .upsert_container(on_cluster("b", "w1bbbbbbbbbb", "10.230.1.3", Some("web")));
        sync_until(&mut [&mut a, &mut b], "B's task a backend in A's client", |n| {
            client_backends(n[0]) == ["10.230.1.3@1"]
        })
        .await;
        let web = ServiceName::new("web").unwrap();
        let vip = a.agent.allocations().get(&web);
        assert!(vip.is_some(), "A has the service");
        assert_eq!(vip, b.agent.allocations().get(&web), "one VIP and fwmark on both");
        let view = a.agent.cluster_link().unwrap().view();
        assert!(view.store.connected, "{:?}", view.store);
        assert_eq!(view.state.nodes.len(), 2);

        // A node name a live node holds is refused, and the view says why.
        let dup_dir = std::env::temp_dir().join(unique("vipd-cluster-agent-dup-"));
        let dup = ClusterLink::spawn(cluster(&etcd).await, link_config("a", "192.0.2.9", &dup_dir));
        let mut dup_view = dup.subscribe();
        let refused = tokio::time::timeout(
            Duration::from_secs(30),
            dup_view.wait_for(|v| v.problem.is_some()),
        )
        .await
        .expect("refused within 30 s")
        .unwrap()
        .clone();
        assert!(refused.me.is_none());
        assert!(
            refused
                .problem
                .as_deref()
                .unwrap()
                .contains("already registered by a live node"),
            "{:?}",
            refused.problem
        );
        drop(dup);
        let _ = std::fs::remove_dir_all(&dup_dir);

        // B goes away, its lease revoked: its task leaves A's client at once, not after
        // the TTL.
        let lease = load_lease(&b.dir).expect("B saved its lease");
        drop(b);
        etcd.kv().await.lease_revoke(lease).await.unwrap();
        let revoked = Instant::now();
        sync_until(&mut [&mut a], "B's task gone from A's client", |n| {
            client_backends(n[0]).is_empty()
        })
        .await;
        assert!(revoked.elapsed() < TTL * 3, "took {:?}", revoked.elapsed());
        assert_eq!(
            a.agent.cluster_link().unwrap().view().state.nodes.len(),
            1,
            "B's record went with its lease"
        );
    });
}
