//! One consumer of one group: the read / claim / ack loop (docs/design.md, "Data flow" and "Delivery").
//!
//! Owns the loop's I/O and timing: rounds (a read, or a claim, carrying the commit of what had
//! finished — or a commit alone when the read blocks), the handler calls ([`super::call`]), backoff on
//! Redis trouble and the drain. What each result means is decided without I/O ([`super::machine`],
//! [`super::cursor`], [`super::flight`]) and reported as events ([`super::events`]).
//!
//! Why nothing is lost: an entry is acked only by the commit script, after its handler succeeded, in
//! the same atomic step as its replies. Everything else — a crash, a cancelled read, a drain that runs
//! out of time, a handler that fails — leaves the entry pending in Redis, where this consumer's PEL
//! re-read or another consumer's XAUTOCLAIM finds it again. Only *waits* are cancelled on shutdown (the
//! blocking read, backoff sleeps); handler calls and commits run to completion.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::trace;

use super::call::{Calls, Done};
use super::cursor::{Cursor, Reading};
use super::events::{Events, Stats};
use super::flight::{Flight, Job};
use super::guard::{Admit, Guard, Guards};
use super::machine::{self, CommitFailure, Dispatch, Isolated, Settle};
use super::pace::Pace;
use super::router::Router;
use super::settings::ConsumerSettings;
use crate::auth::jwt::KeySet;
use crate::auth::signature;
use crate::backoff::Backoff;
use crate::client::commit::{self, Committer};
use crate::client::decode::Entries;
use crate::client::{Client, Error, GroupReader, ReadFrom, Round};
use crate::health::Liveness;
use crate::model::StreamId;
use crate::model::decided::{Effect, Finished};
use crate::model::envelope::Entry;
use crate::model::message::Message;
use crate::shutdown::Shutdown;
use arc_swap::ArcSwap;

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
    /// The handlers' breakers and rate limits, shared by every loop of the daemon.
    pub guards: Arc<Guards>,
    pub stats: Arc<Stats>,
    /// Where this loop reports until when it is healthy, for the watchdog.
    pub liveness: Arc<Liveness>,
    /// Backoff bounds for Redis trouble.
    pub retry_min: Duration,
    pub retry_max: Duration,
}

/// What the round task hands back.
type RoundResult = (GroupReader, Result<Round, Error>);

/// What a commit task hands back: the script's reply.
type CommitResult = Result<redis::Value, Error>;

