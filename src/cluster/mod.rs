//! The pieces of cluster mode a node holds on its own host, each a library call the
//! agent makes:
//!
//! - [`subnet`]: the cluster range checked against the host's routes and Docker's
//!   networks, and the addresses of a node's /24 (pure).
//! - [`network`]: the Docker bridge network of the cluster, created or adopted.
//! - [`rules`]: the host's firewall rules for the overlay, as intents of
//!   (config, me, peers) (pure); the iptables backend owns their chains.
//! - [`dns_address`]: the one link-local DNS address on the cluster bridge.

pub mod dns_address;
pub mod network;
pub mod rules;
pub mod subnet;
