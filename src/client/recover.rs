//! Re-reading this consumer's own pending entries without counting a delivery.
//!
//! Owns the recovery script. A consumer re-reads its pending entries at start and after a read whose
//! reply was lost. `XREADGROUP … <id>` would do it, but it adds one to each entry's delivery count, and
//! the dead-letter decision (`max_deliveries`) would then count restarts and Redis trouble as if the
//! handler had failed: a daemon restarted five times, or a Redis outage with a few lost replies, would
//! dead-letter messages no handler ever saw. The script instead claims each of the consumer's pending
//! entries to itself with `RETRYCOUNT` set to the count it already has: the entry comes back with its
//! fields, its idle time restarts (so no one claims it while it is being handled again), and its count
//! is what it was. Delivery counts then grow only by first delivery and by claims — that is, by a
//! handler that failed (its entry idled until claimed) or a consumer that died.
//!
//! The reply has XREADGROUP's shape plus the counts: `[[stream, [[id, fields | nil], …], [id, count,
//! …]]]`, so the group reader decodes it with the same (bounded) decoder as a read. Entries deleted
//! while pending come back with nil fields (Redis 7 also drops them from the PEL during the claim).
//!
//! Claiming entries other consumers left idle goes the same way ([`CLAIM`]): XAUTOCLAIM's own reply
//! carries whole entries, which the crate's parser would hold whole — three 100 MB entries of a dead
//! consumer cost a claimer hundreds of megabytes. The claim script takes them by JUSTID instead, counts
//! the delivery itself (`RETRYCOUNT` one more than before — JUSTID counts none), and answers in the
//! recovery shape plus the scan's next cursor and the ids Redis dropped because their entries were
//! deleted: `[[stream, entries, counts, next, [id, …]]]`. The reply then goes through the same bounded
//! decoder as every read, so an entry over `[limits]` costs one read chunk of memory.

use redis::Cmd;

/// KEYS[1] stream; ARGV group, consumer, the id to continue after (`0` for all), count.
pub const SOURCE: &str = r#"
local s, g, me = KEYS[1], ARGV[1], ARGV[2]
-- A stream that no longer exists (Redis restarted without its data) has no group either: say so as
-- XREADGROUP would (XGROUP CREATECONSUMER's own error for it is a plain ERR).
if redis.call('EXISTS', s) == 0 then
  return redis.error_reply('NOGROUP No such key ' .. s .. ' or consumer group ' .. g)
end
local start = '-'
if ARGV[3] ~= '0' then
  start = '(' .. ARGV[3]
else
  -- At start, the consumer shows in XINFO at once, as an XREADGROUP would have made it.
  redis.call('XGROUP', 'CREATECONSUMER', s, g, me)
end
local rows = redis.call('XPENDING', s, g, start, '+', tonumber(ARGV[4]), me)
local entries, counts = {}, {}
for i, p in ipairs(rows) do
  local id, n = p[1], p[4]
  local e = redis.call('XCLAIM', s, g, me, 0, id, 'RETRYCOUNT', n)[1]
  if not e then e = {id, false} end
  entries[i] = e
  counts[2 * i - 1] = id
  counts[2 * i] = n
end
return {{s, entries, counts}}
"#;

/// KEYS[1] stream; ARGV group, consumer, min idle (ms), the cursor to scan from, count.
pub const CLAIM: &str = r#"
local s, g, me = KEYS[1], ARGV[1], ARGV[2]
local r = redis.call('XAUTOCLAIM', s, g, me, ARGV[3], ARGV[4], 'COUNT', tonumber(ARGV[5]), 'JUSTID')
local entries, counts = {}, {}
for _, id in ipairs(r[2]) do
  local p = redis.call('XPENDING', s, g, id, id, 1)[1]
  local n = (p and p[4] or 0) + 1
  local e = redis.call('XCLAIM', s, g, me, 0, id, 'RETRYCOUNT', n)[1]
  if e then
    entries[#entries + 1] = e
    counts[#counts + 1] = id
    counts[#counts + 1] = n
  end
end
return {{s, entries, counts, r[1], r[3] or {}}}
"#;

/// The claim script's call: up to `count` entries idle at least `min_idle_ms`, scanning from `cursor`.
pub fn claim_command(
    stream: &str,
    group: &str,
    consumer: &str,
    min_idle_ms: u64,
    cursor: &str,
    count: u64,
) -> Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(CLAIM)
        .arg(1)
        .arg(stream)
        .arg(group)
        .arg(consumer)
        .arg(min_idle_ms)
        .arg(cursor)
        .arg(count);
    cmd
}

/// The script call re-reading up to `count` of `consumer`'s pending entries after `after`.
pub fn command(stream: &str, group: &str, consumer: &str, after: &str, count: u64) -> Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(SOURCE)
        .arg(1)
        .arg(stream)
        .arg(group)
        .arg(consumer)
        .arg(after)
        .arg(count);
    cmd
}
