//! How a consumer loop calls its handlers: every kind through one path.
//!
//! [`Calls::launch`] hands the ready jobs over — a handler that runs on worker threads (WASM) gets its
//! messages in one hand-off, any other gets one tokio task per message, run under the consumer's
//! deadline with its panics contained — and every result, however it was called, comes back through
//! [`Calls::conclude`]: its duration observed, its outcome decided ([`super::machine::decide`]) and
//! sent to the loop as a [`Done`]. Each call runs in a `message` span (message id, deliveries,
//! handler, trace id) under the loop's (stream, group, consumer).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::events::{Events, trace_of};
use super::flight::Job;
use super::guard::{Guard, Guards};
use super::machine;
use super::settings::ConsumerSettings;
use crate::auth::Op;
use crate::client::Client;
use crate::metrics::HandlerTimer;
use crate::model::decided::Effect;
use crate::model::message::{BatchDone, Handled, Handler, Message, Outcome};

/// A message that left its handler: what to commit, or why it stays pending for a retry.
pub struct Done {
    pub msg: Message,
    pub effect: Result<Effect, String>,
    pub handler: Arc<str>,
    /// The call was its handler's breaker probe and failed: held until then, its delivery given
    /// back (a probe is the breaker's attempt, not the message's).
    pub held_until: Option<std::time::Instant>,
    /// The handler asked to be retried after this long (`retry-after`), not at the schedule's step.
    pub retry_after: Option<Duration>,
}

/// Where a loop's handler results go.
pub type Results = mpsc::UnboundedSender<Vec<Done>>;

/// The handler calls of one loop.
pub struct Calls {
    pub cfg: Arc<ConsumerSettings>,
    pub client: Client,
    /// Every call's end is told to its handler's breaker, if it has one.
    pub guards: Arc<Guards>,
    pub results: Results,
}

impl Calls {
    /// Starts every ready job.
    pub fn launch(&self, ready: Vec<Job>, events: &mut Events) {
        let mut batches: Vec<(Arc<dyn Handler>, Vec<Message>)> = Vec::new();
        for Job { msg, handler } in ready {
            if handler.batch().is_none() {
                self.spawn(msg, handler, events);
                continue;
            }
            match batches.iter_mut().find(|(h, _)| Arc::ptr_eq(h, &handler)) {
                Some((_, msgs)) => msgs.push(msg),
                None => batches.push((handler, vec![msg])),
            }
        }
        for (handler, msgs) in batches {
            let conclude = self.concluder(&handler, events);
            let done: BatchDone = Arc::new(move |results: Vec<Handled>| {
                let batch = results
                    .into_iter()
                    .map(|(msg, outcome, took)| conclude.done(msg, outcome, took))
                    .collect();
                conclude.send(batch);
            });
            let runner = handler.batch().expect("a batch handler");
            runner.run_batch(msgs, tracing::Span::current(), done);
        }
    }

    /// Runs the handler on its own task, with the deadline, and with panics contained.
    fn spawn(&self, msg: Message, handler: Arc<dyn Handler>, events: &mut Events) {
        let conclude = self.concluder(&handler, events);
        let timeout = self.cfg.handler_timeout;
        let span = tracing::debug_span!(
            "message",
            message_id = %msg.id,
            deliveries = msg.deliveries,
            handler = handler.name(),
            trace_id = %trace_of(&msg)
        );
        tokio::spawn(
            async move {
                // Its turn first: waiting for it is neither the call's time nor an attempt.
                let _turn = handler.admit().await;
                let started = std::time::Instant::now();
                let call = tokio::time::timeout(timeout, handler.handle(&msg));
                let outcome = match AssertUnwindSafe(call).catch_unwind().await {
                    Ok(Ok(outcome)) => outcome,
                    Ok(Err(_)) => Outcome::Retry(timed_out(timeout)),
                    Err(_) => Outcome::Retry("handler panicked".into()),
                };
                let done = conclude.done(msg, outcome, started.elapsed());
                conclude.send(vec![done]);
            }
            .instrument(span),
        );
    }

    fn concluder(&self, handler: &Arc<dyn Handler>, events: &mut Events) -> Conclude {
        let name: Arc<str> = handler.name().into();
        Conclude {
            timer: events.timer(&name),
            guard: self.guards.get(&name),
            name,
            cfg: self.cfg.clone(),
            client: self.client.clone(),
            results: self.results.clone(),
        }
    }
}

/// What every call's result goes through, on whichever thread it ends.
struct Conclude {
    name: Arc<str>,
    timer: HandlerTimer,
    guard: Option<Arc<Guard>>,
    cfg: Arc<ConsumerSettings>,
    client: Client,
    results: Results,
}

impl Conclude {
    /// The call's duration observed and its outcome decided: replies only where the loop's client
    /// may publish.
    fn done(&self, msg: Message, outcome: Outcome, took: Duration) -> Done {
        self.timer.observe(took.as_secs_f64());
        let retry_after = match &outcome {
            Outcome::RetryAfter(_, after) => Some(*after),
            _ => None,
        };
        let mut held_until = None;
        if let Some(breaker) = self.guard.as_ref().and_then(|g| g.breaker.as_ref()) {
            match &outcome {
                // Escaped: a guest's text cannot forge log lines.
                Outcome::Retry(why) | Outcome::RetryAfter(why, _) => {
                    held_until =
                        breaker.record(&msg.id, Some(&crate::logging::escape(why.as_bytes(), 200)));
                    if held_until.is_some() {
                        return Done {
                            effect: Err(why.clone()),
                            msg,
                            handler: self.name.clone(),
                            held_until,
                            retry_after,
                        };
                    }
                }
                // A message its handler rejects says nothing about the handler's health.
                Outcome::Success(_) | Outcome::Reject(_) => {
                    breaker.record(&msg.id, None);
                }
            }
        }
        let may_publish = |stream: &str| self.client.authorize(Op::Publish, stream);
        let max = self.cfg.max_deliveries;
        let effect = machine::decide(outcome, msg.deliveries, max, may_publish);
        Done {
            msg,
            effect,
            handler: self.name.clone(),
            held_until,
            retry_after,
        }
    }

    fn send(&self, batch: Vec<Done>) {
        // The loop outlives its handler calls except at an immediate exit, when this is moot.
        let _ = self.results.send(batch);
    }
}

/// The retry reason of a call that ran out of time.
fn timed_out(timeout: Duration) -> String {
    format!(
        "handler timed out after {}",
        humantime::format_duration(timeout)
    )
}
