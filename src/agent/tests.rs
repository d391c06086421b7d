use std::sync::Mutex;

use super::*;
use crate::core::containers::NetworkId;
use crate::core::firewall::MarkedService;
use crate::core::spec::SandboxSpec;
use crate::docker::fake::{running_container, FakeEngine};
use crate::docker::ContainerNetwork;
use std::path::Path;

/// Records what each sandbox was last brought to, how many calls, and whether the
/// last call for each sandbox asked for a full read.
#[derive(Default)]
pub(super) struct Recorder(
    Mutex<BTreeMap<SandboxKey, Arc<SandboxSpec>>>,
    Mutex<usize>,
    Mutex<BTreeMap<SandboxKey, bool>>,
    /// The host rules last programmed.
    Mutex<Option<Vec<Intent>>>,
    /// The ports it says are bound on the host.
    Mutex<BTreeSet<PortKey>>,
);

impl SandboxProgrammer for Recorder {
    fn program(
        &self,
        sandbox: &SandboxKey,
        spec: &Arc<SandboxSpec>,
        _: &SysctlSettings,
        kept: Option<KernelView>,
    ) -> Result<Programmed, ProgramError> {
        *self.1.lock().unwrap() += 1;
        self.2.lock().unwrap().insert(sandbox.clone(), kept.is_none());
        self.0.lock().unwrap().insert(sandbox.clone(), Arc::clone(spec));
        Ok(Programmed {
            operations: 1,
            view: KernelView {
                seen: Default::default(),
                spec: Arc::clone(spec),
            },
        })
    }

