//! A small HTTP/1.1 server for the outbound HTTP tests, on a free loopback port, one thread per
//! connection. It answers by path and records every request (path, method, `Idempotency-Key`, body)
//! and the most requests it held at once:
//!
//! - `/ok` — 200 `hello`;
//! - `/slow?ms=N` — 200 after N ms;
//! - `/big?bytes=N` — 200 with N bytes and their Content-Length;
//! - `/flood?bytes=N` — 200 with N bytes and no length (the connection closes after them);
//! - `/redirect?to=URL` — 302 to URL;
//! - anything else — 404.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub idempotency_key: Option<String>,
    pub body: Vec<u8>,
}

#[derive(Default)]
struct Shared {
    seen: Mutex<Vec<Seen>>,
    in_flight: AtomicUsize,
    most: AtomicUsize,
    stop: AtomicBool,
}

pub struct HttpServer {
    pub port: u16,
    shared: Arc<Shared>,
}

impl HttpServer {
    pub fn start() -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || serve(conn, &s));
            }
        });
        HttpServer { port, shared }
    }

    /// `http://127.0.0.1:PORT` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// The most requests in progress at one time.
    pub fn most_at_once(&self) -> usize {
        self.shared.most.load(Ordering::Relaxed)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(conn: TcpStream, s: &Shared) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let target = parts.next().unwrap_or("/").to_owned();
    let mut length = 0usize;
    let mut key = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((name, value)) = h.trim_end().split_once(':') {
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse().unwrap_or(0),
                "idempotency-key" => key = Some(value.to_owned()),
                _ => {}
            }
        }
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    s.most.fetch_max(now, Ordering::SeqCst);
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    s.seen.lock().unwrap().push(Seen {
        method,
        path: path.to_owned(),
        idempotency_key: key,
        body,
    });
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
    };
    let number = |name: &str| {
        param(name)
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0)
    };
    let mut conn = conn;
    let response: Vec<u8> = match path {
        "/ok" => respond(200, &[], b"hello"),
        "/slow" => {
            std::thread::sleep(Duration::from_millis(number("ms") as u64));
            respond(200, &[], b"slow")
        }
        "/big" => respond(200, &[], &vec![b'x'; number("bytes")]),
        "/flood" => {
            let mut r = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_vec();
            r.extend(vec![b'x'; number("bytes")]);
            r
        }
        "/redirect" => respond(302, &[("location", &param("to").unwrap_or_default())], b""),
        _ => respond(404, &[], b"not found"),
    };
    // Done before the answer leaves: the client cannot start its next request while this one
    // still counts.
    s.in_flight.fetch_sub(1, Ordering::SeqCst);
    let _ = conn.write_all(&response);
    let _ = conn.flush();
}

fn respond(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (n, v) in headers {
        r.push_str(&format!("{n}: {v}\r\n"));
    }
    r.push_str("\r\n");
    let mut r = r.into_bytes();
    r.extend_from_slice(body);
    r
}
