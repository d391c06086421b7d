//! The IPVS table of one network namespace, behind a narrow trait.
//!
//! - [`codec`]: pure conversion between [`crate::core::ipvs`] values and IPVS generic
//!   netlink messages (neli types), unit tested against bytes captured from `ipvsadm`.
//! - [`netlink`]: the real table, over a generic netlink socket opened in the calling
//!   thread's network namespace.
//! - [`fake`]: a stateful in-memory table that refuses what the kernel refuses.

pub mod codec;
pub mod fake;
pub mod netlink;

use crate::core::ipvs::{Destination, IpvsOp, ServiceKey, Timeouts, VirtualService};

/// Errors from an IPVS table.
#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    /// The kernel has no IPVS (the generic netlink family "IPVS" does not exist).
    #[error("this kernel has no IPVS: the generic netlink family \"IPVS\" was not found (load the ip_vs module, or use a kernel built with CONFIG_IP_VS)")]
    Unavailable,
    /// The kernel refused an operation.
    #[error("kernel refused `{op}`: {message} (errno {errno})")]
    Kernel { op: String, errno: i32, message: String },
    /// A message from the kernel could not be understood.
    #[error("cannot decode IPVS message: {0}")]
    Decode(String),
    /// A request could not be built.
    #[error("cannot encode IPVS message: {0}")]
    Encode(String),
    /// The socket failed.
    #[error("IPVS netlink socket: {0}")]
    Socket(String),
}

impl IpvsError {
    /// A kernel refusal of `op` with the (positive) `errno`, described as `strerror` would.
    pub fn kernel(op: impl Into<String>, errno: i32) -> Self {
        IpvsError::Kernel {
            op: op.into(),
            errno,
            message: nix::errno::Errno::from_raw(errno).desc().to_owned(),
        }
    }

    /// The errno the kernel answered with, if this is a kernel refusal.
    pub fn errno(&self) -> Option<i32> {
        match self {
            IpvsError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// One namespace's IPVS table.
pub trait IpvsTable {
    /// Every virtual service in the table, vipd's and foreign ones.
    fn services(&mut self) -> Result<Vec<VirtualService>, IpvsError>;

    /// The destinations of one service.
    fn destinations(&mut self, service: &ServiceKey) -> Result<Vec<Destination>, IpvsError>;

    /// The table's tcp / tcpfin / udp timeouts.
    fn timeouts(&mut self) -> Result<Timeouts, IpvsError>;

    /// Carry out one operation.
    fn apply(&mut self, op: &IpvsOp) -> Result<(), IpvsError>;

    /// Carry out operations in order, stopping at the first error. Returns how many were
    /// done. Adapters may batch; the result must equal applying them one by one.
    fn apply_all(&mut self, ops: &[IpvsOp]) -> Result<usize, (usize, IpvsError)> {
        for (i, op) in ops.iter().enumerate() {
            self.apply(op).map_err(|e| (i, e))?;
        }
        Ok(ops.len())
    }
}
