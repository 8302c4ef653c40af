//! Config validation: every problem at once with its key path, secrets from files, identities.

use std::time::Duration;

use redstream::config::{self, Problem};

use crate::util::{TEST_SECRET, settings_from};

fn problems(toml: &str) -> Vec<Problem> {
    settings_from(toml)
        .expect_err("config should be refused")
        .problems
}

fn paths(p: &[Problem]) -> Vec<&str> {
    p.iter().map(|p| p.path.as_str()).collect()
}

#[test]
fn reports_every_problem_at_once_with_key_paths() {
    let toml = format!(
        r#"
[identity]
roles = ["root", "nosuchdomain_read", "task_write"]
[redis]
url = "http://localhost"
command_timeout = "abc"
reconnect_attempts = "x"
reconnect_min_delay = "10s"
reconnect_max_delay = "1s"
[auth]
leeway = 5
signing_key = "k1"
[[auth.keys]]
id = "k1"
algorithm = "HS256"
secret = "{TEST_SECRET}"
[[auth.keys]]
id = "k2"
algorithm = "HS999"
[[auth.api_keys]]
name = "ops"
hash = "plaintext-key"
identity = "ops"
[log]
level = "loud=="
"#
    );
    let p = problems(&toml);
    let text: Vec<String> = p.iter().map(|p| p.to_string()).collect();
    for expected in [
        "identity.roles[0]",
        "identity.roles[1]",
        "redis.url",
        "redis.command_timeout",
        "redis.reconnect_attempts",
        "redis.reconnect_min_delay",
        "auth.leeway",
        "auth.keys[1].algorithm",
        "auth.api_keys[0].hash",
        "log.level",
    ] {
        assert!(
            paths(&p).contains(&expected),
            "{expected} missing from {text:#?}"
        );
    }
    let attempts = p
        .iter()
        .find(|p| p.path == "redis.reconnect_attempts")
        .unwrap();
    assert_eq!(
        attempts.message,
        r#"expected a positive integer, found "x""#
    );
    let leeway = p.iter().find(|p| p.path == "auth.leeway").unwrap();
    assert!(
        leeway.message.contains("found \"5\"") && leeway.message.contains("time unit"),
        "{leeway}"
    );
    let role = p.iter().find(|p| p.path == "identity.roles[1]").unwrap();
    assert!(role.message.contains("nosuchdomain"), "{role}");
}

#[test]
fn unknown_keys_are_refused_with_their_path() {
    let p = problems("[redis]\nurll = \"redis://x\"\n");
    assert_eq!(paths(&p), ["redis.urll"], "{p:?}");
    assert!(p[0].message.contains("unknown key"), "{}", p[0]);
}

#[test]
fn secrets_come_from_files_relative_to_the_config() {
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    let private = |name: &str, content: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    private("jwt.secret", format!("{TEST_SECRET}\n"));
    private("redis.pw", "pw\n".into());
    let file = dir.path().join("redstream.toml");
    std::fs::write(
        &file,
        r#"
[identity]
roles = ["task_write"]
[redis]
password = { file = "redis.pw" }
[auth]
signing_key = "k"
[[auth.keys]]
id = "k"
algorithm = "HS256"
secret = { file = "jwt.secret" }
"#,
    )
    .unwrap();
    let settings = config::load(Some(&file)).unwrap();
    assert_eq!(settings.redis.password.as_deref(), Some("pw"));
    let me = settings.identity.unwrap();
    assert_eq!(me.identity.roles.to_string(), "task_write");
    assert!(
        me.identity.subject.starts_with("redstream@"),
        "default name: {}",
        me.identity.subject
    );

    // A secret file others may read is refused, naming it and its mode (as ssh does).
    let pw = dir.path().join("redis.pw");
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = config::load(Some(&file)).unwrap_err();
    assert_eq!(paths(&err.problems), ["redis.password"]);
    let message = &err.problems[0].message;
    assert!(
        message.contains("redis.pw") && message.contains("0644"),
        "{message}"
    );

    std::fs::remove_file(dir.path().join("redis.pw")).unwrap();
    let err = config::load(Some(&file)).unwrap_err();
    assert_eq!(paths(&err.problems), ["redis.password"]);
    assert!(
        err.problems[0].message.contains("redis.pw"),
        "names the file: {}",
        err.problems[0]
    );
}

