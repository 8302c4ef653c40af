//! The authorized client: every stream operation, checked against the caller's roles before it is sent.
//!
//! Owns the mapping from operations to Redis commands and the rule that none is sent unless the stream
//! name is valid and the identity holds the role for its domain (DESIGN §4 — including ack, claim and
//! pending, which the original never checked). Connections and error classification are
//! [`crate::conn`]'s; reply shapes are [`crate::reply`]'s; what to do with messages is the engine's.

use std::sync::Arc;
use std::time::Duration;

use redis::{Cmd, Value};

use crate::auth::{Identity, Op, Roles};
use crate::conn::{Ctx, Redis};
use crate::envelope::{self, Entry, Fields};
use crate::error::{Error, Result};
use crate::naming::{NameKind, Naming, validate_name};
use crate::reply::{self, Entries};
use crate::wire;

/// Options of [`Client::publish`].
#[derive(Clone, Copy, Debug, Default)]
pub struct PublishOptions {
    /// Trim the stream to about this many entries (`MAXLEN ~`), in the same command.
    pub maxlen: Option<u64>,
}

/// Options of [`Client::read`]. `start` and `end` are the lower and upper bounds whatever the direction.
#[derive(Clone, Debug)]
pub struct ReadOptions {
    pub count: Option<u64>,
    pub start: String,
    pub end: String,
    /// Newest first (XREVRANGE).
    pub reverse: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            count: None,
            start: "-".into(),
            end: "+".into(),
            reverse: false,
        }
    }
}

/// Where a group read starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadFrom<'a> {
    /// `>`: entries never delivered to this group.
    New,
    /// This consumer's own pending entries after the given id (`0` for all of them).
    Pending(&'a str),
}

/// XPENDING summary.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PendingSummary {
    pub count: u64,
    pub min_id: Option<String>,
    pub max_id: Option<String>,
    /// Consumers with pending entries, and how many each holds.
    pub consumers: Vec<(String, u64)>,
}

/// One XPENDING detail row.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PendingEntry {
    pub id: String,
    pub consumer: String,
    pub idle_ms: u64,
    pub deliveries: u64,
}

/// Filter of [`Client::pending`].
#[derive(Clone, Debug)]
pub struct PendingQuery {
    pub start: String,
    pub end: String,
    pub count: u64,
    pub consumer: Option<String>,
    pub min_idle: Option<Duration>,
}

impl Default for PendingQuery {
    fn default() -> Self {
        PendingQuery {
            start: "-".into(),
            end: "+".into(),
            count: 100,
            consumer: None,
            min_idle: None,
        }
    }
}

/// XAUTOCLAIM result.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AutoClaimed {
    /// Where the next scan starts; `0-0` when the PEL was scanned to the end.
    pub next: String,
    pub entries: Vec<Entry>,
    /// Pending ids whose entries were deleted or trimmed; Redis removed them from the PEL.
    pub deleted: Vec<String>,
}

/// XINFO STREAM, the parts operators look at.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StreamInfo {
    pub length: u64,
    pub groups: u64,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub last_generated_id: String,
}

/// One XINFO GROUPS row.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GroupInfo {
    pub name: String,
    pub consumers: u64,
    pub pending: u64,
    pub last_delivered_id: String,
    pub entries_read: Option<u64>,
    /// Entries not yet delivered to the group; None when Redis cannot tell.
    pub lag: Option<u64>,
}

/// One XINFO CONSUMERS row.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConsumerInfo {
    pub name: String,
    pub pending: u64,
    pub idle_ms: u64,
}

/// Stream operations on behalf of one verified identity.
#[derive(Clone)]
pub struct Client {
    redis: Redis,
    naming: Arc<Naming>,
    identity: Arc<Identity>,
}

