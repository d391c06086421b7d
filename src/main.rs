//! The `vipd` command line: the edge where errors become messages and exit codes.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use vipd::core::plan::SysctlSettings;
use vipd::core::spec;
use vipd::netns::{self, NetnsPath};
use vipd::reconcile;

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
    Run {
        /// Where VIPs come from; must not overlap a Docker network.
        #[arg(long, default_value = vipd::core::alloc::DEFAULT_POOL)]
        vip_pool: String,
        /// Where allocations are kept across restarts.
        #[arg(long, default_value = "/var/lib/vipd")]
        state_dir: PathBuf,
        /// Seconds a service with no task keeps its VIP.
        #[arg(long, default_value_t = 300)]
        grace: u64,
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
        /// Also answer `<service>.<domain>`.
        #[arg(long)]
        dns_domain: Option<String>,
        /// TTL of DNS answers, in seconds.
        #[arg(long, default_value_t = vipd::dns::catalog::DEFAULT_TTL)]
        dns_ttl: u32,
        /// Override an IPVS sysctl vipd sets in each sandbox (name under net.ipv4.vs).
        #[arg(long = "sysctl", value_name = "NAME=VALUE")]
        sysctls: Vec<String>,
        /// The admin socket `vipd status` asks (root only).
        #[arg(long, default_value = vipd::admin::DEFAULT_SOCKET)]
        admin_socket: PathBuf,
    },
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

fn parse_sysctls(args: &[String]) -> Result<SysctlSettings> {
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
    if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("--file -: cannot read standard input")
    } else {
        std::fs::read_to_string(path).with_context(|| format!("--file {}: cannot read", path.display()))
    }
}

fn parse_net(text: &str, flag: &str) -> Result<vipd::core::model::Ipv4Net> {
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
        .filter(|n| n.prefix <= 30)
        .with_context(|| format!("{flag} {text:?}: the prefix length must be 0-30"))
}

/// Where `vipd run` serves DNS.
enum DnsMode {
    Off,
    /// Each Docker bridge network's gateway, on this port.
    Gateways(u16),
    /// These addresses.
    Listen(Vec<std::net::SocketAddr>),
}

#[allow(clippy::too_many_arguments)]
async fn run_agent(
    pool: vipd::core::model::Ipv4Net,
    state_dir: PathBuf,
    grace: u64,
    resync: u64,
    dns_mode: DnsMode,
    dns_domain: Option<String>,
    dns_ttl: u32,
    sysctls: SysctlSettings,
    admin_socket: PathBuf,
) -> Result<()> {
    use std::sync::Arc;
    use vipd::docker::Engine;

    let engine = Arc::new(vipd::docker::DockerEngine::connect().await?);
    let networks = engine.networks().await.context("listing Docker networks")?;
    let others: Vec<(String, vipd::core::model::Ipv4Net)> = networks
        .iter()
        .flat_map(|n| {
            n.subnets.iter().filter_map(|(a, p)| {
                vipd::core::model::Ipv4Net::new(*a, *p).map(|net| (format!("Docker network {}", n.name), net))
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

    let dns = match &dns_mode {
        DnsMode::Off => None,
        DnsMode::Gateways(_) => Some(vipd::dns::server::CatalogHandle::new(
            vipd::dns::catalog::Catalog::empty(),
        )),
        DnsMode::Listen(dns_listen) => {
            let handle = vipd::dns::server::CatalogHandle::new(vipd::dns::catalog::Catalog::empty());
            let mut allowed = vipd::dns::server::loopback_networks();
            for (_, net) in &others {
                allowed.push(format!("{}/{}", net.network().addr, net.prefix).parse()?);
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

    let cfg = vipd::agent::AgentConfig {
        pool,
        state_dir,
        grace: std::time::Duration::from_secs(grace),
        resync: std::time::Duration::from_secs(resync.max(1)),
        debounce: std::time::Duration::from_millis(20),
        sysctls,
        dns_domain,
        dns_ttl,
    };
    let agent = vipd::agent::Agent::new(
        engine,
        Arc::new(vipd::agent::KernelProgrammer::default()),
        cfg,
        dns.clone(),
    )?;
    if let (DnsMode::Gateways(port), Some(catalog)) = (dns_mode, dns) {
        let mut networks = agent.networks();
        tokio::spawn(async move {
            let mut listeners = vipd::dns::gateways::GatewayDns::new(catalog, None);
            loop {
                let plan = vipd::dns::gateways::plan(&networks.borrow_and_update(), port);
                listeners.update(plan).await;
                if networks.changed().await.is_err() {
                    break;
                }
            }
        });
    }
    let admin = vipd::admin::bind(&admin_socket)?;
    tracing::info!(socket = %admin_socket.display(), "admin socket ready");
    tokio::spawn(vipd::admin::serve(
        admin,
        admin_socket.clone(),
        agent.status(),
        std::future::pending(),
    ));
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
        tracing::info!("stopping; the kernel state stays as it is");
    };
    let result = agent.run(shutdown).await;
    let _ = std::fs::remove_file(&admin_socket);
    result?;
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run {
            vip_pool,
            state_dir,
            grace,
            resync_interval,
            dns_listen,
            dns_port,
            no_dns,
            dns_domain,
            dns_ttl,
            sysctls,
            admin_socket,
        } => {
            let dns = if no_dns {
                DnsMode::Off
            } else if dns_listen.is_empty() {
                DnsMode::Gateways(dns_port)
            } else {
                DnsMode::Listen(dns_listen)
            };
            let pool = parse_net(&vip_pool, "--vip-pool")?;
            let sysctls = parse_sysctls(&sysctls)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(run_agent(
                pool,
                state_dir,
                grace,
                resync_interval,
                dns,
                dns_domain,
                dns_ttl,
                sysctls,
                admin_socket,
            ))?;
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
                print!("{}", vipd::core::status::render_services(&status));
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
            netns::check(&ns).context("--netns")?;
            let outcome = reconcile::reconcile_netns(&ns, &spec, &sysctls, dry_run)?;
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
        Command::Show { netns: ns, json } => {
            let ns = NetnsPath::from_arg(&ns);
            netns::check(&ns).context("--netns")?;
            let view = reconcile::inspect_netns(&ns)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print!("{}", vipd::show::render(&view));
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default = match cli.verbose {
        0 if matches!(cli.command, Command::Run { .. }) => "info,hickory_server=warn",
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
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vipd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
