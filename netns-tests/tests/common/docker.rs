//! One private dockerd for the whole test binary, started on first use with the project's
//! scripts (scripts/docker/): ensure-docker.sh, dockerd-start.sh under a fresh temporary
//! directory, busybox-image.sh. It never touches a system Docker: its socket, state,
//! network namespace and cgroups are its own.
//!
//! It is stopped when the test process ends, however it ends: a guardian process
//! (`setsid sh`) waits for EOF on a pipe whose write end only this process holds, then
//! runs dockerd-stop.sh --purge. No exit hook is needed (and none would run on a panic
//! abort or a signal).
//!
//! A dockerd that cannot start fails every test that needs it, with the reason and the
//! daemon's log tail; nothing is skipped, on CI or elsewhere.

use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};

use super::{require_root, unique};

/// The image busybox-image.sh imports: busybox-static applets, /www/index.html.
pub const IMAGE: &str = "vipd-test/busybox:latest";

/// Seconds any one docker CLI call may take (a hung daemon fails the test, not hangs it).
/// `docker run` takes 11-15 s in the emulated VM, and several times that when the
/// machine is loaded.
const CLI_TIMEOUT_S: &str = "180";

/// The running private dockerd.
pub struct Dockerd {
    /// Everything of it lives here (removed when the test process ends).
    pub dir: PathBuf,
    /// `unix://DIR/docker.sock`, also exported as `DOCKER_HOST` to this process.
    pub host: String,
    /// The network namespace dockerd (its bridges, iptables chains) runs in.
    pub netns: String,
    /// Containers keep running while the daemon is down (`live-restore`).
    live_restore: bool,
    /// Held open for the life of the process: its EOF tells the guardian to stop dockerd.
    _guardian: Mutex<ChildStdin>,
}

static DOCKERD: OnceLock<Result<Dockerd, String>> = OnceLock::new();

/// The shared dockerd, started on first use. Panics (fails the test) if it cannot run.
pub fn dockerd() -> &'static Dockerd {
    match DOCKERD.get_or_init(|| start(true, false)) {
        Ok(d) => d,
        Err(e) => panic!("the private dockerd for the Docker tests could not start:\n{e}"),
    }
}

/// A script of scripts/docker/.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts/docker")
        .join(name)
}

