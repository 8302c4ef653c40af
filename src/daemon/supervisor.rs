//! The running daemon: start-up, the set of consumer loops, reload, and the stop sequence.
//!
//! Owns what happens between READY=1 and exit: one supervised task per consumer group (a loop that
//! fails is logged loudly and restarted with capped backoff), systemd notifications (STATUS, the
//! watchdog from the loops' liveness, STOPPING and EXTEND_TIMEOUT while draining), the metrics endpoint
//! and pollers, and hot reload: SIGHUP (or a control message) re-reads and validates the config,
//! recompiles handlers, swaps every unchanged consumer's routes atomically (messages in flight finish
//! on the old handlers), stops removed or changed consumers after they drain, and starts new ones — an
//! invalid config is refused and the running one stays. Stop: the first SIGTERM/SIGINT drains within
//! `drain_timeout`, a second one exits at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{Instrument, error, info, warn};

use super::control::{self, Command, Vitals};
use super::prepare::{Changes, Prepared, prepare_with};
use crate::backoff::Backoff;
use crate::client::{Client, Error};
use crate::config::{self, ControlSettings, Settings};
use crate::engine::router::Router;
use crate::engine::{Consumer, ConsumerSettings, Stats};
use crate::health::Health;
use crate::model::EntryLimit;
use crate::model::id::StreamId;
use crate::notify::Notifier;
use crate::shutdown::{self, Shutdown, Signal, Trigger};

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
    /// The metrics address could not be bound (taken, or not ours to bind).
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// The credential exchange's socket could not be bound.
    #[error("cannot serve the credential exchange at {path:?} (auth.endpoint): {source}")]
    Exchange {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A consumer group is identified by its stream and group.
type Key = (Arc<str>, String);

fn key(c: &ConsumerSettings) -> Key {
    (c.stream.clone(), c.group.clone())
}

/// One running consumer loop.
struct Running {
    cfg: ConsumerSettings,
    router: Arc<ArcSwap<Router>>,
    trigger: Trigger,
    stats: Arc<Stats>,
}

struct Daemon {
    settings: Settings,
    prepared: Prepared,
    client: Client,
    health: Arc<Health>,
    running: HashMap<Key, Running>,
    /// Consumers waiting for their predecessor (same group, changed settings) to drain.
    waiting: HashMap<Key, (ConsumerSettings, Arc<Router>)>,
    tasks: JoinSet<Key>,
    /// Every consumer's shutdown also follows this one (the daemon's stop).
    stop: Shutdown,
    vitals: Arc<Vitals>,
    /// The control stream's consumer: not part of the config's consumers, untouched by reload.
    control: Option<Running>,
    /// `wasm.watch`: the live watches, and where they send what changed.
    watch: Option<super::watch::Watch>,
    watch_tx: mpsc::UnboundedSender<std::path::PathBuf>,
    /// On a Redis Cluster: the streams whose outbox a relay empties, and the relays. A relay runs
    /// until the daemon stops, also after its consumer was removed: its outbox may still hold replies.
    relayed: std::collections::HashSet<Arc<str>>,
    relays: JoinSet<()>,
    /// The consumers the metrics poller polls: the config's, as of the last reload.
    polled: tokio::sync::watch::Sender<Vec<ConsumerSettings>>,
}

/// The health condition of a reload that changed what only a restart applies.
const RESTART_NEEDED: &str = "restart needed";

/// How long a relay's delivery record is kept ([`crate::client::outbox`]): the window in which a
/// message whose commit was lost (a failover that lost writes) can run again, or a relay entry stay
/// pending after its delivery, without its reply being written twice. About 100 bytes per reply
/// that crosses slots, held this long.
const RELAY_KEEP: Duration = Duration::from_secs(3600);

/// Runs the daemon until it is stopped by a signal or a control message.
pub async fn run(settings: Settings, prepared: Prepared) -> Result<Stopped, RunError> {
    harden_process();
    let identity = settings
        .identity
        .as_ref()
        .expect("config validation requires an identity when consumers are configured")
        .identity
        .clone();
    let client = Client::connect(settings.redis.clone(), settings.naming.clone(), identity)
        .map_err(RunError::Failed)?;
    // Signals are registered before anything slow, so a stop during start-up is not lost.
    let mut signals = shutdown::signals()?;
    client
        .wait_ready(settings.startup_wait)
        .await
        .map_err(|e| {
            if e.is_transient() {
                RunError::Unavailable(e)
            } else {
                RunError::Failed(e)
            }
        })?;
    let (stop_trigger, stop) = shutdown::channel();
    let (commands_tx, mut commands) = mpsc::unbounded_channel::<Command>();

    // Everything that runs beside the consumer loops; each returns on `stop`, and is awaited at exit.
    let mut side = JoinSet::new();
    if let Some(addr) = settings.metrics_listen {
        let listener = crate::metrics::bind(addr)
            .await
            .map_err(|source| RunError::Metrics { addr, source })?;
        side.spawn(crate::metrics::serve(listener, stop.clone()));
    }
    // The credential exchange, where this daemon holds the signing key and a socket is configured.
    if let Some(path) = settings
        .auth
        .endpoint
        .as_ref()
        .filter(|_| settings.auth.keys.can_sign())
    {
        let listener = super::exchange::bind(path).map_err(|source| RunError::Exchange {
            path: path.clone(),
            source,
        })?;
        let exchange = super::exchange::Exchange::new(&settings.auth, settings.naming.clone());
        side.spawn(super::exchange::serve(listener, exchange, stop.clone()));
    }

    let health = Arc::new(Health::default());
    let server_id = config::default_consumer(
        &client.identity().subject,
        settings.daemon.instance.as_deref(),
    );
    let vitals = Arc::new(Vitals::new(server_id, health.clone()));
    let (watch_tx, watch_rx) = mpsc::unbounded_channel();
    side.spawn(super::watch::debounce(
        watch_rx,
        commands_tx.clone(),
        stop.clone(),
    ));
    let (polled, polled_rx) = tokio::sync::watch::channel(settings.consumers.clone());
    let mut d = Daemon {
        settings,
        prepared,
        client,
        health,
        running: HashMap::new(),
        waiting: HashMap::new(),
        tasks: JoinSet::new(),
        stop,
        vitals,
        control: None,
        watch: None,
        watch_tx,
        relayed: Default::default(),
        relays: JoinSet::new(),
        polled,
    };
    d.rewatch();
    let consumers: Vec<(ConsumerSettings, Arc<Router>)> = d
        .settings
        .consumers
        .iter()
        .cloned()
        .zip(d.prepared.routers.iter().cloned())
        .collect();
    for (c, router) in consumers {
        d.start(c, router, None).await.map_err(RunError::Failed)?;
    }
    if let Some(c) = d.settings.control.clone() {
        d.start_control(c, commands_tx.clone())
            .await
            .map_err(RunError::Failed)?;
    }
    d.vitals.set_stats(d.all_stats());
    let beats = d.settings.heartbeat.clone().map(|settings| control::Beats {
        client: d.client.clone(),
        settings,
        vitals: d.vitals.clone(),
        keys: d
            .settings
            .auth
            .keys
            .can_sign()
            .then(|| d.settings.auth.keys.clone()),
    });
    if let Some(b) = beats.clone() {
        side.spawn(b.run(d.stop.clone()));
    }
    if !d.settings.retention.is_empty() {
        side.spawn(super::retention::run(
            d.client.clone(),
            d.settings.retention.clone(),
            d.settings.retention_interval,
            d.stop.clone(),
        ));
    }
    let pending = Arc::new(std::sync::atomic::AtomicU64::new(0));
    side.spawn(poll_streams(
        d.client.clone(),
        polled_rx,
        d.settings.metrics_poll,
        pending.clone(),
        d.stop.clone(),
    ));
    info!(
        consumers = d.running.len(),
        identity = %d.client.identity().subject,
        "redstream running"
    );
    // Redis answered, every group exists, every handler is loaded.
    let notify = Notifier;
    let mut status = Status {
        pending,
        ..Status::default()
    };
    notify.ready(&status.line(&d.all_stats(), &d.health));

    // Pings at half the interval systemd expects, only while every loop is healthy.
    let watchdog_every = Notifier::watchdog_interval().map(|d| d / 2);
    let mut watchdog = tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
    let mut status_tick = tokio::time::interval(Duration::from_secs(5));
    let mut withheld = false;
    // Every second: the identity token's lifetime, and the degraded gauge.
    let mut token_check = tokio::time::interval(Duration::from_secs(1));
    let token_lifetime = d
        .settings
        .identity
        .as_ref()
        .map_or(Duration::ZERO, |i| until(i.expires_at));
    // A reload being read and compiled off the runtime, and whether another was asked for meanwhile.
    let mut reloading: Option<tokio::task::JoinHandle<Result<(Settings, Prepared), String>>> = None;
    let mut reload_again = false;
    loop {
        let command = tokio::select! {
            signal = signals.next() => match signal {
                Some(Signal::Stop) | None => Command::Shutdown,
                Some(Signal::Reload) => Command::Reload,
            },
            Some(command) = commands.recv() => command,
            Some(joined) = d.tasks.join_next() => {
                d.ended(joined).await;
                continue;
            }
            prepared = async { reloading.as_mut().expect("guarded").await }, if reloading.is_some() => {
                reloading = None;
                match prepared {
                    Ok(Ok((new, prepared))) => d.reload(new, prepared).await,
                    Ok(Err(e)) => error!(error = %e, "reload refused: the running config stays"),
                    Err(e) => error!(error = %e, "reload failed; this is a bug: the running config stays"),
                }
                if std::mem::take(&mut reload_again) {
                    reloading = Some(d.begin_reload());
                } else {
                    notify.ready(&status.line(&d.all_stats(), &d.health));
                }
                continue;
            }
            _ = watchdog.tick(), if watchdog_every.is_some() => {
                let stuck = d.health.unhealthy();
                if stuck.is_empty() {
                    notify.watchdog();
                    withheld = false;
                } else if !withheld {
                    error!(loops = ?stuck, "consumer loops are not making progress; withholding the watchdog ping");
                    withheld = true;
                }
                continue;
            }
            _ = token_check.tick() => {
                d.watch_token(token_lifetime);
                let m = crate::metrics::global();
                m.degraded.set(i64::from(!d.health.degraded().is_empty()));
                m.redis_unreachable.set(i64::from(d.health.redis_unreachable()));
                continue;
            }
            _ = status_tick.tick() => {
                notify.status(&status.line(&d.all_stats(), &d.health));
                let dropped = crate::logging::dropped_lines();
                if dropped > status.log_dropped {
                    warn!(dropped = dropped - status.log_dropped, "the log file writer could not keep up and dropped lines");
                    status.log_dropped = dropped;
                }
                continue;
            }
        };
        match command {
            Command::Shutdown => break,
            // One reload at a time; a request during one is done after it, with the newest file.
            Command::Reload if reloading.is_some() => reload_again = true,
            Command::Reload => {
                notify.reloading();
                reloading = Some(d.begin_reload());
            }
        }
    }

    let drain_timeout = d.settings.daemon.drain_timeout;
    info!(drain_timeout = ?drain_timeout, "stopping: no new reads; finishing messages in flight");
    notify.stopping();
    d.vitals.stopping();
    stop_trigger.trigger();
    for r in d.running.values().chain(d.control.as_ref()) {
        r.trigger.trigger();
    }
    d.waiting.clear();
    let drain_end = tokio::time::Instant::now() + drain_timeout;
    let deadline = tokio::time::sleep_until(drain_end);
    tokio::pin!(deadline);
    // While draining, keep telling systemd how much longer this may take.
    let mut extend = tokio::time::interval(Duration::from_secs(2));
    let stopped = loop {
        tokio::select! {
            _ = extend.tick() => {
                notify.extend_timeout(drain_end.saturating_duration_since(tokio::time::Instant::now()) + Duration::from_secs(5));
            }
            _ = &mut deadline => {
                warn!("drain timed out; unfinished messages stay pending for the next start");
                d.tasks.abort_all();
                break Stopped::DrainTimedOut;
            }
            signal = signals.next() => if let Some(Signal::Stop) = signal {
                warn!("second stop signal: exiting now; unfinished messages stay pending");
                d.tasks.abort_all();
                break Stopped::Forced;
            },
            joined = d.tasks.join_next() => if joined.is_none() {
                info!("drained; every message in flight was committed");
                break Stopped::Drained;
            },
        }
    };
    // The side tasks saw `stop` when the drain began; the heartbeat's last beat says "stopping". Give
    // them a moment (a Redis call under way may need its timeout), not the whole drain. A relay cut
    // here leaves its entries pending, to be relayed at the next start or by another daemon.
    let mut relays = std::mem::take(&mut d.relays);
    let ended = tokio::time::timeout(Duration::from_secs(2), async {
        while relays.join_next().await.is_some() {}
        while side.join_next().await.is_some() {}
    })
    .await;
    relays.abort_all();
    if ended.is_err() {
        warn!(
            tasks = side.len(),
            "side tasks did not end in time; stopping them"
        );
        side.abort_all();
        while side.join_next().await.is_some() {}
    }
    // A last heartbeat after the drain: `redstream status` shows this daemon stopped, not missing.
    if let Some(b) = beats {
        d.vitals.stopped();
        match tokio::time::timeout(Duration::from_secs(2), b.beat()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "the last heartbeat was not written"),
            Err(_) => tracing::debug!("the last heartbeat was not written in time"),
        }
    }
    Ok(stopped)
}

