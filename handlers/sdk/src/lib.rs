//! Write RedStream handlers in Rust.
//!
//! A handler is a type implementing [`Guest`], exported with [`export_handler!`]:
//!
//! ```ignore
//! use redstream_guest::{export_handler, Guest, HandlerError, Message, Reply};
//!
//! struct Hello;
//!
//! impl Guest for Hello {
//!     fn handle(msg: Message) -> Result<(), HandlerError> {
//!         let name = msg.text("name").unwrap_or("world");
//!         Reply::new()
//!             .text("greeting", &format!("hello, {name}"))
//!             .send("nova:task:hello:replies")
//!             .map_err(|e| HandlerError::Retry(format!("{e:?}")))
//!     }
//! }
//!
//! export_handler!(Hello);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the `.wasm` file is the component to drop
//! into RedStream's config. Replies are only buffered by `send`: RedStream writes them, atomically with
//! the ack of the message, once `handle` returns `Ok`.

/// The generated bindings of `handlers/wit`.
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "handler",
        pub_export_macro: true,
        export_macro_name: "export_handler",
        default_bindings_module: "redstream_guest::bindings",
    });
}

pub use bindings::redstream::handler::host::{config, log, publish};
pub use bindings::redstream::handler::types::{HandlerError, Level, Message, PublishError, Sender};
pub use bindings::{Guest, export_handler};

impl Message {
    /// The raw value of the first field called `name`.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
    }

    /// The value of `name`, if present and UTF-8.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.field(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Fields whose names do not start with `_` (the envelope and routing fields do).
    pub fn user_fields(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.fields
            .iter()
            .filter(|(n, _)| !n.starts_with('_'))
            .map(|(n, v)| (n.as_str(), v.as_slice()))
    }
}

/// A reply under construction.
#[derive(Clone, Debug, Default)]
pub struct Reply {
    fields: Vec<(String, Vec<u8>)>,
}

impl Reply {
    pub fn new() -> Self {
        Reply::default()
    }

    pub fn text(mut self, name: &str, value: &str) -> Self {
        self.fields.push((name.to_owned(), value.as_bytes().to_vec()));
        self
    }

    pub fn bytes(mut self, name: &str, value: &[u8]) -> Self {
        self.fields.push((name.to_owned(), value.to_vec()));
        self
    }

    /// Buffers the reply for `stream`; RedStream checks the handler's roles now and writes it at commit.
    pub fn send(self, stream: &str) -> Result<(), PublishError> {
        publish(stream, &self.fields)
    }
}

/// Logs at info level through RedStream's log.
pub fn info(text: &str) {
    log(Level::Info, text);
}
