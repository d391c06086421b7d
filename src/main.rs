//! The `vipd` command line: the edge where errors become messages and exit codes.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use vipd::core::plan::SysctlSettings;
use vipd::core::spec;
use vipd::netns::{self, NetnsPath};

/// How `vipd` ended, as its exit status tells it (README, "Exit codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// 0: done.
    Ok = 0,
    /// 1: anything else (the kernel refused, a file could not be written, ...).
    Failure = 1,
    /// 2: a bad flag, config file, value or services file: running it again as it is
    /// cannot succeed (clap exits 2 for a bad command line too).
    BadInput = 2,
    /// 3: the Docker engine's endpoint is one vipd cannot use. An engine that does not
    /// answer yet is waited for, not an exit.
    EngineUnreachable = 3,
    /// 4: the kernel has no IPVS.
    NoIpvs = 4,
}

impl Exit {
    /// The exit status of an error: the first cause in its chain that says.
    fn of(error: &anyhow::Error) -> Exit {
        for cause in error.chain() {
            if cause.is::<BadInput>()
                || cause.is::<vipd::config::ConfigError>()
                || cause.is::<spec::SpecError>()
                || cause.is::<vipd::core::alloc::PoolOverlap>()
                || cause.is::<vipd::cluster::subnet::SubnetError>()
            {
                return Exit::BadInput;
            }
            if let Some(vipd::ipvs::IpvsError::Unavailable) = cause.downcast_ref() {
                return Exit::NoIpvs;
            }
            if let Some(vipd::docker::EngineError::BadEndpoint { .. }) = cause.downcast_ref() {
                return Exit::EngineUnreachable;
            }
        }
        Exit::Failure
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit as u8)
    }
}

/// Input vipd cannot use: a flag's value, a file named by a flag. Exits 2.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
struct BadInput(anyhow::Error);

/// `error` as bad input.
fn bad_input(error: impl Into<anyhow::Error>) -> anyhow::Error {
    BadInput(error.into()).into()
}

/// Bail out with a message about bad input.
macro_rules! bail_input {
    ($($arg:tt)*) => {
        return Err(bad_input(anyhow::anyhow!($($arg)*)))
    };
}

