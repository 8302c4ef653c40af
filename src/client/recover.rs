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

use redis::Cmd;

/// KEYS[1] stream; ARGV group, consumer, the id to continue after (`0` for all), count.
pub const SOURCE: &str = r#"
local s, g, me = KEYS[1], ARGV[1], ARGV[2]
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