/// A job that waited for its rate limit's permit: to run (true), or released by a drain (false).
type Permitted = (Job, bool);

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
    /// What the loop reads next, and where the group stands as far as it has read.
    cursor: Cursor,
    /// How much to read at once and hold in flight.
    pace: Pace,
    events: Events,
    /// Jobs waiting for a rate limit's permit (counted as running in `flight`), and what stops their
    /// waits when the loop drains.
    throttled: usize,
    stop_waits: tokio_util::sync::CancellationToken,
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
        // Where the group stands; unknown (None) if Redis cannot say now — the read will tell. A
        // group Redis no longer has stands where this loop (or its predecessor) last knew it.
        let position = self
            .client
            .group_position(&cfg.stream, &cfg.group)
            .await
            .unwrap_or(None)
            .or(self.stats.position());
        self.stats.note_position(position);
        let (results, mut rx) = mpsc::unbounded_channel::<Vec<Done>>();
        let calls = Calls {
            cfg: self.cfg.clone(),
            client: self.client.clone(),
            guards: self.guards.clone(),
            results,
        };
        let (permits, mut permitted) = mpsc::unbounded_channel::<Permitted>();
        let mut st = self.state(position)?;
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
            st.events.pace(st.pace.read(), window);
            // Hand what was routed (and what its order_by key let go) to the handlers.
            let ready = st.flight.start_ready();
            if !ready.is_empty() {
                let ready = self.guard(ready, &mut st, &permits);
                calls.launch(ready, &mut st.events);
            }

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
                _ = claim_tick.tick(), if !st.draining && !st.cursor.recovering() && st.retry_at.is_none() => {
                    st.cursor.claim_due();
                }
                _ = sleep_until(st.retry_at), if st.retry_at.is_some() => st.retry_at = None,
                Some(first) = permitted.recv() => {
                    let mut run = Vec::new();
                    for (job, go) in std::iter::once(first).chain(std::iter::from_fn(|| permitted.try_recv().ok())) {
                        st.throttled -= 1;
                        if go {
                            run.push(job);
                        } else {
                            st.flight.ran(job.msg, None, job.handler.name().into());
                        }
                    }
                    calls.launch(run, &mut st.events);
                }
            }
        }
    }

    /// A loop's state at its start, with the group standing at `position`.
    fn state(&self, position: Option<StreamId>) -> Result<State, Error> {
        let cfg = &*self.cfg;
        Ok(State {
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
            cursor: Cursor::new(position),
            pace: Pace::new(cfg.batch_size, cfg.in_flight, cfg.claim_min_idle),
            events: Events::new(self.cfg.clone(), self.stats.clone(), self.liveness.clone()),
            throttled: 0,
            stop_waits: tokio_util::sync::CancellationToken::new(),
        })
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
        let count = st.flight.free().min(st.pace.read());
        let reading = st.cursor.next(count);
        // A round carrying a commit does not block: its verdicts come back with the read's reply,
        // and must not wait out an idle BLOCK (the entries are committed in Redis at once, but their
        // slots, counters and logs would lag by up to `block`, and a drain would redo the commit and
        // count its messages as not ours).
        let block = (reading == Reading::New && call.is_none()).then_some(self.cfg.block);
        let (count, min_idle) = (count as u64, self.cfg.claim_min_idle);
        trace!(?reading, count, commits = st.in_round.len(), "round");
        let task = tokio::spawn(async move {
            let read_from = match &reading {
                Reading::Pending(after) => ReadFrom::Pending(after),
                Reading::Idle(cursor) => ReadFrom::Idle { cursor, min_idle },
                Reading::New => ReadFrom::New,
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
        } else if st.flight.running() > st.throttled {
            st.last_progress + self.cfg.handler_timeout + slack
        } else if st.throttled > 0 {
            // Waiting for a rate limit's permits is waiting on purpose.
            Instant::now() + slack
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
        // Calls waiting for a rate limit's permit never started: they stay pending for the next start.
        st.stop_waits.cancel();
        st.events.draining(st.flight.running(), released);
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
                    st.events.reading_again(failures);
                }
                #[cfg(feature = "fault-injection")]
                if !entries.entries.is_empty()
                    && std::env::var("RSFAULT_WEDGE_GROUP").is_ok_and(|g| g == self.cfg.group)
                {
                    // A failpoint for the watchdog test: this loop hangs the way an await that never
                    // completes would.
                    std::future::pending::<()>().await;
                }
                let asked = st.cursor.asked();
                let got = entries.entries.len() + entries.deleted.len() + entries.too_large.len();
                let bytes: usize = entries
                    .entries
                    .iter()
                    .flat_map(|e| e.fields.iter())
                    .map(|(n, v)| n.len() + v.len())
                    .sum();
                st.pace.read_returned(asked, got, bytes);
                self.delivered(entries, st);
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
    /// help.
    async fn trouble(&self, e: Error, st: &mut State) -> Result<Instant, Error> {
        let delay = st.backoff.fail();
        st.events.redis_failed(&e);
        if let Error::NoGroup { .. } = e {
            match self.restore_group(st).await {
                // A new group has an empty PEL: nothing of ours to recover.
                Ok(()) => return Ok(Instant::now() + delay.min(Duration::from_millis(50))),
                Err(e) if e.is_transient() => {
                    tracing::debug!(error = %e, "re-creating the group failed; will retry")
                }
                Err(e) => return Err(e),
            }
        } else if !e.is_transient() {
            return Err(e);
        } else {
            st.events.redis_trouble(&e, st.backoff.failures(), delay);
        }
        if let Error::Timeout { .. } = e {
            // Asking for as much again would time out again (entries too large to send in time).
            st.pace.read_timed_out();
        }
        // A read whose reply was lost may have delivered entries to us: find them in our PEL.
        st.cursor.read_lost();
        Ok(Instant::now() + delay)
    }

    /// The group is gone: re-creates it where nothing is skipped ([`crate::client::restore`]), saying
    /// so (loudly when Redis lost data), and reads from where the new group stands.
    async fn restore_group(&self, st: &mut State) -> Result<(), Error> {
        let c = &*self.cfg;
        let restored = self
            .client
            .restore_group(&c.stream, &c.group, &c.start, st.cursor.position)
            .await?;
        st.events.group_restored(&restored);
        let position = match restored.at.as_str() {
            "$" => self
                .client
                .group_position(&c.stream, &c.group)
                .await
                .unwrap_or(None),
            at => StreamId::parse(at).ok(),
        };
        st.cursor.group_restored(position);
        st.events.position(position);
        Ok(())
    }

    /// Applies the script's verdicts to a committed batch ([`machine::settle`]). On a transient failure
    /// the batch waits for the next try and this returns false.
    async fn apply_commit(
        &self,
        batch: Vec<Finished>,
        result: Result<redis::Value, Error>,
        st: &mut State,
    ) -> Result<bool, Error> {
        let n = batch.len();
        let decoded = result.and_then(|v| {
            commit::decode(v, n).map_err(|detail| Error::Protocol {
                command: "EVALSHA",
                key: self.cfg.stream.to_string(),
                detail,
            })
        });
        let verdicts = match decoded {
            Ok(v) => v,
            Err(e) => return self.commit_failed(batch, e, st).await,
        };
        let mut again = false;
        for (f, verdict) in batch.into_iter().zip(verdicts) {
            match machine::settle(verdict, f) {
                Settle::Done(f, fate) => {
                    st.events.settled(&f, &fate);
                    st.flight.committed(&f.msg.id);
                }
                Settle::Redo(f, why) => {
                    st.events.redo(&f, &why);
                    st.flight.recommit(vec![f]);
                }
                Settle::Again(f, refusal) => {
                    if let Some(refusal) = &refusal {
                        st.events.commit_refused(&f.msg.id, refusal);
                    }
                    st.flight.recommit(vec![f]);
                    again = true;
                }
                Settle::Rerun(f, key) => {
                    st.events.rerun(&f, &key);
                    let router = self.router.load();
                    match router.select(&f.msg) {
                        super::router::Selection::Run { handler, .. } => st.flight.rerun(Job {
                            msg: f.msg,
                            handler: handler.clone(),
                        }),
                        // Routed elsewhere by a reload meanwhile: it stays pending, claimed later.
                        _ => st.flight.committed(&f.msg.id),
                    }
                }
            }
        }
        if !again {
            st.events.commits_flow();
        }
        Ok(!again)
    }

    /// A commit that failed as a whole ([`machine::on_commit_error`]): nothing of it was written.
    async fn commit_failed(
        &self,
        batch: Vec<Finished>,
        e: Error,
        st: &mut State,
    ) -> Result<bool, Error> {
        match machine::on_commit_error(&e) {
            CommitFailure::GroupGone => {
                // Retrying instead would hold a drain forever: they leave flight unacked, and the
                // entries Redis still holds are delivered again once the group is re-created (the
                // next read does that; a draining loop leaves it to its successor).
                st.events.group_gone(batch.len());
                for f in batch {
                    st.flight.committed(&f.msg.id);
                }
                return Ok(true);
            }
            CommitFailure::ScriptMissing => self.load_script().await?,
            CommitFailure::Fatal => return Err(e),
            CommitFailure::Isolate => {
                // Refused as a whole, with nothing written (the script's writes run under pcall
                // after every check): find the message that causes it, and let the rest through.
                match machine::isolate(batch, &e) {
                    Isolated::Halves(batch) => {
                        st.events.halving(batch.len(), &e);
                        st.flight.isolate(batch);
                    }
                    Isolated::DeadLetter(f) => {
                        st.events.culprit(&f, &e, false);
                        st.flight.isolate(vec![f]);
                    }
                    Isolated::Stranded(f) => {
                        st.events.culprit(&f, &e, true);
                        st.flight.committed(&f.msg.id);
                    }
                    Isolated::Empty => {}
                }
                return Ok(true);
            }
            CommitFailure::Retry => st.events.commit_failed(&e, batch.len()),
        }
        st.flight.recommit(batch);
        Ok(false)
    }

    /// Dispatches what a round read ([`Cursor::advance`] says where to read next): new entries are
    /// first deliveries; re-read pending ones and claimed ones come with their delivery counts.
    fn delivered(&self, got: Entries, st: &mut State) {
        if let Some(position) = st.cursor.advance(&got) {
            st.events.position(position);
        }
        if st.cursor.claiming() {
            // Claimed from consumers that left them idle (dead ones, or our own failures).
            let fresh = (got.entries.iter().map(|e| &e.id))
                .chain(got.too_large.iter().map(|(id, _)| id))
                .filter(|id| !st.flight.contains(id))
                .count();
            st.events.claimed(fresh, got.dropped.len());
        }
        if st.cursor.rereading() {
            // Entries deleted while pending come back with no fields: ack them, never dispatch them.
            for id in &got.deleted {
                self.settle(id.clone(), 0, Effect::Vanished, st);
            }
        }
        let count = |id: &str| got.deliveries.get(id).copied().unwrap_or(1);
        for (id, size) in &got.too_large {
            self.settle(id.clone(), count(id), Effect::TooLarge(*size), st);
        }
        for entry in got.entries {
            let n = count(&entry.id);
            self.dispatch(entry, n, st);
        }
    }

    /// An entry decided without its fields: gone from the stream, or over the consumer's limits (its
    /// fields never kept: dead-lettered by reference).
    fn settle(&self, id: String, deliveries: u64, effect: Effect, st: &mut State) {
        if st.flight.admit(&id) {
            st.flight.settle(Finished {
                msg: self.message(id, Default::default(), deliveries),
                effect,
                handler: machine::ENGINE.into(),
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

    /// Takes a delivered entry into flight: settle it if it is decided without a handler
    /// ([`machine::dispatch`]: delivered too often, dropped or unmatched, its sender refused), else
    /// queue it behind its order_by key, or start it.
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
        let router = self.router.load();
        let selection = router.select(&msg);
        let verify = || {
            let grace = self.cfg.handler_timeout;
            msg.sender = Some(Arc::new(machine::sender(
                &self.keys,
                &msg,
                signed,
                token.is_some(),
                grace,
            )?));
            Ok(())
        };
        match machine::dispatch(deliveries, self.cfg.max_deliveries, selection, verify) {
            Dispatch::Settle { effect, by } => st.flight.settle(Finished {
                msg,
                effect,
                handler: by,
            }),
            Dispatch::Run(handler) => st.flight.enqueue(Job { msg, handler }),
        }
    }

    /// With a `retry` schedule — the handler's, else the consumer's — records in Redis when the
    /// message a handler asked to retry is due.
    fn schedule_retry(&self, msg: &Message, handler: &str) -> Option<Duration> {
        let guard = self.guards.get(handler);
        let schedule = guard
            .as_ref()
            .and_then(|g| g.spec.retry.as_ref())
            .or(self.cfg.retry.as_ref())?;
        let wait = schedule.after(msg.deliveries, random_unit());
        self.schedule(&msg.id, wait, None);
        Some(wait)
    }

    /// Records in Redis when `id` is due again (on a task of its own: the loop goes on); `held`: it
    /// did not run, and its delivery (the count given) is given back. A call Redis did not answer is
    /// sent again a few times over about three seconds (it is safe to repeat): a connection lost at
    /// that instant must not leave the message without its time. Should every try fail, the message
    /// is claimed as one without a schedule is: once it has idled `claim_min_idle`.
    fn schedule(&self, id: &str, wait: Duration, held: Option<u64>) {
        let client = self.client.clone();
        let (stream, group, consumer) = (
            self.cfg.stream.clone(),
            self.cfg.group.clone(),
            self.cfg.consumer.clone(),
        );
        let id = id.to_owned();
        let task = async move {
            let mut pause = Duration::from_millis(100);
            loop {
                match client
                    .schedule_retry(&stream, &group, &consumer, &id, wait, held)
                    .await
                {
                    Ok(true) => tracing::debug!(id, ?wait, ?held, "retry scheduled"),
                    Ok(false) => tracing::debug!(id, "not ours any more: no retry to schedule"),
                    Err(e) if e.is_transient() && pause <= Duration::from_millis(1600) => {
                        tracing::debug!(id, error = %e, "cannot schedule the retry yet; trying again");
                        tokio::time::sleep(pause).await;
                        pause *= 2;
                        continue;
                    }
                    Err(e) => tracing::warn!(
                        id,
                        error = %e,
                        "cannot schedule the retry; the message is retried once it has idled claim_min_idle"
                    ),
                }
                break;
            }
        };
        tokio::spawn(tracing::Instrument::in_current_span(task));
    }

    /// The jobs that may run now. A job whose handler's breaker is open is held: released, pending in
    /// Redis with its delivery given back, due when the breaker lets a probe through. A job whose
    /// handler's rate limit has no permit for it waits on a task of its own, and comes back through
    /// `permits`.
    fn guard(
        &self,
        ready: Vec<Job>,
        st: &mut State,
        permits: &mpsc::UnboundedSender<Permitted>,
    ) -> Vec<Job> {
        let mut run = Vec::with_capacity(ready.len());
        for job in ready {
            let Some(guard) = self.guards.get(job.handler.name()) else {
                run.push(job);
                continue;
            };
            if let Some(breaker) = &guard.breaker
                && let Admit::Hold(until) = breaker.admit(&job.msg.id)
            {
                let wait = breaker.hold_for(until, random_unit());
                st.events.held(&job.msg, job.handler.name(), wait);
                self.schedule(&job.msg.id, wait, Some(job.msg.deliveries));
                st.flight.ran(job.msg, None, job.handler.name().into());
                continue;
            }
            match &guard.rate {
                Some(rate) if !rate.try_take() => {
                    self.wait_for_permit(job, guard.clone(), st, permits)
                }
                _ => run.push(job),
            }
        }
        run
    }

    /// Runs `job` once its handler's rate limit gives a permit (or hands it back when the loop drains).
    fn wait_for_permit(
        &self,
        job: Job,
        guard: Arc<Guard>,
        st: &mut State,
        permits: &mpsc::UnboundedSender<Permitted>,
    ) {
        st.throttled += 1;
        crate::metrics::global()
            .rate_waited
            .get_or_create(&crate::metrics::HandlerLabels {
                handler: job.handler.name().to_owned(),
            })
            .inc();
        let (client, stream) = (self.client.clone(), self.cfg.stream.clone());
        let (stop, permits) = (st.stop_waits.clone(), permits.clone());
        let task = async move {
            let go = match &guard.rate {
                Some(rate) => tokio::select! {
                    () = rate.acquire(&client, &stream) => true,
                    () = stop.cancelled() => false,
                },
                None => true,
            };
            // The loop outlives its waits except at an immediate exit, when this is moot.
            let _ = permits.send((job, go));
        };
        tokio::spawn(tracing::Instrument::in_current_span(task));
    }

    /// Takes a finished handler's result into the commit queue and lets the next message of its key run.
    fn finish(&self, done: Done, st: &mut State) {
        let Done {
            msg,
            effect,
            handler,
            held_until,
            retry_after,
        } = done;
        match effect {
            Ok(effect) => {
                st.flight.ran(msg, Some(effect), handler);
            }
            Err(reason) => {
                let wait = match (held_until, self.guards.get(&handler)) {
                    (Some(until), Some(guard)) if guard.breaker.is_some() => {
                        let wait = guard
                            .breaker
                            .as_ref()
                            .map_or(Duration::ZERO, |b| b.hold_for(until, random_unit()));
                        self.schedule(&msg.id, wait, Some(msg.deliveries));
                        Some(wait)
                    }
                    // The handler said when: that, instead of the schedule's step.
                    _ => match retry_after {
                        Some(after) => {
                            self.schedule(&msg.id, after, None);
                            Some(after)
                        }
                        None => self.schedule_retry(&msg, &handler),
                    },
                };
                st.events.retried(&msg, &handler, &reason, wait);
                st.flight.ran(msg, None, handler);
            }
        }
    }
}

/// A number in [0, 1) for jitter; the middle if the OS has no randomness to give.
fn random_unit() -> f64 {
    getrandom::u64().map_or(0.5, |r| (r >> 11) as f64 / (1u64 << 53) as f64)
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
