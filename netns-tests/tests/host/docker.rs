//! The Docker adapter (`vipd::docker::DockerEngine`) against a real dockerd: a private
//! one for this test binary (see common/docker.rs), with the busybox image. What it
//! reports is checked against the docker CLI and the kernel (the sandbox is the
//! container's netns and holds the reported address).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use futures::StreamExt;
use vipd::docker::{
    ContainerId, ContainerInfo, DockerEngine, Engine, EngineError, EngineEvent, Health, NetworkId,
};

use crate::common::docker::{dockerd, IMAGE};
use crate::common::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn engine() -> DockerEngine {
    DockerEngine::connect()
        .await
        .unwrap_or_else(|e| panic!("DockerEngine::connect with DOCKER_HOST set: {e}"))
}

fn find(all: &[ContainerInfo], id: &str) -> ContainerInfo {
    all.iter().find(|c| c.id.0 == id).cloned().unwrap_or_else(|| {
        panic!(
            "container {id} not listed; got {:?}",
            all.iter().map(|c| &c.name).collect::<Vec<_>>()
        )
    })
}

#[test]
fn a_started_container_is_listed_with_labels_sandbox_and_address() {
    require_root();
    let d = dockerd();
    let net = d.network("vnet", &[]);
    let name = unique("vweb");
    let c = d.run(&[
        "--name",
        &name,
        "--label",
        "vipd.service=web",
        "--label",
        "vipd.port=80",
        "--network",
        &net.name,
        IMAGE,
        "sleep",
        "1000",
    ]);
    let gateway: Ipv4Addr = d
        .docker(&[
            "network",
            "inspect",
            "-f",
            "{{(index .IPAM.Config 0).Gateway}}",
            &net.name,
        ])
        .parse()
        .expect("gateway from docker network inspect");
    let cli_ip = d.docker(&[
        "inspect",
        "-f",
        &format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            net.name
        ),
        &c.id,
    ]);

    let info = rt().block_on(async {
        let engine = engine().await;
        assert!(
            engine.api_version().starts_with("1."),
            "api {}",
            engine.api_version()
        );
        let listed = find(&engine.containers().await.expect("containers()"), &c.id);
        let inspected = engine
            .inspect(&ContainerId(c.id.clone()))
            .await
            .expect("inspect()");
        assert_eq!(inspected.as_ref(), Some(&listed), "inspect and list agree");
        listed
    });

    assert_eq!(info.name, name);
    assert_eq!(info.labels.get("vipd.service").map(String::as_str), Some("web"));
    assert_eq!(info.labels.get("vipd.port").map(String::as_str), Some("80"));
    assert!(info.running);
    assert_eq!(info.health, None, "no health check");

    // The sandbox key is the container's own network namespace.
    let pid = info.pid.expect("a running container has a pid");
    let sandbox = info
        .sandbox_key
        .clone()
        .expect("a running container has a sandbox key");
    let ns_of_pid = std::fs::metadata(format!("/proc/{pid}/ns/net")).expect("pid's netns");
    let ns_of_key = std::fs::metadata(&sandbox)
        .unwrap_or_else(|e| panic!("sandbox key {} does not exist: {e}", sandbox.display()));
    assert_eq!(
        (ns_of_key.dev(), ns_of_key.ino()),
        (ns_of_pid.dev(), ns_of_pid.ino()),
        "{} is not the netns of pid {pid}",
        sandbox.display()
    );

    assert_eq!(info.networks.len(), 1, "{:?}", info.networks);
    let ep = &info.networks[0];
    assert_eq!(ep.name, net.name);
    assert_eq!(ep.network_id, NetworkId(net.id.clone()));
    let ip = ep.ip.expect("an address on the network");
    assert_eq!(ip.to_string(), cli_ip);
    assert_eq!(ep.prefix_len, 24);
    assert_eq!(ep.gateway, Some(gateway));
    assert!(
        ep.aliases.iter().any(|a| c.id.starts_with(a.as_str())),
        "aliases {:?}",
        ep.aliases
    );

    // And the kernel agrees: that namespace holds that address.
    let addrs = run(&[
        "nsenter",
        &format!("--net={}", sandbox.display()),
        "ip",
        "-4",
        "-o",
        "addr",
        "show",
    ]);
    assert!(addrs.contains(&format!("{ip}/{}", ep.prefix_len)), "{addrs}");
}

