//! The daemon as a process against a real redis-server: delivery, draining, crashes, Redis faults,
//! poison messages, claims, ordering — and effectively-once replies under repeated SIGKILLs.
//! Handlers are the built-in `forward` and the test-only `faults` (cargo feature `fault-injection`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::util::{Daemon, RedisServer, daemon_toml, wait_for};

const IN: &str = "nova:task:engine:in";
const OUT: &str = "nova:task:engine:out";
const DLQ: &str = "nova:task:engine:in-dlq";

/// A `[[consumers]]` entry with test-friendly timings; `opts` are raw TOML values that override them.
fn consumer(group: &str, opts: &[(&str, &str)]) -> String {
    let mut kv: Vec<(&str, String)> = vec![
        ("stream", format!("\"{IN}\"")),
        ("group", format!("\"{group}\"")),
        ("start", "\"0\"".into()),
        ("block", "\"1s\"".into()),
        ("claim_min_idle", "\"1s\"".into()),
        ("claim_interval", "\"200ms\"".into()),
        ("handler_timeout", "\"500ms\"".into()),
    ];
    for (k, v) in opts {
        match kv.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1 = v.to_string(),
            None => kv.push((k, v.to_string())),
        }
    }
    let mut out = String::from("[[consumers]]\n");
    for (k, v) in kv {
        out.push_str(&format!("{k} = {v}\n"));
    }
    out
}

fn forward(group: &str, opts: &[(&str, &str)]) -> String {
    let mut all = vec![
        ("handler", "\"forward\""),
        ("forward_to", "\"nova:task:engine:out\""),
    ];
    all.extend_from_slice(opts);
    consumer(group, &all)
}

fn publish(server: &RedisServer, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| server.xadd(IN, &[("n", &i.to_string())]))
        .collect()
}

/// Waits until the daemon's `faults` handler has `n` calls of announcing messages in hand (pending in
/// Redis is not enough: a stop before the loop has a read's reply leaves its entries for the next
/// start, as it should).
fn in_handlers(d: &Daemon, n: usize) {
    wait_for(
        &format!("{n} in their handlers"),
        Duration::from_secs(10),
        || (d.count_log("faults: handling the message") >= n).then_some(()),
    );
}

/// [`publish`], each message announcing itself in the `faults` handler.
fn publish_announced(server: &RedisServer, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| server.xadd(IN, &[("n", &i.to_string()), ("faults_announce", "1")]))
        .collect()
}

/// Source ids named by the `_cause` of each reply, counted.
fn causes(server: &RedisServer) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for e in server.entries(OUT) {
        let cause = e
            .fields
            .get_str("_cause")
            .expect("every reply has _cause")
            .to_owned();
        let id = cause
            .strip_prefix(&format!("{IN}/"))
            .expect("cause names the source stream")
            .to_owned();
        *seen.entry(id).or_insert(0) += 1;
    }
    seen
}

/// Every source id exactly once, nothing else.
fn assert_exactly_once(server: &RedisServer, ids: &[String]) {
    let seen = causes(server);
    let lost = ids.iter().filter(|id| !seen.contains_key(*id)).count();
    let duplicates: usize = seen.values().map(|n| n.saturating_sub(1)).sum();
    let strangers = seen.keys().filter(|id| !ids.contains(id)).count();
    println!("lost={lost} duplicates={duplicates}");
    assert_eq!(
        (lost, duplicates, strangers),
        (0, 0, 0),
        "lost, duplicated, unknown replies"
    );
}

fn wait_replies(server: &RedisServer, n: u64, limit: Duration) {
    wait_for(&format!("{n} replies"), limit, || {
        (server.xlen(OUT) >= n).then_some(())
    });
}

#[test]
fn forwards_with_envelope_and_drains_on_sigterm() {
    let server = RedisServer::start();
    let ids = publish(&server, 5);
    let mut d = Daemon::running(&daemon_toml(&server.url(), &forward("fwd", &[])), &[]);
    wait_replies(&server, 5, Duration::from_secs(10));
    // A publisher's own envelope fields: the copy gets this daemon's instead (never two of a name),
    // and keeps the trace id.
    let live = server.xadd(
        IN,
        &[
            ("n", "live"),
            ("_source", "someone-else"),
            ("_timestamp", "1"),
            ("_cause", "bogus"),
            ("_trace_id", "t-123"),
        ],
    );
    wait_replies(&server, 6, Duration::from_secs(5));
    assert_eq!(
        d.stop(Duration::from_secs(10)),
        0,
        "SIGTERM with nothing in flight exits 0"
    );
    let mut all = ids.clone();
    all.push(live.clone());
    assert_exactly_once(&server, &all);
    assert_eq!(server.pending(IN, "fwd"), 0);
    let replies = server.entries(OUT);
    let last = replies.last().unwrap();
    assert_eq!(last.fields.get_str("_source"), Some("test-daemon"));
    assert_eq!(
        last.fields.get_str("_cause"),
        Some(format!("{IN}/{live}").as_str())
    );
    assert_eq!(last.fields.get_str("_trace_id"), Some("t-123"));
    assert_ne!(last.fields.get_str("_timestamp"), Some("1"));
    for name in ["_source", "_timestamp", "_cause", "_trace_id"] {
        let count = last
            .fields
            .iter()
            .filter(|(n, _)| *n == name.as_bytes())
            .count();
        assert_eq!(count, 1, "{name} once in {:?}", last.fields);
    }
    assert!(replies[0].fields.get_str("_trace_id").is_some());
}

