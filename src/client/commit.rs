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

use super::slot;
use crate::auth::signature;
use crate::model::dead_letter as dlq;
use crate::model::decided::{Committed, Effect, Finished};
use crate::model::envelope::{self, Fields};
use crate::model::message::{Message, Once, Reply, ReplyKind};

/// The most values one XADD in the script may take: Lua's `unpack` stops near 8,000 (the script
/// checks the same bound and refuses a larger write before anything is written).
pub const MAX_WRITE_VALUES: usize = 7900;

/// The most arguments the script adds around one write's values: XADD's key and id and the
/// envelope pairs it writes itself (`_outbox_to`, `_outbox_reply`, `_outbox_due`, `_timestamp`,
/// `_source`, `_trace_id`, `_cause`).
const WRITE_OVERHEAD: usize = 16;

// The widest entry or reply `[limits]` allows, with the envelope or the dead-letter record (at most 10
// pairs) and what the script adds, is one write.
const _: () =
    assert!(2 * (crate::model::limits::MAX_FIELDS + 10) + WRITE_OVERHEAD <= MAX_WRITE_VALUES);

/// The first field of an outbox entry whose fields follow as they are: a dead letter, or a reply
/// committed by a daemon before replies were packed ([`super::outbox`]). Its value is the stream the
/// entry goes to.
pub const OUTBOX_TARGET: &str = "_outbox_target";
/// The first field of a packed outbox reply: the stream it goes to. A name of its own, so that a relay
/// of an older version, which knows only [`OUTBOX_TARGET`], leaves such an entry pending for a relay
/// that can unpack it rather than deliver the packed field as the reply.
pub const OUTBOX_TO: &str = "_outbox_to";
/// The last field of a packed outbox reply: the reply, its envelope then its own fields, encoded as
/// [`super::delayed::encode`] does. One value instead of two per field: the commit script and the
/// relay's read each handle the reply once, not field by field. (Replies committed before the
/// envelope was packed too carry it as fields before this one; the relay takes both.)
pub const OUTBOX_FIELDS: &str = "_outbox_fields";
/// The second field of an outbox reply: its index among its message's replies ([`super::outbox`]).
pub const OUTBOX_REPLY: &str = "_outbox_reply";
/// The third field of a delayed reply in the outbox: when it is due, ms since the epoch.
pub const OUTBOX_DUE: &str = "_outbox_due";

/// The outbox of writes committed from `source` to streams in other cluster slots: a stream in
/// `source`'s slot, emptied by the relay ([`super::outbox`]).
pub fn outbox_of(source: &str) -> String {
    slot::beside(source, "redstream:outbox:", "")
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
    /// On a cluster: the source's slot, its outbox (where writes to other slots go), and which node
    /// served each slot when last asked (replies to a slot of the source's own node may be written
    /// in place: kind 9).
    cluster: Option<(u16, String, Arc<slot::SlotMap>)>,
}

/// One commit, built by [`Committer::command`]: the script call, or a plain XACK when nothing is
/// written. Only the client sends it — on the shared connection ([`super::Client::commit`]) or in
/// front of a group read ([`super::reader::GroupReader::round`]).
#[derive(Clone, Debug)]
pub struct CommitCall(pub(super) Cmd);

