//! Raw config → [`Settings`]: every value parsed, every secret read, every key built, every problem
//! collected with its key path and origin, so one run of `redstream check` shows them all.
//!
//! Owns the interpretation rules (durations, names, roles, keys). The raw shapes are [`super::raw`]; the
//! runtime types belong to the modules that use them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use figment::Figment;
use figment::value::Tag;

use super::raw::{Loose, RawConfig, RawConsumer, RawSecret};
use super::{AuthSettings, DaemonIdentity, Problem, Settings, origin_of, secret};
use crate::auth::apikey::{ApiKey, ApiKeys};
use crate::auth::jwt::{Key, KeyAlgorithm, KeySet};
use crate::auth::{Identity, Op, Role, Roles};
use crate::conn::{RedisSettings, TlsFiles};
use crate::engine::router::{Action, RouteSpec, Unmatched};
use crate::engine::{ConsumerSettings, DaemonSettings, HandlerSpec};
use crate::logging::LogSettings;
use crate::naming::{NameKind, Naming, StreamName, validate_name};
use crate::wasm::WasmSpec;

/// Collects problems while reading values out of the raw config.
pub(super) struct Checker<'a> {
    figment: &'a Figment,
    /// Directory that relative secret and handler file paths are resolved against.
    pub base_dir: Option<&'a Path>,
    credentials_dir: Option<&'a Path>,
    pub problems: Vec<Problem>,
}

impl<'a> Checker<'a> {
    pub fn new(
        figment: &'a Figment,
        base_dir: Option<&'a Path>,
        credentials_dir: Option<&'a Path>,
    ) -> Self {
        Checker {
            figment,
            base_dir,
            credentials_dir,
            problems: Vec::new(),
        }
    }

    /// Records a problem with a key that has no single origin (a missing key, a relation of keys).
    pub fn problem(&mut self, path: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.to_owned(),
            message: message.into(),
            origin: None,
        });
    }

    /// Records a problem with the value behind `tag`, naming the file or variable it came from.
    fn problem_at(&mut self, path: &str, tag: Tag, message: String) {
        let origin = self.figment.get_metadata(tag).map(|m| origin_of(m, path));
        self.problems.push(Problem {
            path: path.to_owned(),
            message,
            origin,
        });
    }

    /// The value of a scalar, or a recorded problem.
    pub fn get<T: Clone>(&mut self, path: &str, v: &Loose<T>, expected: &str) -> Option<T> {
        match &v.value {
            Ok(t) => Some(t.clone()),
            Err(shown) => {
                self.problem_at(path, v.tag, format!("expected {expected}, found {shown}"));
                None
            }
        }
    }

    /// A string parsed by `parse`, whose error becomes the problem's message.
    pub fn parse<T>(
        &mut self,
        path: &str,
        v: &Loose<String>,
        expected: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let s = self.get(path, v, expected)?;
        match parse(&s) {
            Ok(t) => Some(t),
            Err(msg) => {
                self.problem_at(
                    path,
                    v.tag,
                    format!("expected {expected}, found {s:?}: {msg}"),
                );
                None
            }
        }
    }

    /// A duration such as `"2s"`, `"500ms"`, `"1h 30m"`.
    pub fn duration(&mut self, path: &str, v: &Loose<String>) -> Option<Duration> {
        self.parse(path, v, "a duration like \"2s\" or \"500ms\"", |s| {
            humantime::parse_duration(s).map_err(|e| e.to_string())
        })
    }

    /// Like [`Checker::duration`] but zero is refused.
    pub fn positive_duration(&mut self, path: &str, v: &Loose<String>) -> Option<Duration> {
        let d = self.duration(path, v)?;
        if d.is_zero() {
            self.problem(path, "expected a duration above zero, found 0");
            return None;
        }
        Some(d)
    }

    /// A non-empty string.
    pub fn text(&mut self, path: &str, v: &Loose<String>) -> Option<String> {
        let s = self.get(path, v, "a string")?;
        if s.trim().is_empty() {
            self.problem_at(
                path,
                v.tag,
                "expected a non-empty string, found \"\"".into(),
            );
            return None;
        }
        Some(s)
    }

    /// A secret's bytes. Relative file paths are taken from the config file's directory.
    pub fn secret(&mut self, path: &str, s: &RawSecret) -> Option<Vec<u8>> {
        let rebased;
        let s = match (s, self.base_dir) {
            (RawSecret::From(from), Some(base))
                if from
                    .file
                    .as_deref()
                    .is_some_and(|f| Path::new(f).is_relative()) =>
            {
                let mut from = from.clone();
                from.file = from
                    .file
                    .map(|f| base.join(f).to_string_lossy().into_owned());
                rebased = RawSecret::From(from);
                &rebased
            }
            _ => s,
        };
        match secret::resolve(s, self.credentials_dir) {
            Ok(b) => Some(b),
            Err(msg) => {
                self.problem(path, msg);
                None
            }
        }
    }

    /// A secret that must be UTF-8 text (passwords, tokens).
    pub fn secret_text(&mut self, path: &str, s: &RawSecret) -> Option<String> {
        let bytes = self.secret(path, s)?;
        match String::from_utf8(bytes) {
            Ok(t) => Some(t),
            Err(_) => {
                self.problem(path, "the secret is not UTF-8 text");
                None
            }
        }
    }

    /// A list of roles; each must name a configured domain.
    pub fn roles(&mut self, path: &str, list: &[Loose<String>], naming: &Naming) -> Roles {
        let mut roles = Vec::new();
        for (i, r) in list.iter().enumerate() {
            let p = format!("{path}[{i}]");
            let parsed = self.parse(
                &p,
                r,
                "a role (admin, {domain}_read or {domain}_write)",
                |s| {
                    let role = Role::parse(s)?;
                    role.check_domain(naming)?;
                    Ok(role)
                },
            );
            roles.extend(parsed);
        }
        Roles::new(roles)
    }
}

