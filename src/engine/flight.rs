//! The bookkeeping of one consumer loop, without I/O: which entries are in flight, which run, which
//! wait behind their `order_by` key, which are decided and wait for a commit, and what a commit's
//! verdicts release.
//!
//! Owns the rules that make the loop correct whatever Redis does: an entry is taken into flight once
//! (a re-read or a claim of an entry already here is ignored); at most `limit` entries are in flight;
//! messages with the same `order_by` value run one after another, in the order they were admitted;
//! an entry leaves flight only when a commit's verdict is known, or when it is released to stay
//! pending in Redis (a retry, a message queued when a drain began). Reading, running handlers and
//! talking to Redis are [`super::consumer`]'s.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::model::StreamId;
use crate::model::decided::{Effect, Finished};
use crate::model::message::{Handler, Message};

/// The most messages one commit carries.
pub const MAX_COMMIT: usize = 500;
/// The most writes (replies and dead letters) one commit carries: the commit script's layout numbers
/// the streams a batch writes in two bytes, so they must stay below 65,536.
pub const MAX_COMMIT_WRITES: usize = 50_000;
/// About the most bytes one commit carries (one message alone may exceed it; it then goes alone):
/// Redis holds a script call's arguments whole while it runs.
pub const MAX_COMMIT_BYTES: usize = 16 << 20;

/// A routed message waiting to run (behind its order_by key) or about to run.
pub struct Job {
    pub msg: Message,
    pub handler: Arc<dyn Handler>,
}

/// The loop's entries, from admission to the verdict of their commit.
pub struct Flight {
    limit: usize,
    order_by: Option<String>,
    /// Entries delivered to us and not yet committed or released: queued, running, decided, or
    /// committing.
    in_flight: HashSet<StreamId>,
    running: usize,
    /// order_by values with a message running, and the messages waiting behind each.
    busy: HashSet<Vec<u8>>,
    waiting: HashMap<Vec<u8>, VecDeque<Job>>,
    /// Free to run: handed to the handlers at the top of the next turn.
    ready: Vec<Job>,
    /// Decided, waiting to be committed.
    finished: Vec<Finished>,
    /// Batches that must be committed alone, in order, before the rest: the halves of a commit that
    /// failed as a whole, narrowing down to the message that makes it fail.
    isolated: VecDeque<Vec<Finished>>,
    /// With `order_by`: the messages in a commit whose verdict is not back yet, by id, with their
    /// value, and how many each value has there. A message whose value has one waits for that verdict
    /// before it is taken into a commit (see [`Flight::take_batch`]).
    committing: HashMap<StreamId, Vec<u8>>,
    committing_keys: HashMap<Vec<u8>, usize>,
}

/// An entry's id as the in-flight set and the commit order know it. Redis hands out nothing but valid
/// ids; should a reply ever carry another, it sorts last and shares one slot — such an entry is never
/// acked by mistake, it stays pending.
pub fn key_of(id: &str) -> StreamId {
    StreamId::parse(id).unwrap_or(StreamId::MAX)
}

impl Flight {
    pub fn new(limit: usize, order_by: Option<String>) -> Self {
        Flight {
            limit,
            order_by,
            in_flight: HashSet::new(),
            running: 0,
            busy: HashSet::new(),
            waiting: HashMap::new(),
            ready: Vec::new(),
            finished: Vec::new(),
            isolated: VecDeque::new(),
            committing: HashMap::new(),
            committing_keys: HashMap::new(),
        }
    }

    /// Changes how many entries may be in flight (what is in flight already stays).
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// How many more entries may be taken in.
    pub fn free(&self) -> usize {
        self.limit.saturating_sub(self.in_flight.len())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.in_flight.contains(&key_of(id))
    }

    pub fn running(&self) -> usize {
        self.running
    }

    /// Takes `id` into flight; false if it already is (a re-read or a claim of an entry we hold).
    pub fn admit(&mut self, id: &str) -> bool {
        self.in_flight.insert(key_of(id))
    }

    /// An admitted message decided without running (a dead letter, a drop, a vanished entry).
    pub fn settle(&mut self, f: Finished) {
        self.finished.push(f);
    }

    /// An admitted message to run: behind the message running with its order_by value, if any.
    pub fn enqueue(&mut self, job: Job) {
        if let Some(key) = self.order_key(&job.msg)
            && !self.busy.insert(key.clone())
        {
            self.waiting.entry(key).or_default().push_back(job);
            return;
        }
        self.ready.push(job);
    }