#[test]
fn sigterm_finishes_in_flight_messages_and_a_second_signal_exits_at_once() {
    let server = RedisServer::start();
    let toml = daemon_toml(
        &server.url(),
        &consumer(
            "slow",
            &[
                ("handler", "\"faults\""),
                ("handler_timeout", "\"5s\""),
                ("claim_min_idle", "\"10s\""),
                (
                    "faults",
                    "{ reply_to = \"nova:task:engine:out\", sleep = \"1500ms\" }",
                ),
            ],
        ),
    );
    let ids = publish_announced(&server, 4);
    let mut d = Daemon::running(&toml, &[]);
    in_handlers(&d, 4);
    let started = Instant::now();
    assert_eq!(d.stop(Duration::from_secs(10)), 0, "drained");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "it waited for the handlers"
    );
    assert_exactly_once(&server, &ids);
    assert_eq!(server.pending(IN, "slow"), 0);

    // Now with a second signal during the drain: out at once, the rest stays pending.
    let more = publish_announced(&server, 3);
    let mut d = Daemon::running(
        &toml
            .replace("1500ms", "20s")
            .replace("\"5s\"", "\"30s\"")
            .replace("\"10s\"", "\"60s\""),
        &[],
    );
    in_handlers(&d, 3);
    d.signal(libc::SIGTERM);
    assert!(d.wait_log("stopping", Duration::from_secs(5)));
    d.signal(libc::SIGTERM);
    // Handlers in flight take 20 s: an exit within 5 s is one that did not wait for them.
    let code = d
        .wait_exit(Duration::from_secs(5))
        .expect("exits at once on the second signal");
    assert_eq!(code, 1, "a forced stop is not a clean one");
    assert_eq!(
        server.pending(IN, "slow"),
        3,
        "unfinished entries stay pending: {more:?}"
    );
}

#[test]
fn kill_9_mid_batch_then_restart_handles_everything() {
    let server = RedisServer::start();
    let toml = daemon_toml(
        &server.url(),
        &consumer(
            "crash",
            &[
                ("handler", "\"faults\""),
                ("in_flight", "16"),
                ("batch_size", "16"),
                (
                    "faults",
                    "{ reply_to = \"nova:task:engine:out\", sleep = \"30ms\" }",
                ),
            ],
        ),
    );
    let ids = publish(&server, 200);
    let mut d = Daemon::running(&toml, &[]);
    wait_replies(&server, 20, Duration::from_secs(10));
    d.kill9();
    assert!(
        server.pending(IN, "crash") > 0,
        "the crash left entries pending"
    );
    let mut d = Daemon::running(&toml, &[]);
    wait_replies(&server, 200, Duration::from_secs(30));
    wait_for("nothing pending", Duration::from_secs(5), || {
        (server.pending(IN, "crash") == 0).then_some(())
    });
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    assert_exactly_once(&server, &ids);
}

#[test]
fn a_second_instance_claims_a_dead_instances_entries() {
    let server = RedisServer::start();
    let slow = consumer(
        "pair",
        &[
            ("consumer", "\"alpha\""),
            ("handler", "\"faults\""),
            ("handler_timeout", "\"5s\""),
            ("claim_min_idle", "\"30s\""),
            (
                "faults",
                "{ reply_to = \"nova:task:engine:out\", sleep = \"10s\" }",
            ),
        ],
    );
    let fast = consumer(
        "pair",
        &[
            ("consumer", "\"beta\""),
            ("handler", "\"faults\""),
            ("claim_min_idle", "\"1s\""),
            ("faults", "{ reply_to = \"nova:task:engine:out\" }"),
        ],
    );
    let ids = publish(&server, 10);
    let mut alpha = Daemon::running(&daemon_toml(&server.url(), &slow), &[]);
    wait_for("alpha holds 10", Duration::from_secs(5), || {
        (server.pending_of(IN, "pair", "alpha") == 10).then_some(())
    });
    alpha.kill9();
    let started = Instant::now();
    let mut beta = Daemon::running(&daemon_toml(&server.url(), &fast), &[]);
    wait_replies(&server, 10, Duration::from_secs(15));
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "claimed only after claim_min_idle"
    );
    wait_for("nothing pending", Duration::from_secs(5), || {
        (server.pending(IN, "pair") == 0).then_some(())
    });
    assert!(beta.wait_log("claimed idle entries", Duration::from_secs(1)));
    assert_eq!(beta.stop(Duration::from_secs(10)), 0);
    assert_exactly_once(&server, &ids);
}