/// Builds settings from the raw config, or returns every problem found.
pub(super) fn settings(raw: &RawConfig, c: &mut Checker<'_>) -> Option<Settings> {
    // Naming first: roles are checked against its domains.
    let mut domains = Vec::new();
    for (i, d) in raw.naming.domains.iter().enumerate() {
        domains.extend(c.text(&format!("naming.domains[{i}]"), d));
    }
    let naming = match Naming::new(domains) {
        Ok(n) => n,
        Err(msg) => {
            c.problem("naming.domains", msg);
            Naming::default()
        }
    };

    let redis = redis_settings(raw, c);
    let startup_wait = c.duration("redis.startup_wait", &raw.redis.startup_wait);
    let auth = auth_settings(raw, c, &naming);
    let log_level = c.text("log.level", &raw.log.level);
    let log_dir = raw
        .log
        .dir
        .as_ref()
        .and_then(|d| c.text("log.dir", d))
        .map(std::path::PathBuf::from);
    let log_rotation = c.parse(
        "log.rotation",
        &raw.log.rotation,
        "daily, hourly or never",
        |s| match s {
            "daily" | "hourly" | "never" => Ok(s.to_owned()),
            _ => Err("unknown rotation".into()),
        },
    );
    let log_keep = c.get("log.keep", &raw.log.keep, "a positive integer");
    if let Some(level) = &log_level
        && let Err(e) = tracing_subscriber::EnvFilter::try_new(level)
    {
        c.problem(
            "log.level",
            format!("expected a level or filter such as \"info\", found {level:?}: {e}"),
        );
    }
    let name = raw
        .identity
        .name
        .as_ref()
        .and_then(|n| c.text("identity.name", n));
    let roles = c.roles("identity.roles", &raw.identity.roles, &naming);
    let identity = auth
        .as_ref()
        .and_then(|auth| daemon_identity(raw, c, name, roles, auth));

    let daemon = daemon_settings(raw, c);
    let id_ref = identity.as_ref().and_then(Option::as_ref);
    let handlers = super::handlers::handlers(raw, c, &naming, id_ref, c.base_dir);
    let wasm = super::handlers::wasm_settings(raw, c, &handlers);
    let routes = super::handlers::routes(raw, c, &naming, id_ref, &handlers);
    let consumers = match (&identity, &daemon) {
        (Some(id), Some(d)) => consumers(raw, c, &naming, id.as_ref(), d, &handlers, &routes),
        _ => Vec::new(),
    };

    let metrics_listen = raw.metrics.listen.as_ref().and_then(|l| {
        c.parse(
            "metrics.listen",
            l,
            "a loopback address like \"127.0.0.1:9464\"",
            |s| {
                let addr: std::net::SocketAddr = s.parse().map_err(|e| format!("{e}"))?;
                if addr.ip().is_loopback() {
                    Ok(addr)
                } else {
                    Err(
                        "metrics are served on loopback only; put a proxy in front to expose them"
                            .into(),
                    )
                }
            },
        )
    });
    let metrics_poll = c.positive_duration("metrics.poll_interval", &raw.metrics.poll_interval);
    let daemon_runs = !raw.consumers.is_empty();
    let heartbeat = heartbeat_settings(raw, c, &naming, id_ref.filter(|_| daemon_runs));
    let control = control_settings(raw, c, &naming, id_ref.filter(|_| daemon_runs));
    let retention_interval = c.positive_duration("retention.interval", &raw.retention.interval);
    let retention = retention(raw, c, &naming, id_ref);

    if !c.problems.is_empty() {
        return None;
    }
    Some(Settings {
        retention_interval: retention_interval?,
        retention,
        heartbeat: heartbeat?,
        control: control?,
        metrics_listen,
        metrics_poll: metrics_poll?,
        daemon: daemon?,
        consumers,
        wasm: wasm?,
        handlers,
        routes,
        identity: identity?,
        naming: Arc::new(naming),
        redis: redis?,
        startup_wait: startup_wait?,
        auth: auth?,
        log: LogSettings {
            level: log_level?,
            dir: log_dir,
            rotation: log_rotation?,
            keep: log_keep? as usize,
        },
        file: None,
    })
}