/// A finished command's status and output, for a failure message.
pub fn describe(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A dockerd of the caller's own (not the shared one), for a test that stops and starts
/// it; everything of it is removed when it is dropped.
pub fn private_dockerd() -> Dockerd {
    start(false, false).unwrap_or_else(|e| panic!("a private dockerd could not start:\n{e}"))
}

/// [`private_dockerd`] with `live-restore`: its containers keep running, and serving,
/// while the daemon is stopped and started again.
pub fn private_dockerd_live_restore() -> Dockerd {
    start(false, true).unwrap_or_else(|e| panic!("a private dockerd could not start:\n{e}"))
}

impl Dockerd {
    /// Stop the daemon (SIGTERM, as a host shutdown or `systemctl restart` would); its
    /// containers stop with it. [`Dockerd::start_again`] brings it back on the same state.
    pub fn stop_daemon(&self) {
        let pid = std::fs::read_to_string(self.dir.join("dockerd.pid")).expect("dockerd.pid");
        let pid = pid.trim().to_owned();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let proc = Path::new("/proc").join(&pid);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while proc.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(!proc.exists(), "dockerd {pid} still runs 60 s after SIGTERM");
    }

    /// Start the daemon again on its state, after [`Dockerd::stop_daemon`].
    pub fn start_again(&self) {
        let out = Command::new(script("dockerd-start.sh"))
            .arg(&self.dir)
            .env(
                "VIPD_DOCKERD_LIVE_RESTORE",
                if self.live_restore { "1" } else { "0" },
            )
            .stdin(Stdio::null())
            .output()
            .expect("run dockerd-start.sh");
        assert!(out.status.success(), "dockerd-start.sh: {}", describe(&out));
    }
}

fn start(shared: bool, live_restore: bool) -> Result<Dockerd, String> {
    require_root();
    let t0 = std::time::Instant::now();
    let ensure = Command::new(script("ensure-docker.sh"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ensure-docker.sh: {e}"))?;
    if !ensure.status.success() {
        return Err(format!("ensure-docker.sh failed: {}", describe(&ensure)));
    }

    let dir = std::env::temp_dir().join(unique("vipd-dockerd-"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;

    // The guardian first, so that even a half-started dockerd is cleaned up.
    let mut guardian = Command::new("setsid")
        .args([
            "sh",
            "-c",
            r#"cat >/dev/null; exec "$1" --purge "$2""#,
            "vipd-dockerd-guardian",
        ])
        .arg(script("dockerd-stop.sh"))
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the guardian (setsid sh): {e}"))?;
    let guardian_stdin = guardian.stdin.take().expect("piped stdin");

    let started = Command::new(script("dockerd-start.sh"))
        .arg(&dir)
        .env("VIPD_DOCKERD_LIVE_RESTORE", if live_restore { "1" } else { "0" })
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run dockerd-start.sh: {e}"))?;
    if !started.status.success() {
        return Err(format!(
            "dockerd-start.sh {} failed: {}",
            dir.display(),
            describe(&started)
        ));
    }
    let stdout = String::from_utf8_lossy(&started.stdout);
    let value = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key).map(str::to_owned))
            .ok_or_else(|| format!("no {key} line in dockerd-start.sh's output:\n{stdout}"))
    };
    let host = value("DOCKER_HOST=")?;
    let netns = value("VIPD_DOCKER_NETNS=")?;
    // DockerEngine::connect() reads it; set once, before any test uses the engine.
    if shared {
        std::env::set_var("DOCKER_HOST", &host);
    }
    let t_daemon = t0.elapsed();

    import_busybox(&host)?;
    eprintln!(
        "private dockerd at {host}: ready after {:.1} s, image after {:.1} s",
        t_daemon.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    Ok(Dockerd {
        dir,
        host,
        netns,
        live_restore,
        _guardian: Mutex::new(guardian_stdin),
    })
}

/// [`IMAGE`] into the dockerd at `host` (busybox-image.sh; a no-op when it is there).
pub fn import_busybox(host: &str) -> Result<(), String> {
    let image = Command::new(script("busybox-image.sh"))
        .env("DOCKER_HOST", host)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run busybox-image.sh: {e}"))?;
    if !image.status.success() {
        return Err(format!("busybox-image.sh failed: {}", describe(&image)));
    }
    Ok(())
}

/// The docker client: Debian's, which comes with the daemon (VIPD_DOCKER_CLI overrides).
fn docker_cli() -> String {
    if let Ok(cli) = std::env::var("VIPD_DOCKER_CLI") {
        return cli;
    }
    if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker".to_owned()
    } else {
        "docker".to_owned()
    }
}

/// `docker -H HOST ARGS`, with a timeout; what it did, whatever it was.
pub fn docker_output_at(host: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg(CLI_TIMEOUT_S)
        .arg(docker_cli())
        .args(["-H", host])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run the docker client")
}

/// `docker -H HOST ARGS`, which must succeed; its stdout, trimmed.
pub fn docker_at(host: &str, args: &[&str]) -> String {
    let out = docker_output_at(host, args);
    assert!(
        out.status.success(),
        "`docker -H {host} {}` failed: {}",
        args.join(" "),
        describe(&out)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl Dockerd {
    /// `docker ARGS` against this daemon, with a timeout; what it did, whatever it was.
    pub fn docker_output(&self, args: &[&str]) -> Output {
        docker_output_at(&self.host, args)
    }

    /// `docker ARGS`, which must succeed; its stdout, trimmed.
    pub fn docker(&self, args: &[&str]) -> String {
        docker_at(&self.host, args)
    }

    /// A user-defined bridge network (removed when dropped); `extra` goes to
    /// `docker network create` (e.g. `--subnet`).
    pub fn network(&self, prefix: &str, extra: &[&str]) -> TestNetwork<'_> {
        let name = unique(prefix);
        let mut args = vec!["network", "create"];
        args.extend_from_slice(extra);
        args.push(&name);
        let id = self.docker(&args);
        TestNetwork {
            dockerd: self,
            name,
            id,
        }
    }

    /// `docker create ARGS` (image and command included in ARGS), not started; the
    /// container is removed when dropped. Start it with `docker start`: a start that
    /// outlasts the CLI timeout on a loaded machine still leaves a container to remove.
    pub fn create(&self, args: &[&str]) -> TestContainer<'_> {
        let mut full = vec!["create"];
        full.extend_from_slice(args);
        let id = self.docker(&full);
        assert_eq!(id.len(), 64, "docker create printed no full id: {id:?}");
        TestContainer { dockerd: self, id }
    }

    /// `docker run -d ARGS` (image and command included in ARGS); the container is
    /// removed when dropped.
    pub fn run(&self, args: &[&str]) -> TestContainer<'_> {
        let mut full = vec!["run", "-d"];
        full.extend_from_slice(args);
        let id = self.docker(&full);
        assert_eq!(id.len(), 64, "docker run -d printed no full id: {id:?}");
        TestContainer { dockerd: self, id }
    }
}

/// A network created for one test.
pub struct TestNetwork<'a> {
    dockerd: &'a Dockerd,
    pub name: String,
    pub id: String,
}

impl Drop for TestNetwork<'_> {
    fn drop(&mut self) {
        let _ = self.dockerd.docker_output(&["network", "rm", &self.name]);
    }
}

/// A container started for one test.
pub struct TestContainer<'a> {
    dockerd: &'a Dockerd,
    pub id: String,
}

impl Drop for TestContainer<'_> {
    fn drop(&mut self) {
        let _ = self.dockerd.docker_output(&["rm", "-f", &self.id]);
    }
}

/// Held by every test that runs `vipd run` against the shared dockerd. One `vipd run`
/// programs every sandbox of its engine (and serves one admin socket), so two at once
/// would fight over the same sandboxes: such tests take turns. Other tests still run
/// alongside them.
pub fn one_vipd_run_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