impl Daemon {
    /// Keeps the daemon's proof of identity valid: a self-issued token is renewed once four fifths of
    /// its lifetime have passed; a configured one cannot be, so the daemon turns `degraded` (heartbeat,
    /// STATUS, log) when less than a quarter of its lifetime — at most an hour — remains, and says so
    /// until it is rotated (a new `identity.token` and a restart).
    fn watch_token(&mut self, lifetime: Duration) {
        let Some(id) = self.settings.identity.as_mut() else {
            return;
        };
        let left = until(id.expires_at);
        if id.renewable {
            if left > lifetime / 5 {
                return;
            }
            let keys = &self.settings.auth.keys;
            match keys.issue(&id.identity.subject, &id.identity.roles, lifetime) {
                Ok((token, expires_at)) => {
                    id.token = token;
                    id.expires_at = expires_at;
                    self.health.recover("identity token");
                    info!(expires_in = ?until(expires_at), "renewed the daemon's identity token");
                }
                Err(e) => {
                    let reason = format!("cannot renew the daemon's identity token: {e}");
                    if self.health.degraded().iter().all(|r| *r != reason) {
                        error!(error = %e, "cannot renew the daemon's identity token");
                    }
                    self.health.degrade("identity token", reason);
                }
            }
            return;
        }
        let window = (lifetime / 4).min(Duration::from_secs(3600));
        if left > window {
            // Rotated (a new token with the same identity, applied by a reload), or never close.
            self.health.recover("identity token");
            return;
        }
        let reason = if left.is_zero() {
            "the daemon's identity token has expired: rotate identity.token and restart".to_string()
        } else {
            format!(
                "the daemon's identity token expires in {}: rotate identity.token and restart",
                humantime::format_duration(Duration::from_secs(left.as_secs()))
            )
        };
        if !self
            .health
            .degraded()
            .iter()
            .any(|r| r.contains("identity token"))
        {
            warn!(expires_in = ?left, "the daemon's identity token is about to lapse; the daemon is degraded until it is rotated");
        }
        self.health.degrade("identity token", reason);
    }