fn redis_settings(raw: &RawConfig, c: &mut Checker<'_>) -> Option<RedisSettings> {
    let r = &raw.redis;
    let url = c.parse("redis.url", &r.url, "a redis:// or rediss:// URL", |s| {
        if s.starts_with("redis://") || s.starts_with("rediss://") || s.starts_with("unix://") {
            Ok(s.to_owned())
        } else {
            Err("the scheme must be redis://, rediss:// (TLS) or unix://".into())
        }
    });
    let username = r
        .username
        .as_ref()
        .and_then(|u| c.text("redis.username", u));
    let password = r
        .password
        .as_ref()
        .and_then(|p| c.secret_text("redis.password", p));
    let tls = TlsFiles {
        ca: r.tls_ca.as_ref().and_then(|s| c.secret("redis.tls_ca", s)),
        client_cert: r
            .tls_cert
            .as_ref()
            .and_then(|s| c.secret("redis.tls_cert", s)),
        client_key: r
            .tls_key
            .as_ref()
            .and_then(|s| c.secret("redis.tls_key", s)),
    };
    if tls.client_cert.is_some() != tls.client_key.is_some() {
        c.problem(
            "redis.tls_cert",
            "a client certificate and its key (redis.tls_key) go together",
        );
    }
    let connect_timeout = c.positive_duration("redis.connect_timeout", &r.connect_timeout);
    let command_timeout = c.positive_duration("redis.command_timeout", &r.command_timeout);
    let min_delay = c.positive_duration("redis.reconnect_min_delay", &r.reconnect_min_delay);
    let max_delay = c.positive_duration("redis.reconnect_max_delay", &r.reconnect_max_delay);
    if let (Some(min), Some(max)) = (min_delay, max_delay)
        && min > max
    {
        c.problem(
            "redis.reconnect_min_delay",
            format!(
                "{} is above redis.reconnect_max_delay ({})",
                fmt_d(min),
                fmt_d(max)
            ),
        );
    }
    let attempts = c.get(
        "redis.reconnect_attempts",
        &r.reconnect_attempts,
        "a positive integer",
    );
    if attempts == Some(0) {
        c.problem(
            "redis.reconnect_attempts",
            "expected a positive integer, found 0",
        );
    }
    Some(RedisSettings {
        url: url?,
        username,
        password,
        tls,
        connect_timeout: connect_timeout?,
        command_timeout: command_timeout?,
        reconnect_min_delay: min_delay?,
        reconnect_max_delay: max_delay?,
        reconnect_attempts: attempts? as usize,
    })
}

