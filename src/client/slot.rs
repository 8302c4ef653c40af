//! Redis Cluster key placement: hash slots, hash tags, and which master owns a slot.
//!
//! Owns the arithmetic the cluster mode rests on (docs/design.md, "Redis Cluster"): a key's slot is
//! CRC16 of its hash tag (the text between the first `{` and the next `}`, when not empty) or of the
//! whole key, modulo 16384. The commit script may only touch keys of its source stream's slot, so
//! every key RedStream derives from a stream — its outbox, a signature's use marker, a dead-letter
//! stream's dedupe record — is built here to share that stream's slot. Also what the relay last
//! learnt of a slot's master from CLUSTER NODES ([`Masters`], trusted for [`MASTERS_FOR`]).

use redis::Value;

/// The number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The hash tag of `key`: the text between its first `{` and the next `}`, if not empty.
pub fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let close = key[open + 1..].find('}')?;
    let tag = &key[open + 1..open + 1 + close];
    (!tag.is_empty()).then_some(tag)
}

/// The hash slot of `key`.
pub fn of(key: &str) -> u16 {
    let hashed = hash_tag(key).unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(hashed.as_bytes()) % SLOTS
}

/// A hash tag that places a derived key in `key`'s slot: `key`'s own tag, else `key` itself (a
/// key without braces hashes whole). None for a key with braces but no tag (`a{}b`, `x}y`), whose
/// slot no tag made of its text reproduces.
pub fn tag_for(key: &str) -> Option<String> {
    if let Some(tag) = hash_tag(key) {
        return Some(tag.to_owned());
    }
    (!key.contains(['{', '}'])).then(|| key.to_owned())
}

/// `prefix{tag}suffix` in `key`'s slot (see [`tag_for`]); for a key no tag can follow, the key
/// itself with `suffix` — correct on one node, refused by a cluster's CROSSSLOT check.
pub fn beside(key: &str, prefix: &str, suffix: &str) -> String {
    match tag_for(key) {
        Some(tag) => format!("{prefix}{{{tag}}}{suffix}"),
        None => format!("{prefix}{key}{suffix}"),
    }
}

/// The master serving `slot` in a CLUSTER SLOTS reply, as (host, port). A node that does not know
/// its own address (a one-node cluster nobody met) reports an empty or `?` endpoint, meaning "the node
/// you asked": `asked` stands in for it.
pub fn owner(map: &Value, slot: u16, asked: &str) -> Option<(String, u16)> {
    ranges(map, asked).find_map(|(start, end, node)| (start <= slot && slot <= end).then_some(node))
}

/// How many replicas the cluster knows for the master serving `slot`, from a CLUSTER NODES reply —
/// whatever their state: a replica whose link is cut, or that is failing, still counts, since it may be
/// promoted with what it has (and a write it lacks would then be lost).
pub fn replicas_of(nodes: &str, slot: u16) -> usize {
    master_of(nodes, slot).map_or(0, |(_, n)| n)
}

/// The id of the master serving `slot`, and how many replicas the cluster knows for it (see
/// [`replicas_of`]), from a CLUSTER NODES reply.
pub fn master_of(nodes: &str, slot: u16) -> Option<(String, usize)> {
    let lines: Vec<Vec<&str>> = nodes
        .lines()
        .map(|l| l.split_whitespace().collect())
        .filter(|f: &Vec<&str>| f.len() >= 8)
        .collect();
    let serves = |fields: &[&str]| {
        fields[8..].iter().any(|range| {
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= slot && slot <= b)
        })
    };
    let master = lines
        .iter()
        .find(|f| f[2].split(',').any(|flag| flag == "master") && serves(f))?;
    let mut replicas = lines.iter().filter(|f| f[3] == master[0]).count();
    if replicas == 0 {
        // A master this one does not list as its replica yet may be on its way to being one: a
        // master serving no slots (one whose replica took its slots over, failed or just back and
        // not yet told) or a node still in handshake. Counted, so what is written here alone is
        // not settled until a replica confirms it — a master that acknowledged it alone and then
        // lost a failover to that node would take it along (cluster nemesis seed 1796628016).
        replicas = lines
            .iter()
            .filter(|f| {
                let flags: Vec<&str> = f[2].split(',').collect();
                !flags.contains(&"myself")
                    && ((flags.contains(&"master") && f.len() == 8)
                        || flags.contains(&"handshake")
                        || flags.contains(&"noaddr"))
            })
            .count();
    }
    Some((master[0].to_owned(), replicas))
}

