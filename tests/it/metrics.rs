//! The Prometheus endpoint: scraped before and after traffic, its numbers must move with it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::util::redis_server::free_port;
use crate::util::{Daemon, RedisServer, daemon_toml, root, wait_for};

pub fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    // A dead endpoint leaves the connection in the backlog forever: fail instead of hanging.
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

/// The value of the first sample whose line starts with `prefix` (name plus labels as far as given).
pub fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|lb| l.contains(lb)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of a series the daemon on `port` exports, which must be there: an assertion that it is
/// 0 cannot pass because the series was renamed or never registered.
pub fn exported(port: u16, name: &str, labels: &[&str]) -> f64 {
    let (status, text) = get(port, "/metrics");
    assert_eq!(status, 200, "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with(name) && labels.iter().all(|lb| l.contains(lb))),
        "{name}{labels:?} is not exported:\n{text}"
    );
    sample(&text, name, labels)
}

#[test]
fn metrics_move_with_traffic() {
    let server = RedisServer::start();
    let port = free_port();
    let hostile = root().join("handlers/build/hostile.wasm");
    let extra = format!(
        "[metrics]\nlisten = \"127.0.0.1:{port}\"\npoll_interval = \"200ms\"\n\
         [[handlers]]\nname = \"hostile\"\nfile = \"{}\"\nroles = [\"task_write\"]\ntimeout = \"500ms\"\n\
         config = {{ report = \"nova:task:metrics:report\" }}\n\
         [[consumers]]\nstream = \"nova:task:metrics:in\"\ngroup = \"g\"\nstart = \"0\"\nhandler = \"hostile\"\n\
         [[consumers]]\nstream = \"nova:task:metrics:fwd\"\ngroup = \"g\"\nstart = \"0\"\nhandler = \"forward\"\n\
         forward_to = \"nova:task:metrics:out\"\n",
        hostile.display()
    );
    let mut d = Daemon::running(&daemon_toml(&server.url(), &extra), &[]);
    let (status, before) = get(port, "/metrics");
    assert_eq!(status, 200, "{before}");
    // Counters are there at 0 before anything happened, so rate() and dashboards work from the start.
    for zero in [
        "redstream_errors_total{kind=\"connection\"} 0",
        "redstream_errors_total{kind=\"dead_letter_refused\"} 0",
        "redstream_publish_denied_total{handler=\"hostile\"} 0",
    ] {
        assert!(before.contains(zero), "{zero} missing:\n{before}");
    }
    assert_eq!(get(port, "/nope").0, 404);

    for i in 0..20 {
        server.xadd("nova:task:metrics:in", &[("n", &i.to_string())]);
        server.xadd("nova:task:metrics:fwd", &[("n", &i.to_string())]);
    }
    server.xadd("nova:task:metrics:in", &[("do", "publish-denied")]);
    wait_for("all handled", Duration::from_secs(10), || {
        (server.xlen("nova:task:metrics:out") == 20
            && server.xlen("nova:task:metrics:report") == 21)
            .then_some(())
    });
    let success = |t: &str, handler: &str| {
        sample(
            t,
            "redstream_messages_total",
            &[&format!("handler=\"{handler}\""), "outcome=\"success\""],
        )
    };
    // Gauges are polled every 200 ms; counters move when the loop takes the commit's verdicts, just
    // after Redis has written the replies the wait above saw.
    let mut last = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let (_, text) = get(port, "/metrics");
        if sample(&text, "redstream_stream_length", &["nova:task:metrics:fwd"]) == 20.0
            && success(&text, "hostile") - success(&before, "hostile") >= 21.0
            && success(&text, "forward") - success(&before, "forward") >= 20.0
        {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "polled gauges and counted commits never showed; last scrape:\n{last}"
        );
        last = text;
        std::thread::sleep(Duration::from_millis(20));
    };

    assert_eq!(
        success(&after, "hostile") - success(&before, "hostile"),
        21.0,
        "{after}"
    );
    assert_eq!(
        success(&after, "forward") - success(&before, "forward"),
        20.0
    );
    assert!(
        sample(
            &after,
            "redstream_handler_duration_seconds_count",
            &["handler=\"hostile\""]
        ) >= 21.0
    );
    assert!(
        sample(
            &after,
            "redstream_redis_duration_seconds_count",
            &["op=\"read_group\""]
        ) > 0.0
    );
    assert!(
        sample(
            &after,
            "redstream_redis_duration_seconds_count",
            &["op=\"ack\""]
        ) > 0.0
    );
    assert!(
        sample(
            &after,
            "redstream_redis_duration_seconds_count",
            &["op=\"create_group\""]
        ) >= 2.0
    );
    assert_eq!(
        sample(
            &after,
            "redstream_publish_denied_total",
            &["handler=\"hostile\""]
        ),
        1.0
    );
    assert!(
        sample(
            &after,
            "redstream_handler_peak_memory_bytes",
            &["handler=\"hostile\""]
        ) > 0.0
    );
    assert_eq!(
        sample(
            &after,
            "redstream_pending_entries",
            &["nova:task:metrics:fwd"]
        ),
        0.0
    );
    assert!(after.contains("# TYPE redstream_dead_lettered counter"));
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// Out of file descriptors, the endpoint cannot accept; it must keep trying, and serve once it can.
#[test]
fn the_endpoint_outlives_running_out_of_file_descriptors() {
    let server = RedisServer::start();
    let port = free_port();
    let extra = format!(
        "[metrics]\nlisten = \"127.0.0.1:{port}\"\n\
         [[consumers]]\nstream = \"nova:task:metrics:fd\"\ngroup = \"g\"\nhandler = \"drop\"\n"
    );
    let mut d = Daemon::running(&daemon_toml(&server.url(), &extra), &[]);
    assert_eq!(get(port, "/metrics").0, 200);

    // Lower the daemon's descriptor limit to its lowest free descriptor number: a new descriptor must
    // be below the limit, so its next accept fails with EMFILE.
    let open: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let lowest_free = (0..).find(|n| !open.contains(n)).unwrap();
    let set = |soft: u64, hard: Option<u64>| {
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit on our own child, reading into a local struct first.
        unsafe { libc::prlimit(d.pid(), libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
        let new = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard.unwrap_or(old.rlim_max),
        };
        let rc = unsafe { libc::prlimit(d.pid(), libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
        old.rlim_cur
    };
    let before = set(lowest_free, None);
    let scrape = std::thread::spawn(move || get(port, "/metrics").0);
    assert!(
        d.wait_log("cannot accept a connection", Duration::from_secs(10)),
        "{}",
        d.logs().join("\n")
    );
    // Room again: the waiting scrape is answered, and so are new ones.
    set(before, None);
    assert_eq!(scrape.join().unwrap(), 200);
    assert_eq!(get(port, "/metrics").0, 200);
    assert!(d.wait_log("accepts connections again", Duration::from_secs(5)));
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// A commit's verdicts come back at once, not when an idle BLOCK read ends: burst by burst, with a
/// 30 s BLOCK, each success is counted within seconds of its reply being in Redis. (A commit riding a
/// blocking read waited out the BLOCK in about half of such bursts.)
#[test]
fn verdicts_are_counted_promptly_even_while_reads_block() {
    let server = RedisServer::start();
    let port = free_port();
    let extra = format!(
        "[metrics]\nlisten = \"127.0.0.1:{port}\"\n\
         [[consumers]]\nstream = \"nova:task:metrics:slowread\"\ngroup = \"g\"\nblock = \"30s\"\n\
         handler = \"forward\"\nforward_to = \"nova:task:metrics:slowout\"\n"
    );
    let mut d = Daemon::running(&daemon_toml(&server.url(), &extra), &[]);
    let counted = || {
        sample(
            &get(port, "/metrics").1,
            "redstream_messages_total",
            &["handler=\"forward\"", "outcome=\"success\""],
        )
    };
    for burst in 1..=20u64 {
        for i in 0..20 {
            server.xadd("nova:task:metrics:slowread", &[("n", &i.to_string())]);
        }
        let n = burst * 20;
        wait_for("the replies", Duration::from_secs(10), || {
            (server.xlen("nova:task:metrics:slowout") == n).then_some(())
        });
        wait_for("its verdict counted", Duration::from_secs(5), || {
            (counted() == n as f64).then_some(())
        });
    }
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    assert_eq!(
        d.count_log("not-ours"),
        0,
        "a drain redid no commit whose verdict it had lost"
    );
}

/// The pace is visible: under a backlog the read size climbs to `batch_size` and the window past its
/// idle size (within `in_flight`); once the stream is drained both settle back to the floor.
#[test]
fn the_pace_shows_in_the_read_size_and_window_gauges() {
    const IN: &str = "nova:task:metrics:bulk";
    let server = RedisServer::start();
    server.xadd_backlog(IN, 30_000);
    let port = free_port();
    let (mut d, most_read, most_window) = drain_watching_pace(
        &server,
        IN,
        30_000,
        port,
        "batch_size = 128\nin_flight = 1024\n",
    );
    assert_eq!(most_read, 128.0, "the read size never reached batch_size");
    assert!(
        most_window > 64.0 && most_window <= 1024.0,
        "window peaked at {most_window}"
    );
    let labels = [&format!("stream=\"{IN}\"") as &str, "group=\"g\""];
    wait_for("the pace settled", Duration::from_secs(20), || {
        let (_, text) = get(port, "/metrics");
        (sample(&text, "redstream_read_size", &labels) == 16.0
            && sample(&text, "redstream_in_flight_window", &labels) == 64.0)
            .then_some(())
    });
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// Wide entries hold each read to about 512 KiB of them, whatever `batch_size` allows: 4 KiB entries
/// under a backlog are read by at most 128, not 500.
#[test]
fn wide_entries_hold_the_read_size_to_the_read_budget() {
    const IN: &str = "nova:task:metrics:wide";
    let server = RedisServer::start();
    server.xadd_wide_backlog(IN, 10_000, 4096);
    let (mut d, most_read, _) = drain_watching_pace(&server, IN, 10_000, free_port(), "");
    assert!(
        most_read > 16.0 && most_read <= 128.0,
        "4 KiB entries were read {most_read} at a time (the backlog should grow the read, the read \
         budget hold it to 128)"
    );
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// Runs a daemon forwarding `stream` (holding a backlog of `n` entries) to `{stream}-out` in group
/// `g`, `tuning` added to its consumer and metrics served on `port`; returns it once the backlog is
/// drained (within 60 s), with the highest read size and window its gauges showed meanwhile.
fn drain_watching_pace(
    server: &RedisServer,
    stream: &str,
    n: u64,
    port: u16,
    tuning: &str,
) -> (Daemon, f64, f64) {
    let out = format!("{stream}-out");
    let extra = format!(
        "[metrics]\nlisten = \"127.0.0.1:{port}\"\n\
         [[consumers]]\nstream = \"{stream}\"\ngroup = \"g\"\nstart = \"0\"\nhandler = \"forward\"\n\
         forward_to = \"{out}\"\n{tuning}"
    );
    let d = Daemon::running(&daemon_toml(&server.url(), &extra), &[]);
    let labels = [&format!("stream=\"{stream}\"") as &str, "group=\"g\""];
    let (mut most_read, mut most_window) = (0.0f64, 0.0f64);
    wait_for("the backlog drained", Duration::from_secs(60), || {
        let (_, text) = get(port, "/metrics");
        most_read = most_read.max(sample(&text, "redstream_read_size", &labels));
        most_window = most_window.max(sample(&text, "redstream_in_flight_window", &labels));
        (server.pending(stream, "g") == 0 && server.xlen(&out) == n).then_some(())
    });
    (d, most_read, most_window)
}

/// A reload that removes a group removes its series — pending, lag, pace and the stream's length —
/// instead of leaving their last values to be scraped forever; the kept group's stay.
#[test]
fn a_reload_that_removes_a_group_removes_its_gauges() {
    let server = RedisServer::start();
    let port = free_port();
    let head = format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\npoll_interval = \"200ms\"\n");
    let group = |s: &str| {
        format!(
            "[[consumers]]\nstream = \"nova:task:metrics:{s}\"\ngroup = \"g\"\nstart = \"0\"\n\
             block = \"500ms\"\nhandler = \"forward\"\nforward_to = \"nova:task:metrics:{s}-out\"\n"
        )
    };
    let both = daemon_toml(
        &server.url(),
        &[head.clone(), group("kept"), group("gone")].concat(),
    );
    let mut d = Daemon::running(&both, &[]);
    server.xadd_backlog("nova:task:metrics:kept", 10);
    server.xadd_backlog("nova:task:metrics:gone", 10);
    let names = [
        "redstream_pending_entries",
        "redstream_group_lag",
        "redstream_read_size",
        "redstream_in_flight_window",
        "redstream_stream_length",
    ];
    let shows = |text: &str, s: &str| {
        let label = format!("stream=\"nova:task:metrics:{s}\"");
        names
            .iter()
            .filter(|n| {
                text.lines()
                    .any(|l| l.starts_with(*n) && l.contains(&label))
            })
            .count()
    };
    wait_for("both groups' series", Duration::from_secs(20), || {
        let (_, text) = get(port, "/metrics");
        (shows(&text, "kept") == names.len() && shows(&text, "gone") == names.len()).then_some(())
    });
    std::fs::write(
        d.config_path(),
        daemon_toml(&server.url(), &[head, group("kept")].concat()),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    assert!(
        d.wait_log("reloaded the config", Duration::from_secs(20)),
        "{:?}",
        d.logs()
    );
    wait_for(
        "the removed group's series gone",
        Duration::from_secs(20),
        || {
            let (_, text) = get(port, "/metrics");
            (shows(&text, "gone") == 0 && shows(&text, "kept") == names.len()).then_some(())
        },
    );
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}
