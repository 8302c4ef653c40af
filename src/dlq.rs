//! Dead letters: their format, and the operator's way back (list, replay).
//!
//! Owns the fields a dead-letter entry carries beside the original message's — `_dlq_reason`,
//! `_dlq_source` (`<stream>/<id>` of the original), `_dlq_deliveries`, `_dlq_handler`, `_dlq_timestamp` —
//! and replay: re-publishing a dead letter to the stream it came from, with a new id, recording
//! `_dlq_replayed_from`, and removing it from the dead-letter stream in the same MULTI/EXEC. Writing
//! dead letters is the engine's commit script ([`crate::engine::commit`]).

use serde_json::{Map, Value};

use crate::auth::Op;
use crate::client::{Client, ReadOptions};
use crate::conn::Ctx;
use crate::envelope::{self, Entry, Fields};
use crate::error::{Error, Result};

pub const REASON: &str = "_dlq_reason";
pub const SOURCE: &str = "_dlq_source";
pub const DELIVERIES: &str = "_dlq_deliveries";
pub const HANDLER: &str = "_dlq_handler";
pub const TIMESTAMP: &str = "_dlq_timestamp";
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
    out.insert("dead_lettered_at".into(), text(TIMESTAMP));
    if let Value::Object(view) = original.to_json() {
        out.extend(view);
    }
    Value::Object(out)
}

/// Re-publishes dead letter `id` of `dlq` to its source stream and deletes it from `dlq`, atomically.
/// Needs read and write on the dead-letter stream and write on the source stream. Returns the source
/// stream and the new entry id.
pub async fn replay(client: &Client, dlq: &str, id: &str) -> Result<(String, String)> {
    client.authorize(Op::Read, dlq)?;
    client.authorize(Op::Delete, dlq)?;
    let opts = ReadOptions {
        count: Some(1),
        start: id.to_owned(),
        end: id.to_owned(),
        reverse: false,
    };
    let entry = client
        .read(dlq, &opts)
        .await?
        .pop()
        .ok_or_else(|| Error::Protocol {
            command: "XRANGE",
            key: dlq.to_owned(),
            detail: format!("no dead letter with id {id}"),
        })?;
    let source = entry
        .fields
        .get_str(SOURCE)
        .and_then(|s| s.rsplit_once('/'))
        .map(|(stream, _)| stream.to_owned())
        .ok_or_else(|| Error::Protocol {
            command: "XRANGE",
            key: dlq.to_owned(),
            detail: format!("entry {id} has no {SOURCE} field: not a dead letter"),
        })?;
    client.authorize(Op::Publish, &source)?;

    let mut fields: Fields = entry
        .fields
        .iter()
        .filter(|(name, _)| !name.starts_with(b"_dlq_"))
        .map(|(n, v)| (n.to_vec(), v.to_vec()))
        .collect();
    if let Some(original) = entry.fields.get(envelope::SOURCE) {
        fields.set(ORIGINAL_SOURCE, original.to_vec());
    }
    fields.set(REPLAYED_FROM, format!("{dlq}/{id}"));
    fields.stamp(&client.identity().subject, envelope::now_ms());

    let mut pipe = redis::pipe();
    pipe.atomic()
        .add_command(crate::client::xadd(&source, &fields, None))
        .cmd("XDEL")
        .arg(dlq)
        .arg(id);
    let replies = client
        .redis()
        .query_pipe(&pipe, Ctx::new("MULTI XADD XDEL", dlq))
        .await?;
    let new_id = replies
        .into_iter()
        .next()
        .and_then(crate::reply::string)
        .ok_or_else(|| Error::Protocol {
            command: "XADD",
            key: source.clone(),
            detail: "no entry id in the transaction's reply".into(),
        })?;
    Ok((source, new_id))
}
