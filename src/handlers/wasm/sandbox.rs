//! One handler call in its sandbox: the store, its limits and deadline, the host functions, and what
//! comes out.
//!
//! Owns the store's data ([`Host`]): the WASI context with every capability denied, the memory/table/
//! instance limits, the buffered replies (`publish` checks stream name and the handler's roles at call
//! time and returns a typed error to the guest, never a trap), the rate-limited `log`, the handler's
//! `config`. Also the mapping of a call's result — return value or trap — to an [`Outcome`]. Compiling,
//! linking and scheduling calls is [`super`]'s business.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime::{Store, StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::bindings::redstream::handler::{host, state, types};
use super::outbound::{Hooks, Outbound};
use super::output::Capture;
use crate::auth::{Op, Roles};

use crate::model::envelope::Fields;
use crate::model::limits::{FIELD_OVERHEAD, ReplyLimit};
use crate::model::message::{Due, Message, Outcome, Reply, ReplyKind, Sender, StateSlot};
use crate::model::naming::Naming;

/// Log lines one message may write through `log` (more are counted and dropped).
pub const MAX_LOG_LINES: u32 = 50;
/// Longest logged line; longer ones are cut.
pub const MAX_LOG_LINE: usize = 1024;
/// Bytes of stdout and of stderr kept per message.
pub const MAX_STDIO: usize = 8 * 1024;

/// What every call of one handler shares.
#[derive(Debug)]
pub struct Meta {
    pub name: String,
    pub roles: Roles,
    pub naming: Arc<Naming>,
    pub config: BTreeMap<String, String>,
    pub memory: usize,
    pub timeout: Duration,
    /// What one call may publish.
    pub replies: ReplyLimit,
    /// Its state's key namespace, and where it is read.
    pub state: Option<(String, Arc<StateSlot>)>,
    /// What it may reach over HTTP (its calls then run asynchronously).
    pub outbound: Option<Arc<Outbound>>,
    /// Stub responses in place of the network (local `handler test`), when set.
    pub responder: Arc<super::outbound::ResponderSlot>,
}

/// The store's limits, remembering the most memory an instance asked for (for the peak-memory metric).
pub struct Limits {
    inner: StoreLimits,
    pub peak_memory: usize,
}

impl wasmtime::ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.inner.memory_growing(current, desired, maximum)?;
        if allowed {
            self.peak_memory = self.peak_memory.max(desired);
        }
        Ok(allowed)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

/// The data of a handler's store.
pub struct Host {
    wasi: WasiCtx,
    table: ResourceTable,
    http: WasiHttpCtx,
    /// Checks, keys and times the call's outbound requests (a handler granted nothing gets one that
    /// refuses every request, when it first makes one).
    hooks: Option<Hooks>,
    pub limits: Limits,
    meta: Arc<Meta>,
    /// Replies buffered by this call.
    outbox: Vec<Reply>,
    outbox_bytes: usize,
    /// The message being handled, for logs.
    msg_id: String,
    /// What the call wrote to stderr, kept for its trap's reason ([`super::crash`]).
    stderr_text: Vec<u8>,
    /// The escaped `_trace_id` of the message in the call, for the guest's log lines (the loop's span
    /// adds its stream, group and consumer).
    trace_id: String,
    log_lines: u32,
    log_dropped: u32,
    denied: u32,
    stdout: Capture,
    stderr: Capture,
    /// `retry-after` of this call, if it asked.
    retry_after: Option<u64>,
    /// When the call began, for what is left of its time.
    started: std::time::Instant,
    /// State keys this call read from Redis, each with what it read first.
    reads: Vec<(String, Option<Vec<u8>>)>,
    /// When set (a local `handler run`), what the guest wrote and logged, as (where, text), besides
    /// the daemon's log.
    pub transcript: Option<Vec<(&'static str, String)>>,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            // A handler granted nothing gets a hook that refuses everything, made when first asked.
            hooks: self
                .hooks
                .get_or_insert_with(|| Hooks::refusing(&self.meta.name, &self.msg_id)),
        }
    }
}

