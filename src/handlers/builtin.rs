//! The built-in handlers, usable from config without WASM: `drop` (ack only), `forward` (copy the
//! message to another stream) and, in test builds, `faults`.
//!
//! Owns only these implementations of [`Handler`]; the seam itself is [`crate::model::message`]'s.

use crate::model::message::{BoxFuture, Handler, Message, Outcome, Reply, ReplyKind};

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
            kind: ReplyKind::Now,
        };
        Box::pin(async move { Outcome::Success(vec![reply]) })
    }
}

/// `faults`: a handler for fault tests, compiled only with the `fault-injection` feature. It fails,
/// stalls and replies on command, so the tests can drive the real binary through every outcome.
#[cfg(feature = "fault-injection")]
pub struct Faults {
    /// "faults", or its `[[handlers]]` name.
    pub name: String,
    /// Publish one reply per message here (with the message's fields), or to the message's own
    /// `_reply_to` when it names one.
    pub reply_to: Option<String>,
    /// Messages carrying this field always fail (a poison message).
    pub fail_field: Option<String>,
    /// Fail while the delivery count is at most this.
    pub fail_deliveries: u64,
    /// Fail every Nth invocation (counted across messages).
    pub fail_every: u64,
    /// Take this long per message (and a message's own `faults_sleep_ms` more).
    pub sleep: std::time::Duration,
    /// Fail while this file exists: a downstream outage the test switches on and off (each call it
    /// fails is written to the file's `.calls` sibling).
    pub fail_while_file: Option<std::path::PathBuf>,
    pub calls: std::sync::atomic::AtomicU64,
}

#[cfg(feature = "fault-injection")]
impl Handler for Faults {
    fn name(&self) -> &str {
        &self.name
    }

    fn handle<'a>(&'a self, msg: &'a Message) -> BoxFuture<'a, Outcome> {
        use std::sync::atomic::Ordering;
        Box::pin(async move {
            let call = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
            let started = crate::model::envelope::now_us();
            // A message may ask to be seen in the handler (`faults_announce`): tests that must act
            // while a call runs wait for this line, not for the entry to be pending in Redis (which it
            // is as soon as Redis answered the read, before the loop has it).
            if msg.fields.get("faults_announce").is_some() {
                tracing::info!(message_id = %msg.id, "faults: handling the message");
            }
            if !self.sleep.is_zero() {
                tokio::time::sleep(self.sleep).await;
            }
            // A message may ask to be slow itself (`faults_sleep_ms`), so tests can mix slow and fast.
            if let Some(ms) = msg
                .fields
                .get_str("faults_sleep_ms")
                .and_then(|v| v.parse().ok())
            {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            if let Some(field) = &self.fail_field
                && msg.fields.get(field).is_some()
            {
                return Outcome::Retry(format!("poison: field {field} present"));
            }
            if let Some(switch) = &self.fail_while_file
                && switch.exists()
            {
                // Each call failed by the outage, for the tests to count and time: `<id> <deliveries>
                // <unix ms>` lines in the switch's `.calls` file beside it.
                use std::io::Write as _;
                if let Ok(mut calls) = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(switch.with_extension("calls"))
                {
                    // One write per line: calls of other messages append at the same time.
                    let ms = crate::model::envelope::now_us() / 1000;
                    let line = format!("{} {} {ms}\n", msg.id, msg.deliveries);
                    let _ = calls.write_all(line.as_bytes());
                }
                return Outcome::Retry(format!("outage: {} exists", switch.display()));
            }
            if msg.deliveries <= self.fail_deliveries {
                return Outcome::Retry(format!("transient: delivery {}", msg.deliveries));
            }
            if self.fail_every > 0 && call.is_multiple_of(self.fail_every) {
                return Outcome::Retry(format!("transient: call {call}"));
            }
            // A message may name its own reply stream, as the echo example lets it.
            let to = match msg.fields.get_str("_reply_to") {
                Some(to) => Some(to.to_owned()),
                None => self.reply_to.clone(),
            };
            // A message may ask for its reply to be delayed (`faults_delay_ms`), as a handler's
            // `publish-delayed` does.
            let due = msg
                .fields
                .get_str("faults_delay_ms")
                .and_then(|v| v.parse().ok())
                .map_or(ReplyKind::Now, |ms| {
                    ReplyKind::Delayed(crate::model::message::Due::In(ms))
                });
            let replies = to
                .iter()
                .map(|to| {
                    let mut fields = msg.fields.clone();
                    // When the call started, so tests can check ordering and parallelism.
                    fields.set("faults_started_us", started.to_string());
                    Reply {
                        stream: to.clone(),
                        fields,
                        kind: due,
                    }
                })
                .collect();
            Outcome::Success(replies)
        })
    }
}
