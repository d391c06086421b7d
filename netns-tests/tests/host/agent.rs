//! `vipd run` against the private dockerd on this host (a kernel without IPVS): it finds
//! labelled and compose tasks, refuses a bad label for that container only, answers
//! names over DNS (asked with `dig`), reports it all through `vipd status`, and keeps its
//! VIPs across a restart. That it cannot program IPVS here is reported, not fatal.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::docker::{dockerd, private_dockerd, Dockerd, IMAGE};
use crate::common::*;

/// `vipd run` in the background, stopped with SIGTERM when dropped (its log shown if the
/// test failed).
struct Agent {
    child: Child,
    log: PathBuf,
    socket: PathBuf,
}

impl Agent {
    /// Started in dockerd's network namespace, as on a Docker host, where the networks'
    /// gateways (vipd's default DNS addresses) are.
    fn start(d: &Dockerd, state: &Path) -> Self {
        Self::start_at(d, state, &d.host)
    }

    /// Started like [`Agent::start`], serving no DNS: another test's vipd on the same
    /// dockerd serves the gateways' port 53.
    fn start_without_dns(d: &Dockerd, state: &Path) -> Self {
        Self::spawn(d, state, &d.host, &["--no-dns"])
    }

    /// Started like [`Agent::start`], with `DOCKER_HOST` set to `host`.
    fn start_at(d: &Dockerd, state: &Path, host: &str) -> Self {
        Self::spawn(d, state, host, &[])
    }

    fn spawn(d: &Dockerd, state: &Path, host: &str, extra: &[&str]) -> Self {
        let log = state.with_extension(format!("{}.log", unique("run")));
        let out = std::fs::File::create(&log).expect("log file");
        let socket = state.join("vipd.sock");
        let child = Command::new("nsenter")
            .arg(format!("--net={}", d.netns))
            .arg(vipd())
            // The routing mesh's ingress needs IPVS: the VM suite covers it. Several run
            // at once here: metrics (tested in metrics.rs) would want the same port.
            .args([
                "run",
                "--no-ingress",
                "--no-metrics",
                "--resync-interval",
                "5",
                "--dns-ttl",
                "7",
            ])
            .arg("--state-dir")
            .arg(state)
            .arg("--admin-socket")
            .arg(&socket)
            .args(extra)
            .env("DOCKER_HOST", host)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start vipd run");
        Agent { child, log, socket }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `vipd status --json`, or None while nothing answers yet.
    fn status(&self) -> Option<Value> {
        let (ok, stdout, _) = vipd_run(&["status", "--json", "--socket", &self.socket.display().to_string()]);
        ok.then(|| serde_json::from_str(&stdout).expect("status --json is JSON"))
    }

    fn stop(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(
                    status.success(),
                    "vipd run exited with {status} on SIGTERM:\n{}",
                    self.log()
                );
                return self.log();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("vipd run did not stop within 10 s of SIGTERM:\n{}", self.log());
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- vipd run log ---\n{}", self.log());
        }
    }
}

fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn service<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["services"].as_array()?.iter().find(|s| s["name"] == name)
}

/// `dig @server +short ARGS` from inside a container's sandbox, sorted lines.
fn dig_short(sandbox: &str, server: &str, args: &[&str]) -> Vec<String> {
    let net = format!("--net={sandbox}");
    let at = format!("@{server}");
    let mut all = vec!["nsenter", &net, "dig", &at, "+tries=1", "+time=5", "+short"];
    all.extend_from_slice(args);
    let mut lines: Vec<String> = run(&all).lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

fn gateway(d: &Dockerd, network: &str) -> String {
    d.docker(&[
        "network",
        "inspect",
        "-f",
        "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
        network,
    ])
}

fn sandbox_of(d: &Dockerd, id: &str) -> String {
    d.docker(&["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", id])
}

fn task_ip(d: &Dockerd, id: &str) -> String {
    d.docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        id,
    ])
}

