//! Retries on a schedule (`retry = { backoff, jitter }`): a downstream outage longer than
//! `max_deliveries` fixed intervals dead-letters nothing, the due times live in Redis (a daemon killed
//! mid-schedule, restarted, and a second daemon of the group keep them), and delivery counts stay
//! handler attempts.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::{Daemon, RedisServer, daemon_toml, wait_for};

const IN: &str = "nova:task:retry:in";
const OUT: &str = "nova:task:retry:out";
const DLQ: &str = "nova:task:retry:in-dlq";

/// A consumer of IN whose `faults` handler fails while `switch` exists and replies to OUT otherwise;
/// entries idle 1 s are claimed, at most five deliveries.
fn consumer(switch: &Path, consumer: &str, retry: &str) -> String {
    format!(
        "[[consumers]]\nstream = \"{IN}\"\ngroup = \"g\"\nconsumer = \"{consumer}\"\nstart = \"0\"\n\
         block = \"200ms\"\nclaim_min_idle = \"1s\"\nclaim_interval = \"100ms\"\n\
         handler_timeout = \"500ms\"\nmax_deliveries = 5\nhandler = \"faults\"\n{retry}\n\
         faults = {{ reply_to = \"{OUT}\", fail_while_file = \"{}\" }}\n",
        switch.display()
    )
}

/// Waits 0.5 s, 1 s, 2 s, then 4 s: the fifth delivery comes 7.5 s after the first.
const SCHEDULE: &str = "retry = { backoff = [\"500ms\", \"1s\", \"2s\", \"4s\"], jitter = \"0%\" }";

/// Delivery count of each entry pending in IN's group.
fn deliveries(server: &RedisServer) -> HashMap<String, u64> {
    server.deliveries(IN, "g")
}

/// Ten messages through an outage of 5.5 s; `during(n)` runs once all of them failed their `n`th
/// delivery, for n = 2 and 3. Returns their ids.
fn through_an_outage(
    server: &RedisServer,
    switch: &Path,
    mut during: impl FnMut(u64),
) -> Vec<String> {
    std::fs::write(switch, "down").unwrap();
    let _ = std::fs::remove_file(switch.with_extension("calls"));
    let started = Instant::now();
    let ids: Vec<String> = (0..10)
        .map(|i| server.xadd(IN, &[("n", &i.to_string())]))
        .collect();
    for n in [2, 3] {
        wait_for(
            &format!("delivery {n} of each"),
            Duration::from_secs(20),
            || {
                let d = deliveries(server);
                (d.len() == ids.len() && d.values().all(|d| *d >= n)).then_some(())
            },
        );
        during(n);
    }
    wait_for("a fourth delivery of each", Duration::from_secs(30), || {
        let d = deliveries(server);
        (d.len() == ids.len() && d.values().all(|n| *n >= 4)).then_some(())
    });
    // Five fixed intervals of claim_min_idle (1 s) would have spent all five deliveries by now.
    let outage = Duration::from_millis(5500);
    std::thread::sleep(outage.saturating_sub(started.elapsed()));
    assert_eq!(server.xlen(DLQ), 0, "dead-lettered during the outage");
    assert!(
        deliveries(server).values().all(|n| *n == 4),
        "{:?}",
        deliveries(server)
    );
    std::fs::remove_file(switch).unwrap();
    // The handler ran each message four times, its deliveries 1 to 4, each retry no sooner than its
    // step of the schedule after the call before.
    let calls = std::fs::read_to_string(switch.with_extension("calls")).unwrap();
    let mut per_id: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
    for line in calls.lines() {
        let mut parts = line.split(' ');
        let (id, n, ms) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        per_id
            .entry(id)
            .or_default()
            .push((n.parse().unwrap(), ms.parse().unwrap()));
    }
    for id in &ids {
        let mut seen = per_id.remove(id.as_str()).unwrap_or_default();
        seen.sort();
        let counts: Vec<u64> = seen.iter().map(|(n, _)| *n).collect();
        assert_eq!(counts, [1, 2, 3, 4], "{id}: {calls}");
        for (pair, step) in seen.windows(2).zip([500, 1000, 2000]) {
            assert!(
                pair[1].1 >= pair[0].1 + step,
                "{id}: delivery {} came {} ms after the one before, not after {step} ms",
                pair[1].0,
                pair[1].1 - pair[0].1
            );
        }
    }
    ids
}

