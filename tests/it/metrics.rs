//! The Prometheus endpoint: scraped before and after traffic, its numbers must move with it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::util::redis_server::free_port;
use crate::util::{Daemon, RedisServer, daemon_toml, root, wait_for};

fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
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
fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|lb| l.contains(lb)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
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
    let after = wait_for(
        "polled gauges and counted commits",
        Duration::from_secs(5),
        || {
            let (_, text) = get(port, "/metrics");
            (sample(&text, "redstream_stream_length", &["nova:task:metrics:fwd"]) == 20.0
                && success(&text, "hostile") - success(&before, "hostile") >= 21.0
                && success(&text, "forward") - success(&before, "forward") >= 20.0)
                .then_some(text)
        },
    );

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
