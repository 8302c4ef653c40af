//! {{name}}: a RedStream handler. `redstream handler build` builds it, `redstream handler test` runs
//! cases.jsonl against it, handler.toml deploys it.

use redstream_guest::{Guest, HandlerError, Message, Reply, export_handler};

struct Handler;

impl Guest for Handler {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        // A missing field rejects the message (dead-lettered now: retrying will not add it).
        // Typed JSON: `let task: Task = msg.json("task")?;` with `#[derive(serde::Deserialize)]`.
        let who = msg.require_text("greet")?;
        let to = redstream_guest::config("reply_to")
            .ok_or_else(|| HandlerError::reject("configure reply_to for this handler"))?;
        // Buffered now, written with the ack if this returns Ok; a refused publish rejects.
        Reply::new()
            .text("greeting", &format!("hello, {who}"))
            .send(&to)?;
        // Something temporarily wrong? `return Err(HandlerError::retry("why"))`: tried again later.
        Ok(())
    }
}

export_handler!(Handler);
