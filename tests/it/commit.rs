//! The commit that no content can break: a reply aimed at a key of another type, an entry too wide for
//! one script call, Redis out of memory — each ends in its own verdict, the rest of the batch commits,
//! and no reply is ever written twice.

use std::collections::HashMap;
use std::time::Duration;

use crate::util::{Daemon, RedisServer, daemon_toml, root, wait_for, with_metrics};

const IN: &str = "nova:task:commit:in";
const OUT: &str = "nova:task:commit:out";
const DLQ: &str = "nova:task:commit:in-dlq";

/// How many replies in `stream` name each source id (by `_cause`).
fn causes(server: &RedisServer, stream: &str) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for e in server.entries(stream) {
        let cause = e.fields.get_str("_cause").expect("every reply has _cause");
        let id = cause.rsplit('/').next().unwrap().to_owned();
        *seen.entry(id).or_insert(0) += 1;
    }
    seen
}

/// The daemon on `metrics` never restarted a loop (an exported counter, so a renamed series fails).
fn assert_no_loop_restart(metrics: u16) {
    let restarts = crate::metrics::exported(
        metrics,
        "redstream_errors_total",
        &["kind=\"loop_restart\""],
    );
    assert_eq!(restarts, 0.0, "no loop restart");
}

fn assert_exactly_once(server: &RedisServer, ids: &[String]) {
    let seen = causes(server, OUT);
    let lost = ids.iter().filter(|id| !seen.contains_key(*id)).count();
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    let strangers = seen.keys().filter(|id| !ids.contains(id)).count();
    println!("lost={lost} duplicates={duplicates}");
    assert_eq!(
        (lost, duplicates, strangers),
        (0, 0, 0),
        "lost, duplicated, unknown"
    );
}

fn consumer(handler: &str, extra: &str) -> String {
    format!(
        "[[consumers]]\nstream = \"{IN}\"\ngroup = \"g\"\nstart = \"0\"\nblock = \"1s\"\n\
         claim_min_idle = \"2s\"\nclaim_interval = \"500ms\"\nhandler_timeout = \"1s\"\n\
         batch_size = 100\nin_flight = 100\n{handler}\n{extra}\n"
    )
}

/// A daemon config whose `faults` handler replies to OUT.
fn faults_replying(server: &RedisServer) -> String {
    daemon_toml(
        &server.url(),
        &consumer(
            &format!("handler = \"faults\"\nfaults = {{ reply_to = \"{OUT}\" }}"),
            "",
        ),
    )
}

/// 50 messages on IN, the 25th (or `at`th) with `poison` fields too. Returns the other ids and its.
fn fifty_with_one_poison(
    server: &RedisServer,
    at: usize,
    poison: &[(&str, &str)],
) -> (Vec<String>, String) {
    let mut ids = Vec::new();
    let mut culprit = String::new();
    for i in 0..50 {
        let n = i.to_string();
        let mut fields = vec![("n", n.as_str())];
        if i == at {
            fields.extend_from_slice(poison);
            culprit = server.xadd(IN, &fields);
        } else {
            ids.push(server.xadd(IN, &fields));
        }
    }
    (ids, culprit)
}

/// Waits until the culprit alone is dead-lettered and nothing is pending, checks that every other
/// message was replied to exactly once without a loop restart, and returns the dead letter's reason.
fn only_the_culprit_is_dead_lettered(
    server: &RedisServer,
    metrics: u16,
    ids: &[String],
    culprit: &str,
) -> String {
    let dead = wait_for("the dead letter", Duration::from_secs(15), || {
        server.entries(DLQ).pop()
    });
    wait_for("nothing pending", Duration::from_secs(10), || {
        (server.pending(IN, "g") == 0).then_some(())
    });
    assert_exactly_once(server, ids);
    assert_eq!(server.xlen(DLQ), 1);
    assert_eq!(
        dead.fields.get_str("_dlq_source"),
        Some(format!("{IN}/{culprit}").as_str())
    );
    assert_no_loop_restart(metrics);
    dead.fields.get_str("_dlq_reason").unwrap().to_owned()
}