#[test]
fn redis_restart_without_persistence_recreates_the_group_without_a_hot_loop() {
    let mut server = RedisServer::start();
    let mut d = Daemon::running(&daemon_toml(&server.url(), &forward("phoenix", &[])), &[]);
    let before = publish(&server, 3);
    wait_replies(&server, 3, Duration::from_secs(10));
    let _ = before;

    server.kill();
    let lines_before = d.logs().len();
    // Redis stays down for a while: the daemon must back off, not spin.
    std::thread::sleep(Duration::from_secs(3));
    let outage_lines = d.logs().len() - lines_before;
    println!("log lines during the outage: {outage_lines}");
    server.restart();
    let after = publish(&server, 5);
    wait_replies(&server, 5, Duration::from_secs(20));
    assert_exactly_once(&server, &after);
    assert!(
        d.count_log("re-created the group") >= 1,
        "{}",
        d.logs().join("\n")
    );
    assert!(
        outage_lines <= 15,
        "{outage_lines} log lines in a 3 s outage:\n{}",
        d.logs()[lines_before..].join("\n")
    );
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// Redis loses its data while the daemon is down, and a producer writes again before it starts: the
/// new process takes its groups' last positions from its state directory (daemon::positions), sees
/// the stream is a new one, and re-creates the group where nothing is skipped — not at `start = "$"`,
/// which would skip every message published since Redis came back.
#[test]
fn a_daemon_started_after_redis_lost_its_data_skips_nothing_published_since() {
    let mut server = RedisServer::start();
    let state = tempfile::tempdir().unwrap();
    let env = [("STATE_DIRECTORY", state.path().to_str().unwrap())];
    let toml = daemon_toml(&server.url(), &forward("phoenix", &[("start", "\"$\"")]));
    let mut d = Daemon::running(&toml, &env);
    let before = publish(&server, 3);
    wait_replies(&server, 3, Duration::from_secs(10));
    assert_exactly_once(&server, &before);
    // The position is written within a second.
    let file = wait_for("the positions file", Duration::from_secs(5), || {
        let entry = std::fs::read_dir(state.path()).ok()?.flatten().find(|e| {
            e.file_name().to_string_lossy().starts_with("positions-")
                && std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains(&before[2]))
        })?;
        Some(entry.path())
    });
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text, format!("{IN}\tphoenix\t{}\n", before[2]));

    server.restart_empty();
    let after = publish(&server, 5);
    let mut d = Daemon::running(&toml, &env);
    wait_replies(&server, 5, Duration::from_secs(20));
    let replies = server.entries(OUT);
    let mut got: Vec<String> = replies
        .iter()
        .filter_map(|e| e.fields.get_str("_cause").map(str::to_owned))
        .collect();
    got.sort();
    assert_eq!(
        got,
        after
            .iter()
            .map(|id| format!("{IN}/{id}"))
            .collect::<Vec<_>>()
    );
    assert!(
        d.count_log("re-created the group") >= 1,
        "{}",
        d.logs().join("\n")
    );
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// Redis at `maxclients` refuses every new connection: the daemon degrades and waits — no loop is
/// restarted — and messages flow again once connections can be made.
#[test]
fn maxclients_degrades_and_waits_without_restarting_loops() {
    use crate::metrics::{get, sample};
    let server = RedisServer::start();
    let port = crate::util::redis_server::free_port();
    let toml = daemon_toml(
        &server.url(),
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{port}\"\n{}",
            forward("crowded", &[])
        ),
    );
    let mut d = Daemon::running(&toml, &[]);
    publish(&server, 1);
    wait_replies(&server, 1, Duration::from_secs(10));

    // Only this connection may stay: every other is closed and no new one is let in.
    let mut admin = server.conn();
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "maxclients", "1"])
        .query(&mut admin)
        .unwrap();
    let _: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
        .query(&mut admin)
        .unwrap();
    let refused = |t: &str| sample(t, "redstream_errors_total", &["kind=\"connection\""]);
    let (_, before) = get(port, "/metrics");
    wait_for(
        "degraded after refused reconnects",
        Duration::from_secs(20),
        || {
            let (_, t) = get(port, "/metrics");
            (sample(&t, "redstream_degraded", &[]) == 1.0 && refused(&t) >= refused(&before) + 3.0)
                .then_some(())
        },
    );
    let (_, during) = get(port, "/metrics");
    assert_eq!(
        sample(
            &during,
            "redstream_errors_total",
            &["kind=\"loop_restart\""]
        ),
        0.0,
        "a full server is waited out, not a reason to restart loops:\n{}",
        d.logs().join("\n")
    );

    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "maxclients", "10000"])
        .query(&mut admin)
        .unwrap();
    publish(&server, 1);
    wait_replies(&server, 2, Duration::from_secs(20));
    wait_for("healthy again", Duration::from_secs(20), || {
        let (_, t) = get(port, "/metrics");
        (sample(&t, "redstream_degraded", &[]) == 0.0).then_some(())
    });
    let (_, after) = get(port, "/metrics");
    assert_eq!(
        sample(&after, "redstream_errors_total", &["kind=\"loop_restart\""]),
        0.0
    );
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