/// Every id replied to once, nothing dead-lettered, nothing pending, no retry left scheduled.
fn assert_drained(server: &RedisServer, ids: &[String]) {
    wait_for("every message answered", Duration::from_secs(30), || {
        (server.xlen(OUT) >= ids.len() as u64 && server.pending(IN, "g") == 0).then_some(())
    });
    let mut want = ids.to_vec();
    want.sort();
    assert_eq!(
        server.answered(OUT),
        want,
        "each message answered exactly once"
    );
    assert_eq!(server.xlen(DLQ), 0);
    let scheduled: u64 = redis::cmd("ZCARD")
        .arg(redstream::client::recover::due_key(IN, "g"))
        .query(&mut server.conn())
        .unwrap();
    assert_eq!(scheduled, 0);
}

/// A handler failing through an outage longer than five claim intervals: with the schedule, each
/// message's fifth delivery comes after the outage and nothing is dead-lettered; without it, all ten
/// are (the same outage, the same max_deliveries).
#[test]
fn an_outage_longer_than_the_fixed_intervals_dead_letters_nothing_on_a_schedule() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let switch = dir.path().join("down");
    let toml = daemon_toml(&server.url(), &consumer(&switch, "a", SCHEDULE));
    let (toml, metrics) = crate::util::with_metrics(&toml);
    let toml = format!("{toml}poll_interval = \"200ms\"\n");
    let mut d = Daemon::running(&toml, &[]);
    let scheduled =
        || crate::metrics::exported(metrics, "redstream_retries_scheduled", &["group=\"g\""]);
    let ids = through_an_outage(&server, &switch, |n| {
        if n == 3 {
            wait_for(
                "the scheduled retries in the metrics",
                Duration::from_secs(10),
                || (scheduled() > 0.0).then_some(()),
            );
        }
    });
    assert_drained(&server, &ids);
    wait_for(
        "no retry scheduled in the metrics",
        Duration::from_secs(10),
        || (scheduled() == 0.0).then_some(()),
    );
    assert_eq!(d.stop(Duration::from_secs(10)), 0);

    // The same outage without a schedule: the fixed interval spends every delivery within it.
    let server = RedisServer::start();
    std::fs::write(&switch, "down").unwrap();
    let toml = daemon_toml(&server.url(), &consumer(&switch, "a", ""));
    let mut d = Daemon::running(&toml, &[]);
    for i in 0..10 {
        server.xadd(IN, &[("n", &i.to_string())]);
    }
    let started = Instant::now();
    wait_for("all ten dead-lettered", Duration::from_secs(30), || {
        (server.xlen(DLQ) == 10).then_some(())
    });
    assert!(
        started.elapsed() < Duration::from_millis(5500),
        "{:?}",
        started.elapsed()
    );
    std::fs::remove_file(&switch).unwrap();
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// Every retry of the ten is scheduled (none is in the moment between its failure and its schedule).
fn all_scheduled(server: &RedisServer) {
    let due = redstream::client::recover::due_key(IN, "g");
    wait_for("ten retries scheduled", Duration::from_secs(10), || {
        let n: u64 = redis::cmd("ZCARD")
            .arg(&due)
            .query(&mut server.conn())
            .unwrap();
        (n == 10).then_some(())
    });
}

