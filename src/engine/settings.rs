//! What one consumer loop runs with: its group, its limits, and which handler its messages go to.
//!
//! Owns [`ConsumerSettings`] and [`HandlerSpec`], plain data that config builds and validates. Turning a
//! spec into a running handler is the daemon's job ([`crate::daemon::prepare`]).

use std::sync::Arc;
use std::time::Duration;

use super::router::Unmatched;

impl ConsumerSettings {
    /// Whether `other` runs the same loop: everything but the route table, which a reload swaps
    /// without restarting the loop.
    pub fn same_loop(&self, other: &ConsumerSettings) -> bool {
        let mut a = self.clone();
        a.routes.clone_from(&other.routes);
        a == *other
    }
}
use crate::model::EntryLimit;

/// One consumer group to consume, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct ConsumerSettings {
    pub stream: Arc<str>,
    pub group: String,
    /// Stable across restarts: derived from the daemon identity, host and instance unless configured.
    pub consumer: String,
    /// Where a newly created group starts: `$` (new entries only), `0` (the whole stream) or an id.
    pub start: String,
    pub batch_size: usize,
    pub block: Duration,
    pub claim_min_idle: Duration,
    pub claim_interval: Duration,
    pub max_deliveries: u32,
    pub dead_letter: String,
    pub in_flight: usize,
    pub order_by: Option<String>,
    /// The one handler of every message; None routes them with `routes`.
    pub handler: Option<HandlerSpec>,
    /// The route table when `handler` is None: the consumer's own `[[consumers.routes]]`, else the
    /// top-level `[[routes]]` that match its stream, in config order (first match wins).
    pub routes: Vec<super::router::RouteSpec>,
    /// What to do with a message no route matches.
    pub unmatched: Unmatched,
    pub handler_timeout: Duration,
    /// When a message a handler asked to retry is tried again; None: when it has idled
    /// `claim_min_idle`.
    pub retry: Option<RetrySchedule>,
    /// How large an entry may be (`[limits]`); larger ones are dead-lettered by reference.
    pub entry_limit: EntryLimit,
}

/// Which handler a consumer runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandlerSpec {
    Drop,
    Forward {
        to: String,
    },
    /// A `[[handlers]]` entry by name.
    Wasm(String),
    #[cfg(feature = "fault-injection")]
    Faults(FaultSpec),
}

/// Options of the `faults` test handler.
#[cfg(feature = "fault-injection")]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultSpec {
    /// Its `[[handlers]]` name; empty for a consumer's own (`faults`). A consumer naming a
    /// `[[handlers]]` faults entry gets its options from there (`daemon::prepare`).
    pub name: String,
    pub reply_to: Option<String>,
    pub fail_field: Option<String>,
    pub fail_deliveries: u64,
    pub fail_every: u64,
    pub sleep: Duration,
    pub fail_while_file: Option<std::path::PathBuf>,
}

impl std::fmt::Display for HandlerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandlerSpec::Drop => f.write_str("drop"),
            HandlerSpec::Forward { to } => write!(f, "forward to {to}"),
            HandlerSpec::Wasm(name) => write!(f, "handler {name}"),
            #[cfg(feature = "fault-injection")]
            HandlerSpec::Faults(_) => f.write_str("faults (test handler)"),
        }
    }
}

impl HandlerSpec {
    /// Streams this handler writes to, for the start-up permission check.
    pub fn writes(&self) -> Vec<&str> {
        match self {
            HandlerSpec::Drop => Vec::new(),
            HandlerSpec::Forward { to } => vec![to.as_str()],
            // A WASM handler's replies are checked against its roles when it publishes.
            HandlerSpec::Wasm(_) => Vec::new(),
            #[cfg(feature = "fault-injection")]
            HandlerSpec::Faults(f) => f.reply_to.iter().map(String::as_str).collect(),
        }
    }
}

/// `retry = { backoff = [...], jitter = "20%" }`: how long a message waits before its next delivery
/// after a handler asked to retry it — the step of its delivery count, the last one repeating — give or
/// take the jitter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetrySchedule {
    pub backoff: Vec<Duration>,
    /// Percent of a step added or taken at random, so retries of one outage spread out.
    pub jitter_percent: u32,
}

impl RetrySchedule {
    /// The wait after delivery `deliveries` failed; `unit` in [0, 1) picks within the jitter.
    pub fn after(&self, deliveries: u64, unit: f64) -> Duration {
        let step = usize::try_from(deliveries.saturating_sub(1)).unwrap_or(usize::MAX);
        let base = self.backoff[step.min(self.backoff.len() - 1)];
        let spread = f64::from(self.jitter_percent) / 100.0;
        base.mul_f64((1.0 + spread * (2.0 * unit - 1.0)).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_takes_the_step_of_the_delivery_and_repeats_its_last() {
        let s = RetrySchedule {
            backoff: ["1s", "5s", "30s"]
                .iter()
                .map(|d| humantime::parse_duration(d).unwrap())
                .collect(),
            jitter_percent: 0,
        };
        let secs = |n| s.after(n, 0.3).as_secs();
        assert_eq!(
            [secs(1), secs(2), secs(3), secs(4), secs(40)],
            [1, 5, 30, 30, 30]
        );
        let j = RetrySchedule {
            jitter_percent: 20,
            ..s
        };
        assert_eq!(j.after(2, 0.0), Duration::from_secs(4));
        assert_eq!(j.after(2, 0.5), Duration::from_secs(5));
        assert!(j.after(2, 0.999) < Duration::from_secs(6));
    }
}
