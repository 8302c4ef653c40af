//! `redstream handler run / bench / test`: a handler called locally, without Redis, in the same
//! sandbox as the daemon's, with the settings of a config entry, a project's `handler.toml`, or flags.
//!
//! Owns which settings a local call gets ([`spec`]): `--handler NAME` takes roles, limits, config
//! table and file from that `[[handlers]]` entry of `--config`; a project directory (made by
//! `handler new`) takes them from its `handler.toml` and its built component; a bare `.wasm` gets
//! admin roles and the defaults. Flags given on top override. Synchronous: WASI's synchronous
//! bindings must not run inside an async runtime.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use figment::Figment;
use figment::providers::{Format, Toml};
use serde::Deserialize;
use serde_json::{Value, json};

use super::scaffold::Project;
use super::{Exit, Failure, HandlerArgs, HandlerCommand, LocalCall};
use crate::auth::Roles;
use crate::config;
use crate::handlers::wasm::{Runtime, RuntimeSettings, WasmHandler, WasmSpec};
use crate::model::envelope::Fields;
use crate::model::message::{Due, Message, Outcome, ReplyKind};
use crate::model::naming::Naming;

type Result<T = ()> = std::result::Result<T, Failure>;

/// The settings of a local call, as described at the top of this module.
pub fn spec(config_file: Option<&Path>, args: &HandlerArgs) -> Result<WasmSpec> {
    let mut spec = match (&args.handler, &args.path) {
        (Some(name), path) => {
            let settings = config::load(config_file)?;
            let known: Vec<&str> = settings.handlers.iter().map(|h| h.name.as_str()).collect();
            let mut spec = settings
                .handlers
                .iter()
                .find(|h| h.name == *name)
                .cloned()
                .ok_or_else(|| {
                    let file = settings
                        .file
                        .as_ref()
                        .map_or("the config".into(), |f| f.display().to_string());
                    Failure::new(
                        Exit::Config,
                        format!(
                            "--handler {name}: {file} has no [[handlers]] entry named {name:?} (it has: {})",
                            if known.is_empty() {
                                "none".into()
                            } else {
                                known.join(", ")
                            }
                        ),
                    )
                })?;
            if let Some(p) = path {
                spec.file = component_of(p)?;
            }
            spec
        }
        (None, Some(p)) if p.is_dir() => project_spec(p)?,
        (None, Some(p)) => bare_spec(
            p.file_stem()
                .map_or("handler".into(), |s| s.to_string_lossy().into_owned()),
            p.clone(),
        ),
        (None, None) => {
            return Err(Failure::new(
                Exit::Failure,
                "name the handler: a component (.wasm), a project directory, or --handler NAME with --config FILE",
            ));
        }
    };
    if !args.roles.is_empty() {
        spec.roles = Roles::parse(&args.roles)
            .map_err(|m| Failure::new(Exit::Failure, format!("--role: {m}")))?;
    }
    spec.config.extend(args.set.iter().cloned());
    if let Some(m) = &args.memory {
        spec.memory = config::parse_size(m)
            .map_err(|m| Failure::new(Exit::Failure, format!("--memory: {m}")))?;
    }
    if let Some(t) = args.timeout {
        spec.timeout = t;
    }
    Ok(spec)
}

/// A handler without a config entry: admin roles (every publish allowed) and the defaults of
/// `[[handlers]]`.
fn bare_spec(name: String, file: PathBuf) -> WasmSpec {
    WasmSpec {
        name,
        file,
        roles: Roles::parse(&["admin"]).expect("admin is a role"),
        memory: 64 << 20,
        timeout: Duration::from_secs(5),
        reuse: None,
        require_sender_token: false,
        config: BTreeMap::new(),
        state: None,
        outbound: None,
    }
}

/// The component a path names: the file itself, or a project's built component.
fn component_of(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        built(path, &Project::open(path)?)
    } else {
        Ok(path.to_path_buf())
    }
}

/// A project's built component, or how to build it.
fn built(dir: &Path, project: &Project) -> Result<PathBuf> {
    let file = dir.join(&project.component);
    if !file.is_file() {
        return Err(Failure::new(
            Exit::Failure,
            format!(
                "{} does not exist yet: build it with `redstream handler build {}`",
                file.display(),
                dir.display()
            ),
        ));
    }
    Ok(file)
}

