//! RedStream turns Redis Streams into work: it reads consumer groups declared in config, routes each
//! message to a handler, and commits the handler's replies together with the ack — every Redis operation
//! checked against the JWT-verified roles of whoever performs it.
//!
//! This crate is the library the `redstream` binary is built from; `src/main.rs` only calls [`cli::main`].
//! docs/design.md describes the data flow, the delivery semantics, the commit script and the identity
//! model that the code below implements.
//!
//! # Layout
//!
//! Dependencies point one way: each module uses only the ones listed below it (`scripts/modgraph`
//! checks that there are no cycles).
//!
//! - [`cli`]: the `redstream` command line and its exit codes.
//! - [`daemon`]: the supervisor of the consumer loops, reload, heartbeat/control, retention.
//! - [`config`]: figment layers (defaults → TOML → `REDSTREAM_*` env), secrets, validation into
//!   [`config::Settings`] with every problem reported by key path; builds the settings of every layer.
//! - [`engine`]: one group's read / claim / commit loop and its router.
//! - [`handlers`]: the built-in handlers and the WASM runtime (wasmtime sandbox, worker threads).
//! - [`client`]: the Redis layer behind the authorized client — connections, decoding, the fast group
//!   reader, the commit script, dead letters.
//! - [`auth`]: roles, identities and the permission rule; JWTs with key rotation; hashed API keys.
//! - [`model`]: stream ids, names, the envelope, and the handler seam (message in, outcome out).
//! - Plumbing used from any layer: [`metrics`] (Prometheus), [`notify`] (the systemd notify protocol),
//!   [`health`] (loop liveness behind the watchdog, degraded conditions), [`shutdown`] (signals as one
//!   enum, the stop fan-out), [`backoff`], [`logging`], [`http`] (one HTTP/1.1 connection served until stop).

pub mod auth;
pub mod backoff;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod handlers;
pub mod health;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod shutdown;
