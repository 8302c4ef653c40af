//! The side-by-side benchmark: RedStream against the redis-rs loops a user could write by hand, in one
//! run, against a private redis-server this benchmark starts and stops itself.
//!
//!   scripts/bench            (or: cargo bench --bench pipeline; BENCH_N, BENCH_REPEATS, BENCH_LAT_SECS,
//!                             BENCH_CASES=cd to measure only those cases, k for the cluster table,
//!                             l for the latency table; BENCH_SHAPES=2f,5f,4k)
//!
//! BENCH_PIN=1 (on a machine with two cores or more) runs redis-server on the first core and
//! everything measured (the daemon, this process's raw loops) on the second. Each case's spread —
//! half the range of its rounds, over its median — is printed beside its rate and beside its ratio
//! to its base (taken round by round), and the largest of each as the run's resolution.
//!
//! Cases, interleaved and repeated so machine noise hits all of them; medians are reported:
//!   a  raw redis-rs loop: XREADGROUP COUNT 500, then one XACK per batch
//!   p  the same loop in Python (redis-py + hiredis), when BENCH_PYTHON names an interpreter
//!   b  the daemon, no-op WASM handler, a fresh instance per message
//!   c  the daemon, no-op WASM handler, a reused instance
//!   d  the daemon, echo WASM handler (one reply per message, committed atomically with the ack)
//!   e  raw counterpart of d: XREADGROUP, then XADD per message and one XACK, pipelined
//! b, c and d each run with the consumer's default settings, tuned small (b-) and tuned large (b+).
//! then end-to-end latency (XADD time → handler) at a steady rate, for the daemon and the raw loop,
//! and (BENCH_CLUSTER=1, the default) the echo workload on a Redis Cluster: three hash-tagged streams on
//! 1 master with 1 daemon, on 3 masters with 3 daemons, and on 3 masters with every reply crossing
//! slots (through the outbox).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::Value;

const STREAM: &str = "nova:task:bench:tasks";
const OUT: &str = "nova:task:bench:out";
const GROUP: &str = "bench";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

// ---------------------------------------------------------------------------------------------------
// Pinning: redis-server on one core, what is measured on another.

/// (redis-server's core, the measured side's core), when the machine has two and BENCH_PIN is not 0.
/// Decided once, before this thread is bound: after that, it sees one core.
fn cores() -> Option<(usize, usize)> {
    static CORES: std::sync::OnceLock<Option<(usize, usize)>> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        (env_or("BENCH_PIN", 0) != 0 && n >= 2).then_some((0, 1))
    })
}

/// Binds the calling thread (pid 0) or process `pid` to `cpu`.
fn bind(pid: libc::pid_t, cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes within it (cpu < CPU_SETSIZE).
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A redis-server command, bound to redis-server's core when pinning.
fn redis_server() -> Command {
    let mut cmd = Command::new("redis-server");
    if let Some((cpu, _)) = cores() {
        use std::os::unix::process::CommandExt as _;
        // SAFETY: sched_setaffinity is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || bind(0, cpu));
        }
    }
    cmd
}

/// Half the range of `v` over its median: how far apart the rounds of a case were.
fn spread(v: &[f64]) -> f64 {
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
    let m = median(v.to_vec());
    if m > 0.0 { (hi - lo) / 2.0 / m } else { 0.0 }
}

// ---------------------------------------------------------------------------------------------------
// A private redis-server.

struct Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = redis_server()
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/setup installs it)");
        let s = Server {
            child,
            port,
            _dir: dir,
        };
        for _ in 0..500 {
            if s.conn_opt().is_some() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start");
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn conn_opt(&self) -> Option<redis::Connection> {
        let mut c = redis::Client::open(self.url())
            .ok()?
            .get_connection()
            .ok()?;
        redis::cmd("PING").query::<String>(&mut c).ok()?;
        Some(c)
    }

    fn conn(&self) -> redis::Connection {
        self.conn_opt().expect("connect")
    }

    /// Empties the server and loads `n` task messages of about 200 bytes, with a group at 0.
    fn preload(&self, n: usize) {
        self.preload_shape(n, Shape::Two);
    }

    /// Empties the server and loads `n` messages of `shape`, with a group at 0.
    fn preload_shape(&self, n: usize, shape: Shape) {
        let mut c = self.conn();
        let _: () = redis::cmd("FLUSHALL").query(&mut c).unwrap();
        load_shape(&mut c, STREAM, n, shape);
        let _: () = redis::cmd("XGROUP")
            .arg(&["CREATE", STREAM, GROUP, "0", "MKSTREAM"])
            .query(&mut c)
            .unwrap();
    }

    /// Entries read by the group and entries pending, from XINFO GROUPS.
    fn progress(&self, c: &mut redis::Connection) -> (u64, u64) {
        let rows: Vec<Value> = redis::cmd("XINFO")
            .arg(&["GROUPS", STREAM])
            .query(c)
            .unwrap_or_default();
        for row in rows {
            let mut p = redstream::client::decode::pairs(row).unwrap();
            if redstream::client::decode::string(redstream::client::decode::take(&mut p, "name"))
                .as_deref()
                == Some(GROUP)
            {
                let read = redstream::client::decode::int(&redstream::client::decode::take(
                    &mut p,
                    "entries-read",
                ))
                .unwrap_or(0);
                let pending = redstream::client::decode::int(&redstream::client::decode::take(
                    &mut p, "pending",
                ))
                .unwrap_or(0);
                return (read.max(0) as u64, pending.max(0) as u64);
            }
        }
        (0, 0)
    }
}

