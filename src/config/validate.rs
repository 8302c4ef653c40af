//! Raw config → [`Settings`]: every value parsed, every secret read, every key built, every problem
//! collected with its key path and origin, so one run of `redstream check` shows them all.
//!
//! Owns the top level — naming, redis, auth, identity, log, daemon, metrics — and the order sections are
//! read in; `[[consumers]]`, `[[handlers]]`/`[[routes]]` and the system streams have files of their own.
//! The raw shapes are [`super::raw`].

use std::sync::Arc;
use std::time::Duration;

use super::checker::{Checker, fmt_d};
use super::consumers::consumers;
use super::raw::RawConfig;
use super::settings::{AuthSettings, DaemonIdentity, DaemonSettings, Settings};
use super::system::{control_settings, heartbeat_settings, retention};
use crate::auth::apikey::{ApiKey, ApiKeys};
use crate::auth::jwt::{Key, KeyAlgorithm, KeySet};
use crate::auth::{Identity, Roles};
use crate::client::{RedisSettings, TlsFiles};
use crate::logging::LogSettings;
use crate::model::naming::{NameKind, Naming, validate_name};

/// On a Redis Cluster a handler's state is committed by the commit script of every stream routed to
/// it, which touches only keys of that stream's slot: its namespace must be in each such slot.
fn state_in_source_slots(
    c: &mut Checker<'_>,
    handlers: &[crate::handlers::wasm::WasmSpec],
    consumers: &[crate::engine::ConsumerSettings],
) {
    use crate::client::slot;
    use crate::engine::HandlerSpec;
    use crate::engine::router::Action;
    for (i, h) in handlers.iter().enumerate() {
        let Some(ns) = &h.state else { continue };
        for (k, cfg) in consumers.iter().enumerate() {
            let routed = matches!(&cfg.handler, Some(HandlerSpec::Wasm(n)) if *n == h.name)
                || cfg
                    .routes
                    .iter()
                    .any(|r| matches!(&r.action, Action::Handler(n) if *n == h.name));
            if routed && slot::of(ns) != slot::of(&cfg.stream) {
                c.problem(
                    &format!("handlers[{i}].state"),
                    format!(
                        "on a Redis Cluster a handler's state must be in the hash slot of every stream \
                         routed to it: {ns} is in slot {}, consumers[{k}].stream {} in slot {}; give both \
                         the same hash tag (e.g. nova:memory:{{tasks}}:router and nova:task:{{tasks}}:in)",
                        slot::of(ns),
                        cfg.stream,
                        slot::of(&cfg.stream)
                    ),
                );
            }
        }
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
    let limits = super::limits::limits(raw, c);
    let (entry_limit, reply_limit) = limits.unwrap_or_default();
    let handlers = super::handlers::handlers(raw, c, &naming, id_ref, c.base_dir);
    let faults = super::handlers::faults_handlers(raw, c, &naming);
    let guards = super::handlers::guards(raw, c);
    #[cfg(not(feature = "fault-injection"))]
    let _ = faults;
    let wasm = super::handlers::wasm_settings(raw, c, &handlers, reply_limit);
    let routes =
        super::handlers::routes(&raw.routes, "routes", None, c, &naming, id_ref, &handlers);
    let watch = c.get("wasm.watch", &raw.wasm.watch, "true or false");
    let consumers = match (&identity, &daemon) {
        (Some(id), Some(d)) => {
            let ctx = super::consumers::Context {
                naming: &naming,
                identity: id.as_ref(),
                daemon: d,
                handlers: &handlers,
                routes: &routes,
                entry_limit,
            };
            consumers(raw, c, &ctx)
        }
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
    let own_routes: Vec<bool> = raw.consumers.iter().map(|r| !r.routes.is_empty()).collect();
    // Warnings name merged indexes: say which file each table came from.
    for (i, rc) in raw.consumers.iter().enumerate() {
        if let Some(s) = &rc.stream {
            c.note_element(format!("consumers[{i}]"), s.tag);
        }
    }
    for (i, h) in raw.handlers.iter().enumerate() {
        if let Some(n) = &h.name {
            c.note_element(format!("handlers[{i}]"), n.tag);
        }
    }
    for (i, r) in raw.routes.iter().enumerate() {
        if let Some(s) = &r.stream {
            c.note_element(format!("routes[{i}]"), s.tag);
        }
    }
    super::lint::lint(c, &naming, &handlers, &routes, &consumers, &own_routes);
    if !raw.redis.cluster.is_empty() {
        state_in_source_slots(c, &handlers, &consumers);
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
        guards,
        #[cfg(feature = "fault-injection")]
        faults,
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
        dropins: Vec::new(),
        watch: watch?,
        warnings: Vec::new(),
    })
}

fn redis_settings(raw: &RawConfig, c: &mut Checker<'_>) -> Option<RedisSettings> {
    let r = &raw.redis;
    let url = c.parse_shown(
        "redis.url",
        &r.url,
        "a redis:// or rediss:// URL",
        crate::client::redact_url,
        |s| {
            if !(s.starts_with("redis://")
                || s.starts_with("rediss://")
                || s.starts_with("unix://"))
            {
                Err("the scheme must be redis://, rediss:// (TLS) or unix://".into())
            } else if redis::IntoConnectionInfo::into_connection_info(s).is_err() {
                Err("not a URL redis can connect to".into())
            } else {
                Ok(s.to_owned())
            }
        },
    );
    let mut cluster = Vec::new();
    for (i, seed) in r.cluster.iter().enumerate() {
        let key = format!("redis.cluster[{i}]");
        cluster.push(c.parse_shown(
            &key,
            seed,
            "a redis:// or rediss:// URL of a cluster node",
            crate::client::redact_url,
            |s| {
                if !(s.starts_with("redis://") || s.starts_with("rediss://")) {
                    Err("the scheme must be redis:// or rediss:// (TLS)".into())
                } else if redis::IntoConnectionInfo::into_connection_info(s).is_err() {
                    Err("not a URL redis can connect to".into())
                } else if url::Url::parse(s).is_ok_and(|u| !matches!(u.path(), "" | "/" | "/0")) {
                    Err("a cluster has one database, 0: leave the path out".into())
                } else {
                    Ok(s.to_owned())
                }
            },
        ));
    }
    let tls_seeds = cluster
        .iter()
        .flatten()
        .filter(|s| s.starts_with("rediss://"))
        .count();
    if tls_seeds != 0 && tls_seeds != cluster.len() {
        c.problem(
            "redis.cluster",
            "every seed uses TLS (rediss://) or none does",
        );
    }
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
        cluster: cluster.into_iter().collect::<Option<Vec<_>>>()?,
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
    let signature_ttl = c.positive_duration("auth.signature_ttl", &a.signature_ttl);
    if let Some(t) = signature_ttl
        && t > Duration::from_secs(3600)
    {
        c.problem(
            "auth.signature_ttl",
            format!(
                "{} is more than 1h: a signature is for one message, sent now",
                fmt_d(t)
            ),
        );
    }
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
        Ok(k) => k
            .with_max_ttl(max_token_ttl.unwrap_or(Duration::from_secs(24 * 3600)))
            .with_signature_ttl(signature_ttl.unwrap_or(Duration::from_secs(300))),
        Err(msg) => {
            c.problem("auth.signing_key", msg);
            return None;
        }
    };
    let endpoint = a.endpoint.as_ref().and_then(|e| {
        c.parse("auth.endpoint", e, "an absolute socket path", |s| {
            let p = std::path::PathBuf::from(s);
            if p.is_absolute() {
                Ok(p)
            } else {
                Err("relative: give the full path of the socket".into())
            }
        })
    });
    Some(AuthSettings {
        endpoint,
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
                        renewable: false,
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
                    renewable: true,
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
