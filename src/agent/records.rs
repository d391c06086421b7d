//! One record per sandbox, in one place: the spec and kernel view it was last brought
//! to, its container's own addresses then, what `vipd status` says of it, and whether it
//! was last found gone.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::core::containers::Attachment;
use crate::core::model::SandboxKey;
use crate::core::spec::SandboxSpec;
use crate::core::status::SandboxStatus;
use crate::kernel::{KernelView, ProgramError, Programmed};

/// What a sandbox was last brought to successfully.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The kernel's view and the spec that brought it there.
    pub view: KernelView,
    /// Its container's own addresses then: when they change, the sandbox is read again
    /// (SNAT rules follow them).
    pub attachments: Vec<Attachment>,
}

/// Everything the agent keeps of one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxRecord {
    /// `None` until programmed, and after an error (the kernel is read again then).
    pub applied: Option<Applied>,
    pub status: SandboxStatus,
    /// Last found gone while still wanted: its container's stop is on its way. Gone
    /// again at the next sync, it is an error.
    pub vanishing: bool,
}

/// How a sandbox's programming settled.
#[derive(Debug, Clone)]
pub enum Settled {
    /// Programmed, with this many operations.
    Programmed(usize),
    /// Its namespace went away while it was programmed, the first time: no error yet.
    Vanishing(String),
    /// An error (or gone a second time while its container still runs).
    Failed(ProgramError),
}

/// The records of the sandboxes wanted now.
#[derive(Debug, Default)]
pub struct Records(BTreeMap<SandboxKey, SandboxRecord>);

impl Records {
    pub fn get(&self, key: &SandboxKey) -> Option<&SandboxRecord> {
        self.0.get(key)
    }

    /// Keep a record for each sandbox of `desired` and none other (what is kept of a
    /// sandbox no longer wanted is forgotten), each naming its container (`names`, or
    /// "(ingress)" for `ingress`) and its services.
    pub fn follow(
        &mut self,
        desired: &BTreeMap<SandboxKey, Arc<SandboxSpec>>,
        names: &BTreeMap<&SandboxKey, &str>,
        ingress: Option<&SandboxKey>,
    ) {
        self.0.retain(|sb, _| desired.contains_key(sb));
        for (sandbox, spec) in desired {
            let record = self.0.entry(sandbox.clone()).or_insert_with(|| SandboxRecord {
                applied: None,
                status: SandboxStatus {
                    path: sandbox.path().to_owned(),
                    container: String::new(),
                    services: Arc::from([]),
                    in_sync: false,
                    error: None,
                    last_operations: 0,
                    last_change: 0,
                },
                vanishing: false,
            });
            let st = &mut record.status;
            st.container = match names.get(sandbox) {
                Some(n) => n.to_string(),
                None if ingress == Some(sandbox) => "(ingress)".to_owned(),
                None => String::new(),
            };
            let names = spec.services.iter().map(|s| s.name.as_str());
            if !st.services.iter().map(String::as_str).eq(names) {
                st.services = spec.services.iter().map(|s| s.name.to_string()).collect();
            }
        }
    }

    /// The kept view of `key`, handed to the programmer (none is kept meanwhile: after
    /// an error the kernel is read again).
    pub fn take_view(&mut self, key: &SandboxKey) -> Option<KernelView> {
        let record = self.0.get_mut(key)?;
        record.applied.take().map(|a| a.view)
    }

    /// Record how programming `key` at `now` (unix seconds) ended.
    pub fn settle(
        &mut self,
        key: &SandboxKey,
        result: Result<Programmed, ProgramError>,
        attachments: Vec<Attachment>,
        now: u64,
    ) -> Settled {
        let Some(record) = self.0.get_mut(key) else {
            return match result {
                Ok(p) => Settled::Programmed(p.operations),
                Err(e) => Settled::Failed(e),
            };
        };
        match result {
            Ok(p) => {
                let st = &mut record.status;
                st.in_sync = true;
                st.error = None;
                if p.operations > 0 {
                    st.last_operations = p.operations;
                    st.last_change = now;
                }
                record.vanishing = false;
                record.applied = Some(Applied {
                    view: p.view,
                    attachments,
                });
                Settled::Programmed(p.operations)
            }
            Err(e @ ProgramError::Gone(_)) if !record.vanishing => {
                record.vanishing = true;
                record.status.in_sync = false;
                let e = e.to_string();
                record.status.error = Some(e.clone());
                record.applied = None;
                Settled::Vanishing(e)
            }
            Err(e) => {
                record.status.in_sync = false;
                record.status.error = Some(e.to_string());
                record.applied = None;
                Settled::Failed(e)
            }
        }
    }

    /// Every sandbox's status, by path.
    pub fn statuses(&self) -> Vec<SandboxStatus> {
        self.0.values().map(|r| r.status.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::plan::ObservedSandbox;

    fn programmed(ops: usize, spec: &Arc<SandboxSpec>) -> Programmed {
        Programmed {
            operations: ops,
            view: KernelView {
                seen: ObservedSandbox::default(),
                spec: Arc::clone(spec),
            },
        }
    }

    #[test]
    fn a_record_follows_the_wanted_sandboxes_and_keeps_one_view_until_an_error() {
        let key = SandboxKey::from("/run/docker/netns/claaaaaaaaaa");
        let ingress = SandboxKey::from("/run/netns/ingress");
        let spec = Arc::new(SandboxSpec::default());
        let desired: BTreeMap<_, _> = [(key.clone(), spec.clone()), (ingress.clone(), spec.clone())].into();
        let mut r = Records::default();
        r.follow(&desired, &[(&key, "client")].into(), Some(&ingress));
        let st = r.statuses();
        assert_eq!(
            (st[0].container.as_str(), st[1].container.as_str()),
            ("client", "(ingress)")
        );
        assert!(!st[0].in_sync && st[0].error.is_none());

        assert!(matches!(
            r.settle(&key, Ok(programmed(3, &spec)), vec![], 100),
            Settled::Programmed(3)
        ));
        let rec = r.get(&key).unwrap();
        assert!(rec.status.in_sync && rec.applied.is_some());
        assert_eq!((rec.status.last_operations, rec.status.last_change), (3, 100));
        assert!(r.take_view(&key).is_some());
        assert!(r.take_view(&key).is_none(), "one view, handed out once");

        // Gone once: vanishing, no error; gone again: an error.
        let gone = || Err(ProgramError::from(crate::kernel::fake::absent(&key)));
        assert!(matches!(
            r.settle(&key, gone(), vec![], 101),
            Settled::Vanishing(e) if e.contains("cannot be opened")
        ));
        assert!(r.get(&key).unwrap().vanishing);
        assert!(matches!(r.settle(&key, gone(), vec![], 102), Settled::Failed(_)));
        let rec = r.get(&key).unwrap();
        assert_eq!(
            rec.status.error.as_deref(),
            Some(format!("the namespace is gone: {}", crate::kernel::fake::absent(&key)).as_str())
        );
        assert!(rec.applied.is_none());

        // No longer wanted: the record goes, with all it kept.
        r.follow(
            &[(ingress.clone(), spec)].into(),
            &BTreeMap::new(),
            Some(&ingress),
        );
        assert!(r.get(&key).is_none());
        assert_eq!(r.statuses().len(), 1);
    }
}
