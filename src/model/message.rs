//! The handler seam: what the engine hands a handler per message, and what a handler hands back.
//!
//! Owns [`Message`], [`Reply`], [`Outcome`] and the [`Handler`] trait. A handler never talks to Redis:
//! it returns replies, and the engine commits them atomically with the ack. Implementations — the
//! built-ins and the WASM runtime — are [`crate::handlers`]'; the engine that calls them is
//! [`crate::engine`]. Who sent a message is carried as plain verified claims ([`Sender`]), so this leaf
//! needs nothing from [`crate::auth`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::envelope::Fields;

/// A boxed future, so handlers can be trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One message as a handler sees it.
#[derive(Clone, Debug)]
pub struct Message {
    pub stream: Arc<str>,
    pub id: String,
    pub fields: Fields,
    /// 1 on first delivery; counts every delivery to any consumer of the group.
    pub deliveries: u64,
    /// The verified claims of the message's `_token`, when its route requires one.
    pub sender: Option<Arc<Sender>>,
}

/// The verified claims of a message's signature, as a handler sees them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sender {
    /// The signer's `sub`.
    pub subject: String,
    /// The signer's roles, as written (`task_write`, `admin`, …).
    pub roles: Vec<String>,
    /// What makes this use of the signature unique, recorded when the message takes effect so a copy
    /// of it never does. None once a replay was detected (its dead letter records nothing).
    pub once: Option<Once>,
}

/// A signature's `jti` and until when it must be remembered (ms since the epoch, by this daemon's
/// clock: the record is written with the time left, relative, so Redis's clock does not matter).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Once {
    pub jti: String,
    pub until_ms: u64,
}

/// One write a handler's call commits with the ack of its message: a reply it wants published — the
/// engine stamps the envelope (`_timestamp`, `_source`, `_trace_id` inherited from the message unless
/// set, `_cause`) at commit — or a change to its state ([`ReplyKind::StateSet`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The stream — or, for a change of state, the state key.
    pub stream: String,
    /// The reply's fields; a state value is the value of its one field.
    pub fields: Fields,
    pub kind: ReplyKind,
}

/// How a [`Reply`] is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyKind {
    /// Published on its stream with the commit.
    Now,
    /// Committed with the ack, it appears on its stream at this time ([`crate::client::delayed`]).
    Delayed(Due),
    /// The handler's state key `stream` set to the value of the one field, expiring after this many
    /// ms when given.
    StateSet { ttl_ms: Option<u64> },
    /// The handler's state key `stream` removed.
    StateRemove,
    /// Not a write: the handler read state key `stream` — its value the one field, or none when
    /// `found` is false — and wrote state in the same call, so its commit holds only while the key
    /// still holds what it read (else the message runs again).
    StateRead { found: bool },
}

impl ReplyKind {
    /// When a delayed reply is due.
    pub fn due(self) -> Option<Due> {
        match self {
            ReplyKind::Delayed(due) => Some(due),
            _ => None,
        }
    }

    /// Whether it is a change of state, not a message.
    pub fn is_state(self) -> bool {
        matches!(
            self,
            ReplyKind::StateSet { .. } | ReplyKind::StateRemove | ReplyKind::StateRead { .. }
        )
    }
}

impl Reply {
    /// A reply appearing on `stream` at once.
    pub fn new(stream: impl Into<String>, fields: Fields) -> Reply {
        Reply {
            stream: stream.into(),
            fields,
            kind: ReplyKind::Now,
        }
    }
}

/// Reads a handler's state where it is kept (Redis, for the daemon) for `state.get`. `get` is called
/// on a handler's worker thread and may block, at most `within`; `get_owned` by a call that runs
/// asynchronously (it must not block: the default suits a store in memory).
pub trait StateReader: Send + Sync + std::fmt::Debug {
    fn get(&self, key: &str, within: std::time::Duration) -> Result<Option<Vec<u8>>, String>;

    fn get_owned(
        &self,
        key: String,
        within: std::time::Duration,
    ) -> BoxFuture<'static, Result<Option<Vec<u8>>, String>> {
        let found = self.get(&key, within);
        Box::pin(std::future::ready(found))
    }
}

/// Where a runtime's handlers read their state: set once the process has it (the daemon, when it
/// has connected; `handler run`, from the case's state).
pub type StateSlot = std::sync::OnceLock<Arc<dyn StateReader>>;

/// When a delayed message is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    /// This many ms after now: after the commit, for a handler's reply; by Redis's clock, for a
    /// message published with `redstream publish --delay`.
    In(u64),
    /// At this time, ms since the epoch.
    At(u64),
}

impl Due {
    /// The latest a delayed message may be due: a year ahead.
    pub const MAX_AHEAD_MS: u64 = 366 * 24 * 3600 * 1000;

    /// When it is due, ms since the epoch, counting [`Due::In`] from `now_ms`.
    pub fn at(self, now_ms: u64) -> u64 {
        match self {
            Due::In(ms) => now_ms.saturating_add(ms),
            Due::At(ms) => ms,
        }
    }
}

/// What became of one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done: commit these replies together with the ack.
    Success(Vec<Reply>),
    /// Failed for now: leave it pending; it is redelivered after `claim_min_idle` (or at the
    /// consumer's next retry step), counted against `max_deliveries`.
    Retry(String),
    /// Like `Retry`, at a time the handler chose: redelivered after this long.
    RetryAfter(String, std::time::Duration),
    /// Will never succeed: dead-letter it now.
    Reject(String),
}

/// Handles messages. Implementations must not panic on any input (the engine contains panics anyway,
/// turning them into [`Outcome::Retry`]) and must be cheap to call concurrently.
pub trait Handler: Send + Sync + 'static {
    /// The name used in logs, metrics and `_dlq_handler`.
    fn name(&self) -> &str;
    fn handle<'a>(&'a self, msg: &'a Message) -> BoxFuture<'a, Outcome>;

    /// Waits until the handler may start one more call, and returns what holds that place until it is
    /// dropped (a handler whose calls run as tasks has a `concurrency`). The wait is not part of the
    /// call: no deadline runs and no attempt is counted while a message waits for its turn.
    fn admit(&self) -> BoxFuture<'static, Admission> {
        Box::pin(std::future::ready(None))
    }

    /// Handlers whose calls run on worker threads can take many messages in one hand-off. Without
    /// this, messages are handed over one by one through [`Handler::handle`].
    fn batch(&self) -> Option<&dyn BatchHandler> {
        None
    }
}

/// A handler's place for one call, held until dropped (None: the handler takes any number).
pub type Admission = Option<Box<dyn Send>>;

/// One message's result from a batch: the message (handed back), its outcome, and the call's duration.
pub type Handled = (Message, Outcome, std::time::Duration);

/// Where a batch's results go, called from worker threads, possibly several times (once per chunk).
pub type BatchDone = Arc<dyn Fn(Vec<Handled>) + Send + Sync>;

/// A handler taking batches: it calls every message with its own deadline and reports the results
/// through `done`, in one or more chunks, each message exactly once. Whatever the calls log is logged
/// inside `span` (the consumer loop's: its stream, group and consumer), on whichever thread they run.
pub trait BatchHandler: Send + Sync {
    fn run_batch(&self, msgs: Vec<Message>, span: tracing::Span, done: BatchDone);
}
