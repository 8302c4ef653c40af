//! A decided message: what its commit is to do ([`Effect`]), the message with its effect
//! ([`Finished`]), and what the commit reported for it ([`Committed`]).
//!
//! The engine decides these ([`crate::engine::machine`]); the client only encodes a [`Finished`] into
//! the commit script's arguments and decodes the script's reply into [`Committed`]s.

use std::sync::Arc;

use super::envelope::Fields;
use super::limits::Size;
use super::message::{Message, Reply};

/// What committing a message does.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Publish these replies (maybe none) and ack.
    Replies(Vec<Reply>),
    /// Copy the message to the dead-letter stream with this reason, and ack.
    DeadLetter(String),
    /// The entry is over the consumer's `[limits]` (its fields were never kept): dead-letter it by
    /// reference — `_dlq_reason = too_large`, `_dlq_size`, `_dlq_fields_omitted` — and ack.
    TooLarge(Size),
    /// The entry no longer exists (deleted or trimmed while pending): just ack.
    Vanished,
}

/// A message whose fate is decided, waiting to be committed.
#[derive(Clone, Debug)]
pub struct Finished {
    pub msg: Message,
    pub effect: Effect,
    /// The handler that decided, for `_dlq_handler`.
    pub handler: Arc<str>,
}

/// How the commit script reports each message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Committed {
    /// Replies written and acked.
    Yes,
    /// Not pending for this consumer any more (acked, claimed by another, or the group was lost):
    /// nothing written.
    NotOurs,
    /// One of the message's targets refused it — a check before the first write (Redis's ACL, a key
    /// of another type, an entry too large to write) or Redis refusing the write to that key itself
    /// (its ids exhausted) — so nothing of it was written and it is still pending. The reason names
    /// the key and the problem. It is about this message: the rest of the batch went on.
    Refused(String),
    /// Redis refused the write for a reason of the whole server (out of memory, read-only): nothing of
    /// the message was written, it is still pending, and the batch's later writers were not attempted.
    Failed(String),
    /// Not attempted because an earlier write of the batch failed: still pending, nothing written.
    NotTried,
    /// A signed message whose signature already took effect with another entry (named here): a
    /// copy of a signed message. Nothing of it was written; it is still pending.
    Replayed(String),
    /// Some of its writes were made, then one failed. It was acked all the same, so that no retry
    /// can write the first ones twice; its effects are incomplete.
    Partial(String),
    /// A state key its handler read and then wrote on changed since (another message's commit):
    /// nothing of it was written, it is still pending and ours — run it again.
    Conflict(String),
}

impl Finished {
    /// Whether its commit records the use of a signature (a signed message's first write).
    fn marks_signature(&self) -> bool {
        !matches!(self.effect, Effect::Vanished)
            && self.msg.sender.as_ref().is_some_and(|s| s.once.is_some())
    }

    /// The writes of its effect, without a signature's marker.
    pub fn writes(&self) -> usize {
        match &self.effect {
            Effect::Replies(r) => r.len(),
            Effect::DeadLetter(_) | Effect::TooLarge(_) => 1,
            Effect::Vanished => 0,
        }
    }

    /// Whether committing it writes anything (replies, a dead letter, a signature's marker).
    pub fn writes_anything(&self) -> bool {
        self.writes() > 0 || self.marks_signature()
    }

    /// What committing it weighs: its writes, and about the bytes it sends.
    pub fn weight(&self) -> (usize, usize) {
        let fields = |fields: &Fields| {
            fields
                .iter()
                .map(|(n, v)| n.len() + v.len() + 16)
                .sum::<usize>()
        };
        let bytes = match &self.effect {
            Effect::Replies(r) => r.iter().map(|r| fields(&r.fields) + 128).sum(),
            Effect::DeadLetter(_) => fields(&self.msg.fields) + 256,
            Effect::TooLarge(_) => 256,
            Effect::Vanished => 32,
        };
        // A signed message's use marker is one more (small) write.
        let marker = usize::from(self.marks_signature());
        (self.writes() + marker, bytes + 96 * marker)
    }
}