fn auth_settings(raw: &RawConfig, c: &mut Checker<'_>, naming: &Naming) -> Option<AuthSettings> {
    let a = &raw.auth;
    let issuer = c.text("auth.issuer", &a.issuer);
    let audience = c.text("auth.audience", &a.audience);
    let leeway = c.duration("auth.leeway", &a.leeway);
    let token_ttl = c.positive_duration("auth.token_ttl", &a.token_ttl);
    let max_token_ttl = c.positive_duration("auth.max_token_ttl", &a.max_token_ttl);
    if let (Some(ttl), Some(max)) = (token_ttl, max_token_ttl)
        && ttl > max
    {
        c.problem(
            "auth.token_ttl",
            format!(
                "{} is above auth.max_token_ttl ({})",
                fmt_d(ttl),
                fmt_d(max)
            ),
        );
    }

    let mut keys = Vec::new();
    let mut key_problems = false;
    for (i, k) in a.keys.iter().enumerate() {
        let path = format!("auth.keys[{i}]");
        let before = c.problems.len();
        let id = c.text(&format!("{path}.id"), &k.id);
        let algorithm = c.parse(
            &format!("{path}.algorithm"),
            &k.algorithm,
            "HS256, RS256 or EdDSA",
            KeyAlgorithm::parse,
        );
        let retire_after = k.retire_after.as_ref().and_then(|r| {
            c.parse(
                &format!("{path}.retire_after"),
                r,
                "an RFC 3339 time like \"2026-12-01T00:00:00Z\"",
                |s| humantime::parse_rfc3339_weak(s).map_err(|e| e.to_string()),
            )
        });
        let secret = k
            .secret
            .as_ref()
            .and_then(|s| c.secret(&format!("{path}.secret"), s));
        let public = k
            .public_key
            .as_ref()
            .and_then(|s| c.secret(&format!("{path}.public_key"), s));
        let private = k
            .private_key
            .as_ref()
            .and_then(|s| c.secret(&format!("{path}.private_key"), s));
        if c.problems.len() > before {
            key_problems = true;
            continue;
        }
        let (Some(id), Some(algorithm)) = (id, algorithm) else {
            continue;
        };
        let built = match algorithm {
            KeyAlgorithm::Hs256 if public.is_some() || private.is_some() => {
                Err("HS256 keys take a secret, not public_key/private_key".to_string())
            }
            KeyAlgorithm::Hs256 => match &secret {
                Some(s) => Key::hmac(&id, s),
                None => Err("HS256 keys need a secret".to_string()),
            },
            _ if secret.is_some() => Err(format!(
                "{algorithm:?} keys take public_key/private_key, not a secret"
            )),
            _ => Key::asymmetric(&id, algorithm, public.as_deref(), private.as_deref()),
        };
        match built {
            Ok(key) => {
                if keys.iter().any(|k: &Key| k.id == key.id) {
                    c.problem(
                        &format!("{path}.id"),
                        format!("key id {:?} is used twice", key.id),
                    );
                }
                keys.push(key.retiring_at(retire_after));
            }
            Err(msg) => {
                key_problems = true;
                c.problem(&path, msg);
            }
        }
    }
    let signing = a
        .signing_key
        .as_ref()
        .and_then(|s| c.text("auth.signing_key", s));

    let mut api_keys = Vec::new();
    for (i, k) in a.api_keys.iter().enumerate() {
        let path = format!("auth.api_keys[{i}]");
        let name = c.text(&format!("{path}.name"), &k.name);
        let hash = c.secret_text(&format!("{path}.hash"), &k.hash);
        let identity = c.text(&format!("{path}.identity"), &k.identity);
        let roles = c.roles(&format!("{path}.roles"), &k.roles, naming);
        if let (Some(name), Some(hash), Some(identity)) = (name, hash, identity) {
            match ApiKey::new(&name, &hash, &identity, roles) {
                Ok(k) => api_keys.push(k),
                Err(msg) => c.problem(&format!("{path}.hash"), msg),
            }
        }
    }

    let (issuer, audience, leeway) = (issuer?, audience?, leeway?);
    if key_problems {
        return None;
    }
    let keys = match KeySet::new(keys, signing.as_deref(), &issuer, &audience, leeway) {
        Ok(k) => k,
        Err(msg) => {
            c.problem("auth.signing_key", msg);
            return None;
        }
    };
    Some(AuthSettings {
        keys: Arc::new(keys),
        api_keys: ApiKeys::new(api_keys),
        token_ttl: token_ttl?,
        max_token_ttl: max_token_ttl?,
    })
}

/// The daemon's own identity: a configured token, verified now, or one self-issued from
/// `identity.roles` with the signing key. None when neither is configured.
fn daemon_identity(
    raw: &RawConfig,
    c: &mut Checker<'_>,
    name: Option<String>,
    roles: Roles,
    auth: &AuthSettings,
) -> Option<Option<DaemonIdentity>> {
    match &raw.identity.token {
        Some(secret) => {
            let token = c.secret_text("identity.token", secret)?;
            if !roles.is_empty() {
                c.problem("identity.roles", "give either identity.token or identity.roles, not both: a token carries its own roles");
            }
            match auth.keys.verify(&token) {
                Ok(v) => {
                    if name.as_ref().is_some_and(|n| *n != v.identity.subject) {
                        c.problem(
                            "identity.name",
                            format!(
                                "{:?} differs from the token's subject {:?}",
                                name.unwrap_or_default(),
                                v.identity.subject
                            ),
                        );
                        return None;
                    }
                    Some(Some(DaemonIdentity {
                        identity: v.identity,
                        token,
                        expires_at: v.expires_at,
                    }))
                }
                Err(e) => {
                    c.problem("identity.token", format!("the token is refused: {e}"));
                    None
                }
            }
        }
        None if roles.is_empty() => Some(None),
        None => {
            if !auth.keys.can_sign() {
                c.problem(
                    "identity.roles",
                    "self-issuing the daemon's token needs auth.signing_key; or give identity.token instead",
                );
                return None;
            }
            let subject = name.unwrap_or_else(default_name);
            match auth.keys.issue(&subject, &roles, auth.max_token_ttl) {
                Ok((token, expires_at)) => Some(Some(DaemonIdentity {
                    identity: Identity { subject, roles },
                    token,
                    expires_at,
                })),
                Err(e) => {
                    c.problem("auth.signing_key", e.to_string());
                    None
                }
            }
        }
    }
}

