//! Configuration: where it is read from, and the validated [`Settings`] the rest of RedStream runs on.
//!
//! Layers, later wins: built-in defaults ([`raw`]) → TOML file (`--config PATH`, else `$REDSTREAM_CONFIG`,
//! else `/etc/redstream/redstream.toml`) → `REDSTREAM_*` environment variables, `__` separating nesting
//! levels (`REDSTREAM_REDIS__COMMAND_TIMEOUT=5s`). Deserialized, then built ([`validate`]): the runtime
//! never sees raw config, and a broken config yields one [`ConfigError`] listing every problem with its
//! key path — which the CLI turns into exit code 78.

mod handlers;
pub mod raw;
mod secret;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::{Figment, Metadata, Source};

use crate::auth::Identity;
use crate::auth::apikey::ApiKeys;
use crate::auth::jwt::KeySet;
use crate::conn::RedisSettings;
use crate::engine::router::RouteSpec;
use crate::engine::{ConsumerSettings, DaemonSettings};
use crate::naming::Naming;
use crate::wasm::{RuntimeSettings, WasmSpec};

pub use handlers::parse_size;
pub use validate::{default_consumer, default_name};

/// Where the config file is looked for when neither `--config` nor `$REDSTREAM_CONFIG` names one.
pub const DEFAULT_PATH: &str = "/etc/redstream/redstream.toml";

/// Environment variables read by the CLI itself, not config keys.
const NOT_CONFIG_KEYS: [&str; 3] = ["config", "token", "api_key"];

/// Everything RedStream runs on, validated.
#[derive(Debug)]
pub struct Settings {
    /// The daemon's own identity; None when the config gives none (then only `check` and token
    /// commands that bring their own credentials can work).
    pub identity: Option<DaemonIdentity>,
    pub naming: Arc<Naming>,
    pub redis: RedisSettings,
    /// How long `run` and the CLI wait for Redis at start before giving up with exit code 69.
    pub startup_wait: Duration,
    pub auth: AuthSettings,
    /// Level and destinations of the daemon's log.
    pub log: crate::logging::LogSettings,
    /// The config file that was read, if any.
    pub file: Option<PathBuf>,
    pub daemon: DaemonSettings,
    /// The groups `redstream run` consumes.
    pub consumers: Vec<ConsumerSettings>,
    pub wasm: RuntimeSettings,
    /// Where Prometheus metrics are served (a loopback address), if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How often pending, lag and stream lengths are polled for metrics and the status line.
    pub metrics_poll: Duration,
    /// The periodic heartbeat entry, if enabled.
    pub heartbeat: Option<HeartbeatSettings>,
    /// The control stream this daemon obeys, if enabled.
    pub control: Option<ControlSettings>,
    /// How often the retention janitor runs, and what it trims.
    pub retention_interval: Duration,
    pub retention: Vec<crate::engine::janitor::Retention>,
    pub handlers: Vec<WasmSpec>,
    pub routes: Vec<RouteSpec>,
}

/// The daemon's verified identity and the token proving it.
#[derive(Clone, Debug)]
pub struct DaemonIdentity {
    pub identity: Identity,
    pub token: String,
    /// Seconds since the epoch.
    pub expires_at: u64,
}

/// `[heartbeat]`: an entry every `interval` on `stream`, trimmed to about `max_len`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatSettings {
    pub stream: String,
    pub interval: Duration,
    pub max_len: u64,
}

/// `[control]`: signed commands on `stream`, read by a group of this instance's own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlSettings {
    pub stream: String,
    pub dead_letter: String,
    /// Where status replies go: the heartbeat stream.
    pub reply_to: String,
}

/// Token keys and the API keys that may obtain tokens.
#[derive(Debug)]
pub struct AuthSettings {
    pub keys: Arc<KeySet>,
    pub api_keys: ApiKeys,
    /// Lifetime of issued tokens when the caller names none.
    pub token_ttl: Duration,
    /// The longest lifetime `token issue` grants.
    pub max_token_ttl: Duration,
}

/// One thing wrong with the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Key path such as `auth.keys[1].algorithm`.
    pub path: String,
    pub message: String,
    /// Where the value came from, when known: the file, or the environment variable.
    pub origin: Option<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)?;
        if let Some(o) = &self.origin {
            write!(f, " (from {o})")?;
        }
        Ok(())
    }
}

