//! The health of the daemon: the liveness of each consumer loop, and the conditions that degrade it.
//!
//! Owns [`Liveness`] — each loop publishes until when it is healthy (progressing, blocked in a read that
//! will return, backing off, or waiting for handlers within their deadline) and why it is degraded while
//! it still turns — and [`Health`], the set of them plus daemon-wide conditions (a lapsing identity
//! token). The daemon sends WATCHDOG=1 only while every loop is live, so a wedged loop stops the pings
//! and systemd restarts the service, while a Redis outage only makes the daemon `degraded`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// One loop's liveness: until when it counts as healthy, and why it is degraded while it still turns
/// (its commits failing, Redis in trouble, restarts).
#[derive(Debug)]
pub struct Liveness {
    pub name: String,
    until_ms: AtomicU64,
    degraded: Mutex<Option<String>>,
    /// Whether `degraded` holds a reason: [`Liveness::recover`] runs after every commit, and must not
    /// take the lock when there is nothing to clear.
    is_degraded: AtomicBool,
    /// A refusal that outlasts Redis coming back (a dead-letter stream that refuses): set by
    /// [`Liveness::refused`], cleared only by [`Liveness::accepted`], not by `recover`.
    refusal: Mutex<Option<String>>,
    is_refused: AtomicBool,
    /// Whether the degradation is Redis out of reach (set by [`Liveness::unreachable`]).
    unreachable: AtomicBool,
}

impl Liveness {
    /// Healthy until `until` (set on every turn of the loop).
    pub fn healthy_until(&self, until: Instant) {
        self.until_ms.store(millis(until), Ordering::Relaxed);
    }

    /// The loop turns but does not do its work: says why, until [`Liveness::recover`].
    pub fn degrade(&self, reason: String) {
        *self.degraded.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        self.is_degraded.store(true, Ordering::Release);
    }

    /// Like [`Liveness::degrade`], because Redis cannot be reached: counted by
    /// [`Health::redis_unreachable`] until [`Liveness::recover`].
    pub fn unreachable(&self, reason: String) {
        self.degrade(reason);
        self.unreachable.store(true, Ordering::Release);
    }

    pub fn recover(&self) {
        if !self.is_degraded.swap(false, Ordering::AcqRel) {
            return;
        }
        self.unreachable.store(false, Ordering::Release);
        self.degraded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    /// Something the loop needs refuses it and will until someone fixes it: says why, until
    /// [`Liveness::accepted`] — whatever else recovers meanwhile.
    pub fn refused(&self, reason: String) {
        *self.refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        self.is_refused.store(true, Ordering::Release);
    }

    /// What [`Liveness::refused`] reported works again.
    pub fn accepted(&self) {
        if self.is_refused.swap(false, Ordering::AcqRel) {
            self.refusal
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
        }
    }

    fn is_healthy(&self, now: Instant) -> bool {
        self.until_ms.load(Ordering::Relaxed) > millis(now)
    }
}

/// The liveness of every loop, and conditions that degrade the daemon without stopping a loop (an
/// identity token about to lapse). Only loops decide the watchdog; both decide `degraded`.
#[derive(Debug, Default)]
pub struct Health {
    loops: Mutex<Vec<Arc<Liveness>>>,
    conditions: Mutex<std::collections::BTreeMap<String, String>>,
}

impl Health {
    /// Registers a loop, healthy for `grace` from now.
    pub fn register(&self, name: &str, grace: Duration) -> Arc<Liveness> {
        let l = Arc::new(Liveness {
            name: name.to_owned(),
            until_ms: AtomicU64::new(millis(Instant::now() + grace)),
            degraded: Mutex::new(None),
            is_degraded: AtomicBool::new(false),
            refusal: Mutex::new(None),
            is_refused: AtomicBool::new(false),
            unreachable: AtomicBool::new(false),
        });
        self.loops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(l.clone());
        l
    }

    /// Stops watching a loop (it was stopped on purpose).
    pub fn forget(&self, name: &str) {
        self.loops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|l| l.name != name);
    }

    /// Marks the daemon degraded for `what`, with a reason operators can act on.
    pub fn degrade(&self, what: &str, reason: String) {
        self.conditions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(what.to_owned(), reason);
    }

    /// Clears a condition set by [`Health::degrade`].
    pub fn recover(&self, what: &str) {
        self.conditions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(what);
    }

    /// Why the daemon is degraded: loops not making progress, then every condition (empty when it is
    /// healthy).
    pub fn degraded(&self) -> Vec<String> {
        let now = Instant::now();
        let mut out: Vec<String> = Vec::new();
        for l in self.loops.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if !l.is_healthy(now) {
                out.push(format!("loop {} is not making progress", l.name));
            } else if let Some(why) = &*l.degraded.lock().unwrap_or_else(|p| p.into_inner()) {
                out.push(format!("{}: {why}", l.name));
            }
            if let Some(why) = &*l.refusal.lock().unwrap_or_else(|p| p.into_inner()) {
                out.push(format!("{}: {why}", l.name));
            }
        }
        out.extend(
            self.conditions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned(),
        );
        out
    }

    /// Whether a loop cannot reach Redis now.
    pub fn redis_unreachable(&self) -> bool {
        self.loops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|l| l.unreachable.load(Ordering::Acquire))
    }

    /// Names of the loops that are not healthy now (empty when all are).
    pub fn unhealthy(&self) -> Vec<String> {
        let now = Instant::now();
        self.loops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|l| !l.is_healthy(now))
            .map(|l| l.name.clone())
            .collect()
    }
}

fn epoch() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn millis(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_that_stops_reporting_becomes_unhealthy() {
        let h = Health::default();
        let a = h.register("a", Duration::from_secs(60));
        let b = h.register("b", Duration::from_secs(60));
        assert!(h.unhealthy().is_empty());
        b.healthy_until(Instant::now() - Duration::from_secs(1));
        assert_eq!(h.unhealthy(), ["b"]);
        a.healthy_until(Instant::now() - Duration::from_secs(1));
        assert_eq!(h.unhealthy().len(), 2);
    }

    #[test]
    fn conditions_degrade_without_touching_the_loops() {
        let h = Health::default();
        h.register("a", Duration::from_secs(60));
        assert!(h.degraded().is_empty());
        h.degrade("token", "the token lapses soon".into());
        assert_eq!(h.degraded(), ["the token lapses soon"]);
        assert!(h.unhealthy().is_empty(), "the watchdog is about loops only");
        h.recover("token");
        assert!(h.degraded().is_empty());
        let b = h.register("b", Duration::from_secs(60));
        b.degrade("commits failing".into());
        assert_eq!(h.degraded(), ["b: commits failing"]);
        assert!(
            h.unhealthy().is_empty(),
            "a degraded loop still feeds the watchdog"
        );
        b.recover();
        assert!(h.degraded().is_empty());
        b.refused("the dead-letter stream refuses".into());
        b.recover();
        assert_eq!(
            h.degraded(),
            ["b: the dead-letter stream refuses"],
            "a refusal outlasts Redis recovering"
        );
        b.accepted();
        assert!(h.degraded().is_empty());
    }
}
