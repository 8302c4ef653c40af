//! The daemon: everything that runs around the consumer loops.
//!
//! - [`supervisor`]: start-up, the main loop (stop signals, reloads, loops that end), the stop sequence.
//! - [`loops`]: the set of consumer loops, one supervised task per configured group.
//! - [`reload`]: a new config applied to the running loops, or refused.
//! - [`services`]: what runs beside the loops, as one list of named tasks stopped together.
//! - [`systemd`]: the watchdog, STATUS and the health gauges.
//! - [`identity`]: the daemon's identity token renewed, or its lapse reported.
//! - [`error`]: how the daemon stopped, or why it could not run.
//! - [`prepare`]: handlers compiled and routes resolved before anything runs.
//! - [`control`]: the heartbeat and the signed control stream.
//! - [`exchange`]: tokens for API keys and message signatures for token holders, on a unix socket.
//! - [`retention`]: periodic trimming that never passes what a group still needs.
//! - [`watch`]: `wasm.watch`, a reload when a handler file or the config changes.
//!
//! Depends on everything below it — config, engine, handlers, client — and nothing depends on it but the
//! CLI.

pub mod control;
pub mod error;
pub mod exchange;
pub mod identity;
pub mod loops;
pub mod positions;
mod prepare;
pub mod reload;
pub mod retention;
pub mod services;
pub mod supervisor;
pub mod systemd;
pub mod watch;

pub use control::Command;
pub use error::{RunError, Stopped};
pub use prepare::{Prepared, prepare, prepare_with};
pub use supervisor::run;