    fn all_stats(&self) -> Vec<Arc<Stats>> {
        self.running.values().map(|r| r.stats.clone()).collect()
    }

    /// Creates the group if needed and starts a supervised loop for it.
    /// Starts a consumer; `known` is Some for a reload's successor: where its predecessor last knew
    /// the group, if it did.
    async fn start(
        &mut self,
        cfg: ConsumerSettings,
        router: Arc<Router>,
        known: Option<Option<StreamId>>,
    ) -> Result<(), Error> {
        let k = key(&cfg);
        let running = self.spawn(cfg, router, known).await?;
        self.running.insert(k, running);
        self.vitals.set_stats(self.all_stats());
        Ok(())
    }

    /// The consumer of this instance's control group: only new commands (`$`), one at a time, signed.
    async fn start_control(
        &mut self,
        c: ControlSettings,
        commands: mpsc::UnboundedSender<Command>,
    ) -> Result<(), Error> {
        let id = self.vitals.server_id.clone();
        let cfg = ConsumerSettings {
            stream: c.stream.as_str().into(),
            group: id.clone(),
            consumer: id,
            start: "$".into(),
            batch_size: 10,
            block: Duration::from_secs(5),
            claim_min_idle: Duration::from_secs(60),
            claim_interval: Duration::from_secs(30),
            max_deliveries: 1,
            dead_letter: c.dead_letter.clone(),
            in_flight: 1,
            order_by: None,
            handler: None,
            routes: Vec::new(),
            unmatched: crate::engine::router::Unmatched::DeadLetter,
            handler_timeout: Duration::from_secs(5),
            entry_limit: EntryLimit::default(),
        };
        let handler = control::Control {
            commands,
            vitals: self.vitals.clone(),
            reply_to: c.reply_to,
            client: self.client.clone(),
            group: cfg.group.clone(),
        };
        let router = Arc::new(Router::single(Arc::new(handler), true));
        self.control = Some(self.spawn(cfg, router, None).await?);
        Ok(())
    }

