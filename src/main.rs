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

fn run(cli: Cli) -> Result<()> {
    match cli.command {
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
