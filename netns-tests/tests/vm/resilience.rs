//! Resilience of `vipd run` against a real dockerd in a kernel with IPVS: every task of a
//! service replaced one by one under load, through the VIP and through a published port,
//! loses no request (a task being stopped drains at weight 0 first); a task whose health
//! check fails drains, leaves, and comes back when it passes again; the IPVS timeouts
//! asked for are every sandbox's.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vipd::netns::{run_in, NetnsPath};

use super::agent::{
    echo, gateway_of, ip_of, ipvs_table, open_echo, require_ipvs_vm, run_one, sandbox_of, sleeper, state_dir,
    stdout_in, vip_of, wait_for, Agent, TestIngress, Took,
};
use crate::common::docker::{dockerd, one_vipd_run_at_a_time, private_dockerd_live_restore, IMAGE};

/// The weight of the destination at `ip` in a sandbox's IPVS table (any service), if it
/// is one.
fn weight_of(sandbox: &str, ip: &str) -> Option<u32> {
    let hex = format!("{:08X}:", u32::from(ip.parse::<Ipv4Addr>().unwrap()));
    ipvs_table(sandbox).lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&"->") && f.get(1).is_some_and(|a| a.starts_with(&hex)))
            .then(|| f.get(3).and_then(|w| w.parse().ok()))
            .flatten()
    })
}

/// One HTTP/1.0 GET on a new connection to `to`; it must be answered 200 within 5 s.
fn one_request(to: SocketAddr) -> Result<(), String> {
    let limit = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&to, limit).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(limit)).map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).map_err(|e| format!("receive: {e}"))?;
    let head = String::from_utf8_lossy(&answer);
    let status = head.lines().next().unwrap_or_default();
    if status.starts_with("HTTP/1.") && status.contains(" 200 ") {
        Ok(())
    } else {
        Err(format!("answer {status:?}"))
    }
}

/// Two load generators, one through a VIP from a sandbox and one through a published
/// port from the host: each one thread in its namespace, one request after another (each
/// on a new connection, 20 ms apart) until stopped, at most 20 minutes.
struct Load {
    stop: Arc<AtomicBool>,
    runs: Vec<(String, LoadRun)>,
}

/// One load generator's thread: when joined, the requests answered and each failure.
type LoadRun = JoinHandle<(usize, Vec<String>)>;

