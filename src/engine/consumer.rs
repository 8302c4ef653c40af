//! One consumer of one group: the read / claim / ack loop (docs/design.md, "Data flow" and "Delivery").
//!
//! Owns the life of a message from delivery to commit: it re-reads this consumer's own pending entries
//! at start (and after a read whose reply was lost), then reads new ones; claims entries that other
//! (dead) consumers left idle; dead-letters what was delivered too often; runs the handler with a
//! deadline, contained panics and per-key ordering; and commits outcomes in batches — the commit of
//! batch N travels in the same round trip as the read of batch N+1, or alone over the shared connection
//! when the read is blocked. It recovers from every Redis fault it can name (lost connections, timeouts,
//! a lost group) with backoff, and returns only on drain or on an error no retry can fix.
//!
//! Why nothing is lost: an entry is acked only by the commit script, after its handler succeeded, in
//! the same atomic step as its replies. Everything else — a crash, a cancelled read, a drain that runs
//! out of time, a handler that fails — leaves the entry pending in Redis, where this consumer's PEL
//! re-read or another consumer's XAUTOCLAIM finds it again. Only *waits* are cancelled on shutdown (the
//! blocking read, backoff sleeps); handler calls and commits run to completion.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info, trace, warn};

use super::flight::{Flight, Job, key_of};
use super::pace::Pace;
use super::router::{Router, Selection, Unmatched};
use super::settings::ConsumerSettings;
use crate::auth::Op;
use crate::auth::jwt::KeySet;
use crate::auth::signature;
use crate::backoff::Backoff;
use crate::client::commit::{self, Committed, Committer, Effect, Finished};
use crate::client::decode::Entries;
use crate::client::{Client, Error, GroupReader, ReadFrom, Round};
use crate::health::Liveness;
use crate::metrics::{self, GroupLabels, MessageLabels, StreamLabels};
use crate::model::StreamId;
use crate::model::dead_letter as dlq;
use crate::model::envelope::Entry;
use crate::model::limits::{self, Size};
use crate::model::message::{BatchDone, Handled, Handler, Message, Once, Outcome, Sender};
use crate::shutdown::Shutdown;
use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

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
    pub position: std::sync::Mutex<Option<StreamId>>,
}

impl Stats {
    fn note_position(&self, position: Option<StreamId>) {
        *self.position.lock().unwrap_or_else(|p| p.into_inner()) = position;
    }

