//! Several Docker hosts in one kernel: the scenario the multi-node tests start from.
//!
//! A "fabric" namespace holds a bridge, the underlay switch; nodes 1..n are network
//! namespaces with a veth on it, except node 3, which sits behind a router namespace on an
//! underlay subnet of its own (no shared L2 with nodes 1 and 2: the overlay must work
//! across a router, as flannel's vxlan design does). Per node, started in parallel: one
//! member of a single n-member etcd cluster on the node's underlay address, and a private
//! dockerd inside the node's namespace (scripts/docker/dockerd-start.sh with
//! `VIPD_DOCKER_NETNS_NAME`) with the busybox image imported.
//!
//! [`Cluster::hand_made_network`] then builds what vipd's cluster mode will build itself:
//! the `vipd` bridge network with the node's /24 of 10.230.0.0/16, the DOCKER-USER accept
//! from the VXLAN device, and the overlay through vipd's own `overlay::sync`.
//!
//! Or vipd does it itself: [`Cluster::start_vipd`] runs `vipd run --etcd <every member>`
//! in a node's namespace against its dockerd, with a state dir, admin socket and ingress
//! namespace of its own; [`Cluster::kill_vipd`], [`Cluster::stop_etcd`] and
//! [`Cluster::link_down`] are the faults the walkthrough makes.
//!
//! Everything is torn down when the [`Cluster`] is dropped, also when a test panics:
//! vipds killed (their logs shown on a panic), dockerds stopped and purged (their
//! containers with them), etcd killed, namespaces deleted. Every step is timed and printed: starting dockerds is the slow part of the
//! suite.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vipd::core::model::NodeName;
use vipd::core::overlay::{Node, OverlayConfig};
use vipd::netns::{run_in, NetnsPath};
use vipd::overlay;

use super::docker::{describe, docker_at, docker_output_at, import_busybox, script};
use super::{output, require_root, run, unique, veth, vipd, Netns};

/// The image busybox-image.sh imports into every node's dockerd.
pub const IMAGE: &str = super::docker::IMAGE;
/// The bridge network every node has, under the same name (vipd will create it).
pub const NETWORK: &str = "vipd";
/// Its Linux bridge's name, fixed so that rules can name it.
pub const BRIDGE: &str = "vipd0";
/// The filter chain DOCKER-USER jumps to for overlay traffic. vipd will own a chain of
/// this kind; until its cluster mode exists, the harness adds it by hand.
pub const OVERLAY_CHAIN: &str = "VIPD-OVERLAY";
/// The underlay link of every node.
pub const UPLINK: &str = "up0";
/// The underlay MTU; the overlay and the `vipd` network take 50 bytes less.
const UNDERLAY_MTU: u32 = 1500;
/// How long etcd's members may take to form the cluster.
const ETCD_TIMEOUT: Duration = Duration::from_secs(90);

/// One node: a network namespace with an etcd member and a dockerd in it.
pub struct ClusterNode {
    /// 1-based; also the third octet of its slice of the cluster range.
    pub index: u8,
    /// Its name in the cluster (`node1`, ...).
    pub name: String,
    /// Its address on the underlay (the fabric, or node 3's subnet behind the router).
    pub underlay: Ipv4Addr,
    /// Its network namespace (`/run/netns/NAME`).
    pub netns: Netns,
    /// `unix://.../docker.sock` of its dockerd; empty until the dockerd answers.
    pub docker_host: String,
    /// `http://UNDERLAY:2379`.
    pub etcd_url: String,
    /// Its dockerd's directory (dockerd-start.sh's DIR) and the etcd data dir's parent.
    dir: PathBuf,
    etcd_dir: PathBuf,
    /// The etcd member (behind a lock: it is watched from a thread of its own).
    etcd: Mutex<Option<Child>>,
    /// `vipd run`'s state dir, admin socket and log (appended to across restarts).
    vipd_dir: PathBuf,
    /// Its routing mesh's namespace: a name of its own (the names under /run/netns are
    /// the whole machine's, not the node's).
    ingress: String,
    /// The running `vipd run` and the extra arguments it was started with (a restart
    /// uses them again).
    vipd: Mutex<Option<Child>>,
    vipd_extra: Mutex<Vec<String>>,
}

impl ClusterNode {
    /// `/run/netns/NAME`, for `nsenter --net=` and vipd's `--netns`.
    pub fn netns_path(&self) -> String {
        self.netns.path()
    }

