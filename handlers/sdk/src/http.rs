//! Outbound HTTP (feature `http`): requests to the origins the handler's `[[handlers]]` entry grants
//! in `allowed_outbound_hosts`; anything else is refused by RedStream with
//! [`HttpError::Denied`]. A call waits for its response without holding one of RedStream's threads.
//!
//! ```ignore
//! let res = redstream_guest::http::Request::post("https://hooks.example.com/done")
//!     .header("content-type", "application/json")
//!     .body(br#"{"task":"t1"}"#.to_vec())
//!     .send()?;                      // an error retries the message (`?` into HandlerError)
//! if !res.ok() { return Err(HandlerError::retry(format!("webhook said {}", res.status))); }
//! ```
//!
//! HTTP is not part of the commit: a message that runs again sends its requests again. RedStream
//! gives each request an `Idempotency-Key` header (the same for the n-th request of every run of the
//! message) so the receiver can drop the second of two; a key the handler sets itself is kept.
//! Redirects are followed (at most [`MAX_REDIRECTS`]), each one a request checked on its own.

use std::fmt;

use wasip2::http::outgoing_handler;
use wasip2::http::types::{ErrorCode, Fields, Method, OutgoingBody, OutgoingRequest, Scheme};
use wasip2::io::streams::StreamError;

use crate::HandlerError;

/// Redirects [`Request::send`] follows before it gives the last response back.
pub const MAX_REDIRECTS: u32 = 5;

/// A request to build and send.
#[derive(Clone, Debug)]
pub struct Request {
    method: Method,
    url: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    follow: bool,
}

/// What came back: the status, the headers and the whole body (within RedStream's response limit).
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

/// Why a request got no response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpError {
    /// Not an origin the handler is granted (`allowed_outbound_hosts`).
    Denied(String),
    /// The URL could not be sent as given.
    BadUrl(String),
    /// No answer in time (the request's limit, or what was left of the call's deadline).
    Timeout(String),
    /// The response was larger than RedStream lets a handler read.
    TooLarge(String),
    /// Anything else on the way: connection, TLS, protocol.
    Failed(String),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Denied(s) => write!(f, "request refused: {s}"),
            HttpError::BadUrl(s) => write!(f, "bad url: {s}"),
            HttpError::Timeout(s) => write!(f, "timed out: {s}"),
            HttpError::TooLarge(s) => write!(f, "response too large: {s}"),
            HttpError::Failed(s) => write!(f, "request failed: {s}"),
        }
    }
}

/// A refused or malformed request will not succeed by being retried; the rest may.
impl From<HttpError> for HandlerError {
    fn from(e: HttpError) -> Self {
        match e {
            HttpError::Denied(_) | HttpError::BadUrl(_) => HandlerError::Reject(format!("http: {e}")),
            _ => HandlerError::Retry(format!("http: {e}")),
        }
    }
}

impl Response {
    /// A 2xx status.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice())
    }
}

impl Request {
    pub fn new(method: &str, url: &str) -> Request {
        let method = match method.to_ascii_uppercase().as_str() {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "PATCH" => Method::Patch,
            "OPTIONS" => Method::Options,
            other => Method::Other(other.to_owned()),
        };
        Request { method, url: url.to_owned(), headers: Vec::new(), body: Vec::new(), follow: true }
    }

    pub fn get(url: &str) -> Request {
        Request::new("GET", url)
    }

    pub fn post(url: &str) -> Request {
        Request::new("POST", url)
    }

