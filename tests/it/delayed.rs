//! Delayed messages (`redstream publish --delay/--at`): held beside their stream in Redis and moved
//! onto it at their time by the daemons — within a second of it, once each, through a daemon's kill -9
//! and a Redis restart (with its data), with two daemons moving side by side.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::util::{Daemon, RedisServer, bin, daemon_toml, wait_for};

const TARGET: &str = "nova:task:delayed:out";

/// A daemon consuming another stream (a daemon runs at least one group); it moves delayed messages.
fn toml(server: &RedisServer) -> String {
    daemon_toml(
        &server.url(),
        "[[consumers]]\nstream = \"nova:task:delayed:in\"\ngroup = \"g\"\nhandler = \"drop\"\n",
    )
}

fn publish(config: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(bin())
        .arg("--config")
        .arg(config)
        .args(["publish", TARGET])
        .args(args)
        .env_remove("REDSTREAM_CONFIG")
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    said
}

/// The held messages: field n → when it is due (ms).
fn held(server: &RedisServer) -> HashMap<String, u64> {
    let due = redstream::client::delayed::due_key(TARGET);
    let fields = redstream::client::delayed::fields_key(TARGET);
    let members: Vec<(String, u64)> = redis::cmd("ZRANGE")
        .arg(&due)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query(&mut server.conn())
        .unwrap();
    members
        .into_iter()
        .map(|(id, at)| {
            let enc: String = redis::cmd("HGET")
                .arg(&fields)
                .arg(&id)
                .query(&mut server.conn())
                .unwrap();
            let n = enc.split("1:n,").nth(1).unwrap();
            let n = n
                .split_once(':')
                .unwrap()
                .1
                .split(',')
                .next()
                .unwrap()
                .to_owned();
            (n, at)
        })
        .collect()
}

/// Whether the registry of streams holding delayed messages names TARGET.
fn registered(server: &RedisServer) -> bool {
    redis::cmd("SISMEMBER")
        .arg(redstream::client::delayed::REGISTRY)
        .arg(TARGET)
        .query(&mut server.conn())
        .unwrap()
}

