//! `handler dev`'s stand-in for the hosts a project's cases stub: the same `"http"` stubs that answer
//! `handler test`, served over real HTTP to the daemon the loop runs.
//!
//! Owns one loopback listener per stubbed origin (`https://hooks.example.com`, as the stubs write it)
//! and the thread serving them. A request is answered by the first stub of cases.jsonl (read again for
//! each request, so an edited stub answers at once) whose URL — the origin it stands for, and the
//! request's path and query — and method match; else 404 naming what is missing. Each request is
//! printed with its `Idempotency-Key`. How requests reach it is `dev`'s business: it points the
//! handler's config URLs on a stubbed origin here, and grants the listener's origin (see
//! `dev::redirect`).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;

use super::handler::Stub;

/// The stub listeners of a `handler dev` run.
pub struct StubServer {
    dir: PathBuf,
    runtime: tokio::runtime::Handle,
    /// Origin as the stubs write it → the listener's port.
    served: BTreeMap<String, u16>,
}

/// The origin of `url` as written (`scheme://authority`, scheme http or https); None for other URLs.
pub fn origin_of(url: &str) -> Option<&str> {
    let (scheme, rest) = url.split_once("://")?;
    if !(scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")) {
        return None;
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    (end > 0).then(|| &url[..scheme.len() + 3 + end])
}

impl StubServer {
    /// A server for the project in `dir`, serving nothing yet (see [`StubServer::serve_stubbed`]).
    pub fn start(dir: &Path) -> std::io::Result<StubServer> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("dev-stubs".into())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
        Ok(StubServer {
            dir: dir.to_path_buf(),
            runtime: handle,
            served: BTreeMap::new(),
        })
    }

    /// Listens for every origin the project's stubs name and no listener serves yet; every origin
    /// served and its port.
    pub fn serve_stubbed(&mut self) -> std::io::Result<&BTreeMap<String, u16>> {
        for stub in Stub::of_project(&self.dir) {
            let Some(origin) = origin_of(&stub.url) else {
                continue;
            };
            if self.served.contains_key(origin) {
                continue;
            }
            let listener = TcpListener::bind(("127.0.0.1", 0))?;
            listener.set_nonblocking(true)?;
            let port = listener.local_addr()?.port();
            self.served.insert(origin.to_owned(), port);
            let (origin, dir) = (origin.to_owned(), self.dir.clone());
            self.runtime.spawn(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => return println!("dev: cannot serve the stubs of {origin}: {e}"),
                };
                while let Ok((stream, _)) = listener.accept().await {
                    let (origin, dir) = (origin.clone(), dir.clone());
                    let service = hyper::service::service_fn(move |request| {
                        answer(origin.clone(), dir.clone(), request)
                    });
                    tokio::spawn(
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                    );
                }
            });
        }
        Ok(&self.served)
    }
}

/// Answers one request to the stand-in of `origin` from the project's stubs, and prints it.
async fn answer(
    origin: String,
    dir: PathBuf,
    request: hyper::Request<Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
    let method = request.method().to_string();
    let url = format!(
        "{origin}{}",
        request.uri().path_and_query().map_or("/", |p| p.as_str())
    );
    let key = request
        .headers()
        .get(crate::handlers::wasm::outbound::IDEMPOTENCY_KEY)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let key = key
        .map(|k| format!(", Idempotency-Key {k}"))
        .unwrap_or_default();
    let (status, headers, body) = match Stub::find(&Stub::of_project(&dir), &method, &url) {
        Some(made) => {
            println!(
                "dev: http {method} {url} ({} bytes{key}): stub answered {}",
                body.len(),
                made.0
            );
            made
        }
        None => {
            println!(
                "dev: http {method} {url} ({} bytes{key}): no stub in cases.jsonl, answered 404",
                body.len()
            );
            let why = format!("no stub for {method} {url} in cases.jsonl (redstream handler dev)");
            (404, Vec::new(), why.into_bytes())
        }
    };
    let mut response = hyper::Response::builder().status(status);
    for (name, value) in &headers {
        response = response.header(name, value);
    }
    Ok(response
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|e| {
            let why = format!("the stub for {url} is not a valid response: {e}");
            println!("dev: {why}");
            let mut r = hyper::Response::new(Full::new(Bytes::from(why)));
            *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
            r
        }))
}

#[cfg(test)]
mod tests {
    use super::origin_of;

    #[test]
    fn origin_of_takes_scheme_and_authority_as_written() {
        assert_eq!(
            origin_of("https://hooks.example.com/a?b"),
            Some("https://hooks.example.com")
        );
        assert_eq!(
            origin_of("http://127.0.0.1:8080"),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(origin_of("HTTP://h?x"), Some("HTTP://h"));
        assert_eq!(origin_of("ftp://h/x"), None);
        assert_eq!(origin_of("https:///x"), None);
        assert_eq!(origin_of("nova:task:x:y"), None);
    }
}
