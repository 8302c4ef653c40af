//! The origin's operational conventions: a heartbeat entry every interval, and a control stream of
//! signed commands.
//!
//! Owns [`Vitals`] (what a heartbeat or a status reply says: `server_id`, `timestamp`, `status`,
//! `memory_usage`, `uptime`, `started` and counters), the heartbeat task (XADD with `MAXLEN ~`), and the [`Control`]
//! handler. Control messages arrive on a group of this instance's own (every instance sees every
//! command); their route requires a message signature (`_sig`, [`crate::auth::signature`]) — an
//! unsigned, forged or altered one is dead-lettered and logged by the consumer loop, never obeyed — whose
//! roles must include `system_write` or `admin`, and which is used once: its `jti` is recorded in Redis
//! before the command acts, so a copy of it is refused. A command names its `target` (a server id or
//! `all`), which the signature covers. `status_request` is answered on the heartbeat stream with `is_response` and `request_id`;
//! `reload_config` and `shutdown` are handed to the daemon, as SIGHUP and SIGTERM would be.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;

use crate::auth::jwt::KeySet;
use crate::auth::{Op, Roles};
use crate::client::{Client, PublishOptions};
use crate::config::HeartbeatSettings;
use crate::engine::Stats;
use crate::health::Health;
use crate::model::envelope::{self, Fields};
use crate::model::message::{BoxFuture, Handler, Message, Outcome, Reply, ReplyKind};
use crate::shutdown::Shutdown;

/// What the daemon reports about itself.
pub struct Vitals {
    pub server_id: String,
    started: Instant,
    /// When this process started, by this host's clock (ms): the heartbeat's `started`, which tells
    /// one process from the next (`redstream status` counts restarts by it).
    started_ms: u64,
    stats: Mutex<Vec<Arc<Stats>>>,
    pub health: Arc<Health>,
    stopping: AtomicBool,
    stopped: AtomicBool,
}

impl Vitals {
    pub fn new(server_id: String, health: Arc<Health>) -> Self {
        Vitals {
            server_id,
            started: Instant::now(),
            started_ms: envelope::now_ms(),
            stats: Mutex::new(Vec::new()),
            health,
            stopping: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
        }
    }

    /// The loops whose counters are reported (replaced when reload changes them).
    pub fn set_stats(&self, stats: Vec<Arc<Stats>>) {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = stats;
    }

    /// The loops whose counters are reported.
    pub fn stats(&self) -> Vec<Arc<Stats>> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Drained: the last heartbeat says so.
    pub fn stopped(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// `healthy`, `degraded` (a loop is not making progress, or a condition such as a lapsing token),
    /// `stopping` or `stopped`, with the reasons when degraded.
    fn status(&self) -> (&'static str, Vec<String>) {
        if self.stopped.load(Ordering::Relaxed) {
            return ("stopped", Vec::new());
        }
        if self.stopping.load(Ordering::Relaxed) {
            return ("stopping", Vec::new());
        }
        let reasons = self.health.degraded();
        if reasons.is_empty() {
            ("healthy", reasons)
        } else {
            ("degraded", reasons)
        }
    }

    /// The heartbeat fields.
    pub fn fields(&self) -> Fields {
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let sum = |f: fn(&Stats) -> u64| -> u64 { stats.iter().map(|s| f(s)).sum() };
        let mut fields = Fields::with_capacity(10);
        fields.push("server_id", self.server_id.as_str());
        fields.push("timestamp", envelope::now_ms().to_string());
        let (status, reasons) = self.status();
        fields.push("status", status);
        if !reasons.is_empty() {
            fields.push("degraded_reasons", reasons.join("; "));
        }
        fields.push("memory_usage", resident_bytes().to_string());
        fields.push("uptime", self.started.elapsed().as_secs().to_string());
        fields.push("started", self.started_ms.to_string());
        fields.push("consumers", stats.len().to_string());
        fields.push(
            "processed",
            sum(|s| s.processed.load(Ordering::Relaxed)).to_string(),
        );
        fields.push(
            "retried",
            sum(|s| s.retried.load(Ordering::Relaxed)).to_string(),
        );
        fields.push(
            "dead_lettered",
            sum(|s| s.dead_lettered.load(Ordering::Relaxed)).to_string(),
        );
        // Per loop and per handler, for `redstream status`.
        let groups: Vec<serde_json::Value> = stats
            .iter()
            .map(|s| {
                serde_json::json!({
                    "stream": s.stream,
                    "group": s.group,
                    "consumer": s.consumer,
                    "processed": s.processed.load(Ordering::Relaxed),
                    "retried": s.retried.load(Ordering::Relaxed),
                    "dead_lettered": s.dead_lettered.load(Ordering::Relaxed),
                })
            })
            .collect();
        fields.push("groups", serde_json::Value::Array(groups).to_string());
        let handlers: Vec<serde_json::Value> = crate::metrics::global()
            .handler_quantiles()
            .into_iter()
            .map(|figures| serde_json::json!(figures))
            .collect();
        fields.push("handlers", serde_json::Value::Array(handlers).to_string());
        fields
    }
}

/// Resident memory of this process in bytes (VmRSS), 0 where /proc is not there.
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// Writes heartbeats: signed by the daemon's identity when its key set can sign, so that `redstream
/// status` can tell a daemon's own beats from anyone's XADD (a heartbeat's age is judged by the entry
/// id Redis assigned, its author by the signature).
#[derive(Clone)]
pub struct Beats {
    pub client: Client,
    pub settings: HeartbeatSettings,
    pub vitals: Arc<Vitals>,
    pub keys: Option<Arc<KeySet>>,
}

/// How long heartbeats may fail before the daemon reports it (a Redis restart takes less), and how
/// often it tries again meanwhile.
const HEARTBEAT_FAILING_AFTER: std::time::Duration = std::time::Duration::from_secs(4);
const HEARTBEAT_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

impl Beats {
    /// One heartbeat now.
    pub async fn beat(&self) -> Result<(), crate::client::Error> {
        let opts = PublishOptions {
            maxlen: Some(self.settings.max_len),
        };
        let (stream, fields) = (&self.settings.stream, self.vitals.fields());
        match &self.keys {
            Some(keys) => self.client.publish_signed(stream, fields, keys, opts).await,
            None => self.client.publish(stream, fields, opts).await,
        }
        .map(|_| ())
    }

