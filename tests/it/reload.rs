//! Hot reload under traffic: routes swapped, a changed consumer restarted after draining, one added,
//! one removed — nothing lost, nothing processed twice; an invalid config is refused and the running
//! one stays.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::notify::Socket;
use crate::util::{Daemon, RedisServer, daemon_toml, wait_for};

fn consumer(stream: &str, extra: &str) -> String {
    format!(
        "[[consumers]]\nstream = \"nova:task:reload:{stream}\"\ngroup = \"g\"\nstart = \"0\"\nblock = \"500ms\"\n\
         claim_min_idle = \"5s\"\nhandler_timeout = \"2s\"\n{extra}\n"
    )
}

fn forward(to: &str) -> String {
    format!("handler = \"forward\"\nforward_to = \"nova:task:reload:{to}\"")
}

fn route(to: &str) -> String {
    format!("[[routes]]\nstream = \"nova:task:reload:d\"\nforward = \"nova:task:reload:{to}\"\n")
}

/// Source ids (from `_cause`) of the replies in `streams`, counted.
fn causes(server: &RedisServer, streams: &[&str]) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for s in streams {
        for e in server.entries(&format!("nova:task:reload:{s}")) {
            let cause = e
                .fields
                .get_str("_cause")
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .to_owned();
            *seen.entry(cause).or_insert(0) += 1;
        }
    }
    seen
}