/// Kernel-speed service load balancing for Docker containers: a VIP and an IPVS
/// firewall-mark service in every sandbox.
#[derive(Parser)]
#[command(name = "vipd", version)]
struct Cli {
    /// Log what happens (repeat for more detail); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Program a namespace's IPVS services and iptables marks from a services file.
    Apply {
        /// The namespace: a path (e.g. a Docker SandboxKey) or a name under /run/netns.
        #[arg(long)]
        netns: String,
        /// The services file (JSON); `-` reads standard input.
        #[arg(long)]
        file: PathBuf,
        /// Print the operations without changing anything.
        #[arg(long)]
        dry_run: bool,
        /// Override an IPVS sysctl vipd sets in the namespace, e.g. `conn_reuse_mode=1`
        /// (name under net.ipv4.vs). Repeatable.
        #[arg(long = "sysctl", value_name = "NAME=VALUE")]
        sysctls: Vec<String>,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow the Docker engine (DOCKER_HOST, or the default socket) and give every
    /// service a VIP in every container that shares a network with it.
    Run(Box<RunArgs>),
    /// What the running `vipd run` knows: services, their VIPs, fwmarks, tasks and
    /// errors; with --sandboxes, each sandbox and whether it is in sync.
    Status {
        /// List the sandboxes instead of the services.
        #[arg(long)]
        sandboxes: bool,
        /// Print everything as JSON.
        #[arg(long)]
        json: bool,
        /// The admin socket of the vipd to ask.
        #[arg(long, default_value = vipd::admin::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Define services on the command line (on this host, or cluster-wide with --etcd):
    /// a definition wins over the labels of the service's tasks.
    Service {
        #[command(subcommand)]
        action: ServiceAction,
    },
    /// Show vipd's services in a namespace, the way `ipvsadm -Ln` does, with their VIPs.
    Show {
        /// The namespace: a path or a name under /run/netns.
        #[arg(long)]
        netns: String,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ServiceAction {
    /// Define a service; refused if it is defined already. A setting not given takes
    /// the labels' default (vip, rr, nothing published, no named ports).
    Create {
        name: String,
        #[command(flatten)]
        settings: ServiceSettings,
        #[command(flatten)]
        store: DefinitionsAt,
    },
    /// Change the settings given of a defined service; refused if it is not defined.
    Update {
        name: String,
        #[command(flatten)]
        settings: ServiceSettings,
        #[command(flatten)]
        store: DefinitionsAt,
    },
    /// Delete a service's definition (its labelled tasks stay a service by their labels).
    Rm {
        name: String,
        #[command(flatten)]
        store: DefinitionsAt,
    },
    /// List the defined services.
    Ls {
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: DefinitionsAt,
    },
}

/// The settings of `vipd service create|update`, as the labels take them.
#[derive(clap::Args)]
struct ServiceSettings {
    /// `vip` (a VIP balanced by IPVS) or `dnsrr` (DNS answers every task).
    #[arg(long, value_name = "vip|dnsrr")]
    endpoint_mode: Option<String>,
    /// Publish a port on every host's routing mesh: PUBLISHED:TARGET[/tcp|/udp].
    /// Repeatable; replaces the ports published before.
    #[arg(long, value_name = "PUBLISHED:TARGET[/PROTO]")]
    publish: Vec<String>,
    /// Publish nothing (drops the published ports).
    #[arg(long, conflicts_with = "publish")]
    no_publish: bool,
    /// The IPVS scheduler: rr, wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq, fo, ovf, mh.
    #[arg(long)]
    scheduler: Option<String>,
    /// A named port, for SRV records `_NAME._PROTO.SERVICE`: NAME=PORT[/tcp|/udp|/sctp].
    /// Repeatable; replaces the ports named before.
    #[arg(long = "port", value_name = "NAME=PORT[/PROTO]")]
    ports: Vec<String>,
    /// Name no ports (drops the named ports).
    #[arg(long, conflicts_with = "ports")]
    no_ports: bool,
}

impl ServiceSettings {
    fn settings(self) -> vipd::services::Settings {
        let list = |given: Vec<String>, none: bool| (none || !given.is_empty()).then_some(given);
        vipd::services::Settings {
            endpoint_mode: self.endpoint_mode,
            scheduler: self.scheduler,
            publish: list(self.publish, self.no_publish),
            ports: list(self.ports, self.no_ports),
        }
    }
}

/// Where `vipd service` keeps the definitions.
#[derive(clap::Args)]
struct DefinitionsAt {
    /// The state directory of this host's vipd (`vipd run --state-dir`), without --etcd.
    #[arg(long, default_value = "/var/lib/vipd")]
    state_dir: PathBuf,
    /// The cluster's etcd (`vipd run --etcd`): the definition is the whole cluster's.
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
    etcd: Vec<String>,
}

/// `vipd service ...`: change or list the definitions, in the state directory's file or
/// in the cluster store. A running `vipd run` takes a change on its next sync: the next
/// Docker event or the periodic resync (--resync-interval), whichever comes first; every
/// node of a cluster at once (it watches the store).
fn service_command(action: ServiceAction) -> Result<()> {
    use vipd::services::{self, DefinitionError, DefinitionStore};
    let store_at = match &action {
        ServiceAction::Create { store, .. }
        | ServiceAction::Update { store, .. }
        | ServiceAction::Rm { store, .. }
        | ServiceAction::Ls { store, .. } => (store.state_dir.clone(), store.etcd.clone()),
    };
    let name = |n: &str| vipd::core::model::ServiceName::new(n).map_err(bad_input);
    let input = |e: DefinitionError| {
        if e.is_bad_input() {
            bad_input(e)
        } else {
            e.into()
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store: Box<dyn DefinitionStore> = match store_at {
            (dir, etcd) if etcd.is_empty() => Box::new(services::FileDefinitions::new(&dir)),
            (_, etcd) => {
                let config = vipd::store::etcd::EtcdConfig::new(etcd);
                let kv = vipd::store::etcd::EtcdKv::connect(&config)
                    .await
                    .with_context(|| format!("cannot reach etcd at {}", config.endpoints.join(",")))?;
                Box::new(vipd::store::Cluster::new(
                    Arc::new(kv),
                    vipd::store::Keys::default(),
                ))
            }
        };
        match action {
            ServiceAction::Create {
                name: n, settings, ..
            } => {
                let def = services::create(&*store, name(&n)?, &settings.settings())
                    .await
                    .map_err(input)?;
                println!("created service {}", def.name);
            }
            ServiceAction::Update {
                name: n, settings, ..
            } => {
                let def = services::update(&*store, &name(&n)?, &settings.settings())
                    .await
                    .map_err(input)?;
                println!("updated service {}", def.name);
            }
            ServiceAction::Rm { name: n, .. } => {
                let n = name(&n)?;
                services::remove(&*store, &n).await.map_err(input)?;
                println!("removed service {n}");
            }
            ServiceAction::Ls { json, .. } => {
                let defs = store.list().await.map_err(input)?;
                if json {
                    let list: Vec<_> = defs.values().collect();
                    println!("{}", serde_json::to_string_pretty(&list)?);
                } else {
                    print!("{}", services::render(&defs));
                }
            }
        }
        Ok(())
    })
}

// `vipd run`'s settings, boxed in `Command::Run` (the other commands are small). Not a doc
// comment: clap would take it for the command's description.
#[derive(clap::Args)]
struct RunArgs {
    /// A file of `vipd run` settings (TOML, each a flag's long name; see
    /// scripts/vipd.toml); a flag given here wins. Default: /etc/vipd/vipd.toml, when
    /// it exists.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where VIPs come from; must not overlap a Docker network.
    #[arg(long, default_value = vipd::core::alloc::DEFAULT_POOL)]
    vip_pool: String,
    /// Where allocations are kept across restarts.
    #[arg(long, default_value = "/var/lib/vipd")]
    state_dir: PathBuf,
    /// Seconds a service with no task keeps its VIP.
    #[arg(long, default_value_t = 300)]
    grace: u64,
    /// Seconds a task that is being stopped (a kill event) or turned unhealthy stays
    /// a backend at weight 0 while it still runs, so its open connections finish;
    /// then it is removed. A task that dies is removed at once.
    #[arg(long, default_value_t = 30)]
    drain_grace: u64,
    /// IPVS idle timeout of established TCP connections, in seconds, in every
    /// namespace vipd programs (0: the kernel's, 900).
    #[arg(long, default_value_t = 0)]
    ipvs_tcp_timeout: u32,
    /// IPVS timeout of TCP connections after a FIN, in seconds (0: the kernel's, 120).
    #[arg(long, default_value_t = 0)]
    ipvs_tcpfin_timeout: u32,
    /// IPVS timeout of UDP flows, in seconds (0: the kernel's, 300).
    #[arg(long, default_value_t = 0)]
    ipvs_udp_timeout: u32,
    /// Seconds between full re-lists and re-reads of every sandbox.
    #[arg(long, default_value_t = 30)]
    resync_interval: u64,
    /// Serve DNS on ADDR:PORT (UDP and TCP) instead of the Docker networks' gateways.
    /// Repeatable.
    #[arg(long = "dns-listen", value_name = "ADDR:PORT", conflicts_with = "no_dns")]
    dns_listen: Vec<std::net::SocketAddr>,
    /// The port DNS is served on at each Docker bridge network's gateway address
    /// (the default when no --dns-listen is given).
    #[arg(long, default_value_t = 53)]
    dns_port: u16,
    /// Serve no DNS.
    #[arg(long)]
    no_dns: bool,
    /// Also answer `<service>.<domain>` (and every name under it: the domain is
    /// vipd's). On a user network Docker's own resolver answers a compose service's
    /// bare name itself, and relays `web.vipd` to vipd. An empty value: no domain.
    #[arg(long, default_value = "vipd")]
    dns_domain: String,
    /// TTL of DNS answers, in seconds.
    #[arg(long, default_value_t = vipd::dns::catalog::DEFAULT_TTL)]
    dns_ttl: u32,
    /// Override an IPVS sysctl vipd sets in each sandbox (name under net.ipv4.vs).
    #[arg(long = "sysctl", value_name = "NAME=VALUE")]
    sysctls: Vec<String>,
    /// The admin socket `vipd status` asks (root only).
    #[arg(long, default_value = vipd::admin::DEFAULT_SOCKET)]
    admin_socket: PathBuf,
    /// The routing mesh's ingress namespace, a name under /run/netns that vipd
    /// creates and owns.
    #[arg(long, default_value = vipd::ingress::DEFAULT_NETNS_NAME)]
    ingress_netns: String,
    /// The small subnet of the link between the host and the ingress namespace (host
    /// end: its first address, ingress end: its second); must not overlap a Docker
    /// network, a route of this host or the VIP pool.
    #[arg(long, default_value = DEFAULT_INGRESS_SUBNET)]
    ingress_subnet: String,
    /// No routing mesh: `vipd.publish` labels are ignored and no ingress namespace
    /// is made.
    #[arg(long)]
    no_ingress: bool,
    /// Serve Prometheus metrics over HTTP on ADDR:PORT (`GET /metrics`).
    #[arg(long, value_name = "ADDR:PORT", default_value = vipd::metrics::DEFAULT_LISTEN)]
    metrics_listen: std::net::SocketAddr,
    /// Serve no metrics (--metrics-listen is then ignored).
    #[arg(long)]
    no_metrics: bool,
    /// Cluster mode: the etcd members (`http://host:2379`, comma-separated) that make
    /// several Docker hosts one cluster (docs/CLUSTER.md). Without it: one host.
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
    etcd: Vec<String>,
    /// This node's name in the cluster (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// The address other nodes reach this one at (default: the source address of the
    /// default route).
    #[arg(long)]
    node_address: Option<std::net::Ipv4Addr>,
    /// The CA that signed etcd's certificates (PEM); needs vipd built with `tls`.
    #[arg(long, value_name = "FILE")]
    etcd_ca: Option<PathBuf>,
    /// This node's client certificate for etcd (PEM), with --etcd-key.
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// This node's client key for etcd (PEM), with --etcd-cert.
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// The range every node takes a /24 of for its cluster network.
    #[arg(long, default_value = "10.230.0.0/16")]
    cluster_subnet: String,
    /// The Docker network (bridge) vipd creates on each node for the cluster's containers.
    #[arg(long, default_value = "vipd")]
    cluster_network: String,
    /// The UDP port of the VXLAN overlay between nodes (the same on every node).
    #[arg(long, default_value_t = vipd::core::overlay::OverlayConfig::DEFAULT_PORT)]
    vxlan_port: u16,
    /// The VNI of the VXLAN overlay (the same on every node).
    #[arg(long, default_value_t = vipd::core::overlay::OverlayConfig::DEFAULT_VNI)]
    vxlan_vni: u32,
    /// Seconds the node's registration outlives it in etcd (kept alive every third).
    #[arg(long, default_value_t = 10)]
    lease_ttl: u64,
}

fn parse_sysctls(args: &[String]) -> Result<SysctlSettings> {
    parse_sysctl_args(args).map_err(bad_input)
}

fn parse_sysctl_args(args: &[String]) -> Result<SysctlSettings> {
    let mut settings = SysctlSettings::default();
    for arg in args {
        let Some((name, value)) = arg.split_once('=') else {
            bail!("--sysctl {arg:?}: expected NAME=VALUE, e.g. conn_reuse_mode=1");
        };
        let name = name.trim_start_matches("net.ipv4.vs.");
        if !SysctlSettings::valid_name(name) {
            bail!("--sysctl {arg:?}: {name:?} is not a sysctl name under net.ipv4.vs");
        }
        let value: i64 = value
            .parse()
            .with_context(|| format!("--sysctl {arg:?}: {value:?} is not an integer"))?;
        settings.set(name, value);
    }
    Ok(settings)
}

fn read_file(path: &PathBuf) -> Result<String> {
    read_input(path).map_err(bad_input)
}

fn read_input(path: &PathBuf) -> Result<String> {
    if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("--file -: cannot read standard input")
    } else {
        std::fs::read_to_string(path).with_context(|| format!("--file {}: cannot read", path.display()))
    }
}

fn parse_net(text: &str, flag: &str) -> Result<vipd::core::model::Ipv4Net> {
    parse_net_arg(text, flag).map_err(bad_input)
}

fn parse_net_arg(text: &str, flag: &str) -> Result<vipd::core::model::Ipv4Net> {
    let (addr, prefix) = text
        .split_once('/')
        .with_context(|| format!("{flag} {text:?}: expected ADDRESS/PREFIX, e.g. 10.253.0.0/16"))?;
    let addr = addr
        .parse()
        .with_context(|| format!("{flag} {text:?}: {addr:?} is not an IPv4 address"))?;
    let prefix: u8 = prefix
        .parse()
        .with_context(|| format!("{flag} {text:?}: bad prefix length"))?;
    vipd::core::model::Ipv4Net::new(addr, prefix)
        .ok()
        .filter(|n| n.prefix_len() <= 30)
        .with_context(|| format!("{flag} {text:?}: the prefix length must be 0-30"))
}

/// The default subnet of the link to the ingress namespace: next to the default VIP pool,
/// away from Docker's default address pools.
const DEFAULT_INGRESS_SUBNET: &str = "10.254.255.0/30";

/// What `vipd run` was asked to do.
struct RunOptions {
    pool: vipd::core::model::Ipv4Net,
    state_dir: PathBuf,
    grace: u64,
    drain_grace: u64,
    timeouts: Option<vipd::core::ipvs::Timeouts>,
    resync: u64,
    dns_mode: DnsMode,
    dns_domain: Option<String>,
    dns_ttl: u32,
    sysctls: SysctlSettings,
    admin_socket: PathBuf,
    /// The ingress namespace's name and link subnet; `None` without a routing mesh.
    ingress: Option<(String, vipd::core::model::Ipv4Net)>,
    /// Where metrics are served; `None`: no metrics.
    metrics_listen: Option<std::net::SocketAddr>,
    /// Cluster mode; `None`: one host.
    cluster: Option<ClusterOptions>,
}

/// What `vipd run --etcd` was asked to do.
struct ClusterOptions {
    etcd: vipd::store::etcd::EtcdConfig,
    node: vipd::core::model::NodeName,
    address: std::net::Ipv4Addr,
    range: vipd::core::model::Ipv4Net,
    network: String,
    overlay: vipd::core::overlay::OverlayConfig,
    ttl: std::time::Duration,
}

/// The cluster settings of `vipd run`, checked; `None` without `--etcd`.
fn cluster_options(a: &RunArgs) -> Result<Option<ClusterOptions>> {
    if a.etcd.is_empty() {
        return Ok(None);
    }
    let host = match &a.node_name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the host name (give --node-name)")?
            .trim()
            .to_owned(),
    };
    let node = vipd::core::model::NodeName::new(&host)
        .map_err(|e| bad_input(anyhow::anyhow!("--node-name: {e}")))?;
    let address = match a.node_address {
        Some(a) => a,
        None => vipd::agent::underlay::default_source_address()
            .context("finding this node's address (the default route's source); give --node-address")?,
    };
    let range = parse_net(&a.cluster_subnet, "--cluster-subnet")?;
    if range.prefix_len() > vipd::agent::cluster::NODE_PREFIX {
        bail_input!("--cluster-subnet {range}: too small, every node takes a /24 of it");
    }
    let overlay = vipd::core::overlay::OverlayConfig::new(
        vipd::core::overlay::OverlayConfig::DEFAULT_DEVICE,
        a.vxlan_vni,
        a.vxlan_port,
        vipd::core::overlay::OverlayConfig::DEFAULT_MTU,
    )
    .map_err(|e| bad_input(anyhow::anyhow!("--vxlan-vni/--vxlan-port: {e}")))?;
    if a.lease_ttl < 3 {
        bail_input!("--lease-ttl {}: at least 3 seconds", a.lease_ttl);
    }
    if a.etcd_ca.is_none() && a.etcd_cert.is_some() {
        bail_input!("--etcd-cert needs --etcd-ca");
    }
    let mut etcd = vipd::store::etcd::EtcdConfig::new(a.etcd.clone());
    etcd.tls = a.etcd_ca.clone().map(|ca| vipd::store::etcd::TlsFiles {
        ca,
        cert: a.etcd_cert.clone(),
        key: a.etcd_key.clone(),
    });
    if etcd.tls.is_some() && !cfg!(feature = "tls") {
        bail_input!("--etcd-ca: this vipd was built without its `tls` feature (cargo build --features tls)");
    }
    Ok(Some(ClusterOptions {
        etcd,
        node,
        address,
        range,
        network: a.cluster_network.clone(),
        overlay,
        ttl: std::time::Duration::from_secs(a.lease_ttl),
    }))
}

/// Where `vipd run` serves DNS.
enum DnsMode {
    Off,
    /// Each Docker bridge network's gateway, on this port.
    Gateways(u16),
    /// These addresses.
    Listen(Vec<std::net::SocketAddr>),
}

/// Resolves on SIGTERM or ^C.
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
    }
}

