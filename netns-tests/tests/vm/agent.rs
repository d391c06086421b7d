//! `vipd run` against a real dockerd in a kernel with IPVS: a labelled service's tasks
//! become a VIP in every container on their network, and a stopped task leaves it.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::docker::{dockerd, IMAGE};
use crate::common::*;

/// `vipd run` in the background, killed (and its log shown) when dropped.
struct Agent {
    child: Child,
    log: std::path::PathBuf,
}

impl Agent {
    fn start(docker_host: &str, state_dir: &str) -> Self {
        let log = std::env::temp_dir()
            .join(unique("vipd-run-"))
            .with_extension("log");
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(vipd())
            .args(["run", "--state-dir", state_dir, "--resync-interval", "5"])
            .env("DOCKER_HOST", docker_host)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start vipd run");
        Agent { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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

fn in_sandbox(sandbox: &str, args: &[&str]) -> std::process::Output {
    let net = format!("--net={sandbox}");
    let mut full = vec!["nsenter", net.as_str()];
    full.extend_from_slice(args);
    output(&full)
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

fn dests(sandbox: &str) -> usize {
    let out = in_sandbox(sandbox, &["ipvsadm", "-Ln"]);
    String::from_utf8_lossy(&out.stdout).matches("Masq").count()
}

fn requests(sandbox: &str, vip: &str, count: usize) -> BTreeMap<String, usize> {
    let url = format!("http://{vip}/");
    let mut args = vec!["curl", "-s", "--max-time", "5", "-H", "Connection: close"];
    args.extend(std::iter::repeat_n(url.as_str(), count));
    let out = in_sandbox(sandbox, &args);
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut seen = BTreeMap::new();
    for line in body.lines() {
        *seen.entry(line.to_owned()).or_insert(0) += 1;
    }
    assert_eq!(
        seen.values().sum::<usize>(),
        count,
        "not every request was answered: {body:?}"
    );
    seen
}

#[test]
fn vipd_run_gives_a_docker_service_a_vip_in_every_sandbox_and_follows_a_stop() {
    require_root();
    assert!(
        kernel_has_ipvs(),
        "the VM suite needs a kernel with IPVS (run it with scripts/vm/run.sh)"
    );
    let d = dockerd();
    let net = d.network("vfront", &[]);
    let state = std::env::temp_dir().join(unique("vipd-state-"));
    let agent = Agent::start(&d.host, &state.display().to_string());

    let web: Vec<_> = (1..=3)
        .map(|i| {
            d.run(&[
                "--network",
                &net.name,
                "--label",
                "vipd.service=web",
                "-e",
                &format!("NAME=w{i}"),
                IMAGE,
                "sh",
                "-c",
                "echo $NAME > /www/index.html && exec httpd -f -p 80 -h /www",
            ])
        })
        .collect();
    let client = d.run(&["--network", &net.name, IMAGE, "sleep", "1000"]);
    let sandbox = d.docker(&["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", &client.id]);

    wait_for(
        "3 backends in the client's sandbox",
        Duration::from_secs(90),
        || dests(&sandbox) == 3,
    );
    let mangle = String::from_utf8_lossy(
        &in_sandbox(&sandbox, &["iptables", "-t", "mangle", "-S", "VIPD-OUTPUT"]).stdout,
    )
    .into_owned();
    let vip = mangle
        .split_whitespace()
        .skip_while(|w| *w != "-d")
        .nth(1)
        .and_then(|a| a.strip_suffix("/32"))
        .unwrap_or_else(|| panic!("no VIP rule in the client's sandbox:\n{mangle}\n{}", agent.log()))
        .to_owned();
    assert!(
        vip.starts_with("10.253."),
        "VIP {vip} is not from the default pool"
    );

    let seen = requests(&sandbox, &vip, 30);
    assert_eq!(
        seen.values().copied().collect::<Vec<_>>(),
        [10, 10, 10],
        "{seen:?}"
    );
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), ["w1", "w2", "w3"]);

    // A task also reaches its own service.
    let w1_sandbox = d.docker(&["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", &web[0].id]);
    wait_for("3 backends in a task's sandbox", Duration::from_secs(30), || {
        dests(&w1_sandbox) == 3
    });

    d.docker(&["stop", "-t", "1", &web[2].id]);
    let took = wait_for("the stopped task to leave", Duration::from_secs(30), || {
        dests(&sandbox) == 2
    });
    eprintln!("stopped task out of the client's sandbox {took:?} after `docker stop` returned");
    let seen = requests(&sandbox, &vip, 30);
    assert_eq!(seen.get("w3"), None, "{seen:?}");
    assert_eq!(seen.values().sum::<usize>(), 30);

    let saved = std::fs::read_to_string(state.join("allocations.json")).expect("allocations saved");
    assert!(saved.contains(&vip), "{saved}");
    drop(agent);
}
