//! Connections to Redis: addressing, TLS, ACL credentials, timeouts and reconnection.
//!
//! Owns how a command reaches Redis and how its failure is classified into [`Error`]. Two kinds of
//! connection exist (docs/design.md, "Connections"): one shared multiplexed connection for short commands (publish,
//! ack, claim, info…), and one *dedicated* connection per blocking reader, whose response timeout is its
//! longest BLOCK plus the command timeout — the crate's default of 500 ms would cut a `BLOCK 5000` read,
//! and a blocking read on the shared connection would stall every other command. Both reconnect on their
//! own with capped exponential backoff (the crate's `ConnectionManager`); a command that meets a broken
//! connection fails once with a transient error and the next one uses the new connection. Without TLS a
//! group reader talks over [`super::wire`] instead (same target, login and timeouts, errors classified
//! here), and its loop's backoff paces reconnects. What a command means is [`super::authorized`]'s business.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, IntoConnectionInfo, Pipeline, RedisError, Value};

use super::error::{Error, Result};
use super::wire;

/// Certificates for `rediss://`, PEM bytes. Without a CA the system trust store is used.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: Option<Vec<u8>>,
    pub client_cert: Option<Vec<u8>>,
    pub client_key: Option<Vec<u8>>,
}

/// Where Redis is and how patiently to talk to it.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// `redis://[user[:pass]@]host:port/db` or `rediss://…` for TLS. Unused when `cluster` is set.
    pub url: String,
    /// Seed nodes of a Redis Cluster (`redis://host:port`, `rediss://…`); empty for one node.
    pub cluster: Vec<String>,
    /// ACL user; overrides one in the URL.
    pub username: Option<String>,
    /// Password of the ACL user (or `requirepass`); overrides one in the URL.
    pub password: Option<String>,
    pub tls: TlsFiles,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub reconnect_min_delay: Duration,
    pub reconnect_max_delay: Duration,
    /// How many connection attempts one reconnect makes before the next command starts another.
    pub reconnect_attempts: usize,
}

impl RedisSettings {
    /// The `redis.*` keys whose values differ in `other`: what a reload cannot apply to a running
    /// daemon (its connections were made with these), named for "restart needed".
    pub fn differing_keys(&self, other: &RedisSettings) -> Vec<&'static str> {
        let RedisSettings {
            url,
            cluster,
            username,
            password,
            tls,
            connect_timeout,
            command_timeout,
            reconnect_min_delay,
            reconnect_max_delay,
            reconnect_attempts,
        } = self;
        let pairs = [
            ("redis.url", url != &other.url),
            ("redis.cluster", cluster != &other.cluster),
            ("redis.username", username != &other.username),
            ("redis.password", password != &other.password),
            ("redis.tls", tls != &other.tls),
            (
                "redis.connect_timeout",
                connect_timeout != &other.connect_timeout,
            ),
            (
                "redis.command_timeout",
                command_timeout != &other.command_timeout,
            ),
            (
                "redis.reconnect_min_delay",
                reconnect_min_delay != &other.reconnect_min_delay,
            ),
            (
                "redis.reconnect_max_delay",
                reconnect_max_delay != &other.reconnect_max_delay,
            ),
            (
                "redis.reconnect_attempts",
                reconnect_attempts != &other.reconnect_attempts,
            ),
        ];
        pairs
            .into_iter()
            .filter(|(_, d)| *d)
            .map(|(k, _)| k)
            .collect()
    }
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &redact_url(&self.url))
            .field(
                "cluster",
                &self
                    .cluster
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .finish_non_exhaustive()
    }
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            url: "redis://127.0.0.1:6379/0".into(),
            cluster: Vec::new(),
            username: None,
            password: None,
            tls: TlsFiles::default(),
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(2),
            reconnect_min_delay: Duration::from_millis(100),
            reconnect_max_delay: Duration::from_secs(5),
            reconnect_attempts: 3,
        }
    }
}