#[test]
fn delayed_messages_arrive_at_their_time_once_through_a_kill_and_a_redis_restart() {
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let mut a = Daemon::running(&toml(&server), &[]);
    let b = Daemon::running(&toml(&server), &[]);
    let config = a.config_path();
    let at = SystemTime::now() + Duration::from_secs(4);
    let at = humantime::format_rfc3339_millis(at).to_string();
    for (n, delay) in [
        ("1", "1s"),
        ("2", "1s"),
        ("3", "2s"),
        ("4", "2s"),
        ("5", "4s"),
    ] {
        let said = publish(&config, &["--delay", delay, &format!("n={n}")]);
        assert!(
            said.starts_with(&format!("held for {TARGET} until ")),
            "{said}"
        );
    }
    publish(&config, &["--at", &at, "n=6"]);
    assert!(registered(&server));
    let due = held(&server);
    assert_eq!(due.len(), 6, "{due:?}");
    assert_eq!(server.xlen(TARGET), 0, "nothing before its time");
    let status = Command::new(bin())
        .arg("--config")
        .arg(&config)
        .arg("status")
        .env_remove("REDSTREAM_CONFIG")
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    let row = status
        .lines()
        .skip_while(|l| !l.starts_with("DELAYED FOR STREAM"))
        .find(|l| l.starts_with(TARGET))
        .unwrap_or_else(|| panic!("no delayed row in {status}"));
    let figures: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(figures[1], "6", "{row}");
    assert_eq!(figures[2], "in", "{row}");

    // The first two arrive; then the first daemon is killed and started again, and Redis restarts
    // (from its AOF) before the last ones are due.
    wait_for("the first two", Duration::from_secs(10), || {
        (server.xlen(TARGET) >= 2).then_some(())
    });
    a.kill9();
    a = Daemon::running(&toml(&server), &[]);
    wait_for("the next two", Duration::from_secs(10), || {
        (server.xlen(TARGET) >= 4).then_some(())
    });
    server.restart();
    wait_for("all six", Duration::from_secs(15), || {
        (server.xlen(TARGET) >= 6).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let entries = server.entries(TARGET);
    let mut seen: Vec<&str> = entries
        .iter()
        .map(|e| e.fields.get_str("n").unwrap())
        .collect();
    seen.sort();
    assert_eq!(seen, ["1", "2", "3", "4", "5", "6"], "each once");
    for e in &entries {
        let n = e.fields.get_str("n").unwrap();
        let arrived: u64 = e.id.split('-').next().unwrap().parse().unwrap();
        let due = due[n];
        assert!(
            arrived >= due && arrived <= due + 1000,
            "n={n}: due at {due}, arrived at {arrived} ({} ms late)",
            arrived as i64 - due as i64
        );
        assert_eq!(e.fields.get_str("_source"), Some("test-daemon"), "{e:?}");
    }
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(due["6"] <= now_ms);
    assert!(held(&server).is_empty());
    assert!(
        !registered(&server),
        "nothing held: the stream is off the registry"
    );
    drop(b);
    drop(a);
}

const ASKS: &str = "nova:task:delayed:asks";

/// Delayed replies from a handler (`publish-delayed`; the echo example's `_delay_ms`) are committed
/// with the ack — nothing stays pending, nothing reaches the stream before its time, each is held
/// under the name of its effect (`<cause>#<index>`) — and arrive at their time, once each, through a
/// kill -9 of a daemon that committed them and a Redis restart (with its data), with two daemons in
/// the group moving them side by side.
#[test]
fn delayed_replies_from_a_handler_arrive_once_at_their_time_through_a_kill_and_a_redis_restart() {
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let echo = crate::util::root().join("handlers/build/echo.wasm");
    let toml = daemon_toml(
        &server.url(),
        &format!(
            "[[consumers]]\nstream = \"{ASKS}\"\ngroup = \"g\"\nstart = \"0\"\nhandler = \"echo\"\n\
             [[handlers]]\nname = \"echo\"\nfile = \"{}\"\nroles = [\"task_write\"]\n",
            echo.display()
        ),
    );
    let mut a = Daemon::running(&toml, &[]);
    let b = Daemon::running(&toml, &[]);
    let asked: Vec<(String, &str)> = [
        ("1", "3000"),
        ("2", "3000"),
        ("3", "4000"),
        ("4", "4000"),
        ("5", "6000"),
        ("6", "6000"),
    ]
    .into_iter()
    .map(|(n, delay)| {
        let id = server.xadd(
            ASKS,
            &[("n", n), ("_delay_ms", delay), ("_reply_to", TARGET)],
        );
        (id, n)
    })
    .collect();
    let due = wait_for("six held", Duration::from_secs(10), || {
        let held = held(&server);
        (held.len() == 6).then_some(held)
    });
    assert_eq!(server.pending(ASKS, "g"), 0, "acked with the commit");
    assert_eq!(server.xlen(TARGET), 0, "nothing before its time");
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(redstream::client::delayed::due_key(TARGET))
        .arg(0)
        .arg(-1)
        .query(&mut server.conn())
        .unwrap();
    for (id, _) in &asked {
        assert!(
            members.contains(&format!("{ASKS}/{id}#0")),
            "{id} held under its effect's name: {members:?}"
        );
    }
    a.kill9();
    server.restart();
    a = Daemon::running(&toml, &[]);
    let back = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    wait_for("all six", Duration::from_secs(20), || {
        (server.xlen(TARGET) >= 6).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let entries = server.entries(TARGET);
    assert_eq!(entries.len(), 6, "each once: {entries:?}");
    for (id, n) in &asked {
        let e = entries
            .iter()
            .find(|e| e.fields.get_str("in_reply_to") == Some(id.as_str()))
            .unwrap_or_else(|| panic!("no reply to {id}"));
        assert_eq!(e.fields.get_str("n"), Some(*n));
        assert_eq!(
            e.fields.get_str("_cause"),
            Some(format!("{ASKS}/{id}").as_str())
        );
        let arrived: u64 = e.id.split('-').next().unwrap().parse().unwrap();
        // Due while the daemons or Redis were down: as soon as they are back.
        let due = due[*n];
        let bound = due.max(back) + 1000;
        assert!(
            arrived >= due && arrived <= bound,
            "n={n}: due at {due}, arrived at {arrived} ({} ms late)",
            arrived as i64 - due as i64
        );
    }
    assert!(held(&server).is_empty());
    assert!(
        !registered(&server),
        "nothing held: the stream is off the registry"
    );
    drop(b);
    drop(a);
}
