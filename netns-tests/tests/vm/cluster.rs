//! The cross-node data path with real Docker, real IPVS and vipd's own overlay code: the
//! 2-node Swarm walkthrough's traffic on 3 nodes (node 3 behind a router). busybox httpd
//! tasks on node2 (two) and node3 (one) on the `vipd` network, each serving its own name;
//! a client container on node1 reaches them directly across the overlay, then through a
//! VIP that `vipd apply` programs in the client's sandbox, round-robin, with its own
//! source address arriving at the tasks (no masquerade inside the cluster range).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use vipd::core::overlay::OverlayConfig;

use crate::common::cluster::{exec_in, exec_in_output, Cluster, IMAGE, NETWORK};
use crate::common::*;

/// The VIP: in the cluster range, in the slice no node leases in this test.
const VIP: &str = "10.230.0.100";

/// One httpd task: where it runs, its name (what it serves), its container and address.
struct Task {
    node: u8,
    name: &'static str,
    id: String,
    ip: String,
}

/// GET / from the client's sandbox until the task answers with its name (its httpd
/// may still be starting), at most 60 s.
fn wait_for(sandbox: &str, task: &Task) {
    let url = format!("http://{}/", task.ip);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = exec_in_output(sandbox, &["curl", "-s", "--max-time", "3", &url]);
        let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() && body == task.name {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} ({} on node{}) not reachable from the client across the overlay: {:?}",
            task.name,
            task.ip,
            task.node,
            out
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The peer addresses busybox httpd (`-vv`) logged for each request: lines
/// `ADDR:PORT: url:/`, ADDR possibly as `[::ffff:a.b.c.d]` (an IPv6 socket).
fn logged_peers(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.strip_suffix(": url:/"))
        .filter_map(|peer| peer.rsplit_once(':').map(|(addr, _port)| addr))
        .map(|addr| {
            let addr = addr.trim_start_matches('[').trim_end_matches(']');
            addr.strip_prefix("::ffff:").unwrap_or(addr).to_owned()
        })
        .collect()
}

#[test]
fn httpd_log_lines_give_the_peer_address_for_ipv4_and_mapped_sockets() {
    let log = "[::ffff:10.230.1.3]:41234: url:/\n\
               [::ffff:10.230.1.3]:41234: response:200\n\
               10.230.1.4:5555: url:/\n\
               something else\n";
    assert_eq!(logged_peers(log), ["10.230.1.3", "10.230.1.4"]);
}

#[test]
fn three_nodes_carry_a_vip_across_the_overlay_and_keep_the_clients_address() {
    require_root();
    assert!(
        kernel_has_ipvs(),
        "the VM suite needs a kernel with IPVS (run it with scripts/vm/run.sh)"
    );
    let t0 = Instant::now();
    let cluster = Cluster::start(3);
    cluster.hand_made_network(&OverlayConfig::default());

    // The tasks and the client, all started at once: `docker run` is seconds each in
    // the emulated VM.
    let t = Instant::now();
    let specs: [(u8, &str); 4] = [(2, "t2a"), (2, "t2b"), (3, "t3a"), (1, "client")];
    let started: Vec<Task> = std::thread::scope(|scope| {
        let handles: Vec<_> = specs
            .iter()
            .map(|&(node, name)| {
                let cluster = &cluster;
                scope.spawn(move || {
                    let n = cluster.node(node);
                    // The client only needs a sandbox; each task serves its own name
                    // and logs every request's peer address (-vv) to docker logs.
                    let command = if name == "client" {
                        "exec sleep 100000".to_owned()
                    } else {
                        format!("echo {name} >/www/index.html && exec httpd -f -vv -p 80 -h /www")
                    };
                    let id =
                        n.run_container(&["--name", name, "--network", NETWORK, IMAGE, "sh", "-c", &command]);
                    let ip = n.container_ip(&id);
                    Task { node, name, id, ip }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("docker run"))
            .collect()
    });
    cluster.step("3 tasks and the client running (parallel docker run)", t);
    let (client, tasks): (Vec<Task>, Vec<Task>) = started.into_iter().partition(|t| t.name == "client");
    let client = &client[0];
    for task in &tasks {
        let subnet = format!("10.230.{}.", task.node);
        assert!(task.ip.starts_with(&subnet), "{} got {}", task.name, task.ip);
    }
    let sandbox = cluster.node(1).sandbox(&client.id);

    // (a) Every task directly by its address, across the overlay (node3's across the
    // router).
    let t = Instant::now();
    for task in &tasks {
        wait_for(&sandbox, task);
    }
    cluster.step("(a) every task reached directly from node1's client", t);

    // (b) A VIP over the three tasks in the client's sandbox: rr lands 10 on each.
    let t = Instant::now();
    let backends: Vec<String> = tasks.iter().map(|t| format!(r#"{{"ip":"{}"}}"#, t.ip)).collect();
    let file = services_file(&format!(
        r#"{{"services":[{{"name":"web","vip":"{VIP}","fwmark":256,"backends":[{}]}}]}}"#,
        backends.join(",")
    ));
    let (ok, stdout, stderr) = vipd_run(&["apply", "--netns", &sandbox, "--file", &file]);
    assert!(ok, "vipd apply failed:\nstdout: {stdout}\nstderr: {stderr}");
    assert!(applied_count(&stdout) > 0, "{stdout}");

    let url = format!("http://{VIP}/");
    let mut args = vec!["curl", "-s", "--max-time", "5", "-H", "Connection: close"];
    args.extend(std::iter::repeat_n(url.as_str(), 30));
    let body = exec_in(&sandbox, &args);
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for line in body.lines() {
        *seen.entry(line).or_insert(0) += 1;
    }
    let expected: BTreeMap<&str, usize> = tasks.iter().map(|t| (t.name, 10)).collect();
    assert_eq!(seen, expected, "30 requests to the VIP: {body:?}");

    let ipvsadm = exec_in(&sandbox, &["ipvsadm", "-Ln"]);
    assert!(ipvsadm.contains("FWM  256 rr"), "{ipvsadm}");
    for task in &tasks {
        let line = format!("-> {}:0", task.ip);
        assert!(
            ipvsadm.lines().any(|l| l.contains(&line) && l.contains("Masq")),
            "{} missing from:\n{ipvsadm}",
            task.ip
        );
    }
    cluster.step("(b) vipd apply, 30 requests through the VIP, ipvsadm", t);

    // (c) The tasks saw the client's own address on every request, direct or through
    // the VIP: IPVS in the client's sandbox only rewrites the destination, and nothing
    // on the way masquerades inside the cluster range. Checked in httpd's own log,
    // where each request's peer address is written.
    let t = Instant::now();
    for task in &tasks {
        let n = cluster.node(task.node);
        let out = n.docker_output(&["logs", &task.id]);
        let log = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
        let peers = logged_peers(&log);
        assert!(
            peers.len() >= 11,
            "{}: expected the direct request and 10 through the VIP, log:\n{log}",
            task.name
        );
        assert!(
            peers.iter().all(|p| *p == client.ip),
            "{}: a request arrived from another address than the client's {}:\n{log}",
            task.name,
            client.ip
        );
    }
    cluster.step("(c) client address in every task's log", t);

    for (what, took) in cluster.timings() {
        eprintln!("timing: {what}: {:.1} s", took.as_secs_f64());
    }
    eprintln!("timing: test body in all: {:.1} s", t0.elapsed().as_secs_f64());
}
