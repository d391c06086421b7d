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

    /// One service, read on its own (exact even while other namespaces change).
    fn get_service(&mut self, key: &ServiceKey) -> Result<Option<VirtualService>, IpvsError>;

    /// [`Self::services`], completed with a read of each of `keys` the listing lacks.
    ///
    /// A listing of a large table can miss an entry while another namespace changes (see
    /// the netlink adapter); the keys the caller acts on are read one by one when absent,
    /// so a decision about them never rests on a missed entry.
    fn services_including(&mut self, keys: &[ServiceKey]) -> Result<Vec<VirtualService>, IpvsError> {
        let mut list = self.services()?;
        let listed: std::collections::BTreeSet<ServiceKey> = list.iter().map(|s| s.key).collect();
        for key in keys.iter().filter(|k| !listed.contains(k)) {
            if let Some(s) = self.get_service(key)? {
                tracing::debug!(service = %key, "an IPVS listing missed a service; read on its own");
                list.push(s);
            }
        }
        Ok(list)
    }

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

#[cfg(test)]
mod tests {
    use super::fake::FakeIpvs;
    use super::*;
    use crate::core::ipvs::ServiceConfig;
    use crate::core::model::{FwMark, Scheduler};

    /// A table whose listing misses one service, as a kernel dump can.
    struct Lossy(FakeIpvs, ServiceKey);

    impl IpvsTable for Lossy {
        fn services(&mut self) -> Result<Vec<VirtualService>, IpvsError> {
            let mut all = self.0.services()?;
            all.retain(|s| s.key != self.1);
            Ok(all)
        }
        fn get_service(&mut self, key: &ServiceKey) -> Result<Option<VirtualService>, IpvsError> {
            self.0.get_service(key)
        }
        fn destinations(&mut self, service: &ServiceKey) -> Result<Vec<Destination>, IpvsError> {
            self.0.destinations(service)
        }
        fn timeouts(&mut self) -> Result<Timeouts, IpvsError> {
            self.0.timeouts()
        }
        fn apply(&mut self, op: &IpvsOp) -> Result<(), IpvsError> {
            self.0.apply(op)
        }
    }

    fn key(mark: u32) -> ServiceKey {
        ServiceKey::fwmark(FwMark::new(mark).unwrap())
    }

    #[test]
    fn a_service_the_listing_missed_is_read_on_its_own_when_asked_for() {
        let mut t = Lossy(FakeIpvs::new(), key(2));
        for m in 1..=3 {
            t.apply(&IpvsOp::AddService {
                key: key(m),
                config: ServiceConfig::new(Scheduler::RoundRobin),
            })
            .unwrap();
        }
        assert_eq!(t.services().unwrap().len(), 2);
        let mut got: Vec<_> = t
            .services_including(&[key(2), key(9)])
            .unwrap()
            .into_iter()
            .map(|s| s.key)
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![key(1), key(2), key(3)],
            "missed one found, absent one not invented"
        );
    }
}
