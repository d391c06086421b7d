//! vipd: a VIP and an IPVS firewall-mark service for every Docker service, in every
//! container sandbox that shares a network with it.
//!
//! Layout:
//! - [`core`]: the pure part — model, validation, planning, rule rendering. No I/O.
//! - [`ipvs`], [`firewall`], [`sysctl`], [`addrs`]: the kernel, behind narrow traits, each
//!   with an in-memory fake.
//! - [`docker`]: the Docker engine (bollard), behind a narrow trait with a fake.
//! - [`dns`]: the embedded DNS server: a pure catalog of answers, served by hickory-server.
//! - [`admin`]: the root-only unix socket `vipd status` asks.
//! - [`state`]: where allocations are kept ([`state::AllocationStore`]): on disk, written
//!   atomically, or in memory for tests.
//! - [`netns`]: entering a network namespace on a dedicated thread.
//! - [`kernel`]: the kernel facade: every namespace-entering operation, generic over how a
//!   sandbox is opened (the real namespace, or per-sandbox fakes).
//! - [`reconcile`]: one namespace, from what it has to what it should have.
//! - [`ingress`]: the routing mesh's ingress namespace and its veth link to the host.
//! - [`config`]: the `vipd run` config file, turned into the flags it stands for.
//! - [`metrics`]: Prometheus metrics of `vipd run`: the registry, the scrape of the kernel's
//!   counters through a port ([`kernel::stats`] is the kernel side), the HTTP endpoint (hyper).
//! - [`privileges`]: the capabilities `vipd run` keeps; it drops the others.
//! - [`services`]: services defined with `vipd service`: kept in the state directory or
//!   the cluster store, read by the agent through [`services::DefinitionSource`].
//! - [`tools`]: the programs vipd runs (iptables), found once at start, run with an empty
//!   environment.
//! - [`services`]: services defined with `vipd service` (a file, or the cluster store).
//! - [`store`]: the cluster store: a narrow KV port (etcd, or in memory), the claims made
//!   in transactions, and the list + watch reflector.
//! - [`overlay`]: the VXLAN overlay between cluster nodes, programmed over rtnetlink.
//! - [`cluster`]: the cluster network (the Docker bridge of a node's /24), the subnet
//!   checks, the overlay's firewall rules and the one DNS address of every node.
//!
//! docs/ARCHITECTURE.md tells how these fit together.

pub mod addrs;
pub mod admin;
pub mod agent;
pub mod cluster;
pub mod config;
pub mod core;
pub mod dns;
pub mod docker;
pub mod firewall;
pub mod ingress;
pub mod ipvs;
pub mod kernel;
pub mod metrics;
pub mod netns;
pub mod overlay;
pub mod privileges;
pub mod reconcile;
pub mod services;
pub mod show;
pub mod state;
pub mod store;
pub mod sysctl;
pub mod tools;