    /// The node's /24 of the cluster range: `10.230.N.0/24`.
    pub fn subnet(&self) -> String {
        format!("10.230.{}.0/24", self.index)
    }

    /// The node as vipd's overlay sees it.
    pub fn overlay_node(&self) -> Node {
        Node {
            name: NodeName::new(&self.name).expect("a valid node name"),
            underlay: self.underlay,
            subnet: self.subnet().parse().expect("a /24"),
        }
    }

    /// `docker ARGS` against this node's dockerd, with a timeout; whatever it did.
    pub fn docker_output(&self, args: &[&str]) -> Output {
        docker_output_at(&self.docker_host, args)
    }

    /// `docker ARGS`, which must succeed; its stdout, trimmed.
    pub fn docker(&self, args: &[&str]) -> String {
        docker_at(&self.docker_host, args)
    }

    /// `docker run -d ARGS` (image and command included); the container's id. It is
    /// removed with the node's dockerd.
    pub fn run_container(&self, args: &[&str]) -> String {
        let mut full = vec!["run", "-d"];
        full.extend_from_slice(args);
        let id = self.docker(&full);
        assert_eq!(id.len(), 64, "docker run -d printed no full id: {id:?}");
        id
    }

    /// A container's address on the `vipd` network.
    pub fn container_ip(&self, id: &str) -> String {
        self.docker(&[
            "inspect",
            "-f",
            &format!("{{{{(index .NetworkSettings.Networks \"{NETWORK}\").IPAddress}}}}"),
            id,
        ])
    }

    /// A container's network namespace (its SandboxKey), for `nsenter --net=` and vipd.
    pub fn sandbox(&self, id: &str) -> String {
        self.docker(&["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", id])
    }

    /// The admin socket of this node's `vipd run`.
    pub fn admin_socket(&self) -> PathBuf {
        self.vipd_dir.join("vipd.sock")
    }

    /// `vipd status --json` of this node's vipd; whatever it did.
    pub fn status_output(&self) -> Output {
        let socket = self.admin_socket();
        let socket = socket.to_str().expect("a UTF-8 path");
        output(&[vipd(), "status", "--json", "--socket", socket])
    }