impl Load {
    fn start(targets: &[(&str, &str, SocketAddr)]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let runs = targets
            .iter()
            .map(|(what, ns, to)| {
                let ns = NetnsPath::from_arg(ns);
                let (stop, to) = (Arc::clone(&stop), *to);
                let run = std::thread::spawn(move || {
                    run_in(&ns, || {
                        let t0 = Instant::now();
                        let (mut ok, mut failed) = (0, Vec::new());
                        while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(1200) {
                            match one_request(to) {
                                Ok(()) => ok += 1,
                                Err(e) => failed.push(format!("{:.2} s: {e}", t0.elapsed().as_secs_f64())),
                            }
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        (ok, failed)
                    })
                    .expect("enter the load generator's namespace")
                });
                (format!("{what} {to}"), run)
            })
            .collect();
        Load { stop, runs }
    }

    /// Stop; every target must have answered at least `min` requests and failed none.
    fn finish(self, min: usize, log: &str) {
        self.stop.store(true, Ordering::Relaxed);
        let mut summary = Vec::new();
        let mut bad = false;
        for (what, run) in self.runs {
            let (ok, failed) = run.join().expect("a load generator");
            let line = format!(
                "through {what}: {ok} answered, {} failed: {failed:?}",
                failed.len()
            );
            eprintln!("{line}");
            bad |= ok < min || !failed.is_empty();
            summary.push(line);
        }
        // The summary first and last: a report that keeps only one end of a long
        // message still shows it.
        let summary = summary.join("\n");
        assert!(
            !bad,
            "{summary}\n(at least {min} answered requests expected through each, none failed)\n--- vipd log ---\n{log}\n--- end of vipd log ---\n{summary}"
        );
    }
}

/// `docker run` arguments of a task of `service` publishing `publish`, with a health check
/// (`test -e /healthy`, which its start creates; remove the file to fail it, twice in a
/// row). On SIGTERM
/// (`docker stop`) it keeps serving for `linger` seconds and then exits, as a server that
/// finishes its work in flight does.
fn graceful_task(network: &str, service: &str, publish: &str, name: &str, linger: u32) -> Vec<String> {
    let mut args = plain_graceful_task(network, service, publish, name, linger);
    let health = [
        "--health-cmd",
        "test -e /healthy",
        // Every check is an exec, costly under emulation: every 2 s keeps the engine
        // responsive with six tasks checking.
        "--health-interval",
        "2s",
        // Under emulation a check (an exec in the container) can take seconds: a slow
        // one is not a failed one, and one failure alone does not flip the task.
        "--health-retries",
        "2",
        "--health-timeout",
        "60s",
    ];
    args.splice(0..0, health.map(str::to_owned));
    args
}

/// [`graceful_task`] without a health check.
fn plain_graceful_task(network: &str, service: &str, publish: &str, name: &str, linger: u32) -> Vec<String> {
    let script = format!(
        "echo $NAME > /www/index.html && touch /healthy && {{ httpd -f -p 80 -h /www & pid=$!; }} && \
         trap 'sleep {linger}; kill $pid; exit 0' TERM && wait $pid"
    );
    [
        "--network",
        network,
        "--label",
        &format!("vipd.service={service}"),
        "--label",
        &format!("vipd.publish={publish}"),
        "-e",
        &format!("NAME={name}"),
        IMAGE,
        "sh",
        "-c",
        &script,
    ]
    .map(str::to_owned)
    .to_vec()
}

#[test]
fn replacing_every_task_one_by_one_under_load_loses_no_request() {
    let _turn = one_vipd_run_at_a_time();
    let _took = Took::new();
    require_ipvs_vm();
    let d = dockerd();
    let net = d.network("vroll", &[]);
    let state = state_dir();
    let ingress = TestIngress::new("10.254.252.0/30");
    let agent = Agent::start(d, &state, &ingress.args());
    // Under emulation the engine may take seconds to send an event: the tasks linger 15 s.
    let task = |name: &str| graceful_task(&net.name, "roll", "8090:80", name, 15);
    let mut tasks: Vec<_> = ["a1", "a2", "a3"].iter().map(|n| run_one(d, &task(n))).collect();
    let client = run_one(d, &sleeper(&net.name, &[]));
    let client_sb = sandbox_of(d, &client.id);
    let ips: Vec<String> = tasks.iter().map(|t| ip_of(d, &t.id)).collect();
    wait_for(
        "the 3 healthy tasks in the client and the ingress",
        Duration::from_secs(180),
        || {
            ips.iter()
                .all(|ip| weight_of(&client_sb, ip) == Some(1) && weight_of(&ingress, ip) == Some(1))
        },
    );
    let vip = vip_of(&client_sb, "roll").expect("the VIP in the client");
    let gateway = gateway_of(d, &net.name);

    let load = Load::start(&[
        ("the VIP", &client_sb, format!("{vip}:80").parse().unwrap()),
        (
            "the published port",
            &d.netns,
            format!("{gateway}:8090").parse().unwrap(),
        ),
    ]);
    for (i, name) in ["b1", "b2", "b3"].iter().enumerate() {
        let new = run_one(d, &task(name));
        let new_ip = ip_of(d, &new.id);
        let took = wait_for(
            "the new task, healthy, in the client and the ingress",
            Duration::from_secs(180),
            || weight_of(&client_sb, &new_ip) == Some(1) && weight_of(&ingress, &new_ip) == Some(1),
        );
        eprintln!("{name} ({new_ip}) a backend {took:?} after its start");
        let old = tasks.remove(0);
        let old_ip = &ips[i];
        let t0 = Instant::now();
        let stopping = {
            let id = old.id.clone();
            let host = d.host.clone();
            std::thread::spawn(move || {
                std::process::Command::new("docker")
                    .args(["-H", &host, "stop", "-t", "30", &id])
                    .output()
                    .expect("docker stop")
            })
        };
        let drained = wait_for(
            "the old task at weight 0 or gone, everywhere",
            Duration::from_secs(60),
            || {
                weight_of(&client_sb, old_ip).unwrap_or(0) == 0
                    && weight_of(&ingress, old_ip).unwrap_or(0) == 0
            },
        );
        let out = stopping.join().unwrap();
        assert!(out.status.success(), "docker stop: {out:?}");
        wait_for(
            "the old task out of the client and the ingress",
            Duration::from_secs(60),
            || weight_of(&client_sb, old_ip).is_none() && weight_of(&ingress, old_ip).is_none(),
        );
        eprintln!(
            "{old_ip}: weight 0 everywhere {drained:?} after `docker stop` began, gone after {:?}",
            t0.elapsed()
        );
        drop(old);
        tasks.push(new);
    }
    load.finish(100, &agent.log());
    // 3 tasks serve (SERVICE MODE VIP FWMARK SCHED TASKS: serving/listed); an old one may
    // still be listed, stopped, until Docker has removed it.
    let status = agent.status();
    let roll = status
        .lines()
        .find(|l| l.starts_with("roll "))
        .unwrap_or_default();
    let serving = roll.split_whitespace().nth(5).and_then(|t| t.split_once('/'));
    assert_eq!(serving.map(|(s, _)| s), Some("3"), "{status}");
    drop(tasks);
    drop(client);
    drop(agent);
}

#[test]
fn a_task_failing_its_health_check_drains_leaves_and_comes_back_when_it_passes() {
    let _turn = one_vipd_run_at_a_time();
    let _took = Took::new();
    require_ipvs_vm();
    let d = dockerd();
    let net = d.network("vhealth", &[]);
    let state = state_dir();
    let agent = Agent::start(
        d,
        &state,
        &[
            "--no-ingress",
            "--drain-grace",
            "5",
            "--ipvs-tcp-timeout",
            "3600",
            "--ipvs-tcpfin-timeout",
            "30",
            "--ipvs-udp-timeout",
            "60",
        ],
    );
    let task = |name: &str| graceful_task(&net.name, "hc", "8091:80", name, 0);
    let tasks: Vec<_> = ["h1", "h2"].iter().map(|n| run_one(d, &task(n))).collect();
    let client = run_one(d, &sleeper(&net.name, &[]));
    let client_sb = sandbox_of(d, &client.id);
    let ips: Vec<String> = tasks.iter().map(|t| ip_of(d, &t.id)).collect();
    wait_for(
        "both healthy tasks in the client",
        Duration::from_secs(180),
        || ips.iter().all(|ip| weight_of(&client_sb, ip) == Some(1)),
    );
    // The IPVS timeouts asked for are the sandbox's.
    let timeouts = stdout_in(&client_sb, &["ipvsadm", "-L", "--timeout"]);
    assert_eq!(timeouts.trim(), "Timeout (tcp tcpfin udp): 3600 30 60");

    // The check fails: weight 0 at once, then out when the drain grace (5 s) is over.
    d.docker(&["exec", &tasks[1].id, "rm", "/healthy"]);
    let t0 = Instant::now();
    let zero = wait_for("the unhealthy task at weight 0", Duration::from_secs(60), || {
        weight_of(&client_sb, &ips[1]) == Some(0)
    });
    wait_for("the unhealthy task out", Duration::from_secs(60), || {
        weight_of(&client_sb, &ips[1]).is_none()
    });
    eprintln!(
        "unhealthy: weight 0 {zero:?} after the check began to fail, out {:?} after",
        t0.elapsed()
    );
    assert_eq!(weight_of(&client_sb, &ips[0]), Some(1));
    let status = agent.status();
    assert!(
        status.contains(" 1/2 ") && status.contains("unhealthy"),
        "{status}"
    );

    // It passes again: a backend again.
    d.docker(&["exec", &tasks[1].id, "touch", "/healthy"]);
    let back = wait_for("the healthy task back", Duration::from_secs(60), || {
        weight_of(&client_sb, &ips[1]) == Some(1)
    });
    eprintln!("healthy again: a backend {back:?} after the check passed again");
    drop(tasks);
    drop(client);
    drop(agent);
}

#[test]
fn vipd_killed_under_load_and_restarted_loses_no_request_and_changes_only_the_difference() {
    // Also: a restart with the state file lost keeps every VIP (read back from the kernel).
    let _turn = one_vipd_run_at_a_time();
    let _took = Took::new();
    require_ipvs_vm();
    let d = dockerd();
    let net = d.network("vcrash", &[]);
    let state = state_dir();
    let ingress = TestIngress::new("10.254.251.0/30");
    let args = ingress.args();
    let mut agent = Agent::start(d, &state, &args);
    // No health check: a check that flips under emulation would change weights while
    // vipd is down, and the restart would rightly apply that difference.
    let task = |name: &str| plain_graceful_task(&net.name, "crash", "8092:80", name, 0);
    let mut tasks: Vec<_> = ["k1", "k2"].iter().map(|n| run_one(d, &task(n))).collect();
    // An echo task (busybox nc, one `cat` per connection) for a connection kept open.
    let echo_task: Vec<String> = [
        "--network",
        &net.name,
        "--label",
        "vipd.service=crashecho",
        IMAGE,
        "nc",
        "-ll",
        "-p",
        "9000",
        "-e",
        "cat",
    ]
    .map(str::to_owned)
    .to_vec();
    let echo_one = run_one(d, &echo_task);
    let client = run_one(d, &sleeper(&net.name, &[]));
    let client_sb = sandbox_of(d, &client.id);
    let ips: Vec<String> = tasks.iter().map(|t| ip_of(d, &t.id)).collect();
    wait_for(
        "both tasks in the client and the ingress",
        Duration::from_secs(180),
        || {
            ips.iter()
                .all(|ip| weight_of(&client_sb, ip) == Some(1) && weight_of(&ingress, ip) == Some(1))
        },
    );
    wait_for("the echo task in the client", Duration::from_secs(60), || {
        vip_of(&client_sb, "crashecho").is_some()
    });
    let vip = vip_of(&client_sb, "crash").expect("the VIP in the client");
    let echo_vip = vip_of(&client_sb, "crashecho").expect("the echo VIP");
    let mut stream = open_echo(&client_sb, format!("{echo_vip}:9000").parse().unwrap());
    let gateway = gateway_of(d, &net.name);

    // Under load: SIGKILL, 3 s without vipd, a new vipd.
    let load = Load::start(&[
        ("the VIP", &client_sb, format!("{vip}:80").parse().unwrap()),
        (
            "the published port",
            &d.netns,
            format!("{gateway}:8092").parse().unwrap(),
        ),
    ]);
    std::thread::sleep(Duration::from_secs(3));
    agent.kill9();
    std::thread::sleep(Duration::from_secs(3));
    echo(&mut stream, "while vipd is dead").expect("the open connection while vipd is dead");
    let mut agent = Agent::start(d, &state, &args);
    wait_for("the new vipd's first resync", Duration::from_secs(120), || {
        !agent.resyncs().is_empty()
    });
    let (sandboxes, operations, errors) = agent.resyncs()[0];
    eprintln!("after SIGKILL, the new vipd's first resync: sandboxes={sandboxes} operations={operations} errors={errors}");
    assert_eq!((operations, errors), (0, 0), "{}", agent.log());
    std::thread::sleep(Duration::from_secs(3));
    load.finish(20, &agent.log());
    echo(&mut stream, "after the restart").expect("the open connection after the restart");

    // Killed again, and a task stops meanwhile: the new vipd removes just that task, one
    // destination in each sandbox that has the service (the client, the other task, the
    // echo task) and in the ingress.
    agent.kill9();
    let gone = tasks.remove(1);
    d.docker(&["stop", "-t", "1", &gone.id]);
    let agent = Agent::start(d, &state, &args);
    wait_for("the new vipd's first resync", Duration::from_secs(120), || {
        !agent.resyncs().is_empty()
    });
    let (_, operations, errors) = agent.resyncs()[0];
    eprintln!("after SIGKILL and a stopped task: operations={operations} errors={errors}");
    assert_eq!((operations, errors), (4, 0), "{}", agent.log());
    assert_eq!(weight_of(&client_sb, &ips[1]), None);
    assert_eq!(weight_of(&ingress, &ips[1]), None);
    assert_eq!(weight_of(&client_sb, &ips[0]), Some(1));

    // Killed again, and its state file is lost: the new vipd reads the VIPs in use back
    // from the sandboxes and changes nothing.
    let mut agent = agent;
    agent.kill9();
    std::fs::write(state.join("allocations.json"), "{\"services\": [garbage").unwrap();
    let agent = Agent::start(d, &state, &args);
    wait_for("the new vipd's first resync", Duration::from_secs(120), || {
        !agent.resyncs().is_empty()
    });
    let (_, operations, errors) = agent.resyncs()[0];
    eprintln!("after SIGKILL and a corrupt state file: operations={operations} errors={errors}");
    assert_eq!((operations, errors), (0, 0), "{}", agent.log());
    assert!(
        agent.log().contains("VIP recovered from the kernel"),
        "{}",
        agent.log()
    );
    assert_eq!(vip_of(&client_sb, "crash").as_deref(), Some(vip.as_str()));
    echo(&mut stream, "after a lost state file").expect("the open connection after the restart");
    drop(gone);
    drop(tasks);
    drop(echo_one);
    drop(client);
    drop(agent);
}

#[test]
fn dockerd_stopped_and_started_again_under_load_loses_no_request() {
    // dockerd with live-restore, as on a host where restarting the engine must not stop
    // the containers: while it is down vipd keeps every rule, reports the engine gone,
    // reconnects by itself when it is back, and the resync changes nothing.
    let _turn = one_vipd_run_at_a_time();
    let _took = Took::new();
    require_ipvs_vm();
    let d = private_dockerd_live_restore();
    let net = d.network("vdrst", &[]);
    let state = state_dir();
    let ingress = TestIngress::new("10.254.250.0/30");
    let agent = Agent::start(&d, &state, &ingress.args());
    let task = |name: &str| plain_graceful_task(&net.name, "drst", "8092:80", name, 0);
    let tasks: Vec<_> = ["r1", "r2"].iter().map(|n| run_one(&d, &task(n))).collect();
    let client = run_one(&d, &sleeper(&net.name, &[]));
    let client_sb = sandbox_of(&d, &client.id);
    let ips: Vec<String> = tasks.iter().map(|t| ip_of(&d, &t.id)).collect();
    wait_for(
        "both tasks in the client and the ingress",
        Duration::from_secs(180),
        || {
            ips.iter()
                .all(|ip| weight_of(&client_sb, ip) == Some(1) && weight_of(&ingress, ip) == Some(1))
        },
    );
    let vip = vip_of(&client_sb, "drst").expect("the VIP in the client");
    let gateway = gateway_of(&d, &net.name);
    let before = ipvs_table(&client_sb);

    let load = Load::start(&[
        ("the VIP", &client_sb, format!("{vip}:80").parse().unwrap()),
        (
            "the published port",
            &d.netns,
            format!("{gateway}:8092").parse().unwrap(),
        ),
    ]);
    std::thread::sleep(Duration::from_secs(3));
    d.stop_daemon();
    let gone = wait_for("vipd to report the engine gone", Duration::from_secs(60), || {
        agent.status().contains("docker: not connected")
    });
    eprintln!("engine gone in vipd status {gone:?} after dockerd stopped");
    // Traffic goes on with the engine down.
    std::thread::sleep(Duration::from_secs(10));
    let resyncs = agent.resyncs().len();
    d.start_again();
    let back = wait_for(
        "vipd to resync with the engine back",
        Duration::from_secs(120),
        || agent.resyncs().len() > resyncs && !agent.status().contains("docker: not connected"),
    );
    eprintln!("vipd resynced {back:?} after dockerd started again");
    std::thread::sleep(Duration::from_secs(3));
    load.finish(50, &agent.log());

    // The tasks serve on; nothing was changed in the sandboxes.
    let (_, operations, errors) = *agent.resyncs().last().unwrap();
    assert_eq!((operations, errors), (0, 0), "{}", agent.log());
    assert_eq!(ipvs_table(&client_sb).lines().count(), before.lines().count());
    for ip in &ips {
        assert_eq!(weight_of(&client_sb, ip), Some(1));
        assert_eq!(weight_of(&ingress, ip), Some(1));
    }
    let status = agent.status();
    let line = status
        .lines()
        .find(|l| l.starts_with("drst "))
        .unwrap_or_default();
    assert_eq!(line.split_whitespace().nth(5), Some("2/2"), "{status}");
    drop(tasks);
    drop(client);
    drop(agent);
}
