//! WASM handlers in the real daemon: every hostile fixture contained while a neighbour keeps working,
//! denied publishes, routing, sender tokens, instance reuse, and `check` refusing foreign imports.
//! Components come from handlers/build (scripts/build-handlers; scripts/test builds them first).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use redstream::auth::{Identity, Roles};
use redstream::model::envelope::Fields;

use crate::util::{Daemon, RedisServer, bin, daemon_toml, root, settings, wait_for};

const REPORT: &str = "nova:task:wasm:report";
const ECHOED: &str = "nova:task:wasm:echoed";

fn component(name: &str) -> PathBuf {
    let path = root().join("handlers/build").join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run scripts/build-handlers",
        path.display()
    );
    path
}

/// A `[[handlers]]` entry; its deadline (500 ms unless `extra` sets one) fits the consumers' 900 ms.
fn handler(name: &str, file: &str, extra: &str) -> String {
    let timeout = if extra.contains("timeout") {
        ""
    } else {
        "timeout = \"500ms\"\n"
    };
    format!(
        "[[handlers]]\nname = \"{name}\"\nfile = \"{}\"\n{timeout}{extra}\n",
        component(file).display()
    )
}

fn consumer(stream: &str, handler: Option<&str>, extra: &str) -> String {
    let handler = handler.map_or(String::new(), |h| format!("handler = \"{h}\"\n"));
    format!(
        "[[consumers]]\nstream = \"{stream}\"\ngroup = \"g\"\nstart = \"0\"\n{handler}\
         claim_min_idle = \"1s\"\nclaim_interval = \"200ms\"\nhandler_timeout = \"900ms\"\nblock = \"1s\"\n{extra}\n"
    )
}

