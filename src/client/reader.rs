//! The group reader: XREADGROUP for one consumer, on a connection of its own.
//!
//! Owns the read side of a consumer loop: where a read starts ([`ReadFrom`]), the round trip that
//! carries the previous batch's commit together with the next read ([`GroupReader::round`]), and the
//! choice of transport — the fast plain-RESP connection of [`super::wire`] where Redis is reached
//! without TLS, the `redis` crate's dedicated connection otherwise. Permission checks happen when the
//! reader is made ([`super::Client::group_reader`]); commits are built by [`super::commit`].

use std::time::Duration;

use redis::{Cmd, Value};

use super::commit::CommitCall;
use super::conn::{self, Ctx, Redis};
use super::decode::{self, Entries};
use super::error::{Error, Result};
use super::{recover, wire};
use crate::model::EntryLimit;

/// Where a group read starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadFrom<'a> {
    /// `>`: entries never delivered to this group.
    New,
    /// This consumer's own pending entries after the given id (`0` for all of them), re-read without
    /// counting a delivery ([`super::recover`]); the reply carries their delivery counts.
    Pending(&'a str),
}

/// Reads one consumer's share of a group, on its own connection: a [`super::wire`] connection
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
    /// How large an entry may be; larger ones come back in [`Entries::too_large`].
    limit: EntryLimit,
}

impl GroupReader {
    /// A reader over `redis` (a dedicated connection) and, where there is one, the plain target.
    pub(super) fn new(
        redis: &Redis,
        stream: &str,
        group: &str,
        consumer: &str,
        max_block: Duration,
    ) -> Result<GroupReader> {
        Ok(GroupReader {
            wire: redis.plain_target().map(|t| (t, None)),
            redis: redis.dedicated(max_block)?,
            stream: stream.to_owned(),
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            max_block,
            limit: EntryLimit::NONE,
        })
    }

    /// Bounds each entry read: one over `limit` is reported in [`Entries::too_large`] with its size,
    /// its fields discarded — on the plain connection as they arrive, never buffered whole.
    pub fn with_limit(mut self, limit: EntryLimit) -> GroupReader {
        self.limit = limit;
        self
    }

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
        before: Option<CommitCall>,
        from: ReadFrom<'_>,
        count: u64,
        block: Option<Duration>,
    ) -> Result<Round> {
        let cmd = match from {
            ReadFrom::New => {
                let mut cmd = redis::cmd("XREADGROUP");
                cmd.arg("GROUP")
                    .arg(&self.group)
                    .arg(&self.consumer)
                    .arg("COUNT")
                    .arg(count);
                if let Some(b) = block {
                    cmd.arg("BLOCK")
                        .arg(b.min(self.max_block).as_millis() as u64);
                }
                cmd.arg("STREAMS").arg(&self.stream).arg(">");
                cmd
            }
            ReadFrom::Pending(after) => {
                recover::command(&self.stream, &self.group, &self.consumer, after, count)
            }
        };
        let before = before.map(|c| c.0);
        if self.wire.is_some() {
            return self.round_on_wire(before, cmd).await;
        }
        let ctx = Ctx::new("XREADGROUP", &self.stream).group(&self.group);
        let Some(before) = before else {
            let read = self.redis.query_value(&cmd, ctx).await.and_then(|v| {
                self.decode(v)
                    .map_err(|d| protocol("XREADGROUP", &self.stream, d))
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
                self.decode(v)
                    .map_err(|d| protocol("XREADGROUP", &self.stream, d))
            });
        Ok(Round { before, read })
    }

    /// A read reply through the crate's parser (the TLS path), with the entry limit applied after.
    fn decode(&self, value: Value) -> std::result::Result<Entries, String> {
        let mut got = decode::read_one_stream(value)?;
        got.enforce(&self.limit);
        Ok(got)
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
        let limit_entries = self.limit;
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
                .request(
                    &packed,
                    1 + usize::from(before.is_some()),
                    Some(limit_entries),
                )
                .await?;
            redis::RedisResult::Ok((frames, c))
        };
        let result = tokio::time::timeout(limit, exchange).await;
        conn::observe(ctx.command, started);
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