/// `redstream@<hostname>`.
pub fn default_name() -> String {
    format!("redstream@{}", gethostname::gethostname().to_string_lossy())
}

fn fmt_d(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn daemon_settings(raw: &RawConfig, c: &mut Checker<'_>) -> Option<DaemonSettings> {
    let d = &raw.daemon;
    let instance = d.instance.as_ref().and_then(|i| {
        let s = c.text("daemon.instance", i)?;
        match validate_name(NameKind::Consumer, &s) {
            Ok(()) => Some(s),
            Err(e) => {
                c.problem("daemon.instance", e.to_string());
                None
            }
        }
    });
    let drain_timeout = c.positive_duration("daemon.drain_timeout", &d.drain_timeout)?;
    Some(DaemonSettings {
        instance,
        drain_timeout,
    })
}

/// The consumer name used when a consumer entry names none: stable across restarts (never random),
/// distinct per host and per instance.
pub fn default_consumer(subject: &str, instance: Option<&str>) -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let mut name = if subject.contains('@') {
        subject.to_owned()
    } else {
        format!("{subject}@{host}")
    };
    if let Some(i) = instance {
        name.push('#');
        name.push_str(i);
    }
    name
}

/// The dead-letter stream used when a consumer entry names none: `<stream>-dlq` for ADAPT names.
pub fn default_dead_letter(name: &StreamName<'_>) -> String {
    match name {
        StreamName::Adapt {
            domain,
            entity,
            function,
        } => format!("nova:{domain}:{entity}:{function}-dlq"),
        StreamName::Legacy { service, name } => format!("nova:task:{service}-{name}:dlq"),
    }
}

