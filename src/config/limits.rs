//! `[limits]`: how large an entry read and a handler's replies may be, each within the hard cap the
//! commit can carry ([`crate::model::limits`]).

use super::checker::Checker;
use super::handlers::parse_size;
use super::raw::{Loose, RawConfig};
use crate::model::limits::{self, EntryLimit, ReplyLimit};

/// The entry and reply limits, or None after reporting what is wrong.
pub(super) fn limits(raw: &RawConfig, c: &mut Checker<'_>) -> Option<(EntryLimit, ReplyLimit)> {
    let l = &raw.limits;
    let entry_fields = count(
        c,
        "limits.entry_fields",
        &l.entry_fields,
        limits::MAX_FIELDS,
    );
    let entry_bytes = size(
        c,
        "limits.entry_bytes",
        &l.entry_bytes,
        limits::MAX_ENTRY_BYTES as usize,
    );
    let replies = count(c, "limits.replies", &l.replies, limits::MAX_REPLIES);
    let reply_fields = count(
        c,
        "limits.reply_fields",
        &l.reply_fields,
        limits::MAX_FIELDS,
    );
    let reply_bytes = size(
        c,
        "limits.reply_bytes",
        &l.reply_bytes,
        limits::MAX_REPLY_BYTES,
    );
    Some((
        EntryLimit {
            fields: entry_fields?,
            bytes: entry_bytes? as u64,
        },
        ReplyLimit {
            replies: replies?,
            fields: reply_fields?,
            bytes: reply_bytes?,
        },
    ))
}

/// A count in 1..=max.
fn count(c: &mut Checker<'_>, path: &str, v: &Loose<u32>, max: usize) -> Option<usize> {
    let n = c.get(path, v, "a positive integer")? as usize;
    if !(1..=max).contains(&n) {
        c.problem(
            path,
            format!("{n} is outside 1..{max} (the most one commit can write)"),
        );
        return None;
    }
    Some(n)
}

/// A size in 1KiB..=max.
fn size(c: &mut Checker<'_>, path: &str, v: &Loose<String>, max: usize) -> Option<usize> {
    let n = c.parse(path, v, "a size like \"1MiB\"", parse_size)?;
    if !(1 << 10..=max).contains(&n) {
        c.problem(path, format!("{n} bytes is outside 1KiB..{}MiB", max >> 20));
        return None;
    }
    Some(n)
}
