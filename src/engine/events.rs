//! What a consumer loop reports, one named event per outcome: each writes its log line, its counters
//! ([`crate::metrics`] and the loop's [`Stats`], which the heartbeat and `redstream status` show) and
//! its health in one place, so a log line and its metric cannot drift apart — and tests can assert on
//! counters rather than log text.
//!
//! Log lines name the message (`message_id`, `handler`, `trace_id`) in their fields; the loop's span
//! adds `stream`, `group` and `consumer`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::machine::{Fate, Redo};
use super::settings::ConsumerSettings;
use crate::client::{Error, Restored};
use crate::health::Liveness;
use crate::metrics::{self, GroupLabels, MessageLabels, StreamLabels};
use crate::model::StreamId;
use crate::model::dead_letter as dlq;
use crate::model::decided::Finished;
use crate::model::message::Message;

/// Counters of one loop, for logs, tests and the heartbeat.
#[derive(Debug, Default)]
pub struct Stats {
    /// Whose counters these are: the loop's stream, group and consumer.
    pub stream: String,
    pub group: String,
    pub consumer: String,
    /// Committed after the handler succeeded.
    pub processed: AtomicU64,
    /// Left pending by a failed handler (retry later).
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Entries deleted or trimmed while pending: acked, never dispatched.
    pub vanished: AtomicU64,
    /// Commits skipped because another consumer owned the entry by then.
    pub not_ours: AtomicU64,
    /// The group's position as the loop last knew it: what a restarted loop, or a reload's successor,
    /// re-creates a vanished group against, so that nothing published after Redis lost its data is
    /// skipped.
    pub position: Mutex<Option<StreamId>>,
}

impl Stats {
    pub fn note_position(&self, position: Option<StreamId>) {
        *self.position.lock().unwrap_or_else(|p| p.into_inner()) = position;
    }

