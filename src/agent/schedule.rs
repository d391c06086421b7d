//! When the agent does what: debounce of event bursts, the periodic resync, re-list
//! retries, reconnect backoff and drain deadlines. A small state machine the run loop
//! asks "when next, and what"; no I/O, tested with paused time.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::core::containers::{ContainerId, Drain};

/// How soon a listing that failed (while the event stream still runs) is tried again.
pub const RELIST_RETRY: Duration = Duration::from_secs(5);

/// The first wait before reconnecting to an unreachable engine; it doubles up to
/// [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(250);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What a timer wakes the run loop for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The periodic full resync.
    Resync,
    /// A drain's grace is over.
    DrainOver,
}

/// The resync timer and the reconnect backoff.
#[derive(Debug, Clone)]
pub struct Schedule {
    resync: Duration,
    debounce: Duration,
    next_resync: Instant,
    backoff: Duration,
}

impl Schedule {
    pub fn new(resync: Duration, debounce: Duration) -> Self {
        Schedule {
            resync,
            debounce,
            next_resync: Instant::now() + resync,
            backoff: BACKOFF_MIN,
        }
    }

    /// How long to gather more events after one arrives (a scale-up is many events).
    pub fn debounce(&self) -> Duration {
        self.debounce
    }

    /// The engine could not be reached: how long to wait before trying again.
    pub fn connect_failed(&mut self) -> Duration {
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        wait
    }

    /// The engine answered a listing after a (re)connect: the backoff starts over.
    pub fn connected(&mut self) {
        self.backoff = BACKOFF_MIN;
    }

    /// A full resync was done (or begins, for the periodic one) at `now`: the next is
    /// one interval later. After a stall, one resync, not one per interval missed.
    pub fn resynced(&mut self, now: Instant) {
        self.next_resync = now + self.resync;
    }

    /// A listing failed while the event stream still runs: what is known is kept, and
    /// the listing is tried again soon (never later than the resync interval).
    pub fn relist_failed(&mut self, now: Instant) {
        self.next_resync = now + RELIST_RETRY.min(self.resync);
    }

    /// When the run loop next wakes by itself, and why: the periodic resync, or the end
    /// of a drain's grace (`drain_end`) if that comes first.
    pub fn next_wake(&self, drain_end: Option<Instant>) -> (Instant, Wake) {
        match drain_end {
            Some(end) if end < self.next_resync => (end, Wake::DrainOver),
            _ => (self.next_resync, Wake::Resync),
        }
    }
}

/// Why a task is leaving its services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leaving {
    /// The engine sent it this signal (`docker stop`, `docker kill`).
    Signal(String),
    /// Its health check failed.
    Unhealthy,
}

#[derive(Debug, Clone)]
struct Drainer {
    since: Instant,
    why: Leaving,
    /// Its grace ended and that was logged.
    over: bool,
}

/// Tasks on their way out: since when and why. A task drains (weight 0) for the grace,
/// then is no backend though it still runs.
#[derive(Debug, Clone)]
pub struct Drains {
    grace: Duration,
    leaving: BTreeMap<ContainerId, Drainer>,
}

impl Drains {
    pub fn new(grace: Duration) -> Self {
        Drains {
            grace,
            leaving: BTreeMap::new(),
        }
    }

    pub fn grace(&self) -> Duration {
        self.grace
    }

    pub fn contains(&self, id: &ContainerId) -> bool {
        self.leaving.contains_key(id)
    }

    /// `id` starts leaving at `now`, unless it already is; true when it started.
    pub fn start(&mut self, id: &ContainerId, why: Leaving, now: Instant) -> bool {
        if self.leaving.contains_key(id) {
            return false;
        }
        self.leaving.insert(
            id.clone(),
            Drainer {
                since: now,
                why,
                over: false,
            },
        );
        true
    }

    /// `id` no longer leaves; true when it was.
    pub fn end(&mut self, id: &ContainerId) -> bool {
        self.leaving.remove(id).is_some()
    }

    /// Keep the drains `keep` says still hold.
    pub fn retain(&mut self, mut keep: impl FnMut(&ContainerId, &Leaving) -> bool) {
        self.leaving.retain(|id, d| keep(id, &d.why));
    }