#[test]
fn group_destroyed_or_stream_deleted_during_a_blocked_read_and_killed_clients() {
    let server = RedisServer::start();
    // start = "$": a re-created group starts at the end (with "0" it would re-read the whole stream).
    let toml = daemon_toml(
        &server.url(),
        &forward("vanishing", &[("block", "\"5s\""), ("start", "\"$\"")]),
    );
    let mut d = Daemon::running(&toml, &[]);
    let first = publish(&server, 1);
    wait_replies(&server, 1, Duration::from_secs(10));
    let mut conn = server.conn();

    // The reader is blocked (5 s); destroy its group under it.
    let _: i64 = redis::cmd("XGROUP")
        .arg(&["DESTROY", IN, "vanishing"])
        .query(&mut conn)
        .unwrap();
    assert!(
        d.wait_log("re-created the group", Duration::from_secs(10)),
        "{}",
        d.logs().join("\n")
    );
    let a = server.xadd(IN, &[("n", "after-destroy")]);
    wait_replies(&server, 2, Duration::from_secs(10));

    // Delete the whole stream under a blocked read.
    let _: i64 = redis::cmd("DEL").arg(IN).query(&mut conn).unwrap();
    wait_for("a second re-creation", Duration::from_secs(10), || {
        (d.count_log("re-created the group") >= 2).then_some(())
    });
    let b = server.xadd(IN, &[("n", "after-del")]);
    wait_replies(&server, 3, Duration::from_secs(10));

    // Every normal client connection dropped at once.
    let _: redis::Value = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "normal"])
        .query(&mut conn)
        .unwrap();
    let c = server.xadd(IN, &[("n", "after-kill")]);
    wait_replies(&server, 4, Duration::from_secs(15));
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    assert_exactly_once(&server, &[first[0].clone(), a, b, c]);
}

#[test]
fn redis_stopped_until_commands_time_out_then_continued() {
    let server = RedisServer::start();
    let toml = daemon_toml(&server.url(), &forward("frozen", &[]))
        .replace("command_timeout = \"2s\"", "command_timeout = \"1s\"");
    let mut d = Daemon::running(&toml, &[]);
    let first = publish(&server, 1);
    wait_replies(&server, 1, Duration::from_secs(10));
    let pid = server.pid();
    // SAFETY: signals to the redis-server process this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    // Stopped until the daemon has seen its commands time out (command_timeout is 1 s).
    let timed_out = d.wait_log("timed out", Duration::from_secs(20));
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(
        timed_out,
        "commands timed out while Redis was stopped:\n{}",
        d.logs().join("\n")
    );
    let after = server.xadd(IN, &[("n", "after-stop")]);
    wait_replies(&server, 2, Duration::from_secs(20));
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    assert_exactly_once(&server, &[first[0].clone(), after]);
}

#[test]
fn poison_message_is_dead_lettered_while_the_others_flow() {
    let server = RedisServer::start();
    let toml = daemon_toml(
        &server.url(),
        &consumer(
            "poison",
            &[
                ("handler", "\"faults\""),
                ("max_deliveries", "3"),
                ("claim_min_idle", "\"1500ms\""),
                ("handler_timeout", "\"300ms\""),
                (
                    "faults",
                    "{ reply_to = \"nova:task:engine:out\", fail_field = \"poison\" }",
                ),
            ],
        ),
    );
    let mut d = Daemon::running(&toml, &[]);
    let bad = server.xadd(IN, &[("poison", "yes"), ("n", "bad")]);
    let good = publish(&server, 50);
    wait_replies(&server, 50, Duration::from_secs(10));
    // Dead-lettering the poison takes two claims, each after 1.5 s idle: the others did not wait.
    assert_eq!(
        server.xlen(DLQ),
        0,
        "the good ones were done before the poison ran out of deliveries"
    );

    let dead = wait_for("a dead letter", Duration::from_secs(15), || {
        server.entries(DLQ).pop()
    });
    assert_eq!(
        dead.fields.get_str("n"),
        Some("bad"),
        "original fields kept"
    );
    assert_eq!(
        dead.fields.get_str("_dlq_source"),
        Some(format!("{IN}/{bad}").as_str())
    );
    assert_eq!(dead.fields.get_str("_dlq_deliveries"), Some("3"));
    // Each failure was visible before the dead letter: a WARN with the reason and the count.
    let logs = d.logs();
    for n in 1..=2 {
        assert!(
            logs.iter().any(|l| l.contains("will be retried")
                && l.contains(&format!("deliveries={n}"))
                && l.contains("poison: field poison present")),
            "no retry line for delivery {n}:\n{}",
            logs.join("\n")
        );
    }
    assert_eq!(dead.fields.get_str("_dlq_handler"), Some("faults"));
    assert!(
        dead.fields
            .get_str("_dlq_reason")
            .unwrap()
            .contains("poison"),
        "{:?}",
        dead.fields.get_str("_dlq_reason")
    );
    wait_for("nothing pending", Duration::from_secs(5), || {
        (server.pending(IN, "poison") == 0).then_some(())
    });
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    assert_exactly_once(&server, &good);
}