impl Host {
    pub fn new(meta: Arc<Meta>) -> Self {
        let stdout = Capture::new(MAX_STDIO);
        let stderr = Capture::new(MAX_STDIO);
        // Every capability denied: no preopens, no environment, no arguments, closed stdin, no network.
        // Clocks and random numbers stay: guests' standard libraries need them to start.
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let limits = StoreLimitsBuilder::new()
            .memory_size(meta.memory)
            .table_elements(100_000)
            .instances(32)
            .tables(32)
            .memories(8)
            .trap_on_grow_failure(true)
            .build();
        let limits = Limits {
            inner: limits,
            peak_memory: 0,
        };
        Host {
            wasi,
            table: ResourceTable::new(),
            http: WasiHttpCtx::new(),
            hooks: meta
                .outbound
                .clone()
                .map(|outbound| Hooks::new(&meta.name, outbound, meta.responder.clone())),
            limits,
            meta,
            outbox: Vec::new(),
            outbox_bytes: 0,
            msg_id: String::new(),
            trace_id: String::new(),
            stderr_text: Vec::new(),
            log_lines: 0,
            log_dropped: 0,
            denied: 0,
            stdout,
            stderr,
            retry_after: None,
            started: std::time::Instant::now(),
            reads: Vec::new(),
            transcript: None,
        }
    }

    /// Readies the store data for a call (a reused instance keeps its store across calls).
    pub fn begin(&mut self, msg: &types::Message) {
        self.outbox.clear();
        self.outbox_bytes = 0;
        self.msg_id.clear();
        self.msg_id.push_str(&msg.id);
        self.trace_id = msg
            .trace_id
            .as_deref()
            .map_or_else(String::new, |t| crate::logging::escape(t.as_bytes(), 128));
        self.log_lines = 0;
        self.log_dropped = 0;
        self.denied = 0;
        self.retry_after = None;
        self.started = std::time::Instant::now();
        if let Some(hooks) = &mut self.hooks {
            hooks.begin(&msg.stream, &msg.id, self.started + self.meta.timeout);
        }
        self.reads.clear();
        self.stderr_text.clear();
    }

    /// Logs what the call wrote to stdout/stderr and what was dropped, and returns its replies.
    pub fn finish(&mut self) -> Vec<Reply> {
        let name = &self.meta.name;
        for (stream, capture) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            let (bytes, dropped) = capture.take();
            if !bytes.is_empty() {
                let text = crate::logging::escape(&bytes, MAX_STDIO);
                tracing::info!(handler = %name, message_id = %self.msg_id, trace_id = %self.trace_id, fd = stream, dropped, output = %text, "guest output");
                if let Some(t) = &mut self.transcript {
                    t.push((stream, String::from_utf8_lossy(&bytes).into_owned()));
                }
                if stream == "stderr" {
                    self.stderr_text = bytes;
                }
            }
        }
        // A local call (`handler run/test`) reports these with its output rather than in the log.
        if self.log_dropped > 0 {
            match &mut self.transcript {
                Some(t) => t.push((
                    "host",
                    format!(
                        "{} log lines over the per-message limit were dropped",
                        self.log_dropped
                    ),
                )),
                None => {
                    tracing::warn!(handler = %name, message_id = %self.msg_id, dropped = self.log_dropped, "guest log lines over the per-message limit were dropped")
                }
            }
        }
        let labels = crate::metrics::HandlerLabels {
            handler: name.clone(),
        };
        if self.denied > 0 {
            match &mut self.transcript {
                Some(t) => t.push(("host", format!("{} publish(es) denied", self.denied))),
                None => {
                    tracing::warn!(handler = %name, message_id = %self.msg_id, denied = self.denied, "guest publishes were denied")
                }
            }
            crate::metrics::global()
                .publish_denied
                .get_or_create(&labels)
                .inc_by(u64::from(self.denied));
        }
        let peak = crate::metrics::global()
            .handler_peak_memory
            .get_or_create(&labels);
        let seen = i64::try_from(self.limits.peak_memory).unwrap_or(i64::MAX);
        if seen > peak.get() {
            peak.set(seen);
        }
        let mut out = std::mem::take(&mut self.outbox);
        // A call that wrote state commits only if what it read is still there: the reads go along
        // as checks (a call that only read commits on what it saw).
        if out.iter().any(|r| r.kind.is_state()) {
            for (key, value) in self.reads.drain(..) {
                out.push(Reply {
                    stream: key,
                    kind: ReplyKind::StateRead {
                        found: value.is_some(),
                    },
                    fields: match value {
                        Some(v) => Fields::from(vec![(b"value".to_vec(), v)]),
                        None => Fields::new(),
                    },
                });
            }
        }
        out
    }
}

