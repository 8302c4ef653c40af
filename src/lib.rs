//! RedStream turns Redis Streams into work: it reads consumer groups declared in config, routes each
//! message to a handler, and commits the handler's replies together with the ack — every Redis operation
//! checked against the JWT-verified roles of whoever performs it.
//!
//! This crate is the library the `redstream` binary is built from; `src/main.rs` only calls [`cli::main`].
//! DESIGN.md in the README's terms: config → validated settings → authorized client → (engine, handlers).
//!
//! # Layout
//! - [`naming`]: stream names (ADAPT `nova:{domain}:{entity}:{function}` and legacy `*.direct`), their
//!   domain, and group/consumer name rules.
//! - [`envelope`]: the wire format of a message — flat fields, `_timestamp`/`_source`/`_trace_id`, JSON view.
//! - [`auth`]: roles and the permission rule; [`auth::jwt`] token issue/verify with key rotation;
//!   [`auth::apikey`] hashed API keys.
//! - [`config`]: figment layers (defaults → TOML → `REDSTREAM_*` env), secrets, validation into
//!   [`config::Settings`] with every problem reported by key path.
//! - [`conn`]: Redis connections (TLS, ACL user, timeouts, reconnect) and error classification.
//! - [`reply`]: decoding stream replies from raw RESP values.
//! - [`wire`]: the group reader's plain RESP connection; read replies decoded straight into entries.
//! - [`client`]: the authorized client — every stream operation, checked before it is sent.
//! - [`error`]: the client's typed [`Error`].
//! - [`dlq`]: the dead-letter format, listing and replay.
//! - [`engine`]: the daemon — supervisor, consumer loops, the handler seam, atomic commits.
//! - [`wasm`]: WASM handlers — the wasmtime engine, artifact cache, sandboxed calls on worker threads.
//! - [`metrics`]: Prometheus metrics and their loopback HTTP endpoint.
//! - [`notify`]: systemd's notify protocol, and the loops' liveness behind the watchdog.
//! - [`shutdown`]: OS signals as one enum, and the shutdown fan-out.
//! - [`backoff`]: capped exponential backoff with jitter.
//! - [`logging`]: journald fields under systemd, stderr otherwise, an optional rolling file.
//! - [`cli`]: the `redstream` command line and its exit codes.

pub mod auth;
pub mod backoff;
pub mod cli;
pub mod client;
pub mod config;
pub mod conn;
pub mod dlq;
pub mod engine;
pub mod envelope;
pub mod error;
pub mod logging;
pub mod metrics;
pub mod naming;
pub mod notify;
pub mod reply;
pub mod shutdown;
pub mod wasm;
pub mod wire;

pub use error::{Error, Result};
