//! Per-handler breakers and rate limits (`[[handlers]] breaker = {…}`, `rate = "…"`): an outage of one
//! handler's downstream opens its breaker — its messages wait without spending deliveries, the other
//! handler of the same group keeps flowing, the operator sees it in the log, metrics and heartbeat — and
//! a probe closes it once the outage ends; a rate limit holds across two daemons.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::metrics::{get, sample};
use crate::util::{Daemon, RedisServer, daemon_toml, wait_for, with_metrics};

const IN: &str = "nova:task:breaker:in";
const OUT: &str = "nova:task:breaker:out";
const STEADY_OUT: &str = "nova:task:breaker:steady";
const DLQ: &str = "nova:task:breaker:in-dlq";
const HEARTBEAT: &str = "nova:system:mcp:heartbeat";

/// One group on IN: messages with `to = flaky` go to `flaky` (failing while `switch` exists, a
/// breaker opening at half of 5 calls and probing every second), the rest to `steady`. Retries after
/// 200 ms, at most three deliveries: without the breaker, an outage of a second dead-letters.
fn config(url: &str, switch: &Path) -> String {
    daemon_toml(
        url,
        &format!(
            "[heartbeat]\ninterval = \"200ms\"\n\
             [[consumers]]\nstream = \"{IN}\"\ngroup = \"g\"\nstart = \"0\"\nblock = \"200ms\"\n\
             claim_min_idle = \"5s\"\nclaim_interval = \"100ms\"\nhandler_timeout = \"500ms\"\n\
             max_deliveries = 3\nretry = {{ backoff = [\"200ms\"], jitter = \"0%\" }}\n\
             [[consumers.routes]]\nequals = {{ to = \"flaky\" }}\nhandler = \"flaky\"\n\
             [[consumers.routes]]\nhandler = \"steady\"\n\
             [[handlers]]\nname = \"flaky\"\n\
             faults = {{ reply_to = \"{OUT}\", fail_while_file = \"{}\" }}\n\
             breaker = {{ failures = \"50%\", min_calls = 5, window = \"10s\", open_for = \"1s\" }}\n\
             [[handlers]]\nname = \"steady\"\nfaults = {{ reply_to = \"{STEADY_OUT}\" }}\n",
            switch.display()
        ),
    )
}

