//! The engine: one consumer group's read / claim / commit loop, and the routing inside it.
//!
//! - [`consumer`]: the loop — pending recovery, claims, dispatch with per-key ordering, batched commits,
//!   Redis trouble waited out with backoff.
//! - [`call`]: how the loop calls a handler — every kind through one path, results decided in one
//!   place.
//! - [`cursor`]: where the loop reads next — its own PEL, new entries, claims — and the group's
//!   position as far as it has read; unit-tested on its own.
//! - [`machine`]: the loop's decisions without I/O — what a delivered entry becomes, what a handler's
//!   outcome commits, what a commit's verdict or failure means; table-tested on its own.
//! - [`events`]: what the loop reports, one named event per outcome writing its log line, counters
//!   ([`Stats`] and the metrics) and health together.
//! - [`flight`]: the loop's bookkeeping without I/O — admission, in-flight limit, per-key order,
//!   commit batches and what their verdicts release; unit-tested on its own.
//! - [`guard`]: per-handler breakers and rate limits, shared by every loop of the daemon; the
//!   breaker's decisions unit-tested on their own.
//! - [`pace`]: how much the loop reads at once and holds in flight, adapted to backlog and handler
//!   speed within the configured caps; plain arithmetic, unit-tested on its own.
//! - [`router`]: which handler a message goes to (stream pattern + field predicates).
//! - [`settings`]: what one loop runs with ([`ConsumerSettings`], [`HandlerSpec`]).
//!
//! Depends on [`crate::model`], [`crate::auth`] and [`crate::client`] (plus the metrics, liveness and
//! shutdown plumbing); never on config or on the WASM runtime. Running many loops, reloading them and
//! stopping them is [`crate::daemon`]'s job.

pub mod call;
pub mod consumer;
pub mod cursor;
pub mod events;
pub mod flight;
pub mod guard;
pub mod machine;
pub mod pace;
pub mod relay;
pub mod router;
pub mod settings;

pub use consumer::Consumer;
pub use events::Stats;
#[cfg(feature = "fault-injection")]
pub use settings::FaultSpec;
pub use settings::{ConsumerSettings, HandlerSpec, RetrySchedule};