/// Every master in a CLUSTER SLOTS reply, once each, sorted (`asked` as in [`owner`]).
pub fn masters(map: &Value, asked: &str) -> Vec<(String, u16)> {
    let mut all: Vec<(String, u16)> = ranges(map, asked).map(|(_, _, node)| node).collect();
    all.sort();
    all.dedup();
    all
}

/// (first slot, last slot, master) of each range in a CLUSTER SLOTS reply.
fn ranges<'a>(map: &'a Value, asked: &'a str) -> impl Iterator<Item = Range> + 'a {
    let items = match map {
        Value::Array(items) => items.as_slice(),
        _ => &[],
    };
    items.iter().filter_map(|range| {
        let Value::Array(parts) = range else {
            return None;
        };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(node))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            return None;
        };
        let host = match node.first()? {
            Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            Value::SimpleString(s) => s.clone(),
            _ => return None,
        };
        let Some(Value::Int(port)) = node.get(1) else {
            return None;
        };
        let host = if host.is_empty() || host == "?" {
            asked.to_owned()
        } else {
            host
        };
        Some((*start as u16, *end as u16, (host, *port as u16)))
    })
}

/// A MOVED or ASK redirection in a server error (`MOVED 3999 127.0.0.1:6381`): whether it is ASK,
/// and the node to go to.
pub fn redirect(error: &redis::RedisError) -> Option<(bool, String, u16)> {
    let ask = match error.code()? {
        "MOVED" => false,
        "ASK" => true,
        _ => return None,
    };
    let detail = error.detail()?;
    let addr = detail.split_whitespace().nth(1)?;
    let (host, port) = addr.rsplit_once(':')?;
    Some((ask, host.to_owned(), port.parse().ok()?))
}

/// How long the relay trusts what CLUSTER NODES said of a target's master (its id and replica count):
/// the command is the dearest of a pass, and the answer changes only with the cluster's shape.
/// Trusting it is safe: a master that changed meanwhile answers CLUSTER MYID with another id, which
/// counts as "not on a replica yet" (the entries stay pending) and forgets what was known; only a
/// replica added within this time to a master known to have none is waited for a pass late.
pub const MASTERS_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// When CLUSTER NODES was asked, the id of the slot's master then, its replicas.
type Known = (std::time::Instant, String, usize);

/// Per slot, what CLUSTER NODES said of its master ([`Known`]).
#[derive(Clone, Debug, Default)]
pub struct Masters(std::sync::Arc<std::sync::Mutex<std::collections::HashMap<u16, Known>>>);

impl Masters {
    pub(super) fn known(&self, slot: u16) -> Option<(String, usize)> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&slot)
            .filter(|(at, ..)| at.elapsed() < MASTERS_FOR)
            .map(|(_, id, n)| (id.clone(), *n))
    }

    pub(super) fn learnt(&self, slot: u16, id: &str, replicas: usize) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(slot, (std::time::Instant::now(), id.to_owned(), replicas));
    }

    pub(super) fn forget(&self, slot: u16) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&slot);
    }
}

/// Which master served each slot when CLUSTER SLOTS was last asked (by a reader finding its node):
/// the committer's guess whether a reply to another slot can be written on the source's own node
/// ([`super::commit`], kind 9). Only a guess — the commit script checks whether the node serves the
/// key and sends the reply through the outbox when it does not — so an old map costs speed, never
/// correctness. Empty (every slot elsewhere) until learnt.
#[derive(Debug, Default)]
pub struct SlotMap(std::sync::RwLock<Vec<Range>>);

/// First slot, last slot, and the master (host, port) serving them.
type Range = (u16, u16, (String, u16));

impl SlotMap {
    /// Takes what a CLUSTER SLOTS reply says (`asked` as in [`owner`]).
    pub(super) fn learn(&self, map: &Value, asked: &str) {
        let ranges: Vec<_> = ranges(map, asked).collect();
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = ranges;
    }