/// A project's handler: its component, with the `[[handlers]]` entry of its `handler.toml` (validated
/// as the daemon would) when there is one.
fn project_spec(dir: &Path) -> Result<WasmSpec> {
    let project = Project::open(dir)?;
    let file = built(dir, &project)?;
    let entry = dir.join("handler.toml");
    if !entry.is_file() {
        return Ok(bare_spec(project.name, file));
    }
    // Only its [[handlers]] (the consumers there are for the daemon), with the file found where the
    // build put it.
    let found = Figment::from(Toml::file_exact(&entry))
        .find_value("handlers")
        .map_err(|e| {
            Failure::new(
                Exit::Config,
                format!("{}: no [[handlers]] entry: {e}", entry.display()),
            )
        })?;
    let dist = std::path::absolute(file.parent().unwrap_or(dir))
        .map_err(|e| Failure::new(Exit::Failure, format!("{}: {e}", dir.display())))?;
    let figment = Figment::new()
        .merge(figment::providers::Serialized::default("handlers", found))
        .merge(figment::providers::Serialized::default(
            "wasm.handlers_dir",
            dist.to_string_lossy(),
        ));
    let settings = config::from_figment(&figment, Some(entry.clone()), None)?;
    let mut spec = settings
        .handlers
        .into_iter()
        .find(|h| h.name == project.name)
        .ok_or_else(|| {
            Failure::new(
                Exit::Config,
                format!(
                    "{}: no [[handlers]] entry named {:?} (the project's name)",
                    entry.display(),
                    project.name
                ),
            )
        })?;
    spec.file = file;
    Ok(spec)
}

/// The state a local call reads: what a case gives (keys without the namespace), in memory.
#[derive(Debug, Default)]
struct LocalState {
    namespace: String,
    values: std::sync::Mutex<BTreeMap<String, Vec<u8>>>,
}

impl LocalState {
    /// Replaces the state with `given` (a case's `state`: text values, or JSON for others).
    fn reset(&self, given: &serde_json::Map<String, Value>) {
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        values.clear();
        for (k, v) in given {
            let bytes = match v {
                Value::String(s) => s.clone().into_bytes(),
                other => other.to_string().into_bytes(),
            };
            values.insert(format!("{}:{k}", self.namespace), bytes);
        }
    }
}

impl crate::model::message::StateReader for LocalState {
    fn get(&self, key: &str, _within: Duration) -> std::result::Result<Option<Vec<u8>>, String> {
        let values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        Ok(values.get(key).cloned())
    }
}

/// A case's HTTP stubs, answering a local call's granted requests in place of the network, and the
/// requests the call made.
#[derive(Debug, Default)]
struct LocalHttp {
    stubs: std::sync::Mutex<Vec<Stub>>,
    made: std::sync::Mutex<Vec<Value>>,
}

/// One stubbed response of a case (`"http": [...]`): for requests to `url` (and `method`, if given).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Stub {
    pub(super) url: String,
    method: Option<String>,
    #[serde(default = "ok_status")]
    status: u16,
    /// Text, or JSON for anything else.
    #[serde(default)]
    body: Value,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

impl Stub {
    fn answers(&self, method: &str, url: &str) -> bool {
        self.url == url
            && self
                .method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(method))
    }

    /// The first of `stubs` that answers `method` `url`, as a response.
    pub(super) fn find(
        stubs: &[Stub],
        method: &str,
        url: &str,
    ) -> Option<crate::handlers::wasm::outbound::Made> {
        stubs.iter().find(|s| s.answers(method, url)).map(|s| {
            (
                s.status,
                s.headers.clone().into_iter().collect(),
                json_bytes(&s.body),
            )
        })
    }

    /// Every stub of every case in a project's cases.jsonl, in order (lines that are not cases, or
    /// give no stubs, add none): what `handler dev` serves.
    pub(super) fn of_project(dir: &Path) -> Vec<Stub> {
        #[derive(Deserialize)]
        struct Stubs {
            #[serde(default)]
            http: Vec<Stub>,
        }
        let text = std::fs::read_to_string(dir.join("cases.jsonl")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Stubs>(l).ok())
            .flat_map(|c| c.http)
            .collect()
    }
}

