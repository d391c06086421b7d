//! Benchmark: what one task's start or die costs `vipd run`, with few and with many
//! services present and the same number of sandboxes. The agent and the planner are the
//! real ones; the engine and the kernels are the in-memory fakes, so only vipd's own work
//! is timed (the VM benchmark `scripts/bench/event-latency.sh` times the same path with a
//! real dockerd and IPVS).
//!
//! ```text
//! cargo run --release --example sync_cost [S...]     (default: 10 100)
//! ```
//!
//! Two measurements, each two ways in the same run:
//! - one event: S services of one task each, 3 clients and plain containers up to 103
//!   sandboxes, all on one network; 20 times a new task of service 1 starts and dies
//!   again, each event and its sync timed (every sandbox planned and applied);
//! - one sandbox: S services of 2 backends each; 20,000 times service 1 gains and loses
//!   a third backend, each update through the kernel facade timed.
//!
//! Both run the production kernel facade (`vipd::kernel::Kernel`) over per-sandbox fake
//! kernels. "change" is what `vipd run` does: each sandbox planned from the spec it was
//! last brought to (only what changed). "whole" is the baseline: the whole spec planned
//! again (`Kernel::planning_whole_specs`).
//! Prints the median and p99 of each, and the growth from the smallest S to the largest:
//! a cost that does not grow with the services present stays near 1.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vipd::agent::{Agent, AgentConfig, KernelPorts};
use vipd::core::model::{Ipv4Net, SandboxKey};
use vipd::core::plan::SysctlSettings;
use vipd::core::spec::{self, SandboxSpec};
use vipd::docker::fake::{running_container, FakeEngine};
use vipd::docker::{ContainerId, ContainerInfo, ContainerNetwork, EngineEvent, NetworkId};
use vipd::kernel::fake::FakeOpener;
use vipd::kernel::{FakeHost, Kernel, SandboxProgrammer};
use vipd::metrics::Metrics;

/// The production kernel facade over one in-memory kernel per sandbox, each sandbox with
/// `own` as its address; `whole` plans each sandbox's whole spec every time.
fn kernel(own: &str, whole: bool) -> Kernel<FakeOpener> {
    let own = Ipv4Net::new(own.parse().expect("an address"), 16).expect("a prefix");
    let kernel = Kernel::new(FakeOpener::with_addrs(vec![own]));
    if whole {
        kernel.planning_whole_specs()
    } else {
        kernel
    }
}

/// Container number `n` on the one network, at 10.1.(n / 250).(n % 250 + 2).
fn container(n: usize, labels: &[(&str, &str)]) -> ContainerInfo {
    let mut c = running_container(&format!("c{n:011}"), &format!("c{n}")).with_network(ContainerNetwork {
        network_id: NetworkId("front".into()),
        name: "front".into(),
        ip: Some(
            format!("10.1.{}.{}", n / 250, n % 250 + 2)
                .parse()
                .expect("an address"),
        ),
        prefix_len: 16,
        gateway: Some("10.1.255.254".parse().expect("an address")),
        aliases: vec![],
    });
    for (k, v) in labels {
        c = c.with_label(k, v);
    }
    c
}

