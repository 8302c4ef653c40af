//! Bringing back a consumer group that Redis no longer has, at a point that skips nothing.
//!
//! Owns the decision of where a lost group starts again ([`resume_point`]) and why it was lost
//! ([`Lost`]). A group goes missing for two reasons that look alike to XREADGROUP (NOGROUP either way):
//! someone destroyed it (`XGROUP DESTROY`, the stream intact), or Redis lost its data (a restart
//! without persistence, a replica promoted empty) — and then a producer's XADD may already have made
//! the stream again before the consumer notices. Re-creating the group at `$` after such a loss would
//! skip everything published since Redis came back, so the stream is looked at first (XINFO STREAM):
//!
//! - no key at all: whatever it holds from now on is new — the group starts at `0` (with MKSTREAM);
//! - a stream that is not the one the group knew — its ids went back below the group's position, or it
//!   holds nothing at or before that position and has never lost an entry (every entry ever added is
//!   still there, so it was made after the group last read) — is a new stream: start at `0`;
//! - otherwise the stream is intact and only the group went: the consumer's configured `start` (or `0`
//!   when the group had read nothing, its position being the start of the stream).
//!
//! Sending the commands is [`super::Client::restore_group`]'s; logging and counting the loss is the
//! engine's.

use super::info::StreamInfo;
use crate::model::StreamId;

/// Why a group had to be re-created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lost {
    /// The group alone went (`XGROUP DESTROY`); the stream kept its entries.
    Group,
    /// The stream key is gone: deleted, or Redis restarted without its data.
    Stream,
    /// The stream is a new one, made after the group last read it: Redis lost its data and a producer
    /// wrote again before the group was back.
    Data,
}

impl Lost {
    /// Whether entries the group had not read yet may have gone with it (Redis forgot them).
    pub fn is_data_loss(self) -> bool {
        !matches!(self, Lost::Group)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Lost::Group => "the consumer group was destroyed; the stream is intact",
            Lost::Stream => {
                "the stream no longer exists (deleted, or Redis restarted without its data)"
            }
            Lost::Data => {
                "the stream was made anew since the group last read it (Redis lost its data, then a producer wrote again)"
            }
        }
    }
}

/// What [`super::Client::restore_group`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    /// False when another consumer had re-created the group first.
    pub created: bool,
    /// Where the group starts (as sent to XGROUP CREATE).
    pub at: String,
    pub lost: Lost,
}

/// Where a lost group starts again, and why it was lost. `info` is the stream as XINFO STREAM sees it
/// now (None: no such key); `known` the group's position as this consumer last knew it (None when it
/// never learned it); `start` the configured start.
pub fn resume_point(
    info: Option<&StreamInfo>,
    known: Option<StreamId>,
    start: &str,
) -> (String, Lost) {
    let Some(info) = info else {
        return ("0".into(), Lost::Stream);
    };
    let Some(known) = known else {
        return (start.to_owned(), Lost::Group);
    };
    let id = |s: &str| StreamId::parse(s).ok();
    let went_back = id(&info.last_generated_id).is_some_and(|last| last < known);
    let never_lost_one = info.entries_added == Some(info.length)
        && info
            .max_deleted_id
            .as_deref()
            .and_then(id)
            .is_none_or(|d| d == StreamId::MIN);
    let all_after = info
        .first_id
        .as_deref()
        .and_then(id)
        .is_some_and(|first| first > known);
    if went_back || (known > StreamId::MIN && never_lost_one && all_after) {
        ("0".into(), Lost::Data)
    } else if known == StreamId::MIN {
        // The group had read nothing: its position was the stream's start, whatever happened.
        ("0".into(), Lost::Group)
    } else {
        (start.to_owned(), Lost::Group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(first: Option<&str>, last_generated: &str, length: u64, added: u64) -> StreamInfo {
        StreamInfo {
            length,
            groups: 0,
            first_id: first.map(str::to_owned),
            last_id: None,
            last_generated_id: last_generated.into(),
            entries_added: Some(added),
            max_deleted_id: Some("0-0".into()),
        }
    }

    fn at(s: &str) -> Option<StreamId> {
        Some(StreamId::parse(s).unwrap())
    }

    #[test]
    fn a_missing_stream_starts_from_its_beginning() {
        assert_eq!(
            resume_point(None, at("5-0"), "$"),
            ("0".into(), Lost::Stream)
        );
        assert_eq!(resume_point(None, None, "$"), ("0".into(), Lost::Stream));
    }

    #[test]
    fn a_stream_made_anew_after_the_group_last_read_is_data_loss() {
        // Redis came back empty and a producer wrote three entries before the group was back.
        let new = stream(Some("900-0"), "902-0", 3, 3);
        assert_eq!(
            resume_point(Some(&new), at("500-0"), "$"),
            ("0".into(), Lost::Data)
        );
        // Its ids went back below the group's position (a server whose clock is behind).
        let behind = stream(Some("100-0"), "102-0", 3, 3);
        assert_eq!(
            resume_point(Some(&behind), at("500-0"), "$"),
            ("0".into(), Lost::Data)
        );
    }

    #[test]
    fn an_intact_stream_keeps_the_configured_start() {
        // It still holds entries at or before the group's position: only the group went.
        let intact = stream(Some("100-0"), "902-0", 10, 10);
        assert_eq!(
            resume_point(Some(&intact), at("500-0"), "$"),
            ("$".into(), Lost::Group)
        );
        // Trimmed past the group's position: it has lost entries, so it is the old stream.
        let mut trimmed = stream(Some("900-0"), "902-0", 3, 10);
        trimmed.max_deleted_id = Some("899-0".into());
        assert_eq!(
            resume_point(Some(&trimmed), at("500-0"), "$"),
            ("$".into(), Lost::Group)
        );
        // Position unknown: nothing to compare with.
        assert_eq!(
            resume_point(Some(&intact), None, "$"),
            ("$".into(), Lost::Group)
        );
        // A group that had read nothing started at the beginning, whatever made it go.
        assert_eq!(
            resume_point(Some(&intact), at("0-0"), "$"),
            ("0".into(), Lost::Group)
        );
    }
}