    /// Creates the group if needed and starts its supervised loop. A reload's successor (`known`:
    /// where its predecessor last knew the group) creates nothing here: its group exists, or Redis lost
    /// it, and then its first read meets NOGROUP and re-creates it as any loop does
    /// ([`crate::client::restore`], against that position) — never at `start` past entries published
    /// since, and without a Redis call here that an outage would fail (leaving no loop at all).
    async fn spawn(
        &mut self,
        cfg: ConsumerSettings,
        router: Arc<Router>,
        known: Option<Option<StreamId>>,
    ) -> Result<Running, Error> {
        if known.is_none()
            && self
                .client
                .create_group(&cfg.stream, &cfg.group, &cfg.start)
                .await?
        {
            info!(stream = %cfg.stream, group = %cfg.group, start = %cfg.start, "created consumer group {} on {} at {}", cfg.group, cfg.stream, cfg.start);
        }
        if self.client.is_cluster() && self.relayed.insert(cfg.stream.clone()) {
            let relay = crate::engine::relay::RelaySettings {
                source: cfg.stream.clone(),
                consumer: cfg.consumer.clone(),
                batch_size: cfg.batch_size,
                block: cfg.block,
                claim_min_idle: cfg.claim_min_idle,
                claim_interval: cfg.claim_interval,
                keep: RELAY_KEEP,
                retry_min: self.settings.redis.reconnect_min_delay,
                retry_max: self.settings.redis.reconnect_max_delay,
            };
            let span = tracing::info_span!("relay", stream = %cfg.stream, consumer = %cfg.consumer);
            self.relays.spawn(
                crate::engine::relay::run(self.client.clone(), relay, self.stop.clone())
                    .instrument(span),
            );
        }
        let (trigger, own) = self.stop.child();
        let router = Arc::new(ArcSwap::new(router));
        let consumer = Consumer {
            cfg: Arc::new(cfg.clone()),
            client: self.client.clone(),
            router: router.clone(),
            keys: self.settings.auth.keys.clone(),
            stats: Arc::new(Stats {
                stream: cfg.stream.to_string(),
                group: cfg.group.clone(),
                consumer: cfg.consumer.clone(),
                position: std::sync::Mutex::new(known.flatten()),
                ..Stats::default()
            }),
            liveness: self.health.register(
                &format!("{}/{}", cfg.stream, cfg.group),
                Duration::from_secs(30),
            ),
            retry_min: self.settings.redis.reconnect_min_delay,
            retry_max: self.settings.redis.reconnect_max_delay,
        };
        let stats = consumer.stats.clone();
        let span = tracing::info_span!("consumer", stream = %cfg.stream, group = %cfg.group, consumer = %cfg.consumer);
        let task_key = key(&cfg);
        self.tasks.spawn(
            async move {
                supervise(consumer, own).await;
                task_key
            }
            .instrument(span),
        );
        Ok(Running {
            cfg,
            router,
            trigger,
            stats,
        })
    }