fn ok_status() -> u16 {
    200
}

/// Text as itself; other JSON as its text; null as nothing.
fn json_bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::Null => Vec::new(),
        Value::String(s) => s.clone().into_bytes(),
        other => other.to_string().into_bytes(),
    }
}

impl LocalHttp {
    fn reset(&self, stubs: &[Stub]) {
        *self.stubs.lock().unwrap_or_else(|p| p.into_inner()) = stubs.to_vec();
        self.made.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn made(&self) -> Vec<Value> {
        self.made.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl crate::handlers::wasm::outbound::Responder for LocalHttp {
    fn respond(
        &self,
        method: &str,
        url: &str,
        body: Vec<u8>,
    ) -> std::result::Result<crate::handlers::wasm::outbound::Made, String> {
        self.made
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(json!({"method": method, "url": url, "body": String::from_utf8_lossy(&body)}));
        let stubs = self.stubs.lock().unwrap_or_else(|p| p.into_inner());
        match Stub::find(&stubs, method, url) {
            Some(made) => Ok(made),
            None => Err(format!(
                "no stub for {method} {url} in this case's \"http\" (a local test never calls out)"
            )),
        }
    }
}

/// The namespace of a local call's state: the entry's, else one for local calls.
const LOCAL_STATE: &str = "nova:local:handler:state";

/// A runtime of its own for one handler (one worker; the default artifact cache). Its state is kept
/// in memory ([`LocalState`]), under the entry's namespace or a local one.
fn local_handler(spec: &WasmSpec) -> Result<(Runtime, WasmHandler, Arc<LocalState>)> {
    local_handler_with(spec, None)
}

/// [`local_handler`], its outbound requests answered by `http` instead of the network when given.
fn local_handler_with(
    spec: &WasmSpec,
    http: Option<Arc<LocalHttp>>,
) -> Result<(Runtime, WasmHandler, Arc<LocalState>)> {
    let mut spec = spec.clone();
    let namespace = spec.state.get_or_insert_with(|| LOCAL_STATE.into()).clone();
    let state = Arc::new(LocalState {
        namespace,
        ..LocalState::default()
    });
    let spec = &spec;
    let settings = RuntimeSettings {
        cache_dir: crate::handlers::wasm::default_cache_dir(),
        workers: 1,
        max_stack: 512 * 1024,
        max_memory: spec.memory,
        reused: usize::from(spec.reuse.is_some()),
        concurrent: spec.outbound.as_ref().map_or(0, |o| o.concurrency),
        reply_limit: crate::model::ReplyLimit::default(),
    };
    let runtime = Runtime::new(&settings, std::sync::Arc::new(Naming::default()))
        .map_err(|m| Failure::new(Exit::Failure, m))?;
    runtime.read_state_with(state.clone());
    if let Some(http) = http {
        runtime.answer_http_with(http);
    }
    // A first call after a build compiles the component: say so on stderr, not in silence.
    let handler = runtime
        .load_reporting(spec, &|line| eprintln!("redstream: {line}"))
        .map_err(|m| Failure::new(Exit::Config, m))?;
    Ok((runtime, handler, state))
}

/// A message from a JSON object of fields (objects and arrays become JSON text, as on publish).
fn message(
    fields: &serde_json::Map<String, Value>,
    stream: &str,
    id: &str,
    deliveries: u64,
) -> Result<Message> {
    Naming::default()
        .parse(stream)
        .map_err(|e| Failure::new(Exit::Failure, format!("stream: {e}")))?;
    Ok(Message {
        stream: stream.into(),
        id: id.into(),
        fields: Fields::from_json_object(fields),
        deliveries,
        sender: None,
    })
}

fn call_message(call: &LocalCall) -> Result<Message> {
    match serde_json::from_str::<Value>(&call.message) {
        Ok(Value::Object(map)) => message(&map, &call.stream, "0-1", call.deliveries),
        Ok(_) => Err(Failure::new(
            Exit::Failure,
            "--message: expected a JSON object of fields",
        )),
        Err(e) => Err(Failure::new(Exit::Failure, format!("--message: {e}"))),
    }
}

/// The replies of a success as `{"stream", "fields", "binary"?, "delay_ms"? | "at_ms"?}` (values that
/// are not UTF-8 in `binary`, base64-encoded, as `redstream read` shows entries; a delayed reply's
/// due time as the handler gave it).
fn replies_json(outcome: &Outcome) -> Vec<Value> {
    match outcome {
        Outcome::Success(replies) => replies
            .iter()
            .filter(|r| !r.kind.is_state())
            .map(|r| {
                let mut v = r.fields.to_json();
                v["stream"] = Value::String(r.stream.clone());
                match r.kind.due() {
                    Some(Due::In(ms)) => v["delay_ms"] = ms.into(),
                    Some(Due::At(ms)) => v["at_ms"] = ms.into(),
                    None => {}
                }
                v
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The changes of state of a success, in order: `{"key", "value", "ttl_ms"?}` (a value that is not
/// UTF-8 base64-encoded in `binary` instead) or `{"key", "removed": true}`.
fn state_json(outcome: &Outcome) -> Vec<Value> {
    let Outcome::Success(replies) = outcome else {
        return Vec::new();
    };
    replies
        .iter()
        .filter_map(|r| match r.kind {
            ReplyKind::StateSet { ttl_ms } => {
                let mut v = json!({"key": r.stream});
                let value = r.fields.iter().next().map_or(&[][..], |(_, v)| v);
                match std::str::from_utf8(value) {
                    Ok(text) => v["value"] = text.into(),
                    Err(_) => {
                        use base64::Engine as _;
                        v["binary"] = base64::engine::general_purpose::STANDARD
                            .encode(value)
                            .into();
                    }
                }
                if let Some(ms) = ttl_ms {
                    v["ttl_ms"] = ms.into();
                }
                Some(v)
            }
            ReplyKind::StateRemove => Some(json!({"key": r.stream, "removed": true})),
            _ => None,
        })
        .collect()
}

fn outcome_json(outcome: &Outcome, elapsed: Duration, output: Vec<(&str, String)>) -> Value {
    let (kind, reason) = outcome_kind(outcome);
    let mut out = json!({
        "outcome": kind,
        "reason": reason,
        "replies": replies_json(outcome),
        "elapsed_us": elapsed.as_micros() as u64,
        // What the guest logged, then what it printed (a panic's message goes to stderr).
        "output": output.into_iter().map(|(at, text)| json!({"at": at, "text": text})).collect::<Vec<_>>(),
    });
    if let (Some(ms), Some(o)) = (retry_after_ms(outcome), out.as_object_mut()) {
        o.insert("retry_after_ms".into(), ms.into());
    }
    let state = state_json(outcome);
    if let (false, Some(o)) = (state.is_empty(), out.as_object_mut()) {
        o.insert("state".into(), state.into());
    }
    out
}

/// When a retry the handler timed itself comes, in ms.
fn retry_after_ms(outcome: &Outcome) -> Option<u64> {
    match outcome {
        Outcome::RetryAfter(_, after) => Some(u64::try_from(after.as_millis()).unwrap_or(u64::MAX)),
        _ => None,
    }
}

fn outcome_kind(outcome: &Outcome) -> (&'static str, Option<&str>) {
    match outcome {
        Outcome::Success(_) => ("success", None),
        Outcome::Retry(why) | Outcome::RetryAfter(why, _) => ("retry", Some(why)),
        Outcome::Reject(why) => ("reject", Some(why)),
    }
}

/// Per-call cost with a fresh instance per message, and with one reused instance.
fn bench(config_file: Option<&Path>, call: &LocalCall, n: u32) -> Result {
    let msg = call_message(call)?;
    let base = spec(config_file, &call.target)?;
    println!(
        "{:<10} {:>10} {:>14} {:>12}",
        "instance", "calls", "µs per call", "calls/s"
    );
    for (label, reuse) in [("fresh", None), ("reused", Some(u64::MAX))] {
        let (_runtime, handler, _) = local_handler(&WasmSpec {
            reuse,
            ..base.clone()
        })?;
        // Warm up: first-call costs (page faults, lazy init) are not what a running daemon pays.
        // A rejection is the handler's answer and is measured like a success; a failure is not.
        let mut rejected = None;
        for _ in 0..n.min(500) {
            match handler.call_here(&msg, None) {
                Outcome::Retry(why) | Outcome::RetryAfter(why, _) => {
                    return Err(Failure::new(
                        Exit::Failure,
                        format!("the handler failed (a retry, not an answer to measure): {why}"),
                    ));
                }
                Outcome::Reject(why) => rejected = Some(why),
                Outcome::Success(_) => {}
            }
        }
        if let Some(why) = rejected.filter(|_| label == "fresh") {
            println!("(the handler rejects this message: {why})");
        }
        let started = Instant::now();
        for _ in 0..n {
            std::hint::black_box(handler.call_here(&msg, None));
        }
        let per = started.elapsed().as_secs_f64() * 1e6 / f64::from(n);
        println!("{label:<10} {n:>10} {per:>14.2} {:>12.0}", 1e6 / per);
    }
    Ok(())
}

/// One line of a cases file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: Option<String>,
    message: serde_json::Map<String, Value>,
    #[serde(default = "default_stream")]
    stream: String,
    #[serde(default = "default_id")]
    id: String,
    #[serde(default = "one")]
    deliveries: u64,
    /// The handler's state before the call: key (without its namespace) → value (text, or JSON).
    #[serde(default)]
    state: serde_json::Map<String, Value>,
    /// Responses to the call's outbound requests (the handler's allow-list still applies; a request
    /// without a stub fails).
    #[serde(default)]
    http: Vec<Stub>,
    expect: Expect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    outcome: String,
    /// Every reply, in order, each with the fields that matter: fields a reply has and the case does
    /// not name are ignored, unless `exact`.
    replies: Option<Vec<ExpectedReply>>,
    #[serde(default)]
    exact: bool,
    reason: Option<String>,
    reason_contains: Option<String>,
    /// A retry the handler timed itself (`retry-after`), in ms.
    retry_after_ms: Option<u64>,
    /// The state after a success, for the keys named: value (text, or JSON), or null for none.
    state: Option<serde_json::Map<String, Value>>,
    /// The outbound requests the call made, in order: each `url`, and its `method` and `body` when
    /// named.
    requests: Option<Vec<ExpectedRequest>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectedRequest {
    url: String,
    method: Option<String>,
    /// Text, or JSON compared as JSON.
    body: Option<Value>,
}

/// What is wrong with the requests a call made, given what a case expects.
fn requests_mismatch(expect: &Expect, made: &[Value]) -> Option<String> {
    let want = expect.requests.as_ref()?;
    let fits = |w: &ExpectedRequest, m: &Value| {
        let body = m["body"].as_str().unwrap_or("");
        m["url"] == w.url.as_str()
            && w.method.as_deref().is_none_or(|x| {
                m["method"]
                    .as_str()
                    .is_some_and(|g| g.eq_ignore_ascii_case(x))
            })
            && match &w.body {
                None => true,
                Some(Value::String(s)) => body == s,
                Some(v) => serde_json::from_str::<Value>(body).is_ok_and(|b| &b == v),
            }
    };
    let ok = want.len() == made.len() && want.iter().zip(made).all(|(w, m)| fits(w, m));
    (!ok).then(|| {
        let shown: Vec<Value> = want
            .iter()
            .map(|w| json!({"url": w.url, "method": w.method, "body": w.body}))
            .collect();
        format!(
            "requests differ\n      expected {}\n      got      {}",
            serde_json::to_string(&shown).unwrap_or_default(),
            serde_json::to_string(made).unwrap_or_default()
        )
    })
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct ExpectedReply {
    stream: String,
    fields: serde_json::Map<String, Value>,
    /// Values that are not UTF-8, base64-encoded.
    #[serde(default)]
    binary: serde_json::Map<String, Value>,
    /// A delayed reply: due this long after the commit, or at this time (ms since the epoch). A case
    /// naming neither expects a reply published at once.
    delay_ms: Option<u64>,
    at_ms: Option<u64>,
}

fn default_stream() -> String {
    "nova:task:local:test".into()
}
fn default_id() -> String {
    "0-1".into()
}
fn one() -> u64 {
    1
}

/// What is wrong with an outcome, given what a case expects.
fn mismatch(expect: &Expect, outcome: &Outcome) -> Option<String> {
    let (kind, reason) = outcome_kind(outcome);
    if kind != expect.outcome {
        let why = reason.map(|r| format!(" ({r})")).unwrap_or_default();
        return Some(format!(
            "expected outcome {}, got {kind}{why}",
            expect.outcome
        ));
    }
    if let Some(want) = &expect.reason
        && reason != Some(want.as_str())
    {
        return Some(format!("expected reason {want:?}, got {reason:?}"));
    }
    if let Some(part) = &expect.reason_contains
        && !reason.is_some_and(|r| r.contains(part.as_str()))
    {
        return Some(format!(
            "expected a reason containing {part:?}, got {reason:?}"
        ));
    }
    if let Some(want) = expect.retry_after_ms
        && retry_after_ms(outcome) != Some(want)
    {
        return Some(format!(
            "expected a retry after {want} ms, got {}",
            retry_after_ms(outcome).map_or("none".into(), |ms| format!("one after {ms} ms"))
        ));
    }
    if let Some(want) = &expect.replies {
        let got: Vec<ExpectedReply> = replies_json(outcome)
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect();
        let matches = got.len() == want.len()
            && want
                .iter()
                .zip(&got)
                .all(|(w, g)| reply_matches(w, g, expect.exact));
        if !matches {
            let show = |r: &[ExpectedReply]| {
                let shown: Vec<Value> = r
                    .iter()
                    .map(|r| {
                        let mut v = json!({"stream": r.stream, "fields": r.fields});
                        if !r.binary.is_empty() {
                            v["binary"] = Value::Object(r.binary.clone());
                        }
                        if let Some(ms) = r.delay_ms {
                            v["delay_ms"] = ms.into();
                        }
                        if let Some(ms) = r.at_ms {
                            v["at_ms"] = ms.into();
                        }
                        v
                    })
                    .collect();
                serde_json::to_string(&shown).unwrap_or_default()
            };
            return Some(format!(
                "replies differ\n      expected {}\n      got      {}",
                show(want),
                show(&got)
            ));
        }
    }
    None
}

/// What is wrong with the state after a call, given the state before and what a case expects: each
/// key it names holds that value (null: none) once the call's changes are applied.
fn state_mismatch(
    state: &LocalState,
    before: &serde_json::Map<String, Value>,
    expect: &Expect,
    outcome: &Outcome,
) -> Option<String> {
    let want = expect.state.as_ref()?;
    state.reset(before);
    let mut after = state
        .values
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Outcome::Success(replies) = outcome {
        for r in replies {
            match r.kind {
                ReplyKind::StateSet { .. } => {
                    let value = r
                        .fields
                        .iter()
                        .next()
                        .map_or(Vec::new(), |(_, v)| v.to_vec());
                    after.insert(r.stream.clone(), value);
                }
                ReplyKind::StateRemove => {
                    after.remove(&r.stream);
                }
                _ => {}
            }
        }
    }
    for (k, v) in want {
        let key = format!("{}:{k}", state.namespace);
        let got = after
            .get(&key)
            .map(|b| String::from_utf8_lossy(b).into_owned());
        let expected = match v {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        };
        if got != expected {
            return Some(format!(
                "expected state {k} = {}, got {}",
                expected.map_or("none".into(), |e| format!("{e:?}")),
                got.map_or("none".into(), |g| format!("{g:?}"))
            ));
        }
    }
    None
}

/// Whether `got` is the reply `want` describes: its stream, and every field the case names (text or
/// binary) with that value; with `exact`, no other field either.
fn reply_matches(want: &ExpectedReply, got: &ExpectedReply, exact: bool) -> bool {
    if exact {
        return want == got;
    }
    let named = |wanted: &serde_json::Map<String, Value>, had: &serde_json::Map<String, Value>| {
        wanted.iter().all(|(k, v)| had.get(k) == Some(v))
    };
    want.stream == got.stream
        && (want.delay_ms, want.at_ms) == (got.delay_ms, got.at_ms)
        && named(&want.fields, &got.fields)
        && named(&want.binary, &got.binary)
}

/// `handler test`: every case of a JSON-lines file; exit 0 only when all pass.
pub(super) fn test(config_file: Option<&Path>, args: &HandlerArgs, cases: Option<&Path>) -> Result {
    let cases_path = match (cases, &args.path) {
        (Some(c), _) => c.to_path_buf(),
        (None, Some(p)) if p.is_dir() => p.join("cases.jsonl"),
        _ => {
            return Err(Failure::new(
                Exit::Failure,
                "--cases FILE: which cases to run (a project directory has them in cases.jsonl)",
            ));
        }
    };
    let text = std::fs::read_to_string(&cases_path).map_err(|e| {
        Failure::new(
            Exit::Failure,
            format!("cannot read {}: {e}", cases_path.display()),
        )
    })?;
    let mut cases = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let case: Case = serde_json::from_str(line).map_err(|e| {
            Failure::new(
                Exit::Failure,
                format!("{}:{}: not a case: {e}", cases_path.display(), i + 1),
            )
        })?;
        if !["success", "retry", "reject"].contains(&case.expect.outcome.as_str()) {
            return Err(Failure::new(
                Exit::Failure,
                format!(
                    "{}:{}: expect.outcome must be success, retry or reject, not {:?}",
                    cases_path.display(),
                    i + 1,
                    case.expect.outcome
                ),
            ));
        }
        cases.push((i + 1, case));
    }
    if cases.is_empty() {
        return Err(Failure::new(
            Exit::Failure,
            format!("{} has no cases", cases_path.display()),
        ));
    }
    let spec = spec(config_file, args)?;
    let http = Arc::new(LocalHttp::default());
    let (_runtime, handler, state) = local_handler_with(&spec, Some(http.clone()))?;
    println!(
        "testing {} ({}) with {}",
        spec.name,
        spec.file.display(),
        cases_path.display()
    );
    let mut failed = 0;
    for (line, case) in &cases {
        let name = case.name.clone().unwrap_or_else(|| format!("line {line}"));
        let msg = message(&case.message, &case.stream, &case.id, case.deliveries)?;
        state.reset(&case.state);
        http.reset(&case.http);
        let started = Instant::now();
        let (outcome, output) = handler.call_recorded(&msg, None);
        let took = started.elapsed().as_micros();
        let wrong = mismatch(&case.expect, &outcome)
            .or_else(|| state_mismatch(&state, &case.state, &case.expect, &outcome))
            .or_else(|| requests_mismatch(&case.expect, &http.made()));
        match wrong {
            None => println!("ok      {name} ({took} µs)"),
            Some(why) => {
                failed += 1;
                println!("FAILED  {name} (line {line}): {why}");
                for (at, text) in output {
                    println!("      {at}: {}", text.trim_end());
                }
            }
        }
    }
    println!("{} of {} cases passed", cases.len() - failed, cases.len());
    if failed > 0 {
        return Err(Failure::new(
            Exit::Failure,
            format!("{failed} case(s) failed"),
        ));
    }
    Ok(())
}

/// `redstream handler …`, synchronously (outside any async runtime).
pub fn run(config_file: Option<&Path>, cmd: HandlerCommand) -> Result {
    match cmd {
        HandlerCommand::Run(call) => {
            let spec = spec(config_file, &call.target)?;
            let (_runtime, handler, _) = local_handler(&spec)?;
            let msg = call_message(&call)?;
            let started = Instant::now();
            let (outcome, output) = handler.call_recorded(&msg, None);
            println!("{}", outcome_json(&outcome, started.elapsed(), output));
            match outcome {
                Outcome::Success(_) => Ok(()),
                _ => Err(Failure::new(Exit::Failure, "the handler did not succeed")),
            }
        }
        HandlerCommand::Bench { call, n } => bench(config_file, &call, n),
        HandlerCommand::Test { target, cases } => test(config_file, &target, cases.as_deref()),
        HandlerCommand::New {
            name,
            lang,
            engine,
            dir,
        } => super::scaffold::new(&name, &lang, engine.as_deref(), dir.as_deref()),
        HandlerCommand::Build { path } => super::scaffold::build(&path),
        // cli::main runs it with cli::dev (which runs the cases through this module).
        HandlerCommand::Dev { .. } => Err(Failure::new(
            Exit::Failure,
            "handler dev is run by the CLI's main, not here",
        )),
    }
}
