//! VM tests: run inside a VM booted with a kernel that has IPVS (`scripts/vm/run.sh`, which
//! `scripts/test.sh` calls). Real IPVS, real iptables, real traffic through the VIP.

#[path = "../common/mod.rs"]
mod common;

mod agent;
mod cluster;
mod cluster_bench;
mod conntrack;
mod datapath;
mod image;
mod ipvs_adapter;
mod quickstart;
mod resilience;
