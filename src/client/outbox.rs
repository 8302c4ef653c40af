//! Replies across hash slots on a Redis Cluster: the outbox and its relay's scripts.
//!
//! Owns the path that keeps a reply effectively-once when its stream lives in another slot than its
//! source (docs/design.md, "Redis Cluster"). The commit script can only touch keys of the source's
//! slot, so such a reply is written, atomically with the ack, to the source's *outbox* — a stream in
//! the source's slot ([`outbox_of`]) — as `_outbox_to <stream>`, `_outbox_reply <index>`, and
//! `_outbox_fields` holding the reply, envelope and own fields, packed in one value (a dead letter,
//! and a reply an older daemon committed, as `_outbox_target <stream>` followed by its fields: both
//! are relayed; so is a reply of the version that packed only its own fields, its envelope before
//! `_outbox_fields`). Packed, the commit script and the relay's read handle a reply once, not
//! field by field (docs/performance.md, "Redis Cluster"). A relay ([`crate::engine::relay`]) reads the outbox as group [`GROUP`] and
//! moves each entry on in three steps, each safe to repeat:
//! 1. [`DELIVER`], on the target's node: unless the target's records ([`seen_prefix`], in the
//!    target's slot) hold this effect, XADD the reply and record it — one script, so a reply and its record
//!    exist together or not at all. The record names the effect, not the outbox entry: `<cause>#<index>`
//!    (the source entry and the reply's place among its replies; a dead letter by its `_dlq_source`).
//!    A message that runs again because its commit was lost with its master (a failover that lost
//!    writes) makes a new outbox entry for the same effect, and the record stops it;
//! 2. WAIT, on the target's node, when the cluster knows replicas of it: the delivery (and its record)
//!    must be on a replica before anything is settled — a master killed before its replica got them
//!    would take them along, and a settled entry would never be delivered again. Not on a replica yet:
//!    the entry stays pending, and the next pass (a claim after `claim_min_idle`) delivers it again
//!    (the record makes that write nothing while the master lives, and writes it anew on a promoted
//!    replica that never got it);
//! 3. [`SETTLE`], on the outbox's node: XACK the entries delivered (or found delivered) before the
//!    deadline and on a replica — whoever holds one by then: a relay that claimed it meanwhile finds
//!    its record and writes nothing — and remove what the group no longer holds from the outbox
//!    (XTRIM MINID below the lowest pending id, XDEL above it).
//!
//! Both scripts travel as EVALSHA ([`Cached`]): a node that does not know one (restarted, failed over,
//! SCRIPT FLUSH) answers NOSCRIPT, is sent SCRIPT LOAD and asked again.
//!
//! Records are kept at least `keep` after their delivery, at most twice that ([`seen_prefix`]), long
//! enough for a message whose commit was lost to run again. A crash after 1 leaves the entry
//! pending with its record: whoever claims it finds the record, writes nothing, and settles it. Only
//! an effect made again more than `keep` after its first delivery could be written twice.

use std::sync::OnceLock;
use std::time::Duration;

use redis::Value;

use super::authorized::Client;
use super::conn::Ctx;
use super::decode;
use super::error::{Error, Result};
use super::info::AutoClaimed;
use super::reader::GroupReader;
use super::slot;
use crate::auth::Op;
use crate::model::dead_letter as dlq;
use crate::model::envelope::{self, Entry, Fields};
use crate::model::id::StreamId;

/// The consumer group relays read outboxes with.
pub const GROUP: &str = "redstream-relay";

pub use super::commit::{
    OUTBOX_DUE, OUTBOX_FIELDS, OUTBOX_REPLY, OUTBOX_TARGET as TARGET, OUTBOX_TO, outbox_of,
};

/// How long a relay waits for a replica to take its deliveries before it leaves them to a later pass.
pub const REPLICA_WAIT: Duration = Duration::from_secs(1);

/// The records of deliveries to `target` made before they were kept in [`seen_prefix`]'s sets: a
/// sorted set in `target`'s slot, scored by delivery time. Still consulted, and written beside the
/// sets, while it exists — that is, while a relay of an older version may still be running — so that
/// no relay, old or new, misses a record the other made.
pub fn seen_of(target: &str) -> String {
    slot::beside(target, "redstream:seen:", "")
}