#[test]
fn daemon_token_is_verified_at_load() {
    let base = |identity: &str| {
        format!(
            "[identity]\n{identity}\n[auth]\nsigning_key = \"k\"\n[[auth.keys]]\nid = \"k\"\nalgorithm = \"HS256\"\nsecret = \"{TEST_SECRET}\"\n"
        )
    };
    let p = problems(&base("token = \"not-a-jwt\""));
    assert_eq!(paths(&p), ["identity.token"]);
    assert!(p[0].message.contains("malformed"), "{}", p[0]);

    let signer = settings_from(&base("roles = [\"task_read\"]\nname = \"svc\"")).unwrap();
    let token = signer.identity.unwrap().token;
    let from_token = settings_from(&base(&format!("token = \"{token}\""))).unwrap();
    assert_eq!(from_token.identity.unwrap().identity.subject, "svc");
    let p = problems(&base(&format!("token = \"{token}\"\nname = \"other\"")));
    assert_eq!(paths(&p), ["identity.name"]);

    let p = problems("[identity]\nroles = [\"admin\"]\n");
    assert_eq!(
        paths(&p),
        ["identity.roles"],
        "self-issuing needs a signing key"
    );
}

fn with_consumers(consumers: &str) -> String {
    crate::util::daemon_toml("redis://127.0.0.1:1", consumers)
}

