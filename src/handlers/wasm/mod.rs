//! WASM handlers: one engine, every handler compiled and pre-linked at start, calls on worker threads.
//!
//! Owns the wasmtime side of the handler contract (docs/design.md, "Handlers"): the engine (component model, epoch interruption with one ticker
//! thread, a bounded wasm stack, the pooling allocator sized to what can be live at once), the on-disk
//! cache of compiled artifacts (keyed by the module's SHA-256 and the engine's compatibility hash, so a
//! restart does not recompile), the linkers (our `host` and `state` interfaces, WASI preview 2 with every
//! capability denied, and `wasi:http` reaching only what `allowed_outbound_hosts` grants — a component
//! importing anything else is refused with the import's name), and the worker threads that run calls
//! with the synchronous API (replies and changes of state are buffered, so only `state.get` waits for
//! Redis, holding its worker for one GET; the sync API measured faster than the async one). Handlers
//! granted outbound HTTP run their calls as tasks instead ([`runtime`]). One call's sandbox is
//! [`sandbox`]'s business; which handler a message goes to is the router's.
//!
//! - [`runtime`]: the engine, loading handlers, and [`WasmHandler`] itself.
//! - [`cache`]: compiled artifacts on disk, trusted only when they are provably this process's own.
//! - [`sandbox`]: one call's store — limits, deadline, the `host` interface, buffered replies.
//! - [`outbound`]: outbound HTTP for handlers granted it — the allow-list, keys, limits, metrics.
//! - [`output`]: the guest's stdout/stderr, captured for the log.
//! - [`crash`]: a guest's panic or uncaught exception in one line, for the reason of its trap.
//! - [`pool`]: the worker threads.
//! - [`bindings`]: the host side generated from `handlers/wit`.

pub mod bindings;
mod cache;
mod crash;
pub mod outbound;
mod output;
mod pool;
pub mod runtime;
pub mod sandbox;

pub use outbound::{Origin, Outbound};
pub use runtime::{Runtime, RuntimeSettings, TICK, WasmHandler, WasmSpec, default_cache_dir};