    /// A supervised loop ended: after a reload stopped it (its successor may start now), or unexpectedly.
    async fn ended(&mut self, joined: Result<Key, tokio::task::JoinError>) {
        let Ok(k) = joined else {
            error!("a consumer supervisor panicked; this is a bug");
            return;
        };
        let Some(old) = self.running.remove(&k) else {
            return;
        };
        self.vitals.set_stats(self.all_stats());
        self.health
            .forget(&format!("{}/{}", old.cfg.stream, old.cfg.group));
        match self.waiting.remove(&k) {
            Some((cfg, router)) => {
                info!(stream = %cfg.stream, group = %cfg.group, "restarting the consumer with its new settings");
                let known = old.stats.position();
                if let Err(e) = self.start(cfg, router, Some(known)).await {
                    error!(error = %e, "cannot start the reloaded consumer");
                }
            }
            None => info!(stream = %old.cfg.stream, group = %old.cfg.group, "consumer stopped"),
        }
    }

    /// Starts reading and compiling the config on a blocking thread (it reads files and compiles
    /// WASM: milliseconds to seconds), so signals and watchdog pings keep being served meanwhile.
    fn begin_reload(&self) -> tokio::task::JoinHandle<Result<(Settings, Prepared), String>> {
        let path = self.settings.file.clone();
        let runtime = self.prepared.runtime.clone();
        tokio::task::spawn_blocking(move || {
            let new = config::load(path.as_deref()).map_err(|e| e.to_string())?;
            if new.consumers.is_empty() {
                return Err("the new config has no [[consumers]]".into());
            }
            let prepared = prepare_with(&new, runtime).map_err(|e| e.to_string())?;
            Ok((new, prepared))
        })
    }

