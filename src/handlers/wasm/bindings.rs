//! The host side of the WIT contract in `handlers/wit` (package `redstream:handler`), generated.

wasmtime::component::bindgen!({
    path: "handlers/wit",
    world: "handler",
});
