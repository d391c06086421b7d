use std::time::Duration;

use super::*;
use crate::agent::tests::{config, ports, tempdir, Recorder};
use crate::agent::{pipeline, Agent};
use crate::core::alloc::Allocations;
use crate::core::containers::fixture::container;
use crate::docker::fake::{attached, bridge_network, running_container, FakeEngine};
use crate::docker::ContainerInfo;
use crate::store::kv::Kv;
use crate::store::memory::MemoryKv;
use crate::store::Keys;

const TTL: Duration = Duration::from_secs(10);

fn node(name: &str) -> NodeName {
    NodeName::new(name).unwrap()
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn link_config(name: &str, address: &str, dir: &Path) -> LinkConfig {
    LinkConfig {
        node: node(name),
        address: address.parse().unwrap(),
        range: net("10.230.0.0/16"),
        pool: net("10.253.0.0/16"),
        ttl: TTL,
        state_dir: dir.to_owned(),
        backoff: Backoff::default(),
    }
}

/// A container on this node's cluster network (`vipd`, whose id differs on each node).
fn on_cluster(node: &str, id: &str, ip: &str, labels: &[(&str, &str)]) -> ContainerInfo {
    let mut c = running_container(id, id).with_network(attached(
        &format!("vipd-{node}"),
        "vipd",
        ip.parse().unwrap(),
    ));
    for (k, v) in labels {
        c = c.with_label(k, v);
    }
    c
}

/// One node: a fake engine with the `vipd` network, an agent joined to the store `kv`.
async fn node_agent(
    name: &str,
    address: &str,
    kv: &MemoryKv,
    tag: &str,
) -> (FakeEngine, Arc<Recorder>, Agent) {
    node_agent_on(name, address, kv.connect(), tag).await
}

/// One node as [`node_agent`], through the store client `client` (whose link the test
/// sets).
async fn node_agent_on(
    name: &str,
    address: &str,
    client: MemoryKv,
    tag: &str,
) -> (FakeEngine, Arc<Recorder>, Agent) {
    let engine = FakeEngine::new();
    engine.set_networks(vec![bridge_network(&format!("vipd-{name}"), "vipd")]);
    let rec = Arc::new(Recorder::default());
    let dir = tempdir(tag);
    let mut agent = Agent::new(Arc::new(engine.clone()), ports(rec.clone()), config(&dir), None).unwrap();
    let cluster = Cluster::new(Arc::new(client), Keys::default());
    agent.join(
        ClusterLink::spawn(cluster, link_config(name, address, &dir)),
        "vipd",
    );
    (engine, rec, agent)
}

/// Sync `agents` (the link works in between) until `done` holds; panics after a while.
async fn sync_until(agents: &mut [&mut Agent], what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        for a in agents.iter_mut() {
            a.relist().await.unwrap();
            a.sync(false).await;
        }
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never: {what}");
}

const CLIENT_SANDBOX: &str = "/run/docker/netns/claaaaaaaaaa";

/// Two nodes of the store `kv`: a with a client container (its sandbox
/// [`CLIENT_SANDBOX`]), b with `task`. Returns a's recorder, a and b.
async fn client_and_peer(kv: &MemoryKv, tag: &str, task: ContainerInfo) -> (Arc<Recorder>, Agent, Agent) {
    let (ea, rec_a, a) = node_agent("a", "192.0.2.1", kv, &format!("{tag}-a")).await;
    let (eb, _rec_b, b) = node_agent("b", "192.0.2.2", kv, &format!("{tag}-b")).await;
    ea.upsert_container(on_cluster("a", "claaaaaaaaaa", "10.230.0.9", &[]));
    eb.upsert_container(task);
    (rec_a, a, b)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_task_on_another_node_is_a_backend_here_with_the_same_vip_and_leaves_when_its_lease_ends() {
    let kv = MemoryKv::new();
    let (rec_a, mut a, mut b) = client_and_peer(
        &kv,
        "cluster-two",
        on_cluster("b", "w1bbbbbbbbbb", "10.230.1.3", &[(labels::SERVICE, "web")]),
    )
    .await;
    sync_until(&mut [&mut a, &mut b], "B's task a backend in A's client", || {
        rec_a.programmed(CLIENT_SANDBOX) && rec_a.backends(CLIENT_SANDBOX, "web") == ["10.230.1.3"]
    })
    .await;
    let web = ServiceName::new("web").unwrap();
    assert_eq!(
        a.allocations().get(&web),
        b.allocations().get(&web),
        "one VIP and fwmark for the service on every node"
    );
    let view = a.cluster_link().unwrap().view();
    assert_eq!(view.me.as_ref().unwrap().name, node("a"));
    assert_eq!(view.peers(&node("a")).count(), 1);
    assert_ne!(
        view.me.unwrap().subnet,
        view.state.nodes[&node("b")].subnet,
        "each node its own /24"
    );

    // B goes away without a word: its lease ends after the TTL, and its task with it.
    drop(b);
    tokio::time::sleep(TTL * 2).await;
    sync_until(&mut [&mut a], "B's task gone from A's client", || {
        rec_a.backends(CLIENT_SANDBOX, "web").is_empty()
    })
    .await;
    assert_eq!(a.cluster_link().unwrap().view().peers(&node("a")).count(), 0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_restart_within_the_ttl_resumes_the_lease_and_changes_nothing_for_the_others() {
    let kv = MemoryKv::new();
    let keys = Keys::default();
    let (eb, _rec, mut b) = node_agent("b", "192.0.2.2", &kv, "cluster-restart-b").await;
    eb.upsert_container(on_cluster(
        "b",
        "w1bbbbbbbbbb",
        "10.230.1.3",
        &[(labels::SERVICE, "web")],
    ));
    let task_key = || async {
        kv.get_prefix(&keys.dir("tasks"))
            .await
            .unwrap()
            .kvs
            .into_iter()
            .next()
    };
    sync_until(&mut [&mut b], "B's task in the store", || b_has_task(&kv, &keys)).await;
    let before = task_key().await.unwrap();
    let lease = load_lease(&tempdir_path("cluster-restart-b")).unwrap();
    drop(b);

    // The same state dir, a few seconds later: the same lease, the same keys.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let dir = tempdir_path("cluster-restart-b");
    let rec = Arc::new(Recorder::default());
    let mut again = Agent::new(Arc::new(eb.clone()), ports(rec), config(&dir), None).unwrap();
    let cluster = Cluster::new(Arc::new(kv.connect()), keys.clone());
    again.join(
        ClusterLink::spawn(cluster, link_config("b", "192.0.2.2", &dir)),
        "vipd",
    );
    sync_until(&mut [&mut again], "B joined again", || again_joined(&kv, &keys)).await;
    // Time passes well beyond the first process's TTL: the lease lives on.
    for _ in 0..4 {
        tokio::time::sleep(TTL / 2).await;
        again.sync(false).await;
    }
    let after = task_key().await.unwrap();
    assert_eq!(load_lease(&dir), Some(lease), "the saved lease was resumed");
    assert_eq!(after.lease, Some(lease));
    assert_eq!(
        after.create_revision, before.create_revision,
        "the task never left the store"
    );
}

fn tempdir_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vipd-agent-{tag}-{}", std::process::id()))
}

/// Whether the store holds a task (read without awaiting: MemoryKv answers at once).
fn b_has_task(kv: &MemoryKv, keys: &Keys) -> bool {
    futures::executor::block_on(kv.get_prefix(&keys.dir("tasks"))).is_ok_and(|l| !l.kvs.is_empty())
}

fn again_joined(kv: &MemoryKv, keys: &Keys) -> bool {
    futures::executor::block_on(kv.get_prefix(&keys.node(&node("b")))).is_ok_and(|l| !l.kvs.is_empty())
        && b_has_task(kv, keys)
}

/// Wait for a view of which `done` holds.
async fn until(view: &mut watch::Receiver<ClusterView>, done: impl Fn(&ClusterView) -> bool) {
    while !done(&view.borrow_and_update()) {
        view.changed().await.unwrap();
    }
}

/// A link of node `name` at `address` to the store `kv`.
fn link(kv: &MemoryKv, name: &str, address: &str, tag: &str) -> ClusterLink {
    ClusterLink::spawn(
        Cluster::new(Arc::new(kv.connect()), Keys::default()),
        link_config(name, address, &tempdir(tag)),
    )
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_node_name_live_elsewhere_is_refused_and_the_view_says_why_while_it_keeps_trying() {
    let kv = MemoryKv::new();
    let first = link(&kv, "a", "192.0.2.1", "cluster-dup-1");
    let mut view = first.subscribe();
    until(&mut view, |v| v.me.is_some()).await;
    let second = link(&kv, "a", "192.0.2.7", "cluster-dup-2");
    let mut view = second.subscribe();
    until(&mut view, |v| v.problem.is_some()).await;
    let v = second.view();
    assert!(v.me.is_none());
    assert!(
        v.problem
            .as_deref()
            .unwrap()
            .contains("already registered by a live node"),
        "{:?}",
        v.problem
    );
    // The first one's lease ends: the name is free and the second one gets it.
    drop(first);
    until(&mut view, |v| v.me.is_some()).await;
    assert_eq!(
        second.view().me.unwrap().address,
        "192.0.2.7".parse::<IpAddr>().unwrap()
    );
    assert!(second.view().problem.is_none());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_unreachable_store_is_said_with_since_when_and_the_last_view_stays() {
    let kv = MemoryKv::new();
    let client = kv.connect();
    let one = ClusterLink::spawn(
        Cluster::new(Arc::new(client.clone()), Keys::default()),
        link_config("a", "192.0.2.1", &tempdir("cluster-down")),
    );
    let mut view = one.subscribe();
    until(&mut view, |v| v.me.is_some()).await;
    client.set_link(crate::store::memory::Link::Down);
    until(&mut view, |v| v.store.unreachable_since.is_some()).await;
    let v = one.view();
    assert!(v.store.error.is_some());
    assert_eq!(v.state.nodes.len(), 1, "the last snapshot stays");
    client.set_link(crate::store::memory::Link::Up);
    until(&mut view, |v| v.store.unreachable_since.is_none()).await;
    assert!(one.view().me.is_some());
}

#[test]
fn peers_tasks_join_the_local_cluster_network_with_their_service_defined_as_here() {
    let mut state = ClusterState::default();
    for (id, node_name, addr) in [("t1", "a", "10.230.0.3"), ("t2", "b", "10.230.1.3")] {
        let t = TaskRecord {
            id: TaskId::new(id).unwrap(),
            service: ServiceName::new("web").unwrap(),
            node: node(node_name),
            address: addr.parse().unwrap(),
            definition: None,
            weight: None,
        };
        state
            .tasks
            .insert((t.service.clone(), t.node.clone(), t.id.clone()), t);
    }
    let local = vec![container(
        "w1aaaaaaaaaa",
        &[
            (labels::SERVICE, "web"),
            ("vipd.port.http", "80/tcp"),
            (labels::WEIGHT, "5"),
        ],
        &[("vipd-a", "10.230.0.3")],
    )];
    let peers = peer_containers(&state, &node("a"), &NetworkId("vipd-a".into()), &local);
    assert_eq!(peers.len(), 1, "only the other node's task: {peers:?}");
    let p = &peers[0];
    assert!(p.sandbox.is_none() && p.running);
    assert_eq!(p.attachments[0].network, NetworkId("vipd-a".into()));
    assert_eq!(p.attachments[0].ip.to_string(), "10.230.1.3");
    assert_eq!(p.labels.get("vipd.port.http").map(String::as_str), Some("80/tcp"));
    assert!(!p.labels.contains_key(labels::WEIGHT), "its weight is its own");
    let mut all = local.clone();
    all.extend(peers);
    let (defs, errors) = labels::services(&all);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(defs[&ServiceName::new("web").unwrap()].tasks.len(), 2);
}

/// A task of `service` on node a's cluster network.
fn cluster_task(id: &str, service: &str, ip: &str) -> Container {
    container(id, &[(labels::SERVICE, service)], &[("vipd-a", ip)])
}

#[test]
fn a_node_announces_its_serving_tasks_on_the_cluster_network_only() {
    let cs = vec![
        cluster_task("w1aaaaaaaaaa", "web", "10.230.0.3"),
        container(
            "w2aaaaaaaaaa",
            &[(labels::SERVICE, "web")],
            &[("front", "10.1.0.3")],
        ),
        container(
            "d1aaaaaaaaaa",
            &[(labels::SERVICE, "db"), (labels::ENDPOINT_MODE, "dnsrr")],
            &[("vipd-a", "10.230.0.4")],
        ),
    ];
    let (defs, _) = labels::services(&cs);
    let none = BTreeSet::new();
    let w = wanted(&cs, &defs, &none, Some(&NetworkId("vipd-a".into())), &node("a"));
    let ids: Vec<&str> = w.tasks.keys().map(|t| t.as_str()).collect();
    assert_eq!(ids, ["d1aaaaaaaaaa", "w1aaaaaaaaaa"]);
    assert!(w.tasks.values().all(|t| t.node == node("a")));
    let services: Vec<&str> = w.services.iter().map(|s| s.as_str()).collect();
    assert_eq!(services, ["web"], "VIP services only");
    let idle: BTreeSet<ServiceName> = [ServiceName::new("api").unwrap()].into();
    let held = wanted(&cs, &defs, &idle, Some(&NetworkId("vipd-a".into())), &node("a"));
    let services: Vec<&str> = held.services.iter().map(|s| s.as_str()).collect();
    assert_eq!(services, ["api", "web"], "and those idle here within their grace");
    assert!(
        wanted(&cs, &defs, &none, None, &node("a")).tasks.is_empty(),
        "no cluster network yet"
    );
}

#[test]
fn in_cluster_mode_a_service_takes_the_claimed_vip_or_waits_for_one() {
    let cs = vec![
        cluster_task("w1aaaaaaaaaa", "web", "10.230.0.3"),
        cluster_task("a1aaaaaaaaaa", "api", "10.230.0.4"),
    ];
    let (defs, _) = labels::services(&cs);
    let web = ServiceName::new("web").unwrap();
    let claims = BTreeMap::from([(
        web.clone(),
        VipClaim {
            vip: "10.253.0.7".parse().unwrap(),
            fwmark: 300,
        },
    )]);
    let out = pipeline::allocate_claimed(&Allocations::default(), &defs, &claims, Duration::ZERO, 0);
    let (vip, mark) = out.allocs.get(&web).unwrap();
    assert_eq!((vip.to_string(), mark.get()), ("10.253.0.7".to_owned(), 300));
    assert_eq!(out.allocs.services.len(), 1, "api has no claim yet");
    assert_eq!(out.errors.len(), 1);
    assert!(
        out.errors[0].1.contains("waiting for its VIP"),
        "{:?}",
        out.errors
    );
}

#[test]
fn the_lease_id_survives_in_the_state_dir() {
    let dir = tempdir("cluster-lease-file");
    assert_eq!(load_lease(&dir), None);
    save_lease(&dir, LeaseId(0x7e57_0001)).unwrap();
    assert_eq!(load_lease(&dir), Some(LeaseId(0x7e57_0001)));
    std::fs::write(dir.join(LEASE_FILE), "garbage").unwrap();
    assert_eq!(load_lease(&dir), None, "an unreadable file: a new lease");
}

/// One node as [`node_agent`], with the host's firewall a [`crate::kernel::FakeHost`]
/// and the overlay's rules programmed with it.
async fn overlay_agent(
    name: &str,
    address: &str,
    kv: &MemoryKv,
    tag: &str,
) -> (Arc<crate::kernel::FakeHost>, Agent) {
    let engine = FakeEngine::new();
    engine.set_networks(vec![bridge_network(&format!("vipd-{name}"), "vipd")]);
    let rec = Arc::new(Recorder::default());
    let host = Arc::new(crate::kernel::FakeHost::default());
    let kernel = crate::agent::KernelPorts {
        sandboxes: rec.clone(),
        host_firewall: host.clone(),
        host_ports: rec,
    };
    let dir = tempdir(tag);
    let mut agent = Agent::new(Arc::new(engine), kernel, config(&dir), None).unwrap();
    let cluster = Cluster::new(Arc::new(kv.connect()), Keys::default());
    agent.join(
        ClusterLink::spawn(cluster, link_config(name, address, &dir)),
        "vipd",
    );
    agent.overlay_rules(crate::agent::OverlayRules {
        config: crate::core::overlay::OverlayConfig::default(),
        range: net("10.230.0.0/16"),
        bridge: "vipd0".into(),
    });
    (host, agent)
}

fn programmed(host: &crate::kernel::FakeHost) -> usize {
    host.programmed.load(std::sync::atomic::Ordering::Relaxed)
}

fn host_rules_now(host: &crate::kernel::FakeHost) -> Vec<crate::core::rules::Intent> {
    host.rules.lock().unwrap().clone().unwrap_or_default()
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_overlays_rules_are_in_the_hosts_one_rule_set_and_follow_the_peers() {
    use crate::core::rules::Intent;
    let kv = MemoryKv::new();
    let (host_a, mut a) = overlay_agent("a", "192.0.2.1", &kv, "overlay-rules-a").await;
    let (_host_b, mut b) = overlay_agent("b", "192.0.2.2", &kv, "overlay-rules-b").await;
    let peer_b = Intent::AcceptVxlanPeer {
        peer: "192.0.2.2".parse().unwrap(),
        port: crate::core::overlay::OverlayConfig::DEFAULT_PORT,
    };
    sync_until(&mut [&mut a, &mut b], "B accepted in A's VXLAN rules", || {
        host_rules_now(&host_a).contains(&peer_b)
    })
    .await;
    let rules = host_rules_now(&host_a);
    let me = a.cluster_link().unwrap().view().me.unwrap();
    let nodes = crate::agent::underlay::overlay_nodes(&a.cluster_link().unwrap().view(), &node("a")).unwrap();
    assert_eq!(
        rules,
        crate::cluster::rules::host_rules(
            &crate::core::overlay::OverlayConfig::default(),
            net("10.230.0.0/16"),
            "vipd0",
            &nodes.0,
            &nodes.1
        )
    );
    assert!(rules.contains(&Intent::MasqueradeNodeSubnet {
        subnet: me.subnet.unwrap(),
        bridge: "vipd0".into()
    }));
    // A second run changes nothing.
    let before = programmed(&host_a);
    let report = a.sync(false).await;
    assert_eq!(programmed(&host_a), before, "{report:?}");

    // B leaves: its accept rule goes.
    drop(b);
    tokio::time::sleep(TTL * 2).await;
    sync_until(&mut [&mut a], "B's accept rule gone", || {
        !host_rules_now(&host_a).contains(&peer_b)
    })
    .await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn displaced_host_rules_are_programmed_again_unchanged_on_a_check_or_a_network_event() {
    use crate::core::firewall::{Reassert, HOST_OVERLAY_NAT, HOST_VXLAN_INPUT};
    let kv = MemoryKv::new();
    let (host, mut a) = overlay_agent("a", "192.0.2.1", &kv, "overlay-reassert").await;
    sync_until(&mut [&mut a], "A's overlay rules programmed", || {
        host_rules_now(&host)
            .iter()
            .any(|r| matches!(r, crate::core::rules::Intent::MasqueradeNodeSubnet { .. }))
    })
    .await;
    let rules = host_rules_now(&host);
    let before = programmed(&host);

    // Nothing displaced: a check programs nothing.
    let report = a.check_host().await;
    assert_eq!((programmed(&host), report.operations), (before, 0));

    // Docker moved a jump: the check programs the same rules again.
    host.reassert
        .lock()
        .unwrap()
        .push(Reassert::Displaced(HOST_OVERLAY_NAT));
    let report = a.check_host().await;
    assert_eq!(programmed(&host), before + 1);
    assert_eq!(report.operations, 1, "{report:?}");
    assert_eq!(host_rules_now(&host), rules, "the same rules");
    let report = a.check_host().await;
    assert_eq!(
        (programmed(&host), report.operations),
        (before + 1, 0),
        "a second check changes nothing"
    );

    // A Docker network event: the sync after it checks too, though no intent changed.
    host.reassert
        .lock()
        .unwrap()
        .push(Reassert::MissingJump(HOST_VXLAN_INPUT));
    a.on_events(&[crate::docker::EngineEvent::Network {
        id: NetworkId("other".into()),
        action: crate::docker::EngineAction::Create,
        container: None,
    }])
    .await
    .unwrap();
    a.sync(false).await;
    assert_eq!(programmed(&host), before + 2);
    assert!(host.reassert.lock().unwrap().is_empty());
    a.sync(false).await;
    assert_eq!(
        programmed(&host),
        before + 2,
        "the next sync has nothing to check"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn in_cluster_mode_the_store_is_connected_once_listed_and_not_while_it_is_down() {
    let kv = MemoryKv::new();
    let client = kv.connect();
    let one = ClusterLink::spawn(
        Cluster::new(Arc::new(client.clone()), Keys::default()),
        link_config("a", "192.0.2.1", &tempdir("cluster-connected")),
    );
    let mut view = one.subscribe();
    until(&mut view, |v| v.me.is_some() && v.lists > 0).await;
    let s = status(&one.view(), &node("a"));
    assert!(s.store_connected, "{s:?}");
    assert_eq!(s.store_lists, one.view().lists);
    client.set_link(crate::store::memory::Link::Down);
    until(&mut view, |v| v.store.unreachable_since.is_some()).await;
    assert!(!status(&one.view(), &node("a")).store_connected);
    client.set_link(crate::store::memory::Link::Up);
    until(&mut view, |v| v.store.connected).await;
    assert!(status(&one.view(), &node("a")).store_connected);
    assert!(one.snapshots().borrow().connected);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn in_cluster_mode_the_definitions_come_from_the_stores_snapshot() {
    let kv = MemoryKv::new();
    let cluster = Cluster::new(Arc::new(kv.connect()), Keys::default());
    let one = ClusterLink::spawn(
        cluster.clone(),
        link_config("a", "192.0.2.1", &tempdir("cluster-defs")),
    );
    let defs = crate::services::SnapshotDefinitions::new(one.snapshots());
    use crate::services::DefinitionSource;
    assert!(defs.definitions().unwrap().is_empty());
    let web = ServiceName::new("web").unwrap();
    crate::services::create(&cluster, web.clone(), &crate::services::Settings::default())
        .await
        .unwrap();
    let mut snapshots = one.snapshots();
    while !snapshots.borrow_and_update().state.definitions.contains_key(&web) {
        snapshots.changed().await.unwrap();
    }
    assert!(defs.definitions().unwrap().contains_key(&web));
}

/// A dnsrr service's task, with every setting a record carries.
const DB: &[(&str, &str)] = &[
    (labels::SERVICE, "db"),
    (labels::ENDPOINT_MODE, "dnsrr"),
    (labels::SCHEDULER, "wrr"),
    ("vipd.port.pg", "5432/tcp"),
    (labels::WEIGHT, "3"),
];

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_dnsrr_service_whose_tasks_are_all_on_another_node_gets_no_vip_here() {
    let kv = MemoryKv::new();
    let (_rec_a, mut a, mut b) = client_and_peer(
        &kv,
        "cluster-dnsrr",
        on_cluster("b", "d1bbbbbbbbbb", "10.230.1.4", DB),
    )
    .await;
    let view_a = a.cluster_link().unwrap().subscribe();
    sync_until(&mut [&mut a, &mut b], "B's db task known on A", || {
        view_a.borrow().state.tasks.len() == 1
    })
    .await;
    // Time for a VIP claim to be made and come back, were one wanted.
    for _ in 0..10 {
        a.sync(false).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let db = ServiceName::new("db").unwrap();
    assert!(a.allocations().get(&db).is_none(), "no VIP for a dnsrr service");
    assert!(
        !a.cluster_link().unwrap().view().claims.contains_key(&db),
        "no VIP claimed in the cluster"
    );
    let report = a.status().borrow().clone();
    let service = report.services.iter().find(|s| s.name == db).unwrap();
    assert_eq!(service.mode, EndpointMode::Dnsrr);
    assert_eq!(service.scheduler.to_string(), "wrr");
    assert_eq!(service.vip, None);
}

#[test]
fn a_peers_task_with_no_local_task_of_its_service_is_planned_as_its_record_says() {
    let mut db = DB.to_vec();
    db.push((labels::PUBLISH, "8080:80/tcp"));
    let cs = vec![container("d1bbbbbbbbbb", &db, &[("vipd-b", "10.230.1.4")])];
    let (defs, errors) = labels::services(&cs);
    assert!(errors.is_empty(), "{errors:?}");
    let mut with_sandbox = cs.clone();
    with_sandbox[0].sandbox = Some("/run/docker/netns/d1".into());
    let said = wanted(
        &with_sandbox,
        &defs,
        &BTreeSet::new(),
        Some(&NetworkId("vipd-b".into())),
        &node("b"),
    );
    let record = said.tasks.values().next().unwrap().clone();
    assert_eq!(record.weight, Some(3));

    // The record as the store holds it, and as an older vipd wrote it: both read.
    let json = serde_json::to_string(&record).unwrap();
    let read: TaskRecord = serde_json::from_str(&json).unwrap();
    assert_eq!(read, record);
    let old: TaskRecord =
        serde_json::from_str(r#"{"id":"d1bbbbbbbbbb","service":"db","node":"b","address":"10.230.1.4"}"#)
            .unwrap();
    assert_eq!((old.definition, old.weight), (None, None));

    let mut state = ClusterState::default();
    state
        .tasks
        .insert((read.service.clone(), read.node.clone(), read.id.clone()), read);
    let peers = peer_containers(&state, &node("a"), &NetworkId("vipd-a".into()), &[]);
    let (here, errors) = labels::services(&peers);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        here, defs,
        "node a plans db as node b does: mode, scheduler, ports, publish, weight"
    );
}

/// Every task key in the store, with its create and mod revisions.
fn task_revisions(
    kv: &MemoryKv,
    keys: &Keys,
) -> BTreeMap<String, (crate::store::Revision, crate::store::Revision)> {
    futures::executor::block_on(kv.get_prefix(&keys.dir("tasks")))
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| (kv.key, (kv.create_revision, kv.mod_revision)))
        .collect()
}

/// The events a watch has delivered so far.
fn seen(changes: &mut crate::store::kv::WatchStream) -> Vec<crate::store::kv::Event> {
    use futures::{FutureExt, StreamExt};
    let mut out = Vec::new();
    while let Some(Some(Ok(crate::store::kv::WatchMessage::Events(events)))) = changes.next().now_or_never() {
        out.extend(events);
    }
    out
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_restart_deletes_no_task_before_its_first_listing_then_withdraws_only_those_gone_meanwhile() {
    let kv = MemoryKv::new();
    let keys = Keys::default();
    let tag = "cluster-restart-gone-b";
    let (eb, _rec, mut b) = node_agent("b", "192.0.2.2", &kv, tag).await;
    for (id, ip) in [("w1bbbbbbbbbb", "10.230.1.3"), ("w2bbbbbbbbbb", "10.230.1.4")] {
        eb.upsert_container(on_cluster("b", id, ip, &[(labels::SERVICE, "web")]));
    }
    sync_until(&mut [&mut b], "both of B's tasks in the store", || {
        task_revisions(&kv, &keys).len() == 2
    })
    .await;
    let before = task_revisions(&kv, &keys);
    let node_key = || {
        futures::executor::block_on(kv.get_prefix(&keys.node(&node("b"))))
            .unwrap()
            .kvs
    };
    let node_before = node_key();
    // Another node's view of the tasks from here on.
    let other = kv.connect();
    let mut changes = other
        .watch(&keys.dir("tasks"), crate::store::Revision(kv.revision().0 + 1))
        .await
        .unwrap();

    // kill -9; w2 stops while vipd is down.
    drop(b);
    eb.remove_container(&ContainerId("w2bbbbbbbbbb".into()));
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The same state dir: the link resumes the lease and joins before Docker is listed.
    let dir = tempdir_path(tag);
    let rec = Arc::new(Recorder::default());
    let mut again = Agent::new(Arc::new(eb.clone()), ports(rec), config(&dir), None).unwrap();
    again.join(
        ClusterLink::spawn(
            Cluster::new(Arc::new(kv.connect()), keys.clone()),
            link_config("b", "192.0.2.2", &dir),
        ),
        "vipd",
    );
    let mut view = again.cluster_link().unwrap().subscribe();
    until(&mut view, |v| v.me.is_some() && v.lists > 0).await;
    tokio::time::sleep(TTL).await;
    assert_eq!(
        task_revisions(&kv, &keys),
        before,
        "nothing written or deleted before the first listing"
    );
    assert_eq!(node_key(), node_before, "the node's record is not written again");
    assert_eq!(seen(&mut changes), [], "another node sees no change");

    // The first listing: w2 is withdrawn, w1 stays as it was.
    sync_until(&mut [&mut again], "w2 withdrawn", || {
        task_revisions(&kv, &keys).len() == 1
    })
    .await;
    let w1 = keys.dir("tasks") + "web/b/w1bbbbbbbbbb";
    assert_eq!(task_revisions(&kv, &keys)[&w1], before[&w1], "w1 never rewritten");
    let events = seen(&mut changes);
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        matches!(&events[0], crate::store::kv::Event::Delete { key, .. } if key.ends_with("/w2bbbbbbbbbb")),
        "{events:?}"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_keep_alive_that_fails_times_out_stalls_or_falsely_says_not_found_keeps_the_lease_and_the_peers() {
    use crate::store::memory::Link;
    let kv = MemoryKv::new();
    let keys = Keys::default();
    let task = |id: &str, n: &str, ip: &str| TaskRecord {
        id: TaskId::new(id).unwrap(),
        service: ServiceName::new("web").unwrap(),
        node: node(n),
        address: ip.parse().unwrap(),
        definition: None,
        weight: None,
    };
    let b = link(&kv, "b", "192.0.2.2", "cluster-keep-b");
    let tb = task("w1bbbbbbbbbb", "b", "10.230.1.3");
    b.want(Wanted {
        tasks: BTreeMap::from([(tb.id.clone(), tb)]),
        services: BTreeSet::new(),
        ports: BTreeSet::new(),
    });
    let client = kv.connect();
    let dir = tempdir("cluster-keep-a");
    let a = ClusterLink::spawn(
        Cluster::new(Arc::new(client.clone()), keys.clone()),
        link_config("a", "192.0.2.1", &dir),
    );
    let ta = task("w1aaaaaaaaaa", "a", "10.230.0.3");
    a.want(Wanted {
        tasks: BTreeMap::from([(ta.id.clone(), ta)]),
        services: BTreeSet::new(),
        ports: BTreeSet::new(),
    });
    let mut view = a.subscribe();
    until(&mut view, |v| v.me.is_some() && v.state.tasks.len() == 2).await;
    let lease = load_lease(&dir).unwrap();
    let mine = || {
        let mut kvs = futures::executor::block_on(kv.get_prefix(&keys.node(&node("a"))))
            .unwrap()
            .kvs;
        kvs.extend(
            futures::executor::block_on(kv.get_prefix(&(keys.dir("tasks") + "web/a/")))
                .unwrap()
                .kvs,
        );
        kvs
    };
    let before = mine();

    // Every view A publishes from here on: joined, with B's task.
    let lost = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let watcher = {
        let lost = lost.clone();
        let mut view = a.subscribe();
        tokio::spawn(async move {
            while view.changed().await.is_ok() {
                let v = view.borrow_and_update().clone();
                if v.me.is_none() || v.state.tasks.len() != 2 {
                    lost.lock().unwrap().push(format!(
                        "{:?} {:?} at {}",
                        v.me,
                        v.state.tasks.keys(),
                        v.state.revision
                    ));
                }
            }
        })
    };

    // A leader change: one keep-alive says the live lease is not found (a TTL of 0),
    // another times out, another cannot reach the store; then the watch stalls, and the
    // link is down for less than the TTL.
    for faults in [
        vec![KvError::LeaseNotFound(lease), KvError::LeaseNotFound(lease)],
        vec![KvError::Timeout(Duration::from_secs(5))],
        vec![KvError::Unavailable("no leader".into())],
    ] {
        client.fail_keep_alives(faults);
        tokio::time::sleep(TTL).await;
    }
    // The store changes every second for twice the TTL (B's task moves): each change
    // wakes A's link, and none may put its keep-alives off.
    for i in 0..(2 * TTL.as_secs()) {
        let moved = task("w1bbbbbbbbbb", "b", &format!("10.230.0.{}", 10 + i % 2));
        b.want(Wanted {
            tasks: BTreeMap::from([(moved.id.clone(), moved)]),
            services: BTreeSet::new(),
            ports: BTreeSet::new(),
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    client.set_link(Link::Stalled);
    tokio::time::sleep(TTL / 2).await;
    client.set_link(Link::Down);
    tokio::time::sleep(TTL / 2).await;
    client.set_link(Link::Up);
    tokio::time::sleep(TTL).await;

    assert_eq!(
        lost.lock().unwrap().clone(),
        Vec::<String>::new(),
        "A never left the cluster nor lost B's task"
    );
    assert_eq!(load_lease(&dir), Some(lease), "nothing re-granted");
    assert_eq!(
        mine(),
        before,
        "the node's record and the tasks never written again"
    );
    assert_eq!(a.view().me.unwrap().name, node("a"));

    // A lease that really ended (revoked here) is joined again on a new one.
    watcher.abort();
    kv.lease_revoke(lease).await.unwrap();
    until(&mut view, |v| {
        v.me.is_some() && load_lease(&dir).is_some_and(|l| l != lease)
    })
    .await;
    until(&mut view, |v| v.state.tasks.len() == 2).await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_cluster_agent_programs_no_sandbox_before_the_stores_first_snapshot() {
    let kv = MemoryKv::new();
    let client = kv.connect();
    client.set_link(crate::store::memory::Link::Down);
    let (engine, rec, mut a) =
        node_agent_on("a", "192.0.2.1", client.clone(), "cluster-first-snapshot").await;
    engine.upsert_container(on_cluster("a", "claaaaaaaaaa", "10.230.0.9", &[]));
    engine.upsert_container(on_cluster(
        "a",
        "w1aaaaaaaaaa",
        "10.230.0.3",
        &[(labels::SERVICE, "web")],
    ));
    // A restarted vipd whose store is out of reach: its sandboxes still serve the peers'
    // tasks and the cluster's VIPs, which it does not know yet; it leaves them be.
    for _ in 0..5 {
        a.relist().await.unwrap();
        let report = a.sync(true).await;
        assert_eq!(report.sandboxes_programmed, 0, "{report:?}");
        assert!(
            report.errors.iter().any(|e| e.contains("first snapshot")),
            "{report:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(!rec.programmed(CLIENT_SANDBOX));
    client.set_link(crate::store::memory::Link::Up);
    sync_until(&mut [&mut a], "the client programmed with web", || {
        rec.programmed(CLIENT_SANDBOX) && rec.backends(CLIENT_SANDBOX, "web") == ["10.230.0.3"]
    })
    .await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_cluster_agent_whose_store_stays_out_of_reach_serves_what_is_local_after_a_while() {
    let kv = MemoryKv::new();
    let client = kv.connect();
    client.set_link(crate::store::memory::Link::Down);
    let (engine, rec, mut a) = node_agent_on("a", "192.0.2.1", client, "cluster-never-listed").await;
    engine.upsert_container(on_cluster(
        "a",
        "d1aaaaaaaaaa",
        "10.230.0.4",
        &[(labels::SERVICE, "db"), (labels::ENDPOINT_MODE, "dnsrr")],
    ));
    a.relist().await.unwrap();
    assert_eq!(a.sync(true).await.sandboxes_programmed, 0);
    tokio::time::sleep(crate::agent::FIRST_SNAPSHOT_WAIT).await;
    let report = a.sync(true).await;
    assert!(rec.programmed("/run/docker/netns/d1aaaaaaaaaa"), "{report:?}");
    assert!(
        !report.errors.iter().any(|e| e.contains("first snapshot")),
        "{report:?}"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn every_live_node_is_seen_from_its_lease_and_forgotten_when_it_ends() {
    let kv = MemoryKv::new();
    let a = link(&kv, "a", "192.0.2.1", "cluster-seen-a");
    let b = link(&kv, "b", "192.0.2.2", "cluster-seen-b");
    let mut view = a.subscribe();
    // a's own keep-alive, and b's lease read once per TTL.
    until(&mut view, |v| {
        v.seen.contains_key(&node("a")) && v.seen.contains_key(&node("b"))
    })
    .await;
    let now = unix_now();
    let ttl = TTL.as_secs();
    for n in ["a", "b"] {
        let seen = a.view().seen[&node(n)];
        assert!(
            seen <= now && seen + ttl + 1 >= now,
            "{n} seen at {seen}, now {now}"
        );
    }
    let status = status(&a.view(), &node("a"));
    assert!(status.nodes.iter().all(|n| n.last_seen.is_some()), "{status:?}");
    // The same probe measured the watch's lag: a revision read in the store, then seen
    // in the snapshot (at once here: nothing is slow in memory).
    until(&mut view, |v| v.watch_lag.is_some()).await;
    assert!(a.view().watch_lag.unwrap() < TTL, "{:?}", a.view().watch_lag);
    // b leaves (its lease ends): a forgets it.
    drop(b);
    until(&mut view, |v| {
        !v.seen.contains_key(&node("b")) && !v.state.nodes.contains_key(&node("b"))
    })
    .await;
    assert!(a.view().seen.contains_key(&node("a")));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_vip_is_given_back_by_the_last_node_to_stop_wanting_it_unless_tasks_or_a_definition_hold_it() {
    let kv = MemoryKv::new();
    let keys = Keys::default();
    let store = Cluster::new(Arc::new(kv.connect()), keys.clone());
    let web = ServiceName::new("web").unwrap();
    let ta = TaskRecord {
        id: TaskId::new("w1aaaaaaaaaa").unwrap(),
        service: web.clone(),
        node: node("a"),
        address: "10.230.0.3".parse().unwrap(),
        definition: None,
        weight: None,
    };
    let want = |tasks: &[&TaskRecord], services: &[&ServiceName]| Wanted {
        tasks: tasks.iter().map(|t| (t.id.clone(), (*t).clone())).collect(),
        services: services.iter().map(|s| (*s).clone()).collect(),
        ports: BTreeSet::new(),
    };
    let a = link(&kv, "a", "192.0.2.1", "cluster-release-a");
    let b = link(&kv, "b", "192.0.2.2", "cluster-release-b");
    a.want(want(&[&ta], &[&web]));
    b.want(want(&[], &[&web]));
    let (mut va, mut vb) = (a.subscribe(), b.subscribe());
    until(&mut va, |v| {
        v.state.services.contains_key(&web) && v.state.tasks.len() == 1
    })
    .await;
    let claim = a.view().state.services[&web];
    until(&mut vb, |v| v.claims.get(&web) == Some(&claim)).await;

    // b's grace is over: it gives nothing back while a's task holds the VIP.
    b.want(want(&[], &[]));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(store.state().await.unwrap().services.get(&web), Some(&claim));

    // a's task leaves and its grace ends: the VIP and fwmark go back to the pool, on
    // every node's view.
    a.want(want(&[], &[]));
    until(&mut vb, |v| {
        !v.state.services.contains_key(&web) && !v.claims.contains_key(&web)
    })
    .await;
    let listing = kv.get_prefix(keys.root()).await.unwrap();
    let left: Vec<&str> = listing
        .kvs
        .iter()
        .map(|kv| kv.key.as_str())
        .filter(|k| k.contains("/services/") || k.contains("/vips/") || k.contains("/fwmarks/"))
        .collect();
    assert!(left.is_empty(), "claim keys left: {left:?}");

    // A service defined with `vipd service` keeps its VIP with no task anywhere.
    let def = ServiceDefinition {
        name: web.clone(),
        mode: EndpointMode::Vip,
        scheduler: Default::default(),
        publish: vec![],
        ports: vec![],
    };
    assert!(store.put_definition(&def, None).await.unwrap());
    a.want(want(&[], &[&web]));
    until(&mut va, |v| v.state.services.contains_key(&web)).await;
    let defined = a.view().state.services[&web];
    a.want(want(&[], &[]));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(store.state().await.unwrap().services.get(&web), Some(&defined));
    // And it comes back the same to a node that wants it again (claiming reads first).
    b.want(want(&[], &[&web]));
    until(&mut vb, |v| v.claims.get(&web) == Some(&defined)).await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_published_port_is_claimed_once_in_the_cluster_and_passes_on_when_its_holder_lets_go() {
    use crate::core::model::Protocol;
    let kv = MemoryKv::new();
    let store = Cluster::new(Arc::new(kv.connect()), Keys::default());
    let (web, api) = (ServiceName::new("web").unwrap(), ServiceName::new("api").unwrap());
    let port = PortKey::new(Protocol::Tcp, 8080);
    let asking = |who: &[&ServiceName]| Wanted {
        ports: who.iter().map(|s| (port, (*s).clone())).collect(),
        ..Wanted::default()
    };
    let a = link(&kv, "a", "192.0.2.1", "cluster-port-a");
    let b = link(&kv, "b", "192.0.2.2", "cluster-port-b");
    let (mut va, mut vb) = (a.subscribe(), b.subscribe());
    a.want(asking(&[&web]));
    until(&mut va, |v| {
        v.state.ports.get(&(Protocol::Tcp, 8080)) == Some(&web)
    })
    .await;
    // api asks on b too late: web holds the port, on b's view as on a's.
    b.want(asking(&[&api, &web]));
    until(&mut vb, |v| {
        v.state.ports.get(&(Protocol::Tcp, 8080)) == Some(&web)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        store.state().await.unwrap().ports.get(&(Protocol::Tcp, 8080)),
        Some(&web)
    );
    // web is gone everywhere: its port is given back, and api, still asking, takes it.
    a.want(asking(&[]));
    b.want(asking(&[&api]));
    until(&mut vb, |v| {
        v.state.ports.get(&(Protocol::Tcp, 8080)) == Some(&api)
    })
    .await;
    // api too: nothing is left in the store.
    b.want(asking(&[]));
    until(&mut vb, |v| v.state.ports.is_empty()).await;
}

#[test]
fn only_the_clusters_services_claim_their_published_ports() {
    let mut peer = container(
        "p1bbbbbbbbbb",
        &[(labels::SERVICE, "api"), (labels::PUBLISH, "7070:80")],
        &[("vipd-a", "10.230.1.5")],
    );
    peer.sandbox = None;
    peer.node = Some(node("b"));
    let cs = vec![
        container(
            "w1aaaaaaaaaa",
            &[(labels::SERVICE, "web"), (labels::PUBLISH, "8080:80")],
            &[("vipd-a", "10.230.0.3")],
        ),
        // A service of this host alone (not on the cluster network) publishes here only.
        container(
            "l1aaaaaaaaaa",
            &[(labels::SERVICE, "local"), (labels::PUBLISH, "9090:80")],
            &[("front", "10.1.0.3")],
        ),
        peer,
    ];
    let (defs, errors) = labels::services(&cs);
    assert!(errors.is_empty(), "{errors:?}");
    let w = wanted(
        &cs,
        &defs,
        &BTreeSet::new(),
        Some(&NetworkId("vipd-a".into())),
        &node("a"),
    );
    let ports: Vec<String> = w.ports.iter().map(|(k, s)| format!("{k} {s}")).collect();
    assert_eq!(ports, ["7070/tcp api", "8080/tcp web"]);
}
