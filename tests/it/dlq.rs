//! The dead-letter workflow an operator follows: list what the daemon dead-lettered, replay it.

use std::process::Command;
use std::time::Duration;

use redstream::auth::Roles;
use serde_json::Value;

use crate::util::{Daemon, RedisServer, bin, daemon_toml, settings, wait_for};

const IN: &str = "nova:task:dlq:in";
const DLQ: &str = "nova:task:dlq:in-dlq";

fn cli(config: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("REDSTREAM_TOKEN")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn list_and_replay_dead_letters() {
    let server = RedisServer::start();
    let consumers = format!(
        "[[consumers]]\nstream = \"{IN}\"\ngroup = \"g\"\nstart = \"0\"\nhandler = \"faults\"\nmax_deliveries = 1\n\
         handler_timeout = \"300ms\"\nclaim_min_idle = \"1s\"\nfaults = {{ fail_field = \"poison\" }}\n"
    );
    let toml = daemon_toml(&server.url(), &consumers);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("redstream.toml");
    std::fs::write(&config, &toml).unwrap();

    let bad1 = server.xadd(
        IN,
        &[
            ("poison", "1"),
            ("task", r#"{"id":"t1"}"#),
            ("_source", "producer-a"),
        ],
    );
    let bad2 = server.xadd(IN, &[("poison", "2")]);
    server.xadd(IN, &[("ok", "1")]);
    let mut d = Daemon::running(&toml, &[]);
    wait_for("two dead letters", Duration::from_secs(10), || {
        (server.xlen(DLQ) == 2).then_some(())
    });
    assert_eq!(d.stop(Duration::from_secs(10)), 0);

    let (code, out, err) = cli(&config, &["dlq", "list", DLQ]);
    assert_eq!(code, 0, "{err}");
    let mut listed: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 2);
    // Both failed concurrently: find the first one's dead letter.
    listed.sort_by_key(|l| l["source"] != format!("{IN}/{bad1}"));
    assert_eq!(listed[0]["source"], format!("{IN}/{bad1}"));
    assert_eq!(listed[0]["deliveries"], 1);
    assert_eq!(listed[0]["handler"], "faults");
    assert!(listed[0]["reason"].as_str().unwrap().contains("poison"));
    assert_eq!(
        listed[0]["fields"]["task"]["id"], "t1",
        "original fields, decoded"
    );
    assert!(
        listed[0]["fields"].get("_dlq_reason").is_none(),
        "dead-letter fields are pulled out"
    );

    // Someone who may only read the task domain cannot replay.
    let reader = settings(&server.url())
        .auth
        .keys
        .issue(
            "reader",
            &Roles::parse(&["task_read"]).unwrap(),
            Duration::from_secs(60),
        )
        .unwrap()
        .0;
    let (code, _, err) = cli(
        &config,
        &["dlq", "replay", DLQ, "--all", "--token", &reader],
    );
    assert_eq!(code, 1);
    assert!(err.contains("task_write"), "{err}");
    assert_eq!(server.xlen(DLQ), 2);

    let dead_id = listed[0]["id"].as_str().unwrap().to_owned();
    let (code, out, err) = cli(&config, &["dlq", "replay", DLQ, "--id", &dead_id]);
    assert_eq!(code, 0, "{err}");
    let replayed: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(replayed["stream"], IN);
    let new_id = replayed["id"].as_str().unwrap();
    let again = server
        .entries(IN)
        .into_iter()
        .find(|e| e.id == new_id)
        .expect("re-published with a new id");
    assert_eq!(
        again.fields.get_str("_dlq_replayed_from"),
        Some(format!("{DLQ}/{dead_id}").as_str())
    );
    assert_eq!(
        again.fields.get_str("_dlq_original_source"),
        Some("producer-a")
    );
    assert_eq!(again.fields.get_str("task"), Some(r#"{"id":"t1"}"#));
    assert!(again.fields.get("_dlq_reason").is_none());
    assert_eq!(server.xlen(DLQ), 1, "removed from the dead-letter stream");

    // Anyone who may publish to the dead-letter stream can plant an entry naming another stream as
    // its source; a replay goes only where the config says this dead-letter stream belongs.
    let control = "nova:system:mcp:control";
    let planted = server.xadd(
        DLQ,
        &[
            ("_dlq_source", &format!("{control}/1-0")),
            ("_dlq_reason", "x"),
            ("type", "reload_config"),
        ],
    );
    let (code, out, err) = cli(&config, &["dlq", "replay", DLQ, "--all"]);
    assert_eq!(code, 1, "one entry was refused: {err}");
    assert_eq!(
        out.lines().count(),
        1,
        "the genuine one was replayed: {out}"
    );
    assert!(
        err.contains(&planted) && err.contains("refused") && err.contains(control),
        "{err}"
    );
    assert_eq!(
        server.xlen(control),
        0,
        "nothing reached the control stream"
    );
    let left: Vec<String> = server.entries(DLQ).into_iter().map(|e| e.id).collect();
    assert_eq!(
        left,
        vec![planted.clone()],
        "the planted entry stays where it was"
    );
    let (code, _, err) = cli(&config, &["dlq", "replay", DLQ, "--id", &planted]);
    assert_eq!(code, 1);
    assert!(err.contains("forged"), "{err}");
    // A dead-letter stream that belongs to no configured consumer and breaks the naming rule is
    // refused outright.
    let (code, _, err) = cli(
        &config,
        &["dlq", "replay", "nova:task:dlq:elsewhere", "--all"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("cannot tell which stream"), "{err}");
    let _ = bad2;
}
