//! The registry, the scrape and the server together, over a fake of the kernel's
//! counters.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::registry::task_state;
use super::scrape::targets;
use super::*;
use crate::core::ipvs::Destination;
use crate::core::ipvs::{DestConfig, DestKey, Stats};

use crate::core::containers::ContainerId;
use crate::core::labels::Publish;
use crate::core::mesh;
use crate::core::model::{EndpointMode, Scheduler, ServiceName};
use crate::core::model::{FwMark, Protocol};
use crate::core::status::{EngineState, Report, SandboxStatus, ServiceReport, TaskReport, TaskState};
use crate::ipvs::IpvsError;

fn task(name: &str, state: TaskState, serving: bool) -> TaskReport {
    TaskReport {
        container: ContainerId(format!("{name}000000")),
        name: name.to_owned(),
        addresses: vec![],
        state,
        serving,
        weight: 1,
        node: None,
    }
}

fn sandbox(path: &str, services: &[&str], in_sync: bool) -> SandboxStatus {
    SandboxStatus {
        path: path.into(),
        container: String::new(),
        services: services.iter().map(|s| s.to_string()).collect(),
        in_sync,
        error: None,
        last_operations: 0,
        last_change: 0,
    }
}

/// web (vip, fwmark 256, publishes 8080) with 3 tasks, db (dnsrr) with 1; two
/// sandboxes, one gone, and the ingress.
fn status() -> Report {
    Report {
        cluster: None,
        docker: EngineState {
            connected: true,
            error: None,
        },
        last_sync: 1,
        last_resync: 1,
        services: vec![
            ServiceReport {
                name: ServiceName::new("web").unwrap(),
                mode: EndpointMode::Vip,
                vip: Some("10.253.0.1".parse().unwrap()),
                fwmark: FwMark::new(256),
                scheduler: Scheduler::default(),
                published: vec![Publish {
                    protocol: Protocol::Tcp,
                    published: 8080,
                    target: 80,
                }],
                tasks: vec![
                    task("w1", TaskState::Running, true),
                    task("w2", TaskState::Healthy, true),
                    task("w3", TaskState::Draining, false),
                ],
                errors: vec![],
            },
            ServiceReport {
                name: ServiceName::new("db").unwrap(),
                mode: EndpointMode::Dnsrr,
                vip: None,
                fwmark: None,
                scheduler: Scheduler::default(),
                published: vec![],
                tasks: vec![task("d1", TaskState::Starting, false)],
                errors: vec![],
            },
        ],
        sandboxes: vec![
            sandbox("/ns/a", &["web", "db"], true),
            sandbox("/ns/b", &["web"], false),
            sandbox("/ns/gone", &["web"], true),
            sandbox("/ns/ingress", &["web"], true),
        ],
        label_errors: vec![],
        conflicts: vec![],
    }
}

fn dest(ip: &str, conns: u64) -> Destination {
    Destination {
        key: DestKey {
            addr: ip.parse().unwrap(),
            port: 0,
        },
        config: DestConfig::masq(1),
        active_conns: 1,
        inactive_conns: 0,
        persist_conns: 0,
        stats: Stats {
            conns,
            inbytes: conns * 100,
            outbytes: conns * 1000,
            ..Stats::default()
        },
    }
}

/// Counters read by a function: the fakes below.
struct FnCounters<F>(F);

impl<F> IpvsCounters for FnCounters<F>
where
    F: Fn(&Path, &[FwMark]) -> Result<Vec<(FwMark, Destination)>, ReadError> + Send + Sync,
{
    fn read(&self, netns: &Path, marks: &[FwMark]) -> Result<Vec<(FwMark, Destination)>, ReadError> {
        (self.0)(netns, marks)
    }
}

