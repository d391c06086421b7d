//! A [`SandboxOpener`] over in-memory kernels: one set of stateful fakes per sandbox,
//! made on first use, kept across calls as a namespace keeps its state.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use crate::addrs::FakeAddrs;
use crate::core::ipvs::ServiceKey;
use crate::core::model::{FwMark, Ipv4Net, SandboxKey};
use crate::firewall::fake::FakeFirewall;
use crate::ipvs::fake::FakeIpvs;
use crate::netns::{NetnsError, NetnsPath};
use crate::reconcile::{ReconcileError, Sandbox};
use crate::sysctl::FakeSysctls;

use super::SandboxOpener;

/// One sandbox's fake kernel.
#[derive(Debug, Clone, Default)]
pub struct FakeKernel {
    pub ipvs: FakeIpvs,
    pub firewall: FakeFirewall,
    pub sysctls: FakeSysctls,
    pub addrs: FakeAddrs,
}

impl FakeKernel {
    /// The IPVS destinations of the fwmark service `fwmark` (of every service: `None`),
    /// each as `address@weight`, sorted.
    pub fn backends(&self, fwmark: Option<u32>) -> Vec<String> {
        use crate::ipvs::IpvsTable as _;
        let mut ipvs = self.ipvs.clone();
        let mut out = Vec::new();
        for service in ipvs.service_keys() {
            if fwmark.is_some_and(|m| FwMark::new(m).map(ServiceKey::fwmark) != Some(service)) {
                continue;
            }
            for d in ipvs.destinations(&service).unwrap_or_default() {
                out.push(format!("{}@{}", d.key.addr, d.config.weight));
            }
        }
        out.sort();
        out
    }
}

/// Fake kernels by sandbox; a removed sandbox answers as a vanished namespace does.
#[derive(Debug, Default)]
pub struct FakeOpener {
    kernels: Mutex<BTreeMap<SandboxKey, FakeKernel>>,
    gone: Mutex<BTreeSet<SandboxKey>>,
    /// The addresses a new sandbox has.
    addrs: Vec<Ipv4Net>,
}

impl FakeOpener {
    /// An opener whose new sandboxes have the addresses `addrs`.
    pub fn with_addrs(addrs: Vec<Ipv4Net>) -> Self {
        FakeOpener {
            addrs,
            ..Default::default()
        }
    }

    /// Look at (or prepare) `key`'s fake kernel.
    pub fn inspect<R>(&self, key: &SandboxKey, f: impl FnOnce(&mut FakeKernel) -> R) -> R {
        let mut kernels = self.kernels.lock().unwrap_or_else(|e| e.into_inner());
        f(kernels.entry(key.clone()).or_insert_with(|| FakeKernel {
            addrs: FakeAddrs(self.addrs.clone()),
            ..Default::default()
        }))
    }

    /// The namespace `key` is torn down: its kernel is dropped, and opening it fails as
    /// opening a missing namespace file does.
    pub fn remove(&self, key: &SandboxKey) {
        self.kernels.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
        self.gone
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone());
    }

    /// The sandboxes with a kernel.
    pub fn sandboxes(&self) -> Vec<SandboxKey> {
        self.kernels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

/// What the kernel says of a namespace that is gone: its file cannot be found.
pub fn absent(key: &SandboxKey) -> ReconcileError {
    ReconcileError::Netns(NetnsError::Open {
        path: NetnsPath::from_arg(&key.to_string()),
        source: std::io::ErrorKind::NotFound.into(),
    })
}

/// A kernel error that does not mean the namespace is gone (this kernel has no IPVS).
pub fn no_ipvs() -> ReconcileError {
    ReconcileError::Ipvs(crate::ipvs::IpvsError::Unavailable)
}

impl SandboxOpener for FakeOpener {
    fn with_sandbox<R: Send>(
        &self,
        key: &SandboxKey,
        addrs: Option<Vec<Ipv4Net>>,
        work: impl FnOnce(&mut Sandbox<'_>) -> Result<R, ReconcileError> + Send,
    ) -> Result<R, ReconcileError> {
        if self.gone.lock().unwrap_or_else(|e| e.into_inner()).contains(key) {
            return Err(absent(key));
        }
        self.inspect(key, |k| {
            let mut known = addrs.map(FakeAddrs);
            let mut sb = Sandbox {
                ipvs: &mut k.ipvs,
                firewall: &mut k.firewall,
                sysctls: &mut k.sysctls,
                addrs: super::known_or(&mut known, &mut k.addrs),
            };
            work(&mut sb)
        })
    }
}
