//! The pure core: no I/O, no unsafe, tested fast.

pub mod ipvs;
pub mod model;
