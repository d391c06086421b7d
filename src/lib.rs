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
//! - [`state`]: allocations on disk, written atomically.
//! - [`netns`]: entering a network namespace on a dedicated thread.
//! - [`reconcile`]: one namespace, from what it has to what it should have.
//! - [`ingress`]: the routing mesh's ingress namespace and its veth link to the host.
//! - [`config`]: the `vipd run` config file, turned into the flags it stands for.
//! - [`metrics`]: Prometheus metrics of `vipd run`, and the HTTP endpoint serving them.
//! - [`privileges`]: the capabilities `vipd run` keeps; it drops the others.

pub mod addrs;
pub mod admin;
pub mod agent;
pub mod config;
pub mod core;
pub mod dns;
pub mod docker;
pub mod firewall;
pub mod ingress;
pub mod ipvs;
pub mod metrics;
pub mod netns;
pub mod privileges;
pub mod reconcile;
pub mod show;
pub mod state;
pub mod store;
pub mod sysctl;
