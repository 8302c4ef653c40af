//! How large a message and a handler's output may be: the `[limits]` section as plain values.
//!
//! Owns [`EntryLimit`] (what one entry read from a stream may bring), [`ReplyLimit`] (what one message's
//! handler may publish) and the hard caps those limits may be configured up to. The caps come from the
//! commit: every reply, forward and dead-letter copy is one XADD inside the commit script, and a Lua
//! call takes at most about 8,000 arguments ([`crate::client::commit::MAX_WRITE_VALUES`]), so an entry
//! or reply wider than [`MAX_FIELDS`] could be read but never written. Enforcing them is the reader's
//! ([`crate::client::wire`]), the engine's and the WASM sandbox's job.

use super::envelope::Fields;

/// The most fields a limit may allow per entry or reply: the envelope and the `_dlq_*` record (at
/// most 10 pairs) fit beside them in one write of the commit script.
pub const MAX_FIELDS: usize = 3900;
/// The most replies per message a limit may allow: a commit batch numbers its target streams in two
/// bytes, and its writes are bounded on top of that.
pub const MAX_REPLIES: usize = 1000;
/// The largest entry a limit may allow: Redis's own largest bulk string (proto-max-bulk-len).
pub const MAX_ENTRY_BYTES: u64 = 512 << 20;
/// The most reply bytes per message a limit may allow.
pub const MAX_REPLY_BYTES: usize = 64 << 20;
/// What a field costs beside its name and value (Redis keeps lengths and headers for each): without
/// it, a reply of a million empty fields would count as nothing.
pub const FIELD_OVERHEAD: usize = 16;

/// How large one entry a consumer reads may be. A larger one is never handled: it is dead-lettered by
/// reference (`_dlq_reason = too_large`, its size and source id; its content is not copied).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryLimit {
    /// Field pairs.
    pub fields: usize,
    /// Bytes of all field names and values.
    pub bytes: u64,
}

/// An entry's size: its field pairs and the bytes of their names and values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Size {
    pub fields: u64,
    pub bytes: u64,
}

impl EntryLimit {
    /// No bound (the CLI's reads; tests).
    pub const NONE: EntryLimit = EntryLimit {
        fields: usize::MAX,
        bytes: u64::MAX,
    };

    /// The entry's size if it is over the limit.
    pub fn exceeded_by(&self, fields: &Fields) -> Option<Size> {
        let size = Size {
            fields: fields.len() as u64,
            bytes: fields.iter().map(|(n, v)| (n.len() + v.len()) as u64).sum(),
        };
        self.exceeds(size).then_some(size)
    }

    pub fn exceeds(&self, size: Size) -> bool {
        size.fields > self.fields as u64 || size.bytes > self.bytes
    }
}

impl Default for EntryLimit {
    fn default() -> Self {
        EntryLimit {
            fields: 1000,
            bytes: 1 << 20,
        }
    }
}

/// What one message's handler may publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyLimit {
    /// Replies per message.
    pub replies: usize,
    /// Fields per reply.
    pub fields: usize,
    /// Bytes of all replies of one message: stream names, field names and values, and
    /// [`FIELD_OVERHEAD`] per field.
    pub bytes: usize,
}

impl Default for ReplyLimit {
    fn default() -> Self {
        ReplyLimit {
            replies: 100,
            fields: 1000,
            bytes: 1 << 20,
        }
    }
}

impl ReplyLimit {
    /// What one reply counts against [`ReplyLimit::bytes`].
    pub fn cost<'a>(stream: &str, fields: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> usize {
        stream.len()
            + fields
                .map(|(n, v)| n.len() + v.len() + FIELD_OVERHEAD)
                .sum::<usize>()
    }

    /// Why `replies` break the limit, if they do.
    pub fn check(&self, replies: &[super::message::Reply]) -> Result<(), String> {
        if replies.len() > self.replies {
            return Err(format!(
                "{} replies, more than limits.replies ({})",
                replies.len(),
                self.replies
            ));
        }
        let mut bytes = 0;
        for r in replies {
            if r.fields.len() > self.fields {
                return Err(format!(
                    "the reply to {} has {} fields, more than limits.reply_fields ({})",
                    r.stream,
                    r.fields.len(),
                    self.fields
                ));
            }
            bytes += Self::cost(&r.stream, r.fields.iter());
        }
        if bytes > self.bytes {
            return Err(format!(
                "the replies take {bytes} bytes (each field counting {FIELD_OVERHEAD} beside its name \
                 and value), more than limits.reply_bytes ({})",
                self.bytes
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::message::{Reply, ReplyKind};

    #[test]
    fn entries_are_measured_by_fields_and_bytes() {
        let limit = EntryLimit {
            fields: 2,
            bytes: 10,
        };
        let small: Fields = [("a", "1234"), ("b", "5")].into_iter().collect();
        assert_eq!(limit.exceeded_by(&small), None);
        let wide: Fields = [("a", ""), ("b", ""), ("c", "")].into_iter().collect();
        assert_eq!(
            limit.exceeded_by(&wide),
            Some(Size {
                fields: 3,
                bytes: 3
            })
        );
        let big: Fields = [("a", "12345678901")].into_iter().collect();
        assert_eq!(limit.exceeded_by(&big).map(|s| s.bytes), Some(12));
    }

    #[test]
    fn empty_fields_are_not_free() {
        let limit = ReplyLimit {
            replies: 10,
            fields: 100_000,
            bytes: 1 << 20,
        };
        let bomb = Reply {
            stream: "nova:task:x:out".into(),
            fields: (0..70_000).map(|_| ("", "")).collect(),
            kind: ReplyKind::Now,
        };
        let err = limit.check(&[bomb]).unwrap_err();
        assert!(err.contains("limits.reply_bytes"), "{err}");
        let many = vec![
            Reply {
                stream: "nova:task:x:out".into(),
                fields: Fields::new(),
                kind: ReplyKind::Now,
            };
            11
        ];
        assert!(limit.check(&many).unwrap_err().contains("limits.replies"));
    }
}