impl Client {
    pub fn new(redis: Redis, naming: Arc<Naming>, identity: Identity) -> Self {
        Client {
            redis,
            naming,
            identity: Arc::new(identity),
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn naming(&self) -> &Naming {
        &self.naming
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// Validates `stream` and checks that this identity may `op` on it.
    pub fn authorize(&self, op: Op, stream: &str) -> Result<()> {
        check(&self.naming, &self.identity, op, stream)
    }

    /// XADD with the envelope stamped (`_timestamp`, `_source` = this identity, `_trace_id` kept or
    /// generated). Returns the new entry id.
    pub async fn publish(
        &self,
        stream: &str,
        mut fields: Fields,
        opts: PublishOptions,
    ) -> Result<String> {
        self.authorize(Op::Publish, stream)?;
        fields.stamp(&self.identity.subject, envelope::now_ms());
        let cmd = xadd(stream, &fields, opts.maxlen);
        self.redis.query(&cmd, Ctx::new("XADD", stream)).await
    }

    /// XRANGE, or XREVRANGE (newest first) with its bounds swapped as that command wants them.
    pub async fn read(&self, stream: &str, opts: &ReadOptions) -> Result<Vec<Entry>> {
        self.authorize(Op::Read, stream)?;
        let (name, first, second) = if opts.reverse {
            ("XREVRANGE", &opts.end, &opts.start)
        } else {
            ("XRANGE", &opts.start, &opts.end)
        };
        let mut cmd = redis::cmd(name);
        cmd.arg(stream).arg(first).arg(second);
        if let Some(n) = opts.count {
            cmd.arg("COUNT").arg(n);
        }
        let value = self.redis.query_value(&cmd, Ctx::new(name, stream)).await?;
        let got = reply::entries(value).map_err(|d| protocol(name, stream, d))?;
        Ok(got.entries)
    }

    /// XGROUP CREATE … MKSTREAM. `start` is `$` (only new entries), `0` (the whole stream) or an id.
    /// Returns false when the group already existed, which is not an error.
    pub async fn create_group(&self, stream: &str, group: &str, start: &str) -> Result<bool> {
        self.authorize(Op::CreateGroup, stream)?;
        validate_name(NameKind::Group, group)?;
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg(start)
            .arg("MKSTREAM");
        match self
            .redis
            .query_value(&cmd, Ctx::new("XGROUP CREATE", stream))
            .await
        {
            Ok(_) => Ok(true),
            Err(Error::Redis { source, .. }) if source.code() == Some("BUSYGROUP") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A reader for one consumer of a group, with a connection of its own (see [`crate::conn`]).
    pub fn group_reader(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        max_block: Duration,
    ) -> Result<GroupReader> {
        self.authorize(Op::ReadGroup, stream)?;
        validate_name(NameKind::Group, group)?;
        validate_name(NameKind::Consumer, consumer)?;
        Ok(GroupReader {
            wire: self.redis.plain_target().map(|t| (t, None)),
            redis: self.redis.dedicated(max_block)?,
            stream: stream.to_owned(),
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            max_block,
        })
    }

    /// XACK of many ids in one command. Returns how many were pending.
    pub async fn ack<S: AsRef<str>>(&self, stream: &str, group: &str, ids: &[S]) -> Result<u64> {
        self.authorize(Op::Ack, stream)?;
        if ids.is_empty() {
            return Ok(0);
        }
        let mut cmd = redis::cmd("XACK");
        cmd.arg(stream).arg(group);
        for id in ids {
            cmd.arg(id.as_ref());
        }
        self.redis
            .query(&cmd, Ctx::new("XACK", stream).group(group))
            .await
    }

    /// XDEL of entries. Returns how many existed.
    pub async fn delete<S: AsRef<str>>(&self, stream: &str, ids: &[S]) -> Result<u64> {
        self.authorize(Op::Delete, stream)?;
        if ids.is_empty() {
            return Ok(0);
        }
        let mut cmd = redis::cmd("XDEL");
        cmd.arg(stream);
        for id in ids {
            cmd.arg(id.as_ref());
        }
        self.redis.query(&cmd, Ctx::new("XDEL", stream)).await
    }

    /// XTRIM … MINID `min_id`: removes entries older than `min_id`. Returns how many were removed.
    pub async fn trim_before(&self, stream: &str, min_id: &str) -> Result<u64> {
        self.authorize(Op::Delete, stream)?;
        let mut cmd = redis::cmd("XTRIM");
        cmd.arg(stream).arg("MINID").arg(min_id);
        self.redis.query(&cmd, Ctx::new("XTRIM", stream)).await
    }

    /// XCLAIM of specific ids idle at least `min_idle`; bumps their delivery counts.
    pub async fn claim<S: AsRef<str>>(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        ids: &[S],
    ) -> Result<Entries> {
        self.authorize(Op::Claim, stream)?;
        validate_name(NameKind::Consumer, consumer)?;
        if ids.is_empty() {
            return Ok(Entries::default());
        }
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(stream)
            .arg(group)
            .arg(consumer)
            .arg(min_idle.as_millis() as u64);
        for id in ids {
            cmd.arg(id.as_ref());
        }
        let ctx = Ctx::new("XCLAIM", stream).group(group);
        let value = self.redis.query_value(&cmd, ctx).await?;
        reply::entries(value).map_err(|d| protocol("XCLAIM", stream, d))
    }

    /// XAUTOCLAIM (not JUSTID, so delivery counts move) of up to `count` entries idle at least `min_idle`,
    /// scanning the PEL from `start`.
    pub async fn autoclaim(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        start: &str,
        count: u64,
    ) -> Result<AutoClaimed> {
        self.authorize(Op::Claim, stream)?;
        validate_name(NameKind::Consumer, consumer)?;
        let mut cmd = redis::cmd("XAUTOCLAIM");
        cmd.arg(stream)
            .arg(group)
            .arg(consumer)
            .arg(min_idle.as_millis() as u64)
            .arg(start)
            .arg("COUNT")
            .arg(count);
        let ctx = Ctx::new("XAUTOCLAIM", stream).group(group);
        let value = self.redis.query_value(&cmd, ctx).await?;
        let (next, got) = reply::autoclaim(value).map_err(|d| protocol("XAUTOCLAIM", stream, d))?;
        Ok(AutoClaimed {
            next,
            entries: got.entries,
            deleted: got.deleted,
        })
    }

    /// XPENDING summary: how many entries the group has pending, and with whom.
    pub async fn pending_summary(&self, stream: &str, group: &str) -> Result<PendingSummary> {
        self.authorize(Op::Pending, stream)?;
        let mut cmd = redis::cmd("XPENDING");
        cmd.arg(stream).arg(group);
        let ctx = Ctx::new("XPENDING", stream).group(group);
        let value = self.redis.query_value(&cmd, ctx).await?;
        decode_pending_summary(value).map_err(|d| protocol("XPENDING", stream, d))
    }

    /// XPENDING detail rows.
    pub async fn pending(
        &self,
        stream: &str,
        group: &str,
        q: &PendingQuery,
    ) -> Result<Vec<PendingEntry>> {
        self.authorize(Op::Pending, stream)?;
        let mut cmd = redis::cmd("XPENDING");
        cmd.arg(stream).arg(group);
        if let Some(idle) = q.min_idle {
            cmd.arg("IDLE").arg(idle.as_millis() as u64);
        }
        cmd.arg(&q.start).arg(&q.end).arg(q.count);
        if let Some(c) = &q.consumer {
            cmd.arg(c);
        }
        let ctx = Ctx::new("XPENDING", stream).group(group);
        let value = self.redis.query_value(&cmd, ctx).await?;
        decode_pending_rows(value).map_err(|d| protocol("XPENDING", stream, d))
    }

    /// XINFO STREAM.
    pub async fn stream_info(&self, stream: &str) -> Result<StreamInfo> {
        self.authorize(Op::Info, stream)?;
        let mut cmd = redis::cmd("XINFO");
        cmd.arg("STREAM").arg(stream);
        let value = self
            .redis
            .query_value(&cmd, Ctx::new("XINFO STREAM", stream))
            .await?;
        let mut p = reply::pairs(value).map_err(|d| protocol("XINFO STREAM", stream, d))?;
        let entry_id = |v: Value| match v {
            Value::Array(mut e) if !e.is_empty() => reply::string(e.swap_remove(0)),
            _ => None,
        };
        Ok(StreamInfo {
            length: count(&reply::take(&mut p, "length")),
            groups: count(&reply::take(&mut p, "groups")),
            first_id: entry_id(reply::take(&mut p, "first-entry")),
            last_id: entry_id(reply::take(&mut p, "last-entry")),
            last_generated_id: reply::string(reply::take(&mut p, "last-generated-id"))
                .unwrap_or_default(),
        })
    }

    /// XINFO GROUPS.
    pub async fn groups(&self, stream: &str) -> Result<Vec<GroupInfo>> {
        self.authorize(Op::Info, stream)?;
        let mut cmd = redis::cmd("XINFO");
        cmd.arg("GROUPS").arg(stream);
        let value = self
            .redis
            .query_value(&cmd, Ctx::new("XINFO GROUPS", stream))
            .await?;
        rows(value)
            .and_then(|rows| {
                rows.into_iter()
                    .map(|row| {
                        let mut p = reply::pairs(row)?;
                        Ok(GroupInfo {
                            name: reply::string(reply::take(&mut p, "name")).unwrap_or_default(),
                            consumers: count(&reply::take(&mut p, "consumers")),
                            pending: count(&reply::take(&mut p, "pending")),
                            last_delivered_id: reply::string(reply::take(
                                &mut p,
                                "last-delivered-id",
                            ))
                            .unwrap_or_default(),
                            entries_read: reply::int(&reply::take(&mut p, "entries-read"))
                                .map(|n| n as u64),
                            lag: reply::int(&reply::take(&mut p, "lag")).map(|n| n as u64),
                        })
                    })
                    .collect()
            })
            .map_err(|d| protocol("XINFO GROUPS", stream, d))
    }

    /// XINFO CONSUMERS.
    pub async fn consumers(&self, stream: &str, group: &str) -> Result<Vec<ConsumerInfo>> {
        self.authorize(Op::Info, stream)?;
        let mut cmd = redis::cmd("XINFO");
        cmd.arg("CONSUMERS").arg(stream).arg(group);
        let ctx = Ctx::new("XINFO CONSUMERS", stream).group(group);
        let value = self.redis.query_value(&cmd, ctx).await?;
        rows(value)
            .and_then(|rows| {
                rows.into_iter()
                    .map(|row| {
                        let mut p = reply::pairs(row)?;
                        Ok(ConsumerInfo {
                            name: reply::string(reply::take(&mut p, "name")).unwrap_or_default(),
                            pending: count(&reply::take(&mut p, "pending")),
                            idle_ms: count(&reply::take(&mut p, "idle")),
                        })
                    })
                    .collect()
            })
            .map_err(|d| protocol("XINFO CONSUMERS", stream, d))
    }

    /// Stream keys matching `pattern` (SCAN … TYPE stream) that this identity may look at, sorted.
    /// Admins also see keys that are not valid stream names.
    pub async fn list_streams(&self, pattern: &str) -> Result<Vec<String>> {
        let mut cursor = 0u64;
        let mut out = Vec::new();
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .arg("TYPE")
                .arg("stream");
            let (next, keys): (u64, Vec<String>) =
                self.redis.query(&cmd, Ctx::new("SCAN", pattern)).await?;
            for key in keys {
                let visible = match self.naming.domain_of(&key) {
                    Ok(domain) => self.identity.roles.allows(Op::Info, domain),
                    Err(_) => self.identity.roles.is_admin(),
                };
                if visible {
                    out.push(key);
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// The permission rule applied to one call: a valid name, and a role for its domain.
pub fn check(naming: &Naming, identity: &Identity, op: Op, stream: &str) -> Result<()> {
    let domain = naming.domain_of(stream)?;
    if identity.roles.allows(op, domain) {
        Ok(())
    } else {
        Err(Error::Unauthorized {
            op,
            stream: stream.to_owned(),
            identity: identity.subject.clone(),
            needed: Roles::needed(op, domain),
        })
    }
}

/// The XADD command for already-stamped fields.
pub fn xadd(stream: &str, fields: &Fields, maxlen: Option<u64>) -> Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream);
    if let Some(n) = maxlen {
        cmd.arg("MAXLEN").arg("~").arg(n);
    }
    cmd.arg("*");
    for (name, value) in fields.iter() {
        cmd.arg(name).arg(value);
    }
    cmd
}

/// Reads one consumer's share of a group, on its own connection: a [`crate::wire`] connection
/// where Redis is reached without TLS, else a dedicated connection of the `redis` crate.
pub struct GroupReader {
    /// The plain connection's target, and the connection while it is up.
    wire: Option<(wire::Target, Option<wire::Conn>)>,
    /// The dedicated connection (used under TLS), and what classifies errors either way.
    redis: Redis,
    stream: String,
    group: String,
    consumer: String,
    max_block: Duration,
}

impl GroupReader {
    pub fn stream(&self) -> &str {
        &self.stream
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// The timeout of this reader's connection: the longest BLOCK plus the command timeout.
    pub fn response_timeout(&self) -> Duration {
        self.redis.response_timeout()
    }

    /// XREADGROUP of up to `count` entries. `block` waits for new entries (at most the reader's
    /// `max_block`); pending reads never block. Entries deleted while pending come back in `deleted`.
    pub async fn read(
        &mut self,
        from: ReadFrom<'_>,
        count: u64,
        block: Option<Duration>,
    ) -> Result<Entries> {
        self.round(None, from, count, block).await?.read
    }

    /// One round trip: `before` (typically the commit of the previous batch), then the read. Both travel
    /// in one pipeline on this reader's connection; each has its own result.
    pub async fn round(
        &mut self,
        before: Option<Cmd>,
        from: ReadFrom<'_>,
        count: u64,
        block: Option<Duration>,
    ) -> Result<Round> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count);
        let id = match from {
            ReadFrom::New => {
                if let Some(b) = block {
                    cmd.arg("BLOCK")
                        .arg(b.min(self.max_block).as_millis() as u64);
                }
                ">"
            }
            ReadFrom::Pending(after) => after,
        };
        cmd.arg("STREAMS").arg(&self.stream).arg(id);
        if self.wire.is_some() {
            return self.round_on_wire(before, cmd).await;
        }
        let ctx = Ctx::new("XREADGROUP", &self.stream).group(&self.group);
        let Some(before) = before else {
            let read = self.redis.query_value(&cmd, ctx).await.and_then(|v| {
                reply::read_one_stream(v).map_err(|d| protocol("XREADGROUP", &self.stream, d))
            });
            return Ok(Round { before: None, read });
        };
        let mut pipe = redis::pipe();
        pipe.ignore_errors().add_command(before).add_command(cmd);
        let mut replies = self.redis.query_pipe(&pipe, ctx).await?.into_iter();
        let (Some(first), Some(second)) = (replies.next(), replies.next()) else {
            return Err(protocol(
                "XREADGROUP",
                &self.stream,
                "pipeline returned too few replies".into(),
            ));
        };
        let before = Some(first.extract_error().map_err(|e| {
            self.redis
                .classify(e, Ctx::new("EVALSHA", &self.stream).group(&self.group))
        }));
        let read = second
            .extract_error()
            .map_err(|e| self.redis.classify(e, ctx))
            .and_then(|v| {
                reply::read_one_stream(v).map_err(|d| protocol("XREADGROUP", &self.stream, d))
            });
        Ok(Round { before, read })
    }
}

impl GroupReader {
    /// [`GroupReader::round`] over the plain connection, connecting first if it is down. Any failure
    /// but a server's error reply (and any cancellation) drops the connection: the next round starts
    /// on a new one.
    async fn round_on_wire(&mut self, before: Option<Cmd>, read: Cmd) -> Result<Round> {
        let ctx = Ctx::new("XREADGROUP", &self.stream).group(&self.group);
        let settings = self.redis.settings();
        let limit = self.redis.response_timeout() + settings.connect_timeout;
        let connect_timeout = settings.connect_timeout;
        let Some((target, conn)) = &mut self.wire else {
            unreachable!("checked by the caller");
        };
        let started = std::time::Instant::now();
        // The connection is out of its slot while a request is under way: a round cancelled halfway
        // (its reply still unread) leaves no connection behind, and the next round starts a new one.
        let exchange = async {
            let mut c = match conn.take() {
                Some(c) => c,
                None => wire::Conn::connect(target, connect_timeout).await?,
            };
            let mut packed = Vec::new();
            if let Some(b) = &before {
                b.write_packed_command(&mut packed);
            }
            read.write_packed_command(&mut packed);
            let frames = c
                .request(&packed, 1 + usize::from(before.is_some()))
                .await?;
            redis::RedisResult::Ok((frames, c))
        };
        let result = tokio::time::timeout(limit, exchange).await;
        crate::conn::observe(ctx.command, started);
        let (mut frames, c) = match result {
            Ok(Ok(got)) => got,
            Ok(Err(e)) => return Err(self.redis.classify(e, ctx)),
            Err(_) => {
                return Err(Error::Timeout {
                    command: ctx.command,
                    key: self.stream.clone(),
                    after: limit,
                });
            }
        };
        let read_frame = c.frame(frames.pop().expect("one frame per command"));
        let read = if read_frame.first() == Some(&b'-') {
            match wire::value(read_frame) {
                Err(e) => Err(self.redis.classify(e, ctx)),
                Ok(v) => Err(protocol("XREADGROUP", &self.stream, format!("{v:?}"))),
            }
        } else {
            wire::read_reply(read_frame).map_err(|d| protocol("XREADGROUP", &self.stream, d))
        };
        let before = frames.pop().map(|f| {
            wire::value(c.frame(f)).map_err(|e| {
                self.redis
                    .classify(e, Ctx::new("EVALSHA", &self.stream).group(&self.group))
            })
        });
        *conn = Some(c);
        Ok(Round { before, read })
    }
}

/// What one [`GroupReader::round`] brought back.
#[derive(Debug)]
pub struct Round {
    /// The reply to the command sent before the read, if one was.
    pub before: Option<Result<Value>>,
    pub read: Result<Entries>,
}

fn protocol(command: &'static str, key: &str, detail: String) -> Error {
    Error::Protocol {
        command,
        key: key.to_owned(),
        detail,
    }
}

fn count(v: &Value) -> u64 {
    reply::int(v).unwrap_or(0).max(0) as u64
}

fn rows(value: Value) -> Result<Vec<Value>, String> {
    match value {
        Value::Array(rows) => Ok(rows),
        other => Err(format!("expected an array of rows, got {other:?}")),
    }
}

fn decode_pending_summary(value: Value) -> Result<PendingSummary, String> {
    let Value::Array(parts) = value else {
        return Err(format!(
            "expected [count, min, max, consumers], got {value:?}"
        ));
    };
    let mut parts = parts.into_iter();
    let total = parts
        .next()
        .as_ref()
        .and_then(reply::int)
        .ok_or("missing count")?;
    let min_id = parts.next().and_then(reply::string);
    let max_id = parts.next().and_then(reply::string);
    let mut consumers = Vec::new();
    if let Some(Value::Array(rows)) = parts.next() {
        for row in rows {
            let Value::Array(pair) = row else {
                return Err("consumer row is not a pair".into());
            };
            let mut pair = pair.into_iter();
            let name = pair
                .next()
                .and_then(reply::string)
                .ok_or("consumer without name")?;
            let n = pair
                .next()
                .as_ref()
                .and_then(reply::int)
                .ok_or("consumer without count")?;
            consumers.push((name, n.max(0) as u64));
        }
    }
    Ok(PendingSummary {
        count: total.max(0) as u64,
        min_id,
        max_id,
        consumers,
    })
}

fn decode_pending_rows(value: Value) -> Result<Vec<PendingEntry>, String> {
    rows(value)?
        .into_iter()
        .map(|row| {
            let Value::Array(cols) = row else {
                return Err("pending row is not an array".to_string());
            };
            let mut cols = cols.into_iter();
            let id = cols
                .next()
                .and_then(reply::string)
                .ok_or("row without id")?;
            let consumer = cols
                .next()
                .and_then(reply::string)
                .ok_or("row without consumer")?;
            let idle = cols
                .next()
                .as_ref()
                .and_then(reply::int)
                .ok_or("row without idle")?;
            let deliveries = cols
                .next()
                .as_ref()
                .and_then(reply::int)
                .ok_or("row without count")?;
            Ok(PendingEntry {
                id,
                consumer,
                idle_ms: idle.max(0) as u64,
                deliveries: deliveries.max(0) as u64,
            })
        })
        .collect()
}
