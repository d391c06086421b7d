//! The kernel facade: every operation that enters a namespace goes through here.
//!
//! The orchestration of one sandbox (a full read and reconcile, or a change planned
//! against the view kept since the last one, and telling a gone namespace from a failure)
//! is written once, in [`Kernel`], generic over how a sandbox's kernel interfaces are
//! opened ([`SandboxOpener`]): [`NetnsOpener`] enters the namespace and hands out the real
//! IPVS, iptables, sysctl and address ports; [`fake::FakeOpener`] hands out per-sandbox
//! stateful fakes. So tests and `examples/sync_cost.rs` run the production code, not a
//! copy of it. The host's own firewall and its bound ports are separate narrow ports
//! ([`host`]).

pub mod fake;
pub mod host;
pub mod stats;

use std::sync::Arc;

use tracing::info_span;

use crate::addrs::{Addresses, FakeAddrs, RtnetlinkAddrs};
use crate::core::firewall::{self, MarkedService};
use crate::core::model::{Ipv4Net, SandboxKey};
use crate::core::plan::{ObservedSandbox, SysctlSettings};
use crate::core::spec::SandboxSpec;
use crate::firewall::Iptables;
use crate::ipvs::netlink::NetlinkIpvs;
use crate::netns::{self, NetnsPath};
use crate::reconcile::{self, ReconcileError, Sandbox};
use crate::sysctl::ProcSysctls;

pub use host::{FakeHost, HostError, HostFirewall, HostPorts, IptablesHostFirewall, ProcHostPorts};

