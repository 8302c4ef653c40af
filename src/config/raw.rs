//! The config as written: serde structs that mirror `config/redstream.toml`, with every default in one
//! place (the `Default` impls below) and unknown keys rejected.
//!
//! Scalars are [`Loose`]: a value of the wrong type does not stop deserialization but is kept as what was
//! found, so the validate step can report it together with every other problem, with its key path and
//! where it came from. Nothing here is interpreted (durations, names, keys); that is [`super::validate`].

use figment::value::{Tag, Value};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

/// A scalar as found: the value if it had the right type, else how what was there looks; and the tag
/// figment gave it, which tells which file or environment variable it came from.
#[derive(Clone, Debug)]
pub struct Loose<T> {
    pub value: Result<T, String>,
    pub tag: Tag,
}

impl<T> Loose<T> {
    /// A built-in default.
    pub fn ok(v: T) -> Self {
        Loose {
            value: Ok(v),
            tag: Tag::Default,
        }
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Loose<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let found = <Value as Deserialize>::deserialize(d)?;
        // Environment variables are typed by their look: INSTANCE=2 arrives as a number. Where a
        // string is expected, take its text.
        let value = T::deserialize(&found).ok().or_else(|| match &found {
            Value::Num(tag, _) | Value::Bool(tag, _) => {
                T::deserialize(&Value::String(*tag, show(&found))).ok()
            }
            _ => None,
        });
        Ok(Loose {
            value: value.ok_or_else(|| show(&found)),
            tag: found.tag(),
        })
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(_, s) => format!("{s:?}"),
        Value::Char(_, c) => format!("{c:?}"),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(_, n) => n
            .to_u128()
            .map(|u| u.to_string())
            .or_else(|| n.to_i128().map(|i| i.to_string()))
            .or_else(|| n.to_f64().map(|f| f.to_string()))
            .unwrap_or_else(|| "a number".into()),
        Value::Empty(..) => "nothing".into(),
        Value::Dict(..) => "a table".into(),
        Value::Array(..) => "an array".into(),
    }
}