/// The schedule is in Redis: a daemon killed (-9) mid-schedule and started again does not run its
/// pending messages before their time (each retry still comes its step after the call before); when
/// it is killed again, a second daemon of the group takes the retries it held at their time; every
/// message is answered once.
#[test]
fn the_schedule_holds_across_a_kill_and_a_second_daemon() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let switch = dir.path().join("down");
    let toml_a = daemon_toml(&server.url(), &consumer(&switch, "a", SCHEDULE));
    let toml_b = daemon_toml(&server.url(), &consumer(&switch, "b", SCHEDULE));
    let mut a = Daemon::running(&toml_a, &[]);
    let mut b = None;
    let ids = through_an_outage(&server, &switch, |n| {
        all_scheduled(&server);
        if n == 2 {
            assert_eq!(
                server.pending_of(IN, "g", "a"),
                10,
                "the first daemon holds them all"
            );
            a.kill9();
            a = Daemon::running(&toml_a, &[]);
            b = Some(Daemon::running(&toml_b, &[]));
        } else {
            // The last one standing: b takes the retries a held, at their time.
            a.kill9();
        }
    });
    assert_drained(&server, &ids);
    assert_eq!(server.pending_of(IN, "g", "a"), 0);
    assert_eq!(b.unwrap().stop(Duration::from_secs(10)), 0);
}