    /// Whether this node's vipd runs (was started and has not exited).
    pub fn vipd_running(&self) -> bool {
        lock(&self.vipd)
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The last lines of this node's vipd log.
    pub fn vipd_log_tail(&self, lines: usize) -> String {
        log_tail_n(&self.vipd_dir.join("vipd.log"), lines)
    }
}

/// The fabric, the router and the nodes; everything goes when this is dropped.
pub struct Cluster {
    pub nodes: Vec<ClusterNode>,
    /// Each step's name and how long it took, in order.
    timings: Mutex<Vec<(String, Duration)>>,
    // Dropped after the nodes' namespaces (fields drop in declaration order).
    router: Option<Netns>,
    fabric: Netns,
    /// The etcd data dirs (on tmpfs) and dockerd dirs live under here.
    base: PathBuf,
    etcd_base: PathBuf,
    /// One cluster at a time: three dockerds and etcd members take most of the VM's
    /// memory and both its CPUs. Held until everything above is torn down.
    _one_at_a_time: MutexGuard<'static, ()>,
}

/// Held by the one cluster that runs (see [`Cluster::_one_at_a_time`]).
static ONE_CLUSTER: Mutex<()> = Mutex::new(());

/// `nsenter --net=NETNS ARGS`, which must succeed; its stdout. `nsenter --net` and not
/// `ip netns exec`: the latter makes a mount namespace that hides dockerd's mounts.
pub fn exec_in(netns: &str, args: &[&str]) -> String {
    let net = format!("--net={netns}");
    let mut full = vec!["nsenter", &net, "--"];
    full.extend_from_slice(args);
    run(&full)
}

/// `nsenter --net=NETNS ARGS`; whatever it did.
pub fn exec_in_output(netns: &str, args: &[&str]) -> Output {
    let net = format!("--net={netns}");
    let mut full = vec!["nsenter", &net, "--"];
    full.extend_from_slice(args);
    output(&full)
}

/// The underlay address of node `i`: nodes on the fabric in 192.168.230.0/24, node 3 in
/// 172.16.230.0/24 behind the router.
fn underlay_of(i: u8) -> Ipv4Addr {
    if i == 3 {
        Ipv4Addr::new(172, 16, 230, 13)
    } else {
        Ipv4Addr::new(192, 168, 230, 10 + i)
    }
}

impl Cluster {
    /// Fabric, router (with 3 nodes or more), `n` nodes, one etcd cluster, `n` dockerds
    /// with the busybox image. Panics, after tearing down what it made, if any fails.
    pub fn start(n: u8) -> Self {
        require_root();
        assert!((1..=9).contains(&n), "1 to 9 nodes, not {n}");
        // A test that failed while holding it poisons it; the next cluster starts anyway.
        let one_at_a_time = ONE_CLUSTER
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let t0 = Instant::now();
        let base = std::env::temp_dir().join(unique("vcl"));
        // etcd's data on tmpfs: the emulated VM's disk (and fsync) is what makes it slow.
        let etcd_base = Path::new("/dev/shm").join(unique("vcl-etcd"));
        std::fs::create_dir_all(&base).expect("cluster dir");
        std::fs::create_dir_all(&etcd_base).expect("etcd dir");

        let fabric = Netns::new("vcfab");
        fabric.exec(&["ip", "link", "add", "fab", "type", "bridge"]);
        fabric.exec(&["ip", "link", "set", "fab", "up"]);
        let router = (n >= 3).then(|| {
            let router = Netns::new("vcrtr");
            veth(&router, "f0", Some("192.168.230.254/24"), &fabric, "pr");
            fabric.exec(&["ip", "link", "set", "pr", "master", "fab"]);
            router.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            router
        });
        let mut cluster = Cluster {
            nodes: Vec::new(),
            timings: Mutex::new(Vec::new()),
            router,
            fabric,
            base,
            etcd_base,
            _one_at_a_time: one_at_a_time,
        };
        for i in 1..=n {
            let node = cluster.make_node(i);
            cluster.nodes.push(node);
        }
        cluster.step("namespaces and underlay", t0);

        let t = Instant::now();
        cluster.start_etcd();
        // etcd comes up while the dockerds do: both are waits, not work.
        let (etcd, dockerds) = std::thread::scope(|scope| {
            let cluster = &cluster;
            let etcd = scope.spawn(move || {
                let healthy = cluster.wait_etcd();
                cluster.step("etcd cluster healthy (alongside the dockerds)", t);
                healthy
            });
            let dockerds = cluster.start_dockerds();
            let etcd = etcd.join().unwrap_or_else(|_| Err("panicked".into()));
            (etcd, dockerds)
        });
        let mut failures: Vec<String> = etcd.err().into_iter().collect();
        for (node, result) in cluster.nodes.iter_mut().zip(dockerds) {
            match result {
                Ok(host) => node.docker_host = host,
                Err(e) => failures.push(format!("{}: {e}", node.name)),
            }
        }
        assert!(
            failures.is_empty(),
            "cluster start failed:\n{}",
            failures.join("\n")
        );
        cluster.step("dockerds ready and images imported (parallel)", t);
        cluster.step("cluster start in all", t0);
        cluster
    }

    /// Node `i` (1-based).
    pub fn node(&self, i: u8) -> &ClusterNode {
        &self.nodes[usize::from(i - 1)]
    }

    /// `nsenter --net=/run/netns/NODE ARGS` in node `i`, which must succeed; its stdout.
    pub fn exec(&self, i: u8, args: &[&str]) -> String {
        exec_in(&self.node(i).netns_path(), args)
    }

    /// Record (and print) that `what` took since `since`.
    pub fn step(&self, what: &str, since: Instant) {
        let took = since.elapsed();
        eprintln!("cluster: {what}: {:.1} s", took.as_secs_f64());
        lock(&self.timings).push((what.to_owned(), took));
    }

    /// Every step recorded so far, in order.
    pub fn timings(&self) -> Vec<(String, Duration)> {
        lock(&self.timings).clone()
    }

