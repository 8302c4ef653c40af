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
use super::{recover, slot, wire};
use crate::model::EntryLimit;

/// Where a group read starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadFrom<'a> {
    /// `>`: entries never delivered to this group.
    New,
    /// This consumer's own pending entries after the given id (`0` for all of them), re-read without
    /// counting a delivery ([`super::recover`]); the reply carries their delivery counts.
    Pending(&'a str),
    /// Entries of any consumer idle at least `min_idle`, claimed to this one, scanning the PEL from
    /// `cursor` ([`super::recover::CLAIM`]): each claim counts a delivery; the reply carries the counts,
    /// the scan's next cursor and the ids Redis dropped.
    Idle { cursor: &'a str, min_idle: Duration },
}

/// Reads one consumer's share of a group, on its own connection: a [`super::wire`] connection
/// where Redis is reached without TLS, else a dedicated connection of the `redis` crate.
pub struct GroupReader {
    /// The plain connection's target (None until a cluster's slot owner is known) and the
    /// connection while it is up; None for TLS.
    wire: Option<(Option<wire::Target>, Option<wire::Conn>)>,
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
            wire: redis.speaks_plain().then_some((None, None)),
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
            ReadFrom::Idle { cursor, min_idle } => recover::claim_command(
                &self.stream,
                &self.group,
                &self.consumer,
                min_idle.as_millis() as u64,
                cursor,
                count,
            ),
        };
        let before = before.map(|c| c.0);
        #[cfg(feature = "fault-injection")]
        if std::env::var("RSFAULT_READ_TIMEOUT_OVER")
            .ok()
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|most| count > most)
        {
            // A failpoint for the pace test: a round asking for more entries than this runs in full
            // (entries are delivered, a commit applied) but its reply comes too late, as one carrying
            // entries too large to send within the command timeout does on a busy host.
            let _ = self.round_on_wire_or_pool(before, cmd).await;
            return Err(Error::Timeout {
                command: "XREADGROUP",
                key: self.stream.clone(),
                after: self.redis.response_timeout(),
            });
        }
        self.round_on_wire_or_pool(before, cmd).await
    }

    async fn round_on_wire_or_pool(&mut self, before: Option<Cmd>, cmd: Cmd) -> Result<Round> {
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
    /// on a new one. On a cluster, the connection goes to the master owning the stream's slot; a
    /// command answered MOVED is sent again to the node named (which becomes the target), one answered
    /// ASK to the node named, after ASKING, once — a command redirected was not run, so sending it again
    /// runs it once.
    async fn round_on_wire(&mut self, before: Option<Cmd>, read: Cmd) -> Result<Round> {
        let (stream, group) = (self.stream.clone(), self.group.clone());
        let ctx = Ctx::new("XREADGROUP", &stream).group(&group);
        let commit_ctx = Ctx::new("EVALSHA", &stream).group(&group);
        let mut before = before;
        let mut read = Some(read);
        let mut before_result = None;
        let mut asking: Option<wire::Target> = None;
        for _ in 0..4 {
            let sent_before = before.is_some();
            let asked = asking.is_some();
            let (frames, c) = match self
                .exchange(before.as_ref(), read.as_ref(), asking.take())
                .await
            {
                Ok(got) => got,
                Err(e) => {
                    if self.redis.is_cluster() {
                        // The master may have failed over: ask who owns the slot on the next round.
                        if let Some((target, _)) = &mut self.wire {
                            *target = None;
                        }
                    }
                    return Err(e);
                }
            };
            let mut frames = frames.into_iter();
            let mut redirect = None;
            if sent_before {
                let frame = frames.next().expect("one frame per command");
                match wire::value(c.frame(frame)) {
                    Err(e) if slot::redirect(&e).is_some() => redirect = slot::redirect(&e),
                    got => {
                        before = None;
                        before_result = Some(got.map_err(|e| self.redis.classify(e, commit_ctx)));
                    }
                }
            }
            let mut read_result = None;
            if read.is_some() {
                let frame = c.frame(frames.next().expect("one frame per command"));
                if frame.first() == Some(&b'-') {
                    match wire::value(frame) {
                        Err(e) if slot::redirect(&e).is_some() => redirect = slot::redirect(&e),
                        Err(e) => read_result = Some(Err(self.redis.classify(e, ctx))),
                        Ok(v) => {
                            read_result =
                                Some(Err(protocol("XREADGROUP", &self.stream, format!("{v:?}"))))
                        }
                    }
                } else {
                    read_result = Some(
                        wire::read_reply(frame)
                            .map_err(|d| protocol("XREADGROUP", &self.stream, d)),
                    );
                }
            }
            let Some((target, conn)) = &mut self.wire else {
                unreachable!("checked by the caller");
            };
            // A connection made for one ASK is not the stream's connection.
            let keep = |conn: &mut Option<wire::Conn>, c| {
                if !asked {
                    *conn = Some(c);
                }
            };
            match redirect {
                None => {
                    keep(conn, c);
                    return Ok(Round {
                        before: before_result,
                        read: read_result.expect("read once, unless redirected"),
                    });
                }
                Some((ask, host, port)) => {
                    if read_result.is_some() {
                        read = None;
                    }
                    let node = self.redis.node_target(&host, port);
                    if ask {
                        keep(conn, c);
                        asking = node;
                    } else {
                        tracing::info!(stream = %self.stream, group = %self.group, node = %format!("{host}:{port}"), "the stream's slot moved; following it");
                        *target = node;
                    }
                    // Nothing left to send again: what was redirected got its answer elsewhere.
                    if before.is_none() && read.is_none() {
                        unreachable!("a redirect leaves a command to send");
                    }
                }
            }
        }
        Err(protocol(
            "XREADGROUP",
            &self.stream,
            "redirected more than three times in a row".into(),
        ))
    }

    /// Sends `before` and `read` (whichever are given) on the connection — or, with `asking`, on a
    /// connection of its own to that node, each command after ASKING — and returns where each reply
    /// lies.
    async fn exchange(
        &mut self,
        before: Option<&Cmd>,
        read: Option<&Cmd>,
        asking: Option<wire::Target>,
    ) -> Result<(Vec<std::ops::Range<usize>>, wire::Conn)> {
        let (stream, group) = (self.stream.clone(), self.group.clone());
        let ctx = Ctx::new("XREADGROUP", &stream).group(&group);
        let settings = self.redis.settings();
        let limit = self.redis.response_timeout() + settings.connect_timeout;
        let connect_timeout = settings.connect_timeout;
        let limit_entries = self.limit;
        if asking.is_none()
            && let Some((target @ None, _)) = &mut self.wire
        {
            *target = self.redis.plain_target(&self.stream).await?;
        }
        let Some((Some(target), conn)) = &mut self.wire else {
            return Err(protocol(
                "XREADGROUP",
                &self.stream,
                "no plain connection target".into(),
            ));
        };
        let started = std::time::Instant::now();
        // The connection is out of its slot while a request is under way: a round cancelled halfway
        // (its reply still unread) leaves no connection behind, and the next round starts a new one.
        let exchange = async {
            let ask = asking.is_some();
            let mut c = match asking {
                Some(node) => wire::Conn::connect(&node, connect_timeout).await?,
                None => match conn.take() {
                    Some(c) => c,
                    None => wire::Conn::connect(target, connect_timeout).await?,
                },
            };
            let mut packed = Vec::new();
            let mut replies = 0;
            for cmd in before.into_iter().chain(read) {
                if ask {
                    redis::cmd("ASKING").write_packed_command(&mut packed);
                    replies += 1;
                }
                cmd.write_packed_command(&mut packed);
                replies += 1;
            }
            let bounded = read.is_some().then_some(limit_entries);
            let mut frames = c.request(&packed, replies, bounded).await?;
            if ask {
                // Drop the ASKING replies (+OK each).
                frames = frames.into_iter().skip(1).step_by(2).collect();
            }
            redis::RedisResult::Ok((frames, c))
        };
        let result = tokio::time::timeout(limit, exchange).await;
        conn::observe(ctx.command, started);
        match result {
            Ok(Ok(got)) => Ok(got),
            Ok(Err(e)) => Err(self.redis.classify(e, ctx)),
            Err(_) => Err(Error::Timeout {
                command: ctx.command,
                key: self.stream.clone(),
                after: limit,
            }),
        }
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