/// The `what`/`detail` pairs reported by the hostile fixture.
fn reports(server: &RedisServer) -> Vec<(String, String)> {
    server
        .entries(REPORT)
        .iter()
        .map(|e| {
            (
                e.fields.get_str("what").unwrap_or("").to_owned(),
                e.fields.get_str("detail").unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn wasm_section(cache: &std::path::Path, workers: u32) -> String {
    format!(
        "[wasm]\nworkers = {workers}\ncache_dir = \"{}\"\n",
        cache.display()
    )
}

/// A guest's log lines run on a worker thread, yet say where they come from as the loop's own lines
/// do: the consumer's stream, group and consumer (the loop's span), the handler, the message id and
/// the message's trace id. And when the guest panics, the panic's words are the reason.
#[test]
fn guest_log_lines_carry_the_stream_group_message_and_trace_id_and_a_panic_its_words() {
    let server = RedisServer::start();
    let cache = tempfile::tempdir().unwrap();
    let stream = "nova:task:wasm:guestlog";
    let toml = daemon_toml(
        &server.url(),
        &[
            wasm_section(cache.path(), 1),
            handler(
                "hostile",
                "hostile",
                &format!("roles = [\"task_write\"]\nconfig = {{ report = \"{REPORT}\" }}"),
            ),
            consumer(stream, Some("hostile"), "max_deliveries = 1"),
        ]
        .concat(),
    );
    let mut d = Daemon::running(&toml, &[]);
    let id = server.xadd(stream, &[("do", "panic"), ("_trace_id", "trace-guest-9")]);
    let dead = wait_for("the dead letter", Duration::from_secs(20), || {
        server.entries(&format!("{stream}-dlq")).pop()
    });
    // The panic's own words lead the reason, where the trap alone would say `unreachable`.
    let reason = dead.fields.get_str("_dlq_reason").unwrap_or_default();
    assert!(
        reason.starts_with("panicked at ")
            && reason.contains("src/lib.rs:")
            && reason.contains(&format!("the guest gave up on {id}"))
            && reason.contains("unreachable"),
        "{reason}"
    );
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    assert!(
        d.logs()
            .iter()
            .any(|l| l.contains("dead-lettered") && l.contains("the guest gave up on")),
        "the WARN line names the panic"
    );
    let logs = d.logs();
    let line = logs
        .iter()
        .find(|l| l.contains("about to give up"))
        .unwrap_or_else(|| panic!("the guest's line: {logs:#?}"));
    for expected in [
        stream,
        "group=g",
        "handler=hostile",
        &format!("message_id={id}"),
        "trace_id=trace-guest-9",
    ] {
        assert!(line.contains(expected), "{expected} in {line}");
    }
}

#[test]
fn hostile_handlers_are_contained_while_a_neighbour_keeps_working() {
    let server = RedisServer::start();
    let cache = tempfile::tempdir().unwrap();
    let hostile_stream = "nova:task:wasm:hostile";
    let echo_stream = "nova:task:wasm:echo";
    let toml = daemon_toml(
        &server.url(),
        &[
            wasm_section(cache.path(), 2),
            handler(
                "hostile",
                "hostile",
                &format!("roles = [\"task_write\"]\nmemory = \"16MiB\"\ntimeout = \"300ms\"\nconfig = {{ report = \"{REPORT}\" }}"),
            ),
            handler("echo", "echo", &format!("roles = [\"task_write\"]\nconfig = {{ reply_to = \"{ECHOED}\" }}")),
            consumer(hostile_stream, Some("hostile"), "max_deliveries = 2"),
            consumer(echo_stream, Some("echo"), ""),
        ]
        .concat(),
    );
    let mut d = Daemon::running(&toml, &[]);

    // The neighbour alone.
    let started = Instant::now();
    for i in 0..300 {
        server.xadd(echo_stream, &[("n", &i.to_string())]);
    }
    wait_for("300 echoes", Duration::from_secs(30), || {
        (server.xlen(ECHOED) >= 300).then_some(())
    });
    let alone = started.elapsed();

    // Every kind of misbehaviour at once, then the neighbour again.
    let addr = format!("127.0.0.1:{}", server.port);
    for fields in [
        vec![("do", "loop")],
        vec![("do", "loop")],
        vec![("do", "membomb")],
        vec![("do", "recurse")],
        vec![("marker", "1")],
        vec![
            ("do", "publish-denied"),
            ("target", "nova:system:mcp:control"),
        ],
        vec![("do", "snoop"), ("addr", addr.as_str())],
        vec![("do", "logflood")],
    ] {
        server.xadd(hostile_stream, &fields);
    }
    let started = Instant::now();
    for i in 0..300 {
        server.xadd(echo_stream, &[("n", &i.to_string())]);
    }
    wait_for("300 more echoes", Duration::from_secs(30), || {
        (server.xlen(ECHOED) >= 600).then_some(())
    });
    let beside = started.elapsed();
    println!(
        "echo alone: {:.0} msg/s; beside hostile handlers: {:.0} msg/s",
        300.0 / alone.as_secs_f64(),
        300.0 / beside.as_secs_f64()
    );
    // How fast the neighbour goes beside hostile guests is the benchmark's question (a 2-core machine
    // under load makes any bound here a coin toss); this test holds that it keeps going at all, and
    // that every misbehaviour below ended in the outcome it must.

    // Traps (deadline, memory, stack, unreachable) are retries, dead-lettered after max_deliveries.
    let dlq = "nova:task:wasm:hostile-dlq";
    wait_for("5 dead letters", Duration::from_secs(30), || {
        (server.xlen(dlq) >= 5).then_some(())
    });
    let reasons: Vec<String> = server
        .entries(dlq)
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e.fields.get_str("do").unwrap_or("marker"),
                e.fields.get_str("_dlq_reason").unwrap()
            )
        })
        .collect();
    for (what, why) in [
        ("loop", "deadline of 300ms"),
        ("membomb", "memory limit"),
        ("recurse", "trap"),
        ("marker", "unreachable"),
    ] {
        assert!(
            reasons
                .iter()
                .any(|r| r.starts_with(what) && r.contains(why)),
            "{what} should be dead-lettered for {why:?}: {reasons:#?}"
        );
    }
    assert!(
        server
            .entries(dlq)
            .iter()
            .all(|e| e.fields.get_str("_dlq_deliveries") == Some("2"))
    );

    // What the sandbox let through: nothing. (The flood reports "done" — or, on a machine so loaded
    // that it overran its 300 ms deadline both times, it was dead-lettered for that: contained too.)
    let flood_overran = || {
        server.entries(dlq).iter().any(|e| {
            e.fields.get_str("do") == Some("logflood")
                && e.fields
                    .get_str("_dlq_reason")
                    .is_some_and(|r| r.contains("deadline of 300ms"))
        })
    };
    wait_for("the reports", Duration::from_secs(30), || {
        let n = reports(&server).len();
        (n >= 3 || (n >= 2 && flood_overran())).then_some(())
    });
    let reports = reports(&server);
    let detail = |what: &str| {
        reports
            .iter()
            .find(|r| r.0 == what)
            .map(|r| r.1.clone())
            .unwrap_or_default()
    };
    assert!(detail("publish-denied").contains("Denied"), "{reports:?}");
    let snoop = detail("snoop");
    assert!(
        snoop.contains("file=Err") && snoop.contains("env=0") && snoop.contains("socket=Err"),
        "{snoop}"
    );
    if !flood_overran() {
        assert_eq!(detail("logflood"), "done");
    }
    // (The stream exists: the daemon's control group created it. It must be empty.)
    assert_eq!(
        server.xlen("nova:system:mcp:control"),
        0,
        "nothing written where the handler may not write"
    );

    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    // The cap is 50 lines per call. On a loaded machine the flooding call may overrun its 300 ms
    // deadline and be tried again (max_deliveries = 2), each try logging up to the cap; uncapped, the
    // flood is 10,000 lines a try.
    assert!(
        d.count_log("guest log lines over the per-message limit were dropped") >= 1,
        "the flood hit the cap"
    );
    let floods = d.count_log("flood ");
    assert!(floods <= 2 * 55, "the log flood was capped: {floods} lines");
    assert!(
        d.logs().iter().all(|l| !l.contains('\u{1b}')),
        "guest text is escaped"
    );
    assert_eq!(
        server.pending(hostile_stream, "g") + server.pending(echo_stream, "g"),
        0
    );
}

#[test]
fn routes_match_stream_patterns_and_fields_first_match_wins() {
    let server = RedisServer::start();
    let cache = tempfile::tempdir().unwrap();
    let routes = r#"
[[routes]]
stream = "nova:task:*:inbox"
equals = { type = "ping" }
handler = "echo"

[[routes]]
stream = "nova:task:*:inbox"
exists = ["archive"]
forward = "nova:task:routes:archive"

[[routes]]
stream = "nova:task:*:inbox"
absent = ["keep"]
drop = true
"#;
    let toml = daemon_toml(
        &server.url(),
        &[
            wasm_section(cache.path(), 1),
            handler(
                "echo",
                "echo",
                &format!("roles = [\"task_write\"]\nconfig = {{ reply_to = \"{ECHOED}\" }}"),
            ),
            routes.to_string(),
            consumer("nova:task:a:inbox", None, "unmatched = \"dead-letter\""),
            consumer("nova:task:b:inbox", None, "unmatched = \"ack\""),
        ]
        .concat(),
    );
    let mut d = Daemon::running(&toml, &[]);
    server.xadd("nova:task:a:inbox", &[("type", "ping"), ("archive", "1")]); // first route wins: echo only
    server.xadd("nova:task:a:inbox", &[("archive", "1"), ("keep", "1")]); // forwarded
    server.xadd("nova:task:a:inbox", &[("x", "1")]); // no `keep`: dropped
    server.xadd("nova:task:a:inbox", &[("keep", "1")]); // nothing matches: dead-lettered
    server.xadd("nova:task:b:inbox", &[("keep", "1")]); // nothing matches: acked
    wait_for("everything settled", Duration::from_secs(30), || {
        (server.pending("nova:task:a:inbox", "g") == 0
            && server.pending("nova:task:b:inbox", "g") == 0
            && server.xlen("nova:task:a:inbox-dlq") == 1)
            .then_some(())
    });
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    assert_eq!(server.xlen(ECHOED), 1);
    let archived = server.entries("nova:task:routes:archive");
    assert_eq!(archived.len(), 1);
    assert_eq!(archived[0].fields.get_str("keep"), Some("1"));
    let dead = server.entries("nova:task:a:inbox-dlq");
    assert!(
        dead[0]
            .fields
            .get_str("_dlq_reason")
            .unwrap()
            .contains("unmatched")
    );
    assert_eq!(server.xlen("nova:task:b:inbox-dlq"), 0);
}

#[test]
fn routes_that_require_a_signed_sender_verify_it_once_and_hide_it() {
    let server = RedisServer::start();
    let cache = tempfile::tempdir().unwrap();
    let stream = "nova:task:wasm:signed";
    let toml = daemon_toml(
        &server.url(),
        &[
            wasm_section(cache.path(), 1),
            handler(
                "whoami",
                "hostile",
                &format!("roles = [\"task_write\"]\nrequire_sender_token = true\nconfig = {{ report = \"{REPORT}\" }}"),
            ),
            consumer(stream, Some("whoami"), "max_deliveries = 1"),
        ]
        .concat(),
    );
    let keys = settings(&server.url()).auth.keys;
    let agent = Identity {
        subject: "agent-7".into(),
        roles: Roles::parse(&["task_read"]).unwrap(),
    };
    let sign = |fields: &[(&str, &str)]| {
        let f: Fields = fields.iter().copied().collect();
        keys.sign_message(&agent, stream, &f, Duration::from_secs(60))
            .unwrap()
    };
    let (bearer, _) = keys
        .issue("agent-7", &agent.roles, Duration::from_secs(60))
        .unwrap();
    let good = sign(&[("do", "whoami")]);
    let mut d = Daemon::running(&toml, &[]);
    server.xadd(stream, &[("do", "whoami"), ("_sig", &good)]);
    wait_for("the report", Duration::from_secs(30), || {
        (server.xlen(REPORT) == 1).then_some(())
    });
    // A verbatim copy of the signed message, its signature on other content, a bare bearer token,
    // nothing at all, and garbage.
    server.xadd(stream, &[("do", "whoami"), ("_sig", &good)]);
    server.xadd(stream, &[("do", "count"), ("_sig", &good)]);
    server.xadd(stream, &[("do", "whoami"), ("_token", &bearer)]);
    server.xadd(stream, &[("do", "whoami")]);
    server.xadd(stream, &[("do", "whoami"), ("_sig", "not.a.jwt")]);
    // A signed message whose handler traps: its dead letter names the verified sender, beside
    // whatever _source (here a forged one) the publisher wrote.
    let trapped_fields = [
        ("marker", "1"),
        ("_source", "admin@forged"),
        ("_dlq_sender", "admin"),
    ];
    let trapped_sig = sign(&trapped_fields);
    let mut with_sig = trapped_fields.to_vec();
    with_sig.push(("_sig", trapped_sig.as_str()));
    let trapped = server.xadd(stream, &with_sig);
    let dlq = format!("{stream}-dlq");
    wait_for("6 dead letters", Duration::from_secs(30), || {
        (server.xlen(&dlq) == 6).then_some(())
    });
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    assert_eq!(
        reports(&server),
        [(
            "whoami".to_string(),
            "agent-7 task_read; token visible: false".to_string()
        )],
        "the copy's report was never written"
    );
    let (signed, unsigned): (Vec<_>, Vec<_>) = server.entries(&dlq).into_iter().partition(|e| {
        e.fields.get_str("_dlq_source") == Some(format!("{stream}/{trapped}").as_str())
    });
    assert_eq!(signed[0].fields.get_str("_dlq_sender"), Some("agent-7"));
    assert_eq!(signed[0].fields.get_str("_source"), Some("admin@forged"));
    for e in &unsigned {
        // The replayed copy carries a genuine signature; the others none that verified.
        let replayed = e
            .fields
            .get_str("_dlq_reason")
            .unwrap()
            .starts_with("replayed");
        let sender = e.fields.get_str("_dlq_sender");
        assert_eq!(sender, replayed.then_some("agent-7"), "{e:?}");
    }
    let reasons: Vec<String> = unsigned
        .iter()
        .map(|e| e.fields.get_str("_dlq_reason").unwrap().to_owned())
        .collect();
    let count = |what: &str| reasons.iter().filter(|r| r.contains(what)).count();
    assert_eq!(count("replayed"), 1, "{reasons:?}");
    assert_eq!(count("not the ones signed"), 1, "{reasons:?}");
    assert_eq!(count("bare _token"), 1, "{reasons:?}");
    assert_eq!(count("there is none"), 1, "{reasons:?}");
    assert_eq!(count("malformed"), 1, "{reasons:?}");
    assert!(
        server
            .entries(&dlq)
            .iter()
            .all(|e| e.fields.get("_token").is_none() && e.fields.get("_sig").is_none()),
        "dead letters never copy a credential"
    );
}

/// A `_token` on a route that does not require one reaches no handler and no forward: whoever reads
/// the handler's input or the forward's stream never holds the sender's credential.
#[test]
fn tokens_are_stripped_on_every_route() {
    let server = RedisServer::start();
    let cache = tempfile::tempdir().unwrap();
    let open = "nova:task:wasm:open";
    let relay = "nova:task:wasm:relay";
    let toml = daemon_toml(
        &server.url(),
        &[
            wasm_section(cache.path(), 1),
            handler(
                "whoami",
                "hostile",
                &format!("roles = [\"task_write\"]\nconfig = {{ report = \"{REPORT}\" }}"),
            ),
            consumer(open, Some("whoami"), ""),
            consumer(
                relay,
                Some("forward"),
                "forward_to = \"nova:task:wasm:relayed\"",
            ),
        ]
        .concat(),
    );
    let mut d = Daemon::running(&toml, &[]);
    server.xadd(
        open,
        &[("do", "whoami"), ("_token", "eyJhbGciOi.bearer.secret")],
    );
    server.xadd(relay, &[("n", "1"), ("_token", "eyJhbGciOi.bearer.secret")]);
    let relayed = wait_for("the forward", Duration::from_secs(30), || {
        server.entries("nova:task:wasm:relayed").pop()
    });
    wait_for("the report", Duration::from_secs(30), || {
        (server.xlen(REPORT) == 1).then_some(())
    });
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    assert_eq!(relayed.fields.get_str("n"), Some("1"));
    assert_eq!(relayed.fields.get("_token"), None, "{:?}", relayed.fields);
    let (what, detail) = reports(&server).pop().unwrap();
    assert_eq!(what, "whoami");
    assert_eq!(detail, "nobody; token visible: false");
}

#[test]
fn reused_instances_keep_state_until_retired_fresh_ones_never_do() {
    let server = RedisServer::start();
    let cache = tempfile::tempdir().unwrap();
    let stream = "nova:task:wasm:count";
    let fresh_stream = "nova:task:wasm:countfresh";
    let toml = daemon_toml(
        &server.url(),
        &[
            wasm_section(cache.path(), 1),
            handler("warm", "hostile", &format!("roles = [\"task_write\"]\ninstance = \"reuse\"\nreuse_limit = 3\nconfig = {{ report = \"{REPORT}\" }}")),
            handler("cold", "hostile", &format!("roles = [\"task_write\"]\nconfig = {{ report = \"{REPORT}\" }}")),
            consumer(stream, Some("warm"), "in_flight = 1\nmax_deliveries = 1"),
            consumer(fresh_stream, Some("cold"), "in_flight = 1"),
        ]
        .concat(),
    );
    let mut d = Daemon::running(&toml, &[]);
    for fields in [
        &[("do", "count")][..],
        &[("do", "count")],
        &[("do", "count")],
        &[("do", "count")],
        &[("marker", "1")],
        &[("do", "count")],
    ] {
        server.xadd(stream, fields);
    }
    wait_for("5 counts", Duration::from_secs(10), || {
        (server.xlen(REPORT) >= 5).then_some(())
    });
    let counts: Vec<String> = reports(&server).into_iter().map(|r| r.1).collect();
    // 3 calls, retired; a new instance counts again; a trap retires it too.
    assert_eq!(counts, ["1", "2", "3", "1", "1"]);
    for _ in 0..3 {
        server.xadd(fresh_stream, &[("do", "count")]);
    }
    wait_for("8 counts", Duration::from_secs(10), || {
        (server.xlen(REPORT) >= 8).then_some(())
    });
    let counts: Vec<String> = reports(&server).into_iter().map(|r| r.1).skip(5).collect();
    assert_eq!(
        counts,
        ["1", "1", "1"],
        "a fresh instance per message keeps nothing"
    );
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

fn check(config: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, config).unwrap();
    let out = Command::new(bin())
        .arg("check")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn check_compiles_every_handler_caches_it_and_refuses_foreign_imports() {
    let cache = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let base = |handler_toml: &str| {
        daemon_toml(
            crate::util::UNREACHABLE,
            &[wasm_section(cache.path(), 1), handler_toml.to_string()].concat(),
        )
    };
    let (code, out) = check(&base(&handler("echo", "echo", "roles = [\"task_write\"]")));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("handler: echo"), "{out}");
    let cached: Vec<_> = std::fs::read_dir(cache.path()).unwrap().flatten().collect();
    assert_eq!(cached.len(), 1, "one compiled artifact in the cache");
    // A damaged cache entry is recompiled, not trusted.
    std::fs::write(cached[0].path(), b"garbage").unwrap();
    let (code, out) = check(&base(&handler("echo", "echo", "roles = [\"task_write\"]")));
    assert_eq!(code, 0, "{out}");
    // So is another component's artifact put in its place (valid, but compiled from something
    // else: running it would run other code), and one that others may change.
    {
        use std::os::unix::fs::PermissionsExt as _;
        let (code, _) = check(&base(&handler(
            "hostile",
            "hostile",
            "roles = [\"task_write\"]",
        )));
        assert_eq!(code, 0);
        let mut files: Vec<_> = std::fs::read_dir(cache.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap());
        let (echo_artifact, hostile_artifact) = (files[0].clone(), files[1].clone());
        std::fs::copy(&hostile_artifact, &echo_artifact).unwrap();
        let (code, out) = check(&base(&handler("echo", "echo", "roles = [\"task_write\"]")));
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("compiled from another component"), "{out}");
        std::fs::set_permissions(&echo_artifact, std::fs::Permissions::from_mode(0o666)).unwrap();
        let (code, out) = check(&base(&handler("echo", "echo", "roles = [\"task_write\"]")));
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("others may read or change it"), "{out}");
        std::fs::set_permissions(cache.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let (code, out) = check(&base(&handler("echo", "echo", "roles = [\"task_write\"]")));
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("others may write into it"), "{out}");
    }

    let evil = files.path().join("evil.wasm");
    let text =
        r#"(component (import "evil:net/socket@0.1.0" (instance (export "connect" (func)))))"#;
    std::fs::write(&evil, wat::parse_str(text).unwrap()).unwrap();
    let entry = format!(
        "[[handlers]]\nname = \"evil\"\nfile = \"{}\"\n",
        evil.display()
    );
    let (code, out) = check(&base(&entry));
    assert_eq!(code, 78, "{out}");
    assert!(
        out.contains("handlers[0].file") && out.contains("evil:net/socket"),
        "{out}"
    );

    // Errors that say what to do: a core module, another version of the handler WIT. (wasi:http, which
    // componentize-js adds by default, links: requests are refused unless granted, tests/it/outbound.rs.)
    for (name, text, says) in [
        ("core", "(module)", "build for wasm32-wasip2"),
        (
            "newer",
            r#"(component (import "redstream:handler/host@0.2.0" (instance)))"#,
            "built against redstream:handler@0.2.0",
        ),
    ] {
        let file = files.path().join(format!("{name}.wasm"));
        std::fs::write(&file, wat::parse_str(text).unwrap()).unwrap();
        let entry = format!(
            "[[handlers]]\nname = \"{name}\"\nfile = \"{}\"\n",
            file.display()
        );
        let (code, out) = check(&base(&entry));
        assert_eq!(code, 78, "{out}");
        assert!(out.contains(says), "{name}: {out}");
    }
    let text_file = files.path().join("text.wasm");
    std::fs::write(&text_file, "hello").unwrap();
    let entry = format!(
        "[[handlers]]\nname = \"t\"\nfile = \"{}\"\n",
        text_file.display()
    );
    let (code, out) = check(&base(&entry));
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("not a WebAssembly file"), "{out}");

    let junk = files.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm not really").unwrap();
    let (code, out) = check(&base(&format!(
        "[[handlers]]\nname = \"junk\"\nfile = \"{}\"\n",
        junk.display()
    )));
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("not a valid WebAssembly component"), "{out}");

    // Roles beyond the daemon's, a missing file, an unknown route target: config errors too.
    let toml = base(&handler("echo", "echo", "roles = [\"admin\"]")).replace(
        "roles = [\"admin\"]\n\n[redis]",
        "roles = [\"task_write\", \"task_read\"]\n\n[redis]",
    ) + "[[handlers]]\nname = \"gone\"\nfile = \"/nonexistent.wasm\"\n[[routes]]\nstream = \"nova:task:x:y\"\nhandler = \"nobody\"\n";
    let (code, out) = check(&toml);
    assert_eq!(code, 78, "{out}");
    for path in ["handlers[0].roles", "handlers[1].file", "routes[0].handler"] {
        assert!(out.contains(path), "{path} missing: {out}");
    }
}