/// Each namespace's table as the kernel would show it: 10.1.0.3 and 10.1.0.4 behind
/// web in /ns/a and /ns/b (4 and 6 connections each), 10.1.0.3 behind port 8080 in
/// the ingress (5); /ns/gone has vanished.
fn fake_reader(netns: &Path, marks: &[FwMark]) -> Result<Vec<(FwMark, Destination)>, ReadError> {
    let web = FwMark::new(256).unwrap();
    let published = mesh::ingress_mark(Protocol::Tcp, 8080);
    match netns.to_str().unwrap() {
        "/ns/a" | "/ns/b" => {
            assert_eq!(marks, [web]);
            let n = if netns.ends_with("a") { 4 } else { 6 };
            Ok(vec![(web, dest("10.1.0.3", n)), (web, dest("10.1.0.4", n))])
        }
        "/ns/ingress" => {
            assert_eq!(marks, [published]);
            Ok(vec![(published, dest("10.1.0.3", 5))])
        }
        _ => Err(ReadError::Vanished),
    }
}

fn followed(counters: Arc<dyn IpvsCounters>, timeout: Duration) -> (Metrics, watch::Sender<Report>) {
    let metrics = Metrics::with_counters(counters, timeout);
    let (tx, rx) = watch::channel(status());
    metrics.follow(rx, Some("/ns/ingress".into()));
    (metrics, tx)
}

fn assert_has(text: &str, lines: &[&str]) {
    for line in lines {
        assert!(text.lines().any(|l| l == *line), "no line {line:?} in:\n{text}");
    }
}

#[tokio::test]
async fn a_scrape_shows_what_the_handle_was_told_and_what_the_status_says() {
    let (metrics, _tx) = followed(Arc::new(FnCounters(fake_reader)), BACKEND_READ_TIMEOUT);
    metrics.reconcile_done(ReconcileKind::Resync, Duration::from_millis(20), 7);
    metrics.reconcile_done(ReconcileKind::Event, Duration::from_millis(2), 1);
    metrics.reconcile_done(ReconcileKind::Event, Duration::from_millis(3), 0);
    metrics.error(ErrorKind::Sandbox);
    metrics.error(ErrorKind::Sandbox);
    metrics.dns_answered(DnsPath::Fast, 1, 0, Duration::from_micros(20));
    metrics.dns_answered(DnsPath::Slow, 28, 3, Duration::from_millis(1));
    metrics.dns_answered(DnsPath::Slow, 999, 2, Duration::from_secs(2));
    let text = metrics.render().await.unwrap();
    assert_has(
        &text,
        &[
            "# TYPE vipd_services gauge",
            "vipd_services{mode=\"vip\"} 1",
            "vipd_services{mode=\"dnsrr\"} 1",
            "vipd_tasks{state=\"serving\"} 2",
            "vipd_tasks{state=\"draining\"} 1",
            "vipd_tasks{state=\"starting\"} 1",
            "vipd_tasks{state=\"stopped\"} 0",
            "vipd_sandboxes{state=\"in_sync\"} 3",
            "vipd_sandboxes{state=\"out_of_sync\"} 1",
            "vipd_engine_connected 1",
            "# TYPE vipd_reconcile_passes counter",
            "vipd_reconcile_passes_total{kind=\"event\"} 2",
            "vipd_reconcile_passes_total{kind=\"resync\"} 1",
            "vipd_reconcile_passes_total{kind=\"drain\"} 0",
            "# TYPE vipd_reconcile_duration_seconds histogram",
            "vipd_reconcile_duration_seconds_count{kind=\"event\"} 2",
            "vipd_reconcile_duration_seconds_bucket{le=\"0.025\",kind=\"resync\"} 1",
            "vipd_reconcile_operations_total 8",
            "vipd_errors_total{kind=\"sandbox\"} 2",
            "vipd_errors_total{kind=\"engine\"} 0",
            "vipd_dns_queries_total{path=\"fast\",qtype=\"A\",rcode=\"NOERROR\"} 1",
            "vipd_dns_queries_total{path=\"slow\",qtype=\"AAAA\",rcode=\"NXDOMAIN\"} 1",
            "vipd_dns_queries_total{path=\"slow\",qtype=\"other\",rcode=\"SERVFAIL\"} 1",
            "vipd_dns_answer_duration_seconds_count{path=\"slow\"} 2",
            "vipd_dns_answer_duration_seconds_bucket{le=\"0.0001\",path=\"fast\"} 1",
            // Summed over /ns/a, /ns/b and the ingress; /ns/gone is left out.
            "# TYPE vipd_backend_connections counter",
            "vipd_backend_connections_total{service=\"web\",backend=\"10.1.0.3\"} 15",
            "vipd_backend_connections_total{service=\"web\",backend=\"10.1.0.4\"} 10",
            "vipd_backend_incoming_bytes_total{service=\"web\",backend=\"10.1.0.3\"} 1500",
            "vipd_backend_outgoing_bytes_total{service=\"web\",backend=\"10.1.0.4\"} 10000",
            "vipd_backend_connections_active{service=\"web\",backend=\"10.1.0.3\"} 3",
            "vipd_backend_scrape_namespaces{outcome=\"read\"} 3",
            "vipd_backend_scrape_namespaces{outcome=\"vanished\"} 1",
            "# EOF",
        ],
    );
}