#[test]
fn a_reply_to_a_key_of_another_type_dead_letters_that_message_and_commits_the_rest() {
    let server = RedisServer::start();
    server.set_string("nova:task:cache:data");
    // 50 messages in one batch; the 25th asks the echo handler to reply to the string key.
    let (ids, poison) =
        fifty_with_one_poison(&server, 24, &[("_reply_to", "nova:task:cache:data")]);
    let echo = root().join("handlers/build/echo.wasm");
    let toml = daemon_toml(
        &server.url(),
        &format!(
            "[[handlers]]\nname = \"echo\"\nfile = \"{}\"\nroles = [\"task_write\"]\ntimeout = \"500ms\"\n\
             config = {{ reply_to = \"{OUT}\" }}\n{}",
            echo.display(),
            consumer("handler = \"echo\"", "")
        ),
    );
    let (toml, metrics) = with_metrics(&toml);
    let mut d = Daemon::running(&toml, &[]);
    let reason = only_the_culprit_is_dead_lettered(&server, metrics, &ids, &poison);
    assert!(
        reason.contains("nova:task:cache:data is a string"),
        "the reason names the key and the problem: {reason}"
    );
    let untouched: String = redis::cmd("GET")
        .arg("nova:task:cache:data")
        .query(&mut server.conn())
        .unwrap();
    assert_eq!(untouched, "x");
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// A delayed reply is held beside its stream by the commit script: where the key holding delayed
/// replies for its target is of another type, that message alone is dead-lettered (naming the key and
/// the types), nothing of it is held or registered, and the rest of the batch commits.
#[test]
fn a_delayed_reply_whose_due_set_is_of_another_type_dead_letters_that_message_alone() {
    let server = RedisServer::start();
    let late = "nova:task:commit:late";
    let due_key = redstream::client::delayed::due_key(late);
    server.set_string(&due_key);
    let (ids, culprit) = fifty_with_one_poison(
        &server,
        24,
        &[("faults_delay_ms", "1000"), ("_reply_to", late)],
    );
    let (toml, metrics) = with_metrics(&faults_replying(&server));
    let mut d = Daemon::running(&toml, &[]);
    let reason = only_the_culprit_is_dead_lettered(&server, metrics, &ids, &culprit);
    assert!(
        reason.contains(&format!(
            "{due_key}, where delayed replies are held, is a string, not a zset"
        )),
        "the reason names the key and the types: {reason}"
    );
    let registered: bool = redis::cmd("SISMEMBER")
        .arg(redstream::client::delayed::REGISTRY)
        .arg(late)
        .query(&mut server.conn())
        .unwrap();
    assert!(!registered, "nothing of the refused message written");
    let held: bool = redis::cmd("EXISTS")
        .arg(redstream::client::delayed::fields_key(late))
        .query(&mut server.conn())
        .unwrap();
    assert!(!held, "nothing held");
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// Redis itself refusing one key — a stream whose ids are exhausted refuses every XADD — is that
/// message's problem: it is dead-lettered naming the key and Redis's error, and the messages after it
/// in the same batch commit at once (they are not held back behind it, batch after batch).
#[test]
fn a_reply_target_redis_refuses_dead_letters_that_message_and_not_its_neighbours() {
    let server = RedisServer::start();
    let full = "nova:task:commit:full";
    let _: String = redis::cmd("XADD")
        .arg(full)
        .arg("18446744073709551615-18446744073709551615")
        .arg("f")
        .arg("v")
        .query(&mut server.conn())
        .unwrap();
    let (ids, poison) = fifty_with_one_poison(&server, 24, &[("_reply_to", full)]);
    let toml = faults_replying(&server);
    let (toml, metrics) = with_metrics(&toml);
    let mut d = Daemon::running(&toml, &[]);
    let reason = only_the_culprit_is_dead_lettered(&server, metrics, &ids, &poison);
    assert!(
        reason.contains(full) && reason.contains("exhausted"),
        "the reason names the key and Redis's error: {reason}"
    );
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// A commit Redis refuses as a whole (here through a failpoint of test builds: any batch holding a
/// message with the field `breaks_commit` is answered with an error, nothing written) is split until
/// the message that causes it is alone; that one is dead-lettered with the error, and the 49 others
/// are committed exactly once, without the loop restarting.
#[test]
fn a_commit_refused_as_a_whole_is_split_until_its_culprit_is_alone() {
    let server = RedisServer::start();
    let (ids, poison) = fifty_with_one_poison(&server, 31, &[("breaks_commit", "1")]);
    // Each call sleeps a little, so the messages of a read finish together and are committed in one
    // batch, however loaded the machine: the culprit is never alone from the start.
    let toml = daemon_toml(
        &server.url(),
        &consumer(
            &format!(
                "handler = \"faults\"\nfaults = {{ reply_to = \"{OUT}\", sleep = \"100ms\" }}"
            ),
            "",
        ),
    );
    let (toml, metrics) = with_metrics(&toml);
    let mut d = Daemon::running(&toml, &[("RSFAULT_COMMIT_REFUSE", "breaks_commit")]);
    let reason = only_the_culprit_is_dead_lettered(&server, metrics, &ids, &poison);
    assert!(reason.contains("injected"), "{reason}");
    assert!(d.count_log("committing its halves apart") >= 1);
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// An entry of `fields` fields named f0, f1, … (values their index), plus `extra`.
fn xadd_wide(server: &RedisServer, stream: &str, fields: usize, extra: &[(&str, &str)]) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (n, v) in extra {
        cmd.arg(n).arg(v);
    }
    for i in 0..fields - extra.len() {
        cmd.arg(format!("f{i}")).arg(i);
    }
    cmd.query(&mut server.conn()).unwrap()
}

/// Entries over `[limits]` — 4,000 fields, or one field of 100 MB — are never handled: each is
/// dead-lettered by reference with `too_large`, its size and its source id, and the 100 MB are
/// discarded as they arrive (the daemon's peak RSS grows by far less than the entry). Their neighbours
/// in the same read are forwarded exactly once.
#[test]
fn entries_over_the_limits_are_dead_lettered_by_reference_and_never_buffered() {
    let server = RedisServer::start();
    let toml = daemon_toml(
        &server.url(),
        &consumer(
            "handler = \"forward\"\nforward_to = \"nova:task:commit:out\"",
            "",
        ),
    );
    let mut d = Daemon::running(&toml, &[]);
    let before_rss = peak_rss_kib(d.pid());
    let mut ids = vec![server.xadd(IN, &[("n", "before")])];
    let wide = xadd_wide(&server, IN, 4000, &[]);
    const HUGE: usize = 100 << 20;
    let huge: String = redis::cmd("XADD")
        .arg(IN)
        .arg("*")
        .arg("head")
        .arg("h")
        .arg("body")
        .arg(vec![b'x'; HUGE])
        .query(&mut server.conn())
        .unwrap();
    ids.push(server.xadd(IN, &[("n", "after")]));
    let dead = wait_for("two dead letters", Duration::from_secs(30), || {
        let d = server.entries(DLQ);
        (d.len() == 2).then_some(d)
    });
    // The last entry may be read in a later round than the dead letters: wait for its reply too.
    wait_for(
        "both replies, nothing pending",
        Duration::from_secs(10),
        || (server.xlen(OUT) >= ids.len() as u64 && server.pending(IN, "g") == 0).then_some(()),
    );
    assert_exactly_once(&server, &ids);
    for (dead, id, fields, bytes) in [
        (&dead[0], &wide, 4000, None),
        (&dead[1], &huge, 2, Some(HUGE + 4 + 1 + 4)),
    ] {
        let f = &dead.fields;
        assert_eq!(f.get_str("_dlq_reason"), Some("too_large"));
        assert_eq!(
            f.get_str("_dlq_source"),
            Some(format!("{IN}/{id}").as_str())
        );
        assert_eq!(
            f.get_str("_dlq_fields_omitted"),
            Some(fields.to_string().as_str())
        );
        if let Some(b) = bytes {
            assert_eq!(f.get_str("_dlq_size"), Some(b.to_string().as_str()));
        }
        assert!(
            f.len() < 10,
            "the dead letter refers to the original: {f:?}"
        );
    }
    let grown = peak_rss_kib(d.pid()).saturating_sub(before_rss);
    println!("peak RSS grew by {grown} KiB while a 100 MiB entry went by");
    assert!(grown < 24 * 1024, "peak RSS grew by {grown} KiB");
    assert_eq!(d.count_log("over [limits] was dead-lettered"), 2);
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// The widest entry `[limits]` allows (3,900 fields) goes through every write the commit makes: a
/// forward, and a dead-letter copy of all its fields.
#[test]
fn the_widest_entry_the_limits_allow_is_forwarded_and_dead_lettered_whole() {
    let server = RedisServer::start();
    let poison_in = "nova:task:commit:poison";
    let toml = daemon_toml(
        &server.url(),
        &format!(
            "[limits]\nentry_fields = 3900\nentry_bytes = \"4MiB\"\n{}\n\
             [[consumers]]\nstream = \"{poison_in}\"\ngroup = \"g\"\nstart = \"0\"\nmax_deliveries = 1\n\
             handler = \"faults\"\nfaults = {{ fail_field = \"poison\" }}\n",
            consumer(
                "handler = \"forward\"\nforward_to = \"nova:task:commit:out\"",
                "",
            )
        ),
    );
    let mut d = Daemon::running(&toml, &[]);
    let wide = xadd_wide(&server, IN, 3900, &[]);
    let poison = xadd_wide(&server, poison_in, 3900, &[("poison", "1")]);
    wait_for("the forward", Duration::from_secs(15), || {
        (server.xlen(OUT) == 1).then_some(())
    });
    assert_exactly_once(&server, &[wide]);
    let out = server.entries(OUT).pop().unwrap();
    assert_eq!(out.fields.get_str("f3899"), Some("3899"));
    assert_eq!(out.fields.len(), 3900 + 4, "every field, and the envelope");
    let dead = wait_for("the dead letter", Duration::from_secs(15), || {
        server.entries(&format!("{poison_in}-dlq")).pop()
    });
    assert_eq!(dead.fields.get_str("f3898"), Some("3898"), "copied whole");
    assert_eq!(dead.fields.get_str("poison"), Some("1"));
    assert_eq!(
        dead.fields.get_str("_dlq_source"),
        Some(format!("{poison_in}/{poison}").as_str())
    );
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// A dead-letter stream that refuses (a string at its name) loses nothing — the message stays pending
/// — and is visible: the heartbeat says degraded with the stream and the reason, and so does
/// `redstream_degraded`, while other commits keep going; once the key is fixed, the message is claimed
/// again, dead-lettered, and the daemon is healthy again.
#[test]
fn a_refusing_dead_letter_stream_degrades_the_daemon_until_it_is_fixed() {
    use crate::metrics::{get, sample};
    let server = RedisServer::start();
    let port = crate::util::redis_server::free_port();
    let dlq = "nova:task:commit:refusing-dlq";
    server.set_string(dlq);
    let toml = daemon_toml(
        &server.url(),
        &format!(
            "[heartbeat]\ninterval = \"200ms\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\
             [[consumers]]\nstream = \"{IN}\"\ngroup = \"g\"\nstart = \"0\"\nmax_deliveries = 1\n\
             claim_min_idle = \"500ms\"\nclaim_interval = \"200ms\"\nhandler_timeout = \"200ms\"\n\
             dead_letter = \"{dlq}\"\nhandler = \"faults\"\n\
             faults = {{ fail_field = \"poison\", reply_to = \"{OUT}\" }}\n"
        ),
    );
    let mut d = Daemon::running(&toml, &[]);
    let poison = server.xadd(IN, &[("poison", "1")]);
    let beat = wait_for("a degraded heartbeat", Duration::from_secs(15), || {
        let beat = server.entries("nova:system:mcp:heartbeat").pop()?;
        (beat.fields.get_str("status") == Some("degraded")).then_some(beat)
    });
    let reasons = beat.fields.get_str("degraded_reasons").unwrap_or("");
    assert!(
        reasons.contains(dlq) && reasons.contains("refuses"),
        "{reasons}"
    );
    wait_for("redstream_degraded = 1", Duration::from_secs(10), || {
        let (_, t) = get(port, "/metrics");
        (sample(&t, "redstream_degraded", &[]) == 1.0).then_some(())
    });
    // Healthy messages still flow, and the refusal outlasts their commits.
    let healthy = server.xadd(IN, &[("n", "1")]);
    wait_for("the healthy reply", Duration::from_secs(10), || {
        (server.xlen(OUT) == 1).then_some(())
    });
    assert_exactly_once(&server, &[healthy]);
    assert_eq!(
        server.pending(IN, "g"),
        1,
        "the refused message stays pending"
    );
    let beat = server.entries("nova:system:mcp:heartbeat").pop().unwrap();
    assert_eq!(beat.fields.get_str("status"), Some("degraded"));

    // Fixed: the next claim dead-letters it, and the daemon is healthy again.
    let _: i64 = redis::cmd("DEL")
        .arg(dlq)
        .query(&mut server.conn())
        .unwrap();
    let letter = wait_for("the dead letter", Duration::from_secs(15), || {
        server.entries(dlq).pop()
    });
    assert_eq!(
        letter.fields.get_str("_dlq_source"),
        Some(format!("{IN}/{poison}").as_str())
    );
    wait_for("a healthy heartbeat", Duration::from_secs(15), || {
        let beat = server.entries("nova:system:mcp:heartbeat").pop()?;
        (beat.fields.get_str("status") == Some("healthy")).then_some(())
    });
    assert_eq!(server.pending(IN, "g"), 0);
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// Redis at `maxmemory` with `noeviction` for 45 s in the middle of a run: commits are refused with
/// nothing written, retried without restarting the loop (which would re-read pending entries and count
/// extra deliveries), and everything flows once memory is back — nothing lost, nothing written twice,
/// nothing dead-lettered although `max_deliveries` is 2.
#[test]
fn redis_out_of_memory_for_45_seconds_loses_nothing_and_dead_letters_nothing() {
    let server = RedisServer::start();
    let ids: Vec<String> = {
        let mut pipe = redis::pipe();
        for i in 0..2000 {
            pipe.cmd("XADD").arg(IN).arg("*").arg("n").arg(i);
        }
        pipe.query(&mut server.conn()).unwrap()
    };
    let toml = daemon_toml(
        &server.url(),
        &consumer(
            "handler = \"faults\"\nfaults = { reply_to = \"nova:task:commit:out\", sleep = \"2ms\" }",
            "max_deliveries = 2",
        )
        .replace("in_flight = 100", "in_flight = 32")
        .replace("batch_size = 100", "batch_size = 32"),
    );
    let (toml, metrics) = with_metrics(&toml);
    let socket = crate::notify::Socket::bind();
    let mut d = Daemon::running(&toml, &[("NOTIFY_SOCKET", &socket.path)]);
    wait_for("traffic flowing", Duration::from_secs(10), || {
        (server.xlen(OUT) >= 100).then_some(())
    });
    let mut conn = server.conn();
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory", "1"])
        .query(&mut conn)
        .unwrap();
    wait_for("a refused commit", Duration::from_secs(10), || {
        (d.count_log("Redis refused a commit's write") > 0).then_some(())
    });
    let during = server.xlen(OUT);
    assert!(during < 2000, "the OOM must land mid-run; publish more");
    // The outage itself: 45 s at maxmemory, during which no reply may appear (every write is refused,
    // and a refused commit writes nothing), and systemd hears that the daemon is degraded, and why.
    let started = std::time::Instant::now();
    let seen = socket.until_matching(
        |l| l.starts_with("STATUS=") && l.contains("degraded") && l.contains("commits are refused"),
        Duration::from_secs(15),
    );
    println!("degraded status: {:?}", seen.last());
    std::thread::sleep(Duration::from_secs(45).saturating_sub(started.elapsed()));
    assert_eq!(
        server.xlen(OUT),
        during,
        "nothing was written while out of memory"
    );
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory", "0"])
        .query(&mut conn)
        .unwrap();
    let freed = std::time::Instant::now();
    wait_for("every reply", Duration::from_secs(60), || {
        (server.xlen(OUT) >= 2000).then_some(())
    });
    println!(
        "flow resumed and drained {} messages in {:?} after memory was freed",
        2000 - during,
        freed.elapsed()
    );
    socket.until_matching(
        |l| l.starts_with("STATUS=") && !l.contains("degraded"),
        Duration::from_secs(15),
    );
    wait_for("nothing pending", Duration::from_secs(10), || {
        (server.pending(IN, "g") == 0).then_some(())
    });
    assert_exactly_once(&server, &ids);
    assert_eq!(server.xlen(DLQ), 0, "no healthy message was dead-lettered");
    assert_no_loop_restart(metrics);
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// The peak resident memory of a process, from /proc.
fn peak_rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// A handler's replies are bounded before they are buffered: 100,000 empty fields (free by byte count
/// alone) and a reply of 4,000 fields (more than a commit writes in one call) are refused to the guest
/// with a typed error, and the daemon's memory does not follow the guest's ambitions.
#[test]
fn replies_of_empty_or_too_many_fields_are_refused_to_the_handler() {
    let server = RedisServer::start();
    let hostile = root().join("handlers/build/hostile.wasm");
    let report = "nova:task:commit:report";
    let toml = daemon_toml(
        &server.url(),
        &format!(
            "[[handlers]]\nname = \"hostile\"\nfile = \"{}\"\nroles = [\"task_write\"]\ntimeout = \"900ms\"\n\
             memory = \"32MiB\"\nconfig = {{ report = \"{report}\" }}\n{}",
            hostile.display(),
            consumer("handler = \"hostile\"", "")
        ),
    );
    let mut d = Daemon::running(&toml, &[]);
    let before = peak_rss_kib(d.pid());
    server.xadd(IN, &[("do", "fieldbomb")]);
    server.xadd(IN, &[("do", "widereply")]);
    let reports = wait_for("both reports", Duration::from_secs(15), || {
        // The report stream also takes what the bomb got through before it was refused.
        let r: Vec<(String, String)> = server
            .entries(report)
            .iter()
            .filter_map(|e| {
                Some((
                    e.fields.get_str("what")?.to_owned(),
                    e.fields.get_str("detail").unwrap_or("").to_owned(),
                ))
            })
            .collect();
        (r.len() == 2).then_some(r)
    });
    for (what, detail) in &reports {
        assert!(detail.contains("TooLarge"), "{what}: {detail}");
        let why = if what == "fieldbomb" {
            "bytes in all"
        } else {
            "at most 1000 fields"
        };
        assert!(detail.contains(why), "{what}: {detail}");
    }
    let grown = peak_rss_kib(d.pid()).saturating_sub(before);
    println!("peak RSS grew by {grown} KiB");
    assert!(grown < 64 * 1024, "peak RSS grew by {grown} KiB");
    wait_for("nothing pending", Duration::from_secs(10), || {
        (server.pending(IN, "g") == 0).then_some(())
    });
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// Claimed entries are bounded before they are buffered, as fresh reads are: three 100 MB entries left
/// pending by a dead consumer are claimed and dead-lettered by reference, and the claiming daemon's
/// peak memory stays within 64 MiB of what it was before.
#[test]
fn entries_claimed_from_a_dead_consumer_are_bounded_before_they_are_buffered() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let huge = vec![b'x'; 100 << 20];
    let ids: Vec<String> = (0..3)
        .map(|_| {
            redis::cmd("XADD")
                .arg(IN)
                .arg("*")
                .arg("blob")
                .arg(&huge[..])
                .query(&mut conn)
                .unwrap()
        })
        .collect();
    drop(huge);
    let _: () = redis::cmd("XGROUP")
        .arg(&["CREATE", IN, "g", "0"])
        .query(&mut conn)
        .unwrap();
    // A consumer reads them and dies: they stay pending on it.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg(&["GROUP", "g", "dead", "COUNT", "3", "STREAMS", IN, ">"])
        .query(&mut conn)
        .unwrap();
    assert_eq!(server.pending_of(IN, "g", "dead"), 3);
    let toml = daemon_toml(
        &server.url(),
        &consumer(
            "handler = \"forward\"\nforward_to = \"nova:task:commit:out\"",
            "",
        )
        .replace("claim_min_idle = \"2s\"", "claim_min_idle = \"200ms\"")
        .replace("claim_interval = \"500ms\"", "claim_interval = \"100ms\"")
        .replace("handler_timeout = \"1s\"", "handler_timeout = \"100ms\""),
    );
    let mut d = Daemon::running(&toml, &[]);
    let before = peak_rss_kib(d.pid());
    let letters = wait_for("three dead letters", Duration::from_secs(30), || {
        let l = server.entries(DLQ);
        (l.len() == 3).then_some(l)
    });
    let grown = peak_rss_kib(d.pid()).saturating_sub(before);
    println!("peak RSS grew by {grown} KiB");
    assert!(grown < 64 * 1024, "peak RSS grew by {grown} KiB");
    let mut sources: Vec<&str> = letters
        .iter()
        .map(|l| l.fields.get_str("_dlq_source").unwrap())
        .collect();
    sources.sort();
    let mut want: Vec<String> = ids.iter().map(|id| format!("{IN}/{id}")).collect();
    want.sort();
    assert_eq!(sources, want);
    for letter in &letters {
        assert_eq!(letter.fields.get_str("_dlq_reason"), Some("too_large"));
        assert_eq!(letter.fields.get("blob"), None, "referred to, not copied");
    }
    wait_for("nothing pending", Duration::from_secs(10), || {
        (server.pending(IN, "g") == 0).then_some(())
    });
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// A read whose reply does not come within the command timeout — entries too large to send in time on
/// a busy host, as three 100 MB entries claimed from a dead consumer were — is followed by reads of one
/// entry that grow back, not by the same read again for ever: with every round asking for more than two
/// entries timing out (a failpoint: the round runs in Redis, its reply is lost), 40 messages are still
/// forwarded exactly once and none is dead-lettered.
#[test]
fn a_read_that_timed_out_is_followed_by_smaller_reads_not_the_same_one() {
    let server = RedisServer::start();
    let ids = server.xadd_backlog(IN, 40);
    let toml = daemon_toml(
        &server.url(),
        &consumer(
            "handler = \"forward\"\nforward_to = \"nova:task:commit:out\"",
            "",
        ),
    );
    let mut d = Daemon::running(&toml, &[("RSFAULT_READ_TIMEOUT_OVER", "2")]);
    wait_for(
        "40 forwarded, nothing pending",
        Duration::from_secs(60),
        || (server.xlen(OUT) >= 40 && server.pending(IN, "g") == 0).then_some(()),
    );
    assert_exactly_once(&server, &ids);
    assert_eq!(server.xlen(DLQ), 0);
    assert!(d.count_log("timed out after") > 0, "{:?}", d.logs());
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// `(id, idle ms, deliveries)` of every entry pending in IN's group.
fn pending_rows(server: &RedisServer) -> Vec<(String, u64, u64)> {
    let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(&[IN, "g", "-", "+", "1000"])
        .query(&mut server.conn())
        .unwrap();
    rows.into_iter()
        .map(|(id, _, idle, n)| (id, idle, n))
        .collect()
}

/// A delivery is counted when a handler may have failed — the first read, and each claim after an
/// entry idled — not when a daemon re-reads its own pending entries after a restart: four kill -9s of
/// a daemon in the middle of 20 slow messages leave every delivery count at 1, and with
/// `max_deliveries = 2` nothing is dead-lettered when a daemon finally finishes them.
#[test]
fn restarts_do_not_count_as_deliveries() {
    let server = RedisServer::start();
    let ids: Vec<String> = (0..20)
        .map(|i| server.xadd(IN, &[("n", &i.to_string())]))
        .collect();
    let run = |sleep: &str| {
        consumer(
            &format!(
                "handler = \"faults\"\nfaults = {{ reply_to = \"{OUT}\", sleep = \"{sleep}\" }}"
            ),
            "max_deliveries = 2",
        )
        .replace("handler_timeout = \"1s\"", "handler_timeout = \"30s\"")
        .replace("claim_min_idle = \"2s\"", "claim_min_idle = \"60s\"")
    };
    let slow = daemon_toml(&server.url(), &run("20s"));
    for round in 0..4 {
        let started = std::time::Instant::now();
        let mut d = Daemon::running(&slow, &[]);
        // Every pending entry went to this run's handlers: its idle time restarted after the start.
        let rows = wait_for("this run took every entry", Duration::from_secs(10), || {
            let rows = pending_rows(&server);
            let since = started.elapsed().as_millis() as u64;
            (rows.len() == 20 && rows.iter().all(|r| r.1 < since)).then_some(rows)
        });
        let counts: Vec<u64> = rows.iter().map(|r| r.2).collect();
        assert_eq!(counts, vec![1; 20], "round {round}");
        d.kill9();
    }
    let mut d = Daemon::running(&daemon_toml(&server.url(), &run("0s")), &[]);
    wait_for("nothing pending", Duration::from_secs(15), || {
        (server.pending(IN, "g") == 0).then_some(())
    });
    assert_exactly_once(&server, &ids);
    assert_eq!(server.xlen(DLQ), 0, "no message was dead-lettered");
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// The daemon is asked to stop while messages are in their handler, and Redis then forgets everything
/// (FLUSHALL): their commits can never succeed (the group is gone, and with it their delivery), so
/// the drain lets them go — saying so — instead of retrying them until `drain_timeout`, and the daemon
/// exits 0. (The nemesis found a reload's drain held forever this way, its successor never started.)
#[test]
fn a_drain_after_redis_forgot_the_group_lets_its_messages_go() {
    let server = RedisServer::start();
    let toml = faults_replying(&server);
    let mut d = Daemon::running(&toml, &[]);
    for i in 0..5 {
        server.xadd(
            IN,
            &[
                ("n", &i.to_string()),
                ("faults_sleep_ms", "800"),
                ("faults_announce", "1"),
            ],
        );
    }
    // In their handler (pending in Redis is not enough: a stop before the loop has the read's reply
    // leaves the entries for the next start).
    wait_for(
        "the messages in their handler",
        Duration::from_secs(10),
        || (d.count_log("faults: handling the message") == 5).then_some(()),
    );
    // The drain begins (reads stop), then Redis forgets, while the handlers still run.
    d.signal(libc::SIGTERM);
    assert!(d.wait_log("draining: reads stopped", Duration::from_secs(5)));
    let _: () = redis::cmd("FLUSHALL").query(&mut server.conn()).unwrap();
    assert_eq!(
        d.wait_exit(Duration::from_secs(30)),
        Some(0),
        "a clean drain"
    );
    assert!(d.count_log("the consumer group is gone") >= 1);
    assert_eq!(server.xlen(OUT), 0, "nothing was written for them");
}