    /// The jobs free to run, now counted as running.
    pub fn start_ready(&mut self) -> Vec<Job> {
        self.running += self.ready.len();
        std::mem::take(&mut self.ready)
    }

    /// A handler returned: the next message of its order_by value may run, and the outcome waits for
    /// a commit — or, for a retry (`None`), the entry is released to stay pending. Returns whether it
    /// was released.
    pub fn ran(&mut self, msg: Message, effect: Option<Effect>, handler: Arc<str>) -> bool {
        self.running = self.running.saturating_sub(1);
        if let Some(key) = self.order_key(&msg) {
            match self.waiting.get_mut(&key).and_then(VecDeque::pop_front) {
                Some(next) => self.ready.push(next),
                None => {
                    self.waiting.remove(&key);
                    self.busy.remove(&key);
                }
            }
        }
        match effect {
            Some(effect) => {
                self.finished.push(Finished {
                    msg,
                    effect,
                    handler,
                });
                false
            }
            None => {
                self.in_flight.remove(&key_of(&msg.id));
                true
            }
        }
    }

    /// Whether a commit can be made now: something is decided, and not all of it waits behind a
    /// commit of its `order_by` value.
    pub fn has_finished(&self) -> bool {
        if self.committing_keys.is_empty() {
            return !self.finished.is_empty() || !self.isolated.is_empty();
        }
        match self.isolated.front() {
            Some(batch) => !batch.iter().any(|f| self.held(f)),
            None => self.finished.iter().any(|f| !self.held(f)),
        }
    }

    /// Whether `f` must wait: a message of its `order_by` value is in a commit whose verdict is not
    /// back. Two commits can be under way at once (one with the read, one alone), and a commit can
    /// fail and be made again later: without this, a later message of a key could be written first.
    fn held(&self, f: &Finished) -> bool {
        !self.committing_keys.is_empty()
            && self
                .order_key(&f.msg)
                .is_some_and(|k| self.committing_keys.contains_key(&k))
    }

    /// `batch` goes into a commit: its keyed messages hold back the later ones of their values.
    fn hold(&mut self, batch: &[Finished]) {
        if self.order_by.is_none() {
            return;
        }
        for f in batch {
            if let Some(k) = self.order_key(&f.msg) {
                *self.committing_keys.entry(k.clone()).or_default() += 1;
                self.committing.insert(key_of(&f.msg.id), k);
            }
        }
    }

    /// The verdict of `id`'s commit is back (whatever it says): later messages of its value may go.
    fn release(&mut self, id: &str) {
        if self.committing.is_empty() {
            return;
        }
        let Some(k) = self.committing.remove(&key_of(id)) else {
            return;
        };
        if let Some(n) = self.committing_keys.get_mut(&k) {
            *n -= 1;
            if *n == 0 {
                self.committing_keys.remove(&k);
            }
        }
    }

    /// Everything decided, as one commit batch: in stream order when any message writes (the commit
    /// script checks ownership over the writers' id range, and replies are then written in the order
    /// of their sources).
    /// At most [`MAX_COMMIT`] messages, [`MAX_COMMIT_WRITES`] writes and about [`MAX_COMMIT_BYTES`] go
    /// in one batch (always at least one message); the rest wait for the next.
    /// An isolated batch goes first, alone.
    ///
    /// With `order_by`, the commits of one value are applied in delivery order whichever path carries
    /// them: a message waits (stays decided, out of the batch) while a message of its value is in a
    /// commit whose verdict is not back; messages of one value that go together are in stream order.
    /// The batch may then be empty.
    pub fn take_batch(&mut self) -> Vec<Finished> {
        let batch = self.pick_batch();
        self.hold(&batch);
        batch
    }

    fn pick_batch(&mut self) -> Vec<Finished> {
        if let Some(front) = self.isolated.front() {
            if front.iter().any(|f| self.held(f)) {
                return Vec::new();
            }
            return self.isolated.pop_front().unwrap_or_default();
        }
        let mut batch = std::mem::take(&mut self.finished);
        if !self.committing_keys.is_empty() {
            let (held, free): (Vec<_>, Vec<_>) = batch.into_iter().partition(|f| self.held(f));
            self.finished = held;
            batch = free;
            if batch.is_empty() {
                return batch;
            }
        }
        if batch.iter().any(Finished::writes_anything) {
            batch.sort_by_cached_key(|f| key_of(&f.msg.id));
        }
        let (mut writes, mut bytes) = (0, 0);
        let fits = batch
            .iter()
            .take(MAX_COMMIT)
            .position(|f| {
                let (w, b) = f.weight();
                writes += w;
                bytes += b;
                writes > MAX_COMMIT_WRITES || bytes > MAX_COMMIT_BYTES
            })
            .unwrap_or(batch.len().min(MAX_COMMIT))
            .max(1);
        if batch.len() > fits {
            self.finished.extend(batch.split_off(fits));
        }
        batch
    }

