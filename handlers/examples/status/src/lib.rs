//! `status`: answers `type = status_request` messages with a `status_response` carrying the same
//! `request_id`, on `_reply_to` or the configured `reply_to`. Other messages are acknowledged untouched.

use redstream_guest::{Guest, HandlerError, Message, Reply, export_handler};

struct Status;

impl Guest for Status {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        if msg.text("type") != Some("status_request") {
            return Ok(());
        }
        let to = msg
            .text("_reply_to")
            .map(str::to_owned)
            .or_else(|| redstream_guest::config("reply_to"))
            .ok_or_else(|| HandlerError::Reject("no _reply_to field and no reply_to configured".into()))?;
        let service = redstream_guest::config("service").unwrap_or_else(|| "redstream".into());
        Reply::new()
            .text("type", "status_response")
            .text("is_response", "true")
            .text("request_id", msg.text("request_id").unwrap_or(""))
            .text("service", &service)
            .text("status", "ok")
            .text("in_reply_to", &msg.id)
            .send(&to)
            .map_err(|e| HandlerError::Reject(format!("cannot reply to {to}: {e:?}")))
    }
}

export_handler!(Status);
