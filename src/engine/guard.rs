//! Per-handler guards, shared by every loop of the daemon (docs/design.md, "Delivery": breakers and rate limits):
//! a circuit breaker that stops calling a handler whose calls keep failing, and a rate limit that every
//! daemon calling the handler shares through Redis.
//!
//! Owns the breaker's decisions ([`BreakerState`], without I/O, unit-tested here) and its reports (log
//! line, `redstream_breaker_open`, a health condition that `status` and the heartbeat show), and the
//! limiter's local side ([`RateLimit`]: permits taken from Redis in small batches, waiters served in
//! order). What a held message becomes in Redis — pending, its delivery given back, due at the probe —
//! is the loop's ([`super::consumer`]) and the client's (`client::recover::SCHEDULE`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::client::Client;
use crate::health::Health;
use crate::metrics::{HandlerLabels, global};

/// What guards one handler: `breaker = {…}`, `rate = "…"` and `retry = {…}` of its `[[handlers]]`
/// entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuardSpec {
    pub breaker: Option<BreakerSpec>,
    pub rate: Option<RateSpec>,
    /// The handler's retry schedule, in place of the consumer's.
    pub retry: Option<super::settings::RetrySchedule>,
}

/// `breaker = { failures = "50%", min_calls = 20, window = "30s", open_for = "30s" }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerSpec {
    /// Opens when at least this percent of the calls in `window` failed …
    pub failure_percent: u32,
    /// … and there were at least this many calls.
    pub min_calls: u32,
    pub window: Duration,
    /// How long it stays open before one message is let through as a probe.
    pub open_for: Duration,
}

impl Default for BreakerSpec {
    fn default() -> Self {
        BreakerSpec {
            failure_percent: 50,
            min_calls: 20,
            window: Duration::from_secs(30),
            open_for: Duration::from_secs(30),
        }
    }
}

/// `rate = "200/s"`: at most `count` calls per `per`, across every daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateSpec {
    pub count: u32,
    pub per: Duration,
}

impl RateSpec {
    /// The time one call uses up, in µs.
    pub fn interval_us(&self) -> u64 {
        (u64::try_from(self.per.as_micros()).unwrap_or(u64::MAX) / u64::from(self.count.max(1)))
            .max(1)
    }

    /// How many permits are taken from Redis at once (and may go at once after a quiet spell): 50 ms
    /// worth, at least one.
    pub fn batch(&self) -> u64 {
        (50_000 / self.interval_us()).clamp(1, 1000)
    }
}

impl std::fmt::Display for RateSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            3600 => "h",
            _ => return write!(f, "{}/{}", self.count, humantime::format_duration(self.per)),
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// The guards of every handler that has one; swapped whole on reload, keeping the state of the guards
/// whose settings did not change.
pub struct Guards {
    map: ArcSwap<HashMap<String, Arc<Guard>>>,
    health: Arc<Health>,
}

/// One handler's guards.
pub struct Guard {
    pub spec: GuardSpec,
    pub breaker: Option<Breaker>,
    pub rate: Option<RateLimit>,
}

impl Guards {
    pub fn new(health: Arc<Health>) -> Guards {
        Guards {
            map: ArcSwap::from_pointee(HashMap::new()),
            health,
        }
    }

    /// Takes the handlers' guard settings (at start and on reload). A guard whose settings are
    /// unchanged keeps its state (an open breaker stays open); a removed one reports itself closed.
    pub fn configure(&self, specs: &[(String, GuardSpec)]) {
        let old = self.map.load();
        let mut new = HashMap::new();
        for (name, spec) in specs {
            if *spec == GuardSpec::default() {
                continue;
            }
            let guard = match old.get(name) {
                Some(g) if g.spec == *spec => g.clone(),
                _ => Arc::new(Guard {
                    spec: spec.clone(),
                    breaker: spec
                        .breaker
                        .clone()
                        .map(|b| Breaker::new(name, b, self.health.clone())),
                    rate: spec.rate.clone().map(|r| RateLimit::new(name, r)),
                }),
            };
            new.insert(name.clone(), guard);
        }
        for (name, g) in old.iter() {
            let kept = new.get(name).is_some_and(|n| Arc::ptr_eq(n, g));
            if !kept && let Some(b) = &g.breaker {
                b.forget();
            }
        }
        self.map.store(Arc::new(new));
    }

    /// The guard of `handler`, if it has one.
    pub fn get(&self, handler: &str) -> Option<Arc<Guard>> {
        let map = self.map.load();
        if map.is_empty() {
            return None;
        }
        map.get(handler).cloned()
    }
}

/// A circuit breaker: its state behind a lock (calls end on worker threads), and its reports.
pub struct Breaker {
    handler: Arc<str>,
    spec: BreakerSpec,
    state: Mutex<BreakerState>,
    health: Arc<Health>,
}