/// The Docker engine and its networks. An engine that does not answer yet (vipd started
/// before dockerd, or dockerd restarting) is asked again with a growing delay, up to 30 s,
/// and each failure is logged; `None` when SIGTERM or ^C comes first. An endpoint this
/// client cannot use (a bad `DOCKER_HOST`) is an error at once.
async fn wait_for_engine() -> Result<Option<(Arc<vipd::docker::DockerEngine>, Vec<vipd::docker::NetworkInfo>)>>
{
    use vipd::docker::{DockerEngine, Engine, EngineError};
    let mut delay = std::time::Duration::from_millis(500);
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        let attempt = async {
            let engine = DockerEngine::connect().await?;
            let networks = engine.networks().await?;
            Ok::<_, EngineError>((engine, networks))
        };
        match attempt.await {
            Ok((engine, networks)) => return Ok(Some((Arc::new(engine), networks))),
            Err(e @ EngineError::BadEndpoint { .. }) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "Docker engine not reachable; waiting for it");
                tokio::select! {
                    _ = &mut stop => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(std::time::Duration::from_secs(30));
            }
        }
    }
}

/// The cluster range must be clear of the host's routes and Docker's networks (vipd's
/// own, from an earlier run, aside): a clash is bad input, naming what overlaps.
async fn check_cluster_range(c: &ClusterOptions, networks: &[vipd::docker::NetworkInfo]) -> Result<()> {
    use vipd::cluster::subnet::{check_range, DockerSubnet, OwnObjects};
    let routes = tokio::task::spawn_blocking(vipd::addrs::ipv4_routes_by_device)
        .await?
        .context("listing the host's routes")?;
    let docker: Vec<DockerSubnet> = networks
        .iter()
        .flat_map(|n| {
            n.subnets.iter().filter_map(|(a, p)| {
                vipd::core::model::Ipv4Net::new(*a, *p)
                    .ok()
                    .map(|net| DockerSubnet {
                        network: n.name.clone(),
                        subnet: net.trunc(),
                    })
            })
        })
        .collect();
    let own = OwnObjects {
        vxlan: c.overlay.device.as_str(),
        bridge: vipd::cluster::network::DEFAULT_BRIDGE,
        network: &c.network,
    };
    check_range(c.range, &routes, &docker, &own)?;
    Ok(())
}

