//! The consumer loop in-process, against a real redis-server, with a handler the test holds: a message
//! is frozen mid-flight, then claimed away, committed or drained, and each step is observed in Redis
//! and in the loop's counters — no sleeps standing in for synchronisation, no log text.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use redstream::engine::router::{Router, Unmatched};
use redstream::engine::{Consumer, ConsumerSettings, Stats};
use redstream::health::Health;
use redstream::model::message::{BoxFuture, Handler, Message, Outcome, Reply, ReplyKind};
use redstream::shutdown::{self, Trigger};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::util::{RedisServer, admin, settings};

const IN: &str = "nova:task:loop:in";
const OUT: &str = "nova:task:loop:out";

/// A handler that announces each message it takes and holds it until the test lets one go.
struct Gate {
    entered: Semaphore,
    release: Semaphore,
    seen: Mutex<Vec<String>>,
}

impl Gate {
    fn new() -> Arc<Gate> {
        Arc::new(Gate {
            entered: Semaphore::new(0),
            release: Semaphore::new(0),
            seen: Mutex::new(Vec::new()),
        })
    }

    /// Waits until `n` more messages are inside the handler.
    async fn entered(&self, n: u32) {
        tokio::time::timeout(Duration::from_secs(10), self.entered.acquire_many(n))
            .await
            .expect("messages reached the handler")
            .unwrap()
            .forget();
    }

    fn let_go(&self, n: usize) {
        self.release.add_permits(n);
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

struct Gated(Arc<Gate>);

impl Handler for Gated {
    fn name(&self) -> &str {
        "gated"
    }

    fn handle<'a>(&'a self, msg: &'a Message) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let n = msg.fields.get_str("n").unwrap_or("").to_owned();
            self.0.seen.lock().unwrap().push(n);
            self.0.entered.add_permits(1);
            self.0.release.acquire().await.unwrap().forget();
            Outcome::Success(vec![Reply {
                stream: OUT.into(),
                fields: msg.fields.clone(),
                kind: ReplyKind::Now,
            }])
        })
    }
}

struct Running {
    gate: Arc<Gate>,
    stats: Arc<Stats>,
    stop: Trigger,
    task: JoinHandle<Result<(), redstream::client::Error>>,
}

/// Consumer `me` of group `g` on [`IN`], running the gated handler in this process.
async fn start(
    server: &RedisServer,
    me: &str,
    in_flight: usize,
    order_by: Option<&str>,
) -> Running {
    let client = admin(server);
    client.create_group(IN, "g", "0").await.unwrap();
    let cfg = ConsumerSettings {
        stream: IN.into(),
        group: "g".into(),
        consumer: me.into(),
        start: "0".into(),
        batch_size: 10,
        block: Duration::from_millis(500),
        claim_min_idle: Duration::from_secs(60),
        claim_interval: Duration::from_secs(60),
        max_deliveries: 5,
        dead_letter: format!("{IN}-dlq"),
        in_flight,
        order_by: order_by.map(str::to_owned),
        handler: None,
        routes: Vec::new(),
        unmatched: Unmatched::DeadLetter,
        handler_timeout: Duration::from_secs(30),
        retry: None,
        entry_limit: redstream::model::EntryLimit::default(),
    };
    let gate = Gate::new();
    let health = Health::default();
    let consumer = Consumer {
        cfg: Arc::new(cfg),
        client,
        router: Arc::new(ArcSwap::from_pointee(Router::single(
            Arc::new(Gated(gate.clone())),
            false,
        ))),
        keys: settings(&server.url()).auth.keys,
        guards: Arc::new(redstream::engine::guard::Guards::new(Arc::new(
            Health::default(),
        ))),
        stats: Arc::new(Stats::default()),
        liveness: health.register(me, Duration::from_secs(30)),
        retry_min: Duration::from_millis(50),
        retry_max: Duration::from_millis(500),
    };
    let stats = consumer.stats.clone();
    let (stop, shutdown) = shutdown::channel();
    let task = tokio::spawn(async move { consumer.run(shutdown).await });
    Running {
        gate,
        stats,
        stop,
        task,
    }
}