    /// Applies a config that [`Daemon::begin_reload`] read and prepared.
    async fn reload(&mut self, new: Settings, prepared: Prepared) {
        self.note_restart_needed(&new);
        let wanted: HashMap<Key, (ConsumerSettings, Arc<Router>)> = new
            .consumers
            .iter()
            .cloned()
            .zip(prepared.routers.iter().cloned())
            .map(|(c, r)| (key(&c), (c, r)))
            .collect();
        let changes = Changes::between((&self.settings, &self.prepared), (&new, &prepared));
        for w in &new.warnings {
            warn!(key = %w.path, "config: {}", w.message);
        }
        let (mut swapped, mut restarted, mut stopped, mut started) = (0, 0, 0, 0);
        for (k, run) in self.running.iter_mut() {
            match wanted.get(k) {
                // Same consumer: swap its routes and handlers; messages in flight keep theirs.
                Some((cfg, router)) if cfg.same_loop(&run.cfg) => {
                    run.router.store(router.clone());
                    run.cfg = cfg.clone();
                    swapped += 1;
                }
                // Changed settings: drain it, then start its successor (never two loops on one PEL).
                Some((cfg, router)) => {
                    run.trigger.trigger();
                    self.waiting
                        .insert(k.clone(), (cfg.clone(), router.clone()));
                    restarted += 1;
                }
                None => {
                    run.trigger.trigger();
                    stopped += 1;
                }
            }
        }
        for (k, (cfg, router)) in wanted {
            if !self.running.contains_key(&k) {
                match self.start(cfg, router, None).await {
                    Ok(()) => started += 1,
                    Err(e) => error!(error = %e, "cannot start a consumer added by the reload"),
                }
            }
        }
        let Changes {
            handlers_added,
            handlers_changed,
            handlers_removed,
            routes_changed,
        } = &changes;
        info!(
            ?handlers_added,
            ?handlers_changed,
            ?handlers_removed,
            ?routes_changed,
            swapped,
            restarted,
            stopped,
            started,
            "reloaded the config"
        );
        // The new runtime if the reload needed one (the old one lives on in handlers still finishing).
        let runtime = prepared.runtime.clone().or(self.prepared.runtime.clone());
        self.prepared = Prepared {
            runtime,
            ..prepared
        };
        // The running connections and identity stay what they were made with until a restart.
        let (file, redis, identity) = (
            self.settings.file.clone(),
            self.settings.redis.clone(),
            self.settings.identity.clone(),
        );
        self.settings = Settings {
            file,
            redis,
            identity,
            ..new
        };
        self.polled.send_replace(self.settings.consumers.clone());
        self.rewatch();
    }

