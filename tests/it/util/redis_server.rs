//! A private redis-server per test: started on a free loopback port, killed by its pid on drop.
//! Never touches a server it did not start (the machine's shared one on 6379 included).
//!
//! A free port is only free when probed: another test may start its own server on it before ours
//! binds. So a server counts as started only once the process answering PING on that port reports our
//! child's pid (`INFO server` → `process_id`); otherwise ours lost the race, is killed, and we try
//! another port.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

fn binary() -> String {
    std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral loopback port")
        .port()
}

impl RedisServer {
    /// A fresh server without persistence.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A fresh server with extra `--option value` arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        let mut server = RedisServer {
            child: None,
            port: 0,
            dir: tempfile::tempdir().expect("temp dir for redis"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for _ in 0..5 {
            server.port = free_port();
            if server.spawn() {
                return server;
            }
            // Someone took the port between our probe and redis's bind; try another.
        }
        panic!("could not start redis-server on a free port after 5 tries");
    }

    /// Starts the process on `self.port`; true once it answers PING.
    fn spawn(&mut self) -> bool {
        let log: PathBuf = self.dir.path().join("redis.log");
        let child = Command::new(binary())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (is it installed? .ci/run installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_exited))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return false;
            }
            match self.answering_pid() {
                Some(pid) if pid == self.pid() as u32 => return true,
                // Another test's server holds the port: ours cannot bind it.
                Some(_) => break,
                None => {}
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }

    /// The pid of whatever redis-server answers on our port, once it has loaded its data (while it
    /// loads, every command but a few is refused with LOADING: not started yet).
    fn answering_pid(&self) -> Option<u32> {
        let info: String = redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
            .and_then(|mut c| {
                redis::cmd("INFO")
                    .arg("server")
                    .arg("persistence")
                    .query(&mut c)
            })
            .ok()?;
        if info.lines().any(|l| l.trim() == "loading:1") {
            return None;
        }
        info.lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|p| p.trim().parse().ok())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The server's pid, for SIGSTOP/SIGCONT.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// SIGKILL by pid, and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kill and start again on the same port, without persistence: all data is gone, as after a crash.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not come back on port {}", self.port);
    }

    /// Kill, forget whatever the server had persisted (its AOF and RDB files), and start again on the
    /// same port: a server that comes back empty even with persistence on.
    pub fn restart_empty(&mut self) {
        self.kill();
        for name in ["appendonlydir", "dump.rdb"] {
            let path = self.dir.path().join(name);
            let _ = std::fs::remove_dir_all(&path);
            let _ = std::fs::remove_file(&path);
        }
        self.restart();
    }

    /// A plain synchronous connection for test set-up and inspection. Its deadline is generous: a
    /// server busy with a test's 100 MB entries on a loaded machine answers the handshake late, and a
    /// deadline costs nothing when it answers at once.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .expect("valid url")
            .get_connection_with_timeout(Duration::from_secs(30))
            .expect("connect to the test redis")
    }
}