/// The messages a case drains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Shape {
    /// Two fields, ~200 bytes: a type and a task as JSON.
    Two,
    /// Five flat fields, ~200 bytes: the TypeScript RedStream's task message.
    Five,
    /// Two fields, ~4 KB: a type and a document.
    FourK,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Two => "2 fields, ~200 B",
            Shape::Five => "5 fields, ~200 B",
            Shape::FourK => "2 fields, ~4 KB",
        }
    }

    fn parse(s: &str) -> Option<Shape> {
        match s.trim() {
            "2f" => Some(Shape::Two),
            "5f" => Some(Shape::Five),
            "4k" => Some(Shape::FourK),
            _ => None,
        }
    }

    /// The fields of message `i`.
    fn fields(self, i: usize) -> Vec<(&'static str, String)> {
        match self {
            Shape::Two => vec![
                ("type", "task_snapshot".into()),
                (
                    "task",
                    format!(
                        r#"{{"id":"t{i}","title":"benchmark task {}","status":"open","revision":1}}"#,
                        "x".repeat(60)
                    ),
                ),
            ],
            Shape::Five => vec![
                ("type", "task_created".into()),
                ("task_id", format!("t{i:08}")),
                ("title", format!("write the quarterly report, part {i}")),
                ("priority", "high".into()),
                ("assignee", "mcp-server-boomerang@nova.example.org".into()),
            ],
            Shape::FourK => vec![
                ("type", "document_snapshot".into()),
                (
                    "document",
                    format!(r#"{{"id":"d{i}","body":"{}"}}"#, "lorem ipsum ".repeat(338)),
                ),
            ],
        }
    }
}

/// Adds `n` task messages of about 200 bytes to `stream`, pipelined.
fn load_tasks(c: &mut redis::Connection, stream: &str, n: usize) {
    load_shape(c, stream, n, Shape::Two);
}

/// Adds `n` messages of `shape` to `stream`, pipelined.
fn load_shape(c: &mut redis::Connection, stream: &str, n: usize, shape: Shape) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(2000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            let cmd = pipe.cmd("XADD").arg(stream).arg("*");
            for (name, value) in shape.fields(*i) {
                cmd.arg(name).arg(value);
            }
            cmd.ignore();
        }
        let _: () = pipe.query(c).unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------------
// Process accounting from /proc.

/// CPU time (user + system) of a process, in microseconds.
fn cpu_us(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks * 10_000 // USER_HZ = 100
}

/// A memory figure (`VmHWM:`, `VmRSS:` …) of a process from /proc, in bytes.
fn proc_memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Peak resident memory (VmHWM) of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    proc_memory(pid, "VmHWM:")
}

// ---------------------------------------------------------------------------------------------------
// The daemon as a process.

/// The consumer settings a case runs with. The defaults are caps the adaptive pace grows into
/// (`batch_size` 500, `in_flight` 2000), so "tuned" means what a user tuning by hand would try around
/// them: a small read and window, and the largest the config allows.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Tuning {
    Default,
    Small,
    Large,
}

impl Tuning {
    fn config(self) -> &'static str {
        match self {
            Tuning::Default => "",
            Tuning::Small => "batch_size = 100\nin_flight = 400\n",
            Tuning::Large => "batch_size = 500\nin_flight = 5000\n",
        }
    }
}

struct Daemon {
    child: Child,
    notify: UnixDatagram,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(server: &Server, handler: &Path, mode: &str, reuse: bool) -> Daemon {
        Self::start_with(server, handler, mode, reuse, 0, Tuning::Default)
    }

    /// With `extra` more handlers loaded (and routed to nothing), to measure what handlers cost at rest.
    fn start_with(
        server: &Server,
        handler: &Path,
        mode: &str,
        reuse: bool,
        extra: usize,
        tuning: Tuning,
    ) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let tuning = tuning.config();
        let config = dir.path().join("bench.toml");
        let instance = if reuse { "reuse" } else { "fresh" };
        let extra_handlers: String = (0..extra)
            .map(|i| {
                format!(
                    "[[handlers]]\nname = \"extra{i}\"\nfile = \"{}\"\nroles = [\"task_write\"]\ninstance = \"reuse\"\n\
                     config = {{ mode = \"noop\" }}\n",
                    handler.display()
                )
            })
            .collect();
        std::fs::write(
            &config,
            format!(
                r#"
[identity]
name = "bench"
roles = ["admin"]
[redis]
url = "{url}"
[auth]
signing_key = "k"
[[auth.keys]]
id = "k"
algorithm = "HS256"
secret = "benchmark-secret-benchmark-secret-0123456789"
[log]
level = "warn"
[heartbeat]
enabled = false
[control]
enabled = false
[wasm]
cache_dir = "{cache}"
[[handlers]]
name = "bench"
file = "{file}"
roles = ["task_write"]
instance = "{instance}"
config = {{ mode = "{mode}", reply_to = "{OUT}" }}
{extra_handlers}
[[consumers]]
stream = "{STREAM}"
group = "{GROUP}"
consumer = "daemon"
start = "0"
handler = "bench"
block = "1s"
{tuning}"#,
                url = server.url(),
                cache = dir.path().join("cache").display(),
                file = handler.display(),
            ),
        )
        .unwrap();
        Daemon::spawn(&config, dir)
    }

    /// Starts `redstream run` on `config` (in `dir`) and waits for READY=1.
    fn spawn(config: &Path, dir: tempfile::TempDir) -> Daemon {
        let sock_path = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&sock_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_redstream"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("NOTIFY_SOCKET", &sock_path)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child,
            notify,
            _dir: dir,
        };
        d.wait_ready();
        // Keep reading its log so a chatty daemon never blocks on a full pipe.
        if let Some(err) = d.child.stderr.take() {
            std::thread::spawn(
                move || {
                    for _ in BufReader::new(err).lines().map_while(Result::ok) {}
                },
            );
        }
        d
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.notify.recv(&mut buf)
                && String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut err = String::new();
                if let Some(e) = self.child.stderr.take() {
                    for l in BufReader::new(e).lines().map_while(Result::ok) {
                        err.push_str(&l);
                        err.push('\n');
                    }
                }
                panic!("the daemon exited with {status}:\n{err}");
            }
        }
        panic!("the daemon did not become ready");
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(mut self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------------
// Cases.

/// One measured drain.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    rate: f64,
    cpu_us_per_msg: f64,
    /// redis-server's CPU per message in the same drain: what the consumer costs the server.
    redis_us_per_msg: f64,
    rss: u64,
}