#[test]
fn networks_lists_a_user_network_with_its_subnet_and_gateway() {
    require_root();
    let d = dockerd();
    // Outside the daemon's address pool (10.210.0.0/16), so no other test's network
    // can take it; a gateway that is not the first address, to see it is read.
    let net = d.network(
        "vsub",
        &["--subnet", "10.212.7.0/24", "--gateway", "10.212.7.254"],
    );
    let networks = rt().block_on(async { engine().await.networks().await.expect("networks()") });
    let mine = networks
        .iter()
        .find(|n| n.id.0 == net.id)
        .unwrap_or_else(|| panic!("{} not listed in {networks:?}", net.name));
    assert_eq!(mine.name, net.name);
    assert_eq!(mine.driver, "bridge");
    assert_eq!(mine.subnets, [(Ipv4Addr::new(10, 212, 7, 0), 24)]);
    assert_eq!(mine.gateways, [Ipv4Addr::new(10, 212, 7, 254)]);
    // The default bridge comes from dockerd-start.sh's address pool, clear of the
    // subnets the namespace tests use.
    let bridge = networks
        .iter()
        .find(|n| n.name == "bridge")
        .expect("default bridge");
    let (addr, _) = bridge.subnets[0];
    assert_eq!(addr.octets()[..2], [10, 210], "default bridge {bridge:?}");
}

/// The events about one container: its own, and its networks' (dis)connects.
fn about(event: &EngineEvent, id: &str) -> Option<String> {
    match event {
        EngineEvent::Container { id: c, action, .. } if c.0 == id => Some(action.to_string()),
        EngineEvent::Network {
            id: n,
            action,
            container: Some(c),
        } if c.0 == id => Some(format!("{action} {}", n.0)),
        _ => None,
    }
}

#[test]
fn events_report_start_die_destroy_and_network_connect_disconnect() {
    require_root();
    let d = dockerd();
    let net1 = d.network("vev", &[]);
    let net2 = d.network("vev", &[]);
    let rt = rt();
    let engine = rt.block_on(engine());
    let mut events = engine.events();

    // Before the stream is first polled: the engine must replay this (events() asks for
    // everything since the call).
    let c = d.run(&[
        "--label",
        "vipd.service=web",
        "--network",
        &net1.name,
        IMAGE,
        "sleep",
        "1000",
    ]);
    let id = c.id.clone();

    let seen = rt.block_on(async {
        let mut seen: Vec<(String, BTreeMap<String, String>)> = Vec::new();
        let mut actor: Option<std::thread::JoinHandle<()>> = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !seen.iter().any(|(a, _)| a == "destroy") {
            let next = tokio::time::timeout_at(deadline, events.next())
                .await
                .unwrap_or_else(|_| panic!("no destroy event within 60 s; saw {seen:?}"))
                .expect("the event stream ended")
                .expect("event stream error");
            let Some(action) = about(&next, &id) else { continue };
            let attributes = match &next {
                EngineEvent::Container { attributes, .. } => attributes.clone(),
                _ => BTreeMap::new(),
            };
            // The rest happens while the stream is live.
            if action == "start" && actor.is_none() {
                let (id, net2) = (id.clone(), net2.name.clone());
                actor = Some(std::thread::spawn(move || {
                    d.docker(&["network", "connect", &net2, &id]);
                    d.docker(&["network", "disconnect", &net2, &id]);
                    d.docker(&["kill", &id]);
                    d.docker(&["rm", &id]);
                }));
            }
            seen.push((action, attributes));
        }
        actor.expect("started").join().expect("docker commands");
        seen
    });

    let actions: Vec<&str> = seen.iter().map(|(a, _)| a.as_str()).collect();
    let expected = [
        format!("connect {}", net1.id),
        "start".to_owned(),
        format!("connect {}", net2.id),
        format!("disconnect {}", net2.id),
        "die".to_owned(),
        "destroy".to_owned(),
    ];
    // In this order, with anything else (create, kill, disconnects on die) in between.
    let mut rest = actions.iter();
    for want in &expected {
        assert!(
            rest.any(|a| a == want),
            "{want:?} missing or out of order in {actions:?}"
        );
    }
    let (_, start_attrs) = seen.iter().find(|(a, _)| a == "start").expect("start");
    assert_eq!(
        start_attrs.get("vipd.service").map(String::as_str),
        Some("web"),
        "labels arrive in attributes"
    );
}