fn consumers(
    raw: &RawConfig,
    c: &mut Checker<'_>,
    naming: &Naming,
    identity: Option<&DaemonIdentity>,
    daemon: &DaemonSettings,
    handlers: &[WasmSpec],
    routes: &[RouteSpec],
) -> Vec<ConsumerSettings> {
    let mut out = Vec::new();
    if !raw.consumers.is_empty() && identity.is_none() {
        c.problem(
            "identity",
            "consumers need an identity to act as: give identity.token, or identity.roles with auth.signing_key",
        );
    }
    let mut seen: Vec<(String, String, usize)> = Vec::new();
    for (i, rc) in raw.consumers.iter().enumerate() {
        let p = |k: &str| format!("consumers[{i}].{k}");
        let stream = match &rc.stream {
            Some(s) => c.parse(&p("stream"), s, "a stream name", |s| {
                naming
                    .parse(s)
                    .map(|_| s.to_owned())
                    .map_err(|e| e.to_string())
            }),
            None => {
                c.problem(&p("stream"), "missing: the stream to consume");
                None
            }
        };
        let group = match &rc.group {
            Some(g) => c.parse(&p("group"), g, "a group name", |s| {
                validate_name(NameKind::Group, s)
                    .map(|_| s.to_owned())
                    .map_err(|e| e.to_string())
            }),
            None => {
                c.problem(&p("group"), "missing: the consumer group to read as");
                None
            }
        };
        let consumer = match &rc.consumer {
            Some(n) => c.parse(&p("consumer"), n, "a consumer name", |s| {
                validate_name(NameKind::Consumer, s)
                    .map(|_| s.to_owned())
                    .map_err(|e| e.to_string())
            }),
            None => identity
                .map(|id| default_consumer(&id.identity.subject, daemon.instance.as_deref())),
        };
        let start = c.parse(&p("start"), &rc.start, "\"$\", \"0\" or an entry id", |s| {
            if s == "$" || is_entry_id(s) {
                Ok(s.to_owned())
            } else {
                Err("not an id".into())
            }
        });
        let batch_size = positive(c, &p("batch_size"), &rc.batch_size);
        let block = c.positive_duration(&p("block"), &rc.block);
        let claim_min_idle = c.positive_duration(&p("claim_min_idle"), &rc.claim_min_idle);
        let claim_interval = c.positive_duration(&p("claim_interval"), &rc.claim_interval);
        let max_deliveries = positive(c, &p("max_deliveries"), &rc.max_deliveries);
        let in_flight = positive(c, &p("in_flight"), &rc.in_flight);
        let handler_timeout = c.positive_duration(&p("handler_timeout"), &rc.handler_timeout);
        let order_by = rc.order_by.as_ref().and_then(|o| c.text(&p("order_by"), o));
        if let (Some(idle), Some(timeout)) = (claim_min_idle, handler_timeout)
            && idle <= timeout
        {
            c.problem(
                    &p("claim_min_idle"),
                    format!(
                        "{} is not longer than {} ({}): another consumer would claim messages still being handled",
                        fmt_d(idle),
                        p("handler_timeout"),
                        fmt_d(timeout)
                    ),
                );
        }
        if let Some(b) = block
            && b > Duration::from_secs(300)
        {
            c.problem(
                &p("block"),
                format!("{} is above the 5 min limit", fmt_d(b)),
            );
        }
        let dead_letter = match (&rc.dead_letter, &stream) {
            (Some(d), _) => c.parse(&p("dead_letter"), d, "a stream name", |s| {
                naming
                    .parse(s)
                    .map(|_| s.to_owned())
                    .map_err(|e| e.to_string())
            }),
            (None, Some(s)) => naming.parse(s).ok().map(|n| default_dead_letter(&n)),
            (None, None) => None,
        };
        if let (Some(d), Some(s)) = (&dead_letter, &stream)
            && d == s
        {
            c.problem(
                &p("dead_letter"),
                "the dead-letter stream must differ from the stream consumed",
            );
        }
        let handler = handler_spec(c, i, rc, naming, handlers);
        let unmatched = c.parse(
            &p("unmatched"),
            &rc.unmatched,
            "\"ack\" or \"dead-letter\"",
            |s| match s {
                "ack" => Ok(Unmatched::Ack),
                "dead-letter" => Ok(Unmatched::DeadLetter),
                _ => Err("unknown policy".into()),
            },
        );
        if let (Some(None), Some(s)) = (&handler, &stream)
            && !routes.iter().any(|r| r.stream.matches(s))
        {
            c.problem(
                &p("handler"),
                format!("missing, and no [[routes]] entry matches stream {s:?}: give a handler or add a route"),
            );
        }
        // A WASM handler's own deadline must fit in the consumer's.
        if let (Some(h), Some(s), Some(outer)) = (&handler, &stream, handler_timeout) {
            let reachable: Vec<String> = match h {
                Some(HandlerSpec::Wasm(name)) => vec![name.clone()],
                Some(_) => Vec::new(),
                None => routes
                    .iter()
                    .filter(|r| r.stream.matches(s))
                    .filter_map(|r| match &r.action {
                        Action::Handler(n) => Some(n.clone()),
                        _ => None,
                    })
                    .collect(),
            };
            let timeouts = handlers
                .iter()
                .filter(|w| reachable.contains(&w.name))
                .map(|w| (w.name.clone(), w.timeout));
            super::handlers::timeouts_fit(c, &p("handler_timeout"), outer, timeouts);
        }

        if let (Some(s), Some(g)) = (&stream, &group) {
            if let Some((_, _, j)) = seen.iter().find(|(ss, gg, _)| ss == s && gg == g) {
                c.problem(
                    &p("group"),
                    format!("stream {s:?} group {g:?} is already consumed by consumers[{j}]"),
                );
            }
            seen.push((s.clone(), g.clone(), i));
        }
        // Resolve everything before starting anything: the identity must be allowed every operation
        // this consumer will perform.
        if let (Some(id), Some(s)) = (identity, &stream) {
            for op in [
                Op::ReadGroup,
                Op::Ack,
                Op::Claim,
                Op::Pending,
                Op::CreateGroup,
            ] {
                if let Err(e) = crate::client::check(naming, &id.identity, op, s) {
                    c.problem(&p("stream"), e.to_string());
                    break;
                }
            }
            let writes = dead_letter
                .iter()
                .map(|d| (p("dead_letter"), d.as_str()))
                .chain(
                    handler
                        .iter()
                        .flatten()
                        .flat_map(|h| h.writes())
                        .map(|w| (p("handler"), w)),
                );
            for (path, w) in writes.collect::<Vec<_>>() {
                if let Err(e) = crate::client::check(naming, &id.identity, Op::Publish, w) {
                    c.problem(&path, e.to_string());
                }
            }
        }
        if let (
            Some(stream),
            Some(group),
            Some(consumer),
            Some(start),
            Some(batch_size),
            Some(block),
        ) = (stream, group, consumer, start, batch_size, block)
            && let (
                Some(claim_min_idle),
                Some(claim_interval),
                Some(max_deliveries),
                Some(dead_letter),
                Some(in_flight),
                Some(handler),
                Some(handler_timeout),
                Some(unmatched),
            ) = (
                claim_min_idle,
                claim_interval,
                max_deliveries,
                dead_letter,
                in_flight,
                handler,
                handler_timeout,
                unmatched,
            )
        {
            out.push(ConsumerSettings {
                stream: stream.into(),
                group,
                consumer,
                start,
                batch_size: batch_size as usize,
                block,
                claim_min_idle,
                claim_interval,
                max_deliveries,
                dead_letter,
                in_flight: in_flight as usize,
                order_by,
                handler,
                unmatched,
                handler_timeout,
            });
        }
    }
    out
}

