//! Delayed messages: published now, appearing on their stream at a later time.
//!
//! Owns the two scripts and where delayed messages live. A delayed message is held beside its target
//! stream, in that stream's cluster slot: a sorted set `redstream:delayed:{<stream>}` (member: the
//! message's own id, score: when it is due, ms by Redis's clock) and a hash
//! `redstream:delayed:{<stream>}:fields` (the same id → its fields, encoded as netstrings so any bytes
//! survive). [`HOLD`] writes both at once. The set `redstream:delayed` names the streams that may hold
//! any, for the daemons to find them (written first: a name without messages is harmless). On one
//! Redis the registry is written by the same scripts — [`HOLD`] adds the stream, [`MOVE`] removes it
//! once nothing is held for it, so it does not grow with every stream that ever held one; on a
//! cluster it is a key of its own slot, added to before any hold and never shrunk.
//!
//! A daemon moves due messages with [`MOVE`]: XADD to the stream, and removal from the set and the
//! hash, in one script — so a message is moved once, whoever moves it and however often daemons crash
//! or run the script side by side; and a Redis that loses data loses the held messages with the streams.

use redis::Cmd;

use super::slot;
use crate::model::envelope::Fields;

/// The streams that may hold delayed messages.
pub const REGISTRY: &str = "redstream:delayed";

/// The sorted set of `stream`'s delayed messages, in its slot.
pub fn due_key(stream: &str) -> String {
    slot::beside(stream, "redstream:delayed:", "")
}

/// The hash of `stream`'s delayed messages' fields, in its slot.
pub fn fields_key(stream: &str) -> String {
    slot::beside(stream, "redstream:delayed:", ":fields")
}

/// KEYS[1] the stream (it routes the call to its slot's node); ARGV the message's id, the wait (ms, from
/// Redis's clock) or `@` and the due time (ms since the epoch), its encoded fields, the due set, the
/// fields hash, and the registry (empty on a cluster, where the caller adds to it first). Those keys
/// are arguments, not declared keys: while their slot migrates, Redis refuses a script
/// whose declared keys are not all on one side (TRYAGAIN), which they seldom are (they exist only
/// while something is held); undeclared, they are used where the stream is (the same slot).
/// Returns when it is due.
pub const HOLD: &str = r#"
local due
if string.sub(ARGV[2], 1, 1) == '@' then
  due = tonumber(string.sub(ARGV[2], 2))
else
  local t = redis.call('TIME')
  due = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
end
if ARGV[6] ~= '' then redis.call('SADD', ARGV[6], KEYS[1]) end
redis.call('HSET', ARGV[5], ARGV[1], ARGV[3])
redis.call('ZADD', ARGV[4], due, ARGV[1])
return due
"#;

/// KEYS[1] the stream; ARGV how many to move at most, the due set, the fields hash, the registry
/// (empty on a cluster; see [`HOLD`]). Moves the messages whose time has come, oldest first, and
/// takes the stream off the registry when nothing is left. Returns {moved, left, next due or -1}.
pub const MOVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dk, fk = ARGV[2], ARGV[3]
local ids = redis.call('ZRANGEBYSCORE', dk, '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local moved = 0
for _, id in ipairs(ids) do
  local enc = redis.call('HGET', fk, id)
  if enc then
    local f, at = {}, 1
    while at <= #enc do
      local colon = string.find(enc, ':', at, true)
      local len = tonumber(string.sub(enc, at, colon - 1))
      f[#f + 1] = string.sub(enc, colon + 1, colon + len)
      at = colon + len + 2
    end
    redis.call('XADD', KEYS[1], '*', unpack(f))
    moved = moved + 1
  end
  redis.call('HDEL', fk, id)
  redis.call('ZREM', dk, id)
end
local next = redis.call('ZRANGE', dk, 0, 0, 'WITHSCORES')
local left = redis.call('ZCARD', dk)
if left == 0 and ARGV[4] ~= '' then redis.call('SREM', ARGV[4], KEYS[1]) end
return {moved, left, tonumber(next[2]) or -1}
"#;

/// Fields as netstrings (`<len>:<bytes>,` for each name and value): what [`MOVE`] takes apart.
pub fn encode<'a>(fields: impl IntoIterator<Item = Pair<'a>>) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        for part in [name, value] {
            out.extend_from_slice(part.len().to_string().as_bytes());
            out.push(b':');
            out.extend_from_slice(part);
            out.push(b',');
        }
    }
    out
}