    /// As the kernel would show them: the services last programmed in `sandbox`.
    fn marked_services(&self, sandbox: &SandboxKey) -> Result<Vec<MarkedService>, ProgramError> {
        let map = self.0.lock().unwrap();
        Ok(map
            .get(sandbox)
            .map(|spec| {
                spec.services
                    .iter()
                    .map(|s| MarkedService {
                        name: s.name.clone(),
                        vip: s.vip,
                        fwmark: s.fwmark,
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}

impl HostFirewall for Recorder {
    fn program(&self, rules: &[Intent]) -> Result<usize, HostError> {
        *self.3.lock().unwrap() = Some(rules.to_vec());
        Ok(rules.len())
    }
}

impl HostPorts for Recorder {
    fn bound(&self) -> Result<BTreeSet<PortKey>, HostError> {
        Ok(self.4.lock().unwrap().clone())
    }
}

/// An agent of `engine` that has listed it (and not synced yet).
pub(super) async fn listed(engine: &FakeEngine, kernel: KernelPorts, cfg: AgentConfig) -> Agent {
    let mut agent = Agent::new(Arc::new(engine.clone()), kernel, cfg, None).unwrap();
    agent.relist().await.unwrap();
    agent
}

/// The agent's kernel ports, all three answered by `p`.
pub(super) fn ports<P: SandboxProgrammer + HostFirewall + HostPorts + 'static>(p: Arc<P>) -> KernelPorts {
    KernelPorts {
        sandboxes: p.clone(),
        host_firewall: p.clone(),
        host_ports: p,
    }
}

impl Recorder {
    /// Whether `sandbox` was programmed at all (a cluster agent waits for the store's
    /// first snapshot before it programs anything).
    pub(super) fn programmed(&self, sandbox: &str) -> bool {
        self.0.lock().unwrap().contains_key(&SandboxKey::from(sandbox))
    }

    pub(super) fn backends(&self, sandbox: &str, service: &str) -> Vec<String> {
        let map = self.0.lock().unwrap();
        let spec = map
            .get(&SandboxKey::from(sandbox))
            .unwrap_or_else(|| panic!("{sandbox} never programmed"));
        spec.services
            .iter()
            .find(|s| s.name.as_str() == service)
            .map(|s| s.backends.iter().map(|b| b.addr.to_string()).collect())
            .unwrap_or_default()
    }

    fn calls(&self) -> usize {
        *self.1.lock().unwrap()
    }

    /// Each backend of `service` in `sandbox` with its weight.
    fn weights(&self, sandbox: &str, service: &str) -> Vec<(String, u32)> {
        let map = self.0.lock().unwrap();
        map.get(&SandboxKey::from(sandbox))
            .and_then(|spec| spec.services.iter().find(|s| s.name.as_str() == service))
            .map(|s| {
                s.backends
                    .iter()
                    .map(|b| (b.addr.to_string(), b.weight))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Tasks w1 (10.1.0.3) and w2 (10.1.0.4) of service web and a client (10.1.0.9) on
/// one network, listed by an agent that has not synced yet.
async fn two_tasks_and_a_client(tag: &str) -> (FakeEngine, Arc<Recorder>, Agent) {
    let engine = FakeEngine::new();
    let web = [(labels::SERVICE, "web")];
    engine.upsert_container(on_net("w1aaaaaaaaaa", "w1", "10.1.0.3", &web));
    engine.upsert_container(on_net("w2aaaaaaaaaa", "w2", "10.1.0.4", &web));
    engine.upsert_container(on_net("claaaaaaaaaa", "client", "10.1.0.9", &[]));
    let rec = Arc::new(Recorder::default());
    let mut agent = Agent::new(
        Arc::new(engine.clone()),
        ports(rec.clone()),
        config(&tempdir(tag)),
        None,
    )
    .unwrap();
    agent.relist().await.unwrap();
    (engine, rec, agent)
}

fn event(id: &str, action: &str, attributes: &[(&str, &str)]) -> EngineEvent {
    EngineEvent::Container {
        id: ContainerId(id.into()),
        action: action.into(),
        attributes: attributes
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

fn task_state(agent: &Agent, name: &str) -> String {
    let status = agent.status().borrow().to_status();
    status.services[0]
        .tasks
        .iter()
        .find(|t| t.name == name)
        .map(|t| t.state.clone())
        .unwrap_or_else(|| panic!("no task {name} in {status:?}"))
}

fn w(pairs: &[(&str, u32)]) -> Vec<(String, u32)> {
    pairs.iter().map(|(a, w)| ((*a).to_owned(), *w)).collect()
}

#[tokio::test(flavor = "current_thread")]
async fn configured_ipvs_timeouts_go_to_every_sandbox() {
    let engine = FakeEngine::new();
    engine.upsert_container(on_net(
        "w1aaaaaaaaaa",
        "w1",
        "10.1.0.3",
        &[(labels::SERVICE, "web")],
    ));
    engine.upsert_container(on_net("claaaaaaaaaa", "client", "10.1.0.9", &[]));
    let rec = Arc::new(Recorder::default());
    let dir = tempdir("timeouts");
    let mut cfg = config(&dir);
    let t = Timeouts {
        tcp: 3600,
        tcp_fin: 30,
        udp: 60,
    };
    cfg.timeouts = Some(t);
    let mut agent = Agent::new(Arc::new(engine), ports(rec.clone()), cfg, None).unwrap();
    agent.relist().await.unwrap();
    agent.sync(true).await;
    let specs = rec.0.lock().unwrap();
    assert_eq!(specs.len(), 2);
    assert!(specs.values().all(|s| s.timeouts == Some(t)), "{specs:?}");
}

#[test]
fn reload_signals_do_not_stop_a_task_and_the_others_do() {
    for s in ["1", "10", "12", "SIGHUP", "hup", "USR1", "SIGUSR2"] {
        assert!(!signal_stops(s), "{s}");
    }
    for s in ["15", "9", "2", "3", "28", "SIGTERM", "KILL", "SIGWINCH", ""] {
        assert!(signal_stops(s), "{s}");
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_task_being_stopped_drains_at_weight_0_and_leaves_when_it_dies_or_its_grace_ends() {
    let web = [(labels::SERVICE, "web")];
    let (engine, rec, mut agent) = two_tasks_and_a_client("drain").await;
    agent.sync(true).await;
    let client = "/run/docker/netns/claaaaaaaaaa";
    let both = w(&[("10.1.0.3", 1), ("10.1.0.4", 1)]);
    assert_eq!(rec.weights(client, "web"), both);

    // A reload signal changes nothing.
    agent
        .on_event(&event("w2aaaaaaaaaa", "kill", &[("signal", "1")]))
        .await
        .unwrap();
    agent.sync(false).await;
    assert_eq!(
        (rec.weights(client, "web"), agent.next_drain_deadline()),
        (both.clone(), None)
    );

    // `docker stop`: SIGTERM, and w2 still runs: weight 0 in every sandbox, with no
    // inspect asked of the engine.
    let inspects = engine.calls();
    agent
        .on_event(&event("w2aaaaaaaaaa", "kill", &[("signal", "15")]))
        .await
        .unwrap();
    assert_eq!(engine.calls(), inspects, "a kill event needs no inspect");
    agent.sync(false).await;
    let draining = w(&[("10.1.0.3", 1), ("10.1.0.4", 0)]);
    assert_eq!(rec.weights(client, "web"), draining);
    assert_eq!(rec.weights("/run/docker/netns/w1aaaaaaaaaa", "web"), draining);
    assert_eq!(task_state(&agent, "w2"), "draining");
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    assert_eq!(agent.next_drain_deadline(), Some(end));

    // It dies: gone at once.
    let mut dead = on_net("w2aaaaaaaaaa", "w2", "10.1.0.4", &web);
    dead.running = false;
    engine.upsert_container(dead);
    agent
        .on_event(&event("w2aaaaaaaaaa", "die", &[("exitCode", "0")]))
        .await
        .unwrap();
    agent.sync(false).await;
    assert_eq!(rec.weights(client, "web"), w(&[("10.1.0.3", 1)]));
    assert_eq!(agent.next_drain_deadline(), None);

    // Started again: a backend again, at its weight.
    engine.upsert_container(on_net("w2aaaaaaaaaa", "w2", "10.1.0.4", &web));
    agent
        .on_event(&event("w2aaaaaaaaaa", "start", &[]))
        .await
        .unwrap();
    agent.sync(false).await;
    assert_eq!(rec.weights(client, "web"), both);

    // A task that does not exit when told: at weight 0 for the grace, then removed
    // though it still runs.
    agent
        .on_event(&event("w2aaaaaaaaaa", "kill", &[("signal", "SIGTERM")]))
        .await
        .unwrap();
    agent.sync(false).await;
    tokio::time::advance(Duration::from_secs(29)).await;
    agent.sync(false).await;
    assert_eq!(rec.weights(client, "web"), draining);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(agent.next_drain_deadline(), None, "the grace is over");
    agent.sync(false).await;
    assert_eq!(rec.weights(client, "web"), w(&[("10.1.0.3", 1)]));
    assert_eq!(task_state(&agent, "w2"), "drained");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_unhealthy_task_drains_then_leaves_and_is_back_when_healthy() {
    let engine = FakeEngine::new();
    let web = [(labels::SERVICE, "web")];
    let health = |id: &str, ip: &str, h: Health| {
        let mut c = on_net(id, id, ip, &web);
        c.health = Some(h);
        c
    };
    engine.upsert_container(health("w1aaaaaaaaaa", "10.1.0.3", Health::Healthy));
    engine.upsert_container(health("w2aaaaaaaaaa", "10.1.0.4", Health::Healthy));
    engine.upsert_container(on_net("claaaaaaaaaa", "client", "10.1.0.9", &[]));
    let rec = Arc::new(Recorder::default());
    let dir = tempdir("unhealthy");
    let mut agent = listed(&engine, ports(rec.clone()), config(&dir)).await;
    agent.sync(true).await;
    let client = "/run/docker/netns/claaaaaaaaaa";
    let both = w(&[("10.1.0.3", 1), ("10.1.0.4", 1)]);
    assert_eq!(rec.weights(client, "web"), both);

    engine.upsert_container(health("w2aaaaaaaaaa", "10.1.0.4", Health::Unhealthy));
    agent
        .on_event(&event("w2aaaaaaaaaa", "health_status: unhealthy", &[]))
        .await
        .unwrap();
    agent.sync(false).await;
    assert_eq!(rec.weights(client, "web"), w(&[("10.1.0.3", 1), ("10.1.0.4", 0)]));
    assert_eq!(task_state(&agent, "w2aaaaaaaaaa"), "draining");
    tokio::time::advance(Duration::from_secs(30)).await;
    agent.sync(false).await;
    assert_eq!(rec.weights(client, "web"), w(&[("10.1.0.3", 1)]));

    engine.upsert_container(health("w2aaaaaaaaaa", "10.1.0.4", Health::Healthy));
    agent
        .on_event(&event("w2aaaaaaaaaa", "health_status: healthy", &[]))
        .await
        .unwrap();
    agent.sync(false).await;
    assert_eq!(rec.weights(client, "web"), both);
    assert_eq!(task_state(&agent, "w2aaaaaaaaaa"), "healthy");

    // A task never healthy yet (starting, then unhealthy) was never a backend: it
    // does not come in at weight 0.
    engine.upsert_container(health("w3aaaaaaaaaa", "10.1.0.5", Health::Starting));
    agent
        .on_event(&event("w3aaaaaaaaaa", "start", &[]))
        .await
        .unwrap();
    engine.upsert_container(health("w3aaaaaaaaaa", "10.1.0.5", Health::Unhealthy));
    agent
        .on_event(&event("w3aaaaaaaaaa", "health_status: unhealthy", &[]))
        .await
        .unwrap();
    agent.sync(false).await;
    assert_eq!(rec.weights(client, "web"), both);
}

pub(super) fn on_net(id: &str, name: &str, ip: &str, labels: &[(&str, &str)]) -> ContainerInfo {
    let mut c = running_container(id, name).with_network(ContainerNetwork {
        network_id: NetworkId("front".into()),
        name: "front".into(),
        ip: Some(ip.parse().unwrap()),
        prefix_len: 24,
        gateway: Some("10.1.0.1".parse().unwrap()),
        aliases: vec![],
    });
    for (k, v) in labels {
        c = c.with_label(k, v);
    }
    c
}

pub(super) fn config(dir: &Path) -> AgentConfig {
    AgentConfig {
        pool: Ipv4Net::new("10.253.0.0".parse().unwrap(), 16).unwrap(),
        state_dir: dir.to_owned(),
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
    }
}

pub(super) fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vipd-agent-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[tokio::test(flavor = "current_thread")]
async fn published_ports_program_the_ingress_and_the_host_and_a_bound_port_is_refused() {
    let engine = FakeEngine::new();
    let web = [(labels::SERVICE, "web"), (labels::PUBLISH, "8080:80")];
    engine.upsert_container(on_net("w1aaaaaaaaaa", "w1", "10.1.0.3", &web));
    engine.upsert_container(on_net("w2aaaaaaaaaa", "w2", "10.1.0.4", &web));
    let api = [(labels::SERVICE, "api"), (labels::PUBLISH, "9090:90")];
    engine.upsert_container(on_net("a1aaaaaaaaaa", "a1", "10.1.0.5", &api));
    let rec = Arc::new(Recorder::default());
    rec.4
        .lock()
        .unwrap()
        .insert(PortKey::new(crate::core::model::Protocol::Tcp, 9090));
    let dir = tempdir("mesh");
    let mut cfg = config(&dir);
    let ingress = PathBuf::from("/run/netns/vipd_ingress_test");
    cfg.ingress = Some(IngressTarget {
        netns: ingress.clone(),
        link: IngressLink {
            addr: "10.254.255.2".parse().unwrap(),
            host_iface: "vipd-ingress".into(),
        },
    });
    let mut agent = listed(&engine, ports(rec.clone()), cfg).await;
    let r = agent.sync(true).await;
    assert_eq!(
        r.errors,
        ["service api: port 9090/tcp not published: it is already in use on the host (a socket is bound to it)"]
    );
    assert_eq!(
        rec.backends(ingress.to_str().unwrap(), "web"),
        ["10.1.0.3", "10.1.0.4"]
    );
    assert_eq!(
        rec.backends(ingress.to_str().unwrap(), "api"),
        Vec::<String>::new()
    );
    let host = rec.3.lock().unwrap().clone().expect("host rules programmed");
    assert_eq!(host.len(), 5, "2 DNAT, 1 masquerade, 2 forward: {host:#?}");
    let status = agent.status().borrow().to_status();
    let api_status = status.services.iter().find(|s| s.name == "api").unwrap();
    assert!(
        api_status.errors[0].contains("already in use on the host"),
        "{api_status:?}"
    );
    assert!(api_status.published.is_empty(), "{api_status:?}");
    let web_status = status.services.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(web_status.published, ["8080:80/tcp"]);
    let ingress_sb = status.sandboxes.iter().find(|s| s.path == ingress).unwrap();
    assert_eq!(ingress_sb.container, "(ingress)");

    // Nothing changed: neither the ingress nor the host is programmed again.
    *rec.3.lock().unwrap() = None;
    let calls = rec.calls();
    agent.sync(false).await;
    assert_eq!((rec.calls(), rec.3.lock().unwrap().is_none()), (calls, true));

    // The tasks lose the label: the ingress and the host lose everything.
    for (id, name, ip) in [
        ("w1aaaaaaaaaa", "w1", "10.1.0.3"),
        ("w2aaaaaaaaaa", "w2", "10.1.0.4"),
    ] {
        engine.upsert_container(on_net(id, name, ip, &[(labels::SERVICE, "web")]));
    }
    engine.remove_container(&ContainerId("a1aaaaaaaaaa".into()));
    agent.relist().await.unwrap();
    agent.sync(false).await;
    assert!(rec.0.lock().unwrap()[&SandboxKey::new(ingress.clone())]
        .services
        .is_empty());
    assert_eq!(rec.3.lock().unwrap().as_deref(), Some(&[][..]));
}

/// An engine whose inspects each take `delay` and fail for one container; it counts
/// the inspects in flight at once.
struct SlowEngine {
    inner: FakeEngine,
    delay: Duration,
    /// How long a listing takes.
    list_delay: Duration,
    failing: ContainerId,
    in_flight: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

impl Engine for SlowEngine {
    fn containers(&self) -> futures::future::BoxFuture<'_, Result<Vec<ContainerInfo>, EngineError>> {
        Box::pin(async move {
            tokio::time::sleep(self.list_delay).await;
            self.inner.containers().await
        })
    }
    fn inspect<'a>(
        &'a self,
        id: &'a ContainerId,
    ) -> futures::future::BoxFuture<'a, Result<Option<ContainerInfo>, EngineError>> {
        use std::sync::atomic::Ordering::SeqCst;
        Box::pin(async move {
            let now = self.in_flight.fetch_add(1, SeqCst) + 1;
            self.most.fetch_max(now, SeqCst);
            tokio::time::sleep(self.delay).await;
            self.in_flight.fetch_sub(1, SeqCst);
            if *id == self.failing {
                return Err(EngineError::Timeout {
                    endpoint: "fake".into(),
                    operation: format!("inspect container {}", id.0),
                    after: self.delay,
                });
            }
            self.inner.inspect(id).await
        })
    }
    fn networks(&self) -> futures::future::BoxFuture<'_, Result<Vec<NetworkInfo>, EngineError>> {
        self.inner.networks()
    }
    fn events(&self) -> futures::stream::BoxStream<'static, Result<EngineEvent, EngineError>> {
        self.inner.events()
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_batch_inspects_each_container_once_and_all_at_once_and_keeps_what_answered() {
    use std::sync::atomic::Ordering::SeqCst;
    let fake = FakeEngine::new();
    let web = [(labels::SERVICE, "web")];
    fake.upsert_container(on_net("w1aaaaaaaaaa", "w1", "10.1.0.3", &web));
    let engine = Arc::new(SlowEngine {
        inner: fake.clone(),
        delay: Duration::from_secs(10),
        list_delay: Duration::ZERO,
        failing: ContainerId("slowaaaaaaaa".into()),
        in_flight: Default::default(),
        most: Default::default(),
    });
    let rec = Arc::new(Recorder::default());
    let dir = tempdir("batch");
    let mut agent = Agent::new(engine.clone(), ports(rec.clone()), config(&dir), None).unwrap();
    agent.relist().await.unwrap();
    agent.sync(true).await;

    // Three new tasks, each with a start and a health event, and one container whose
    // inspect times out.
    let mut batch = Vec::new();
    for (id, ip) in [
        ("w2aaaaaaaaaa", "10.1.0.4"),
        ("w3aaaaaaaaaa", "10.1.0.5"),
        ("w4aaaaaaaaaa", "10.1.0.6"),
    ] {
        fake.upsert_container(on_net(id, id, ip, &web));
        for action in ["start", "health_status: healthy"] {
            batch.push(EngineEvent::Container {
                id: ContainerId(id.into()),
                action: action.into(),
                attributes: BTreeMap::new(),
            });
        }
    }
    batch.push(EngineEvent::Container {
        id: ContainerId("slowaaaaaaaa".into()),
        action: "start".into(),
        attributes: BTreeMap::new(),
    });
    let calls = fake.calls();
    let started = tokio::time::Instant::now();
    let err = agent.on_events(&batch).await.unwrap_err();
    assert!(err.to_string().contains("timed out after 10s"), "{err}");
    assert_eq!(started.elapsed(), Duration::from_secs(10), "one delay, not five");
    assert_eq!(engine.most.load(SeqCst), 4, "the four containers at once");
    assert_eq!(fake.calls() - calls, 3, "each answering container once");
    agent.sync(false).await;
    assert_eq!(
        rec.backends("/run/docker/netns/w1aaaaaaaaaa", "web"),
        ["10.1.0.3", "10.1.0.4", "10.1.0.5", "10.1.0.6"],
        "what answered is kept"
    );
}

/// A kill event while the engine is slow to answer a listing or an inspect drains the
/// task at once, not when the engine has answered.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_task_being_stopped_drains_at_once_while_a_listing_or_an_inspect_is_slow() {
    let fake = FakeEngine::new();
    let web = [(labels::SERVICE, "web")];
    fake.upsert_container(on_net("w1aaaaaaaaaa", "w1", "10.1.0.3", &web));
    fake.upsert_container(on_net("w2aaaaaaaaaa", "w2", "10.1.0.4", &web));
    fake.upsert_container(on_net("w3aaaaaaaaaa", "w3", "10.1.0.5", &web));
    fake.upsert_container(on_net("claaaaaaaaaa", "client", "10.1.0.9", &[]));
    let engine = Arc::new(SlowEngine {
        inner: fake.clone(),
        delay: Duration::from_secs(20),
        list_delay: Duration::from_secs(20),
        failing: ContainerId("slowaaaaaaaa".into()),
        in_flight: Default::default(),
        most: Default::default(),
    });
    let rec = Arc::new(Recorder::default());
    let mut cfg = config(&tempdir("slow-drain"));
    cfg.resync = Duration::from_secs(60);
    let agent = Agent::new(engine, ports(rec.clone()), cfg, None).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let t0 = tokio::time::Instant::now();
    let run = tokio::spawn(agent.run(async {
        let _ = stopped.await;
    }));
    let client = "/run/docker/netns/claaaaaaaaaa";
    let at = |secs: u64| tokio::time::sleep_until(t0 + Duration::from_secs(secs));

    // Listed in 20 s and synced; the periodic listing runs from 80 s to 100 s.
    at(30).await;
    let all = w(&[("10.1.0.3", 1), ("10.1.0.4", 1), ("10.1.0.5", 1)]);
    assert_eq!(rec.weights(client, "web"), all);
    at(85).await;
    fake.push_event(event("w2aaaaaaaaaa", "kill", &[("signal", "15")]));
    at(86).await;
    let w2_out = w(&[("10.1.0.3", 1), ("10.1.0.4", 0), ("10.1.0.5", 1)]);
    assert_eq!(rec.weights(client, "web"), w2_out, "drained during the listing");
    at(101).await;
    assert_eq!(rec.weights(client, "web"), w2_out, "still draining after it");

    // A start event whose inspect takes 20 s; a kill 5 s into it.
    fake.push_event(event("w1aaaaaaaaaa", "start", &[]));
    at(106).await;
    fake.push_event(event("w3aaaaaaaaaa", "kill", &[("signal", "15")]));
    at(107).await;
    let w3_out = w(&[("10.1.0.3", 1), ("10.1.0.4", 0), ("10.1.0.5", 0)]);
    assert_eq!(rec.weights(client, "web"), w3_out, "drained during the inspect");
    // w2's drain grace (30 s) ends at 115 s: out though it still runs.
    at(125).await;
    assert_eq!(rec.weights(client, "web"), w(&[("10.1.0.3", 1), ("10.1.0.5", 0)]));
    stop.send(()).unwrap();
    run.await.unwrap().unwrap();
}

/// A task stopped and started again while vipd missed the start event (a dockerd
/// restart): the listing shows it in a new sandbox, and it serves again.
#[tokio::test(flavor = "current_thread")]
async fn a_task_drained_then_started_again_unseen_serves_again_after_a_listing() {
    let web = [(labels::SERVICE, "web")];
    let (engine, rec, mut agent) = two_tasks_and_a_client("restarted").await;
    agent.sync(true).await;
    let client = "/run/docker/netns/claaaaaaaaaa";
    agent
        .on_event(&event("w2aaaaaaaaaa", "kill", &[("signal", "15")]))
        .await
        .unwrap();
    agent.sync(false).await;
    assert_eq!(rec.weights(client, "web"), w(&[("10.1.0.3", 1), ("10.1.0.4", 0)]));
    // Same sandbox in a listing: still draining.
    agent.relist().await.unwrap();
    agent.sync(true).await;
    assert_eq!(rec.weights(client, "web"), w(&[("10.1.0.3", 1), ("10.1.0.4", 0)]));
    let mut again = on_net("w2aaaaaaaaaa", "w2", "10.1.0.4", &web);
    again.sandbox_key = Some("/run/docker/netns/0123456789ab".into());
    engine.upsert_container(again);
    agent.relist().await.unwrap();
    agent.sync(true).await;
    assert_eq!(rec.weights(client, "web"), w(&[("10.1.0.3", 1), ("10.1.0.4", 1)]));
}

#[tokio::test(flavor = "current_thread")]
async fn tasks_become_backends_everywhere_and_leave_on_their_die_event() {
    let web = [(labels::SERVICE, "web")];
    let (engine, rec, mut agent) = two_tasks_and_a_client("die").await;
    let r = agent.sync(true).await;
    assert_eq!((r.sandboxes_programmed, r.errors.len()), (3, 0));
    assert_eq!(
        rec.backends("/run/docker/netns/claaaaaaaaaa", "web"),
        ["10.1.0.3", "10.1.0.4"]
    );
    assert_eq!(
        rec.backends("/run/docker/netns/w1aaaaaaaaaa", "web"),
        ["10.1.0.3", "10.1.0.4"]
    );

    // Nothing changed: nothing programmed.
    let calls = rec.calls();
    assert_eq!(agent.sync(false).await.sandboxes_programmed, 0);
    assert_eq!(rec.calls(), calls);

    // w2 dies: every sandbox drops it (w2's own sandbox is gone with it).
    let mut dead = on_net("w2aaaaaaaaaa", "w2", "10.1.0.4", &web);
    dead.running = false;
    engine.upsert_container(dead);
    agent
        .on_event(&EngineEvent::Container {
            id: ContainerId("w2aaaaaaaaaa".into()),
            action: "die".into(),
            attributes: BTreeMap::new(),
        })
        .await
        .unwrap();
    let r = agent.sync(false).await;
    assert_eq!(r.sandboxes_programmed, 2);
    assert_eq!(
        rec.backends("/run/docker/netns/claaaaaaaaaa", "web"),
        ["10.1.0.3"]
    );
    let client = SandboxKey::from("/run/docker/netns/claaaaaaaaaa");
    assert!(
        !rec.2.lock().unwrap()[&client],
        "a backend change works from the kept view"
    );

    // The client joins another network: its own addresses changed, so it is read again.
    let moved = on_net("claaaaaaaaaa", "client", "10.1.0.9", &[]).with_network(ContainerNetwork {
        network_id: NetworkId("back".into()),
        name: "back".into(),
        ip: Some("10.2.0.9".parse().unwrap()),
        prefix_len: 24,
        gateway: None,
        aliases: vec![],
    });
    engine.upsert_container(moved);
    agent
        .on_event(&EngineEvent::Network {
            id: NetworkId("back".into()),
            action: "connect".into(),
            container: Some(ContainerId("claaaaaaaaaa".into())),
        })
        .await
        .unwrap();
    agent.sync(false).await;
    assert!(
        rec.2.lock().unwrap()[&client],
        "changed own addresses: read again"
    );
    std::fs::remove_dir_all(tempdir("die")).ok();
}

#[tokio::test(flavor = "current_thread")]
async fn vips_survive_a_restart_of_vipd() {
    let engine = FakeEngine::new();
    engine.upsert_container(on_net(
        "w1aaaaaaaaaa",
        "w1",
        "10.1.0.3",
        &[(labels::SERVICE, "web")],
    ));
    engine.upsert_container(on_net(
        "a1aaaaaaaaaa",
        "a1",
        "10.1.0.5",
        &[(labels::SERVICE, "api")],
    ));
    let dir = tempdir("restart");
    let first = {
        let mut agent = listed(&engine, ports(Arc::new(Recorder::default())), config(&dir)).await;
        agent.sync(true).await;
        agent.allocations().clone()
    };
    assert_eq!(first.services.len(), 2);
    let mut again = listed(&engine, ports(Arc::new(Recorder::default())), config(&dir)).await;
    again.sync(true).await;
    assert_eq!(again.allocations(), &first);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn a_bad_label_affects_only_its_container() {
    let engine = FakeEngine::new();
    engine.upsert_container(on_net(
        "w1aaaaaaaaaa",
        "w1",
        "10.1.0.3",
        &[(labels::SERVICE, "web")],
    ));
    engine.upsert_container(on_net(
        "x1aaaaaaaaaa",
        "x1",
        "10.1.0.4",
        &[(labels::SERVICE, "web"), (labels::WEIGHT, "lots")],
    ));
    engine.upsert_container(on_net("claaaaaaaaaa", "client", "10.1.0.9", &[]));
    let rec = Arc::new(Recorder::default());
    let dir = tempdir("label");
    let mut agent = listed(&engine, ports(rec.clone()), config(&dir)).await;
    agent.sync(true).await;
    assert_eq!(
        rec.backends("/run/docker/netns/claaaaaaaaaa", "web"),
        ["10.1.0.3"]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
/// Fails for one sandbox, as a kernel without IPVS or a vanished namespace would.
/// Fails with its error for one sandbox while `.3` is set; records the others.
struct FailFor(SandboxKey, Recorder, ProgramError, std::sync::atomic::AtomicBool);

impl FailFor {
    fn new(sandbox: &SandboxKey, error: ProgramError) -> Self {
        FailFor(sandbox.clone(), Recorder::default(), error, true.into())
    }
}

impl SandboxProgrammer for FailFor {
    fn program(
        &self,
        sb: &SandboxKey,
        spec: &Arc<SandboxSpec>,
        sys: &SysctlSettings,
        kept: Option<KernelView>,
    ) -> Result<Programmed, ProgramError> {
        if *sb == self.0 && self.3.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(self.2.clone());
        }
        SandboxProgrammer::program(&self.1, sb, spec, sys, kept)
    }

    fn marked_services(&self, sb: &SandboxKey) -> Result<Vec<MarkedService>, ProgramError> {
        self.1.marked_services(sb)
    }
}

impl HostFirewall for FailFor {
    fn program(&self, rules: &[Intent]) -> Result<usize, HostError> {
        HostFirewall::program(&self.1, rules)
    }
}

impl HostPorts for FailFor {
    fn bound(&self) -> Result<BTreeSet<PortKey>, HostError> {
        self.1.bound()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_sandbox_gone_while_programmed_is_no_error_once_and_an_error_if_it_stays_gone() {
    let (engine, _, _) = two_tasks_and_a_client("gone").await;
    let client = SandboxKey::from("/run/docker/netns/claaaaaaaaaa");
    let gone = ProgramError::from(crate::kernel::fake::absent(&client));
    let prog = Arc::new(FailFor::new(&client, gone));
    let mut agent = Agent::new(
        Arc::new(engine.clone()),
        ports(prog.clone()),
        config(&tempdir("gone2")),
        None,
    )
    .unwrap();
    agent.relist().await.unwrap();
    let sandbox_error = |agent: &Agent| {
        let s = agent.status().borrow().to_status();
        let sb = s
            .sandboxes
            .iter()
            .find(|x| x.path == client.path())
            .cloned()
            .expect("listed");
        (sb.in_sync, sb.error.is_some())
    };

    // Gone at the first try: the container is stopping; no error, not in sync.
    let r = agent.sync(true).await;
    assert_eq!((r.sandboxes_programmed, r.errors.len()), (2, 0), "{r:?}");
    assert_eq!(sandbox_error(&agent), (false, true));
    // Its stop arrives: the sandbox is simply no longer wanted.
    let mut stopped = on_net("claaaaaaaaaa", "client", "10.1.0.9", &[]);
    stopped.running = false;
    engine.upsert_container(stopped.clone());
    agent.on_event(&event("claaaaaaaaaa", "die", &[])).await.unwrap();
    let r = agent.sync(false).await;
    assert_eq!(r.errors.len(), 0, "{r:?}");
    assert!(agent
        .status()
        .borrow()
        .sandboxes
        .iter()
        .all(|x| x.path != client.path()));

    // Back, then gone at two syncs in a row while it still runs: an error.
    stopped.running = true;
    engine.upsert_container(stopped);
    agent
        .on_event(&event("claaaaaaaaaa", "start", &[]))
        .await
        .unwrap();
    assert_eq!(agent.sync(false).await.errors.len(), 0);
    let r = agent.sync(true).await;
    assert_eq!(r.errors.len(), 1, "{r:?}");
    assert!(r.errors[0].contains("the namespace is gone"), "{r:?}");
    // And once it can be programmed, it is in sync.
    prog.3.store(false, std::sync::atomic::Ordering::Relaxed);
    let r = agent.sync(false).await;
    assert_eq!((r.sandboxes_programmed, r.errors.len()), (1, 0), "{r:?}");
    assert_eq!(sandbox_error(&agent), (true, false));
}

#[tokio::test(flavor = "current_thread")]
async fn lost_allocations_are_read_back_from_the_sandboxes() {
    let engine = FakeEngine::new();
    for (id, svc, ip) in [
        ("w1aaaaaaaaaa", "web", "10.1.0.3"),
        ("a1aaaaaaaaaa", "api", "10.1.0.4"),
        ("d1aaaaaaaaaa", "db", "10.1.0.5"),
    ] {
        engine.upsert_container(on_net(id, id, ip, &[(labels::SERVICE, svc)]));
    }
    let rec = Arc::new(Recorder::default());
    let dir = tempdir("recover");
    let vips = |agent: &Agent| -> Vec<(String, std::net::Ipv4Addr, u32)> {
        agent
            .allocations()
            .services
            .iter()
            .map(|(n, a)| (n.to_string(), a.vip, a.fwmark.get()))
            .collect()
    };
    // A first vipd allocates (api, db, web: .1 .2 .3), then db goes and comes back
    // with another VIP, so the allocations are not simply the first ones again.
    let mut first = listed(&engine, ports(rec.clone()), config(&dir)).await;
    first.sync(true).await;
    first.allocs.services.clear();
    first.allocs.next_fwmark = 300;
    first
        .allocs
        .ensure(&ServiceName::new("zzz").unwrap(), first.cfg.pool)
        .unwrap();
    first.sync(true).await;
    let before = vips(&first);
    assert_eq!(before.len(), 4, "{before:?}");

    for lost in ["{\"services\": 3", ""] {
        let file = dir.join("allocations.json");
        if lost.is_empty() {
            std::fs::remove_file(&file).unwrap();
        } else {
            std::fs::write(&file, lost).unwrap();
        }
        let mut second = listed(&engine, ports(rec.clone()), config(&dir)).await;
        second.sync(true).await;
        let after: Vec<_> = vips(&second).into_iter().filter(|(n, ..)| n != "zzz").collect();
        let want: Vec<_> = before.iter().filter(|(n, ..)| n != "zzz").cloned().collect();
        assert_eq!(after, want, "the VIPs in use are kept ({lost:?})");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn status_lists_services_tasks_sandboxes_and_what_went_wrong() {
    let engine = FakeEngine::new();
    let web = [(labels::SERVICE, "web")];
    engine.upsert_container(on_net("w1aaaaaaaaaa", "w1", "10.1.0.3", &web));
    let mut w2 = on_net("w2aaaaaaaaaa", "w2", "10.1.0.4", &web);
    w2.health = Some(crate::core::containers::Health::Unhealthy);
    engine.upsert_container(w2);
    engine.upsert_container(on_net(
        "dbaaaaaaaaaa",
        "db1",
        "10.1.0.5",
        &[(labels::SERVICE, "db"), ("vipd.endpoint-mode", "dnsrr")],
    ));
    engine.upsert_container(on_net(
        "bdaaaaaaaaaa",
        "odd",
        "10.1.0.6",
        &[(labels::SERVICE, "Bad Name")],
    ));
    engine.upsert_container(on_net("claaaaaaaaaa", "client", "10.1.0.9", &[]));
    let client = SandboxKey::from("/run/docker/netns/claaaaaaaaaa");
    let prog = Arc::new(FailFor::new(&client, crate::kernel::fake::no_ipvs().into()));
    let dir = tempdir("status");
    let mut agent = Agent::new(Arc::new(engine.clone()), ports(prog), config(&dir), None).unwrap();
    let status = agent.status();
    assert!(!status.borrow().docker.connected, "nothing listed yet");
    agent.relist().await.unwrap();
    agent.sync(true).await;

    let s = status.borrow().to_status();
    assert!(s.docker.connected);
    assert!(s.last_sync > 0 && s.last_resync == s.last_sync);
    let web = s.services.iter().find(|x| x.name == "web").expect("web listed");
    assert_eq!((web.mode.as_str(), web.fwmark), ("vip", Some(256)));
    assert!(web.vip.is_some_and(|v| v.octets()[..2] == [10, 253]));
    let states: Vec<(&str, &str, bool)> = web
        .tasks
        .iter()
        .map(|t| (t.name.as_str(), t.state.as_str(), t.serving))
        .collect();
    assert_eq!(states, [("w1", "running", true), ("w2", "unhealthy", false)]);
    let db = s.services.iter().find(|x| x.name == "db").expect("db listed");
    assert_eq!((db.mode.as_str(), db.vip, db.fwmark), ("dnsrr", None, None));
    assert_eq!(s.label_errors.len(), 1, "{:?}", s.label_errors);
    assert_eq!(s.label_errors[0].label, labels::SERVICE);
    assert!(s.label_errors[0].container.starts_with("odd"));

    let sb = s
        .sandboxes
        .iter()
        .find(|x| x.path == client.path())
        .expect("client sandbox listed");
    assert_eq!(sb.container, "client");
    assert!(!sb.in_sync);
    assert_eq!(sb.error, Some(crate::kernel::fake::no_ipvs().to_string()));
    assert!(sb.error.as_deref().unwrap().contains("this kernel has no IPVS"));
    let w1 = s
        .sandboxes
        .iter()
        .find(|x| x.container == "w1")
        .expect("task sandbox listed");
    assert!(w1.in_sync && w1.error.is_none() && *w1.services == ["web"]);

    // The engine goes away: status says so on the next listing.
    engine.fail(EngineError::Unavailable {
        endpoint: "unix:///fake".into(),
        reason: "gone".into(),
    });
    assert!(agent.relist().await.is_err());
    assert!(!status.borrow().docker.connected);
    assert!(status.borrow().docker.error.is_some());
    let _ = std::fs::remove_dir_all(dir);
}

/// The production kernel facade over fake kernels, driven by the agent: every sandbox's
/// IPVS table follows the tasks, a change is planned from the kept view (nothing read),
/// and a namespace torn down is gone once, then an error.
#[tokio::test(flavor = "current_thread")]
async fn the_agent_over_the_kernel_facade_leaves_every_fake_kernel_as_the_tasks_say() {
    use crate::kernel::fake::FakeOpener;
    use crate::kernel::{FakeHost, Kernel};
    let web = [(labels::SERVICE, "web")];
    let (engine, _, _) = two_tasks_and_a_client("facade").await;
    let kernel = Arc::new(Kernel::new(FakeOpener::default()));
    let host = Arc::new(FakeHost::default());
    let kernel_ports = KernelPorts {
        sandboxes: kernel.clone(),
        host_firewall: host.clone(),
        host_ports: host,
    };
    let dir = tempdir("facade-agent");
    let mut agent = listed(&engine, kernel_ports, config(&dir)).await;
    let r = agent.sync(true).await;
    assert_eq!((r.sandboxes_programmed, r.errors.len()), (3, 0), "{r:?}");
    let client = SandboxKey::from("/run/docker/netns/claaaaaaaaaa");
    let both = ["10.1.0.3@1", "10.1.0.4@1"];
    assert_eq!(kernel.opener().inspect(&client, |k| k.backends(None)), both);
    assert_eq!(kernel.opener().sandboxes().len(), 3);

    // w2 dies: its backend goes from the others, with no rules read again.
    let saves = kernel.opener().inspect(&client, |k| k.firewall.saves);
    let mut dead = on_net("w2aaaaaaaaaa", "w2", "10.1.0.4", &web);
    dead.running = false;
    engine.upsert_container(dead);
    agent.on_event(&event("w2aaaaaaaaaa", "die", &[])).await.unwrap();
    let r = agent.sync(false).await;
    assert_eq!((r.sandboxes_programmed, r.errors.len()), (2, 0), "{r:?}");
    assert_eq!(
        kernel.opener().inspect(&client, |k| k.backends(None)),
        ["10.1.0.3@1"]
    );
    assert_eq!(kernel.opener().inspect(&client, |k| k.firewall.saves), saves);

    // The client's namespace is torn down while it still runs: gone once, then an error.
    kernel.opener().remove(&client);
    assert_eq!(agent.sync(true).await.errors.len(), 0);
    let r = agent.sync(true).await;
    assert_eq!(r.errors.len(), 1, "{r:?}");
    assert!(r.errors[0].contains("the namespace is gone"), "{r:?}");
    std::fs::remove_dir_all(&dir).ok();
}
