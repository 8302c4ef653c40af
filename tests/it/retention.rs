//! Retention: the janitor trims by length and age, but a lagging group keeps every entry it has not
//! acknowledged or not yet received.

use std::time::Duration;

use crate::util::{Daemon, RedisServer, daemon_toml, wait_for};

const S: &str = "nova:task:retention:log";

fn ids(server: &RedisServer) -> Vec<String> {
    server.entries(S).into_iter().map(|e| e.id).collect()
}

#[test]
fn trims_by_length_but_never_past_a_lagging_group() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let published: Vec<String> = (0..100)
        .map(|i| server.xadd(S, &[("n", &i.to_string())]))
        .collect();
    // `fast` has read and acked everything; `lagging` holds 10 unacked and has 90 still to receive.
    for (group, count) in [("fast", 100), ("lagging", 10)] {
        let _: String = redis::cmd("XGROUP")
            .arg(&["CREATE", S, group, "0"])
            .query(&mut conn)
            .unwrap();
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg(&[
                "GROUP",
                group,
                "c",
                "COUNT",
                &count.to_string(),
                "STREAMS",
                S,
                ">",
            ])
            .query(&mut conn)
            .unwrap();
    }
    let acks: Vec<&str> = published.iter().map(String::as_str).collect();
    let _: i64 = redis::cmd("XACK")
        .arg(S)
        .arg("fast")
        .arg(&acks)
        .query(&mut conn)
        .unwrap();

    let toml = daemon_toml(
        &server.url(),
        &format!(
            "[retention]\ninterval = \"200ms\"\n[[retention.streams]]\nstream = \"{S}\"\nmax_len = 5\n\
             [[consumers]]\nstream = \"nova:task:retention:other\"\ngroup = \"g\"\nhandler = \"drop\"\n"
        ),
    );
    let mut d = Daemon::running(&toml, &[]);
    // Two whole passes, so the assertion below speaks of a janitor that ran, not one that has not yet.
    wait_for("two retention passes", Duration::from_secs(10), || {
        (d.count_log("retention pass: nothing to trim") >= 2).then_some(())
    });
    assert_eq!(
        ids(&server),
        published,
        "the lagging group's oldest pending entry pins everything"
    );

    // Once it acks those 10, only what it has not received yet (and its last delivered) must stay.
    let _: i64 = redis::cmd("XACK")
        .arg(S)
        .arg("lagging")
        .arg(&acks[..10])
        .query(&mut conn)
        .unwrap();
    wait_for(
        "trimmed to the lagging group's position",
        Duration::from_secs(5),
        || (ids(&server).first() == Some(&published[9])).then_some(()),
    );
    assert_eq!(
        ids(&server),
        published[9..],
        "entries 10..99 were never delivered to `lagging`"
    );
    assert!(d.wait_log("retention trimmed", Duration::from_secs(1)));

    // When every group has everything, max_len applies in full.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg(&["GROUP", "lagging", "c", "COUNT", "1000", "STREAMS", S, ">"])
        .query(&mut conn)
        .unwrap();
    let _: i64 = redis::cmd("XACK")
        .arg(S)
        .arg("lagging")
        .arg(&acks)
        .query(&mut conn)
        .unwrap();
    wait_for("trimmed to max_len", Duration::from_secs(5), || {
        (ids(&server).len() == 5).then_some(())
    });
    assert_eq!(ids(&server), published[95..]);
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

#[test]
fn trims_by_age() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    // Entries written with explicit ids in the past are as old as their ids say: no waiting.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for (i, age_ms) in [(0, 60_000), (1, 30_000), (2, 3_000)] {
        let id = format!("{}-0", now_ms - age_ms);
        let _: String = redis::cmd("XADD")
            .arg(S)
            .arg(&id)
            .arg("n")
            .arg(i)
            .query(&mut conn)
            .unwrap();
    }
    let fresh = server.xadd(S, &[("n", "fresh")]);
    let toml = daemon_toml(
        &server.url(),
        &format!(
            "[retention]\ninterval = \"200ms\"\n[[retention.streams]]\nstream = \"{S}\"\nmax_age = \"2s\"\n\
             [[consumers]]\nstream = \"nova:task:retention:other\"\ngroup = \"g\"\nhandler = \"drop\"\n"
        ),
    );
    let mut d = Daemon::running(&toml, &[]);
    wait_for("old entries gone", Duration::from_secs(5), || {
        (ids(&server) == [fresh.clone()]).then_some(())
    });
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

#[test]
fn a_pass_fetches_no_entries_and_keeps_a_large_max_len_exactly() {
    // 2,000 entries of 10 KiB: a janitor that fetched the `max_len` newest entries would move about
    // 15 MiB per pass; the server-side cut moves a few bytes. Redis counts what it sent.
    let server = RedisServer::start();
    let mut conn = server.conn();
    let big = "x".repeat(10 * 1024);
    let mut pipe = redis::pipe();
    for _ in 0..2000 {
        pipe.cmd("XADD")
            .arg(S)
            .arg("*")
            .arg("body")
            .arg(&big)
            .ignore();
    }
    let _: () = pipe.query(&mut conn).unwrap();
    let toml = daemon_toml(
        &server.url(),
        &format!(
            "[retention]\ninterval = \"200ms\"\n[[retention.streams]]\nstream = \"{S}\"\nmax_len = 1500\n\
             [[consumers]]\nstream = \"nova:task:retention:other\"\ngroup = \"g\"\nhandler = \"drop\"\n"
        ),
    );
    let mut d = Daemon::running(&toml, &[]);
    wait_for("trimmed to max_len", Duration::from_secs(10), || {
        (server.xlen(S) == 1500).then_some(())
    });
    wait_for("another pass", Duration::from_secs(10), || {
        (d.count_log("retention pass: nothing to trim") >= 1).then_some(())
    });
    let info: String = redis::cmd("INFO").arg("stats").query(&mut conn).unwrap();
    let sent: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(
        sent < 1024 * 1024,
        "Redis sent {sent} bytes in all; the janitor must not fetch entries"
    );
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}
