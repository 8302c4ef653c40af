//! The daemon: everything that runs around the consumer loops.
//!
//! - [`supervisor`]: start-up, one supervised loop per configured group, reload, and the stop sequence.
//! - [`prepare`]: handlers compiled and routes resolved before anything runs.
//! - [`control`]: the heartbeat and the signed control stream.
//! - [`exchange`]: tokens for API keys and message signatures for token holders, on a unix socket.
//! - [`retention`]: periodic trimming that never passes what a group still needs.
//! - [`watch`]: `wasm.watch`, a reload when a handler file or the config changes.
//!
//! Depends on everything below it — config, engine, handlers, client — and nothing depends on it but the
//! CLI.

pub mod control;
pub mod exchange;
pub mod prepare;
pub mod retention;
pub mod supervisor;
pub mod watch;

pub use control::Command;
pub use prepare::{Prepared, prepare, prepare_with};
pub use supervisor::{RunError, Stopped, run};
