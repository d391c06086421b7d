//! The host's own namespace: vipd's chains there (the routing mesh's DNAT, masquerade and
//! forward rules), and the ports with a socket bound (they cannot be published). Two
//! narrow ports, apart from the sandboxes'.

use std::collections::BTreeSet;

use tracing::info;

use crate::core::firewall::Reassert;
use crate::core::model::PortKey;
use crate::core::rules::Intent;
use crate::ingress::IngressError;
use crate::reconcile::{self, ReconcileError};

/// Why the host could not be programmed or read.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Firewall(#[from] ReconcileError),
    #[error(transparent)]
    Ports(#[from] IngressError),
    /// The blocking task that did the work failed (it panicked).
    #[error("host task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// vipd's chains in the host's namespace.
pub trait HostFirewall: Send + Sync {
    /// Bring them to `rules`; returns how many operations were applied.
    fn program(&self, rules: &[Intent]) -> Result<usize, HostError>;

    /// Why the chains need programming again though their rules are unchanged (Docker
    /// rewrote its own and displaced vipd's jumps); empty when nothing does. By default
    /// none: a host no one else writes rules in.
    fn reassert(&self) -> Result<Vec<Reassert>, HostError> {
        Ok(Vec::new())
    }
}

/// The host's bound ports.
pub trait HostPorts: Send + Sync {
    /// The ports with a socket bound on the host.
    fn bound(&self) -> Result<BTreeSet<PortKey>, HostError>;
}

/// The host's iptables.
#[derive(Debug, Default)]
pub struct IptablesHostFirewall;

impl HostFirewall for IptablesHostFirewall {
    fn program(&self, rules: &[Intent]) -> Result<usize, HostError> {
        let ops = reconcile::host_firewall(&mut crate::firewall::Iptables::default(), rules)?;
        for op in &ops {
            info!(op = %op, "host rule changed");
        }
        Ok(ops.len())
    }

    fn reassert(&self) -> Result<Vec<Reassert>, HostError> {
        Ok(reconcile::host_reassert(
            &mut crate::firewall::Iptables::default(),
        )?)
    }
}

/// The host's `/proc/net` socket tables.
#[derive(Debug, Default)]
pub struct ProcHostPorts;

impl HostPorts for ProcHostPorts {
    fn bound(&self) -> Result<BTreeSet<PortKey>, HostError> {
        Ok(crate::ingress::bound_ports()?.into_iter().collect())
    }
}

/// The host in memory: keeps the rules last programmed, says the ports it is given are
/// bound, and the re-asserts it is given are needed until it is programmed again.
#[derive(Debug, Default)]
pub struct FakeHost {
    pub rules: std::sync::Mutex<Option<Vec<Intent>>>,
    pub bound: std::sync::Mutex<BTreeSet<PortKey>>,
    pub reassert: std::sync::Mutex<Vec<Reassert>>,
    /// How many times it was programmed.
    pub programmed: std::sync::atomic::AtomicUsize,
}

impl HostFirewall for FakeHost {
    fn program(&self, rules: &[Intent]) -> Result<usize, HostError> {
        let mut kept = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        let mut reassert = self.reassert.lock().unwrap_or_else(|e| e.into_inner());
        let ops = if kept.as_deref() == Some(rules) {
            reassert.len()
        } else {
            rules.len()
        };
        reassert.clear();
        *kept = Some(rules.to_vec());
        self.programmed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(ops)
    }

    fn reassert(&self) -> Result<Vec<Reassert>, HostError> {
        Ok(self.reassert.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

impl HostPorts for FakeHost {
    fn bound(&self) -> Result<BTreeSet<PortKey>, HostError> {
        Ok(self.bound.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::Protocol;

    #[test]
    fn the_fake_host_keeps_the_rules_and_says_what_is_bound() {
        let host = FakeHost::default();
        host.bound
            .lock()
            .unwrap()
            .insert(PortKey::new(Protocol::Tcp, 9090));
        assert_eq!(host.bound().unwrap().len(), 1);
        assert_eq!(host.program(&[]).unwrap(), 0);
        assert_eq!(host.rules.lock().unwrap().as_deref(), Some(&[][..]));
    }

    #[test]
    fn the_fake_host_needs_a_reassert_until_it_is_programmed_again() {
        let host = FakeHost::default();
        host.program(&[]).unwrap();
        let displaced = Reassert::Displaced(crate::core::firewall::HOST_OVERLAY_NAT);
        host.reassert.lock().unwrap().push(displaced);
        assert_eq!(host.reassert().unwrap(), [displaced]);
        assert_eq!(host.program(&[]).unwrap(), 1, "the jump moved back");
        assert!(host.reassert().unwrap().is_empty());
        assert_eq!(host.program(&[]).unwrap(), 0, "a second run changes nothing");
    }
}
