//! Metrics: what the daemon counts and measures, served as Prometheus text on a loopback address.
//!
//! Owns the metric families (one process-wide registry, [`global`]) and the HTTP endpoint. Code that
//! does the work records into the families; the consumer loops cache their counters so the hot path
//! does no label lookups. Stream-side numbers (pending, lag, length) are polled by the engine.

use std::net::SocketAddr;
use std::sync::OnceLock;
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
    pub stream_length: Family<StreamLabels, Gauge>,
    pub dead_lettered: Family<GroupLabels, Counter>,
    pub publish_denied: Family<HandlerLabels, Counter>,
    /// Times a loop got Redis back after losing it.
    pub reconnects: Counter,
    pub handler_peak_memory: Family<HandlerLabels, Gauge>,
    /// 1 while the daemon is degraded (heartbeat `status`), else 0.
    pub degraded: Gauge,
    /// Outbox entries a relay handled (Redis Cluster), by source stream and outcome: delivered,
    /// repeated (delivered before a crash or claim; not written again), refused (left pending).
    pub relayed: Family<RelayLabels, Counter>,
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
            stream_length: Family::default(),
            dead_lettered: Family::default(),
            publish_denied: Family::default(),
            reconnects: Counter::default(),
            handler_peak_memory: Family::default(),
            degraded: Gauge::default(),
            relayed: Family::default(),
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
            "stream_length",
            "Entries in a consumed stream",
            m.stream_length.clone(),
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
            "redis_reconnects",
            "Times a consumer loop got Redis back",
            m.reconnects.clone(),
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
            "relayed",
            "Outbox entries relayed to streams in other cluster slots, by source stream and outcome",
            m.relayed.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition of everything.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
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
