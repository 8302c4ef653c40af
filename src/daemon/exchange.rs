//! The credential exchange: the daemon that holds the signing key issues tokens for API keys and signs
//! messages for token holders, on a unix socket, so an operator's host needs verification keys only.
//!
//! Owns both sides of `auth.endpoint`: the server (HTTP/1.1 on a unix socket of mode 0660 — who may
//! connect is decided by the socket's directory and group, e.g. systemd's RuntimeDirectory) and the
//! client the CLI uses when it cannot sign itself. `POST /token` takes `{"api_key", "roles"?, "ttl"?}`
//! and answers `{"token", "expires_at"}` under exactly the rules of a local `redstream token issue`
//! (the key's roles bound what may be asked, `auth.max_token_ttl` the lifetime). `POST /sign` takes
//! `{"token", "stream", "digest"}` — an identity token and the [`crate::auth::signature::digest`] of a
//! message — checks that the token's identity may publish to the stream, and answers `{"signature"}`:
//! the `_sig` for that message, which the caller adds and publishes. The exchange never sees the
//! message itself. Every refusal is a 4xx with `{"error"}` naming the reason.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Roles;
use crate::config::AuthSettings;
use crate::model::naming::Naming;
use crate::shutdown::Shutdown;

/// The largest request body taken.
const MAX_BODY: usize = 64 * 1024;

/// What the exchange issues and signs with: the auth settings of the daemon at start.
#[derive(Clone)]
pub struct Exchange {
    auth: AuthSettings,
    naming: Arc<Naming>,
}

impl Exchange {
    pub fn new(auth: &AuthSettings, naming: Arc<Naming>) -> Exchange {
        Exchange {
            auth: auth.clone(),
            naming,
        }
    }

    /// A token for the holder of `api_key`, with `roles` (default: all the key's) for `ttl` (default
    /// `auth.token_ttl`). Returns the token and its expiry (seconds since the epoch).
    pub fn issue(
        &self,
        api_key: &str,
        roles: &[String],
        ttl: Option<Duration>,
    ) -> Result<(String, u64), String> {
        let key = self
            .auth
            .api_keys
            .authenticate(api_key)
            .map_err(|e| e.to_string())?;
        let wanted = if roles.is_empty() {
            key.roles.clone()
        } else {
            Roles::parse(roles).map_err(|_| "roles: not a list of valid role names".to_owned())?
        };
        if !key.roles.covers(&wanted) {
            return Err(format!(
                "API key {:?} may not be issued the roles asked (it may be issued {})",
                key.name, key.roles
            ));
        }
        let ttl = ttl.unwrap_or(self.auth.token_ttl);
        if ttl > self.auth.max_token_ttl {
            return Err(format!(
                "the ttl asked is above auth.max_token_ttl ({})",
                humantime::format_duration(self.auth.max_token_ttl)
            ));
        }
        self.auth
            .keys
            .issue(&key.identity, &wanted, ttl)
            .map_err(|e| e.to_string())
    }

    /// The signature of the message with digest `dig` for `stream`, as the holder of `token`.
    pub fn sign(&self, token: &str, stream: &str, dig: &str) -> Result<String, String> {
        let verified = self
            .auth
            .keys
            .verify(token.trim())
            .map_err(|e| format!("token: {e}"))?;
        crate::auth::authorize(
            &self.naming,
            &verified.identity,
            crate::auth::Op::Publish,
            stream,
        )
        .map_err(|e| e.to_string())?;
        self.auth
            .keys
            .sign_digest(&verified.identity, stream, dig, Duration::MAX)
            .map_err(|e| e.to_string())
    }