    /// The group's position as the loop last knew it.
    pub fn position(&self) -> Option<StreamId> {
        *self.position.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Everything a loop needs; cheap to clone for a restart.
#[derive(Clone)]
pub struct Consumer {
    pub cfg: Arc<ConsumerSettings>,
    pub client: Client,
    /// Swapped whole on reload: new messages take the new routes and handlers, messages in flight
    /// finish with the ones they started with.
    pub router: Arc<ArcSwap<Router>>,
    /// Verifies `_token` on routes that require a signed sender.
    pub keys: Arc<KeySet>,
    pub stats: Arc<Stats>,
    /// Where this loop reports until when it is healthy, for the watchdog.
    pub liveness: Arc<Liveness>,
    /// Backoff bounds for Redis trouble.
    pub retry_min: Duration,
    pub retry_max: Duration,
}

/// A message that left its handler: what to commit, or why it stays pending for a retry.
struct Done {
    msg: Message,
    effect: Result<Effect, String>,
    handler: Arc<str>,
}

/// What the round task hands back.
type RoundResult = (GroupReader, Result<Round, Error>);

/// What a commit task hands back: the script's reply.
type CommitResult = Result<redis::Value, Error>;

/// The loop's state: the entries' bookkeeping ([`Flight`]) and where the loop is in Redis.
struct State {
    flight: Flight,
    /// The reader between rounds (a round task holds it meanwhile).
    reader: Option<GroupReader>,
    /// The round in progress — a read, with the commit of what had finished — and when it began.
    round: Option<(JoinHandle<RoundResult>, Instant)>,
    /// The batch travelling with the round in progress.
    in_round: Vec<Finished>,
    /// The commit sent alone on the shared connection, and when it began.
    commit: Option<(JoinHandle<CommitResult>, Instant)>,
    /// The batch of the commit task in progress.
    committing: Vec<Finished>,
    /// Redis trouble: when to try again, and the backoff that said so.
    retry_at: Option<Instant>,
    backoff: Backoff,
    /// Stopped reading; finishing and committing what is in flight.
    draining: bool,
    /// When a handler, a round or a commit last came back (for liveness).
    last_progress: Instant,
    /// Commits refused in a row (Redis out of memory…), for logging the first loudly.
    commit_failures: u32,
    /// Per handler: when a retry was last logged at WARN, and how many were not logged since.
    retry_logged: HashMap<Arc<str>, (Instant, u64)>,
    /// While re-reading our own pending entries: the id to continue after.
    recover: Option<String>,
    /// The highest id a `>` read gave us; a lost read's entries are pending after it.
    last_new: String,
    /// The group's position as this loop last knew it (its last-delivered id at start, then the
    /// newest entry read): how a lost group tells an intact stream from one Redis made anew.
    position: Option<StreamId>,
    claim_cursor: String,
    /// Claim rounds still due: set by the claim timer, spent while claims come back full.
    claim_passes: u8,
    /// What the round in progress reads, and how many entries it asked for.
    reading: Reading,
    round_count: usize,
    /// How much to read at once and hold in flight.
    pace: Pace,
    meters: Meters,
}

/// What a round reads: new entries, this consumer's own pending ones (recovery), or entries idle
/// long enough to claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reading {
    New,
    Pending,
    Idle,
}

/// How many claim rounds one tick of the claim timer may run in a row while claims come back full.
const CLAIM_PASSES: u8 = 8;

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
        Meters {
            stream: stream.to_owned(),
            group: group.to_owned(),
            counters: HashMap::new(),
            last: None,
            durations: HashMap::new(),
            dead_lettered: metrics::global()
                .dead_lettered
                .get_or_create(&labels)
                .clone(),
            read_size: metrics::global().read_size.get_or_create(&labels).clone(),
            window: metrics::global().window.get_or_create(&labels).clone(),
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

    fn duration(&mut self, handler: &Arc<str>) -> metrics::HandlerTimer {
        self.durations
            .entry(handler.clone())
            .or_insert_with(|| metrics::global().handler_timer(handler))
            .clone()
    }
}

impl Consumer {
    /// Runs until `shutdown` has drained the loop (Ok) or an error no retry can fix (Err).
    pub async fn run(&self, mut shutdown: Shutdown) -> Result<(), Error> {
        let cfg = &*self.cfg;
        let sha = commit::script().get_hash().to_owned();
        self.load_script().await?;
        let committer = self.client.committer(
            cfg.stream.clone(),
            &cfg.group,
            &cfg.consumer,
            &cfg.dead_letter,
        )?;
        // Exported at 0 from the start, so that an alert on its increase sees the first loss.
        let _ = metrics::global().data_loss.get_or_create(&StreamLabels {
            stream: cfg.stream.to_string(),
        });
        // Where the group stands; unknown (None) if Redis cannot say now — the read will tell. A
        // group Redis no longer has stands where this loop (or its predecessor) last knew it.
        let position = self
            .client
            .group_position(&cfg.stream, &cfg.group)
            .await
            .unwrap_or(None)
            .or(self.stats.position());
        self.stats.note_position(position);
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<Done>>();
        let mut st = State {
            flight: Flight::new(cfg.in_flight, cfg.order_by.clone()),
            reader: Some(self.new_reader()?),
            round: None,
            in_round: Vec::new(),
            commit: None,
            committing: Vec::new(),
            retry_at: None,
            backoff: Backoff::new(self.retry_min, self.retry_max),
            draining: false,
            last_progress: Instant::now(),
            commit_failures: 0,
            retry_logged: HashMap::new(),
            recover: Some("0".into()),
            last_new: "0".into(),
            position,
            claim_cursor: "0-0".into(),
            claim_passes: 0,
            reading: Reading::Pending,
            round_count: 0,
            pace: Pace::new(cfg.batch_size, cfg.in_flight, cfg.claim_min_idle),
            meters: Meters::new(&cfg.stream, &cfg.group),
        };
        let mut claim_tick =
            tokio::time::interval_at(Instant::now() + cfg.claim_interval, cfg.claim_interval);
        claim_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Liveness: the loop turns at least once a second, and says until when its state is healthy.
        let mut pulse = tokio::time::interval(Duration::from_secs(1));

        loop {
            if st.flight.is_empty() {
                st.pace.idle(Instant::now().into_std());
            }
            let window = st.pace.window();
            st.flight.set_limit(window);
            st.meters.window.set(window as i64);
            st.meters.read_size.set(st.pace.read() as i64);
            // Hand what was routed (and what its order_by key let go) to the handlers.
            self.launch(&mut st, &tx);

            // Commit now what cannot wait for the next round: the read is out (and may block), or no
            // round can start. (Before starting a round: a commit that frees room must be followed by
            // one, or the loop would wait for an event that never comes.)
            if st.flight.has_finished()
                && st.commit.is_none()
                && st.retry_at.is_none()
                && (st.round.is_some() || st.draining || st.flight.free() == 0)
            {
                self.start_commit(&mut st, &committer, &sha);
            }
            // Start the next round — read, with the commit of what finished — when there is room.
            if st.round.is_none() && !st.draining && st.retry_at.is_none() && st.flight.free() > 0 {
                self.start_round(&mut st, &committer, &sha)?;
            }
            if st.draining && st.commit.is_none() && st.flight.is_empty() {
                return Ok(());
            }
            self.liveness
                .healthy_until(self.healthy_until(&st).into_std());

            let (round, commit) = (&mut st.round, &mut st.commit);
            tokio::select! {
                _ = pulse.tick() => {}
                _ = shutdown.wait(), if !st.draining => self.drain(&mut st),
                Some(batch) = rx.recv() => {
                    st.last_progress = Instant::now();
                    let mut n = 0;
                    for done in std::iter::once(batch).chain(std::iter::from_fn(|| rx.try_recv().ok())).flatten() {
                        self.finish(done, &mut st);
                        n += 1;
                    }
                    st.pace.finished(n, st.last_progress.into_std());
                }
                joined = async { (&mut round.as_mut().expect("guarded").0).await }, if round.is_some() => {
                    self.round_ended(&mut st, joined).await?;
                }
                // Commits run to completion even while draining: they are what drains.
                joined = async { (&mut commit.as_mut().expect("guarded").0).await }, if commit.is_some() => {
                    self.commit_ended(&mut st, joined).await?;
                }
                // Claims travel as rounds on the reader's connection (bounded like every read): the
                // next round claims, once the one in progress is back.
                _ = claim_tick.tick(), if !st.draining && st.recover.is_none() && st.retry_at.is_none() => {
                    st.claim_passes = CLAIM_PASSES;
                }
                _ = sleep_until(st.retry_at), if st.retry_at.is_some() => st.retry_at = None,
            }
        }
    }