fn positive(c: &mut Checker<'_>, path: &str, v: &Loose<u32>) -> Option<u32> {
    let n = c.get(path, v, "a positive integer")?;
    if n == 0 {
        c.problem(path, "expected a positive integer, found 0");
        return None;
    }
    Some(n)
}

fn is_entry_id(s: &str) -> bool {
    let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
    !ms.is_empty()
        && ms.bytes().all(|b| b.is_ascii_digit())
        && !seq.is_empty()
        && seq.bytes().all(|b| b.is_ascii_digit())
}

/// The consumer's handler: Some(None) when it routes with [[routes]], None after a problem.
fn handler_spec(
    c: &mut Checker<'_>,
    i: usize,
    rc: &RawConsumer,
    naming: &Naming,
    handlers: &[WasmSpec],
) -> Option<Option<HandlerSpec>> {
    let path = format!("consumers[{i}].handler");
    let fpath = format!("consumers[{i}].forward_to");
    let Some(name) = &rc.handler else {
        if rc.forward_to.is_some() {
            c.problem(&fpath, "forward_to needs handler = \"forward\"");
        }
        return Some(None);
    };
    let name = c.text(&path, name)?;
    let forward_to = rc.forward_to.as_ref().and_then(|f| {
        c.parse(&fpath, f, "a stream name", |s| {
            naming
                .parse(s)
                .map(|_| s.to_owned())
                .map_err(|e| e.to_string())
        })
    });
    if name != "forward" && rc.forward_to.is_some() {
        c.problem(
            &fpath,
            format!("only the forward handler takes forward_to, not {name:?}"),
        );
    }
    if name != "faults" && rc.faults.is_some() {
        c.problem(
            &format!("consumers[{i}].faults"),
            format!("only the faults handler takes faults options, not {name:?}"),
        );
    }
    let spec = match name.as_str() {
        "drop" => HandlerSpec::Drop,
        "forward" => match (forward_to, &rc.forward_to) {
            (Some(to), _) => HandlerSpec::Forward { to },
            (None, None) => {
                c.problem(&fpath, "missing: the stream the forward handler copies to");
                return None;
            }
            (None, Some(_)) => return None,
        },
        "faults" => faults_spec(c, i, rc, naming)?,
        other if handlers.iter().any(|h| h.name == other) => HandlerSpec::Wasm(other.to_owned()),
        other => {
            let mut known: Vec<String> = vec!["drop".into(), "forward".into()];
            known.extend(handlers.iter().map(|h| h.name.clone()));
            c.problem(
                &path,
                format!(
                    "unknown handler {other:?}: expected one of {}",
                    known.join(", ")
                ),
            );
            return None;
        }
    };
    Some(Some(spec))
}

#[cfg(feature = "fault-injection")]
fn faults_spec(
    c: &mut Checker<'_>,
    i: usize,
    rc: &RawConsumer,
    naming: &Naming,
) -> Option<HandlerSpec> {
    let f = rc.faults.clone().unwrap_or_default();
    let p = |k: &str| format!("consumers[{i}].faults.{k}");
    let reply_to = f.reply_to.as_ref().and_then(|r| {
        c.parse(&p("reply_to"), r, "a stream name", |s| {
            naming
                .parse(s)
                .map(|_| s.to_owned())
                .map_err(|e| e.to_string())
        })
    });
    let fail_field = f
        .fail_field
        .as_ref()
        .and_then(|x| c.text(&p("fail_field"), x));
    let fail_deliveries = f
        .fail_deliveries
        .as_ref()
        .and_then(|x| c.get(&p("fail_deliveries"), x, "an integer"))
        .unwrap_or(0);
    let fail_every = f
        .fail_every
        .as_ref()
        .and_then(|x| c.get(&p("fail_every"), x, "an integer"))
        .unwrap_or(0);
    let sleep = f
        .sleep
        .as_ref()
        .and_then(|x| c.duration(&p("sleep"), x))
        .unwrap_or_default();
    Some(HandlerSpec::Faults(crate::engine::FaultSpec {
        reply_to,
        fail_field,
        fail_deliveries: u64::from(fail_deliveries),
        fail_every: u64::from(fail_every),
        sleep,
    }))
}

#[cfg(not(feature = "fault-injection"))]
fn faults_spec(
    c: &mut Checker<'_>,
    i: usize,
    _rc: &RawConsumer,
    _naming: &Naming,
) -> Option<HandlerSpec> {
    c.problem(
        &format!("consumers[{i}].handler"),
        "the faults test handler exists only in builds with the fault-injection feature",
    );
    None
}

