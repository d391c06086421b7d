//! Host namespace tests: run as root on a kernel with namespaces and iptables, without
//! IPVS. Real `iptables-restore`/`iptables-save` in fresh namespaces; IPVS is the
//! stateful fake here (the VM suite has the real one).

#[path = "../common/mod.rs"]
mod common;

mod agent;
mod cli;
mod cluster_agent;
mod cluster_net;
mod dns;
mod docker;
mod firewall;
mod ingress;
mod metrics;
mod overlay;
mod services;
mod store;
