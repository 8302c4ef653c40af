//! A handler's rate limit, shared by every daemon through one Redis key.
//!
//! Owns the permit script: the key holds the time (µs, Redis's clock) from which the next permit is
//! free — the generic cell rate algorithm. Each permit moves it on by one interval; up to `burst`
//! permits may be ahead of now. A caller asks for as many as it has calls waiting, and gets them all or
//! none with the time until they are free, so a busy limit costs one call per batch, not per message,
//! and the permits of all daemons together never exceed the rate (plus one burst).

use redis::Cmd;

/// KEYS[1] the limit's key; ARGV interval (µs), burst (permits), want (permits). Returns `{got,
/// wait µs}`. The time is written with `%.0f`: Lua would print a number of 16 digits in exponent form
/// and lose its last ones.
pub const TAKE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local free = math.floor((now + burst * interval - tat) / interval)
if free < want then
  return {0, tat + want * interval - burst * interval - now}
end
tat = tat + want * interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
return {want, 0}
"#;

/// The key of `handler`'s limit (one per handler name, whichever stream its messages come from).
pub fn key(handler: &str) -> String {
    format!("redstream:rate:{handler}")
}

pub fn command(key: &str, interval_us: u64, burst: u64, want: u64) -> Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(TAKE)
        .arg(1)
        .arg(key)
        .arg(interval_us)
        .arg(burst)
        .arg(want.min(burst).max(1));
    cmd
}
