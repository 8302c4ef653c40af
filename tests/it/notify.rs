//! The notify protocol without systemd: the test binds its own unix datagram socket, passes it as
//! NOTIFY_SOCKET (with WATCHDOG_USEC) to the daemon, and reads what arrives.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::util::{Daemon, RedisServer, daemon_toml};

pub struct Socket {
    sock: UnixDatagram,
    pub path: String,
    _dir: tempfile::TempDir,
}

impl Socket {
    pub fn bind() -> Socket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Socket {
            sock,
            path: path.to_string_lossy().into_owned(),
            _dir: dir,
        }
    }

    /// Every datagram received within `limit`, one state per line, with its arrival time.
    fn collect(&self, limit: Duration) -> Vec<(Instant, String)> {
        let deadline = Instant::now() + limit;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                for line in String::from_utf8_lossy(&buf[..n]).lines() {
                    out.push((Instant::now(), line.to_owned()));
                }
            }
        }
        out
    }

    /// Waits for a state starting with `prefix`; returns everything received up to it.
    pub fn until(&self, prefix: &str, limit: Duration) -> Vec<String> {
        self.until_matching(|l| l.starts_with(prefix), limit)
    }

    /// Waits for a state `wanted` accepts; returns everything received up to it.
    pub fn until_matching(&self, wanted: impl Fn(&str) -> bool, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                for line in String::from_utf8_lossy(&buf[..n]).lines() {
                    seen.push(line.to_owned());
                }
                if seen.iter().any(|l| wanted(l)) {
                    return seen;
                }
            }
        }
        panic!("no such state within {limit:?}; got {seen:?}");
    }
}

fn count(states: &[(Instant, String)], state: &str) -> usize {
    states.iter().filter(|(_, s)| s == state).count()
}

fn consumer(group: &str) -> String {
    format!(
        "[[consumers]]\nstream = \"nova:task:notify:in\"\ngroup = \"{group}\"\nstart = \"0\"\nhandler = \"drop\"\n\
         block = \"500ms\"\nhandler_timeout = \"500ms\"\nclaim_min_idle = \"2s\"\n"
    )
}

