//! The engine: one consumer group's read / claim / commit loop, and the routing inside it.
//!
//! - [`consumer`]: the loop — pending recovery, claims, dispatch with per-key ordering, batched commits,
//!   Redis trouble waited out with backoff.
//! - [`flight`]: the loop's bookkeeping without I/O — admission, in-flight limit, per-key order,
//!   commit batches and what their verdicts release; unit-tested on its own.
//! - [`pace`]: how much the loop reads at once and holds in flight, adapted to backlog and handler
//!   speed within the configured caps; plain arithmetic, unit-tested on its own.
//! - [`router`]: which handler a message goes to (stream pattern + field predicates).
//! - [`settings`]: what one loop runs with ([`ConsumerSettings`], [`HandlerSpec`]).
//!
//! Depends on [`crate::model`], [`crate::auth`] and [`crate::client`] (plus the metrics, liveness and
//! shutdown plumbing); never on config or on the WASM runtime. Running many loops, reloading them and
//! stopping them is [`crate::daemon`]'s job.

pub mod consumer;
pub mod flight;
pub mod pace;
pub mod relay;
pub mod router;
pub mod settings;

pub use consumer::{Consumer, Stats};
#[cfg(feature = "fault-injection")]
pub use settings::FaultSpec;
pub use settings::{ConsumerSettings, HandlerSpec};
