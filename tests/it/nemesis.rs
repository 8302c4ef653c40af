//! The nemesis: a seeded, randomized schedule of ordinary faults against two real daemons and a real
//! redis-server, and one checker of the promises from what Redis holds at the end — not from the
//! daemons' logs. A failing run prints its seed and schedule; `scripts/nemesis --seed S` replays it,
//! `scripts/nemesis --minutes M` searches new seeds. CI runs the fixed seeds of [`fixed_seeds`].
//!
//! Faults drawn (docs/design.md, "The nemesis" lists fault × promise): SIGKILL of a daemon (started
//! again), SIGSTOP/SIGCONT of a daemon, SIGHUP reload, Redis restarted with its data (AOF) and without
//! it (a producer writing at once, before the daemons are back), CLIENT KILL of every connection,
//! CLIENT PAUSE, DEBUG SLEEP. Between faults the producer
//! publishes batches of messages with `order_by` keys; the handler replies to each (the built-in
//! `faults` handler, a few of them slow).
//!
//! Promises checked at the end, once everything settled: every input Redis still holds has exactly one
//! reply (inputs Redis lost in a restart without data are counted as Redis's loss, apart); no reply
//! without an input; each key's replies in order for the group one daemon consumes alone; every signed
//! message obeyed at most once, whatever copies of it arrive (at once, or after its expiry inside the
//! leeway); nothing pending; nothing dead-lettered (every message is healthy).

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use crate::util::{Daemon, RedisServer, daemon_toml};

const IN: &str = "nova:task:nemesis:in";
const OUT: &str = "nova:task:nemesis:out";
const ORDERED: &str = "nova:task:nemesis:ordered";
const DLQ: &str = "nova:task:nemesis:in-dlq";
const SIGNED: &str = "nova:task:nemesis:signed";
const REPORT: &str = "nova:task:nemesis:report";

/// One fault of a schedule.
#[derive(Clone, Copy, Debug)]
enum Fault {
    KillDaemon(usize),
    PauseDaemon(usize, u64),
    Reload(usize),
    RedisRestart,
    RedisRestartEmpty,
    ClientKill,
    ClientPause(u64),
    DebugSleep(u64),
}

impl Fault {
    fn draw(rng: &mut fastrand::Rng) -> Fault {
        let d = rng.usize(0..2);
        match rng.u32(0..8) {
            0 => Fault::KillDaemon(d),
            1 => Fault::PauseDaemon(d, rng.u64(200..2500)),
            2 => Fault::Reload(d),
            3 => Fault::RedisRestart,
            4 => Fault::RedisRestartEmpty,
            5 => Fault::ClientKill,
            6 => Fault::ClientPause(rng.u64(100..1500)),
            _ => Fault::DebugSleep(rng.u64(100..1200)),
        }
    }
}

/// A schedule: per step, the messages published before the fault, the fault, and the pause after it.
struct Schedule {
    seed: u64,
    steps: Vec<(usize, Fault, u64)>,
}

impl Schedule {
    fn new(seed: u64, steps: usize) -> Schedule {
        let mut rng = fastrand::Rng::with_seed(seed);
        let steps = (0..steps)
            .map(|_| (rng.usize(20..120), Fault::draw(&mut rng), rng.u64(0..600)))
            .collect();
        Schedule { seed, steps }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed {}:", self.seed)?;
        for (n, fault, wait) in &self.steps {
            write!(f, " [{n} msgs, {fault:?}, {wait} ms]")?;
        }
        Ok(())
    }
}

