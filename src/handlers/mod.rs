//! Handler implementations: the built-ins and the WASM runtime.
//!
//! - [`builtin`]: `drop`, `forward` and (in test builds) `faults`.
//! - [`wasm`]: sandboxed WebAssembly components — the wasmtime engine, artifact cache, calls on worker
//!   threads.
//!
//! Both implement [`crate::model::Handler`] and depend on the model (and on [`crate::auth`] for the
//! roles a handler publishes with); the engine calls them without knowing which is which.

pub mod builtin;
pub mod wasm;