    /// Where `id` stands at `now`, and, the first time its grace is found over, why it
    /// was leaving (to be said once).
    pub fn state(&mut self, id: &ContainerId, now: Instant) -> (Drain, Option<Leaving>) {
        let grace = self.grace;
        match self.leaving.get_mut(id) {
            None => (Drain::No, None),
            Some(d) if now < d.since + grace => (Drain::Draining, None),
            Some(d) => {
                let first = !std::mem::replace(&mut d.over, true);
                (Drain::Drained, first.then(|| d.why.clone()))
            }
        }
    }

    /// When the next drain grace ends (a sync then removes that task), if any.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        self.leaving
            .values()
            .map(|d| d.since + self.grace)
            .filter(|end| *end > now)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_backoff_doubles_to_its_cap_and_starts_over_once_connected() {
        let mut s = Schedule::new(Duration::from_secs(60), Duration::from_millis(5));
        let waits: Vec<Duration> = (0..9).map(|_| s.connect_failed()).collect();
        assert_eq!(waits[0], Duration::from_millis(250));
        assert_eq!(waits[1], Duration::from_millis(500));
        assert_eq!(waits[7], Duration::from_secs(30), "capped: {waits:?}");
        assert_eq!(waits[8], Duration::from_secs(30));
        s.connected();
        assert_eq!(s.connect_failed(), Duration::from_millis(250));
        assert_eq!(s.debounce(), Duration::from_millis(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_resync_comes_one_interval_after_the_last_and_a_failed_listing_is_retried_soon() {
        let t0 = Instant::now();
        let mut s = Schedule::new(Duration::from_secs(60), Duration::ZERO);
        tokio::time::advance(Duration::from_secs(20)).await;
        s.resynced(Instant::now());
        assert_eq!(s.next_wake(None), (t0 + Duration::from_secs(80), Wake::Resync));
        tokio::time::sleep_until(s.next_wake(None).0).await;
        s.resynced(Instant::now());
        tokio::time::advance(Duration::from_secs(20)).await;
        s.relist_failed(Instant::now());
        assert_eq!(s.next_wake(None), (t0 + Duration::from_secs(105), Wake::Resync));
        // A resync interval shorter than the retry bounds it.
        let mut quick = Schedule::new(Duration::from_secs(2), Duration::ZERO);
        quick.relist_failed(Instant::now());
        assert_eq!(quick.next_wake(None).0, Instant::now() + Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_ending_before_the_resync_wakes_the_loop_first() {
        let s = Schedule::new(Duration::from_secs(60), Duration::ZERO);
        let now = Instant::now();
        let soon = now + Duration::from_secs(30);
        assert_eq!(s.next_wake(Some(soon)), (soon, Wake::DrainOver));
        let late = now + Duration::from_secs(90);
        assert_eq!(
            s.next_wake(Some(late)),
            (now + Duration::from_secs(60), Wake::Resync)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_lasts_its_grace_is_said_over_once_and_ends_when_told() {
        let id = ContainerId("w2aaaaaaaaaa".into());
        let mut d = Drains::new(Duration::from_secs(30));
        let t0 = Instant::now();
        assert_eq!(d.state(&id, t0), (Drain::No, None));
        assert!(d.start(&id, Leaving::Signal("15".into()), t0));
        assert!(!d.start(&id, Leaving::Unhealthy, t0), "already leaving");
        assert_eq!(d.next_deadline(t0), Some(t0 + Duration::from_secs(30)));
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(d.state(&id, Instant::now()), (Drain::Draining, None));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(d.next_deadline(Instant::now()), None, "the grace is over");
        assert_eq!(
            d.state(&id, Instant::now()),
            (Drain::Drained, Some(Leaving::Signal("15".into())))
        );
        assert_eq!(d.state(&id, Instant::now()), (Drain::Drained, None), "said once");
        d.retain(|_, why| *why != Leaving::Signal("15".into()));
        assert!(!d.contains(&id));
        assert!(d.start(&id, Leaving::Unhealthy, Instant::now()));
        assert!(d.end(&id) && !d.end(&id));
    }
}