/// Inspection helpers, on a fresh synchronous connection each.
impl RedisServer {
    pub fn xadd(&self, stream: &str, fields: &[(&str, &str)]) -> String {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream).arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(*v);
        }
        cmd.query(&mut self.conn()).expect("XADD")
    }

    /// A backlog: `n` entries `n = 0, 1, …` added in pipelines of 1,000; their ids in order.
    pub fn xadd_backlog(&self, stream: &str, n: usize) -> Vec<String> {
        self.xadd_wide_backlog(stream, n, 0)
    }

    /// [`Self::xadd_backlog`] with a `pad` field of `pad` bytes in each entry.
    pub fn xadd_wide_backlog(&self, stream: &str, n: usize, pad: usize) -> Vec<String> {
        let mut conn = self.conn();
        let mut ids = Vec::with_capacity(n);
        let padding = "x".repeat(pad);
        for start in (0..n).step_by(1000) {
            let mut pipe = redis::pipe();
            for i in start..n.min(start + 1000) {
                let cmd = pipe.cmd("XADD").arg(stream).arg("*").arg("n").arg(i);
                if pad > 0 {
                    cmd.arg("pad").arg(&padding);
                }
            }
            ids.extend(pipe.query::<Vec<String>>(&mut conn).expect("XADD"));
        }
        ids
    }

    /// Puts a string at `key`: a key of another type where a stream is expected.
    pub fn set_string(&self, key: &str) {
        redis::cmd("SET")
            .arg(key)
            .arg("x")
            .query::<()>(&mut self.conn())
            .expect("SET");
    }

    pub fn xlen(&self, stream: &str) -> u64 {
        redis::cmd("XLEN")
            .arg(stream)
            .query(&mut self.conn())
            .expect("XLEN")
    }

    /// Every entry of a stream, decoded by the library's own decoder.
    pub fn entries(&self, stream: &str) -> Vec<redstream::model::envelope::Entry> {
        let v: redis::Value = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query(&mut self.conn())
            .expect("XRANGE");
        redstream::client::decode::entries(v)
            .expect("decodable")
            .entries
    }

    /// How many entries the group has pending (0 if the group does not exist).
    pub fn pending(&self, stream: &str, group: &str) -> u64 {
        let v: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .query(&mut self.conn());
        match v {
            Ok(redis::Value::Array(parts)) => parts
                .first()
                .and_then(redstream::client::decode::int)
                .unwrap_or(0) as u64,
            _ => 0,
        }
    }

    /// How many entries the group has read (XINFO GROUPS `entries-read`; 0 if it does not exist).
    pub fn entries_read(&self, stream: &str, group: &str) -> u64 {
        let rows: Vec<redis::Value> = redis::cmd("XINFO")
            .arg(&["GROUPS", stream])
            .query(&mut self.conn())
            .unwrap_or_default();
        rows.into_iter()
            .filter_map(|row| redstream::client::decode::pairs(row).ok())
            .find_map(|mut p| {
                let name = redstream::client::decode::string(redstream::client::decode::take(
                    &mut p, "name",
                ))?;
                (name == group)
                    .then(|| {
                        redstream::client::decode::int(&redstream::client::decode::take(
                            &mut p,
                            "entries-read",
                        ))
                    })
                    .flatten()
            })
            .map_or(0, |n| n.max(0) as u64)
    }

    /// Pending entries of one consumer.
    /// The delivery count of each entry pending in `group` (at most 1000).
    pub fn deliveries(&self, stream: &str, group: &str) -> std::collections::HashMap<String, u64> {
        let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(&[stream, group, "-", "+", "1000"])
            .query(&mut self.conn())
            .unwrap();
        rows.into_iter().map(|(id, _, _, n)| (id, n)).collect()
    }

    /// The ids of the messages `stream`'s replies answer (from their `_cause`), sorted.
    pub fn answered(&self, stream: &str) -> Vec<String> {
        let mut ids: Vec<String> = self
            .entries(stream)
            .iter()
            .filter_map(|e| Some(e.fields.get_str("_cause")?.rsplit('/').next()?.to_owned()))
            .collect();
        ids.sort();
        ids
    }

    pub fn pending_of(&self, stream: &str, group: &str, consumer: &str) -> u64 {
        let v: redis::RedisResult<Vec<redis::Value>> = redis::cmd("XPENDING")
            .arg(&[stream, group, "-", "+", "100000", consumer])
            .query(&mut self.conn());
        v.map(|rows| rows.len() as u64).unwrap_or(0)
    }

    /// How many clients Redis has blocked in a command (a BLOCK read waiting), from INFO clients.
    pub fn blocked_clients(&self) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("clients")
            .query(&mut self.conn())
            .expect("INFO clients");
        info.lines()
            .find_map(|l| l.strip_prefix("blocked_clients:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("INFO clients reports blocked_clients")
    }

    /// Names of the group's consumers (XINFO CONSUMERS).
    pub fn consumers(&self, stream: &str, group: &str) -> Vec<String> {
        let rows: Vec<redis::Value> = redis::cmd("XINFO")
            .arg(&["CONSUMERS", stream, group])
            .query(&mut self.conn())
            .expect("XINFO CONSUMERS");
        rows.into_iter()
            .filter_map(|row| {
                let mut p = redstream::client::decode::pairs(row).ok()?;
                redstream::client::decode::string(redstream::client::decode::take(&mut p, "name"))
            })
            .collect()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