    /// The answer to one request, or why not — a reason that repeats no value of the request (an
    /// API key or a token sent in the wrong field must not end up in a reply or a log).
    fn answer(&self, path: &str, body: &[u8]) -> Result<Value, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct TokenRequest {
            api_key: String,
            #[serde(default)]
            roles: Vec<String>,
            ttl: Option<String>,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct SignRequest {
            token: String,
            stream: String,
            digest: String,
        }
        // serde's messages quote the offending value: say where, and what was expected, instead.
        let malformed = |e: serde_json::Error, fields: &str| {
            format!(
                "request: not a JSON object of {fields} ({:?} error at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            )
        };
        match path {
            "/token" => {
                let r: TokenRequest = serde_json::from_slice(body)
                    .map_err(|e| malformed(e, "api_key, roles?, ttl?"))?;
                let ttl = r
                    .ttl
                    .map(|t| {
                        humantime::parse_duration(&t)
                            .map_err(|_| "ttl: not a duration such as 10m or 1h".to_owned())
                    })
                    .transpose()?;
                let (token, expires_at) = self.issue(&r.api_key, &r.roles, ttl)?;
                Ok(json!({"token": token, "expires_at": expires_at}))
            }
            "/sign" => {
                let r: SignRequest = serde_json::from_slice(body)
                    .map_err(|e| malformed(e, "token, stream, digest"))?;
                let signature = self.sign(&r.token, &r.stream, &r.digest)?;
                Ok(json!({ "signature": signature }))
            }
            _ => Err("no such endpoint: POST /token or /sign".to_owned()),
        }
    }
}

/// Binds the exchange's socket at `path` (a stale socket file is replaced), mode 0660.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// The most connections the exchange holds at once: a new one past it closes the oldest. (Requests are
/// one round trip each; idle connections are all an attacker could pile up.)
const MAX_CONNECTIONS: usize = 64;
/// How long one connection may last, from accept to its last answer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests per peer uid (SO_PEERCRED): a burst of this many, then [`RATE_PER_SEC`] a second.
const RATE_BURST: f64 = 20.0;
const RATE_PER_SEC: f64 = 10.0;
/// Refused requests are logged once per peer uid per this interval, with how many there were.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Per peer uid: the rate limit's bucket, and the refusals not logged yet.
#[derive(Default)]
struct Peers {
    buckets: HashMap<u32, (f64, Instant)>,
    refused: HashMap<u32, (Instant, u64)>,
}

impl Peers {
    /// Takes one request of `uid` from its bucket; false when the bucket is empty.
    fn admit(&mut self, uid: u32, now: Instant) -> bool {
        if self.buckets.len() > 10_000 {
            self.buckets.clear(); // uids are few; a flood of them forgets, it does not grow
        }
        let (tokens, at) = self.buckets.entry(uid).or_insert((RATE_BURST, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * RATE_PER_SEC).min(RATE_BURST);
        *at = now;
        if *tokens < 1.0 {
            return false;
        }
        *tokens -= 1.0;
        true
    }

    /// A refused request of `uid`: how many to report now (the first of an interval), or None while
    /// the line of this interval was written already.
    fn refused(&mut self, uid: u32, now: Instant) -> Option<u64> {
        if self.refused.len() > 10_000 {
            self.refused.clear();
        }
        let (since, count) = self
            .refused
            .entry(uid)
            .or_insert((now - LOG_EVERY - LOG_EVERY, 0));
        *count += 1;
        if now.duration_since(*since) < LOG_EVERY {
            return None;
        }
        *since = now;
        Some(std::mem::take(count))
    }
}

/// Serves the exchange until `shutdown`; connections are closed at shutdown. Bounded whatever its
/// clients do: at most [`MAX_CONNECTIONS`] (the oldest closed first), each for at most
/// [`CONNECTION_TIMEOUT`], requests rate-limited per peer uid, refusals logged once per peer and
/// interval with a count — so a local user in the socket's group cannot starve the daemon of file
/// descriptors (its Redis connections) or fill the journal.
pub async fn serve(listener: tokio::net::UnixListener, exchange: Exchange, mut shutdown: Shutdown) {
    if let Ok(addr) = listener.local_addr()
        && let Some(path) = addr.as_pathname()
    {
        tracing::info!(path = %path.display(), "credential exchange listening");
    }
    let connections = TaskTracker::new();
    let exchange = Arc::new(exchange);
    let peers = Arc::new(Mutex::new(Peers::default()));
    let open: Arc<Mutex<VecDeque<(u64, CancellationToken)>>> = Arc::default();
    let mut next_id = 0u64;
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "the credential exchange cannot accept a connection");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                        _ = shutdown.wait() => break,
                    }
                }
            },
            _ = shutdown.wait() => break,
        };
        let uid = stream.peer_cred().map_or(u32::MAX, |c| c.uid());
        let id = next_id;
        next_id += 1;
        let closed = CancellationToken::new();
        {
            let mut open = open.lock().unwrap_or_else(|p| p.into_inner());
            while open.len() >= MAX_CONNECTIONS {
                if let Some((_, oldest)) = open.pop_front() {
                    oldest.cancel();
                }
            }
            open.push_back((id, closed.clone()));
        }
        let (exchange, peers, open) = (exchange.clone(), peers.clone(), open.clone());
        let stop = shutdown.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (exchange, peers) = (exchange.clone(), peers.clone());
                async move { Ok::<_, std::io::Error>(respond(&exchange, &peers, uid, req).await) }
            });
            let conn = crate::http::serve_connection(stream, service, stop);
            tokio::select! {
                r = tokio::time::timeout(CONNECTION_TIMEOUT, conn) => match r {
                    Ok(Err(e)) => tracing::debug!(error = %e, "credential exchange connection ended with an error"),
                    Err(_) => tracing::debug!(uid, "credential exchange connection timed out"),
                    Ok(Ok(())) => {}
                },
                _ = closed.cancelled() => tracing::debug!(uid, "credential exchange connection closed for a newer one"),
            }
            open.lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|(i, _)| *i != id);
        });
    }
    connections.close();
    connections.wait().await;
}