/// Whether a message may run now.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    Run,
    /// The breaker is open (or its probe is out): hold the message until then.
    Hold(Instant),
}

impl Breaker {
    fn new(handler: &str, spec: BreakerSpec, health: Arc<Health>) -> Breaker {
        let _ = global().breaker_open.get_or_create(&labels(handler)).set(0);
        Breaker {
            handler: handler.into(),
            state: Mutex::new(BreakerState::new(Instant::now())),
            spec,
            health,
        }
    }

    /// Whether message `id` may run now; when the breaker's time is up, it runs as the probe.
    pub fn admit(&self, id: &str) -> Admit {
        let (admit, probe) = self.lock().admit(&self.spec, id, Instant::now());
        if probe {
            tracing::info!(handler = %self.handler, id, "breaker half-open: one message goes through as a probe");
        }
        admit
    }

    /// A call of message `id` ended; `failed` is its failure's reason. When it was the probe and
    /// failed, returns until when the breaker is open again.
    pub fn record(&self, id: &str, failed: Option<&str>) -> Option<Instant> {
        let change = self.lock().record(&self.spec, id, failed, Instant::now());
        let condition = self.condition();
        match change {
            None => None,
            Some(Change::Opened(why)) => {
                tracing::warn!(
                    handler = %self.handler,
                    open_for = %humantime::format_duration(self.spec.open_for),
                    "breaker opened: {why}; the handler's messages wait, no delivery counted, until a probe succeeds"
                );
                global()
                    .breaker_open
                    .get_or_create(&labels(&self.handler))
                    .set(1);
                self.health.degrade(
                    &condition,
                    format!("breaker of handler {} is open: {why}", self.handler),
                );
                None
            }
            Some(Change::Reopened(why)) => {
                tracing::warn!(
                    handler = %self.handler,
                    id,
                    open_for = %humantime::format_duration(self.spec.open_for),
                    "breaker stays open: the probe failed: {why}"
                );
                Some(Instant::now() + self.spec.open_for)
            }
            Some(Change::Closed) => {
                tracing::info!(handler = %self.handler, id, "breaker closed: the probe succeeded");
                global()
                    .breaker_open
                    .get_or_create(&labels(&self.handler))
                    .set(0);
                self.health.recover(&condition);
                None
            }
        }
    }

    /// How long a held message waits: until the breaker's time, plus a random part of a quarter of
    /// `open_for`, so that the message let through as the next probe is a different one each time (a
    /// message that always fails cannot keep the breaker open by always being the probe).
    pub fn hold_for(&self, until: Instant, unit: f64) -> Duration {
        until.saturating_duration_since(Instant::now()) + (self.spec.open_for / 4).mul_f64(unit)
    }

    /// The handler is gone from the config: nothing of its breaker is reported any more.
    fn forget(&self) {
        global()
            .breaker_open
            .get_or_create(&labels(&self.handler))
            .set(0);
        self.health.recover(&self.condition());
    }

    fn condition(&self) -> String {
        format!("breaker:{}", self.handler)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn labels(handler: &str) -> HandlerLabels {
    HandlerLabels {
        handler: handler.to_owned(),
    }
}

/// The window is counted in this many buckets (a call leaves the count up to a tenth of the window
/// late).
const BUCKETS: u64 = 10;

/// A breaker's state, without I/O: the calls of the window, and the phase.
#[derive(Debug)]
pub struct BreakerState {
    base: Instant,
    /// Per bucket: its number (time since `base` in bucket widths), calls, failures.
    buckets: [(u64, u32, u32); BUCKETS as usize],
    phase: Phase,
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    Closed,
    Open {
        until: Instant,
    },
    /// Message `id` went through as the probe; if nothing is heard of it by `until`, another may.
    Probing {
        id: String,
        until: Instant,
    },
}

/// How a call's end changed the breaker.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    Opened(String),
    Reopened(String),
    Closed,
}

impl BreakerState {
    pub fn new(now: Instant) -> BreakerState {
        BreakerState {
            base: now,
            buckets: [(0, 0, 0); BUCKETS as usize],
            phase: Phase::Closed,
        }
    }

    /// Whether `id` may run, and whether it runs as the probe.
    pub fn admit(&mut self, spec: &BreakerSpec, id: &str, now: Instant) -> (Admit, bool) {
        match &self.phase {
            Phase::Closed => (Admit::Run, false),
            Phase::Open { until } | Phase::Probing { until, .. } if now < *until => {
                (Admit::Hold(*until), false)
            }
            // Time for a probe (or the last probe was never heard of: its loop stopped first).
            _ => {
                self.phase = Phase::Probing {
                    id: id.to_owned(),
                    until: now + spec.open_for,
                };
                (Admit::Run, true)
            }
        }
    }

