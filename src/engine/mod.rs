//! The daemon: a supervisor running one consumer loop per configured group.
//!
//! Owns start-up (Redis reachable, groups created), the supervision of loops (a loop that fails is
//! logged loudly and restarted with capped backoff; one that panics likewise), and the stop sequence:
//! the first SIGTERM/SIGINT stops reading and drains in-flight messages within `drain_timeout`; a second
//! one exits at once, leaving unfinished entries pending for the next start. What a loop does is
//! [`consumer`]'s; what a message does is [`handler`]'s; how results reach Redis is [`commit`]'s.

pub mod commit;
pub mod consumer;
pub mod handler;
pub mod router;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::task::JoinSet;
use tracing::{Instrument, error, info, warn};

use crate::backoff::Backoff;
use crate::client::Client;
use crate::config::{ConfigError, Problem, Settings};
use crate::conn::Redis;
use crate::error::Error;
use crate::notify::{Health, Notifier};
use crate::shutdown::{self, Shutdown, Signal};
use crate::wasm::{Runtime, WasmHandler};
use consumer::{Consumer, Stats};
use handler::Handler;
use router::{Action, Route, Router, Target};
use std::collections::HashMap;

/// One consumer group to consume, validated.
#[derive(Clone, Debug)]
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
    /// The one handler of every message; None routes them with `[[routes]]`.
    pub handler: Option<HandlerSpec>,
    /// What to do with a message no route matches.
    pub unmatched: router::Unmatched,
    pub handler_timeout: Duration,
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
    pub reply_to: Option<String>,
    pub fail_field: Option<String>,
    pub fail_deliveries: u64,
    pub fail_every: u64,
    pub sleep: Duration,
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
    /// The handler, with WASM handlers taken from `wasm` (validation made sure the name is there).
    fn build(&self, wasm: &HashMap<String, WasmHandler>) -> Arc<dyn Handler> {
        match self {
            HandlerSpec::Drop => Arc::new(handler::Drop),
            HandlerSpec::Forward { to } => Arc::new(handler::Forward { to: to.clone() }),
            HandlerSpec::Wasm(name) => Arc::new(wasm[name].clone()),
            #[cfg(feature = "fault-injection")]
            HandlerSpec::Faults(f) => Arc::new(handler::Faults {
                reply_to: f.reply_to.clone(),
                fail_field: f.fail_field.clone(),
                fail_deliveries: f.fail_deliveries,
                fail_every: f.fail_every,
                sleep: f.sleep,
                calls: Default::default(),
            }),
        }
    }

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

/// Daemon-wide settings.
#[derive(Clone, Debug)]
pub struct DaemonSettings {
    /// Distinguishes several daemons on one host in default consumer names.
    pub instance: Option<String>,
    /// How long a stop may take to finish and commit messages in flight.
    pub drain_timeout: Duration,
}

