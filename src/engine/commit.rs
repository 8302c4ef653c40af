//! Committing outcomes: replies and the ack in one atomic step, only while this consumer owns the entry.
//!
//! Owns the server-side script of DESIGN §2. For each finished message it checks with XPENDING that the
//! entry is still pending *for this consumer*; only then does it XADD the message's replies (or its
//! dead-letter copy) and XACK it. A Lua script runs atomically, so a message claimed away while its
//! handler was slow yields exactly one set of replies — whoever commits first wins, the other's commit
//! is a no-op — and a crash leaves either everything or nothing. Many messages share one script call.
//! When and over which connection a batch travels is [`super::consumer`]'s business.

use std::sync::Arc;

use redis::{Cmd, Value};

use super::handler::{Message, Reply};
use crate::dlq;
use crate::envelope::{self, Fields};

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

/// Builds commit script calls for one consumer of one group.
pub struct Committer {
    pub stream: Arc<str>,
    pub group: String,
    pub consumer: String,
    /// `_source` of replies: the daemon's identity.
    pub source: String,
    pub dead_letter: String,
}

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

/// KEYS[1] source stream, KEYS[2..] streams written. ARGV: group, consumer, message count, then per
/// message: id, write count, then per write: key index, field count, name, value, …
/// Returns one integer per message: 1 committed, 0 not ours, -1 a write the ACL forbids.
///
/// A message with writes is committed only while it is pending for this consumer (one XPENDING over
/// the batch's range answers that for all of them), and every write is checked against the ACL before
/// any is made (scripts are atomic but not rolled back). A message without writes (a handler that
/// published nothing, an entry that vanished) is simply acked: whoever commits it first decides its
/// effects, and "none" is a complete set. All acks of the batch go in one XACK.
pub const SOURCE: &str = r#"
local src, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local n = tonumber(ARGV[3])
-- First pass: which messages write, and the id range they span.
local i, lo, hi = 4, nil, nil
local writers = 0
for m = 1, n do
  local id, writes = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  if writes > 0 then
    writers = writers + 1
    if lo == nil then lo = id end
    hi = id
  end
  for w = 1, writes do
    i = i + 2 + 2 * tonumber(ARGV[i + 1])
  end
end
-- This consumer's pending entries in that range, in one XPENDING.
local mine = {}
if writers > 0 then
  for _, p in ipairs(redis.call('XPENDING', src, group, lo, hi, writers * 2 + 16, consumer)) do
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
-- Second pass: write and collect what to ack.
local out, ack = {}, {}
i = 4
for m = 1, n do
  local id, writes = ARGV[i], tonumber(ARGV[i + 1])
  local first = i + 2
  local verdict = 1
  if writes > 0 then
    verdict = mine[id] and 1 or 0
    i = first
    for w = 1, writes do
      local key, nf = KEYS[tonumber(ARGV[i])], tonumber(ARGV[i + 1])
      if verdict == 1 and not may_write(key) then verdict = -1 end
      i = i + 2 + 2 * nf
    end
    if verdict == 1 then
      i = first
      for w = 1, writes do
        local key, nf = KEYS[tonumber(ARGV[i])], tonumber(ARGV[i + 1])
        i = i + 2
        redis.call('XADD', key, '*', unpack(ARGV, i, i + 2 * nf - 1))
        i = i + 2 * nf
      end
    end
  end
  i = first
  for w = 1, writes do
    i = i + 2 + 2 * tonumber(ARGV[i + 1])
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
    /// The EVALSHA command committing `batch`, in order. `sha` is [`script`]'s hash. Messages that write
    /// (replies or a dead letter) must be in stream-id order: the script checks ownership over their range.
    pub fn command(&self, sha: &str, batch: &[Finished]) -> Cmd {
        // Nothing to write: a plain XACK is all it takes, and much cheaper for Redis than the script.
        if batch.iter().all(|f| !writes(f)) {
            let mut cmd = redis::cmd("XACK");
            cmd.arg(&*self.stream).arg(&self.group);
            for f in batch {
                cmd.arg(&f.msg.id);
            }
            return cmd;
        }
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

        let now = envelope::now_ms().to_string();
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(sha).arg(keys.len()).arg(&keys);
        cmd.arg(&self.group).arg(&self.consumer).arg(batch.len());
        for f in batch {
            let writes: Vec<(usize, Fields)> = match &f.effect {
                Effect::Replies(replies) => replies
                    .iter()
                    .map(|r| (index(&r.stream), self.stamp_reply(&f.msg, r, &now)))
                    .collect(),
                Effect::DeadLetter(reason) => {
                    vec![(
                        index(&self.dead_letter),
                        self.dead_letter_fields(f, reason, &now),
                    )]
                }
                Effect::Vanished => Vec::new(),
            };
            cmd.arg(&f.msg.id).arg(writes.len());
            for (i, fields) in &writes {
                cmd.arg(*i).arg(fields.len());
                for (name, value) in fields.iter() {
                    cmd.arg(name).arg(value);
                }
            }
        }
        cmd
    }

    fn stamp_reply(&self, msg: &Message, reply: &Reply, now: &str) -> Fields {
        let mut fields = reply.fields.clone();
        fields.set(envelope::TIMESTAMP, now);
        fields.set(envelope::SOURCE, self.source.as_str());
        if fields.get(envelope::TRACE_ID).is_none() {
            match msg.fields.get(envelope::TRACE_ID) {
                Some(t) => fields.set(envelope::TRACE_ID, t.to_vec()),
                None => fields.set(envelope::TRACE_ID, envelope::new_trace_id()),
            }
        }
        fields.set(envelope::CAUSE, format!("{}/{}", self.stream, msg.id));
        fields
    }

    fn dead_letter_fields(&self, f: &Finished, reason: &str, now: &str) -> Fields {
        let msg = &f.msg;
        let mut fields = msg.fields.clone();
        fields.set(dlq::REASON, reason);
        fields.set(dlq::SOURCE, format!("{}/{}", self.stream, msg.id));
        fields.set(dlq::DELIVERIES, msg.deliveries.to_string());
        fields.set(dlq::HANDLER, f.handler.as_bytes().to_vec());
        fields.set(dlq::TIMESTAMP, now);
        fields
    }
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
