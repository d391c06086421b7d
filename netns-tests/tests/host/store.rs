//! The cluster store against a real etcd (Debian's `etcd` binary): one member per test
//! on free loopback ports, with its own data dir, stopped and removed on drop. A missing
//! `etcd` fails the tests (on CI and elsewhere), as a missing tool does in every suite.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::watch;
use vipd::core::model::{Ipv4Net, ServiceName};
use vipd::store::etcd::{EtcdConfig, EtcdKv, TlsFiles};
use vipd::store::kv::{Kv, KvError, Revision, WatchMessage};
use vipd::store::{scenarios, Cluster, Keys, NodeName, NodeRecord, StoreError, TaskId, TaskRecord, View};

use crate::common::{run, unique};

/// One etcd member, stopped and its data dir removed when dropped (the cluster agent
/// tests use it too).
pub(crate) struct Etcd {
    child: Child,
    dir: PathBuf,
    pub(crate) endpoint: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl Etcd {
    pub(crate) fn start() -> Etcd {
        Etcd::start_with(None)
    }

    /// A member that speaks TLS only and checks its clients' certificates (`certs`).
    fn start_tls(certs: &Certs) -> Etcd {
        Etcd::start_with(Some(certs))
    }

    fn start_with(tls: Option<&Certs>) -> Etcd {
        let dir = std::env::temp_dir().join(unique("vipd-etcd-"));
        let (client, peer) = (free_port(), free_port());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut command = Command::new("etcd");
        command
            .args(["--name", "n1", "--data-dir"])
            .arg(&dir)
            .args([
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args([
                "--initial-cluster",
                &format!("n1={peer_url}"),
                "--initial-cluster-state",
                "new",
            ])
            .args(["--unsafe-no-fsync", "--logger", "zap", "--log-level", "warn"]);
        if let Some(c) = tls {
            command
                .arg("--cert-file")
                .arg(c.path("server.pem"))
                .arg("--key-file")
                .arg(c.path("server.key"))
                .arg("--trusted-ca-file")
                .arg(c.path("ca.pem"))
                .arg("--client-cert-auth");
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run `etcd` (Debian's etcd-server package; scripts/setup.sh installs it): {e}")
            });
        let etcd = Etcd { child, dir, endpoint };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut health = Command::new("etcdctl");
            health.args(["--endpoints", &etcd.endpoint]);
            if let Some(c) = tls {
                health
                    .arg("--cacert")
                    .arg(c.path("ca.pem"))
                    .arg("--cert")
                    .arg(c.path("client.pem"))
                    .arg("--key")
                    .arg(c.path("client.key"));
            }
            let out = health
                .args(["endpoint", "health"])
                .env("ETCDCTL_API", "3")
                .output()
                .expect("cannot run `etcdctl` (Debian's etcd-client package)");
            if out.status.success() {
                return etcd;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy in 30 s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(crate) async fn kv(&self) -> Arc<dyn Kv> {
        let kv = EtcdKv::connect(&EtcdConfig::new(vec![self.endpoint.clone()]))
            .await
            .expect("connect to the test etcd");
        Arc::new(kv)
    }

    fn etcdctl(&self, args: &[&str]) -> String {
        let mut all = vec!["env", "ETCDCTL_API=3", "etcdctl", "--endpoints", &self.endpoint];
        all.extend_from_slice(args);
        run(&all)
    }
}

impl Etcd {
    /// Stop the member (its data dir stays until drop).
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn svc(name: &str) -> ServiceName {
    ServiceName::new(name).unwrap()
}

fn pool() -> Ipv4Net {
    Ipv4Net::new("10.253.0.0".parse().unwrap(), 16).unwrap()
}

/// The reflector's first view that `ok` accepts; fails after `secs` seconds.
async fn wait_view(
    rx: &mut watch::Receiver<View>,
    secs: u64,
    what: &str,
    ok: impl Fn(&View) -> bool,
) -> View {
    match tokio::time::timeout(Duration::from_secs(secs), rx.wait_for(|v| ok(v))).await {
        Ok(Ok(v)) => v.clone(),
        _ => panic!("timed out after {secs} s: {what}"),
    }
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

#[test]
fn claims_under_races_against_etcd_give_one_vip_per_service_and_never_share_one() {
    let etcd = Etcd::start();
    runtime().block_on(async {
        let kv = etcd.kv().await;
        let one = scenarios::one_service_one_vip(kv.clone(), Keys::new("/race1/"), 8)
            .await
            .unwrap();
        assert_eq!(one.fwmark, 256);
        let claims = scenarios::many_services_distinct(kv.clone(), Keys::new("/race2/"), 50, 3)
            .await
            .unwrap();
        assert_eq!(claims.len(), 50);
        assert_eq!(
            kv.get_prefix("/race2/vips/").await.unwrap().kvs.len(),
            50,
            "no VIP leaked"
        );
    });
}

fn task_t2() -> TaskRecord {
    TaskRecord {
        id: TaskId::new("t2").unwrap(),
        service: svc("web"),
        node: NodeName::new("n1").unwrap(),
        address: "10.0.0.2".parse().unwrap(),
        definition: None,
        weight: None,
    }
}

#[test]
fn a_node_lease_of_two_seconds_ends_in_etcd_and_takes_the_nodes_tasks() {
    let etcd = Etcd::start();
    runtime().block_on(async {
        let cluster = Cluster::new(etcd.kv().await, Keys::default());
        let lease = cluster.lease(Duration::from_secs(2), None).await.unwrap();
        let node = NodeRecord {
            name: NodeName::new("n1").unwrap(),
            address: "192.0.2.1".parse().unwrap(),
            subnet: None,
        };
        cluster.register_node(&node, lease).await.unwrap();
        let task = TaskRecord {
            id: TaskId::new("t1").unwrap(),
            ..task_t2()
        };
        cluster.put_task(&task, lease).await.unwrap();
        assert_eq!(cluster.tasks().await.unwrap(), vec![task]);
        // The node's record names its lease, and the lease says when it was renewed
        // (what `vipd status` shows as a node's last seen).
        assert_eq!(cluster.state().await.unwrap().node_leases[&node.name], lease);
        let ttl = cluster
            .kv()
            .lease_time_to_live(lease)
            .await
            .unwrap()
            .expect("a live lease");
        assert_eq!(ttl.granted, Duration::from_secs(2));
        assert!(
            ttl.left <= ttl.granted && ttl.since_renewed() <= ttl.granted,
            "{ttl:?}"
        );
        // Another lease cannot take the live name; the same lease resumes.
        let other = cluster.lease(Duration::from_secs(2), None).await.unwrap();
        assert!(cluster.register_node(&node, other).await.is_err());
        assert_eq!(
            cluster.lease(Duration::from_secs(2), Some(lease)).await.unwrap(),
            lease
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let state = cluster.state().await.unwrap();
            if state.nodes.is_empty() && state.tasks.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "the lease never ended: {state:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(cluster.kv().lease_time_to_live(lease).await.unwrap(), None);
        // etcd refuses a put on the ended lease, and says which lease.
        let late = cluster.put_task(&task_t2(), lease).await.unwrap_err();
        assert_eq!(late, StoreError::Kv(KvError::LeaseNotFound(lease)));
        assert_ne!(
            cluster.lease(Duration::from_secs(2), Some(lease)).await.unwrap(),
            lease
        );
    });
}

#[test]
fn a_watch_from_a_compacted_revision_says_so_and_the_reflector_lists_again() {
    let etcd = Etcd::start();
    runtime().block_on(async {
        let kv = etcd.kv().await;
        let cluster = Cluster::new(kv.clone(), Keys::default());
        cluster.claim_vip(&svc("web"), pool()).await.unwrap();
        let before = kv.get_prefix("/vipd/v1/").await.unwrap().revision;
        let db = svc("db");
        cluster.claim_vip(&db, pool()).await.unwrap();
        let now = kv.get_prefix("/vipd/v1/").await.unwrap().revision;
        etcd.etcdctl(&["compact", &now.0.to_string()]);
        let mut w = kv.watch("/vipd/v1/", Revision(before.0)).await.unwrap();
        assert_eq!(
            w.next().await,
            Some(Ok(WatchMessage::Compacted {
                compact_revision: now
            }))
        );

        let reflector = vipd::store::Reflector::spawn(kv.clone(), Keys::default(), Default::default());
        let mut rx = reflector.subscribe();
        let v = wait_view(&mut rx, 10, "the reflector lists the services", |v| {
            v.state.services.len() == 2
        })
        .await;
        assert_eq!(v.state.revision, now);
        let api = svc("api");
        cluster.claim_vip(&api, pool()).await.unwrap();
        wait_view(&mut rx, 10, "the reflector watches new claims", |v| {
            v.state.services.len() == 3
        })
        .await;
    });
}

#[test]
fn an_unreachable_etcd_leaves_the_snapshot_as_it_was_and_new_claims_fail_clearly() {
    let mut etcd = Etcd::start();
    runtime().block_on(async {
        let kv = etcd.kv().await;
        let cluster = Cluster::new(kv.clone(), Keys::default());
        cluster.claim_vip(&svc("web"), pool()).await.unwrap();
        let backoff = vipd::store::Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(500),
        };
        let reflector = vipd::store::Reflector::spawn(kv.clone(), Keys::default(), backoff);
        let mut rx = reflector.subscribe();
        wait_view(&mut rx, 10, "the reflector lists the service", |v| {
            v.state.services.len() == 1
        })
        .await;

        etcd.kill();
        let down = wait_view(&mut rx, 30, "the reflector notices the dead etcd", |v| {
            v.unreachable_since.is_some()
        })
        .await;
        assert_eq!(down.state.services.len(), 1, "the last snapshot is kept");
        let db = svc("db");
        match cluster.claim_vip(&db, pool()).await {
            Err(StoreError::Kv(e)) => assert!(e.is_transient(), "{e}"),
            other => panic!("a claim without etcd must fail as unreachable: {other:?}"),
        }
        assert_eq!(reflector.view().state.services.len(), 1);
    });
}

/// A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, made
/// with `openssl` (P-256 keys, one day); removed on drop.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn new() -> Certs {
        let dir = std::env::temp_dir().join(unique("vipd-certs-"));
        std::fs::create_dir_all(&dir).expect("a certificate dir");
        let script = r#"set -e
cd "$1"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
key ca.key
openssl req -x509 -new -key ca.key -out ca.pem -days 1 -subj /CN=vipd-test-ca \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
for who in server client; do
  key "$who.key"
  openssl req -new -key "$who.key" -out "$who.csr" -subj "/CN=vipd-test-$who"
  usage=serverAuth; [ "$who" = client ] && usage=clientAuth
  printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=%s\nbasicConstraints=CA:FALSE\n' "$usage" >"$who.ext"
  openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
    -extfile "$who.ext" -out "$who.pem" 2>/dev/null
done
"#;
        run(&["sh", "-c", script, "sh", dir.to_str().expect("a UTF-8 temp dir")]);
        Certs { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `--etcd-ca`, `--etcd-cert` and `--etcd-key` as the store takes them: a member that
/// checks client certificates serves claims and leases over TLS, and refuses a client
/// without a certificate, or one that does not trust its CA, with an error that says so.
#[test]
fn the_store_speaks_tls_to_an_etcd_that_checks_its_clients() {
    let certs = Certs::new();
    let etcd = Etcd::start_tls(&certs);
    let config = |cert: bool, ca: &str| EtcdConfig {
        tls: Some(TlsFiles {
            ca: certs.path(ca),
            cert: cert.then(|| certs.path("client.pem")),
            key: cert.then(|| certs.path("client.key")),
        }),
        ..EtcdConfig::new(vec![etcd.endpoint.clone()])
    };
    runtime().block_on(async {
        let kv: Arc<dyn Kv> = Arc::new(
            EtcdKv::connect(&config(true, "ca.pem"))
                .await
                .expect("connect over TLS with a client certificate"),
        );
        let cluster = Cluster::new(kv, Keys::default());
        let claim = cluster
            .claim_vip(&svc("web"), pool())
            .await
            .expect("a claim over TLS");
        assert_eq!(cluster.state().await.unwrap().services[&svc("web")], claim);
        let lease = cluster.lease(Duration::from_secs(5), None).await.unwrap();
        let ttl = cluster
            .kv()
            .lease_time_to_live(lease)
            .await
            .unwrap()
            .expect("live");
        assert_eq!(ttl.granted, Duration::from_secs(5));

        // No client certificate: the member refuses the call (the connection may be
        // made lazily, so the first call is what fails).
        let refused = match EtcdKv::connect(&config(false, "ca.pem")).await {
            Err(e) => e.to_string(),
            Ok(kv) => kv.get_prefix("/").await.map(|_| ()).unwrap_err().to_string(),
        };
        assert!(
            refused.contains("--etcd-cert"),
            "a client without a certificate is refused, and told why: {refused}"
        );
        // A CA that did not sign the member's certificate: refused too.
        let untrusted = match EtcdKv::connect(&config(true, "client.pem")).await {
            Err(e) => e.to_string(),
            Ok(kv) => kv.get_prefix("/").await.map(|_| ()).unwrap_err().to_string(),
        };
        assert!(
            untrusted.contains("certificate"),
            "a member whose certificate the CA did not sign is not believed: {untrusted}"
        );
    });
}