/// How the daemon stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Every message in flight was finished and committed.
    Drained,
    /// `drain_timeout` passed first; unfinished entries stay pending.
    DrainTimedOut,
    /// A second stop signal: exited at once; unfinished entries stay pending.
    Forced,
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Redis did not answer within `redis.startup_wait`.
    #[error("redis unavailable at start: {0}")]
    Unavailable(Error),
    #[error("{0}")]
    Failed(Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What the config needs built before anything runs: the WASM runtime with every handler compiled and
/// pre-linked, and one router per consumer.
pub struct Prepared {
    /// Kept alive for as long as handlers run (it drives their deadlines).
    pub runtime: Option<Runtime>,
    pub handlers: HashMap<String, WasmHandler>,
    /// One per `settings.consumers` entry, in order.
    pub routers: Vec<Arc<Router>>,
}

/// Compiles every handler and resolves every route. A handler that does not compile or link is a
/// config error naming its key path.
pub fn prepare(settings: &Settings) -> Result<Prepared, ConfigError> {
    let fail = |path: String, message: String| ConfigError {
        file: settings.file.clone(),
        problems: vec![Problem {
            path,
            message,
            origin: None,
        }],
    };
    let mut handlers = HashMap::new();
    let runtime = if settings.handlers.is_empty() {
        None
    } else {
        let rt = Runtime::new(&settings.wasm, settings.naming.clone())
            .map_err(|m| fail("wasm".into(), m))?;
        for (i, spec) in settings.handlers.iter().enumerate() {
            let h = rt
                .load(spec)
                .map_err(|m| fail(format!("handlers[{i}].file"), m))?;
            handlers.insert(spec.name.clone(), h);
        }
        Some(rt)
    };
    let routes: Vec<Route> = settings
        .routes
        .iter()
        .map(|r| Route {
            stream: r.stream.clone(),
            when: r.when.clone(),
            target: match &r.action {
                Action::Handler(name) => Target::Handler {
                    handler: Arc::new(handlers[name].clone()),
                    require_sender_token: handlers[name].require_sender_token,
                },
                Action::Forward(to) => Target::Handler {
                    handler: Arc::new(handler::Forward { to: to.clone() }),
                    require_sender_token: false,
                },
                Action::Drop => Target::Drop,
            },
        })
        .collect();
    let routers = settings
        .consumers
        .iter()
        .map(|c| {
            Arc::new(match &c.handler {
                Some(spec) => {
                    let require =
                        matches!(spec, HandlerSpec::Wasm(n) if handlers[n].require_sender_token);
                    Router::single(spec.build(&handlers), require)
                }
                None => Router::new(&c.stream, &routes, c.unmatched),
            })
        })
        .collect();
    Ok(Prepared {
        runtime,
        handlers,
        routers,
    })
}

/// Runs the daemon until it is stopped by a signal.
pub async fn run(settings: &Settings, prepared: &Prepared) -> Result<Stopped, RunError> {
    let identity = settings
        .identity
        .as_ref()
        .expect("config validation requires an identity when consumers are configured")
        .identity
        .clone();
    let redis = Redis::open(settings.redis.clone()).map_err(|detail| {
        RunError::Failed(Error::Protocol {
            command: "CONNECT",
            key: String::new(),
            detail,
        })
    })?;
    // Signals are registered before anything slow, so a stop during start-up is not lost.
    let mut signals = shutdown::signals()?;
    redis.wait_ready(settings.startup_wait).await.map_err(|e| {
        if e.is_transient() {
            RunError::Unavailable(e)
        } else {
            RunError::Failed(e)
        }
    })?;
    let client = Client::new(redis, settings.naming.clone(), identity);
    for c in &settings.consumers {
        let created = client
            .create_group(&c.stream, &c.group, &c.start)
            .await
            .map_err(RunError::Failed)?;
        if created {
            info!(stream = %c.stream, group = %c.group, start = %c.start, "created consumer group");
        }
    }

    let (trigger, shutdown) = shutdown::channel();
    let health = Health::default();
    let mut stats = Vec::new();
    let mut tasks = JoinSet::new();
    for (c, router) in settings.consumers.iter().zip(&prepared.routers) {
        let consumer = Consumer {
            cfg: Arc::new(c.clone()),
            client: client.clone(),
            router: router.clone(),
            keys: settings.auth.keys.clone(),
            stats: Arc::new(Stats::default()),
            liveness: health.register(
                &format!("{}/{}", c.stream, c.group),
                Duration::from_secs(30),
            ),
            retry_min: settings.redis.reconnect_min_delay,
            retry_max: settings.redis.reconnect_max_delay,
        };
        stats.push(consumer.stats.clone());
        let span = tracing::info_span!("consumer", stream = %c.stream, group = %c.group, consumer = %c.consumer);
        tasks.spawn(supervise(consumer, shutdown.clone()).instrument(span));
    }
    info!(
        consumers = settings.consumers.len(),
        identity = %client.identity().subject,
        "redstream running"
    );
    if let Some(addr) = settings.metrics_listen {
        let listener = crate::metrics::bind(addr).await.map_err(|e| {
            RunError::Failed(Error::Protocol {
                command: "LISTEN",
                key: addr.to_string(),
                detail: format!("cannot serve metrics on {addr}: {e}"),
            })
        })?;
        let s = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(listener, s).await {
                error!(error = %e, "the metrics endpoint stopped");
            }
        });
    }
    tokio::spawn(poll_streams(
        client.clone(),
        settings.consumers.clone(),
        settings.metrics_poll,
        shutdown.clone(),
    ));

    // Redis answered, every group exists, every handler is loaded.
    let notify = Notifier;
    let mut status = Status::new(stats);
    notify.ready(&status.line());

    // Pings at half the interval systemd expects, only while every loop is healthy.
    let watchdog_every = Notifier::watchdog_interval().map(|d| d / 2);
    let mut watchdog = tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
    let mut status_tick = tokio::time::interval(Duration::from_secs(5));
    let mut withheld = false;
    loop {
        tokio::select! {
            signal = signals.next() => match signal {
                Some(Signal::Stop) | None => break,
                Some(Signal::Reload) => warn!("SIGHUP: reloading is not supported yet; the running config stays"),
            },
            Some(_) = tasks.join_next() => {
                error!("a consumer supervisor ended before shutdown; this is a bug");
            }
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
            _ = status_tick.tick() => {
                notify.status(&status.line());
                let dropped = crate::logging::dropped_lines();
                if dropped > status.log_dropped {
                    warn!(dropped = dropped - status.log_dropped, "the log file writer could not keep up and dropped lines");
                    status.log_dropped = dropped;
                }
            }
        }
    }

    info!(drain_timeout = ?settings.daemon.drain_timeout, "stopping: no new reads; finishing messages in flight");
    notify.stopping();
    trigger.trigger();
    let drain_end = tokio::time::Instant::now() + settings.daemon.drain_timeout;
    let deadline = tokio::time::sleep_until(drain_end);
    tokio::pin!(deadline);
    // While draining, keep telling systemd how much longer this may take.
    let mut extend = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = extend.tick() => {
                notify.extend_timeout(drain_end.saturating_duration_since(tokio::time::Instant::now()) + Duration::from_secs(5));
            }
            _ = &mut deadline => {
                warn!("drain timed out; unfinished messages stay pending for the next start");
                tasks.abort_all();
                return Ok(Stopped::DrainTimedOut);
            }
            signal = signals.next() => if let Some(Signal::Stop) = signal {
                warn!("second stop signal: exiting now; unfinished messages stay pending");
                tasks.abort_all();
                return Ok(Stopped::Forced);
            },
            joined = tasks.join_next() => if joined.is_none() {
                info!("drained; every message in flight was committed");
                return Ok(Stopped::Drained);
            },
        }
    }
}