    /// `[redis]` and `[identity]` cannot change under a running daemon: when the reloaded file's
    /// differ from the running ones, the daemon says "restart needed: <keys>" (warning, degraded
    /// reason in status and heartbeat, `redstream_restart_needed`) until a restart — or a reload of a
    /// file that matches again.
    fn note_restart_needed(&self, new: &Settings) {
        let mut keys = self.settings.redis.differing_keys(&new.redis);
        if new.identity.as_ref().map(|i| &i.identity)
            != self.settings.identity.as_ref().map(|i| &i.identity)
        {
            keys.push("identity");
        }
        crate::metrics::global()
            .restart_needed
            .set(i64::from(!keys.is_empty()));
        if keys.is_empty() {
            self.health.recover(RESTART_NEEDED);
            return;
        }
        let keys = keys.join(", ");
        warn!(keys = %keys, "the reloaded config changes settings a running daemon cannot apply; they take effect at the next restart");
        self.health
            .degrade(RESTART_NEEDED, format!("restart needed: {keys}"));
    }

    /// Starts, follows or stops the `wasm.watch` watches to match the settings.
    fn rewatch(&mut self) {
        if !self.settings.watch {
            self.watch = None;
            return;
        }
        match &mut self.watch {
            Some(w) => w.update(&self.settings),
            None => match super::watch::Watch::start(&self.settings, self.watch_tx.clone()) {
                Ok(w) => {
                    info!(
                        "wasm.watch: reloading when a handler file, the config or a drop-in changes"
                    );
                    self.watch = Some(w);
                }
                Err(e) => {
                    warn!(error = %e, "wasm.watch: cannot watch files; reload with SIGHUP instead")
                }
            },
        }
    }
}

/// What the process does for itself before it holds secrets and sockets: no core dumps and no
/// ptrace by other users' processes (PR_SET_DUMPABLE 0 — a core would hold the Redis password and the
/// signing key), and the soft limit of open files raised to the hard one (the shipped units set
/// LimitNOFILE=, and forbid setrlimit: there this fails quietly, having nothing to do).
fn harden_process() {
    // SAFETY: prctl with PR_SET_DUMPABLE takes an integer argument and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot turn off core dumps (PR_SET_DUMPABLE)");
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let old = limit.rlim_cur;
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                tracing::debug!(
                    from = old,
                    to = limit.rlim_max,
                    "raised the open-files limit"
                );
            }
        }
    }
}