#[test]
fn transient_failures_are_all_eventually_acked_and_none_dead_lettered() {
    let server = RedisServer::start();
    let toml = daemon_toml(
        &server.url(),
        &consumer(
            "flaky",
            &[
                ("handler", "\"faults\""),
                ("max_deliveries", "10"),
                ("claim_min_idle", "\"600ms\""),
                ("handler_timeout", "\"300ms\""),
                ("claim_interval", "\"100ms\""),
                (
                    "faults",
                    "{ reply_to = \"nova:task:engine:out\", fail_deliveries = 2, fail_every = 5 }",
                ),
            ],
        ),
    );
    let ids = publish(&server, 50);
    let mut d = Daemon::running(&toml, &[]);
    wait_replies(&server, 50, Duration::from_secs(30));
    wait_for("nothing pending", Duration::from_secs(5), || {
        (server.pending(IN, "flaky") == 0).then_some(())
    });
    assert_eq!(server.xlen(DLQ), 0);
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    assert_exactly_once(&server, &ids);
}

#[test]
fn entries_trimmed_while_pending_are_acked_never_dispatched() {
    let server = RedisServer::start();
    let slow = consumer(
        "trim",
        &[
            ("consumer", "\"owner\""),
            ("handler", "\"faults\""),
            ("handler_timeout", "\"5s\""),
            ("claim_min_idle", "\"30s\""),
            (
                "faults",
                "{ reply_to = \"nova:task:engine:out\", sleep = \"10s\" }",
            ),
        ],
    );
    let ids = publish(&server, 10);
    let mut d = Daemon::running(&daemon_toml(&server.url(), &slow), &[]);
    wait_for("10 pending", Duration::from_secs(5), || {
        (server.pending(IN, "trim") == 10).then_some(())
    });
    d.kill9();
    let mut conn = server.conn();
    // Trim the first four away, delete two more by id.
    let _: i64 = redis::cmd("XTRIM")
        .arg(&[IN, "MINID", &ids[4]])
        .query(&mut conn)
        .unwrap();
    let _: i64 = redis::cmd("XDEL")
        .arg(IN)
        .arg(&ids[8])
        .arg(&ids[9])
        .query(&mut conn)
        .unwrap();

    // The same consumer restarts: its PEL re-read finds the gaps (own-PEL path).
    let fast = slow.replace("sleep = \"10s\"", "sleep = \"0s\"");
    let mut d = Daemon::running(&daemon_toml(&server.url(), &fast), &[]);
    wait_for("nothing pending", Duration::from_secs(10), || {
        (server.pending(IN, "trim") == 0).then_some(())
    });
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    assert_exactly_once(&server, &ids[4..8]);
    assert!(
        server
            .entries(OUT)
            .iter()
            .all(|e| e.fields.get("n").is_some()),
        "no empty-bodied dispatch"
    );

    // And through XAUTOCLAIM by another consumer (claim path).
    let more = publish(&server, 4);
    let mut d = Daemon::running(&daemon_toml(&server.url(), &slow), &[]);
    wait_for("4 pending", Duration::from_secs(5), || {
        (server.pending(IN, "trim") == 4).then_some(())
    });
    d.kill9();
    let _: i64 = redis::cmd("XDEL")
        .arg(IN)
        .arg(&more[0])
        .query(&mut conn)
        .unwrap();
    let other = consumer(
        "trim",
        &[
            ("consumer", "\"other\""),
            ("handler", "\"faults\""),
            ("faults", "{ reply_to = \"nova:task:engine:out\" }"),
        ],
    );
    let mut d = Daemon::running(&daemon_toml(&server.url(), &other), &[]);
    wait_for("nothing pending", Duration::from_secs(10), || {
        (server.pending(IN, "trim") == 0).then_some(())
    });
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    let mut expected: Vec<String> = ids[4..8].to_vec();
    expected.extend_from_slice(&more[1..]);
    assert_exactly_once(&server, &expected);
}

