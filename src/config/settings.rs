//! The validated configuration: [`Settings`] and the daemon-level parts config owns.
//!
//! Owns the types that only the daemon and the CLI run on (identity, heartbeat, control, retention,
//! drain). Types of the layers below — [`crate::client::RedisSettings`], [`crate::engine::ConsumerSettings`],
//! [`crate::engine::router::RouteSpec`], [`crate::handlers::wasm::RuntimeSettings`] — belong to those
//! layers; config builds them all, and the runtime never sees raw config.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::Identity;
use crate::auth::apikey::ApiKeys;
use crate::auth::jwt::KeySet;
use crate::client::RedisSettings;
use crate::engine::ConsumerSettings;
use crate::engine::router::RouteSpec;
use crate::handlers::wasm::{RuntimeSettings, WasmSpec};
use crate::model::naming::Naming;

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
    pub retention: Vec<Retention>,
    pub handlers: Vec<WasmSpec>,
    /// The breakers and rate limits of `[[handlers]]` entries, by handler name.
    pub guards: Vec<(String, crate::engine::guard::GuardSpec)>,
    /// Named faults handlers (`[[handlers]]` entries with `faults = {…}`; test builds only).
    #[cfg(feature = "fault-injection")]
    pub faults: Vec<(String, crate::engine::FaultSpec)>,
    pub routes: Vec<RouteSpec>,
    /// The drop-in files merged after `file` (`<name>.d/*.toml` beside it), in the order read.
    pub dropins: Vec<PathBuf>,
    /// `wasm.watch`: reload when a handler file, the config file or a drop-in changes.
    pub watch: bool,
    /// What `check` warns about: allowed, but almost certainly not meant.
    pub warnings: Vec<super::checker::Problem>,
}

/// The daemon's verified identity and the token proving it.
#[derive(Clone, Debug)]
pub struct DaemonIdentity {
    pub identity: Identity,
    pub token: String,
    /// Seconds since the epoch.
    pub expires_at: u64,
    /// Self-issued from `identity.roles` with the signing key, so the daemon renews it itself; a
    /// configured `identity.token` is the operator's to rotate.
    pub renewable: bool,
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
#[derive(Clone, Debug)]
pub struct AuthSettings {
    pub keys: Arc<KeySet>,
    pub api_keys: ApiKeys,
    /// Lifetime of issued tokens when the caller names none.
    pub token_ttl: Duration,
    /// The longest lifetime `token issue` grants.
    pub max_token_ttl: Duration,
    /// The credential exchange's unix socket (`auth.endpoint`): served by a daemon that holds the
    /// signing key, used by the CLI on a host that does not.
    pub endpoint: Option<PathBuf>,
}

/// Daemon-wide settings.
#[derive(Clone, Debug)]
pub struct DaemonSettings {
    /// Distinguishes several daemons on one host in default consumer names.
    pub instance: Option<String>,
    /// How long a stop may take to finish and commit messages in flight.
    pub drain_timeout: Duration,
}

/// One stream's retention rules (`[[retention.streams]]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    pub stream: String,
    pub max_len: Option<u64>,
    pub max_age: Option<Duration>,
}
