//! The authorized client: every stream operation, checked against the caller's roles before it is sent.
//!
//! Owns the mapping from operations to Redis commands, and the rule that none is sent before
//! [`crate::auth::authorize`] allowed it — including ack, claim and pending, which the original never
//! checked. The connection is private to the client: nothing outside this module sends a command
//! around the check. Connections and error classification are [`super::conn`]'s; reply shapes are
//! [`super::decode`]'s and [`super::info`]'s; what to do with messages is the engine's.

use std::sync::Arc;
use std::time::Duration;

use redis::streams::{
    StreamInfoConsumersReply, StreamInfoGroupsReply, StreamPendingCountReply, StreamPendingReply,
};
use redis::{Cmd, Value};

use super::commit::{self, CommitCall, Committer};
use super::conn::{Ctx, Redis, RedisSettings};
use super::decode::{self as reply, Entries};
use super::error::{Error, Result};
use super::info::{
    AutoClaimed, ConsumerInfo, GroupInfo, PendingEntry, PendingSummary, StreamInfo, count,
};
use super::reader::GroupReader;
use super::restore::Restored;
use super::retention;
use crate::auth::jwt::KeySet;
use crate::auth::signature;
use crate::auth::{Identity, Op, authorize};
use crate::model::StreamId;
use crate::model::dead_letter;
use crate::model::envelope::{self, Entry, Fields};
use crate::model::message::Once;
use crate::model::naming::{NameKind, Naming, validate_name};

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

/// Stream operations on behalf of one verified identity.
#[derive(Clone)]
pub struct Client {
    redis: Redis,
    naming: Arc<Naming>,
    identity: Arc<Identity>,
    /// What the relay last learnt of a slot's master (see `slot::Masters`), shared by clones.
    pub(super) masters: super::slot::Masters,
}

impl Client {
    /// A client acting as `identity` over a lazily connecting connection: fails only on a malformed
    /// URL or TLS material; whether Redis answers is [`Client::ping`]'s question.
    pub fn connect(
        settings: RedisSettings,
        naming: Arc<Naming>,
        identity: Identity,
    ) -> Result<Self> {
        Ok(Client {
            redis: Redis::open(settings)?,
            naming,
            identity: Arc::new(identity),
            masters: super::slot::Masters::default(),
        })
    }