async fn run_agent(opts: RunOptions) -> Result<()> {
    let RunOptions {
        pool,
        state_dir,
        grace,
        drain_grace,
        timeouts,
        resync,
        dns_mode,
        dns_domain,
        dns_ttl,
        sysctls,
        admin_socket,
        ingress,
        metrics_listen,
        cluster,
    } = opts;

    let Some((engine, networks)) = wait_for_engine().await? else {
        tracing::info!("stopping before the Docker engine answered");
        return Ok(());
    };
    let others: Vec<(String, vipd::core::model::Ipv4Net)> = networks
        .iter()
        .flat_map(|n| {
            n.subnets.iter().filter_map(|(a, p)| {
                vipd::core::model::Ipv4Net::new(*a, *p)
                    .ok()
                    .map(|net| (format!("Docker network {}", n.name), net))
            })
        })
        .collect();
    vipd::core::alloc::check_pool(pool, &others)?;
    // Docker's bridges have routes too; those were named as networks above.
    let routes: Vec<(String, vipd::core::model::Ipv4Net)> =
        tokio::task::spawn_blocking(vipd::addrs::ipv4_routes)
            .await?
            .context("listing the host's routes")?
            .into_iter()
            .filter(|r| !others.iter().any(|(_, n)| n == r))
            .map(|r| ("a route of this host to".to_owned(), r))
            .collect();
    vipd::core::alloc::check_pool(pool, &routes)?;
    if let Some(c) = &cluster {
        check_cluster_range(c, &networks).await?;
    }

    let ingress = match ingress {
        None => None,
        Some((name, subnet)) => {
            let overlap = |what: &str, net: vipd::core::model::Ipv4Net| {
                vipd::core::alloc::overlaps(subnet, net).then(|| {
                    bad_input(anyhow::anyhow!(
                        "the ingress subnet {subnet} overlaps {what} {net}; choose one that does not (--ingress-subnet)"
                    ))
                })
            };
            if let Some(e) = overlap("the VIP pool", pool) {
                return Err(e);
            }
            for (what, net) in &others {
                if let Some(e) = overlap(what, *net) {
                    return Err(e);
                }
            }
            // Routes inside the subnet through the link vipd made on an earlier run (its
            // connected and local routes) are its own.
            let link_exists = nix::net::if_::if_nametoindex(vipd::ingress::DEFAULT_HOST_IFACE).is_ok();
            let own = |r: &vipd::core::model::Ipv4Net| {
                link_exists && r.prefix_len() >= subnet.prefix_len() && subnet.contains(&r.addr())
            };
            for (what, net) in routes.iter().filter(|(_, r)| !own(r)) {
                if let Some(e) = overlap(what, *net) {
                    return Err(e);
                }
            }
            let cfg = vipd::ingress::IngressConfig {
                netns_name: name,
                subnet,
                host_iface: vipd::ingress::DEFAULT_HOST_IFACE.to_owned(),
                ingress_iface: vipd::ingress::DEFAULT_INGRESS_IFACE.to_owned(),
            };
            let (ingress, changes) = tokio::task::spawn_blocking(move || vipd::ingress::ensure(&cfg))
                .await?
                .context("setting up the ingress namespace")?;
            for change in changes {
                tracing::info!(change = %change, "ingress namespace");
            }
            if !ingress.host_forwarding {
                tracing::warn!("net.ipv4.ip_forward is 0 on this host: published ports cannot reach the tasks until it is 1 (dockerd normally sets it)");
            }
            tracing::info!(netns = %ingress.netns, address = %ingress.ingress_addr, "routing mesh ready");
            Some(vipd::agent::IngressTarget {
                netns: ingress.netns.path().to_owned(),
                link: vipd::core::mesh::IngressLink {
                    addr: ingress.ingress_addr,
                    host_iface: ingress.host_iface.clone(),
                },
            })
        }
    };

    let metrics = match metrics_listen {
        // The kernel's side of the per-backend counters: metrics itself opens no netlink.
        Some(_) => vipd::metrics::Metrics::with_counters(
            Arc::new(vipd::kernel::stats::KernelIpvsCounters),
            vipd::metrics::BACKEND_READ_TIMEOUT,
        ),
        None => vipd::metrics::Metrics::disabled(),
    };
    let dns = match &dns_mode {
        DnsMode::Off => None,
        DnsMode::Gateways(_) => Some(
            vipd::dns::server::CatalogHandle::new(vipd::dns::catalog::Catalog::empty())
                .with_metrics(metrics.clone()),
        ),
        DnsMode::Listen(dns_listen) => {
            let handle = vipd::dns::server::CatalogHandle::new(vipd::dns::catalog::Catalog::empty())
                .with_metrics(metrics.clone());
            let mut allowed = vipd::dns::server::loopback_networks();
            for (_, net) in &others {
                allowed.push(ipnet::IpNet::V4(net.trunc()));
            }
            let config = vipd::dns::server::DnsConfig::new(dns_listen.clone(), allowed);
            let server = vipd::dns::server::DnsServer::bind(config, handle.clone()).await?;
            tracing::info!(listen = ?server.local_addrs(), "DNS serving");
            tokio::spawn(async move {
                if let Err(e) = server.run(std::future::pending()).await {
                    tracing::error!(error = %e, "DNS server stopped");
                }
            });
            Some(handle)
        }
    };

    let ingress_netns = ingress.as_ref().map(|i| i.netns.clone());
    let cfg = vipd::agent::AgentConfig {
        pool,
        state_dir,
        grace: std::time::Duration::from_secs(grace),
        resync: std::time::Duration::from_secs(resync.max(1)),
        debounce: std::time::Duration::from_millis(20),
        sysctls,
        dns_domain,
        dns_ttl,
        ingress,
        drain_grace: std::time::Duration::from_secs(drain_grace),
        timeouts,
        metrics: metrics.clone(),
    };
    let cluster_state_dir = cfg.state_dir.clone();
    let mut agent =
        vipd::agent::Agent::new(engine.clone(), vipd::agent::KernelPorts::real(), cfg, dns.clone())?;
    // The cluster's one DNS address (port 53: `docker run --dns` takes no port), which
    // the containers of every node's slice of the cluster range ask.
    let cluster_dns = cluster.as_ref().filter(|_| dns.is_some()).map(|c| {
        (
            std::net::SocketAddr::from((vipd::cluster::dns_address::DEFAULT_DNS_ADDRESS, 53)),
            ipnet::IpNet::V4(c.range.trunc()),
        )
    });
    if let Some(c) = cluster {
        // Connecting is lazy: an etcd that is not up yet is tried again by the link.
        let kv = vipd::store::etcd::EtcdKv::connect(&c.etcd)
            .await
            .context("the etcd client (--etcd)")?;
        let store = vipd::store::Cluster::new(Arc::new(kv), vipd::store::Keys::default());
        let link = vipd::agent::cluster::ClusterLink::spawn(
            store,
            vipd::agent::cluster::LinkConfig {
                node: c.node.clone(),
                address: c.address.into(),
                range: c.range,
                pool,
                ttl: c.ttl,
                state_dir: cluster_state_dir,
                backoff: vipd::store::Backoff::default(),
            },
        );
        tracing::info!(node = %c.node, address = %c.address, etcd = ?c.etcd.endpoints, "cluster mode");
        // Definitions are the cluster's: those `vipd service --etcd` wrote, as the store's
        // snapshot has them (the state directory's file is this host's alone).
        agent = agent.with_definitions(Arc::new(vipd::services::SnapshotDefinitions::new(
            link.snapshots(),
        )));
        agent.overlay_rules(vipd::agent::OverlayRules {
            config: c.overlay.clone(),
            range: c.range,
            bridge: vipd::cluster::network::DEFAULT_BRIDGE.to_owned(),
        });
        tokio::spawn(vipd::agent::underlay::follow(
            link.subscribe(),
            c.node,
            vipd::agent::underlay::Underlay {
                engine: engine.clone(),
                network: c.network.clone(),
                bridge: vipd::cluster::network::DEFAULT_BRIDGE.to_owned(),
                overlay: c.overlay,
                dns_address: cluster_dns.map(|_| vipd::cluster::dns_address::DEFAULT_DNS_ADDRESS),
                every: std::time::Duration::from_secs(resync.max(1)),
            },
        ));
        agent.join(link, &c.network);
    }
    // DNS on the Docker networks' gateways (unless --dns-listen), and in cluster mode on
    // the cluster's one address too: both follow the networks, and an address not there
    // yet (the cluster bridge's, until the network is made) is tried again every 10 s.
    let gateways = match &dns_mode {
        DnsMode::Gateways(port) => Some(*port),
        _ => None,
    };
    if let Some(catalog) = dns.filter(|_| gateways.is_some() || cluster_dns.is_some()) {
        let mut networks = agent.networks();
        tokio::spawn(async move {
            let mut listeners = vipd::dns::gateways::GatewayDns::new(catalog, None);
            loop {
                let mut plan = match gateways {
                    Some(port) => vipd::dns::gateways::plan(&networks.borrow_and_update(), port),
                    None => vipd::dns::gateways::GatewayPlan {
                        allowed: vipd::dns::server::loopback_networks(),
                        ..Default::default()
                    },
                };
                if let Some((addr, range)) = cluster_dns {
                    plan = plan.also(addr, range);
                }
                listeners.update(plan).await;
                let retry = !listeners.all_served();
                tokio::select! {
                    changed = networks.changed() => if changed.is_err() { break },
                    _ = tokio::time::sleep(std::time::Duration::from_secs(10)), if retry => {}
                }
            }
        });
    }
    let admin = vipd::admin::bind(&admin_socket)?;
    tracing::info!(socket = %admin_socket.display(), "admin socket ready");
    if let Some(listen) = metrics_listen {
        metrics.follow(agent.status(), ingress_netns);
        let server = match vipd::metrics::MetricsServer::bind(listen, metrics).await {
            Ok(server) => server,
            Err(e) => {
                let _ = std::fs::remove_file(&admin_socket);
                return Err(e.into());
            }
        };
        tokio::spawn(server.run(std::future::pending()));
    }
    tokio::spawn(vipd::admin::serve(
        admin,
        admin_socket.clone(),
        agent.status(),
        std::future::pending(),
    ));
    let shutdown = async {
        stop_signal().await;
        tracing::info!("stopping; the kernel state stays as it is");
    };
    let result = agent.run(shutdown).await;
    let _ = std::fs::remove_file(&admin_socket);
    result?;
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => {
            // Checked after the other settings (reported in the order of the flags' help).
            let cluster = cluster_options(&args);
            let RunArgs {
                config: _,
                vip_pool,
                state_dir,
                grace,
                drain_grace,
                ipvs_tcp_timeout,
                ipvs_tcpfin_timeout,
                ipvs_udp_timeout,
                resync_interval,
                dns_listen,
                dns_port,
                no_dns,
                dns_domain,
                dns_ttl,
                sysctls,
                admin_socket,
                ingress_netns,
                ingress_subnet,
                no_ingress,
                metrics_listen,
                no_metrics,
                ..
            } = *args;
            let dns = if no_dns {
                DnsMode::Off
            } else if dns_listen.is_empty() {
                DnsMode::Gateways(dns_port)
            } else {
                DnsMode::Listen(dns_listen)
            };
            let pool = parse_net(&vip_pool, "--vip-pool")?;
            let sysctls = parse_sysctls(&sysctls)?;
            let tools = vipd::tools::init()?;
            tracing::debug!(?tools, "programs found");
            // First, while this is the only thread: every later one inherits the cut.
            let kept = vipd::privileges::drop_unneeded()?;
            tracing::info!(kept = ?kept.effective, bounding_set_cut = kept.bounding_cut, "capabilities dropped");
            if !kept.missing.is_empty() {
                tracing::warn!(missing = ?kept.missing, "started without capabilities vipd needs: programming will fail");
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let ingress = if no_ingress {
                None
            } else {
                if ingress_netns.is_empty() || ingress_netns.contains('/') || ingress_netns.starts_with('.') {
                    bail_input!("--ingress-netns {ingress_netns:?}: expected a name for /run/netns, e.g. vipd_ingress");
                }
                let subnet = parse_net(&ingress_subnet, "--ingress-subnet")?;
                if subnet.addr() != subnet.network() {
                    bail_input!("--ingress-subnet {ingress_subnet:?}: expected a network address, e.g. {DEFAULT_INGRESS_SUBNET}");
                }
                Some((ingress_netns, subnet))
            };
            let cluster = cluster?;
            let timeouts = vipd::core::ipvs::Timeouts {
                tcp: ipvs_tcp_timeout,
                tcp_fin: ipvs_tcpfin_timeout,
                udp: ipvs_udp_timeout,
            };
            rt.block_on(run_agent(RunOptions {
                pool,
                state_dir,
                grace,
                drain_grace,
                timeouts: (timeouts != vipd::core::ipvs::Timeouts::default()).then_some(timeouts),
                resync: resync_interval,
                dns_mode: dns,
                dns_domain: Some(dns_domain).filter(|d| !d.is_empty()),
                dns_ttl,
                sysctls,
                admin_socket,
                ingress,
                metrics_listen: (!no_metrics).then_some(metrics_listen),
                cluster,
            }))?;
        }
        Command::Status {
            sandboxes,
            json,
            socket,
        } => {
            let status = vipd::admin::query(&socket)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else if sandboxes {
                print!("{}", vipd::core::status::render_sandboxes(&status));
            } else {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                print!("{}", vipd::core::status::render_services(&status, now));
            }
        }
        Command::Apply {
            netns: ns,
            file,
            dry_run,
            sysctls,
            json,
        } => {
            let sysctls = parse_sysctls(&sysctls)?;
            let text = read_file(&file)?;
            let spec = spec::parse(&text).with_context(|| format!("--file {}", file.display()))?;
            let ns = NetnsPath::from_arg(&ns);
            netns::check(&ns).context("--netns").map_err(bad_input)?;
            vipd::tools::init()?;
            let outcome = vipd::kernel::reconcile_netns(&ns, &spec, &sysctls, dry_run)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&outcome)?);
            } else {
                for line in outcome.plan.lines() {
                    println!("{line}");
                }
                if dry_run {
                    println!("dry run: {} operations, none applied", outcome.plan.len());
                } else {
                    println!("applied {} operations", outcome.applied);
                }
            }
        }
        Command::Service { action } => service_command(action)?,
        Command::Show { netns: ns, json } => {
            let ns = NetnsPath::from_arg(&ns);
            netns::check(&ns).context("--netns").map_err(bad_input)?;
            vipd::tools::init()?;
            let view = vipd::kernel::inspect_netns(&ns)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print!("{}", vipd::show::render(&view));
            }
        }
    }
    Ok(())
}

