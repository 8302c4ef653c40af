//! Where a consumer loop reads next, with no I/O: its own pending entries first (at start, and after
//! a read whose reply was lost), then new ones, with claim rounds of idle entries when the claim timer
//! says so — and the group's position as far as the loop has read it.

use super::flight::key_of;
use crate::client::decode::Entries;
use crate::model::StreamId;

/// What a round reads: new entries, this consumer's own pending ones (recovery), or entries idle
/// long enough to claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reading {
    New,
    /// Own pending entries after this id.
    Pending(String),
    /// Idle entries, scanning the PEL from this cursor.
    Idle(String),
}

/// How many claim rounds one tick of the claim timer may run in a row while claims come back full.
const CLAIM_PASSES: u8 = 8;

/// The loop's place in its group.
#[derive(Debug)]
pub struct Cursor {
    /// While re-reading our own pending entries: the id to continue after.
    recover: Option<String>,
    /// The highest id a `>` read gave us; a lost read's entries are pending after it.
    last_new: String,
    /// The group's position as this loop last knew it (its last-delivered id at start, then the
    /// newest entry read): how a lost group tells an intact stream from one Redis made anew.
    pub position: Option<StreamId>,
    claim_cursor: String,
    /// Claim rounds still due: set by the claim timer, spent while claims come back full.
    claim_passes: u8,
    /// What the round in progress reads, and how many entries it asked for.
    reading: Reading,
    asked: usize,
}

impl Cursor {
    /// A loop starting where the group stands (`position`, if known): it re-reads its own pending
    /// entries first.
    pub fn new(position: Option<StreamId>) -> Self {
        Cursor {
            recover: Some("0".into()),
            last_new: "0".into(),
            position,
            claim_cursor: "0-0".into(),
            claim_passes: 0,
            reading: Reading::New,
            asked: 0,
        }
    }

    /// Whether the loop is still re-reading its own pending entries (no claims meanwhile).
    pub fn recovering(&self) -> bool {
        self.recover.is_some()
    }

    /// The claim timer ticked: the next rounds claim, while claims come back full.
    pub fn claim_due(&mut self) {
        self.claim_passes = CLAIM_PASSES;
    }

    /// What the next round reads, asking for `asked` entries.
    pub fn next(&mut self, asked: usize) -> Reading {
        self.reading = match (&self.recover, self.claim_passes) {
            (Some(after), _) => Reading::Pending(after.clone()),
            (None, 0) => Reading::New,
            (None, _) => Reading::Idle(self.claim_cursor.clone()),
        };
        self.asked = asked;
        self.reading.clone()
    }

    /// How many entries the round in progress asked for.
    pub fn asked(&self) -> usize {
        self.asked
    }

    /// Whether the round in progress claims idle entries.
    pub fn claiming(&self) -> bool {
        matches!(self.reading, Reading::Idle(_))
    }

    /// Whether the round in progress re-reads our own pending entries.
    pub fn rereading(&self) -> bool {
        matches!(self.reading, Reading::Pending(_))
    }

    /// A read failed without an answer: it may have delivered entries to us, which are then in our
    /// PEL after the last new one we saw.
    pub fn read_lost(&mut self) {
        if self.recover.is_none() {
            self.recover = Some(self.last_new.clone());
        }
    }

    /// The group was re-created (standing at `position`): its PEL is empty, its claims start over.
    pub fn group_restored(&mut self, position: Option<StreamId>) {
        self.recover = None;
        self.last_new = "0".into();
        self.claim_cursor = "0-0".into();
        self.position = position;
    }