/// A field's name and value, borrowed.
pub type Pair<'a> = (&'a [u8], &'a [u8]);

/// The pairs [`encode`] made, borrowed from `bytes`, or why `bytes` are not such an encoding (a name
/// without its value included).
pub fn decode(bytes: &[u8]) -> Result<Vec<Pair<'_>>, String> {
    let mut parts = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let colon = rest
            .iter()
            .position(|b| *b == b':')
            .ok_or("a length without its colon")?;
        let len: usize = std::str::from_utf8(&rest[..colon])
            .ok()
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|t| t.parse().ok())
            .ok_or("a length that is not a number")?;
        let body = &rest[colon + 1..];
        if body.len() <= len || body[len] != b',' {
            return Err(format!("a part of {len} bytes runs past the end"));
        }
        parts.push(&body[..len]);
        rest = &body[len + 1..];
    }
    if parts.len() % 2 == 1 {
        return Err("a name without its value".into());
    }
    Ok(parts.chunks_exact(2).map(|p| (p[0], p[1])).collect())
}

pub use crate::model::message::Due;

/// The [`HOLD`] call for a message of `fields` to `stream`, known by `id` (`cluster`: the registry is
/// not the script's to write).
pub fn hold_command(stream: &str, id: &str, due: Due, fields: &Fields, cluster: bool) -> Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(HOLD).arg(1).arg(stream).arg(id);
    match due {
        Due::In(ms) => cmd.arg(ms),
        Due::At(ms) => cmd.arg(format!("@{ms}")),
    };
    cmd.arg(encode(fields.iter()))
        .arg(due_key(stream))
        .arg(fields_key(stream))
        .arg(if cluster { "" } else { REGISTRY });
    cmd
}

/// The [`MOVE`] call for `stream`, moving at most `count` (`cluster`: the registry is not the script's
/// to write).
pub fn move_command(stream: &str, count: u64, cluster: bool) -> Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(MOVE)
        .arg(1)
        .arg(stream)
        .arg(count)
        .arg(due_key(stream))
        .arg(fields_key(stream))
        .arg(if cluster { "" } else { REGISTRY });
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_encode_as_netstrings_whatever_their_bytes() {
        let fields: Fields = vec![
            (b"a".to_vec(), b"x:y,z".to_vec()),
            (b"".to_vec(), vec![0, 255, b':']),
        ]
        .into();
        assert_eq!(
            encode(fields.iter()),
            b"1:a,5:x:y,z,0:,3:\x00\xff:,".to_vec()
        );
    }

    #[test]
    fn netstrings_decode_to_the_fields_they_encode_and_refuse_anything_else() {
        let fields: Fields = vec![
            (b"a".to_vec(), b"x:y,z".to_vec()),
            (b"".to_vec(), vec![0, 255, b':']),
            (b"12:3,".to_vec(), b"".to_vec()),
        ]
        .into();
        let packed = encode(fields.iter());
        assert_eq!(decode(&packed).unwrap(), fields.iter().collect::<Vec<_>>());
        assert_eq!(decode(b"").unwrap().len(), 0);
        for bad in [
            &b"1:a,"[..],
            b"1:a,2:b,",
            b"1:a",
            b"x:a,1:b,",
            b"-1:a,1:b,",
            b":a,1:b,",
            b"1:ab1:b,",
            b"99999999999999999999999:a,",
        ] {
            assert!(decode(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn keys_share_the_streams_slot() {
        assert_eq!(
            due_key("nova:task:a:b"),
            "redstream:delayed:{nova:task:a:b}"
        );
        assert_eq!(
            fields_key("nova:task:{x}:b"),
            "redstream:delayed:{x}:fields"
        );
    }
}