/// The config could not be used. Lists every problem found.
#[derive(Clone, Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(p) => write!(f, "invalid configuration ({}):", p.display())?,
            None => write!(f, "invalid configuration:")?,
        }
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    fn one(file: Option<PathBuf>, path: &str, message: String) -> Self {
        ConfigError {
            file,
            problems: vec![Problem {
                path: path.into(),
                message,
                origin: None,
            }],
        }
    }
}

/// Which file to read: `--config`, else `$REDSTREAM_CONFIG`, else [`DEFAULT_PATH`] if it exists.
/// A file named explicitly must exist.
pub fn locate(explicit: Option<&Path>) -> Result<Option<PathBuf>, ConfigError> {
    let named = explicit.map(|p| (p.to_path_buf(), "--config")).or_else(|| {
        std::env::var_os("REDSTREAM_CONFIG").map(|p| (PathBuf::from(p), "REDSTREAM_CONFIG"))
    });
    match named {
        Some((path, _)) if path.is_file() => Ok(Some(path)),
        Some((path, how)) => Err(ConfigError::one(
            Some(path.clone()),
            "(config file)",
            format!(
                "{} (named by {how}) does not exist or is not a file",
                path.display()
            ),
        )),
        None if Path::new(DEFAULT_PATH).is_file() => Ok(Some(PathBuf::from(DEFAULT_PATH))),
        None => Ok(None),
    }
}

/// Reads and validates the config, as described at the top of this module.
pub fn load(explicit: Option<&Path>) -> Result<Settings, ConfigError> {
    let file = locate(explicit)?;
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    let mut figment = Figment::new();
    if let Some(path) = &file {
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = figment.merge(
        Env::prefixed("REDSTREAM_")
            .split("__")
            .ignore(&NOT_CONFIG_KEYS),
    );
    from_figment(&figment, file, credentials.as_deref())
}

/// Validates the config held by `figment`. `file` is the config file it read (relative secret paths
/// resolve against its directory); `credentials_dir` stands for `$CREDENTIALS_DIRECTORY`.
pub fn from_figment(
    figment: &Figment,
    file: Option<PathBuf>,
    credentials_dir: Option<&Path>,
) -> Result<Settings, ConfigError> {
    let raw: raw::RawConfig = figment.extract().map_err(|e| ConfigError {
        file: file.clone(),
        problems: e.into_iter().map(|e| figment_problem(&e)).collect(),
    })?;
    let base_dir = file
        .as_deref()
        .and_then(Path::parent)
        .map(Path::to_path_buf);
    let mut checker = validate::Checker::new(figment, base_dir.as_deref(), credentials_dir);
    let built = validate::settings(&raw, &mut checker);
    let problems = std::mem::take(&mut checker.problems);
    match built {
        Some(mut settings) if problems.is_empty() => {
            settings.file = file;
            Ok(settings)
        }
        _ => Err(ConfigError { file, problems }),
    }
}

/// A structural error from figment (unknown key, a table where a value belongs…) as a problem.
fn figment_problem(e: &figment::Error) -> Problem {
    let path = key_path(&e.path);
    let message = match &e.kind {
        figment::error::Kind::UnknownField(field, expected) => {
            format!(
                "unknown key {field:?}; expected one of {}",
                expected.join(", ")
            )
        }
        kind => kind.to_string(),
    };
    Problem {
        origin: e.metadata.as_ref().map(|m| origin_of(m, &path)),
        path: if path.is_empty() {
            "(top level)".into()
        } else {
            path
        },
        message,
    }
}

/// `["auth", "keys", "1", "id"]` → `auth.keys[1].id`.
fn key_path(segments: &[String]) -> String {
    let mut out = String::new();
    for s in segments {
        if s.bytes().all(|b| b.is_ascii_digit()) && !s.is_empty() {
            out.push_str(&format!("[{s}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(s);
        }
    }
    out
}

/// "config/redstream.toml" or "environment variable REDSTREAM_REDIS__URL".
pub(crate) fn origin_of(meta: &Metadata, path: &str) -> String {
    match &meta.source {
        Some(Source::File(p)) => p.display().to_string(),
        _ if meta.name.contains("environment") => {
            let var: String = path
                .split('.')
                .map(|s| s.to_ascii_uppercase())
                .collect::<Vec<_>>()
                .join("__");
            format!("environment variable REDSTREAM_{var}")
        }
        _ => meta.name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths_show_indices() {
        let segs: Vec<String> = ["auth", "keys", "1", "id"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(key_path(&segs), "auth.keys[1].id");
    }
}