/// The records of deliveries to `target`: `<this prefix><n>`, a set per period of `keep` (its
/// number `n` counted from the epoch by Redis's clock), in `target`'s slot. A delivery is recorded in
/// its period's set and looked for in that one and the one before, so a record is found for at least
/// `keep` after its delivery, and each set expires at the end of the period after its own. A set
/// takes a member with one hash insert, where the sorted set before took a skip-list insertion
/// among members of equal score compared as strings (1.3 µs of Redis time per reply crossing slots).
pub fn seen_prefix(target: &str) -> String {
    slot::beside(target, "redstream:seen:", ":")
}

/// KEYS[1] the target stream, KEYS[2] its records of an older version ([`seen_of`]). ARGV[1] the
/// relay's deadline (ms), ARGV[2] how long a record is kept (ms), ARGV[3] and ARGV[4] the target's
/// delayed set and fields hash ([`super::delayed`]; arguments, not keys, as there), ARGV[5] the
/// prefix of its record sets ([`seen_prefix`]), then per entry: its dedupe id, its due time (empty
/// unless it is a delayed reply), its value count, its values — its fields, or for a delayed
/// reply its entry encoded, held under the dedupe id until its time. Returns per entry 1 written, 0
/// already delivered (written before, not again), or an error text (not written; the rest of the
/// batch is not tried when Redis refuses for a reason of the whole server).
///
/// The deadline fences a relay that stalled: its entries can be claimed by another relay only once
/// they idled `claim_min_idle`, and the deadline (the time the relay asked for them plus half of that)
/// passes before. A delivery arriving after it — a paused process, a retransmitted request — writes
/// nothing, so it can never follow another relay's delivery and settling. The time is Redis's.
///
/// The record (SADD) is an entry's first write, so Redis's out-of-memory refusal can only come
/// there, before anything of the entry is written; a write after it that fails anyway (a key changed
/// type since the checks cannot, within the script) takes the record back.
///
/// Every call that recorded or found a delivery writes (a record set's expiry), even when it found
/// only deliveries made before: WAIT counts the writes of the connection that asks, so the relay's
/// WAIT then covers this connection's offset, which includes those earlier deliveries — a delivery
/// another relay made while the replica lagged is not settled on this relay's word before a replica
/// has it. (The sorted set of records before was given its expiry on every call, which did the same.)
pub const DELIVER: &str = r#"
local target, legacy = KEYS[1], KEYS[2]
local deadline, keep = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now > deadline then
  return redis.error_reply('TRYAGAIN the relay held these entries past its deadline; they are left to a claim')
end
local kind = redis.call('TYPE', target)['ok']
if kind ~= 'stream' and kind ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. target .. ' holds a ' .. kind .. ', not a stream')
end
local dk, fk = ARGV[3], ARGV[4]
-- This period's record set and the one before.
local period = math.floor(now / keep)
local seen = ARGV[5] .. string.format('%.0f', period)
local before = ARGV[5] .. string.format('%.0f', period - 1)
for _, k in ipairs({{seen, 'set'}, {before, 'set'}, {legacy, 'zset'}, {dk, 'zset'}, {fk, 'hash'}}) do
  local kind = redis.call('TYPE', k[1])['ok']
  if kind ~= k[2] and kind ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. k[1] .. ' holds a ' .. kind .. ', not a ' .. k[2])
  end
