//! An in-memory store with etcd's semantics, for tests: one revision per write
//! transaction, create/mod revisions per key, leases that end on tokio's clock (paused-time
//! tests work) taking their keys with them, watches that see every change in order, and a
//! compaction the test triggers. It refuses what etcd refuses: a put on an unknown or
//! ended lease, the same key twice in one transaction, a compaction of the future.
//!
//! Several clients can share one store ([`MemoryKv::connect`]); each has its own
//! [`Link`], so a test can cut one client off (calls fail, watches break) or stall its
//! watches (they fall behind, as a slow etcd watcher does) while others carry on.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;

use super::kv::{
    Compare, Event, KeyValue, Kv, KvError, LeaseId, LeaseTtl, Listing, Op, Revision, Txn, TxnResult,
    WatchMessage, WatchStream,
};

/// The state of one client's connection to the shared store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Calls and watches work.
    Up,
    /// Calls work; watches deliver nothing until the link is up again.
    Stalled,
    /// Every call fails with `Unavailable`; open watches end with that error.
    Down,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
}

#[derive(Default)]
struct State {
    revision: i64,
    /// Watches may start at this revision or later.
    compacted: i64,
    keys: BTreeMap<String, KeyValue>,
    leases: HashMap<i64, Lease>,
    next_lease: i64,
    /// Every change after the compaction point, in revision order.
    history: Vec<Event>,
}

struct Shared {
    state: Mutex<State>,
    /// The current revision, for watches waiting on the next change.
    head: watch::Sender<i64>,
}

/// One client of an in-memory store.
#[derive(Clone)]
pub struct MemoryKv {
    shared: Arc<Shared>,
    link: Arc<watch::Sender<Link>>,
    /// What this client's next keep-alives answer instead of renewing (see
    /// [`MemoryKv::fail_keep_alives`]).
    keep_alive_faults: Arc<Mutex<VecDeque<KvError>>>,
}