impl types::Host for Host {}

impl Host {
    /// Checks and buffers a reply (`publish` and `publish-delayed`).
    fn buffer(
        &mut self,
        stream: String,
        fields: Vec<(String, Vec<u8>)>,
        kind: ReplyKind,
    ) -> Result<(), types::PublishError> {
        let domain = match self.meta.naming.domain_of(&stream) {
            Ok(d) => d,
            Err(e) => {
                self.denied += 1;
                return Err(types::PublishError::InvalidStream(e.to_string()));
            }
        };
        if !self.meta.roles.allows(Op::Publish, domain) {
            self.denied += 1;
            return Err(types::PublishError::Denied(format!(
                "handler {} may not publish to {stream}: that needs role {} or admin",
                self.meta.name,
                Roles::needed(Op::Publish, domain)
            )));
        }
        let limit = &self.meta.replies;
        if fields.len() > limit.fields {
            return Err(types::PublishError::TooLarge(format!(
                "a reply may have at most {} fields (limits.reply_fields); this one has {}",
                limit.fields,
                fields.len()
            )));
        }
        // Every field costs its overhead too, so a flood of empty fields is not free.
        let size = ReplyLimit::cost(
            &stream,
            fields.iter().map(|(n, v)| (n.as_bytes(), v.as_slice())),
        );
        if self.outbox.len() >= limit.replies || self.outbox_bytes + size > limit.bytes {
            return Err(types::PublishError::TooLarge(format!(
                "a message may cause at most {} replies (limits.replies) of {} bytes in all \
                 (limits.reply_bytes; each field counting {FIELD_OVERHEAD} bytes beside its name and value)",
                limit.replies, limit.bytes
            )));
        }
        self.outbox_bytes += size;
        self.outbox.push(Reply {
            stream,
            fields: Fields::from(
                fields
                    .into_iter()
                    .map(|(n, v)| (n.into_bytes(), v))
                    .collect::<Vec<_>>(),
            ),
            kind,
        });
        Ok(())
    }

    /// The full key of state `key`, or why there is none.
    fn state_key(&self, key: &str) -> Result<String, state::StateError> {
        let Some((namespace, _)) = &self.meta.state else {
            return Err(state::StateError::NotConfigured(format!(
                "handler {} keeps no state: give its [[handlers]] entry a `state` namespace",
                self.meta.name
            )));
        };
        if key.is_empty() || key.len() > MAX_STATE_KEY {
            return Err(state::StateError::TooLarge(format!(
                "a state key has 1 to {MAX_STATE_KEY} bytes; this one has {}",
                key.len()
            )));
        }
        Ok(format!("{namespace}:{key}"))
    }

    /// Buffers a change of state, within the call's reply limits.
    fn change(
        &mut self,
        key: String,
        value: Option<Vec<u8>>,
        kind: ReplyKind,
    ) -> Result<(), state::StateError> {
        let value_len = value.as_ref().map_or(0, Vec::len);
        let limit = &self.meta.replies;
        let size = key.len() + value_len + FIELD_OVERHEAD;
        if self.outbox.len() >= limit.replies || self.outbox_bytes + size > limit.bytes {
            return Err(state::StateError::TooLarge(format!(
                "a message may make at most {} replies and changes of state (limits.replies) of {} \
                 bytes in all (limits.reply_bytes)",
                limit.replies, limit.bytes
            )));
        }
        self.outbox_bytes += size;
        let fields = match value {
            Some(v) => Fields::from(vec![(b"value".to_vec(), v)]),
            None => Fields::new(),
        };
        self.outbox.push(Reply {
            stream: key,
            fields,
            kind,
        });
        Ok(())
    }
}