/// Polls pending entries, lag and length of every consumed stream into the metrics.
async fn poll_streams(
    client: Client,
    consumers: Vec<ConsumerSettings>,
    every: Duration,
    mut shutdown: Shutdown,
) {
    use crate::metrics::{GroupLabels, StreamLabels, global};
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        for c in &consumers {
            let labels = GroupLabels {
                stream: c.stream.to_string(),
                group: c.group.clone(),
            };
            match client.groups(&c.stream).await {
                Ok(groups) => {
                    if let Some(g) = groups.iter().find(|g| g.name == c.group) {
                        global()
                            .pending
                            .get_or_create(&labels)
                            .set(g.pending as i64);
                        global()
                            .lag
                            .get_or_create(&labels)
                            .set(g.lag.map_or(-1, |l| l as i64));
                    }
                }
                Err(e) => tracing::debug!(error = %e, stream = %c.stream, "cannot poll the group"),
            }
            if let Ok(info) = client.stream_info(&c.stream).await {
                global()
                    .stream_length
                    .get_or_create(&StreamLabels {
                        stream: c.stream.to_string(),
                    })
                    .set(info.length as i64);
            }
        }
    }
}

/// The STATUS= line: what the loops did, and at what rate since the last line.
struct Status {
    stats: Vec<Arc<Stats>>,
    last: (u64, tokio::time::Instant),
    /// Log lines the file writer had dropped at the last report.
    log_dropped: usize,
}

impl Status {
    fn new(stats: Vec<Arc<Stats>>) -> Self {
        Status {
            stats,
            last: (0, tokio::time::Instant::now()),
            log_dropped: 0,
        }
    }

    fn line(&mut self) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let sum = |f: fn(&Stats) -> &std::sync::atomic::AtomicU64| -> u64 {
            self.stats.iter().map(|s| f(s).load(Relaxed)).sum()
        };
        let processed = sum(|s| &s.processed);
        let now = tokio::time::Instant::now();
        let secs = now.duration_since(self.last.1).as_secs_f64().max(0.001);
        let rate = (processed - self.last.0) as f64 / secs;
        self.last = (processed, now);
        format!(
            "{} consumers; processed {processed} ({rate:.1}/s); retried {}; dead-lettered {}",
            self.stats.len(),
            sum(|s| &s.retried),
            sum(|s| &s.dead_lettered)
        )
    }
}

/// Keeps one consumer loop running: restarts it with capped backoff when it fails or panics, and
/// returns once it has drained after shutdown.
async fn supervise(consumer: Consumer, mut shutdown: Shutdown) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        let c = consumer.clone();
        let s = shutdown.clone();
        let span = tracing::Span::current();
        let started = tokio::time::Instant::now();
        let result = tokio::spawn(async move { c.run(s).await }.instrument(span)).await;
        if started.elapsed() > Duration::from_secs(60) {
            backoff.succeed(); // it ran well for a while: start the backoff over
        }
        match result {
            Ok(Ok(())) if shutdown.is_triggered() => return,
            Ok(Ok(())) => {
                error!("consumer loop returned without being asked to stop; restarting it")
            }
            Ok(Err(e)) => error!(error = %e, "consumer loop failed; restarting it"),
            Err(join) if join.is_panic() => {
                error!(panic = ?join, "consumer loop panicked; restarting it")
            }
            Err(_) => return, // aborted: the daemon is exiting
        }
        if shutdown.is_triggered() {
            return;
        }
        let delay = backoff.fail();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.wait() => return,
        }
    }
}