    /// Sends what has finished as one commit on its own task, so messages keep flowing to the handlers
    /// while Redis runs it; one commit at a time.
    fn start_commit(&self, st: &mut State, committer: &Committer, sha: &str) {
        let batch = st.flight.take_batch();
        let call = committer.command(sha, &batch, st.flight.in_flight());
        let (client, cfg) = (self.client.clone(), self.cfg.clone());
        st.committing = batch;
        let task = tokio::spawn(async move { client.commit(&call, &cfg.stream, &cfg.group).await });
        st.commit = Some((task, Instant::now()));
    }

    /// Starts a round on its own task: the commit of what has finished, then a read of as many entries
    /// as there is room for — our own pending ones while recovering, else new ones.
    fn start_round(&self, st: &mut State, committer: &Committer, sha: &str) -> Result<(), Error> {
        let mut reader = match st.reader.take() {
            Some(r) => r,
            None => self.new_reader()?,
        };
        let batch = st.flight.take_batch();
        let call =
            (!batch.is_empty()).then(|| committer.command(sha, &batch, st.flight.in_flight()));
        st.in_round = batch;
        let from = st.recover.clone();
        st.reading = match (&from, st.claim_passes) {
            (Some(_), _) => Reading::Pending,
            (None, 0) => Reading::New,
            (None, _) => Reading::Idle,
        };
        st.round_count = st.flight.free().min(st.pace.read());
        let count = st.round_count as u64;
        // A round carrying a commit does not block: its verdicts come back with the read's reply,
        // and must not wait out an idle BLOCK (the entries are committed in Redis at once, but their
        // slots, counters and logs would lag by up to `block`, and a drain would redo the commit and
        // count its messages as not ours).
        let block = (st.reading == Reading::New && call.is_none()).then_some(self.cfg.block);
        let (reading, cursor, min_idle) =
            (st.reading, st.claim_cursor.clone(), self.cfg.claim_min_idle);
        trace!(from = ?from, ?reading, count, commits = st.in_round.len(), "round");
        let task = tokio::spawn(async move {
            let read_from = match (reading, from.as_deref()) {
                (Reading::Pending, Some(after)) => ReadFrom::Pending(after),
                (Reading::Idle, _) => ReadFrom::Idle {
                    cursor: &cursor,
                    min_idle,
                },
                _ => ReadFrom::New,
            };
            let result = reader.round(call, read_from, count, block).await;
            (reader, result)
        });
        st.round = Some((task, Instant::now()));
        Ok(())
    }

    /// Until when the loop counts as healthy, given what it is waiting for: a round or commit may take
    /// its read bound, a handler its timeout, anything else a few seconds.
    fn healthy_until(&self, st: &State) -> Instant {
        let slack = Duration::from_secs(5);
        let redis = self.client.settings();
        let read_bound = self.cfg.block + redis.command_timeout + redis.connect_timeout;
        let waiting = (st.round.as_ref().map(|(_, t)| *t)).or(st.commit.as_ref().map(|(_, t)| *t));
        if st.draining {
            Instant::now() + slack
        } else if let Some(t) = st.retry_at {
            t + slack
        } else if let Some(t) = waiting {
            t + read_bound + slack
        } else if st.flight.running() > 0 {
            st.last_progress + self.cfg.handler_timeout + slack
        } else {
            st.last_progress + slack
        }
    }

    /// A stop: only waits are cancelled. The round (a blocking read) is aborted and the commit it
    /// carried is redone over the shared connection — the ownership check makes that safe; queued
    /// messages never started and stay pending for the next start.
    fn drain(&self, st: &mut State) {
        st.draining = true;
        if let Some((round, _)) = st.round.take() {
            round.abort();
            st.flight.recommit(std::mem::take(&mut st.in_round));
        }
        let released = st.flight.release_queued();
        info!(
            running = st.flight.running(),
            released, "draining: reads stopped, finishing messages in flight"
        );
    }

    /// A round came back: apply the verdicts of the commit it carried, then dispatch what it read —
    /// or, when Redis was in trouble, commit again later and look for entries a lost reply delivered.
    async fn round_ended(
        &self,
        st: &mut State,
        joined: Result<RoundResult, tokio::task::JoinError>,
    ) -> Result<(), Error> {
        st.round = None;
        st.last_progress = Instant::now();
        let batch = std::mem::take(&mut st.in_round);
        let (reader, result) = match joined {
            Ok(got) => got,
            Err(join) => {
                st.flight.recommit(batch);
                let e = Error::Aborted {
                    command: "XREADGROUP",
                    key: self.cfg.stream.to_string(),
                    detail: join.to_string(),
                };
                st.retry_at = Some(self.trouble(e, st).await?);
                return Ok(());
            }
        };
        st.reader = Some(reader);
        let rd = match result {
            Ok(got) => got,
            Err(e) => {
                // Neither the commit's nor the read's fate is known.
                st.flight.recommit(batch);
                st.retry_at = Some(self.trouble(e, st).await?);
                return Ok(());
            }
        };
        if let Some(before) = rd.before
            && !self.apply_commit(batch, before, st).await?
        {
            // The commit is to be tried again: after a backoff, not in the next round at once.
            st.retry_at = Some(Instant::now() + st.backoff.fail());
        }
        match rd.read {
            Ok(entries) => {
                trace!(
                    entries = entries.entries.len(),
                    deleted = entries.deleted.len(),
                    "read"
                );
                let failures = st.backoff.succeed();
                if failures > 0 {
                    info!(failures, "reading again after Redis trouble");
                    metrics::global().reconnected();
                    self.liveness.recover();
                }
                #[cfg(feature = "fault-injection")]
                if !entries.entries.is_empty()
                    && std::env::var("RSFAULT_WEDGE_GROUP").is_ok_and(|g| g == self.cfg.group)
                {
                    // A failpoint for the watchdog test: this loop hangs the way an await that never
                    // completes would.
                    std::future::pending::<()>().await;
                }
                let asked = st.round_count;
                let got = entries.entries.len() + entries.deleted.len() + entries.too_large.len();
                let bytes: usize = entries
                    .entries
                    .iter()
                    .flat_map(|e| e.fields.iter())
                    .map(|(n, v)| n.len() + v.len())
                    .sum();
                st.pace.read_returned(asked, got, bytes);
                self.delivered(entries, asked, st);
            }
            Err(e) => st.retry_at = Some(self.trouble(e, st).await?),
        }
        Ok(())
    }

