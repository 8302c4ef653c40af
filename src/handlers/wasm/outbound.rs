//! Outbound HTTP for handlers granted it: the allow-list, and how a guest's `wasi:http` request is
//! checked and sent.
//!
//! Owns [`Origin`] (one `allowed_outbound_hosts` entry: scheme, host, port, with `*` only where the
//! operator wrote it), [`Outbound`] (a handler's grant and limits) and [`Hooks`] (wasmtime-wasi-http's
//! send hook for one call): a request to an origin not on the list is refused with `HTTP-request-denied`
//! and a WARN naming it (a redirect is a request of its own, checked the same way); an allowed one gets
//! an `Idempotency-Key` derived from the message (handler, stream, id, the call's n-th request), a
//! timeout within what is left of the call's deadline, and its response body capped. Requests are
//! counted per handler and allow-list entry. HTTP is not atomic with the ack: a message that runs
//! again sends its requests again, with the same keys (docs/design.md, "Handlers").

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::header::{CONTENT_LENGTH, HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full, Limited};
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

/// The header carrying a request's idempotency key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// One `allowed_outbound_hosts` entry: `http[s]://host[:port]`, where host may be `*` or begin with
/// `*.` (any subdomain) and port may be `*`, as written; no path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    https: bool,
    host: Host,
    /// None: any port (`:*`).
    port: Option<u16>,
    /// As written, for logs and metrics.
    text: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Host {
    Any,
    /// `*.example.com`: a subdomain of `example.com` (not `example.com` itself).
    Under(String),
    Exact(String),
}

impl Origin {
    /// Parses an entry; the error says what is wrong with it.
    pub fn parse(s: &str) -> Result<Origin, String> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or("an origin is scheme://host[:port], e.g. \"https://api.example.com\"")?;
        let https = match scheme.to_ascii_lowercase().as_str() {
            "https" => true,
            "http" => false,
            other => return Err(format!("scheme {other:?} is not http or https")),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) {
            return Err("an origin has no path, query or user part: scheme://host[:port]".into());
        }
        // An IPv6 literal keeps its brackets; a port follows the last colon outside them.
        let (host, port) = match rest.rfind(':') {
            Some(i) if !rest[i..].contains(']') => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        let port = match port {
            None => Some(if https { 443 } else { 80 }),
            Some("*") => None,
            Some(p) => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("port {p:?} is not 1..65535 or *"))?,
            ),
        };
        let host = host.to_ascii_lowercase();
        let host = if host == "*" {
            Host::Any
        } else if let Some(domain) = host.strip_prefix("*.") {
            valid_host(domain)?;
            Host::Under(domain.to_owned())
        } else {
            valid_host(&host)?;
            Host::Exact(host)
        };
        Ok(Origin {
            https,
            host,
            port,
            text: s.to_owned(),
        })
    }

    /// Whether a request to (scheme, host, port) is within this entry.
    fn allows(&self, https: bool, host: &str, port: u16) -> bool {
        self.https == https
            && self.port.is_none_or(|p| p == port)
            && match &self.host {
                Host::Any => true,
                Host::Exact(h) => h == host,
                Host::Under(d) => host
                    .strip_suffix(d.as_str())
                    .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
            }
    }

    /// Whether a request to `url` is within this entry (a URL that does not parse is not).
    pub fn grants(&self, url: &str) -> bool {
        url.parse::<http::Uri>().is_ok_and(|uri| {
            let (https, host, port) = target(&uri);
            uri.scheme().is_some() && self.allows(https, &host, port)
        })
    }
}

/// Where a request goes: https or not, the host (lowercase), the port (the scheme's by default).
fn target(uri: &http::Uri) -> (bool, String, u16) {
    let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
    let host = uri.host().unwrap_or_default().to_ascii_lowercase();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    (https, host, port)
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn valid_host(h: &str) -> Result<(), String> {
    let ok = if let Some(v6) = h.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !h.is_empty()
            && h.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "host {h:?} is not a host name, an IP address, `*` or `*.domain`"
        ))
    }
}

/// What a handler may reach and how: its `[[handlers]]` entry's outbound settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Outbound {
    pub allowed: Vec<Origin>,
    /// One request's limit (within what is left of the call's deadline).
    pub timeout: Duration,
    /// The largest response body a request may read.
    pub max_response: u64,
    /// Calls of this handler in flight at once.
    pub concurrency: usize,
}

impl Outbound {
    fn allowed(&self, https: bool, host: &str, port: u16) -> Option<&Origin> {
        self.allowed.iter().find(|o| o.allows(https, host, port))
    }
}