/// Drains `n` preloaded messages of `shape` with the daemon, tuned or with default consumer settings.
fn daemon_drain(
    server: &Server,
    handler: &Path,
    (mode, reuse, tuned): (&str, bool, Tuning),
    n: usize,
    shape: Shape,
) -> Sample {
    server.preload_shape(n, shape);
    let mut c = server.conn();
    let d = Daemon::start_with(server, handler, mode, reuse, 0, tuned);
    let (cpu0, redis0, t0) = (cpu_us(d.pid()), cpu_us(server.pid()), Instant::now());
    loop {
        let (read, pending) = server.progress(&mut c);
        if read >= n as u64 && pending == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let elapsed = t0.elapsed();
    let sample = Sample {
        rate: n as f64 / elapsed.as_secs_f64(),
        cpu_us_per_msg: (cpu_us(d.pid()) - cpu0) as f64 / n as f64,
        redis_us_per_msg: (cpu_us(server.pid()) - redis0) as f64 / n as f64,
        rss: peak_rss(d.pid()),
    };
    if mode == "echo" {
        assert_eq!(
            redis::cmd("XLEN").arg(OUT).query::<u64>(&mut c).unwrap(),
            n as u64,
            "one reply per message"
        );
    }
    d.stop();
    sample
}

/// Raw loop (a) or (e), in this process.
fn raw_drain(server: &Server, echo: bool, n: usize, shape: Shape) -> Sample {
    server.preload_shape(n, shape);
    let mut c = server.conn();
    let me = std::process::id();
    let (cpu0, redis0, t0) = (cpu_us(me), cpu_us(server.pid()), Instant::now());
    let opts = redis::streams::StreamReadOptions::default()
        .group(GROUP, "raw")
        .count(500);
    let mut done = 0;
    while done < n {
        let reply: redis::streams::StreamReadReply =
            redis::Commands::xread_options(&mut c, &[STREAM], &[">"], &opts).unwrap();
        let ids: Vec<String> = reply
            .keys
            .iter()
            .flat_map(|k| k.ids.iter().map(|e| e.id.clone()))
            .collect();
        if ids.is_empty() {
            continue;
        }
        if echo {
            let mut pipe = redis::pipe();
            for key in &reply.keys {
                for e in &key.ids {
                    let mut cmd = redis::cmd("XADD");
                    cmd.arg(OUT).arg("*");
                    for (k, v) in &e.map {
                        if let Value::BulkString(bytes) = v {
                            cmd.arg(k).arg(bytes);
                        }
                    }
                    pipe.add_command(cmd).ignore();
                }
            }
            pipe.cmd("XACK").arg(STREAM).arg(GROUP).arg(&ids).ignore();
            let _: () = pipe.query(&mut c).unwrap();
        } else {
            let _: u64 = redis::cmd("XACK")
                .arg(STREAM)
                .arg(GROUP)
                .arg(&ids)
                .query(&mut c)
                .unwrap();
        }
        done += ids.len();
    }
    let elapsed = t0.elapsed();
    Sample {
        rate: n as f64 / elapsed.as_secs_f64(),
        cpu_us_per_msg: (cpu_us(me) - cpu0) as f64 / n as f64,
        redis_us_per_msg: (cpu_us(server.pid()) - redis0) as f64 / n as f64,
        rss: peak_rss(me),
    }
}

/// The redis-py + hiredis loop (p), as a child process of `python` (BENCH_PYTHON).
fn python_drain(server: &Server, python: &Path, n: usize, shape: Shape) -> Sample {
    server.preload_shape(n, shape);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/raw_loop.py");
    let redis0 = cpu_us(server.pid());
    let t0 = Instant::now();
    let mut child = Command::new(python)
        .arg(&script)
        .arg(server.url())
        .args([STREAM, GROUP, &n.to_string()])
        .spawn()
        .expect("run the Python loop");
    let pid = child.id();
    // Its CPU time is read from /proc just before it exits: poll until the group is drained.
    let mut c = server.conn();
    let (mut cpu, mut rss) = (0, 0);
    loop {
        cpu = cpu_us(pid).max(cpu);
        rss = peak_rss(pid).max(rss);
        let (read, pending) = server.progress(&mut c);
        if read >= n as u64 && pending == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let elapsed = t0.elapsed();
    let redis = cpu_us(server.pid()) - redis0;
    cpu = cpu_us(pid).max(cpu);
    let status = child.wait().unwrap();
    assert!(status.success(), "the Python loop failed: {status}");
    Sample {
        rate: n as f64 / elapsed.as_secs_f64(),
        cpu_us_per_msg: cpu as f64 / n as f64,
        redis_us_per_msg: redis as f64 / n as f64,
        rss,
    }
}

/// Publishes `rate` messages per second for `secs`, each with `sent_us`.
fn publish_steady(server: &Server, rate: u64, secs: u64) -> u64 {
    let mut c = server.conn();
    let total = rate * secs;
    let start = Instant::now();
    for i in 0..total {
        let due = start + Duration::from_micros(i * 1_000_000 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let _: String = redis::cmd("XADD")
            .arg(STREAM)
            .arg("*")
            .arg("sent_us")
            .arg(now_us())
            .arg("n")
            .arg(i)
            .query(&mut c)
            .unwrap();
    }
    total
}

fn percentiles(mut v: Vec<u64>) -> (f64, f64) {
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    (at(0.50), at(0.99))
}

/// End-to-end latency through the daemon (stamp handler), p50/p99 in ms.
fn daemon_latency(server: &Server, handler: &Path, rate: u64, secs: u64) -> (f64, f64) {
    server.preload(0);
    let d = Daemon::start(server, handler, "stamp", true);
    let total = publish_steady(server, rate, secs);
    let mut c = server.conn();
    let deadline = Instant::now() + Duration::from_secs(30);
    while redis::cmd("XLEN").arg(OUT).query::<u64>(&mut c).unwrap() < total
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    d.stop();
    let replies: Vec<HashMap<String, String>> = {
        let v: Value = redis::cmd("XRANGE")
            .arg(OUT)
            .arg("-")
            .arg("+")
            .query(&mut c)
            .unwrap();
        redstream::client::decode::entries(v)
            .unwrap()
            .entries
            .into_iter()
            .map(|e| {
                e.fields
                    .iter()
                    .map(|(k, v)| {
                        (
                            String::from_utf8_lossy(k).into(),
                            String::from_utf8_lossy(v).into(),
                        )
                    })
                    .collect()
            })
            .collect()
    };
    let lat: Vec<u64> = replies
        .iter()
        .filter_map(|r| {
            Some(
                r.get("recv_us")?
                    .parse::<u64>()
                    .ok()?
                    .saturating_sub(r.get("sent_us")?.parse().ok()?),
            )
        })
        .collect();
    percentiles(lat)
}

/// Prints the latency table of the daemon and the raw loop; returns their p99s.
fn latency_table(server: &Server, handler: &Path, rate: u64, secs: u64) -> (f64, f64) {
    eprintln!("latency: {rate} msg/s for {secs} s, daemon and raw loop");
    let (t0, steal0) = cpu_ticks();
    let (d50, d99) = daemon_latency(server, handler, rate, secs);
    let (t1, steal1) = cpu_ticks();
    let (r50, r99) = raw_latency(server, rate, secs);
    let (t2, steal2) = cpu_ticks();
    let steal = |t: u64, s: u64| 100.0 * s as f64 / t.max(1) as f64;
    println!();
    println!("| latency at {rate} msg/s, {secs} s | p50 ms | p99 ms | host steal |");
    println!("|---|---:|---:|---:|");
    println!(
        "| daemon (XADD → handler) | {d50:.2} | {d99:.2} | {:.1} % |",
        steal(t1 - t0, steal1 - steal0)
    );
    println!(
        "| raw redis-rs loop (XADD → read) | {r50:.2} | {r99:.2} | {:.1} % |",
        steal(t2 - t1, steal2 - steal1)
    );
    (d99, r99)
}

/// All CPU ticks of the machine and the ones the hypervisor stole (/proc/stat), to say how much of
/// a tail latency was the host's.
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    (ticks.iter().sum(), ticks.get(7).copied().unwrap_or(0))
}

/// End-to-end latency through a raw blocking loop, p50/p99 in ms.
fn raw_latency(server: &Server, rate: u64, secs: u64) -> (f64, f64) {
    server.preload(0);
    let url = server.url();
    let total = rate * secs;
    let reader = std::thread::spawn(move || {
        let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
        let opts = redis::streams::StreamReadOptions::default()
            .group(GROUP, "raw")
            .count(500)
            .block(1000);
        let mut lat = Vec::with_capacity(total as usize);
        while (lat.len() as u64) < total {
            let reply: redis::streams::StreamReadReply =
                redis::Commands::xread_options(&mut c, &[STREAM], &[">"], &opts).unwrap();
            let now = now_us();
            let mut ids = Vec::new();
            for key in &reply.keys {
                for e in &key.ids {
                    let sent: u64 = e.get("sent_us").unwrap_or(0);
                    lat.push(now.saturating_sub(sent));
                    ids.push(e.id.clone());
                }
            }
            if !ids.is_empty() {
                let _: u64 = redis::cmd("XACK")
                    .arg(STREAM)
                    .arg(GROUP)
                    .arg(&ids)
                    .query(&mut c)
                    .unwrap();
            }
        }
        lat
    });
    publish_steady(server, rate, secs);
    percentiles(reader.join().unwrap())
}

/// Resident memory (VmRSS) of a process, in bytes.
fn rss(pid: u32) -> u64 {
    proc_memory(pid, "VmRSS:")
}

/// RSS of a daemon with 8 handlers loaded, after it handled a first batch.
fn rss_with_8_handlers(server: &Server, handler: &Path) -> u64 {
    server.preload(10_000);
    let d = Daemon::start_with(server, handler, "noop", true, 7, Tuning::Default);
    let mut c = server.conn();
    while server.progress(&mut c) != (10_000, 0) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = rss(d.pid());
    d.stop();
    r
}

/// RSS after 1/10 of `n` messages and after all of them, streamed through the daemon (reused no-op).
fn soak(server: &Server, handler: &Path, n: u64) -> (u64, u64, f64) {
    server.preload(0);
    let d = Daemon::start(server, handler, "noop", true);
    let mut c = server.conn();
    let mut published = 0u64;
    let mut early = 0;
    let started = Instant::now();
    let payload = format!(
        r#"{{"id":"t","title":"soak task {}","status":"open","revision":1}}"#,
        "x".repeat(90)
    );
    while published < n {
        // Keep the backlog bounded: publish a batch only when the daemon has caught up.
        let (read, _) = server.progress(&mut c);
        if published - read > 50_000 {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let mut pipe = redis::pipe();
        for _ in 0..5_000 {
            pipe.cmd("XADD")
                .arg(STREAM)
                .arg("MAXLEN")
                .arg("~")
                .arg(200_000)
                .arg("*")
                .arg("type")
                .arg("task_snapshot")
                .arg("task")
                .arg(&payload)
                .ignore();
        }
        let _: () = pipe.query(&mut c).unwrap();
        published += 5_000;
        if early == 0 && read >= n / 10 {
            early = rss(d.pid());
        }
    }
    while server.progress(&mut c).0 < n {
        std::thread::sleep(Duration::from_millis(5));
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let late = rss(d.pid());
    d.stop();
    (early, late, rate)
}

// ---------------------------------------------------------------------------------------------------
// The cluster case: a Redis Cluster of `masters` nodes (no replicas: this measures throughput and CPU),
// slots split evenly, three streams whose hash tags land one in each third of the slot space.

struct ClusterNodes {
    nodes: Vec<Child>,
    ports: Vec<u16>,
    /// Cluster bus ports (free ports, not port + 10000).
    buses: Vec<u16>,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl ClusterNodes {
    fn start(masters: usize) -> ClusterNodes {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        let mut ports = Vec::new();
        let mut buses = Vec::new();
        for i in 0..masters {
            let (port, bus) = (free_port(), free_port());
            let d = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&d).unwrap();
            let child = redis_server()
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus.to_string(),
                ])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&d)
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server (scripts/setup installs it)");
            nodes.push(child);
            ports.push(port);
            buses.push(bus);
        }
        let c = ClusterNodes {
            nodes,
            ports,
            buses,
            _dir: dir,
        };
        for p in &c.ports {
            while c.node_opt(*p).is_none() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let per = 16384 / masters;
        for (i, p) in c.ports.iter().enumerate() {
            let mut n = c.node(*p);
            let last = if i + 1 == masters {
                16383
            } else {
                (i + 1) * per - 1
            };
            let _: () = redis::cmd("CLUSTER")
                .arg(&["ADDSLOTSRANGE", &(i * per).to_string(), &last.to_string()])
                .query(&mut n)
                .unwrap();
            if i > 0 {
                let _: () = redis::cmd("CLUSTER")
                    .arg(&[
                        "MEET",
                        "127.0.0.1",
                        &c.ports[0].to_string(),
                        &c.buses[0].to_string(),
                    ])
                    .query(&mut n)
                    .unwrap();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while !c.ports.iter().all(|p| {
            redis::cmd("CLUSTER")
                .arg("INFO")
                .query::<String>(&mut c.node(*p))
                .is_ok_and(|i| i.contains("cluster_state:ok"))
        }) {
            assert!(Instant::now() < deadline, "the bench cluster did not form");
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    fn node_opt(&self, port: u16) -> Option<redis::Connection> {
        let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .ok()?
            .get_connection()
            .ok()?;
        redis::cmd("PING").query::<String>(&mut c).ok()?;
        Some(c)
    }

    fn node(&self, port: u16) -> redis::Connection {
        self.node_opt(port)
            .expect("connect to a bench cluster node")
    }

    /// The node serving `key` (slots are split evenly, in port order).
    fn owner(&self, key: &str) -> u16 {
        let per = 16384 / self.ports.len();
        let i = (redstream::client::slot::of(key) as usize / per).min(self.ports.len() - 1);
        self.ports[i]
    }

    fn cpu_us(&self) -> u64 {
        self.nodes.iter().map(|n| cpu_us(n.id())).sum()
    }

    /// INFO commandstats summed over the nodes: command → (calls, µs).
    fn commandstats(&self) -> std::collections::BTreeMap<String, (u64, u64)> {
        let mut all = std::collections::BTreeMap::new();
        for p in &self.ports {
            let info: String = redis::cmd("INFO")
                .arg("commandstats")
                .query(&mut self.node(*p))
                .unwrap_or_default();
            for line in info.lines() {
                let Some((name, rest)) = line
                    .strip_prefix("cmdstat_")
                    .and_then(|l| l.split_once(':'))
                else {
                    continue;
                };
                let field = |k: &str| {
                    rest.split(',')
                        .find_map(|f| f.strip_prefix(k))
                        .and_then(|v| v.parse::<f64>().ok())
                        .unwrap_or(0.0) as u64
                };
                let e = all.entry(name.to_owned()).or_insert((0, 0));
                e.0 += field("calls=");
                e.1 += field("usec=");
            }
        }
        all
    }
}

impl Drop for ClusterNodes {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.kill();
            let _ = n.wait();
        }
    }
}

/// Three streams (input, output), one per third of the slot space; `cross` sends each one's replies
/// to the next one's output, in another slot.
fn cluster_streams(cross: bool) -> Vec<(String, String)> {
    let tags: Vec<String> = [2730u16, 8192, 13653]
        .iter()
        .map(|slot| {
            (0..100_000)
                .map(|i| format!("b{i}"))
                .min_by_key(|t| redstream::client::slot::of(t).abs_diff(*slot))
                .unwrap()
        })
        .collect();
    (0..3)
        .map(|i| {
            let out = if cross { &tags[(i + 1) % 3] } else { &tags[i] };
            (
                format!("nova:task:{{{}}}:tasks", tags[i]),
                format!("nova:task:{{{out}}}:out"),
            )
        })
        .collect()
}

/// A daemon on the cluster: one echo handler and one consumer per stream, as instance `instance`.
fn cluster_daemon(
    cluster: &ClusterNodes,
    handler: &Path,
    streams: &[(String, String)],
    instance: usize,
) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bench.toml");
    let seeds: Vec<String> = cluster
        .ports
        .iter()
        .map(|p| format!("\"redis://127.0.0.1:{p}\""))
        .collect();
    let mut body = String::new();
    for (i, (input, out)) in streams.iter().enumerate() {
        body.push_str(&format!(
            "[[handlers]]\nname = \"echo{i}\"\nfile = \"{file}\"\nroles = [\"task_write\"]\n\
             instance = \"reuse\"\nconfig = {{ mode = \"echo\", reply_to = \"{out}\" }}\n\
             [[consumers]]\nstream = \"{input}\"\ngroup = \"{GROUP}\"\nstart = \"0\"\n\
             handler = \"echo{i}\"\nbatch_size = 500\nin_flight = 2000\nblock = \"1s\"\n",
            file = handler.display()
        ));
    }
    std::fs::write(
        &config,
        format!(
            r#"
[identity]
name = "bench"
roles = ["admin"]
[redis]
cluster = [{seeds}]
[auth]
signing_key = "k"
[[auth.keys]]
id = "k"
algorithm = "HS256"
secret = "benchmark-secret-benchmark-secret-0123456789"
[log]
level = "warn"
[heartbeat]
enabled = false
[control]
enabled = false
[daemon]
instance = "i{instance}"
[wasm]
cache_dir = "{cache}"
{body}"#,
            seeds = seeds.join(", "),
            cache = dir.path().join("cache").display(),
        ),
    )
    .unwrap();
    Daemon::spawn(&config, dir)
}

/// Drains `n` preloaded messages spread over the three streams with `daemons` daemons.
fn cluster_drain(masters: usize, daemons: usize, cross: bool, handler: &Path, n: usize) -> Sample {
    let cluster = ClusterNodes::start(masters);
    let streams = cluster_streams(cross);
    for (s, (input, _)) in streams.iter().enumerate() {
        let mut c = cluster.node(cluster.owner(input));
        let share = n / 3 + usize::from(s < n % 3);
        load_tasks(&mut c, input, share);
        let _: () = redis::cmd("XGROUP")
            .arg(&["CREATE", input, GROUP, "0", "MKSTREAM"])
            .query(&mut c)
            .unwrap();
    }
    let begin = (cluster.cpu_us(), Instant::now());
    let ds: Vec<Daemon> = (0..daemons)
        .map(|i| cluster_daemon(&cluster, handler, &streams, i))
        .collect();
    let cpu = |ds: &[Daemon]| ds.iter().map(|d| cpu_us(d.pid())).sum::<u64>();
    // One connection per output, kept: polling must not cost the servers connection set-ups.
    let mut outs: Vec<(String, redis::Connection)> = streams
        .iter()
        .map(|(_, out)| (out.clone(), cluster.node(cluster.owner(out))))
        .collect();
    let mut replies = || -> u64 {
        outs.iter_mut()
            .map(|(out, c)| redis::cmd("XLEN").arg(&*out).query::<u64>(c).unwrap_or(0))
            .sum()
    };
    // Measured from when the last daemon is ready to the last reply: the daemons start one after
    // another, and the first is under way before the last is ready. (Not between 10 % and 90 % of
    // the replies: a commit of a large batch can carry the count across both in one poll.) A run
    // done before that (BENCH_QUICK) is measured from before the first daemon started.
    let (done0, cpu0, redis0, t0) = (replies(), cpu(&ds), cluster.cpu_us(), Instant::now());
    let (done0, cpu0, redis0, t0) = if done0 < n as u64 / 2 {
        (done0, cpu0, redis0, t0)
    } else {
        (0, 0, begin.0, begin.1)
    };
    while replies() < n as u64 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let msgs = (n as u64 - done0) as f64;
    let sample = Sample {
        rate: msgs / t0.elapsed().as_secs_f64(),
        cpu_us_per_msg: (cpu(&ds) - cpu0) as f64 / msgs,
        redis_us_per_msg: (cluster.cpu_us() - redis0) as f64 / msgs,
        rss: ds.iter().map(|d| peak_rss(d.pid())).max().unwrap_or(0),
    };
    assert_eq!(replies(), n as u64, "one reply per message");
    if env_or("BENCH_COMMANDSTATS", 0) != 0 {
        // Where the servers' time went, over the whole run (loading the messages included).
        let mut stats: Vec<(String, (u64, u64))> = cluster.commandstats().into_iter().collect();
        stats.sort_by_key(|(_, (_, us))| std::cmp::Reverse(*us));
        let per = |x: u64| x as f64 / n as f64;
        let line: Vec<String> = stats
            .iter()
            .take(10)
            .map(|(c, (calls, us))| {
                format!("{c} {:.2} µs/msg ({:.3} calls/msg)", per(*us), per(*calls))
            })
            .collect();
        eprintln!("commandstats (cross={cross}): {}", line.join("; "));
    }
    for d in ds {
        d.stop();
    }
    sample
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse. BENCH_QUICK=1 (`scripts/bench --quick`, run
    // by CI in a debug build) runs every part briefly, to keep the benchmark working, not to measure.
    let quick = env_or("BENCH_QUICK", 0) != 0;
    let n: usize = env_or("BENCH_N", if quick { 2_000 } else { 200_000 });
    let repeats: usize = env_or("BENCH_REPEATS", if quick { 1 } else { 5 });
    let lat_secs: u64 = env_or("BENCH_LAT_SECS", if quick { 1 } else { 10 });
    let lat_rate: u64 = env_or("BENCH_LAT_RATE", 5000);
    let handler: PathBuf =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("handlers/build/bench.wasm");
    assert!(
        handler.is_file(),
        "{} is missing: run scripts/build-handlers",
        handler.display()
    );

    // This thread runs the raw loops, and the daemons it starts inherit its core.
    match cores() {
        Some((redis, measured)) => {
            bind(0, measured).expect("sched_setaffinity");
            eprintln!(
                "pinned: redis-server on cpu {redis}, daemons and raw loops on cpu {measured}"
            );
        }
        None => eprintln!("not pinned (BENCH_PIN=1 pins, on two cores or more)"),
    }
    let server = Server::start();
    // b, c and d run three times: with the consumer's default settings (the bare letter), and tuned
    // small (-) and large (+); "default / tuned" compares the first with the better of the others.
    let cases: [(&str, &str); 12] = [
        ("a", "raw redis-rs: XREADGROUP 500 + XACK per batch"),
        (
            "p",
            "raw redis-py + hiredis: XREADGROUP 500 + XACK per batch",
        ),
        (
            "b",
            "daemon, no-op handler, fresh instance, default settings",
        ),
        ("b-", "daemon, no-op handler, fresh instance, tuned small"),
        ("b+", "daemon, no-op handler, fresh instance, tuned large"),
        (
            "c",
            "daemon, no-op handler, reused instance, default settings",
        ),
        ("c-", "daemon, no-op handler, reused instance, tuned small"),
        ("c+", "daemon, no-op handler, reused instance, tuned large"),
        (
            "d",
            "daemon, echo handler (reply + ack, atomic), default settings",
        ),
        (
            "d-",
            "daemon, echo handler (reply + ack, atomic), tuned small",
        ),
        (
            "d+",
            "daemon, echo handler (reply + ack, atomic), tuned large",
        ),
        ("e", "raw redis-rs echo: XADD per message + XACK, pipelined"),
    ];
    // BENCH_CASES (e.g. "ce") measures only those cases and skips memory and latency: for iterating.
    let only: String = env_or("BENCH_CASES", String::new());
    let partial = !only.is_empty();
    let python: Option<PathBuf> = std::env::var_os("BENCH_PYTHON").map(PathBuf::from);
    let cases: Vec<(&str, &str)> = cases
        .into_iter()
        .filter(|(c, _)| !partial || only.contains(&c[..1]))
        .filter(|(c, _)| *c != "p" || python.is_some())
        .collect();
    if python.is_none() {
        eprintln!("BENCH_PYTHON is not set: no redis-py case (scripts/bench sets it)");
    }
    let shapes: Vec<Shape> = env_or("BENCH_SHAPES", "2f,5f,4k".to_string())
        .split(',')
        .map(|s| Shape::parse(s).unwrap_or_else(|| panic!("BENCH_SHAPES: unknown shape {s:?}")))
        .collect();
    let per_shape = |shape: Shape| {
        if shape == Shape::FourK {
            (n / 2).max(1)
        } else {
            n
        }
    };
    let mut samples: HashMap<(Shape, &str), Vec<Sample>> = HashMap::new();
    eprintln!(
        "benchmark: {n} messages per case (half of it at 4 KB), {repeats} rounds, cases interleaved"
    );
    for round in 0..repeats {
        for (i, &shape) in shapes.iter().enumerate() {
            let n = per_shape(shape);
            // Each round runs the cases in another order (the same on every run of the benchmark),
            // so that no case always follows the same one: a case after a fresh-instance daemon or
            // a large preload was seen to run slower.
            let mut order = cases.clone();
            fastrand::Rng::with_seed((round * 16 + i) as u64).shuffle(&mut order);
            for &(case, _) in &order {
                let s = match case {
                    "a" => raw_drain(&server, false, n, shape),
                    "p" => python_drain(&server, python.as_deref().expect("filtered"), n, shape),
                    "e" => raw_drain(&server, true, n, shape),
                    _ => {
                        let tuned = match &case[1..] {
                            "-" => Tuning::Small,
                            "+" => Tuning::Large,
                            _ => Tuning::Default,
                        };
                        let how = match &case[..1] {
                            "b" => ("noop", false, tuned),
                            "c" => ("noop", true, tuned),
                            _ => ("echo", true, tuned),
                        };
                        daemon_drain(&server, &handler, how, n, shape)
                    }
                };
                eprintln!(
                    "round {round} {} case {case}: {:.0} msg/s, {:.2} µs CPU/msg, redis {:.2} µs CPU/msg",
                    shape.name(),
                    s.rate,
                    s.cpu_us_per_msg,
                    s.redis_us_per_msg
                );
                samples.entry((shape, case)).or_default().push(s);
            }
        }
    }
    let med = |shape: Shape, case: &str, f: fn(&Sample) -> f64| {
        median(samples[&(shape, case)].iter().map(f).collect())
    };
    let rate = |shape: Shape, case: &str| med(shape, case, |s| s.rate);
    let has = |shape: Shape, case: &str| samples.contains_key(&(shape, case));
    // The largest spread of any case, and of any case's ratio to its base: a difference smaller
    // than it is not resolved by this run.
    let mut worst: f64 = 0.0;
    let mut worst_ratio: f64 = 0.0;
    for &shape in shapes.iter().filter(|_| !cases.is_empty()) {
        println!();
        println!("{} ({} messages per case)", shape.name(), per_shape(shape));
        println!();
        println!(
            "| case | what | msgs/s | spread | ratio | CPU µs/msg | redis-server CPU µs/msg | peak RSS MiB |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|---:|");
        for &(case, what) in &cases {
            let base = if case.starts_with('d') { "e" } else { "a" };
            // Against the base of the same round (they ran a minute apart at most, so the machine's
            // drift between rounds cancels): the median of the rounds' ratios, and their spread.
            let ratio = if case == "a" || case == "e" {
                "1.00 (base)".to_string()
            } else if has(shape, base) {
                let paired: Vec<f64> = samples[&(shape, case)]
                    .iter()
                    .zip(&samples[&(shape, base)])
                    .map(|(c, b)| c.rate / b.rate)
                    .collect();
                worst_ratio = worst_ratio.max(spread(&paired));
                format!(
                    "{:.2} ±{:.1} %",
                    median(paired.clone()),
                    spread(&paired) * 100.0
                )
            } else {
                "—".to_string()
            };
            let rates: Vec<f64> = samples[&(shape, case)].iter().map(|s| s.rate).collect();
            worst = worst.max(spread(&rates));
            println!(
                "| {case} | {what} | {:.0} | ±{:.1} % | {ratio} | {:.2} | {:.2} | {:.1} |",
                rate(shape, case),
                spread(&rates) * 100.0,
                med(shape, case, |s| s.cpu_us_per_msg),
                med(shape, case, |s| s.redis_us_per_msg),
                med(shape, case, |s| s.rss as f64) / (1024.0 * 1024.0)
            );
        }
        // Defaults against tuning: what a user who changes nothing gets.
        let pairs: Vec<String> = ["b", "c", "d"]
            .iter()
            .filter(|c| {
                has(shape, c) && has(shape, &format!("{c}-")) && has(shape, &format!("{c}+"))
            })
            .map(|c| {
                // The better tuning by its median; then the default against it round by round
                // (the two ran minutes apart at most, so the machine's drift between rounds,
                // larger here than the difference measured, cancels), and the median of those.
                let best = [format!("{c}-"), format!("{c}+")]
                    .into_iter()
                    .max_by(|x, y| rate(shape, x).total_cmp(&rate(shape, y)))
                    .expect("two");
                let paired = samples[&(shape, *c)]
                    .iter()
                    .zip(&samples[&(shape, best.as_str())])
                    .map(|(d, t)| d.rate / t.rate)
                    .collect();
                format!("{c}/{best} {:.2}", median(paired))
            })
            .collect();
        if !pairs.is_empty() {
            println!();
            println!(
                "default / better tuning, median of the rounds' ratios: {} (target ≥ 0.90)",
                pairs.join(", ")
            );
        }
    }
    if !cases.is_empty() {
        println!();
        println!(
            "resolution: ratios ±{:.1} %, rates ±{:.1} % per round — the largest spread (half the range over the median) of a case's ratio to its base taken round by round, and of its rate, over {repeats} rounds; a median of {repeats} is good to about ±{:.1} % ({})",
            worst_ratio * 100.0,
            worst * 100.0,
            worst_ratio * 100.0 / (repeats as f64).sqrt(),
            if cores().is_some() {
                "pinned"
            } else {
                "not pinned"
            }
        );
    }
    let two = Shape::Two;
    if partial {
        if only.contains('l') {
            latency_table(&server, &handler, lat_rate, lat_secs);
        }
        if only.contains('k') {
            drop(server);
            cluster_cases(&handler, n, repeats);
        }
        return;
    }
    let soak_n: u64 = env_or("BENCH_SOAK_N", if quick { 20_000 } else { 10_000_000 });
    // Latency first: after the soak's minute of full load this VM's tail latencies stay high for a
    // while, for the raw loop as much as for the daemon.
    let (d99, r99) = latency_table(&server, &handler, lat_rate, lat_secs);
    eprintln!("memory: 8 handlers loaded; then {soak_n} messages streamed through");
    let rss8 = rss_with_8_handlers(&server, &handler);
    let (rss_early, rss_late, soak_rate) = soak(&server, &handler, soak_n);
    println!();
    println!("| memory | MiB |");
    println!("|---|---:|");
    println!(
        "| daemon RSS with 8 handlers loaded | {:.1} |",
        rss8 as f64 / 1048576.0
    );
    println!(
        "| daemon RSS after {} messages | {:.1} |",
        soak_n / 10,
        rss_early as f64 / 1048576.0
    );
    println!(
        "| daemon RSS after {soak_n} messages ({soak_rate:.0} msg/s) | {:.1} |",
        rss_late as f64 / 1048576.0
    );
    println!();
    println!(
        "RSS with 8 handlers {:.1} MiB (≤ 64); RSS drift over the soak {:+.1}% (within ±10%)",
        rss8 as f64 / 1048576.0,
        (rss_late as f64 / rss_early.max(1) as f64 - 1.0) * 100.0
    );
    if shapes.contains(&two) {
        println!(
            "targets ({}, default settings): c/a {:.2} (≥ 1.10), b/a {:.2} (≥ 0.50), d/e {:.2} (≥ 0.80); p99 {:.2} ms vs raw {:.2} + 1 ms",
            two.name(),
            rate(two, "c") / rate(two, "a"),
            rate(two, "b") / rate(two, "a"),
            rate(two, "d") / rate(two, "e"),
            d99,
            r99
        );
    }
    if env_or("BENCH_CLUSTER", 1) != 0 {
        drop(server);
        cluster_cases(&handler, n, repeats);
    }
}

/// The cluster table (BENCH_CASES=k runs it alone).
fn cluster_cases(handler: &Path, n: usize, repeats: usize) {
    let cluster_cases: [(&str, usize, usize, bool); 4] = [
        (
            "1 master, 1 daemon, replies in the source's slot",
            1,
            1,
            false,
        ),
        (
            "1 master, 1 daemon, every reply to another slot of its node (in place)",
            1,
            1,
            true,
        ),
        (
            "3 masters, 3 daemons, replies in the source's slot",
            3,
            3,
            false,
        ),
        (
            "3 masters, 3 daemons, every reply to another master's slot (outbox)",
            3,
            3,
            true,
        ),
    ];
    eprintln!("cluster: echo handler, {n} messages over 3 hash-tagged streams, {repeats} rounds");
    let mut cluster_samples: Vec<Vec<Sample>> = vec![Vec::new(); cluster_cases.len()];
    for round in 0..repeats {
        for (i, (what, masters, daemons, cross)) in cluster_cases.iter().enumerate() {
            let s = cluster_drain(*masters, *daemons, *cross, handler, n);
            eprintln!(
                "round {round} cluster case {what}: {:.0} msg/s, {:.2} µs CPU/msg, redis {:.2} µs CPU/msg",
                s.rate, s.cpu_us_per_msg, s.redis_us_per_msg
            );
            cluster_samples[i].push(s);
        }
    }
    println!();
    println!(
        "| echo on a Redis Cluster | msgs/s | daemons' CPU µs/msg | redis-servers' CPU µs/msg | its spread |"
    );
    println!("|---|---:|---:|---:|---:|");
    let mut redis_cpu = Vec::new();
    for ((what, ..), got) in cluster_cases.iter().zip(&cluster_samples) {
        let med = |f: fn(&Sample) -> f64| median(got.iter().map(f).collect());
        let cpu: Vec<f64> = got.iter().map(|s| s.redis_us_per_msg).collect();
        println!(
            "| {what} | {:.0} | {:.2} | {:.2} | ±{:.1} % |",
            med(|s| s.rate),
            med(|s| s.cpu_us_per_msg),
            med(|s| s.redis_us_per_msg),
            spread(&cpu) * 100.0
        );
        redis_cpu.push(cpu);
    }
    // Round by round (the two cases ran a minute apart at most), then the median of the ratios.
    let ratio =
        |cross: &[f64], same: &[f64]| median(cross.iter().zip(same).map(|(c, s)| c / s).collect());
    println!();
    println!(
        "redis-servers' CPU per message, replies across slots / in the source's slot: {:.2} on 1 master (in place), {:.2} on 3 (through the outbox; target ≤ 1.5)",
        ratio(&redis_cpu[1], &redis_cpu[0]),
        ratio(&redis_cpu[3], &redis_cpu[2])
    );
}