/// The URL with every credential replaced, for logs and errors: the password of the userinfo, and
/// query parameters that carry one (`pass`, `password`, …, as `unix://` URLs may). A URL that does not
/// parse is shown by its scheme alone: where its secret would be cannot be told.
pub fn redact_url(raw: &str) -> String {
    const HIDDEN: &str = "***";
    let secret = |k: &str| {
        matches!(
            k.to_ascii_lowercase().as_str(),
            "pass" | "password" | "passwd" | "pwd" | "secret" | "token" | "auth"
        )
    };
    // Only the schemes redis connects with are shown at all: anything else (`app:s3cret@host` parses
    // as scheme `app`) may carry its secret anywhere.
    let known = |u: &url::Url| {
        matches!(
            u.scheme(),
            "redis" | "rediss" | "unix" | "redis+unix" | "valkey" | "valkeys"
        )
    };
    let Some(mut u) = url::Url::parse(raw).ok().filter(known) else {
        let scheme = raw.split_once("://").map(|(s, _)| s).filter(|s| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        });
        return match scheme {
            Some(s) => format!("{s}://… (not a valid URL; the rest is not shown)"),
            None => "(not a valid URL; not shown)".into(),
        };
    };
    if u.password().is_some() {
        let _ = u.set_password(Some(HIDDEN));
    }
    if u.query_pairs().any(|(k, _)| secret(&k)) {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if secret(&k) {
                    HIDDEN.into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

/// What a failed command was doing, for its error.
#[derive(Clone, Copy, Debug)]
pub struct Ctx<'a> {
    pub command: &'static str,
    pub key: &'a str,
    /// The group, for NOGROUP errors.
    pub group: Option<&'a str>,
}

impl<'a> Ctx<'a> {
    pub fn new(command: &'static str, key: &'a str) -> Self {
        Ctx {
            command,
            key,
            group: None,
        }
    }

    pub fn group(mut self, group: &'a str) -> Self {
        self.group = Some(group);
        self
    }
}

/// What connections are made from: one node's client, or a cluster's.
enum Backend {
    Single(redis::Client),
    Cluster {
        client: Box<redis::cluster::ClusterClient>,
        /// The login a plain [`wire`] connection to one of its nodes uses.
        login: (Option<String>, Option<String>),
        tls: bool,
    },
}

struct Shared {
    backend: Backend,
    settings: RedisSettings,
    /// host:port (the first seed of a cluster), for errors.
    addr: String,
    /// The ACL user, for errors.
    user: String,
    /// What CLUSTER SLOTS said last (a cluster's readers ask it).
    slot_map: Arc<super::slot::SlotMap>,
}

/// Opens a connection with `settings` and PINGs until Redis answers or `wait` has passed — for
/// `check`, which may have no identity to build a [`super::Client`] with.
pub async fn wait_ready(settings: RedisSettings, wait: Duration) -> Result<()> {
    Redis::open(settings)?.wait_ready(wait).await
}

/// One node's reconnecting connection, or a cluster connection that routes each command to the
/// master owning its key's slot and follows MOVED/ASK itself.
#[derive(Clone)]
enum Link {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A reconnecting connection. Cloning shares the connection; [`Redis::dedicated`] makes a new one.
#[derive(Clone)]
pub struct Redis {
    shared: Arc<Shared>,
    link: Link,
    response_timeout: Duration,
}

/// A URL with the configured login applied.
fn node_info(
    url: &str,
    settings: &RedisSettings,
) -> std::result::Result<redis::ConnectionInfo, String> {
    let info = url
        .into_connection_info()
        .map_err(|e| format!("invalid redis URL {:?}: {e}", redact_url(url)))?;
    let mut redis_info = info.redis_settings().clone();
    if let Some(user) = &settings.username {
        redis_info = redis_info.set_username(user);
    }
    if let Some(password) = &settings.password {
        redis_info = redis_info.set_password(password);
    }
    Ok(info.set_redis_settings(redis_info))
}

impl Redis {
    /// Builds the client and a lazily connecting shared connection. Fails only on a malformed URL or
    /// TLS material; reachability is [`Redis::ping`]'s question.
    pub fn open(settings: RedisSettings) -> Result<Redis> {
        Self::build(settings).map_err(Error::InvalidConnection)
    }

    fn build(settings: RedisSettings) -> std::result::Result<Redis, String> {
        let tls = &settings.tls;
        let client_tls = match (&tls.client_cert, &tls.client_key) {
            (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                client_cert: cert.clone(),
                client_key: key.clone(),
            }),
            (None, None) => None,
            _ => {
                return Err(
                    "a TLS client certificate needs its key, and a key its certificate".into(),
                );
            }
        };
        let custom_tls = tls.ca.is_some() || client_tls.is_some();
        let certificates = || redis::TlsCertificates {
            client_tls: client_tls.clone(),
            root_cert: tls.ca.clone(),
        };
        let (backend, addr, user) = if settings.cluster.is_empty() {
            let info = node_info(&settings.url, &settings)?;
            let user = info
                .redis_settings()
                .username()
                .unwrap_or("default")
                .to_owned();
            let addr = info.addr().to_string();
            let client = if custom_tls {
                redis::Client::build_with_tls(info, certificates())
            } else {
                redis::Client::open(info)
            }
            .map_err(|e| format!("cannot use redis at {addr}: {e}"))?;
            (Backend::Single(client), addr, user)
        } else {
            let seeds = settings
                .cluster
                .iter()
                .map(|u| node_info(u, &settings))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let first = &seeds[0];
            let login = (
                first.redis_settings().username().map(str::to_owned),
                first.redis_settings().password().map(str::to_owned),
            );
            let user = login.0.clone().unwrap_or_else(|| "default".into());
            let addr = format!("cluster {}", first.addr());
            let tls_mode = matches!(first.addr(), redis::ConnectionAddr::TcpTls { .. });
            let s = &settings;
            let mut builder = ClusterClientBuilder::new(seeds.clone())
                .connection_timeout(s.connect_timeout)
                .response_timeout(s.command_timeout)
                .retries(s.reconnect_attempts.max(1) as u32)
                .min_retry_wait(s.reconnect_min_delay.as_millis() as u64)
                .max_retry_wait(s.reconnect_max_delay.as_millis() as u64);
            if let Some(user) = &login.0 {
                builder = builder.username(user);
            }
            if let Some(password) = &login.1 {
                builder = builder.password(password);
            }
            if custom_tls {
                builder = builder.certs(certificates());
            }
            let client = builder
                .build()
                .map_err(|e| format!("cannot use the redis {addr}: {e}"))?;
            let backend = Backend::Cluster {
                client: Box::new(client),
                login,
                tls: tls_mode || custom_tls,
            };
            (backend, addr, user)
        };
        let shared = Arc::new(Shared {
            backend,
            settings,
            addr,
            user,
            slot_map: Arc::default(),
        });
        let timeout = shared.settings.command_timeout;
        let link = Self::link(&shared, timeout)?;
        Ok(Redis {
            shared,
            link,
            response_timeout: timeout,
        })
    }

    fn link(shared: &Shared, response_timeout: Duration) -> std::result::Result<Link, String> {
        let s = &shared.settings;
        match &shared.backend {
            Backend::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(s.connect_timeout))
                    .set_response_timeout(Some(response_timeout))
                    .set_min_delay(s.reconnect_min_delay)
                    .set_max_delay(s.reconnect_max_delay)
                    .set_exponent_base(2.0)
                    .set_number_of_retries(s.reconnect_attempts);
                ConnectionManager::new_lazy_with_config(client.clone(), config)
                    .map(Link::Single)
                    .map_err(|e| format!("cannot use redis at {}: {e}", shared.addr))
            }
            Backend::Cluster { client, .. } => {
                let config = ClusterConfig::new()
                    .set_connection_timeout(s.connect_timeout)
                    .set_response_timeout(response_timeout);
                Ok(Link::Cluster(
                    client.get_pending_async_connection_with_config(config),
                ))
            }
        }
    }

    /// A connection of its own for blocking commands whose BLOCK is at most `max_block`.
    pub fn dedicated(&self, max_block: Duration) -> Result<Redis> {
        let timeout = max_block + self.shared.settings.command_timeout;
        let link = Self::link(&self.shared, timeout).map_err(Error::InvalidConnection)?;
        Ok(Redis {
            shared: self.shared.clone(),
            link,
            response_timeout: timeout,
        })
    }

    /// Whether group reads can use a plain [`wire`] connection (no TLS).
    pub fn speaks_plain(&self) -> bool {
        match &self.shared.backend {
            Backend::Single(client) => matches!(
                client.get_connection_info().addr(),
                redis::ConnectionAddr::Tcp(..) | redis::ConnectionAddr::Unix(_)
            ),
            Backend::Cluster { tls, .. } => !tls,
        }
    }

    /// What CLUSTER SLOTS said when a reader last asked (empty before; see [`super::slot::SlotMap`]).
    pub fn slot_map(&self) -> Arc<super::slot::SlotMap> {
        self.shared.slot_map.clone()
    }

    /// Whether this is a Redis Cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self.shared.backend, Backend::Cluster { .. })
    }

    /// Where a plain (not TLS) connection of [`crate::client::wire`] would go, with this client's
    /// login: the node itself, or for a cluster, the master that owns `key`'s slot now (asked with
    /// CLUSTER SLOTS). None for TLS, which only the crate's connections speak.
    pub async fn plain_target(&self, key: &str) -> Result<Option<wire::Target>> {
        match &self.shared.backend {
            Backend::Single(client) => {
                let info = client.get_connection_info();
                let addr = match info.addr() {
                    redis::ConnectionAddr::Tcp(host, port) => wire::Addr::Tcp(host.clone(), *port),
                    redis::ConnectionAddr::Unix(path) => wire::Addr::Unix(path.clone()),
                    _ => return Ok(None),
                };
                let login = info.redis_settings();
                Ok(Some(wire::Target {
                    addr,
                    username: login.username().map(str::to_owned),
                    password: login.password().map(str::to_owned),
                    db: login.db(),
                }))
            }
            Backend::Cluster { tls: true, .. } => Ok(None),
            Backend::Cluster { login, .. } => {
                let slot = super::slot::of(key);
                let ctx = Ctx::new("CLUSTER SLOTS", key);
                let map = self
                    .query_value(redis::cmd("CLUSTER").arg("SLOTS"), ctx)
                    .await?;
                let asked = self.seed_host();
                self.shared.slot_map.learn(&map, &asked);
                let (host, port) =
                    super::slot::owner(&map, slot, &asked).ok_or_else(|| Error::Protocol {
                        command: "CLUSTER SLOTS",
                        key: key.to_owned(),
                        detail: format!("no master serves slot {slot} now"),
                    })?;
                Ok(Some(self.cluster_target(login, host, port)))
            }
        }
    }

    /// A plain target for the cluster node at `host:port` (from a MOVED or ASK redirection).
    pub fn node_target(&self, host: &str, port: u16) -> Option<wire::Target> {
        match &self.shared.backend {
            Backend::Cluster {
                tls: false, login, ..
            } => Some(self.cluster_target(login, host.to_owned(), port)),
            _ => None,
        }
    }

    fn cluster_target(
        &self,
        login: &(Option<String>, Option<String>),
        host: String,
        port: u16,
    ) -> wire::Target {
        wire::Target {
            addr: wire::Addr::Tcp(host, port),
            username: login.0.clone(),
            password: login.1.clone(),
            db: 0,
        }
    }

    pub fn settings(&self) -> &RedisSettings {
        &self.shared.settings
    }

    /// The response timeout of this connection.
    pub fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// One PING; Ok once Redis answers.
    pub async fn ping(&self) -> Result<()> {
        let pong: String = self
            .query(&redis::cmd("PING"), Ctx::new("PING", ""))
            .await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(Error::Protocol {
                command: "PING",
                key: String::new(),
                detail: format!("expected PONG, got {pong:?}"),
            })
        }
    }

    /// PINGs until Redis answers or `wait` has passed, backing off between tries. The last error is
    /// returned when time runs out. Authentication and ACL errors are not waited on.
    pub async fn wait_ready(&self, wait: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut delay = self.shared.settings.reconnect_min_delay;
        loop {
            match self.ping().await {
                Ok(()) => return Ok(()),
                Err(e) if !e.is_transient() => return Err(e),
                Err(e) => {
                    let now = tokio::time::Instant::now();
                    if now + delay > deadline {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "redis not ready yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.shared.settings.reconnect_max_delay);
                }
            }
        }
    }

    /// Runs one command.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd, ctx: Ctx<'_>) -> Result<T> {
        let value = self.query_value(cmd, ctx).await?;
        T::from_redis_value(value).map_err(|e| Error::Protocol {
            command: ctx.command,
            key: ctx.key.to_owned(),
            detail: e.to_string(),
        })
    }

    /// Runs one command and returns the raw reply, for callers that decode it themselves.
    pub async fn query_value(&self, cmd: &Cmd, ctx: Ctx<'_>) -> Result<Value> {
        match &self.link {
            Link::Single(m) => {
                let mut conn = m.clone();
                self.timed(ctx, cmd.query_async::<Value>(&mut conn)).await
            }
            Link::Cluster(c) => {
                let mut conn = c.clone();
                self.timed(ctx, cmd.query_async::<Value>(&mut conn)).await
            }
        }
    }

    /// Runs a pipeline (or MULTI/EXEC transaction) and returns one reply per command.
    pub async fn query_pipe(&self, pipe: &Pipeline, ctx: Ctx<'_>) -> Result<Vec<Value>> {
        match &self.link {
            Link::Single(m) => {
                let mut conn = m.clone();
                self.timed(ctx, pipe.query_async::<Vec<Value>>(&mut conn))
                    .await
            }
            Link::Cluster(c) => {
                let mut conn = c.clone();
                self.timed(ctx, pipe.query_async::<Vec<Value>>(&mut conn))
                    .await
            }
        }
    }

    /// The masters of a cluster now (`host`, `port`), from CLUSTER SLOTS; None for one node.
    pub async fn masters(&self) -> Result<Option<Vec<(String, u16)>>> {
        if !self.is_cluster() {
            return Ok(None);
        }
        let ctx = Ctx::new("CLUSTER SLOTS", "");
        let map = self
            .query_value(redis::cmd("CLUSTER").arg("SLOTS"), ctx)
            .await?;
        Ok(Some(super::slot::masters(&map, &self.seed_host())))
    }

    /// The host of the first seed: where a node that does not know its own address is reached.
    fn seed_host(&self) -> String {
        self.shared
            .settings
            .cluster
            .first()
            .and_then(|u| url::Url::parse(u).ok())
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_else(|| "127.0.0.1".into())
    }

    /// Runs one command on the cluster node at `host:port` (see [`Redis::masters`]); on one node,
    /// on that node.
    pub async fn query_on(&self, node: &(String, u16), cmd: &Cmd, ctx: Ctx<'_>) -> Result<Value> {
        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
        match &self.link {
            Link::Single(_) => self.query_value(cmd, ctx).await,
            Link::Cluster(c) => {
                let mut conn = c.clone();
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: node.0.clone(),
                    port: node.1,
                });
                self.timed(ctx, async move {
                    conn.route_command(cmd.clone(), routing).await
                })
                .await
            }
        }
    }

    /// Runs `pipe` on the master that serves `key`'s slot — on a cluster, over the node connection
    /// that commands keyed by `key` use (so WAIT there covers them). The crate sends a routed command
    /// to some other node when it has no connection to the one asked for: a caller whose answer
    /// depends on the node checks which one answered (CLUSTER MYID first in the pipeline). On one
    /// node, there.
    pub async fn query_pipe_at_master_of(
        &self,
        key: &str,
        pipe: Pipeline,
        ctx: Ctx<'_>,
    ) -> Result<Vec<Value>> {
        use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
        match &self.link {
            Link::Single(_) => self.query_pipe(&pipe, ctx).await,
            Link::Cluster(c) => {
                let mut conn = c.clone();
                let count = pipe.len();
                let route = Route::new(super::slot::of(key), SlotAddr::Master);
                let routing = SingleNodeRoutingInfo::SpecificNode(route);
                self.timed(ctx, async move {
                    conn.route_pipeline(pipe, 0, count, routing).await
                })
                .await
            }
        }
    }

    /// Awaits one round trip with the outer time bound, records its latency, classifies its error.
    async fn timed<T>(
        &self,
        ctx: Ctx<'_>,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        // The connection's own response timeout covers a sent command; this outer bound also covers
        // waiting for a reconnect in progress.
        let limit = self.response_timeout + self.shared.settings.connect_timeout;
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(limit, call).await;
        observe(ctx.command, started);
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.classify(e, ctx)),
            Err(_) => Err(Error::Timeout {
                command: ctx.command,
                key: ctx.key.to_owned(),
                after: limit,
            }),
        }
    }

    /// Turns a crate error into ours, so callers can branch on it.
    pub fn classify(&self, e: RedisError, ctx: Ctx<'_>) -> Error {
        let key = ctx.key.to_owned();
        if e.is_timeout() {
            return Error::Timeout {
                command: ctx.command,
                key,
                after: self.response_timeout,
            };
        }
        if e.kind() == redis::ErrorKind::AuthenticationFailed
            || matches!(e.code(), Some("WRONGPASS") | Some("NOAUTH"))
        {
            return Error::RedisAuth {
                addr: self.shared.addr.clone(),
                user: self.shared.user.clone(),
                detail: e.to_string(),
            };
        }
        // Redis at `maxclients` answers a new connection with this error and closes it: the server is
        // full for now, as a refused connection would say — wait and try again.
        if e.code() == Some("ERR")
            && e.detail()
                .is_some_and(|d| d.starts_with("max number of clients reached"))
        {
            return Error::Connection {
                addr: self.shared.addr.clone(),
                command: ctx.command,
                source: e,
            };
        }
        match e.code() {
            Some("NOPERM") => {
                return Error::RedisDenied {
                    command: ctx.command,
                    key,
                    user: self.shared.user.clone(),
                    detail: e.detail().unwrap_or("no permission").to_owned(),
                };
            }
            Some("NOGROUP") | Some("UNBLOCKED") => {
                return Error::NoGroup {
                    stream: key,
                    group: ctx.group.unwrap_or("").to_owned(),
                };
            }
            _ => {}
        }
        if e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped() {
            return Error::Connection {
                addr: self.shared.addr.clone(),
                command: ctx.command,
                source: e,
            };
        }
        Error::Redis {
            command: ctx.command,
            key,
            source: e,
        }
    }
}