/// Polls `check` until it holds (every 5 ms, for at most 10 s).
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_claimed_away_mid_flight_writes_nothing_when_it_finishes() {
    let server = RedisServer::start();
    let id = server.xadd(IN, &[("n", "1")]);
    let r = start(&server, "alpha", 8, None).await;
    r.gate.entered(1).await;
    // While alpha's handler holds it, another consumer takes the entry over.
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(&[IN, "g", "thief", "0", id.as_str()])
        .query(&mut server.conn())
        .unwrap();
    r.gate.let_go(1);
    until("the commit's verdict", || {
        r.stats.not_ours.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(
        server.xlen(OUT),
        0,
        "no reply from a consumer that lost the entry"
    );
    assert_eq!(
        server.pending_of(IN, "g", "thief"),
        1,
        "the thief still owns it"
    );
    assert_eq!(r.stats.processed.load(Ordering::Relaxed), 0);
    r.stop.trigger();
    r.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_waits_for_a_frozen_message_and_commits_it_once() {
    let server = RedisServer::start();
    server.xadd(IN, &[("n", "1")]);
    let r = start(&server, "alpha", 8, None).await;
    r.gate.entered(1).await;
    r.stop.trigger();
    // Stopping cancels waits only: the loop is still there for the message in its handler.
    until("the read to be cancelled", || server.blocked_clients() == 0).await;
    assert!(!r.task.is_finished(), "the loop left a message in flight");
    assert_eq!(server.pending(IN, "g"), 1);
    r.gate.let_go(1);
    r.task.await.unwrap().unwrap();
    assert_eq!(server.xlen(OUT), 1);
    assert_eq!(server.pending(IN, "g"), 0);
    assert_eq!(r.stats.processed.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_by_runs_one_message_per_key_and_the_others_beside_it() {
    let server = RedisServer::start();
    for (n, key) in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("a3", "a")] {
        server.xadd(IN, &[("n", n), ("key", key)]);
    }
    let r = start(&server, "alpha", 8, Some("key")).await;
    // a1 and b1 run together; a2 waits behind a1 however long a1 takes.
    r.gate.entered(2).await;
    let mut first = r.gate.seen();
    first.sort();
    assert_eq!(first, ["a1", "b1"]);
    r.gate.let_go(2);
    r.gate.entered(1).await;
    assert_eq!(r.gate.seen()[2], "a2");
    r.gate.let_go(1);
    r.gate.entered(1).await;
    assert_eq!(r.gate.seen()[3], "a3");
    r.gate.let_go(1);
    until("four replies", || server.xlen(OUT) == 4).await;
    let order: Vec<String> = server
        .entries(OUT)
        .iter()
        .filter(|e| e.fields.get_str("key") == Some("a"))
        .map(|e| e.fields.get_str("n").unwrap().to_owned())
        .collect();
    assert_eq!(
        order,
        ["a1", "a2", "a3"],
        "one key's replies in stream order"
    );
    r.stop.trigger();
    r.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_bounds_what_is_read_until_a_slot_frees() {
    let server = RedisServer::start();
    for n in 0..5 {
        server.xadd(IN, &[("n", &n.to_string())]);
    }
    let r = start(&server, "alpha", 2, None).await;
    r.gate.entered(2).await;
    // Two in flight, and nothing more read: the other three are not yet delivered to anyone.
    assert_eq!(server.entries_read(IN, "g"), 2);
    r.gate.let_go(1);
    r.gate.entered(1).await;
    assert_eq!(server.entries_read(IN, "g"), 3);
    r.gate.let_go(4);
    until("five replies", || server.xlen(OUT) == 5).await;
    until("nothing pending", || server.pending(IN, "g") == 0).await;
    r.stop.trigger();
    r.task.await.unwrap().unwrap();
}
