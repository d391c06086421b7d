//! The claims, the in-memory store and the reflector, over the in-memory store.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::claims::{Cluster, StoreError};
use super::kv::{Compare, Kv, KvError, LeaseId, Op, Revision, Txn, WatchMessage};
use super::layout::{Keys, NodeName, NodeRecord, TaskId, TaskRecord};
use super::memory::{Link, MemoryKv};
use super::reflector::{Backoff, Reflector, View};
use super::scenarios;
use crate::core::model::Protocol;
use crate::core::model::{Ipv4Net, ServiceName};
use futures::StreamExt;

const TTL: Duration = Duration::from_secs(15);

fn cluster(kv: &MemoryKv) -> Cluster {
    Cluster::new(Arc::new(kv.clone()), Keys::default())
}

fn node(name: &str, addr: &str) -> NodeRecord {
    NodeRecord {
        name: NodeName::new(name).unwrap(),
        address: addr.parse().unwrap(),
        subnet: None,
    }
}

fn net(s: &str) -> Ipv4Net {
    let (a, p) = s.split_once('/').unwrap();
    Ipv4Net::new(a.parse().unwrap(), p.parse().unwrap()).unwrap()
}

fn svc(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

fn task(id: &str, service: &str, node: &str, addr: &str) -> TaskRecord {
    TaskRecord {
        id: TaskId::new(id).unwrap(),
        service: svc(service),
        node: NodeName::new(node).unwrap(),
        address: addr.parse::<IpAddr>().unwrap(),
        definition: None,
        weight: None,
    }
}

fn put(key: &str, lease: Option<LeaseId>) -> Op {
    Op::Put {
        key: key.into(),
        value: b"v".to_vec(),
        lease,
    }
}

#[tokio::test(start_paused = true)]
async fn a_transaction_bumps_the_revision_once_and_keeps_create_revisions() {
    let kv = MemoryKv::new();
    let r1 = kv
        .txn(Txn {
            when: vec![Compare::Absent("/a".into())],
            then: vec![put("/a", None), put("/b", None)],
            otherwise: vec![],
        })
        .await
        .unwrap();
    assert!(r1.succeeded);
    let r2 = kv
        .txn(Txn {
            when: vec![Compare::Absent("/a".into())],
            then: vec![],
            otherwise: vec![put("/a", None)],
        })
        .await
        .unwrap();
    assert!(!r2.succeeded);
    assert_eq!(r2.revision.0, r1.revision.0 + 1);
    let l = kv.get_prefix("/").await.unwrap();
    assert_eq!(l.revision, r2.revision);
    let a = &l.kvs[0];
    assert_eq!((a.create_revision, a.mod_revision), (r1.revision, r2.revision));
    assert_eq!(l.kvs[1].mod_revision, r1.revision);
    // Compares on a failing condition write nothing.
    let none = kv
        .txn(Txn {
            when: vec![
                Compare::ModRevisionIs("/a".into(), r1.revision),
                Compare::NoneUnder("/".into()),
            ],
            then: vec![put("/c", None)],
            otherwise: vec![],
        })
        .await
        .unwrap();
    assert!(!none.succeeded);
    assert_eq!(none.revision, r2.revision);
}

#[tokio::test(start_paused = true)]
async fn the_memory_store_refuses_what_etcd_refuses() {
    let kv = MemoryKv::new();
    let unknown = LeaseId(42);
    let err = kv
        .txn(Txn {
            when: vec![],
            then: vec![put("/a", None), put("/b", Some(unknown))],
            otherwise: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err, KvError::LeaseNotFound(unknown));
    assert!(
        kv.get_prefix("/").await.unwrap().kvs.is_empty(),
        "nothing of a refused txn is applied"
    );
    let dup = Txn {
        when: vec![],
        then: vec![put("/a", None), Op::Delete("/a".into())],
        otherwise: vec![],
    };
    assert!(matches!(kv.txn(dup).await, Err(KvError::Rejected(_))));
    assert!(kv.compact(Revision(99)).is_err());
    assert_eq!(
        kv.lease_revoke(unknown).await,
        Err(KvError::LeaseNotFound(unknown))
    );
    kv.set_link(Link::Down);
    assert!(kv.get_prefix("/").await.unwrap_err().is_transient());
}

#[tokio::test(start_paused = true)]
async fn a_watch_sees_every_change_in_order_and_ends_at_a_compaction_it_fell_behind() {
    let kv = MemoryKv::new();
    let writer = kv.connect();
    let from = Revision(kv.revision().0 + 1);
    let mut w = kv.watch("/x/", from).await.unwrap();
    for k in ["/x/1", "/y/1", "/x/2"] {
        writer
            .txn(Txn {
                when: vec![],
                then: vec![put(k, None)],
                otherwise: vec![],
            })
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let Some(Ok(WatchMessage::Events(evs))) = w.next().await else {
            panic!("events expected")
        };
        seen.extend(evs.into_iter().map(|e| e.key().to_owned()));
    }
    assert_eq!(seen, ["/x/1", "/x/2"]);
    kv.set_link(Link::Stalled);
    writer
        .txn(Txn {
            when: vec![],
            then: vec![put("/x/3", None)],
            otherwise: vec![],
        })
        .await
        .unwrap();
    writer
        .txn(Txn {
            when: vec![],
            then: vec![put("/x/4", None)],
            otherwise: vec![],
        })
        .await
        .unwrap();
    writer.compact(writer.revision()).unwrap();
    kv.set_link(Link::Up);
    assert_eq!(
        w.next().await,
        Some(Ok(WatchMessage::Compacted {
            compact_revision: writer.revision()
        }))
    );
    assert_eq!(w.next().await, None);
    // A watch from before the compaction ends at once.
    let mut old = kv.watch("/x/", from).await.unwrap();
    assert!(matches!(
        old.next().await,
        Some(Ok(WatchMessage::Compacted { .. }))
    ));
}

#[tokio::test(start_paused = true)]
async fn a_node_name_live_on_another_lease_is_refused_and_the_same_lease_resumes() {
    let kv = MemoryKv::new();
    let c = cluster(&kv);
    let l1 = c.lease(TTL, None).await.unwrap();
    c.register_node(&node("n1", "192.0.2.1"), l1).await.unwrap();
    let l2 = c.lease(TTL, None).await.unwrap();
    let err = c.register_node(&node("n1", "192.0.2.9"), l2).await.unwrap_err();
    assert!(matches!(err, StoreError::NameTaken { .. }), "{err}");
    assert!(err.to_string().contains("192.0.2.1"), "{err}");
    // A restart within the TTL resumes the saved lease and registers again; a new address
    // frees the old one.
    let resumed = c.lease(TTL, Some(l1)).await.unwrap();
    assert_eq!(resumed, l1);
    c.register_node(&node("n1", "192.0.2.5"), l1).await.unwrap();
    c.register_node(&node("n2", "192.0.2.1"), l2).await.unwrap();
    let state = c.state().await.unwrap();
    assert_eq!(state.nodes.len(), 2);
    assert!(state.unreadable.is_empty(), "{:?}", state.unreadable);
}

#[tokio::test(start_paused = true)]
async fn two_nodes_with_one_address_are_refused() {
    let kv = MemoryKv::new();
    let c = cluster(&kv);
    let l1 = c.lease(TTL, None).await.unwrap();
    let l2 = c.lease(TTL, None).await.unwrap();
    c.register_node(&node("n1", "192.0.2.1"), l1).await.unwrap();
    let err = c.register_node(&node("n2", "192.0.2.1"), l2).await.unwrap_err();
    assert_eq!(
        err,
        StoreError::AddressTaken {
            address: "192.0.2.1".parse().unwrap(),
            by: "n1".into()
        }
    );
}

#[tokio::test(start_paused = true)]
async fn an_expired_lease_takes_the_node_and_its_tasks_and_cannot_be_resumed() {
    let kv = MemoryKv::new();
    let c = cluster(&kv);
    let lease = c.lease(Duration::from_secs(2), None).await.unwrap();
    c.register_node(&node("n1", "192.0.2.1"), lease).await.unwrap();
    c.put_task(&task("t1", "web", "n1", "10.0.0.2"), lease)
        .await
        .unwrap();
    c.put_task(&task("t2", "web", "n1", "10.0.0.3"), lease)
        .await
        .unwrap();
    assert_eq!(c.tasks().await.unwrap().len(), 2);
    tokio::time::sleep(Duration::from_secs(1)).await;
    kv.lease_keep_alive(lease).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        c.tasks().await.unwrap().len(),
        2,
        "the keep-alive extended the lease"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let state = c.state().await.unwrap();
    assert!(state.nodes.is_empty() && state.tasks.is_empty(), "{state:?}");
    assert_eq!(kv.lease_time_to_live(lease).await.unwrap(), None);
    let err = c
        .put_task(&task("t3", "web", "n1", "10.0.0.4"), lease)
        .await
        .unwrap_err();
    assert_eq!(err, StoreError::Kv(KvError::LeaseNotFound(lease)));
    let fresh = c.lease(TTL, Some(lease)).await.unwrap();
    assert_ne!(fresh, lease, "an ended lease is replaced");
    // The name is free again.
    c.register_node(&node("n1", "192.0.2.1"), fresh).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_node_keeps_its_subnet_and_an_exhausted_range_is_a_clear_error() {
    let kv = MemoryKv::new();
    let c = cluster(&kv);
    let range = net("10.230.0.0/23");
    let n = |s: &str| NodeName::new(s).unwrap();
    let a = c.claim_subnet(&n("a"), range, 24, None).await.unwrap();
    let b = c.claim_subnet(&n("b"), range, 24, None).await.unwrap();
    assert_eq!(
        (a.to_string(), b.to_string()),
        ("10.230.0.0/24".into(), "10.230.1.0/24".into())
    );
    assert_eq!(
        c.claim_subnet(&n("a"), range, 24, None).await.unwrap(),
        a,
        "kept across restarts"
    );
    let err = c.claim_subnet(&n("c"), range, 24, None).await.unwrap_err();
    assert!(
        matches!(err, StoreError::SubnetsExhausted { count: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("exhausted"));
    assert!(matches!(
        c.claim_subnet(&n("c"), range, 22, None).await,
        Err(StoreError::BadSubnetSize { .. })
    ));
    assert!(c.release_subnet(&n("a")).await.unwrap());
    assert_eq!(c.claim_subnet(&n("c"), range, 24, None).await.unwrap(), a);
    assert_eq!(c.state().await.unwrap().subnets.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_subnet_on_a_long_lease_goes_when_the_lease_ends() {
    let kv = MemoryKv::new();
    let c = cluster(&kv);
    let long = c.lease(Duration::from_secs(24 * 3600), None).await.unwrap();
    let a = NodeName::new("a").unwrap();
    let net_a = c
        .claim_subnet(&a, net("10.230.0.0/16"), 24, Some(long))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(23 * 3600)).await;
    assert_eq!(c.state().await.unwrap().subnets.get(&a), Some(&net_a));
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(c.state().await.unwrap().subnets.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_vip_is_the_same_for_a_service_and_its_release_waits_for_its_last_task() {
    let kv = MemoryKv::new();
    let c = cluster(&kv);
    let other = cluster(&kv.connect());
    let pool = net("10.253.0.0/30");
    let web = c.claim_vip(&svc("web"), pool).await.unwrap();
    assert_eq!(other.claim_vip(&svc("web"), pool).await.unwrap(), web);
    assert_eq!((web.vip.to_string(), web.fwmark), ("10.253.0.1".into(), 256));
    let db = c.claim_vip(&svc("db"), pool).await.unwrap();
    assert_eq!((db.vip.to_string(), db.fwmark), ("10.253.0.2".into(), 257));
    let err = c.claim_vip(&svc("cache"), pool).await.unwrap_err();
    assert!(
        matches!(err, StoreError::VipPoolExhausted { size: 2, .. }),
        "{err}"
    );

    let lease = c.lease(TTL, None).await.unwrap();
    let t = task("t1", "web", "n1", "10.0.0.2");
    c.put_task(&t, lease).await.unwrap();
    let err = c.release_vip(&svc("web")).await.unwrap_err();
    assert_eq!(
        err,
        StoreError::InUse {
            service: svc("web"),
            tasks: 1
        }
    );
    c.delete_task(&t).await.unwrap();
    assert!(c.release_vip(&svc("web")).await.unwrap());
    assert!(!c.release_vip(&svc("web")).await.unwrap());
    // The address is free again; the mark goes above every claimed one.
    let cache = c.claim_vip(&svc("cache"), pool).await.unwrap();
    assert_eq!((cache.vip, cache.fwmark), (web.vip, 258));
    let state = c.state().await.unwrap();
    assert_eq!(state.services.len(), 2);
    assert_eq!(state.services[&svc("cache")].fwmark().unwrap().get(), 258);
}

#[tokio::test(start_paused = true)]
async fn a_published_port_belongs_to_one_service() {
    let kv = MemoryKv::new();
    let c = cluster(&kv);
    c.claim_port(Protocol::Tcp, 8080, &svc("web")).await.unwrap();
    c.claim_port(Protocol::Tcp, 8080, &svc("web")).await.unwrap();
    c.claim_port(Protocol::Udp, 8080, &svc("dns")).await.unwrap();
    let err = c.claim_port(Protocol::Tcp, 8080, &svc("api")).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "published port 8080/tcp is already claimed by service web"
    );
    assert!(!c.release_port(Protocol::Tcp, 8080, &svc("api")).await.unwrap());
    assert!(c.release_port(Protocol::Tcp, 8080, &svc("web")).await.unwrap());
    c.claim_port(Protocol::Tcp, 8080, &svc("api")).await.unwrap();
    let ports = c.state().await.unwrap().ports;
    assert_eq!(ports[&(Protocol::Tcp, 8080)], svc("api"));
    assert_eq!(ports[&(Protocol::Udp, 8080)], svc("dns"));
}

#[tokio::test(start_paused = true)]
async fn eight_concurrent_claimers_of_one_service_get_one_vip() {
    let kv = MemoryKv::new();
    let claim = scenarios::one_service_one_vip(Arc::new(kv.clone()), Keys::default(), 8)
        .await
        .unwrap();
    let state = cluster(&kv).state().await.unwrap();
    assert_eq!(state.services.len(), 1);
    assert_eq!(state.services[&svc("web")], claim);
    let index = kv.get_prefix("/vipd/v1/vips/").await.unwrap().kvs;
    assert_eq!(index.len(), 1, "no VIP leaked by a lost race");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_services_claimed_at_once_by_three_nodes_are_all_distinct() {
    let kv = MemoryKv::new();
    let claims = scenarios::many_services_distinct(Arc::new(kv.clone()), Keys::default(), 50, 3)
        .await
        .unwrap();
    assert_eq!(claims.len(), 50);
    assert_eq!(kv.get_prefix("/vipd/v1/fwmarks/").await.unwrap().kvs.len(), 50);
}

async fn wait_for(
    rx: &mut tokio::sync::watch::Receiver<View>,
    what: &str,
    ok: impl Fn(&View) -> bool,
) -> View {
    let found = tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|v| ok(v)))
        .await
        .map(|r| r.map(|v| v.clone()));
    match found {
        Ok(Ok(v)) => v,
        _ => panic!("the reflector never showed {what}: {:?}", rx.borrow()),
    }
}

#[tokio::test(start_paused = true)]
async fn the_reflector_follows_changes_lists_again_after_a_compaction_and_keeps_its_snapshot_while_unreachable(
) {
    let kv = MemoryKv::new();
    let writer = cluster(&kv.connect());
    let lease = writer.lease(TTL, None).await.unwrap();
    writer
        .register_node(&node("n1", "192.0.2.1"), lease)
        .await
        .unwrap();
    let reader = kv.connect();
    let backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };
    let reflector = Reflector::spawn(Arc::new(reader.clone()), Keys::default(), backoff);
    let mut rx = reflector.subscribe();
    wait_for(&mut rx, "the node", |v| v.state.nodes.len() == 1).await;
    writer
        .put_task(&task("t1", "web", "n1", "10.0.0.2"), lease)
        .await
        .unwrap();
    let v = wait_for(&mut rx, "the task", |v| v.state.tasks.len() == 1).await;
    assert_eq!(v.lists, 1);
    let t1 = (
        svc("web"),
        NodeName::new("n1").unwrap(),
        TaskId::new("t1").unwrap(),
    );
    assert_eq!(v.diff.tasks.added, std::slice::from_ref(&t1));
    assert!(v.diff.nodes.is_empty());

    // Its watch falls behind a compaction: it lists again and misses nothing.
    reader.set_link(Link::Stalled);
    writer
        .put_task(&task("t2", "web", "n1", "10.0.0.3"), lease)
        .await
        .unwrap();
    writer.claim_vip(&svc("web"), net("10.253.0.0/16")).await.unwrap();
    kv.compact(kv.revision()).unwrap();
    reader.set_link(Link::Up);
    let v = wait_for(&mut rx, "the relisted state", |v| v.lists == 2).await;
    assert_eq!(v.state.tasks.len(), 2);
    assert_eq!(v.state.services.len(), 1);
    assert_eq!(v.state.revision, kv.revision());
    assert_eq!(
        v.diff.tasks.added.len(),
        1,
        "the re-list's diff has what the watch missed"
    );
    assert_eq!(v.diff.services.added, [svc("web")]);

    // Unreachable: the snapshot stays, the view says since when.
    reader.set_link(Link::Down);
    let down = wait_for(&mut rx, "unreachable", |v| v.unreachable_since.is_some()).await;
    assert_eq!(down.state.tasks.len(), 2);
    writer
        .delete_task(&task("t1", "web", "n1", "10.0.0.2"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let still = reflector.view();
    assert_eq!(still.state.tasks.len(), 2, "the last snapshot is kept");
    assert_eq!(
        still.unreachable_since, down.unreachable_since,
        "since the first failure"
    );
    reader.set_link(Link::Up);
    let back = wait_for(&mut rx, "recovery", |v| v.unreachable_since.is_none()).await;
    assert_eq!(back.state.tasks.len(), 1);
    assert_eq!(back.diff.tasks.removed, [t1]);
    assert!(back.last_error.is_none());
}