/// The longest state key a handler may use (its namespace comes on top).
pub const MAX_STATE_KEY: usize = 512;

/// Where a state read is answered from.
enum Lookup {
    /// The call's own write or earlier read.
    Known(Option<Vec<u8>>),
    /// Redis, through this reader, within this much time.
    Fetch(
        String,
        Arc<dyn crate::model::message::StateReader>,
        Duration,
    ),
}

impl Host {
    fn lookup(&self, key: &str) -> Result<Lookup, state::StateError> {
        let key = self.state_key(key)?;
        // The call's own writes first, the latest winning.
        if let Some(r) = self
            .outbox
            .iter()
            .rev()
            .find(|r| r.kind.is_state() && r.stream == key)
        {
            return Ok(Lookup::Known(match r.kind {
                ReplyKind::StateSet { .. } => r.fields.iter().next().map(|(_, v)| v.to_vec()),
                _ => None,
            }));
        }
        // A key read before in this call: the same value again (one round trip per key, and what
        // the commit checks is what the call saw).
        if let Some((_, value)) = self.reads.iter().find(|(k, _)| *k == key) {
            return Ok(Lookup::Known(value.clone()));
        }
        // `state_key` succeeded, so the handler has a namespace and a slot.
        let reader = self.meta.state.as_ref().and_then(|(_, slot)| slot.get());
        let Some(reader) = reader else {
            return Err(state::StateError::Unavailable(
                "no state store in this process".into(),
            ));
        };
        // Within what is left of the call's time: the deadline counts the wait.
        let left = self.meta.timeout.saturating_sub(self.started.elapsed());
        Ok(Lookup::Fetch(key, reader.clone(), left))
    }

    /// Records what a read from Redis found (the commit checks it is still so).
    fn read(
        &mut self,
        key: String,
        found: Result<Option<Vec<u8>>, String>,
    ) -> Result<Option<Vec<u8>>, state::StateError> {
        let value = found.map_err(state::StateError::Unavailable)?;
        self.reads.push((key, value.clone()));
        Ok(value)
    }

    /// `state.get` of a call that runs asynchronously: the read awaits Redis without a thread.
    pub async fn get_async(&mut self, key: String) -> Result<Option<Vec<u8>>, state::StateError> {
        match self.lookup(&key)? {
            Lookup::Known(value) => Ok(value),
            Lookup::Fetch(key, reader, left) => {
                let found = reader.get_owned(key.clone(), left).await;
                self.read(key, found)
            }
        }
    }
}

impl state::Host for Host {
    fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, state::StateError> {
        match self.lookup(&key)? {
            Lookup::Known(value) => Ok(value),
            Lookup::Fetch(key, reader, left) => {
                let found = reader.get(&key, left);
                self.read(key, found)
            }
        }
    }

    fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<(), state::StateError> {
        let key = self.state_key(&key)?;
        self.change(
            key,
            Some(value),
            ReplyKind::StateSet {
                ttl_ms: ttl_ms.map(|ms| ms.max(1)),
            },
        )
    }

    fn remove(&mut self, key: String) -> Result<(), state::StateError> {
        let key = self.state_key(&key)?;
        self.change(key, None, ReplyKind::StateRemove)
    }
}

/// The `state` interface of a call run as a task: `get` awaits Redis; the rest is the same.
impl super::bindings::asynchronous::redstream::handler::state::Host for Host {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, AsyncStateError> {
        self.get_async(key).await.map_err(AsyncStateError::from)
    }

    fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<(), AsyncStateError> {
        state::Host::set(self, key, value, ttl_ms).map_err(AsyncStateError::from)
    }

    fn remove(&mut self, key: String) -> Result<(), AsyncStateError> {
        state::Host::remove(self, key).map_err(AsyncStateError::from)
    }
}

