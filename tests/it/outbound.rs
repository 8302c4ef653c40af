//! Outbound HTTP from handlers (`allowed_outbound_hosts`): the `caller` fixture against a local HTTP
//! server the test starts. Granted origins are reached; everything else — another origin, a redirect
//! to one, a response over the cap, one slower than the request's time — is refused with its own
//! error and commits nothing; every request carries an idempotency key that a re-run after kill -9
//! repeats; and calls waiting on HTTP hold no worker thread.

use std::time::{Duration, Instant};

use crate::metrics::exported;
use crate::util::http_server::HttpServer;
use crate::util::{Daemon, RedisServer, daemon_toml, redstream, root, wait_for, with_metrics};

const IN: &str = "nova:task:caller:in";
const OUT: &str = "nova:task:caller:out";
const DLQ: &str = "nova:task:caller:in-dlq";

/// The caller fixture on IN granted `allowed` (nothing, when empty), with `extra` lines in its
/// `[[handlers]]` entry and `consumer` lines in its consumer's.
fn toml(server: &RedisServer, allowed: &[String], extra: &str, consumer: &str) -> String {
    let allowed = match allowed {
        [] => String::new(),
        some => format!(
            "allowed_outbound_hosts = [{}]\n",
            some.iter()
                .map(|a| format!("{a:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    daemon_toml(
        &server.url(),
        &format!(
            "[[consumers]]\nstream = \"{IN}\"\ngroup = \"g\"\nstart = \"0\"\nblock = \"200ms\"\n\
             handler = \"caller\"\n{consumer}\n\
             [[handlers]]\nname = \"caller\"\nfile = \"{}\"\nroles = [\"task_write\"]\n\
             {allowed}config = {{ reply_to = \"{OUT}\" }}\n{extra}\n",
            root().join("handlers/build/caller.wasm").display(),
        ),
    )
}

/// The replies for `k` (its `started` one included).
fn replies(server: &RedisServer, k: &str) -> Vec<redstream::model::envelope::Entry> {
    server
        .entries(OUT)
        .into_iter()
        .filter(|e| e.fields.get_str("k") == Some(k))
        .collect()
}

/// The dead-letter reason of the message with `k`, once it is there.
fn dead_reason(server: &RedisServer, k: &str) -> String {
    wait_for(
        &format!("the dead letter of {k}"),
        Duration::from_secs(20),
        || {
            server
                .entries(DLQ)
                .into_iter()
                .find(|e| e.fields.get_str("k") == Some(k))
                .map(|e| e.fields.get_str("_dlq_reason").unwrap_or("").to_owned())
        },
    )
}

#[test]
fn granted_origins_are_reached_and_every_other_request_is_refused_committing_nothing() {
    let server = RedisServer::start();
    let web = HttpServer::start();
    let other = HttpServer::start();
    let (config, port) = with_metrics(&toml(
        &server,
        &[format!("http://127.0.0.1:{}", web.port)],
        "timeout = \"3s\"\nhttp_timeout = \"1s\"\nhttp_max_response = \"64KiB\"",
        "",
    ));
    let mut d = Daemon::running(&config, &[]);

    let id = server.xadd(
        IN,
        &[
            ("k", "ok"),
            ("url", &web.url("/ok")),
            ("method", "POST"),
            ("body", "ping"),
        ],
    );
    let done = wait_for("the reply of ok", Duration::from_secs(15), || {
        let r = replies(&server, "ok");
        (r.len() == 2).then_some(r)
    });
    assert_eq!(done[1].fields.get_str("status"), Some("200"));
    assert_eq!(done[1].fields.get_str("body"), Some("hello"));
    let seen = web.seen();
    assert_eq!(
        (seen[0].method.as_str(), &seen[0].body[..]),
        ("POST", &b"ping"[..])
    );
    let key = seen[0].idempotency_key.clone();
    assert_eq!(
        key.as_deref(),
        Some(format!("redstream:caller:{IN}:{id}:1").as_str())
    );

    // Refused, each with its own reason, and the reply published before the request not committed.
    let denied = other.url("/ok");
    let cases = [
        (
            "denied",
            denied.clone(),
            "not in the handler's allowed_outbound_hosts",
        ),
        (
            "redirect",
            web.url(&format!("/redirect?to={denied}")),
            "not in the handler's allowed_outbound_hosts",
        ),
        ("huge", web.url("/big?bytes=100000"), "response too large"),
        (
            "flood",
            web.url("/flood?bytes=100000"),
            "response too large",
        ),
        ("slow", web.url("/slow?ms=5000"), "timed out"),
    ];
    for (k, url, _) in &cases {
        server.xadd(IN, &[("k", k), ("url", url), ("on_error", "reject")]);
    }
    for (k, url, why) in &cases {
        let reason = dead_reason(&server, k);
        assert!(reason.contains(why), "{k} ({url}): {reason}");
        assert!(replies(&server, k).is_empty(), "{k} committed a reply");
    }
    assert!(other.seen().is_empty(), "{:?}", other.seen());
    assert!(web.seen().iter().any(|s| s.path == "/redirect"));
    assert!(
        d.count_log("outbound request refused") >= 2,
        "{:?}",
        d.logs()
    );
    let requests = "redstream_handler_http_requests_total";
    let ours = format!("host=\"http://127.0.0.1:{}\"", web.port);
    assert_eq!(
        exported(
            port,
            requests,
            &["handler=\"caller\"", "outcome=\"denied\""]
        ),
        2.0
    );
    assert!(exported(port, requests, &[&ours, "outcome=\"2xx\""]) >= 1.0);
    assert!(exported(port, requests, &[&ours, "outcome=\"too_large\""]) >= 1.0);
    assert!(exported(port, requests, &[&ours, "outcome=\"timeout\""]) >= 1.0);
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

#[test]
fn idempotency_keys_repeat_when_a_message_runs_again_after_kill_9() {
    let server = RedisServer::start();
    let web = HttpServer::start();
    let config = toml(
        &server,
        &[format!("http://127.0.0.1:{}", web.port)],
        "timeout = \"6s\"",
        "handler_timeout = \"8s\"",
    );
    let mut d = Daemon::running(&config, &[]);
    // Two requests, then busy past the kill: the message is not committed.
    let id = server.xadd(
        IN,
        &[
            ("k", "a"),
            ("url", &web.url("/ok")),
            ("url2", &web.url("/ok")),
            ("spin_ms", "4000"),
        ],
    );
    wait_for("both requests", Duration::from_secs(15), || {
        (web.seen().len() == 2).then_some(())
    });
    d.kill9();
    assert!(replies(&server, "a").is_empty());
    // The same consumer re-reads it at start: the same requests again, with the same keys.
    let mut d = Daemon::running(&config, &[]);
    wait_for("the reply", Duration::from_secs(20), || {
        (replies(&server, "a").len() == 2).then_some(())
    });
    let keys: Vec<String> = web
        .seen()
        .iter()
        .map(|s| s.idempotency_key.clone().unwrap_or_default())
        .collect();
    let first = format!("redstream:caller:{IN}:{id}:1");
    let second = format!("redstream:caller:{IN}:{id}:2");
    assert_eq!(keys, [first.clone(), second.clone(), first, second]);
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

#[test]
fn calls_waiting_on_http_hold_no_worker_and_keep_to_their_concurrency() {
    let server = RedisServer::start();
    let web = HttpServer::start();
    // Two workers; 300 calls each waiting 200 ms on the server.
    let config = toml(
        &server,
        &[format!("http://127.0.0.1:{}", web.port)],
        "concurrency = 48",
        "in_flight = 400\nbatch_size = 100",
    )
    .replace("[daemon]", "[wasm]\nworkers = 2\n[daemon]");
    let mut d = Daemon::running(&config, &[]);
    let n = 300;
    let url = web.url("/slow?ms=200");
    let started = Instant::now();
    let mut conn = server.conn();
    let mut pipe = redis::pipe();
    for i in 0..n {
        pipe.cmd("XADD")
            .arg(IN)
            .arg("*")
            .arg("k")
            .arg(i.to_string())
            .arg("url")
            .arg(&url)
            .ignore();
    }
    pipe.query::<()>(&mut conn).unwrap();
    wait_for("every reply", Duration::from_secs(60), || {
        (server.xlen(OUT) == 2 * n).then_some(())
    });
    let took = started.elapsed();
    let most = web.most_at_once();
    // Held threads would allow two at once (the workers); the limit is 48.
    assert!(
        (16..=48).contains(&most),
        "{most} requests at once ({took:?})"
    );
    println!(
        "{n} calls waiting 200 ms each: {took:?}, at most {most} at once (serially per worker: {:?})",
        Duration::from_millis(200) * n as u32 / 2
    );
    wait_for("nothing pending", Duration::from_secs(10), || {
        (server.pending(IN, "g") == 0).then_some(())
    });
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// A component importing wasi:http but granted no origin loads (as componentize-js builds do, and
/// task-router without a webhook), and each of its requests is refused, with a WARN.
#[test]
fn a_handler_granted_nothing_is_refused_every_request() {
    let server = RedisServer::start();
    let web = HttpServer::start();
    let mut d = Daemon::running(&toml(&server, &[], "", ""), &[]);
    server.xadd(
        IN,
        &[
            ("k", "none"),
            ("url", &web.url("/ok")),
            ("on_error", "reject"),
        ],
    );
    let reason = dead_reason(&server, "none");
    assert!(
        reason.contains("not in the handler's allowed_outbound_hosts"),
        "{reason}"
    );
    assert!(web.seen().is_empty());
    assert!(replies(&server, "none").is_empty());
    assert!(
        d.count_log("outbound request refused") >= 1,
        "{:?}",
        d.logs()
    );
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

#[test]
fn outbound_grants_are_checked() {
    let server = RedisServer::start();
    let bad = |extra: &str, hosts: &str| {
        let config = daemon_toml(
            &server.url(),
            &format!(
                "[[consumers]]\nstream = \"{IN}\"\ngroup = \"g\"\nhandler = \"caller\"\n\
                 [[handlers]]\nname = \"caller\"\nfile = \"{}\"\nroles = [\"task_write\"]\n{hosts}{extra}\n",
                root().join("handlers/build/caller.wasm").display()
            ),
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("redstream.toml");
        std::fs::write(&path, config).unwrap();
        let out = std::process::Command::new(crate::util::bin())
            .args(["--config", path.to_str().unwrap(), "check"])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    // Granted nothing: it loads (its requests are refused at run time).
    let (code, err) = bad("", "");
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = bad(
        "",
        "allowed_outbound_hosts = [\"api.example.com\", \"https://x/y\"]\n",
    );
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("handlers[0].allowed_outbound_hosts[0]"),
        "{err}"
    );
    assert!(
        err.contains("handlers[0].allowed_outbound_hosts[1]"),
        "{err}"
    );
    let (code, err) = bad(
        "instance = \"reuse\"\n",
        "allowed_outbound_hosts = [\"https://api.example.com\"]\n",
    );
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("handlers[0].instance"), "{err}");
    let (code, err) = bad("concurrency = 8\n", "");
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("handlers[0].concurrency"), "{err}");
    let (code, err) = bad(
        "concurrency = 0\n",
        "allowed_outbound_hosts = [\"https://api.example.com\"]\n",
    );
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("handlers[0].concurrency"), "{err}");
    let (code, err) = bad(
        "",
        "allowed_outbound_hosts = [\"https://api.example.com:*\", \"http://*.internal\"]\n",
    );
    assert_eq!(code, Some(0), "{err}");
}

/// `handler test` cases stub the responses of a handler's requests and expect the requests it made:
/// task-router posts a completed task to its webhook (a 2xx commits the event, a 503 retries), posts
/// nothing for an open one, and a request no stub answers fails the call.
#[test]
fn handler_test_cases_stub_http_and_expect_the_requests() {
    let dir = tempfile::tempdir().unwrap();
    let hook = "https://hooks.example.com/task-completed";
    let config = dir.path().join("redstream.toml");
    std::fs::write(
        &config,
        format!(
            "[[handlers]]\nname = \"task-router\"\nfile = \"{}\"\nroles = [\"task_write\"]\n\
             allowed_outbound_hosts = [\"https://hooks.example.com\"]\n\
             config = {{ webhook = \"{hook}\" }}\n",
            root().join("handlers/build/task-router.wasm").display()
        ),
    )
    .unwrap();
    let cases = dir.path().join("cases.jsonl");
    let done = r#"{"task": "{\"id\":\"t1\",\"status\":\"done\",\"revision\":3}"}"#;
    let open = r#"{"task": "{\"id\":\"t2\",\"status\":\"open\"}"}"#;
    let good = [
        format!(
            r#"{{"name": "posted", "message": {done}, "http": [{{"url": "{hook}", "method": "POST", "status": 204}}], "expect": {{"outcome": "success", "replies": [{{"stream": "nova:task:boomerang:events", "fields": {{"type": "task_completed"}}}}], "requests": [{{"url": "{hook}", "method": "POST", "body": {{"type": "task_completed", "task_id": "t1", "revision": 3}}}}]}}}}"#
        ),
        format!(
            r#"{{"name": "the webhook is down", "message": {done}, "http": [{{"url": "{hook}", "status": 503}}], "expect": {{"outcome": "retry", "reason_contains": "answered 503"}}}}"#
        ),
        format!(
            r#"{{"name": "nothing to post", "message": {open}, "expect": {{"outcome": "success", "requests": []}}}}"#
        ),
        format!(
            r#"{{"name": "no stub", "message": {done}, "expect": {{"outcome": "retry", "reason_contains": "no stub for POST {hook}"}}}}"#
        ),
    ];
    let run = |lines: &[String]| {
        std::fs::write(&cases, lines.join("\n")).unwrap();
        let out = std::process::Command::new(crate::util::bin())
            .arg("--config")
            .arg(&config)
            .args(["handler", "test", "--handler", "task-router", "--cases"])
            .arg(&cases)
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
    assert!(out.contains("4 of 4 cases passed"), "{out}");
    // A request the case does not expect is a failure, naming what was made.
    let wrong = format!(
        r#"{{"name": "wrong", "message": {done}, "http": [{{"url": "{hook}"}}], "expect": {{"outcome": "success", "requests": []}}}}"#
    );
    let (code, out) = run(&[wrong]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("requests differ"), "{out}");
}

/// Waiting for a turn is neither the call's time nor an attempt: 24 messages each waiting 400 ms on the
/// server go through a handler with `concurrency = 2` under a consumer `handler_timeout` of 1.5 s and
/// `max_deliveries = 1`. The last waits ~4.8 s for its turn; none times out, none is dead-lettered.
#[test]
fn waiting_for_a_turn_is_neither_the_calls_time_nor_an_attempt() {
    let server = RedisServer::start();
    let web = HttpServer::start();
    let config = toml(
        &server,
        &[format!("http://127.0.0.1:{}", web.port)],
        "timeout = \"1s\"\nconcurrency = 2",
        "handler_timeout = \"1500ms\"\nclaim_min_idle = \"30s\"\nmax_deliveries = 1",
    );
    let mut d = Daemon::running(&config, &[]);
    let url = web.url("/slow?ms=400");
    for i in 0..24 {
        server.xadd(IN, &[("k", &i.to_string()), ("url", &url)]);
    }
    wait_for("every reply", Duration::from_secs(40), || {
        let done = server
            .entries(OUT)
            .iter()
            .filter(|e| e.fields.get_str("status") == Some("200"))
            .count();
        (done == 24 || server.xlen(DLQ) > 0).then_some(())
    });
    let dead: Vec<String> = server
        .entries(DLQ)
        .iter()
        .map(|e| e.fields.get_str("_dlq_reason").unwrap_or("").to_owned())
        .collect();
    assert!(
        dead.is_empty(),
        "{} dead-lettered: {:?}",
        dead.len(),
        dead.first()
    );
    assert!(web.most_at_once() <= 2, "{}", web.most_at_once());
    assert_eq!(web.seen().len(), 24, "each message ran once");
    wait_for("nothing pending", Duration::from_secs(10), || {
        (server.pending(IN, "g") == 0).then_some(())
    });
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// A JavaScript handler made by `handler new --lang js` uses `fetch` once its entry grants the origin:
/// an `async` handle awaits it, reaches the granted server with an idempotency key and gets its
/// answer; a request to an origin not granted — a POST whose body the refusal must read away, else
/// StarlingMonkey aborts the call instead of rejecting — rejects fetch's promise, which the handler
/// catches; and a rejection it does not catch is the outcome it carries.
#[test]
fn a_javascript_handler_fetches_from_a_granted_origin() {
    let web = HttpServer::start();
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().to_str().unwrap();
    let (code, out, err) = redstream(&[
        "handler",
        "new",
        "fetcher",
        "--lang",
        "js",
        "--engine",
        "starlingmonkey",
        "--dir",
        at,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let project = dir.path().join("fetcher");
    let p = project.to_str().unwrap();
    std::fs::write(
        project.join("src/handler.js"),
        r#"import { handler, requireText, config, reject, Reply } from './redstream.js';

export const handle = handler(async (msg) => {
  const url = requireText(msg, 'url');
  const body = requireText(msg, 'body');
  let res;
  try {
    res = await fetch(url, { method: 'POST', body });
  } catch (e) {
    throw reject(`fetch ${url}: ${e}`);
  }
  new Reply().text('answer', `${res.status} ${await res.text()}`).send(config('reply_to'));
});
"#,
    )
    .unwrap();
    let entry = project.join("handler.toml");
    let text = std::fs::read_to_string(&entry).unwrap();
    let granted = text
        .replace("instance = \"reuse\"", "instance = \"fresh\"")
        .replace(
            "config = {",
            &format!(
                "allowed_outbound_hosts = [\"http://127.0.0.1:{}\"]\nconfig = {{",
                web.port
            ),
        );
    assert_ne!(granted, text);
    std::fs::write(&entry, granted).unwrap();
    let (code, out, err) = redstream(&["handler", "build", p]);
    assert_eq!(code, Some(0), "{out}{err}");

    let run = |message: serde_json::Value| {
        redstream(&["handler", "run", p, "--message", &message.to_string()])
    };
    let (code, out, err) = run(serde_json::json!({"url": web.url("/ok"), "body": "hi"}));
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(r#""answer":"200 hello""#), "{out}");
    let seen = web.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!((&*seen[0].method, &*seen[0].path), ("POST", "/ok"));
    assert_eq!(seen[0].body, b"hi");
    let key = seen[0].idempotency_key.clone().unwrap_or_default();
    assert!(
        key.starts_with("redstream:fetcher:") && key.ends_with(":1"),
        "{key}"
    );

    let (code, out, err) = run(serde_json::json!({"url": "http://127.0.0.1:1/x", "body": "hi"}));
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains(r#""outcome":"reject""#)
            && out.contains("fetch http://127.0.0.1:1/x: TypeError"),
        "{out}{err}"
    );
    assert!(err.contains("outbound request refused"), "{err}");
    assert_eq!(web.seen().len(), 1);

    let (code, out, err) = run(serde_json::json!({"url": web.url("/ok")}));
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains(r#""outcome":"reject""#) && out.contains("no `body` field"),
        "{out}{err}"
    );
}
