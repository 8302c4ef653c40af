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
    std::thread::sleep(Duration::from_millis(800));
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
    let old: Vec<String> = (0..3)
        .map(|i| server.xadd(S, &[("n", &i.to_string())]))
        .collect();
    std::thread::sleep(Duration::from_millis(2100));
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
    let _ = old;
}
