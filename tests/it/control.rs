//! The heartbeat stream and the signed control stream of the origin's conventions.

use std::time::Duration;

use redstream::auth::{Identity, Roles};
use redstream::model::envelope::Fields;

use crate::util::{Daemon, RedisServer, daemon_toml, settings, wait_for};

const HEARTBEAT: &str = "nova:system:mcp:heartbeat";
const CONTROL: &str = "nova:system:mcp:control";
const CONTROL_DLQ: &str = "nova:system:mcp:control-dlq";

fn toml(server: &RedisServer, interval: &str) -> String {
    daemon_toml(
        &server.url(),
        &format!(
            "[heartbeat]\ninterval = \"{interval}\"\nmax_len = 10\n\
             [[consumers]]\nstream = \"nova:task:control:in\"\ngroup = \"g\"\nhandler = \"drop\"\n"
        ),
    )
}

fn token(server: &RedisServer, roles: &[&str]) -> String {
    let keys = settings(&server.url()).auth.keys;
    keys.issue(
        "operator",
        &Roles::parse(roles).unwrap(),
        Duration::from_secs(60),
    )
    .unwrap()
    .0
}

/// The first heartbeat already counts the loops: the heartbeat starts once they run, so
/// `redstream status` never shows a fresh daemon with no loops and no groups.
#[test]
fn the_first_heartbeat_counts_the_loops() {
    let server = RedisServer::start();
    // Several groups: their creation takes Redis round trips a heartbeat started first would beat.
    let more: String = (0..4)
        .map(|i| {
            format!(
                "[[consumers]]\nstream = \"nova:task:control:more{i}\"\ngroup = \"g\"\nhandler = \"drop\"\n"
            )
        })
        .collect();
    let mut d = Daemon::running(&format!("{}{more}", toml(&server, "1h")), &[]);
    let first = wait_for("the first heartbeat", Duration::from_secs(10), || {
        server.entries(HEARTBEAT).into_iter().next()
    });
    let groups = first.fields.get_str("groups").unwrap_or_default();
    assert_eq!(first.fields.get_str("consumers"), Some("5"), "{groups}");
    assert!(groups.contains("nova:task:control:more3"), "{groups}");
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

#[test]
fn heartbeats_are_published_and_trimmed() {
    let server = RedisServer::start();
    let mut d = Daemon::running(&toml(&server, "20ms"), &[]);
    wait_for("many heartbeats", Duration::from_secs(20), || {
        let total: i64 = redis::cmd("XINFO")
            .arg(&["STREAM", HEARTBEAT])
            .query::<redis::Value>(&mut server.conn())
            .ok()
            .and_then(|v| {
                let mut p = redstream::client::decode::pairs(v).ok()?;
                redstream::client::decode::int(&redstream::client::decode::take(
                    &mut p,
                    "entries-added",
                ))
            })?;
        (total >= 250).then_some(())
    });
    let beats = server.entries(HEARTBEAT);
    assert!(
        beats.len() < 250,
        "MAXLEN ~ trims the stream: {} entries",
        beats.len()
    );
    let beat = beats.last().unwrap();
    for field in [
        "server_id",
        "timestamp",
        "status",
        "memory_usage",
        "uptime",
        "processed",
        "dead_lettered",
    ] {
        assert!(beat.fields.get(field).is_some(), "heartbeat lacks {field}");
    }
    assert!(
        beat.fields
            .get_str("server_id")
            .unwrap()
            .starts_with("test-daemon@")
    );
    assert_eq!(beat.fields.get_str("status"), Some("healthy"));
    assert!(
        beat.fields
            .get_str("memory_usage")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 1 << 20
    );
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    let beats = server.entries(HEARTBEAT);
    let statuses: Vec<&str> = beats
        .iter()
        .rev()
        .take(2)
        .map(|b| b.fields.get_str("status").unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["stopped", "stopping"],
        "a beat when the drain begins, a last one once drained"
    );
}

/// The test EdDSA private key, copied into `dir` with the owner-only mode a private key must have.
fn private_key_in(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let private = dir.join("ed25519.key");
    std::fs::copy(crate::util::fixture("keys/ed25519.key"), &private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
    private
}

/// `fields` with a signature (`_sig`) made for the control stream as `operator` with `roles`.
fn signed(server: &RedisServer, roles: &[&str], fields: &[(&str, &str)]) -> Vec<(String, String)> {
    let keys = settings(&server.url()).auth.keys;
    let identity = Identity {
        subject: "operator".into(),
        roles: Roles::parse(roles).unwrap(),
    };
    let f: Fields = fields.iter().copied().collect();
    let sig = keys
        .sign_message(&identity, CONTROL, &f, Duration::from_secs(60))
        .unwrap();
    let mut out: Vec<(String, String)> = fields
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    out.push(("_sig".into(), sig));
    out
}

fn xadd(server: &RedisServer, fields: &[(String, String)]) -> String {
    let pairs: Vec<(&str, &str)> = fields
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    server.xadd(CONTROL, &pairs)
}

/// Control commands take effect only signed by a system_write holder, for their own content and
/// target, once: an unsigned one, a bare bearer token, a signature copied onto another command, one
/// for another daemon, and a verbatim copy of one that already ran — even after the daemon restarted
/// — are never obeyed.
#[test]
fn signed_control_commands_are_obeyed_once_and_nothing_else_is() {
    let server = RedisServer::start();
    let mut d = Daemon::running(&toml(&server, "1h"), &[]);
    let operator = ["system_write"];
    let status = signed(
        &server,
        &operator,
        &[
            ("type", "status_request"),
            ("target", "all"),
            ("request_id", "r-42"),
        ],
    );

    // Unsigned, bearer-token, under-privileged and copied-signature commands are never obeyed.
    server.xadd(CONTROL, &[("type", "shutdown"), ("target", "all")]);
    server.xadd(
        CONTROL,
        &[
            ("type", "shutdown"),
            ("target", "all"),
            ("_token", &token(&server, &operator)),
        ],
    );
    xadd(
        &server,
        &signed(
            &server,
            &["task_write"],
            &[("type", "shutdown"), ("target", "all")],
        ),
    );
    let mut copied = status.clone();
    copied[0].1 = "shutdown".into();
    xadd(&server, &copied);
    let reasons = wait_for("4 dead letters", Duration::from_secs(10), || {
        let r: Vec<String> = server
            .entries(CONTROL_DLQ)
            .iter()
            .map(|e| e.fields.get_str("_dlq_reason").unwrap().to_owned())
            .collect();
        (r.len() == 4).then_some(r)
    });
    assert!(reasons[0].starts_with("unauthenticated"), "{reasons:?}");
    assert!(reasons[1].contains("bare _token"), "{reasons:?}");
    assert!(reasons[2].starts_with("unauthorized"), "{reasons:?}");
    assert!(reasons[3].contains("not the ones signed"), "{reasons:?}");
    assert!(
        server
            .entries(CONTROL_DLQ)
            .iter()
            .all(|e| e.fields.get("_sig").is_none() && e.fields.get("_token").is_none()),
        "no credential is copied into a dead letter"
    );

    // status_request is answered on the heartbeat stream, once: its copy is refused.
    xadd(&server, &status);
    let reply = wait_for("a status reply", Duration::from_secs(10), || {
        server
            .entries(HEARTBEAT)
            .into_iter()
            .find(|e| e.fields.get_str("request_id") == Some("r-42"))
    });
    assert_eq!(reply.fields.get_str("is_response"), Some("true"));
    assert_eq!(reply.fields.get_str("status"), Some("healthy"));
    xadd(&server, &status);
    wait_for("the copy dead-lettered", Duration::from_secs(10), || {
        (server.xlen(CONTROL_DLQ) == 5).then_some(())
    });
    let last = server.entries(CONTROL_DLQ).pop().unwrap();
    assert!(
        last.fields
            .get_str("_dlq_reason")
            .unwrap()
            .starts_with("replayed")
    );

    // A command for another daemon is not this one's.
    let elsewhere = signed(
        &server,
        &operator,
        &[("type", "shutdown"), ("target", "another-host")],
    );
    xadd(&server, &elsewhere);
    // reload_config (sent with the CLI) acts like SIGHUP.
    let cli = |args: &[&str]| {
        std::process::Command::new(crate::util::bin())
            .args(args)
            .arg("--config")
            .arg(d.config_path())
            .env_remove("REDSTREAM_TOKEN")
            .output()
            .unwrap()
    };
    let sent = cli(&["control", "reload_config"]);
    assert!(sent.status.success(), "{sent:?}");
    assert!(
        d.wait_log("reloaded the config", Duration::from_secs(10)),
        "{}",
        d.logs().join("\n")
    );
    assert_eq!(
        d.wait_exit(Duration::from_millis(300)),
        None,
        "the other daemon's shutdown was not ours"
    );

    // shutdown drains and exits 0 ...
    let shutdown = signed(
        &server,
        &operator,
        &[("type", "shutdown"), ("target", "all")],
    );
    xadd(&server, &shutdown);
    assert_eq!(
        d.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        d.logs().join("\n")
    );
    // ... and a copy of it, sent to the restarted daemon, is refused.
    let mut d = Daemon::running(&toml(&server, "1h"), &[]);
    xadd(&server, &shutdown);
    wait_for(
        "the replayed shutdown dead-lettered",
        Duration::from_secs(10),
        || (server.xlen(CONTROL_DLQ) == 6).then_some(()),
    );
    let last = server.entries(CONTROL_DLQ).pop().unwrap();
    assert!(
        last.fields
            .get_str("_dlq_reason")
            .unwrap()
            .starts_with("replayed"),
        "{last:?}"
    );
    assert_eq!(
        d.wait_exit(Duration::from_millis(500)),
        None,
        "still running"
    );
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// The daemon's own token: a configured one that is about to lapse turns the heartbeat `degraded`
/// with the reason; a self-issued one is renewed before it lapses, and the daemon stays healthy.
#[test]
fn a_lapsing_identity_token_degrades_the_daemon_and_a_self_issued_one_is_renewed() {
    let server = RedisServer::start();
    let keys = settings(&server.url()).auth.keys;
    let (given, _) = keys
        .issue(
            "test-daemon",
            &Roles::parse(&["admin"]).unwrap(),
            Duration::from_secs(8),
        )
        .unwrap();
    let port = crate::util::redis_server::free_port();
    let with_token = toml(&server, "200ms")
        .replace("roles = [\"admin\"]\n", &format!("token = \"{given}\"\n"))
        + &format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    assert!(with_token.contains("token = "), "{with_token}");
    let mut d = Daemon::running(&with_token, &[]);
    let healthy = crate::metrics::get(port, "/metrics").1;
    assert_eq!(
        crate::metrics::sample(&healthy, "redstream_degraded", &[]),
        0.0
    );
    let beat = wait_for("a degraded heartbeat", Duration::from_secs(15), || {
        server
            .entries(HEARTBEAT)
            .into_iter()
            .find(|e| e.fields.get_str("status") == Some("degraded"))
    });
    let reasons = beat.fields.get_str("degraded_reasons").unwrap_or_default();
    assert!(
        reasons.contains("identity token") && reasons.contains("rotate identity.token"),
        "{reasons}"
    );
    assert!(d.wait_log("about to lapse", Duration::from_secs(1)));
    // Alerting sees it too (contrib/prometheus/alerts.yml, RedStreamDegraded).
    wait_for("redstream_degraded 1", Duration::from_secs(5), || {
        let text = crate::metrics::get(port, "/metrics").1;
        (crate::metrics::sample(&text, "redstream_degraded", &[]) == 1.0).then_some(())
    });
    assert_eq!(d.stop(Duration::from_secs(10)), 0);

    // Self-issued with a 4 s lifetime: renewed after about 3.2 s, and never degraded.
    let server = RedisServer::start();
    let self_issued = toml(&server, "200ms").replace(
        "[auth]\n",
        "[auth]\ntoken_ttl = \"4s\"\nmax_token_ttl = \"4s\"\n",
    );
    let mut d = Daemon::running(&self_issued, &[]);
    assert!(
        d.wait_log(
            "renewed the daemon's identity token",
            Duration::from_secs(15)
        ),
        "{}",
        d.logs().join("\n")
    );
    wait_for(
        "heartbeats after the renewal",
        Duration::from_secs(5),
        || (server.xlen(HEARTBEAT) >= 3).then_some(()),
    );
    assert!(
        server
            .entries(HEARTBEAT)
            .iter()
            .all(|e| e.fields.get_str("status") == Some("healthy")),
        "a renewed token never degrades the daemon"
    );
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// An operator's host holds verification keys only: `redstream token issue` gets its token from the
/// daemon's credential exchange (within the API key's roles), and `redstream control` gets its
/// signature there — as the token's identity, only for streams it may publish to.
#[test]
fn an_operator_without_the_signing_key_gets_tokens_and_signatures_from_the_exchange() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let private = private_key_in(dir.path());
    let public = crate::util::fixture("keys/ed25519.pub");
    let socket = dir.path().join("auth.sock");
    let common = |keys: &str, extra: &str| {
        format!(
            "[identity]\nname = \"test-daemon\"\nroles = [\"admin\"]\n\
             [redis]\nurl = \"{}\"\n\
             [auth]\nendpoint = \"{}\"\n{extra}\n\
             [[auth.keys]]\nid = \"e\"\nalgorithm = \"EdDSA\"\npublic_key = {{ file = \"{}\" }}\n{keys}\n\
             [[auth.api_keys]]\nname = \"ops\"\nhash = \"sha256:21f346b6024a20bef3c9fd4ab56bdfebbf693d669978c8c8a74567801cae9028\"\n\
             identity = \"alice@ops\"\nroles = [\"system_write\", \"task_write\"]\n",
            server.url(),
            socket.display(),
            public.display(),
        )
    };
    let daemon = common(
        &format!("private_key = {{ file = \"{}\" }}", private.display()),
        "signing_key = \"e\"",
    ) + "[daemon]\ndrain_timeout = \"10s\"\n[[consumers]]\nstream = \"nova:task:control:in\"\ngroup = \"g\"\nhandler = \"drop\"\n";
    // The operator's config: the same verification key, no private key, no identity of its own.
    let operator = common("", "").replace(
        "[identity]\nname = \"test-daemon\"\nroles = [\"admin\"]\n",
        "",
    );
    let operator_file = dir.path().join("operator.toml");
    std::fs::write(&operator_file, &operator).unwrap();
    let mut d = Daemon::running(&daemon, &[]);
    let cli = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(crate::util::bin());
        cmd.args(args)
            .arg("--config")
            .arg(&operator_file)
            .env_remove("REDSTREAM_TOKEN")
            .env_remove("REDSTREAM_API_KEY");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let api = [("REDSTREAM_API_KEY", "rsk_dev_demo_key")];
    // A role the API key does not hold is refused by the exchange, with its reason.
    let (code, _, err) = cli(&["token", "issue", "--role", "admin"], &api);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("may be issued"), "{err}");
    let (code, token, err) = cli(
        &["token", "issue", "--role", "system_write", "--ttl", "10m"],
        &api,
    );
    assert_eq!(code, Some(0), "{err}");
    let (code, claims, err) = cli(&["token", "verify", &token], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        claims.contains("alice@ops") && claims.contains("system_write"),
        "{claims}"
    );
    // A task-only token cannot get a control command signed.
    let (_, task_token, _) = cli(&["token", "issue", "--role", "task_write"], &api);
    let (code, _, err) = cli(
        &["control", "reload_config"],
        &[("REDSTREAM_TOKEN", &task_token)],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("system_write"), "{err}");
    // The system_write token can, and the daemon obeys it.
    let (code, _, err) = cli(
        &["control", "reload_config"],
        &[("REDSTREAM_TOKEN", &token)],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        d.wait_log("reloaded the config", Duration::from_secs(10)),
        "{}",
        d.logs().join("\n")
    );
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// `redstream status --config … [--json]` as an operator runs it.
fn status(config: &std::path::Path, json: bool) -> String {
    let mut cmd = std::process::Command::new(crate::util::bin());
    cmd.arg("status").arg("--config").arg(config);
    if json {
        cmd.arg("--json");
    }
    let out = cmd
        .env_remove("REDSTREAM_CONFIG")
        .output()
        .expect("run redstream status");
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn group<'a>(report: &'a serde_json::Value, stream: &str) -> &'a serde_json::Value {
    report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["stream"] == stream)
        .unwrap_or_else(|| panic!("no group for {stream} in {report}"))
}

/// A group `status` cannot read is shown with Redis's reason, not as a group that does not exist yet;
/// a stream not created yet still reads as "no such group yet".
#[test]
fn status_names_why_a_group_cannot_be_read() {
    let server = RedisServer::start();
    server.set_string("nova:task:status:text");
    let consumers = "[[consumers]]\nstream = \"nova:task:status:text\"\ngroup = \"g\"\n\
        handler = \"forward\"\nforward_to = \"nova:task:status:out\"\n\
        [[consumers]]\nstream = \"nova:task:status:later\"\ngroup = \"g\"\n\
        handler = \"forward\"\nforward_to = \"nova:task:status:out\"\n";
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("redstream.toml");
    std::fs::write(&config, daemon_toml(&server.url(), consumers)).unwrap();
    let r: serde_json::Value = serde_json::from_str(&status(&config, true)).unwrap();
    let text = group(&r, "nova:task:status:text");
    assert_eq!(text["exists"], false, "{r}");
    assert!(
        text["error"]
            .as_str()
            .unwrap_or_default()
            .contains("WRONGTYPE"),
        "{r}"
    );
    let later = group(&r, "nova:task:status:later");
    assert_eq!(
        (&later["exists"], &later["error"]),
        (&false.into(), &serde_json::Value::Null),
        "{r}"
    );
    let screen = status(&config, false);
    assert!(
        screen.contains("nova:task:status:text / g")
            && screen.contains("cannot read: ")
            && screen.contains("WRONGTYPE"),
        "{screen}"
    );
    assert!(
        screen
            .lines()
            .any(|l| l.starts_with("nova:task:status:later / g")
                && l.contains("(no such group yet)")),
        "{screen}"
    );
    for line in screen.lines() {
        assert!(line.chars().count() <= 100, "too wide: {line}");
    }
}

#[test]
fn status_shows_groups_rates_handlers_and_every_daemon_seen() {
    let server = RedisServer::start();
    // A key of another type: every forward there is dead-lettered at once.
    server.set_string("nova:task:status:bad");
    let consumers = "[heartbeat]\ninterval = \"200ms\"\nmax_len = 200\n\
        [[consumers]]\nstream = \"nova:task:status:in\"\ngroup = \"g\"\nstart = \"0\"\n\
        handler = \"forward\"\nforward_to = \"nova:task:status:out\"\n\
        [[consumers]]\nstream = \"nova:task:status:doomed\"\ngroup = \"g\"\nstart = \"0\"\n\
        handler = \"forward\"\nforward_to = \"nova:task:status:bad\"\n";
    let toml = daemon_toml(&server.url(), consumers);
    let mut d = Daemon::running(&toml, &[]);
    // Heartbeats before the traffic, so the minute's window holds counters that moved.
    wait_for("two heartbeats", Duration::from_secs(10), || {
        (server.xlen("nova:system:mcp:heartbeat") >= 2).then_some(())
    });
    for i in 0..30 {
        server.xadd("nova:task:status:in", &[("n", &i.to_string())]);
    }
    for i in 0..3 {
        server.xadd("nova:task:status:doomed", &[("n", &i.to_string())]);
    }
    let report = wait_for(
        "status with the traffic's rates",
        Duration::from_secs(15),
        || {
            let r: serde_json::Value =
                serde_json::from_str(&status(&d.config_path(), true)).unwrap();
            let done = group(&r, "nova:task:status:in")["per_minute"]["processed"]
                .as_f64()
                .unwrap_or(0.0);
            let dead = group(&r, "nova:task:status:doomed")["per_minute"]["dead_lettered"]
                .as_f64()
                .unwrap_or(0.0);
            // The doomed messages are forward's failures: it decided them (its reply was refused).
            let failed = (r["handlers"].as_array())
                .and_then(|hs| hs.iter().find(|h| h["handler"] == "forward"))
                .and_then(|h| h["failed"].as_u64())
                .unwrap_or(0);
            (done > 0.0 && dead > 0.0 && failed >= 3).then_some(r)
        },
    );
    let good = group(&report, "nova:task:status:in");
    assert_eq!(good["pending"], 0, "{report}");
    assert_eq!(good["lag"], 0, "{report}");
    assert_eq!(good["consumers"].as_array().unwrap().len(), 1, "{report}");
    let forward = report["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["handler"] == "forward")
        .unwrap_or_else(|| panic!("forward's latency is reported: {report}"));
    assert!(forward["calls"].as_u64().unwrap() >= 33, "{report}");
    assert!(forward["p99_ms"].as_f64().is_some(), "{report}");
    let daemons = report["daemons"].as_array().unwrap();
    assert_eq!(daemons.len(), 1, "{report}");
    assert_eq!(daemons[0]["status"], "healthy", "{report}");

    // The screen: every group, handler and daemon, within 100 columns.
    let text = status(&d.config_path(), false);
    println!("{text}");
    for line in text.lines() {
        assert!(line.chars().count() <= 100, "too wide: {line}");
    }
    for needle in [
        "FAILED",
        "STREAM / GROUP",
        "nova:task:status:in / g",
        "nova:task:status:doomed / g",
        "forward",
        "healthy",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }

    // A second instance killed: missing once two intervals pass, whatever anyone writes in its name
    // (an unsigned beat claiming it is healthy, with a timestamp a year ahead); the first, stopped
    // cleanly: stopped.
    let mut other = Daemon::running(
        &toml.replace("[daemon]", "[daemon]\ninstance = \"other\""),
        &[],
    );
    let other_id = wait_for("two daemons seen", Duration::from_secs(10), || {
        let r: serde_json::Value = serde_json::from_str(&status(&d.config_path(), true)).unwrap();
        let ids: Vec<String> = r["daemons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["server_id"].as_str().unwrap().to_owned())
            .collect();
        (ids.len() == 2).then(|| ids.into_iter().find(|i| i.ends_with("#other")).unwrap())
    });
    let report: serde_json::Value = serde_json::from_str(&status(&d.config_path(), true)).unwrap();
    assert!(
        report["daemons"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["verified"] == true),
        "the daemons sign their heartbeats: {report}"
    );
    other.kill9();
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
    let year_ahead = (redstream::model::envelope::now_ms() + 365 * 86_400_000).to_string();
    let forged = [
        ("server_id", other_id.as_str()),
        ("timestamp", year_ahead.as_str()),
        ("status", "healthy"),
    ];
    server.xadd(HEARTBEAT, &forged);
    let r = wait_for("stopped and missing", Duration::from_secs(10), || {
        // Keep forging while waiting: the newest entry is always a forgery.
        server.xadd(HEARTBEAT, &forged);
        let r: serde_json::Value =
            serde_json::from_str(&status(&other.config_path(), true)).unwrap();
        let mut seen: Vec<String> = r["daemons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["status"].as_str().unwrap().to_owned())
            .collect();
        seen.sort();
        (seen == ["missing", "stopped"]).then_some(r)
    });
    println!("{r}");

    // The killed one started again: healthy, and one restart in the last hour.
    let mut again = Daemon::running(
        &toml.replace("[daemon]", "[daemon]\ninstance = \"other\""),
        &[],
    );
    wait_for("the restart counted", Duration::from_secs(10), || {
        let r: serde_json::Value =
            serde_json::from_str(&status(&again.config_path(), true)).unwrap();
        let row = r["daemons"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["server_id"] == other_id.as_str())?
            .clone();
        (row["status"] == "healthy" && row["restarts_1h"] == 1).then_some(())
    });
    assert!(status(&again.config_path(), false).contains("1/1h"));
    assert_eq!(again.stop(Duration::from_secs(10)), 0);
}

/// Redis restarted without its data under quiet streams read from `$`, and a producer writes before
/// the daemon is back (its reconnect delay is 3 s): nothing published after Redis came back is
/// skipped, no loop is restarted, the loss is counted and logged as an error naming the stream, and the
/// control loop — whose stream nobody writes — recovers too: a signed status_request is answered.
#[test]
fn redis_back_empty_skips_nothing_and_the_control_loop_recovers() {
    use crate::metrics::{get, sample};
    const IN: &str = "nova:task:control:in";
    const OUT: &str = "nova:task:control:out";
    let mut server = RedisServer::start();
    let port = crate::util::redis_server::free_port();
    let toml = daemon_toml(
        &server.url(),
        &format!(
            "[heartbeat]\ninterval = \"500ms\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\
             [[consumers]]\nstream = \"{IN}\"\ngroup = \"g\"\nstart = \"$\"\nblock = \"1s\"\n\
             handler = \"forward\"\nforward_to = \"{OUT}\"\n"
        ),
    );
    let env = [
        ("REDSTREAM_REDIS__RECONNECT_MIN_DELAY", "3s"),
        ("REDSTREAM_REDIS__RECONNECT_MAX_DELAY", "4s"),
    ];
    let mut d = Daemon::running(&toml, &env);
    server.xadd(IN, &[("n", "before")]);
    wait_for("the first reply", Duration::from_secs(10), || {
        (server.xlen(OUT) == 1).then_some(())
    });

    server.restart();
    let ids = server.xadd_backlog(IN, 100);
    let groups: Vec<redis::Value> = redis::cmd("XINFO")
        .arg(&["GROUPS", IN])
        .query(&mut server.conn())
        .unwrap();
    assert!(
        groups.is_empty(),
        "the producer must write before the daemon is back, or this test proves nothing"
    );
    let replies = wait_for("100 replies", Duration::from_secs(30), || {
        let r = server.entries(OUT);
        (r.len() >= 100).then_some(r)
    });
    let mut causes: Vec<String> = replies
        .iter()
        .map(|e| e.fields.get_str("_cause").unwrap().to_owned())
        .collect();
    causes.sort();
    let mut want: Vec<String> = ids.iter().map(|id| format!("{IN}/{id}")).collect();
    want.sort();
    assert_eq!(causes, want, "each message published after the loss, once");

    let (_, metrics) = get(port, "/metrics");
    assert!(
        sample(&metrics, "redstream_redis_data_loss_total", &[IN]) >= 1.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "redstream_errors_total",
            &["kind=\"loop_restart\""]
        ),
        0.0,
        "the loss is waited out, never by restarting a loop"
    );
    // Both loops got Redis back, and that was one outage (what the reconnect-storm alert counts).
    let metrics = wait_for("both loops reconnected", Duration::from_secs(15), || {
        let (_, m) = get(port, "/metrics");
        (sample(&m, "redstream_redis_reconnects_total", &[]) >= 2.0).then_some(m)
    });
    assert_eq!(
        sample(&metrics, "redstream_redis_outages_total", &[]),
        1.0,
        "{metrics}"
    );
    let line = d.logs().into_iter().find(|l| {
        l.contains("ERROR") && l.contains("Redis lost this stream's data") && l.contains(IN)
    });
    assert!(line.is_some(), "{}", d.logs().join("\n"));

    // The control loop is back: a signed command sent now is obeyed.
    let request = signed(
        &server,
        &["system_write"],
        &[
            ("type", "status_request"),
            ("target", "all"),
            ("request_id", "after-loss"),
        ],
    );
    xadd(&server, &request);
    wait_for("a status reply", Duration::from_secs(15), || {
        server
            .entries(HEARTBEAT)
            .into_iter()
            .find(|e| e.fields.get_str("request_id") == Some("after-loss"))
    });
    // And the daemon says healthy again once every loop reads again.
    wait_for("a healthy heartbeat", Duration::from_secs(15), || {
        let last = server.entries(HEARTBEAT).pop()?;
        (last.fields.get_str("status") == Some("healthy")).then_some(())
    });
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// Copies of a signed command sent after its `exp`, inside `auth.leeway` (where it is still accepted):
/// it is obeyed once, the copies are dead-lettered as replayed. (A use record written with an absolute
/// expiry at `exp` would be gone already, and every copy obeyed.)
#[test]
fn copies_sent_after_expiry_inside_the_leeway_are_refused() {
    let server = RedisServer::start();
    let mut d = Daemon::running(&toml(&server, "1h"), &[]);
    let keys = settings(&server.url()).auth.keys;
    let identity = Identity {
        subject: "operator".into(),
        roles: Roles::parse(&["system_write"]).unwrap(),
    };
    let fields: Vec<(&str, &str)> = vec![
        ("type", "status_request"),
        ("target", "all"),
        ("request_id", "late"),
    ];
    let f: Fields = fields.iter().copied().collect();
    let sig = keys
        .sign_message(&identity, CONTROL, &f, Duration::from_secs(1))
        .unwrap();
    let exp_ms = {
        use base64::Engine as _;
        let payload = sig.split('.').nth(1).unwrap();
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap();
        claims["exp"].as_u64().unwrap() * 1000
    };
    // Wait on the clock until the signature has been expired for two seconds (leeway 30 s).
    wait_for("the signature to expire", Duration::from_secs(10), || {
        (redstream::model::envelope::now_ms() > exp_ms + 2000).then_some(())
    });
    let mut signed: Vec<(String, String)> = fields
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    signed.push(("_sig".into(), sig));
    for _ in 0..4 {
        xadd(&server, &signed);
    }
    let reasons = wait_for(
        "three copies dead-lettered",
        Duration::from_secs(15),
        || {
            let r: Vec<String> = server
                .entries(CONTROL_DLQ)
                .iter()
                .map(|e| e.fields.get_str("_dlq_reason").unwrap_or("").to_owned())
                .collect();
            (r.len() >= 3).then_some(r)
        },
    );
    assert!(
        reasons.iter().all(|r| r.contains("replayed")),
        "{reasons:?}"
    );
    let answers = server
        .entries(HEARTBEAT)
        .iter()
        .filter(|e| e.fields.get_str("request_id") == Some("late"))
        .count();
    assert_eq!(answers, 1, "obeyed once");
    assert_eq!(server.xlen(CONTROL_DLQ), 3);
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// The credential exchange cannot be starved, nor flood the journal: 1,100 idle connections from a
/// local user while the daemon's open-file limit is 1,024 (hard), and Redis restarted meanwhile —
/// messages are still forwarded and a legitimate /token is answered; 3,000 requests with wrong API keys
/// are rate-limited, logged in one line per peer per interval, and no line repeats a key.
#[test]
fn the_exchange_cannot_be_starved_nor_flood_the_log() {
    let mut server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let private = private_key_in(dir.path());
    let socket = dir.path().join("auth.sock");
    let toml = format!(
        "[identity]\nname = \"test-daemon\"\nroles = [\"admin\"]\n\
         [redis]\nurl = \"{}\"\nreconnect_max_delay = \"500ms\"\n\
         [auth]\nendpoint = \"{}\"\nsigning_key = \"e\"\n\
         [[auth.keys]]\nid = \"e\"\nalgorithm = \"EdDSA\"\nprivate_key = {{ file = \"{}\" }}\n\
         public_key = {{ file = \"{}\" }}\n\
         [[auth.api_keys]]\nname = \"ops\"\nhash = \"sha256:21f346b6024a20bef3c9fd4ab56bdfebbf693d669978c8c8a74567801cae9028\"\n\
         identity = \"alice@ops\"\nroles = [\"task_write\"]\n\
         [daemon]\ndrain_timeout = \"10s\"\n\
         [[consumers]]\nstream = \"nova:task:control:in\"\ngroup = \"g\"\nstart = \"0\"\nblock = \"1s\"\n\
         handler = \"forward\"\nforward_to = \"nova:task:control:out\"\n",
        server.url(),
        socket.display(),
        private.display(),
        crate::util::fixture("keys/ed25519.pub").display(),
    );
    let mut d = Daemon::running_wrapped(&toml, &[], &["prlimit", "--nofile=1024:1024", "--"]);
    // 1,100 connections that send nothing, held open.
    let idle: Vec<std::os::unix::net::UnixStream> = (0..1100)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).expect("connect"))
        .collect();
    server.restart();
    let ids = server.xadd_backlog("nova:task:control:in", 50);
    let out = wait_for(
        "50 forwards after the restart",
        Duration::from_secs(30),
        || {
            let out = server.entries("nova:task:control:out");
            (out.len() == 50).then_some(out)
        },
    );
    let mut causes: Vec<&str> = out
        .iter()
        .map(|e| e.fields.get_str("_cause").unwrap())
        .collect();
    causes.sort();
    let mut want: Vec<String> = ids
        .iter()
        .map(|id| format!("nova:task:control:in/{id}"))
        .collect();
    want.sort();
    assert_eq!(causes, want, "each message forwarded once");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ask = |key: &str| {
        rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                redstream::daemon::exchange::request(
                    &socket,
                    "/token",
                    &serde_json::json!({ "api_key": key }),
                ),
            )
            .await
        })
        .expect("the exchange answers within 10 s")
    };
    let token = ask("rsk_dev_demo_key").expect("a legitimate /token is answered");
    assert!(token["token"].as_str().is_some_and(|t| t.len() > 20));
    drop(idle);

    let before = d.count_log("credential exchange refused");
    let mut limited = 0;
    for i in 0..3000 {
        match ask(&format!("rsk_wrong_{i:06}")) {
            Err(e) if e.contains("too many requests") => limited += 1,
            Err(_) => {}
            Ok(v) => panic!("a wrong key got a token: {v}"),
        }
    }
    assert!(limited > 2500, "rate-limited: {limited} of 3000");
    let lines = d.count_log("credential exchange refused") - before;
    assert!(lines <= 2, "{lines} log lines for one peer's flood");
    assert!(
        d.logs().iter().all(|l| !l.contains("rsk_")),
        "a key reached the log"
    );
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// `status --watch` keeps running through a Redis outage — it is the screen of that incident — and
/// says since when Redis is unreachable, then shows the report again once Redis is back.
#[test]
fn status_watch_keeps_running_through_a_redis_outage() {
    use std::io::BufRead as _;
    let mut server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("redstream.toml");
    std::fs::write(&config, toml(&server, "1h")).unwrap();
    let mut child = std::process::Command::new(crate::util::bin())
        .args([
            "status",
            "--watch",
            "--json",
            "--interval",
            "200ms",
            "--config",
        ])
        .arg(&config)
        .env_remove("REDSTREAM_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run redstream status --watch");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let next = |want: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no line with {want}"));
            if line.contains(want) {
                return line;
            }
        }
    };
    next("\"groups\"");
    server.kill();
    let down = next("unreachable_since_ms");
    assert!(down.contains("error"), "{down}");
    next("unreachable_since_ms");
    assert!(child.try_wait().unwrap().is_none(), "still watching");
    server.restart();
    next("\"groups\"");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The daemon makes itself non-dumpable at start (PR_SET_DUMPABLE 0): no core file holds the Redis