fn event(c: &ContainerInfo, action: &str) -> EngineEvent {
    EngineEvent::Container {
        id: c.id.clone(),
        action: action.into(),
        attributes: BTreeMap::new(),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One event: median and p99 milliseconds per event with `services` services in `sandboxes`
/// sandboxes.
async fn measure_event(services: usize, sandboxes: usize, rounds: usize, whole: bool) -> (f64, f64) {
    let engine = FakeEngine::new();
    let mut n = 0;
    for s in 1..=services {
        n += 1;
        engine.upsert_container(container(n, &[("vipd.service", &format!("svc{s}"))]));
    }
    while n < sandboxes {
        n += 1;
        engine.upsert_container(container(n, &[]));
    }
    let dir = std::env::temp_dir().join(format!(
        "vipd-sync-cost-{}-{services}-{whole}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = AgentConfig {
        pool: Ipv4Net::new("10.253.0.0".parse().expect("an address"), 16).expect("a prefix"),
        state_dir: dir.clone(),
        grace: Duration::from_secs(60),
        resync: Duration::from_secs(3600),
        debounce: Duration::from_millis(5),
        sysctls: SysctlSettings::default(),
        dns_domain: None,
        dns_ttl: 5,
        ingress: None,
        drain_grace: Duration::from_secs(30),
        timeouts: None,
        metrics: Metrics::disabled(),
    };
    let host = Arc::new(FakeHost::default());
    let ports = KernelPorts {
        sandboxes: Arc::new(kernel("10.1.255.254", whole)),
        host_firewall: host.clone(),
        host_ports: host,
    };
    let mut agent = Agent::new(Arc::new(engine.clone()), ports, cfg, None).expect("an agent");
    agent.relist().await.expect("a listing");
    let r = agent.sync(true).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let mut times = Vec::new();
    for _ in 0..rounds {
        let mut task = container(n + 1, &[("vipd.service", "svc1")]);
        for action in ["start", "die"] {
            task.running = action == "start";
            engine.upsert_container(task.clone());
            let t = Instant::now();
            agent.on_event(&event(&task, action)).await.expect("an event");
            let r = agent.sync(false).await;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            assert!(r.errors.is_empty(), "{:?}", r.errors);
            // Every sandbox but the task's own, which comes or goes with it.
            assert!(r.sandboxes_programmed >= sandboxes, "{r:?}");
        }
        engine.remove_container(&ContainerId(task.id.0.clone()));
    }
    let _ = std::fs::remove_dir_all(&dir);
    times.sort_by(f64::total_cmp);
    (percentile(&times, 50.0), percentile(&times, 99.0))
}

/// S services, `svcN` with VIP 10.253.0.N and fwmark 256+N, each with 2 backends on
/// 10.210.0.0/16; service 1 gets a third backend with `extra`.
fn spec_of(services: usize, extra: bool) -> SandboxSpec {
    let mut out = Vec::new();
    for n in 1..=services {
        let (hi, lo) = (n / 200, n % 200);
        let mut backends = vec![
            format!(r#"{{"ip":"10.210.{}.{}"}}"#, 10 + hi, lo + 1),
            format!(r#"{{"ip":"10.210.{}.{}"}}"#, 100 + hi, lo + 1),
        ];
        if extra && n == 1 {
            backends.push(r#"{"ip":"10.210.250.1"}"#.to_owned());
        }
        out.push(format!(
            r#"{{"name":"svc{n}","vip":"10.253.{hi}.{}","fwmark":{},"backends":[{}]}}"#,
            lo + 1,
            256 + n,
            backends.join(",")
        ));
    }
    spec::parse(&format!(r#"{{"services":[{}]}}"#, out.join(","))).expect("a valid spec")
}

/// One sandbox: median and p99 microseconds per update with `services` services; with `change`, each
/// update is planned from the spec it comes from (the kernel facade's default), otherwise
/// from the whole spec.
fn measure_update(services: usize, rounds: usize, change: bool) -> (f64, f64) {
    let kernel = kernel("10.210.0.2", !change);
    let key = SandboxKey::from("/run/docker/netns/benchmark");
    let settings = SysctlSettings::default();
    let (plain, more) = (
        Arc::new(spec_of(services, false)),
        Arc::new(spec_of(services, true)),
    );
    let mut view = kernel
        .program(&key, &plain, &settings, None)
        .expect("first program")
        .view;
    let mut times = Vec::with_capacity(2 * rounds);
    for _ in 0..rounds {
        for to in [&more, &plain] {
            let t = Instant::now();
            let done = kernel.program(&key, to, &settings, Some(view)).expect("update");
            times.push(t.elapsed().as_secs_f64() * 1e6);
            assert_eq!(done.operations, 1, "one backend change is one IPVS operation");
            view = done.view;
        }
    }
    times.sort_by(f64::total_cmp);
    (percentile(&times, 50.0), percentile(&times, 99.0))
}

/// (median, p99) of "change" and of "whole", for one S.
type Row = (usize, (f64, f64), (f64, f64));

fn print_table(title: &str, rows: &[Row]) {
    println!("{title}");
    println!("| services | change p50 | change p99 | whole p50 | whole p99 | whole / change (p50) |");
    println!("|---------:|-----------:|-----------:|----------:|----------:|---------------------:|");
    for (s, change, whole) in rows {
        println!(
            "| {s:>8} | {:>10.2} | {:>10.2} | {:>9.2} | {:>9.2} | {:>19.1}x |",
            change.0,
            change.1,
            whole.0,
            whole.1,
            whole.0 / change.0
        );
    }
    if let [first, .., last] = rows {
        println!(
            "growth S={} / S={}: change p50 {:.2}x p99 {:.2}x; whole p50 {:.2}x p99 {:.2}x (flat: near 1)",
            last.0,
            first.0,
            last.1 .0 / first.1 .0,
            last.1 .1 / first.1 .1,
            last.2 .0 / first.2 .0,
            last.2 .1 / first.2 .1
        );
    }
    println!();
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    const EVENTS: usize = 20;
    const SANDBOXES: usize = 103;
    const UPDATES: usize = 20_000;
    let mut sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers of services"))
        .collect();
    if sizes.is_empty() {
        sizes = vec![10, 100];
    }
    let mut rows = Vec::new();
    for &s in &sizes {
        let change = measure_event(s, SANDBOXES, EVENTS, false).await;
        let whole = measure_event(s, SANDBOXES, EVENTS, true).await;
        rows.push((s, change, whole));
    }
    print_table(
        &format!("one event: a task's start or die to every sandbox planned and applied, {SANDBOXES} sandboxes, {EVENTS} starts + {EVENTS} dies; ms"),
        &rows,
    );
    let rows: Vec<Row> = sizes
        .iter()
        .map(|&s| {
            (
                s,
                measure_update(s, UPDATES, true),
                measure_update(s, UPDATES, false),
            )
        })
        .collect();
    print_table(
        &format!(
            "one sandbox: one backend change (kernel facade update), {UPDATES} adds + {UPDATES} removes; µs"
        ),
        &rows,
    );
}
