//! Stream entry ids (`<ms>-<seq>`) as one ordered type.
//!
//! Owns parsing, ordering and printing of ids, so that every place that compares, sorts or computes an
//! id (the consumer's in-flight set, the retention cut, config `start` values) agrees on what an id is.
//! Entries keep their id as the text Redis sent; this type is what that text means.

use std::fmt;
use std::str::FromStr;

/// A stream entry id: milliseconds and sequence number. Ordered as Redis orders them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

/// Text that is not an entry id, kept for the message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a stream entry id (expected <ms>-<seq> or <ms>, both decimal)")]
pub struct InvalidId(pub String);

impl StreamId {
    /// `0-0`, before every entry.
    pub const MIN: StreamId = StreamId { ms: 0, seq: 0 };
    /// The largest id Redis can hold.
    pub const MAX: StreamId = StreamId {
        ms: u64::MAX,
        seq: u64::MAX,
    };

    /// Parses `<ms>-<seq>`, or `<ms>` alone (sequence 0), as Redis accepts them in ranges.
    pub fn parse(s: &str) -> Result<StreamId, InvalidId> {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        let num = |t: &str| {
            (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
                .then(|| t.parse::<u64>().ok())
                .flatten()
        };
        match (num(ms), num(seq)) {
            (Some(ms), Some(seq)) => Ok(StreamId { ms, seq }),
            _ => Err(InvalidId(s.to_owned())),
        }
    }
}

impl FromStr for StreamId {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StreamId::parse(s)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_order_numerically_not_as_text() {
        let id = |s: &str| StreamId::parse(s).unwrap();
        assert!(id("10-0") > id("9-5"));
        assert!(id("5-10") > id("5-9"));
        assert_eq!(id("5-1"), id("5-1"));
        assert_eq!(id("7"), StreamId { ms: 7, seq: 0 });
        assert_eq!(
            id("18446744073709551615-1").to_string(),
            "18446744073709551615-1"
        );
    }

    #[test]
    fn garbage_is_refused_not_mapped_to_zero() {
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "a-1",
            "1-b",
            "1-2-3",
            "+1-2",
            " 1-2",
            "99999999999999999999-0",
        ] {
            assert_eq!(StreamId::parse(bad), Err(InvalidId(bad.into())), "{bad:?}");
        }
    }
}