/// The settings a config file may hold: every long flag of `vipd run` but `--config`.
fn run_settings() -> Vec<vipd::config::Setting> {
    let cli = Cli::command();
    let run = cli.find_subcommand("run").expect("the run subcommand");
    run.get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?;
            (!matches!(long, "config" | "help" | "verbose" | "version")).then(|| vipd::config::Setting {
                name: long.to_owned(),
                takes_value: a.get_action().takes_values(),
            })
        })
        .collect()
}

/// The command line with the config file's settings added after `run` (for `vipd run`
/// only): `--config FILE`, or the default file when it exists.
fn with_config_file(mut args: Vec<std::ffi::OsString>) -> Result<Vec<std::ffi::OsString>> {
    let text = |a: &std::ffi::OsString| a.to_string_lossy().into_owned();
    let Some(at) = args
        .iter()
        .skip(1)
        .position(|a| !text(a).starts_with('-'))
        .map(|p| p + 1)
        .filter(|p| args[*p] == "run")
    else {
        return Ok(args);
    };
    let after: Vec<String> = args[at + 1..].iter().map(text).collect();
    let (path, required) = match after.iter().position(|a| a == "--config") {
        Some(i) => match after.get(i + 1) {
            Some(p) => (p.clone(), true),
            None => return Ok(args), // clap says what is missing
        },
        None => match after.iter().find_map(|a| a.strip_prefix("--config=")) {
            Some(p) => (p.to_owned(), true),
            None => (vipd::config::DEFAULT_PATH.to_owned(), false),
        },
    };
    let extra =
        vipd::config::flags_from_file(std::path::Path::new(&path), required, &run_settings(), &after)?;
    args.splice(at + 1..at + 1, extra.into_iter().map(Into::into));
    Ok(args)
}