    /// The group's position as the loop last knew it.
    pub fn position(&self) -> Option<StreamId> {
        *self.position.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The events of one loop, with the counters they move.
pub struct Events {
    cfg: Arc<ConsumerSettings>,
    stats: Arc<Stats>,
    liveness: Arc<Liveness>,
    meters: Meters,
    /// Commits refused in a row (Redis out of memory…), for logging the first loudly.
    commit_failures: u32,
    /// Per handler: when a retry was last logged at WARN, and how many were not logged since.
    retry_logged: HashMap<Arc<str>, (Instant, u64)>,
}

impl Events {
    pub fn new(cfg: Arc<ConsumerSettings>, stats: Arc<Stats>, liveness: Arc<Liveness>) -> Self {
        // Exported at 0 from the start, so that an alert on its increase sees the first loss.
        let _ = metrics::global().data_loss.get_or_create(&StreamLabels {
            stream: cfg.stream.to_string(),
        });
        Events {
            meters: Meters::new(&cfg.stream, &cfg.group),
            cfg,
            stats,
            liveness,
            commit_failures: 0,
            retry_logged: HashMap::new(),
        }
    }

    /// The loop's pace: entries per read, entries in flight.
    pub fn pace(&self, read: usize, window: usize) {
        self.meters.read_size.set(read as i64);
        self.meters.window.set(window as i64);
    }

    /// The histogram a handler's call durations go to.
    pub fn timer(&mut self, handler: &Arc<str>) -> metrics::HandlerTimer {
        self.meters
            .durations
            .entry(handler.clone())
            .or_insert_with(|| metrics::global().handler_timer(handler))
            .clone()
    }

    /// A committed message left flight.
    pub fn settled(&mut self, f: &Finished, fate: &Fate) {
        let (id, handler) = (&f.msg.id, &f.handler);
        self.meters.count(handler, fate.label());
        match fate {
            Fate::Committed { replies } => {
                debug!(message_id = %id, handler = %handler, outcome = "committed", replies, "committed");
                self.stats.processed.fetch_add(1, Ordering::Relaxed);
            }
            Fate::DeadLettered(reason) => {
                self.meters.dead_lettered.inc();
                self.handler_failed(handler);
                self.liveness.accepted();
                // The text names what journalctl -u shows without -o verbose; the fields stay.
                let reason = crate::logging::escape(reason.as_bytes(), 1000);
                let (c, dlq) = (&self.cfg, &self.cfg.dead_letter);
                warn!(message_id = %id, handler = %handler, trace_id = %trace_of(&f.msg), outcome = "dead-lettered", reason = %reason, dead_letter = %dlq,
                    "dead-lettered {id} of {} (group {}) to {dlq}: {reason}", c.stream, c.group);
                self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            }
            Fate::TooLarge(size) => {
                self.meters.dead_lettered.inc();
                self.liveness.accepted();
                let limit = &self.cfg.entry_limit;
                warn!(message_id = %id, outcome = "dead-lettered", reason = dlq::TOO_LARGE, fields = size.fields, bytes = size.bytes, limit_fields = limit.fields, limit_bytes = limit.bytes, dead_letter = %self.cfg.dead_letter, "an entry over [limits] was dead-lettered by reference; its content was not read");
                self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            }
            Fate::Vanished => {
                self.stats.vanished.fetch_add(1, Ordering::Relaxed);
            }
            Fate::NotOurs => {
                info!(message_id = %id, handler = %handler, outcome = "not-ours", "another consumer owned the entry by commit time; this result was discarded");
                self.stats.not_ours.fetch_add(1, Ordering::Relaxed);
            }
            Fate::Partial(e) => {
                error!(message_id = %id, handler = %handler, error = %e, "a commit's write failed after others of the same message were made; the message was acked so none is written twice, and its effects are incomplete");
                metrics::global().error("commit_partial");
            }
            Fate::Stranded(reason) => {
                // The entry stays pending in Redis (it is never lost) and is claimed again later,
                // until an operator fixes the stream.
                let dlq = &self.cfg.dead_letter;
                error!(message_id = %id, handler = %handler, reason = ?reason, dead_letter = %dlq, "the dead-letter stream refused this message; it stays pending");
                metrics::global().error("dead_letter_refused");
                self.liveness.refused(format!(
                    "the dead-letter stream {dlq} refuses messages ({reason}); they stay pending until it is fixed"
                ));
            }
        }
    }

    /// Nothing of a message was written: a state key its handler read and wrote on changed since; it
    /// runs again. (Messages contending for a key: expected now and then, so not a warning.)
    pub fn rerun(&mut self, f: &Finished, key: &str) {
        debug!(message_id = %f.msg.id, handler = %f.handler, key = %key, "the state this message's handler read changed before its commit; running it again");
        metrics::global().error("state_conflict");
    }

    /// Nothing of a message was written; it goes to the dead-letter stream in the next commit.
    pub fn redo(&mut self, f: &Finished, why: &Redo) {
        let (id, handler) = (&f.msg.id, &f.handler);
        match why {
            Redo::ReplyRefused(reason) => {
                warn!(message_id = %id, handler = %handler, reason = ?reason, "a reply target refused this message before anything was written; dead-lettering it");
                metrics::global().error("reply_refused");
            }
            Redo::Replayed { original } => {
                warn!(message_id = %id, handler = %handler, original = %original, "a signed message was replayed; dead-lettering the copy");
                metrics::global().error("replayed");
            }
        }
    }

    /// Redis refused a message's write for a reason of the whole server: loud once per streak.
    pub fn commit_refused(&mut self, id: &str, refusal: &str) {
        self.commit_failures += 1;
        if self.commit_failures == 1 {
            warn!(message_id = %id, error = ?refusal, "Redis refused a commit's write; nothing of the message was written, retrying");
        } else {
            debug!(message_id = %id, error = ?refusal, failures = self.commit_failures, "commit still refused");
        }
        metrics::global().error("commit_failed");
        self.liveness
            .degrade(format!("commits are refused: {refusal}"));
    }

    /// A commit's verdicts all came back final.
    pub fn commits_flow(&mut self) {
        if std::mem::take(&mut self.commit_failures) > 0 {
            info!("commits go through again");
        }
        self.liveness.recover();
    }

    /// A commit failed as a whole on Redis trouble; its batch is committed again later.
    pub fn commit_failed(&mut self, e: &Error, messages: usize) {
        debug!(error = %e, messages, "commit failed; will retry");
        metrics::global().error(e.kind());
        self.liveness.degrade(format!("commits fail: {e}"));
    }

    /// The group is gone, and with it the delivery of a batch that can never be committed.
    pub fn group_gone(&mut self, messages: usize) {
        let c = &self.cfg;
        warn!(messages, stream = %c.stream, group = %c.group,
            "the consumer group is gone: {messages} decided message(s) cannot be committed and leave this loop; entries Redis still holds are delivered again");
        metrics::global().error("no_group");
    }

    /// Redis refused a batch's commit as a whole: it is halved to find the culprit.
    pub fn halving(&mut self, messages: usize, e: &Error) {
        metrics::global().error("commit_refused");
        warn!(messages, error = %e, "Redis refused a commit as a whole; committing its halves apart to find the message that causes it");
    }

    /// The message whose commit Redis refuses alone: dead-lettered, or — its dead letter refused too —
    /// left pending.
    pub fn culprit(&mut self, f: &Finished, e: &Error, stranded: bool) {
        metrics::global().error("commit_refused");
        let (id, handler) = (&f.msg.id, &f.handler);
        self.liveness
            .degrade(format!("a message's commit is refused: {e}"));
        if stranded {
            let dlq = &self.cfg.dead_letter;
            error!(message_id = %id, handler = %handler, error = %e, dead_letter = %dlq, "Redis refuses this message's dead letter; it stays pending and is claimed again later");
            self.liveness.refused(format!(
                "Redis refuses a dead letter to {dlq} ({e}); the message stays pending"
            ));
        } else {
            error!(message_id = %id, handler = %handler, error = %e, "Redis refuses this message's commit whatever it is batched with; dead-lettering it");
        }
    }

    /// A handler failed; the message stays pending for a retry. Each retry is at WARN with its reason
    /// and delivery count, at most one line per handler per second (the lines skipped meanwhile are
    /// counted in the next). `wait`: when it is tried again on the consumer's retry schedule, if it has
    /// one.
    pub fn retried(
        &mut self,
        msg: &Message,
        handler: &Arc<str>,
        reason: &str,
        wait: Option<Duration>,
    ) {
        self.stats.retried.fetch_add(1, Ordering::Relaxed);
        self.handler_failed(handler);
        self.meters.count(handler, "retry");
        let now = Instant::now();
        let entry = self
            .retry_logged
            .entry(handler.clone())
            .or_insert((now - Duration::from_secs(2), 0));
        if now.duration_since(entry.0) < Duration::from_secs(1) {
            entry.1 += 1;
            return;
        }
        let skipped = std::mem::take(&mut entry.1);
        entry.0 = now;
        let (id, deliveries, max) = (&msg.id, msg.deliveries, self.cfg.max_deliveries);
        // Escaped: a guest's text cannot forge log lines.
        let reason = crate::logging::escape(reason.as_bytes(), 1000);
        warn!(
            message_id = %id,
            handler = %handler,
            trace_id = %trace_of(msg),
            outcome = "retry",
            deliveries,
            max_deliveries = max,
            reason = %reason,
            skipped,
            retry_in = ?wait,
            "handler failed; the message stays pending and will be retried{}: {id} of {} (group {}), delivery {deliveries} of {max}: {reason}",
            wait.map_or(String::new(), |w| {
                let ms = Duration::from_millis(u64::try_from(w.as_millis()).unwrap_or(u64::MAX));
                format!(" in {}", humantime::format_duration(ms))
            }),
            self.cfg.stream,
            self.cfg.group,
        );
    }

    /// A read or claim failed on Redis trouble that a retry may fix: loud for the first of a streak.
    pub fn redis_trouble(&mut self, e: &Error, failures: u32, retry_in: Duration) {
        if failures == 1 {
            warn!(error = %e, retry_in = ?retry_in, "Redis trouble; retrying with backoff");
        } else {
            debug!(error = %e, failures, retry_in = ?retry_in, "Redis still in trouble");
        }
    }

    /// Any Redis failure of a read, claim or group re-creation: counted, and the loop's health says
    /// why it is not well.
    pub fn redis_failed(&mut self, e: &Error) {
        metrics::global().error(e.kind());
        if e.is_unreachable() {
            self.liveness.unreachable(format!("Redis trouble: {e}"));
        } else {
            self.liveness.degrade(format!("Redis trouble: {e}"));
        }
    }

    /// A read succeeded after `failures` failed ones.
    pub fn reading_again(&mut self, failures: u32) {
        info!(failures, "reading again after Redis trouble");
        metrics::global().reconnected();
        self.liveness.recover();
    }

    /// The group was gone and is re-created ([`crate::client::restore`]); when Redis lost data, loudly —
    /// an ERROR naming the stream, the data-loss counter, and the loop degraded with the reason until
    /// it reads again.
    pub fn group_restored(&mut self, restored: &Restored) {
        let c = &self.cfg;
        let lost = &restored.lost;
        if lost.is_data_loss() {
            error!(stream = %c.stream, group = %c.group, at = %restored.at, reason = lost.describe(), "Redis lost this stream's data: entries not yet handled may be gone; the group is re-created from the start of the stream Redis has now, so nothing published since is skipped");
            metrics::global()
                .data_loss
                .get_or_create(&StreamLabels {
                    stream: c.stream.to_string(),
                })
                .inc();
            self.liveness.degrade(format!(
                "Redis lost the data of {}: {}",
                c.stream,
                lost.describe()
            ));
        } else {
            warn!(stream = %c.stream, group = %c.group, at = %restored.at, reason = lost.describe(), "the consumer group was gone; re-created it");
        }
        if restored.created {
            info!(stream = %c.stream, group = %c.group, at = %restored.at, "re-created the group");
        }
    }

    /// A claim took entries other consumers had left idle (`fresh` of them new to this loop), and
    /// found `dropped` of them deleted.
    pub fn claimed(&mut self, fresh: usize, dropped: usize) {
        if dropped > 0 {
            debug!(
                count = dropped,
                "claimed entries had been deleted; Redis dropped them from the PEL"
            );
            self.stats
                .vanished
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
        if fresh > 0 {
            info!(count = fresh, "claimed idle entries");
        }
    }

    /// A message held back by its handler's open breaker: pending, its delivery given back, due again
    /// in `wait`. Counted (`redstream_breaker_held_total`); the breaker's own lines say why.
    pub fn held(&mut self, msg: &Message, handler: &str, wait: Duration) {
        crate::metrics::global()
            .breaker_held
            .get_or_create(&crate::metrics::HandlerLabels {
                handler: handler.to_owned(),
            })
            .inc();
        tracing::debug!(
            message_id = %msg.id,
            handler,
            deliveries = msg.deliveries,
            "held back by the handler's open breaker; due again in {}",
            humantime::format_duration(Duration::from_millis(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)))
        );
    }

    /// A failure a handler decided or caused, counted for it (dead letters the engine or the router
    /// decided — delivered too often, unmatched — are no handler's: no handler that ran has them).
    fn handler_failed(&mut self, handler: &Arc<str>) {
        if let Some(timer) = self.meters.durations.get(handler) {
            timer.failed();
        }
    }

    /// The loop's position in its stream moved.
    pub fn position(&mut self, position: Option<StreamId>) {
        self.stats.note_position(position);
    }

    /// A drain began: reads stopped, `released` queued messages left for the next start.
    pub fn draining(&mut self, running: usize, released: usize) {
        info!(
            running,
            released, "draining: reads stopped, finishing messages in flight"
        );
    }
}

/// The loop's metrics, looked up once per handler and outcome rather than per message.
struct Meters {
    stream: String,
    group: String,
    counters: HashMap<(Arc<str>, &'static str), Counter>,
    last: Option<(Arc<str>, &'static str, Counter)>,
    durations: HashMap<Arc<str>, metrics::HandlerTimer>,
    dead_lettered: Counter,
    /// What the pace allows now: entries per read, entries in flight.
    read_size: Gauge,
    window: Gauge,
}

impl Meters {
    fn new(stream: &str, group: &str) -> Self {
        let labels = GroupLabels {
            stream: stream.to_owned(),
            group: group.to_owned(),
        };
        let m = metrics::global();
        Meters {
            stream: stream.to_owned(),
            group: group.to_owned(),
            counters: HashMap::new(),
            last: None,
            durations: HashMap::new(),
            dead_lettered: m.dead_lettered.get_or_create(&labels).clone(),
            read_size: m.read_size.get_or_create(&labels).clone(),
            window: m.window.get_or_create(&labels).clone(),
        }
    }

    fn count(&mut self, handler: &Arc<str>, outcome: &'static str) {
        // Batches are mostly one handler and one outcome: skip the map for a repeat.
        if let Some((h, o, c)) = &self.last
            && Arc::ptr_eq(h, handler)
            && *o == outcome
        {
            c.inc();
            return;
        }
        let (stream, group) = (&self.stream, &self.group);
        let counter = self
            .counters
            .entry((handler.clone(), outcome))
            .or_insert_with(|| {
                let labels = MessageLabels {
                    stream: stream.clone(),
                    group: group.clone(),
                    handler: handler.to_string(),
                    outcome: outcome.to_owned(),
                };
                metrics::global().messages.get_or_create(&labels).clone()
            })
            .clone();
        counter.inc();
        self.last = Some((handler.clone(), outcome, counter));
    }
}

/// A message's `_trace_id` as it may appear in a log line: whatever a publisher wrote, escaped and cut
/// at 128 bytes (a newline in it must not start a forged line).
pub fn trace_of(msg: &Message) -> String {
    msg.fields
        .get(crate::model::envelope::TRACE_ID)
        .map(|t| crate::logging::escape(t, 128))
        .unwrap_or_default()
}