    pub fn header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Request {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Request {
        self.body = body.into();
        self
    }

    /// Gives a 3xx response back instead of following it.
    pub fn no_redirects(mut self) -> Request {
        self.follow = false;
        self
    }

    /// Sends the request and reads the whole response.
    pub fn send(self) -> Result<Response, HttpError> {
        let mut url = self.url.clone();
        let mut method = self.method.clone();
        let mut body = self.body.clone();
        for _ in 0..=MAX_REDIRECTS {
            let res = send_once(&method, &url, &self.headers, &body)?;
            let location = res.header("location").map(|l| String::from_utf8_lossy(l).into_owned());
            match (self.follow, res.status, location) {
                (true, 301 | 302 | 303 | 307 | 308, Some(to)) => {
                    url = resolve(&url, &to);
                    // As browsers do: 303 (and 301/302 after a POST) become a GET without a body.
                    if res.status == 303 || (matches!(res.status, 301 | 302) && matches!(method, Method::Post)) {
                        method = Method::Get;
                        body = Vec::new();
                    }
                }
                _ => return Ok(res),
            }
        }
        Err(HttpError::Failed(format!("more than {MAX_REDIRECTS} redirects from {}", self.url)))
    }
}

/// `to` (a Location header) against the URL that answered with it.
fn resolve(base: &str, to: &str) -> String {
    if to.contains("://") {
        return to.to_owned();
    }
    let (scheme, rest) = base.split_once("://").unwrap_or(("https", base));
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    match to.strip_prefix("//") {
        Some(net) => format!("{scheme}://{net}"),
        None if to.starts_with('/') => format!("{scheme}://{authority}{to}"),
        None => format!("{scheme}://{authority}/{to}"),
    }
}

fn send_once(method: &Method, url: &str, headers: &[(String, Vec<u8>)], body: &[u8]) -> Result<Response, HttpError> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| HttpError::BadUrl(format!("{url}: no scheme")))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "https" => Scheme::Https,
        "http" => Scheme::Http,
        other => return Err(HttpError::BadUrl(format!("{url}: scheme {other} is not http or https"))),
    };
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    let path = if path.is_empty() { "/".to_owned() } else if path.starts_with('?') { format!("/{path}") } else { path.to_owned() };
    let fields = Fields::new();
    for (name, value) in headers {
        fields.append(name, value).map_err(|e| HttpError::BadUrl(format!("header {name}: {e:?}")))?;
    }
    // The body is known whole: say its length rather than send it chunked.
    if !body.is_empty() && !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("content-length")) {
        fields
            .append("content-length", body.len().to_string().as_bytes())
            .map_err(|e| HttpError::BadUrl(format!("content-length: {e:?}")))?;
    }
    let request = OutgoingRequest::new(fields);
    let bad = |what: &str| HttpError::BadUrl(format!("{url}: {what}"));
    request.set_method(method).map_err(|()| bad("method"))?;
    request.set_scheme(Some(&scheme)).map_err(|()| bad("scheme"))?;
    request.set_authority(Some(authority)).map_err(|()| bad("authority"))?;
    request.set_path_with_query(Some(&path)).map_err(|()| bad("path"))?;
    let outgoing = request.body().map_err(|()| bad("body"))?;
    // Sent first, then the body streamed into it: its buffer holds one chunk.
    let pending = outgoing_handler::handle(request, None).map_err(|e| error(url, e))?;
    {
        let stream = outgoing.write().map_err(|()| bad("body"))?;
        for chunk in body.chunks(4096) {
            stream.blocking_write_and_flush(chunk).map_err(|e| HttpError::Failed(format!("{url}: writing the body: {e:?}")))?;
        }
    }
    OutgoingBody::finish(outgoing, None).map_err(|e| error(url, e))?;
    pending.subscribe().block();
    let response = match pending.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(e))) => return Err(error(url, e)),
        _ => return Err(HttpError::Failed(format!("{url}: no response"))),
    };
    let status = response.status();
    let headers = response.headers().entries().into_iter().collect();
    let incoming = response.consume().map_err(|()| HttpError::Failed(format!("{url}: body taken")))?;
    let mut body = Vec::new();
    {
        let stream = incoming.stream().map_err(|()| HttpError::Failed(format!("{url}: body taken")))?;
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => body.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => {
                    if let Some(code) = wasip2::http::types::http_error_code(&e) {
                        return Err(error(url, code));
                    }
                    // The host (wasmtime 48) hands body errors over as text only.
                    let text = e.to_debug_string();
                    let lower = text.to_ascii_lowercase();
                    return Err(if lower.contains("body size") {
                        HttpError::TooLarge(format!("{url}: {text}"))
                    } else if lower.contains("timeout") || lower.contains("timed out") {
                        HttpError::Timeout(format!("{url}: reading the body: {text}"))
                    } else {
                        HttpError::Failed(format!("{url}: reading the body: {text}"))
                    });
                }
            }
        }
    }
    Ok(Response { status, headers, body })
}

fn error(url: &str, e: ErrorCode) -> HttpError {
    match e {
        ErrorCode::HttpRequestDenied => HttpError::Denied(format!("{url} is not in the handler's allowed_outbound_hosts")),
        ErrorCode::ConnectionTimeout | ErrorCode::ConnectionReadTimeout | ErrorCode::HttpResponseTimeout => {
            HttpError::Timeout(format!("{url}: {e:?}"))
        }
        ErrorCode::HttpResponseBodySize(n) => HttpError::TooLarge(match n {
            Some(n) => format!("{url}: {n} bytes, over the handler's http_max_response"),
            None => format!("{url}: over the handler's http_max_response"),
        }),
        ErrorCode::HttpRequestUriInvalid => HttpError::BadUrl(url.to_owned()),
        other => HttpError::Failed(format!("{url}: {other:?}")),
    }
}