#[test]
fn consumer_names_are_stable_across_restarts() {
    let server = RedisServer::start();
    let toml = daemon_toml(&server.url(), &forward("stable", &[]));
    for _ in 0..20 {
        let mut d = Daemon::running(&toml, &[]);
        assert_eq!(d.stop(Duration::from_secs(10)), 0);
    }
    let mut d = Daemon::running(&toml, &[("REDSTREAM_DAEMON__INSTANCE", "2")]);
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    let mut names = server.consumers(IN, "stable");
    names.sort();
    assert_eq!(
        names.len(),
        2,
        "one consumer per instance, whatever the restarts: {names:?}"
    );
    assert!(names[0].starts_with("test-daemon@"), "{names:?}");
    assert_eq!(names[1], format!("{}#2", names[0]));
}

#[test]
fn claim_race_yields_exactly_one_set_of_replies() {
    let server = RedisServer::start();
    // alpha is slow (3 s, within its own timeout); beta claims anything idle for 500 ms.
    let alpha = daemon_toml(
        &server.url(),
        &consumer(
            "race",
            &[
                ("consumer", "\"alpha\""),
                ("handler", "\"faults\""),
                ("handler_timeout", "\"5s\""),
                ("claim_min_idle", "\"30s\""),
                (
                    "faults",
                    "{ reply_to = \"nova:task:engine:out\", sleep = \"3s\" }",
                ),
            ],
        ),
    )
    .replace("name = \"test-daemon\"", "name = \"alpha-daemon\"");
    let beta = daemon_toml(
        &server.url(),
        &consumer(
            "race",
            &[
                ("consumer", "\"beta\""),
                ("handler", "\"faults\""),
                ("handler_timeout", "\"300ms\""),
                ("claim_min_idle", "\"500ms\""),
                ("claim_interval", "\"100ms\""),
                ("faults", "{ reply_to = \"nova:task:engine:out\" }"),
            ],
        ),
    )
    .replace("name = \"test-daemon\"", "name = \"beta-daemon\"");
    let mut a = Daemon::running(&alpha, &[]);
    let id = server.xadd(IN, &[("n", "contested")]);
    wait_for("alpha holds it", Duration::from_secs(5), || {
        (server.pending_of(IN, "race", "alpha") == 1).then_some(())
    });
    let mut b = Daemon::running(&beta, &[]);
    assert!(
        a.wait_log("another consumer owned the entry", Duration::from_secs(10)),
        "{}",
        a.logs().join("\n")
    );
    assert_eq!(a.stop(Duration::from_secs(10)), 0);
    assert_eq!(b.stop(Duration::from_secs(10)), 0);
    assert_exactly_once(&server, std::slice::from_ref(&id));
    assert_eq!(
        server.entries(OUT)[0].fields.get_str("_source"),
        Some("beta-daemon"),
        "the claimer's commit won"
    );
}

#[test]
fn order_by_keeps_each_key_in_order_while_keys_run_in_parallel() {
    let server = RedisServer::start();
    let toml = daemon_toml(
        &server.url(),
        &consumer(
            "ordered",
            &[
                ("handler", "\"faults\""),
                ("order_by", "\"k\""),
                ("in_flight", "8"),
                (
                    "faults",
                    "{ reply_to = \"nova:task:engine:out\", sleep = \"40ms\" }",
                ),
            ],
        ),
    );
    for i in 0..10 {
        for k in ["a", "b", "c", "d"] {
            server.xadd(IN, &[("k", k), ("n", &i.to_string())]);
        }
    }
    let mut d = Daemon::running(&toml, &[]);
    wait_replies(&server, 40, Duration::from_secs(20));
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    let mut runs: Vec<(String, u64, u64)> = server
        .entries(OUT)
        .iter()
        .map(|e| {
            let k = e.fields.get_str("k").unwrap().to_owned();
            let n = e.fields.get_str("n").unwrap().parse().unwrap();
            let t = e
                .fields
                .get_str("faults_started_us")
                .unwrap()
                .parse()
                .unwrap();
            (k, n, t)
        })
        .collect();
    runs.sort_by_key(|r| r.2);
    for k in ["a", "b", "c", "d"] {
        let order: Vec<u64> = runs.iter().filter(|r| r.0 == k).map(|r| r.1).collect();
        assert_eq!(order, (0..10).collect::<Vec<_>>(), "key {k} ran in order");
    }
    // Different keys overlapped: at some moment more than one key was running.
    let busy = runs
        .windows(2)
        .filter(|w| w[1].2 < w[0].2 + 40_000 && w[0].0 != w[1].0)
        .count();
    assert!(busy >= 10, "keys ran in parallel ({busy} overlaps)");
}

