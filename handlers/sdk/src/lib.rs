//! Write RedStream handlers in Rust.
//!
//! A handler is a type implementing [`Guest`], exported with [`export_handler!`]:
//!
//! ```ignore
//! use redstream_guest::{export_handler, Guest, HandlerError, Message, Reply};
//!
//! #[derive(serde::Deserialize)]
//! struct Task { id: u64, title: String }
//!
//! struct Hello;
//!
//! impl Guest for Hello {
//!     fn handle(msg: Message) -> Result<(), HandlerError> {
//!         let task: Task = msg.json("task")?;          // missing or not a Task: rejected
//!         let to = redstream_guest::config("reply_to")
//!             .ok_or_else(|| HandlerError::reject("configure reply_to"))?;
//!         Reply::new()
//!             .text("greeting", &format!("task {} is {}", task.id, task.title))
//!             .send(&to)?;                              // refused: rejected, naming why
//!         Ok(())
//!     }
//! }
//!
//! export_handler!(Hello);
//! ```
//!
//! What `handle` returns decides what happens to the message: `Ok(())` commits the replies with the
//! ack; [`HandlerError::Retry`] leaves it pending for another try (up to the consumer's
//! max_deliveries), [`HandlerError::retry_after`] for one at a time the handler chooses;
//! [`HandlerError::Reject`] dead-letters it now. A panic is a trap, counted as a retry.
//!
//! Build with `cargo build --release --target wasm32-wasip2` (or `redstream handler build`); the
//! `.wasm` file is the component to drop into RedStream's config. Replies are only buffered by `send`:
//! RedStream writes them, atomically with the ack of the message, once `handle` returns `Ok`.

use std::fmt;

#[cfg(feature = "http")]
pub mod http;

/// The generated bindings of `handlers/wit`.
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "handler",
        pub_export_macro: true,
        export_macro_name: "export_handler",
        default_bindings_module: "redstream_guest::bindings",
    });
}

pub use bindings::redstream::handler::host::{config, log, publish, publish_delayed};
pub use bindings::redstream::handler::types::{Due, HandlerError, Level, Message, PublishError, Sender};
pub use bindings::{Guest, export_handler};

/// Why a field could not be read; `?` turns it into a [`HandlerError::Reject`] (a message that lacks
/// what the handler needs will not get it by being retried).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldError {
    Missing(String),
    NotText(String),
    BadJson { field: String, error: String },
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldError::Missing(name) => write!(f, "no `{name}` field"),
            FieldError::NotText(name) => write!(f, "field `{name}` is not UTF-8 text"),
            FieldError::BadJson { field, error } => write!(f, "field `{field}`: {error}"),
        }
    }
}

impl std::error::Error for FieldError {}

impl From<FieldError> for HandlerError {
    fn from(e: FieldError) -> Self {
        HandlerError::Reject(e.to_string())
    }
}

/// A refused publish is a bug in the handler or its config (a wrong stream, a missing role, too much):
/// retrying will not fix it, so `?` rejects the message, naming why.
impl From<PublishError> for HandlerError {
    fn from(e: PublishError) -> Self {
        let why = match e {
            PublishError::InvalidStream(why) => format!("invalid stream: {why}"),
            PublishError::Denied(why) => format!("denied: {why}"),
            PublishError::TooLarge(why) => format!("too large: {why}"),
        };
        HandlerError::Reject(format!("reply refused: {why}"))
    }
}

impl HandlerError {
    /// Try again later (counted against the consumer's max_deliveries).
    pub fn retry(why: impl fmt::Display) -> Self {
        HandlerError::Retry(why.to_string())
    }

    /// Try again `after` from now, instead of at the consumer's next retry step (counted against
    /// max_deliveries like any retry). Return it: `Err(HandlerError::retry_after(Duration::from_secs(30),
    /// "rate limited"))`.
    pub fn retry_after(after: std::time::Duration, why: impl fmt::Display) -> Self {
        bindings::redstream::handler::host::retry_after(u64::try_from(after.as_millis()).unwrap_or(u64::MAX));
        HandlerError::Retry(why.to_string())
    }

