//! A RedStream handler template. Copy this crate, rename it, and replace `handle`.
//!
//! Build:   cargo build --release --target wasm32-wasip2
//! Try it:  redstream handler run target/wasm32-wasip2/release/<name>.wasm --message '{"greet":"you"}'
//! Deploy:  add a [[handlers]] entry with its file and roles, and a route or consumer that uses it.

use redstream_guest::{Guest, HandlerError, Message, Reply, export_handler};

struct Handler;

impl Guest for Handler {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        // A message nobody can ever handle: reject it (it goes to the dead-letter stream now).
        let Some(who) = msg.text("greet") else {
            return Err(HandlerError::Reject("no `greet` field".into()));
        };
        // Where to reply: the `reply_to` value of this handler's config table.
        let Some(to) = redstream_guest::config("reply_to") else {
            return Err(HandlerError::Reject("configure reply_to for this handler".into()));
        };
        // A reply is buffered; it is written only if this function returns Ok. A refused publish
        // (wrong stream, missing role) is a bug in config or code: retrying will not fix it.
        Reply::new()
            .text("greeting", &format!("hello, {who}"))
            .send(&to)
            .map_err(|e| HandlerError::Reject(format!("reply refused: {e:?}")))
    }
}

export_handler!(Handler);