/// Per-key order holds for the replies as written, not only for the handler calls: slow messages (50 of
/// 5,000, 300 ms each) spread over every key (a commit of one key out while the next of that key finishes and is committed
/// alone) never put a later message's reply before an earlier one's of the same key.
#[test]
fn order_by_keeps_each_keys_replies_in_order_with_slow_messages_on_every_key() {
    let server = RedisServer::start();
    let toml = daemon_toml(
        &server.url(),
        &consumer(
            "ordered-commits",
            &[
                ("handler", "\"faults\""),
                ("order_by", "\"k\""),
                ("handler_timeout", "\"2s\""),
                ("claim_min_idle", "\"10s\""),
                ("faults", "{ reply_to = \"nova:task:engine:out\" }"),
            ],
        ),
    );
    const KEYS: usize = 20;
    const N: usize = 5000;
    let ids: Vec<String> = {
        let mut conn = server.conn();
        let mut pipe = redis::pipe();
        for i in 0..N {
            let cmd = pipe.cmd("XADD").arg(IN).arg("*");
            cmd.arg("k").arg(i % KEYS).arg("n").arg(i);
            // Every key has slow messages: 50 of 5,000 take 300 ms.
            if i % 97 == 3 {
                cmd.arg("faults_sleep_ms").arg(300);
            }
        }
        pipe.query(&mut conn).unwrap()
    };
    let mut d = Daemon::running(&toml, &[]);
    wait_replies(&server, N as u64, Duration::from_secs(60));
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    assert_exactly_once(&server, &ids);
    let mut last: HashMap<String, usize> = HashMap::new();
    let mut inversions = Vec::new();
    for e in server.entries(OUT) {
        let k = e.fields.get_str("k").unwrap().to_owned();
        let n: usize = e.fields.get_str("n").unwrap().parse().unwrap();
        if let Some(&before) = last.get(&k)
            && before > n
        {
            inversions.push(format!("key {k}: {n} written after {before}"));
        }
        last.insert(k, n);
    }
    assert!(
        inversions.is_empty(),
        "{} inversions: {inversions:?}",
        inversions.len()
    );
}