    /// A call of `id` ended, failed (with its reason) or not.
    pub fn record(
        &mut self,
        spec: &BreakerSpec,
        id: &str,
        failed: Option<&str>,
        now: Instant,
    ) -> Option<Change> {
        match &self.phase {
            Phase::Closed => {
                let (calls, failures) = self.count(spec, failed.is_some(), now);
                let over =
                    u64::from(failures) * 100 >= u64::from(spec.failure_percent) * u64::from(calls);
                if calls >= spec.min_calls && over {
                    self.phase = Phase::Open {
                        until: now + spec.open_for,
                    };
                    let window = humantime::format_duration(spec.window);
                    let last = failed.unwrap_or("-");
                    return Some(Change::Opened(format!(
                        "{failures} of {calls} calls failed within {window} (last: {last})"
                    )));
                }
                None
            }
            // Calls that started before the breaker opened end while it is open: not counted.
            Phase::Open { .. } => None,
            Phase::Probing { id: probe, .. } if probe != id => None,
            Phase::Probing { .. } => match failed {
                Some(why) => {
                    self.phase = Phase::Open {
                        until: now + spec.open_for,
                    };
                    Some(Change::Reopened(why.to_owned()))
                }
                None => {
                    self.phase = Phase::Closed;
                    self.buckets = [(0, 0, 0); BUCKETS as usize];
                    Some(Change::Closed)
                }
            },
        }
    }

    /// Counts a call, and returns the calls and failures of the window.
    fn count(&mut self, spec: &BreakerSpec, failed: bool, now: Instant) -> (u32, u32) {
        let width = (spec.window.as_nanos() / u128::from(BUCKETS)).max(1);
        let at = u64::try_from(now.saturating_duration_since(self.base).as_nanos() / width)
            .unwrap_or(u64::MAX);
        let slot = &mut self.buckets[(at % BUCKETS) as usize];
        if slot.0 != at {
            *slot = (at, 0, 0);
        }
        slot.1 += 1;
        slot.2 += u32::from(failed);
        self.buckets
            .iter()
            .filter(|(b, _, _)| *b + BUCKETS > at)
            .fold((0, 0), |(c, f), (_, bc, bf)| (c + bc, f + bf))
    }
}

/// A rate limit shared through Redis: permits are taken from a Redis-held schedule (GCRA: the time
/// the next permit is free, advanced by one interval per permit, with 50 ms of burst) in batches no
/// larger than the calls waiting, so every daemon of every host together stays within the rate.
pub struct RateLimit {
    handler: Arc<str>,
    spec: RateSpec,
    /// Permits taken and not used yet; its lock serves waiters in the order they came.
    permits: tokio::sync::Mutex<u64>,
    waiting: AtomicUsize,
}

impl RateLimit {
    fn new(handler: &str, spec: RateSpec) -> RateLimit {
        RateLimit {
            handler: handler.into(),
            spec,
            permits: tokio::sync::Mutex::new(0),
            waiting: AtomicUsize::new(0),
        }
    }

    /// A permit at once, if one was taken and is unused.
    pub fn try_take(&self) -> bool {
        match self.permits.try_lock() {
            Ok(mut p) if *p > 0 => {
                *p -= 1;
                true
            }
            _ => false,
        }
    }

