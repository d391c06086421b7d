//! List + watch: a consistent snapshot of the cluster for the caller, kept current.
//!
//! Kubernetes' resourceVersion loop: list the prefix, remember its revision, watch from
//! revision + 1; on a compaction or a broken stream, list again. While the store is
//! unreachable the caller's snapshot stays as it was (IPVS and DNS never read the store)
//! and the view says since when; the reflector retries with backoff, forever.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, info_span, warn, Instrument};

use super::kv::{Event, KeyValue, Kv, KvError, Revision, WatchMessage};
use super::layout::{ClusterState, Diff, Keys};

/// How long to wait between attempts while the store is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(10),
        }
    }
}

/// What the caller sees.
#[derive(Debug, Clone)]
pub struct View {
    /// The last consistent snapshot (empty at revision 0 until the first list).
    pub state: Arc<ClusterState>,
    /// What changed from the snapshot before (after a re-list too).
    pub diff: Arc<Diff>,
    /// Since when the store has been unreachable; `None` while it answers.
    pub unreachable_since: Option<Instant>,
    /// The last error, while unreachable.
    pub last_error: Option<KvError>,
    /// How many times the prefix was listed (1 after the first list).
    pub lists: u64,
    /// Whether the last list or watch answered and the watch is open: false before the
    /// first list and from a failure until the next list.
    pub connected: bool,
}

/// A running reflector; dropping it stops it.
pub struct Reflector {
    view: watch::Receiver<View>,
    task: JoinHandle<()>,
}

impl Drop for Reflector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Reflector {
    /// Start reflecting everything under `keys`' prefix.
    pub fn spawn(kv: Arc<dyn Kv>, keys: Keys, backoff: Backoff) -> Self {
        let (tx, view) = watch::channel(View {
            state: Arc::new(ClusterState::default()),
            diff: Arc::new(Diff::default()),
            unreachable_since: None,
            last_error: None,
            lists: 0,
            connected: false,
        });
        let span = info_span!("reflector", prefix = keys.root());
        let task = tokio::spawn(
            Loop {
                kv,
                keys,
                backoff,
                tx,
                cache: BTreeMap::new(),
            }
            .run()
            .instrument(span),
        );
        Reflector { view, task }
    }

    /// The current view.
    pub fn view(&self) -> View {
        self.view.borrow().clone()
    }

    /// A receiver that wakes on every new view (a new snapshot, or a change of reachability).
    pub fn subscribe(&self) -> watch::Receiver<View> {
        self.view.clone()
    }
}

struct Loop {
    kv: Arc<dyn Kv>,
    keys: Keys,
    backoff: Backoff,
    tx: watch::Sender<View>,
    /// Every key under the prefix, as of the last published revision.
    cache: BTreeMap<String, KeyValue>,
}

impl Loop {
    async fn run(mut self) {
        let mut delay = self.backoff.initial;
        loop {
            match self.list_and_watch().await {
                // A compaction: list again at once.
                Ok(()) => delay = self.backoff.initial,
                Err(e) => {
                    warn!(error = %e, retry_in = ?delay, "cluster store unreachable");
                    self.tx.send_modify(|v| {
                        v.unreachable_since.get_or_insert_with(Instant::now);
                        v.last_error = Some(e);
                        v.connected = false;
                    });
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.backoff.max);
                }
            }
        }
    }

    /// One list and the watch after it; returns when it must list again.
    async fn list_and_watch(&mut self) -> Result<(), KvError> {
        let listing = self.kv.get_prefix(self.keys.root()).await?;
        self.cache = listing.kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
        let mut revision = listing.revision;
        self.publish(revision, true);
        let mut stream = self.kv.watch(self.keys.root(), Revision(revision.0 + 1)).await?;
        loop {
            match stream.next().await {
                Some(Ok(WatchMessage::Events(events))) => {
                    for e in events {
                        revision = revision.max(e.revision());
                        match e {
                            Event::Put(kv) => {
                                self.cache.insert(kv.key.clone(), kv);
                            }
                            Event::Delete { key, .. } => {
                                self.cache.remove(&key);
                            }
                        }
                    }
                    self.publish(revision, false);
                }
                Some(Ok(WatchMessage::Compacted { compact_revision })) => {
                    info!(%compact_revision, "watch compacted; listing again");
                    return Ok(());
                }
                Some(Err(e)) => return Err(e),
                None => return Err(KvError::Unavailable("the watch stream ended".into())),
            }
        }
    }

    fn publish(&mut self, revision: Revision, listed: bool) {
        let state = ClusterState::from_kvs(&self.keys, self.cache.values(), revision);
        debug!(%revision, listed, nodes = state.nodes.len(), tasks = state.tasks.len(), "new snapshot");
        self.tx.send_modify(|v| {
            v.diff = Arc::new(v.state.diff(&state));
            v.state = Arc::new(state);
            v.unreachable_since = None;
            v.last_error = None;
            v.lists += u64::from(listed);
            v.connected = true;
        });
    }
}