/// How long from now until `epoch_secs` (zero once it has passed).
fn until(epoch_secs: u64) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_secs(epoch_secs).saturating_sub(now)
}

/// Keeps one consumer loop running: restarts it with capped backoff when it fails or panics, and
/// returns once it has drained after its own or the daemon's shutdown (`shutdown` is a child of the
/// daemon's).
async fn supervise(consumer: Consumer, shutdown: Shutdown) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        let c = consumer.clone();
        let s = shutdown.clone();
        let span = tracing::Span::current();
        let started = tokio::time::Instant::now();
        let result = tokio::spawn(async move { c.run(s).await }.instrument(span)).await;
        if started.elapsed() > Duration::from_secs(60) {
            backoff.succeed(); // it ran well for a while: start the backoff over
            consumer.liveness.recover();
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
        crate::metrics::global().error("loop_restart");
        consumer.liveness.degrade(format!(
            "the loop was restarted {} time(s) in a row",
            backoff.failures()
        ));
        let mut s = shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = s.wait() => return,
        }
    }
}

/// Polls pending entries, lag and length of every consumed stream into the metrics (and the total
/// pending count into `pending`, for the status line). Follows reloads: the series of a group or
/// stream the config no longer consumes are removed, on every poll (the group's own loop may still be
/// draining, and setting its pace gauges, when the reload lands).
async fn poll_streams(
    client: Client,
    consumers: tokio::sync::watch::Receiver<Vec<ConsumerSettings>>,
    every: Duration,
    pending: Arc<std::sync::atomic::AtomicU64>,
    mut shutdown: Shutdown,
) {
    use crate::metrics::{GroupLabels, StreamLabels, global};
    use std::collections::HashSet;
    let mut tick = tokio::time::interval(every);
    let (mut seen_groups, mut seen_streams) = (HashSet::new(), HashSet::new());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        let consumers = consumers.borrow().clone();
        let groups: HashSet<GroupLabels> = consumers
            .iter()
            .map(|c| GroupLabels {
                stream: c.stream.to_string(),
                group: c.group.clone(),
            })
            .collect();
        let streams: HashSet<StreamLabels> = consumers
            .iter()
            .map(|c| StreamLabels {
                stream: c.stream.to_string(),
            })
            .collect();
        let m = global();
        for gone in seen_groups.difference(&groups) {
            m.pending.remove(gone);
            m.lag.remove(gone);
            m.read_size.remove(gone);
            m.window.remove(gone);
        }
        for gone in seen_streams.difference(&streams) {
            m.stream_length.remove(gone);
        }
        seen_groups.extend(groups);
        seen_streams.extend(streams);
        let mut total = 0;
        for c in &consumers {
            let labels = GroupLabels {
                stream: c.stream.to_string(),
                group: c.group.clone(),
            };
            match client.groups(&c.stream).await {
                Ok(groups) => {
                    if let Some(g) = groups.iter().find(|g| g.name == c.group) {
                        total += g.pending;
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
        pending.store(total, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The STATUS= line: what the loops did, and at what rate since the last line.
#[derive(Default)]
struct Status {
    last: Option<(u64, tokio::time::Instant)>,
    /// Entries pending across the groups, as last polled.
    pending: Arc<std::sync::atomic::AtomicU64>,
    /// Log lines the file writer had dropped at the last report.
    log_dropped: usize,
}

impl Status {
    fn line(&mut self, stats: &[Arc<Stats>], health: &Health) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let sum = |f: fn(&Stats) -> &std::sync::atomic::AtomicU64| -> u64 {
            stats.iter().map(|s| f(s).load(Relaxed)).sum()
        };
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
        let degraded = health.degraded();
        if !degraded.is_empty() {
            line.push_str("; degraded: ");
            line.push_str(&degraded.join("; "));
        }
        line
    }
}
