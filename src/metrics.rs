//! Metrics: what the daemon counts and measures, served as Prometheus text on a loopback address.
//!
//! Owns the metric families (one process-wide registry, [`global`]) and the HTTP endpoint. Code that
//! does the work records into the families; the consumer loops cache their counters so the hot path
//! does no label lookups. Stream-side numbers (pending, lag, length) are polled by the engine.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::shutdown::Shutdown;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabels {
    pub stream: String,
    pub group: String,
    pub handler: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub stream: String,
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub stream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandlerLabels {
    pub handler: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    /// Messages by outcome: success, retry, dead_lettered, vanished, not_ours, denied, dropped.
    pub messages: Family<MessageLabels, Counter>,
    pub handler_seconds: HistogramFamily<HandlerLabels>,
    /// Redis round trips by operation: publish, read, create_group, read_group, ack, claim, other.
    pub redis_seconds: HistogramFamily<OpLabels>,
    pub errors: Family<KindLabels, Counter>,
    pub pending: Family<GroupLabels, Gauge>,
    pub lag: Family<GroupLabels, Gauge>,
    /// What a loop's pace allows now (engine/pace.rs): entries per read, and entries in flight.
    pub read_size: Family<GroupLabels, Gauge>,
    pub window: Family<GroupLabels, Gauge>,
    pub stream_length: Family<StreamLabels, Gauge>,
    /// Messages of a group waiting for their retry's time (a consumer's `retry` schedule).
    pub retries_scheduled: Family<GroupLabels, Gauge>,
    /// Delayed messages held for a stream (client::delayed), as this daemon last counted them.
    pub delayed: Family<StreamLabels, Gauge>,
    /// Delayed messages this daemon moved to their stream at their time.
    pub delayed_moved: Family<StreamLabels, Counter>,
    pub dead_lettered: Family<GroupLabels, Counter>,
    /// 1 while a handler's breaker is open (or probing), else 0; only handlers with a breaker.
    pub breaker_open: Family<HandlerLabels, Gauge>,
    /// Messages held back by a handler's open breaker (each time it held one).
    pub breaker_held: Family<HandlerLabels, Counter>,
    /// Calls that waited for a permit of their handler's rate limit.
    pub rate_waited: Family<HandlerLabels, Counter>,
    pub publish_denied: Family<HandlerLabels, Counter>,
    /// Handlers' outbound HTTP requests, by allow-list entry and outcome.
    pub http_requests: Family<HttpLabels, Counter>,
    /// Time to an outbound response's head (or to its failure), by allow-list entry.
    pub http_seconds: HistogramFamily<HttpHostLabels>,
    /// Times a loop got Redis back after losing it.
    pub reconnects: Counter,
    /// Redis outages this daemon got over: loops getting Redis back within 30 s of each other count
    /// once (one Redis restart is one outage, however many loops the daemon runs).
    pub outages: Counter,
    /// Times a loop found its stream gone or made anew, by stream: Redis lost data it had.
    pub data_loss: Family<StreamLabels, Counter>,
    pub handler_peak_memory: Family<HandlerLabels, Gauge>,
    /// 1 while the daemon is degraded (heartbeat `status`), else 0.
    pub degraded: Gauge,
    /// 1 while a consumer loop cannot reach Redis (between its first failed read and its next good
    /// one), else 0.
    pub redis_unreachable: Gauge,
    /// 1 while heartbeats cannot be published (failing for 4 s or more), else 0.
    pub heartbeat_failing: Gauge,
    /// When this process started (Unix seconds): `changes()` over it counts restarts, which a scrape
    /// that misses the few seconds a crashed daemon is down would not see in `up`.
    pub start_time: Gauge,
    /// 1 while a reloaded config holds settings only a restart applies (`[redis]`, `[identity]`).
    pub restart_needed: Gauge,
    /// Outbox entries a relay handled (Redis Cluster), by source stream and outcome: delivered,
    /// repeated (delivered before a crash or claim; not written again), refused (left pending).
    pub relayed: Family<RelayLabels, Counter>,
    /// Per handler, the same durations as `handler_seconds`, in a form the daemon can read back for
    /// its heartbeat (`redstream status` shows p50/p99): Prometheus histograms cannot be read.
    handler_quantiles: RwLock<HashMap<String, Arc<Quantiles>>>,
}