/// password or the signing key, and no other process of its user may ptrace it. The kernel shows it
/// from outside: a non-dumpable process's /proc files belong to root, whoever it runs as. Run as
/// nobody (setpriv, which execs it: a plain exec leaves a process dumpable).
#[test]
fn the_running_daemon_is_not_dumpable() {
    use std::os::unix::fs::MetadataExt as _;
    let server = RedisServer::start();
    let toml = daemon_toml(
        &server.url(),
        "[[consumers]]\nstream = \"nova:task:control:in\"\ngroup = \"g\"\n\
         handler = \"forward\"\nforward_to = \"nova:task:control:out\"\n",
    );
    let nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
    ];
    let mut d = Daemon::running_wrapped(&toml, &[], &nobody);
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap();
    assert_eq!(uid, "65534", "it runs as nobody");
    let owner = std::fs::metadata(format!("/proc/{}/environ", d.pid()))
        .unwrap()
        .uid();
    assert_eq!(owner, 0, "its /proc files are root's: it is not dumpable");
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// Heartbeats Redis refuses (the heartbeat stream holds a string): after a few seconds of failures the
/// daemon says so once — a WARN naming the stream, `redstream_heartbeat_failing` 1, degraded — while it
/// keeps working; once the key is fixed, beats flow again and the gauge is back to 0.
#[test]
fn heartbeats_that_cannot_be_published_are_reported_once_and_recover() {
    use crate::metrics::{get, sample};
    let server = RedisServer::start();
    let port = crate::util::redis_server::free_port();
    server.set_string(HEARTBEAT);
    let toml = daemon_toml(
        &server.url(),
        &format!(
            "[heartbeat]\ninterval = \"1s\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\
             [[consumers]]\nstream = \"nova:task:control:in\"\ngroup = \"g\"\nstart = \"0\"\n\
             handler = \"forward\"\nforward_to = \"nova:task:control:out\"\n"
        ),
    );
    let mut d = Daemon::running(&toml, &[]);
    let gauge = |name: &str| sample(&get(port, "/metrics").1, name, &[]);
    wait_for("heartbeat_failing = 1", Duration::from_secs(20), || {
        (gauge("redstream_heartbeat_failing") == 1.0).then_some(())
    });
    wait_for("degraded = 1", Duration::from_secs(5), || {
        (gauge("redstream_degraded") == 1.0).then_some(())
    });
    server.xadd("nova:task:control:in", &[("n", "1")]);
    wait_for("work goes on", Duration::from_secs(10), || {
        (server.xlen("nova:task:control:out") == 1).then_some(())
    });
    let _: i64 = redis::cmd("DEL")
        .arg(HEARTBEAT)
        .query(&mut server.conn())
        .unwrap();
    wait_for("heartbeats again", Duration::from_secs(10), || {
        (gauge("redstream_heartbeat_failing") == 0.0 && server.xlen(HEARTBEAT) > 0).then_some(())
    });
    assert_eq!(
        d.count_log("heartbeats cannot be published to nova:system:mcp:heartbeat"),
        1,
        "reported once, naming the stream"
    );
    assert_eq!(d.count_log("heartbeats are published again"), 1);
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}

