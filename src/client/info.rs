//! What Redis reports about streams, groups and pending entries, for operators and the daemon.
//!
//! Owns the result types of XPENDING, XINFO and XAUTOCLAIM. These are cold paths: XPENDING and XINFO
//! GROUPS/CONSUMERS are decoded by the redis crate's typed replies and converted here; XINFO STREAM
//! (whose entries may be nil) is read field by field. The commands themselves are sent by
//! [`super::Client`]; entries are decoded by [`super::decode`].

use redis::Value;
use redis::streams::{StreamInfoConsumer, StreamInfoGroup, StreamPendingId, StreamPendingReply};

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
    /// Entries ever added to this key, and the largest id deleted or trimmed from it (Redis 7.0+;
    /// None before). A key whose count of entries ever added equals its length, and which never lost
    /// one, holds every entry it ever had.
    pub entries_added: Option<u64>,
    pub max_deleted_id: Option<String>,
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

impl From<StreamPendingReply> for PendingSummary {
    fn from(r: StreamPendingReply) -> Self {
        match r {
            StreamPendingReply::Data(d) => PendingSummary {
                count: d.count as u64,
                min_id: Some(d.start_id),
                max_id: Some(d.end_id),
                consumers: d
                    .consumers
                    .into_iter()
                    .map(|c| (c.name, c.pending as u64))
                    .collect(),
            },
            // Empty, and whatever a later version of the crate adds: nothing pending.
            _ => PendingSummary::default(),
        }
    }
}

impl From<StreamPendingId> for PendingEntry {
    fn from(p: StreamPendingId) -> Self {
        PendingEntry {
            id: p.id,
            consumer: p.consumer,
            idle_ms: p.last_delivered_ms as u64,
            deliveries: p.times_delivered as u64,
        }
    }
}

impl From<StreamInfoGroup> for GroupInfo {
    fn from(g: StreamInfoGroup) -> Self {
        GroupInfo {
            name: g.name,
            consumers: g.consumers as u64,
            pending: g.pending as u64,
            last_delivered_id: g.last_delivered_id,
            entries_read: g.entries_read.map(|n| n as u64),
            lag: g.lag.map(|n| n as u64),
        }
    }
}

impl From<StreamInfoConsumer> for ConsumerInfo {
    fn from(c: StreamInfoConsumer) -> Self {
        ConsumerInfo {
            name: c.name,
            pending: c.pending as u64,
            idle_ms: c.idle as u64,
        }
    }
}
