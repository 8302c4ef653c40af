//! Handlers' state (`[[handlers]] state = "…"`, the WIT `state` interface): values written by the commit
//! script together with the replies and the ack. A message whose commit did not happen changed nothing
//! (a kill -9 between the handler's writes and the commit), and a message run twice — by a slow owner
//! and by the consumer that claimed it — changed the state once.

use std::time::Duration;

use crate::util::{Daemon, RedisServer, daemon_toml, root, wait_for};

const IN: &str = "nova:task:counter:in";
const OUT: &str = "nova:task:counter:out";
const NS: &str = "nova:task:counter:state";

/// The counter fixture on IN, keeping its counts under NS, with calls of at most `timeout` ms; entries
/// idle 0.5 s longer are claimed. `instance` names the daemon (two of them are two consumers).
fn toml(server: &RedisServer, instance: &str, timeout: u64) -> String {
    daemon_toml(
        &server.url(),
        &format!(
            "[[consumers]]\nstream = \"{IN}\"\ngroup = \"g\"\nstart = \"0\"\nblock = \"200ms\"\n\
             claim_min_idle = \"{}ms\"\nclaim_interval = \"100ms\"\nhandler_timeout = \"{timeout}ms\"\n\
             handler = \"counter\"\n\
             [[handlers]]\nname = \"counter\"\nfile = \"{}\"\nroles = [\"task_write\"]\n\
             timeout = \"{timeout}ms\"\nstate = \"{NS}\"\nconfig = {{ reply_to = \"{OUT}\" }}\n",
            timeout + 500,
            root().join("handlers/build/counter.wasm").display()
        ),
    )
    .replace("[daemon]", &format!("[daemon]\ninstance = \"{instance}\""))
}

/// The count of `k` in the handler's state.
fn count(server: &RedisServer, k: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(format!("{NS}:count:{k}"))
        .query(&mut server.conn())
        .unwrap()
}