/// Daemon `instance`'s config: both consume group `g` (start `$`, as the reference default); daemon 0
/// alone also consumes group `o`, whose replies must keep each key's order (one consumer's promise);
/// both consume the signed stream, whose handler requires a signed sender and reports who signed.
fn config(server: &RedisServer, instance: usize, cache: &std::path::Path) -> String {
    let group = |g: &str, out: &str| {
        format!(
            "[[consumers]]\nstream = \"{IN}\"\ngroup = \"{g}\"\nstart = \"$\"\nblock = \"500ms\"\n\
             claim_min_idle = \"2s\"\nclaim_interval = \"300ms\"\nhandler_timeout = \"1s\"\n\
             max_deliveries = 1000\norder_by = \"k\"\nhandler = \"faults\"\n\
             faults = {{ reply_to = \"{out}\" }}\n"
        )
    };
    let mut consumers = group("g", OUT);
    if instance == 0 {
        consumers.push_str(&group("o", ORDERED));
    }
    consumers.push_str(&format!(
        "[wasm]\nworkers = 1\ncache_dir = \"{}\"\n\
         [[handlers]]\nname = \"whoami\"\nfile = \"{}\"\nroles = [\"task_write\"]\n\
         timeout = \"900ms\"\nrequire_sender_token = true\nconfig = {{ report = \"{REPORT}\" }}\n\
         [[consumers]]\nstream = \"{SIGNED}\"\ngroup = \"s\"\nstart = \"$\"\nblock = \"500ms\"\n\
         claim_min_idle = \"2s\"\nclaim_interval = \"300ms\"\nhandler_timeout = \"1s\"\n\
         max_deliveries = 1000\nhandler = \"whoami\"\n",
        cache.display(),
        crate::util::root()
            .join("handlers/build/hostile.wasm")
            .display()
    ));
    daemon_toml(&server.url(), &consumers)
        .replace("[daemon]", &format!("[daemon]\ninstance = \"n{instance}\""))
}

/// What the checker found.
#[derive(Debug, Default, PartialEq, Eq)]
struct Verdict {
    lost: usize,
    duplicates: usize,
    strangers: usize,
    pending: u64,
    dead_lettered: u64,
    /// Replies of group `o` written after a later message's reply of the same key.
    inversions: usize,
    /// Signed messages obeyed more than once (an original and its copies, by signer).
    replayed: usize,
}