#[test]
fn vipd_run_finds_labelled_and_compose_tasks_answers_dns_and_reports_status() {
    require_root();
    let d = dockerd();
    let net = d.network("vhost", &[]);
    let state = std::env::temp_dir().join(unique("vipd-host-agent-"));
    let agent = Agent::start(d, &state);

    let sleeper = |labels: &[&str], name: &str| {
        let mut args = vec!["--network", &net.name, "--name", name];
        for l in labels {
            args.push("--label");
            args.push(l);
        }
        args.extend([IMAGE, "sleep", "1000"]);
        d.run(&args)
    };
    let names: Vec<String> = ["web1", "web2", "api1", "api2", "apioff", "bad", "client"]
        .iter()
        .map(|n| unique(n))
        .collect();
    let web = [
        sleeper(&["vipd.service=web", "vipd.port.http=80/tcp"], &names[0]),
        sleeper(&["vipd.service=web", "vipd.port.http=80/tcp"], &names[1]),
    ];
    let compose = [
        "com.docker.compose.service=api",
        "com.docker.compose.project=shop",
    ];
    let api = [sleeper(&compose, &names[2]), sleeper(&compose, &names[3])];
    let _opted_out = sleeper(&[compose[0], compose[1], "vipd.enable=false"], &names[4]);
    let _bad = sleeper(&["vipd.service=web", "vipd.weight=heavy"], &names[5]);
    let client = sleeper(&[], &names[6]);
    let client_sb = sandbox_of(d, &client.id);
    let gw = gateway(d, &net.name);

    let status = wait_for(
        "web and api with 2 tasks each in vipd status",
        Duration::from_secs(60),
        || {
            let s = agent.status()?;
            let n = |name| service(&s, name).and_then(|v| v["tasks"].as_array().map(|t| t.len()));
            let sandboxes = s["sandboxes"].as_array().map_or(0, |a| a.len());
            let problems = s["label_errors"].as_array().map_or(0, |a| a.len());
            (n("web") == Some(2) && n("api") == Some(2) && sandboxes == 7 && problems == 1).then_some(s)
        },
    );
    let web_vip = service(&status, "web").unwrap()["vip"]
        .as_str()
        .expect("web has a VIP")
        .to_owned();
    let api_vip = service(&status, "api").unwrap()["vip"]
        .as_str()
        .expect("api has a VIP")
        .to_owned();
    assert!(
        web_vip.starts_with("10.253.") && api_vip.starts_with("10.253."),
        "{status:#}"
    );
    assert_ne!(web_vip, api_vip);
    let web_ips: Vec<String> = {
        let mut v: Vec<String> = web.iter().map(|c| task_ip(d, &c.id)).collect();
        v.sort();
        v
    };
    let listed: Vec<&str> = service(&status, "web").unwrap()["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["addresses"][0].as_str().unwrap())
        .collect();
    let mut listed_sorted = listed.clone();
    listed_sorted.sort();
    assert_eq!(listed_sorted, web_ips, "{status:#}");
    assert_eq!(status["docker"]["connected"], true);

    // The bad label is reported with its container, and only that container is left out.
    let problems = status["label_errors"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{status:#}");
    assert_eq!(problems[0]["label"], "vipd.weight");
    assert!(
        problems[0]["container"].as_str().unwrap().starts_with(&names[5]),
        "{status:#}"
    );
    // The opted-out compose container is no task.
    let api_tasks = service(&status, "api").unwrap()["tasks"].to_string();
    assert!(!api_tasks.contains(&names[4]), "{api_tasks}");

    // Sandboxes: every container on the network (all share it with web and api); here,
    // without IPVS, none is in sync, and each says why.
    let sandboxes = status["sandboxes"].as_array().unwrap();
    assert_eq!(sandboxes.len(), 7, "every container on the network: {status:#}");
    if !kernel_has_ipvs() {
        for sb in sandboxes {
            assert_eq!(sb["in_sync"], false, "{sb:#}");
            assert!(
                sb["error"].as_str().unwrap_or_default().contains("IPVS"),
                "{sb:#}"
            );
        }
    }
    let text = vipd_run(&["status", "--socket", &agent.socket.display().to_string()]);
    assert!(
        text.0 && text.1.contains(&web_vip) && text.1.contains("label refused"),
        "{}",
        text.1
    );
    let text = vipd_run(&[
        "status",
        "--sandboxes",
        "--socket",
        &agent.socket.display().to_string(),
    ]);
    assert!(text.0 && text.1.contains("sandboxes in sync"), "{}", text.1);

    // DNS on the network's gateway (the default), asked with dig from the client
    // container: VIPs, task addresses, SRV, container names.
    let dig = |args: &[&str]| dig_short(&client_sb, &gw, args);
    wait_for("DNS on the gateway", Duration::from_secs(20), || {
        (dig(&["web"]) == [web_vip.clone()]).then_some(())
    });
    assert_eq!(dig(&["web"]), std::slice::from_ref(&web_vip));
    assert_eq!(dig(&["api"]), std::slice::from_ref(&api_vip));
    assert_eq!(dig(&["tasks.web"]), web_ips);
    assert_eq!(dig(&["_http._tcp.web", "SRV"]).len(), 2);
    assert_eq!(
        dig(&[&names[2]]),
        [task_ip(d, &api[0].id)],
        "a container name resolves to its address"
    );

    // Restart: the same VIPs come back from the state directory.
    let first_log = agent.stop();
    assert!(first_log.contains("stopping"), "{first_log}");
    assert!(
        !state.join("vipd.sock").exists(),
        "the admin socket is removed on stop"
    );
    let again = Agent::start(d, &state);
    let status = wait_for("vipd status after a restart", Duration::from_secs(60), || {
        let s = again.status()?;
        service(&s, "web").is_some().then_some(s)
    });
    assert_eq!(service(&status, "web").unwrap()["vip"], web_vip.as_str());
    assert_eq!(service(&status, "api").unwrap()["vip"], api_vip.as_str());
    wait_for("DNS after the restart", Duration::from_secs(20), || {
        (dig_short(&client_sb, &gw, &["web"]) == [web_vip.clone()]).then_some(())
    });

    // A network made while vipd runs gets a listener on its gateway too.
    let late = d.network("vlate", &[]);
    let late_client = d.run(&["--network", &late.name, IMAGE, "sleep", "1000"]);
    let late_sb = sandbox_of(d, &late_client.id);
    let late_gw = gateway(d, &late.name);
    let net_arg = format!("--net={late_sb}");
    let at = format!("@{late_gw}");
    wait_for("DNS on a new network's gateway", Duration::from_secs(30), || {
        let out = output(&[
            "nsenter", &net_arg, "dig", &at, "+tries=1", "+time=2", "+short", "web",
        ]);
        (String::from_utf8_lossy(&out.stdout).trim() == web_vip).then_some(())
    });
    drop(late_client);
    drop(again);
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn vipd_status_without_a_running_vipd_says_so() {
    let socket = std::env::temp_dir().join(unique("no-vipd-")).join("vipd.sock");
    let (ok, _, stderr) = vipd_run(&["status", "--socket", &socket.display().to_string()]);
    assert!(!ok);
    assert!(stderr.contains("no vipd is running"), "{stderr}");
}

#[test]
fn a_vip_pool_that_overlaps_a_docker_network_or_a_host_route_is_a_startup_error() {
    require_root();
    let d = dockerd();
    let ns = Netns::new("vpool");
    ns.exec(&[
        "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan1",
    ]);
    ns.exec(&["ip", "link", "set", "lan0", "up"]);
    ns.exec(&["ip", "link", "set", "lan1", "up"]);
    ns.exec(&["ip", "route", "add", "10.99.5.0/24", "dev", "lan0"]);
    let state = std::env::temp_dir().join(unique("vipd-pool-"));
    let start_with = |pool: &str, ingress: &[&str]| {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .arg(vipd())
            .args(["run", "--no-dns", "--vip-pool", pool])
            .args(ingress)
            .arg("--state-dir")
            .arg(&state)
            .arg("--admin-socket")
            .arg(state.join("vipd.sock"))
            .env("DOCKER_HOST", &d.host)
            .stdin(Stdio::null())
            .output()
            .expect("run vipd");
        assert!(
            !out.status.success(),
            "vipd run started with the pool {pool}, {ingress:?}"
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let start = |pool: &str| start_with(pool, &["--no-ingress"]);
    let e = start("10.99.0.0/16");
    assert!(e.contains("overlaps a route of this host to 10.99.5.0/24"), "{e}");
    // The private dockerd's address pool is 10.210.0.0/16; its default bridge takes a /24.
    let e = start("10.210.0.0/16");
    assert!(e.contains("overlaps Docker network"), "{e}");
    // The routing mesh's link subnet is checked the same way, before anything is made.
    for (subnet, what) in [
        ("10.253.7.0/30", "overlaps the VIP pool 10.253.0.0/16"),
        ("10.99.5.4/30", "overlaps a route of this host to 10.99.5.0/24"),
        ("10.254.255.1/30", "expected a network address"),
    ] {
        let e = start_with("10.253.0.0/16", &["--ingress-subnet", subnet]);
        assert!(e.contains(what), "{subnet}: {e}");
    }
    let _ = std::fs::remove_dir_all(&state);
}

/// dockerd stops (its containers with it) and starts again, bringing back only the task
/// with a restart policy: vipd says the engine is gone, reconnects by itself, and lists
/// the task that stayed down as stopped, not as a backend.
#[test]
fn vipd_run_follows_a_dockerd_restart_and_keeps_no_stale_task() {
    require_root();
    let d = private_dockerd();
    let net = d.network("vrestart", &[]);
    let state = std::env::temp_dir().join(unique("vipd-dockerd-restart-"));
    let agent = Agent::start(&d, &state);
    let back = d.run(&[
        "--network",
        &net.name,
        "--restart",
        "always",
        "--label",
        "vipd.service=web",
        IMAGE,
        "sleep",
        "1000",
    ]);
    let gone = d.run(&[
        "--network",
        &net.name,
        "--label",
        "vipd.service=web",
        IMAGE,
        "sleep",
        "1000",
    ]);
    let serving = |s: &Value| -> Vec<String> {
        service(s, "web")
            .and_then(|w| w["tasks"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter(|t| t["serving"] == true)
            .map(|t| t["container"].as_str().unwrap().to_owned())
            .collect()
    };
    wait_for("2 serving web tasks", Duration::from_secs(60), || {
        agent.status().filter(|s| serving(s).len() == 2)
    });
    let vip = service(&agent.status().unwrap(), "web").unwrap()["vip"].clone();

    d.stop_daemon();
    let down = wait_for(
        "status to say the engine is gone",
        Duration::from_secs(60),
        || agent.status().filter(|s| s["docker"]["connected"] == false),
    );
    assert!(
        down["docker"]["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{down:#}"
    );

    d.start_again();
    let s = wait_for("only the restarted task serving", Duration::from_secs(90), || {
        agent
            .status()
            .filter(|s| s["docker"]["connected"] == true && serving(s) == [back.id[..12].to_owned()])
    });
    let tasks = service(&s, "web").unwrap()["tasks"].as_array().unwrap().clone();
    let stale = tasks
        .iter()
        .find(|t| t["container"] == gone.id[..12])
        .expect("the stopped task listed");
    assert_eq!(
        (stale["state"].as_str(), stale["serving"].as_bool()),
        (Some("stopped"), Some(false))
    );
    assert_eq!(service(&s, "web").unwrap()["vip"], vip, "the VIP stays");
    let log = agent.log();
    assert!(
        log.contains("not reachable") || log.contains("event stream"),
        "{log}"
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn vipd_run_started_before_dockerd_waits_for_it_and_says_so() {
    require_root();
    let d = dockerd();
    let state = std::env::temp_dir().join(unique("vipd-late-docker-"));
    std::fs::create_dir_all(&state).unwrap();
    // The engine's socket is not there yet.
    let socket = state.join("docker.sock");
    let agent = Agent::start_at(d, &state, &format!("unix://{}", socket.display()));
    wait_for(
        "vipd to say it waits for the engine",
        Duration::from_secs(30),
        || {
            let log = agent.log();
            (log.matches("Docker engine not reachable; waiting for it").count() >= 2).then_some(log)
        },
    );
    assert!(agent.log().contains("no socket at"), "{}", agent.log());
    // Now it is.
    let real = d.host.strip_prefix("unix://").expect("a unix socket");
    std::os::unix::fs::symlink(real, &socket).unwrap();
    let s = wait_for("vipd to list the engine", Duration::from_secs(60), || {
        agent.status().filter(|s| s["docker"]["connected"] == true)
    });
    assert!(s["services"].is_array(), "{s:#}");
    let log = agent.stop();
    assert!(log.contains("listed containers"), "{log}");
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn vipd_run_waiting_for_dockerd_stops_on_sigterm() {
    require_root();
    let d = dockerd();
    let state = std::env::temp_dir().join(unique("vipd-no-docker-"));
    std::fs::create_dir_all(&state).unwrap();
    let agent = Agent::start_at(
        d,
        &state,
        &format!("unix://{}", state.join("none.sock").display()),
    );
    wait_for(
        "vipd to say it waits for the engine",
        Duration::from_secs(30),
        || agent.log().contains("waiting for it").then_some(()),
    );
    let log = agent.stop();
    assert!(
        log.contains("stopping before the Docker engine answered"),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&state);
}

/// The admin socket answers root only: another user is refused, told why, and learns
/// nothing (the socket is mode 0600 in a directory of mode 0700 that vipd makes).
#[test]
fn the_admin_socket_answers_root_only_and_vipd_keeps_only_the_capabilities_it_needs() {
    require_root();
    let d = dockerd();
    let state = std::env::temp_dir().join(unique("vipd-admin-"));
    let agent = Agent::start_without_dns(d, &state);
    wait_for("vipd to answer", Duration::from_secs(60), || agent.status());
    let mode = |p: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions()) & 0o777
    };
    assert_eq!(mode(&agent.socket), 0o600);
    // It runs with only the capabilities it needs (NET_BIND_SERVICE 10, NET_ADMIN 12,
    // NET_RAW 13, SYS_ADMIN 21), and its bounding set keeps the iptables processes it
    // starts to the same. (nsenter execs vipd: the child's pid is vipd's.)
    let proc_status = std::fs::read_to_string(format!("/proc/{}/status", agent.child.id())).unwrap();
    let caps = |set: &str| {
        let line = proc_status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{set}:\t")))
            .unwrap_or_else(|| panic!("no {set} in {proc_status}"));
        u64::from_str_radix(line.trim(), 16).unwrap()
    };
    let needed = (1 << 10) | (1 << 12) | (1 << 13) | (1 << 21);
    assert_eq!(
        ["CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"].map(caps),
        [needed, needed, needed, 0, 0],
        "{proc_status}"
    );
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(vipd())
        .args(["status", "--json", "--socket"])
        .arg(&agent.socket)
        .output()
        .expect("run vipd status as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "nobody was answered: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.stdout.is_empty());
    assert!(
        stderr.contains("permission denied (vipd status must run as root)"),
        "{stderr}"
    );
    // The directory vipd makes for its socket is root's alone.
    let fresh = std::env::temp_dir().join(unique("vipd-admin-dir-"));
    let socket = fresh.join("run").join("vipd.sock");
    let mut second = Command::new("nsenter")
        .arg(format!("--net={}", d.netns))
        .arg(vipd())
        .args(["run", "--no-ingress", "--no-dns", "--no-metrics", "--state-dir"])
        .arg(fresh.join("state"))
        .arg("--admin-socket")
        .arg(&socket)
        .env("DOCKER_HOST", &d.host)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start vipd run");
    wait_for("the second vipd's socket", Duration::from_secs(60), || {
        socket.exists().then_some(())
    });
    assert_eq!(mode(socket.parent().unwrap()), 0o700);
    let _ = second.kill();
    let _ = second.wait();
    drop(agent);
    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_dir_all(&fresh);
}
