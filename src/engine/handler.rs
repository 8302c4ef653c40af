//! The handler seam: what the engine calls per message, and the built-in handlers.
//!
//! Owns the [`Handler`] trait, the [`Outcome`] a handler returns, and the built-ins usable from config
//! without WASM: `forward` (copy the message to another stream) and `drop` (ack only). A handler never
//! talks to Redis: it returns replies, and the engine commits them atomically with the ack
//! ([`super::commit`]). The WASM runtime plugs in here as one more implementation.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::envelope::Fields;

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
    pub sender: Option<Arc<crate::auth::Identity>>,
}

/// A reply a handler wants published. The engine stamps the envelope (`_timestamp`, `_source`,
/// `_trace_id` inherited from the message unless set, `_cause`) at commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub stream: String,
    pub fields: Fields,
}

/// What became of one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done: commit these replies together with the ack.
    Success(Vec<Reply>),
    /// Failed for now: leave it pending; it is redelivered after `claim_min_idle`, counted against
    /// `max_deliveries`.
    Retry(String),
    /// Will never succeed: dead-letter it now.
    Reject(String),
}

/// Handles messages. Implementations must not panic on any input (the engine contains panics anyway,
/// turning them into [`Outcome::Retry`]) and must be cheap to call concurrently.
pub trait Handler: Send + Sync + 'static {
    /// The name used in logs, metrics and `_dlq_handler`.
    fn name(&self) -> &str;
    fn handle<'a>(&'a self, msg: &'a Message) -> BoxFuture<'a, Outcome>;

    /// Handlers whose calls run on worker threads can take many messages in one hand-off. Without
    /// this, messages are handed over one by one through [`Handler::handle`].
    fn batch(&self) -> Option<&dyn BatchHandler> {
        None
    }
}

/// One message's result from a batch: the message (handed back), its outcome, and the call's duration.
pub type Handled = (Message, Outcome, std::time::Duration);

/// Where a batch's results go, called from worker threads, possibly several times (once per chunk).
pub type BatchDone = Arc<dyn Fn(Vec<Handled>) + Send + Sync>;

/// A handler taking batches: it calls every message with its own deadline and reports the results
/// through `done`, in one or more chunks, each message exactly once.
pub trait BatchHandler: Send + Sync {
    fn run_batch(&self, msgs: Vec<Message>, done: BatchDone);
}

/// `drop`: acknowledge and do nothing — for streams whose messages only need consuming.
pub struct Drop;

impl Handler for Drop {
    fn name(&self) -> &str {
        "drop"
    }

    fn handle<'a>(&'a self, _msg: &'a Message) -> BoxFuture<'a, Outcome> {
        Box::pin(async { Outcome::Success(Vec::new()) })
    }
}

/// `forward`: publish the message's fields to another stream — routing without WASM. The envelope
/// fields are restamped at commit (the copy's `_source` is this daemon, its `_cause` the original).
pub struct Forward {
    pub to: String,
}

impl Handler for Forward {
    fn name(&self) -> &str {
        "forward"
    }

    fn handle<'a>(&'a self, msg: &'a Message) -> BoxFuture<'a, Outcome> {
        let reply = Reply {
            stream: self.to.clone(),
            fields: msg.fields.clone(),
        };
        Box::pin(async move { Outcome::Success(vec![reply]) })
    }
}

/// `faults`: a handler for fault tests, compiled only with the `fault-injection` feature. It fails,
/// stalls and replies on command, so the tests can drive the real binary through every outcome.
#[cfg(feature = "fault-injection")]
pub struct Faults {
    /// Publish one reply per message here (with the message's fields).
    pub reply_to: Option<String>,
    /// Messages carrying this field always fail (a poison message).
    pub fail_field: Option<String>,
    /// Fail while the delivery count is at most this.
    pub fail_deliveries: u64,
    /// Fail every Nth invocation (counted across messages).
    pub fail_every: u64,
    /// Take this long per message.
    pub sleep: std::time::Duration,
    pub calls: std::sync::atomic::AtomicU64,
}

#[cfg(feature = "fault-injection")]
impl Handler for Faults {
    fn name(&self) -> &str {
        "faults"
    }

    fn handle<'a>(&'a self, msg: &'a Message) -> BoxFuture<'a, Outcome> {
        use std::sync::atomic::Ordering;
        Box::pin(async move {
            let call = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
            let started = crate::envelope::now_us();
            if !self.sleep.is_zero() {
                tokio::time::sleep(self.sleep).await;
            }
            if let Some(field) = &self.fail_field
                && msg.fields.get(field).is_some()
            {
                return Outcome::Retry(format!("poison: field {field} present"));
            }
            if msg.deliveries <= self.fail_deliveries {
                return Outcome::Retry(format!("transient: delivery {}", msg.deliveries));
            }
            if self.fail_every > 0 && call.is_multiple_of(self.fail_every) {
                return Outcome::Retry(format!("transient: call {call}"));
            }
            let replies = self
                .reply_to
                .iter()
                .map(|to| {
                    let mut fields = msg.fields.clone();
                    // When the call started, so tests can check ordering and parallelism.
                    fields.set("faults_started_us", started.to_string());
                    Reply {
                        stream: to.clone(),
                        fields,
                    }
                })
                .collect();
            Outcome::Success(replies)
        })
    }
}