    /// A commit sent alone came back: apply its verdicts, or keep its batch for a later try.
    async fn commit_ended(
        &self,
        st: &mut State,
        joined: Result<CommitResult, tokio::task::JoinError>,
    ) -> Result<(), Error> {
        st.commit = None;
        st.last_progress = Instant::now();
        let batch = std::mem::take(&mut st.committing);
        let result = joined.unwrap_or_else(|join| {
            Err(Error::Aborted {
                command: "EVALSHA",
                key: self.cfg.stream.to_string(),
                detail: join.to_string(),
            })
        });
        if !self.apply_commit(batch, result, st).await? {
            st.retry_at = Some(Instant::now() + st.backoff.fail());
        }
        Ok(())
    }

    fn new_reader(&self) -> Result<GroupReader, Error> {
        let c = &self.cfg;
        self.client
            .group_reader(&c.stream, &c.group, &c.consumer, c.block)
            .map(|r| r.with_limit(c.entry_limit))
    }

    async fn load_script(&self) -> Result<(), Error> {
        self.client.load_commit_script(&self.cfg.stream).await
    }

    /// Handles a read or claim failure: returns when to try again, or the error if retrying cannot
    /// help. Logs the first failure of a streak loudly and the rest quietly.
    async fn trouble(&self, e: Error, st: &mut State) -> Result<Instant, Error> {
        let delay = st.backoff.fail();
        metrics::global().error(e.kind());
        if e.is_unreachable() {
            self.liveness.unreachable(format!("Redis trouble: {e}"));
        } else {
            self.liveness.degrade(format!("Redis trouble: {e}"));
        }
        if let Error::NoGroup { .. } = e {
            match self.restore_group(st).await {
                // A new group has an empty PEL: nothing of ours to recover.
                Ok(()) => return Ok(Instant::now() + delay.min(Duration::from_millis(50))),
                Err(e) if e.is_transient() => {
                    debug!(error = %e, "re-creating the group failed; will retry")
                }
                Err(e) => return Err(e),
            }
        } else if !e.is_transient() {
            return Err(e);
        } else if st.backoff.failures() == 1 {
            warn!(error = %e, retry_in = ?delay, "Redis trouble; retrying with backoff");
        } else {
            debug!(error = %e, failures = st.backoff.failures(), retry_in = ?delay, "Redis still in trouble");
        }
        // A read whose reply was lost may have delivered entries to us: find them in our PEL.
        if st.recover.is_none() {
            st.recover = Some(st.last_new.clone());
        }
        Ok(Instant::now() + delay)
    }

    /// The group is gone: re-creates it where nothing is skipped ([`crate::client::restore`]) and,
    /// when Redis lost data, says so loudly — an ERROR naming the stream, the data-loss counter, and
    /// the loop degraded with the reason until it reads again.
    async fn restore_group(&self, st: &mut State) -> Result<(), Error> {
        let c = &*self.cfg;
        let restored = self
            .client
            .restore_group(&c.stream, &c.group, &c.start, st.position)
            .await?;
        let lost = restored.lost;
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
        st.recover = None;
        st.last_new = "0".into();
        st.claim_cursor = "0-0".into();
        st.position = match restored.at.as_str() {
            "$" => self
                .client
                .group_position(&c.stream, &c.group)
                .await
                .unwrap_or(None),
            at => StreamId::parse(at).ok(),
        };
        self.stats.note_position(st.position);
        Ok(())
    }

