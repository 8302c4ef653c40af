//! The running daemon: start-up, the set of consumer loops, and the stop sequence.
//!
//! Owns what happens between READY=1 and exit: one supervised task per consumer group (a loop that
//! fails is logged loudly and restarted with capped backoff), the side services ([`super::services`]:
//! metrics, heartbeat, systemd's watchdog and STATUS, …) started as one list and stopped together,
//! and a main loop over what only it decides: stop signals, reloads ([`super::reload`]: SIGHUP or a
//! control message re-reads the config, swaps or restarts the loops it changes, and refuses an invalid
//! one) and loops that end. Stop: the first SIGTERM/SIGINT drains within `drain_timeout` (with
//! STOPPING=1 and EXTEND_TIMEOUT), a second one exits at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::control::{Command, Vitals};
use super::error::{RunError, Stopped};
use super::loops::Daemon;
use super::prepare::Prepared;
use super::services::{self, Services, Wiring};
use super::systemd::{self, Status};
use crate::client::Client;
use crate::config::{self, Settings};
use crate::health::Health;
use crate::notify::Notifier;
use crate::shutdown::{self, Signal, Trigger};

/// How long the side services and relays get to end once the drain is over: a Redis call under way
/// may need its timeout, not the whole drain. A relay cut here leaves its entries pending, to be
/// relayed at the next start or by another daemon.
const SERVICES_GRACE: Duration = Duration::from_secs(2);

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
        .map_err(|e| match e.is_transient() {
            true => RunError::Unavailable(e),
            false => RunError::Failed(e),
        })?;
    prepared.read_state_with(&client);
    let (stop_trigger, stop) = shutdown::channel();
    let (commands_tx, mut commands) = mpsc::unbounded_channel::<Command>();
    let health = Arc::new(Health::default());
    let subject = &client.identity().subject;
    let server_id = config::default_consumer(subject, settings.daemon.instance.as_deref());
    let vitals = Arc::new(Vitals::new(server_id, health.clone()));
    let status = Arc::new(Mutex::new(Status::new(vitals.clone())));
    let (watch_tx, changed) = mpsc::unbounded_channel();
    let (polled, polled_rx) = tokio::sync::watch::channel(settings.consumers.clone());
    let mut side = services::listen(&settings, changed, commands_tx.clone(), &stop).await?;
    let identity = settings.identity.clone();
    let guards = Arc::new(crate::engine::guard::Guards::new(health.clone()));
    guards.configure(&settings.guards);
    let target = match settings.redis.cluster.is_empty() {
        true => crate::client::redact_url(&settings.redis.url),
        false => settings.redis.cluster.join(" "),
    };
    let positions = super::positions::Positions::new(&target, &vitals.server_id);
    let known = positions.load();
    let mut d = Daemon {
        settings,
        prepared,
        client,
        guards,
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
        relays: Services::default(),
        polled,
        known,
    };
    d.rewatch();
    d.start_all(commands_tx).await.map_err(RunError::Failed)?;
    let wiring = Wiring {
        client: d.client.clone(),
        vitals: d.vitals.clone(),
        status: status.clone(),
        polled: polled_rx,
        stop: d.stop.clone(),
    };
    let beats = services::beside_loops(&mut side, &d.settings, wiring);
    let vitals = d.vitals.clone();
    let now = move || {
        (vitals.stats().iter())
            .filter_map(|s| Some(((s.stream.clone(), s.group.clone()), s.position()?)))
            .collect()
    };
    side.spawn("positions", positions.keep(now, d.stop.clone()));
    info!(
        consumers = d.running.len(),
        identity = %d.client.identity().subject,
        "redstream running"
    );
    // Redis answered, every group exists, every handler is loaded.
    Notifier.ready(&Status::shared(&status));
    let watch = systemd::watch(d.health.clone(), status.clone(), d.stop.clone());
    side.spawn("systemd", watch);
    if let Some(id) = identity {
        let keys = d.settings.auth.keys.clone();
        let watch = super::identity::watch(id, keys, d.health.clone(), d.stop.clone());
        side.spawn("identity", watch);
    }
    d.serve(&mut signals, &mut commands, &status).await;
    let stopped = d.drain(&mut signals, stop_trigger).await;
    // The side services saw the stop when the drain began; the heartbeat's last beat says
    // "stopping".
    let grace = tokio::time::Instant::now() + SERVICES_GRACE;
    d.relays.stop(grace).await;
    side.stop(grace).await;
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
    /// Serves stop signals, reloads and loops that end, until a stop.
    async fn serve(
        &mut self,
        signals: &mut (impl Stream<Item = Signal> + Unpin),
        commands: &mut mpsc::UnboundedReceiver<Command>,
        status: &Mutex<Status>,
    ) {
        // A reload being read and compiled off the runtime, and whether another was asked for
        // meanwhile.
        let mut reloading: Option<super::reload::Reading> = None;
        let mut reload_again = false;
        loop {
            let command = tokio::select! {
                signal = signals.next() => match signal {
                    Some(Signal::Stop) | None => Command::Shutdown,
                    Some(Signal::Reload) => Command::Reload,
                },
                Some(command) = commands.recv() => command,
                Some(joined) = self.tasks.join_next() => {
                    self.ended(joined).await;
                    continue;
                }
                read = async { reloading.as_mut().expect("guarded").await }, if reloading.is_some() => {
                    reloading = None;
                    self.reloaded(read).await;
                    if std::mem::take(&mut reload_again) {
                        reloading = Some(self.begin_reload());
                    } else {
                        Notifier.ready(&Status::shared(status));
                    }
                    continue;
                }
            };
            match command {
                Command::Shutdown => return,
                // One reload at a time; a request during one is done after it, with the newest file.
                Command::Reload if reloading.is_some() => reload_again = true,
                Command::Reload => {
                    Notifier.reloading();
                    reloading = Some(self.begin_reload());
                }
            }
        }
    }

    /// The stop sequence: no new reads, every loop drains within `drain_timeout` (systemd is told how
    /// much longer it may take), or a second stop signal ends it at once.
    async fn drain(
        &mut self,
        signals: &mut (impl Stream<Item = Signal> + Unpin),
        stop: Trigger,
    ) -> Stopped {
        let drain_timeout = self.settings.daemon.drain_timeout;
        info!(drain_timeout = ?drain_timeout, "stopping: no new reads; finishing messages in flight");
        let notify = Notifier;
        notify.stopping();
        self.vitals.stopping();
        stop.trigger();
        for r in self.running.values().chain(self.control.as_ref()) {
            r.trigger.trigger();
        }
        self.waiting.clear();
        let drain_end = tokio::time::Instant::now() + drain_timeout;
        let deadline = tokio::time::sleep_until(drain_end);
        tokio::pin!(deadline);
        let mut extend = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = extend.tick() => {
                    let left = drain_end.saturating_duration_since(tokio::time::Instant::now());
                    notify.extend_timeout(left + Duration::from_secs(5));
                }
                _ = &mut deadline => {
                    warn!("drain timed out; unfinished messages stay pending for the next start");
                    self.tasks.abort_all();
                    return Stopped::DrainTimedOut;
                }
                signal = signals.next() => if let Some(Signal::Stop) = signal {
                    warn!("second stop signal: exiting now; unfinished messages stay pending");
                    self.tasks.abort_all();
                    return Stopped::Forced;
                },
                joined = self.tasks.join_next() => if joined.is_none() {
                    info!("drained; every message in flight was committed");
                    return Stopped::Drained;
                },
            }
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