    /// A batch whose commit's fate is unknown: it is committed again later (the ownership check makes
    /// a second run of an applied commit write nothing).
    pub fn recommit(&mut self, batch: Vec<Finished>) {
        for f in &batch {
            self.release(&f.msg.id);
        }
        self.finished.extend(batch);
    }

    /// A batch whose commit failed as a whole, for a reason that may be one of its messages: its two
    /// halves are committed apart, each alone, before anything else — splitting again where one fails,
    /// until the message that makes it fail is alone. A batch of one is committed alone as it is.
    pub fn isolate(&mut self, mut batch: Vec<Finished>) {
        for f in &batch {
            self.release(&f.msg.id);
        }
        if batch.len() > 1 {
            let second = batch.split_off(batch.len() / 2);
            self.isolated.push_front(second);
        }
        self.isolated.push_front(batch);
    }

    /// A message whose commit wrote nothing because the state it read changed: it runs again, still
    /// in flight.
    pub fn rerun(&mut self, job: Job) {
        self.release(&job.msg.id);
        self.enqueue(job);
    }

    /// A commit's verdict for `id` is known: the entry leaves flight.
    pub fn committed(&mut self, id: &str) {
        self.release(id);
        self.in_flight.remove(&key_of(id));
    }

    /// A drain began: messages still queued behind their key never started; they are released and
    /// stay pending for the next start. Returns how many.
    pub fn release_queued(&mut self) -> usize {
        let mut n = 0;
        for (_, queue) in self.waiting.drain() {
            for job in queue {
                self.in_flight.remove(&key_of(&job.msg.id));
                n += 1;
            }
        }
        n
    }

    /// Nothing running, decided or in flight: a drain is complete once the last commit is back.
    pub fn is_empty(&self) -> bool {
        self.running == 0
            && self.finished.is_empty()
            && self.isolated.is_empty()
            && self.in_flight.is_empty()
    }