    /// It will never work: dead-letter the message now.
    pub fn reject(why: impl fmt::Display) -> Self {
        HandlerError::Reject(why.to_string())
    }
}

impl Message {
    /// The raw value of the first field called `name`.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
    }

    /// The value of `name`, if present and UTF-8.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.field(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The value of `name`, or why not.
    pub fn require(&self, name: &str) -> Result<&[u8], FieldError> {
        self.field(name)
            .ok_or_else(|| FieldError::Missing(name.to_owned()))
    }

    /// The value of `name` as text, or why not.
    pub fn require_text(&self, name: &str) -> Result<&str, FieldError> {
        std::str::from_utf8(self.require(name)?).map_err(|_| FieldError::NotText(name.to_owned()))
    }

    /// The value of `name` parsed as JSON into `T` (publishers store objects and arrays as JSON text).
    #[cfg(feature = "json")]
    pub fn json<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<T, FieldError> {
        serde_json::from_slice(self.require(name)?).map_err(|e| FieldError::BadJson {
            field: name.to_owned(),
            error: e.to_string(),
        })
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

    /// A field holding `value` as JSON text, as publishers write objects.
    #[cfg(feature = "json")]
    pub fn json<T: serde::Serialize + ?Sized>(mut self, name: &str, value: &T) -> Self {
        // Serializing plain data into memory cannot fail; a map with non-string keys would, and is
        // stored as `null` rather than panicking.
        let text = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
        self.fields.push((name.to_owned(), text));
        self
    }

    /// Buffers the reply for `stream`; RedStream checks the handler's roles now and writes it at commit.
    pub fn send(self, stream: &str) -> Result<(), PublishError> {
        publish(stream, &self.fields)
    }

    /// Like [`Reply::send`], but the reply appears on `stream` `after` the message's commit (at most a
    /// year): committed with the ack, held in Redis, moved to its stream at its time, once.
    pub fn send_after(self, stream: &str, after: std::time::Duration) -> Result<(), PublishError> {
        let ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        publish_delayed(stream, &self.fields, Due::After(ms))
    }

    /// Like [`Reply::send_after`], at a time given in milliseconds since the Unix epoch (a time past
    /// is due at once).
    pub fn send_at(self, stream: &str, unix_ms: u64) -> Result<(), PublishError> {
        publish_delayed(stream, &self.fields, Due::At(unix_ms))
    }
}

/// The handler's own state: small values under keys of the namespace its `[[handlers]]` entry names
/// (`state = "nova:memory:router:state"`). [`state::get`] sees the call's own earlier writes;
/// [`state::set`] and [`state::remove`] are buffered like replies and committed with them, atomically
/// with the ack — a message whose commit did not happen changed nothing, one that ran twice changed
/// the state once. `?` on a [`state::StateError`] retries the message when the value could not be
/// read, and rejects it otherwise.
pub mod state {
    pub use crate::bindings::redstream::handler::state::{StateError, get, remove, set};

    /// The value of `key` as text (none when absent or not UTF-8).
    pub fn get_text(key: &str) -> Result<Option<String>, StateError> {
        Ok(get(key)?.and_then(|v| String::from_utf8(v).ok()))
    }

    /// Sets `key` to `value`, kept `ttl` after the commit when given.
    pub fn set_text(key: &str, value: &str, ttl: Option<std::time::Duration>) -> Result<(), StateError> {
        set(key, value.as_bytes(), ttl.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)))
    }
}

impl From<state::StateError> for HandlerError {
    fn from(e: state::StateError) -> Self {
        match e {
            state::StateError::Unavailable(why) => HandlerError::Retry(format!("state unavailable: {why}")),
            state::StateError::NotConfigured(why) => HandlerError::Reject(format!("no state: {why}")),
            state::StateError::TooLarge(why) => HandlerError::Reject(format!("state refused: {why}")),
        }
    }
}

/// Logs at info level through RedStream's log.
pub fn info(text: &str) {
    log(Level::Info, text);
}