use super::bindings::asynchronous::redstream::handler::state::StateError as AsyncStateError;

impl From<state::StateError> for AsyncStateError {
    fn from(e: state::StateError) -> Self {
        match e {
            state::StateError::NotConfigured(s) => AsyncStateError::NotConfigured(s),
            state::StateError::TooLarge(s) => AsyncStateError::TooLarge(s),
            state::StateError::Unavailable(s) => AsyncStateError::Unavailable(s),
        }
    }
}

impl host::Host for Host {
    fn publish(
        &mut self,
        stream: String,
        fields: Vec<(String, Vec<u8>)>,
    ) -> Result<(), types::PublishError> {
        self.buffer(stream, fields, ReplyKind::Now)
    }

    fn publish_delayed(
        &mut self,
        stream: String,
        fields: Vec<(String, Vec<u8>)>,
        due: types::Due,
    ) -> Result<(), types::PublishError> {
        let due = match due {
            types::Due::After(ms) => Due::In(ms),
            types::Due::At(ms) => Due::At(ms),
        };
        let ahead = match due {
            Due::In(ms) => ms,
            Due::At(ms) => ms.saturating_sub(crate::model::envelope::now_ms()),
        };
        if ahead > Due::MAX_AHEAD_MS {
            return Err(types::PublishError::TooLarge(format!(
                "a delayed reply may be due at most 366 days ahead; this one is due in {} days",
                ahead / (24 * 3600 * 1000)
            )));
        }
        self.buffer(stream, fields, ReplyKind::Delayed(due))
    }

    fn log(&mut self, level: types::Level, text: String) {
        if self.log_lines >= MAX_LOG_LINES {
            self.log_dropped += 1;
            return;
        }
        self.log_lines += 1;
        let text = crate::logging::escape(text.as_bytes(), MAX_LOG_LINE);
        if let Some(t) = &mut self.transcript {
            let at = match level {
                types::Level::Trace => "log:trace",
                types::Level::Debug => "log:debug",
                types::Level::Info => "log:info",
                types::Level::Warn => "log:warn",
                types::Level::Error => "log:error",
            };
            t.push((at, text.clone()));
        }
        let (name, id, trace) = (&self.meta.name, &self.msg_id, &self.trace_id);
        match level {
            types::Level::Trace => {
                tracing::trace!(handler = %name, message_id = %id, trace_id = %trace, "{text}")
            }
            types::Level::Debug => {
                tracing::debug!(handler = %name, message_id = %id, trace_id = %trace, "{text}")
            }
            types::Level::Info => {
                tracing::info!(handler = %name, message_id = %id, trace_id = %trace, "{text}")
            }
            types::Level::Warn => {
                tracing::warn!(handler = %name, message_id = %id, trace_id = %trace, "{text}")
            }
            types::Level::Error => {
                tracing::error!(handler = %name, message_id = %id, trace_id = %trace, "{text}")
            }
        }
    }

    fn config(&mut self, key: String) -> Option<String> {
        self.meta.config.get(&key).cloned()
    }

    fn retry_after(&mut self, ms: u64) {
        self.retry_after = Some(ms);
    }
}

/// What a message keeps while its fields are lent to the guest.
pub struct Lent {
    stream: Arc<str>,
    deliveries: u64,
    sender: Option<Arc<Sender>>,
}