#[test]
fn a_removed_container_inspects_as_none_and_is_not_listed() {
    require_root();
    let d = dockerd();
    let c = d.run(&[IMAGE, "sleep", "1000"]);
    d.docker(&["rm", "-f", &c.id]);
    rt().block_on(async {
        let engine = engine().await;
        assert_eq!(engine.inspect(&ContainerId(c.id.clone())).await, Ok(None));
        assert_eq!(
            engine.inspect(&ContainerId("0".repeat(64))).await,
            Ok(None),
            "never existed"
        );
        let all = engine.containers().await.expect("containers()");
        assert!(
            all.iter().all(|x| x.id.0 != c.id),
            "a removed container is listed"
        );
    });
}

#[test]
fn health_checks_show_in_state_and_events() {
    require_root();
    let d = dockerd();
    let rt = rt();
    let engine = rt.block_on(engine());
    let mut events = engine.events();
    let c = d.run(&[
        "--health-cmd",
        "true",
        "--health-interval",
        "1s",
        IMAGE,
        "sleep",
        "1000",
    ]);
    rt.block_on(async {
        let first = engine
            .inspect(&ContainerId(c.id.clone()))
            .await
            .unwrap()
            .expect("exists");
        assert!(
            matches!(first.health, Some(Health::Starting | Health::Healthy)),
            "{:?}",
            first.health
        );
        let healthy = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(ev) = events.next().await {
                if about(&ev.expect("event"), &c.id).as_deref() == Some("health_status: healthy") {
                    return;
                }
            }
            panic!("the event stream ended");
        })
        .await;
        assert!(healthy.is_ok(), "no health_status: healthy event within 30 s");
        let now = engine
            .inspect(&ContainerId(c.id.clone()))
            .await
            .unwrap()
            .expect("exists");
        assert_eq!(now.health, Some(Health::Healthy));
    });
}

#[test]
fn without_a_dockerd_connect_is_unavailable_with_a_clear_message() {
    // No socket at all.
    let rt = rt();
    let missing = "unix:///nonexistent-vipd-test/docker.sock";
    let err = rt
        .block_on(DockerEngine::connect_to(missing, Duration::from_secs(5)))
        .expect_err("connected to nothing");
    assert!(matches!(err, EngineError::Unavailable { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(missing) && text.contains("is dockerd running?"),
        "{text}"
    );

    // A socket file nobody listens on (a dockerd that died): refused, not hung.
    let dir = std::env::temp_dir().join(unique("vipd-nodock-"));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("docker.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind"));
    let endpoint = format!("unix://{}", sock.display());
    let err = rt
        .block_on(DockerEngine::connect_to(&endpoint, Duration::from_secs(5)))
        .expect_err("connected to a dead socket");
    let _ = std::fs::remove_dir_all(&dir);
    match &err {
        EngineError::Unavailable { reason, .. } => {
            assert!(reason.to_lowercase().contains("refused"), "{reason}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}
