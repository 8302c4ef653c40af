//! The set of consumer loops: one supervised task per consumer group — its group created if needed, a
//! relay beside it on a Redis Cluster, restarted with capped backoff when it fails — and the control
//! stream's consumer. What the supervisor ([`super::supervisor`]) and reloads ([`super::reload`]) act
//! on.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{Instrument, error, info};

use super::control::{self, Command, Vitals};
use super::prepare::Prepared;
use super::services::Services;
use crate::backoff::Backoff;
use crate::client::{Client, Error};
use crate::config::{ControlSettings, Settings};
use crate::engine::router::Router;
use crate::engine::{Consumer, ConsumerSettings, Stats};
use crate::health::Health;
use crate::model::EntryLimit;
use crate::model::id::StreamId;
use crate::shutdown::{Shutdown, Trigger};

/// A consumer group is identified by its stream and group.
pub(super) type Key = (Arc<str>, String);

pub(super) fn key(c: &ConsumerSettings) -> Key {
    (c.stream.clone(), c.group.clone())
}

/// One running consumer loop.
pub(super) struct Running {
    pub(super) cfg: ConsumerSettings,
    pub(super) router: Arc<ArcSwap<Router>>,
    pub(super) trigger: Trigger,
    pub(super) stats: Arc<Stats>,
}

pub(super) struct Daemon {
    pub(super) settings: Settings,
    pub(super) prepared: Prepared,
    pub(super) client: Client,
    pub(super) health: Arc<Health>,
    /// The handlers' breakers and rate limits, shared by every loop; reconfigured by reload.
    pub(super) guards: Arc<crate::engine::guard::Guards>,
    pub(super) running: HashMap<Key, Running>,
    /// Consumers waiting for their predecessor (same group, changed settings) to drain.
    pub(super) waiting: HashMap<Key, (ConsumerSettings, Arc<Router>)>,
    pub(super) tasks: JoinSet<Key>,
    /// Every consumer's shutdown also follows this one (the daemon's stop).
    pub(super) stop: Shutdown,
    pub(super) vitals: Arc<Vitals>,
    /// The control stream's consumer: not part of the config's consumers, untouched by reload.
    pub(super) control: Option<Running>,
    /// `wasm.watch`: the live watches, and where they send what changed.
    pub(super) watch: Option<super::watch::Watch>,
    pub(super) watch_tx: mpsc::UnboundedSender<std::path::PathBuf>,
    /// On a Redis Cluster: the streams whose outbox a relay empties, and the relays. A relay runs
    /// until the daemon stops, also after its consumer was removed: its outbox may still hold replies.
    pub(super) relayed: std::collections::HashSet<Arc<str>>,
    pub(super) relays: Services,
    /// The consumers the metrics poller polls: the config's, as of the last reload.
    pub(super) polled: tokio::sync::watch::Sender<Vec<ConsumerSettings>>,
    /// Where the groups stood when the last process wrote them down ([`super::positions`]): each loop
    /// started at start-up takes its group's, as a reload's successor takes its predecessor's.
    pub(super) known: HashMap<super::positions::Group, StreamId>,
}

/// How long a relay's delivery record is kept ([`crate::client::outbox`]): the window in which a
/// message whose commit was lost (a failover that lost writes) can run again, or a relay entry stay
/// pending after its delivery, without its reply being written twice. About 100 bytes per reply
/// that crosses slots, held this long.
const RELAY_KEEP: Duration = Duration::from_secs(3600);

impl Daemon {
    /// Starts a loop for every configured consumer, and the control stream's.
    pub(super) async fn start_all(
        &mut self,
        commands: mpsc::UnboundedSender<Command>,
    ) -> Result<(), Error> {
        let consumers: Vec<(ConsumerSettings, Arc<Router>)> = (self.settings.consumers.iter())
            .cloned()
            .zip(self.prepared.routers.iter().cloned())
            .collect();
        for (c, router) in consumers {
            let known = self.known.remove(&(c.stream.to_string(), c.group.clone()));
            self.start(c, router, known.map(Some)).await?;
        }
        if let Some(c) = self.settings.control.clone() {
            self.start_control(c, commands).await?;
        }
        self.vitals.set_stats(self.all_stats());
        Ok(())
    }

    pub(super) fn all_stats(&self) -> Vec<Arc<Stats>> {
        self.running.values().map(|r| r.stats.clone()).collect()
    }

    /// Creates the group if needed and starts a supervised loop for it.
    /// Starts a consumer; `known` is Some for a reload's successor: where its predecessor last knew
    /// the group, if it did.
    pub(super) async fn start(
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
            retry: None,
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
            let run = crate::engine::relay::run(self.client.clone(), relay, self.stop.clone());
            self.relays.spawn("relay", run.instrument(span));
        }
        let (trigger, own) = self.stop.child();
        let router = Arc::new(ArcSwap::new(router));
        let consumer = Consumer {
            cfg: Arc::new(cfg.clone()),
            client: self.client.clone(),
            router: router.clone(),
            keys: self.settings.auth.keys.clone(),
            guards: self.guards.clone(),
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
    pub(super) async fn ended(&mut self, joined: Result<Key, tokio::task::JoinError>) {
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
