//! The Redis layer, whose only public face is the authorized client.
//!
//! Every Redis command RedStream sends goes through a [`Client`], which checks the stream name and the
//! caller's roles ([`crate::auth::authorize`]) before anything reaches Redis. Inside:
//! - [`authorized`]: [`Client`], one method per stream operation.
//! - [`conn`]: connections (TLS, ACL user, timeouts, reconnect), timing, and error classification.
//! - [`error`]: the typed [`Error`] callers branch on.
//! - [`decode`]: entries and other replies decoded from raw RESP values.
//! - [`info`]: what XPENDING, XINFO and XAUTOCLAIM report, typed.
//! - [`reader`]: a consumer's group reads on a connection of its own.
//! - [`recover`]: the script re-reading a consumer's own pending entries without counting a delivery.
//! - [`wire`]: the plain RESP connection that group reads use without TLS, decoded straight into entries.
//! - [`restore`]: where a group Redis no longer has starts again, and whether Redis lost data.
//! - [`retention`]: trimming that spares what groups still need, computed inside Redis.
//! - [`commit`]: the commit script — replies and the ack in one atomic step.
//! - [`slot`]: Redis Cluster hash slots: which keys share a slot, which master owns one.
//! - [`outbox`]: replies across slots — the outbox written with the ack, and the relay's scripts.
//! - [`rate`]: the script handing out a handler's rate-limit permits, shared by every daemon.
//!
//! Depends on [`crate::model`], [`crate::auth`] and [`crate::metrics`] only.

pub mod authorized;
pub mod commit;
pub(crate) mod conn;
pub mod decode;
pub mod delayed;
pub mod error;
pub mod info;
pub mod outbox;
pub mod rate;
pub mod reader;
pub mod recover;
pub mod restore;
pub mod retention;
pub mod slot;
pub(crate) mod wire;

pub use authorized::{Client, PendingQuery, PublishOptions, ReadOptions};
pub use conn::{RedisSettings, TlsFiles, redact_url, wait_ready};
pub use error::{Error, Result};
pub use info::{AutoClaimed, ConsumerInfo, GroupInfo, PendingEntry, PendingSummary, StreamInfo};
pub use reader::{GroupReader, ReadFrom, Round};
pub use restore::{Lost, Restored};
