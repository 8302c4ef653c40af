//! Helpers shared by the integration tests: a private redis-server, settings built through the real
//! config path, clients acting as a given identity, and polling with deadlines instead of sleeps.

pub mod cluster;
pub mod daemon;
pub mod http_server;
pub mod redis_server;

use std::path::PathBuf;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Toml};
use redstream::auth::Roles;
use redstream::client::Client;
use redstream::config::{self, Settings};

pub use daemon::Daemon;
pub use redis_server::RedisServer;

/// A Redis URL where nothing listens: port 1 (tcpmux) is privileged and unused. (A port freed by a
/// stopped test server could be taken by another test's server meanwhile.)
pub const UNREACHABLE: &str = "redis://127.0.0.1:1/0";

/// The HS256 secret of the test configs (32+ bytes).
pub const TEST_SECRET: &str = "test-secret-that-is-long-enough-for-hs256";

/// A config for tests: an HS256 signing key and an admin daemon identity, pointed at `url`,
/// followed by `extra` TOML (which may add tables or keys).
pub fn config_toml(url: &str, extra: &str) -> String {
    format!(
        r#"
[identity]
name = "test-daemon"
roles = ["admin"]

[redis]
url = "{url}"
command_timeout = "2s"
connect_timeout = "2s"

[auth]
signing_key = "k1"

[[auth.keys]]
id = "k1"
algorithm = "HS256"
secret = "{TEST_SECRET}"
{extra}
"#
    )
}

/// Settings from TOML text, through the same validation as a config file.
pub fn settings_from(toml: &str) -> Result<Settings, config::ConfigError> {
    config::from_figment(&Figment::from(Toml::string(toml)), None, None)
}

pub fn settings(url: &str) -> Settings {
    settings_from(&config_toml(url, "")).expect("test config is valid")
}

/// A client acting as `subject` with `roles`, proven the real way: a token issued and verified.
pub fn client_as(server: &RedisServer, subject: &str, roles: &[&str]) -> Client {
    let settings = settings(&server.url());
    let roles = Roles::parse(roles).expect("valid roles");
    let (token, _) = settings
        .auth
        .keys
        .issue(subject, &roles, Duration::from_secs(60))
        .expect("issue");
    let verified = settings.auth.keys.verify(&token).expect("verify");
    Client::connect(
        settings.redis.clone(),
        settings.naming.clone(),
        verified.identity,
    )
    .expect("valid connection settings")
}

pub fn admin(server: &RedisServer) -> Client {
    client_as(server, "test-admin", &["admin"])
}

/// The `redstream` binary built for these tests.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_redstream"))
}

/// `redstream ARGS…` with no `REDSTREAM_CONFIG` of the caller's: exit code, stdout, stderr.
pub fn redstream(args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(bin())
        .args(args)
        .env_remove("REDSTREAM_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A test fixture file's path.
pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

/// `toml` with a `[metrics]` endpoint on a free loopback port, and the port.
pub fn with_metrics(toml: &str) -> (String, u16) {
    assert!(!toml.contains("[metrics]"), "{toml}");
    let port = redis_server::free_port();
    (
        format!("{toml}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
        port,
    )
}

/// For a test marked `#[ignore = "needs root"]` (scripts/test runs those when it runs as root, as
/// CI does): fails, naming what needs root, when run by anyone else.
pub fn assert_root(what: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "{what} needs root: run this test as root (scripts/test does, as root)"
    );
}

/// Polls `check` every 20 ms until it returns Some, or panics with `what` after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A daemon config: the test identity (admin) against `url`, plus consumer entries in `consumers`.
pub fn daemon_toml(url: &str, consumers: &str) -> String {
    config_toml(
        url,
        &format!("[daemon]\ndrain_timeout = \"10s\"\n{consumers}"),
    )
}