    fn make_node(&self, i: u8) -> ClusterNode {
        let netns = Netns::new(&format!("vcn{i}"));
        let underlay = underlay_of(i);
        let addr = format!("{underlay}/24");
        match &self.router {
            Some(router) if i == 3 => {
                veth(&netns, UPLINK, Some(&addr), router, "n3");
                router.exec(&["ip", "addr", "add", "172.16.230.1/24", "dev", "n3"]);
                netns.exec(&["ip", "route", "add", "default", "via", "172.16.230.1"]);
            }
            _ => {
                let port = format!("p{i}");
                veth(&netns, UPLINK, Some(&addr), &self.fabric, &port);
                self.fabric.exec(&["ip", "link", "set", &port, "master", "fab"]);
                if self.router.is_some() {
                    netns.exec(&["ip", "route", "add", "default", "via", "192.168.230.254"]);
                }
            }
        }
        netns.exec(&["ip", "link", "set", UPLINK, "mtu", &UNDERLAY_MTU.to_string()]);
        ClusterNode {
            index: i,
            name: format!("node{i}"),
            underlay,
            netns,
            docker_host: String::new(),
            etcd_url: format!("http://{underlay}:2379"),
            dir: self.base.join(format!("n{i}")),
            etcd_dir: self.etcd_base.join(format!("n{i}")),
            etcd: Mutex::new(None),
            vipd_dir: self.base.join(format!("vipd{i}")),
            ingress: unique(&format!("vcn{i}ing")),
            vipd: Mutex::new(None),
            vipd_extra: Mutex::new(Vec::new()),
        }
    }

    /// `vipd run --etcd <every member> --node-name nodeN --node-address <underlay>
    /// EXTRA` in node `i`'s namespace against its dockerd: the namespace is the node's
    /// host, where its bridges and their gateways are. DNS and metrics keep their
    /// defaults (each node's namespace has its own addresses and ports); the state dir,
    /// the admin socket and the ingress namespace are the node's own.
    pub fn start_vipd(&self, i: u8, extra: &[&str]) {
        let node = self.node(i);
        *lock(&node.vipd_extra) = extra.iter().map(|a| (*a).to_owned()).collect();
        self.spawn_vipd(node);
    }

    /// Start node `i`'s vipd again, as it was started (same state dir: a restart within
    /// the lease TTL resumes the lease).
    pub fn restart_vipd(&self, i: u8) {
        let node = self.node(i);
        assert!(!node.vipd_running(), "{}'s vipd still runs", node.name);
        self.spawn_vipd(node);
    }

    fn spawn_vipd(&self, node: &ClusterNode) {
        std::fs::create_dir_all(&node.vipd_dir).expect("vipd dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.vipd_dir.join("vipd.log"))
            .expect("vipd log");
        let members: Vec<&str> = self.nodes.iter().map(|n| n.etcd_url.as_str()).collect();
        let child = Command::new("nsenter")
            .arg(format!("--net={}", node.netns.path()))
            .args(["--", vipd(), "run", "-v", "--etcd", &members.join(",")])
            .args(["--node-name", &node.name])
            .args(["--node-address", &node.underlay.to_string()])
            .arg("--state-dir")
            .arg(node.vipd_dir.join("state"))
            .arg("--admin-socket")
            .arg(node.admin_socket())
            .args(["--ingress-netns", &node.ingress])
            .args(lock(&node.vipd_extra).iter())
            .env("DOCKER_HOST", &node.docker_host)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("vipd log"))
            .stderr(log)
            .spawn()
            .expect("start vipd run");
        *lock(&node.vipd) = Some(child);
    }

    /// SIGKILL node `i`'s vipd, as a crash: it cleans nothing up and its lease is left
    /// to run out (or to be resumed by a restart).
    pub fn kill_vipd(&self, i: u8) {
        let node = self.node(i);
        let mut child = lock(&node.vipd)
            .take()
            .unwrap_or_else(|| panic!("{}'s vipd was not started", node.name));
        child.kill().expect("SIGKILL vipd");
        let status = child.wait().expect("wait for vipd");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "{}'s vipd had exited before the kill: {status}\n{}",
            node.name,
            node.vipd_log_tail(30)
        );
    }