#[tokio::test]
async fn the_cluster_metrics_show_the_store_the_peers_and_each_list_once() {
    use crate::core::status::{ClusterStatus, NodeStatus};
    let (metrics, tx) = followed(Arc::new(FnCounters(fake_reader)), BACKEND_READ_TIMEOUT);
    let text = metrics.render().await.unwrap();
    assert_has(
        &text,
        &[
            "vipd_store_connected 0",
            "vipd_cluster_peers 0",
            "vipd_store_lists_total 0",
            "vipd_store_watch_lag_seconds 0.0",
        ],
    );
    let node = |name: &str| NodeStatus {
        name: name.into(),
        address: "192.0.2.1".into(),
        subnet: None,
        tasks: 0,
        last_seen: None,
    };
    let mut cluster = ClusterStatus {
        node: "a".into(),
        joined: true,
        store_connected: true,
        store_lists: 1,
        store_watch_lag_ms: Some(250),
        nodes: vec![node("a"), node("b"), node("c")],
        ..ClusterStatus::default()
    };
    tx.send_modify(|r| r.cluster = Some(cluster.clone()));
    let text = metrics.render().await.unwrap();
    assert_has(
        &text,
        &[
            "# TYPE vipd_store_connected gauge",
            "vipd_store_connected 1",
            "# TYPE vipd_cluster_peers gauge",
            "vipd_cluster_peers 2",
            "# TYPE vipd_store_lists counter",
            "vipd_store_lists_total 1",
            "# TYPE vipd_store_watch_lag_seconds gauge",
            "vipd_store_watch_lag_seconds 0.25",
        ],
    );
    // The same status scraped again counts nothing more; a re-list counts once.
    metrics.render().await.unwrap();
    cluster.store_lists = 2;
    cluster.store_connected = false;
    tx.send_modify(|r| r.cluster = Some(cluster.clone()));
    let text = metrics.render().await.unwrap();
    assert_has(&text, &["vipd_store_lists_total 2", "vipd_store_connected 0"]);
}

#[tokio::test]
async fn a_disabled_handle_counts_nothing() {
    let metrics = Metrics::disabled();
    metrics.error(ErrorKind::Engine);
    metrics.reconcile_done(ReconcileKind::Drain, Duration::from_millis(1), 3);
    assert!(!metrics.is_enabled());
    assert_eq!(metrics.render().await.unwrap(), "# EOF\n");
}

#[test]
fn the_ingress_reads_the_marks_of_the_published_ports_and_dnsrr_services_have_none() {
    let got = targets(&status(), Some(Path::new("/ns/ingress")));
    let web = FwMark::new(256).unwrap();
    let ingress = mesh::ingress_mark(Protocol::Tcp, 8080);
    let want: Vec<(&str, Vec<FwMark>)> = vec![
        ("/ns/a", vec![web]),
        ("/ns/b", vec![web]),
        ("/ns/gone", vec![web]),
        ("/ns/ingress", vec![ingress]),
    ];
    let got: Vec<(&str, Vec<FwMark>)> = got
        .iter()
        .map(|t| {
            (
                t.netns.to_str().unwrap(),
                t.marks.iter().map(|(m, _)| *m).collect(),
            )
        })
        .collect();
    assert_eq!(got, want);
}

