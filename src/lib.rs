//! vipd: a VIP and an IPVS firewall-mark service for every Docker service, in every
//! container sandbox that shares a network with it.
//!
//! Layout:
//! - [`core`]: the pure part — model, validation, planning, rule rendering. No I/O.
//! - [`ipvs`], [`firewall`], [`sysctl`], [`addrs`]: the kernel, behind narrow traits, each
//!   with an in-memory fake.
//! - [`netns`]: entering a network namespace on a dedicated thread.
//! - [`reconcile`]: one namespace, from what it has to what it should have.

pub mod addrs;
pub mod core;
pub mod dns;
pub mod docker;
pub mod firewall;
pub mod ipvs;
pub mod netns;
pub mod reconcile;
pub mod show;
pub mod sysctl;