    /// Applies the script's verdicts to a committed batch. On a transient failure the batch waits for
    /// the next try and this returns false.
    async fn apply_commit(
        &self,
        batch: Vec<Finished>,
        result: Result<redis::Value, Error>,
        st: &mut State,
    ) -> Result<bool, Error> {
        let n = batch.len();
        let verdicts = match result.and_then(|v| {
            commit::decode(v, n).map_err(|detail| Error::Protocol {
                command: "EVALSHA",
                key: self.cfg.stream.to_string(),
                detail,
            })
        }) {
            Ok(v) => v,
            Err(Error::NoGroup { .. }) => {
                // The group (or the stream) is gone — Redis lost its data, or XGROUP DESTROY — and
                // with it the delivery of every message in this batch: no commit of them can ever
                // succeed (the script wrote nothing). They leave flight unacked; whatever entries Redis
                // still holds are delivered again once the group is re-created (the next read does
                // that; a draining loop leaves it to its successor). Retrying instead would hold a
                // drain forever.
                warn!(messages = n, stream = %self.cfg.stream, group = %self.cfg.group,
                    "the consumer group is gone: {n} decided message(s) cannot be committed and leave this loop; entries Redis still holds are delivered again");
                metrics::global().error("no_group");
                for f in batch {
                    st.flight.committed(&f.msg.id);
                }
                return Ok(true);
            }
            Err(e) => {
                if matches!(&e, Error::Redis { source, .. } if source.code() == Some("NOSCRIPT")) {
                    self.load_script().await?;
                } else if e.is_permanent() {
                    return Err(e);
                } else if !e.is_transient() {
                    // Refused as a whole, with nothing written (the script's writes run under pcall
                    // after every check): find the message that causes it, and let the rest through.
                    self.isolate(batch, &e, st);
                    return Ok(true);
                } else {
                    debug!(error = %e, messages = n, "commit failed; will retry");
                    metrics::global().error(e.kind());
                    self.liveness.degrade(format!("commits fail: {e}"));
                }
                st.flight.recommit(batch);
                return Ok(false);
            }
        };
        let mut again = false;
        for (f, verdict) in batch.into_iter().zip(verdicts) {
            let id = &f.msg.id;
            let outcome = match (&verdict, &f.effect) {
                (Committed::Yes, Effect::Replies(_)) => "success",
                (Committed::Yes, Effect::DeadLetter(_) | Effect::TooLarge(_)) => "dead_lettered",
                (Committed::Yes, Effect::Vanished) => "vanished",
                (Committed::NotOurs, _) => "not_ours",
                (Committed::Partial(_), _) => "partial",
                (Committed::Refused(reason), Effect::Replies(_)) => {
                    // Nothing of it was written: it goes to the dead-letter stream in the next commit,
                    // and the rest of the batch is committed.
                    warn!(message_id = %id, handler = %f.handler, reason = ?reason, "a reply target refused this message before anything was written; dead-lettering it");
                    metrics::global().error("reply_refused");
                    st.flight.recommit(vec![Finished {
                        effect: Effect::DeadLetter(format!("reply refused: {reason}")),
                        ..f
                    }]);
                    continue;
                }
                (Committed::Replayed(owner), _) => {
                    // A copy of a signed message that already took effect: nothing of it was written.
                    // Its dead letter records no use of the signature (that is the original's).
                    warn!(message_id = %id, handler = %f.handler, original = %owner, "a signed message was replayed; dead-lettering the copy");
                    metrics::global().error("replayed");
                    let mut msg = f.msg;
                    msg.sender = msg.sender.map(|s| {
                        Arc::new(Sender {
                            once: None,
                            ..(*s).clone()
                        })
                    });
                    st.flight.recommit(vec![Finished {
                        msg,
                        effect: Effect::DeadLetter(format!(
                            "replayed: this signed message already took effect as {owner}"
                        )),
                        handler: f.handler,
                    }]);
                    continue;
                }
                (Committed::Refused(reason), _) => {
                    // The dead-letter stream itself cannot take it: the entry stays pending in Redis
                    // (it is never lost) and is claimed again later, until an operator fixes the stream.
                    error!(message_id = %id, handler = %f.handler, reason = ?reason, dead_letter = %self.cfg.dead_letter, "the dead-letter stream refused this message; it stays pending");
                    metrics::global().error("dead_letter_refused");
                    self.liveness.refused(format!(
                        "the dead-letter stream {} refuses messages ({reason}); they stay pending until it is fixed",
                        self.cfg.dead_letter
                    ));
                    "refused"
                }
                (Committed::Failed(_) | Committed::NotTried, _) => {
                    // Nothing of it was written: commit it again after a backoff.
                    if let Committed::Failed(e) = &verdict {
                        // Loud once per streak of refused commits, quiet after.
                        st.commit_failures += 1;
                        if st.commit_failures == 1 {
                            warn!(message_id = %id, error = ?e, "Redis refused a commit's write; nothing of the message was written, retrying");
                        } else {
                            debug!(message_id = %id, error = ?e, failures = st.commit_failures, "commit still refused");
                        }
                        metrics::global().error("commit_failed");
                        self.liveness.degrade(format!("commits are refused: {e}"));
                    }
                    st.flight.recommit(vec![f]);
                    again = true;
                    continue;
                }
            };
            st.meters.count(&f.handler, outcome);
            if outcome == "dead_lettered" {
                st.meters.dead_lettered.inc();
            }
            match (verdict, &f.effect) {
                (Committed::Yes, Effect::Replies(r)) => {
                    debug!(message_id = %id, handler = %f.handler, outcome = "committed", replies = r.len(), "committed");
                    self.stats.processed.fetch_add(1, Ordering::Relaxed);
                }
                (Committed::Yes, Effect::DeadLetter(reason)) => {
                    self.liveness.accepted();
                    let trace = trace_of(&f.msg);
                    // The text names what journalctl -u shows without -o verbose; the fields stay.
                    let reason = crate::logging::escape(reason.as_bytes(), 1000);
                    let (c, dlq) = (&self.cfg, &self.cfg.dead_letter);
                    warn!(message_id = %id, handler = %f.handler, trace_id = %trace, outcome = "dead-lettered", reason = %reason, dead_letter = %dlq,
                        "dead-lettered {id} of {} (group {}) to {dlq}: {reason}", c.stream, c.group);
                    self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                }
                (Committed::Yes, Effect::TooLarge(size)) => {
                    self.liveness.accepted();
                    let limit = &self.cfg.entry_limit;
                    warn!(message_id = %id, outcome = "dead-lettered", reason = dlq::TOO_LARGE, fields = size.fields, bytes = size.bytes, limit_fields = limit.fields, limit_bytes = limit.bytes, dead_letter = %self.cfg.dead_letter, "an entry over [limits] was dead-lettered by reference; its content was not read");
                    self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                }
                (Committed::Yes, Effect::Vanished) => {
                    self.stats.vanished.fetch_add(1, Ordering::Relaxed);
                }
                (Committed::NotOurs, _) => {
                    info!(message_id = %id, handler = %f.handler, outcome = "not-ours", "another consumer owned the entry by commit time; this result was discarded");
                    self.stats.not_ours.fetch_add(1, Ordering::Relaxed);
                }
                (Committed::Partial(e), _) => {
                    error!(message_id = %id, handler = %f.handler, error = %e, "a commit's write failed after others of the same message were made; the message was acked so none is written twice, and its effects are incomplete");
                    metrics::global().error("commit_partial");
                }
                _ => {}
            }
            st.flight.committed(id);
        }
        if !again {
            if std::mem::take(&mut st.commit_failures) > 0 {
                info!("commits go through again");
            }
            self.liveness.recover();
        }
        Ok(!again)
    }