/// Print `error` and give its exit status.
fn failed(error: &anyhow::Error) -> ExitCode {
    eprintln!("vipd: error: {error:#}");
    Exit::of(error).into()
}

fn main() -> ExitCode {
    let args = match with_config_file(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(e) => return failed(&e),
    };
    let cli = Cli::parse_from(args);
    let default = match cli.verbose {
        0 if matches!(cli.command, Command::Run(_)) => "info,hickory_server=warn",
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(cli) {
        Ok(()) => Exit::Ok.into(),
        Err(e) => failed(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_failure_has_its_own_exit_code() {
        let code = |e: anyhow::Error| Exit::of(&e.context("outer context"));
        assert_eq!(
            code(parse_net("10.0.0.0/99", "--vip-pool").unwrap_err()),
            Exit::BadInput
        );
        assert_eq!(code(parse_sysctls(&["x".into()]).unwrap_err()), Exit::BadInput);
        assert_eq!(
            code(read_file(&PathBuf::from("/nonexistent-vipd/s.json")).unwrap_err()),
            Exit::BadInput
        );
        assert_eq!(code(spec::parse("not json").unwrap_err().into()), Exit::BadInput);
        let overlap = vipd::core::alloc::check_pool(
            parse_net("10.0.0.0/16", "--vip-pool").unwrap(),
            &[("Docker network x".into(), parse_net("10.0.1.0/24", "x").unwrap())],
        )
        .unwrap_err();
        assert_eq!(code(overlap.into()), Exit::BadInput);
        let clash = vipd::cluster::subnet::check_range(
            parse_net("10.230.0.0/16", "--cluster-subnet").unwrap(),
            &[vipd::addrs::HostRoute {
                destination: parse_net("10.0.0.0/8", "x").unwrap(),
                device: "eth1".into(),
            }],
            &[],
            &vipd::cluster::subnet::OwnObjects {
                vxlan: "vipd-vx",
                bridge: "vipd0",
                network: "vipd",
            },
        )
        .unwrap_err();
        assert!(
            clash.to_string().contains("the host route via eth1 10.0.0.0/8"),
            "{clash}"
        );
        assert_eq!(code(clash.into()), Exit::BadInput);
        let missing_config = with_config_file(vec![
            "vipd".into(),
            "run".into(),
            "--config".into(),
            "/nonexistent-vipd.toml".into(),
        ]);
        assert_eq!(code(missing_config.unwrap_err()), Exit::BadInput);
        assert_eq!(code(vipd::ipvs::IpvsError::Unavailable.into()), Exit::NoIpvs);
        assert_eq!(
            code(vipd::ipvs::IpvsError::Socket("refused".into()).into()),
            Exit::Failure
        );
        let endpoint = vipd::docker::EngineError::BadEndpoint {
            endpoint: "ssh://host".into(),
            reason: "unsupported".into(),
        };
        assert_eq!(code(endpoint.into()), Exit::EngineUnreachable);
        let unavailable = vipd::docker::EngineError::Unavailable {
            endpoint: "unix:///x".into(),
            reason: "no socket".into(),
        };
        assert_eq!(code(unavailable.into()), Exit::Failure);
        assert_eq!(code(anyhow::anyhow!("the kernel refused")), Exit::Failure);
        assert_eq!(
            [
                Exit::Ok,
                Exit::Failure,
                Exit::BadInput,
                Exit::EngineUnreachable,
                Exit::NoIpvs
            ]
            .map(|e| e as u8),
            [0, 1, 2, 3, 4]
        );
    }

    #[test]
    fn cluster_flags_make_cluster_options_and_without_etcd_there_is_none() {
        let run = |extra: &[&str]| -> RunArgs {
            let mut args = vec!["vipd", "run"];
            args.extend_from_slice(extra);
            let Command::Run(r) = Cli::try_parse_from(args).unwrap().command else {
                panic!("run")
            };
            *r
        };
        assert!(cluster_options(&run(&[])).unwrap().is_none(), "one host");
        let c = cluster_options(&run(&[
            "--etcd",
            "http://10.0.0.10:2379,http://10.0.0.11:2379",
            "--node-name",
            "n1",
            "--node-address",
            "10.0.0.1",
            "--vxlan-port",
            "4800",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(c.etcd.endpoints.len(), 2);
        assert_eq!(
            (c.node.as_str(), c.address.to_string()),
            ("n1", "10.0.0.1".to_owned())
        );
        assert_eq!(
            (c.range.to_string(), c.network.as_str()),
            ("10.230.0.0/16".to_owned(), "vipd")
        );
        assert_eq!((c.overlay.port, c.ttl.as_secs()), (4800, 10));
        let bad = |extra: &[&str]| {
            let mut args = vec![
                "--etcd",
                "http://e:2379",
                "--node-name",
                "n1",
                "--node-address",
                "10.0.0.1",
            ];
            args.extend_from_slice(extra);
            Exit::of(&cluster_options(&run(&args)).err().expect("refused"))
        };
        assert_eq!(bad(&["--cluster-subnet", "10.230.0.0/25"]), Exit::BadInput);
        assert_eq!(bad(&["--vxlan-vni", "0"]), Exit::BadInput);
        assert_eq!(bad(&["--lease-ttl", "1"]), Exit::BadInput);
        let e = cluster_options(&run(&["--etcd", "http://e:2379", "--node-name", "no/slash"])).err();
        assert_eq!(Exit::of(&e.expect("refused")), Exit::BadInput);
        if !cfg!(feature = "tls") {
            assert_eq!(bad(&["--etcd-ca", "/ca.pem"]), Exit::BadInput);
        }
    }

    /// scripts/vipd.toml names every setting, with the flag's default where it has one,
    /// and is a valid config file once uncommented.
    #[test]
    fn the_example_config_lists_every_setting_with_its_default() {
        let example = include_str!("../scripts/vipd.toml");
        let cli = Cli::command();
        let run = cli.find_subcommand("run").unwrap();
        let mut uncommented = String::new();
        for s in run_settings() {
            let prefix = format!("# {} = ", s.name);
            let line = example
                .lines()
                .find(|l| l.starts_with(&prefix))
                .unwrap_or_else(|| panic!("scripts/vipd.toml does not show {}", s.name));
            let value = &line[prefix.len()..];
            let arg = run
                .get_arguments()
                .find(|a| a.get_long() == Some(&s.name))
                .unwrap();
            match arg.get_default_values() {
                [d] if s.takes_value => {
                    let d = d.to_string_lossy();
                    assert!(
                        value == d || value == format!("{d:?}"),
                        "{}: the example says {value}, the default is {d}",
                        s.name
                    );
                }
                _ if !s.takes_value => assert_eq!(value, "false", "{}", s.name),
                _ => {}
            }
            uncommented.push_str(&line[2..]);
            uncommented.push('\n');
        }
        let flags =
            vipd::config::flags_from_text(&uncommented, "scripts/vipd.toml", &run_settings(), &[]).unwrap();
        // The flags it stands for parse (the three DNS ones conflict with each other).
        let mut args = vec!["vipd".to_owned(), "run".to_owned()];
        let mut skip = false;
        for f in flags {
            if f == "--dns-listen" || f == "--no-dns" {
                skip = f == "--dns-listen";
                continue;
            }
            if std::mem::take(&mut skip) {
                continue;
            }
            args.push(f);
        }
        Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    }

    #[test]
    fn a_config_file_adds_only_what_the_command_line_does_not_say() {
        let dir = std::env::temp_dir().join(format!("vipd-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("vipd.toml");
        std::fs::write(&file, "grace = 60\nno-dns = true\nvip-pool = \"10.9.0.0/16\"\n").unwrap();
        let args = |a: &[&str]| -> Vec<std::ffi::OsString> { a.iter().map(Into::into).collect() };
        let f = file.to_str().unwrap();
        let got = with_config_file(args(&["vipd", "-v", "run", "--config", f, "--grace", "5"])).unwrap();
        assert_eq!(
            got,
            args(&[
                "vipd",
                "-v",
                "run",
                "--no-dns",
                "--vip-pool",
                "10.9.0.0/16",
                "--config",
                f,
                "--grace",
                "5"
            ])
        );
        let cli = Cli::try_parse_from(got).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("run")
        };
        let RunArgs { grace, no_dns, .. } = *run;
        assert_eq!((grace, no_dns), (5, true));
        // Other commands do not read it; a missing file asked for is an error.
        let status = args(&["vipd", "status", "--config", f]);
        assert_eq!(with_config_file(status.clone()).unwrap(), status);
        let e = with_config_file(args(&["vipd", "run", "--config", "/nonexistent-vipd.toml"])).unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot read the config file /nonexistent-vipd.toml"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