/// Runs `schedule` and judges what Redis holds at the end. Returns the verdict and how many inputs
/// Redis itself lost (restarts without data).
fn run(schedule: &Schedule) -> (Verdict, usize) {
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let cache = tempfile::tempdir().unwrap();
    let config = |server: &RedisServer, i: usize| config(server, i, cache.path());
    let mut daemons: Vec<Daemon> = (0..2)
        .map(|i| Daemon::running(&config(&server, i), &[]))
        .collect();
    let keys = crate::util::settings(&server.url()).auth.keys;
    // Signed messages, one signer each, valid for a second: each is sent with a copy at once, and
    // copied again at the next steps — after its expiry, inside the 30 s leeway.
    let mut signed: Vec<Vec<(String, String)>> = Vec::new();
    let mut published: Vec<String> = Vec::new();
    let mut n = 0usize;
    for (count, fault, wait) in &schedule.steps {
        for _ in 0..*count {
            let key = (n % 7).to_string();
            let seq = n.to_string();
            // One in forty is slow (300 ms), so commits and claims overlap.
            let mut fields = vec![("k", key.as_str()), ("n", seq.as_str())];
            if n % 40 == 7 {
                fields.push(("faults_sleep_ms", "300"));
            }
            published.push(server.xadd(IN, &fields));
            n += 1;
        }
        let signer = redstream::auth::Identity {
            subject: format!("signer-{}", signed.len()),
            roles: redstream::auth::Roles::parse(&["task_read"]).unwrap(),
        };
        let body: redstream::model::envelope::Fields = [("do", "whoami")].into_iter().collect();
        let sig = keys
            .sign_message(&signer, SIGNED, &body, Duration::from_secs(1))
            .unwrap();
        signed.push(vec![("do".into(), "whoami".into()), ("_sig".into(), sig)]);
        let copies = signed.len().saturating_sub(3)..signed.len();
        for m in signed[copies].iter().chain(signed.last()) {
            let pairs: Vec<(&str, &str)> =
                m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            server.xadd(SIGNED, &pairs);
        }
        match *fault {
            Fault::KillDaemon(i) => {
                daemons[i].kill9();
                daemons[i] = Daemon::running(&config(&server, i), &[]);
            }
            Fault::PauseDaemon(i, ms) => {
                daemons[i].signal(libc::SIGSTOP);
                std::thread::sleep(Duration::from_millis(ms));
                daemons[i].signal(libc::SIGCONT);
            }
            Fault::Reload(i) => daemons[i].signal(libc::SIGHUP),
            Fault::RedisRestart => server.restart(),
            Fault::RedisRestartEmpty => {
                server.restart_empty();
                // A producer writes before the daemons are back (they reconnect with backoff).
                for _ in 0..10 {
                    let seq = n.to_string();
                    published.push(server.xadd(IN, &[("k", "x"), ("n", seq.as_str())]));
                    n += 1;
                }
            }
            Fault::ClientKill => {
                let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
                    .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
                    .query(&mut server.conn());
            }
            Fault::ClientPause(ms) => {
                let _: redis::RedisResult<()> = redis::cmd("CLIENT")
                    .arg("PAUSE")
                    .arg(ms)
                    .query(&mut server.conn());
            }
            Fault::DebugSleep(ms) => {
                let _: redis::RedisResult<()> = redis::cmd("DEBUG")
                    .arg("SLEEP")
                    .arg(ms as f64 / 1000.0)
                    .query(&mut server.conn());
            }
        }
        std::thread::sleep(Duration::from_millis(*wait));
    }
    // Settle: everything Redis still holds is replied to and acked (or the deadline says otherwise).
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let held = server.xlen(IN);
        if server.xlen(OUT) >= held
            && server.xlen(ORDERED) >= held
            && server.pending(IN, "g") == 0
            && server.pending(IN, "o") == 0
            && server.pending(SIGNED, "s") == 0
        {
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for d in &mut daemons {
        assert_eq!(
            d.stop(Duration::from_secs(20)),
            0,
            "{schedule}: a clean drain"
        );
    }
    let held: Vec<String> = server.entries(IN).into_iter().map(|e| e.id).collect();
    let mut replies: HashMap<String, usize> = HashMap::new();
    for e in server.entries(OUT) {
        let cause = e.fields.get_str("_cause").unwrap_or("").to_owned();
        let id = cause.rsplit('/').next().unwrap_or("").to_owned();
        *replies.entry(id).or_insert(0) += 1;
    }
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut inversions = 0;
    for e in server.entries(ORDERED) {
        let k = e.fields.get_str("k").unwrap_or("").to_owned();
        let n: u64 = e
            .fields
            .get_str("n")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if last.get(&k).is_some_and(|&before| before > n) {
            inversions += 1;
        }
        last.insert(k, n);
    }
    let mut obeyed: HashMap<String, usize> = HashMap::new();
    for e in server.entries(REPORT) {
        let who = e.fields.get_str("detail").unwrap_or("").to_owned();
        let who = who.split(' ').next().unwrap_or("").to_owned();
        *obeyed.entry(who).or_insert(0) += 1;
    }
    let verdict = Verdict {
        replayed: obeyed.values().filter(|n| **n > 1).count(),
        lost: held.iter().filter(|id| !replies.contains_key(*id)).count(),
        duplicates: replies.values().map(|n| n.saturating_sub(1)).sum(),
        strangers: replies.keys().filter(|id| !held.contains(id)).count(),
        pending: server.pending(IN, "g") + server.pending(IN, "o") + server.pending(SIGNED, "s"),
        dead_lettered: server.xlen(DLQ),
        inversions,
    };
    let lost_by_redis = published.iter().filter(|id| !held.contains(id)).count();
    (verdict, lost_by_redis)
}

/// Runs `seed` for `steps` and asserts every promise; the panic message carries the schedule.
fn check(seed: u64, steps: usize) {
    let schedule = Schedule::new(seed, steps);
    println!("nemesis {schedule}");
    let (verdict, lost_by_redis) = run(&schedule);
    println!("nemesis seed {seed}: {verdict:?}, inputs Redis itself lost: {lost_by_redis}");
    assert_eq!(
        verdict,
        Verdict::default(),
        "a promise broke — replay with scripts/nemesis --seed {seed} --steps {steps}\n{schedule}"
    );
}

/// The fixed seeds CI runs (short schedules; together about a minute here).
#[test]
fn fixed_seeds() {
    for seed in [1, 2, 3] {
        check(seed, 6);
    }
}

/// `scripts/nemesis`: NEMESIS_SEED (one seed) or NEMESIS_MINUTES (new seeds until time is up), with
/// NEMESIS_STEPS faults each. Ignored in the ordinary suite.
#[test]
#[ignore = "run by scripts/nemesis"]
fn search() {
    let steps = std::env::var("NEMESIS_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    if let Some(seed) = std::env::var("NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return check(seed, steps);
    }
    let minutes: u64 = std::env::var("NEMESIS_MINUTES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let until = Instant::now() + Duration::from_secs(60 * minutes);
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs());
    while Instant::now() < until {
        check(seed, steps);
        seed += 1;
    }
}
