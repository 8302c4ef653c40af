//! What the running daemon tells systemd and the metrics about its health: the watchdog ping, sent
//! only while every loop is healthy; the STATUS= line every 5 s (and with READY=1); the degraded and
//! Redis-unreachable gauges every second; and the log file writer's dropped lines.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{error, warn};

use super::control::Vitals;
use crate::engine::Stats;
use crate::health::Health;
use crate::notify::Notifier;
use crate::shutdown::Shutdown;

/// The STATUS= line: what the loops did, and at what rate since the last line.
pub struct Status {
    vitals: Arc<Vitals>,
    last: Option<(u64, tokio::time::Instant)>,
    /// Entries pending across the groups, as last polled.
    pub pending: Arc<AtomicU64>,
}

impl Status {
    pub fn new(vitals: Arc<Vitals>) -> Self {
        Status {
            vitals,
            last: None,
            pending: Arc::default(),
        }
    }

    pub fn line(&mut self) -> String {
        let stats = self.vitals.stats();
        let sum =
            |f: fn(&Stats) -> &AtomicU64| -> u64 { stats.iter().map(|s| f(s).load(Relaxed)).sum() };
        let processed = sum(|s| &s.processed);
        let now = tokio::time::Instant::now();
        let rate = match self.last {
            Some((before, at)) => {
                processed.saturating_sub(before) as f64
                    / now.duration_since(at).as_secs_f64().max(0.001)
            }
            None => 0.0,
        };
        self.last = Some((processed, now));
        let mut line = format!(
            "{} consumers; processed {processed} ({rate:.1}/s); pending {}; retried {}; dead-lettered {}",
            stats.len(),
            self.pending.load(Relaxed),
            sum(|s| &s.retried),
            sum(|s| &s.dead_lettered)
        );
        let degraded = self.vitals.health.degraded();
        if !degraded.is_empty() {
            line.push_str("; degraded: ");
            line.push_str(&degraded.join("; "));
        }
        line
    }

    /// The line, from a status shared with the service.
    pub fn shared(status: &Mutex<Status>) -> String {
        status.lock().unwrap_or_else(|p| p.into_inner()).line()
    }
}

/// The service: runs until `stop`.
pub async fn watch(health: Arc<Health>, status: Arc<Mutex<Status>>, mut stop: Shutdown) {
    let notify = Notifier;
    // Pings at half the interval systemd expects, only while every loop is healthy.
    let watchdog_every = Notifier::watchdog_interval().map(|d| d / 2);
    let mut watchdog = tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
    let mut status_tick = tokio::time::interval(Duration::from_secs(5));
    let mut gauges = tokio::time::interval(Duration::from_secs(1));
    let mut withheld = false;
    let mut log_dropped = 0;
    loop {
        tokio::select! {
            _ = stop.wait() => return,
            _ = watchdog.tick(), if watchdog_every.is_some() => {
                let stuck = health.unhealthy();
                if stuck.is_empty() {
                    notify.watchdog();
                    withheld = false;
                } else if !withheld {
                    error!(loops = ?stuck, "consumer loops are not making progress; withholding the watchdog ping");
                    withheld = true;
                }
            }
            _ = gauges.tick() => {
                let m = crate::metrics::global();
                m.degraded.set(i64::from(!health.degraded().is_empty()));
                m.redis_unreachable.set(i64::from(health.redis_unreachable()));
            }
            _ = status_tick.tick() => {
                notify.status(&Status::shared(&status));
                let dropped = crate::logging::dropped_lines();
                if dropped > log_dropped {
                    warn!(dropped = dropped - log_dropped, "the log file writer could not keep up and dropped lines");
                    log_dropped = dropped;
                }
            }
        }
    }
}