    /// The same client over a connection of its own, for commands that block the connection up to
    /// `max_block` (WAIT, BLOCK) without stalling everyone else's.
    pub fn dedicated(&self, max_block: Duration) -> Result<Client> {
        Ok(Client {
            redis: self.redis.dedicated(max_block)?,
            ..self.clone()
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The connection, for the client's own modules.
    pub(super) fn redis(&self) -> &Redis {
        &self.redis
    }

    /// Whether this client talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.redis.is_cluster()
    }

    pub fn naming(&self) -> &Naming {
        &self.naming
    }

    /// The connection settings (timeouts bound how long the engine waits for a round).
    pub fn settings(&self) -> &RedisSettings {
        self.redis.settings()
    }

    /// One PING; Ok once Redis answers.
    pub async fn ping(&self) -> Result<()> {
        self.redis.ping().await
    }

    /// PINGs until Redis answers or `wait` has passed (see [`super::wait_ready`]).
    pub async fn wait_ready(&self, wait: Duration) -> Result<()> {
        self.redis.wait_ready(wait).await
    }

    /// Validates `stream` and checks that this identity may `op` on it.
    pub fn authorize(&self, op: Op, stream: &str) -> Result<()> {
        Ok(authorize(&self.naming, &self.identity, op, stream)?)
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

    /// [`Client::publish`] to appear on `stream` at `due` ([`super::delayed`]): held beside the stream
    /// until a daemon moves it there. Returns when it is due (ms since the epoch, Redis's clock).
    pub async fn publish_delayed(
        &self,
        stream: &str,
        mut fields: Fields,
        due: super::delayed::Due,
    ) -> Result<u64> {
        self.authorize(Op::Publish, stream)?;
        fields.stamp(&self.identity.subject, envelope::now_ms());
        let cluster = self.is_cluster();
        if cluster {
            // The registry lives in a slot of its own: named first (a name without messages is
            // harmless). On one Redis the hold script names it itself.
            let mut register = redis::cmd("SADD");
            register.arg(super::delayed::REGISTRY).arg(stream);
            let _: i64 = self
                .redis
                .query(&register, Ctx::new("SADD", super::delayed::REGISTRY))
                .await?;
        }
        let id = uuid::Uuid::new_v4().to_string();
        let cmd = super::delayed::hold_command(stream, &id, due, &fields, cluster);
        self.redis.query(&cmd, Ctx::new("EVAL", stream)).await
    }

    /// The value of a handler's state key (its `state.get`; what handlers may read is checked against
    /// their roles with the config).
    pub async fn state_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        self.redis.query(&cmd, Ctx::new("GET", key)).await
    }

    /// The streams that may hold delayed messages.
    pub async fn delayed_streams(&self) -> Result<Vec<String>> {
        let mut cmd = redis::cmd("SMEMBERS");
        cmd.arg(super::delayed::REGISTRY);
        self.redis
            .query(&cmd, Ctx::new("SMEMBERS", super::delayed::REGISTRY))
            .await
    }

    /// How many delayed messages are held for `stream`, and when the next is due (ms since the epoch).
    pub async fn delayed_summary(&self, stream: &str) -> Result<(u64, Option<u64>)> {
        self.authorize(Op::Read, stream)?;
        let key = super::delayed::due_key(stream);
        let mut count = redis::cmd("ZCARD");
        count.arg(&key);
        let held: u64 = self.redis.query(&count, Ctx::new("ZCARD", stream)).await?;
        let mut first = redis::cmd("ZRANGE");
        first.arg(&key).arg(0).arg(0).arg("WITHSCORES");
        let next: Vec<(String, f64)> = self.redis.query(&first, Ctx::new("ZRANGE", stream)).await?;
        Ok((held, next.first().map(|(_, at)| *at as u64)))
    }

    /// Moves up to `count` of `stream`'s delayed messages whose time has come onto it. Returns how
    /// many it moved, how many are left, and when the next is due.
    pub async fn move_delayed(&self, stream: &str, count: u64) -> Result<(u64, u64, Option<u64>)> {
        self.authorize(Op::Publish, stream)?;
        let cmd = super::delayed::move_command(stream, count, self.is_cluster());
        let (moved, left, next): (u64, u64, i64) =
            self.redis.query(&cmd, Ctx::new("EVAL", stream)).await?;
        Ok((moved, left, u64::try_from(next).ok()))
    }

    /// [`Client::publish`] with a signature (`_sig`, [`crate::auth::signature`]) made by `keys` for this
    /// client's identity over the final fields (envelope stamped) and the stream: what a route that
    /// requires a signed sender, and the control stream, accept — each copy of it at most once.
    pub async fn publish_signed(
        &self,
        stream: &str,
        fields: Fields,
        keys: &KeySet,
        opts: PublishOptions,
    ) -> Result<String> {
        let mut fields = self.prepare_signed(stream, fields)?;
        let sig = keys.sign_message(&self.identity, stream, &fields, Duration::MAX)?;
        fields.push(signature::FIELD, sig);
        self.publish_prepared(stream, &fields, opts).await
    }

    /// The first half of a signed publish whose signature comes from elsewhere (the credential
    /// exchange): the fields as they will be written, envelope stamped, credentials removed. Sign
    /// their [`signature::digest`], push `_sig`, and hand them to [`Client::publish_prepared`].
    pub fn prepare_signed(&self, stream: &str, mut fields: Fields) -> Result<Fields> {
        self.authorize(Op::Publish, stream)?;
        fields.remove(signature::FIELD);
        fields.remove(signature::TOKEN_FIELD);
        fields.stamp(&self.identity.subject, envelope::now_ms());
        Ok(fields)
    }

    /// XADD of fields [`Client::prepare_signed`] made and a signature completed, as they are.
    pub async fn publish_prepared(
        &self,
        stream: &str,
        fields: &Fields,
        opts: PublishOptions,
    ) -> Result<String> {
        self.authorize(Op::Publish, stream)?;
        let cmd = xadd(stream, fields, opts.maxlen);
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

    /// Re-creates a group Redis no longer has, where it skips nothing ([`super::restore`]): at `0` when
    /// the stream is gone or was made anew since the group last read it (Redis lost its data), else at
    /// `start`. `known` is the group's position as the caller last knew it.
    pub async fn restore_group(
        &self,
        stream: &str,
        group: &str,
        start: &str,
        known: Option<StreamId>,
    ) -> Result<Restored> {
        let info = match self.stream_info(stream).await {
            Ok(info) => Some(info),
            Err(e) if e.is_missing_key() => None,
            Err(e) => return Err(e),
        };
        let (at, lost) = super::restore::resume_point(info.as_ref(), known, start);
        let created = self.create_group(stream, group, &at).await?;
        Ok(Restored { created, at, lost })
    }

    /// The group's position (its last-delivered id), or None when Redis has no such group.
    pub async fn group_position(&self, stream: &str, group: &str) -> Result<Option<StreamId>> {
        let groups = match self.groups(stream).await {
            Ok(g) => g,
            Err(e) if e.is_missing_key() => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(groups
            .into_iter()
            .find(|g| g.name == group)
            .and_then(|g| StreamId::parse(&g.last_delivered_id).ok()))
    }

    /// A reader for one consumer of a group, with a connection of its own (see [`super::reader`]).
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
        GroupReader::new(&self.redis, stream, group, consumer, max_block)
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

    /// Records when the retry of `id`, pending for `consumer`, is due: in `wait` by Redis's clock
    /// ([`super::recover::SCHEDULE`]); `held`: the delivery count seen, given back by one. Whether it
    /// was still ours to schedule. Safe to send again.
    pub async fn schedule_retry(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        id: &str,
        wait: Duration,
        held: Option<u64>,
    ) -> Result<bool> {
        self.authorize(Op::Claim, stream)?;
        let cmd = super::recover::schedule_command(
            stream,
            group,
            consumer,
            id,
            u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            held,
        );
        let scheduled: i64 = self
            .redis
            .query(&cmd, Ctx::new("EVAL", stream).group(group))
            .await?;
        Ok(scheduled == 1)
    }

    /// Takes up to `want` permits of `handler`'s rate limit (one per `interval_us`, `burst` at most
    /// at once) for a loop of `stream`. Returns how many it got, and when none: how long until
    /// `want` are free.
    pub async fn take_permits(
        &self,
        stream: &str,
        handler: &str,
        interval_us: u64,
        burst: u64,
        want: u64,
    ) -> Result<(u64, Duration)> {
        self.authorize(Op::Claim, stream)?;
        let key = super::rate::key(handler);
        let cmd = super::rate::command(&key, interval_us, burst, want);
        let (got, wait_us): (u64, u64) = self.redis.query(&cmd, Ctx::new("EVAL", &key)).await?;
        Ok((got, Duration::from_micros(wait_us)))
    }

    /// How many of the group's messages wait for their retry's time.
    pub async fn scheduled_retries(&self, stream: &str, group: &str) -> Result<u64> {
        self.authorize(Op::Pending, stream)?;
        let mut cmd = redis::cmd("ZCARD");
        cmd.arg(super::recover::due_key(stream, group));
        self.redis
            .query(&cmd, Ctx::new("ZCARD", stream).group(group))
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

    /// Trims `stream` to at most `max_len` newest entries and drops entries older than `older_than`,
    /// but never past what a group of the stream still needs: its oldest pending entry, and its last
    /// delivered one with everything after it. Computed and applied in one script (see
    /// [`super::retention`]). Returns how many entries went and the id trimmed before, if any.
    pub async fn trim_retained(
        &self,
        stream: &str,
        max_len: Option<u64>,
        older_than: Option<StreamId>,
    ) -> Result<(u64, Option<StreamId>)> {
        self.authorize(Op::Delete, stream)?;
        self.authorize(Op::Info, stream)?;
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(retention::SOURCE).arg(1).arg(stream);
        cmd.arg(max_len.map(|n| n.to_string()).unwrap_or_default());
        cmd.arg(older_than.map(|id| id.to_string()).unwrap_or_default());
        let ctx = Ctx::new("EVAL retention", stream);
        let (removed, cut): (u64, String) = self.redis.query(&cmd, ctx).await?;
        let cut = StreamId::parse(&cut).ok();
        Ok((removed, cut))
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
        let reply: StreamPendingReply = self.redis.query(&cmd, ctx).await?;
        Ok(reply.into())
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
        let reply: StreamPendingCountReply = self.redis.query(&cmd, ctx).await?;
        Ok(reply.ids.into_iter().map(PendingEntry::from).collect())
    }

    /// XINFO STREAM, without the first and last entries' fields: XINFO answers with both entries
    /// whole, and a stream that begins or ends with a 100 MB entry would cost 200 MB a call. A short
    /// script asks instead and returns only their ids (see [`STREAM_INFO`]).
    pub async fn stream_info(&self, stream: &str) -> Result<StreamInfo> {
        self.authorize(Op::Info, stream)?;
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(STREAM_INFO).arg(1).arg(stream);
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
            entries_added: reply::int(&reply::take(&mut p, "entries-added"))
                .map(|n| n.max(0) as u64),
            max_deleted_id: reply::string(reply::take(&mut p, "max-deleted-entry-id")),
        })
    }

    /// XINFO GROUPS.
    pub async fn groups(&self, stream: &str) -> Result<Vec<GroupInfo>> {
        self.authorize(Op::Info, stream)?;
        let mut cmd = redis::cmd("XINFO");
        cmd.arg("GROUPS").arg(stream);
        let reply: StreamInfoGroupsReply = self
            .redis
            .query(&cmd, Ctx::new("XINFO GROUPS", stream))
            .await?;
        Ok(reply.groups.into_iter().map(GroupInfo::from).collect())
    }

    /// XINFO CONSUMERS.
    pub async fn consumers(&self, stream: &str, group: &str) -> Result<Vec<ConsumerInfo>> {
        self.authorize(Op::Info, stream)?;
        let mut cmd = redis::cmd("XINFO");
        cmd.arg("CONSUMERS").arg(stream).arg(group);
        let ctx = Ctx::new("XINFO CONSUMERS", stream).group(group);
        let reply: StreamInfoConsumersReply = self.redis.query(&cmd, ctx).await?;
        Ok(reply
            .consumers
            .into_iter()
            .map(ConsumerInfo::from)
            .collect())
    }

    /// Stream keys matching `pattern` (SCAN … TYPE stream) that this identity may look at, sorted.
    /// Admins also see keys that are not valid stream names.
    pub async fn list_streams(&self, pattern: &str) -> Result<Vec<String>> {
        // A cluster's keys are spread over its masters: each is scanned.
        let nodes: Vec<Option<(String, u16)>> = match self.redis.masters().await? {
            Some(masters) => masters.into_iter().map(Some).collect(),
            None => vec![None],
        };
        let mut out = Vec::new();
        for node in nodes {
            let mut cursor = 0u64;
            loop {
                let mut cmd = redis::cmd("SCAN");
                cmd.arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .arg("TYPE")
                    .arg("stream");
                let ctx = Ctx::new("SCAN", pattern);
                let value = match &node {
                    Some(node) => self.redis.query_on(node, &cmd, ctx).await?,
                    None => self.redis.query_value(&cmd, ctx).await?,
                };
                let (next, keys): (u64, Vec<String>) =
                    redis::FromRedisValue::from_redis_value(value).map_err(|e| {
                        Error::Protocol {
                            command: "SCAN",
                            key: pattern.to_owned(),
                            detail: e.to_string(),
                        }
                    })?;
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
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// Commits and dead letters: the write paths of the consumer loop and of `redstream dlq replay`.
impl Client {
    /// A committer for `consumer` of `group` on `stream`, dead-lettering to `dead_letter`. Checks the
    /// ack and the dead-letter write now; each reply's stream is checked when its handler returns.
    pub fn committer(
        &self,
        stream: Arc<str>,
        group: &str,
        consumer: &str,
        dead_letter: &str,
    ) -> Result<Committer> {
        self.authorize(Op::Ack, &stream)?;
        self.authorize(Op::Publish, dead_letter)?;
        Ok(Committer::new(
            stream,
            group,
            consumer,
            &self.identity.subject,
            dead_letter,
            self.redis.is_cluster().then(|| self.redis.slot_map()),
        ))
    }

    /// Records that signature `once` took effect with the entry `owner` (`<stream>/<id>`) for `group`
    /// of `stream`, unless another entry did first: None when this one holds it (now, or already — a
    /// retry of the same entry), else the entry that does. The record outlives every acceptance of the
    /// signature (a relative expiry, [`signature::marker_ttl_ms`]); the commit script checks and writes
    /// the same key ([`commit::signature_key`]).
    pub async fn claim_signature(
        &self,
        stream: &str,
        group: &str,
        once: &Once,
        owner: &str,
    ) -> Result<Option<String>> {
        self.authorize(Op::Publish, stream)?;
        let key = commit::signature_key(stream, group, &once.jti, self.redis.is_cluster());
        let ttl = signature::marker_ttl_ms(once.until_ms, envelope::now_ms());
        let mut cmd = redis::cmd("SET");
        cmd.arg(&key)
            .arg(owner)
            .arg("NX")
            .arg("PX")
            .arg(ttl)
            .arg("GET");
        let prior: Option<String> = self.redis.query(&cmd, Ctx::new("SET", &key)).await?;
        Ok(prior.filter(|p| p != owner))
    }

    /// Redis's clock (TIME), in milliseconds since the epoch: what entry ids are stamped with.
    pub async fn server_time_ms(&self) -> Result<u64> {
        let (secs, micros): (u64, u64) = self
            .redis
            .query(&redis::cmd("TIME"), Ctx::new("TIME", ""))
            .await?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// Loads the commit script into Redis's script cache (at start, and after EVALSHA met NOSCRIPT).
    pub async fn load_commit_script(&self, stream: &str) -> Result<()> {
        let mut cmd = redis::cmd("SCRIPT");
        cmd.arg("LOAD").arg(commit::SOURCE);
        self.redis
            .query_value(&cmd, Ctx::new("SCRIPT LOAD", stream))
            .await
            .map(drop)
    }

    /// Sends one commit on the shared connection and returns the script's raw reply (see [`commit::decode`]).
    pub async fn commit(&self, call: &CommitCall, stream: &str, group: &str) -> Result<Value> {
        let ctx = Ctx::new("EVALSHA", stream).group(group);
        self.redis.query_value(&call.0, ctx).await
    }

    /// Re-publishes dead letter `id` of `dlq` to `to` — the stream `dlq` belongs to, which the caller
    /// knows from the config, never from the entry — and deletes it from `dlq`, atomically. The entry's
    /// `_dlq_source` must name `to`: anyone who may publish to a dead-letter stream can write any
    /// `_dlq_source` there, and a replay must not carry their entry, signed by the replaying operator,
    /// into a stream of their choosing. Needs read and write on the dead-letter stream and write on
    /// `to`. Returns the new entry id.
    pub async fn replay_dead_letter(&self, dlq: &str, id: &str, to: &str) -> Result<String> {
        self.authorize(Op::Read, dlq)?;
        self.authorize(Op::Delete, dlq)?;
        let opts = ReadOptions {
            count: Some(1),
            start: id.to_owned(),
            end: id.to_owned(),
            reverse: false,
        };
        let entry = self
            .read(dlq, &opts)
            .await?
            .pop()
            .ok_or_else(|| Error::NotFound {
                what: "dead-letter stream",
                key: dlq.to_owned(),
                detail: format!("no dead letter with id {id}"),
            })?;
        let source = entry
            .fields
            .get_str(dead_letter::SOURCE)
            .and_then(|s| s.rsplit_once('/'))
            .map(|(stream, _)| stream.to_owned())
            .ok_or_else(|| Error::NotFound {
                what: "dead-letter stream",
                key: dlq.to_owned(),
                detail: format!(
                    "entry {id} has no {} field: not a dead letter",
                    dead_letter::SOURCE
                ),
            })?;
        if source != to {
            return Err(Error::NotFound {
                what: "dead letter",
                key: format!("{dlq}/{id}"),
                detail: format!(
                    "its {} names stream {source:?}, but {dlq} holds the dead letters of {to}; \
                     refused (whoever wrote it may have forged the field)",
                    dead_letter::SOURCE
                ),
            });
        }
        self.authorize(Op::Publish, &source)?;
        // The copy and the delete are one transaction, which a cluster allows within one slot only.
        if self.redis.is_cluster() && super::slot::of(dlq) != super::slot::of(&source) {
            return Err(Error::CrossSlot {
                command: "dlq replay",
                a: dlq.to_owned(),
                b: source,
                slot_a: super::slot::of(dlq),
                slot_b: super::slot::of(to),
            });
        }

        let mut fields: Fields = entry
            .fields
            .iter()
            .filter(|(name, _)| !name.starts_with(b"_dlq_"))
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect();
        if let Some(original) = entry.fields.get(envelope::SOURCE) {
            fields.set(dead_letter::ORIGINAL_SOURCE, original.to_vec());
        }
        fields.set(dead_letter::REPLAYED_FROM, format!("{dlq}/{id}"));
        fields.stamp(&self.identity().subject, envelope::now_ms());

        let mut pipe = redis::pipe();
        pipe.atomic()
            .add_command(xadd(&source, &fields, None))
            .cmd("XDEL")
            .arg(dlq)
            .arg(id);
        let replies = self
            .redis
            .query_pipe(&pipe, Ctx::new("MULTI XADD XDEL", dlq))
            .await?;
        replies
            .into_iter()
            .next()
            .and_then(reply::string)
            .ok_or_else(|| Error::Protocol {
                command: "XADD",
                key: source.clone(),
                detail: "no entry id in the transaction's reply".into(),
            })
    }
}

/// The XADD command for already-stamped fields.
/// XINFO STREAM with the first and last entries cut to their ids. KEYS[1] the stream. A key that
/// does not exist, or is not a stream, gets XINFO's own error (without a script's location).
pub const STREAM_INFO: &str = r#"
local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'none' then
  return redis.error_reply('ERR no such key')
elseif t ~= 'stream' then
  return redis.error_reply('WRONGTYPE Operation against a key holding the wrong kind of value')
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
for i = 1, #info, 2 do
  local k = info[i]
  if (k == 'first-entry' or k == 'last-entry') and type(info[i + 1]) == 'table' then
    info[i + 1] = {info[i + 1][1]}
  end
end
return info
"#;

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

fn protocol(command: &'static str, key: &str, detail: String) -> Error {
    Error::Protocol {
        command,
        key: key.to_owned(),
        detail,
    }
}
