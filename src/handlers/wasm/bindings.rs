//! The host side of the WIT contract in `handlers/wit` (package `redstream:handler`), generated.
//!
//! Twice: the synchronous world the worker threads call (every import a plain function), and in
//! [`asynchronous`] the same world for handlers whose calls run as tasks (granted outbound HTTP):
//! there `handle` is awaited and `state.get` awaits Redis; the `types` and `host` interfaces are
//! the synchronous ones (plain host functions serve an async call too).

wasmtime::component::bindgen!({
    path: "handlers/wit",
    world: "handler",
});

pub mod asynchronous {
    wasmtime::component::bindgen!({
        path: "handlers/wit",
        world: "handler",
        imports: { "redstream:handler/state.get": async },
        exports: { default: async },
        with: {
            "redstream:handler/types": crate::handlers::wasm::bindings::redstream::handler::types,
            "redstream:handler/host": crate::handlers::wasm::bindings::redstream::handler::host,
        },
    });
}
