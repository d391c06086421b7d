//! The README's quick start, run as a new user runs it on a fresh host: `scripts/setup.sh
//! --start` (which starts a Docker engine, installs vipd and starts it), then
//! docs/examples/compose.yaml scaled to 5, reached through the published port from the host
//! and by name from a container.
//!
//! The VM's root is the build machine's, read-only, and has no Docker engine running: the
//! script runs in a mount namespace of its own where `/usr/local` and `/etc` are writable
//! overlays, so it installs and starts exactly as on a host (a system dockerd on
//! `/var/run/docker.sock` in the VM's network namespace, vipd with every default). What the
//! two daemons mount (sandboxes, the ingress namespace) lives in that mount namespace; the
//! test reaches it through `/proc/<vipd>/root`. Only the build is not the script's: it
//! installs the vipd the test suite built (`VIPD_BIN`), as compiling under emulation would
//! take most of an hour.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::agent::{ipvs_table, requests, require_ipvs_vm, stdout_in, vip_of, wait_for, Took};
use crate::common::docker::{one_vipd_run_at_a_time, IMAGE};
use crate::common::*;

/// The system engine's socket, as `scripts/setup.sh --start` starts it.
const SYSTEM_DOCKER: &str = "unix:///var/run/docker.sock";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `docker ARGS` against the system engine; its trimmed stdout, which must be a success.
fn docker(args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg("300")
        .arg("/usr/bin/docker")
        .args(args)
        .env("DOCKER_HOST", SYSTEM_DOCKER)
        .stdin(Stdio::null())
        .output()
        .expect("run docker");
    assert!(out.status.success(), "docker {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The pid in a pid file, if the process runs.
fn running_pid(pidfile: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// What `scripts/setup.sh --start` started: vipd, then dockerd, stopped when dropped (vipd
/// and dockerd logs shown when the test failed), and docker0 removed.
struct StartedHost;

impl StartedHost {
    fn vipd_pid(&self) -> u32 {
        running_pid("/run/vipd.pid").expect("vipd, started by setup.sh, runs (/run/vipd.pid)")
    }

    /// `path` as vipd's mount namespace sees it.
    fn theirs(&self, path: &str) -> String {
        format!("/proc/{}/root{path}", self.vipd_pid())
    }
}

impl Drop for StartedHost {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in ["/var/log/vipd.log", "/var/log/dockerd.log"] {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                eprintln!("--- {log} (last lines) ---");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        for pidfile in ["/run/vipd.pid", "/var/run/docker.pid"] {
            if let Some(pid) = running_pid(pidfile) {
                let _ = output(&["kill", "-TERM", &pid.to_string()]);
                for _ in 0..300 {
                    if running_pid(pidfile) != Some(pid) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        let _ = output(&["ip", "link", "del", "docker0"]);
    }
}

/// A docker compose project of the given file, taken down (`down -t 1`) when dropped.
struct ComposeProject {
    host: String,
    file: PathBuf,
    name: String,
}

impl ComposeProject {
    /// `timeout LIMIT docker-compose -f FILE -p NAME ARGS`, against `host`, with `IMAGE`
    /// set to the test image.
    fn command(&self, limit: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("timeout");
        cmd.arg(limit)
            .arg("docker-compose")
            .arg("-f")
            .arg(&self.file)
            .args(["-p", &self.name])
            .args(args)
            .env("DOCKER_HOST", &self.host)
            .env("IMAGE", IMAGE)
            // Container creation takes seconds each under emulation.
            .env("COMPOSE_HTTP_TIMEOUT", "600")
            .stdin(Stdio::null());
        cmd
    }

    /// `docker-compose ... ARGS`, which must succeed; its stdout.
    fn run(&self, args: &[&str]) -> String {
        let out = self
            .command("900", args)
            .output()
            .expect("run docker-compose (scripts/docker/ensure-docker.sh installs it)");
        assert!(
            out.status.success(),
            "docker-compose {}: {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for ComposeProject {
    fn drop(&mut self) {
        let _ = self.command("300", &["down", "-t", "1"]).output();
    }
}

/// README, Quick start: `scripts/setup.sh --start`; `docker-compose up --scale web=5` of
/// docs/examples/compose.yaml, whose web service has one `vipd.publish` label and no
/// `ports:`; 50 requests from the host to the published port land 10 on each task; the
/// file's client reaches `http://web.vipd/` through the VIP (Docker's resolver relays the
/// name to vipd's DNS on the gateway), 2 requests on each task; `vipd status` shows the
/// service; `down` leaves nothing of the mesh.
#[test]
fn setup_start_then_the_compose_quick_start_reaches_web_by_port_and_by_name() {
    let _turn = one_vipd_run_at_a_time();
    let _took = Took::new();
    require_ipvs_vm();
    assert!(
        running_pid("/var/run/docker.pid").is_none() && running_pid("/run/vipd.pid").is_none(),
        "a system dockerd or vipd already runs in the VM"
    );

    // The one command, on a "fresh host".
    let fresh_host = r#"set -e
w=$(mktemp -d)
mount -t tmpfs vipd-quickstart "$w"
for d in /usr/local /etc; do
  n=${d//\//_}
  mkdir -p "$w/$n.upper" "$w/$n.work"
  mount -t overlay -o "lowerdir=$d,upperdir=$w/$n.upper,workdir=$w/$n.work" vipd-quickstart "$d"
done
exec scripts/setup.sh --start"#;
    let started = StartedHost;
    let setup = Command::new("timeout")
        .args(["600", "unshare", "--mount", "--propagation", "private"])
        .args(["bash", "-c", fresh_host])
        .current_dir(repo())
        .env("VIPD_BIN", vipd())
        // The test suite's own dockerd is not the host's engine.
        .env_remove("DOCKER_HOST")
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/setup.sh --start");
    let setup_out = String::from_utf8_lossy(&setup.stdout);
    let setup_err = String::from_utf8_lossy(&setup.stderr);
    eprintln!("scripts/setup.sh --start:\n{setup_out}{setup_err}");
    assert!(setup.status.success(), "scripts/setup.sh --start failed");
    assert!(
        setup_err.contains("starting dockerd") && setup_err.contains("vipd run started"),
        "setup.sh started neither dockerd nor vipd"
    );
    // It is the installed vipd, with the installed config, that runs.
    let exe = std::fs::read_link(format!("/proc/{}/exe", started.vipd_pid())).unwrap();
    assert_eq!(exe, Path::new("/usr/local/bin/vipd"));
    assert!(Path::new(&started.theirs("/etc/vipd/vipd.toml")).exists());

    // The README's compose steps (the image: busybox, imported, as nothing can be pulled).
    let import = Command::new(repo().join("scripts/docker/busybox-image.sh"))
        .arg(IMAGE)
        .env("DOCKER_HOST", SYSTEM_DOCKER)
        .output()
        .expect("run busybox-image.sh");
    assert!(import.status.success(), "{import:?}");
    let project = ComposeProject {
        host: SYSTEM_DOCKER.to_owned(),
        file: repo().join("docs/examples/compose.yaml"),
        name: unique("vqs"),
    };
    project.run(&["up", "-d", "--scale", "web=5"]);

    // Through the published port, from the host. Port 80 of each task, as /proc/net/ip_vs
    // shows a destination.
    let ingress = started.theirs("/run/netns/vipd_ingress");
    let tasks_in_ingress = || {
        ipvs_table(&ingress)
            .lines()
            .filter(|l| l.trim_start().starts_with("->") && l.contains(":0050 "))
            .count()
    };
    wait_for("the 5 tasks in the ingress", Duration::from_secs(120), || {
        tasks_in_ingress() == 5
    });
    let host_ns = "/proc/1/ns/net";
    let gateway = docker(&[
        "network",
        "inspect",
        "-f",
        "{{(index .IPAM.Config 0).Gateway}}",
        &format!("{}_front", project.name),
    ]);
    assert_eq!(gateway, "10.79.79.1", "the compose file's network");
    for addr in ["127.0.0.1:8080".to_owned(), format!("{gateway}:8080")] {
        let seen = requests(host_ns, &addr, 50);
        eprintln!("50 requests from the host to {addr}: {seen:?}");
        assert_eq!(seen.len(), 5, "5 tasks answer: {seen:?}");
        assert!(seen.values().all(|&n| n == 10), "{seen:?}");
    }

    // By name, from the client service. Docker's resolver relays `web.vipd` to the file's
    // `dns:` (vipd on the gateway), which answers the VIP; IPVS in the client's sandbox
    // spreads the requests. The client is a task of its own service.
    let client = project.run(&["ps", "-q", "client"]).trim().to_owned();
    let client_ns = format!(
        "/proc/{}/ns/net",
        docker(&["inspect", "-f", "{{.State.Pid}}", &client])
    );
    wait_for(
        "the client's sandbox to hold web's 5 tasks and its own",
        Duration::from_secs(120),
        || {
            ipvs_table(&client_ns)
                .lines()
                .filter(|l| l.contains(" Masq "))
                .count()
                == 6
        },
    );
    let vip = vip_of(&client_ns, "web").expect("web's VIP in the client's sandbox");
    wait_for(
        "web.vipd to resolve in the client",
        Duration::from_secs(60),
        || {
            let out = project
                .command("60", &["exec", "-T", "client", "nslookup", "web.vipd"])
                .output()
                .expect("run docker-compose exec");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.starts_with("Address") && l.trim_end().ends_with(&format!(" {vip}")))
        },
    );
    let pages = project.run(&[
        "exec",
        "-T",
        "client",
        "sh",
        "-c",
        "for i in 1 2 3 4 5 6 7 8 9 10; do wget -qO- http://web.vipd/; done",
    ]);
    let mut by_name: BTreeMap<&str, usize> = BTreeMap::new();
    for page in pages.lines() {
        *by_name.entry(page.trim()).or_default() += 1;
    }
    eprintln!("10 requests to http://web.vipd/ (VIP {vip}) from the client: {by_name:?}");
    assert_eq!(by_name.len(), 5, "5 tasks answer: {by_name:?}");
    assert!(by_name.values().all(|&n| n == 2), "{by_name:?}");

    // `vipd status`, as the README shows it: the default admin socket.
    let status = run(&[&started.theirs("/usr/local/bin/vipd"), "status"]);
    eprintln!("vipd status:\n{status}");
    let web = status.lines().find(|l| l.starts_with("web ")).unwrap_or_default();
    assert!(web.contains(&vip), "{status}");
    assert!(web.ends_with(" 5/5    8080:80/tcp"), "{status}");

    project.run(&["down", "-t", "1"]);
    wait_for("the ingress to empty", Duration::from_secs(120), || {
        stdout_in(&ingress, &["ipvsadm", "-Sn"]).trim().is_empty()
    });
    wait_for("the host's mesh rules to go", Duration::from_secs(30), || {
        !stdout_in(host_ns, &["iptables-save"]).contains("VIPD-")
    });
    drop(project);
    drop(started);
}