end
local looked = redis.call('EXISTS', before) == 1
local old = redis.call('EXISTS', legacy) == 1
local out, a, stop, recorded, found = {}, 6, false, false, false
while a <= #ARGV do
  local id, due, values = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local last = a + 2 + values
  if stop then
    out[#out + 1] = 'not tried'
  else
    -- The record first: SADD both asks whether the effect was delivered in this period and records
    -- it, and as the entry's first write it is the only one Redis may refuse for memory. A write
    -- after it that fails takes the record back.
    local r = 0
    if not ((looked and redis.call('SISMEMBER', before, id) == 1)
        or (old and redis.call('ZSCORE', legacy, id))) then
      r = redis.pcall('SADD', seen, id)
    end
    if r == 0 then
      out[#out + 1] = 0
      found = true
    else
      if not (type(r) == 'table' and r['err']) then
        if due == '' then
          r = redis.pcall('XADD', target, '*', unpack(ARGV, a + 3, last))
        else
          -- Held until its time: the fields first, then the due time that makes it live.
          r = redis.pcall('HSET', fk, id, ARGV[a + 3])
          if not (type(r) == 'table' and r['err']) then
            r = redis.pcall('ZADD', dk, due, id)
            if type(r) == 'table' and r['err'] then redis.call('HDEL', fk, id) end
          end
        end
        if type(r) == 'table' and r['err'] then
          redis.call('SREM', seen, id)
        else
          recorded = true
          if old then redis.call('ZADD', legacy, now, id) end
        end
      end
      if type(r) == 'table' and r['err'] then
        out[#out + 1] = r['err']
        for _, code in ipairs({'OOM', 'MISCONF', 'READONLY', 'NOREPLICAS', 'BUSY', 'LOADING', 'MASTERDOWN'}) do
          if string.find(r['err'], '^' .. code) then stop = true end
        end
      else
        out[#out + 1] = 1
      end
    end
  end
  a = last + 1
end
if recorded or (found and redis.call('EXISTS', seen) == 1) then
  -- Found for this period and the next, then gone.
  redis.call('PEXPIREAT', seen, string.format('%.0f', (period + 2) * keep))
elseif found and looked then
  redis.call('PEXPIREAT', before, string.format('%.0f', (period + 1) * keep))
elseif found then
  redis.call('PEXPIRE', legacy, keep)
end
-- (Also when nothing was written: WAIT counts the writes of the connection that asks, up to its
-- last command that wrote anything, so a call that only found deliveries made before — by
-- another relay, perhaps not on a replica yet — must write something for the relay's WAIT to cover
-- them. Setting a record set's expiry again is that write.)
return out
"#;

/// KEYS[1] an outbox. ARGV[1] the relay group, then the ids to settle, ascending. XACKs them, then
/// removes from the outbox every entry the group no longer holds below the lowest id still pending
/// (XTRIM MINID: whole nodes of the stream at a time) and deletes the ids at or above it (XDEL). Returns
/// how many entries it removed.
///
/// An entry below the group's lowest pending id was delivered to the group (reads go in id order) and
/// is not pending, so it was acked — and only a settling, after its delivery, acks one (or the
/// relay's forgetting of an id whose entry is gone). With nothing pending, everything up to the
/// highest id settled here was delivered. One script, so an entry is never left acked and in the
/// outbox (which nothing would remove) nor removed and pending.
pub const SETTLE: &str = r#"
local outbox, group = KEYS[1], ARGV[1]
local n = #ARGV
for c = 2, n, 1000 do
  redis.call('XACK', outbox, group, unpack(ARGV, c, math.min(c + 999, n)))
end
-- Ids compared as Redis orders them: milliseconds, then sequence (decimal, no leading zeros).
local function parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return ms, seq
end
local function less(a, b)
  local am, as = parts(a)
  local bm, bs = parts(b)
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
local pending = redis.call('XPENDING', outbox, group)
local cut = ARGV[n]
if pending[1] > 0 and less(pending[2], cut) then cut = pending[2] end
local removed = redis.call('XTRIM', outbox, 'MINID', cut)
local rest = {}
for i = 2, n do
  if not less(ARGV[i], cut) then rest[#rest + 1] = ARGV[i] end
end
for c = 1, #rest, 1000 do
  removed = removed + redis.call('XDEL', outbox, unpack(rest, c, math.min(c + 999, #rest)))
end
return removed
"#;

/// A script sent by its hash: Redis hashes an EVAL's whole text on every call (a relay's DELIVER is
/// 3 KB) and the text crosses the network each time; EVALSHA sends 40 bytes.
pub struct Cached {
    source: &'static str,
    /// Its SHA-1, made on first use.
    sha: OnceLock<String>,
}

impl Cached {
    const fn new(source: &'static str) -> Cached {
        Cached {
            source,
            sha: OnceLock::new(),
        }
    }

    /// EVALSHA of this script with `numkeys` (the caller adds keys and arguments).
    fn cmd(&self, numkeys: usize) -> redis::Cmd {
        let sha = self
            .sha
            .get_or_init(|| redis::Script::new(self.source).get_hash().to_owned());
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(sha).arg(numkeys);
        cmd
    }
}

pub static DELIVER_SCRIPT: Cached = Cached::new(DELIVER);
pub static SETTLE_SCRIPT: Cached = Cached::new(SETTLE);

/// What one [`Client::relay`] did.
#[derive(Debug, Default)]
pub struct Relayed {
    /// Replies written to their streams.
    pub delivered: usize,
    /// Entries delivered before (a crash or a claim between delivery and settling): not written again.
    pub repeated: usize,
    /// Entries settled: deleted from the outbox (and acked).
    pub settled: usize,
    /// Entries delivered (or found delivered) whose targets' replicas took them: to be settled.
    pub ready: Vec<String>,
    /// Entries delivered whose target's replica has not confirmed them yet: left pending, delivered
    /// again (or found recorded) by a later pass.
    pub unreplicated: usize,
    /// Entries left pending, each with its outbox id and why: a target refusing the write, an entry
    /// without a target. They are tried again when claimed.
    pub refused: Vec<(String, String)>,
}

/// One outbox entry on its way: its id, the fields to write, the name of its effect, when it is due
/// (a delayed reply).
type Outgoing<'a> = (&'a str, Fields, String, Option<String>);

/// An outbox entry split into its target, the fields to write there, the name of its effect for the
/// dedupe record — `<cause>#<reply index>` for a reply, `<_dlq_source>#dead-letter` for a dead
/// letter, else (an entry of an older version) `<outbox>/<entry id>` — and, for a delayed reply, its
/// due time. A packed reply ([`OUTBOX_TO`]) has its [`OUTBOX_FIELDS`] unpacked in its place; an
/// entry that is neither kind, or whose packed fields do not decode, is refused, saying why.
fn split(entry: &Entry, outbox: &str) -> Result<(String, Fields, String, Option<String>), String> {
    let not_ours =
        || format!("not a relay entry: its first field is neither {TARGET} nor {OUTBOX_TO}");
    let mut fields = entry.fields.iter().peekable();
    let (name, target) = fields.next().ok_or_else(not_ours)?;
    let packed = name == OUTBOX_TO.as_bytes();
    if name != TARGET.as_bytes() && !packed {
        return Err(not_ours());
    }
    let target = String::from_utf8(target.to_vec())
        .map_err(|_| "not a relay entry: its target is not UTF-8".to_owned())?;
    let reply = fields
        .next_if(|(n, _)| *n == OUTBOX_REPLY.as_bytes())
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
    // Only right after the index: a handler's own field of that name comes after the envelope.
    let due = match reply {
        Some(_) => fields
            .next_if(|(n, _)| *n == OUTBOX_DUE.as_bytes())
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned()),
        None => None,
    };
    let mut rest = Fields::with_capacity(entry.fields.len());
    let mut own = None;
    for (n, v) in fields {
        if packed && n == OUTBOX_FIELDS.as_bytes() {
            // The commit writes it last: after the envelope, where a handler's field of that name
            // would be packed inside it.
            own = Some(v);
            break;
        }
        rest.push(n.to_vec(), v.to_vec());
    }
    if packed {
        let own = own.ok_or_else(|| format!("a packed reply without its {OUTBOX_FIELDS}"))?;
        let own = super::delayed::decode(own)
            .map_err(|why| format!("its {OUTBOX_FIELDS} do not decode: {why}"))?;
        for (n, v) in own {
            rest.push(n, v);
        }
    }
    let effect = match (
        reply,
        rest.get_str(envelope::CAUSE),
        rest.get_str(dlq::SOURCE),
    ) {
        (Some(i), Some(cause), _) => format!("{cause}#{i}"),
        (None, _, Some(source)) => format!("{source}#dead-letter"),
        _ => format!("{outbox}/{}", entry.id),
    };
    Ok((target, rest, effect, due))
}

/// The relay's side of the outbox: reading, claiming, delivering, settling.
impl Client {
    /// A reader of `source`'s outbox for relay consumer `consumer`. The relay acts for the consumers
    /// of `source`, so it needs their right to ack there.
    pub fn outbox_reader(
        &self,
        source: &str,
        consumer: &str,
        max_block: Duration,
    ) -> Result<GroupReader> {
        self.authorize(Op::Ack, source)?;
        GroupReader::new(self.redis(), &outbox_of(source), GROUP, consumer, max_block)
    }

    /// Creates the relay group on `source`'s outbox (and the outbox), reading from its start, unless
    /// it exists.
    pub async fn outbox_group(&self, source: &str) -> Result<()> {
        self.authorize(Op::Ack, source)?;
        let outbox = outbox_of(source);
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(&outbox)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM");
        match self
            .redis()
            .query_value(&cmd, Ctx::new("XGROUP CREATE", &outbox).group(GROUP))
            .await
        {
            Ok(_) => Ok(()),
            Err(Error::Redis { source, .. }) if source.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// XAUTOCLAIM of outbox entries idle at least `min_idle` (a relay that died, or an entry whose
    /// target refused it), to `consumer`.
    pub async fn outbox_claim(
        &self,
        source: &str,
        consumer: &str,
        min_idle: Duration,
        start: &str,
        count: u64,
    ) -> Result<AutoClaimed> {
        self.authorize(Op::Ack, source)?;
        let outbox = outbox_of(source);
        let mut cmd = redis::cmd("XAUTOCLAIM");
        cmd.arg(&outbox)
            .arg(GROUP)
            .arg(consumer)
            .arg(min_idle.as_millis() as u64)
            .arg(start)
            .arg("COUNT")
            .arg(count);
        let ctx = Ctx::new("XAUTOCLAIM", &outbox).group(GROUP);
        let value = self.redis().query_value(&cmd, ctx).await?;
        let (next, got) = decode::autoclaim(value).map_err(|detail| Error::Protocol {
            command: "XAUTOCLAIM",
            key: outbox.clone(),
            detail,
        })?;
        Ok(AutoClaimed {
            next,
            entries: got.entries,
            deleted: got.deleted,
        })
    }

    /// Moves `entries` of `source`'s outbox (in id order, pending for this relay) to their streams
    /// and settles them (see the module's three steps): [`Client::deliver`], then the settling of
    /// what it made ready.
    pub async fn relay(
        &self,
        source: &str,
        entries: &[Entry],
        deadline_ms: u64,
        keep: Duration,
    ) -> Result<Relayed> {
        let mut report = self.deliver(source, entries, deadline_ms, keep).await?;
        if !report.ready.is_empty() {
            let ready: Vec<&str> = report.ready.iter().map(String::as_str).collect();
            report.settled = self.settle(&outbox_of(source), &ready).await?;
        }
        Ok(report)
    }

    /// The first two steps: delivers `entries` of `source`'s outbox to their streams and waits for a
    /// replica of each target to take them; what may be settled then is reported in
    /// [`Relayed::ready`] (nothing is settled here: a relay that stops after this is one that crashed
    /// between delivering and settling). `deadline_ms` (Unix ms) is when this relay's hold on the
    /// entries ends (see [`DELIVER`]); `keep` bounds how long a delivery's record outlives a crash.
    /// Entries left pending are reported, never dropped.
    pub async fn deliver(
        &self,
        source: &str,
        entries: &[Entry],
        deadline_ms: u64,
        keep: Duration,
    ) -> Result<Relayed> {
        self.authorize(Op::Ack, source)?;
        let outbox = outbox_of(source);
        let mut report = Relayed::default();
        // Per target, in first-seen order: its entries.
        let mut targets: Vec<(String, Vec<Outgoing>)> = Vec::new();
        for e in entries {
            let (target, fields, effect, due) = match split(e, &outbox) {
                Ok(split) => split,
                Err(why) => {
                    report.refused.push((e.id.clone(), why));
                    continue;
                }
            };
            match targets.iter_mut().find(|(t, _)| *t == target) {
                Some((_, list)) => list.push((&e.id, fields, effect, due)),
                None => targets.push((target, vec![(&e.id, fields, effect, due)])),
            }
        }
        for (target, list) in &targets {
            if list.iter().any(|(_, _, _, due)| due.is_some()) {
                // Delayed replies: the daemons' movers must find the stream among those holding
                // some (a name without messages is harmless, so it goes first).
                let mut register = redis::cmd("SADD");
                register.arg(super::delayed::REGISTRY).arg(target);
                let _: i64 = self
                    .redis()
                    .query(&register, Ctx::new("SADD", super::delayed::REGISTRY))
                    .await?;
            }
            let mut cmd = DELIVER_SCRIPT.cmd(2);
            cmd.arg(target)
                .arg(seen_of(target))
                .arg(deadline_ms)
                .arg(keep.as_millis().max(1) as u64)
                .arg(super::delayed::due_key(target))
                .arg(super::delayed::fields_key(target))
                .arg(seen_prefix(target));
            for (_, fields, effect, due) in list {
                cmd.arg(effect);
                match due {
                    Some(due) => cmd
                        .arg(due)
                        .arg(1)
                        .arg(super::delayed::encode(fields.iter())),
                    None => {
                        cmd.arg("").arg(2 * fields.len());
                        for (n, v) in fields.iter() {
                            cmd.arg(n).arg(v);
                        }
                        &mut cmd
                    }
                };
            }
            let verdicts = match self
                .eval_cached(&DELIVER_SCRIPT, &cmd, Ctx::new("EVALSHA", target))
                .await
            {
                Ok(Value::Array(v)) => v,
                Ok(other) => {
                    return Err(Error::Protocol {
                        command: "EVALSHA",
                        key: target.clone(),
                        detail: format!("the relay's delivery answered {other:?}"),
                    });
                }
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    // The target as a whole refuses (a key of another type, the ACL): its entries
                    // stay pending; the others go on.
                    for (id, _, _, _) in list {
                        report.refused.push(((*id).to_owned(), e.to_string()));
                    }
                    continue;
                }
            };
            let mut delivered = Vec::new();
            for ((id, _, _, _), verdict) in list.iter().zip(verdicts) {
                match verdict {
                    Value::Int(1) => {
                        report.delivered += 1;
                        delivered.push(*id);
                    }
                    Value::Int(0) => {
                        report.repeated += 1;
                        delivered.push(*id);
                    }
                    other => {
                        let why = decode::string(other).unwrap_or_else(|| "refused".into());
                        report
                            .refused
                            .push(((*id).to_owned(), format!("{target}: {why}")));
                    }
                }
            }
            if delivered.is_empty() {
                continue;
            }
            if self.replicated(target).await? {
                report
                    .ready
                    .extend(delivered.into_iter().map(str::to_owned));
            } else {
                report.unreplicated += delivered.len();
            }
        }
        Ok(report)
    }

    /// Whether what this connection wrote on `key`'s master has reached a replica (WAIT 1, at most
    /// [`REPLICA_WAIT`]) — or the cluster knows no replica of that master, or this is one node.
    /// Replicas are counted from CLUSTER NODES whatever their state: one whose link is cut may still
    /// be promoted with what it has (asked again after [`slot::MASTERS_FOR`], or when the master changed).
    /// WAIT travels behind CLUSTER MYID on the master's connection: an
    /// answer from another node (the crate's fallback when it has no connection to that master) proves
    /// nothing, and counts as not yet.
    async fn replicated(&self, key: &str) -> Result<bool> {
        if !self.is_cluster() {
            return Ok(true);
        }
        let ctx = || Ctx::new("WAIT", key);
        let slot = slot::of(key);
        let (master, replicas) = match self.masters.known(slot) {
            Some(known) => known,
            None => {
                let mut ask = redis::pipe();
                ask.cmd("CLUSTER").arg("NODES");
                let nodes = self
                    .redis()
                    .query_pipe_at_master_of(key, ask, ctx())
                    .await?;
                let nodes = nodes
                    .into_iter()
                    .next()
                    .and_then(decode::string)
                    .unwrap_or_default();
                let Some((master, replicas)) = slot::master_of(&nodes, slot) else {
                    return Ok(false);
                };
                self.masters.learnt(slot, &master, replicas);
                (master, replicas)
            }
        };
        if replicas == 0 {
            return Ok(true);
        }
        let mut wait = redis::pipe();
        wait.cmd("CLUSTER").arg("MYID");
        wait.cmd("WAIT").arg(1).arg(REPLICA_WAIT.as_millis() as u64);
        let got = self
            .redis()
            .query_pipe_at_master_of(key, wait, ctx())
            .await?;
        let (Some(id), Some(acked)) = (got.first().cloned().and_then(decode::string), got.get(1))
        else {
            self.masters.forget(slot);
            return Ok(false);
        };
        if id != master {
            self.masters.forget(slot);
            return Ok(false);
        }
        Ok(decode::int(acked).is_some_and(|n| n >= 1))
    }

    /// Sends `cmd`, an EVALSHA of `script`; where the node does not know the script (NOSCRIPT), loads
    /// it there and sends `cmd` again. A script runs whole or not at all, and NOSCRIPT means it did
    /// not run: the second send is the first run.
    async fn eval_cached(&self, script: &Cached, cmd: &redis::Cmd, ctx: Ctx<'_>) -> Result<Value> {
        match self.redis().query_value(cmd, ctx).await {
            Err(Error::Redis { source, .. }) if source.code() == Some("NOSCRIPT") => {
                let mut load = redis::cmd("SCRIPT");
                load.arg("LOAD").arg(script.source);
                self.redis()
                    .query_value(&load, Ctx::new("SCRIPT LOAD", ctx.key))
                    .await?;
                self.redis().query_value(cmd, ctx).await
            }
            other => other,
        }
    }

    /// [`SETTLE`] of `done` on `outbox`: only entries this relay delivered (or found delivered)
    /// before its deadline, and whose delivery reached a replica — whoever holds them now: a relay
    /// that claimed one meanwhile finds its record, writes nothing, and its own settling finds
    /// nothing left. Returns how many entries left the outbox.
    async fn settle(&self, outbox: &str, done: &[&str]) -> Result<usize> {
        let mut ids: Vec<(StreamId, &str)> = done
            .iter()
            .map(|id| (StreamId::parse(id).unwrap_or(StreamId::MIN), *id))
            .collect();
        ids.sort_unstable();
        let mut cmd = SETTLE_SCRIPT.cmd(1);
        cmd.arg(outbox).arg(GROUP);
        for (_, id) in &ids {
            cmd.arg(*id);
        }
        let value = self
            .eval_cached(
                &SETTLE_SCRIPT,
                &cmd,
                Ctx::new("EVALSHA", outbox).group(GROUP),
            )
            .await?;
        Ok(decode::int(&value).unwrap_or(0) as usize)
    }

    /// XACK of ids pending in `source`'s outbox whose entries are gone (deleted or trimmed by hand
    /// while pending): nothing is left to deliver.
    pub async fn outbox_forget(&self, source: &str, ids: &[String]) -> Result<()> {
        self.authorize(Op::Ack, source)?;
        if ids.is_empty() {
            return Ok(());
        }
        let outbox = outbox_of(source);
        let mut cmd = redis::cmd("XACK");
        cmd.arg(&outbox).arg(GROUP).arg(ids);
        self.redis()
            .query_value(&cmd, Ctx::new("XACK", &outbox).group(GROUP))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_and_records_live_in_the_slot_of_their_stream() {
        for s in ["nova:task:{boomerang}:tasks", "nova:task:boomerang:tasks"] {
            assert_eq!(slot::of(&outbox_of(s)), slot::of(s));
            assert_eq!(slot::of(&seen_of(s)), slot::of(s));
            assert_eq!(slot::of(&format!("{}12345", seen_prefix(s))), slot::of(s));
        }
        assert_eq!(
            outbox_of("nova:task:{boomerang}:tasks"),
            "redstream:outbox:{boomerang}"
        );
    }

    #[test]
    fn an_entry_splits_into_its_target_and_the_reply() {
        let mut fields = Fields::new();
        fields.push(TARGET, "nova:task:{b}:out");
        fields.push("_timestamp", "1");
        fields.push("k", "v");
        let e = Entry {
            id: "1-0".into(),
            fields,
        };
        let (target, rest, effect, _) = split(&e, "box").expect("a relay entry");
        assert_eq!(target, "nova:task:{b}:out");
        assert_eq!(rest.len(), 2);
        assert_eq!(
            effect, "box/1-0",
            "an entry without a cause is its own effect"
        );
        let mut reply = Fields::new();
        reply.push(TARGET, "nova:task:{b}:out");
        reply.push(OUTBOX_REPLY, "2");
        reply.push("_cause", "nova:task:{a}:in/5-0");
        reply.push("k", "v");
        let (_, rest, effect, due) = split(
            &Entry {
                id: "9-0".into(),
                fields: reply,
            },
            "box",
        )
        .unwrap();
        assert_eq!(
            effect, "nova:task:{a}:in/5-0#2",
            "a reply is named by its cause and index"
        );
        assert_eq!(
            rest.get(OUTBOX_REPLY),
            None,
            "the index is not written to the target"
        );
        assert_eq!(due, None, "a reply without a due time is not delayed");
        let mut delayed = Fields::new();
        delayed.push(TARGET, "nova:task:{b}:out");
        delayed.push(OUTBOX_REPLY, "0");
        delayed.push(OUTBOX_DUE, "1700000000000");
        delayed.push("_cause", "nova:task:{a}:in/5-0");
        delayed.push(OUTBOX_DUE, "a handler's own field");
        let (_, rest, _, due) = split(
            &Entry {
                id: "9-1".into(),
                fields: delayed,
            },
            "box",
        )
        .unwrap();
        assert_eq!(due.as_deref(), Some("1700000000000"));
        assert_eq!(
            rest.get(OUTBOX_DUE),
            Some(&b"a handler's own field"[..]),
            "only the field right after the index is the due time"
        );
        let mut forged = Fields::new();
        forged.push("k", "v");
        forged.push(TARGET, "x");
        assert!(
            split(
                &Entry {
                    id: "2-0".into(),
                    fields: forged
                },
                "box"
            )
            .is_err()
        );
    }

    #[test]
    fn a_packed_reply_unpacks_after_its_envelope() {
        let mut own = Fields::new();
        own.push("k", "v");
        own.push(OUTBOX_FIELDS, "a handler's own field of that name");
        own.push("bin", vec![0u8, 255, b',']);
        let mut packed = Fields::new();
        packed.push(OUTBOX_TO, "nova:task:{b}:out");
        packed.push(OUTBOX_REPLY, "1");
        packed.push(OUTBOX_DUE, "1700000000000");
        packed.push("_timestamp", "1");
        packed.push("_cause", "nova:task:{a}:in/5-0");
        packed.push(OUTBOX_FIELDS, super::super::delayed::encode(own.iter()));
        let entry = |fields| Entry {
            id: "3-0".into(),
            fields,
        };
        let (target, rest, effect, due) = split(&entry(packed.clone()), "box").unwrap();
        assert_eq!(target, "nova:task:{b}:out");
        assert_eq!(effect, "nova:task:{a}:in/5-0#1");
        assert_eq!(due.as_deref(), Some("1700000000000"));
        assert_eq!(
            rest.iter().collect::<Vec<_>>(),
            vec![
                (&b"_timestamp"[..], &b"1"[..]),
                (b"_cause", b"nova:task:{a}:in/5-0"),
                (b"k", b"v"),
                (b"_outbox_fields", b"a handler's own field of that name"),
                (b"bin", &[0u8, 255, b','][..]),
            ]
        );
        // As committed now: the envelope packed too, nothing but the outbox's own fields outside.
        let mut whole = Fields::new();
        whole.push("_timestamp", "1");
        whole.push("_cause", "nova:task:{a}:in/5-0");
        let whole = super::super::delayed::encode(whole.iter().chain(own.iter()));
        let mut packed = Fields::new();
        packed.push(OUTBOX_TO, "nova:task:{b}:out");
        packed.push(OUTBOX_REPLY, "2");
        packed.push(OUTBOX_FIELDS, whole);
        let (target, rest2, effect, due) = split(&entry(packed), "box").unwrap();
        assert_eq!(target, "nova:task:{b}:out");
        assert_eq!(
            effect, "nova:task:{a}:in/5-0#2",
            "the cause is found inside"
        );
        assert_eq!(due, None);
        assert_eq!(
            rest2.iter().collect::<Vec<_>>(),
            rest.iter().collect::<Vec<_>>()
        );
        // Refused, saying why, rather than delivered half-made.
        let mut torn = Fields::new();
        torn.push(OUTBOX_TO, "nova:task:{b}:out");
        torn.push("_cause", "nova:task:{a}:in/5-0");
        torn.push(OUTBOX_FIELDS, "3:k,");
        let why = split(&entry(torn), "box").unwrap_err();
        assert!(why.contains("do not decode"), "{why}");
        let mut bare = Fields::new();
        bare.push(OUTBOX_TO, "nova:task:{b}:out");
        bare.push("k", "v");
        let why = split(&entry(bare), "box").unwrap_err();
        assert!(why.contains("without its _outbox_fields"), "{why}");
    }
}
