//! Committing outcomes: replies and the ack in one atomic step, only while this consumer owns the entry.
//!
//! Owns the server-side script (docs/design.md, "The commit script"). For each finished message it checks with XPENDING that the
//! entry is still pending *for this consumer*; only then does it XADD the message's replies (or its
//! dead-letter copy) and XACK it. A Lua script runs atomically, so a message claimed away while its
//! handler was slow yields exactly one set of replies — whoever commits first wins, the other's commit
//! is a no-op — and a crash leaves either everything or nothing. Many messages share one script call.
//! When and over which connection a batch travels is [`crate::engine::consumer`]'s business.

use std::sync::Arc;

use redis::{Cmd, Value};

use crate::model::dead_letter as dlq;
use crate::model::envelope::{self, Fields};
use crate::model::message::{Message, Reply};

/// What committing a message does.
#[derive(Clone, Debug)]
pub enum Effect {
    /// Publish these replies (maybe none) and ack.
    Replies(Vec<Reply>),
    /// Copy the message to the dead-letter stream with this reason, and ack.
    DeadLetter(String),
    /// The entry no longer exists (deleted or trimmed while pending): just ack.
    Vanished,
}

/// A message whose fate is decided, waiting to be committed.
#[derive(Clone, Debug)]
pub struct Finished {
    pub msg: Message,
    pub effect: Effect,
    /// The handler that decided, for `_dlq_handler`.
    pub handler: Arc<str>,
}

/// Builds commit script calls for one consumer of one group. Made by
/// [`super::Client::committer`], which checks the permissions it needs.
pub struct Committer {
    stream: Arc<str>,
    group: String,
    consumer: String,
    /// `_source` of replies: the daemon's identity.
    source: String,
    dead_letter: String,
}

/// One commit, built by [`Committer::command`]: the script call, or a plain XACK when nothing is
/// written. Only the client sends it — on the shared connection ([`super::Client::commit`]) or in
/// front of a group read ([`super::reader::GroupReader::round`]).
#[derive(Clone, Debug)]
pub struct CommitCall(pub(super) Cmd);

/// How the script reports each message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Committed {
    /// Replies written and acked.
    Yes,
    /// Not pending for this consumer any more (acked, claimed by another, or the group was lost):
    /// nothing written.
    NotOurs,
    /// Redis's ACL does not let this connection write one of the streams: nothing written, still pending.
    Denied,
}

/// KEYS[1] source stream, KEYS[2..] streams written. ARGV: group, consumer, message count, layout,
/// first and last id of the messages that write, XPENDING count, `_timestamp`, `_source`; then per
/// message its id followed by the field names and values of each of its writes.
/// The layout says how those arguments divide, two bytes per number (big-endian), so the script never
/// parses numbers from text: per message its write count, then per write the key index, the number
/// of field pairs, and one byte: 1 if the script puts `_timestamp` and `_source` first (replies), 0
/// if the fields are complete (dead letters). The envelope values shared by the batch travel once.
/// Returns one integer per message: 1 committed, 0 not ours, -1 a write the ACL forbids.
///
/// A message with writes is committed only while it is pending for this consumer (one XPENDING over
/// the batch's range answers that for all of them), and every write is checked against the ACL before
/// any is made (scripts are atomic but not rolled back). A message without writes (a handler that
/// published nothing, an entry that vanished) is simply acked: whoever commits it first decides its
/// effects, and "none" is a complete set. All acks of the batch go in one XACK.
pub const SOURCE: &str = r#"
local src, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local n, layout = tonumber(ARGV[3]), ARGV[4]
local ts, source = ARGV[8], ARGV[9]
local byte = string.byte
local function num(at)
  local hi, lo = byte(layout, at, at + 1)
  return hi * 256 + lo
end
-- This consumer's pending entries in the writers' range, in one XPENDING.
local mine = {}
if ARGV[5] ~= '' then
  for _, p in ipairs(redis.call('XPENDING', src, group, ARGV[5], ARGV[6], ARGV[7], consumer)) do
    mine[p[1]] = true
  end
end
local allowed = {}
local function may_write(key)
  local ok = allowed[key]
  if ok == nil then
    ok = redis.acl_check_cmd('XADD', key, '*', 'f', 'v') and true or false
    allowed[key] = ok
  end
  return ok
