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

use super::raw::{Loose, RawConfig, RawSecret};
use super::{AuthSettings, DaemonIdentity, Problem, Settings, origin_of, secret};
use crate::auth::apikey::{ApiKey, ApiKeys};
use crate::auth::jwt::{Key, KeyAlgorithm, KeySet};
use crate::auth::{Identity, Role, Roles};
use crate::conn::{RedisSettings, TlsFiles};
use crate::naming::Naming;

/// Collects problems while reading values out of the raw config.
pub(super) struct Checker<'a> {
    figment: &'a Figment,
    /// Directory that relative secret file paths are resolved against.
    base_dir: Option<&'a Path>,
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

    if !c.problems.is_empty() {
        return None;
    }
    Some(Settings {
        identity: identity?,
        naming: Arc::new(naming),
        redis: redis?,
        startup_wait: startup_wait?,
        auth: auth?,
        log_level: log_level?,
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
        keys,
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