/// Moves a message into its WIT form without copying its fields; [`give_back`] restores it. Fails
/// (handing the message back) when a field name is not UTF-8.
pub fn lend(msg: Message) -> Result<(types::Message, Lent), (Message, String)> {
    let Message {
        stream,
        id,
        fields,
        deliveries,
        sender,
    } = msg;
    let bad = fields
        .iter()
        .find(|(n, _)| std::str::from_utf8(n).is_err())
        .map(|(n, _)| String::from_utf8_lossy(n).into_owned());
    if let Some(name) = bad {
        let reason = format!("malformed message: field name {name:?} is not UTF-8");
        return Err((
            Message {
                stream,
                id,
                fields,
                deliveries,
                sender,
            },
            reason,
        ));
    }
    let trace_id = fields
        .get_str(crate::model::envelope::TRACE_ID)
        .map(str::to_owned);
    let wit_fields = fields
        .into_vec()
        .into_iter()
        .map(|(n, v)| (String::from_utf8(n).expect("checked above"), v))
        .collect();
    let wit = types::Message {
        stream: stream.to_string(),
        id,
        fields: wit_fields,
        delivery_count: u32::try_from(deliveries).unwrap_or(u32::MAX),
        trace_id,
        sender: sender.as_deref().map(|s| types::Sender {
            subject: s.subject.clone(),
            roles: s.roles.clone(),
        }),
    };
    Ok((
        wit,
        Lent {
            stream,
            deliveries,
            sender,
        },
    ))
}

/// The message back from its WIT form.
pub fn give_back(wit: types::Message, lent: Lent) -> Message {
    Message {
        stream: lent.stream,
        id: wit.id,
        fields: Fields::from(
            wit.fields
                .into_iter()
                .map(|(n, v)| (n.into_bytes(), v))
                .collect::<Vec<_>>(),
        ),
        deliveries: lent.deliveries,
        sender: lent.sender,
    }
}

/// The WIT view of a message. Field names must be UTF-8 (values may be anything).
pub fn wit_message(msg: &Message, sender: Option<&Sender>) -> Result<types::Message, String> {
    let mut fields = Vec::with_capacity(msg.fields.len());
    for (name, value) in msg.fields.iter() {
        let name = std::str::from_utf8(name)
            .map_err(|_| format!("malformed message: field name {name:?} is not UTF-8"))?;
        fields.push((name.to_owned(), value.to_vec()));
    }
    Ok(types::Message {
        stream: msg.stream.to_string(),
        id: msg.id.clone(),
        fields,
        delivery_count: u32::try_from(msg.deliveries).unwrap_or(u32::MAX),
        trace_id: msg
            .fields
            .get_str(crate::model::envelope::TRACE_ID)
            .map(str::to_owned),
        sender: sender.map(|s| types::Sender {
            subject: s.subject.clone(),
            roles: s.roles.clone(),
        }),
    })
}

/// What a finished call means for its message. A trap — deadline, memory limit, stack overflow, a
/// guest panic — is a retry, counted against max_deliveries; it never harms the daemon.
pub fn outcome(
    result: wasmtime::Result<Result<(), types::HandlerError>>,
    store: &mut Store<Host>,
) -> Outcome {
    let replies = store.data_mut().finish();
    match result {
        Ok(Ok(())) => Outcome::Success(replies),
        Ok(Err(types::HandlerError::Retry(reason))) => match store.data().retry_after {
            // At most a year: a wait beyond that is a mistake, not a schedule.
            Some(ms) => {
                Outcome::RetryAfter(reason, Duration::from_millis(ms.min(365 * 86_400_000)))
            }
            None => Outcome::Retry(reason),
        },
        Ok(Err(types::HandlerError::Reject(reason))) => Outcome::Reject(reason),
        Err(e) => {
            let trap = trap_reason(&e, store.data().meta.as_ref());
            // A panic or an uncaught exception printed why before the trap: that leads the reason.
            Outcome::Retry(match super::crash::describe(&store.data().stderr_text) {
                Some(crash) => format!("{crash} ({trap})"),
                None => trap,
            })
        }
    }
}

/// A trap in words an operator can act on.
pub fn trap_reason(e: &wasmtime::Error, meta: &Meta) -> String {
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => format!(
            "trap: handler ran past its deadline of {}",
            humantime::format_duration(meta.timeout)
        ),
        Some(Trap::StackOverflow) => "trap: stack overflow".into(),
        Some(t) => format!("trap: {t}"),
        None => {
            let text = format!("{e:#}");
            if text.contains("memory") && (text.contains("grow") || text.contains("limit")) {
                format!(
                    "trap: memory limit of {} bytes reached ({text})",
                    meta.memory
                )
            } else {
                format!("trap: {text}")
            }
        }
    }
}