/// A response made up in place of the network: status, headers, body.
pub type Made = (u16, Vec<(String, String)>, Vec<u8>);

/// Answers granted requests in place of the network (a local `handler test` case's stubs): given the
/// method, the URL and the body, the response, or why there is none.
pub trait Responder: Send + Sync + fmt::Debug {
    fn respond(&self, method: &str, url: &str, body: Vec<u8>) -> Result<Made, String>;
}

/// Where a runtime's handlers get stub responses, once set (never, in the daemon).
pub type ResponderSlot = OnceLock<Arc<dyn Responder>>;

/// The send hook of one call: refuses what the allow-list does not grant, keys and times the rest.
pub struct Hooks {
    handler: Arc<str>,
    outbound: Arc<Outbound>,
    responder: Arc<ResponderSlot>,
    /// `handler:stream:id`, the message's cause; each request adds its number in the call.
    cause: String,
    requests: u32,
    deadline: Instant,
}

impl Hooks {
    pub fn new(handler: &str, outbound: Arc<Outbound>, responder: Arc<ResponderSlot>) -> Hooks {
        Hooks {
            handler: handler.into(),
            outbound,
            responder,
            cause: String::new(),
            requests: 0,
            deadline: Instant::now(),
        }
    }

    /// The hook of a handler granted no origin, in the call of message `id`: every request refused.
    pub fn refusing(handler: &str, id: &str) -> Hooks {
        let mut hooks = Hooks::new(
            handler,
            Arc::new(Outbound {
                allowed: Vec::new(),
                timeout: Duration::ZERO,
                max_response: 0,
                concurrency: 1,
            }),
            Arc::new(ResponderSlot::new()),
        );
        hooks.cause = format!("redstream:{handler}:{id}");
        hooks
    }

    /// Readies the hook for a call of the message `stream`/`id` that must end by `deadline`.
    pub fn begin(&mut self, stream: &str, id: &str, deadline: Instant) {
        self.cause = format!("redstream:{}:{stream}:{id}", self.handler);
        self.requests = 0;
        self.deadline = deadline;
    }
}

/// Counts one request of `handler` to allow-list entry `host` (empty when refused).
fn count(handler: &str, host: &str, outcome: &str) {
    crate::metrics::global()
        .http_requests
        .get_or_create(&crate::metrics::HttpLabels {
            handler: handler.to_owned(),
            host: host.to_owned(),
            outcome: outcome.to_owned(),
        })
        .inc();
}

type Sent = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), HttpError>> + Send>,
                ),
                HttpError,
            >,
        > + Send,
>;