#[test]
fn handler_run_and_bench_work_without_redis() {
    let echo = component("echo");
    let out = Command::new(bin())
        .args(["handler", "run"])
        .arg(&echo)
        .args([
            "--message",
            r#"{"_reply_to":"nova:task:demo:replies","text":"hi","obj":{"a":1}}"#,
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outcome"], "success");
    assert_eq!(v["replies"][0]["stream"], "nova:task:demo:replies");
    assert_eq!(v["replies"][0]["fields"]["obj"]["a"], 1);

    let out = Command::new(bin())
        .args(["handler", "run"])
        .arg(component("hostile"))
        .args(["--message", r#"{"do":"loop"}"#, "--timeout", "100ms"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outcome"], "retry");
    assert!(v["reason"].as_str().unwrap().contains("deadline"), "{v}");

    // A publish the handler's roles refuse is reported with the call's output, not as a log line in
    // the middle of it.
    let out = Command::new(bin())
        .args(["handler", "run"])
        .arg(component("hostile"))
        .args([
            "--message",
            r#"{"do":"publish-denied"}"#,
            "--role",
            "task_write",
            "--set",
            "report=nova:task:demo:report",
        ])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outcome"], "success", "{v}");
    assert!(
        v["output"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!({"at": "host", "text": "1 publish(es) denied"})),
        "{v}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A panicking guest: its panic message and its log lines are in the outcome, without RUST_LOG.
    let out = Command::new(bin())
        .args(["handler", "run"])
        .arg(component("hostile"))
        .args(["--message", r#"{"do":"panic"}"#])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outcome"], "retry");
    let output = v["output"].as_array().expect("output");
    assert_eq!(
        output[0],
        serde_json::json!({"at": "log:warn", "text": "about to give up"})
    );
    assert!(
        output
            .iter()
            .any(|o| o["at"] == "stderr"
                && o["text"].as_str().unwrap().contains("the guest gave up on")),
        "{v}"
    );

    let out = Command::new(bin())
        .args(["handler", "bench"])
        .arg(&echo)
        .args([
            "--message",
            r#"{"_reply_to":"nova:task:demo:replies"}"#,
            "--n",
            "200",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("fresh") && text.contains("reused"), "{text}");

    // The first call compiles the component and says so on stderr; the next finds it in the cache.
    let cache = tempfile::tempdir().unwrap();
    let run_cached = || {
        Command::new(bin())
            .args(["handler", "run"])
            .arg(&echo)
            .args(["--message", r#"{"_reply_to":"nova:task:demo:replies"}"#])
            .env("CACHE_DIRECTORY", cache.path())
            .output()
            .unwrap()
    };
    let first = run_cached();
    let said = String::from_utf8_lossy(&first.stderr);
    assert_eq!(first.status.code(), Some(0), "{said}");
    assert!(
        said.contains(&format!("compiling {} (", echo.display())) && said.contains("compiled "),
        "{said}"
    );
    let again = run_cached();
    assert!(
        !String::from_utf8_lossy(&again.stderr).contains("compiling"),
        "cached"
    );

    // handler test: a case names the reply fields that matter (others are ignored) unless it asks
    // for an exact match; a failing case shows only what the replies hold.
    let cases = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        cases.path(),
        concat!(
            r#"{"name":"subset","message":{"_reply_to":"nova:task:demo:replies","n":"1"},"expect":{"outcome":"success","replies":[{"stream":"nova:task:demo:replies","fields":{"n":"1"}}]}}"#,
            "\n",
            r#"{"name":"exact","message":{"_reply_to":"nova:task:demo:replies","n":"1"},"expect":{"outcome":"success","exact":true,"replies":[{"stream":"nova:task:demo:replies","fields":{"n":"1"}}]}}"#,
            "\n"
        ),
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["handler", "test"])
        .arg(&echo)
        .arg("--cases")
        .arg(cases.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("ok      subset")
            && text.contains("FAILED  exact")
            && text.contains("\"in_reply_to\"")
            && !text.contains("binary")
            && text.contains("1 of 2 cases passed"),
        "{text}"
    );

    // A message the handler rejects is measured too (a rejection is an answer), and said so.
    let out = Command::new(bin())
        .args(["handler", "bench"])
        .arg(&echo)
        .args(["--message", r#"{"n":"1"}"#, "--n", "50"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("rejects this message: no _reply_to") && text.contains("reused"),
        "{text}"
    );
}