impl Default for MemoryKv {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryKv {
    /// A new, empty store and its first client.
    pub fn new() -> Self {
        let state = State {
            revision: 1,
            next_lease: 0x7e57_0000,
            ..State::default()
        };
        MemoryKv {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                head: watch::channel(1).0,
            }),
            link: Arc::new(watch::channel(Link::Up).0),
            keep_alive_faults: Arc::default(),
        }
    }

    /// Another client of the same store, with its own link.
    pub fn connect(&self) -> MemoryKv {
        MemoryKv {
            shared: self.shared.clone(),
            link: Arc::new(watch::channel(Link::Up).0),
            keep_alive_faults: Arc::default(),
        }
    }

    /// Cut, stall or restore this client's link.
    pub fn set_link(&self, link: Link) {
        self.link.send_replace(link);
    }

    /// The next keep-alives of this client answer `faults`, one each, and renew nothing:
    /// what etcd answers during a leader change (a timeout, `Unavailable`, or a TTL of 0,
    /// which the port calls [`KvError::LeaseNotFound`], while the lease lives on).
    pub fn fail_keep_alives(&self, faults: impl IntoIterator<Item = KvError>) {
        self.keep_alive_faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(faults);
    }

    /// The store's current revision.
    pub fn revision(&self) -> Revision {
        Revision(self.shared.lock().revision)
    }

    /// Forget the history before `revision`: a watch that has not got that far, or
    /// starts before it, ends with `Compacted`.
    pub fn compact(&self, revision: Revision) -> Result<(), KvError> {
        let mut st = self.shared.lock();
        if revision.0 > st.revision {
            return Err(KvError::Rejected(format!(
                "cannot compact to future revision {revision} (current {})",
                st.revision
            )));
        }
        if revision.0 <= st.compacted {
            return Err(KvError::Rejected(format!(
                "revision {revision} has already been compacted"
            )));
        }
        st.compacted = revision.0;
        st.history.retain(|e| e.revision() >= revision);
        Ok(())
    }

    fn check_link(&self) -> Result<(), KvError> {
        match *self.link.borrow() {
            Link::Down => Err(KvError::Unavailable("link down (test)".into())),
            Link::Up | Link::Stalled => Ok(()),
        }
    }

    /// The shared state with ended leases expired first.
    fn state(&self) -> Result<MutexGuard<'_, State>, KvError> {
        self.check_link()?;
        let mut st = self.shared.lock();
        self.shared.expire_due(&mut st);
        Ok(st)
    }

    /// Expire the lease when its deadline passes, even if nobody calls the store then.
    fn arm_timer(&self, deadline: Instant) {
        let shared: Weak<Shared> = Arc::downgrade(&self.shared);
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            if let Some(shared) = shared.upgrade() {
                let mut st = shared.lock();
                shared.expire_due(&mut st);
            }
        });
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every write below is
        // prepared before it is applied), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// End every lease whose deadline has passed: each in a revision of its own, as etcd
    /// revokes them.
    fn expire_due(&self, st: &mut State) {
        let now = Instant::now();
        let mut due: Vec<i64> = st
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        due.sort_unstable();
        for id in due {
            self.revoke(st, id);
        }
    }

    fn revoke(&self, st: &mut State, id: i64) {
        st.leases.remove(&id);
        let keys: Vec<String> = st
            .keys
            .values()
            .filter(|kv| kv.lease == Some(LeaseId(id)))
            .map(|kv| kv.key.clone())
            .collect();
        if !keys.is_empty() {
            let ops = keys.into_iter().map(Op::Delete).collect();
            self.apply(st, ops);
        }
    }

    /// Apply checked writes in one new revision (none if nothing changed).
    fn apply(&self, st: &mut State, ops: Vec<Op>) {
        let rev = Revision(st.revision + 1);
        let mut changed = false;
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    let create_revision = st.keys.get(&key).map_or(rev, |kv| kv.create_revision);
                    let kv = KeyValue {
                        key: key.clone(),
                        value,
                        create_revision,
                        mod_revision: rev,
                        lease,
                    };
                    st.history.push(Event::Put(kv.clone()));
                    st.keys.insert(key, kv);
                    changed = true;
                }
                Op::Delete(key) => {
                    if st.keys.remove(&key).is_some() {
                        st.history.push(Event::Delete { key, revision: rev });
                        changed = true;
                    }
                }
            }
        }
        if changed {
            st.revision = rev.0;
            self.head.send_replace(rev.0);
        }
    }
}

fn holds(st: &State, c: &Compare) -> bool {
    match c {
        Compare::Absent(key) => !st.keys.contains_key(key),
        Compare::NoneUnder(prefix) => !st.keys.keys().any(|k| k.starts_with(prefix.as_str())),
        Compare::ValueIs(key, value) => st.keys.get(key).is_some_and(|kv| &kv.value == value),
        // An absent key has mod_revision 0, as in etcd.
        Compare::ModRevisionIs(key, rev) => {
            st.keys.get(key).map_or(Revision(0), |kv| kv.mod_revision) == *rev
        }
    }
}

/// What etcd refuses before applying anything: a put on an unknown lease, a key twice.
fn check_ops(st: &State, ops: &[Op]) -> Result<(), KvError> {
    let mut seen = std::collections::BTreeSet::new();
    for op in ops {
        let key = match op {
            Op::Put { key, lease, .. } => {
                if let Some(lease) = lease {
                    if !st.leases.contains_key(&lease.0) {
                        return Err(KvError::LeaseNotFound(*lease));
                    }
                }
                key
            }
            Op::Delete(key) => key,
        };
        if !seen.insert(key) {
            return Err(KvError::Rejected(format!(
                "duplicate key {key:?} in one transaction"
            )));
        }
    }
    Ok(())
}