/// A namespace that fails, or is not read in time, keeps its last values; one that
/// is no longer in the status is forgotten.
#[tokio::test]
async fn a_failed_or_slow_read_keeps_the_last_values() {
    let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&slow);
    let counters = FnCounters(move |netns: &Path, marks: &[FwMark]| {
        if flag.load(std::sync::atomic::Ordering::SeqCst) {
            if netns == Path::new("/ns/a") {
                std::thread::sleep(Duration::from_millis(600));
            }
            if netns == Path::new("/ns/b") {
                return Err(ReadError::Ipvs(IpvsError::Unavailable));
            }
        }
        fake_reader(netns, marks)
    });
    let (metrics, tx) = followed(Arc::new(counters), Duration::from_millis(300));
    let line = "vipd_backend_connections_total{service=\"web\",backend=\"10.1.0.4\"} 10";
    assert_has(&metrics.render().await.unwrap(), &[line]);

    slow.store(true, std::sync::atomic::Ordering::SeqCst);
    let started = std::time::Instant::now();
    let text = metrics.render().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(550),
        "{:?}",
        started.elapsed()
    );
    assert_has(
        &text,
        &[
            line,
            "vipd_backend_scrape_namespaces{outcome=\"failed\"} 1",
            "vipd_backend_scrape_namespaces{outcome=\"timed_out\"} 1",
        ],
    );

    tx.send_modify(|s| s.sandboxes.retain(|sb| sb.path != Path::new("/ns/a")));
    let text = metrics.render().await.unwrap();
    assert_has(
        &text,
        &["vipd_backend_connections_total{service=\"web\",backend=\"10.1.0.4\"} 6"],
    );
}

#[test]
fn labels_are_a_small_fixed_set() {
    assert_eq!(
        [1, 28, 33, 12, 4242].map(qtype_label),
        ["A", "AAAA", "SRV", "PTR", "other"]
    );
    assert_eq!(
        [0, 3, 5, 9].map(rcode_label),
        ["NOERROR", "NXDOMAIN", "REFUSED", "other"]
    );
    assert_eq!(task_state(true, TaskState::Running), "serving");
    assert_eq!(task_state(false, TaskState::Unhealthy), "unhealthy");
    assert_eq!(task_state(false, TaskState::Running), "other");
}

/// `request` sent over a real loopback connection; the whole response.
async fn ask(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("the server closes the connection")
        .unwrap();
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn the_server_answers_get_metrics_and_404_for_anything_else() {
    let (metrics, _tx) = followed(Arc::new(FnCounters(fake_reader)), BACKEND_READ_TIMEOUT);
    metrics.error(ErrorKind::Host);
    let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap(), metrics)
        .await
        .unwrap();
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    let ok = ask(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
    )
    .await;
    let (head, body) = ok.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains(&format!("Content-Type: {CONTENT_TYPE}\r\n")),
        "{head}"
    );
    assert!(
        head.contains(&format!("Content-Length: {}\r\n", body.len())),
        "{head}"
    );
    assert!(head.contains("Connection: close"), "{head}");
    assert_has(body, &["vipd_errors_total{kind=\"host\"} 1", "# EOF"]);
    let with_query = ask(addr, "GET /metrics?x=1 HTTP/1.1\r\n\r\n").await;
    assert!(with_query.starts_with("HTTP/1.1 200 OK\r\n"), "{with_query}");
    // An HTTP/1.0 client is answered in its own version.
    let old = ask(addr, "GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
    assert!(old.starts_with("HTTP/1.0 200 OK\r\n"), "{old}");

    for (request, status) in [
        ("GET / HTTP/1.1\r\nHost: x\r\n\r\n", "404 Not Found"),
        ("GET /metricsx HTTP/1.1\r\n\r\n", "404 Not Found"),
        (
            "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "405 Method Not Allowed",
        ),
        ("hello\r\n\r\n", "400 Bad Request"),
    ] {
        let got = ask(addr, request).await;
        assert!(
            got.starts_with(&format!("HTTP/1.1 {status}\r\n")),
            "{request:?}: {got}"
        );
    }
    let head_only = ask(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
    assert!(head_only.ends_with("\r\n\r\n"), "no body: {head_only}");

    stop.send(()).unwrap();
    serving.await.unwrap();
}

#[tokio::test]
async fn a_bind_failure_names_the_address() {
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let Err(e) = MetricsServer::bind(addr, Metrics::new()).await else {
        panic!("bound {addr} twice");
    };
    assert!(
        e.to_string()
            .starts_with(&format!("cannot serve metrics on {addr}: ")),
        "{e}"
    );
}
