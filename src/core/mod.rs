//! The pure core: no I/O, no unsafe, tested fast.

pub mod alloc;
pub mod containers;
pub mod firewall;
pub mod ipvs;
pub mod labels;
pub mod mesh;
pub mod model;
pub mod overlay;
pub mod plan;
pub mod rules;
pub mod spec;
pub mod status;
pub mod topology;