/// KEYS[1] source stream, KEYS[2..] streams written. ARGV: group, consumer, message count, layout,
/// first and last id of the messages that write, XPENDING count, `_timestamp`, `_source`; then per
/// message its id followed by the values of each of its writes.
/// The layout says how those arguments divide, two bytes per number (big-endian), so the script never
/// parses numbers from text: per message its write count, then per write the key index, the number
/// of values it takes from ARGV, and one byte for its kind: 1 a reply (its `_trace_id` value, then
/// its own field pairs; the script writes `_timestamp`, `_source`, `_trace_id` and `_cause` =
/// `<source stream>/<id>` first), 3 a reply to the outbox (the target's name and the reply's index
/// among the message's replies, written as `_outbox_to` and `_outbox_reply` — the relay's dedupe names
/// the effect by cause and index —, then `_outbox_fields` and the reply packed: the envelope kind 1
/// writes, then its own fields), 0 an entry complete as given (dead letters), 2 a signed message's use
/// marker (the owning entry and its relative expiry: SET NX PX; always the message's first write),
/// 4 a delayed reply held beside its stream (its key is the target stream, its values the due set,
/// the fields hash, its member — `<cause>#<index>` —, its due time and its whole entry encoded,
/// envelope included; [`super::delayed`]), 5 a delayed reply to the outbox (as 3, with its due time
/// after the index, written as `_outbox_due`), 9 a reply to another slot that the source's node
/// served when last asked (its key is the outbox; its values the target's name and the reply's index,
/// then kind 1's: written to the target as kind 1 if the node serves it — the script may touch a key
/// of another slot on its own node — and the outbox holds nothing that it could overtake, else to the
/// outbox as `_outbox_target`, `_outbox_reply`, the envelope and the fields), 6 a handler's state key set (its value and its time
/// to live in ms, empty for none), 7 a state key deleted (no values), 8 a state key the handler read
/// (not a write: `1` and the SHA-1 of the value it read, or `0` for none; checked before anything is
/// written). What the batch shares — the envelope's time and
/// source, the cause's prefix — travels once.
///
/// Returns per message: 1 committed, 0 not ours, 2 not tried, or `{code, key, detail}`: -1 the ACL
/// refuses a write to `key`, -2 `key` holds another type (`detail`), -3 the entry for `key` is too
/// large for one script call, -4 Redis refused the write for a reason of the whole server (out of
/// memory, read-only…: `detail`; nothing of the message written, the batch's later writers not
/// tried), -6 Redis refused the write to this key (e.g. its ids are exhausted: `detail`; nothing of
/// the message written, the others go on), -5 a later write of the message failed after earlier ones
/// were made (`detail`; the message is acked), -8 a key holding delayed replies, or a state key,
/// holds another type (`detail`: `<its type>/<the type needed>`), -9 a state key the handler read
/// changed since (or an earlier message of the batch writes it): nothing written, run it again.
///
/// Scripts are atomic but never rolled back, so the script runs in two passes. The first, before
/// anything is written, decides every message's fate from the checks: that the entry is still
/// pending for this consumer (one XPENDING over the batch's range answers that for all), that the
/// ACL allows each target, that each target is a stream or does not exist, and that each entry fits
/// in one call; the final XACK's permission is checked before that. The second makes the writes, each
/// under `pcall`: when Redis refuses one, the script records it and goes on (or, for a server-wide
/// refusal, stops writing), acks what it completed and reports the rest — it never ends with writes
/// made and unacked, which a retry would write twice. An error reply from the script therefore means
/// nothing was written. A message without writes (a handler that published nothing, an entry that
/// vanished) is simply acked: whoever commits it first decides its effects, and "none" is a complete
/// set. All acks of the batch go in one XACK at the end, which never needs memory.
///
/// Both passes walk the arguments the same way and keep nothing per message but its verdict: the
/// script's cost is mostly Redis's own per argument and per call (docs/performance.md, "Where the
/// commit's time goes"), so it does no per-message allocation it can avoid.
pub const SOURCE: &str = r#"
local src, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local n, layout = tonumber(ARGV[3]), ARGV[4]
local REGISTRY = 'redstream:delayed'
local ts, source = ARGV[8], ARGV[9]
local byte, find, unpack = string.byte, string.find, unpack
local cause = src .. '/'
-- Lua's unpack stops near 8,000 values: one XADD must stay below it, with the script's own
-- arguments around a write's values (key, id, envelope: at most OVERHEAD).
local MAX_VALUES, OVERHEAD = 7900, 16
-- Errors about the server, not about one key: the batch stops writing and is retried later.
local function global(err)
  for _, code in ipairs({'OOM', 'MISCONF', 'READONLY', 'NOREPLICAS', 'BUSY', 'LOADING', 'MASTERDOWN'}) do
    if find(err, '^' .. code) then return true end
  end
  return false
end
-- The final XACK must not fail after writes were made: its permission is checked first.
if not redis.acl_check_cmd('XACK', src, group, '0-0') then
  return redis.error_reply('NOPERM this user may not XACK ' .. src)
end
-- This consumer's pending entries in the writers' range, in one XPENDING.
local mine = {}
if ARGV[5] ~= '' then
  for _, p in ipairs(redis.call('XPENDING', src, group, ARGV[5], ARGV[6], ARGV[7], consumer)) do
    mine[p[1]] = true
  end
end
-- Per target, checked once per call: false when a write may go there, else the refusal.
local checked = {}
local function refusal(key)
  local r = false
  if not redis.acl_check_cmd('XADD', key, '*', 'f', 'v') then
    r = {-1, key, ''}
  else
    local kind = redis.call('TYPE', key)['ok']
    if kind ~= 'stream' and kind ~= 'none' then r = {-2, key, kind} end
  end
  checked[key] = r
  return r
end
-- A delayed reply's keys (its target checked as for any write): the due set, the fields hash and
-- the registry of streams holding any must take the writes. False when they do, else the refusal.
local function held_refusal(dk, fk)
  local r = false
  for _, k in ipairs({{{'ZADD', dk, '0', 'm'}, 'zset'}, {{'HSET', fk, 'm', 'v'}, 'hash'},
      {{'SADD', REGISTRY, 'm'}, 'set'}}) do
    local cmd, want = k[1], k[2]
    if not redis.acl_check_cmd(unpack(cmd)) then
      r = {-1, cmd[2], ''}
      break
    end
    local kind = redis.call('TYPE', cmd[2])['ok']
    if kind ~= want and kind ~= 'none' then
      r = {-8, cmd[2], kind .. '/' .. want}
      break
    end
  end
  checked[dk] = r
  return r