/// Redis restarted without its data under a quiet stream read from `$`, a producer writes at once, and
/// a reload with changed settings restarts the consumer before it got Redis back: its successor must
/// re-create the group where nothing published since is skipped (from `0`, the stream being new), not
/// at `$` as a first start would. (The nemesis found the successor skipping them.)
#[test]
fn a_reload_successor_after_redis_came_back_empty_skips_nothing() {
    const IN: &str = "nova:task:control:succ-in";
    const OUT: &str = "nova:task:control:succ-out";
    let mut server = RedisServer::start();
    let url = server.url();
    let consumer = |timeout: &str| {
        daemon_toml(
            &url,
            &format!(
                "[[consumers]]\nstream = \"{IN}\"\ngroup = \"g\"\nstart = \"$\"\nblock = \"1s\"\n\
                 handler_timeout = \"{timeout}\"\nhandler = \"forward\"\nforward_to = \"{OUT}\"\n"
            ),
        )
    };
    let env = [
        ("REDSTREAM_REDIS__RECONNECT_MIN_DELAY", "5s"),
        ("REDSTREAM_REDIS__RECONNECT_MAX_DELAY", "6s"),
    ];
    let mut d = Daemon::running(&consumer("1s"), &env);
    server.xadd(IN, &[("n", "before")]);
    wait_for("the first reply", Duration::from_secs(10), || {
        (server.xlen(OUT) == 1).then_some(())
    });
    server.restart_empty();
    let ids = server.xadd_backlog(IN, 10);
    // The reload restarts the loop (its handler_timeout changed) while it waits to reconnect.
    std::fs::write(d.config_path(), consumer("2s")).unwrap();
    d.signal(libc::SIGHUP);
    assert!(d.wait_log(
        "restarting the consumer with its new settings",
        Duration::from_secs(10)
    ));
    let replies = wait_for("10 replies", Duration::from_secs(30), || {
        let r = server.entries(OUT);
        (r.len() >= 10).then_some(r)
    });
    // Once each, in any order: without order_by, messages run (and commit) in parallel.
    let mut causes: Vec<String> = replies
        .iter()
        .map(|e| e.fields.get_str("_cause").unwrap().to_owned())
        .collect();
    causes.sort();
    let mut want: Vec<String> = ids.iter().map(|id| format!("{IN}/{id}")).collect();
    want.sort();
    assert_eq!(
        causes, want,
        "every message published after Redis came back, once"
    );
    assert_eq!(d.stop(Duration::from_secs(10)), 0);
}
