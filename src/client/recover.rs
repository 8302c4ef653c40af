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

/// KEYS[1] stream; ARGV group, consumer, the id to continue after (`0` for all), count, the group's
/// scheduled retries ([`due_key`], see there why it is not in KEYS). An entry whose retry is not due yet is left where it is
/// (whoever's time comes first claims it, see [`CLAIM`]); one whose time has come is a retry: its
/// delivery counts. Pages through the PEL (at most eight pages) until `count` entries are found.
pub const SOURCE: &str = r#"
local s, g, me, dk = KEYS[1], ARGV[1], ARGV[2], ARGV[5]
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
local want = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local entries, counts = {}, {}
for _ = 1, 8 do
  local rows = redis.call('XPENDING', s, g, start, '+', want, me)
  for _, p in ipairs(rows) do
    local id, n = p[1], p[4]
    start = '(' .. id
    local due = redis.call('ZSCORE', dk, id)
    if not due or tonumber(due) <= now then
      if due then
        redis.call('ZREM', dk, id)
        n = n + 1
      end
      local e = redis.call('XCLAIM', s, g, me, 0, id, 'RETRYCOUNT', n)[1]
      if not e then e = {id, false} end
      entries[#entries + 1] = e
      counts[#counts + 1] = id
      counts[#counts + 1] = n
      if #entries >= want then break end
    end
  end
  if #entries >= want or #rows < want then break end
end
return {{s, entries, counts}}
"#;

/// KEYS[1] stream; ARGV group, consumer, min idle (ms), the cursor to scan from, count, the group's
/// scheduled retries. First the retries whose time has come, whoever holds them; then entries
/// idle at least `min idle` — but not those scheduled later, which XAUTOCLAIM (JUSTID) moves to this
/// consumer without delivering them, to be claimed at their time.
pub const CLAIM: &str = r#"
local s, g, me, dk = KEYS[1], ARGV[1], ARGV[2], ARGV[6]
local want = tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local entries, counts = {}, {}
local function take(id, n)
  local e = redis.call('XCLAIM', s, g, me, 0, id, 'RETRYCOUNT', n)[1]
  if e then
    entries[#entries + 1] = e
    counts[#counts + 1] = id
    counts[#counts + 1] = n
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', dk, '-inf', now, 'LIMIT', 0, want)) do
  redis.call('ZREM', dk, id)
  local p = redis.call('XPENDING', s, g, id, id, 1)[1]
  if p then take(id, p[4] + 1) end
end
if #entries >= want then
  return {{s, entries, counts, ARGV[4], {}}}
end
local r = redis.call('XAUTOCLAIM', s, g, me, ARGV[3], ARGV[4], 'COUNT', want - #entries, 'JUSTID')
for _, id in ipairs(r[2]) do
  local due = redis.call('ZSCORE', dk, id)
  if not due or tonumber(due) <= now then
    if due then redis.call('ZREM', dk, id) end
    local p = redis.call('XPENDING', s, g, id, id, 1)[1]
    take(id, (p and p[4] or 0) + 1)
  end
end
return {{s, entries, counts, r[1], r[3] or {}}}
"#;

/// KEYS[1] stream; ARGV group, consumer, id, wait (ms), the group's scheduled retries, and — to give
/// the delivery back — the delivery count the daemon saw (else empty). Records when the entry's retry
/// is due — by Redis's clock, so daemons on hosts whose clocks differ agree — if the entry is still
/// pending for this consumer (else someone else has it: nothing to schedule). A message held back by
/// an open breaker never reached its handler: its delivery count goes back down by one (the claim at
/// its time counts it again), so holding spends no delivery however often it happens. Only from the
/// count the daemon saw: the call may be sent again when its answer was lost, and must not lower the
/// count twice.
pub const SCHEDULE: &str = r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])[1]
if not p then return 0 end
local seen = tonumber(ARGV[6])
if seen and seen > 0 and p[4] == seen then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'RETRYCOUNT', seen - 1, 'JUSTID')
end
local t = redis.call('TIME')
local due = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[4])
redis.call('ZADD', ARGV[5], due, ARGV[3])
return 1
"#;

/// The sorted set of a group's scheduled retries (entry id → when it is due, ms), in the stream's
/// slot so the scripts may touch both on a cluster. The scripts get its name as an argument, not a
/// key: most of the time it does not exist, and while its slot migrates Redis refuses a script whose
/// declared keys are not all on one side (TRYAGAIN) — every claim and re-read of the group would fail
/// until the migration ended. Undeclared, it is read where the stream is (the same slot).
pub fn due_key(stream: &str, group: &str) -> String {
    super::slot::beside(stream, "redstream:retry:", &format!(":{group}"))
}

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
        .arg(count)
        .arg(due_key(stream, group));
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
        .arg(count)
        .arg(due_key(stream, group));
    cmd
}

/// The call recording that `id`'s retry is due in `wait` (`held`: it did not run, its delivery is
/// given back — from this count, the one its daemon saw).
pub fn schedule_command(
    stream: &str,
    group: &str,
    consumer: &str,
    id: &str,
    wait_ms: u64,
    held: Option<u64>,
) -> Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(SCHEDULE)
        .arg(1)
        .arg(stream)
        .arg(group)
        .arg(consumer)
        .arg(id)
        .arg(wait_ms)
        .arg(due_key(stream, group))
        .arg(held.map_or_else(String::new, |n| n.to_string()));
    cmd
}