#[test]
fn reload_under_traffic_loses_nothing_and_duplicates_nothing() {
    let server = RedisServer::start();
    let socket = Socket::bind();
    let v1 = daemon_toml(
        &server.url(),
        &[
            consumer("a", &forward("out-a")),
            consumer("c", &forward("out-c")),
            consumer("d", ""),
            route("out-d1"),
        ]
        .concat(),
    );
    let v2 = daemon_toml(
        &server.url(),
        &[
            consumer("a", &format!("{}\nbatch_size = 7", forward("out-a"))), // changed: restarted
            consumer("b", &forward("out-b")),                                // added
            consumer("d", ""), // unchanged: routes swapped
            route("out-d2"),
        ]
        .concat(),
    );
    let mut d = Daemon::start(&v1, &[("NOTIFY_SOCKET", &socket.path)]);
    socket.until("READY=1", Duration::from_secs(20));

    // Steady traffic on a and d while the config changes underneath.
    let done = Arc::new(AtomicBool::new(false));
    let publisher = {
        let url = server.url();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
            let mut ids = (Vec::new(), Vec::new());
            for i in 0..1500 {
                let a: String = redis::cmd("XADD")
                    .arg("nova:task:reload:a")
                    .arg("*")
                    .arg("n")
                    .arg(i)
                    .query(&mut conn)
                    .unwrap();
                let d: String = redis::cmd("XADD")
                    .arg("nova:task:reload:d")
                    .arg("*")
                    .arg("n")
                    .arg(i)
                    .query(&mut conn)
                    .unwrap();
                ids.0.push(a);
                ids.1.push(d);
                std::thread::sleep(Duration::from_millis(2));
            }
            done.store(true, Ordering::Relaxed);
            ids
        })
    };
    // Reload once traffic flows on both streams, while the publisher is still at it.
    wait_for("traffic flowing", Duration::from_secs(10), || {
        (server.xlen("nova:task:reload:out-a") >= 50
            && server.xlen("nova:task:reload:out-d1") >= 50)
            .then_some(())
    });
    std::fs::write(d.config_path(), &v2).unwrap();
    d.signal(libc::SIGHUP);
    assert!(
        !done.load(Ordering::Relaxed),
        "the reload must land under traffic; publish more or slower"
    );
    let seen = socket.until("READY=1", Duration::from_secs(20));
    assert!(seen.iter().any(|s| s == "RELOADING=1"), "{seen:?}");
    assert!(
        seen.iter().any(|s| s.starts_with("MONOTONIC_USEC=")),
        "{seen:?}"
    );
    assert!(d.wait_log("reloaded the config", Duration::from_secs(5)));
    let line = d
        .logs()
        .into_iter()
        .find(|l| l.contains("reloaded the config"))
        .unwrap();
    for part in ["swapped=1", "restarted=1", "stopped=1", "started=1"] {
        assert!(line.contains(part), "{line}");
    }
    let c_read_before = server.entries_read("nova:task:reload:c", "g");

    let (a_ids, d_ids) = publisher.join().unwrap();
    assert!(done.load(Ordering::Relaxed));
    wait_for("a and d drained", Duration::from_secs(30), || {
        (server.pending("nova:task:reload:a", "g") == 0
            && server.pending("nova:task:reload:d", "g") == 0
            && causes(&server, &["out-a"]).len() == a_ids.len()
            && causes(&server, &["out-d1", "out-d2"]).len() == d_ids.len())
        .then_some(())
    });
    for (name, ids, outs) in [
        ("a", &a_ids, &["out-a"][..]),
        ("d", &d_ids, &["out-d1", "out-d2"][..]),
    ] {
        let seen = causes(&server, outs);
        let lost = ids.iter().filter(|id| !seen.contains_key(*id)).count();
        let duplicates: usize = seen.values().map(|n| n - 1).sum();
        println!("{name}: lost={lost} duplicates={duplicates}");
        assert_eq!((lost, duplicates), (0, 0), "stream {name}");
    }
    assert!(
        server.xlen("nova:task:reload:out-d2") > 0,
        "new messages took the new route"
    );

    // The added consumer runs; the removed one does not: c's entry, written first, is never read by
    // its group, though b's, written after it, has been handled.
    server.xadd("nova:task:reload:c", &[("n", "1")]);
    server.xadd("nova:task:reload:b", &[("n", "1")]);
    wait_for("b handled", Duration::from_secs(10), || {
        (server.xlen("nova:task:reload:out-b") == 1).then_some(())
    });
    assert_eq!(
        (
            server.entries_read("nova:task:reload:c", "g"),
            server.xlen("nova:task:reload:out-c")
        ),
        (c_read_before, 0),
        "the removed consumer is gone"
    );

    // An invalid config is refused; the running one keeps working.
    std::fs::write(
        d.config_path(),
        v2.replace("batch_size = 7", "batch_size = \"lots\""),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    assert!(
        d.wait_log("reload refused", Duration::from_secs(10)),
        "{}",
        d.logs().join("\n")
    );
    assert!(
        d.logs()
            .iter()
            .any(|l| l.contains("consumers[0].batch_size"))
    );
    server.xadd("nova:task:reload:b", &[("n", "2")]);
    wait_for("b still handled", Duration::from_secs(10), || {
        (server.xlen("nova:task:reload:out-b") == 2).then_some(())
    });
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// A reload reads files and compiles handlers off the async runtime: while it is stuck (here on a
/// secret file that is a FIFO nobody writes yet), the watchdog keeps being fed and a stop is obeyed.
#[test]
fn a_stuck_reload_keeps_the_watchdog_fed_and_the_daemon_stoppable() {
    let server = RedisServer::start();
    let socket = Socket::bind();
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("password");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a path in our own temp dir.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let v1 = daemon_toml(&server.url(), &consumer("a", &forward("out-a")));
    let v2 = v1.replace(
        "[redis]\n",
        &format!("[redis]\npassword = {{ file = \"{}\" }}\n", fifo.display()),
    );
    let mut d = Daemon::start(
        &v1,
        &[("NOTIFY_SOCKET", &socket.path), ("WATCHDOG_USEC", "400000")],
    );
    socket.until("READY=1", Duration::from_secs(20));

    // Stuck, then freed: pings go on meanwhile, and the reload completes once the file can be read.
    std::fs::write(d.config_path(), &v2).unwrap();
    d.signal(libc::SIGHUP);
    socket.until("RELOADING=1", Duration::from_secs(5));
    let mut meanwhile = Vec::new();
    for _ in 0..3 {
        meanwhile.extend(socket.until("WATCHDOG=1", Duration::from_secs(2)));
    }
    // READY=1 ends every reload, applied or refused: none came, so it is still stuck.
    assert!(
        !meanwhile.iter().any(|l| l.starts_with("READY=1")),
        "it is still stuck: {meanwhile:?}"
    );
    std::fs::write(&fifo, "secret\n").unwrap();
    socket.until("READY=1", Duration::from_secs(10));
    assert!(
        d.wait_log("reloaded the config", Duration::from_secs(5)),
        "{}",
        d.logs().join("\n")
    );

    // Stuck again, and stopped: the daemon drains and exits without waiting for the file.
    d.signal(libc::SIGHUP);
    socket.until("RELOADING=1", Duration::from_secs(5));
    socket.until("WATCHDOG=1", Duration::from_secs(2));
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// Twenty reloads in a row, under traffic, of a config whose handler keeps a warm instance per worker
/// (`instance = "reuse"`) on a small pool: each reload retires the replaced handler's instances, so the
/// pool never runs dry and no healthy message fails, let alone goes to the dead-letter stream.
#[test]
fn twenty_reloads_of_a_reused_handler_under_traffic_leave_the_flow_as_it_was() {
    let server = RedisServer::start();
    let echo = crate::util::root().join("handlers/build/echo.wasm");
    let toml = daemon_toml(
        &server.url(),
        &format!(
            "[wasm]\nworkers = 2\n\
             [[handlers]]\nname = \"echo\"\nfile = \"{}\"\nroles = [\"task_write\"]\ntimeout = \"500ms\"\n\
             instance = \"reuse\"\nconfig = {{ reply_to = \"nova:task:reload:out-r\" }}\n{}",
            echo.display(),
            consumer("r", "handler = \"echo\"\nmax_deliveries = 2")
        ),
    );
    let mut d = Daemon::running(&toml, &[]);
    let done = Arc::new(AtomicBool::new(false));
    let publisher = {
        let url = server.url();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
            let mut ids = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let id: String = redis::cmd("XADD")
                    .arg("nova:task:reload:r")
                    .arg("*")
                    .arg("n")
                    .arg(ids.len())
                    .query(&mut conn)
                    .unwrap();
                ids.push(id);
                std::thread::sleep(Duration::from_millis(1));
            }
            ids
        })
    };
    for n in 1..=20 {
        d.signal(libc::SIGHUP);
        wait_for("the reload", Duration::from_secs(20), || {
            (d.count_log("reloaded the config") >= n).then_some(())
        });
    }
    done.store(true, Ordering::Relaxed);
    let ids = publisher.join().unwrap();
    wait_for("every reply", Duration::from_secs(30), || {
        (server.pending("nova:task:reload:r", "g") == 0
            && server.entries_read("nova:task:reload:r", "g") == ids.len() as u64)
            .then_some(())
    });
    let seen = causes(&server, &["out-r"]);
    let lost = ids.iter().filter(|id| !seen.contains_key(*id)).count();
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    println!(
        "{} messages over 20 reloads: lost={lost} duplicates={duplicates}",
        ids.len()
    );
    assert_eq!((lost, duplicates), (0, 0));
    assert_eq!(
        server.xlen("nova:task:reload:r-dlq"),
        0,
        "nothing dead-lettered"
    );
    assert_eq!(
        d.count_log("will be retried"),
        0,
        "no message needed a second try"
    );
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// A reload that changes `[redis]` cannot apply it to the running daemon: it says "restart needed"
/// with the keys, in the heartbeat and in `redstream_restart_needed`, while consuming goes on as
/// before; a reload of a file that matches the running settings again clears it.
#[test]
fn a_reload_that_changes_redis_settings_says_restart_needed_until_it_matches_again() {
    use crate::metrics::{get, sample};
    let server = RedisServer::start();
    let port = crate::util::redis_server::free_port();
    let v1 = daemon_toml(
        &server.url(),
        &format!(
            "[heartbeat]\ninterval = \"200ms\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n{}",
            consumer("a", &forward("out-a"))
        ),
    );
    let v2 = v1.replace("command_timeout = \"2s\"", "command_timeout = \"3s\"");
    assert_ne!(v1, v2);
    let mut d = Daemon::running(&v1, &[]);
    let restart_needed = || sample(&get(port, "/metrics").1, "redstream_restart_needed", &[]);
    assert_eq!(restart_needed(), 0.0);

    std::fs::write(d.config_path(), &v2).unwrap();
    d.signal(libc::SIGHUP);
    let beat = wait_for(
        "a heartbeat saying restart needed",
        Duration::from_secs(15),
        || {
            let beat = server.entries("nova:system:mcp:heartbeat").pop()?;
            beat.fields
                .get_str("degraded_reasons")
                .is_some_and(|r| r.contains("restart needed: redis.command_timeout"))
                .then_some(beat)
        },
    );
    assert_eq!(beat.fields.get_str("status"), Some("degraded"));
    assert_eq!(restart_needed(), 1.0);
    // Consuming goes on meanwhile, and a second reload of the same file still says so.
    server.xadd("nova:task:reload:a", &[("n", "1")]);
    wait_for("the forward", Duration::from_secs(10), || {
        (server.xlen("nova:task:reload:out-a") == 1).then_some(())
    });
    d.signal(libc::SIGHUP);
    wait_for("the second reload", Duration::from_secs(10), || {
        (d.count_log("reloaded the config") == 2).then_some(())
    });
    assert_eq!(restart_needed(), 1.0);

    std::fs::write(d.config_path(), &v1).unwrap();
    d.signal(libc::SIGHUP);
    wait_for("restart no longer needed", Duration::from_secs(10), || {
        (restart_needed() == 0.0).then_some(())
    });
    wait_for("a healthy heartbeat", Duration::from_secs(15), || {
        let beat = server.entries("nova:system:mcp:heartbeat").pop()?;
        (beat.fields.get_str("status") == Some("healthy")).then_some(())
    });
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}