/// Records a round trip's latency by operation.
pub(crate) fn observe(command: &'static str, started: std::time::Instant) {
    let op = crate::metrics::OpLabels {
        op: crate::metrics::op_of(command).to_owned(),
    };
    crate::metrics::global()
        .redis_seconds
        .get_or_create(&op)
        .observe(started.elapsed().as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_every_credential_form_in_urls() {
        assert_eq!(
            redact_url("redis://app:s3cret@host:6379/0"),
            "redis://app:***@host:6379/0"
        );
        assert_eq!(redact_url("redis://:s3cret@host"), "redis://:***@host");
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
        let unix = redact_url("unix:///run/redis.sock?db=2&pass=s3cret");
        assert_eq!(unix, "unix:///run/redis.sock?db=2&pass=***");
        let unix = redact_url("redis+unix:///run/redis.sock?PASSWORD=s3cret&user=app");
        assert!(
            !unix.contains("s3cret") && unix.contains("user=app"),
            "{unix}"
        );
        for broken in [
            "redis://app:s3cret@host:port/0",
            "redis://app:s3cret@[::1/0",
            "app:s3cret@host",
            "s3cret",
        ] {
            let shown = redact_url(broken);
            assert!(!shown.contains("s3cret"), "{broken} -> {shown}");
        }
        assert!(redact_url("redis://app:s3cret@host:port").starts_with("redis://… "));
    }
}