    /// Whether slots `a` and `b` were served by the same master, as far as this map knows.
    pub fn same_node(&self, a: u16, b: u16) -> bool {
        let ranges = self.0.read().unwrap_or_else(|p| p.into_inner());
        let node = |slot: u16| {
            ranges
                .iter()
                .find(|(start, end, _)| *start <= slot && slot <= *end)
                .map(|(_, _, node)| node)
        };
        matches!((node(a), node(b)), (Some(x), Some(y)) if x == y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slot_map_knows_neighbours_and_nothing_before_it_learns() {
        let map = SlotMap::default();
        assert!(!map.same_node(1, 2), "unknown: not neighbours");
        let node = |port: i64| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
            ])
        };
        let range =
            |a: i64, b: i64, port| Value::Array(vec![Value::Int(a), Value::Int(b), node(port)]);
        map.learn(
            &Value::Array(vec![
                range(0, 5460, 7001),
                range(5461, 10922, 7002),
                range(10923, 16383, 7001),
            ]),
            "127.0.0.1",
        );
        assert!(map.same_node(50, 3000));
        assert!(map.same_node(50, 16000), "two ranges of one master");
        assert!(!map.same_node(50, 6000));
    }

    #[test]
    fn replicas_are_counted_whatever_their_state() {
        let nodes = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
b1 127.0.0.1:7002@17002 master - 0 0 2 connected 5461-10922
c1 127.0.0.1:7003@17003 master - 0 0 3 connected 10923-16383 16000
r1 127.0.0.1:7004@17004 slave,fail a1 0 0 1 disconnected
r2 127.0.0.1:7005@17005 slave b1 0 0 2 connected
r3 127.0.0.1:7006@17006 slave b1 0 0 2 connected
";
        assert_eq!(replicas_of(nodes, 100), 1, "a failing replica counts");
        assert_eq!(replicas_of(nodes, 6000), 2);
        assert_eq!(replicas_of(nodes, 12000), 0);
        assert_eq!(master_of(nodes, 6000), Some(("b1".into(), 2)));
        // A promoted replica whose old master is failed, or back and not yet its replica: counted.
        let after_failover = "\
r1 127.0.0.1:7004@17004 myself,master - 0 0 4 connected 0-5460
a1 127.0.0.1:7001@17001 master,fail - 0 0 1 disconnected
b1 127.0.0.1:7002@17002 master - 0 0 2 connected 5461-16383
r2 127.0.0.1:7005@17005 slave b1 0 0 2 connected
";
        assert_eq!(replicas_of(after_failover, 100), 1);
        assert_eq!(
            replicas_of(&after_failover.replace("master,fail", "master"), 100),
            1
        );
        assert_eq!(
            replicas_of(after_failover, 6000),
            1,
            "b1 keeps its own count"
        );
    }

    #[test]
    fn an_unknown_endpoint_is_the_node_asked() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let map = Value::Array(vec![
            Value::Array(vec![Value::Int(0), Value::Int(8191), node("", 7000)]),
            Value::Array(vec![
                Value::Int(8192),
                Value::Int(16383),
                node("10.0.0.2", 7001),
            ]),
        ]);
        assert_eq!(owner(&map, 5, "seed"), Some(("seed".into(), 7000)));
        assert_eq!(owner(&map, 9000, "seed"), Some(("10.0.0.2".into(), 7001)));
        assert_eq!(masters(&map, "seed").len(), 2);
    }

    #[test]
    fn slots_follow_hash_tags_as_redis_computes_them() {
        // Values from CLUSTER KEYSLOT on Redis 7.
        assert_eq!(of("foo"), 12182);
        assert_eq!(of("{user1000}.following"), of("{user1000}.followers"));
        assert_eq!(of("nova:task:{boomerang}:tasks"), of("boomerang"));
        assert_ne!(
            of("foo{}{bar}"),
            of("bar"),
            "an empty first tag hashes the whole key"
        );
        assert_eq!(hash_tag("foo{}{bar}"), None);
        assert_eq!(hash_tag("foo{{bar}}zap"), Some("{bar"));
        assert_eq!(hash_tag("foo{bar}{zap}"), Some("bar"));
    }

    #[test]
    fn derived_keys_share_the_slot_of_their_stream() {
        for stream in [
            "nova:task:boomerang:tasks",
            "nova:task:{boomerang}:tasks",
            "plain",
        ] {
            let outbox = beside(stream, "redstream:outbox:", "");
            assert_eq!(of(&outbox), of(stream), "{outbox}");
            let marker = beside(stream, "", ":sig:g:jti");
            assert_eq!(of(&marker), of(stream), "{marker}");
        }
        assert_eq!(tag_for("x}y"), None);
        assert_eq!(beside("x}y", "p:", ":s"), "p:x}y:s");
    }
}