    /// A commit that Redis refused as a whole for a reason that is not the server's: its halves are
    /// committed apart until the message that makes it fail is alone. That message is dead-lettered
    /// with the error; if even its dead letter cannot be committed, it leaves flight and stays pending
    /// in Redis (claimed again later, never acked without its effects) while everything else flows.
    fn isolate(&self, batch: Vec<Finished>, e: &Error, st: &mut State) {
        metrics::global().error("commit_refused");
        if batch.len() > 1 {
            warn!(messages = batch.len(), error = %e, "Redis refused a commit as a whole; committing its halves apart to find the message that causes it");
            st.flight.isolate(batch);
            return;
        }
        let Some(f) = batch.into_iter().next() else {
            return;
        };
        let id = f.msg.id.clone();
        self.liveness
            .degrade(format!("a message's commit is refused: {e}"));
        match f.effect {
            Effect::Replies(_) | Effect::Vanished => {
                error!(message_id = %id, handler = %f.handler, error = %e, "Redis refuses this message's commit whatever it is batched with; dead-lettering it");
                st.flight.isolate(vec![Finished {
                    effect: Effect::DeadLetter(format!("commit refused: {e}")),
                    ..f
                }]);
            }
            Effect::DeadLetter(_) | Effect::TooLarge(_) => {
                error!(message_id = %id, handler = %f.handler, error = %e, dead_letter = %self.cfg.dead_letter, "Redis refuses this message's dead letter; it stays pending and is claimed again later");
                self.liveness.refused(format!(
                    "Redis refuses a dead letter to {} ({e}); the message stays pending",
                    self.cfg.dead_letter
                ));
                st.flight.committed(&id);
            }
        }
    }

    /// Dispatches what a round read: new entries are first deliveries; re-read pending ones come
    /// with their delivery counts.
    fn delivered(&self, got: Entries, asked: usize, st: &mut State) {
        let seen = got.entries.len() + got.deleted.len() + got.too_large.len();
        match (&mut st.recover, st.reading) {
            (_, Reading::Idle) => {
                // Claimed from consumers that left them idle (dead ones, or our own failures).
                st.claim_cursor = got.next.clone().unwrap_or_else(|| "0-0".into());
                if !got.dropped.is_empty() {
                    debug!(
                        count = got.dropped.len(),
                        "claimed entries had been deleted; Redis dropped them from the PEL"
                    );
                    self.stats
                        .vanished
                        .fetch_add(got.dropped.len() as u64, Ordering::Relaxed);
                }
                let fresh = got
                    .entries
                    .iter()
                    .map(|e| &e.id)
                    .chain(got.too_large.iter().map(|(id, _)| id))
                    .filter(|id| !st.flight.contains(id))
                    .count();
                if fresh > 0 {
                    info!(count = fresh, "claimed idle entries");
                }
                let full = seen + got.dropped.len() >= asked.max(1);
                st.claim_passes = match st.claim_cursor.as_str() {
                    "0-0" => 0,
                    _ if !full => 0,
                    _ => st.claim_passes.saturating_sub(1),
                };
            }
            (Some(after), Reading::Pending) => {
                // Re-reading our own PEL: page on, or switch to new entries when it is exhausted.
                let last = got
                    .entries
                    .iter()
                    .map(|e| &e.id)
                    .chain(got.deleted.iter())
                    .chain(got.too_large.iter().map(|(id, _)| id))
                    .max_by(|a, b| cmp_ids(a, b));
                match last {
                    Some(last) if seen >= asked.max(1) => *after = last.clone(),
                    _ => st.recover = None,
                }
                // Entries deleted while pending come back with no fields: ack them, never dispatch them.
                for id in got.deleted {
                    if st.flight.admit(&id) {
                        st.flight.settle(Finished {
                            msg: self.message(id, Default::default(), 0),
                            effect: Effect::Vanished,
                            handler: "redstream".into(),
                        });
                    }
                }
            }
            _ => {
                let last = got
                    .entries
                    .iter()
                    .map(|e| &e.id)
                    .chain(got.too_large.iter().map(|(id, _)| id))
                    .max_by(|a, b| cmp_ids(a, b));
                if let Some(last) = last {
                    st.position = st.position.max(Some(key_of(last)));
                    self.stats.note_position(st.position);
                    st.last_new = last.clone();
                }
            }
        }
        let count = |id: &str| got.deliveries.get(id).copied().unwrap_or(1);
        for (id, size) in &got.too_large {
            self.too_large(id.clone(), *size, count(id), st);
        }
        for entry in got.entries {
            let n = count(&entry.id);
            self.dispatch(entry, n, st);
        }
    }

    /// An entry over the consumer's limits, its fields never kept: dead-lettered by reference.
    fn too_large(&self, id: String, size: Size, deliveries: u64, st: &mut State) {
        if st.flight.admit(&id) {
            st.flight.settle(Finished {
                msg: self.message(id, Default::default(), deliveries),
                effect: Effect::TooLarge(size),
                handler: "redstream".into(),
            });
        }
    }

