//! What Redis reports about streams, groups and pending entries, decoded for operators and the daemon.
//!
//! Owns the result types of XPENDING, XINFO and XAUTOCLAIM and their decoders from raw replies. The
//! commands themselves are sent by [`super::Client`]; entries are decoded by [`super::decode`].

use redis::Value;

use super::decode as reply;
use crate::model::Entry;

/// XPENDING summary.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PendingSummary {
    pub count: u64,
    pub min_id: Option<String>,
    pub max_id: Option<String>,
    /// Consumers with pending entries, and how many each holds.
    pub consumers: Vec<(String, u64)>,
}

/// One XPENDING detail row.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PendingEntry {
    pub id: String,
    pub consumer: String,
    pub idle_ms: u64,
    pub deliveries: u64,
}

/// XAUTOCLAIM result.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AutoClaimed {
    /// Where the next scan starts; `0-0` when the PEL was scanned to the end.
    pub next: String,
    pub entries: Vec<Entry>,
    /// Pending ids whose entries were deleted or trimmed; Redis removed them from the PEL.
    pub deleted: Vec<String>,
}

/// XINFO STREAM, the parts operators look at.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StreamInfo {
    pub length: u64,
    pub groups: u64,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub last_generated_id: String,
}

/// One XINFO GROUPS row.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GroupInfo {
    pub name: String,
    pub consumers: u64,
    pub pending: u64,
    pub last_delivered_id: String,
    pub entries_read: Option<u64>,
    /// Entries not yet delivered to the group; None when Redis cannot tell.
    pub lag: Option<u64>,
}

/// One XINFO CONSUMERS row.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConsumerInfo {
    pub name: String,
    pub pending: u64,
    pub idle_ms: u64,
}

pub(super) fn count(v: &Value) -> u64 {
    reply::int(v).unwrap_or(0).max(0) as u64
}

pub(super) fn rows(value: Value) -> Result<Vec<Value>, String> {
    match value {
        Value::Array(rows) => Ok(rows),
        other => Err(format!("expected an array of rows, got {other:?}")),
    }
}

pub(super) fn decode_pending_summary(value: Value) -> Result<PendingSummary, String> {
    let Value::Array(parts) = value else {
        return Err(format!(
            "expected [count, min, max, consumers], got {value:?}"
        ));
    };
    let mut parts = parts.into_iter();
    let total = parts
        .next()
        .as_ref()
        .and_then(reply::int)
        .ok_or("missing count")?;
    let min_id = parts.next().and_then(reply::string);
    let max_id = parts.next().and_then(reply::string);
    let mut consumers = Vec::new();
    if let Some(Value::Array(rows)) = parts.next() {
        for row in rows {
            let Value::Array(pair) = row else {
                return Err("consumer row is not a pair".into());
            };
            let mut pair = pair.into_iter();
            let name = pair
                .next()
                .and_then(reply::string)
                .ok_or("consumer without name")?;
            let n = pair
                .next()
                .as_ref()
                .and_then(reply::int)
                .ok_or("consumer without count")?;
            consumers.push((name, n.max(0) as u64));
        }
    }
    Ok(PendingSummary {
        count: total.max(0) as u64,
        min_id,
        max_id,
        consumers,
    })
}

pub(super) fn decode_pending_rows(value: Value) -> Result<Vec<PendingEntry>, String> {
    rows(value)?
        .into_iter()
        .map(|row| {
            let Value::Array(cols) = row else {
                return Err("pending row is not an array".to_string());
            };
            let mut cols = cols.into_iter();
            let id = cols
                .next()
                .and_then(reply::string)
                .ok_or("row without id")?;
            let consumer = cols
                .next()
                .and_then(reply::string)
                .ok_or("row without consumer")?;
            let idle = cols
                .next()
                .as_ref()
                .and_then(reply::int)
                .ok_or("row without idle")?;
            let deliveries = cols
                .next()
                .as_ref()
                .and_then(reply::int)
                .ok_or("row without count")?;
            Ok(PendingEntry {
                id,
                consumer,
                idle_ms: idle.max(0) as u64,
                deliveries: deliveries.max(0) as u64,
            })
        })
        .collect()
}
