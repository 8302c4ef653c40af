//! The services that run beside the consumer loops — the metrics endpoint, the credential exchange,
//! `wasm.watch` ([`listen`], before any loop), the heartbeat, retention, the stream poller
//! ([`beside_loops`], once the loops run), and once the daemon is ready systemd's watchdog and STATUS
//! and the identity token's watch — as one list of named tasks: each returns
//! when the daemon's stop is triggered, and [`Services::stop`] awaits them all uniformly, stopping
//! those that do not end in time by name.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::warn;

use super::control::{self, Command, Vitals};
use super::error::RunError;
use super::systemd::Status;
use crate::client::Client;
use crate::config::Settings;
use crate::engine::ConsumerSettings;
use crate::metrics::{GroupLabels, StreamLabels, global};
use crate::shutdown::Shutdown;

/// Named tasks started one by one and stopped together.
#[derive(Default)]
pub struct Services {
    set: JoinSet<&'static str>,
    running: Vec<&'static str>,
}

impl Services {
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.running.push(name);
        self.set.spawn(async move {
            task.await;
            name
        });
    }

    /// After the stop was triggered: waits until `deadline` for every service to end, then stops the
    /// rest, naming them. Returns whether all ended by themselves.
    pub async fn stop(&mut self, deadline: tokio::time::Instant) -> bool {
        let all = tokio::time::timeout_at(deadline, async {
            while let Some(ended) = self.set.join_next().await {
                if let Ok(name) = ended {
                    self.running.retain(|n| *n != name);
                }
            }
        })
        .await;
        if all.is_ok() {
            return true;
        }
        warn!(services = ?self.running, "services did not end in time; stopping them");
        self.set.abort_all();
        while self.set.join_next().await.is_some() {}
        false
    }
}

/// What the services beside the loops are made from.
pub struct Wiring {
    pub client: Client,
    pub vitals: Arc<Vitals>,
    pub status: Arc<std::sync::Mutex<Status>>,
    /// The consumers the poller polls: the config's, as of the last reload.
    pub polled: watch::Receiver<Vec<ConsumerSettings>>,
    pub stop: Shutdown,
}

/// Starts what must be up before any loop: the metrics endpoint and the credential exchange (a
/// daemon that cannot bind their address or socket does not start), and `wasm.watch`'s debounce,
/// which turns what `changed` reports into reloads on `commands`.
pub async fn listen(
    settings: &Settings,
    changed: mpsc::UnboundedReceiver<std::path::PathBuf>,
    commands: mpsc::UnboundedSender<Command>,
    stop: &Shutdown,
) -> Result<Services, RunError> {
    let mut services = Services::default();
    if let Some(addr) = settings.metrics_listen {
        let listener = crate::metrics::bind(addr)
            .await
            .map_err(|source| RunError::Metrics { addr, source })?;
        services.spawn("metrics", crate::metrics::serve(listener, stop.clone()));
    }
    // The credential exchange, where this daemon holds the signing key and a socket is configured.
    if let Some(path) = (settings.auth.endpoint.as_ref()).filter(|_| settings.auth.keys.can_sign())
    {
        let listener = super::exchange::bind(path).map_err(|source| RunError::Exchange {
            path: path.clone(),
            source,
        })?;
        let exchange = super::exchange::Exchange::new(&settings.auth, settings.naming.clone());
        let serve = super::exchange::serve(listener, exchange, stop.clone());
        services.spawn("exchange", serve);
    }
    services.spawn(
        "watch",
        super::watch::debounce(changed, commands, stop.clone()),
    );
    Ok(services)
}

/// Starts, once the loops run, what reports on them or works beside them: the heartbeat (its first
/// beat counts the loops), retention and the stream poller. Returns the heartbeat, for the last beat
/// after the drain.
pub fn beside_loops(
    services: &mut Services,
    settings: &Settings,
    w: Wiring,
) -> Option<control::Beats> {
    let stop = &w.stop;
    let beats = settings.heartbeat.clone().map(|hb| control::Beats {
        client: w.client.clone(),
        settings: hb,
        vitals: w.vitals.clone(),
        keys: (settings.auth.keys.can_sign()).then(|| settings.auth.keys.clone()),
    });
    if let Some(b) = beats.clone() {
        services.spawn("heartbeat", b.run(stop.clone()));
    }
    if !settings.retention.is_empty() {
        let rules = settings.retention.clone();
        let every = settings.retention_interval;
        let trim = super::retention::run(w.client.clone(), rules, every, stop.clone());
        services.spawn("retention", trim);
    }
    let pending = (w.status.lock().unwrap_or_else(|p| p.into_inner()).pending).clone();
    let every = settings.metrics_poll;
    let poll = poll_streams(w.client.clone(), w.polled, every, pending, stop.clone());
    services.spawn("poller", poll);
    services.spawn("delayed", move_delayed(w.client.clone(), stop.clone()));
    beats
}