/// A handler that says when (`retry-after`, here the echo example asked by `retry_after_ms`) is tried
/// again then, not at the consumer's next step: with steps of 100 ms and two deliveries, a message
/// asking for 1.5 s keeps its first delivery for 1.5 s and is dead-lettered only after its second.
#[test]
fn a_handler_that_says_when_is_retried_then_not_at_the_next_step() {
    let server = RedisServer::start();
    let echo = crate::util::root().join("handlers/build/echo.wasm");
    let toml = daemon_toml(
        &server.url(),
        &format!(
            "[[consumers]]\nstream = \"{IN}\"\ngroup = \"g\"\nstart = \"0\"\nblock = \"200ms\"\n\
             claim_min_idle = \"10s\"\nhandler_timeout = \"2s\"\nclaim_interval = \"100ms\"\nmax_deliveries = 2\n\
             retry = {{ backoff = [\"100ms\"], jitter = \"0%\" }}\nhandler = \"echo\"\n\
             [[handlers]]\nname = \"echo\"\nfile = \"{}\"\nroles = [\"task_write\"]\ntimeout = \"1s\"\n",
            echo.display()
        ),
    );
    let mut d = Daemon::running(&toml, &[]);
    let later = server.xadd(IN, &[("retry_after_ms", "1500"), ("_reply_to", OUT)]);
    let soon = server.xadd(IN, &[("n", "1"), ("_reply_to", OUT)]);
    let started = Instant::now();
    wait_for(
        "the other message answered",
        Duration::from_secs(10),
        || (server.xlen(OUT) == 1).then_some(()),
    );
    wait_for("the first failure", Duration::from_secs(10), || {
        (deliveries(&server).get(&later) == Some(&1)).then_some(())
    });
    // Steps of 100 ms would have spent both deliveries by now.
    while started.elapsed() < Duration::from_millis(1300) {
        assert_eq!(deliveries(&server).get(&later), Some(&1));
        assert_eq!(server.xlen(DLQ), 0);
        std::thread::sleep(Duration::from_millis(50));
    }
    let letter = wait_for("the dead letter", Duration::from_secs(10), || {
        server.entries(DLQ).pop()
    });
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(
        letter.fields.get_str("_dlq_reason"),
        Some("asked to be retried in 1500 ms (gave up after 2 deliveries)")
    );
    assert_eq!(
        server.entries(OUT)[0].fields.get_str("in_reply_to"),
        Some(soon.as_str())
    );
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// A `[[handlers]]` entry's own `retry` takes precedence over its consumer's for that handler's
/// messages: in one group, `eager` (the consumer's 100 ms steps) is dead-lettered at once, `patient`
/// (its own 1.5 s step) only after 1.5 s.
#[test]
fn a_handlers_own_retry_schedule_takes_precedence_over_its_consumers() {
    let server = RedisServer::start();
    let toml = daemon_toml(
        &server.url(),
        &format!(
            "[[consumers]]\nstream = \"{IN}\"\ngroup = \"g\"\nstart = \"0\"\nblock = \"200ms\"\n\
             claim_min_idle = \"10s\"\nhandler_timeout = \"2s\"\nclaim_interval = \"100ms\"\n\
             max_deliveries = 2\nretry = {{ backoff = [\"100ms\"], jitter = \"0%\" }}\n\
             [[consumers.routes]]\nequals = {{ to = \"patient\" }}\nhandler = \"patient\"\n\
             [[consumers.routes]]\nhandler = \"eager\"\n\
             [[handlers]]\nname = \"patient\"\nfaults = {{ fail_field = \"x\" }}\n\
             retry = {{ backoff = [\"1500ms\"], jitter = \"0%\" }}\n\
             [[handlers]]\nname = \"eager\"\nfaults = {{ fail_field = \"x\" }}\n"
        ),
    );
    let mut d = Daemon::running(&toml, &[]);
    let patient = server.xadd(IN, &[("to", "patient"), ("x", "1")]);
    let eager = server.xadd(IN, &[("x", "1")]);
    let started = Instant::now();
    let source = |id: &str| format!("{IN}/{id}");
    let letters = || -> Vec<String> {
        server
            .entries(DLQ)
            .iter()
            .filter_map(|e| e.fields.get_str("_dlq_source").map(str::to_owned))
            .collect()
    };
    wait_for("eager's dead letter", Duration::from_secs(5), || {
        (letters() == [source(&eager)]).then_some(())
    });
    while started.elapsed() < Duration::from_millis(1300) {
        assert_eq!(letters(), [source(&eager)]);
        assert_eq!(deliveries(&server).get(&patient), Some(&1));
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_for("patient's dead letter", Duration::from_secs(10), || {
        (letters().len() == 2).then_some(())
    });
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(letters()[1], source(&patient));
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// A retry whose schedule Redis refuses at that instant (here out of memory: every write refused) is
/// recorded once Redis takes writes again, not left without a time: the message runs again at its
/// step, not only after `claim_min_idle` (30 s here).
#[test]
fn a_schedule_redis_refused_for_a_moment_is_recorded_when_it_takes_writes_again() {
    let server = RedisServer::start();
    let toml = daemon_toml(
        &server.url(),
        &format!(
            "[[consumers]]\nstream = \"{IN}\"\ngroup = \"g\"\nstart = \"0\"\nblock = \"200ms\"\n\
             claim_min_idle = \"30s\"\nclaim_interval = \"100ms\"\nhandler_timeout = \"5s\"\n\
             max_deliveries = 5\nhandler = \"faults\"\n\
             retry = {{ backoff = [\"200ms\"], jitter = \"0%\" }}\n\
             faults = {{ reply_to = \"{OUT}\", fail_deliveries = 1 }}\n"
        ),
    );
    let mut d = Daemon::running(&toml, &[]);
    // The handler takes a second, then fails its first delivery: Redis is out of memory by then.
    let id = server.xadd(IN, &[("faults_sleep_ms", "1000")]);
    wait_for("the first delivery", Duration::from_secs(10), || {
        (deliveries(&server).get(&id) == Some(&1)).then_some(())
    });
    let mut c = server.conn();
    let set = |c: &mut redis::Connection, v: &str| {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(v)
            .query(c)
            .unwrap();
    };
    set(&mut c, "1");
    assert!(d.wait_log(
        "handler failed; the message stays pending",
        Duration::from_secs(10)
    ));
    std::thread::sleep(Duration::from_millis(400));
    let due: u64 = redis::cmd("ZCARD")
        .arg(redstream::client::recover::due_key(IN, "g"))
        .query(&mut c)
        .unwrap();
    assert_eq!(
        due, 0,
        "the schedule was refused while Redis was out of memory"
    );
    set(&mut c, "0");
    wait_for(
        "the reply at the retry's step",
        Duration::from_secs(10),
        || (server.xlen(OUT) == 1).then_some(()),
    );
    assert_eq!(
        server.entries(OUT)[0].fields.get_str("faults_sleep_ms"),
        Some("1000")
    );
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}