    /// Stop node `i`'s etcd member (SIGKILL: a member that is gone, not one that
    /// leaves the cluster).
    pub fn stop_etcd(&self, i: u8) {
        let node = self.node(i);
        if let Some(mut child) = lock(&node.etcd).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Node `i`'s underlay link down: cut off from every other node and from etcd.
    pub fn link_down(&self, i: u8) {
        self.exec(i, &["ip", "link", "set", UPLINK, "down"]);
    }

    /// One etcd member per node, all at once (`--initial-cluster-state new` waits for
    /// the others), with the emulation's timing and no fsync.
    fn start_etcd(&self) {
        let initial: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("{}=http://{}:2380", n.name, n.underlay))
            .collect();
        let initial = initial.join(",");
        let token = unique("vcl-etcd-");
        for node in &self.nodes {
            std::fs::create_dir_all(&node.etcd_dir).expect("etcd dir");
            let log = File::create(node.etcd_dir.join("etcd.log")).expect("etcd log");
            let ip = node.underlay;
            let child = Command::new("nsenter")
                .arg(format!("--net={}", node.netns.path()))
                .args(["--", "etcd", "--name", &node.name, "--data-dir"])
                .arg(node.etcd_dir.join("data"))
                .arg(format!("--listen-peer-urls=http://{ip}:2380"))
                .arg(format!("--initial-advertise-peer-urls=http://{ip}:2380"))
                .arg(format!(
                    "--listen-client-urls=http://{ip}:2379,http://127.0.0.1:2379"
                ))
                .arg(format!("--advertise-client-urls=http://{ip}:2379"))
                .arg(format!("--initial-cluster={initial}"))
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &token])
                .args(["--heartbeat-interval", "250", "--election-timeout", "2500"])
                .arg("--unsafe-no-fsync")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("etcd log"))
                .stderr(log)
                .spawn()
                .expect("cannot start etcd (scripts/setup.sh --deps installs it)");
            *lock(&node.etcd) = Some(child);
        }
    }

    /// Until every member reports healthy and the member list has them all; why not
    /// when a member exits or the time is up.
    fn wait_etcd(&self) -> Result<(), String> {
        let endpoints: Vec<&str> = self.nodes.iter().map(|n| n.etcd_url.as_str()).collect();
        let endpoints = format!("--endpoints={}", endpoints.join(","));
        let deadline = Instant::now() + ETCD_TIMEOUT;
        let first = self.node(1).netns_path();
        loop {
            for node in &self.nodes {
                let exited = lock(&node.etcd)
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                if let Some(status) = exited {
                    return Err(format!(
                        "etcd of {} exited ({status}):\n{}",
                        node.name,
                        log_tail(&node.etcd_dir.join("etcd.log"))
                    ));
                }
            }
            let health = exec_in_output(
                &first,
                &[
                    "etcdctl",
                    &endpoints,
                    "--command-timeout=3s",
                    "endpoint",
                    "health",
                ],
            );
            if health.status.success() {
                let members = exec_in_output(&first, &["etcdctl", &endpoints, "member", "list"]);
                let list = String::from_utf8_lossy(&members.stdout);
                if members.status.success() && list.lines().count() == self.nodes.len() {
                    return Ok(());
                }
                return Err(format!(
                    "not {} members: {}",
                    self.nodes.len(),
                    describe(&members)
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "etcd not healthy after {ETCD_TIMEOUT:?}: {}\nnode1's log:\n{}",
                    describe(&health),
                    log_tail(&self.node(1).etcd_dir.join("etcd.log"))
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Every node's dockerd, in parallel, and the busybox image into each; per node its
    /// DOCKER_HOST or why it failed.
    fn start_dockerds(&self) -> Vec<Result<String, String>> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .nodes
                .iter()
                .map(|node| scope.spawn(move || self.start_dockerd(node)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
                .collect()
        })
    }

    fn start_dockerd(&self, node: &ClusterNode) -> Result<String, String> {
        let t = Instant::now();
        std::fs::create_dir_all(&node.dir).map_err(|e| e.to_string())?;
        let started = Command::new(script("dockerd-start.sh"))
            .arg(&node.dir)
            .env("VIPD_DOCKER_NETNS_NAME", &node.netns.name)
            // Each node's default bridge in a pool of its own, clear of the cluster range.
            .env(
                "VIPD_DOCKER_ADDRESS_POOL",
                format!("base=10.21{}.0.0/16,size=24", node.index),
            )
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run dockerd-start.sh: {e}"))?;
        if !started.status.success() {
            return Err(format!("dockerd-start.sh failed: {}", describe(&started)));
        }
        let stdout = String::from_utf8_lossy(&started.stdout);
        let host = stdout
            .lines()
            .find_map(|l| l.strip_prefix("DOCKER_HOST="))
            .ok_or_else(|| format!("no DOCKER_HOST line in:\n{stdout}"))?
            .to_owned();
        self.step(&format!("{}: dockerd ready", node.name), t);
        import_busybox(&host)?;
        self.step(&format!("{}: dockerd ready and image imported", node.name), t);
        Ok(host)
    }

    /// What vipd's cluster mode will do on every node, by hand for now: the `vipd`
    /// bridge network on the node's /24 (gateway .1, .2 reserved for the ingress
    /// namespace, MTU of the overlay, no masquerade: the cluster range keeps its source
    /// addresses), the DOCKER-USER accept from the VXLAN device to that bridge (Docker's
    /// FORWARD policy drops new flows arriving from the overlay otherwise), and the
    /// VXLAN overlay to every other node through vipd's own `overlay::sync`.
    pub fn hand_made_network(&self, config: &OverlayConfig) {
        let t = Instant::now();
        let mtu = (UNDERLAY_MTU - 50).to_string();
        std::thread::scope(|scope| {
            for node in &self.nodes {
                let mtu = &mtu;
                scope.spawn(move || {
                    let i = node.index;
                    node.docker(&[
                        "network",
                        "create",
                        "-d",
                        "bridge",
                        "--subnet",
                        &node.subnet(),
                        "--gateway",
                        &format!("10.230.{i}.1"),
                        "--aux-address",
                        &format!("vipd-ingress=10.230.{i}.2"),
                        "-o",
                        &format!("com.docker.network.bridge.name={BRIDGE}"),
                        "-o",
                        &format!("com.docker.network.driver.mtu={mtu}"),
                        "-o",
                        "com.docker.network.bridge.enable_ip_masquerade=false",
                        NETWORK,
                    ]);
                });
            }
        });
        self.step("vipd network created on every node (parallel)", t);

        let t = Instant::now();
        for node in &self.nodes {
            let me = node.overlay_node();
            let peers: Vec<Node> = self
                .nodes
                .iter()
                .filter(|p| p.index != node.index)
                .map(ClusterNode::overlay_node)
                .collect();
            run_in(&NetnsPath::from_arg(&node.netns.name), || {
                overlay::sync(config, &me, &peers)
            })
            .expect("enter the node's namespace")
            .unwrap_or_else(|e| panic!("overlay sync on {} failed: {e}", node.name));

            // The chain vipd will own; added by hand until vipd's cluster mode does it.
            // Docker never edits DOCKER-USER's rules, and only RETURNs from it.
            let device = config.device.as_str();
            let ns = node.netns_path();
            exec_in(&ns, &["iptables", "-N", OVERLAY_CHAIN]);
            exec_in(
                &ns,
                &[
                    "iptables",
                    "-A",
                    OVERLAY_CHAIN,
                    "-i",
                    device,
                    "-o",
                    BRIDGE,
                    "-j",
                    "ACCEPT",
                ],
            );
            exec_in(&ns, &["iptables", "-I", "DOCKER-USER", "-j", OVERLAY_CHAIN]);
        }
        self.step("overlay synced and DOCKER-USER accept on every node", t);
    }
}

/// A lock whose holder may have panicked: teardown must go on regardless.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn log_tail(path: &Path) -> String {
    log_tail_n(path, 30)
}

fn log_tail_n(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let t = Instant::now();
        // vipds first: they would follow the dockerds' teardown. Their logs on a panic.
        for node in &self.nodes {
            if let Some(mut child) = lock(&node.vipd).take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            if std::thread::panicking() && node.vipd_dir.exists() {
                eprintln!(
                    "--- {}'s vipd log (last lines) ---\n{}",
                    node.name,
                    node.vipd_log_tail(60)
                );
            }
        }
        // Dockerds next (their containers go with them), in parallel: each stop takes
        // seconds in the emulated VM. Then etcd, then the namespaces (fields' drops).
        std::thread::scope(|scope| {
            for node in &self.nodes {
                scope.spawn(move || {
                    let out = Command::new(script("dockerd-stop.sh"))
                        .arg("--purge")
                        .arg(&node.dir)
                        .stdin(Stdio::null())
                        .output();
                    match out {
                        Ok(out) if out.status.success() => {}
                        Ok(out) => eprintln!("cluster: stopping {}'s dockerd: {}", node.name, describe(&out)),
                        Err(e) => eprintln!("cluster: cannot run dockerd-stop.sh: {e}"),
                    }
                });
            }
        });
        for node in &self.nodes {
            if let Some(mut child) = lock(&node.etcd).take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for node in &self.nodes {
            let _ = output(&["ip", "netns", "del", &node.ingress]);
        }
        let _ = std::fs::remove_dir_all(&self.etcd_base);
        let _ = std::fs::remove_dir_all(&self.base);
        eprintln!("cluster: teardown: {:.1} s", t.elapsed().as_secs_f64());
    }
}
