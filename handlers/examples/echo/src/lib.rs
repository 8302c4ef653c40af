//! `echo`: replies to the stream named in the message's `_reply_to` field — or, without one, to the
//! handler's configured `reply_to` — with the message's own fields and `in_reply_to` = its id. A
//! message with `retry_after_ms` asks to be retried that much later instead (`retry-after`); one with
//! `_delay_ms` is answered that much after its commit (a delayed reply); one with `_count` adds one to
//! that key of its state and replies with the new `count`.

use redstream_guest::{Guest, HandlerError, Message, PublishError, Reply, export_handler, state};

struct Echo;

impl Guest for Echo {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        if let Some(after) = msg.text("retry_after_ms") {
            let ms: u64 = Some(after)
                .filter(|a| a.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| HandlerError::Reject(format!("retry_after_ms is not a number: {after}")))?;
            let why = format!("asked to be retried in {ms} ms");
            return Err(HandlerError::retry_after(std::time::Duration::from_millis(ms), why));
        }
        let to = match msg.text("_reply_to") {
            Some(to) => to.to_owned(),
            None => redstream_guest::config("reply_to")
                .ok_or_else(|| HandlerError::Reject("no _reply_to field and no reply_to configured".into()))?,
        };
        let mut reply = Reply::new().text("in_reply_to", &msg.id);
        for (name, value) in msg.user_fields() {
            reply = reply.bytes(name, value);
        }
        if let Some(key) = msg.text("_count") {
            let before = state::get_text(key)?.filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()));
            let n = before.and_then(|t| t.parse::<u64>().ok()).unwrap_or(0) + 1;
            state::set_text(key, &n.to_string(), None)?;
            reply = reply.text("count", &n.to_string());
        }
        let sent = match msg.text("_delay_ms") {
            Some(delay) => {
                let ms: u64 = Some(delay)
                    .filter(|d| d.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|d| d.parse().ok())
                    .ok_or_else(|| HandlerError::Reject(format!("_delay_ms is not a number: {delay}")))?;
                reply.send_after(&to, std::time::Duration::from_millis(ms))
            }
            None => reply.send(&to),
        };
        sent.map_err(|e| match e {
            // The sender named a stream we may not write: that message will never work.
            PublishError::InvalidStream(why) | PublishError::Denied(why) | PublishError::TooLarge(why) => {
                HandlerError::Reject(format!("cannot reply to {to}: {why}"))
            }
        })
    }
}

export_handler!(Echo);