/// The replies for key `k`, as (count, before).
fn replies(server: &RedisServer, k: &str) -> Vec<(String, String)> {
    server
        .entries(OUT)
        .into_iter()
        .filter(|e| e.fields.get_str("k") == Some(k))
        .map(|e| {
            (
                e.fields.get_str("count").unwrap().to_owned(),
                e.fields.get_str("before").unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn state_is_committed_with_the_ack_and_a_kill_before_the_commit_changes_nothing() {
    let server = RedisServer::start();
    let mut d = Daemon::running(&toml(&server, "a", 4000), &[]);
    server.xadd(IN, &[("k", "a")]);
    wait_for("the first count", Duration::from_secs(10), || {
        (replies(&server, "a").len() == 1).then_some(())
    });
    assert_eq!(count(&server, "a").as_deref(), Some("1"));
    // The second message's call writes the count, then stays busy: the daemon dies before the commit.
    let second = server.xadd(IN, &[("k", "a"), ("spin_ms", "3000")]);
    wait_for(
        "the second message in its handler",
        Duration::from_secs(10),
        || (server.deliveries(IN, "g").get(&second) == Some(&1)).then_some(()),
    );
    std::thread::sleep(Duration::from_millis(300));
    d.kill9();
    assert_eq!(
        count(&server, "a").as_deref(),
        Some("1"),
        "a call whose message was not committed changed nothing"
    );
    assert_eq!(server.pending(IN, "g"), 1);
    // Run again (the same consumer re-reads it at start), it sees the old value and commits once.
    let mut d = Daemon::running(&toml(&server, "a", 4000), &[]);
    wait_for("the second count", Duration::from_secs(15), || {
        (replies(&server, "a").len() == 2).then_some(())
    });
    assert_eq!(
        replies(&server, "a"),
        [("1".into(), String::new()), ("2".into(), "1".into())]
    );
    assert_eq!(count(&server, "a").as_deref(), Some("2"));
    wait_for("nothing pending", Duration::from_secs(10), || {
        (server.pending(IN, "g") == 0).then_some(())
    });
    // A time to live is set with the value; a reset deletes it.
    server.xadd(IN, &[("k", "t"), ("ttl_ms", "60000")]);
    wait_for("the count with a ttl", Duration::from_secs(10), || {
        (replies(&server, "t").len() == 1).then_some(())
    });
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("{NS}:count:t"))
        .query(&mut server.conn())
        .unwrap();
    assert!((1..=60_000).contains(&ttl), "{ttl}");
    server.xadd(IN, &[("k", "t"), ("reset", "1")]);
    wait_for("the reset", Duration::from_secs(10), || {
        (replies(&server, "t").len() == 2).then_some(())
    });
    assert_eq!(count(&server, "t"), None);
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// A message taken over while its first call is still busy (here by a consumer that then dies, the
/// way a daemon paused past `claim_min_idle` loses it) is run again by one of two daemons; the first
/// call's commit finds the entry no longer its own and writes nothing. The state changes once.
#[test]
fn a_message_run_twice_by_two_daemons_changes_the_state_once() {
    let server = RedisServer::start();
    let mut a = Daemon::running(&toml(&server, "a", 1500), &[]);
    let mut b = Daemon::running(&toml(&server, "b", 1500), &[]);
    let id = server.xadd(IN, &[("k", "r"), ("spin_ms", "1000")]);
    wait_for("the first call", Duration::from_secs(10), || {
        (server.deliveries(IN, "g").get(&id) == Some(&1)).then_some(())
    });
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(&[IN, "g", "gone", "0", id.as_str()])
        .query(&mut server.conn())
        .unwrap();
    let discarded =
        || a.count_log("this result was discarded") + b.count_log("this result was discarded");
    wait_for(
        "the first call's discarded commit",
        Duration::from_secs(10),
        || (discarded() > 0).then_some(()),
    );
    assert_eq!(
        count(&server, "r"),
        None,
        "the discarded call changed nothing"
    );
    wait_for(
        "the reply of the second run",
        Duration::from_secs(15),
        || (replies(&server, "r").len() == 1).then_some(()),
    );
    assert_eq!(replies(&server, "r"), [("1".into(), String::new())]);
    assert_eq!(count(&server, "r").as_deref(), Some("1"), "changed once");
    wait_for("nothing pending", Duration::from_secs(10), || {
        (server.pending(IN, "g") == 0).then_some(())
    });
    assert_eq!(a.stop(Duration::from_secs(10)), 0);
    assert_eq!(b.stop(Duration::from_secs(10)), 0);
}

/// `handler test` cases give the state before the call (`state`) and expect it after
/// (`expect.state`, null for a key deleted); a case expecting another value fails, naming the key.
#[test]
fn handler_test_cases_give_state_before_and_expect_it_after() {
    let dir = tempfile::tempdir().unwrap();
    let cases = dir.path().join("cases.jsonl");
    let good = [
        r#"{"name": "counts from nothing", "message": {"k": "a"}, "expect": {"outcome": "success", "replies": [{"stream": "nova:task:counter:out", "fields": {"count": "1", "before": ""}}], "state": {"count:a": "1"}}}"#,
        r#"{"name": "counts on from the state", "message": {"k": "a"}, "state": {"count:a": "41"}, "expect": {"outcome": "success", "replies": [{"stream": "nova:task:counter:out", "fields": {"count": "42", "before": "41"}}], "state": {"count:a": "42", "count:b": null}}}"#,
        r#"{"name": "a reset deletes", "message": {"k": "a", "reset": "1"}, "state": {"count:a": "5"}, "expect": {"outcome": "success", "state": {"count:a": null}}}"#,
    ];
    let run = |lines: &[&str]| {
        std::fs::write(&cases, lines.join("\n")).unwrap();
        let out = std::process::Command::new(crate::util::bin())
            .args(["handler", "test"])
            .arg(root().join("handlers/build/counter.wasm"))
            .arg("--cases")
            .arg(&cases)
            .args(["--role", "task_write", "--set", &format!("reply_to={OUT}")])
            .env_remove("REDSTREAM_CONFIG")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = run(&good);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("3 of 3 cases passed"), "{out}");
    let wrong = r#"{"name": "wrong", "message": {"k": "a"}, "state": {"count:a": "1"}, "expect": {"outcome": "success", "state": {"count:a": "3"}}}"#;
    let (code, out) = run(&[wrong]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(r#"expected state count:a = "3", got "2""#),
        "{out}"
    );
}

/// Twenty messages of key `hot` go to the counter; they count to twenty, each count replied once.
fn count_twenty_of_one_key(server: &RedisServer) {
    for _ in 0..20 {
        server.xadd(IN, &[("k", "hot")]);
    }
    wait_for("twenty replies", Duration::from_secs(30), || {
        (replies(server, "hot").len() >= 20 && server.pending(IN, "g") == 0).then_some(())
    });
    assert_eq!(count(server, "hot").as_deref(), Some("20"));
    let mut counts: Vec<u64> = replies(server, "hot")
        .into_iter()
        .map(|(c, _)| c.parse().unwrap())
        .collect();
    counts.sort();
    assert_eq!(counts, (1..=20).collect::<Vec<u64>>(), "each count once");
}

/// Messages of one key run side by side — several in flight in each of two daemons — each read the
/// count and write it plus one. A commit whose read changed meanwhile writes nothing and its message
/// runs again, so no increment is lost: twenty messages count to twenty, each count replied once.
#[test]
fn messages_of_one_key_side_by_side_lose_no_update() {
    let server = RedisServer::start();
    let mut a = Daemon::running(&toml(&server, "a", 2000), &[]);
    let mut b = Daemon::running(&toml(&server, "b", 2000), &[]);
    count_twenty_of_one_key(&server);
    assert_eq!(a.stop(Duration::from_secs(10)), 0);
    assert_eq!(b.stop(Duration::from_secs(10)), 0);
}

/// The same counter run as tasks (granted outbound HTTP it does not use): its reads await Redis without
/// a thread, sixteen calls of one key at once, and the read check still loses no update.
#[test]
fn a_handler_run_as_tasks_reads_state_without_a_thread_and_loses_no_update() {
    let server = RedisServer::start();
    let config = toml(&server, "a", 2000).replace(
        "state = \"",
        "allowed_outbound_hosts = [\"http://127.0.0.1:9\"]\nconcurrency = 16\nstate = \"",
    );
    assert!(config.contains("concurrency = 16"), "{config}");
    let mut d = Daemon::running(&config, &[]);
    count_twenty_of_one_key(&server);
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}