end
-- State keys written by messages of this batch whose verdict is to commit.
local touched = {}
-- A state key: SET and DEL allowed, a string or nothing. False when it is, else the refusal.
local function state_refusal(key)
  local r = false
  if not redis.acl_check_cmd('SET', key, 'v') or not redis.acl_check_cmd('DEL', key) then
    r = {-1, key, ''}
  else
    local kind = redis.call('TYPE', key)['ok']
    if kind ~= 'string' and kind ~= 'none' then r = {-8, key, kind .. '/string'} end
  end
  checked[key] = r
  return r
end
-- A signature's use marker (a string key holding the owning entry): nil when this message may
-- take it, else the refusal; -7 when another entry took effect with the same signature.
local owners = {}
local function replayed(key, owner)
  local prior = owners[key]
  if prior == nil then
    if not redis.acl_check_cmd('SET', key, owner) then return {-1, key, ''} end
    local kind = redis.call('TYPE', key)['ok']
    if kind == 'none' then
      prior = false
    elseif kind ~= 'string' then
      return {-2, key, kind}
    else
      prior = redis.call('GET', key)
    end
  end
  if prior and prior ~= owner then return {-7, key, prior} end
  return nil
end
-- A key of another slot (kind 9's target): false when this node serves it and a write may go
-- there, 'elsewhere' when it does not (Redis refuses a script a key of another node: the reply
-- goes through the outbox), else the refusal — as for a reply in the source's slot.
local function here(key)
  local r = 'elsewhere'
  local kind = redis.pcall('TYPE', key)
  if not kind['err'] then
    if not redis.acl_check_cmd('XADD', key, '*', 'f', 'v') then
      r = {-1, key, ''}
    elseif kind['ok'] ~= 'stream' and kind['ok'] ~= 'none' then
      r = {-2, key, kind['ok']}
    else
      r = false
    end
  end
  checked[key] = r
  return r
end
-- Whether an outbox holds nothing: a reply is written in place (kind 9) only then, or it could
-- overtake replies of earlier messages still waiting there. False once this call writes to it.
local empty = {}
local function empty_outbox(key)
  if empty[key] == nil then empty[key] = redis.call('XLEN', key) == 0 end
  return empty[key]
end
-- Pass 1, before anything is written: every message's verdict from the checks. (Both passes walk
-- the arguments the same way; nothing per message is kept but the verdict.)
local verdicts = {}
local a, l = 10, 1
for m = 1, n do
  local hi, lo = byte(layout, l, l + 1)
  local writes, verdict = hi * 256 + lo, 1
  if writes > 0 and not mine[ARGV[a]] then verdict = 0 end
  a, l = a + 1, l + 2
  local marks, states
  for w = 1, writes do
    local k1, k2, c1, c2, kind = byte(layout, l, l + 4)
    local key, count = KEYS[k1 * 256 + k2], c1 * 256 + c2
    if verdict == 1 then
      if count + OVERHEAD > MAX_VALUES then
        verdict = {-3, key, tostring(count + OVERHEAD)}
      elseif kind == 1 or kind == 3 then
        -- A reply (the common case, first).
        local r = checked[key]
        if r == nil then r = refusal(key) end
        verdict = r or 1
      elseif kind == 9 then
        -- A reply to another slot, in place if this node serves it, else (or if the outbox holds
        -- something) through the outbox: both must be able to take it.
        local r = checked[key]
        if r == nil then r = refusal(key) end
        if not r then
          r = checked[ARGV[a]]
          if r == nil then r = here(ARGV[a]) end
          if r == 'elsewhere' then r = false end
        end
        verdict = r or 1
      elseif kind == 2 then
        marks = marks or {}
        marks[#marks + 1] = {key, ARGV[a]}
        verdict = replayed(key, ARGV[a]) or 1
      elseif kind >= 6 then
        -- A state key: written (6, 7) or read (8). A read must be unchanged since, and not written
        -- by an earlier message of this batch (whose writes come in the second pass), or the
        -- message runs again.
        local r = checked[key]
        if r == nil then r = state_refusal(key) end
        if r then
          verdict = r
        elseif kind == 8 then
          local now = redis.call('GET', key)
          if touched[key] or (ARGV[a] == '1') ~= (now ~= false)
              or (now and redis.sha1hex(now) ~= ARGV[a + 1]) then
            verdict = {-9, key, ''}
          end
        else
          states = states or {}
          states[#states + 1] = key
        end
      else
        -- A dead letter (0), a delayed reply held (4) or sent to the outbox (5).
        local r = checked[key]
        if r == nil then r = refusal(key) end
        if not r and kind == 4 then
          r = checked[ARGV[a]]
          if r == nil then r = held_refusal(ARGV[a], ARGV[a + 1]) end
        end
        verdict = r or 1
      end
    end
    a, l = a + count, l + 5
  end
  if marks and verdict == 1 then
    for _, mark in ipairs(marks) do owners[mark[1]] = mark[2] end
  end
  if states and verdict == 1 then
    for _, key in ipairs(states) do touched[key] = true end
  end
  verdicts[m] = verdict
end
-- Pass 2: the writes, each under pcall, so no error can end the script with writes unacked.
local out, ack, acks = {}, {}, 0
local broken = false
a, l = 10, 1
for m = 1, n do
  local hi, lo = byte(layout, l, l + 1)
  local writes, verdict, id = hi * 256 + lo, verdicts[m], ARGV[a]
  a, l = a + 1, l + 2
  if writes > 0 and verdict == 1 and broken then verdict = 2 end
  local w = 1
  if verdict == 1 then
    while w <= writes do
      local k1, k2, c1, c2, kind = byte(layout, l, l + 4)
      local key, last = KEYS[k1 * 256 + k2], a + c1 * 256 + c2 - 1
      local r
      if kind == 1 then
        r = redis.pcall('XADD', key, '*', '_timestamp', ts, '_source', source, '_trace_id', ARGV[a],
          '_cause', cause .. id, unpack(ARGV, a + 1, last))
      elseif kind == 9 then
        local target = ARGV[a]
        if checked[target] == false and empty_outbox(key) then
          r = redis.pcall('XADD', target, '*', '_timestamp', ts, '_source', source, '_trace_id',
            ARGV[a + 2], '_cause', cause .. id, unpack(ARGV, a + 3, last))
        else
          -- As every outbox entry was before replies were packed: the relay takes it as it is.
          r = redis.pcall('XADD', key, '*', '_outbox_target', target, '_outbox_reply', ARGV[a + 1],
            '_timestamp', ts, '_source', source, '_trace_id', ARGV[a + 2], '_cause', cause .. id,
            unpack(ARGV, a + 3, last))
          empty[key] = false
        end
      elseif kind == 3 then
        r = redis.pcall('XADD', key, '*', '_outbox_to', ARGV[a], '_outbox_reply', ARGV[a + 1],
          unpack(ARGV, a + 2, last))
        empty[key] = false
      elseif kind == 2 then
        r = redis.pcall('SET', key, ARGV[a], 'NX', 'PX', ARGV[a + 1])
      elseif kind == 4 then
        -- The registry first (a name without messages is harmless), then the fields, then the due
        -- time that makes the message live: after the first write Redis refuses none for memory.
        r = redis.pcall('SADD', REGISTRY, key)
        if not (type(r) == 'table' and r.err) then r = redis.pcall('HSET', ARGV[a + 1], ARGV[a + 2], ARGV[a + 4]) end
        if not (type(r) == 'table' and r.err) then r = redis.pcall('ZADD', ARGV[a], ARGV[a + 3], ARGV[a + 2]) end
      elseif kind == 6 then
        if ARGV[a + 1] == '' then
          r = redis.pcall('SET', key, ARGV[a])
        else
          r = redis.pcall('SET', key, ARGV[a], 'PX', ARGV[a + 1])
        end
      elseif kind == 7 then
        r = redis.pcall('DEL', key)
      elseif kind == 8 then
        r = 1
      elseif kind == 5 then
        r = redis.pcall('XADD', key, '*', '_outbox_to', ARGV[a], '_outbox_reply', ARGV[a + 1],
          '_outbox_due', ARGV[a + 2], unpack(ARGV, a + 3, last))
        empty[key] = false
      else
        r = redis.pcall('XADD', key, '*', unpack(ARGV, a, last))
        empty[key] = false
      end
      if type(r) == 'table' and r.err then
        if w > 1 then
          verdict = {-5, key, r.err}
        elseif global(r.err) then
          broken = true
          verdict = {-4, key, r.err}
        else
          verdict = {-6, key, r.err}
        end
        break
      end
      a, l, w = last + 1, l + 5, w + 1
    end
  end
  -- The arguments of writes not made.
  while w <= writes do
    local c1, c2 = byte(layout, l + 2, l + 3)
    a, l, w = a + c1 * 256 + c2, l + 5, w + 1
  end
  if verdict == 1 or (verdict ~= 0 and verdict ~= 2 and verdict[1] == -5) then
    acks = acks + 1
    ack[acks] = id
  end
  out[m] = verdict
end
for c = 1, acks, 1000 do
  redis.call('XACK', src, group, unpack(ack, c, math.min(c + 999, acks)))
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
        cluster: Option<Arc<slot::SlotMap>>,
    ) -> Committer {
        Committer {
            cluster: cluster.map(|map| (slot::of(&stream), outbox_of(&stream), map)),
            stream,
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            source: source.to_owned(),
            dead_letter: dead_letter.to_owned(),
        }
    }

    /// Where a write to `key` goes: the key itself, or (`true`) on a cluster where `key` is in
    /// another slot than the source, the source's outbox.
    pub fn place<'a>(&'a self, key: &'a str) -> (&'a str, bool) {
        match &self.cluster {
            Some((source, outbox, _)) if slot::of(key) != *source => (outbox, true),
            _ => (key, false),
        }
    }

    /// Where a reply is written and as what kind of write (see [`SOURCE`]): to its stream (1), to the
    /// outbox (3) — or, when the source's node served the stream's slot when last asked, to the
    /// stream if the node still does and the outbox is empty, else to the outbox (9) —, held beside
    /// its stream when delayed (4) — or, delayed on a cluster, to the outbox whatever its slot (5):
    /// the registry of streams holding delayed messages is a key of its own slot, which only the
    /// relay can write.
    /// A change of state goes to its key (6 set, 7 delete): on a cluster, `check` has made sure the
    /// handler's namespace is in the slot of every stream routed to it.
    fn route<'a>(&'a self, r: &'a Reply) -> (&'a str, u8) {
        match (&self.cluster, r.kind) {
            (_, ReplyKind::StateSet { .. }) => (&r.stream, 6),
            (_, ReplyKind::StateRemove) => (&r.stream, 7),
            (_, ReplyKind::StateRead { .. }) => (&r.stream, 8),
            (Some((_, outbox, _)), ReplyKind::Delayed(_)) => (outbox, 5),
            (_, ReplyKind::Delayed(_)) => (&r.stream, 4),
            (Some((source, outbox, map)), ReplyKind::Now) if slot::of(&r.stream) != *source => {
                if map.same_node(*source, slot::of(&r.stream)) {
                    (outbox, 9)
                } else {
                    (outbox, 3)
                }
            }
            (_, ReplyKind::Now) => (&r.stream, 1),
        }
    }

    /// The EVALSHA command committing `batch`, in order. `sha` is [`script`]'s hash. Messages that write
    /// (replies or a dead letter) must be in stream-id order: the script checks ownership over their
    /// range. `in_flight` bounds how many of this consumer's entries that range may hold.
    pub fn command(&self, sha: &str, batch: &[Finished], in_flight: usize) -> CommitCall {
        #[cfg(feature = "fault-injection")]
        if let Ok(field) = std::env::var("RSFAULT_COMMIT_REFUSE")
            && batch.iter().any(|f| {
                matches!(f.effect, Effect::Replies(_)) && f.msg.fields.get(&field).is_some()
            })
        {
            // A failpoint for the isolation test: a batch holding a message with this field is one
            // Redis refuses as a whole, with nothing written.
            let mut refused = redis::cmd("EVAL");
            refused
                .arg("return redis.error_reply('ERR injected: Redis refuses this commit')")
                .arg(0);
            return CommitCall(refused);
        }
        CommitCall(self.build(sha, batch, in_flight))
    }

    fn build(&self, sha: &str, batch: &[Finished], in_flight: usize) -> Cmd {
        // Nothing to write: a plain XACK is all it takes, and much cheaper for Redis than the script.
        let mut writers = batch.iter().filter(|f| f.writes_anything());
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
        let markers: Vec<Option<String>> = batch.iter().map(|f| self.marker(f)).collect();
        for (f, marker) in batch.iter().zip(&markers) {
            let written: Box<dyn Iterator<Item = &str>> = match &f.effect {
                Effect::Replies(replies) => Box::new(replies.iter().map(|r| self.route(r).0)),
                Effect::DeadLetter(_) | Effect::TooLarge(_) => {
                    Box::new(std::iter::once(self.place(&self.dead_letter).0))
                }
                Effect::Vanished => Box::new(std::iter::empty()),
            };
            for k in marker.as_deref().into_iter().chain(written) {
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
        for (f, marker) in batch.iter().zip(&markers) {
            let marked = usize::from(marker.is_some());
            if let Some(key) = marker {
                // The marker goes first: if Redis refuses it, nothing of the message is written.
                put(&mut layout, f.writes() + 1);
                put(&mut layout, index(key));
                put(&mut layout, 2);
                layout.push(2);
            }
            let put_reply = |layout: &mut Vec<u8>, r: &Reply| {
                let (key, kind) = self.route(r);
                put(layout, index(key));
                put(
                    layout,
                    match kind {
                        // Through the outbox: the target's name and the reply's index come first
                        // (and a delayed one's due time), then the packed reply.
                        3 => PACKED_VALUES + 2,
                        // The target's name and the reply's index, then the reply as kind 1's.
                        9 => reply_values(r) + 2,
                        5 => PACKED_VALUES + 3,
                        4 => HELD_VALUES,
                        // The value and its time to live (empty for none).
                        6 => 2,
                        7 => 0,
                        // Whether a value was read, and its SHA-1.
                        8 => 2,
                        _ => reply_values(r),
                    },
                );
                layout.push(kind);
            };
            let put_dead_letter = |layout: &mut Vec<u8>, fields: &Fields| {
                let (key, via) = self.place(&self.dead_letter);
                put(layout, index(key));
                put(layout, 2 * (fields.len() + 1 + usize::from(via)));
                layout.push(0);
            };
            // The marker's write is counted with the message's writes above.
            match &f.effect {
                Effect::Replies(replies) => {
                    if marked == 0 {
                        put(&mut layout, replies.len());
                    }
                    for r in replies {
                        put_reply(&mut layout, r);
                    }
                }
                Effect::DeadLetter(_) | Effect::TooLarge(_) => {
                    if marked == 0 {
                        put(&mut layout, 1);
                    }
                    let fields = self.dead_letter_fields(f);
                    put_dead_letter(&mut layout, &fields);
                    dead_letters.push(fields);
                }
                Effect::Vanished => put(&mut layout, 0),
            }
        }

        let now_ms = envelope::now_ms();
        let now = now_ms.to_string();
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
            if let Some(once) = self.once(f) {
                cmd.arg(format!("{}/{}", self.stream, f.msg.id))
                    .arg(signature::marker_ttl_ms(once.until_ms, now_ms));
            }
            match &f.effect {
                Effect::Replies(replies) => {
                    for (i, r) in replies.iter().enumerate() {
                        let kind = self.route(r).1;
                        if let ReplyKind::StateSet { ttl_ms } = r.kind {
                            let value = r.fields.iter().next().map_or(&[][..], |(_, v)| v);
                            cmd.arg(value)
                                .arg(ttl_ms.map_or_else(String::new, |ms| ms.to_string()));
                            continue;
                        }
                        if let ReplyKind::StateRead { found } = r.kind {
                            let value = r.fields.iter().next().map_or(&[][..], |(_, v)| v);
                            cmd.arg(if found { "1" } else { "0" })
                                .arg(sha1_smol::Sha1::from(value).digest().to_string());
                            continue;
                        }
                        if kind == 7 {
                            continue;
                        }
                        let due = r.kind.due().map(|d| d.at(now_ms));
                        if let (4, Some(due)) = (kind, due) {
                            self.held_args(&mut cmd, &f.msg, r, i, due, &now);
                            continue;
                        }
                        if kind == 3 || kind == 5 {
                            cmd.arg(&r.stream).arg(i);
                            if let (5, Some(due)) = (kind, due) {
                                cmd.arg(due);
                            }
                            self.packed_args(&mut cmd, &f.msg, r, &now);
                        } else if kind == 9 {
                            cmd.arg(&r.stream).arg(i);
                            self.reply_args(&mut cmd, &f.msg, r);
                        } else {
                            self.reply_args(&mut cmd, &f.msg, r);
                        }
                    }
                }
                Effect::DeadLetter(_) | Effect::TooLarge(_) => {
                    let fields = dead_letters.next().expect("one per dead letter");
                    if self.place(&self.dead_letter).1 {
                        cmd.arg(OUTBOX_TARGET).arg(&self.dead_letter);
                    }
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

    /// The signature whose use this message's commit records, if any: a verified signed message that
    /// takes effect (replies or a dead letter).
    fn once<'a>(&self, f: &'a Finished) -> Option<&'a Once> {
        match f.effect {
            Effect::Vanished => None,
            _ => f.msg.sender.as_ref()?.once.as_ref(),
        }
    }

    /// The key of this message's signature-use marker, if it has one.
    fn marker(&self, f: &Finished) -> Option<String> {
        self.once(f)
            .map(|once| signature_key(&self.stream, &self.group, &once.jti, self.cluster.is_some()))
    }

    /// A reply's values for the script: its `_trace_id`, then its fields without the envelope (the
    /// script writes that). [`reply_values`] of them.
    fn reply_args(&self, cmd: &mut Cmd, msg: &Message, reply: &Reply) {
        cmd.arg(trace_of(msg, reply).as_ref());
        for (name, value) in own_fields(reply) {
            cmd.arg(name).arg(value);
        }
    }

    /// A reply's values for the script on its way through the outbox ([`PACKED_VALUES`]):
    /// [`OUTBOX_FIELDS`] and the reply packed, its envelope first ([`Committer::envelope`]) — the
    /// script and the relay's read handle one value, where the reply written in place takes two per
    /// field.
    fn packed_args(&self, cmd: &mut Cmd, msg: &Message, reply: &Reply, now: &str) {
        let envelope = self.envelope(msg, reply, now);
        cmd.arg(OUTBOX_FIELDS).arg(super::delayed::encode(
            envelope.iter().chain(own_fields(reply)),
        ));
    }

    /// The envelope the script writes before a reply's own fields (kind 1), for a reply written
    /// packed: `_timestamp`, `_source`, `_trace_id`, `_cause` = `<source stream>/<id>`.
    fn envelope(&self, msg: &Message, reply: &Reply, now: &str) -> Fields {
        let mut entry = Fields::with_capacity(4);
        entry.push(envelope::TIMESTAMP, now);
        entry.push(envelope::SOURCE, self.source.as_str());
        entry.push(envelope::TRACE_ID, trace_of(msg, reply).into_owned());
        entry.push(envelope::CAUSE, format!("{}/{}", self.stream, msg.id));
        entry
    }

    /// A delayed reply's values for the script ([`HELD_VALUES`]): its due set, fields hash, member
    /// (`<cause>#<index>`, the name the relay's dedupe gives the same effect), due time, and its whole
    /// entry with the envelope the script would have written, encoded ([`super::delayed::encode`]).
    fn held_args(
        &self,
        cmd: &mut Cmd,
        msg: &Message,
        reply: &Reply,
        index: usize,
        due: u64,
        now: &str,
    ) {
        let entry = self.envelope(msg, reply, now);
        cmd.arg(super::delayed::due_key(&reply.stream))
            .arg(super::delayed::fields_key(&reply.stream))
            .arg(format!("{}/{}#{index}", self.stream, msg.id))
            .arg(due)
            .arg(super::delayed::encode(
                entry.iter().chain(own_fields(reply)),
            ));
    }

    /// A dead letter's fields but `_dlq_timestamp` (which goes last, with the batch's time): the
    /// original fields and the `_dlq_*` record — or, for a message too wide to copy in one write or
    /// over the consumer's limits, the record alone with `_dlq_fields_omitted` (the original stays
    /// readable at `_dlq_source` until retention removes it).
    fn dead_letter_fields(&self, f: &Finished) -> Fields {
        let msg = &f.msg;
        let copy = 2 * (msg.fields.len() + 6) + WRITE_OVERHEAD <= MAX_WRITE_VALUES;
        let mut fields = match &f.effect {
            Effect::TooLarge(size) => {
                let mut by_reference = Fields::with_capacity(8);
                by_reference.push(dlq::FIELDS_OMITTED, size.fields.to_string());
                by_reference.push(dlq::SIZE, size.bytes.to_string());
                by_reference.push(dlq::REASON, dlq::TOO_LARGE);
                by_reference
            }
            Effect::DeadLetter(reason) if copy => {
                let mut all = msg.fields.clone();
                all.set(dlq::REASON, reason.as_str());
                all
            }
            Effect::DeadLetter(reason) => {
                let mut by_reference = Fields::with_capacity(6);
                by_reference.push(dlq::FIELDS_OMITTED, msg.fields.len().to_string());
                by_reference.push(dlq::REASON, reason.as_str());
                by_reference
            }
            Effect::Replies(_) | Effect::Vanished => Fields::new(),
        };
        fields.set(dlq::SOURCE, format!("{}/{}", self.stream, msg.id));
        fields.set(dlq::DELIVERIES, msg.deliveries.to_string());
        fields.set(dlq::HANDLER, f.handler.as_bytes().to_vec());
        match &msg.sender {
            Some(sender) => fields.set(dlq::SENDER, sender.subject.as_str()),
            None => fields.remove(dlq::SENDER),
        }
        fields.remove(dlq::TIMESTAMP);
        fields
    }
}

/// The values of a delayed reply held beside its stream (kind 4): [`Committer::held_args`].
const HELD_VALUES: usize = 5;

/// A reply's `_trace_id`: the handler's, else the source message's, else a new one.
fn trace_of<'a>(msg: &'a Message, reply: &'a Reply) -> std::borrow::Cow<'a, [u8]> {
    reply
        .fields
        .get(envelope::TRACE_ID)
        .filter(|v| !v.is_empty())
        .or_else(|| msg.fields.get(envelope::TRACE_ID).filter(|v| !v.is_empty()))
        .map_or_else(
            || std::borrow::Cow::Owned(envelope::new_trace_id().into_bytes()),
            std::borrow::Cow::Borrowed,
        )
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

/// How many values [`Committer::packed_args`] passes for a reply: the packed fields' name and
/// their value.
const PACKED_VALUES: usize = 2;

/// A reply's own fields: all but the envelope, which the commit writes itself.
fn own_fields(reply: &Reply) -> impl Iterator<Item = (&[u8], &[u8])> {
    reply
        .fields
        .iter()
        .filter(|(n, _)| envelope_field(n).is_none())
}

/// How many values [`Committer::reply_args`] passes for `reply`: the trace id, then its own field
/// pairs.
fn reply_values(reply: &Reply) -> usize {
    1 + 2 * own_fields(reply).count()
}

/// Where the use of signature `jti` by `group` of `stream` is recorded: a string holding
/// `<stream>/<id>` of the entry that took effect with it, kept until the signature expires. On a
/// cluster it must share the stream's slot: a stream without a hash tag is wrapped in one.
pub fn signature_key(stream: &str, group: &str, jti: &str, cluster: bool) -> String {
    if cluster && slot::hash_tag(stream).is_none() {
        slot::beside(stream, "", &format!(":sig:{group}:{jti}"))
    } else {
        format!("{stream}:sig:{group}:{jti}")
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
    items.into_iter().map(verdict).collect()
}

fn verdict(v: Value) -> Result<Committed, String> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Ok(s.clone()),
        other => Err(format!("unexpected verdict part {other:?}")),
    };
    match v {
        Value::Int(1) => Ok(Committed::Yes),
        Value::Int(0) => Ok(Committed::NotOurs),
        Value::Int(2) => Ok(Committed::NotTried),
        Value::Array(parts) if parts.len() == 3 => {
            let (key, detail) = (text(&parts[1])?, text(&parts[2])?);
            match parts[0] {
                Value::Int(-1) => Ok(Committed::Refused(format!(
                    "reply target {key} is not writable under Redis's ACL for this connection's user"
                ))),
                Value::Int(-2) => Ok(Committed::Refused(format!(
                    "reply target {key} is a {detail}, not a stream"
                ))),
                Value::Int(-3) => Ok(Committed::Refused(format!(
                    "the entry for {key} would take {detail} values, more than one commit can write"
                ))),
                Value::Int(-4) => Ok(Committed::Failed(format!("XADD to {key}: {detail}"))),
                Value::Int(-6) => Ok(Committed::Refused(format!(
                    "Redis refused the write to {key}: {detail}"
                ))),
                Value::Int(-7) => Ok(Committed::Replayed(detail)),
                Value::Int(-9) => Ok(Committed::Conflict(key)),
                Value::Int(-8) => {
                    let (kind, want) = detail.split_once('/').unwrap_or((&detail, "?"));
                    Ok(Committed::Refused(match want {
                        "string" => format!("the state key {key} is a {kind}, not a string"),
                        _ => format!(
                            "{key}, where delayed replies are held, is a {kind}, not a {want}"
                        ),
                    }))
                }
                Value::Int(-5) => Ok(Committed::Partial(format!("XADD to {key}: {detail}"))),
                ref other => Err(format!("unexpected verdict code {other:?}")),
            }
        }
        other => Err(format!("unexpected verdict {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_and_the_host_agree_on_the_largest_write() {
        assert!(SOURCE.contains(&format!(
            "local MAX_VALUES, OVERHEAD = {MAX_WRITE_VALUES}, {WRITE_OVERHEAD}\n"
        )));
    }

    #[test]
    fn the_script_writes_the_envelope_under_the_hosts_names() {
        assert!(SOURCE.contains(&format!(
            "local REGISTRY = '{}'\n",
            super::super::delayed::REGISTRY
        )));
        for name in [
            OUTBOX_TO,
            OUTBOX_REPLY,
            OUTBOX_DUE,
            envelope::TIMESTAMP,
            envelope::SOURCE,
            envelope::TRACE_ID,
            envelope::CAUSE,
        ] {
            assert!(SOURCE.contains(&format!("'{name}'")), "{name}");
        }
    }

    #[test]
    fn a_read_is_checked_by_the_sha1_lua_computes() {
        // redis.sha1hex("abc"): lowercase hex, as the host sends it.
        assert_eq!(
            sha1_smol::Sha1::from(&b"abc"[..]).digest().to_string(),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
    }

    #[test]
    fn verdicts_decode_with_their_reasons() {
        let part = |code: i64, key: &str, detail: &str| {
            Value::Array(vec![
                Value::Int(code),
                Value::BulkString(key.into()),
                Value::BulkString(detail.into()),
            ])
        };
        let got = decode(
            Value::Array(vec![
                Value::Int(1),
                Value::Int(0),
                Value::Int(2),
                part(-2, "nova:task:cache:data", "string"),
                part(-4, "nova:task:x:out", "OOM command not allowed"),
                part(-5, "nova:task:x:out", "boom"),
            ]),
            6,
        )
        .unwrap();
        assert_eq!(
            got[..3],
            [Committed::Yes, Committed::NotOurs, Committed::NotTried]
        );
        assert_eq!(
            got[3],
            Committed::Refused(
                "reply target nova:task:cache:data is a string, not a stream".into()
            )
        );
        assert!(matches!(&got[4], Committed::Failed(e) if e.contains("OOM")));
        assert!(matches!(&got[5], Committed::Partial(_)));
        assert!(decode(Value::Array(vec![Value::Int(7)]), 1).is_err());
        assert!(
            decode(Value::Array(vec![]), 1).is_err(),
            "one verdict per message"
        );
    }
}