/// How often delayed messages are looked for: a message appears at most this long after its time.
const DELAYED_EVERY: Duration = Duration::from_millis(200);

/// Moves delayed messages (crate::client::delayed) onto their streams at their time: those of every
/// stream this daemon may publish to. Any number of daemons may do it side by side; each message is
/// moved once.
async fn move_delayed(client: Client, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(DELAYED_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refused = HashSet::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        let streams = match client.delayed_streams().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list the streams with delayed messages");
                continue;
            }
        };
        for stream in streams {
            if let Err(e) = client.authorize(crate::auth::Op::Publish, &stream) {
                if refused.insert(stream.clone()) {
                    tracing::debug!(%stream, error = %e, "delayed messages for a stream this daemon may not publish to: left to others");
                }
                continue;
            }
            let labels = StreamLabels {
                stream: stream.clone(),
            };
            loop {
                match client.move_delayed(&stream, 100).await {
                    Ok((moved, left, _next)) => {
                        let m = global();
                        m.delayed.get_or_create(&labels).set(left as i64);
                        if moved > 0 {
                            m.delayed_moved.get_or_create(&labels).inc_by(moved);
                            tracing::debug!(%stream, moved, left, "moved delayed messages");
                        }
                        if moved < 100 {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%stream, error = %e, "cannot move delayed messages; trying again");
                        break;
                    }
                }
            }
        }
    }
}

/// Polls pending entries, lag and length of every consumed stream into the metrics (and the total
/// pending count into `pending`, for the status line). Follows reloads: the series of a group or
/// stream the config no longer consumes are removed, on every poll (the group's own loop may still be
/// draining, and setting its pace gauges, when the reload lands).
async fn poll_streams(
    client: Client,
    consumers: watch::Receiver<Vec<ConsumerSettings>>,
    every: Duration,
    pending: Arc<AtomicU64>,
    mut shutdown: Shutdown,
) {
    let mut tick = tokio::time::interval(every);
    let (mut seen_groups, mut seen_streams) = (HashSet::new(), HashSet::new());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        let consumers = consumers.borrow().clone();
        let group = |c: &ConsumerSettings| GroupLabels {
            stream: c.stream.to_string(),
            group: c.group.clone(),
        };
        let stream = |c: &ConsumerSettings| StreamLabels {
            stream: c.stream.to_string(),
        };
        let groups: HashSet<GroupLabels> = consumers.iter().map(group).collect();
        let streams: HashSet<StreamLabels> = consumers.iter().map(stream).collect();
        let m = global();
        for gone in seen_groups.difference(&groups) {
            m.pending.remove(gone);
            m.lag.remove(gone);
            m.read_size.remove(gone);
            m.window.remove(gone);
            m.retries_scheduled.remove(gone);
        }
        for gone in seen_streams.difference(&streams) {
            m.stream_length.remove(gone);
        }
        seen_groups.extend(groups);
        seen_streams.extend(streams);
        let mut total = 0;
        for c in &consumers {
            match client.groups(&c.stream).await {
                Ok(groups) => {
                    if let Some(g) = groups.iter().find(|g| g.name == c.group) {
                        total += g.pending;
                        m.pending.get_or_create(&group(c)).set(g.pending as i64);
                        let lag = g.lag.map_or(-1, |l| l as i64);
                        m.lag.get_or_create(&group(c)).set(lag);
                    }
                }
                Err(e) => tracing::debug!(error = %e, stream = %c.stream, "cannot poll the group"),
            }
            if c.retry.is_some()
                && let Ok(n) = client.scheduled_retries(&c.stream, &c.group).await
            {
                m.retries_scheduled.get_or_create(&group(c)).set(n as i64);
            }
            if let Ok(info) = client.stream_info(&c.stream).await {
                m.stream_length
                    .get_or_create(&stream(c))
                    .set(info.length as i64);
            }
        }
        pending.store(total, Ordering::Relaxed);
    }
}