end
local out, ack = {}, {}
local a, l = 10, 1
for m = 1, n do
  local id = ARGV[a]
  local writes = num(l)
  a, l = a + 1, l + 2
  local verdict = 1
  if writes > 0 then
    if not mine[id] then
      verdict = 0
    else
      for w = 0, writes - 1 do
        if not may_write(KEYS[num(l + 5 * w)]) then verdict = -1 end
      end
    end
    for w = 1, writes do
      local key, last = KEYS[num(l)], a + 2 * num(l + 2) - 1
      if verdict == 1 then
        if byte(layout, l + 4) == 1 then
          redis.call('XADD', key, '*', '_timestamp', ts, '_source', source, unpack(ARGV, a, last))
        else
          redis.call('XADD', key, '*', unpack(ARGV, a, last))
        end
      end
      a, l = last + 1, l + 5
    end
  end
  if verdict == 1 then ack[#ack + 1] = id end
  out[m] = verdict
end
for c = 1, #ack, 1000 do
  redis.call('XACK', src, group, unpack(ack, c, math.min(c + 999, #ack)))
end
return out
"#;

/// The script, for SCRIPT LOAD and EVALSHA.
pub fn script() -> redis::Script {
    redis::Script::new(SOURCE)
}

impl Committer {
    pub(super) fn new(
        stream: Arc<str>,
        group: &str,
        consumer: &str,
        source: &str,
        dead_letter: &str,
    ) -> Committer {
        Committer {
            stream,
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            source: source.to_owned(),
            dead_letter: dead_letter.to_owned(),
        }
    }

    /// The EVALSHA command committing `batch`, in order. `sha` is [`script`]'s hash. Messages that write
    /// (replies or a dead letter) must be in stream-id order: the script checks ownership over their
    /// range. `in_flight` bounds how many of this consumer's entries that range may hold.
    pub fn command(&self, sha: &str, batch: &[Finished], in_flight: usize) -> CommitCall {
        CommitCall(self.build(sha, batch, in_flight))
    }

    fn build(&self, sha: &str, batch: &[Finished], in_flight: usize) -> Cmd {
        // Nothing to write: a plain XACK is all it takes, and much cheaper for Redis than the script.
        let mut writers = batch.iter().filter(|f| writes(f));
        let Some(first) = writers.next() else {
            let mut cmd = redis::cmd("XACK");
            cmd.arg(&*self.stream).arg(&self.group);
            for f in batch {
                cmd.arg(&f.msg.id);
            }
            return cmd;
        };
        let last = writers.next_back().unwrap_or(first);
        // Keys must precede arguments, so collect the streams written first.
        let mut keys: Vec<&str> = vec![&self.stream];
        for f in batch {
            let written: Box<dyn Iterator<Item = &str>> = match &f.effect {
                Effect::Replies(replies) => Box::new(replies.iter().map(|r| r.stream.as_str())),
                Effect::DeadLetter(_) => Box::new(std::iter::once(self.dead_letter.as_str())),
                Effect::Vanished => Box::new(std::iter::empty()),
            };
            for k in written {
                if !keys.contains(&k) {
                    keys.push(k);
                }
            }
        }
        let index = |k: &str| keys.iter().position(|x| *x == k).map_or(1, |i| i + 1);

        // The layout first (it precedes the per-message arguments), then the arguments.
        let mut layout: Vec<u8> = Vec::with_capacity(batch.len() * 7);
        // Dead letters are built once, here, where their field count is needed first.
        let mut dead_letters = Vec::new();
        for f in batch {
            match &f.effect {
                Effect::Replies(replies) => {
                    put(&mut layout, replies.len());
                    for r in replies {
                        put(&mut layout, index(&r.stream));
                        put(&mut layout, reply_pairs(r));
                        layout.push(1);
                    }
                }
                Effect::DeadLetter(reason) => {
                    let fields = self.dead_letter_fields(f, reason);
                    put(&mut layout, 1);
                    put(&mut layout, index(&self.dead_letter));
                    put(&mut layout, fields.len() + 1);
                    layout.push(0);
                    dead_letters.push(fields);
                }
                Effect::Vanished => put(&mut layout, 0),
            }
        }

        let now = envelope::now_ms().to_string();
        let mut dead_letters = dead_letters.into_iter();
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(sha).arg(keys.len()).arg(&keys);
        cmd.arg(&self.group)
            .arg(&self.consumer)
            .arg(batch.len())
            .arg(layout)
            .arg(&first.msg.id)
            .arg(&last.msg.id)
            .arg(in_flight + batch.len() + 16)
            .arg(&now)
            .arg(&self.source);
        for f in batch {
            cmd.arg(&f.msg.id);
            match &f.effect {
                Effect::Replies(replies) => {
                    for r in replies {
                        self.reply_args(&mut cmd, &f.msg, r);
                    }
                }
                Effect::DeadLetter(_) => {
                    let fields = dead_letters.next().expect("one per dead letter");
                    for (name, value) in fields.iter() {
                        cmd.arg(name).arg(value);
                    }
                    cmd.arg(dlq::TIMESTAMP).arg(&now);
                }
                Effect::Vanished => {}
            }
        }
        cmd
    }

    /// A reply's fields, minus the envelope the script and this add: `_trace_id` (the handler's, else
    /// the source's, else a new one) and `_cause`. Writes [`reply_pairs`] pairs.
    fn reply_args(&self, cmd: &mut Cmd, msg: &Message, reply: &Reply) {
        let mut trace: Option<&[u8]> = None;
        for (name, value) in reply.fields.iter() {
            match envelope_field(name) {
                Some(envelope::TRACE_ID) => trace = Some(value).filter(|v| !v.is_empty()),
                Some(_) => {}
                None => {
                    cmd.arg(name).arg(value);
                }
            }
        }
        cmd.arg(envelope::TRACE_ID);
        match trace.or_else(|| msg.fields.get(envelope::TRACE_ID).filter(|v| !v.is_empty())) {
            Some(t) => cmd.arg(t),
            None => cmd.arg(envelope::new_trace_id()),
        };
        cmd.arg(envelope::CAUSE)
            .arg(format!("{}/{}", self.stream, msg.id));
    }

    /// The dead-letter entry: the original fields and the `_dlq_*` record.
    /// A dead letter's fields but `_dlq_timestamp` (which goes last, with the batch's time): the
    /// original fields and the `_dlq_*` record.
    fn dead_letter_fields(&self, f: &Finished, reason: &str) -> Fields {
        let msg = &f.msg;
        let mut fields = msg.fields.clone();
        fields.set(dlq::REASON, reason);
        fields.set(dlq::SOURCE, format!("{}/{}", self.stream, msg.id));
        fields.set(dlq::DELIVERIES, msg.deliveries.to_string());
        fields.set(dlq::HANDLER, f.handler.as_bytes().to_vec());
        fields.remove(dlq::TIMESTAMP);
        fields
    }
}

/// Appends `n` to a layout as two big-endian bytes. (The limits on replies per message and fields per
/// reply keep every count far below 65536.)
fn put(layout: &mut Vec<u8>, n: usize) {
    layout.extend_from_slice(&u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes());
}

/// The envelope field `name` is, if it is one: the commit writes those itself.
fn envelope_field(name: &[u8]) -> Option<&'static str> {
    [
        envelope::TIMESTAMP,
        envelope::SOURCE,
        envelope::TRACE_ID,
        envelope::CAUSE,
    ]
    .into_iter()
    .find(|e| e.as_bytes() == name)
}

/// How many field pairs [`Committer::reply_args`] writes for `reply`: its own fields without the
/// envelope, then `_trace_id` and `_cause`.
fn reply_pairs(reply: &Reply) -> usize {
    reply
        .fields
        .iter()
        .filter(|(n, _)| envelope_field(n).is_none())
        .count()
        + 2
}

/// Whether committing this message writes anything (replies or a dead letter).
pub fn writes(f: &Finished) -> bool {
    match &f.effect {
        Effect::Replies(r) => !r.is_empty(),
        Effect::DeadLetter(_) => true,
        Effect::Vanished => false,
    }
}

/// Decodes the commit's reply: one verdict per message, in order. (A plain XACK, sent when nothing
/// is written, answers with a count: every message of it is committed.)
pub fn decode(value: Value, expected: usize) -> Result<Vec<Committed>, String> {
    if let Value::Int(_) = value {
        return Ok(vec![Committed::Yes; expected]);
    }
    let Value::Array(items) = value else {
        return Err(format!("expected an array of verdicts, got {value:?}"));
    };
    if items.len() != expected {
        return Err(format!("expected {expected} verdicts, got {}", items.len()));
    }
    items
        .iter()
        .map(|v| match v {
            Value::Int(1) => Ok(Committed::Yes),
            Value::Int(0) => Ok(Committed::NotOurs),
            Value::Int(-1) => Ok(Committed::Denied),
            other => Err(format!("unexpected verdict {other:?}")),
        })
        .collect()
}
