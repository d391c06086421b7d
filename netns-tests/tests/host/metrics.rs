//! `vipd run`'s Prometheus metrics, scraped with `curl` from a real `vipd run` against a
//! private dockerd of this test's own (so that only its containers count): the services
//! and tasks gauges follow the containers started, reconcile passes are counted, a `dig`
//! shows up in the DNS counters, and on this kernel without IPVS the sandbox errors and
//! the failed reads of the IPVS counters are there too. A port already taken is a startup
//! error naming it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::docker::{private_dockerd, Dockerd, IMAGE};
use crate::common::*;

/// Not the default port (9469): nothing else listens there.
const PORT: u16 = 39469;

/// `vipd run` in dockerd's namespace serving metrics on [`PORT`], killed when dropped
/// (its log shown if the test failed).
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn start(d: &Dockerd, state: &Path) -> Self {
        let log = state.with_extension("log");
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new("nsenter")
            .arg(format!("--net={}", d.netns))
            .arg(vipd())
            .args(["run", "--no-ingress", "--resync-interval", "2"])
            .args(["--metrics-listen", &format!("127.0.0.1:{PORT}")])
            .arg("--state-dir")
            .arg(state)
            .arg("--admin-socket")
            .arg(state.join("vipd.sock"))
            .env("DOCKER_HOST", &d.host)
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

/// `curl` of `path` on the metrics port, from dockerd's namespace: (HTTP code, content
/// type, body).
fn curl(d: &Dockerd, path: &str) -> (String, String, String) {
    let net = format!("--net={}", d.netns);
    let url = format!("http://127.0.0.1:{PORT}{path}");
    let out = output(&[
        "nsenter",
        &net,
        "curl",
        "-s",
        "--max-time",
        "20",
        "-w",
        "\n%{http_code} %{content_type}",
        &url,
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, last) = text.rsplit_once('\n').unwrap_or(("", &text));
    let (code, content_type) = last.split_once(' ').unwrap_or((last, ""));
    (code.to_owned(), content_type.to_owned(), body.to_owned())
}

/// The value of the sample `series` (name and labels as printed) in a scrape.
fn value(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
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
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn vipd_run_serves_metrics_of_its_services_tasks_passes_dns_and_errors() {
    require_root();
    let d = private_dockerd();
    let net = d.network("vmetrics", &[]);
    let state = std::env::temp_dir().join(unique("vipd-host-metrics-"));
    let agent = Agent::start(&d, &state);
    let scrape = || {
        let (code, _, body) = curl(&d, "/metrics");
        (code == "200").then_some(body)
    };
    // Served from the start; the engine counts as connected once vipd listed it.
    wait_for(
        "a scrape after the first listing",
        Duration::from_secs(60),
        || scrape().filter(|s| value(s, "vipd_engine_connected") == Some(1.0)),
    );

    // Started after vipd: their start events make event passes.
    let run = |labels: &[&str]| {
        let mut args = vec!["--network", &net.name];
        for l in labels {
            args.extend(["--label", *l]);
        }
        args.extend([IMAGE, "sleep", "1000"]);
        d.run(&args)
    };
    let _web = [run(&["vipd.service=web"]), run(&["vipd.service=web"])];
    let _db = run(&["vipd.service=db", "vipd.endpoint-mode=dnsrr"]);
    let client = run(&[]);
    let want = [
        ("vipd_services{mode=\"vip\"}", 1.0),
        ("vipd_services{mode=\"dnsrr\"}", 1.0),
        ("vipd_tasks{state=\"serving\"}", 3.0),
        ("vipd_tasks{state=\"draining\"}", 0.0),
    ];
    let s = wait_for(
        "web's 2 tasks and db's 1 in the gauges, 4 sandboxes",
        Duration::from_secs(90),
        || {
            let s = scrape()?;
            let sandboxes = value(&s, "vipd_sandboxes{state=\"in_sync\"}")?
                + value(&s, "vipd_sandboxes{state=\"out_of_sync\"}")?;
            (want.iter().all(|(series, v)| value(&s, series) == Some(*v)) && sandboxes == 4.0).then_some(s)
        },
    );
    let count = |s: &str, series: &str| value(s, series).unwrap_or_else(|| panic!("no {series} in:\n{s}"));
    assert!(
        count(&s, "vipd_reconcile_passes_total{kind=\"resync\"}") >= 1.0,
        "{s}"
    );
    assert!(
        count(&s, "vipd_reconcile_passes_total{kind=\"event\"}") >= 1.0,
        "{s}"
    );
    assert!(
        count(&s, "vipd_reconcile_duration_seconds_count{kind=\"event\"}") >= 1.0,
        "{s}"
    );
    assert!(s.contains("# TYPE vipd_reconcile_operations counter"), "{s}");
    if !kernel_has_ipvs() {
        // Every sandbox fails to program, and no IPVS table can be read.
        assert_eq!(count(&s, "vipd_sandboxes{state=\"in_sync\"}"), 0.0, "{s}");
        assert!(count(&s, "vipd_errors_total{kind=\"sandbox\"}") >= 4.0, "{s}");
        assert!(
            count(&s, "vipd_backend_scrape_namespaces{outcome=\"failed\"}") >= 1.0,
            "{s}"
        );
        assert_eq!(
            count(&s, "vipd_backend_scrape_namespaces{outcome=\"read\"}"),
            0.0,
            "{s}"
        );
    }
    assert_eq!(count(&s, "vipd_errors_total{kind=\"engine\"}"), 0.0, "{s}");

    // A dig from the client over UDP (the fast path) and over TCP (the other one).
    let sandbox = d.docker(&["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", &client.id]);
    let gateway = d.docker(&[
        "network",
        "inspect",
        "-f",
        "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
        &net.name,
    ]);
    let vip = wait_for("web's VIP over DNS", Duration::from_secs(30), || {
        let ns = format!("--net={sandbox}");
        let at = format!("@{gateway}");
        let out = output(&["nsenter", &ns, "dig", &at, "+tries=1", "+time=2", "+short", "web"]);
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        answer.starts_with("10.253.").then_some(answer)
    });
    let net_arg = format!("--net={sandbox}");
    let at = format!("@{gateway}");
    let tcp = run_dig(&net_arg, &at, &["+tcp", "web"]);
    assert_eq!(tcp, vip);
    let fast = "vipd_dns_queries_total{path=\"fast\",qtype=\"A\",rcode=\"NOERROR\"}";
    let slow = "vipd_dns_queries_total{path=\"slow\",qtype=\"A\",rcode=\"NOERROR\"}";
    let s = wait_for("the digs in the DNS counters", Duration::from_secs(10), || {
        let s = scrape()?;
        (value(&s, fast)? >= 1.0 && value(&s, slow)? >= 1.0).then_some(s)
    });
    assert!(
        count(&s, "vipd_dns_answer_duration_seconds_count{path=\"fast\"}") >= 1.0,
        "{s}"
    );
    let excerpt: Vec<&str> = s
        .lines()
        .filter(|l| !l.starts_with('#') && !l.contains("_bucket"))
        .collect();
    eprintln!("scrape (without buckets):\n{}", excerpt.join("\n"));

    // The content type of OpenMetrics; anything but /metrics is not found.
    let (code, content_type, _) = curl(&d, "/metrics");
    assert_eq!(
        (code.as_str(), content_type.as_str()),
        (
            "200",
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        )
    );
    assert_eq!(curl(&d, "/").0, "404");
    assert!(agent.log().contains("metrics served"), "{}", agent.log());

    // Another vipd cannot take the same address: a startup error that names it.
    let other = std::env::temp_dir().join(unique("vipd-host-metrics-2-"));
    let out = Command::new("timeout")
        .arg("60")
        .arg("nsenter")
        .arg(format!("--net={}", d.netns))
        .arg(vipd())
        .args(["run", "--no-ingress", "--no-dns"])
        .args(["--metrics-listen", &format!("127.0.0.1:{PORT}")])
        .arg("--state-dir")
        .arg(&other)
        .arg("--admin-socket")
        .arg(other.join("vipd.sock"))
        .env("DOCKER_HOST", &d.host)
        .stdin(Stdio::null())
        .output()
        .expect("run a second vipd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot serve metrics on 127.0.0.1:{PORT}: ")),
        "{stderr}"
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_dir_all(&other);
}

/// `dig SERVER +short ARGS` in the namespace `net` (`--net=...`), trimmed.
fn run_dig(net: &str, server: &str, args: &[&str]) -> String {
    let mut all = vec!["nsenter", net, "dig", server, "+tries=1", "+time=5", "+short"];
    all.extend_from_slice(args);
    run(&all).trim().to_owned()
}