/// Durations in the buckets of [`latency_histogram`] (50 µs · 2^i, then one for the rest), counted
/// with atomics.
#[derive(Default)]
pub struct Quantiles {
    buckets: [AtomicU64; 20],
    /// Calls that failed: a retry, or a dead letter the handler decided (reject, last retry).
    failed: AtomicU64,
}

impl Quantiles {
    pub fn observe(&self, secs: f64) {
        let mut bound = 0.000_05;
        let mut i = 0;
        while i < 19 && secs > bound {
            bound *= 2.0;
            i += 1;
        }
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    /// How many durations, and the upper bounds (ms) of the buckets holding the median and the 99th
    /// percentile (None while empty; the last bucket has no bound: reported as its lower one).
    pub fn snapshot(&self) -> (u64, Option<f64>, Option<f64>) {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let at = |q: f64| -> Option<f64> {
            if total == 0 {
                return None;
            }
            let want = (q * total as f64).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, n) in counts.iter().enumerate() {
                seen += n;
                if seen >= want {
                    return Some(0.05 * 2f64.powi(i.min(18) as i32));
                }
            }
            None
        };
        (total, at(0.5), at(0.99))
    }

    /// Failed calls so far.
    pub fn failures(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

/// One handler's figures as the heartbeat reports them: calls since start, the p50 and p99 bucket
/// bounds (ms), failed calls.
#[derive(Debug, serde::Serialize)]
pub struct HandlerFigures {
    pub handler: String,
    pub calls: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub failed: u64,
}

/// One handler's duration meters: the Prometheus histogram and its readable twin.
#[derive(Clone)]
pub struct HandlerTimer {
    histogram: Histogram,
    quantiles: Arc<Quantiles>,
}

impl HandlerTimer {
    pub fn observe(&self, secs: f64) {
        self.histogram.observe(secs);
        self.quantiles.observe(secs);
    }

    /// A call of this handler failed (for `redstream status`; the outcome counters have it too).
    pub fn failed(&self) {
        self.quantiles.failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// An outbound HTTP request of a handler: the allow-list entry it matched (empty when refused) and how
/// it ended (`2xx`…`5xx`, `denied`, `timeout`, `error`, `too_large`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub handler: String,
    pub host: String,
    pub outcome: String,
}

/// An allowed outbound request's handler and allow-list entry.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpHostLabels {
    pub handler: String,
    pub host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelayLabels {
    pub stream: String,
    pub outcome: String,
}

fn latency_histogram() -> Histogram {
    // 50 µs … ~13 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 19))
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("redstream");
        let m = Metrics {
            messages: Family::default(),
            handler_seconds: Family::new_with_constructor(latency_histogram),
            redis_seconds: Family::new_with_constructor(latency_histogram),
            errors: Family::default(),
            pending: Family::default(),
            lag: Family::default(),
            read_size: Family::default(),
            window: Family::default(),
            stream_length: Family::default(),
            retries_scheduled: Family::default(),
            delayed: Family::default(),
            delayed_moved: Family::default(),
            dead_lettered: Family::default(),
            breaker_open: Family::default(),
            breaker_held: Family::default(),
            rate_waited: Family::default(),
            publish_denied: Family::default(),
            http_requests: Family::default(),
            http_seconds: Family::new_with_constructor(latency_histogram),
            reconnects: Counter::default(),
            outages: Counter::default(),
            data_loss: Family::default(),
            handler_peak_memory: Family::default(),
            degraded: Gauge::default(),
            redis_unreachable: Gauge::default(),
            heartbeat_failing: Gauge::default(),
            start_time: Gauge::default(),
            restart_needed: Gauge::default(),
            relayed: Family::default(),
            handler_quantiles: RwLock::default(),
            registry: Registry::default(),
        };
        registry.register(
            "messages",
            "Messages handled, by outcome",
            m.messages.clone(),
        );
        registry.register(
            "handler_duration_seconds",
            "Time in a handler per message",
            m.handler_seconds.clone(),
        );
        registry.register(
            "redis_duration_seconds",
            "Redis round trips, by operation",
            m.redis_seconds.clone(),
        );
        registry.register("errors", "Errors, by kind", m.errors.clone());
        registry.register(
            "pending_entries",
            "Entries delivered to a group and not yet acked",
            m.pending.clone(),
        );
        registry.register(
            "group_lag",
            "Entries not yet delivered to a group",
            m.lag.clone(),
        );
        registry.register(
            "read_size",
            "Entries a group's next read asks for, as its pace sets it (at most batch_size)",
            m.read_size.clone(),
        );
        registry.register(
            "in_flight_window",
            "Entries a group may hold in flight, as its pace sets it (at most in_flight)",
            m.window.clone(),
        );
        registry.register(
            "stream_length",
            "Entries in a consumed stream",
            m.stream_length.clone(),
        );
        registry.register(
            "retries_scheduled",
            "Messages of a group waiting for the time of their retry (consumers with a retry schedule)",
            m.retries_scheduled.clone(),
        );
        registry.register(
            "delayed_messages",
            "Delayed messages held for a stream until their time",
            m.delayed.clone(),
        );
        registry.register(
            "delayed_moved",
            "Delayed messages moved to their stream at their time",
            m.delayed_moved.clone(),
        );
        registry.register(
            "dead_lettered",
            "Messages moved to a dead-letter stream",
            m.dead_lettered.clone(),
        );
        registry.register(
            "publish_denied",
            "Handler publishes refused by their roles",
            m.publish_denied.clone(),
        );
        registry.register(
            "handler_http_requests",
            "Outbound HTTP requests of handlers, by allow-list entry and outcome (status class, denied, timeout, error, too_large)",
            m.http_requests.clone(),
        );
        registry.register(
            "handler_http_duration_seconds",
            "Time from an outbound request to its response head, by handler and allow-list entry",
            m.http_seconds.clone(),
        );
        registry.register(
            "redis_reconnects",
            "Times a consumer loop got Redis back",
            m.reconnects.clone(),
        );
        registry.register(
            "redis_outages",
            "Redis outages the daemon got over (its loops reconnecting within 30 s count once)",
            m.outages.clone(),
        );
        registry.register(
            "redis_data_loss",
            "Times a consumer loop found its stream gone or made anew (Redis lost its data), by stream",
            m.data_loss.clone(),
        );
        registry.register(
            "handler_peak_memory_bytes",
            "The most linear memory a handler instance asked for",
            m.handler_peak_memory.clone(),
        );
        registry.register(
            "degraded",
            "1 while the daemon is degraded (failing commits, Redis trouble, a lapsing token, a stuck loop)",
            m.degraded.clone(),
        );
        registry.register(
            "redis_unreachable",
            "1 while a consumer loop cannot reach Redis",
            m.redis_unreachable.clone(),
        );
        registry.register(
            "heartbeat_failing",
            "1 while the daemon's heartbeats cannot be published (redstream status counts it missing)",
            m.heartbeat_failing.clone(),
        );
        registry.register(
            "start_time_seconds",
            "When the daemon process started, in Unix seconds",
            m.start_time.clone(),
        );
        m.start_time
            .set((crate::model::envelope::now_ms() / 1000) as i64);
        registry.register(
            "restart_needed",
            "1 while the config file holds [redis] or [identity] settings the running daemon does not (applied at the next restart)",
            m.restart_needed.clone(),
        );
        registry.register(
            "breaker_open",
            "1 while the handler's breaker is open: its messages wait, no delivery counted, until a probe succeeds",
            m.breaker_open.clone(),
        );
        registry.register(
            "breaker_held",
            "Messages held back by the handler's open breaker",
            m.breaker_held.clone(),
        );
        registry.register(
            "rate_waited",
            "Calls that waited for a permit of the handler's rate limit",
            m.rate_waited.clone(),
        );
        registry.register(
            "relayed",
            "Outbox entries relayed to streams in other cluster slots, by source stream and outcome",
            m.relayed.clone(),
        );
        // Counters are exported at 0 from the start, so that dashboards and rate() work on a healthy
        // daemon and an alert sees the first increment.
        for kind in ERROR_KINDS {
            let _ = m.errors.get_or_create(&KindLabels {
                kind: (*kind).to_owned(),
            });
        }
        Metrics { registry, ..m }
    }

    /// A handler's own series at 0 (publish refusals), once it is loaded.
    pub fn handler_loaded(&self, handler: &str) {
        let _ = self.publish_denied.get_or_create(&HandlerLabels {
            handler: handler.to_owned(),
        });
    }

    /// A relay's series at 0, by outcome, once it starts.
    pub fn relay_started(&self, stream: &str) {
        for outcome in ["delivered", "repeated", "refused", "unreplicated"] {
            let _ = self.relayed.get_or_create(&RelayLabels {
                stream: stream.to_owned(),
                outcome: outcome.to_owned(),
            });
        }
    }

    /// The Prometheus text exposition of everything.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// The duration meters of `handler` (look it up once, observe often).
    pub fn handler_timer(&self, handler: &str) -> HandlerTimer {
        let histogram = self
            .handler_seconds
            .get_or_create(&HandlerLabels {
                handler: handler.to_owned(),
            })
            .clone();
        let known = self
            .handler_quantiles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(handler)
            .cloned();
        let quantiles = known.unwrap_or_else(|| {
            self.handler_quantiles
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .entry(handler.to_owned())
                .or_default()
                .clone()
        });
        HandlerTimer {
            histogram,
            quantiles,
        }
    }

    /// Per handler since start: calls, p50 and p99 in ms (bucket bounds), sorted by name.
    pub fn handler_quantiles(&self) -> Vec<HandlerFigures> {
        let map = self
            .handler_quantiles
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = map
            .iter()
            .map(|(name, q)| {
                let (calls, p50_ms, p99_ms) = q.snapshot();
                HandlerFigures {
                    handler: name.clone(),
                    calls,
                    p50_ms,
                    p99_ms,
                    failed: q.failures(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.handler.cmp(&b.handler));
        out
    }

    /// A loop got Redis back: counts the reconnect, and an outage unless another loop's reconnect
    /// counted one in the last 30 s.
    pub fn reconnected(&self) {
        static LAST_OUTAGE_MS: AtomicU64 = AtomicU64::new(0);
        self.reconnects.inc();
        let now = crate::model::envelope::now_ms();
        let last = LAST_OUTAGE_MS.load(Ordering::Relaxed);
        if now.saturating_sub(last) > 30_000
            && LAST_OUTAGE_MS
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.outages.inc();
        }
    }

    /// Counts an error of `kind`.
    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }
}

/// Every `kind` of `redstream_errors_total`: the client's error kinds ([`crate::client::Error::kind`])
/// and the engine's own.
pub const ERROR_KINDS: &[&str] = &[
    "invalid_name",
    "unauthenticated",
    "unauthorized",
    "config",
    "not_found",
    "aborted",
    "cross_slot",
    "connection",
    "timeout",
    "redis_auth",
    "redis_denied",
    "no_group",
    "redis",
    "protocol",
    "loop_restart",
    "commit_failed",
    "commit_partial",
    "commit_refused",
    "dead_letter_refused",
    "reply_refused",
    "replayed",
];

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// The operation label of a Redis command, for `redis_duration_seconds`.
pub fn op_of(command: &str) -> &'static str {
    match command {
        "XADD" => "publish",
        "XRANGE" | "XREVRANGE" => "read",
        "XGROUP CREATE" => "create_group",
        "XREADGROUP" => "read_group",
        "XACK" | "EVALSHA" => "ack",
        "XCLAIM" | "XAUTOCLAIM" => "claim",
        _ => "other",
    }
}

/// Binds the metrics address (at start, so a taken port is an error before READY).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves `GET /metrics` until `shutdown`; anything else is a 404. An accept error (EMFILE when the
/// process is out of file descriptors, ENOBUFS…) is logged once per streak and retried with backoff, so
/// the endpoint outlives it. Connections are tracked and closed at shutdown; this returns when the last
/// one has ended.
pub async fn serve(listener: tokio::net::TcpListener, mut shutdown: Shutdown) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
    }
    let connections = TaskTracker::new();
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    if backoff.succeed() > 0 {
                        tracing::info!("the metrics endpoint accepts connections again");
                    }
                    stream
                }
                Err(e) => {
                    let delay = backoff.fail();
                    if backoff.failures() == 1 {
                        tracing::warn!(error = %e, retry_in = ?delay, "the metrics endpoint cannot accept a connection; retrying");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = shutdown.wait() => break,
                    }
                }
            },
            _ = shutdown.wait() => break,
        };
        let stop = shutdown.clone();
        connections.spawn(async move {
            let service =
                hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let response = if req.uri().path() == "/metrics" {
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(Full::new(Bytes::from(global().encode())))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"not found\n")))
                    };
                    response.map_err(std::io::Error::other)
                });
            if let Err(e) = crate::http::serve_connection(stream, service, stop).await {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
    connections.close();
    connections.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `redstream_…` metric name in `text`.
    fn metric_names(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("redstream_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            if !out.contains(&name) {
                out.push(name);
            }
        }
        out
    }

    #[test]
    fn quantiles_come_from_the_buckets_of_the_histogram() {
        let q = Quantiles::default();
        assert_eq!(q.snapshot(), (0, None, None));
        for _ in 0..98 {
            q.observe(0.000_04); // ≤ 50 µs
        }
        q.observe(0.003); // ≤ 3.2 ms
        q.observe(100.0); // past the last bound
        let (n, p50, p99) = q.snapshot();
        assert_eq!(n, 100);
        assert_eq!(p50, Some(0.05));
        assert_eq!(p99, Some(3.2));
        q.observe(100.0);
        q.observe(100.0);
        assert_eq!(q.snapshot().2, Some(0.05 * 2f64.powi(18)));
    }

    #[test]
    fn the_shipped_alert_rules_and_dashboard_query_only_metrics_the_daemon_exposes() {
        let m = Metrics::new();
        // A family shows in the exposition once it has a series: give each one.
        let group = GroupLabels {
            stream: "s".into(),
            group: "g".into(),
        };
        let handler = HandlerLabels {
            handler: "h".into(),
        };
        m.messages
            .get_or_create(&MessageLabels {
                stream: "s".into(),
                group: "g".into(),
                handler: "h".into(),
                outcome: "success".into(),
            })
            .inc();
        m.handler_seconds.get_or_create(&handler).observe(0.1);
        m.redis_seconds
            .get_or_create(&OpLabels { op: "ack".into() })
            .observe(0.1);
        m.error("timeout");
        m.pending.get_or_create(&group).set(1);
        m.lag.get_or_create(&group).set(1);
        m.read_size.get_or_create(&group).set(16);
        m.window.get_or_create(&group).set(64);
        m.stream_length
            .get_or_create(&StreamLabels { stream: "s".into() })
            .set(1);
        m.dead_lettered.get_or_create(&group).inc();
        m.publish_denied.get_or_create(&handler).inc();
        m.reconnects.inc();
        m.outages.inc();
        m.data_loss
            .get_or_create(&StreamLabels { stream: "s".into() })
            .inc();
        m.handler_peak_memory.get_or_create(&handler).set(1);
        m.breaker_open.get_or_create(&handler).set(0);
        m.degraded.set(0);
        m.redis_unreachable.set(0);
        m.heartbeat_failing.set(0);
        m.relayed
            .get_or_create(&RelayLabels {
                stream: "s".into(),
                outcome: "delivered".into(),
            })
            .inc();
        let text = m.encode();
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        for (file, text) in [
            (
                "alerts.yml",
                include_str!("../contrib/prometheus/alerts.yml"),
            ),
            (
                "redstream.json",
                include_str!("../contrib/grafana/redstream.json"),
            ),
        ] {
            let used = metric_names(text);
            assert!(used.len() >= 5, "{file} queries RedStream metrics");
            for name in used {
                let family = ["_bucket", "_count", "_sum", "_total"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .unwrap_or(&name);
                assert!(
                    families.contains(&family),
                    "{file} queries {name}, which the daemon does not expose ({families:?})"
                );
            }
        }
    }
}