/// A stream name for `path`, and (when the daemon will run) a check that its identity may `ops` on it.
fn system_stream(
    c: &mut Checker<'_>,
    path: &str,
    v: &Loose<String>,
    naming: &Naming,
    identity: Option<&DaemonIdentity>,
    ops: &[Op],
    disable_hint: &str,
) -> Option<String> {
    let stream = c.parse(path, v, "a stream name", |s| {
        naming
            .parse(s)
            .map(|_| s.to_owned())
            .map_err(|e| e.to_string())
    })?;
    if let Some(id) = identity {
        for op in ops {
            if let Err(e) = crate::client::check(naming, &id.identity, *op, &stream) {
                c.problem(path, format!("{e} ({disable_hint})"));
                break;
            }
        }
    }
    Some(stream)
}

fn heartbeat_settings(
    raw: &RawConfig,
    c: &mut Checker<'_>,
    naming: &Naming,
    identity: Option<&DaemonIdentity>,
) -> Option<Option<super::HeartbeatSettings>> {
    let h = &raw.heartbeat;
    let enabled = c.get("heartbeat.enabled", &h.enabled, "true or false")?;
    let interval = c.positive_duration("heartbeat.interval", &h.interval);
    let max_len = c.get("heartbeat.max_len", &h.max_len, "a positive integer");
    if !enabled {
        return Some(None);
    }
    let stream = system_stream(
        c,
        "heartbeat.stream",
        &h.stream,
        naming,
        identity,
        &[Op::Publish],
        "or set heartbeat.enabled = false",
    );
    Some(Some(super::HeartbeatSettings {
        stream: stream?,
        interval: interval?,
        max_len: u64::from(max_len?.max(1)),
    }))
}

fn control_settings(
    raw: &RawConfig,
    c: &mut Checker<'_>,
    naming: &Naming,
    identity: Option<&DaemonIdentity>,
) -> Option<Option<super::ControlSettings>> {
    let k = &raw.control;
    if !c.get("control.enabled", &k.enabled, "true or false")? {
        return Some(None);
    }
    let hint = "or set control.enabled = false";
    let reads = [
        Op::CreateGroup,
        Op::ReadGroup,
        Op::Ack,
        Op::Claim,
        Op::Pending,
    ];
    let stream = system_stream(
        c,
        "control.stream",
        &k.stream,
        naming,
        identity,
        &reads,
        hint,
    );
    let dead_letter = system_stream(
        c,
        "control.dead_letter",
        &k.dead_letter,
        naming,
        identity,
        &[Op::Publish],
        hint,
    );
    if raw.heartbeat.enabled.value.as_ref().is_ok_and(|e| !e) {
        // Status replies go to the heartbeat stream: it must be writable even if beats are off.
        system_stream(
            c,
            "heartbeat.stream",
            &raw.heartbeat.stream,
            naming,
            identity,
            &[Op::Publish],
            hint,
        );
    }
    let reply_to = raw.heartbeat.stream.value.clone().ok()?;
    Some(Some(super::ControlSettings {
        stream: stream?,
        dead_letter: dead_letter?,
        reply_to,
    }))
}

fn retention(
    raw: &RawConfig,
    c: &mut Checker<'_>,
    naming: &Naming,
    identity: Option<&DaemonIdentity>,
) -> Vec<crate::engine::janitor::Retention> {
    let mut out = Vec::new();
    for (i, r) in raw.retention.streams.iter().enumerate() {
        let p = |k: &str| format!("retention.streams[{i}].{k}");
        let stream = match &r.stream {
            Some(s) => system_stream(
                c,
                &p("stream"),
                s,
                naming,
                identity,
                &[Op::Delete, Op::Info, Op::Pending],
                "the janitor trims it",
            ),
            None => {
                c.problem(&p("stream"), "missing: the stream to trim");
                None
            }
        };
        let max_len = r
            .max_len
            .as_ref()
            .and_then(|m| c.get(&p("max_len"), m, "a positive integer"));
        if max_len == Some(0) {
            c.problem(&p("max_len"), "expected a positive integer, found 0");
        }
        let max_age = r
            .max_age
            .as_ref()
            .and_then(|a| c.positive_duration(&p("max_age"), a));
        if r.max_len.is_none() && r.max_age.is_none() {
            c.problem(
                &format!("retention.streams[{i}]"),
                "give max_len, max_age or both",
            );
        }
        if let Some(stream) = stream {
            out.push(crate::engine::janitor::Retention {
                stream,
                max_len: max_len.filter(|n| *n > 0),
                max_age,
            });
        }
    }
    out
}