    /// A heartbeat every interval until shutdown, and one saying `stopping` then. (The daemon writes
    /// a last one saying `stopped` once it has drained.) A heartbeat that fails is tried again every
    /// 2 s; failing for 4 s is reported — a WARN naming the stream, `redstream_heartbeat_failing` 1 and
    /// the daemon degraded — since `redstream status` will count this daemon missing.
    pub async fn run(self, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(self.settings.interval);
        let mut failing_since: Option<Instant> = None;
        let mut reported = false;
        loop {
            let last = tokio::select! {
                _ = tick.tick() => false,
                _ = tokio::time::sleep(HEARTBEAT_RETRY), if failing_since.is_some() => false,
                _ = shutdown.wait() => true,
            };
            match self.beat().await {
                Ok(()) => {
                    if reported {
                        tracing::info!(stream = %self.settings.stream, "heartbeats are published again");
                        crate::metrics::global().heartbeat_failing.set(0);
                        self.vitals.health.recover("heartbeat");
                    }
                    failing_since = None;
                    reported = false;
                }
                Err(e) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if !reported && since.elapsed() >= HEARTBEAT_FAILING_AFTER {
                        tracing::warn!(stream = %self.settings.stream, error = %e,
                            "heartbeats cannot be published to {}: `redstream status` counts this daemon missing", self.settings.stream);
                        crate::metrics::global().heartbeat_failing.set(1);
                        self.vitals.health.degrade(
                            "heartbeat",
                            format!(
                                "heartbeats cannot be published to {}: {e}",
                                self.settings.stream
                            ),
                        );
                        reported = true;
                    } else {
                        tracing::debug!(error = %e, "heartbeat not published");
                    }
                }
            }
            if last {
                return;
            }
        }
    }
}

/// What control messages (and signals) ask the daemon to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Reload,
    Shutdown,
}

/// The handler of control messages.
pub struct Control {
    pub commands: mpsc::UnboundedSender<Command>,
    pub vitals: Arc<Vitals>,
    pub reply_to: String,
    /// Records each command's signature use before it is obeyed.
    pub client: Client,
    /// This instance's group on the control stream.
    pub group: String,
}

/// The field naming which daemon a command is for: a server id, or `all`.
pub const TARGET: &str = "target";

impl Handler for Control {
    fn name(&self) -> &str {
        "control"
    }

    fn handle<'a>(&'a self, msg: &'a Message) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            // The route required a verified token; its roles must cover the system domain.
            let Some(sender) = &msg.sender else {
                return Outcome::Reject("unauthenticated: control messages must be signed".into());
            };
            // The claims were verified, so the roles parse; an unknown one grants nothing.
            let roles = Roles::parse(&sender.roles).unwrap_or_default();
            if !roles.allows(Op::Publish, "system") {
                return Outcome::Reject(format!(
                    "unauthorized: {} has {}, control needs system_write or admin",
                    sender.subject, roles
                ));
            }
            // The target is part of what was signed: a command for another daemon is not ours.
            let target = msg.fields.get_str(TARGET).unwrap_or("");
            if target != "all" && target != self.vitals.server_id {
                if target.is_empty() {
                    return Outcome::Reject(
                        "a control command names its target: a server id, or \"all\"".into(),
                    );
                }
                return Outcome::Success(Vec::new());
            }
            // Commands act before their commit, so their single use is recorded first: a copy of
            // a command that already ran (here or before a crash, by another entry) is refused.
            let Some(once) = &sender.once else {
                return Outcome::Reject("unauthenticated: control messages must be signed".into());
            };
            let owner = format!("{}/{}", msg.stream, msg.id);
            match self
                .client
                .claim_signature(&msg.stream, &self.group, once, &owner)
                .await
            {
                Ok(None) => {}
                Ok(Some(first)) => {
                    return Outcome::Reject(format!(
                        "replayed: this signed command already took effect as {first}"
                    ));
                }
                Err(e) => return Outcome::Retry(format!("cannot record the command's use: {e}")),
            }
            let kind = msg.fields.get_str("type").unwrap_or("");
            tracing::info!(sender = ?sender.subject, command = ?kind, message_id = %msg.id, "control command");
            match kind {
                "status_request" => {
                    let mut fields = self.vitals.fields();
                    fields.push("is_response", "true");
                    fields.push(
                        "request_id",
                        msg.fields.get("request_id").unwrap_or_default().to_vec(),
                    );
                    Outcome::Success(vec![Reply {
                        stream: self.reply_to.clone(),
                        fields,
                        kind: ReplyKind::Now,
                    }])
                }
                "reload_config" => self.obey(Command::Reload),
                "shutdown" => self.obey(Command::Shutdown),
                other => Outcome::Reject(format!(
                    "unknown control command {other:?}: expected status_request, reload_config or shutdown"
                )),
            }
        })
    }
}

impl Control {
    fn obey(&self, command: Command) -> Outcome {
        match self.commands.send(command) {
            Ok(()) => Outcome::Success(Vec::new()),
            Err(_) => Outcome::Retry("the daemon is not taking commands".into()),
        }
    }
}