#[test]
fn effectively_once_under_repeated_sigkill() {
    let server = RedisServer::start();
    // Each message takes its handler ~2 ms, so the whole run spans the five kills.
    let toml = daemon_toml(
        &server.url(),
        &consumer(
            "crashy",
            &[
                ("handler", "\"faults\""),
                ("in_flight", "32"),
                ("batch_size", "100"),
                (
                    "faults",
                    "{ reply_to = \"nova:task:engine:out\", sleep = \"2ms\" }",
                ),
            ],
        ),
    );
    // Among them, poison of every kind a commit meets: a reply aimed at a key of another type, an
    // entry with more fields than [limits] allows, and one with more bytes. Each must reach the
    // dead-letter stream exactly once.
    server.set_string("nova:task:cache:data");
    let all: Vec<String> = {
        let mut conn = server.conn();
        let mut pipe = redis::pipe();
        for i in 0..10_000 {
            let cmd = pipe.cmd("XADD").arg(IN).arg("*").arg("n").arg(i);
            match i % 1000 {
                250 => {
                    for f in 0..4000 {
                        cmd.arg(format!("w{f}")).arg(f);
                    }
                }
                500 => {
                    cmd.arg("_reply_to").arg("nova:task:cache:data");
                }
                750 => {
                    cmd.arg("big").arg(vec![b'b'; 2 << 20]);
                }
                _ => {}
            }
        }
        pipe.query(&mut conn).unwrap()
    };
    let (mut poison, mut ids) = (Vec::new(), Vec::new());
    for (i, id) in all.into_iter().enumerate() {
        if [250, 500, 750].contains(&(i % 1000)) {
            poison.push(id);
        } else {
            ids.push(id);
        }
    }
    // RSTEST_CRASH_SEED replays a failed run's kill schedule (the seed is printed below).
    let seed = match std::env::var("RSTEST_CRASH_SEED") {
        Ok(s) => s.parse().expect("RSTEST_CRASH_SEED is a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    // xorshift never leaves 0: start elsewhere.
    let mut rng = seed.max(1);
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    println!("kill schedule seed {seed} (replay with RSTEST_CRASH_SEED={seed})");
    for kill in 0..5 {
        let d = Daemon::running(&toml, &[]);
        // A random moment while work remains: after a random share of what is left is done.
        let done = server.xlen(OUT);
        let target = done + 1 + next() % (10_000 - done).max(1) / 2;
        wait_for("progress before the kill", Duration::from_secs(30), || {
            (server.xlen(OUT) >= target.min(9_999)).then_some(())
        });
        let mut d = d;
        d.kill9();
        println!("kill {kill}: at {} replies", server.xlen(OUT));
    }
    let mut d = Daemon::running(&toml, &[]);
    wait_replies(&server, ids.len() as u64, Duration::from_secs(60));
    wait_for("nothing pending", Duration::from_secs(20), || {
        (server.pending(IN, "crashy") == 0).then_some(())
    });
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    assert_exactly_once(&server, &ids);
    let mut dead: Vec<String> = server
        .entries(DLQ)
        .iter()
        .map(|e| {
            e.fields
                .get_str("_dlq_source")
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    dead.sort();
    poison.sort();
    println!(
        "dead letters: {} of {} poison messages",
        dead.len(),
        poison.len()
    );
    assert_eq!(
        dead, poison,
        "every poison message dead-lettered exactly once"
    );
}

#[test]
fn run_exits_69_when_redis_stays_away_and_78_on_a_bad_consumer() {
    let url = crate::util::UNREACHABLE.to_string();
    let toml = daemon_toml(&url, &forward("nobody", &[]))
        .replace("[redis]\n", "[redis]\nstartup_wait = \"1s\"\n");
    let mut d = Daemon::start(&toml, &[]);
    assert_eq!(
        d.wait_exit(Duration::from_secs(15)),
        Some(69),
        "{}",
        d.logs().join("\n")
    );

    let bad = daemon_toml(
        &url,
        &forward(
            "bad",
            &[("claim_min_idle", "\"1s\""), ("handler_timeout", "\"2s\"")],
        ),
    );
    let mut d = Daemon::start(&bad, &[]);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(78));
    assert!(
        d.logs().join("\n").contains("consumers[0].claim_min_idle"),
        "{}",
        d.logs().join("\n")
    );
}

/// How many XREADGROUP calls `server` has served.
fn reads(server: &RedisServer) -> u64 {
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut server.conn())
        .unwrap();
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_xreadgroup:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// With the default consumer settings, reads follow the backlog: 20,000 waiting entries are drained
/// in reads that double up to the 500 cap (a fixed read of 100, the old default, would take 200
/// reads), and once the backlog is gone each lone message is still handled at once.
#[test]
fn default_reads_grow_with_a_backlog_and_lone_messages_still_go_at_once() {
    let server = RedisServer::start();
    let mut ids = server.xadd_backlog(IN, 20_000);
    let toml = daemon_toml(&server.url(), &forward("g", &[]));
    assert!(!toml.contains("batch_size") && !toml.contains("in_flight"));
    let mut d = Daemon::running(&toml, &[]);
    wait_for("the backlog drained", Duration::from_secs(60), || {
        (server.xlen(OUT) == 20_000 && server.pending(IN, "g") == 0).then_some(())
    });
    let backlog_reads = reads(&server);
    println!("20,000 entries drained in {backlog_reads} reads");
    assert!(
        backlog_reads < 120,
        "{backlog_reads} reads: the read size did not grow"
    );
    // Lone messages afterwards: each is handled promptly (a small read returns what is there).
    for i in 0..5 {
        let started = Instant::now();
        ids.push(server.xadd(IN, &[("n", &format!("late{i}"))]));
        wait_for("the late reply", Duration::from_secs(5), || {
            (server.xlen(OUT) == 20_001 + i).then_some(())
        });
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    assert_exactly_once(&server, &ids);
}

/// A `_trace_id` is a publisher's text: one with a newline must not forge a log line — not in the
/// retry line of a failing handler, the message span, nor the dead-letter line.
#[test]
fn a_trace_id_with_a_newline_forges_no_log_line() {
    let server = RedisServer::start();
    let toml = daemon_toml(
        &server.url(),
        &consumer(
            "forgery",
            &[
                ("handler", "\"faults\""),
                ("max_deliveries", "2"),
                ("faults", "{ fail_field = \"poison\" }"),
            ],
        ),
    );
    let mut d = Daemon::running(&toml, &[("RUST_LOG", "debug")]);
    server.xadd(
        IN,
        &[
            ("poison", "1"),
            (
                "_trace_id",
                "t-1\nFORGED ERROR redstream: all is lost\r\nFORGED too",
            ),
        ],
    );
    wait_for("the dead letter", Duration::from_secs(20), || {
        (server.xlen(DLQ) == 1).then_some(())
    });
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    let logs = d.logs();
    assert!(
        logs.iter()
            .any(|l| l.contains("handler failed") && l.contains("t-1\\nFORGED")),
        "the trace id is logged, escaped:\n{}",
        logs.join("\n")
    );
    assert!(
        logs.iter().all(|l| !l.starts_with("FORGED")),
        "a forged line:\n{}",
        logs.join("\n")
    );
}