/// A secret: inline text, or where to read it. Inline secrets are fine for development; in production
/// point at a file or a systemd credential so the config file itself holds nothing sensitive.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum RawSecret {
    /// `password = "…"`
    Inline(String),
    /// `password = { file = "/path" }`, `{ credential = "name" }` (read from `$CREDENTIALS_DIRECTORY`,
    /// which systemd's `LoadCredential=` fills), or `{ env = "VAR" }`.
    From(SecretFrom),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretFrom {
    pub file: Option<String>,
    pub credential: Option<String>,
    pub env: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[derive(Default)]
pub struct RawConfig {
    pub daemon: RawDaemon,
    pub consumers: Vec<RawConsumer>,
    pub wasm: RawWasm,
    pub metrics: RawMetrics,
    pub heartbeat: RawHeartbeat,
    pub retention: RawRetention,
    pub control: RawControl,
    pub handlers: Vec<RawHandler>,
    pub routes: Vec<RawRoute>,
    pub identity: RawIdentity,
    pub naming: RawNaming,
    pub redis: RawRedis,
    pub auth: RawAuth,
    pub log: RawLog,
    pub limits: RawLimits,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[derive(Default)]
pub struct RawIdentity {
    pub name: Option<Loose<String>>,
    pub token: Option<RawSecret>,
    pub roles: Vec<Loose<String>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawNaming {
    pub domains: Vec<Loose<String>>,
}

impl Default for RawNaming {
    fn default() -> Self {
        RawNaming {
            domains: crate::model::naming::DEFAULT_DOMAINS
                .iter()
                .map(|d| Loose::ok(d.to_string()))
                .collect(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRedis {
    pub url: Loose<String>,
    pub cluster: Vec<Loose<String>>,
    pub username: Option<Loose<String>>,
    pub password: Option<RawSecret>,
    pub tls_ca: Option<RawSecret>,
    pub tls_cert: Option<RawSecret>,
    pub tls_key: Option<RawSecret>,
    pub connect_timeout: Loose<String>,
    pub command_timeout: Loose<String>,
    pub reconnect_min_delay: Loose<String>,
    pub reconnect_max_delay: Loose<String>,
    pub reconnect_attempts: Loose<u32>,
    pub startup_wait: Loose<String>,
}

impl Default for RawRedis {
    fn default() -> Self {
        RawRedis {
            url: Loose::ok("redis://127.0.0.1:6379/0".into()),
            cluster: Vec::new(),
            username: None,
            password: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            connect_timeout: Loose::ok("5s".into()),
            command_timeout: Loose::ok("2s".into()),
            reconnect_min_delay: Loose::ok("100ms".into()),
            reconnect_max_delay: Loose::ok("5s".into()),
            reconnect_attempts: Loose::ok(3),
            startup_wait: Loose::ok("30s".into()),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAuth {
    pub issuer: Loose<String>,
    pub audience: Loose<String>,
    pub leeway: Loose<String>,
    pub signing_key: Option<Loose<String>>,
    pub token_ttl: Loose<String>,
    pub max_token_ttl: Loose<String>,
    pub signature_ttl: Loose<String>,
    pub endpoint: Option<Loose<String>>,
    pub keys: Vec<RawKey>,
    pub api_keys: Vec<RawApiKey>,
}

impl Default for RawAuth {
    fn default() -> Self {
        RawAuth {
            issuer: Loose::ok("redstream".into()),
            audience: Loose::ok("redstream".into()),
            leeway: Loose::ok("30s".into()),
            signing_key: None,
            token_ttl: Loose::ok("1h".into()),
            max_token_ttl: Loose::ok("24h".into()),
            signature_ttl: Loose::ok("5m".into()),
            endpoint: None,
            keys: Vec::new(),
            api_keys: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub id: Loose<String>,
    pub algorithm: Loose<String>,
    pub secret: Option<RawSecret>,
    pub public_key: Option<RawSecret>,
    pub private_key: Option<RawSecret>,
    pub retire_after: Option<Loose<String>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiKey {
    pub name: Loose<String>,
    pub hash: RawSecret,
    pub identity: Loose<String>,
    #[serde(default)]
    pub roles: Vec<Loose<String>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawLog {
    pub level: Loose<String>,
    pub dir: Option<Loose<String>>,
    pub rotation: Loose<String>,
    pub keep: Loose<u32>,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: Loose::ok("info".into()),
            dir: None,
            rotation: Loose::ok("daily".into()),
            keep: Loose::ok(7),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawLimits {
    pub entry_fields: Loose<u32>,
    pub entry_bytes: Loose<String>,
    pub replies: Loose<u32>,
    pub reply_fields: Loose<u32>,
    pub reply_bytes: Loose<String>,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            entry_fields: Loose::ok(1000),
            entry_bytes: Loose::ok("1MiB".into()),
            replies: Loose::ok(100),
            reply_fields: Loose::ok(1000),
            reply_bytes: Loose::ok("1MiB".into()),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawDaemon {
    pub instance: Option<Loose<String>>,
    pub drain_timeout: Loose<String>,
}

impl Default for RawDaemon {
    fn default() -> Self {
        RawDaemon {
            instance: None,
            drain_timeout: Loose::ok("30s".into()),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConsumer {
    pub stream: Option<Loose<String>>,
    pub group: Option<Loose<String>>,
    pub consumer: Option<Loose<String>>,
    pub start: Loose<String>,
    pub batch_size: Loose<u32>,
    pub block: Loose<String>,
    pub claim_min_idle: Loose<String>,
    pub claim_interval: Loose<String>,
    pub max_deliveries: Loose<u32>,
    pub dead_letter: Option<Loose<String>>,
    pub in_flight: Loose<u32>,
    pub order_by: Option<Loose<String>>,
    pub handler: Option<Loose<String>>,
    pub handler_timeout: Loose<String>,
    pub forward_to: Option<Loose<String>>,
    pub unmatched: Loose<String>,
    /// `[[consumers.routes]]`: this consumer's own route table, instead of the top-level `[[routes]]`.
    pub routes: Vec<RawRoute>,
    /// Options of the `faults` test handler (only in builds with the `fault-injection` feature).
    pub faults: Option<RawFaults>,
    /// `retry = { backoff = [...], jitter = "20%" }`.
    pub retry: Option<RawRetry>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub backoff: Vec<Loose<String>>,
    pub jitter: Option<Loose<String>>,
}

impl Default for RawConsumer {
    fn default() -> Self {
        RawConsumer {
            stream: None,
            group: None,
            consumer: None,
            start: Loose::ok("$".into()),
            batch_size: Loose::ok(500),
            block: Loose::ok("5s".into()),
            claim_min_idle: Loose::ok("60s".into()),
            claim_interval: Loose::ok("10s".into()),
            max_deliveries: Loose::ok(5),
            dead_letter: None,
            in_flight: Loose::ok(2000),
            order_by: None,
            handler: None,
            handler_timeout: Loose::ok("30s".into()),
            forward_to: None,
            unmatched: Loose::ok("dead-letter".into()),
            routes: Vec::new(),
            faults: None,
            retry: None,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawFaults {
    pub reply_to: Option<Loose<String>>,
    pub fail_field: Option<Loose<String>>,
    pub fail_deliveries: Option<Loose<u32>>,
    pub fail_every: Option<Loose<u32>>,
    pub sleep: Option<Loose<String>>,
    pub fail_while_file: Option<Loose<String>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawWasm {
    pub cache_dir: Option<Loose<String>>,
    pub workers: Option<Loose<u32>>,
    pub max_stack: Loose<String>,
    /// Where relative `[[handlers]] file` paths are looked up (default: the directory of the file
    /// that names them).
    pub handlers_dir: Option<Loose<String>>,
    /// Reload when a handler file, the config file or a drop-in changes.
    pub watch: Loose<bool>,
}

impl Default for RawWasm {
    fn default() -> Self {
        RawWasm {
            cache_dir: None,
            workers: None,
            max_stack: Loose::ok("512KiB".into()),
            handlers_dir: None,
            watch: Loose::ok(false),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawHandler {
    pub name: Option<Loose<String>>,
    pub file: Option<Loose<String>>,
    pub roles: Vec<Loose<String>>,
    pub memory: Loose<String>,
    pub timeout: Loose<String>,
    pub instance: Loose<String>,
    pub reuse_limit: Loose<u32>,
    pub require_sender_token: Loose<bool>,
    pub config: std::collections::BTreeMap<String, Loose<String>>,
    /// A circuit breaker: stop calling the handler while most of its calls fail.
    pub breaker: Option<RawBreaker>,
    /// The namespace of the handler's state keys (`nova:{domain}:{entity}:{function}`).
    pub state: Option<Loose<String>>,
    /// Origins (`https://host[:port]`) the handler may send HTTP requests to; its calls then run
    /// asynchronously.
    pub allowed_outbound_hosts: Option<Vec<Loose<String>>>,
    /// One outbound request's time limit (within the call's deadline).
    pub http_timeout: Option<Loose<String>>,
    /// The largest outbound response body.
    pub http_max_response: Option<Loose<String>>,
    /// Calls in flight at once (handlers granted outbound HTTP).
    pub concurrency: Option<Loose<u32>>,
    /// At most this many calls per second/minute/hour (`"200/s"`), across every daemon.
    pub rate: Option<Loose<String>>,
    /// This handler's retry schedule, in place of its consumers' `retry`.
    pub retry: Option<RawRetry>,
    /// In builds with the `fault-injection` feature: this entry is the `faults` test handler under
    /// its own name (no `file`), so tests can route to it beside other handlers.
    pub faults: Option<RawFaults>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawBreaker {
    pub failures: Option<Loose<String>>,
    pub min_calls: Option<Loose<u32>>,
    pub window: Option<Loose<String>>,
    pub open_for: Option<Loose<String>>,
}

impl Default for RawHandler {
    fn default() -> Self {
        RawHandler {
            name: None,
            file: None,
            roles: Vec::new(),
            memory: Loose::ok("64MiB".into()),
            timeout: Loose::ok("5s".into()),
            instance: Loose::ok("fresh".into()),
            reuse_limit: Loose::ok(10_000),
            require_sender_token: Loose::ok(false),
            config: Default::default(),
            breaker: None,
            state: None,
            allowed_outbound_hosts: None,
            http_timeout: None,
            http_max_response: None,
            concurrency: None,
            rate: None,
            retry: None,
            faults: None,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRoute {
    pub stream: Option<Loose<String>>,
    pub equals: std::collections::BTreeMap<String, Loose<String>>,
    pub exists: Vec<Loose<String>>,
    pub absent: Vec<Loose<String>>,
    pub handler: Option<Loose<String>>,
    pub forward: Option<Loose<String>>,
    pub drop: Option<Loose<bool>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Option<Loose<String>>,
    pub poll_interval: Loose<String>,
}

impl Default for RawMetrics {
    fn default() -> Self {
        RawMetrics {
            listen: None,
            poll_interval: Loose::ok("10s".into()),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawHeartbeat {
    pub enabled: Loose<bool>,
    pub stream: Loose<String>,
    pub interval: Loose<String>,
    pub max_len: Loose<u32>,
}

impl Default for RawHeartbeat {
    fn default() -> Self {
        RawHeartbeat {
            enabled: Loose::ok(true),
            stream: Loose::ok("nova:system:mcp:heartbeat".into()),
            interval: Loose::ok("20s".into()),
            max_len: Loose::ok(1000),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawControl {
    pub enabled: Loose<bool>,
    pub stream: Loose<String>,
    pub dead_letter: Loose<String>,
}

impl Default for RawControl {
    fn default() -> Self {
        RawControl {
            enabled: Loose::ok(true),
            stream: Loose::ok("nova:system:mcp:control".into()),
            dead_letter: Loose::ok("nova:system:mcp:control-dlq".into()),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRetention {
    pub interval: Loose<String>,
    pub streams: Vec<RawRetained>,
}

impl Default for RawRetention {
    fn default() -> Self {
        RawRetention {
            interval: Loose::ok("1m".into()),
            streams: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRetained {
    pub stream: Option<Loose<String>>,
    pub max_len: Option<Loose<u64>>,
    pub max_age: Option<Loose<String>>,
}