    /// Waits for a permit. Redis out of reach holds the call back (the limit is kept, not guessed).
    pub async fn acquire(&self, client: &Client, stream: &str) {
        /// Counts a waiter until it has its permit or is cancelled (a drain drops the wait).
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        let mut permits = self.permits.lock().await;
        let mut failures = 0u32;
        loop {
            if *permits > 0 {
                *permits -= 1;
                return;
            }
            let want = (self.waiting.load(Ordering::Relaxed) as u64).clamp(1, self.spec.batch());
            let taken = client
                .take_permits(
                    stream,
                    &self.handler,
                    self.spec.interval_us(),
                    self.spec.batch(),
                    want,
                )
                .await;
            match taken {
                Ok((0, wait)) => tokio::time::sleep(wait.max(Duration::from_millis(1))).await,
                Ok((n, _)) => {
                    failures = 0;
                    *permits += n;
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(handler = %self.handler, error = %e, "cannot take rate-limit permits from Redis; calls wait");
                    }
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(failures.min(10))))
                        .await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BreakerSpec {
        BreakerSpec {
            failure_percent: 50,
            min_calls: 4,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
        }
    }

    #[test]
    fn a_breaker_opens_at_its_threshold_holds_probes_once_and_closes_on_success() {
        let s = spec();
        let t0 = Instant::now();
        let mut b = BreakerState::new(t0);
        // Three calls are fewer than min_calls, however many failed.
        for id in ["1", "2", "3"] {
            assert_eq!(b.record(&s, id, Some("down"), t0), None);
        }
        assert_eq!(b.admit(&s, "x", t0), (Admit::Run, false));
        let opened = b.record(&s, "4", None, t0);
        assert!(
            matches!(&opened, Some(Change::Opened(why)) if why.starts_with("3 of 4 calls failed")),
            "{opened:?}"
        );
        let until = t0 + s.open_for;
        assert_eq!(b.admit(&s, "5", t0), (Admit::Hold(until), false));
        // A call that began before it opened ends now: not counted.
        assert_eq!(b.record(&s, "old", Some("down"), t0), None);
        // Its time is up: one probe, the others wait for it.
        assert_eq!(b.admit(&s, "5", until), (Admit::Run, true));
        let probe_until = until + s.open_for;
        assert_eq!(b.admit(&s, "6", until), (Admit::Hold(probe_until), false));
        // The probe fails: open again.
        assert_eq!(
            b.record(&s, "5", Some("still down"), until),
            Some(Change::Reopened("still down".into()))
        );
        assert_eq!(b.admit(&s, "6", until), (Admit::Hold(probe_until), false));
        // A probe never heard of (its loop stopped) is replaced once its time is up.
        assert_eq!(b.admit(&s, "6", probe_until), (Admit::Run, true));
        let later = probe_until + s.open_for;
        assert_eq!(b.admit(&s, "7", later), (Admit::Run, true));
        assert_eq!(
            b.record(&s, "6", None, later),
            None,
            "not the probe any more"
        );
        assert_eq!(b.record(&s, "7", None, later), Some(Change::Closed));
        assert_eq!(b.admit(&s, "8", later), (Admit::Run, false));
        // Closed afresh: the failures before do not count.
        assert_eq!(b.record(&s, "9", Some("down"), later), None);
    }

    #[test]
    fn a_breaker_counts_only_the_calls_of_its_window_and_below_the_threshold_stays_closed() {
        let s = spec();
        let t0 = Instant::now();
        let mut b = BreakerState::new(t0);
        for i in 0..3 {
            b.record(&s, &i.to_string(), Some("down"), t0);
        }
        // The three failures have left the window when the next come.
        let t1 = t0 + s.window + Duration::from_secs(1);
        for i in 0..3 {
            assert_eq!(b.record(&s, &format!("b{i}"), None, t1), None);
        }
        assert_eq!(b.record(&s, "b3", Some("down"), t1), None, "1 of 4 failed");
        assert_eq!(b.record(&s, "b4", Some("down"), t1), None, "2 of 5 is 40 %");
        assert!(
            matches!(
                b.record(&s, "b5", Some("down"), t1),
                Some(Change::Opened(_))
            ),
            "3 of 6"
        );
    }

    #[test]
    fn a_reload_keeps_the_state_of_unchanged_guards_and_reports_removed_breakers_closed() {
        let health = Arc::new(Health::default());
        let guards = Guards::new(health.clone());
        let open = GuardSpec {
            breaker: Some(BreakerSpec {
                min_calls: 1,
                ..BreakerSpec::default()
            }),
            ..GuardSpec::default()
        };
        guards.configure(&[("a".into(), open.clone()), ("b".into(), open.clone())]);
        let a = guards.get("a").unwrap();
        a.breaker.as_ref().unwrap().record("1", Some("down"));
        assert_eq!(health.degraded().len(), 1, "{:?}", health.degraded());
        let slower = GuardSpec {
            rate: Some(RateSpec {
                count: 1,
                per: Duration::from_secs(1),
            }),
            ..open.clone()
        };
        // a unchanged (still open), b changed (closed afresh), c new without guards.
        guards.configure(&[
            ("a".into(), open.clone()),
            ("b".into(), slower),
            ("c".into(), GuardSpec::default()),
        ]);
        assert!(Arc::ptr_eq(&a, &guards.get("a").unwrap()));
        assert!(matches!(
            guards
                .get("a")
                .unwrap()
                .breaker
                .as_ref()
                .unwrap()
                .admit("2"),
            Admit::Hold(_)
        ));
        assert!(guards.get("b").unwrap().rate.is_some());
        assert!(guards.get("c").is_none());
        // a removed: its condition goes with it.
        guards.configure(&[("b".into(), open)]);
        assert!(guards.get("a").is_none());
        assert!(health.degraded().is_empty(), "{:?}", health.degraded());
    }

    #[test]
    fn a_rate_takes_permits_by_the_interval_in_batches_of_50_ms() {
        let r = RateSpec {
            count: 200,
            per: Duration::from_secs(1),
        };
        assert_eq!((r.interval_us(), r.batch()), (5000, 10));
        assert_eq!(r.to_string(), "200/s");
        let slow = RateSpec {
            count: 30,
            per: Duration::from_secs(60),
        };
        assert_eq!((slow.interval_us(), slow.batch()), (2_000_000, 1));
        assert_eq!(slow.to_string(), "30/m");
    }
}