#[test]
fn ready_after_groups_exist_watchdog_while_healthy_even_through_a_redis_outage_and_stopping() {
    let mut server = RedisServer::start();
    let socket = Socket::bind();
    let toml = daemon_toml(&server.url(), &consumer("watched"))
        .replace("command_timeout = \"2s\"", "command_timeout = \"500ms\"")
        .replace("connect_timeout = \"2s\"", "connect_timeout = \"500ms\"");
    let mut d = Daemon::start(
        &toml,
        &[("NOTIFY_SOCKET", &socket.path), ("WATCHDOG_USEC", "600000")],
    );
    let before = socket.until("READY=1", Duration::from_secs(20));
    assert!(
        before.iter().all(|s| !s.starts_with("WATCHDOG")),
        "no ping before READY: {before:?}"
    );
    assert!(
        before
            .iter()
            .any(|s| s.starts_with("STATUS=") && s.contains("/s)") && s.contains("pending")),
        "{before:?}"
    );
    let mut conn = server.conn();
    let groups: Vec<redis::Value> = redis::cmd("XINFO")
        .arg(&["GROUPS", "nova:task:notify:in"])
        .query(&mut conn)
        .unwrap();
    assert_eq!(groups.len(), 1);

    let healthy = socket.collect(Duration::from_millis(1600));
    assert!(
        count(&healthy, "WATCHDOG=1") >= 4,
        "pings every 300 ms: {healthy:?}"
    );

    // A Redis outage is waited out, not a reason to be restarted.
    server.kill();
    let outage = socket.collect(Duration::from_secs(4));
    assert!(
        count(&outage, "WATCHDOG=1") >= 10,
        "pings go on while the loop backs off: {outage:?}"
    );
    server.restart();

    d.signal(libc::SIGTERM);
    socket.until("STOPPING=1", Duration::from_secs(5));
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_wedged_loop_stops_the_watchdog_pings() {
    let server = RedisServer::start();
    let socket = Socket::bind();
    let toml = daemon_toml(
        &server.url(),
        &format!("{}{}", consumer("healthy"), consumer("wedgy")),
    )
    .replace("command_timeout = \"2s\"", "command_timeout = \"500ms\"")
    .replace("connect_timeout = \"2s\"", "connect_timeout = \"500ms\"");
    let d = Daemon::start(
        &toml,
        &[
            ("NOTIFY_SOCKET", &socket.path),
            ("WATCHDOG_USEC", "600000"),
            ("RSFAULT_WEDGE_GROUP", "wedgy"),
        ],
    );
    socket.until("READY=1", Duration::from_secs(20));
    assert!(count(&socket.collect(Duration::from_secs(1)), "WATCHDOG=1") >= 2);
    server.xadd("nova:task:notify:in", &[("n", "1")]); // the `wedgy` loop hangs on it
    // Its last word was "healthy while this read lasts" (about 6.5 s); after that the pings stop.
    let states = socket.collect(Duration::from_secs(12));
    let last_ping = states
        .iter()
        .rev()
        .find(|(_, s)| s == "WATCHDOG=1")
        .map(|(t, _)| *t);
    let end = Instant::now();
    let silent = last_ping.map_or(Duration::from_secs(12), |t| end - t);
    assert!(
        silent >= Duration::from_secs(3),
        "pings stopped ({silent:?} of silence): {states:?}"
    );
    assert!(
        d.wait_log("withholding the watchdog ping", Duration::from_secs(1)),
        "{}",
        d.logs().join("\n")
    );
}

#[test]
fn stopping_extends_the_timeout_while_draining() {
    let server = RedisServer::start();
    let socket = Socket::bind();
    let consumer = "[[consumers]]\nstream = \"nova:task:notify:slow\"\ngroup = \"g\"\nstart = \"0\"\nhandler = \"faults\"\n\
        handler_timeout = \"10s\"\nclaim_min_idle = \"20s\"\nfaults = { sleep = \"3s\" }\n";
    let mut d = Daemon::start(
        &daemon_toml(&server.url(), consumer),
        &[("NOTIFY_SOCKET", &socket.path)],
    );
    socket.until("READY=1", Duration::from_secs(20));
    server.xadd(
        "nova:task:notify:slow",
        &[("n", "1"), ("faults_announce", "1")],
    );
    // In its handler (pending in Redis is not enough: a stop before the loop has the read's reply
    // leaves the entry for the next start, as it should).
    assert!(
        d.wait_log("faults: handling the message", Duration::from_secs(10)),
        "{}",
        d.logs().join("\n")
    );
    d.signal(libc::SIGTERM);
    // A deadline to wait within, not a bound on when it comes (the usec figure below says that): on a
    // saturated machine the first EXTEND came later than 5 s once.
    let seen = socket.until("EXTEND_TIMEOUT_USEC=", Duration::from_secs(15));
    assert!(seen.iter().any(|s| s == "STOPPING=1"), "{seen:?}");
    let usec: u64 = seen
        .iter()
        .find_map(|s| s.strip_prefix("EXTEND_TIMEOUT_USEC="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        usec > 5_000_000,
        "asks for the remaining drain time: {usec}"
    );
    assert_eq!(
        d.wait_exit(Duration::from_secs(15)),
        Some(0),
        "the slow message finished and was committed"
    );
    assert_eq!(server.pending("nova:task:notify:slow", "g"), 0);
}

#[test]
fn a_manager_that_stops_reading_never_stalls_the_daemon() {
    let server = RedisServer::start();
    let socket = Socket::bind();
    // Pings every 50 ms into a socket nobody reads after READY: its queue (10 datagrams by default)
    // is full within a second. A blocking send would stall the runtime, and SIGTERM with it.
    let mut d = Daemon::start(
        &daemon_toml(&server.url(), &consumer("unread")),
        &[("NOTIFY_SOCKET", &socket.path), ("WATCHDOG_USEC", "100000")],
    );
    socket.until("READY=1", Duration::from_secs(20));
    // The queue is full once the daemon says its notifications are being dropped.
    assert!(
        d.wait_log("notify socket is full", Duration::from_secs(10)),
        "{}",
        d.logs().join("\n")
    );
    for n in 0..20 {
        server.xadd("nova:task:notify:in", &[("n", &n.to_string())]);
    }
    crate::util::wait_for("all handled", Duration::from_secs(10), || {
        (server.pending("nova:task:notify:in", "unread") == 0
            && server.entries_read("nova:task:notify:in", "unread") == 20)
            .then_some(())
    });
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
}