#[async_trait]
impl Kv for MemoryKv {
    async fn get_prefix(&self, prefix: &str) -> Result<Listing, KvError> {
        let st = self.state()?;
        let kvs = st
            .keys
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect();
        Ok(Listing {
            kvs,
            revision: Revision(st.revision),
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, KvError> {
        let mut st = self.state()?;
        let succeeded = txn.when.iter().all(|c| holds(&st, c));
        let ops = if succeeded { txn.then } else { txn.otherwise };
        check_ops(&st, &ops)?;
        self.shared.apply(&mut st, ops);
        Ok(TxnResult {
            succeeded,
            revision: Revision(st.revision),
        })
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, KvError> {
        let deadline = {
            let mut st = self.state()?;
            st.next_lease += 1;
            let id = st.next_lease;
            let deadline = Instant::now() + ttl;
            st.leases.insert(id, Lease { ttl, deadline });
            (id, deadline)
        };
        self.arm_timer(deadline.1);
        Ok(LeaseId(deadline.0))
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, KvError> {
        self.check_link()?;
        let fault = self
            .keep_alive_faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
        if let Some(fault) = fault {
            return Err(fault);
        }
        let (ttl, deadline) = {
            let mut st = self.state()?;
            let l = st.leases.get_mut(&lease.0).ok_or(KvError::LeaseNotFound(lease))?;
            l.deadline = Instant::now() + l.ttl;
            (l.ttl, l.deadline)
        };
        self.arm_timer(deadline);
        Ok(ttl)
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), KvError> {
        let mut st = self.state()?;
        if !st.leases.contains_key(&lease.0) {
            return Err(KvError::LeaseNotFound(lease));
        }
        self.shared.revoke(&mut st, lease.0);
        Ok(())
    }

    async fn lease_time_to_live(&self, lease: LeaseId) -> Result<Option<LeaseTtl>, KvError> {
        let st = self.state()?;
        Ok(st.leases.get(&lease.0).map(|l| LeaseTtl {
            left: l.deadline.saturating_duration_since(Instant::now()),
            granted: l.ttl,
        }))
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, KvError> {
        let next = {
            let st = self.state()?;
            // Revision 0 means "from now on", as in etcd.
            if from.0 <= 0 {
                st.revision + 1
            } else {
                from.0
            }
        };
        let watcher = MemoryWatch {
            shared: self.shared.clone(),
            link: self.link.subscribe(),
            head: self.shared.head.subscribe(),
            prefix: prefix.to_owned(),
            next,
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(watcher, |mut w| async move {
            let msg = w.next_message().await?;
            Some((msg, w))
        })))
    }
}

struct MemoryWatch {
    shared: Arc<Shared>,
    link: watch::Receiver<Link>,
    head: watch::Receiver<i64>,
    prefix: String,
    /// The first revision not yet delivered.
    next: i64,
    done: bool,
}

impl MemoryWatch {
    async fn next_message(&mut self) -> Option<Result<WatchMessage, KvError>> {
        if self.done {
            return None;
        }
        loop {
            let link = *self.link.borrow_and_update();
            match link {
                Link::Down => return self.end(Err(KvError::Unavailable("link down (test)".into()))),
                Link::Stalled => {
                    if self.link.changed().await.is_err() {
                        return self.end(Err(KvError::Unavailable("client dropped".into())));
                    }
                    continue;
                }
                Link::Up => {}
            }
            self.head.borrow_and_update();
            {
                let shared = self.shared.clone();
                let st = shared.lock();
                if self.next < st.compacted {
                    let compact_revision = Revision(st.compacted);
                    drop(st);
                    return self.end(Ok(WatchMessage::Compacted { compact_revision }));
                }
                let start = st.history.partition_point(|e| e.revision().0 < self.next);
                let events: Vec<Event> = st.history[start..]
                    .iter()
                    .filter(|e| e.key().starts_with(self.prefix.as_str()))
                    .cloned()
                    .collect();
                self.next = self.next.max(st.revision + 1);
                if !events.is_empty() {
                    return Some(Ok(WatchMessage::Events(events)));
                }
            }
            tokio::select! {
                r = self.head.changed() => if r.is_err() { return None },
                r = self.link.changed() => if r.is_err() {
                    return self.end(Err(KvError::Unavailable("client dropped".into())));
                },
            }
        }
    }

    fn end(&mut self, last: Result<WatchMessage, KvError>) -> Option<Result<WatchMessage, KvError>> {
        self.done = true;
        Some(last)
    }
}
