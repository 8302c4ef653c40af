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

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
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
            Roles::parse(roles).map_err(|m| format!("roles: {m}"))?
        };
        if !key.roles.covers(&wanted) {
            return Err(format!(
                "API key {:?} may be issued {}, not {}",
                key.name, key.roles, wanted
            ));
        }
        let ttl = ttl.unwrap_or(self.auth.token_ttl);
        if ttl > self.auth.max_token_ttl {
            return Err(format!(
                "ttl {} is above auth.max_token_ttl ({})",
                humantime::format_duration(ttl),
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
        match path {
            "/token" => {
                let r: TokenRequest =
                    serde_json::from_slice(body).map_err(|e| format!("request: {e}"))?;
                let ttl = r
                    .ttl
                    .map(|t| humantime::parse_duration(&t).map_err(|e| format!("ttl: {e}")))
                    .transpose()?;
                let (token, expires_at) = self.issue(&r.api_key, &r.roles, ttl)?;
                Ok(json!({"token": token, "expires_at": expires_at}))
            }
            "/sign" => {
                let r: SignRequest =
                    serde_json::from_slice(body).map_err(|e| format!("request: {e}"))?;
                let signature = self.sign(&r.token, &r.stream, &r.digest)?;
                Ok(json!({ "signature": signature }))
            }
            other => Err(format!("no such endpoint {other:?}: POST /token or /sign")),
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

/// Serves the exchange until `shutdown`; connections are closed at shutdown.
pub async fn serve(listener: tokio::net::UnixListener, exchange: Exchange, mut shutdown: Shutdown) {
    if let Ok(addr) = listener.local_addr()
        && let Some(path) = addr.as_pathname()
    {
        tracing::info!(path = %path.display(), "credential exchange listening");
    }
    let connections = TaskTracker::new();
    let exchange = Arc::new(exchange);
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
        let exchange = exchange.clone();
        let stop = shutdown.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let exchange = exchange.clone();
                async move { Ok::<_, std::io::Error>(respond(&exchange, req).await) }
            });
            if let Err(e) = crate::http::serve_connection(stream, service, stop).await {
                tracing::debug!(error = %e, "credential exchange connection ended with an error");
            }
        });
    }
    connections.close();
    connections.wait().await;
}

async fn respond(
    exchange: &Exchange,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: Value| {
        let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
        *r.status_mut() = status;
        r
    };
    if req.method() != Method::POST {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "POST /token or /sign"}),
        );
    }
    let path = req.uri().path().to_owned();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return reply(StatusCode::BAD_REQUEST, json!({"error": e.to_string()})),
    };
    match exchange.answer(&path, &body) {
        Ok(v) => reply(StatusCode::OK, v),
        Err(e) => {
            tracing::warn!(endpoint = %path, reason = ?e, "credential exchange refused a request");
            reply(StatusCode::FORBIDDEN, json!({ "error": e }))
        }
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