impl WasiHttpHooks for Hooks {
    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Sent {
        let (https, host, port) = target(request.uri());
        let outbound = &self.outbound;
        let Some(origin) = outbound.allowed(https, &host, port) else {
            let scheme = if https { "https" } else { "http" };
            tracing::warn!(handler = %self.handler, cause = %self.cause, origin = %format!("{scheme}://{host}:{port}"), "outbound request refused: not in the handler's allowed_outbound_hosts");
            count(&self.handler, "", "denied");
            return Box::new(async move {
                // Read the body away first (keeping none of it): a guest still writing it would
                // see its stream break, which StarlingMonkey (JavaScript's fetch) cannot catch.
                let mut body = request.into_body();
                while let Some(Ok(_)) = body.frame().await {}
                Err(HttpError::HttpRequestDenied)
            });
        };
        self.requests += 1;
        if !request.headers().contains_key(&IDEMPOTENCY_KEY)
            // Names are free of control characters; anything beyond ASCII goes as it is (obs-text).
            && let Ok(key) = HeaderValue::from_bytes(format!("{}:{}", self.cause, self.requests).as_bytes())
        {
            request.headers_mut().insert(IDEMPOTENCY_KEY, key);
        }
        // The request's time: its own limit, within what is left of the call's.
        let left = self.deadline.saturating_duration_since(Instant::now());
        let limit = outbound.timeout.min(left);
        let cap = |asked: Option<Duration>| Some(asked.map_or(limit, |a| a.min(limit)));
        let options = RequestOptions {
            connect_timeout: cap(options.and_then(|o| o.connect_timeout)),
            first_byte_timeout: cap(options.and_then(|o| o.first_byte_timeout)),
            between_bytes_timeout: cap(options.and_then(|o| o.between_bytes_timeout)),
        };
        let max = outbound.max_response;
        let labels = crate::metrics::HttpHostLabels {
            handler: self.handler.to_string(),
            host: origin.to_string(),
        };
        if let Some(responder) = self.responder.get().cloned() {
            return Box::new(async move {
                let method = request.method().to_string();
                let url = request.uri().to_string();
                let body = match request.into_body().collect().await {
                    Ok(body) => body.to_bytes().to_vec(),
                    Err(e) => return Err(e),
                };
                let (status, headers, body) = responder
                    .respond(&method, &url, body)
                    .map_err(|why| HttpError::InternalError(Some(why)))?;
                let mut response = http::Response::builder().status(status);
                for (name, value) in &headers {
                    response = response.header(name, value);
                }
                let body = Full::new(bytes::Bytes::from(body))
                    .map_err(|never| match never {})
                    .boxed_unsync();
                let response = response
                    .body(body)
                    .map_err(|e| HttpError::InternalError(Some(format!("stub response: {e}"))))?;
                count(&labels.handler, &labels.host, "stub");
                Ok((
                    response,
                    Box::new(async { Ok(()) })
                        as Box<dyn Future<Output = Result<(), HttpError>> + Send>,
                ))
            });
        }
        Box::new(async move {
            let started = Instant::now();
            let sent = tokio::time::timeout(
                limit,
                wasmtime_wasi_http::default_send_request(request, Some(options)),
            )
            .await;
            crate::metrics::global()
                .http_seconds
                .get_or_create(&labels)
                .observe(started.elapsed().as_secs_f64());
            let (response, io) = match sent {
                Ok(Ok(sent)) => sent,
                Ok(Err(e)) => {
                    count(&labels.handler, &labels.host, outcome_of(&e));
                    return Err(e);
                }
                Err(_) => {
                    count(&labels.handler, &labels.host, "timeout");
                    return Err(HttpError::HttpResponseTimeout);
                }
            };
            let declared = response
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            if declared.is_some_and(|n| n > max) {
                count(&labels.handler, &labels.host, "too_large");
                return Err(HttpError::HttpResponseBodySize(declared));
            }
            let class = match response.status().as_u16() {
                100..=199 => "1xx",
                200..=299 => "2xx",
                300..=399 => "3xx",
                400..=499 => "4xx",
                _ => "5xx",
            };
            count(&labels.handler, &labels.host, class);
            // A body longer than it said (or than the cap, when it said nothing) fails the read.
            let response = response.map(|body| {
                Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX))
                    .map_err(move |e| match e.downcast::<HttpError>() {
                        Ok(e) => *e,
                        Err(_) => HttpError::HttpResponseBodySize(Some(max)),
                    })
                    .boxed_unsync()
            });
            Ok((
                response,
                Box::new(io) as Box<dyn Future<Output = Result<(), HttpError>> + Send>,
            ))
        })
    }
}

/// The metric outcome of a request that failed before its response.
fn outcome_of(e: &HttpError) -> &'static str {
    match e {
        HttpError::ConnectionTimeout
        | HttpError::ConnectionReadTimeout
        | HttpError::HttpResponseTimeout => "timeout",
        HttpError::HttpResponseBodySize(_) => "too_large",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::Origin;

    #[test]
    fn origins_match_scheme_host_and_port_with_wildcards_only_where_written() {
        let o = |s: &str| Origin::parse(s).unwrap();
        assert!(o("https://api.example.com").allows(true, "api.example.com", 443));
        assert!(!o("https://api.example.com").allows(false, "api.example.com", 443));
        assert!(!o("https://api.example.com").allows(true, "api.example.com", 8443));
        assert!(!o("https://api.example.com").allows(true, "x.api.example.com", 443));
        assert!(o("http://127.0.0.1:8080").allows(false, "127.0.0.1", 8080));
        assert!(!o("http://127.0.0.1:8080").allows(false, "127.0.0.1", 80));
        assert!(o("http://127.0.0.1:*").allows(false, "127.0.0.1", 9));
        assert!(o("https://*.example.com").allows(true, "a.b.example.com", 443));
        assert!(!o("https://*.example.com").allows(true, "example.com", 443));
        assert!(!o("https://*.example.com").allows(true, "badexample.com", 443));
        assert!(o("HTTPS://API.Example.com/").allows(true, "api.example.com", 443));
        assert!(o("http://[::1]:8080").allows(false, "[::1]", 8080));
        for bad in [
            "api.example.com",
            "ftp://x",
            "https://x/path",
            "https://user@x",
            "https://x:0",
            "https://x:99999",
            "https://",
            "https://a..b",
        ] {
            assert!(Origin::parse(bad).is_err(), "{bad} parsed");
        }
    }
}