/// How a sandbox's kernel interfaces are opened.
pub trait SandboxOpener: Send + Sync {
    /// Run `work` with the kernel interfaces of the sandbox `key`. `addrs`: its addresses
    /// if already known (nothing is read then).
    fn with_sandbox<R: Send>(
        &self,
        key: &SandboxKey,
        addrs: Option<Vec<Ipv4Net>>,
        work: impl FnOnce(&mut Sandbox<'_>) -> Result<R, ReconcileError> + Send,
    ) -> Result<R, ReconcileError>;
}

/// The real kernel: a thread inside the namespace, with a netlink socket for IPVS,
/// `iptables-save`/`-restore`, `/proc/sys` and rtnetlink for the addresses.
#[derive(Debug, Clone, Copy, Default)]
pub struct NetnsOpener;

impl NetnsOpener {
    /// [`SandboxOpener::with_sandbox`] for a namespace named by a [`NetnsPath`].
    pub fn enter<R: Send>(
        ns: &NetnsPath,
        addrs: Option<Vec<Ipv4Net>>,
        work: impl FnOnce(&mut Sandbox<'_>) -> Result<R, ReconcileError> + Send,
    ) -> Result<R, ReconcileError> {
        let span = info_span!("sandbox", netns = %ns);
        netns::run_in(ns, || {
            let _enter = span.enter();
            let mut ipvs = NetlinkIpvs::open()?;
            let (mut known, mut read) = (addrs.map(FakeAddrs), RtnetlinkAddrs);
            let mut sb = Sandbox {
                ipvs: &mut ipvs,
                firewall: &mut Iptables::default(),
                sysctls: &mut ProcSysctls::default(),
                addrs: known_or(&mut known, &mut read),
            };
            work(&mut sb)
        })?
    }
}

/// The addresses already `known`, if they are; else `read` reads them.
fn known_or<'a>(known: &'a mut Option<FakeAddrs>, read: &'a mut dyn Addresses) -> &'a mut dyn Addresses {
    match known {
        Some(k) => k,
        None => read,
    }
}

impl SandboxOpener for NetnsOpener {
    fn with_sandbox<R: Send>(
        &self,
        key: &SandboxKey,
        addrs: Option<Vec<Ipv4Net>>,
        work: impl FnOnce(&mut Sandbox<'_>) -> Result<R, ReconcileError> + Send,
    ) -> Result<R, ReconcileError> {
        Self::enter(&NetnsPath::from_arg(&key.to_string()), addrs, work)
    }
}

/// Reconcile the namespace `ns` with the real kernel interfaces (`vipd apply`).
pub fn reconcile_netns(
    ns: &NetnsPath,
    spec: &SandboxSpec,
    sysctls: &SysctlSettings,
    dry_run: bool,
) -> Result<reconcile::Outcome, ReconcileError> {
    NetnsOpener::enter(ns, None, |sb| reconcile::reconcile(sb, spec, sysctls, dry_run))
}

/// Read what vipd holds in the namespace `ns` with the real kernel interfaces (`vipd show`).
pub fn inspect_netns(ns: &NetnsPath) -> Result<reconcile::SandboxView, ReconcileError> {
    NetnsOpener::enter(ns, None, |sb| reconcile::inspect(sb.ipvs, sb.firewall))
}

/// Why a sandbox was not programmed: the kernel's own error, typed, and whether it means the
/// namespace is gone. (Shared, so that a sandbox's record and the sync report can both keep
/// it.)
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProgramError {
    /// Its namespace is gone, or going: no such file, or no longer a namespace (Docker
    /// tears a sandbox down when its container stops, maybe while vipd programs it).
    #[error("the namespace is gone: {0}")]
    Gone(#[source] Arc<ReconcileError>),
    #[error(transparent)]
    Failed(Arc<ReconcileError>),
}

impl ProgramError {
    /// Whether the namespace is gone (see [`ProgramError::Gone`]).
    pub fn is_gone(&self) -> bool {
        matches!(self, ProgramError::Gone(_))
    }
}

impl From<ReconcileError> for ProgramError {
    fn from(e: ReconcileError) -> Self {
        match &e {
            ReconcileError::Netns(n) if n.is_absent() || n.is_not_netns() => ProgramError::Gone(Arc::new(e)),
            _ => ProgramError::Failed(Arc::new(e)),
        }
    }
}

/// What is known of a sandbox since it was last programmed: what its kernel holds, and
/// the spec that brought it there. The agent keeps it in the sandbox's record and hands
/// it back for the next change.
#[derive(Debug, Clone)]
pub struct KernelView {
    pub seen: ObservedSandbox,
    pub spec: Arc<SandboxSpec>,
}

/// What programming a sandbox did.
#[derive(Debug, Clone)]
pub struct Programmed {
    /// Operations applied.
    pub operations: usize,
    /// The sandbox as it is now, to be handed back with the next change.
    pub view: KernelView,
}

/// Programs one sandbox: [`Kernel`] over the real kernel or over fakes; agent tests use
/// recorders.
pub trait SandboxProgrammer: Send + Sync {
    /// Bring `sandbox` to `spec`. With no `kept` view, the sandbox is read from the
    /// kernel first; with one, only the change from its spec is planned against it.
    /// (`spec` is shared: sandboxes on the same networks get the same one.)
    fn program(
        &self,
        sandbox: &SandboxKey,
        spec: &Arc<SandboxSpec>,
        sysctls: &SysctlSettings,
        kept: Option<KernelView>,
    ) -> Result<Programmed, ProgramError>;

    /// The services vipd's rules in `sandbox` describe (name, VIP, fwmark): what the
    /// kernel says was allocated, when the saved allocations are lost.
    fn marked_services(&self, sandbox: &SandboxKey) -> Result<Vec<MarkedService>, ProgramError>;
}

/// The production orchestration of a sandbox over any [`SandboxOpener`]. A full program
/// reads the namespace and reconciles it; otherwise the change from the spec last applied
/// is planned against the kept view ([`reconcile::update`]), so a backend change is a few
/// IPVS messages, and as cheap with many services as with few: no process, no dump.
#[derive(Debug, Default)]
pub struct Kernel<O> {
    opener: O,
    /// Plan the whole spec against the kept view, not the change from the spec last
    /// applied: the baseline `examples/sync_cost.rs` compares with.
    whole: bool,
}

/// The real kernel.
pub type KernelProgrammer = Kernel<NetnsOpener>;

impl<O: SandboxOpener> Kernel<O> {
    pub fn new(opener: O) -> Self {
        Kernel { opener, whole: false }
    }

    /// This kernel, planning every change as the whole spec (a measuring baseline).
    pub fn planning_whole_specs(mut self) -> Self {
        self.whole = true;
        self
    }

    pub fn opener(&self) -> &O {
        &self.opener
    }
}

impl<O: SandboxOpener> SandboxProgrammer for Kernel<O> {
    fn program(
        &self,
        sandbox: &SandboxKey,
        spec: &Arc<SandboxSpec>,
        sysctls: &SysctlSettings,
        kept: Option<KernelView>,
    ) -> Result<Programmed, ProgramError> {
        let outcome = match kept {
            Some(KernelView { mut seen, spec: prev }) => {
                let prev = (!self.whole).then_some(&*prev);
                self.opener
                    .with_sandbox(sandbox, Some(seen.addrs.clone()), |sb| {
                        reconcile::update(sb, &mut seen, prev, spec, sysctls)
                    })
                    .map(|o| (o, seen))
            }
            None => self.opener.with_sandbox(sandbox, None, |sb| {
                let mut seen = reconcile::observe(sb, spec, sysctls)?;
                let outcome = reconcile::update(sb, &mut seen, None, spec, sysctls)?;
                Ok((outcome, seen))
            }),
        };
        // Nothing is kept after an error: the caller reads the kernel again next time.
        let (outcome, seen) = outcome?;
        Ok(Programmed {
            operations: outcome.applied,
            view: KernelView {
                seen,
                spec: Arc::clone(spec),
            },
        })
    }

    fn marked_services(&self, sandbox: &SandboxKey) -> Result<Vec<MarkedService>, ProgramError> {
        let text = self
            .opener
            .with_sandbox(sandbox, None, |sb| Ok(sb.firewall.save()?))?;
        Ok(firewall::parse_save(&text).marked_services())
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeOpener;
    use super::*;
    use crate::core::model::BackendAddr;
    use crate::core::spec;

    fn spec_of(services: usize, backends: usize) -> Arc<SandboxSpec> {
        let svcs: Vec<String> = (0..services)
            .map(|i| {
                let b: Vec<String> = (0..backends)
                    .map(|j| format!(r#"{{"ip":"10.0.0.{}"}}"#, 10 * i + j + 3))
                    .collect();
                format!(
                    r#"{{"name":"s{i}","vip":"10.1.0.{}","fwmark":{},"backends":[{}]}}"#,
                    i + 1,
                    256 + i,
                    b.join(",")
                )
            })
            .collect();
        Arc::new(spec::parse(&format!(r#"{{"services":[{}]}}"#, svcs.join(","))).unwrap())
    }

    fn backends(kernel: &Kernel<FakeOpener>, key: &SandboxKey, fwmark: u32) -> Vec<String> {
        kernel.opener().inspect(key, |k| k.backends(Some(fwmark)))
    }

    #[test]
    fn a_full_program_then_a_change_through_the_fake_opener_leaves_the_kernel_as_the_spec_says() {
        let kernel = Kernel::new(FakeOpener::default());
        let key = SandboxKey::from("/run/docker/netns/claaaaaaaaaa");
        let sysctls = SysctlSettings::default();
        let first = spec_of(2, 2);
        let done = kernel.program(&key, &first, &sysctls, None).unwrap();
        assert!(done.operations > 0);
        assert_eq!(backends(&kernel, &key, 256), ["10.0.0.3@1", "10.0.0.4@1"]);
        let marked = kernel.marked_services(&key).unwrap();
        assert_eq!(marked.len(), 2, "{marked:?}");
        let saves = kernel.opener().inspect(&key, |k| k.firewall.saves);

        // One backend's weight goes to 0: from the kept view, one IPVS message, no read.
        let mut next = (*first).clone();
        next.services[0].backends[1].weight = 0;
        next.services[1].backends[0].addr = BackendAddr::new("10.0.0.99".parse().unwrap());
        let next = Arc::new(next);
        let changed = kernel.program(&key, &next, &sysctls, Some(done.view)).unwrap();
        assert_eq!(changed.operations, 3, "one edit, one removal, one addition");
        assert_eq!(
            kernel.opener().inspect(&key, |k| k.firewall.saves),
            saves,
            "nothing read"
        );
        assert_eq!(backends(&kernel, &key, 256), ["10.0.0.3@1", "10.0.0.4@0"]);
        assert_eq!(backends(&kernel, &key, 257), ["10.0.0.14@1", "10.0.0.99@1"]);
        // A full read finds the kernel as the spec says.
        let again = kernel.program(&key, &next, &sysctls, None).unwrap();
        assert_eq!(again.operations, 0);
    }

    #[test]
    fn a_whole_spec_kernel_plans_everything_but_leaves_the_same_kernel() {
        let kernel = Kernel::new(FakeOpener::default()).planning_whole_specs();
        let key = SandboxKey::from("/run/docker/netns/w1aaaaaaaaaa");
        let sysctls = SysctlSettings::default();
        let done = kernel.program(&key, &spec_of(3, 2), &sysctls, None).unwrap();
        let mut next = (*spec_of(3, 2)).clone();
        next.services[2].backends.pop();
        let next = Arc::new(next);
        let changed = kernel.program(&key, &next, &sysctls, Some(done.view)).unwrap();
        assert_eq!(changed.operations, 1);
        assert_eq!(backends(&kernel, &key, 258), ["10.0.0.23@1"]);
    }

    #[test]
    fn a_gone_namespace_is_the_gone_error_and_other_failures_are_not() {
        let kernel = Kernel::new(FakeOpener::default());
        let key = SandboxKey::from("/run/docker/netns/goneaaaaaaa");
        kernel.opener().remove(&key);
        let err = kernel
            .program(&key, &spec_of(1, 1), &SysctlSettings::default(), None)
            .unwrap_err();
        assert!(matches!(err, ProgramError::Gone(_)), "{err}");
        assert!(matches!(kernel.marked_services(&key), Err(ProgramError::Gone(_))));

        let other = SandboxKey::from("/run/docker/netns/failaaaaaaa");
        kernel.opener().inspect(&other, |k| k.ipvs.fail_next(12));
        let err = kernel
            .program(&other, &spec_of(1, 1), &SysctlSettings::default(), None)
            .unwrap_err();
        assert!(
            matches!(&err, ProgramError::Failed(e) if matches!(**e, ReconcileError::Partial { .. } | ReconcileError::Ipvs(_)) && e.to_string().contains("errno 12")),
            "{err}"
        );
    }
}