async fn respond(
    exchange: &Exchange,
    peers: &Mutex<Peers>,
    uid: u32,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: Value| {
        let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
        *r.status_mut() = status;
        r
    };
    let path = req.uri().path().to_owned();
    let refuse = |status: StatusCode, why: String| {
        let report = peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refused(uid, Instant::now());
        if let Some(count) = report {
            // The endpoint and the status, never the request's values or the reason's text.
            let endpoint = match path.as_str() {
                "/token" | "/sign" => path.as_str(),
                _ => "another path",
            };
            tracing::warn!(
                uid,
                endpoint,
                status = status.as_u16(),
                refused = count,
                "credential exchange refused requests from this peer (one line per peer every 10 s)"
            );
        }
        reply(status, json!({ "error": why }))
    };
    if !peers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .admit(uid, Instant::now())
    {
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "too many requests from this user; slow down".into(),
        );
    }
    if req.method() != Method::POST {
        return refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST /token or /sign".into(),
        );
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "the request body could not be read (at most 64 KiB)".into(),
            );
        }
    };
    match exchange.answer(&path, &body) {
        Ok(v) => reply(StatusCode::OK, v),
        Err(e) => refuse(StatusCode::FORBIDDEN, e),
    }
}

/// The client side: POSTs `body` to `endpoint` of the exchange at `socket` and returns its answer, or
/// the exchange's reason for refusing.
pub async fn request(socket: &Path, endpoint: &str, body: &Value) -> Result<Value, String> {
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        format!(
            "cannot reach the credential exchange at {}: {e}",
            socket.display()
        )
    })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(Method::POST)
        .uri(endpoint)
        .header("host", "redstream")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let value: Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("the exchange answered: {e}"))?;
    if status.is_success() {
        Ok(value)
    } else {
        Err(value["error"]
            .as_str()
            .unwrap_or("refused without a reason")
            .to_owned())
    }
}