    fn message(
        &self,
        id: String,
        fields: crate::model::envelope::Fields,
        deliveries: u64,
    ) -> Message {
        Message {
            stream: self.cfg.stream.clone(),
            id,
            fields,
            deliveries,
            sender: None,
        }
    }

    /// Takes a delivered entry into flight: dead-letter it if it was delivered too often, route it,
    /// check its sender token if its route wants one, queue it behind its order_by key, or start it.
    fn dispatch(&self, entry: Entry, deliveries: u64, st: &mut State) {
        if !st.flight.admit(&entry.id) {
            return; // already ours and in flight
        }
        let mut msg = self.message(entry.id, entry.fields, deliveries);
        // Credentials go no further than this: no handler on any route sees them, and no forward,
        // reply or dead letter copies them. A bare bearer token is never obeyed (a reader of the stream
        // could replay it); a signature is checked against the fields it covers.
        let token = msg.fields.take(signature::TOKEN_FIELD);
        let signed = msg.fields.take(signature::FIELD);
        let settle = |st: &mut State, msg: Message, effect: Effect, handler: &str| {
            st.flight.settle(Finished {
                msg,
                effect,
                handler: handler.into(),
            });
        };
        if deliveries > u64::from(self.cfg.max_deliveries) {
            let reason = format!(
                "delivered {deliveries} times, more than max_deliveries ({})",
                self.cfg.max_deliveries
            );
            return settle(st, msg, Effect::DeadLetter(reason), "redstream");
        }
        let router = self.router.load();
        let (handler, require_sender_token) = match router.select(&msg) {
            Selection::Run {
                handler,
                require_sender_token,
            } => (handler.clone(), require_sender_token),
            Selection::Drop => return settle(st, msg, Effect::Replies(Vec::new()), "drop"),
            Selection::Unmatched(Unmatched::Ack) => {
                return settle(st, msg, Effect::Replies(Vec::new()), "unmatched");
            }
            Selection::Unmatched(Unmatched::DeadLetter) => {
                let reason = "unmatched: no route matches this message".to_string();
                return settle(st, msg, Effect::DeadLetter(reason), "router");
            }
        };
        if require_sender_token && let Err(reason) = self.sender(&mut msg, signed, token.is_some())
        {
            return settle(st, msg, Effect::DeadLetter(reason), handler.name());
        }
        st.flight.enqueue(Job { msg, handler });
    }

    /// Verifies the message's signature (`_sig`) against its fields and stream, and puts the signer's
    /// claims into `sender`: the handler gets the verified claims, never a credential.
    fn sender(
        &self,
        msg: &mut Message,
        signed: Option<Vec<u8>>,
        bare_token: bool,
    ) -> Result<(), String> {
        let Some(signed) = signed else {
            return Err(if bare_token {
                "unauthenticated: the route requires a signed message (_sig); a bare _token is not \
                 accepted, anyone who reads the stream could replay it"
                    .to_string()
            } else {
                "unauthenticated: the route requires a signed message (_sig) and there is none"
                    .to_string()
            });
        };
        let signed = std::str::from_utf8(&signed)
            .map_err(|_| "unauthenticated: _sig is not text".to_string())?;
        let verified = self
            .keys
            .verify_message(signed, &msg.stream, &msg.fields)
            .map_err(|e| format!("unauthenticated: {e}"))?;
        msg.sender = Some(Arc::new(Sender {
            roles: verified.identity.roles.to_strings(),
            subject: verified.identity.subject,
            once: Some(Once {
                jti: verified.jti,
                // A copy accepted at the last moment may commit a handler's deadline later: the
                // record outlives that too.
                until_ms: verified.remember_until_ms + self.cfg.handler_timeout.as_millis() as u64,
            }),
        }));
        Ok(())
    }

    /// Starts every ready job: batch-capable handlers get their messages in one hand-off (per handler),
    /// the others one task per message.
    fn launch(&self, st: &mut State, tx: &mpsc::UnboundedSender<Vec<Done>>) {
        let ready = st.flight.start_ready();
        if ready.is_empty() {
            return;
        }
        let mut batches: Vec<(Arc<dyn Handler>, Vec<Message>)> = Vec::new();
        for job in ready {
            if job.handler.batch().is_none() {
                self.start(job, st, tx);
                continue;
            }
            match batches
                .iter_mut()
                .find(|(h, _)| Arc::ptr_eq(h, &job.handler))
            {
                Some((_, msgs)) => msgs.push(job.msg),
                None => batches.push((job.handler, vec![job.msg])),
            }
        }
        for (handler, msgs) in batches {
            let name: Arc<str> = handler.name().into();
            let duration = st.meters.duration(&name);
            let client = self.client.clone();
            let cfg = self.cfg.clone();
            let tx = tx.clone();
            let done: BatchDone = Arc::new(move |results| {
                let batch = results
                    .into_iter()
                    .map(|(msg, outcome, took): Handled| {
                        duration.observe(took.as_secs_f64());
                        let effect = decide(outcome, &msg, &cfg, &client);
                        Done {
                            msg,
                            effect,
                            handler: name.clone(),
                        }
                    })
                    .collect();
                let _ = tx.send(batch);
            });
            handler
                .batch()
                .expect("checked above")
                .run_batch(msgs, done);
        }
    }