fn deliveries(server: &RedisServer) -> HashMap<String, u64> {
    server.deliveries(IN, "g")
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

/// An outage of six seconds behind `flaky`: its breaker opens within its window and says so (log,
/// `redstream_breaker_open`, heartbeat); while open, its messages are called only as probes (one a
/// second), spend no delivery, and none is dead-lettered, while `steady`'s messages in the same group
/// flow; once the outage ends a probe succeeds, the breaker closes, and every message is answered
/// once.
#[test]
fn a_breaker_opens_holds_its_messages_lets_others_flow_probes_and_closes() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let switch = dir.path().join("down");
    std::fs::write(&switch, "down").unwrap();
    let (toml, port) = with_metrics(&config(&server.url(), &switch));
    let mut d = Daemon::running(&toml, &[]);
    let open = || {
        sample(
            &get(port, "/metrics").1,
            "redstream_breaker_open",
            &["handler=\"flaky\""],
        )
    };
    assert_eq!(open(), 0.0, "exported at 0 while closed");

    let started = Instant::now();
    let flaky: Vec<String> = (0..10)
        .map(|i| server.xadd(IN, &[("to", "flaky"), ("n", &i.to_string())]))
        .collect();
    assert!(
        d.wait_log("breaker opened", Duration::from_secs(10)),
        "{:#?}",
        d.logs()
    );
    let line = d
        .logs()
        .into_iter()
        .find(|l| l.contains("breaker opened"))
        .unwrap();
    assert!(
        line.contains("flaky") && line.contains("calls failed within 10s"),
        "{line}"
    );
    wait_for("redstream_breaker_open = 1", Duration::from_secs(5), || {
        (open() == 1.0).then_some(())
    });
    let beat = wait_for(
        "a heartbeat naming the open breaker",
        Duration::from_secs(5),
        || {
            let beat = server.entries(HEARTBEAT).pop()?;
            let reasons = beat
                .fields
                .get_str("degraded_reasons")
                .unwrap_or("")
                .to_owned();
            (beat.fields.get_str("status") == Some("degraded")
                && reasons.contains("breaker of handler flaky is open"))
            .then_some(reasons)
        },
    );
    assert!(beat.contains("calls failed"), "{beat}");

    // The other handler of the group is not held back.
    let steady: Vec<String> = (0..20)
        .map(|i| server.xadd(IN, &[("n", &i.to_string())]))
        .collect();
    wait_for("steady's replies", Duration::from_secs(10), || {
        (server.xlen(STEADY_OUT) == 20).then_some(())
    });
    assert_eq!(server.answered(STEADY_OUT), sorted(steady.clone()));
    assert_eq!(open(), 1.0, "steady flowed while flaky's breaker was open");

    // Six seconds of outage: six retry intervals of 200 ms would have dead-lettered all ten many
    // times over; held messages spend no delivery (at most one failed call each before the breaker
    // opened, and a probe's failure is given back).
    while started.elapsed() < Duration::from_secs(6) {
        let d = deliveries(&server);
        assert!(d.values().all(|n| *n <= 2), "{d:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.xlen(DLQ), 0, "dead-lettered during the outage");
    assert_eq!(server.xlen(OUT), 0);
    let calls = std::fs::read_to_string(switch.with_extension("calls")).unwrap();
    let n = calls.lines().count();
    // Up to ten first calls (those read after it opened are held at once), then a probe a second
    // (give or take the spread of held due times).
    assert!(
        (5..=18).contains(&n),
        "{n} calls during the outage:\n{calls}"
    );
    assert!(d.count_log("the probe failed") >= 3, "{:#?}", d.logs());

    // The outage ends: the next probe succeeds, the breaker closes, everything is answered once.
    std::fs::remove_file(&switch).unwrap();
    assert!(
        d.wait_log("breaker closed", Duration::from_secs(10)),
        "{:#?}",
        d.logs()
    );
    wait_for(
        "every flaky message answered",
        Duration::from_secs(15),
        || (server.xlen(OUT) >= 10 && server.pending(IN, "g") == 0).then_some(()),
    );
    assert_eq!(server.answered(OUT), sorted(flaky));
    assert_eq!(server.xlen(DLQ), 0);
    assert_eq!(open(), 0.0);
    wait_for("a healthy heartbeat", Duration::from_secs(5), || {
        let beat = server.entries(HEARTBEAT).pop()?;
        (beat.fields.get_str("status") != Some("degraded")).then_some(())
    });
    assert!(
        sample(
            &get(port, "/metrics").1,
            "redstream_breaker_held_total",
            &["handler=\"flaky\""]
        ) >= 10.0
    );
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// A message that always fails cannot hold the breaker open by being the probe every time: probes
/// rotate, the healthy messages' probe closes the breaker, and the poison message is then retried as
/// usual and dead-lettered after max_deliveries.
#[test]
fn a_poison_message_does_not_keep_the_breaker_open() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let switch = dir.path().join("down");
    std::fs::write(&switch, "down").unwrap();
    let toml = config(&server.url(), &switch).replace(
        "fail_while_file",
        "fail_field = \"poison\", fail_while_file",
    );
    let mut d = Daemon::running(&toml, &[]);
    let poison = server.xadd(IN, &[("to", "flaky"), ("poison", "1")]);
    let healthy: Vec<String> = (0..9)
        .map(|i| server.xadd(IN, &[("to", "flaky"), ("n", &i.to_string())]))
        .collect();
    assert!(d.wait_log("breaker opened", Duration::from_secs(10)));
    std::fs::remove_file(&switch).unwrap();
    assert!(
        d.wait_log("breaker closed", Duration::from_secs(15)),
        "{:#?}",
        d.logs()
    );
    wait_for("the healthy ones answered", Duration::from_secs(15), || {
        (server.xlen(OUT) >= 9).then_some(())
    });
    assert_eq!(server.answered(OUT), sorted(healthy));
    let letter = wait_for(
        "the poison message dead-lettered",
        Duration::from_secs(15),
        || server.entries(DLQ).pop(),
    );
    assert_eq!(
        letter.fields.get_str("_dlq_source"),
        Some(format!("{IN}/{poison}").as_str())
    );
    assert_eq!(server.xlen(DLQ), 1);
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// `rate = "50/s"` on a handler that two daemons of one group run: together they stay within 10 %
/// of the rate over a backlog of 300 messages (without the limit they answer it in well under a
/// second), and both took part.
#[test]
fn a_rate_limit_holds_across_two_daemons() {
    let server = RedisServer::start();
    let consumer = |name: &str| {
        daemon_toml(
            &server.url(),
            &format!(
                "[[consumers]]\nstream = \"{IN}\"\ngroup = \"g\"\nconsumer = \"{name}\"\nstart = \"0\"\n\
                 block = \"200ms\"\nin_flight = 20\nbatch_size = 10\n\
                 [[consumers.routes]]\nhandler = \"limited\"\n\
                 [[handlers]]\nname = \"limited\"\nfaults = {{ reply_to = \"{OUT}\" }}\nrate = \"50/s\"\n"
            ),
        )
    };
    let (a_toml, a_port) = with_metrics(&consumer("a"));
    let (b_toml, b_port) = with_metrics(&consumer("b"));
    let mut a = Daemon::running(&a_toml, &[]);
    let mut b = Daemon::running(&b_toml, &[]);
    let ids: Vec<String> = (0..300)
        .map(|i| server.xadd(IN, &[("n", &i.to_string())]))
        .collect();
    wait_for("all 300 answered", Duration::from_secs(30), || {
        (server.xlen(OUT) >= 300).then_some(())
    });
    assert_eq!(server.answered(OUT), sorted(ids));
    // The replies' ids carry the time Redis wrote them: 300 replies, 299 intervals of 20 ms.
    let times: Vec<u64> = server
        .entries(OUT)
        .iter()
        .map(|e| e.id.split('-').next().unwrap().parse().unwrap())
        .collect();
    let span = (times[times.len() - 1] - times[0]) as f64 / 1000.0;
    let rate = 299.0 / span;
    assert!(
        (45.0..=55.0).contains(&rate),
        "{rate:.1} calls/s over {span:.2} s, not 50 ± 10 %"
    );
    let took = |port| {
        sample(
            &get(port, "/metrics").1,
            "redstream_messages_total",
            &["outcome=\"success\""],
        )
    };
    let (by_a, by_b) = (took(a_port), took(b_port));
    assert_eq!(by_a + by_b, 300.0);
    assert!(by_a >= 30.0 && by_b >= 30.0, "a {by_a}, b {by_b}");
    assert_eq!(a.stop(Duration::from_secs(10)), 0);
    assert_eq!(b.stop(Duration::from_secs(10)), 0);
}
