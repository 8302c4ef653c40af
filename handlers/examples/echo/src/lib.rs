//! `echo`: replies to the stream named in the message's `_reply_to` field — or, without one, to the
//! handler's configured `reply_to` — with the message's own fields and `in_reply_to` = its id.

use redstream_guest::{Guest, HandlerError, Message, PublishError, Reply, export_handler};

struct Echo;

impl Guest for Echo {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        let to = match msg.text("_reply_to") {
            Some(to) => to.to_owned(),
            None => redstream_guest::config("reply_to")
                .ok_or_else(|| HandlerError::Reject("no _reply_to field and no reply_to configured".into()))?,
        };
        let mut reply = Reply::new().text("in_reply_to", &msg.id);
        for (name, value) in msg.user_fields() {
            reply = reply.bytes(name, value);
        }
        reply.send(&to).map_err(|e| match e {
            // The sender named a stream we may not write: that message will never work.
            PublishError::InvalidStream(why) | PublishError::Denied(why) | PublishError::TooLarge(why) => {
                HandlerError::Reject(format!("cannot reply to {to}: {why}"))
            }
        })
    }
}

export_handler!(Echo);