    /// Runs the handler on its own task, with the deadline, and with panics contained.
    fn start(&self, job: Job, st: &mut State, tx: &mpsc::UnboundedSender<Vec<Done>>) {
        let Job { msg, handler } = job;
        let name: Arc<str> = handler.name().into();
        let duration = st.meters.duration(&name);
        let client = self.client.clone();
        let timeout = self.cfg.handler_timeout;
        let cfg = self.cfg.clone();
        let tx = tx.clone();
        let span = tracing::debug_span!(
            "message",
            message_id = %msg.id,
            deliveries = msg.deliveries,
            handler = handler.name(),
            trace_id = %trace_of(&msg)
        );
        tokio::spawn(
            async move {
                let call = tokio::time::timeout(timeout, handler.handle(&msg));
                let started = std::time::Instant::now();
                let result = AssertUnwindSafe(call).catch_unwind().await;
                duration.observe(started.elapsed().as_secs_f64());
                let outcome = match result {
                    Ok(Ok(outcome)) => outcome,
                    Ok(Err(_)) => Outcome::Retry(format!(
                        "handler timed out after {}",
                        humantime::format_duration(timeout)
                    )),
                    Err(_) => Outcome::Retry("handler panicked".into()),
                };
                let effect = decide(outcome, &msg, &cfg, &client);
                // The loop outlives its handler tasks except at an immediate exit, when this is moot.
                let _ = tx.send(vec![Done {
                    msg,
                    effect,
                    handler: handler.name().into(),
                }]);
            }
            .instrument(span),
        );
    }

    /// Takes a finished handler's result into the commit queue and lets the next message of its key run.
    fn finish(&self, done: Done, st: &mut State) {
        let Done {
            msg,
            effect,
            handler,
        } = done;
        match effect {
            Ok(effect) => {
                st.flight.ran(msg, Some(effect), handler);
            }
            Err(reason) => {
                let (id, deliveries) = (msg.id.clone(), msg.deliveries);
                let trace = trace_of(&msg);
                st.flight.ran(msg, None, handler.clone());
                self.stats.retried.fetch_add(1, Ordering::Relaxed);
                st.meters.count(&handler, "retry");
                self.log_retry(st, &handler, (&id, &trace), deliveries, &reason);
            }
        }
    }

    /// A failing handler is visible at once: each retry at WARN with its reason and delivery count, at
    /// most one line per handler per second (the lines skipped meanwhile are counted in the next).
    fn log_retry(
        &self,
        st: &mut State,
        handler: &Arc<str>,
        (id, trace): (&str, &str),
        deliveries: u64,
        reason: &str,
    ) {
        let now = Instant::now();
        let entry = st
            .retry_logged
            .entry(handler.clone())
            .or_insert((now - Duration::from_secs(2), 0));
        if now.duration_since(entry.0) < Duration::from_secs(1) {
            entry.1 += 1;
            return;
        }
        let skipped = std::mem::take(&mut entry.1);
        entry.0 = now;
        let reason = crate::logging::escape(reason.as_bytes(), 1000);
        warn!(
            message_id = %id,
            handler = %handler,
            trace_id = %trace,
            outcome = "retry",
            deliveries,
            max_deliveries = self.cfg.max_deliveries,
            // Escaped: a guest's text cannot forge log lines.
            reason = %reason,
            skipped,
            "handler failed; the message stays pending and will be retried: {id} of {} (group {}), delivery {deliveries} of {}: {reason}",
            self.cfg.stream,
            self.cfg.group,
            self.cfg.max_deliveries
        );
    }
}

/// Turns a handler outcome into what to commit, or the reason the entry stays pending for a retry.
fn decide(
    outcome: Outcome,
    msg: &Message,
    cfg: &ConsumerSettings,
    client: &Client,
) -> Result<Effect, String> {
    match outcome {
        Outcome::Success(replies) => {
            // Handlers may only reply where their identity may publish; WASM handlers are checked
            // (roles and `[limits]`) at publish time too, this is the last line.
            for r in &replies {
                if let Err(e) = client.authorize(Op::Publish, &r.stream) {
                    return Ok(Effect::DeadLetter(format!("reply refused: {e}")));
                }
                // One reply is one XADD in the commit script: it must fit in one call.
                if r.fields.len() > limits::MAX_FIELDS {
                    return Ok(Effect::DeadLetter(format!(
                        "reply refused: the reply to {} has {} fields, more than one commit writes ({})",
                        r.stream,
                        r.fields.len(),
                        limits::MAX_FIELDS
                    )));
                }
            }
            Ok(Effect::Replies(replies))
        }
        Outcome::Retry(reason) if msg.deliveries >= u64::from(cfg.max_deliveries) => {
            Ok(Effect::DeadLetter(format!(
                "{reason} (gave up after {} deliveries)",
                msg.deliveries
            )))
        }
        // Logged by the loop (rate-limited, with the delivery count).
        Outcome::Retry(reason) => Err(reason),
        Outcome::Reject(reason) => Ok(Effect::DeadLetter(reason)),
    }
}

/// A message's `_trace_id` as it may appear in a log line: whatever a publisher wrote, escaped and cut
/// at 128 bytes (a newline in it must not start a forged line).
fn trace_of(msg: &Message) -> String {
    msg.fields
        .get(crate::model::envelope::TRACE_ID)
        .map(|t| crate::logging::escape(t, 128))
        .unwrap_or_default()
}

/// Orders stream ids numerically.
fn cmp_ids(a: &str, b: &str) -> std::cmp::Ordering {
    key_of(a).cmp(&key_of(b))
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::cmp_ids;
    use std::cmp::Ordering::*;

    #[test]
    fn ids_compare_numerically() {
        assert_eq!(cmp_ids("10-0", "9-5"), Greater);
        assert_eq!(cmp_ids("5-10", "5-9"), Greater);
        assert_eq!(cmp_ids("5-1", "5-1"), Equal);
    }
}
