//! The model: the words every other module speaks, depending on nothing else in the crate.
//!
//! - [`id`]: stream entry ids as one ordered [`StreamId`].
//! - [`naming`]: stream names (ADAPT and legacy), their domain, group and consumer name rules.
//! - [`envelope`]: a message's flat fields, the envelope names (`_timestamp`, `_source`, `_trace_id`,
//!   `_cause`) and the JSON view.
//! - [`dead_letter`]: the `_dlq_*` fields of a dead letter, and how one is shown.
//! - [`limits`]: how large an entry read and a handler's replies may be ([`EntryLimit`], [`ReplyLimit`]).
//! - [`message`]: the handler seam — [`Message`] in, [`Outcome`] with [`Reply`]s out, the [`Handler`]
//!   trait.
//! - [`decided`]: a message whose fate is decided ([`Effect`], [`Finished`]) and what its commit
//!   reported ([`Committed`]).

pub mod dead_letter;
pub mod decided;
pub mod envelope;
pub mod id;
pub mod limits;
pub mod message;
pub mod naming;

pub use decided::{Committed, Effect, Finished};
pub use envelope::{Entry, Fields};
pub use id::StreamId;
pub use limits::{EntryLimit, ReplyLimit};
pub use message::{Handler, Message, Outcome, Reply, Sender};
pub use naming::Naming;
