//! The dead-letter format: the fields a dead-letter entry carries beside the original message's —
//! `_dlq_reason`, `_dlq_source` (`<stream>/<id>` of the original), `_dlq_deliveries`, `_dlq_handler`,
//! `_dlq_timestamp` — and how `redstream dlq list` shows one.
//!
//! Writing dead letters is the commit script's ([`crate::client::commit`]); replaying one is
//! [`crate::client::Client::replay_dead_letter`].

use serde_json::{Map, Value};

use super::envelope::{Entry, Fields};

pub const REASON: &str = "_dlq_reason";
pub const SOURCE: &str = "_dlq_source";
pub const DELIVERIES: &str = "_dlq_deliveries";
pub const HANDLER: &str = "_dlq_handler";
pub const TIMESTAMP: &str = "_dlq_timestamp";
/// On a dead letter of a message too wide to copy: how many fields the original had. The dead letter
/// then carries only the `_dlq_*` record; the original is at `_dlq_source`.
pub const FIELDS_OMITTED: &str = "_dlq_fields_omitted";
/// On a dead letter of an entry over `[limits]`: the bytes of its field names and values. Such a dead
/// letter has `_dlq_reason` = [`TOO_LARGE`] and carries only the `_dlq_*` record.
pub const SIZE: &str = "_dlq_size";
/// `_dlq_reason` of an entry over `[limits]`, dead-lettered by reference.
pub const TOO_LARGE: &str = "too_large";
/// The verified sender of a message that came with a signed `_token` (its subject). A dead letter
/// copies whatever `_source` the publisher wrote, which nothing verifies; this is the one to trust.
pub const SENDER: &str = "_dlq_sender";
/// On a replayed message: `<dead-letter stream>/<dead-letter id>` it was replayed from.
pub const REPLAYED_FROM: &str = "_dlq_replayed_from";
/// On a replayed message: the `_source` of the original, since `_source` is now the replaying identity.
pub const ORIGINAL_SOURCE: &str = "_dlq_original_source";

/// One dead letter, for `redstream dlq list`: the DLQ fields pulled out, the original fields beside.
pub fn describe(dlq: &str, e: &Entry) -> Value {
    let text = |k: &str| {
        e.fields
            .get_str(k)
            .map_or(Value::Null, |s| Value::String(s.to_owned()))
    };
    let original: Fields = e
        .fields
        .iter()
        .filter(|(name, _)| !name.starts_with(b"_dlq_"))
        .map(|(n, v)| (n.to_vec(), v.to_vec()))
        .collect();
    let mut out = Map::new();
    out.insert("id".into(), Value::String(e.id.clone()));
    out.insert("stream".into(), Value::String(dlq.to_owned()));
    out.insert("source".into(), text(SOURCE));
    out.insert("reason".into(), text(REASON));
    out.insert(
        "deliveries".into(),
        e.fields
            .get_str(DELIVERIES)
            .and_then(|d| d.parse::<u64>().ok())
            .map_or(Value::Null, Value::from),
    );
    out.insert("handler".into(), text(HANDLER));
    out.insert("sender".into(), text(SENDER));
    out.insert("dead_lettered_at".into(), text(TIMESTAMP));
    if let Value::Object(view) = original.to_json() {
        out.extend(view);
    }
    Value::Object(out)
}
