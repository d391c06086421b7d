//! The pure core: no I/O, no unsafe, tested fast.

pub mod firewall;
pub mod ipvs;
pub mod model;
pub mod plan;
pub mod spec;