    /// What the round in progress read: pages through our PEL (and switches to new entries once it is
    /// exhausted), moves the claim scan on (stopping when it wraps or comes back short), or moves the
    /// position past the new entries. Returns the position if it moved.
    pub fn advance(&mut self, got: &Entries) -> Option<Option<StreamId>> {
        let seen = got.entries.len() + got.deleted.len() + got.too_large.len();
        let full = |extra: usize| seen + extra >= self.asked.max(1);
        let ids = || {
            got.entries
                .iter()
                .map(|e| &e.id)
                .chain(got.too_large.iter().map(|(id, _)| id))
        };
        match self.reading {
            Reading::Idle(_) => {
                self.claim_cursor = got.next.clone().unwrap_or_else(|| "0-0".into());
                self.claim_passes = match self.claim_cursor.as_str() {
                    "0-0" => 0,
                    _ if !full(got.dropped.len()) => 0,
                    _ => self.claim_passes.saturating_sub(1),
                };
                None
            }
            Reading::Pending(_) => {
                let last = ids().chain(got.deleted.iter()).max_by_key(|id| key_of(id));
                match last {
                    Some(last) if full(0) => self.recover = Some(last.clone()),
                    _ => self.recover = None,
                }
                None
            }
            Reading::New => {
                let last = ids().max_by_key(|id| key_of(id))?;
                self.position = self.position.max(Some(key_of(last)));
                self.last_new = last.clone();
                Some(self.position)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::envelope::Entry;

    fn read(ids: &[&str]) -> Entries {
        Entries {
            entries: ids
                .iter()
                .map(|id| Entry {
                    id: (*id).into(),
                    fields: Default::default(),
                })
                .collect(),
            ..Entries::default()
        }
    }

    #[test]
    fn the_own_pel_is_paged_through_then_new_entries_are_read() {
        let mut c = Cursor::new(None);
        assert_eq!(c.next(2), Reading::Pending("0".into()));
        assert_eq!(c.advance(&read(&["5-0", "3-0"])), None);
        assert_eq!(c.next(2), Reading::Pending("5-0".into()), "a full page: on");
        c.advance(&read(&["9-0"]));
        assert!(!c.recovering(), "a short page ends the re-read");
        assert_eq!(c.next(2), Reading::New);
        assert_eq!(
            c.advance(&read(&["10-0", "12-0"])),
            Some(Some(key_of("12-0")))
        );
    }

    #[test]
    fn a_lost_read_is_recovered_from_the_last_new_entry_and_no_claim_runs_meanwhile() {
        let mut c = Cursor::new(None);
        c.next(10);
        c.advance(&read(&[]));
        c.next(10);
        c.advance(&read(&["7-1"]));
        c.next(10);
        c.read_lost();
        c.claim_due();
        assert_eq!(c.next(10), Reading::Pending("7-1".into()));
        c.read_lost();
        assert_eq!(
            c.next(10),
            Reading::Pending("7-1".into()),
            "kept, not reset"
        );
    }

    #[test]
    fn claims_scan_on_while_full_and_stop_when_short_wrapped_or_spent() {
        let mut c = Cursor::new(None);
        c.next(2);
        c.advance(&read(&[]));
        c.claim_due();
        assert_eq!(c.next(2), Reading::Idle("0-0".into()));
        let mut full = read(&["1-0", "2-0"]);
        full.next = Some("3-0".into());
        c.advance(&full);
        assert_eq!(
            c.next(2),
            Reading::Idle("3-0".into()),
            "full: the scan goes on"
        );
        let mut short = read(&["3-0"]);
        short.next = Some("4-0".into());
        c.advance(&short);
        assert_eq!(c.next(2), Reading::New, "short: done until the next tick");
        c.claim_due();
        assert_eq!(c.next(2), Reading::Idle("4-0".into()), "the scan resumes");
        let mut wrapped = read(&["4-0", "5-0"]);
        wrapped.next = Some("0-0".into());
        c.advance(&wrapped);
        assert_eq!(c.next(2), Reading::New, "wrapped: done");
        c.claim_due();
        let mut passes = 0;
        while let Reading::Idle(_) = c.next(2) {
            let mut page = read(&["1-0", "2-0"]);
            page.next = Some("9-0".into());
            c.advance(&page);
            passes += 1;
        }
        assert_eq!(
            passes, CLAIM_PASSES,
            "at most this many full claims per tick"
        );
    }

    #[test]
    fn the_position_only_moves_forward_and_a_restored_group_starts_over() {
        let mut c = Cursor::new(Some(key_of("20-0")));
        c.next(5);
        c.advance(&read(&[]));
        c.next(5);
        assert_eq!(c.advance(&read(&["15-0"])), Some(Some(key_of("20-0"))));
        c.group_restored(Some(key_of("0-0")));
        assert!(!c.recovering());
        assert_eq!(c.position, Some(key_of("0-0")));
        c.read_lost();
        assert_eq!(c.next(5), Reading::Pending("0".into()));
    }
}