    fn order_key(&self, msg: &Message) -> Option<Vec<u8>> {
        let field = self.order_by.as_deref()?;
        msg.fields.get(field).map(<[u8]>::to_vec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Fields;
    use crate::model::message::{BoxFuture, Outcome, Reply, ReplyKind};

    struct Nop;
    impl Handler for Nop {
        fn name(&self) -> &str {
            "nop"
        }
        fn handle<'a>(&'a self, _: &'a Message) -> BoxFuture<'a, Outcome> {
            Box::pin(async { Outcome::Success(Vec::new()) })
        }
    }

    fn msg(id: &str, key: Option<&str>) -> Message {
        let mut fields = Fields::default();
        if let Some(k) = key {
            fields.push("key", k);
        }
        Message {
            stream: "nova:task:t:in".into(),
            id: id.into(),
            fields,
            deliveries: 1,
            sender: None,
        }
    }

    fn job(id: &str, key: Option<&str>) -> Job {
        Job {
            msg: msg(id, key),
            handler: Arc::new(Nop),
        }
    }

    fn ids(jobs: &[Job]) -> Vec<&str> {
        jobs.iter().map(|j| j.msg.id.as_str()).collect()
    }

    fn reply() -> Option<Effect> {
        Some(Effect::Replies(vec![Reply {
            stream: "nova:task:t:out".into(),
            fields: Fields::default(),
            kind: ReplyKind::Now,
        }]))
    }

    #[test]
    fn an_entry_is_admitted_once_and_counts_against_the_limit() {
        let mut f = Flight::new(2, None);
        assert!(f.admit("1-1"));
        assert!(
            !f.admit("1-1"),
            "a re-read of an entry in flight is ignored"
        );
        assert_eq!(f.free(), 1);
        assert!(f.admit("1-2"));
        assert_eq!(f.free(), 0);
        f.committed("1-1");
        assert_eq!(f.free(), 1);
    }

    #[test]
    fn one_order_by_value_runs_at_a_time_in_admission_order() {
        let mut f = Flight::new(10, Some("key".into()));
        for (id, key) in [("1-1", "a"), ("1-2", "a"), ("1-3", "b"), ("1-4", "a")] {
            f.admit(id);
            f.enqueue(job(id, Some(key)));
        }
        let first = f.start_ready();
        assert_eq!(ids(&first), ["1-1", "1-3"]);
        assert_eq!(f.running(), 2);
        assert!(f.start_ready().is_empty(), "1-2 waits behind 1-1");
        f.ran(first[1].msg.clone(), reply(), "nop".into());
        assert!(f.start_ready().is_empty(), "b finishing frees nothing of a");
        f.ran(first[0].msg.clone(), reply(), "nop".into());
        let second = f.start_ready();
        assert_eq!(ids(&second), ["1-2"]);
        f.ran(second[0].msg.clone(), None, "nop".into());
        assert_eq!(
            ids(&f.start_ready()),
            ["1-4"],
            "a retry lets the next one run too"
        );
    }

    #[test]
    fn messages_without_the_field_run_freely() {
        let mut f = Flight::new(10, Some("key".into()));
        for id in ["1-1", "1-2"] {
            f.admit(id);
            f.enqueue(job(id, None));
        }
        assert_eq!(ids(&f.start_ready()), ["1-1", "1-2"]);
    }

    #[test]
    fn a_retry_releases_its_slot_and_an_outcome_keeps_it_until_the_verdict() {
        let mut f = Flight::new(2, None);
        for id in ["1-1", "1-2"] {
            f.admit(id);
            f.enqueue(job(id, None));
        }
        let jobs = f.start_ready();
        assert!(f.ran(jobs[0].msg.clone(), None, "nop".into()), "released");
        assert_eq!(f.free(), 1);
        assert!(!f.ran(jobs[1].msg.clone(), reply(), "nop".into()));
        assert_eq!(f.free(), 1, "decided is still in flight");
        let batch = f.take_batch();
        assert_eq!(batch.len(), 1);
        assert!(!f.is_empty());
        f.committed(&batch[0].msg.id);
        assert!(f.is_empty());
    }

    #[test]
    fn batches_that_write_are_in_stream_order_and_recommitted_whole() {
        let mut f = Flight::new(10, None);
        for id in ["10-0", "9-5", "9-10"] {
            f.admit(id);
            f.enqueue(job(id, None));
        }
        for j in f.start_ready() {
            f.ran(j.msg, reply(), "nop".into());
        }
        let batch = f.take_batch();
        let order: Vec<&str> = batch.iter().map(|b| b.msg.id.as_str()).collect();
        assert_eq!(order, ["9-5", "9-10", "10-0"], "numeric, not text order");
        assert!(!f.has_finished());
        f.recommit(batch);
        assert_eq!(f.take_batch().len(), 3);
    }

    #[test]
    fn a_commit_carries_at_most_max_commit_messages() {
        let mut f = Flight::new(2 * MAX_COMMIT, None);
        for i in 0..MAX_COMMIT + 7 {
            let id = format!("1-{i}");
            f.admit(&id);
            f.enqueue(job(&id, None));
        }
        for j in f.start_ready() {
            f.ran(j.msg, reply(), "nop".into());
        }
        assert_eq!(f.take_batch().len(), MAX_COMMIT);
        assert_eq!(f.take_batch().len(), 7, "the rest go in the next");
    }

    #[test]
    fn a_commit_carries_a_bounded_weight_and_at_least_one_message() {
        let big = |n: usize| {
            Some(Effect::Replies(vec![Reply {
                stream: "nova:task:x:out".into(),
                fields: (0..n)
                    .map(|i| (format!("f{i}"), vec![b'x'; 4096]))
                    .collect(),
                kind: ReplyKind::Now,
            }]))
        };
        let mut f = Flight::new(100, None);
        for i in 0..10 {
            let id = format!("1-{i}");
            f.admit(&id);
            f.enqueue(job(&id, None));
        }
        let jobs = f.start_ready();
        for (i, j) in jobs.into_iter().enumerate() {
            // Two messages of ~6 MiB, then one of ~20 MiB, then small ones.
            let effect = match i {
                0 | 1 => big(1500),
                2 => big(5000),
                _ => reply(),
            };
            f.ran(j.msg, effect, "nop".into());
        }
        assert_eq!(f.take_batch().len(), 2, "the third would pass 16 MiB");
        assert_eq!(f.take_batch().len(), 1, "too heavy alone, it still goes");
        assert_eq!(f.take_batch().len(), 7);
    }

    #[test]
    fn a_failing_batch_is_split_until_its_culprit_is_alone() {
        let mut f = Flight::new(100, None);
        for i in 0..8 {
            let id = format!("1-{i}");
            f.admit(&id);
            f.enqueue(job(&id, None));
        }
        for j in f.start_ready() {
            f.ran(j.msg, reply(), "nop".into());
        }
        let ids = |b: &[Finished]| b.iter().map(|f| f.msg.id.clone()).collect::<Vec<_>>();
        // The culprit is 1-5: every batch holding it fails and is split; the others commit.
        let mut committed = Vec::new();
        let mut alone = None;
        for _ in 0..20 {
            if !f.has_finished() {
                break;
            }
            let batch = f.take_batch();
            if ids(&batch).contains(&"1-5".to_string()) {
                if batch.len() == 1 {
                    alone = Some(batch);
                    continue;
                }
                f.isolate(batch);
            } else {
                committed.extend(ids(&batch));
            }
        }
        assert_eq!(ids(&alone.expect("the culprit ends up alone")), ["1-5"]);
        committed.sort();
        assert_eq!(committed, ["1-0", "1-1", "1-2", "1-3", "1-4", "1-6", "1-7"]);
    }

    /// Runs `ids` (all of one order_by value unless given) to a reply each, in order.
    fn decided(f: &mut Flight, ids: &[(&str, &str)]) {
        for (id, key) in ids {
            f.admit(id);
            f.enqueue(job(id, Some(key)));
        }
        // One value runs one message at a time: finish each as it becomes ready.
        while f.running() > 0 || !f.ready.is_empty() {
            for j in f.start_ready() {
                f.ran(j.msg, reply(), "nop".into());
            }
        }
    }

    fn batch_ids(b: &[Finished]) -> Vec<&str> {
        b.iter().map(|f| f.msg.id.as_str()).collect()
    }

    #[test]
    fn a_key_is_committed_in_order_across_commits_under_way() {
        let mut f = Flight::new(10, Some("key".into()));
        decided(&mut f, &[("1-1", "a"), ("1-2", "b")]);
        let first = f.take_batch();
        assert_eq!(batch_ids(&first), ["1-1", "1-2"]);
        // While that commit is out (with the read), later messages of a and c finish.
        decided(&mut f, &[("1-3", "a"), ("1-4", "c")]);
        assert!(f.has_finished(), "c may go");
        let second = f.take_batch();
        assert_eq!(
            batch_ids(&second),
            ["1-4"],
            "1-3 waits for 1-1's verdict: a second commit under way could land first"
        );
        assert!(!f.has_finished(), "nothing else may go");
        assert!(f.take_batch().is_empty());
        // 1-1's commit failed and is made again: 1-3 goes with it, after it, never before.
        f.recommit(first);
        let again = f.take_batch();
        assert_eq!(batch_ids(&again), ["1-1", "1-2", "1-3"]);
        for x in again.iter().chain(&second) {
            f.committed(&x.msg.id);
        }
        assert!(f.is_empty());
    }

    #[test]
    fn a_verdict_of_any_kind_lets_the_next_of_its_key_go() {
        let mut f = Flight::new(10, Some("key".into()));
        decided(&mut f, &[("1-1", "a")]);
        let first = f.take_batch();
        decided(&mut f, &[("1-2", "a")]);
        assert!(!f.has_finished());
        // Refused as a whole: its halves are isolated, and the next of its key still waits for them.
        f.isolate(first);
        assert_eq!(batch_ids(&f.take_batch()), ["1-1"]);
        assert!(!f.has_finished(), "1-2 waits for the isolated 1-1");
        f.committed("1-1");
        assert_eq!(batch_ids(&f.take_batch()), ["1-2"]);
    }

    #[test]
    fn without_order_by_nothing_waits() {
        let mut f = Flight::new(10, None);
        for id in ["1-1", "1-2"] {
            f.admit(id);
            f.enqueue(job(id, Some("a")));
        }
        let jobs = f.start_ready();
        f.ran(jobs[0].msg.clone(), reply(), "nop".into());
        assert_eq!(batch_ids(&f.take_batch()), ["1-1"]);
        f.ran(jobs[1].msg.clone(), reply(), "nop".into());
        assert_eq!(batch_ids(&f.take_batch()), ["1-2"]);
    }

    #[test]
    fn a_drain_releases_only_what_never_started() {
        let mut f = Flight::new(10, Some("key".into()));
        for (id, key) in [("1-1", "a"), ("1-2", "a"), ("1-3", "a")] {
            f.admit(id);
            f.enqueue(job(id, Some(key)));
        }
        let running = f.start_ready();
        assert_eq!(f.release_queued(), 2);
        assert_eq!(
            f.in_flight(),
            1,
            "the running one stays until it is decided"
        );
        f.ran(running[0].msg.clone(), reply(), "nop".into());
        for f2 in f.take_batch() {
            f.committed(&f2.msg.id);
        }
        assert!(f.is_empty());
    }
}