#[test]
fn consumer_entries_are_validated_together() {
    let p = problems(&with_consumers(
        r#"
[[consumers]]
stream = "nova:task:a:b"
group = "g"
handler = "drop"
claim_min_idle = "10s"
handler_timeout = "30s"

[[consumers]]
stream = "nova:devops:general"
group = "two words"
handler = "forward"
max_deliveries = "x"
batch_size = 0
start = "yesterday"

[[consumers]]
handler = "wasm-thing"
"#,
    ));
    let text: Vec<String> = p.iter().map(|p| p.to_string()).collect();
    for expected in [
        "consumers[0].claim_min_idle",
        "consumers[1].stream",
        "consumers[1].group",
        "consumers[1].max_deliveries",
        "consumers[1].batch_size",
        "consumers[1].start",
        "consumers[1].forward_to",
        "consumers[2].stream",
        "consumers[2].group",
        "consumers[2].handler",
    ] {
        assert!(
            paths(&p).contains(&expected),
            "{expected} missing from {text:#?}"
        );
    }
    let max = p
        .iter()
        .find(|p| p.path == "consumers[1].max_deliveries")
        .unwrap();
    assert_eq!(max.message, r#"expected a positive integer, found "x""#);
    let idle = p
        .iter()
        .find(|p| p.path == "consumers[0].claim_min_idle")
        .unwrap();
    assert!(idle.message.contains("handler_timeout"), "{idle}");
}

/// `retry`: each bad step and a bad jitter named by its path and value; a good one read as given, and
/// none without it.
#[test]
fn retry_schedules_are_validated_step_by_step() {
    let consumer = |retry: &str| {
        format!(
            "[[consumers]]\nstream = \"nova:task:a:b\"\ngroup = \"g\"\nhandler = \"drop\"\n{retry}\n"
        )
    };
    let p = problems(&with_consumers(&format!(
        "{}{}",
        consumer(r#"retry = { backoff = ["1s", "soon", "0s"], jitter = "150%" }"#),
        consumer("retry = { backoff = [] }").replace("nova:task:a:b", "nova:task:a:c"),
    )));
    let text: Vec<String> = p.iter().map(|p| p.to_string()).collect();
    for (path, says) in [
        ("consumers[0].retry.backoff[1]", "soon"),
        ("consumers[0].retry.backoff[2]", "above zero"),
        ("consumers[0].retry.jitter", "150%"),
        ("consumers[1].retry.backoff", "empty"),
    ] {
        assert!(
            p.iter()
                .any(|p| p.path == path && p.to_string().contains(says)),
            "{path} ({says}) missing from {text:#?}"
        );
    }
    assert!(
        !paths(&p).contains(&"consumers[0].retry.backoff[0]"),
        "{text:#?}"
    );
    let unknown = settings_from(&with_consumers(&consumer(r#"retry = { backof = ["1s"] }"#)))
        .expect_err("an unknown key")
        .to_string();
    assert!(unknown.contains("backof"), "{unknown}");

    let s = settings_from(&with_consumers(&format!(
        "{}{}",
        consumer(r#"retry = { backoff = ["1s", "2m"] }"#),
        consumer("").replace("nova:task:a:b", "nova:task:a:c"),
    )))
    .unwrap();
    let retry = s.consumers[0].retry.as_ref().unwrap();
    assert_eq!(
        (retry.backoff.clone(), retry.jitter_percent),
        (vec![Duration::from_secs(1), Duration::from_secs(120)], 20)
    );
    assert_eq!(s.consumers[1].retry, None);
}

/// `breaker` and `rate` of a `[[handlers]]` entry: every key checked with its path, the defaults of
/// a `breaker = {}`, and the rate's units.
#[test]
fn breakers_and_rate_limits_are_validated_key_by_key() {
    let handler = |name: &str, guard: &str| {
        format!("[[handlers]]\nname = \"{name}\"\nfaults = {{}}\n{guard}\n")
    };
    let consumer = "[[consumers]]\nstream = \"nova:task:a:b\"\ngroup = \"g\"\nhandler = \"h0\"\n";
    let p = problems(&with_consumers(&format!(
        "{consumer}{}{}{}{}",
        handler(
            "h0",
            r#"breaker = { failures = "120%", min_calls = 0, window = "0s", open_for = "later" }"#
        ),
        handler("h1", r#"rate = "fast""#),
        handler("h2", r#"rate = "10/d""#),
        handler("h3", r#"retry = { backoff = [] }"#),
    )));
    let text: Vec<String> = p.iter().map(|p| p.to_string()).collect();
    for (path, says) in [
        ("handlers[0].breaker.failures", "120%"),
        ("handlers[0].breaker.min_calls", "at least 1"),
        ("handlers[0].breaker.window", "above zero"),
        ("handlers[0].breaker.open_for", "later"),
        ("handlers[1].rate", "fast"),
        ("handlers[2].rate", "unknown unit \"d\""),
        ("handlers[3].retry.backoff", "empty"),
    ] {
        assert!(
            p.iter()
                .any(|p| p.path == path && p.to_string().contains(says)),
            "{path} ({says}) missing from {text:#?}"
        );
    }
    let unknown = settings_from(&with_consumers(&format!(
        "{consumer}{}",
        handler("h0", r#"breaker = { failure = "50%" }"#)
    )))
    .expect_err("an unknown key")
    .to_string();
    assert!(unknown.contains("failure"), "{unknown}");

    let s = settings_from(&with_consumers(&format!(
        "{consumer}{}{}",
        handler("h0", "breaker = {}\nrate = \"30/m\""),
        handler("h1", r#"breaker = { failures = "25%", open_for = "1m" }"#),
    )))
    .unwrap();
    let guard = |name: &str| s.guards.iter().find(|(n, _)| n == name).unwrap().1.clone();
    let b = guard("h0").breaker.unwrap();
    assert_eq!(
        (b.failure_percent, b.min_calls, b.window, b.open_for),
        (50, 20, Duration::from_secs(30), Duration::from_secs(30))
    );
    assert_eq!(guard("h0").rate.unwrap().to_string(), "30/m");
    let b = guard("h1").breaker.unwrap();
    assert_eq!(
        (b.failure_percent, b.open_for),
        (25, Duration::from_secs(60))
    );
    assert_eq!(guard("h1").rate, None);
    let s = settings_from(&with_consumers(&format!(
        "{consumer}{}",
        handler("h0", r#"retry = { backoff = ["2s"] }"#)
    )))
    .unwrap();
    let retry = s.guards[0].1.retry.clone().unwrap();
    assert_eq!(
        (retry.backoff, retry.jitter_percent),
        (vec![Duration::from_secs(2)], 20)
    );
}

/// `[limits]`, batch_size and in_flight stay within what one commit can carry, and say so.
#[test]
fn limits_are_capped_at_what_a_commit_carries() {
    let p = problems(&with_consumers(
        r#"
[limits]
entry_fields = 4000
entry_bytes = "1GiB"
replies = 0
reply_fields = "many"
reply_bytes = "12"

[[consumers]]
stream = "nova:task:a:b"
group = "g"
handler = "drop"
batch_size = 501
in_flight = 5001
"#,
    ));
    let text: Vec<String> = p.iter().map(|p| p.to_string()).collect();
    assert_eq!(p.len(), 7, "{text:#?}");
    let message = |path: &str| {
        p.iter()
            .find(|p| p.path == path)
            .unwrap_or_else(|| panic!("{path} missing from {text:#?}"))
            .message
            .clone()
    };
    assert_eq!(
        message("limits.entry_fields"),
        "4000 is outside 1..3900 (the most one commit can write)"
    );
    assert!(message("limits.entry_bytes").contains("outside 1KiB..512MiB"));
    assert!(message("limits.replies").contains("outside 1..1000"));
    assert!(message("limits.reply_fields").contains("found \"many\""));
    assert!(message("limits.reply_bytes").contains("12 bytes is outside"));
    assert!(message("consumers[0].batch_size").contains("501 is more than 500"));
    assert!(message("consumers[0].in_flight").contains("5001 is more than 5000"));
    let fine = crate::util::settings_from(&with_consumers(
        "[limits]\nentry_fields = 3900\nentry_bytes = \"512MiB\"\n\
         [[consumers]]\nstream = \"nova:task:a:b\"\ngroup = \"g\"\nhandler = \"drop\"\nbatch_size = 500\nin_flight = 5000\n",
    ))
    .unwrap();
    assert_eq!(fine.consumers[0].entry_limit.fields, 3900);
    assert_eq!(fine.consumers[0].entry_limit.bytes, 512 << 20);
    assert_eq!(
        fine.wasm.reply_limit,
        redstream::model::ReplyLimit::default()
    );
}

#[test]
fn consumers_need_permissions_for_everything_they_will_do() {
    let base = with_consumers(
        "[[consumers]]\nstream = \"nova:task:a:b\"\ngroup = \"g\"\nhandler = \"forward\"\nforward_to = \"nova:agent:x:y\"\n\
         [heartbeat]\nenabled = false\n[control]\nenabled = false\n",
    );
    // The daemon may only touch the task domain: forwarding to agent is refused at load.
    let p = problems(&base.replace(
        "roles = [\"admin\"]",
        "roles = [\"task_read\", \"task_write\"]",
    ));
    assert_eq!(paths(&p), ["consumers[0].handler"], "{p:?}");
    assert!(p[0].message.contains("agent_write"), "{}", p[0]);
    let p = problems(&base.replace(
        "roles = [\"admin\"]",
        "roles = [\"agent_write\", \"task_write\"]",
    ));
    assert_eq!(
        paths(&p),
        ["consumers[0].stream"],
        "reading needs task_read: {p:?}"
    );

    // The heartbeat and control streams are in the system domain: without it, say how to turn them off.
    let p = problems(&base.replace("enabled = false", "enabled = true").replace(
        "roles = [\"admin\"]",
        "roles = [\"task_read\", \"task_write\", \"agent_write\"]",
    ));
    assert_eq!(
        paths(&p),
        ["heartbeat.stream", "control.stream", "control.dead_letter"],
        "{p:?}"
    );
    assert!(
        p[0].message.contains("system_write") && p[0].message.contains("heartbeat.enabled = false"),
        "{}",
        p[0]
    );

    let ok = settings_from(&base).unwrap();
    let c = &ok.consumers[0];
    assert_eq!(
        c.dead_letter, "nova:task:a:b-dlq",
        "default dead-letter stream"
    );
    assert!(
        c.consumer.starts_with("test-daemon@"),
        "default consumer name: {}",
        c.consumer
    );
    assert_eq!(
        (
            c.start.as_str(),
            c.batch_size,
            c.in_flight,
            c.max_deliveries
        ),
        ("$", 500, 2000, 5),
        "defaults: the caps the pace adapts within"
    );
}

/// A handler's `state` namespace is named like a stream, needs the right to write its domain, and on
/// a Redis Cluster must share the hash slot of every stream routed to the handler.
#[test]
fn handler_state_needs_its_domain_and_on_a_cluster_its_sources_slot() {
    let file = crate::util::root().join("handlers/build/counter.wasm");
    let config = |stream: &str, state: &str| {
        with_consumers(&format!(
            "[[consumers]]\nstream = \"{stream}\"\ngroup = \"g\"\nhandler = \"c\"\n\
             [[handlers]]\nname = \"c\"\nfile = \"{}\"\nroles = [\"task_write\"]\nstate = \"{state}\"\n",
            file.display()
        ))
    };
    let cluster =
        |toml: String| toml.replace("[redis]", "[redis]\ncluster = [\"redis://127.0.0.1:1\"]");
    for (toml, says) in [
        (
            config("nova:task:t:in", "nova:memory:router:state"),
            "that needs role memory_write or admin",
        ),
        (config("nova:task:t:in", "counts"), "\"counts\""),
        (
            cluster(config("nova:task:{t}:in", "nova:task:{other}:state")),
            "must be in the hash slot of every stream routed to it: nova:task:{other}:state is in slot",
        ),
    ] {
        let p = problems(&toml);
        assert!(
            p.iter()
                .any(|p| p.path == "handlers[0].state" && p.to_string().contains(says)),
            "handlers[0].state ({says}) missing from {p:#?}"
        );
    }
    for (toml, state) in [
        (
            config("nova:task:t:in", "nova:task:counter:state"),
            "nova:task:counter:state",
        ),
        (
            cluster(config("nova:task:{t}:in", "nova:task:{t}:state")),
            "nova:task:{t}:state",
        ),
    ] {
        let s = crate::util::settings_from(&toml).unwrap();
        assert_eq!(s.handlers[0].state.as_deref(), Some(state));
    }
}
